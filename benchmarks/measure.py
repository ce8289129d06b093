"""Speed of fixed-position intensity measurement (``spotfit.measure``) against a curve_fit loop.

A simulated movie (``--frames`` frames of 256 x 512 px, spots on a 14 px
grid at 1000-3000 photons, background 10 photons/px, sigma 1.3 px, camera
baseline 100 ADU and gain 1) is measured at the true positions with the width
held at the true sigma, i.e. every spot in every frame: intensity and
background, with standard errors and status.  Rows:

* ``spotfit.measure <est>``: the public function, end to end from the raw
  uint16 movie to the table (camera conversion, windows, profiles,
  neighbours, the compiled fits, aperture sums and the table); ``mle`` is the
  default with a calibrated camera.
* ``compiled LM, shape held (mle)``: the alternative for the two linear
  parameters, spotfit's general Levenberg-Marquardt solver
  (:func:`spotfit.solver.solve`) with position and widths held, on the same
  windows (cut and prepared outside the timing: only the solve is timed).
* ``numpy IRLS (mle)``: the other alternative, iteratively reweighted least
  squares vectorised over all windows with numpy (the same estimator as
  spotfit's compiled kernel; windows prepared outside the timing).
* ``curve_fit loop``: what users write: for every spot and frame, cut the
  window and ``scipy.optimize.curve_fit`` the amplitude and offset of a
  point-sampled Gaussian at the known position and width (unweighted), on a
  subset of the measurements.

spotfit's estimators run round robin, so that they see the same machine
load; the default is also timed on one thread by the CPU time it used
(``measurements per CPU second``), which other work on the machine
disturbs much less than wall-clock rates.

Columns: measurements per run, the best and median rate over the repeats,
the ratio of the best rate to the curve_fit loop's, and the accuracy against
the truth over all measured frames (mean and median absolute relative error
of the intensity; ``obs/rep``: observed scatter over reported error).

Run ``python benchmarks/measure.py`` (about a minute) or ``--quick``.
``--workers`` sets spotfit's threads (default: all cores); the curve_fit
loop and numpy use one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import pandas as pd
import scipy
from scipy.optimize import OptimizeWarning, curve_fit

import spotfit
from spotfit import roi, solver
from spotfit.estimators import Noise, get_estimator
from spotfit.models import get_model
from spotfit.simulation import render

SIGMA = 1.3
BACKGROUND = 10.0
SHAPE = (256, 512)
SPACING = 14.0
CAMERA = spotfit.Camera(baseline=100.0, gain=1.0)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def movie(rng, n_frames):
    """Spots on a jittered grid; photons per spot drawn once; Poisson noise per frame."""
    ny, nx = SHAPE
    gx, gy = np.meshgrid(np.arange(10, nx - 10, SPACING), np.arange(10, ny - 10, SPACING))
    xy = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (gx.size, 2))
    photons = rng.uniform(1000, 3000, len(xy))
    mu = render(SHAPE, xy[:, 0], xy[:, 1], photons, SIGMA, background=BACKGROUND)
    frames = rng.poisson(mu, size=(n_frames,) + SHAPE) + 100
    return frames.astype(np.uint16), xy, photons


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times), statistics.median(times)


def accuracy(intensity, err, truth):
    rel = intensity / truth - 1.0
    ok = np.isfinite(rel)
    pull = (intensity - truth)[ok] / err[ok] if err is not None else None
    return dict(mean_rel_pct=100 * rel[ok].mean(), median_abs_rel_pct=100 * np.median(np.abs(rel[ok])),
                obs_rep=float(np.std(pull)) if pull is not None else np.nan)


# ------------------------------------------------------- the alternatives
def windows(frames, xy, half):
    """Windows (n_frames * n, P) in photons, frame-major, with their grid and relative centres."""
    photons = CAMERA.to_photons(frames, dtype=np.float64)
    centres = np.rint(xy[:, ::-1]).astype(np.int64)
    parts = [roi.cut(photons[t], centres, half) for t in range(len(frames))]
    w = roi.concatenate(parts)
    rel = np.tile(xy, (len(frames), 1)) - w.origin
    return w, rel


def lm_solver(w, rel, model):
    """spotfit's compiled Levenberg-Marquardt with the shape held: the two linear parameters."""
    n = len(w)
    theta0 = model.from_moments(rel, np.full((n, 2), SIGMA), np.full(n, 1000.0), np.full(n, BACKGROUND))
    free = np.zeros(model.n_params, bool)
    free[[0, model.n_params - 1]] = True
    lower, upper = model.bounds(w.grid)
    lower[0], lower[-1] = -np.inf, 0.0

    def run():
        return solver.solve(model, get_estimator("mle"), w.data, w.mask, w.grid, theta0,
                            noise=Noise(calibrated=True), lower=lower, upper=upper, free=free,
                            bias_correct=False)
    return run


def numpy_irls(w, rel, model, iterations=4):
    """Poisson MLE of (N, b) by reweighted least squares, vectorised with numpy."""
    n = len(w)
    theta = model.from_moments(rel, np.full((n, 2), SIGMA), np.ones(n), np.zeros(n))
    g = model.value(theta, w.grid) * w.mask
    one = w.mask.astype(float)
    d = w.data

    def solve(wt):
        sgg, sg, s1 = (np.einsum("np,np,np->n", wt, g, g), np.einsum("np,np->n", wt, g),
                       np.einsum("np,np->n", wt, one))
        rg, r1 = np.einsum("np,np,np->n", wt, g, d), np.einsum("np,np->n", wt, d)
        det = sgg * s1 - sg * sg
        return (s1 * rg - sg * r1) / det, (sgg * r1 - sg * rg) / det, (sgg, sg, s1, det)

    def run():
        N, b, _ = solve(one)
        for _ in range(iterations):
            mu = np.maximum(N[:, None] * g + b[:, None], 1e-6)
            N, b, (sgg, sg, s1, det) = solve(one / mu)
        return N, np.sqrt(s1 / det)
    return run


def gaussian(xy, amplitude, offset, x0, y0):
    x, y = xy
    return amplitude * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * SIGMA * SIGMA)) + offset


def curve_fit_loop(frames, xy, half, n_max):
    """Per spot and frame: cut the window, fit amplitude and offset at the known position."""
    size = 2 * half + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    grid = np.vstack([xx.ravel(), yy.ravel()])
    centres = np.rint(xy).astype(int)
    jobs = [(t, i) for t in range(len(frames)) for i in range(len(xy))][:n_max]

    def run():
        out = np.full(len(jobs), np.nan)
        err = np.full(len(jobs), np.nan)
        for k, (t, i) in enumerate(jobs):
            cx, cy = centres[i]
            win = frames[t, cy - half:cy + half + 1, cx - half:cx + half + 1].astype(float) - 100.0
            x0, y0 = xy[i, 0] - (cx - half), xy[i, 1] - (cy - half)
            f = lambda q, a, o: gaussian(q, a, o, x0, y0)  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                try:
                    p, cov = curve_fit(f, grid, win.ravel(), p0=[win.max() - win.min(), win.min()])
                except RuntimeError:
                    continue
            norm = 2 * np.pi * SIGMA * SIGMA
            out[k], err[k] = p[0] * norm, np.sqrt(cov[0, 0]) * norm
        return out, err
    return run, jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=400, help="frames of the movie (default 400)")
    parser.add_argument("--quick", action="store_true", help="100 frames, fewer repeats")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method (default 7)")
    parser.add_argument("--n-curve-fit", type=int, default=3000, help="curve_fit measurements")
    parser.add_argument("--workers", type=int, help="spotfit threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    n_frames = 100 if args.quick else args.frames
    repeats = 3 if args.quick else args.repeats

    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    frames, xy, photons = movie(rng, n_frames)
    n = len(xy)
    total = n * n_frames
    truth = np.tile(photons, n_frames)  # frame-major
    positions = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]})
    log(f"simulated {n_frames} frames x {n} spots = {total} measurements "
        f"({time.perf_counter() - t_start:.1f} s)")
    rows = []

    def row(name, count, best, median, acc):
        rows.append(dict(method=name, measurements=count, rate_best=count / best,
                         rate_median=count / median, **acc))

    options = dict(camera=CAMERA, sigma=SIGMA, fix_sigma=True, workers=args.workers)
    estimators = ("mle", "lsq", "wlsq")
    for est in estimators:
        spotfit.measure(frames[:2], positions, estimator=est, **options)  # warm-up (compiles once)
    import numba

    threads = numba.get_num_threads()
    times = {est: [] for est in estimators}
    tables = {}
    for _ in range(repeats):  # round robin: every estimator sees the same machine load
        for est in estimators:
            t0 = time.perf_counter()
            tables[est] = spotfit.measure(frames, positions, estimator=est, **options)
            times[est].append(time.perf_counter() - t0)
    for est in estimators:
        by_frame = tables[est].sort_values(["frame", "spot_id"])
        best, median = min(times[est]), statistics.median(times[est])
        row(f"spotfit.measure {est}", total, best, median,
            accuracy(by_frame.intensity.to_numpy(), by_frame.intensity_err.to_numpy(), truth))
        log(f"spotfit.measure {est}: {total / best:.3g} measurements/s")
        if est == "mle":
            ap = accuracy(by_frame.aperture_intensity.to_numpy(),
                          by_frame.aperture_intensity_err.to_numpy(), 0.989 * truth)
            row("  (its aperture sums, in the same run)", total, best, median, ap)

    # the same default run on one thread, timed by the CPU time it used: what the work
    # costs whatever else the machine is doing (the wall-clock rates above depend on it)
    one = dict(options, workers=1)
    cpu = []
    for _ in range(repeats):
        c0 = time.process_time()
        spotfit.measure(frames, positions, estimator="mle", **one)
        cpu.append(time.process_time() - c0)
    cpu_rate = total / min(cpu)
    log(f"spotfit.measure mle, one thread: {cpu_rate:.3g} measurements per CPU second")

    half = spotfit.FitConfig(sigma=SIGMA).half_size(2)[0]
    sub = min(n_frames, max(1, 20000 // n))  # alternatives on a subset of frames
    w, rel = windows(frames[:sub], xy, half)
    model = get_model("symmetric", 2, integrated=True)
    run = lm_solver(w, rel, model)
    run()
    sol, best, median = timed(run, repeats)
    row("compiled LM, shape held (mle)", len(w), best, median,
        accuracy(sol.theta[:, 0], sol.err[:, 0], truth[: len(w)]))
    log(f"compiled LM: {len(w) / best:.3g} measurements/s")
    run = numpy_irls(w, rel, model)
    (N, err), best, median = timed(run, repeats)
    row("numpy IRLS (mle)", len(w), best, median, accuracy(N, err, truth[: len(w)]))
    log(f"numpy IRLS: {len(w) / best:.3g} measurements/s")

    run, jobs = curve_fit_loop(frames, xy, half, args.n_curve_fit)
    (N, err), best, median = timed(run, 1 if args.quick else 2)
    idx = np.array([t * n + i for t, i in jobs])
    row("curve_fit loop (lsq, per spot)", len(jobs), best, median, accuracy(N, err, truth[idx]))
    reference = rows[-1]["rate_best"]
    log(f"curve_fit loop: {reference:.3g} measurements/s")

    table = pd.DataFrame(rows)
    table["ratio_vs_curve_fit"] = table.rate_best / reference
    try:
        load = os.getloadavg()
    except OSError:
        load = (np.nan,) * 3
    print("measure: intensities at fixed positions, measurements (spot x frame) per second")
    print(f"  movie {n_frames} x {SHAPE[0]} x {SHAPE[1]} px uint16, {n} spots (grid {SPACING:g} px), "
          f"1000-3000 photons, background {BACKGROUND:g}/px, sigma {SIGMA} px held, camera gain 1")
    print(f"  spotfit threads {threads}, os.cpu_count() = {os.cpu_count()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; repeats {repeats} (best, median)")
    print(f"  numpy {np.__version__}, scipy {scipy.__version__}, spotfit {spotfit.__version__} "
          f"({os.path.dirname(spotfit.__file__)}), python {platform.python_version()}")
    print()
    fmt = {"rate_best": "{:.3g}".format, "rate_median": "{:.3g}".format,
           "ratio_vs_curve_fit": "{:.0f}".format, "mean_rel_pct": "{:+.2f}".format,
           "median_abs_rel_pct": "{:.2f}".format, "obs_rep": "{:.3f}".format}
    print(table.to_string(index=False, formatters=fmt))
    target = rows[0]["rate_best"]
    print()
    print(f"spotfit.measure mle on one thread: {cpu_rate:.3g} measurements per CPU second, "
          f"{1e6 / cpu_rate:.2f} CPU-s per 10^6 measurements (best of {repeats}, process CPU time)")
    print(f"target >= 1e6 measurements/s (spotfit.measure mle, end to end, wall clock): {target:.3g} "
          f"{'PASS' if target >= 1e6 else 'FAIL'}")
    log(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
