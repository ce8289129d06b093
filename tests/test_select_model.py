"""Honest errors at low signal: the model chosen per spot, errors at the bias-corrected estimate.

Windows are simulated directly (the true model, Poisson noise, seeded) on a
non-square 9 x 11 px grid, tiled into one mosaic and fitted with
:func:`spotfit.fit_spots` at the tile centres, so each fit window is one
simulated window.  ``obs/rep`` is the observed RMS error over the RMS of the
reported errors (1 when the errors are honest); positions in px.
"""

import math
import warnings

import numpy as np
import pytest

import spotfit
from spotfit import solver
from spotfit.estimators import Noise, get_estimator
from spotfit.models import Grid, get_model

CAMERA = spotfit.Camera(baseline=0.0, gain=1.0)  # data are photons
GRID = Grid((9, 11))
POISSON = Noise(calibrated=True)


def _windows(rng, n, photons, background, widths=(1.3, 1.3), angle=0.0):
    """True parameters (rotated form) and Poisson windows of spots near the window centre."""
    model = get_model("rotated", 2, integrated=True, sigma=min(widths))
    centre = np.column_stack([5.0 + rng.uniform(-0.5, 0.5, n), 4.0 + rng.uniform(-0.5, 0.5, n)])
    theta = model.from_moments(centre, np.tile(widths, (n, 1)), np.full(n, float(photons)),
                               np.full(n, float(background)))
    c, s = math.cos(angle), math.sin(angle)
    sx2, sy2 = widths[0] ** 2, widths[1] ** 2
    theta[:, model.index("var_xx")] = sx2 * c * c + sy2 * s * s
    theta[:, model.index("var_yy")] = sx2 * s * s + sy2 * c * c
    theta[:, model.index("cov_xy")] = (sx2 - sy2) * s * c
    data = rng.poisson(model.value(theta, GRID)).astype(float)
    return theta, data


def _fit(data, **options):
    """fit_spots on a mosaic of the windows; positions relative to each window."""
    n = len(data)
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    ny, nx = GRID.shape
    image = np.zeros((nrow * ny, ncol * nx))
    row, col = np.divmod(np.arange(n), ncol)
    image.reshape(nrow, ny, ncol, nx)[row, :, col, :] = data.reshape(n, ny, nx)
    origin = np.column_stack([col * nx, row * ny]).astype(float)
    with warnings.catch_warnings():  # the mosaic's empty slots: zeros beside the windows' data
        warnings.filterwarnings("ignore", "frame 0: .* left out as no data", spotfit.SpotfitWarning)
        table = spotfit.fit_spots(image, origin + [5, 4], camera=CAMERA, sigma=1.3, window=4, **options)
    table["dx"] = table.x - origin[:, 0]
    table["dy"] = table.y - origin[:, 1]
    return table


def _obs_rep(table, theta):
    ok = (table.status == "converged").to_numpy()
    ex = table.dx.to_numpy()[ok] - theta[ok, 1]
    return np.sqrt(np.mean(ex**2)) / np.sqrt(np.mean(table.x_err.to_numpy()[ok] ** 2)), np.sqrt(np.mean(ex**2))


def test_faint_round_spots_get_the_symmetric_model_and_honest_errors():
    """300 photons over 50 photons/px: round spots are reported symmetric (about 1% rotated, the
    BIC level), as precise as a symmetric fit, with x_err within 10% of the scatter."""
    rng = np.random.default_rng(1)
    theta, data = _windows(rng, 4000, 300, 50)
    chosen = _fit(data)
    rotated = _fit(data, select_model=False)
    symmetric = _fit(data, model="symmetric")
    share = (chosen.angle != 0).mean()
    assert 0.002 < share < 0.03, share
    ratio, rmse = _obs_rep(chosen, theta)
    assert 0.9 <= ratio <= 1.1, ratio
    _, rmse_sym = _obs_rep(symmetric, theta)
    _, rmse_rot = _obs_rep(rotated, theta)
    assert rmse <= 1.01 * rmse_sym < rmse_rot, (rmse, rmse_sym, rmse_rot)


def test_elongated_spots_keep_the_rotated_model():
    """Spots of sigma 1.1 x 1.9 px at 0.5 rad: the rotated model for (nearly) all of them."""
    rng = np.random.default_rng(2)
    theta, data = _windows(rng, 500, 3000, 10, widths=(1.1, 1.9), angle=0.5)
    table = _fit(data)
    assert (table.angle != 0).mean() >= 0.99
    assert np.median(table.sigma_x) == pytest.approx(1.1, abs=0.03)
    assert np.median(table.sigma_y) == pytest.approx(1.9, abs=0.05)
    assert np.median(table.angle) == pytest.approx(0.5, abs=0.03)


def test_no_select_model_fits_every_spot_with_the_model():
    rng = np.random.default_rng(3)
    _, data = _windows(rng, 200, 2000, 10)
    table = _fit(data, select_model=False)
    assert (table.angle != 0).all() and (table.sigma_x != table.sigma_y).all()


def test_score_statistic_is_chi_square_for_round_spots():
    """Under the symmetric model the score statistic for the rotated one (2 extra widths) is
    chi-square with 2 degrees of freedom: P(T > 5.99) = 5%, P(T > 9.21) = 1%."""
    rng = np.random.default_rng(4)
    theta, data = _windows(rng, 6000, 2000, 10)
    sym = get_model("symmetric", 2, integrated=True, sigma=1.3)
    rot = get_model("rotated", 2, integrated=True, sigma=1.3)
    est = get_estimator("mle")
    mask = np.ones(data.shape, bool)
    start = sym.from_moments(theta[:, 1:3], np.full((len(data), 2), 1.3), theta[:, 0], theta[:, -1])
    sol = solver.solve(sym, est, data, mask, GRID, start, noise=POISSON, bias_correct=False)

    def embed(t):
        return rot.from_moments(t[:, 1:3], np.column_stack([t[:, 3], t[:, 3]]), t[:, 0], t[:, 4])

    score = solver.score_test(rot, est, data, mask, GRID, sol.theta, embed, noise=POISSON)
    assert np.isfinite(score).all()
    assert 0.04 < np.mean(score > 5.991) < 0.06
    assert 0.006 < np.mean(score > 9.210) < 0.015
    # elongated spots: the same statistic is large
    theta, data = _windows(rng, 300, 2000, 10, widths=(1.1, 1.6), angle=0.3)
    start = sym.from_moments(theta[:, 1:3], np.full((len(data), 2), 1.3), theta[:, 0], theta[:, -1])
    sol = solver.solve(sym, est, data, mask[:300], GRID, start, noise=POISSON, bias_correct=False)
    assert np.median(solver.score_test(rot, est, data, mask[:300], GRID, sol.theta, embed, noise=POISSON)) > 50


def test_errors_are_evaluated_at_the_bias_corrected_estimate():
    """The covariance reported with a bias-corrected MLE is the bound at the corrected values."""
    rng = np.random.default_rng(5)
    theta, data = _windows(rng, 300, 500, 100)
    sym = get_model("symmetric", 2, integrated=True, sigma=1.3)
    est = get_estimator("mle")
    mask = np.ones(data.shape, bool)
    start = sym.from_moments(theta[:, 1:3], np.full((len(data), 2), 1.3), theta[:, 0], theta[:, -1])
    lower, upper = sym.bounds(GRID)
    lower[-1] = 0.0
    sol = solver.solve(sym, est, data, mask, GRID, start, noise=POISSON, lower=lower, upper=upper)
    corrected = np.any(sol.bias != 0, axis=1)
    assert corrected.mean() > 0.5
    cost = est.cost(data, mask, POISSON)
    at_fit, _, _, _ = solver.covariance(sym, cost, data, sol.theta, GRID, POISSON, np.ones(5, bool))
    plain, _, _, _ = solver.covariance(sym, cost, data, sol.theta + sol.bias, GRID, POISSON,
                                       np.ones(5, bool))
    np.testing.assert_allclose(sol.cov[corrected], at_fit[corrected], rtol=1e-9)
    # the plain MLE is wider and brighter: its bound on x is smaller by a few percent
    ratio = np.sqrt(plain[corrected, 1, 1] / at_fit[corrected, 1, 1])
    assert 0.93 < np.median(ratio) < 0.999
