"""Peak memory of ``spotfit fit`` on TYX stacks larger than memory should matter.

Writes synthetic uint16 TYX stacks (ImageJ TIFF, uncompressed, written frame
by frame so that the writer stays small too) into a temporary folder, runs
``spotfit fit`` on each in a subprocess and reports the stack size, frames,
spots, wall time and the subprocess' peak resident memory (``ru_maxrss``
from ``os.wait4``, which counts the file pages a memory map keeps
resident).  The stacks are deleted afterwards.

    python benchmarks/stack_memory.py                 # 0.25 GB and 2.1 GB stacks
    python benchmarks/stack_memory.py --sizes 4 --compression zlib

Peak memory should be the same for the small and the large stack: frames
are read one at a time (memory-mapped pages are released after each frame;
compressed files are decoded page by page).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from spotfit.camera import Camera
from spotfit.simulation import simulate

GB = 1e9
MIN_FREE = 5 * GB  # refuse to run with less free disk space than this
CAMERA = Camera(baseline=100, gain=1.0, read_noise=1.5)


def spotfit_command() -> list:
    script = Path(sys.executable).with_name("spotfit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spotfit"]


def write_stack(path: Path, n_frames: int, ny: int, nx: int, n_spots: int, compression,
                distinct: int = 16) -> None:
    """A TYX uint16 stack of `n_frames`, cycling through `distinct` simulated frames."""
    frames, _ = simulate((distinct, ny, nx), n_spots=n_spots, photons=2000, background=10,
                         sigma=1.3, camera=CAMERA, min_separation=8, border=3, seed=1)

    def generate():
        for t in range(n_frames):
            yield frames[t % distinct]

    tifffile.imwrite(path, generate(), shape=(n_frames, ny, nx), dtype=np.uint16,
                     imagej=compression is None, compression=compression,
                     metadata={"axes": "TYX"} if compression is None else None,
                     maxworkers=1)


def run_fit(stack: Path, out: Path) -> tuple:
    """Run ``spotfit fit``; return (seconds, peak RSS in bytes, stderr)."""
    cmd = spotfit_command() + ["fit", str(stack), "--baseline", "100", "--gain", "1",
                               "--read-noise", "1.5", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"spotfit fit failed ({proc.returncode}): {stderr}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return seconds, usage.ru_maxrss * scale, stderr.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,2.1",
                        help="stack sizes in GB, comma-separated (default 0.25,2.1)")
    parser.add_argument("--frame", default="512x1024", help="ROWSxCOLS of a frame")
    parser.add_argument("--spots", type=int, default=20, help="spots per frame")
    parser.add_argument("--compression", default=None, help="e.g. zlib (default: none)")
    parser.add_argument("--tmp", default=None, help="folder for the stacks (default: system temp)")
    args = parser.parse_args(argv)
    ny, nx = (int(n) for n in args.frame.lower().split("x"))
    sizes = [float(s) for s in args.sizes.split(",")]

    tmp_root = args.tmp or tempfile.gettempdir()
    free = shutil.disk_usage(tmp_root).free
    if free < MIN_FREE:
        print(f"Only {free / GB:.1f} GB free in {tmp_root}; this benchmark needs "
              f"{MIN_FREE / GB:.0f} GB. Choose another folder with --tmp.")
        return

    print(f"spotfit fit on synthetic TYX stacks: {ny} x {nx} uint16 frames, {args.spots} "
          f"spots each, compression: {args.compression or 'none'}")
    print(f"{'stack':>9} {'frames':>7} {'spots':>8} {'write s':>8} {'fit s':>7} "
          f"{'frames/s':>9} {'peak RSS':>9}")
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="spotfit-stack-") as tmp:
        for size in sizes:
            n_frames = max(1, int(round(size * GB / (ny * nx * 2))))
            stack = Path(tmp) / "stack.tif"
            start = time.perf_counter()
            write_stack(stack, n_frames, ny, nx, args.spots, args.compression)
            written = time.perf_counter() - start
            seconds, rss, summary = run_fit(stack, Path(tmp) / "spots.csv")
            n_spots = sum(1 for _ in open(Path(tmp) / "spots.csv")) - 1
            print(f"{stack.stat().st_size / GB:7.2f} GB {n_frames:7d} {n_spots:8d} "
                  f"{written:8.1f} {seconds:7.1f} {n_frames / seconds:9.1f} "
                  f"{rss / 2**20:6.0f} MiB", flush=True)
            stack.unlink()
    print(f"writer (this process) peak RSS: "
          f"{_self_rss() / 2**20:.0f} MiB; stacks deleted")


def _self_rss() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


if __name__ == "__main__":
    main()
