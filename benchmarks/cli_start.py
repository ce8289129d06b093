"""How fast the command line answers when it computes nothing: ``--help`` and usage errors.

The target (issue #14): ``spotfit --help`` and ``spotfit fit --help`` within 0.3 s, which
they can only meet without importing numpy & co.  Each command is run ``--repeat`` times in
a fresh interpreter; the median is printed next to the same run's reference, a bare
``python -c pass`` and ``python -c "import click"`` (so a loaded machine shows as such: the
ratios stay, the seconds grow).

    python benchmarks/cli_start.py
    python benchmarks/cli_start.py --repeat 21
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (reference)": [sys.executable, "-c", "pass"],
    "python -c 'import click'": [sys.executable, "-c", "import click"],
    "spotfit --help": [sys.executable, "-m", "spotfit", "--help"],
    "spotfit fit --help": [sys.executable, "-m", "spotfit", "fit", "--help"],
    "spotfit detect --help": [sys.executable, "-m", "spotfit", "detect", "--help"],
    "spotfit fit x.tif --sigma -1 (usage error)": [sys.executable, "-m", "spotfit", "fit",
                                                    "x.tif", "--sigma", "-1"],
    "spotfit fit (missing file: imports numpy)": [sys.executable, "-m", "spotfit", "fit",
                                                   "missing.tif"],
}
TARGET_S = 0.3


def median_seconds(command, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="runs per command (median)")
    args = parser.parse_args()
    medians = {name: median_seconds(cmd, args.repeat) for name, cmd in COMMANDS.items()}
    reference = medians["python -c pass (reference)"]
    print(f"{'command':45s} {'median s':>9s} {'x python':>9s}")
    for name, seconds in medians.items():
        mark = ""
        if "--help" in name:
            mark = "  ok" if seconds <= TARGET_S else f"  above {TARGET_S} s"
        print(f"{name:45s} {seconds:9.3f} {seconds / reference:9.1f}{mark}")


if __name__ == "__main__":
    main()
