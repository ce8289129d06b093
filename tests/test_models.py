"""Models: analytic Jacobians against numerical derivatives, normalisation, canonical form."""

import numpy as np
import pytest

from spotfit.models import REGISTRY, Grid, get_model
from spotfit.models.gaussian import MultiGaussian
from spotfit.errors import SpotfitInputError

ALL_MODELS = [(name, ndim, integ) for (name, ndim) in REGISTRY for integ in (False, True)]
ALL_MODELS += [(f"multi{k}", ndim, integ) for k in (1, 3) for ndim in (2, 3) for integ in (False, True)]


def _model(name, ndim, integrated):
    if name.startswith("multi"):
        return MultiGaussian(int(name[5:]), ndim, integrated)
    return get_model(name, ndim, integrated)


def _random_theta(model, grid, rng, n=6):
    nd = model.ndim
    if isinstance(model, MultiGaussian):
        theta = np.zeros((n, model.n_params))
        shape_xyz = np.array(grid.shape[::-1], float)
        for i in range(model.n_emitters):
            theta[:, model.emitter_index(i, "intensity")] = rng.uniform(200, 5000, n)
            for j, a in enumerate(("x", "y", "z")[:nd]):
                theta[:, model.emitter_index(i, a)] = rng.uniform(0.3, 0.7, n) * (shape_xyz[j] - 1)
        for name in model.width_names:
            theta[:, model.index(name)] = rng.uniform(0.9, 2.0, n)
        theta[:, -1] = rng.uniform(1, 20, n)
        return theta
    shape_xyz = np.array(grid.shape[::-1], float)
    center = rng.uniform(0.3, 0.7, (n, nd)) * (shape_xyz - 1)
    widths = rng.uniform(0.9, 2.0, (n, nd))
    theta = model.from_moments(center, widths, rng.uniform(200, 5000, n), rng.uniform(1, 20, n))
    if "cov_xy" in model.param_names:  # elongated and tilted
        vxx, vyy = theta[:, 3], theta[:, 4] * 2.0
        theta[:, 4] = vyy
        theta[:, 5] = rng.uniform(-0.6, 0.6, n) * np.sqrt(vxx * vyy)
    return theta


@pytest.mark.parametrize("name,ndim,integrated", ALL_MODELS)
def test_jacobian_matches_numerical_derivative(name, ndim, integrated):
    rng = np.random.default_rng(11)
    model = _model(name, ndim, integrated)
    grid = Grid((9, 11) if ndim == 2 else (7, 9, 11))  # non-square windows
    theta = _random_theta(model, grid, rng)
    mu, jac = model.evaluate(theta, grid)
    assert mu.shape == (theta.shape[0], grid.size)
    assert jac.shape == (theta.shape[0], model.n_params, grid.size)
    for j in range(model.n_params):
        h = 1e-6 * max(1.0, np.abs(theta[:, j]).max())
        up, down = theta.copy(), theta.copy()
        up[:, j] += h
        down[:, j] -= h
        numerical = (model.value(up, grid) - model.value(down, grid)) / (2 * h)
        scale = np.abs(jac[:, j]).max() + 1e-12
        np.testing.assert_allclose(jac[:, j], numerical, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"d mu / d {model.param_names[j]}")


@pytest.mark.parametrize("name,ndim,integrated", ALL_MODELS)
def test_model_integrates_to_intensity(name, ndim, integrated):
    """A centred spot in a large window sums to its intensity (plus offset * pixels)."""
    model = _model(name, ndim, integrated)
    grid = Grid((31, 33) if ndim == 2 else (25, 31, 33))
    centre = (np.array(grid.shape[::-1], float) - 1) / 2 + 0.3
    widths = np.array([[1.3, 1.6, 2.0][:ndim]])
    if isinstance(model, MultiGaussian):  # K emitters sharing the total of 1000
        theta = np.zeros((1, model.n_params))
        for i in range(model.n_emitters):
            theta[0, model.emitter_index(i, "intensity")] = 1000.0 / model.n_emitters
            for j, a in enumerate(("x", "y", "z")[:ndim]):
                theta[0, model.emitter_index(i, a)] = centre[j] + i - 1
        for name_w, value in zip(model.width_names, (1.3, 2.0)):
            theta[0, model.index(name_w)] = value
        theta[0, -1] = 2.0
        mu = model.value(theta, grid)
        assert mu.sum() - 2.0 * grid.size == pytest.approx(1000.0, rel=1e-4)
        return
    theta = model.from_moments(centre[None], widths, np.array([1000.0]), np.array([2.0]))
    if "cov_xy" in model.param_names:
        theta[0, model.index("cov_xy")] = 0.5 * np.sqrt(theta[0, 3] * theta[0, 4])
    mu = model.value(theta, grid)
    total = mu.sum() - 2.0 * grid.size
    assert total == pytest.approx(1000.0, rel=1e-4)


def test_integrated_and_point_sampled_converge_for_wide_spots():
    """For sigma >> 1 px, integrating over a pixel changes little (relative < 1%)."""
    grid = Grid((41, 43))
    for name in ("symmetric", "elliptical", "rotated"):
        p, i = get_model(name, 2, False), get_model(name, 2, True)
        theta = p.from_moments(np.array([[21.2, 19.7]]), np.array([[5.0, 6.0]]), np.array([1e4]), np.array([0.0]))
        mp, mi = p.value(theta, grid), i.value(theta, grid)
        assert np.abs(mp - mi).max() < 0.01 * mp.max()


@pytest.mark.parametrize("sigma,hint,bound", [(0.7, None, 5e-5), (1.0, None, 5e-5), (1.2, 1.2, 5e-4), (2.0, 2.0, 5e-4)])
def test_rotated_integrated_quadrature_matches_erf(sigma, hint, bound):
    """The rotated model's Gauss-Legendre quadrature (3x3 nodes, or 2x2 for sigma >= 1.2 px)
    matches the exact erf integral of the axis-aligned model within ``bound`` x peak."""
    grid = Grid((11, 13))
    exact, quad = get_model("elliptical", 2, True), get_model("rotated", 2, True, sigma=hint)
    assert quad.quadrature == (2 if hint else 3)
    widths = np.array([[sigma, 1.2 * sigma]])
    theta_e = exact.from_moments(np.array([[6.3, 4.8]]), widths, np.array([1e3]), np.array([0.0]))
    theta_r = quad.from_moments(np.array([[6.3, 4.8]]), widths, np.array([1e3]), np.array([0.0]))
    reference = exact.value(theta_e, grid)
    assert np.abs(quad.value(theta_r, grid) - reference).max() <= bound * reference.max()


def _rotated_theta(sx, sy, angle):
    """Covariance-form parameters of a spot with widths (sx, sy) rotated by angle."""
    c, s = np.cos(angle), np.sin(angle)
    R = np.array([[c, -s], [s, c]])
    cov = R @ np.diag([sx**2, sy**2]) @ R.T
    return np.array([[500.0, 5.0, 4.0, cov[0, 0], cov[1, 1], cov[0, 1], 1.0]])


@pytest.mark.parametrize("sx,sy,angle", [(1.2, 2.0, 0.3), (2.0, 1.2, -0.7), (1.5, 1.1, 0.0), (1.1, 1.5, -0.78), (1.1, 1.5, 0.79)])
def test_rotated_reports_canonical_form(sx, sy, angle):
    """(sx, sy, a) and (sy, sx, a + pi/2) are the same spot: one canonical report, angle in [-pi/4, pi/4)."""
    model = get_model("rotated", 2)
    names, a, _ = model.public(_rotated_theta(sx, sy, angle), np.zeros((1, 7, 7)))
    names, b, _ = model.public(_rotated_theta(sy, sx, angle + np.pi / 2), np.zeros((1, 7, 7)))
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert names[3:6] == ("sigma_x", "sigma_y", "angle")
    assert -np.pi / 4 <= a[0, 5] < np.pi / 4
    if angle >= np.pi / 4:
        want = (sy, sx, angle - np.pi / 2)
    elif angle < -np.pi / 4:
        want = (sy, sx, angle + np.pi / 2)
    else:
        want = (sx, sy, angle)
    np.testing.assert_allclose(a[0, 3:6], want, atol=1e-9)
    # the reported values describe the same image
    grid = Grid((9, 11))
    np.testing.assert_allclose(model.value(_rotated_theta(*a[0, 3:6]), grid),
                               model.value(_rotated_theta(sx, sy, angle), grid), rtol=1e-9)


def test_rotated_error_propagation_matches_sampling():
    """Errors of (sigma_x, sigma_y, angle) propagated from the covariance form match Monte Carlo."""
    rng = np.random.default_rng(4)
    model = get_model("rotated", 2)
    theta = _rotated_theta(1.2, 1.8, 0.4)
    cov = np.diag([100.0, 1e-3, 1e-3, 4e-3, 6e-3, 2e-3, 0.1])[None]
    cov[0, 3, 5] = cov[0, 5, 3] = 1e-3
    _, _, pcov = model.public(theta, cov)
    samples = rng.multivariate_normal(theta[0], cov[0], size=20000)
    _, pub, _ = model.public(samples, np.zeros((len(samples), 7, 7)))
    np.testing.assert_allclose(np.std(pub[:, 3:6], axis=0), np.sqrt(np.diagonal(pcov[0])[3:6]), rtol=0.05)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SpotfitInputError, match="model 'rotated' is not available for 3D"):
        get_model("rotated", 3)


# ------------------------------------------------- the declared roles against the kernels
def _emitters(model):
    return range(getattr(model, "n_emitters", 1))


@pytest.mark.parametrize("name,ndim,integrated", ALL_MODELS)
def test_declared_roles_match_the_kernel(name, ndim, integrated):
    """What a model class declares (spotfit.models.base) is what its compiled kernel computes:
    the offset adds to every pixel, the model is linear in the intensities, moving the declared
    centre by one pixel moves the image by one pixel along that axis."""
    rng = np.random.default_rng(21)
    model = _model(name, ndim, integrated)
    grid = Grid((13, 15) if ndim == 2 else (9, 13, 15))
    theta = _random_theta(model, grid, rng, n=3)
    mu, jac = model.evaluate(theta, grid)
    off = model.offset_index
    np.testing.assert_array_equal(jac[:, off], 1.0)
    signal = sum(theta[:, [model.emitter_index(i, "intensity")]] * jac[:, model.emitter_index(i, "intensity")]
                 for i in _emitters(model))
    np.testing.assert_allclose(mu - theta[:, [off]], signal, rtol=1e-12, atol=1e-9)
    if model.linear:
        assert model.n_emitters == 1
    for j, axis in enumerate(("x", "y", "z")[:ndim]):
        moved = theta.copy()
        for i in _emitters(model):
            moved[:, model.emitter_index(i, axis)] += 1.0
        a = mu.reshape((-1,) + grid.shape)
        b = model.value(moved, grid).reshape((-1,) + grid.shape)
        array_axis = grid.ndim - j  # x is the last array axis (+1 for the batch axis)
        head = [slice(None)] * (grid.ndim + 1)
        tail = [slice(None)] * (grid.ndim + 1)
        head[array_axis], tail[array_axis] = slice(1, None), slice(None, -1)
        np.testing.assert_allclose(b[tuple(head)], a[tuple(tail)], rtol=1e-9, atol=1e-9, err_msg=axis)


@pytest.mark.parametrize("name,ndim", [(n, d) for (n, d) in REGISTRY])
def test_declared_widths_and_peak_match_the_kernel(name, ndim):
    """``axis_widths`` are the spot's sigma along x, y[, z] (second moments of the point-sampled
    model in a large window), and ``peak`` is its density at the centre (the amplitude)."""
    model = get_model(name, ndim, False)
    grid = Grid((41, 45) if ndim == 2 else (31, 41, 45))
    centre = np.array([[22.0, 20.0, 15.0][:ndim]])
    widths = np.array([[1.4, 2.1, 2.6][:ndim]])
    theta = model.from_moments(centre, widths, np.array([5000.0]), np.array([3.0]))
    names, pub, _ = model.public(theta, np.zeros((1,) + (model.n_params,) * 2))
    signal = model.value(theta, grid)[0] - 3.0
    coords = grid.flat()
    for j, axis_width in enumerate(model.axis_widths):
        mean = np.sum(signal * coords[j]) / signal.sum()
        second = np.sum(signal * (coords[j] - mean) ** 2) / signal.sum()
        assert np.sqrt(second) == pytest.approx(pub[0, names.index(axis_width)], rel=1e-4), axis_width
    amp, grad = model.peak(names, pub)
    at_centre = np.ravel_multi_index(tuple(int(c) for c in centre[0][::-1]), grid.shape)
    assert amp[0] == pytest.approx(signal[at_centre], rel=1e-12)
    h = 1e-6 * pub[0]
    for k in range(len(names)):
        up = pub.copy()
        up[0, k] += h[k] if h[k] else 1e-6
        assert grad[0, k] == pytest.approx((model.peak(names, up)[0][0] - amp[0]) / (up[0, k] - pub[0, k]),
                                           rel=1e-4, abs=1e-9), names[k]


def test_kernel_layout_is_the_declared_one():
    """The compiled kernel reads widths, intensity and offset where the class declares them."""
    from spotfit import _kernels as K

    grid = Grid((9, 11))
    for (name, ndim), cls in REGISTRY.items():
        model = cls()
        km = model.kernel(grid if ndim == 2 else Grid((5, 9, 11)))
        assert (km.intensity, km.offset) == (model.index("intensity"), model.index("offset"))
        if model.family == K.SEPARABLE:
            got = [model.param_names[i] for i in (km.wx, km.wy, km.wz)[:ndim]]
            assert got == list(model.axis_widths), name
        else:  # ROTATED: [N, x, y, var_xx, var_yy, cov_xy, offset]
            assert model.param_names == ("intensity", "x", "y", "var_xx", "var_yy", "cov_xy", "offset")


def test_multi_gaussian_emitter_is_the_symmetric_model():
    """Emitter i of a group, taken with emitter_params(i), is the symmetric model: a group of
    one gives the symmetric model's values exactly."""
    rng = np.random.default_rng(2)
    for ndim in (2, 3):
        grid = Grid((9, 11) if ndim == 2 else (7, 9, 11))
        multi = MultiGaussian(3, ndim, True)
        theta = _random_theta(multi, grid, rng, n=2)
        one = MultiGaussian(1, ndim, True)
        sym = multi.emitter_model
        for i in range(3):
            own = theta[:, multi.emitter_params(i)]
            np.testing.assert_array_equal(one.value(own, grid), sym.value(own, grid))
            assert [multi.param_names[j] for j in multi.emitter_params(i)][-1] == "offset"


@pytest.mark.parametrize("name,ndim,integrated", ALL_MODELS)
def test_value_is_evaluate_without_the_jacobian(name, ndim, integrated):
    rng = np.random.default_rng(12)
    model = _model(name, ndim, integrated)
    grid = Grid((9, 11) if ndim == 2 else (7, 9, 11))
    theta = _random_theta(model, grid, rng)
    np.testing.assert_array_equal(model.value(theta, grid), model.evaluate(theta, grid)[0])


@pytest.mark.parametrize("hint,integrated", [(None, False), (None, True), (1.3, True)])
def test_rotated_round_and_axis_aligned_forms_take_the_separable_path(hint, integrated):
    """``cov_xy = 0`` (the symmetric fit's point of the model choice's score test, and a
    fit's start) is evaluated axis by axis: the values and Jacobian of the general
    quadrature (forced here by ``cov_xy = 1e-300``, which changes no value) within 1e-13
    of the peak (rounding), in a whole window and in a joint fit's box of it, 0 outside
    the box; point-sampled, 3 x 3 and 2 x 2 nodes."""
    from numba import njit

    from spotfit._kernels import boxed_window

    rng = np.random.default_rng(5)
    grid = Grid((9, 11))  # (rows, columns)
    model = get_model("rotated", 2, integrated, sigma=hint)
    n = 40
    theta = np.zeros((n, model.n_params))
    theta[:, 0] = rng.uniform(500, 3000, n)
    theta[:, 1] = rng.uniform(3.0, 7.0, n)  # x: column
    theta[:, 2] = rng.uniform(2.5, 5.5, n)  # y: row
    theta[:, 3] = rng.uniform(0.8, 2.0, n) ** 2
    theta[:, 4] = np.where(rng.random(n) < 0.5, theta[:, 3], rng.uniform(0.8, 2.0, n) ** 2)  # round or not
    theta[:, 6] = rng.uniform(0, 50, n)
    general = theta.copy()
    general[:, 5] = 1e-300
    mu, jac = model.evaluate(theta, grid)
    mu_g, jac_g = model.evaluate(general, grid)
    assert np.abs(mu - mu_g).max() <= 1e-13 * np.abs(mu_g).max()
    for j in range(model.n_params):
        scale = np.abs(jac_g[:, j]).max()
        assert np.abs(jac[:, j] - jac_g[:, j]).max() <= 1e-13 * scale, model.param_names[j]
    assert np.abs(jac[:, 5]).max() > 0  # d/d cov_xy of an off-centre pixel: not 0

    @njit
    def boxed(km, th, mu, J):
        boxed_window(km, th, mu, J, np.empty((9, 11)))

    km = model.kernel(grid)._replace(boxed=1, y0=2, x0=3, cy=5, cx=6)
    inside = np.zeros(grid.shape, bool)
    inside[2:7, 3:9] = True
    inside = inside.ravel()
    for th, reference in ((theta, jac_g), (general, jac_g)):
        for s in range(n):
            m_box, j_box = np.full(grid.size, -1.0), np.full((model.n_params, grid.size), np.nan)
            boxed(km, th[s], m_box, j_box)
            assert np.abs(m_box[inside] - mu_g[s, inside]).max() <= 1e-13 * np.abs(mu_g[s]).max()
            assert np.all(m_box[~inside] == -1.0) and np.all(j_box[:, ~inside] == 0.0)
            assert np.abs(j_box[:, inside] - reference[s][:, inside]).max() <= \
                1e-13 * np.abs(reference[s]).max()


@pytest.mark.parametrize("integ", [2, 3])
def test_rotated_factored_quadrature_is_the_per_node_quadrature(integ):
    """The rotated model's quadrature with one exponential per pixel (the node factors
    split per column and row) against an exponential per node: values and Jacobian
    within 1e-13 of the peak for forms from round to 10:1 at any angle, in a window and
    in a box of it; a pixel-thin form far from its centre is left to the per-node path
    (the factored one declines, writing nothing)."""
    from numba import njit

    from spotfit._kernels import _rotated_direct, _rotated_factored

    @njit
    def both(th, ny, nx, y0, x0, cy, cx, mu_f, J_f, mu_d, J_d):
        ok = _rotated_factored(integ, th, ny, nx, y0, x0, cy, cx, mu_f, J_f, np.zeros((9, max(ny, nx, 10))))
        _rotated_direct(integ, th, nx, y0, x0, cy, cx, mu_d, J_d, np.zeros(10))
        return ok

    rng = np.random.default_rng(8)
    ny, nx = 9, 13  # rows, columns
    P = ny * nx
    for trial in range(200):
        sx, sy = rng.uniform(0.6, 3.0), rng.uniform(0.6, 3.0)
        if trial % 4 == 0:
            sy = sx / 10.0 if sx > 1.5 else 10.0 * sx
        angle = rng.uniform(-np.pi, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        cov = np.array([[c, -s], [s, c]]) @ np.diag([sx**2, sy**2]) @ np.array([[c, s], [-s, c]])
        th = np.array([rng.uniform(100, 5000), rng.uniform(2, 10), rng.uniform(2, 6),
                       cov[0, 0], cov[1, 1], cov[0, 1], rng.uniform(0, 30)])
        box = (0, 0, ny, nx) if trial % 2 else (1, 2, 6, 9)  # y0, x0, cy, cx
        mu_f, mu_d = np.full(P, -1.0), np.full(P, -1.0)
        J_f, J_d = np.full((7, P), -1.0), np.full((7, P), -1.0)
        assert both(th, ny, nx, *box, mu_f, J_f, mu_d, J_d)
        peak = th[0] * np.abs(J_d[0]).max()
        assert np.abs(mu_f - mu_d).max() <= 1e-13 * (peak + th[6]), trial
        for j in range(7):
            assert np.abs(J_f[j] - J_d[j]).max() <= 1e-13 * np.abs(J_d[j]).max() + 1e-300, (trial, j)
    # 100:1, at 45 degrees, its centre 8 px from the box's far corner: the per-node path
    cov = 0.5 * np.array([[1.0 + 1e-4, 1.0 - 1e-4], [1.0 - 1e-4, 1.0 + 1e-4]]) * 4.0
    th = np.array([1000.0, 1.0, 1.0, cov[0, 0], cov[1, 1], cov[0, 1], 0.0])
    mu_f = np.full(P, -1.0)
    assert not both(th, ny, nx, 0, 0, ny, nx, mu_f, np.full((7, P), -1.0), np.zeros(P), np.zeros((7, P)))
    assert np.all(mu_f == -1.0)
    model = get_model("rotated", 2, True)
    mu, jac = model.evaluate(th[None], Grid((ny, nx)))
    assert np.all(np.isfinite(mu)) and np.all(np.isfinite(jac))
