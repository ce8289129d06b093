"""The joint fits' kernels (``_kernels.boxed_window``, boxed fits of
``levenberg_marquardt``) against the single-spot kernels they replace.

They promise the same numbers, bit for bit: the several-emitter model through a faster
loop, and the model evaluated only over the box of a window's unmasked pixels.  Windows
are non-square (and z-stacks of three different sizes) so that axis mix-ups show;
data are simulated from known emitters with Poisson noise (seeded).
"""

import numpy as np
import pytest

from spotfit import _kernels as K
from spotfit import solver
from spotfit.estimators import Noise, get_estimator
from spotfit.models import Grid, get_model
from spotfit.models.gaussian import MultiGaussian

POISSON = Noise(calibrated=True, excess=1.0, read_var=0.0)


def _theta(rng, model, shape, n, sigma=1.2):
    """Random emitters inside a window of ``shape`` (array order), ``(n, k)``."""
    nd = len(shape)
    th = np.zeros((n, model.n_params))
    for i in range(model.n_emitters):
        th[:, model.emitter_index(i, "intensity")] = rng.uniform(300.0, 3000.0, n)
        for j, axis in enumerate(("x", "y", "z")[:nd]):
            th[:, model.emitter_index(i, axis)] = rng.uniform(0.5, shape[::-1][j] - 1.5, n)
    th[:, model.index("sigma")] = rng.uniform(0.8, 1.8, n) * sigma
    if nd == 3:
        th[:, model.index("sigma_z")] = rng.uniform(1.5, 2.5, n)
    th[:, model.offset_index] = rng.uniform(0.0, 30.0, n)
    return th


def _evaluate(fn, km, theta, P):
    mu = np.full((len(theta), P), np.nan)
    J = np.full((len(theta), theta.shape[1], P), np.nan)
    K.evaluate(fn, km, np.ascontiguousarray(theta), mu, J, 0, len(theta))
    return mu, J


@pytest.mark.parametrize("shape", [(11, 16), (6, 9, 13)])
@pytest.mark.parametrize("integrated", [True, False])
@pytest.mark.parametrize("n_emitters", [2, 5])
def test_joint_model_is_the_single_spot_model_bit_for_bit(shape, integrated, n_emitters):
    rng = np.random.default_rng(len(shape) * 10 + n_emitters)
    model = MultiGaussian(n_emitters, len(shape), integrated)
    grid = Grid(shape)
    km = model.kernel(grid)
    theta = _theta(rng, model, shape, 30)
    assert K.model_for(km) is K.MODEL_BOXED
    mu0, J0 = _evaluate(K.MODEL, km, theta, grid.size)
    mu1, J1 = _evaluate(K.MODEL_BOXED, km, theta, grid.size)
    assert np.array_equal(mu0, mu1) and np.array_equal(J0, J1)
    # and it is the sum of its emitters, each as the one-emitter model draws it
    em = model.emitter_model
    total = np.zeros_like(mu0)
    for i in range(n_emitters):
        one = np.zeros((len(theta), em.n_params))
        for name in em.param_names:
            if name == "offset":
                continue
            one[:, em.index(name)] = theta[:, model.emitter_index(i, name) if name in ("intensity", "x", "y", "z")
                                              else model.index(name)]
        total += em.value(one, grid)
    total += theta[:, [model.offset_index]]
    assert np.allclose(mu0, total, rtol=1e-12, atol=1e-9)  # photons

def test_erf_is_one_where_the_joint_model_skips_it():
    """``_erf_edge`` returns +-1 from |u| >= 6 on: so does the library's ``erf``."""
    from numba import njit
    import math

    @njit
    def errors(u):
        n = 0
        for v in u:
            n += (math.erf(v) != 1.0) + (math.erf(-v) != -1.0)
        return n

    assert errors(np.linspace(6.0, 40.0, 200001)) == 0


@pytest.mark.parametrize("kind", ["separable", "rotated"])
def test_boxed_model_equals_the_model_inside_its_box_and_is_zero_outside(kind):
    rng = np.random.default_rng(3)
    shape = (12, 17)
    grid = Grid(shape)
    model = MultiGaussian(3, 2, True) if kind == "separable" else get_model("rotated", 2, True)
    if kind == "separable":
        theta = _theta(rng, model, shape, 10)
    else:
        theta = np.column_stack([rng.uniform(500, 3000, 10), rng.uniform(3, 12, 10), rng.uniform(3, 8, 10),
                                 rng.uniform(1.2, 2.5, 10), rng.uniform(1.2, 2.5, 10), rng.uniform(-0.5, 0.5, 10),
                                 rng.uniform(0, 20, 10)])
    km = model.kernel(grid)
    mu0, J0 = _evaluate(K.MODEL, km, theta, grid.size)
    y0, x0, cy, cx = 2, 3, 7, 10  # rows 2-8, columns 3-12
    bkm = km._replace(y0=y0, x0=x0, cy=cy, cx=cx)
    mu1, J1 = _evaluate(K.MODEL_BOXED, bkm, theta, grid.size)
    inside = np.zeros(shape, bool)
    inside[y0:y0 + cy, x0:x0 + cx] = True
    inside = inside.ravel()
    assert np.array_equal(mu0[:, inside], mu1[:, inside])
    assert np.array_equal(J0[:, :, inside], J1[:, :, inside])
    assert np.all(J1[:, :, ~inside] == 0.0)


def _simulated_groups(rng, n, shape, n_emitters):
    """Windows of ``n_emitters`` Poisson spots, each with its own unmasked box."""
    model = MultiGaussian(n_emitters, 2, True)
    grid = Grid(shape)
    truth = _theta(rng, model, shape, n)
    truth[:, model.offset_index] = 20.0
    for i in range(n_emitters):  # >= 4 px apart along x, 3 px or more inside the window
        truth[:, model.emitter_index(i, "x")] = 3.0 + (shape[1] - 7.0) * (i + 0.5) / n_emitters \
            + rng.uniform(-0.5, 0.5, n)
        truth[:, model.emitter_index(i, "y")] = rng.uniform(3.0, shape[0] - 4.0, n)
    data = rng.poisson(model.value(truth, grid)).astype(float)
    mask = np.zeros((n,) + shape, bool)
    for i in range(n):  # a box of the window (a group smaller than its solve's window, or at the frame's edge)
        y0, x0 = rng.integers(0, 3, 2)
        y1, x1 = shape[0] - rng.integers(0, 3), shape[1] - rng.integers(0, 3)
        mask[i, y0:y1, x0:x1] = True
    return model, grid, truth, data, mask.reshape(n, -1)


@pytest.mark.parametrize("n_emitters", [1, 3])
def test_boxed_fits_are_the_whole_windows_fits(n_emitters):
    """Boxed fits (the model and every sum over the box of the unmasked pixels) against
    the same fits over the whole window: the same iterations and statuses, parameters
    within 1e-9 (relative; the sums run in another order, so not bit for bit -- a boxed
    fit is bit for bit the same in any window around its box instead,
    ``tests/test_solver.py``), and they find the emitters."""
    rng = np.random.default_rng(7 + n_emitters)
    model, grid, truth, data, mask = _simulated_groups(rng, 40, (13, 18), n_emitters)
    theta0 = truth + rng.normal(0.0, 0.3, truth.shape) * (truth != 0)
    lower, upper = model.bounds(grid)
    lower[model.index("sigma")], upper[model.index("sigma")] = 0.6, 3.0
    est = get_estimator("mle")
    fits = []
    km = model.kernel(grid)
    for km, fn in ((km, K.MODEL), (km._replace(boxed=1), K.MODEL_BOXED)):
        cost = est.cost(data, mask, POISSON)
        n, k = truth.shape
        state = K.FitState(theta0.copy(), np.zeros(n, np.int32), np.zeros(n, np.int8), np.zeros(n))
        box = K.Box(np.ascontiguousarray(np.broadcast_to(lower, (n, k))),
                    np.ascontiguousarray(np.broadcast_to(upper, (n, k))), np.ones(k, bool), 1, 0)
        K.levenberg_marquardt(fn, km, cost, box, state, 50, 1e-3, 0, n)
        fits.append(state)
    a, b = fits
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b.cost, a.cost, rtol=1e-12)
    assert np.array_equal(a.iterations, b.iterations) and np.array_equal(a.status, b.status)
    # and they find the emitters: positions within 0.3 px of the truth for >= 90% of the converged emitters
    ok = b.status == K.CONVERGED
    assert ok.mean() > 0.8
    err = [np.abs(b.theta[ok, model.emitter_index(i, a)] - truth[ok, model.emitter_index(i, a)])
           for i in range(n_emitters) for a in ("x", "y")]
    assert np.mean(np.concatenate(err) < 0.3) > 0.9


def test_solver_boxed_option_changes_no_fit():
    """``solver.solve(boxed=True)`` of a single-spot model (the blob test's fits): the same
    Solution up to rounding (parameters and covariance within 1e-9 relative, the same
    statuses)."""
    rng = np.random.default_rng(11)
    model, grid, truth, data, mask = _simulated_groups(rng, 30, (11, 14), 1)
    single = get_model("rotated", 2, True)
    theta0 = np.column_stack([truth[:, 0], truth[:, 1] + 0.2, truth[:, 2] - 0.2, np.full(30, 1.5),
                              np.full(30, 1.4), np.zeros(30), np.full(30, 15.0)])
    lower, upper = single.bounds(grid)
    out = [solver.solve(single, get_estimator("mle"), data, mask, grid, theta0, noise=POISSON, lower=lower,
                        upper=upper, bias_correct=False, boxed=boxed) for boxed in (False, True)]
    np.testing.assert_allclose(out[1].theta, out[0].theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[1].cov, out[0].cov, rtol=1e-9, atol=1e-12 * np.abs(out[0].cov).max())
    assert np.array_equal(out[0].status, out[1].status)
    x_err = np.abs(out[1].theta[:, 1] - truth[:, 1])
    assert np.median(x_err) < 0.15  # px
