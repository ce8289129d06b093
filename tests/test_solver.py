"""Batched solver: accuracy against truth, reported errors against observed scatter, statuses.

Data are generated from the pixel-integrated model itself (exact erf
integrals), with Poisson noise, in photons.  Windows are non-square (9 x 11)
so x/y mix-ups show.
"""

import numpy as np
import pytest

from spotfit import solver
from spotfit.estimators import Noise, get_estimator
from spotfit.fitting import FitConfig, initial_guess
from spotfit.models import Grid, get_model

GRID = Grid((9, 11))  # (ny, nx)
POISSON = Noise(calibrated=True, excess=1.0, read_var=0.0)


def _spots(rng, n, photons, background, sigma=1.3):
    truth_model = get_model("symmetric", 2, integrated=True)
    centre = np.array([5.0, 4.0]) + rng.uniform(-0.5, 0.5, (n, 2))  # x, y
    theta = truth_model.from_moments(centre, np.full((n, 2), sigma), np.full(n, float(photons)), np.full(n, float(background)))
    mu = truth_model.value(theta, GRID)
    return rng.poisson(mu).astype(float), theta


def _fit(data, model, estimator, noise=POISSON, fix_sigma=False, sigma=1.3):
    cfg = FitConfig(sigma=sigma, fix_sigma=fix_sigma)
    mask = np.ones(data.shape, bool)
    theta0 = initial_guess(model, data, mask, GRID, cfg)
    lower, upper = model.bounds(GRID)
    widths = np.isin(model.param_names, model.width_names)
    free = ~widths if fix_sigma else np.ones(model.n_params, bool)
    return solver.solve(model, get_estimator(estimator), data, mask, GRID, theta0, noise=noise,
                        lower=lower, upper=upper, free=free, hold_first=None if fix_sigma else widths)


def _crlb_x(theta_true, integrated=True):
    """sqrt of the Cramer-Rao bound of x for each true spot (Poisson, symmetric model)."""
    m = get_model("symmetric", 2, integrated)
    mu, jac = m.evaluate(theta_true, GRID)
    fisher = np.einsum("nkp,nlp->nkl", jac / mu[:, None, :], jac)
    return np.sqrt(np.linalg.inv(fisher)[:, 1, 1])


@pytest.mark.parametrize("estimator,max_ratio", [("mle", 1.05), ("wlsq", 1.15), ("lsq", 1.4)])
def test_position_precision_against_cramer_rao(estimator, max_ratio):
    """Bright isolated spots: RMSE / sqrt(CRLB) per estimator; |bias| < 0.01 px; photons within 2%."""
    rng = np.random.default_rng(1)
    data, truth = _spots(rng, 4000, photons=2000, background=10)
    sol = _fit(data, get_model("symmetric", 2, True), estimator)
    assert np.all(sol.status == solver.CONVERGED)
    for axis in (1, 2):  # x, y
        err = sol.theta[:, axis] - truth[:, axis]
        crlb = _crlb_x(truth) if axis == 1 else _crlb_x(truth[:, [0, 2, 1, 3, 4]])
        ratio = np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(crlb**2))
        assert ratio <= max_ratio, (axis, ratio)
        assert abs(err.mean()) < 0.01  # px
    photon_bias = np.mean(sol.theta[:, 0] / truth[:, 0]) - 1
    assert abs(photon_bias) < 0.02


def test_faint_spots_mle_near_cramer_rao():
    """300 photons over 50 photons/px: MLE RMSE / sqrt(CRLB) <= 1.10 in x and y."""
    rng = np.random.default_rng(30)
    data, truth = _spots(rng, 6000, photons=300, background=50)
    sol = _fit(data, get_model("symmetric", 2, True), "mle")
    ok = sol.status == solver.CONVERGED
    assert ok.mean() > 0.99
    for axis in (1, 2):
        err = sol.theta[:, axis] - truth[:, axis]
        crlb = _crlb_x(truth) if axis == 1 else _crlb_x(truth[:, [0, 2, 1, 3, 4]])
        assert np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(crlb**2)) <= 1.10


@pytest.mark.parametrize("estimator", ["mle", "lsq"])
@pytest.mark.parametrize("photons,background", [(500, 10), (5000, 10), (2000, 50)])
def test_reported_error_matches_observed_scatter(estimator, photons, background):
    """x_err (from the covariance) matches the observed RMS error within 10%."""
    rng = np.random.default_rng(photons + background)
    data, truth = _spots(rng, 3000, photons=photons, background=background)
    sol = _fit(data, get_model("elliptical", 2, True), estimator)
    ok = sol.status == solver.CONVERGED
    assert ok.mean() > 0.99
    for axis in (1, 2):
        observed = np.sqrt(np.mean((sol.theta[ok, axis] - truth[ok, axis]) ** 2))
        reported = np.sqrt(np.mean(sol.err[ok, axis] ** 2))
        assert reported == pytest.approx(observed, rel=0.10)
    observed_n = np.std(sol.theta[ok, 0] - truth[ok, 0])
    reported_n = np.sqrt(np.mean(sol.err[ok, 0] ** 2))
    assert reported_n == pytest.approx(observed_n, rel=0.10)


def test_uncalibrated_least_squares_errors_use_residual_variance():
    """Without a camera (ADU, unknown gain) errors still match the scatter within 10%."""
    rng = np.random.default_rng(7)
    data, truth = _spots(rng, 3000, photons=3000, background=20)
    adu = data * 3.0 + 0.0  # gain 1/3 photoelectron per ADU
    sol = _fit(adu, get_model("symmetric", 2, False), "lsq", noise=Noise(calibrated=False, read_var=60.0 * 9))
    observed = np.sqrt(np.mean((sol.theta[:, 1] - truth[:, 1]) ** 2))
    reported = np.sqrt(np.mean(sol.err[:, 1] ** 2))
    assert reported == pytest.approx(observed, rel=0.10)


def test_rotated_elongated_spots_recover_widths_and_angle():
    """Elongated spots at random angles: sigma_x, sigma_y within 0.03 px, angle RMS error < 0.03 rad."""
    rng = np.random.default_rng(3)
    model = get_model("rotated", 2, integrated=True)
    n = 400
    angle = rng.uniform(-0.7, 0.7, n)
    c, s = np.cos(angle), np.sin(angle)
    sx, sy = 1.1, 2.0
    theta = np.column_stack([
        np.full(n, 20000.0), 5 + rng.uniform(-0.5, 0.5, n), 4 + rng.uniform(-0.5, 0.5, n),
        sx**2 * c * c + sy**2 * s * s, sx**2 * s * s + sy**2 * c * c, (sx**2 - sy**2) * c * s,
        np.full(n, 5.0),
    ])
    data = rng.poisson(model.value(theta, GRID)).astype(float)
    sol = _fit(data, model, "mle", sigma=1.5)
    ok = sol.status == solver.CONVERGED
    assert ok.mean() > 0.98
    _, fitted, pcov = model.public(sol.theta, sol.cov)
    np.testing.assert_allclose(np.median(fitted[ok, 3]), sx, atol=0.03)  # px
    np.testing.assert_allclose(np.median(fitted[ok, 4]), sy, atol=0.03)  # px
    dang = fitted[ok, 5] - angle[ok]
    assert np.sqrt(np.mean(dang**2)) < 0.03  # rad
    reported = np.sqrt(np.mean(pcov[ok, 5, 5]))
    assert reported == pytest.approx(np.sqrt(np.mean(dang**2)), rel=0.15)


def test_round_faint_spots_converge_with_rotated_model():
    """The rotated model has no singularity for round spots: faint fits converge."""
    rng = np.random.default_rng(8)
    data, truth = _spots(rng, 2000, photons=300, background=50)
    sol = _fit(data, get_model("rotated", 2, True), "mle")
    assert np.mean(sol.status == solver.CONVERGED) > 0.99
    assert np.median(sol.iterations) <= 16  # two passes: widths held, then free


def test_fix_sigma_holds_width_and_removes_its_error():
    rng = np.random.default_rng(5)
    data, truth = _spots(rng, 200, photons=1000, background=10)
    sol = _fit(data, get_model("symmetric", 2, True), "mle", fix_sigma=True, sigma=1.3)
    assert np.all(sol.theta[:, 3] == 1.3)
    assert np.all(sol.err[:, 3] == 0.0)
    assert np.all(np.isfinite(sol.err[:, 1]))


def test_empty_window_is_flagged_not_raised():
    """A window of constant zeros cannot be fitted: status singular or low signal, no exception."""
    data = np.zeros((3, GRID.size))
    data[1] = 5.0
    sol = _fit(data, get_model("rotated", 2, False), "lsq")
    assert sol.theta.shape == (3, 7)
    assert np.all(sol.status != solver.CONVERGED) or np.all(np.isfinite(sol.theta))


def test_no_windows():
    sol = _fit(np.zeros((0, GRID.size)), get_model("rotated", 2, False), "lsq")
    assert sol.theta.shape == (0, 7) and sol.status.shape == (0,)


def test_masked_pixels_are_ignored():
    """Garbage in masked pixels does not change the fit (border-truncated windows)."""
    rng = np.random.default_rng(9)
    data, truth = _spots(rng, 50, photons=2000, background=10)
    model, est = get_model("symmetric", 2, True), get_estimator("mle")
    mask = np.ones(data.shape, bool).reshape(-1, 9, 11)
    mask[:, :, :2] = False
    mask = mask.reshape(len(data), -1)
    cfg = FitConfig()
    lo, hi = model.bounds(GRID)
    theta0 = initial_guess(model, np.where(mask, data, 0), mask, GRID, cfg)
    a = solver.solve(model, est, np.where(mask, data, 0.0), mask, GRID, theta0, POISSON, lo, hi)
    b = solver.solve(model, est, np.where(mask, data, 1e6), mask, GRID, theta0, POISSON, lo, hi)
    np.testing.assert_allclose(a.theta, b.theta)
