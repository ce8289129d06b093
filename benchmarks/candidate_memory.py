"""Peak memory of ``spotfit.fit`` on one frame with very many candidates.

A frame of pure Poisson noise (uint16, background 20 photons/px, camera
baseline 100 ADU, gain 1) fitted at ``threshold=0.5``: nearly every local
maximum of the noise becomes a candidate (about one per 50 px).  Each run is
a fresh subprocess; it prints the candidates fitted, the wall time and the
subprocess' peak resident memory (``ru_maxrss``) next to the same process'
memory before the fit (imports and the compiled solver) and the image size.
Candidates are fitted in batches of bounded size (``spotfit.single.PIXEL_BUDGET``
window pixels), so the fit's share of the peak must not grow with the number
of candidates the way it did when one frame was one batch (5.4 GB for 4096^2).

    python benchmarks/candidate_memory.py            # 1024^2, 2048^2, 4096^2 (~4 min on 2 cores)
    python benchmarks/candidate_memory.py --quick    # 1024^2, 2048^2

To compare with another version of spotfit, put it first on the path
(``PYTHONPATH=/tmp/sf_main python benchmarks/candidate_memory.py --quick``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import resource, sys, time
import numpy as np
import spotfit
n = int(sys.argv[1])
img = (100 + np.random.default_rng(1).poisson(20, (n, n))).astype(np.uint16)
camera = spotfit.Camera(baseline=100, gain=1)
spotfit.fit(img[:64, :64], camera=camera)  # load the compiled solver
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
found = spotfit.fit(img, camera=camera, threshold=0.5)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(n, len(found), seconds, before, peak, img.nbytes / 2**20, spotfit.__file__)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 2048 x 2048 only")
    args = parser.parse_args(argv)
    sizes = (1024, 2048) if args.quick else (1024, 2048, 4096)
    print("candidate_memory: spotfit.fit on one noise frame at threshold 0.5 (fresh process per size)")
    print(f"{'frame':>11} {'candidates':>10} {'time s':>7} {'image MB':>9} {'before MB':>10} "
          f"{'peak MB':>8} {'fit MB':>7} {'fit MB per 10^5 cand.':>22}")
    where = None
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True,
                             check=True).stdout.split()
        _, found, seconds, before, peak, image, where = out
        found, seconds, before, peak, image = int(found), *map(float, (seconds, before, peak, image))
        grown = peak - before
        print(f"{n:>5} x {n:<5} {found:>10} {seconds:>7.1f} {image:>9.0f} {before:>10.0f} {peak:>8.0f} "
              f"{grown:>7.0f} {1e5 * grown / max(found, 1):>22.0f}")
    print(f"  spotfit: {where}; 'fit MB' = peak - before (detection, windows, solve, table)")


if __name__ == "__main__":
    main()
