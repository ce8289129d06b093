"""3D accuracy: spotfit on simulated z-stacks like those of the RS-FISH paper.

Stacks of 32 x 256 x 256 voxels, lateral sigma 1.5 or 2 px, axial sigma 2
planes, 30 or 300 spots at random (at least 10 px apart laterally, anywhere
in z), Poisson noise over a background, camera gain 1.  For each setting:
recall and precision at 2 px, bias and RMSE of x, y, z, the RMSE over the
Cramer-Rao bound of the true model (pixel-integrated symmetric 3D Gaussian,
each spot in its own window with planes outside the stack excluded), the
reported ``*_err`` against the observed scatter, and fits/s.

Run: ``python benchmarks/accuracy_3d.py [--quick] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import spotfit
from spotfit import solver
from spotfit.camera import Camera
from spotfit.estimators import Noise
from spotfit.match import match_spots
from spotfit.models import Grid, get_model

SHAPE = (32, 256, 256)  # z, y, x
CAMERA = Camera(baseline=100.0, gain=1.0)
SIGMA_Z = 2.0
BACKGROUND = 10.0
PHOTONS = 1500.0


def crlb(truth, sigma, nz, h=5):
    """sqrt(CRLB) of x, y, z for each true spot, ``(n, 3)``."""
    model = get_model("symmetric", 3, integrated=True)
    grid = Grid((2 * h + 1,) * 3)
    xyz = truth[["x", "y", "z"]].to_numpy()
    centre = np.rint(xyz)
    n = len(truth)
    theta = np.column_stack([truth.intensity, xyz - centre + h, np.full(n, sigma), np.full(n, SIGMA_Z),
                             np.full(n, BACKGROUND)])
    planes = centre[:, 2:3] - h + np.arange(2 * h + 1)[None, :]
    mask = np.repeat(((planes >= 0) & (planes < nz))[:, :, None], (2 * h + 1) ** 2, axis=2).reshape(n, -1)
    return solver.crlb(model, theta, grid, Noise(calibrated=True), mask=mask)[:, 1:4]


def run(n_spots, sigma, seeds):
    found_all, truth_all, bounds, times, n_found = [], [], [], [], 0
    errs = []
    for seed in seeds:
        img, truth = spotfit.simulate(SHAPE, n_spots=n_spots, photons=PHOTONS, background=BACKGROUND,
                                      sigma=sigma, sigma_z=SIGMA_Z, z_stack=True, camera=CAMERA,
                                      min_separation=10, seed=seed)
        t0 = time.perf_counter()
        found = spotfit.fit(img, camera=CAMERA, axes="ZYX", sigma=sigma, sigma_z=SIGMA_Z)
        times.append(time.perf_counter() - t0)
        i_f, i_t = match_spots(found[["x", "y", "z"]].to_numpy(), truth[["x", "y", "z"]].to_numpy(), 2.0)
        n_found += len(found)
        matched = truth.iloc[i_t]
        found_all.append(found.iloc[i_f][["x", "y", "z"]].to_numpy())
        errs.append(found.iloc[i_f][["x_err", "y_err", "z_err"]].to_numpy())
        truth_all.append(matched[["x", "y", "z"]].to_numpy())
        bounds.append(crlb(matched, sigma, SHAPE[0]))
    f, t, b, r = (np.concatenate(a) for a in (found_all, truth_all, bounds, errs))
    d = f - t
    rmse = np.sqrt(np.mean(d**2, axis=0))
    return {
        "spots": n_spots, "sigma_xy": sigma, "recall": len(t) / (n_spots * len(seeds)),
        "precision": len(t) / max(n_found, 1),
        **{f"bias_{a}": d[:, j].mean() for j, a in enumerate("xyz")},
        **{f"rmse_{a}": rmse[j] for j, a in enumerate("xyz")},
        **{f"rmse/crlb_{a}": rmse[j] / np.sqrt(np.mean(b[:, j] ** 2)) for j, a in enumerate("xyz")},
        **{f"obs/rep_{a}": rmse[j] / np.sqrt(np.mean(r[:, j] ** 2)) for j, a in enumerate("xyz")},
        "fits/s": n_found / sum(times),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed per setting")
    parser.add_argument("--seeds", type=int, default=4, help="stacks per setting (default 4)")
    args = parser.parse_args(argv)
    import pandas as pd

    seeds = range(1 if args.quick else args.seeds)
    spotfit.fit(np.full((4, 16, 16), 100, np.uint16), camera=CAMERA, axes="ZYX")  # load the compiled solver
    rows = []
    for n_spots in (30, 300):
        for sigma in (1.5, 2.0):
            print(f"  {n_spots} spots, sigma_xy {sigma} ...", file=sys.stderr, flush=True)
            rows.append(run(n_spots, sigma, [1000 * n_spots + s for s in seeds]))
    table = pd.DataFrame(rows)
    print("accuracy_3d: spotfit.fit on simulated z-stacks (RS-FISH-like)")
    print(f"  stacks {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} voxels (z, y, x), {PHOTONS:.0f} photons/spot, "
          f"background {BACKGROUND:.0f} photons/voxel, sigma_z {SIGMA_Z} planes, camera gain 1 (MLE, "
          f"pixel-integrated elliptical 3D model), spots >= 10 px apart laterally, anywhere in z")
    print(f"  {len(seeds)} stack(s) per setting; matching radius 2 px; CRLB of the true model in each "
          f"spot's window (planes outside the stack excluded); os.cpu_count() = {os.cpu_count()}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    ok = (table.recall >= 0.98).all() and (table.precision >= 0.98).all() and \
        (table[[f"rmse/crlb_{a}" for a in "xyz"]] <= 1.5).all().all()
    print(f"  targets (recall, precision >= 0.98; lateral and axial RMSE <= 1.5 x CRLB): "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
