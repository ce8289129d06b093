"""Rendering 10^6 localisations into a 4096 x 4096 image: speed, memory, exactness.

The table is spotfit-like (frame, x, y, x_err, y_err, intensity, status...;
positions in camera pixels of 160 nm on a 256 x 256 camera, precisions
lognormal around 0.08 px = 13 nm); it is rendered at 10 nm per pixel, i.e.
into 4096 x 4096 float32 pixels, by:

* ``spotfit histogram`` / ``spotfit gaussian`` -- :func:`spotfit.render`
  (from the DataFrame: filtering, units and drawing), per-localisation
  widths for the Gaussian;
* ``np.bincount`` -- an exact NumPy histogram, for reference;
* ``image[y, x] = 1`` and ``image[y, x] += 1`` -- the NumPy one-liners, which
  lose every localisation that shares a pixel with another (counted);
* a naive per-point Python loop (histogram: ``image[i, j] += 1``;
  Gaussian: a small pixel-integrated kernel per point with NumPy), timed
  on a subset and extrapolated to 10^6 (said so in the table).

Peak memory of a render call is measured with tracemalloc (NumPy reports its
buffers to it) against the output image (64 MiB) and the table.  Targets
(issue 13): histogram <= 1 s, Gaussian <= 3 s, peak <= 2 x image + table.
Timings are the best and median of --repeat runs in this process after a
warm-up call (numba compilation is reported separately).

    python benchmarks/render.py            # ~1 min
    python benchmarks/render.py --quick    # 10^5 localisations into 1024 x 1024
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import spotfit  # noqa: E402
from spotfit.rendering import prepare  # noqa: E402

CAMERA_PX = 160.0  # nm
OUT_PX = 10.0      # nm


def make_table(n, camera_side, seed):
    """A spotfit-like table of n localisations: clusters (binding sites) plus background."""
    rng = np.random.default_rng(seed)
    sites = rng.uniform(-0.5, camera_side - 0.5, size=(n // 50, 2))
    pick = rng.integers(0, len(sites), n)
    err = rng.lognormal(np.log(0.08), 0.35, size=(n, 2))
    xy = sites[pick] + rng.normal(0, 1, size=(n, 2)) * err
    xy = np.clip(xy, -0.5, camera_side - 0.5 - 1e-9)
    return pd.DataFrame({
        "frame": np.sort(rng.integers(0, 20000, n)),
        "x": xy[:, 0], "y": xy[:, 1],
        "intensity": rng.uniform(500, 5000, n),
        "sigma_x": 1.3, "sigma_y": 1.3, "offset": 20.0,
        "x_err": err[:, 0], "y_err": err[:, 1],
        "status": np.where(rng.random(n) < 1.0, "converged", "low_signal"),
        "unit": "photon",
    })


def timed(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times), float(np.median(times))


def peak_memory(fn):
    """Peak bytes allocated (tracemalloc) while fn runs, above what existed before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return peak


def naive_histogram(u, v, shape):
    image = np.zeros(shape, dtype=np.float32)
    for x, y in zip(u.tolist(), v.tolist()):
        i, j = int(math.floor(y + 0.5)), int(math.floor(x + 0.5))
        if 0 <= i < shape[0] and 0 <= j < shape[1]:
            image[i, j] += 1
    return image


def naive_gaussian(u, v, su, sv, shape):
    """What a user writes: per point, a 4-sigma box of pixel-integrated Gaussian values."""
    from scipy.special import erf

    image = np.zeros(shape, dtype=np.float32)
    for x, y, sx, sy in zip(u, v, su, sv):
        j0, j1 = max(int(x - 4 * sx), 0), min(int(x + 4 * sx) + 2, shape[1])
        i0, i1 = max(int(y - 4 * sy), 0), min(int(y + 4 * sy) + 2, shape[0])
        ex = np.diff(erf((np.arange(j0, j1 + 1) - 0.5 - x) / (np.sqrt(2) * sx))) / 2
        ey = np.diff(erf((np.arange(i0, i1 + 1) - 0.5 - y) / (np.sqrt(2) * sy))) / 2
        image[i0:i1, j0:j1] += np.outer(ey, ex)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 points into 1024 x 1024")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--naive", type=int, default=20000,
                        help="points timed in the naive loops (then extrapolated)")
    args = parser.parse_args()

    n = 10**5 if args.quick else 10**6
    side = 64 if args.quick else 256  # camera pixels; x16 -> output pixels
    shape = (side, side)
    print(f"# spotfit {spotfit.__version__} from {os.path.dirname(spotfit.__file__)}",
          file=sys.stderr)
    print(f"# load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    table = make_table(n, side, args.seed)
    table_bytes = int(table.memory_usage(deep=True).sum())
    out_side = int(side * CAMERA_PX / OUT_PX)
    image_bytes = out_side * out_side * 4
    opts = dict(camera_pixel_size=CAMERA_PX, shape=shape)

    start = time.perf_counter()
    spotfit.render(table.iloc[:10], OUT_PX, method="histogram", **opts)
    spotfit.render(table.iloc[:10], OUT_PX, method="gaussian", **opts)
    compile_s = time.perf_counter() - start

    rows = []

    def row(name, best, median, note="", lost=None, peak=None):
        rows.append((name, best, median, note, lost, peak))

    hist, best, med = timed(lambda: spotfit.render(table, OUT_PX, method="histogram", **opts),
                            args.repeat)
    assert hist.shape == (out_side, out_side)
    peak = peak_memory(lambda: spotfit.render(table, OUT_PX, method="histogram", **opts))
    row("spotfit histogram", best, med, lost=n - int(hist.sum(dtype=np.float64)), peak=peak)
    t_hist = best

    gauss, best, med = timed(lambda: spotfit.render(table, OUT_PX, method="gaussian", **opts),
                             args.repeat)
    peak = peak_memory(lambda: spotfit.render(table, OUT_PX, method="gaussian", **opts))
    row("spotfit gaussian (per-spot widths)", best, med,
        note=f"sum {gauss.sum(dtype=np.float64):.1f}", peak=peak,
        lost=None)
    t_gauss = best
    sum_lost = n - gauss.sum(dtype=np.float64)

    # the same points in output pixels, for the NumPy references
    points = prepare(table, OUT_PX, method="gaussian", **opts)
    u, v = points.x, points.y
    iu = np.floor(u + 0.5).astype(np.intp)
    iv = np.floor(v + 0.5).astype(np.intp)

    def bincount():
        return np.bincount(iv * out_side + iu, minlength=out_side * out_side).reshape(
            out_side, out_side).astype(np.float32)

    ref, best, med = timed(bincount, args.repeat)
    np.testing.assert_array_equal(ref, hist)  # spotfit's histogram is exact
    row("np.bincount (exact; pixel indices given)", best, med, lost=0,
        peak=peak_memory(bincount))

    def assign():
        image = np.zeros((out_side, out_side), dtype=np.float32)
        image[iv, iu] = 1
        return image

    img, best, med = timed(assign, args.repeat)
    row("image[y, x] = 1", best, med, lost=n - int(img.sum()))

    def add():
        image = np.zeros((out_side, out_side), dtype=np.float32)
        image[iv, iu] += 1
        return image

    img, best, med = timed(add, args.repeat)
    row("image[y, x] += 1", best, med, lost=n - int(img.sum()))

    k = min(args.naive, n)
    start = time.perf_counter()
    naive_histogram(u[:k], v[:k], (out_side, out_side))
    t = (time.perf_counter() - start) * n / k
    row("Python loop, histogram", t, t, note=f"{k} points timed, x{n / k:g}", lost=0)
    start = time.perf_counter()
    naive_gaussian(u[:k], v[:k], points.sigma_x[:k], points.sigma_y[:k], (out_side, out_side))
    t = (time.perf_counter() - start) * n / k
    row("Python loop, gaussian", t, t, note=f"{k} points timed, x{n / k:g}")

    print(f"{n} localisations -> {out_side} x {out_side} float32 image ({image_bytes / 2**20:.0f} "
          f"MiB); table {table_bytes / 2**20:.0f} MiB; numba warm-up {compile_s:.1f} s "
          f"(excluded)")
    print(f"{'method':<44}{'best s':>9}{'median s':>10}{'vs spotfit':>12}{'lost':>9}"
          f"{'peak MiB':>10}  note")
    for name, best, med, note, lost, peak in rows:
        ref = t_gauss if "gauss" in name else t_hist
        ratio = f"{best / ref:.1f}x" if not name.startswith("spotfit") else "1.0x"
        print(f"{name:<44}{best:>9.3f}{med:>10.3f}{ratio:>12}"
              f"{'' if lost is None else lost:>9}"
              f"{'' if peak is None else f'{peak / 2**20:.0f}':>10}  {note}")
    hist_peak, gauss_peak = rows[0][5], rows[1][5]
    limit = 2 * image_bytes + table_bytes
    print(f"Gaussian: {sum_lost:.1f} of {n} counts beyond the image border "
          f"({100 * sum_lost / n:.3f}%; points within 4 sigma of the edge)")
    print(f"peak memory of a render call / (2 x image + table): histogram "
          f"{hist_peak / limit:.2f}, gaussian {gauss_peak / limit:.2f}; "
          f"/ image alone: {hist_peak / image_bytes:.2f}, {gauss_peak / image_bytes:.2f}")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(includes the references above)")
    if not args.quick:
        checks = [("histogram <= 1 s", t_hist <= 1.0), ("gaussian <= 3 s", t_gauss <= 3.0),
                  ("memory <= 2 x image + table", max(hist_peak, gauss_peak) <= limit)]
        print("targets: " + ", ".join(f"{c}: {'ok' if ok else 'MISSED'}" for c, ok in checks))


if __name__ == "__main__":
    main()
