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
4. the first fit of a 600 x 600 frame (large frames use the multi-threaded variants of the
   detection and background row kernels, compiled on their first use);
5. the same four again, warm (everything loaded from the cache): the reference.

Each line prints the wall-clock seconds, the CPU seconds (the process and the second
process it starts to compile alongside; on an idle 2-core machine the wall time of a
first run is about half of it, on a loaded one more), the ratio to the warm run of the
same command, and whether the compile notice was printed on stderr (it should be on a
first run, not on a warm one).  Last, the machine's speed just before and just after the
first runs (``host.py``): this host's speed drifts up to 2x within minutes, and a first
run's compile time follows it.
``--venv DIR`` reuses (or creates) an environment there and only reinstalls spotfit, which
empties its cache: a first run again in seconds instead of a minute of ``pip install``.
``--repo PATH`` installs another checkout (e.g. an older version, for a before/after
comparison under the same load).

    python benchmarks/first_run.py
    python benchmarks/first_run.py --venv /tmp/spotfit-first-run
    python benchmarks/first_run.py --venv /tmp/spotfit-first-run --repo ../other-checkout
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import describe, reference_seconds

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "spots.tif"
TARGET_S = 10.0
NOTICE = "Compiling"


def run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def make_venv(venv: Path, repo: Path) -> Path:
    """A virtual environment at ``venv`` with spotfit freshly installed (not editable)."""
    python = venv / "bin" / "python"
    started = time.perf_counter()
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "--quiet", str(repo)])
    else:  # reuse the dependencies; a fresh copy of spotfit, its numba cache emptied
        run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
             "--force-reinstall", str(repo)])
        package = run([str(python), "-c", "import os, spotfit; print(os.path.dirname(spotfit.__file__))"],
                      cwd=venv).stdout.strip()
        for cached in Path(package).rglob("__pycache__/*.nb[ic]"):  # pip leaves them
            cached.unlink()
    print(f"environment: {venv} (install {time.perf_counter() - started:.0f} s) with {repo}")
    return python


def make_images(stack: Path, large: Path, python: Path) -> None:
    """A small simulated z-stack (9 planes of 48 x 64 px, 6 spots) and a 600 x 600 frame."""
    code = (
        "import numpy as np, tifffile\n"
        "rng = np.random.default_rng(7)\n"
        "z, y, x = np.mgrid[0:9, 0:48, 0:64].astype(float)\n"
        "img = 20.0 + np.zeros_like(x)\n"
        "for cz, cy, cx in zip(rng.uniform(3, 5, 6), rng.uniform(8, 40, 6), rng.uniform(8, 56, 6)):\n"
        "    img += 400 * np.exp(-((x-cx)**2 + (y-cy)**2) / (2*1.3**2) - (z-cz)**2 / (2*2.0**2))\n"
        "img = 100 + rng.poisson(img) / 2.0\n"
        f"tifffile.imwrite({str(stack)!r}, img.astype(np.uint16), imagej=True, metadata={{'axes': 'ZYX'}})\n"
        "y, x = np.mgrid[0:600, 0:600].astype(float)\n"
        "img = 20.0 + np.zeros_like(x)\n"
        "for cy, cx in rng.uniform(10, 590, (60, 2)):\n"
        "    img += 300 * np.exp(-((x-cx)**2 + (y-cy)**2) / (2*1.3**2))\n"
        "img = 100 + rng.poisson(img) / 2.0\n"
        f"tifffile.imwrite({str(large)!r}, img.astype(np.uint16))\n"
    )
    run([str(python), "-c", code])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_fit(python: Path, args, out: Path, env) -> tuple[float, float, bool]:
    """Wall-clock and CPU seconds of ``spotfit fit ARGS --out OUT``, and whether it
    printed the compile notice."""
    spotfit = python.parent / "spotfit"
    cpu, start = cpu_seconds(), time.perf_counter()
    done = subprocess.run([str(spotfit), "fit", *args, "--out", str(out)], capture_output=True,
                          text=True, env=env, check=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode != 0:
        sys.exit(f"spotfit fit {' '.join(args)} failed:\n{done.stderr}")
    return seconds, cpu, NOTICE in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="reuse (or create) this environment")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to install")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTHON"))}
    with tempfile.TemporaryDirectory(prefix="spotfit-first-run-") as tmp:
        tmp = Path(tmp)
        python = make_venv(args.venv if args.venv else tmp / "venv", args.repo.resolve())
        stack, large = tmp / "stack.tif", tmp / "large.tif"
        make_images(stack, large, python)
        cases = {
            "spots.tif --gain (photons, mle)": [str(SAMPLE), "--baseline", "100", "--gain", "2",
                                               "--read-noise", "1.5"],
            "spots.tif no --gain (ADU, lsq)": [str(SAMPLE), "--baseline", "100"],
            "z-stack 9x48x64 --gain": [str(stack), "--baseline", "100", "--gain", "2"],
            "600x600 frame --gain": [str(large), "--baseline", "100", "--gain", "2"],
        }
        speed = [reference_seconds()]  # the machine's speed just before and after the first fits
        first = {name: timed_fit(python, case, tmp / "first.csv", env) for name, case in cases.items()}
        speed.append(reference_seconds())
        warm = {name: timed_fit(python, case, tmp / "warm.csv", env) for name, case in cases.items()}
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'first spotfit fit after install':34s} {'first s':>8s} {'CPU s':>6s} {'warm s':>7s} "
          f"{'CPU s':>6s} {'x warm':>7s}  notice first/warm")
    for name in cases:
        (t1, c1, n1), (t2, c2, n2) = first[name], warm[name]
        mark = "" if name != next(iter(cases)) else (
            "  ok" if t1 <= TARGET_S else f"  above {TARGET_S:.0f} s")
        print(f"{name:34s} {t1:8.1f} {c1:6.1f} {t2:7.1f} {c2:6.1f} {t1 / t2:7.1f}  "
              f"{'yes' if n1 else 'no':>3s}/{'yes' if n2 else 'no'}{mark}")
    print(f"{'all first runs':34s} {sum(v[0] for v in first.values()):8.1f} "
          f"{sum(v[1] for v in first.values()):6.1f}")
    print(describe(speed, ": before / after the first runs"))


if __name__ == "__main__":
    main()
