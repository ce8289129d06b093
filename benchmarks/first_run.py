"""The first ``spotfit fit`` after ``pip install``: how long it takes, and whether it says why.

The target (issue #14): the first fit of ``sample_data/spots.tif`` after a user's
``pip install`` finishes within 10 s on this 2-core machine, and prints a one-line notice
while the kernels compile.

A fresh virtual environment is made in a temporary folder and the repository is installed
into it as a user would (``pip install <repo>``, not editable, so numba's cache lands beside
the installed sources in site-packages).  Then, in that environment:

1. the first fit with a camera (``--gain``: photons, Poisson MLE, integrated model);
2. the first fit without ``--gain`` (ADU, least squares, point-sampled): the kernels
   the first run did not need;
3. the first fit of a small z-stack (3D model, compiled on its first use);
4. the same three again, warm (everything loaded from the cache): the reference.

Each line prints the seconds, the ratio to the warm run of the same command, and whether
the compile notice was printed on stderr (it should be on a first run, not on a warm one).
``--venv DIR`` reuses (or creates) an environment there and only reinstalls spotfit, which
empties its cache: a first run again in seconds instead of a minute of ``pip install``.

    python benchmarks/first_run.py
    python benchmarks/first_run.py --venv /tmp/spotfit-first-run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "spots.tif"
TARGET_S = 10.0
NOTICE = "Compiling"


def run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def make_venv(venv: Path) -> Path:
    """A virtual environment at ``venv`` with spotfit freshly installed (not editable)."""
    python = venv / "bin" / "python"
    started = time.perf_counter()
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "--quiet", str(REPO)])
    else:  # reuse the dependencies; a fresh copy of spotfit (no cache beside it)
        run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
             "--force-reinstall", str(REPO)])
    print(f"environment: {venv} (install {time.perf_counter() - started:.0f} s)")
    return python


def make_stack(path: Path, python: Path) -> None:
    """A small simulated z-stack (9 planes of 48 x 64 px, 6 spots), written by spotfit itself."""
    code = (
        "import numpy as np, tifffile\n"
        "rng = np.random.default_rng(7)\n"
        "z, y, x = np.mgrid[0:9, 0:48, 0:64].astype(float)\n"
        "img = 20.0 + np.zeros_like(x)\n"
        "for cz, cy, cx in zip(rng.uniform(3, 5, 6), rng.uniform(8, 40, 6), rng.uniform(8, 56, 6)):\n"
        "    img += 400 * np.exp(-((x-cx)**2 + (y-cy)**2) / (2*1.3**2) - (z-cz)**2 / (2*2.0**2))\n"
        "img = 100 + rng.poisson(img) / 2.0\n"
        f"tifffile.imwrite({str(path)!r}, img.astype(np.uint16), imagej=True, metadata={{'axes': 'ZYX'}})\n"
    )
    run([str(python), "-c", code])


def timed_fit(python: Path, args, out: Path, env) -> tuple[float, bool]:
    spotfit = python.parent / "spotfit"
    start = time.perf_counter()
    done = subprocess.run([str(spotfit), "fit", *args, "--out", str(out)], capture_output=True,
                          text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"spotfit fit {' '.join(args)} failed:\n{done.stderr}")
    return seconds, NOTICE in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="reuse (or create) this environment")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTHON"))}
    with tempfile.TemporaryDirectory(prefix="spotfit-first-run-") as tmp:
        tmp = Path(tmp)
        python = make_venv(args.venv if args.venv else tmp / "venv")
        stack = tmp / "stack.tif"
        make_stack(stack, python)
        cases = {
            "spots.tif --gain (photons, mle)": [str(SAMPLE), "--baseline", "100", "--gain", "2",
                                               "--read-noise", "1.5"],
            "spots.tif no --gain (ADU, lsq)": [str(SAMPLE), "--baseline", "100"],
            "z-stack 9x48x64 --gain": [str(stack), "--baseline", "100", "--gain", "2"],
        }
        first = {name: timed_fit(python, case, tmp / "first.csv", env) for name, case in cases.items()}
        warm = {name: timed_fit(python, case, tmp / "warm.csv", env) for name, case in cases.items()}
    print(f"{'first spotfit fit after install':34s} {'first s':>8s} {'warm s':>7s} {'x warm':>7s}"
          f"  notice first/warm")
    for name in cases:
        (t1, n1), (t2, n2) = first[name], warm[name]
        mark = "" if name != next(iter(cases)) else (
            "  ok" if t1 <= TARGET_S else f"  above {TARGET_S:.0f} s")
        print(f"{name:34s} {t1:8.1f} {t2:7.1f} {t1 / t2:7.1f}  {'yes' if n1 else 'no':>3s}/"
              f"{'yes' if n2 else 'no'}{mark}")
    total = sum(t for t, _ in first.values())
    print(f"{'all three first runs':34s} {total:8.1f}")


if __name__ == "__main__":
    main()
