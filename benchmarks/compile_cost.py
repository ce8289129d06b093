"""What a first run compiles: each kernel's compile seconds and type signatures.

Runs one ``spotfit`` command (default: ``fit sample_data/spots.tif`` with a camera) in
this process with an empty numba cache (a temporary ``NUMBA_CACHE_DIR``) and without the
second compiling process (so that every kernel is compiled here, one after the other),
and prints, per compiled function (spotfit's kernels and the numba library functions
they pull in):

* the CPU seconds spent compiling it, *excluding* the functions it calls (numba compiles
  a callee while typing its caller; those seconds are the callee's);
* how many type signatures it was compiled for.  Each distinct signature is a separate
  compile: a kernel listed with more than one from a single command is compiled twice
  (``--signatures`` lists them; ``Literal[int](0)`` means a constant 0 passed to an
  ``njit`` callee, which numba compiles for that literal and again for ``int64``).

Then the CPU seconds of the stages: importing numba, importing the command line, and
the command (its compile time, top-level compilations only, and the rest).  CPU seconds
(of this process: compiling is single-threaded) rather than wall-clock seconds, which
on a shared machine depend on the load; the wall-clock total is printed too.

    python benchmarks/compile_cost.py
    python benchmarks/compile_cost.py --signatures -- fit sample_data/spots.tif --baseline 100
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import describe, reference_seconds  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "spots.tif"
DEFAULT = ["fit", str(SAMPLE), "--baseline", "100", "--gain", "2", "--read-noise", "1.5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", action="store_true", help="list every compilation")
    parser.add_argument("command", nargs="*", help="spotfit's arguments (after --)")
    args = parser.parse_args()
    command = args.command or DEFAULT
    with tempfile.TemporaryDirectory(prefix="spotfit-compile-cost-") as tmp:
        os.environ["NUMBA_CACHE_DIR"] = tmp
        os.environ["SPOTFIT_COMPILE_NOTICE"] = "0"
        if "--out" not in command and command[0] == "fit":
            command = [*command, "--out", str(Path(tmp) / "spots.csv")]
        speed = [reference_seconds()]
        report(*run(command), signatures=args.signatures)
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{describe([*speed, reference_seconds()], ': before / after')}")


def run(command):
    """Compilations ``(name, signature, seconds, seconds excluding callees, depth)``
    of ``spotfit COMMAND``, and the seconds of its stages."""
    started, wall = time.process_time(), time.perf_counter()
    from numba.core import event

    open_, rows = [], []

    class Listener(event.Listener):
        def on_start(self, ev):
            open_.append([time.process_time(), 0.0])

        def on_end(self, ev):
            begun, inner = open_.pop()
            seconds = time.process_time() - begun
            if open_:
                open_[-1][1] += seconds
            func = ev.data["dispatcher"].py_func
            rows.append((f"{func.__module__}.{func.__qualname__}".replace(".<locals>", ""),
                         tuple(str(a) for a in ev.data["args"]), seconds, seconds - inner, len(open_)))

    event.register("numba:compile", Listener())
    numba_s = time.process_time() - started
    from spotfit import _jit
    from spotfit.cli import main as cli

    _jit.compile_alongside = lambda target, meanwhile=None, early=False: None  # everything in this process
    imports_s = time.process_time() - started - numba_s
    begun = time.process_time()
    try:
        cli(command, prog_name="spotfit")
    except SystemExit as exc:
        if exc.code:
            sys.exit(f"spotfit {' '.join(command)} failed ({exc.code})")
    stages = {"import numba": numba_s, "import spotfit.cli": imports_s,
              "command": time.process_time() - begun, "wall": time.perf_counter() - wall}
    return rows, stages


def report(rows, stages, signatures=False) -> None:
    per = collections.defaultdict(lambda: [0.0, []])
    for name, sig, _, alone, _ in rows:
        per[name][0] += alone
        per[name][1].append(sig)
    compile_s = sum(r[2] for r in rows if r[4] == 0)
    print(f"{'compile s':>9s}  {'sigs':>4s}  function (seconds excluding its callees)")
    for name, (seconds, sigs) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        twice = "  <- compiled more than once" if len(sigs) > 1 and name.startswith("spotfit") else ""
        print(f"{seconds:9.2f}  {len(sigs):4d}  {name}{twice}")
        if signatures:
            for sig in sigs:
                print(f"{'':17s}({', '.join(sig)})")
    print(f"{sum(v[0] for v in per.values()):9.2f}  {len(rows):4d}  all compilations")
    wall = stages.pop("wall")
    print("CPU seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f" (compiling {compile_s:.2f}, the rest {stages['command'] - compile_s:.2f});"
          f" wall-clock {wall:.1f} s")


if __name__ == "__main__":
    main()
