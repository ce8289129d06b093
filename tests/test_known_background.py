"""Single fits on a background that is not flat across their window (spotfit.single._over_background).

A spot 3 px from a cell's or nucleus' edge sits on a step of background; a
Gaussian plus a constant offset leans towards the bright side.  The fits
that misfit are tried again with the detection's local background as known
light; they are scored here against the simulated truth.
"""

import numpy as np
import pytest
from scipy import ndimage

import spotfit
from spotfit import roi, single
from spotfit.match import match_spots
from spotfit.simulation import render

NY, NX, EDGE = 72, 100, 50  # non-square; the step is at x = 49.5
CAMERA = spotfit.Camera(baseline=100.0, gain=1.0, read_noise=1.5)
SIGMA, PHOTONS = 1.3, 2500.0


def _edge_scene(rng):
    """Background 15 -> 90 photons/px across a vertical step; spots 3 px either side of it."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    bg = 15.0 + 75.0 * ndimage.gaussian_filter((xx >= EDGE).astype(float), 0.7)
    ys = np.arange(6.0, NY - 5, 7.0)
    ys = ys + rng.uniform(-0.5, 0.5, len(ys))
    xs = np.where(np.arange(len(ys)) % 2 == 0, EDGE - 3.0, EDGE + 3.0) + rng.uniform(-0.5, 0.5, len(ys))
    return bg, np.column_stack([xs, ys])


def _fit_edge(rng, n_images=3, camera=CAMERA):
    """Errors (dx, dy), side of the edge (-1 dark, +1 bright), offset - true background; recall."""
    bg, truth = _edge_scene(rng)
    mu = render((NY, NX), truth[:, 0], truth[:, 1], PHOTONS, SIGMA, background=bg)
    out, found = [], 0
    for _ in range(n_images):
        img = (100.0 + rng.poisson(mu) + rng.normal(0.0, 1.5, mu.shape)).astype(np.float32)
        t = spotfit.fit(img, camera=camera, sigma=SIGMA)
        t = t[t.status == "converged"]
        i_f, i_t = match_spots(t[["x", "y"]].to_numpy(), truth, 1.5)
        found += len(i_t)
        e = t[["x", "y"]].to_numpy()[i_f] - truth[i_t]
        under = bg[np.rint(truth[i_t, 1]).astype(int), np.rint(truth[i_t, 0]).astype(int)]
        out.append(np.column_stack([e, np.sign(truth[i_t, 0] - EDGE + 0.5),
                                    t["offset"].to_numpy()[i_f] - under]))
    return np.concatenate(out), found / (n_images * len(truth))


@pytest.mark.parametrize("camera", [CAMERA, spotfit.Camera(baseline=100.0)], ids=["photons", "adu"])
def test_spots_beside_a_step_of_background_are_not_pulled_towards_it(camera):
    errors, recall = _fit_edge(np.random.default_rng(3), camera=camera)
    assert recall >= 0.97  # every spot is found and converged (constant offset only: ~0.8)
    for side in (-1, 1):
        dx = errors[errors[:, 2] == side, 0]
        # the constant-offset fit is pulled ~0.8-1 px towards the bright side from the dark one
        assert abs(dx.mean()) < 0.2, (side, dx.mean())  # px
    assert np.sqrt(np.mean(errors[:, 0] ** 2)) < 0.2  # px, across the edge
    assert np.sqrt(np.mean(errors[:, 1] ** 2)) < 0.1  # px, along it (CRLB ~0.04 px)
    # offset: the background under the spot (within the map's smoothing of the step)
    assert abs(np.median(errors[:, 3])) < 15.0  # photons/px, on a 75 photons/px step


def test_without_the_known_background_the_same_spots_are_biased(monkeypatch):
    # what the refit corrects: the same scene with it switched off
    monkeypatch.setattr(single, "_over_background", lambda setup, batch, *cols: cols[:5])
    errors, recall = _fit_edge(np.random.default_rng(3))
    dark = errors[errors[:, 2] == -1, 0]
    assert dark.mean() > 0.4 or recall < 0.9  # px towards the bright side, or spots lost


def test_window_background_matches_the_detection_background():
    rng = np.random.default_rng(5)
    bg, truth = _edge_scene(rng)
    mu = render((NY, NX), truth[:, 0], truth[:, 1], PHOTONS, SIGMA, background=bg)
    photons = (rng.poisson(mu) + rng.normal(0.0, 1.5, mu.shape)).astype(np.float32)
    from spotfit.background import NoiseModel, local_background
    from spotfit.config import FitConfig, Setup
    from spotfit.detection import find_peaks

    noise = NoiseModel.from_camera(CAMERA)
    pieces = []
    coords, _ = find_peaks(photons, SIGMA, noise=noise, backgrounds=pieces)
    assert len(pieces) == 1 and len(coords) >= len(truth)
    setup = Setup.resolve(FitConfig(sigma=SIGMA), CAMERA, 2)
    batch = single.cut_frame(setup, 0, photons, coords, 0.0, background=pieces)
    got = single.window_background(batch, np.arange(len(batch)))
    full = local_background(photons, SIGMA, noise)
    ref = roi.cut(full, coords, setup.half).data
    inside = batch.windows.mask
    np.testing.assert_allclose(got[inside], ref[inside], rtol=1e-5, atol=1e-3)


def test_spots_crowding_a_narrow_bright_band():
    # where spots cover a structure, the background map fills in from its edges;
    # the refit must not make such spots worse than the constant-offset fit
    rng = np.random.default_rng(1)
    ny, nx = 120, 300
    yy = np.mgrid[0:ny, 0:nx][0]
    bg = 10.0 + 140.0 * ndimage.gaussian_filter(((yy >= 54) & (yy < 66)).astype(float), 1.0)
    xs = np.arange(5.0, nx - 5, 6.0)
    xs = xs + rng.uniform(-1.0, 1.0, len(xs))
    ys = 60.0 + rng.uniform(-4.0, 4.0, len(xs))
    truth = np.column_stack([xs, ys])
    mu = render((ny, nx), xs, ys, rng.uniform(2000.0, 5000.0, len(xs)), SIGMA, background=bg)
    errors, found = [], 0
    for _ in range(2):
        img = (100.0 + rng.poisson(mu) + rng.normal(0.0, 1.5, mu.shape)).astype(np.float32)
        t = spotfit.fit(img, camera=CAMERA, sigma=SIGMA)
        t = t[t["status"] == "converged"]
        i_f, i_t = match_spots(t[["x", "y"]].to_numpy(), truth, 1.5)
        found += len(i_t)
        errors.append(t[["x", "y"]].to_numpy()[i_f] - truth[i_t])
    errors = np.concatenate(errors)
    assert found >= 0.95 * 2 * len(truth)  # constant offset only: ~0.6 (spots lost as misfits)
    assert np.sqrt(np.mean(errors ** 2)) < 0.1  # px (constant offset only: 0.115)
    assert abs(errors[:, 1].mean()) < 0.05  # px, across the band
