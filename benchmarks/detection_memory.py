"""Peak memory of detection on a very large frame (issue #11: bounded by the image size).

Builds an N x N uint16 frame (Poisson background of 20 photons/px over a
baseline of 100, a spot every 100 px on a grid), then runs
``spotfit.detection.find_peaks`` on it, with the noise measured on the frame
and with a camera's noise model, and prints the process' peak resident
memory beyond the frame itself, also as a ratio to the frame's size in
bytes (the reference measured in the same run).  Frames above
``spotfit.detection.BLOCK_PIXELS`` are processed in blocks of rows, so the
extra memory should stay near that of one block whatever N is.

Run ``python benchmarks/detection_memory.py`` (N = 20000, ~1 min and ~2 GB)
or ``--size 6000`` for a quick look.  Each measurement runs in a fresh
process (peak RSS only grows).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

CHILD = r"""
import resource, sys, time
import numpy as np
n, model = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
frame = np.empty((n, n), np.uint16)
for r in range(0, n, 2000):
    frame[r:r + 2000] = rng.poisson(20.0, (min(2000, n - r), n)) + 100
frame[50::100, 50::100] += 400  # a bright pixel every 100 px: candidates to find
from spotfit.background import NoiseModel
from spotfit.camera import Camera
from spotfit.detection import find_peaks
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
noise = NoiseModel.from_camera(Camera(baseline=100.0, gain=1.0)) if model == "camera" else None
data = frame if noise is None else Camera(baseline=100.0, gain=1.0).to_photons(frame)
if noise is not None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
coords, _ = find_peaks(data, 1.3, noise=noise)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(data.nbytes, before, peak, len(coords), seconds)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="frame side, px")
    args = ap.parse_args(argv)
    print(f"# detection memory, {args.size} x {args.size} px; python {platform.python_version()}; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(f"{'noise':<10}{'frame GB':>10}{'peak GB':>10}{'extra GB':>10}{'extra/frame':>13}"
          f"{'candidates':>12}{'seconds':>9}")
    for model in ("measured", "camera"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.size), model], capture_output=True,
                             text=True, check=True).stdout.split()
        nbytes, before, peak, n, seconds = int(out[0]), int(out[1]), int(out[2]), int(out[3]), float(out[4])
        extra = peak - before
        print(f"{model:<10}{nbytes / 1e9:>10.2f}{peak / 1e9:>10.2f}{extra / 1e9:>10.2f}"
              f"{extra / nbytes:>13.2f}{n:>12d}{seconds:>9.1f}")
    print("frame = the array detection is given (uint16 as read, or float32 photons with a camera); "
          "extra = peak RSS during find_peaks beyond what the process held before it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
