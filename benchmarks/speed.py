"""Speed of spotfit against the issue's targets: fitting alone, end to end, fresh process.

One run prints three sections, each number next to its target:

A. *Fitting alone.*  Isolated simulated spots on a lattice (1000-3000
   photons, background 20 photons/px, sigma 1.3 px, camera baseline 100 ADU,
   gain 1), 10^3, 10^4 and 10^5 spots, 7 x 7 and 11 x 11 windows, rotated
   Gaussian + offset.  :func:`spotfit.fit_spots` fits the true positions
   (windows centred on the nearest pixel) with ``estimator="lsq",
   integrated=False`` (like for like with ``curve_fit``) and with
   ``estimator="mle"`` and a calibrated camera (pixel-integrated), on all
   cores (and on one core for 10^4).  The per-spot ``curve_fit`` loop of
   ``fit_speed.py`` fits a subset of the same spots in the same windows; its
   fits/s is the reference of every ratio.  The targets' verdicts (7 x 7, 10^4
   spots) use the median ratio of a few rounds that time the ``curve_fit`` loop and
   spotfit back to back, since the machine's speed drifts between the table's runs.
B. *End to end in one process.*  ``read_image`` + ``fit`` (detection and
   fit) + ``write_table`` on a 2048 x 2048 image with 10,000 spots, timed in
   this process after a warm-up, with a stage breakdown; ``spotfit fit`` in a
   subprocess on that image and on a 1000-frame 256 x 256 movie, with the
   subprocess's peak resident memory.
C. *Fresh process.*  Wall time of ``spotfit fit`` on a 256 x 256 image with
   100 spots and on the 2048 x 2048 image, and of ``spotfit --help``: the
   median of 5 runs after one untimed run, with and without a camera;
   spotfit's sources byte-compiled first, as an installed spotfit is
   (:func:`byte_compile_spotfit`).

Peers (picasso, photutils, trackpy) run side by side where importable and
are skipped silently otherwise; none is a dependency.

Run ``python benchmarks/speed.py`` (about 2.5 min on 2 cores) or ``--quick``
(about 40 s: no 10^5 spots, a 100-frame movie, fewer repeats).  Tables
go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import math
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS_DIR)

import numpy as np  # noqa: E402
import scipy  # noqa: E402

import spotfit  # noqa: E402
from host import describe, reference_seconds  # noqa: E402
from fit_speed import (  # noqa: E402  (reference loop and helpers of the colleague's benchmark)
    BACKGROUND, CAMERA, MATCH_RADIUS, PHOTONS, SIGMA, curve_fit_loop, log, rmse_xy, timed,
)

PITCH = 14  # px between lattice cells: 11 x 11 windows never see a neighbour (>= 12 px apart)
JITTER = 1.0  # px, uniform jitter of each spot around its cell centre
WINDOWS = (3, 5)  # half-sizes: 7 x 7 and 11 x 11 px
BIG_SHAPE, BIG_SPOTS = (2048, 2048), 10_000
SMALL_SHAPE, SMALL_SPOTS = (256, 256), 100
MOVIE_FRAME, MOVIE_SPOTS = (256, 256), 10  # spots per frame
MIN_SEPARATION = 5.0  # px, random placement of the B/C images
CAMERA_ARGS = ["--gain", "1", "--baseline", "100"]
GB = 1e9

TARGETS = {
    "ratio": 100.0,  # x the curve_fit loop, 7x7, rotated, 10^4 spots
    "e2e": 30_000.0,  # spots/s in one process, 2048^2, 10,000 spots
    "big_s": 2.0,  # s, fresh process, 2048^2
    "small_s": 1.5,  # s, fresh process, 256^2, 100 spots
    "help_s": 0.3,  # s, spotfit --help
    "movie_bytes": 1 * GB,  # peak RSS, 1000-frame 256^2 movie
}
ACCURACY_TOLERANCE = 0.01  # "equal" RMSE: within 1 % of curve_fit's on the same spots

VERDICTS = []  # (criterion, value, target, PASS/FAIL/n/a), printed at the end


def verdict(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def record(criterion, value, target, ok):
    VERDICTS.append((criterion, value, target, verdict(ok)))
    return verdict(ok)


# ---------------------------------------------------------------- section A
def lattice_image(n, rng, strip_rows=24):
    """``n`` isolated spots on a jittered square lattice, simulated in strips.

    Returns the uint16 camera image and the true ``(x, y)`` of every spot, in
    lattice order (row by row).
    """
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    image = np.empty((nrows * PITCH, ncols * PITCH), np.uint16)
    k = np.arange(n)
    centre = (PITCH - 1) / 2
    x = (k % ncols) * PITCH + centre + rng.uniform(-JITTER, JITTER, n)
    y = (k // ncols) * PITCH + centre + rng.uniform(-JITTER, JITTER, n)
    for r0 in range(0, nrows, strip_rows):
        r1 = min(nrows, r0 + strip_rows)
        sel = slice(r0 * ncols, min(n, r1 * ncols))
        strip, _ = spotfit.simulate(
            ((r1 - r0) * PITCH, image.shape[1]), positions=np.c_[x[sel], y[sel] - r0 * PITCH],
            photons=PHOTONS, background=BACKGROUND, sigma=SIGMA, camera=CAMERA, seed=rng,
        )
        image[r0 * PITCH : r1 * PITCH] = strip
    return image, np.c_[x, y]


def crop_rows(image, xy, n):
    """The lattice rows holding the first ``n`` spots (curve_fit does not need the rest)."""
    last_y = int(np.ceil(xy[:n, 1].max())) + PITCH // 2 + 1
    return image[: min(last_y, image.shape[0])]


def spotfit_fit(image, xy, half, workers, estimator):
    options = dict(window=half, model="rotated", workers=workers, estimator=estimator)
    if estimator == "lsq":
        options["integrated"] = False
    table = spotfit.fit_spots(image, xy, camera=CAMERA, sigma=SIGMA, **options)
    return table[["x", "y"]].to_numpy(), (table["status"] == "converged").to_numpy()


SPOTFIT_METHODS = {
    "lsq": "spotfit lsq (rotated, point)",
    "mle": "spotfit mle (rotated, integr.)",
}


class Peers:
    """Optional peers, imported only if installed (never a dependency)."""

    def __init__(self, enabled: bool):
        self.picasso = self.photutils = self.trackpy = None
        self.versions = {}
        if not enabled:
            return
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from picasso import gaussmle  # the pip package is "picassosr"

            self.picasso = gaussmle
            import picasso

            self.versions["picasso"] = getattr(picasso, "__version__", "?")
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from astropy.table import QTable
            from photutils.psf import GaussianPRF, PSFPhotometry
            import photutils

            self.photutils = (PSFPhotometry, GaussianPRF, QTable)
            self.versions["photutils"] = photutils.__version__
        with contextlib.suppress(Exception):
            import trackpy

            trackpy.quiet()
            self.trackpy = trackpy
            self.versions["trackpy"] = trackpy.__version__

    # picasso: Newton MLE of Smith et al. 2010, one spot per call of a numba function
    def picasso_fit(self, image, xy, half, max_it=100):
        photons = CAMERA.to_photons(image, np.float32)
        c = np.rint(xy).astype(np.int64)
        r = np.arange(-half, half + 1)
        spots = np.ascontiguousarray(photons[c[:, 1, None, None] + r[None, :, None],
                                             c[:, 0, None, None] + r[None, None, :]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0.11 deprecates the module
            theta, _crlb, _ll, iterations = self.picasso.gaussmle(spots, 0.001, max_it, method="sigmaxy")
        # Which of theta[:, 0] and theta[:, 1] is x (the column) changed between picasso
        # versions (its locs_from_fits: y = theta[:, 0] up to 0.10, x = theta[:, 0] in 0.11);
        # take the one that follows the spots' own column centroid.
        excess = np.clip(spots - np.median(spots, axis=(1, 2), keepdims=True), 0, None)
        col = (excess * r[None, None, :]).sum(axis=(1, 2)) / np.maximum(excess.sum(axis=(1, 2)), 1e-9)
        order = [0, 1]
        if abs(np.corrcoef(theta[:, 1], col)[0, 1]) > abs(np.corrcoef(theta[:, 0], col)[0, 1]):
            order = [1, 0]
        rel = theta[:, order].astype(float)  # (x, y) relative to the box's first pixel
        found = rel + c - half
        ok = (np.all(np.isfinite(theta), axis=1) & (iterations < max_it)
              & np.all((rel >= -0.5) & (rel < 2 * half + 0.5), axis=1))
        return found, ok

    # photutils: PSFPhotometry with a rotated elliptical Gaussian PRF at fixed start positions
    def photutils_fit(self, image, xy, half):
        PSFPhotometry, GaussianPRF, QTable = self.photutils
        photons = CAMERA.to_photons(image, np.float64)
        data = photons - np.median(photons)  # no offset parameter: global background removed
        fwhm = SIGMA * 2 * math.sqrt(2 * math.log(2))
        model = GaussianPRF(x_fwhm=fwhm, y_fwhm=fwhm)
        for name in ("x_fwhm", "y_fwhm", "theta"):
            getattr(model, name).fixed = False
        init = QTable()
        init["x"] = np.rint(xy[:, 0])
        init["y"] = np.rint(xy[:, 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = PSFPhotometry(model, (2 * half + 1, 2 * half + 1), aperture_radius=half)(
                data, init_params=init)
        found = np.c_[np.asarray(res["x_fit"], float), np.asarray(res["y_fit"], float)]
        ok = (np.asarray(res["flags"]) == 0) & np.all(np.isfinite(found), axis=1)
        return found, ok


def section_a(args, rng, peers):
    sizes = (1000, 10_000) if args.quick else (1000, 10_000, 100_000)
    repeats = {1000: 3, 10_000: 2} if args.quick else {1000: 7, 10_000: 5, 100_000: 2}
    one_core_windows = (3,) if args.quick else WINDOWS
    one_core_repeats = 2 if args.quick else 3
    n_cf = 300 if args.quick else 1000
    cf_repeats = 1 if args.quick else 2
    n_photutils = 100 if args.quick else 300
    pair_rounds = 3 if args.quick else 5
    cores = os.cpu_count() or 1

    data = {}
    for n in sizes:
        log(f"A: simulating {n} spots on a {PITCH} px lattice ...")
        data[n] = lattice_image(n, rng)
    rows, first_calls, notes = [], [], []

    def add(method, half, n, threads, best, median, found, ok, subset=None):
        """One row; ``found`` may be the first spots of the ``n``-spot image (a subset)."""
        rx, ry, matched = rmse_xy(found, ok, data[n][1][: len(found)])
        row = dict(method=method, half=half, n=len(found), threads=threads, best=best,
                   median=median, rate=len(found) / best, rate_median=len(found) / median,
                   failed=int((~ok).sum()), matched=matched, rx=rx, ry=ry, sub=None)
        if subset:  # accuracy on the curve_fit subset (same spots)
            sx, sy, _ = rmse_xy(found[:subset], ok[:subset], data[n][1][:subset])
            row["sub"] = (sx, sy)
        rows.append(row)
        return row

    # curve_fit reference: per spot, so its fits/s does not depend on the number of spots
    n_ref = 10_000
    ref_image, ref_xy = data[n_ref]
    cf_image = crop_rows(ref_image, ref_xy, n_cf)
    cf_rate = {}
    for half in WINDOWS:
        label = f"curve_fit loop {2 * half + 1}x{2 * half + 1}"
        log(f"A: {label}, {n_cf} spots ...")
        best, median, (found, ok, fails) = timed(
            lambda: curve_fit_loop(cf_image, ref_xy[:n_cf], half), cf_repeats, label)
        row = add("curve_fit loop (rotated, point)", half, n_ref, 1, best, median, found, ok,
                  subset=n_cf)
        cf_rate[half] = row["rate"]
        notes.append(f"curve_fit {2 * half + 1}x{2 * half + 1} failures: "
                     + ", ".join(f"{k} {v}" for k, v in fails.items()))

    if peers.photutils:
        for half in WINDOWS:
            label = f"photutils {2 * half + 1}x{2 * half + 1}"
            log(f"A: {label}, {n_photutils} spots ...")
            try:
                crop = crop_rows(ref_image, ref_xy, n_photutils)
                best, median, (found, ok) = timed(
                    lambda: peers.photutils_fit(crop, ref_xy[:n_photutils], half), 1, label)
                add("photutils PSFPhotometry (rotated)", half, n_ref, 1, best, median, found, ok)
            except Exception as exc:  # a peer's API change must not stop the benchmark
                notes.append(f"photutils failed: {type(exc).__name__}: {exc}")
                break

    for n in sizes:
        image, xy = data[n]
        for half in WINDOWS:
            size = f"{2 * half + 1}x{2 * half + 1}"
            for est, method in SPOTFIT_METHODS.items():
                def run(workers=cores):
                    return spotfit_fit(image, xy, half, workers, est)

                if n == sizes[0]:  # the first call of this configuration in this process
                    log(f"A: first call {method} {size} ...")
                    t0 = time.perf_counter()
                    run()
                    first_calls.append((f"{method} {size}", time.perf_counter() - t0))
                label = f"{method} {size} {n} spots"
                best, median, (found, ok) = timed(run, repeats[n], label)
                add(method, half, n, cores, best, median, found, ok,
                    subset=n_cf if n == n_ref else None)
                if n == n_ref and cores > 1 and half in one_core_windows:
                    best, median, (found, ok) = timed(lambda: run(1), one_core_repeats,
                                                      label + " 1 core")
                    add(method, half, n, 1, best, median, found, ok, subset=n_cf)
            if peers.picasso:
                label = f"picasso gaussmle {size} {n} spots"
                try:
                    if n == sizes[0]:
                        t0 = time.perf_counter()
                        peers.picasso_fit(image, xy, half)
                        first_calls.append((f"picasso gaussmle {size}", time.perf_counter() - t0))
                    best, median, (found, ok) = timed(lambda: peers.picasso_fit(image, xy, half),
                                                      repeats[n], label)
                    add("picasso gaussmle (ellipt., integr., MLE)", half, n, 1, best, median, found, ok,
                        subset=n_cf if n == n_ref else None)
                except Exception as exc:
                    notes.append(f"picasso failed: {type(exc).__name__}: {exc}")
                    peers.picasso = None
    for row in rows:
        row["ratio"] = row["rate"] / cf_rate[row["half"]]

    # ---------------------------------------------------------------- table
    print("A. Fitting alone: spotfit.fit_spots vs the per-spot curve_fit loop (same spots, same windows)")
    print(f"   simulated: isolated spots on a {PITCH} px lattice (+-{JITTER:g} px jitter), "
          f"{PHOTONS[0]:g}-{PHOTONS[1]:g} photons, background {BACKGROUND:g} photons/px, "
          f"sigma {SIGMA} px, camera baseline 100 ADU, gain 1; windows centred on the pixel "
          f"nearest to each true centre")
    print(f"   curve_fit: fit_speed.curve_fit_loop on the first {n_cf} spots of the 10^4 image; "
          f"being per spot, its fits/s is used for the ratio at every size")
    header = (f"   {'method':<41} {'window':>6} {'spots':>6} {'thr':>3} {'fits/s':>8} "
              f"{'fits/s':>8} {'ratio vs':>9} {'failed':>6} {'RMSE x':>7} {'RMSE y':>7} "
              f"{'same spots as curve_fit':>23}")
    sub = (f"   {'':<41} {'':>6} {'':>6} {'':>3} {'(best)':>8} {'(median)':>8} {'curve_fit':>9} "
           f"{'':>6} {'(px)':>7} {'(px)':>7} {'RMSE x, y (px)':>23}")
    print(header)
    print(sub)
    print("   " + "-" * (len(header) - 3))
    for r in rows:
        same = "" if r["sub"] is None else f"{r['sub'][0]:.4f}, {r['sub'][1]:.4f}"
        print(f"   {r['method']:<41} {2 * r['half'] + 1:>3}x{2 * r['half'] + 1:<2} {r['n']:>6} "
              f"{r['threads']:>3} {r['rate']:>8.0f} {r['rate_median']:>8.0f} {r['ratio']:>8.1f}x "
              f"{r['failed']:>6} {r['rx']:>7.4f} {r['ry']:>7.4f} {same:>23}")
    print(f"   thr = threads (os.cpu_count() = {cores}); ratio = best fits/s / curve_fit's best "
          f"fits/s for the same window; failed: spotfit status != converged, curve_fit "
          f"exception/non-finite/left window, picasso non-finite/max iterations/left window, "
          f"photutils flags != 0; RMSE of the accepted fits matched to the truth within "
          f"{MATCH_RADIUS} px")
    for note in notes:
        print(f"   {note}")
    print("   first call in this process (numba loads its on-disk cache, or compiles if it is "
          "stale; the first one also imports numba), 10^3 spots:")
    for label, seconds in first_calls:
        print(f"     {label:<50} {seconds:7.2f} s")

    # ------------------------------------------------------------- verdicts
    cf = {r["half"]: r for r in rows if r["method"].startswith("curve_fit")}
    for est, method in SPOTFIT_METHODS.items():
        for threads in sorted({cores, 1}, reverse=True):
            r = next((r for r in rows if r["method"] == method and r["half"] == 3
                      and r["n"] == n_ref and r["threads"] == threads), None)
            if r is None:
                continue
            ref = cf[3]
            acc_ok = all(s <= c * (1 + ACCURACY_TOLERANCE)
                         for s, c in zip(r["sub"], (ref["rx"], ref["ry"])))
            # the verdict's ratio: the median of rounds that time curve_fit and spotfit
            # back to back (this host's speed drifts within minutes; the table's ratio
            # divides two bests that may be minutes apart)
            image, xy = data[n_ref]
            paired = []
            for _ in range(pair_rounds):
                t0 = time.perf_counter()
                curve_fit_loop(cf_image, ref_xy[:n_cf], 3)
                t1 = time.perf_counter()
                spotfit_fit(image, xy, 3, threads, est)
                t2 = time.perf_counter()
                paired.append((len(xy) / (t2 - t1)) / (n_cf / (t1 - t0)))
            ratio = statistics.median(paired)
            ok = ratio >= TARGETS["ratio"] and acc_ok
            tag = record(
                f"A fitting alone, 7x7 rotated, 10^4 spots, {est}, {threads} thread(s)",
                f"{ratio:.1f}x curve_fit; RMSE {r['sub'][0]:.4f}/{r['sub'][1]:.4f} vs "
                f"{ref['rx']:.4f}/{ref['ry']:.4f} px",
                f">= {TARGETS['ratio']:g}x, RMSE <= curve_fit (+{ACCURACY_TOLERANCE:.0%})", ok)
            print(f"   target: {r['method']} 7x7, 10^4 spots, {threads} thread(s): "
                  f"{ratio:.1f}x, the median of {pair_rounds} rounds timing curve_fit and spotfit "
                  f"back to back ({', '.join(f'{p:.0f}' for p in paired)}; table {r['ratio']:.1f}x) "
                  f"(>= {TARGETS['ratio']:g}x: {verdict(ratio >= TARGETS['ratio'])}), accuracy on "
                  f"the same {n_cf} spots {verdict(acc_ok)} -> {tag}")
    print()


# ---------------------------------------------------------------- section B
def write_images(workdir, args, rng):
    from spotfit.simulation import write_simulation

    n_frames = 100 if args.quick else 1000
    files = {}
    for name, shape, n, axes in (
        ("small", SMALL_SHAPE, SMALL_SPOTS, "YX"),
        ("big", BIG_SHAPE, BIG_SPOTS, "YX"),
        ("movie", (n_frames,) + MOVIE_FRAME, MOVIE_SPOTS, "TYX"),
    ):
        log(f"B: simulating {name} {'x'.join(map(str, shape))}, {n} spots per frame ...")
        image, truth = spotfit.simulate(
            shape, n_spots=n, photons=PHOTONS, background=BACKGROUND, sigma=SIGMA,
            camera=CAMERA, min_separation=MIN_SEPARATION, seed=rng)
        path = os.path.join(workdir, f"{name}.tif")
        write_simulation(path, os.path.join(workdir, f"{name}_truth.csv"), image, truth, axes)
        files[name] = dict(path=path, shape=shape, spots=len(truth), axes=axes,
                           truth=truth[["x", "y"]].to_numpy() if name == "big" else None,
                           bytes=os.path.getsize(path))
    return files


def spotfit_command():
    """The console script beside this interpreter, else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "spotfit")
    if os.path.exists(here):
        return here
    found = shutil.which("spotfit")
    if found is None:
        sys.exit("speed.py: no 'spotfit' console script found (pip install -e .)")
    return found


TIME = "/usr/bin/time"


def run_process(argv, cwd, cpu=None):
    """Run one command; wall time (s), peak RSS (bytes), exit code, stderr.

    ``cpu``: a list to append the child's CPU time (user + system, s) to, from
    ``os.wait4`` (on a shared machine it says more than the wall time).

    Peak memory is the child's maximum resident set size, taken from GNU
    ``/usr/bin/time -f %M`` where it exists (it wraps the command; the wall
    time then includes its ~1 ms), else from polling ``VmHWM`` in
    ``/proc/PID/status`` every 2 ms until the child exits.  Not from
    ``ru_maxrss`` of ``os.wait4``/``RUSAGE_CHILDREN`` here: Linux carries
    the RSS of the forked copy of this (large) process over the exec, so
    every child would report at least this benchmark's own size.
    """
    use_time = os.access(TIME, os.X_OK)
    with open(os.devnull, "wb") as devnull, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".time") as rss:
        if use_time:
            argv = [TIME, "-f", "%M", "-o", rss.name] + list(argv)
        hwm = 0
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=devnull, stderr=err, cwd=cwd)
        if use_time:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if cpu is not None:
                cpu.append(usage.ru_utime + usage.ru_stime)
        else:
            while proc.poll() is None:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{proc.pid}/status") as status:
                        hwm = max([hwm] + [int(line.split()[1]) for line in status
                                           if line.startswith("VmHWM:")])
                time.sleep(0.002)
        wall = time.perf_counter() - t0
        if use_time:  # "%M\n", after "Command exited with non-zero status N" if it failed
            lines = [line.strip() for line in rss.read().splitlines()]
            hwm = int(lines[-1]) if lines and lines[-1].isdigit() else 0
        err.seek(0)
        message = err.read().decode(errors="replace").strip()
    return wall, hwm * 1024, proc.returncode, message


def fit_argv(command, image, workdir, extra=()):
    return [command, "fit", image, "--out", os.path.join(workdir, "spotfit_out.csv")] + list(extra)


def in_process_run(path, camera, out):
    image = spotfit.read_image(path)
    table = spotfit.fit(image, camera=camera, sigma=SIGMA)
    spotfit.write_table(table, out)
    return table


ISOLATED = 12.0  # px: true spots with no other true spot closer than this


def accuracy(found, ok, truth):
    """RMSE x, y and matched count over all true spots, and RMSE x, y over isolated ones."""
    from scipy.spatial import cKDTree

    rx, ry, matched = rmse_xy(found, ok, truth)
    distance, _ = cKDTree(truth).query(truth, 2)
    ix, iy, _ = rmse_xy(found, ok, truth[distance[:, 1] >= ISOLATED])
    return dict(rx=rx, ry=ry, matched=matched, iso=(ix, iy))


def breakdown(path, camera, out, repeats):
    """Best time of each stage, by the public functions, and a cProfile split of ``fit``."""
    stages = {"read": [], "detect": [], "fit (detect + fit)": [], "write": []}
    table = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        image = spotfit.read_image(path)
        frame = np.array(image.frame(0))  # read_image maps the file; this reads the pixels
        t1 = time.perf_counter()
        spotfit.detect(frame, sigma=SIGMA, camera=camera)
        t2 = time.perf_counter()
        table = spotfit.fit(frame, camera=camera, sigma=SIGMA)
        t3 = time.perf_counter()
        spotfit.write_table(table, out)
        t4 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[key].append(dt)
    best = {k: min(v) for k, v in stages.items()}
    best["fit only (= fit - detect)"] = best["fit (detect + fit)"] - best["detect"]

    profile = cProfile.Profile()
    profile.enable()
    spotfit.fit(frame, camera=camera, sigma=SIGMA)
    profile.disable()
    wanted = [  # (function, file or None): the stages inside spotfit.fit, found by name so
        # that moving a function between spotfit's modules does not lose it
        ("to_photons", None), ("find_peaks", None), ("cut", "roi.py"), ("image_noise", None),
        ("initial_guess", None), ("levenberg_marquardt", None), ("covariance", None),
        ("measure", "results.py"), ("build", "table.py"), ("fit", "api.py"),
    ]
    stats = pstats.Stats(profile).stats
    package = os.sep + "spotfit" + os.sep
    inside = []
    for func, file in wanted:
        cum = [v[3] for (path, _line, name), v in stats.items()
               if name == func and package in path
               and (file is None or path.endswith(os.sep + file))]
        if cum:
            inside.append((func, max(cum)))
    return best, inside, len(table)


def section_b(args, workdir, files, peers):
    command = spotfit_command()
    repeats = 2 if args.quick else 5
    big = files["big"]
    out = os.path.join(workdir, "out.csv")
    cameras = (("no camera (lsq, point-sampled)", spotfit.Camera(), []),
               ("camera gain 1 (mle, integrated)", CAMERA, CAMERA_ARGS))

    log("B: warm-up on the small image ...")
    for _label, camera, _ in cameras:
        in_process_run(files["small"]["path"], camera, out)
    rows = []
    for label, camera, _ in cameras:
        name = f"spotfit read+fit+write, {label}"
        best, median, table = timed(lambda: in_process_run(big["path"], camera, out), repeats, name)
        acc = accuracy(table[["x", "y"]].to_numpy(), (table["status"] == "converged").to_numpy(),
                       big["truth"])
        rows.append(dict(method=name, short=label, n=len(table), best=best, median=median,
                         target=True, **acc))
    if peers.trackpy:
        tp = peers.trackpy

        def trackpy_run(path):
            frame = CAMERA.to_photons(np.asarray(spotfit.read_image(path).frame(0)))
            found = tp.locate(frame, 2 * math.ceil(2.5 * SIGMA) + 1, minmass=100)
            spotfit.write_table(found, out)
            return found

        try:
            trackpy_run(files["small"]["path"])
            best, median, found = timed(lambda: trackpy_run(big["path"]), repeats, "trackpy.locate")
            xy = found[["x", "y"]].to_numpy()
            rows.append(dict(method="trackpy.locate (centroid, no PSF fit)", n=len(found),
                             best=best, median=median, target=False,
                             **accuracy(xy, np.ones(len(xy), bool), big["truth"])))
        except Exception as exc:
            log(f"B: trackpy failed: {type(exc).__name__}: {exc}")

    log("B: stage breakdown ...")
    parts = {label: breakdown(big["path"], camera, out, 1 if args.quick else 3)
             for label, camera, _ in cameras}

    log("B: spotfit fit in subprocesses (wall time, peak memory) ...")
    procs, already_run = [], set()
    for name in ("big", "movie"):
        for label, _camera, extra in cameras:
            argv = fit_argv(command, files[name]["path"], workdir, extra)
            wall, peak, code, message = run_process(argv, workdir)
            already_run.add(tuple(argv))
            log(f"  {name} {label}: {wall:.2f} s, {peak / 1e6:.0f} MB, exit {code}")
            procs.append(dict(name=name, label=label, wall=wall, peak=peak, code=code,
                              message=message))

    # ---------------------------------------------------------------- table
    print(f"B. End to end in one process: read_image + fit + write_table, "
          f"{BIG_SHAPE[0]}x{BIG_SHAPE[1]} px, {big['spots']} simulated spots "
          f"(min. separation {MIN_SEPARATION:g} px), after a warm-up on a small image")
    header = (f"   {'method':<56} {'spots':>6} {'best s':>7} {'median s':>8} {'spots/s':>8} "
              f"{'target':>9} {'':>4} {'matched':>7} {'RMSE x':>7} {'RMSE y':>7} {'isolated x, y':>15}")
    print(header)
    print("   " + "-" * (len(header) - 3))
    for r in rows:
        rate = r["n"] / r["best"]
        tag = ""
        if r["target"]:
            tag = record(f"B end to end in one process, {r['short']}", f"{rate:,.0f} spots/s",
                         f">= {TARGETS['e2e']:,.0f}", rate >= TARGETS["e2e"])
        target = f">= {TARGETS['e2e'] / 1000:g}k" if r["target"] else ""
        print(f"   {r['method']:<56} {r['n']:>6} {r['best']:>7.3f} {r['median']:>8.3f} {rate:>8,.0f} "
              f"{target:>9} {tag:>4} {r['matched']:>7} {r['rx']:>7.4f} {r['ry']:>7.4f} "
              f"{r['iso'][0]:>7.4f},{r['iso'][1]:>7.4f}")
    print(f"   spots = rows written (every candidate, flagged ones included); spots/s = spots / "
          f"best time of {repeats} runs; RMSE (px) of converged rows matched to the truth within "
          f"{MATCH_RADIUS} px, over all true spots and over the isolated ones (no other spot "
          f"within {ISOLATED:g} px; spots are placed at random, so close pairs dominate the "
          f"first)")
    print(f"   stage breakdown (best of {1 if args.quick else 3} runs per stage; read includes "
          "reading the pixels, detect = spotfit.detect, fit only = spotfit.fit - detect):")
    for label, (best, inside, n) in parts.items():
        total = best["read"] + best["fit (detect + fit)"] + best["write"]
        line = ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in best.items()
                         if k != "fit (detect + fit)")
        print(f"     {label}: {line}; total {total:.3f} s = {n / total:,.0f} spots/s")
        print("       inside spotfit.fit, one cProfile run (cumulative s, profiler overhead "
              "included): " + ", ".join(f"{k} {v:.3f}" for k, v in inside))
    print(f"   spotfit fit in a subprocess ({os.path.basename(command)} fit IMAGE --out FILE "
          f"[{' '.join(CAMERA_ARGS)}]); wall time including start-up; peak RSS of the child "
          f"({'/usr/bin/time -f %M' if os.access(TIME, os.X_OK) else 'VmHWM polled'}):")
    for p in procs:
        f = files[p["name"]]
        what = ("x".join(map(str, f["shape"])) + f" px, {f['spots']} spots, "
                f"{f['bytes'] / 1e6:.0f} MB file")
        status = "" if p["code"] == 0 else f"  EXIT {p['code']}: {p['message'][-200:]}"
        tag, target = "", ""
        if p["name"] == "movie":
            full = f["shape"][0] == 1000
            target = f"< {TARGETS['movie_bytes'] / GB:g} GB"
            tag = record(f"B peak memory, {f['shape'][0]}-frame movie, {p['label']}",
                         f"{p['peak'] / GB:.2f} GB", target + ("" if full else " (1000 frames)"),
                         (p["peak"] < TARGETS["movie_bytes"] and p["code"] == 0) if full else None)
            if not full:
                target += " (for 1000 frames)"
        print(f"     {p['name']:<6} {what:<40} {p['label']:<32} {p['wall']:6.2f} s  "
              f"peak {p['peak'] / 1e6:6.0f} MB  {target} {tag}{status}")
    print()
    return already_run


# ---------------------------------------------------------------- section C
def byte_compile_spotfit() -> str:
    """Byte-compile spotfit's sources (``__pycache__/*.pyc``), as ``pip install`` does;
    a note for the table.

    Without it, an editable install run with ``PYTHONDONTWRITEBYTECODE=1`` (set in some
    environments) compiles spotfit's ~30 modules from source in every process, about
    0.2 s that no installed spotfit spends.
    """
    import compileall

    ok = compileall.compile_dir(os.path.dirname(os.path.abspath(spotfit.__file__)), quiet=1)
    note = "spotfit's .pyc files written first (as pip install does)"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        note += "; PYTHONDONTWRITEBYTECODE is set here"
    return note if ok else note + " (some could not be written)"


def section_c(args, workdir, files, already_run=()):
    command = spotfit_command()
    compiled = byte_compile_spotfit()
    runs = 2 if args.quick else 5
    cases = [("spotfit --help", [command, "--help"], TARGETS["help_s"])]
    for name, target in (("small", TARGETS["small_s"]), ("big", TARGETS["big_s"])):
        for cam, extra in (("", []), (" " + " ".join(CAMERA_ARGS), CAMERA_ARGS)):
            label = f"spotfit fit {name}.tif --out x.csv{cam}"
            cases.append((label, fit_argv(command, files[name]["path"], workdir, extra), target))
    results = []
    for label, argv, target in cases:
        if tuple(argv) in already_run:  # section B ran exactly this command
            log(f"C: {label}: {runs} timed runs (section B's run was the untimed one) ...")
        else:
            log(f"C: {label}: 1 untimed + {runs} timed runs ...")
            run_process(argv, workdir)
        walls, peaks, codes, message, cpus = [], [], [], "", []
        for _ in range(runs):
            wall, peak, code, msg = run_process(argv, workdir, cpus)
            walls.append(wall)
            peaks.append(peak)
            codes.append(code)
            message = message or (msg if code else "")
        results.append((label, walls, peaks, codes, message, target, cpus))

    print(f"C. Fresh process, as a shell loop runs it: median of {runs} runs after one untimed run "
          f"(so numba's cache exists; for big.tif section B's run), wall time from start to exit; CPU s: the\n"
          f"   median user + system time of the child (less sensitive to a busy machine)")
    print(f"   small.tif: {SMALL_SHAPE[0]}x{SMALL_SHAPE[1]} px, {files['small']['spots']} spots; "
          f"big.tif: {BIG_SHAPE[0]}x{BIG_SHAPE[1]} px, {files['big']['spots']} spots; "
          f"console script {command}")
    print(f"   {compiled}")
    header = (f"   {'command':<56} {'median s':>8} {'min s':>6} {'max s':>6} {'CPU s':>6} "
              f"{'peak MB':>8} {'target':>8} {'':>4}")
    print(header)
    print("   " + "-" * (len(header) - 3))
    for label, walls, peaks, codes, message, target, cpus in results:
        median = statistics.median(walls)
        ok = median <= target and not any(codes)
        tag = record(f"C fresh process: {label}", f"{median:.2f} s", f"<= {target:g} s", ok)
        cpu = f"{statistics.median(cpus):.2f}" if cpus else "?"
        print(f"   {label:<56} {median:>8.2f} {min(walls):>6.2f} {max(walls):>6.2f} {cpu:>6} "
              f"{max(peaks) / 1e6:>8.0f} {'<= ' + format(target, 'g') + ' s':>8} {tag:>4}"
              + (f"  EXIT {codes}: {message[-200:]}" if any(codes) else ""))
    print()


# ------------------------------------------------------------------- footer
def versions(peers) -> str:
    import numba
    import pandas
    import tifffile

    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}",
             f"scipy {scipy.__version__}", f"numba {numba.__version__}",
             f"pandas {pandas.__version__}", f"tifffile {tifffile.__version__}",
             f"spotfit {spotfit.__version__} ({os.path.dirname(spotfit.__file__)})"]
    parts += [f"{k} {v}" for k, v in peers.versions.items()]
    return ", ".join(parts)


def git_state() -> str:
    root = os.path.dirname(BENCHMARKS_DIR)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "spotfit"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git: unknown"
    if not head:
        return "git: unknown"
    return f"git {head}" + (" + uncommitted changes in spotfit/" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="under a minute: no 10^5 spots, 100-frame movie, fewer repeats")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--workdir", help="keep the simulated TIFFs and CSVs here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip picasso, photutils and trackpy even if installed")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    speed = [reference_seconds()]
    rng = np.random.default_rng(args.seed)
    peers = Peers(not args.no_peers)
    print(f"speed.py{' --quick' if args.quick else ''}: spotfit against the speed issue's targets "
          f"(seed {args.seed})")
    print(f"   machine: os.cpu_count() = {os.cpu_count()} cores "
          f"(usable {len(os.sched_getaffinity(0))}), {cpu_model()}")
    print()

    section_a(args, rng, peers)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            os.makedirs(args.workdir, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="spotfit-speed-"))
        files = write_images(workdir, args, rng)
        already_run = section_b(args, workdir, files, peers)
        section_c(args, workdir, files, already_run)

    print("Targets of the issue")
    width = max(len(v[0]) for v in VERDICTS)
    for criterion, value, target, tag in VERDICTS:
        print(f"   {tag:<4}  {criterion:<{width}}  {value}  (target {target})")
    print()
    print(f"   {os.cpu_count()} cores (os.cpu_count()), {cpu_model()}; {versions(peers)}; "
          f"{git_state()}")
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"   {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
          f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"this benchmark: {time.perf_counter() - t_start:.0f} s, peak RSS {peak_self / 1e6:.0f} MB")
    print("   " + describe([*speed, reference_seconds()], ": at the start / end").replace("\n", "\n   "))
    log(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
