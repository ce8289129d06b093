"""Estimators: each cost's gradient and curvature against numerical derivatives, and what they declare.

The compiled solver gets, per window, the cost ``C`` (:func:`spotfit._kernels._pixel_costs`),
``g = J e`` and ``H = J W J^T`` (:func:`spotfit._kernels._normal_equations`; joint fits:
``_joint_normal_equations``); its Gauss-Newton step is ``H delta = g``.  So ``g`` must be ``-1/2 dC/dtheta`` everywhere, and at
noise-free data (where the residual terms of the exact Hessian vanish) ``H``
must be half the Hessian of ``C`` -- for the Poisson MLE that is the Fisher
information.  Derivatives are central differences with steps of 1e-5
(relative); windows are non-square (9 x 11 px).
"""

import numpy as np
import pytest
from numba import njit
from scipy import stats

from spotfit import _kernels as K
from spotfit.errors import SpotfitInputError
from spotfit.estimators import ESTIMATOR_NAMES, Noise, get_estimator
from spotfit.models import Grid, get_model

GRID = Grid((9, 11))
EMCCD = Noise(calibrated=True, excess=2.0, read_var=4.0)  # exercises the MLE shift and scale
POISSON = Noise(calibrated=True)


def _theta(model):
    theta = model.from_moments(np.array([[5.3, 3.8]]), np.array([[1.3, 1.6]]), np.array([2500.0]),
                               np.array([12.0]))
    if model.name == "rotated":
        theta[0, model.index("cov_xy")] = 0.4
    return theta


@njit
def _accumulate(model_fn, km, cost, s, th, mu, J, scratch, e, W, H, g, WJ, joint):
    """The solver's cost and normal equations of window ``s`` (the kernels have no
    Python wrappers); ``joint``: the joint fits' normal equations."""
    value = K._pixel_costs(model_fn, km, cost, s, th, mu, J, scratch, e, W)
    if joint:
        K._joint_normal_equations(J, e, W, WJ, H, g)
    else:
        K._normal_equations(J, e, W, H, g)
    return value


def _terms(model, estimator, noise, data, theta, joint=False):
    """Cost, g, H of one window as the compiled solver computes them."""
    cost = estimator.cost(data[None], np.ones((1, GRID.size), bool), noise)
    km = model.kernel(GRID)
    k, P = model.n_params, GRID.size
    mu, J, scratch = np.empty(P), np.empty((k, P)), np.empty((9, 11))
    e, W, H, g = np.empty(P), np.empty(P), np.empty((k, k)), np.empty(k)
    value = _accumulate(K.MODEL, km, cost, 0, np.array(theta, float), mu, J, scratch, e, W, H, g,
                        np.empty((k, P)), joint)
    return value, g, H


def _cost(model, estimator, noise, data, theta):
    return _terms(model, estimator, noise, data, theta)[0]


CASES = [(est, name, integrated) for est in ESTIMATOR_NAMES
         for name, integrated in (("symmetric", True), ("rotated", False))]


@pytest.mark.parametrize("estimator,name,integrated", CASES)
def test_gradient_is_half_the_cost_slope(estimator, name, integrated):
    """``g = -1/2 dC/dtheta`` at a point away from the minimum, on noisy data."""
    model = get_model(name, 2, integrated)
    est = get_estimator(estimator)
    truth = _theta(model)[0]
    data = np.random.default_rng(4).poisson(model.value(truth[None], GRID)[0]).astype(float)
    theta = truth * (1 + np.array([0.05, 0.02, -0.03, 0.04, -0.05, 0.1, 0.08][: model.n_params]))
    _, g, _ = _terms(model, est, EMCCD, data, theta)
    for j in range(model.n_params):
        h = 1e-5 * max(abs(theta[j]), 1.0)
        up, down = theta.copy(), theta.copy()
        up[j] += h
        down[j] -= h
        slope = (_cost(model, est, EMCCD, data, up) - _cost(model, est, EMCCD, data, down)) / (2 * h)
        np.testing.assert_allclose(g[j], -0.5 * slope, rtol=1e-5, atol=1e-7 * np.abs(g).max(),
                                   err_msg=f"{estimator}: dC/d{model.param_names[j]}")


@pytest.mark.parametrize("estimator,name,integrated", CASES)
def test_curvature_is_half_the_cost_hessian_at_noise_free_data(estimator, name, integrated):
    """At data equal to the model, ``H = 1/2 d2C/dtheta2`` (the Fisher information for mle)."""
    model = get_model(name, 2, integrated)
    est = get_estimator(estimator)
    theta = _theta(model)[0]
    data = model.value(theta[None], GRID)[0]
    if estimator == "wlsq":  # it fits d + excess * min(d / excess, 1): data it sees as the model
        e = EMCCD.excess
        data = np.where(data >= 2 * e, data - e, data / 2)
        np.testing.assert_allclose(est.cost(data[None], np.ones((1, GRID.size), bool), EMCCD).data[0],
                                   model.value(theta[None], GRID)[0], rtol=1e-12)
    _, _, H = _terms(model, est, EMCCD, data, theta)
    k = model.n_params
    hessian = np.empty((k, k))
    steps = 1e-4 * np.maximum(np.abs(theta), 1.0)
    for i in range(k):
        for j in range(k):
            pp, pm, mp, mm = (theta.copy() for _ in range(4))
            pp[i] += steps[i]; pp[j] += steps[j]  # noqa: E702
            pm[i] += steps[i]; pm[j] -= steps[j]  # noqa: E702
            mp[i] -= steps[i]; mp[j] += steps[j]  # noqa: E702
            mm[i] -= steps[i]; mm[j] -= steps[j]  # noqa: E702
            c = [_cost(model, est, EMCCD, data, t) for t in (pp, pm, mp, mm)]
            hessian[i, j] = (c[0] - c[1] - c[2] + c[3]) / (4 * steps[i] * steps[j])
    scale = np.sqrt(np.outer(np.diag(H), np.diag(H)))
    np.testing.assert_allclose(H / scale, 0.5 * hessian / scale, atol=2e-4)


def test_mle_curvature_is_the_fisher_information_of_its_noise_model():
    """For mle, H = J V^-1 J^T with V = excess * (mu + read_var): the Fisher information of the
    shifted (and, for an EMCCD, scaled) Poisson model it maximises.  Without EM gain that is the
    camera's own V = mu + read_var, so H is the Fisher information behind the Cramer-Rao bound;
    with EM gain the camera's V = 2 mu + read_var differs, which is why the reported covariance
    is the sandwich A^-1 B A^-1 (spotfit.solver.covariance)."""
    model = get_model("symmetric", 2, True)
    theta = _theta(model)
    data = model.value(theta, GRID)[0]
    mu, jac = model.evaluate(theta, GRID)
    for noise in (Noise(calibrated=True, excess=1.0, read_var=4.0), EMCCD):
        _, _, H = _terms(model, get_estimator("mle"), noise, data, theta[0])
        fisher = (jac[0] / (noise.excess * (mu[0] + noise.read_var))) @ jac[0].T
        np.testing.assert_allclose(H, fisher, rtol=1e-9)
    sCMOS = Noise(calibrated=True, excess=1.0, read_var=4.0)
    _, _, H = _terms(model, get_estimator("mle"), sCMOS, data, theta[0])
    np.testing.assert_allclose(H, (jac[0] / sCMOS.variance(mu[0])) @ jac[0].T, rtol=1e-9)


def test_mle_cost_is_the_poisson_deviance():
    """Without read noise or excess, the mle cost is -2 log(L(mu) / L(d)) of Poisson counts."""
    model = get_model("symmetric", 2, True)
    theta = _theta(model)
    mu = model.value(theta, GRID)[0]
    data = np.random.default_rng(7).poisson(mu).astype(float)
    value = _cost(model, get_estimator("mle"), POISSON, data, theta[0])
    deviance = -2 * np.sum(stats.poisson.logpmf(data, mu) - stats.poisson.logpmf(data, data))
    assert value == pytest.approx(deviance, rel=1e-10)


def test_least_squares_costs():
    """lsq: sum of squared residuals; wlsq: Mighell's chi-square-gamma, in counts n = d / excess
    ``(d + excess min(n, 1) - mu)^2 / (excess^2 (n + 1) + read_var)``."""
    model = get_model("symmetric", 2, False)
    theta = _theta(model)
    mu = model.value(theta, GRID)[0]
    data = np.random.default_rng(8).poisson(mu).astype(float)
    assert _cost(model, get_estimator("lsq"), EMCCD, data, theta[0]) == pytest.approx(np.sum((data - mu) ** 2))
    e = EMCCD.excess
    n = data / e
    var = e * e * (n + 1.0) + EMCCD.read_var
    assert _cost(model, get_estimator("wlsq"), EMCCD, data, theta[0]) == pytest.approx(
        np.sum((data + e * np.minimum(n, 1.0) - mu) ** 2 / var))


def test_wlsq_is_unbiased_at_low_counts():
    """A constant background of 2 photons/px (Poisson): Neyman's chi-square (weights
    1 / max(d, 1)) reads it ~30% low, Mighell's chi-square-gamma within 3%."""
    rng = np.random.default_rng(9)
    d = rng.poisson(2.0, 200000).astype(float)
    cost = get_estimator("wlsq").cost(d[None], np.ones((1, d.size), bool), POISSON)
    level = np.sum(cost.weight * cost.data) / np.sum(cost.weight)  # the weighted fit of a constant
    neyman = np.sum(d / np.maximum(d, 1.0)) / np.sum(1.0 / np.maximum(d, 1.0))
    assert abs(level / 2.0 - 1.0) < 0.03 and neyman / 2.0 - 1.0 < -0.2, (level, neyman)


def test_masked_pixels_carry_no_cost():
    model = get_model("symmetric", 2, True)
    theta = _theta(model)
    data = model.value(theta, GRID)
    mask = np.ones(data.shape, bool)
    mask[0, :20] = False
    for name in ESTIMATOR_NAMES:
        cost = get_estimator(name).cost(np.where(mask, data + 50.0, data), mask, EMCCD)
        assert np.all(cost.weight[~mask] == 0)


@pytest.mark.parametrize("name,declared", [
    ("lsq", dict(needs_photons=False, weighted=False, poisson=False, normalised_cost=True,
                 nonnegative_offset=False, bias_correctable=False, kernel_cost=K.LSQ)),
    ("wlsq", dict(needs_photons=True, weighted=True, poisson=False, normalised_cost=False,
                  nonnegative_offset=False, bias_correctable=False, kernel_cost=K.LSQ)),
    ("mle", dict(needs_photons=True, weighted=False, poisson=True, normalised_cost=False,
                 nonnegative_offset=True, bias_correctable=True, kernel_cost=K.MLE)),
])
def test_declared_properties(name, declared):
    est = get_estimator(name)
    for key, value in declared.items():
        assert getattr(est, key) == value, key
    if est.needs_photons:
        with pytest.raises(SpotfitInputError, match=f"^estimator {name} needs photon counts") as info:
            est.check(Noise(calibrated=False))
        assert info.value.parameter == "estimator"
    est.check(POISSON)


def test_unknown_estimator_names_the_parameter():
    with pytest.raises(SpotfitInputError, match="^estimator 'ml' is unknown") as info:
        get_estimator("ml")
    assert info.value.parameter == "estimator"


@pytest.mark.parametrize("estimator,name,integrated", CASES)
def test_joint_normal_equations_equal_the_single_fits(estimator, name, integrated):
    """The joint fits' normal equations (``W J`` formed once) give the single fits' ``g``
    and ``H`` to rounding, for every estimator and model, on noisy data."""
    model = get_model(name, 2, integrated)
    est = get_estimator(estimator)
    theta = _theta(model)[0]
    data = np.random.default_rng(5).poisson(model.value(theta[None], GRID)[0]).astype(float)
    value, g, H = _terms(model, est, EMCCD, data, theta * 1.02)
    value_j, g_j, H_j = _terms(model, est, EMCCD, data, theta * 1.02, joint=True)
    assert value_j == value
    np.testing.assert_allclose(g_j, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    np.testing.assert_allclose(H_j, H, rtol=1e-12, atol=1e-12 * np.abs(H).max())
