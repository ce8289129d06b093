"""Files per second: one ``spotfit fit FOLDER --out-dir`` run versus one run per file.

Simulates a folder of small images (default 100 of 128 x 128 px, 20 spots
each) in a temporary folder, then times

1. one invocation: ``spotfit fit FOLDER --out-dir OUT`` (``--workers``:
   default all cores), and
2. one invocation per file, one after the other, as a shell loop does:
   ``spotfit fit FILE --out OUT/FILE.csv``,

and prints files/s of each, their ratio, and whether both wrote identical
tables.

    python benchmarks/batch_files.py
    python benchmarks/batch_files.py --files 200 --workers 1
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spotfit.camera import Camera
from spotfit.simulation import simulate, write_simulation

CAMERA_ARGS = ["--baseline", "100", "--gain", "1", "--read-noise", "1.5"]


def spotfit_command() -> list:
    script = Path(sys.executable).with_name("spotfit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spotfit"]


def make_folder(folder: Path, n_files: int, size: int, n_spots: int) -> None:
    camera = Camera(baseline=100, gain=1.0, read_noise=1.5)
    for i in range(n_files):
        image, truth = simulate((size, size), n_spots=n_spots, photons=2000, background=10,
                                sigma=1.3, camera=camera, min_separation=8, border=3, seed=i)
        write_simulation(folder / f"img{i:03d}.tif", folder.parent / "truth.csv", image, truth,
                         axes="YX")


def run(cmd) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--size", type=int, default=128, help="image side, px")
    parser.add_argument("--spots", type=int, default=20, help="spots per image")
    parser.add_argument("--workers", type=int, default=None,
                        help="--workers of the one-invocation run (default: all cores)")
    args = parser.parse_args(argv)
    spotfit = spotfit_command()

    with tempfile.TemporaryDirectory(prefix="spotfit-batch-") as tmp:
        tmp = Path(tmp)
        folder, one, many = tmp / "images", tmp / "one", tmp / "many"
        for d in (folder, many):
            d.mkdir()
        make_folder(folder, args.files, args.size, args.spots)

        workers = [] if args.workers is None else ["--workers", str(args.workers)]
        start = time.perf_counter()
        run(spotfit + ["fit", str(folder), "--out-dir", str(one), *CAMERA_ARGS, *workers])
        t_one = time.perf_counter() - start

        files = sorted(folder.glob("*.tif"))
        start = time.perf_counter()
        for f in files:
            run(spotfit + ["fit", str(f), *CAMERA_ARGS, "--out", str(many / f"{f.stem}.csv")])
        t_many = time.perf_counter() - start

        names = [f"{f.stem}.csv" for f in files]
        match, mismatch, errors = filecmp.cmpfiles(one, many, names, shallow=False)
        rows = sum(sum(1 for _ in open(one / n)) - 1 for n in names)

    n = len(files)
    print(f"{n} images of {args.size} x {args.size} px, {args.spots} spots each "
          f"({rows} spots fitted); {os.cpu_count()} cores")
    print(f"one invocation (--out-dir, --workers {args.workers or 'all cores'}): "
          f"{t_one:6.1f} s  {n / t_one:6.1f} files/s")
    print(f"{n} invocations (one per file):        {t_many:6.1f} s  {n / t_many:6.1f} files/s "
          f"({t_many / n * 1000:.0f} ms per invocation)")
    print(f"speed-up of one invocation: {t_many / t_one:.1f} x")
    print(f"tables identical: {len(match)}/{n}" + (f" (differ: {mismatch + errors})"
                                                   if mismatch or errors else ""))


if __name__ == "__main__":
    main()
