"""The joint-fit solver on dense fields: this tree's kernel against a reference commit's.

Runs :func:`spotfit.fit` once on seeded SMLM-like frames (``benchmarks/dense.py``'s
60 emitters per 32 x 32 frame) and records every solve that the crowded-field
engine (:mod:`spotfit.group`) and the single-spot fits make on the way.  Then,
on exactly those inputs, it times the Levenberg-Marquardt kernel and the
covariance of

* this tree (:func:`spotfit.solver.solve`), and
* the reference: ``spotfit/_kernels.py`` of ``--ref`` (default: main before
  the solver changes of this benchmark's branch), loaded from git into a
  throw-away module and driven the same way (same bounds, same tolerance, one
  thread),

per group size ``K`` (single-spot fits as ``single``, the crowded engine's blob tests as
``blob``), in CPU seconds
(``time.process_time``, one thread; LM and covariance apart) and mean iterations; the ratio is
reference / this tree.  It also compares the answers where both converged:
``|theta - theta_ref| / err`` (the parameter's standard error) and the final
cost (a lower cost is a better minimum of the same objective).

Run ``python benchmarks/joint_speed.py`` (~1 min; ``--frames`` fewer or more
frames) from the repository root (needs git).  The table goes to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import spotfit
from spotfit import solver

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dense  # noqa: E402  (the scenarios)

#: the reference kernels: main of 2026-12-03 morning (before that day's joint-fit and
#: score-gate kernels); ``--ref 8044943`` for the solver before the dense-field work
DEFAULT_REF = "865bd92"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def reference_kernels(ref: str):
    """``spotfit/_kernels.py`` at commit ``ref``, imported as a separate module."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{ref}:spotfit/_kernels.py"],
                         check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="spotfit_ref_"))
    path = tmp / "_kernels_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("spotfit_kernels_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # this tree's KernelModel (the same fields) in the reference's first-class MODEL's signature:
    # numba identifies function types by their signature's text, and two classes of that name
    # would mismatch
    from spotfit._kernels import KernelModel

    if getattr(mod, "KernelModel", KernelModel)._fields == KernelModel._fields:
        mod.KernelModel = KernelModel
    return mod


def record(frames: int, seed: int):
    """The solves of one dense fit: (label, model, estimator, data, mask, grid, theta0, options)."""
    calls = []
    original = solver.solve

    def spy(model, estimator, data, mask, grid, theta0, **kw):
        from spotfit.models.gaussian import MultiGaussian

        label = f"K={model.n_emitters}" if isinstance(model, MultiGaussian) else \
            "blob" if kw.get("boxed") else "single"  # the crowded engine's blob tests: boxed
        calls.append((label, model, estimator, np.array(data, float), np.array(mask), grid,
                      np.array(theta0, float), dict(kw)))
        return original(model, estimator, data, mask, grid, theta0, **kw)

    sc = dense.smlm(60, frames, seed)
    solver.solve = spy  # group.py and single.py call solver.solve
    try:
        table = spotfit.fit(sc.image, camera=sc.camera, sigma=sc.sigma, axes="TYX", workers=1)
    finally:
        solver.solve = original
    return calls, len(table)


def solve_with(kernels, model, estimator, data, mask, grid, theta0, kw):
    """LM and covariance kernels of ``kernels`` (a ``_kernels`` module) as
    :func:`spotfit.solver.solve` runs them on a calibrated camera (no hold-first pass,
    no bias correction: the parts the two share), in one thread.

    Returns the fit state, the covariance and the CPU seconds of each kernel."""
    from spotfit._kernels import CAMERA_VARIANCE, CovarianceOut, FitState, NoiseModel

    n, k = theta0.shape
    free = np.ones(k, bool) if kw.get("free") is None else np.asarray(kw["free"], bool)
    lower = np.ascontiguousarray(np.broadcast_to(kw.get("lower", -np.inf), (n, k)), dtype=float)
    upper = np.ascontiguousarray(np.broadcast_to(kw.get("upper", np.inf), (n, k)), dtype=float)
    noise = kw["noise"]
    data = np.ascontiguousarray(data, float)
    cost = estimator.cost(data, mask, noise)
    km = model.kernel(grid)
    km = kernels.KernelModel(*km[:len(kernels.KernelModel._fields)])  # (a reference's has fewer fields)
    state = FitState(theta0.copy(), np.zeros(n, np.int32), np.zeros(n, np.int8), np.zeros(n))
    t0 = time.process_time()
    # the Box of the kernels under test: with `active` (projected steps, joint fits) since
    # 2026-12-03, without before
    box = kernels.Box(lower, upper, free, int(kw.get("active_set", False))) \
        if "active" in kernels.Box._fields else kernels.Box(lower, upper, free)
    if "rough" in kernels.Box._fields:  # (fits from rough starts, since 2026-12-04)
        box = kernels.Box(*box, int(kw.get("rough_start", False)))
    # kernels since the model code became a first-class function take it first
    fn = (kernels.MODEL,) if hasattr(kernels, "MODEL") else ()
    # kernels since the joint fits' own model code: the crowded engine's fits (several
    # emitters, or ``boxed``) are boxed, as spotfit.solver.minimise runs them
    if hasattr(kernels, "MODEL_BOXED") and (kw.get("boxed") or kernels.model_for(km) is not kernels.MODEL):
        km = km._replace(boxed=1)
        fn = (kernels.MODEL_BOXED,)
    kernels.levenberg_marquardt(*fn, km, cost, box, state, int(kw.get("max_iter", 50)),
                                float(kw.get("tol", 1e-3)), 0, n)
    t1 = time.process_time()
    out = CovarianceOut(np.zeros((n, k, k)), np.zeros(n), np.zeros((n, 5)), np.zeros((0, k)))
    read_var = np.ascontiguousarray(np.broadcast_to(noise.read_var, data.shape), dtype=float)
    none = np.zeros(0)
    # kernels since the score statistic became a mode of the covariance kernel take `embed`
    # (empty outside that mode); the reference commit's do not
    embed = (np.zeros((0, 0, 0)),) if "embed" in inspect.signature(kernels.covariance.py_func).parameters else ()
    fn = (kernels.model_for(km._replace(boxed=0)),) if hasattr(kernels, "model_for") else fn
    kernels.covariance(*fn, km, cost, data, state.theta, free,
                       NoiseModel(CAMERA_VARIANCE, float(noise.excess), read_var, none, none, none), out,
                       solver.BIAS_SNR, *embed, 0, n)
    t2 = time.process_time()
    return state, out.cov, t1 - t0, t2 - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default=DEFAULT_REF, help="git commit of the reference kernels")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=109)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = ap.parse_args(argv)

    import numba

    numba.set_num_threads(1)
    load = os.getloadavg()
    print(f"# spotfit {spotfit.__version__} from {os.path.dirname(spotfit.__file__)} vs _kernels.py of "
          f"{args.ref}; python {platform.python_version()}, numpy {np.__version__}; {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f}; one thread; CPU seconds (process_time), best of "
          f"{args.repeats}")
    log(f"loading the reference kernels ({args.ref}) ...")
    ref = reference_kernels(args.ref)
    import spotfit._kernels as cur

    log(f"recording the solves of a dense fit ({args.frames} frames of 60 emitters) ...")
    calls, rows = record(args.frames, args.seed)
    # warm-up (compilation of the reference module, once per model type)
    for label, model, est, data, mask, grid, theta0, kw in calls:
        for kern in (ref, cur):
            solve_with(kern, model, est, data[:1], mask[:1], grid, theta0[:1],
                       {**kw, "lower": np.broadcast_to(kw.get("lower", -np.inf), theta0.shape)[:1],
                        "upper": np.broadcast_to(kw.get("upper", np.inf), theta0.shape)[:1]})

    agg = defaultdict(lambda: dict(n=0, t_cur=0.0, t_ref=0.0, lm_ref=0.0, lm_cur=0.0, cov_ref=0.0, cov_cur=0.0,
                                   it_cur=0, it_ref=0, conv_cur=0, conv_ref=0, dz=[], dcost=[]))
    for label, model, est, data, mask, grid, theta0, kw in calls:
        out = {}
        for name, kern in (("ref", ref), ("cur", cur)):
            best_lm = best_cov = np.inf
            for _ in range(args.repeats):
                state, cov, t_lm, t_cov = solve_with(kern, model, est, data, mask, grid, theta0, kw)
                best_lm, best_cov = min(best_lm, t_lm), min(best_cov, t_cov)
            out[name] = (state, cov, best_lm, best_cov)
        a = agg[label]
        (s_ref, c_ref, lm_ref, cov_ref), (s_cur, c_cur, lm_cur, cov_cur) = out["ref"], out["cur"]
        a["n"] += len(theta0)
        a["t_ref"] += lm_ref + cov_ref
        a["t_cur"] += lm_cur + cov_cur
        a["lm_ref"] += lm_ref
        a["lm_cur"] += lm_cur
        a["cov_ref"] += cov_ref
        a["cov_cur"] += cov_cur
        a["it_ref"] += int(s_ref.iterations.sum())
        a["it_cur"] += int(s_cur.iterations.sum())
        a["conv_ref"] += int(np.sum(s_ref.status == 0))
        a["conv_cur"] += int(np.sum(s_cur.status == 0))
        both = (s_ref.status == 0) & (s_cur.status == 0)
        err = np.sqrt(np.clip(np.diagonal(c_ref, axis1=1, axis2=2), 0, None))
        with np.errstate(all="ignore"):
            z = np.abs(s_cur.theta - s_ref.theta) / np.where(err > 0, err, np.nan)
        free = np.ones(theta0.shape[1], bool) if kw.get("free") is None else np.asarray(kw["free"], bool)
        z = z[both][:, free]
        with np.errstate(all="ignore"):
            a["dz"].append(np.max(np.nan_to_num(z, nan=0.0), axis=1) if z.size else np.zeros(0))
        a["dcost"].append((s_cur.cost - s_ref.cost)[both])

    def key(label):
        return (0, 0) if label == "single" else (0, 1) if label == "blob" else (1, int(label[2:]))

    head = (f"{'fits':<8}{'windows':>8}{'LM ref':>8}{'LM':>7}{'cov ref':>8}{'cov':>7}{'ref s':>7}{'this s':>7}"
            f"{'ratio':>6}{'ref it':>7}{'it':>6}"
            f"{'conv ref':>9}{'conv':>7}   max|dθ|/err (median, p99)   cost this-ref (median, p1, p99)")
    print(f"{rows} rows fitted; every solve of that fit re-run with both kernels")
    print(head)
    print("-" * len(head))
    tot = dict(t_ref=0.0, t_cur=0.0, lm_ref=0.0, lm_cur=0.0, cov_ref=0.0, cov_cur=0.0)
    for label in sorted(agg, key=key):
        a = agg[label]
        for name in tot:
            tot[name] += a[name]
        dz = np.concatenate(a["dz"])
        dc = np.concatenate(a["dcost"])
        zs = f"{np.nanmedian(dz):.1e}, {np.nanpercentile(dz, 99):.1e}" if len(dz) else "-"
        cs = (f"{np.median(dc):+.1e}, {np.percentile(dc, 1):+.1e}, {np.percentile(dc, 99):+.1e}"
              if len(dc) else "-")
        print(f"{label:<8}{a['n']:>8}{a['lm_ref']:>8.3f}{a['lm_cur']:>7.3f}{a['cov_ref']:>8.3f}{a['cov_cur']:>7.3f}"
              f"{a['t_ref']:>7.3f}{a['t_cur']:>7.3f}{a['t_ref'] / max(a['t_cur'], 1e-9):>6.2f}"
              f"{a['it_ref'] / a['n']:>7.1f}{a['it_cur'] / a['n']:>6.1f}{a['conv_ref']:>9}{a['conv_cur']:>7}"
              f"   {zs:<28}{cs}")
    print(f"{'all':<8}{'':>8}{tot['lm_ref']:>8.3f}{tot['lm_cur']:>7.3f}{tot['cov_ref']:>8.3f}{tot['cov_cur']:>7.3f}"
          f"{tot['t_ref']:>7.3f}{tot['t_cur']:>7.3f}{tot['t_ref'] / tot['t_cur']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
