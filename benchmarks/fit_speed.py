"""Speed of spotfit's batched fit against the per-spot ``curve_fit`` loop users write.

One simulated image, one set of candidate positions (spotfit's own
detection), the same windows, fitted

* by ``scipy.optimize.curve_fit`` spot by spot: rotated 2D Gaussian + offset
  ``(amplitude, x, y, sigma_x, sigma_y, theta, offset)``, point-sampled,
  unweighted, starting values from simple moments, default ``maxfev``;
* by :func:`spotfit.fit_spots` like for like (``model="rotated"``,
  point-sampled, ``estimator="lsq"``);
* by :func:`spotfit.fit_spots` with its defaults for a calibrated camera
  (pixel-integrated rotated model, Poisson MLE);
* and, for context, by :func:`spotfit.fit` on the whole image (detection
  included in the time, defaults).

Every timed run starts from the raw camera image and the positions and ends
with all parameters of all spots (camera conversion, window cutting, starting
values and the fits are inside the timing, detection is not).  Threads:
``--workers`` (default 1, so the comparison is core for core).

Run ``python benchmarks/fit_speed.py`` (about 20 s) or ``--quick``
(about 10 s).  The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import scipy
from scipy.optimize import OptimizeWarning, curve_fit

import spotfit
from spotfit.match import match_spots

SIGMA = 1.3  # px, PSF sigma of the simulation and of the fits
BACKGROUND = 20.0  # photons / px
PHOTONS = (1000.0, 3000.0)  # photons per spot, uniform
CAMERA = spotfit.Camera(baseline=100.0, gain=1.0)
MATCH_RADIUS = 1.5  # px, fitted centre to true centre


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- curve_fit
def rotated_gaussian(xy, amplitude, x0, y0, sx, sy, theta, offset):
    """Point-sampled rotated 2D Gaussian + offset (the textbook form)."""
    x, y = xy
    c, s = math.cos(theta), math.sin(theta)
    a = c * c / (2 * sx * sx) + s * s / (2 * sy * sy)
    b = -math.sin(2 * theta) / (4 * sx * sx) + math.sin(2 * theta) / (4 * sy * sy)
    d = s * s / (2 * sx * sx) + c * c / (2 * sy * sy)
    dx, dy = x - x0, y - y0
    return offset + amplitude * np.exp(-(a * dx * dx + 2 * b * dx * dy + d * dy * dy))


def moments_p0(win, xx, yy):
    """Starting values from simple moments of one window."""
    edge = np.concatenate([win[0], win[-1], win[1:-1, 0], win[1:-1, -1]])
    offset = float(np.median(edge))
    excess = np.clip(win - offset, 0.0, None)
    total = excess.sum()
    h = (win.shape[0] - 1) / 2
    if total <= 0:
        return [max(float(win.max()) - offset, 1.0), h, h, SIGMA, SIGMA, 0.0, offset]
    x0 = float((excess * xx).sum() / total)
    y0 = float((excess * yy).sum() / total)
    sx = math.sqrt(max(float((excess * (xx - x0) ** 2).sum() / total), 0.25))
    sy = math.sqrt(max(float((excess * (yy - y0) ** 2).sum() / total), 0.25))
    return [float(win.max()) - offset, x0, y0, sx, sy, 0.0, offset]


def curve_fit_loop(image, positions, half):
    """The per-spot loop: returns ``(x, y)`` image coordinates, ``ok`` and failure counts."""
    photons = CAMERA.to_photons(image, np.float64)
    size = 2 * half + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    xy = np.vstack([xx.ravel(), yy.ravel()])
    centres = np.rint(positions).astype(np.int64)
    n = len(centres)
    out = np.full((n, 2), np.nan)
    ok = np.zeros(n, bool)
    fails = {"exception": 0, "non-finite": 0, "left window": 0}
    for i, (cx, cy) in enumerate(centres):
        win = photons[cy - half : cy + half + 1, cx - half : cx + half + 1]
        p0 = moments_p0(win, xx, yy)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                with np.errstate(over="ignore", invalid="ignore"):
                    popt, pcov = curve_fit(rotated_gaussian, xy, win.ravel(), p0=p0)
        except (RuntimeError, ValueError):
            fails["exception"] += 1
            continue
        if not (np.all(np.isfinite(popt)) and np.all(np.isfinite(np.diag(pcov)))):
            fails["non-finite"] += 1
            continue
        if not (-0.5 <= popt[1] < size - 0.5 and -0.5 <= popt[2] < size - 0.5):
            fails["left window"] += 1
            continue
        out[i] = popt[1] + cx - half, popt[2] + cy - half
        ok[i] = True
    return out, ok, fails


# ------------------------------------------------------------------- spotfit
def spotfit_run(image, positions, **options):
    table = spotfit.fit_spots(image, positions, camera=CAMERA, sigma=SIGMA, **options)
    ok = (table["status"] == "converged").to_numpy()
    return table[["x", "y"]].to_numpy(), ok, table["status"].value_counts().to_dict()


def spotfit_full_run(image, **options):
    """``spotfit.fit``: detection and fit of the whole image, as ``spotfit fit`` runs it."""
    table = spotfit.fit(image, camera=CAMERA, sigma=SIGMA, **options)
    ok = (table["status"] == "converged").to_numpy()
    return table[["x", "y"]].to_numpy(), ok, table["status"].value_counts().to_dict()


# ------------------------------------------------------------------- helpers
def timed(fn, repeats, label):
    times, result = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        log(f"  {label}: repeat {r + 1}/{repeats} {times[-1]:.3f} s")
    return min(times), statistics.median(times), result


def rmse_xy(found, ok, truth_xy):
    """RMSE of x and y (px) of the accepted fits matched one-to-one to the truth."""
    if not ok.any():
        return np.nan, np.nan, 0
    i_f, i_t = match_spots(found[ok], truth_xy, MATCH_RADIUS)
    err = found[ok][i_f] - truth_xy[i_t]
    rmse = np.sqrt(np.mean(err**2, axis=0))
    return rmse[0], rmse[1], len(i_f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small image, fewer repeats (~10 s)")
    parser.add_argument("--spots", type=int, help="spots to simulate (default 3000; quick 750)")
    parser.add_argument("--repeats", type=int, help="timed repeats of spotfit (default 15; quick 5)")
    parser.add_argument("--cf-repeats", type=int,
                        help="timed repeats of the curve_fit loop (default 5; quick 2)")
    parser.add_argument("--workers", type=int, default=1, help="spotfit threads (default 1)")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)

    shape = (512, 768) if args.quick else (1024, 1536)
    n_spots = args.spots or (750 if args.quick else 3000)
    repeats = args.repeats or (5 if args.quick else 15)
    cf_repeats = args.cf_repeats or (2 if args.quick else 5)
    half = spotfit.FitConfig(sigma=SIGMA).half_size(2)[0]

    t_start = time.perf_counter()
    log(f"simulating {shape[0]} x {shape[1]} px, {n_spots} spots ...")
    image, truth = spotfit.simulate(
        shape, n_spots=n_spots, photons=PHOTONS, background=BACKGROUND, sigma=SIGMA,
        camera=CAMERA, min_separation=3 * half, border=half + 1, seed=args.seed,
    )
    truth_xy = truth[["x", "y"]].to_numpy()
    candidates = spotfit.detect(image, sigma=SIGMA, camera=CAMERA)
    positions = candidates[["x", "y"]].to_numpy()
    # keep candidates whose full window lies in the image (curve_fit cannot mask)
    ny, nx = shape
    inside = (
        (positions[:, 0] >= half) & (positions[:, 0] < nx - half)
        & (positions[:, 1] >= half) & (positions[:, 1] < ny - half)
    )
    positions = positions[inside]
    n = len(positions)
    log(f"{len(candidates)} candidates detected, {n} with full {2 * half + 1}x{2 * half + 1} windows")

    runs = [
        ("curve_fit loop (rotated, point, LSQ)", cf_repeats,
         lambda: curve_fit_loop(image, positions, half)),
        ("spotfit lsq (rotated, point)", repeats,
         lambda: spotfit_run(image, positions, model="rotated", integrated=False,
                             estimator="lsq", workers=args.workers)),
        ("spotfit default (rotated, integrated, MLE)", repeats,
         lambda: spotfit_run(image, positions, workers=args.workers)),
        ("spotfit.fit: detect + fit, defaults", repeats,
         lambda: spotfit_full_run(image, workers=args.workers)),
    ]
    rows = []
    spotfit_statuses = {}
    cf_fails = {}
    for label, reps, fn in runs:
        log(f"timing {label} ...")
        # one untimed warm-up for spotfit (imports, first-call caches)
        if not label.startswith("curve_fit"):
            fn()
        best, median, (found, ok, info) = timed(fn, reps, label)
        if label.startswith("curve_fit"):
            cf_fails = info
            failed = sum(info.values())
        else:
            spotfit_statuses[label] = info
            failed = int((~ok).sum())
        rx, ry, matched = rmse_xy(found, ok, truth_xy)
        n_fit = len(found)
        rows.append(dict(method=label, repeats=reps, n=n_fit, best_s=best, median_s=median,
                         fits_per_s=n_fit / best, fits_per_s_median=n_fit / median,
                         failed=failed, matched=matched, rmse_x=rx, rmse_y=ry))
    ref = rows[0]["fits_per_s"]
    for r in rows:
        r["speedup"] = r["fits_per_s"] / ref

    # ------------------------------------------------------------ the table
    print("fit_speed: spotfit.fit_spots vs a per-spot scipy.optimize.curve_fit loop")
    print(f"  image {shape[0]} x {shape[1]} px, {len(truth)} simulated spots "
          f"({PHOTONS[0]:g}-{PHOTONS[1]:g} photons, background {BACKGROUND:g} photons/px, "
          f"sigma {SIGMA} px, camera baseline 100 ADU, gain 1), seed {args.seed}")
    print(f"  {n} fitted spots = spotfit.detect candidates with full "
          f"{2 * half + 1}x{2 * half + 1} windows (half-size {half} px, spotfit's default)")
    print(f"  python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"spotfit {spotfit.__version__} ({os.path.dirname(spotfit.__file__)}); "
          f"os.cpu_count() = {os.cpu_count()}, "
          f"spotfit workers = {args.workers}; OMP/OPENBLAS threads = "
          f"{os.environ.get('OMP_NUM_THREADS', '-')}/{os.environ.get('OPENBLAS_NUM_THREADS', '-')}")
    print()
    header = (f"{'method':<44} {'spots':>6} {'fits/s':>9} {'fits/s':>9} {'ratio vs':>9} "
              f"{'failed':>7} {'matched':>8} {'RMSE x':>7} {'RMSE y':>7}")
    sub = (f"{'':<44} {'':>6} {'(best)':>9} {'(median)':>9} {'curve_fit':>9} "
           f"{'':>7} {'':>8} {'(px)':>7} {'(px)':>7}")
    print(header)
    print(sub)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<44} {r['n']:>6} {r['fits_per_s']:>9.0f} {r['fits_per_s_median']:>9.0f} "
              f"{r['speedup']:>9.1f} {r['failed']:>7} {r['matched']:>8} {r['rmse_x']:>7.4f} "
              f"{r['rmse_y']:>7.4f}")
    print()
    print(f"  fits/s = fitted spots / wall time of one run (best and median of "
          f"{rows[0]['repeats']} curve_fit and {rows[1]['repeats']} spotfit runs); "
          f"ratio vs curve_fit = best fits/s / the curve_fit loop's best fits/s")
    print("  curve_fit failures (fits a curve_fit loop silently drops): "
          + ", ".join(f"{k} {v}" for k, v in cf_fails.items()))
    for label, st in spotfit_statuses.items():
        print(f"  {label} status: " + ", ".join(f"{k} {v}" for k, v in st.items()))
    print("  spotfit.fit row: whole image, detection included in the time, all candidates "
          "(also border-truncated windows)")
    print(f"  RMSE over accepted fits (curve_fit: no failure; spotfit: status 'converged') "
          f"matched to the truth within {MATCH_RADIUS} px")
    log(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
