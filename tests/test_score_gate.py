"""The gate in front of the model-selection score test (``single._quadrupole_score``).

A single-spot fit gets the richer (rotated) model when the score test says
its extra widths are significant; the test runs only where the cheap
quadrupole score leaves a doubt.  These tests check, on seeded simulations
with known truth, that the gate never keeps an elongated spot, a close pair
or a spot with a neighbour in its tail from the test, and that tables are the
same as with the test run everywhere.
"""

import numpy as np
import pytest

import spotfit
from spotfit import single, solver
from spotfit.config import Setup, make_config
from spotfit.simulation import render

CAMERA = spotfit.Camera(baseline=100.0, gain=1.0)


def _everywhere(monkeypatch):
    monkeypatch.setattr(single, "SCORE_GATE", -1.0)  # every window to the score test


def _scores(image, xy, camera):
    """Exact score statistic, quadrupole score, threshold and the gate's verdict
    (:func:`spotfit.single._doubtful`) for the symmetric fits of windows at ``xy`` (the
    single-spot path's own windows and fits)."""
    config = make_config(None, {"sigma": 1.3})
    setup = Setup.resolve(config, camera, 2)
    reduced = single._reduced(setup)
    photons = camera.to_photons(image)
    coords = np.rint(np.asarray(xy)[:, ::-1]).astype(np.int64)
    from spotfit.start import image_noise

    batch = single.cut_frame(setup, 0, photons, coords, image_noise(photons) if not camera.calibrated else 0.0)
    sol = single._solve(reduced, batch)
    w = batch.windows
    n_valid = w.mask.sum(axis=1)
    residual_var = None
    if setup.estimator.normalised_cost:
        residual_var = sol.cost / np.maximum(n_valid - reduced.model.n_params, 1)
    theta = sol.theta + sol.bias
    exact = solver.score_test(setup.model, setup.estimator, w.data, w.mask, w.grid, theta,
                              single._embedding(reduced.model, setup.model), noise=setup.noise(w.read_var),
                              residual_var=residual_var)
    quad = single._quadrupole_score(setup, reduced, batch, theta, residual_var)
    limit = (setup.model.n_params - reduced.model.n_params) * np.log(np.maximum(n_valid, 2))
    return exact, quad, limit, single._doubtful(setup, reduced, batch, theta, limit, residual_var)


@pytest.mark.parametrize("camera", [CAMERA, spotfit.Camera()], ids=["mle", "lsq"])
def test_gate_sends_every_significantly_elongated_spot_to_the_score_test(camera):
    """Spots from round to 1.3 x 1.7 px at random angles, 300-3000 photons: every window
    whose score test is significant passes the gate, and the quadrupole score tracks the
    score statistic (median ratio within 10%)."""
    rng = np.random.default_rng(21)
    found = []
    for sy in (1.3, 1.4, 1.5, 1.7):
        image, truth = spotfit.simulate((260, 330), n_spots=150, photons=(300, 3000), background=20,
                                        sigma_x=1.3, sigma_y=sy, angle="random", camera=CAMERA,
                                        min_separation=14, seed=rng)
        found.append(_scores(image, truth[["x", "y"]].to_numpy(), camera))
    exact, quad, limit, gated = (np.concatenate(a) for a in zip(*found))
    significant = ~(exact <= limit)
    assert significant.sum() > 150  # the elongated ones
    assert gated[significant].all()
    assert np.median(exact[significant] / quad[significant]) == pytest.approx(1.0, abs=0.1)
    # round spots: many are left out of the test (that is the point of the gate)
    assert gated[:150].mean() < 0.6


def test_gate_sends_close_pairs_and_tail_neighbours_to_the_score_test():
    """Two emitters 1.0-2.0 px apart (one candidate: an elongated blob) and a faint emitter
    2.5-3.5 px out in a bright one's tail: the gate sends (nearly) all to the score test,
    and every one the test finds significant."""
    rng = np.random.default_rng(22)
    n = 160
    centres = np.column_stack([rng.uniform(10, 310, n), rng.uniform(10, 250, n)])
    centres = centres[np.argsort(centres[:, 0])]
    # keep 20 px between pair centres
    keep = [0]
    for i in range(1, n):
        if np.min(np.hypot(*(centres[keep] - centres[i]).T)) > 20:
            keep.append(i)
    centres = centres[keep]
    m = len(centres)
    angle = rng.uniform(0, np.pi, m)
    dist = np.where(np.arange(m) % 2 == 0, rng.uniform(1.0, 2.0, m), rng.uniform(2.5, 3.5, m))
    second = centres + dist[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    photons = np.column_stack([rng.uniform(2000, 3000, m),
                               np.where(np.arange(m) % 2 == 0, rng.uniform(1500, 3000, m), rng.uniform(400, 800, m))])
    positions = np.concatenate([centres, second])
    mu = render((260, 330), positions[:, 0], positions[:, 1], photons.T.ravel(), 1.3, background=20.0)
    image = rng.poisson(mu) + 100.0  # camera: baseline 100 ADU, gain 1
    exact, quad, limit, gated = _scores(image, centres, CAMERA)
    significant = ~(exact <= limit)
    assert gated[significant].all()
    pairs = np.arange(m) % 2 == 0
    assert gated[pairs].mean() >= 0.95
    assert significant[pairs].mean() >= 0.9


def test_gated_tables_equal_the_score_test_everywhere(monkeypatch):
    """A sparse image of round and elongated spots with neighbours closer than a window:
    the same table with the gate as with the score test run on every window."""
    rng = np.random.default_rng(23)
    parts = []
    for sy in (1.3, 1.6):
        img, _ = spotfit.simulate((200, 250), n_spots=120, photons=(500, 3000), background=20,
                                  sigma_x=1.3, sigma_y=sy, angle="random", camera=CAMERA,
                                  min_separation=5, seed=rng)
        parts.append(img)
    image = np.concatenate(parts, axis=0)
    for camera in (CAMERA, spotfit.Camera()):
        gated = spotfit.fit(image, camera=camera, sigma=1.3)
        with monkeypatch.context() as m:
            _everywhere(m)
            full = spotfit.fit(image, camera=camera, sigma=1.3)
        assert len(gated) == len(full) > 200
        assert (gated.angle != 0).sum() >= 10  # elongated spots got the rotated model
        np.testing.assert_array_equal(gated.status.to_numpy(), full.status.to_numpy())
        for col in ("x", "y", "intensity", "sigma_x", "sigma_y", "angle"):
            np.testing.assert_allclose(gated[col].to_numpy(), full[col].to_numpy(), rtol=0, atol=1e-9)
