"""3D fitting of z-stacks (RS-FISH-like simulations: 256 x 256 x 32 voxels, sigma_z 2 px).

Spots are placed at random, at least 10 px apart laterally (isolated; crowded
fields are a separate problem), anywhere in z including the first and last
planes.  Matching radius 2 px.  The Cramer-Rao bound is that of the true
model (pixel-integrated symmetric 3D Gaussian) in each spot's own window,
planes outside the stack excluded.
"""

import numpy as np
import pytest

import spotfit
from spotfit import solver
from spotfit.camera import Camera
from spotfit.estimators import Noise
from spotfit.match import match_spots
from spotfit.models import Grid, get_model

CAMERA = Camera(baseline=100.0, gain=1.0)
SHAPE = (32, 256, 256)  # z, y, x


def _crlb(truth, sigma, sigma_z, background, nz):
    model = get_model("symmetric", 3, integrated=True)
    h = 5
    grid = Grid((2 * h + 1,) * 3)
    centre = np.rint(truth[["x", "y", "z"]].to_numpy())
    rel = truth[["x", "y", "z"]].to_numpy() - centre + h
    n = len(truth)
    theta = np.column_stack([truth.intensity, rel, np.full(n, sigma), np.full(n, sigma_z), np.full(n, background)])
    planes = centre[:, 2:3] - h + np.arange(2 * h + 1)[None, :]  # (n, nz_window)
    valid_z = (planes >= 0) & (planes < nz)
    mask = np.repeat(valid_z[:, :, None], (2 * h + 1) ** 2, axis=2).reshape(n, -1)
    return solver.crlb(model, theta, grid, Noise(calibrated=True), mask=mask)


@pytest.mark.parametrize("n_spots,sigma", [(30, 1.5), (300, 2.0)])
def test_z_stack_accuracy(n_spots, sigma):
    sigma_z, background = 2.0, 10.0
    img, truth = spotfit.simulate(SHAPE, n_spots=n_spots, photons=1500, background=background, sigma=sigma,
                                  sigma_z=sigma_z, z_stack=True, camera=CAMERA, min_separation=10,
                                  seed=n_spots)
    found = spotfit.fit(img, camera=CAMERA, axes="ZYX", sigma=sigma, sigma_z=sigma_z)
    assert {"z", "sigma_z", "z_err"} <= set(found.columns)
    i_f, i_t = match_spots(found[["x", "y", "z"]].to_numpy(), truth[["x", "y", "z"]].to_numpy(), 2.0)
    assert len(i_t) >= 0.98 * len(truth)  # recall
    assert len(i_f) >= 0.98 * len(found)  # precision
    matched = truth.iloc[i_t]
    crlb = _crlb(matched, sigma, sigma_z, background, SHAPE[0])
    for col, j in (("x", 1), ("y", 2), ("z", 3)):
        err = found[col].to_numpy()[i_f] - matched[col].to_numpy()
        rmse = np.sqrt(np.mean(err**2))
        bound = np.sqrt(np.mean(crlb[:, j] ** 2))
        assert rmse <= 1.5 * bound, (col, rmse, bound)
    # spots on the first and last planes are found and fitted inside the stack
    edge = (truth.z < 1.0) | (truth.z > SHAPE[0] - 2.0)
    if edge.any():
        assert np.isin(np.flatnonzero(edge), i_t).all()
    assert found.z.between(-0.5, SHAPE[0] - 0.5).all()


def test_z_stack_reported_errors_match_scatter():
    """z_err agrees with the observed axial scatter within 15% (bright spots, away from the ends)."""
    img, truth = spotfit.simulate((24, 200, 230), n_spots=150, photons=4000, background=10, sigma=1.5,
                                  sigma_z=2.0, z_stack=True, camera=CAMERA, min_separation=11, border=7,
                                  seed=3)
    found = spotfit.fit(img, camera=CAMERA, axes="ZYX", sigma=1.5, sigma_z=2.0)
    i_f, i_t = match_spots(found[["x", "y", "z"]].to_numpy(), truth[["x", "y", "z"]].to_numpy(), 2.0)
    inner = truth.z.to_numpy()[i_t]
    keep = (inner > 6) & (inner < 17)
    err = found.z.to_numpy()[i_f][keep] - inner[keep]
    reported = np.sqrt(np.mean(found.z_err.to_numpy()[i_f][keep] ** 2))
    assert reported == pytest.approx(np.sqrt(np.mean(err**2)), rel=0.15)
