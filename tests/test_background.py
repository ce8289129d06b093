"""Tests of spotfit.background (noise models, local background) and of the
noise detection derives from them, on simulated frames with known truth.

All images are non-square and seeded; noise variances are compared with the
truth in relative terms, backgrounds in units of the pixel noise.
"""

import numpy as np
import pytest
from scipy import ndimage

import spotfit.detection as detection
from spotfit.background import NoiseModel, cell_size, estimate_noise, halo, local_background
from spotfit.camera import Camera
from spotfit.detection import filter_frame, find_peaks
from spotfit.simulation import render, simulate

CAMERA = Camera(baseline=100.0, gain=1.0)  # photons = ADU - 100
BG = 20.0  # photons / px


# ------------------------------------------------------------- noise models
def test_noise_model_from_camera():
    emccd = NoiseModel.from_camera(Camera(baseline=100, gain=10.0, em_gain=100, read_noise=30.0))
    # EM excess factor 2; read noise 30 e- before a gain of 100: 0.3 photons
    np.testing.assert_allclose(emccd.variance(np.array([5.0, 0.0])), [2 * 5 + 0.09, 0.09])
    rn = np.full((4, 6), 1.5)
    rn[1, 2] = 3.0
    scmos = NoiseModel.from_camera(Camera(baseline=100, gain=2.0, read_noise=rn))
    var = scmos.variance(np.full((4, 6), 10.0))
    assert var[1, 2] == pytest.approx(19.0) and var[0, 0] == pytest.approx(12.25)
    # one pixel of the map picked by its index
    assert scmos.variance(np.array([10.0]), index=(np.array([1]), np.array([2])))[0] == pytest.approx(19.0)
    with pytest.raises(Exception, match="gain"):
        NoiseModel.from_camera(Camera(baseline=100))


@pytest.mark.parametrize("area", [400, 100, 36, 16])
def test_measured_noise_does_not_grow_with_spot_density(area):
    # 1000-3000 photon spots over 20 photons/px, from 1 spot per 400 px^2 (sparse)
    # to 1 per 16 px^2 (every pixel under some spot's light): the measured
    # noise model must give each pixel the variance of its expected level
    # (Poisson: background plus the spots' light), not more
    shape = (180, 250)
    img, truth = simulate(shape, n_spots=shape[0] * shape[1] // area, photons=(1000, 3000),
                          background=BG, sigma=1.3, camera=CAMERA, seed=area)
    expected = render(shape, truth["x"], truth["y"], truth["intensity"], 1.3, background=BG)
    model = estimate_noise(img, 1.3)  # in ADU: level = photons + 100
    assert model.source == "measured"
    ratio = model.variance(expected + 100.0) / expected
    assert np.median(ratio) == pytest.approx(1.0, abs=0.06)
    assert model.correlation == pytest.approx(1.0, abs=0.05)  # white noise


@pytest.mark.parametrize("calibrated", [True, False], ids=["camera", "measured"])
@pytest.mark.parametrize("area", [400, 16])
def test_detection_noise_is_the_noise_of_the_filtered_frame(calibrated, area):
    # two noise realisations of one expected image: half the variance of the
    # difference of their filtered frames is the filtered noise, which the
    # noise detection divides by must match, in a sparse and in a covered
    # frame alike (there it is larger: the spots' own shot noise)
    shape = (150, 220)
    _, truth = simulate(shape, n_spots=shape[0] * shape[1] // area, photons=(1000, 3000), background=BG,
                        sigma=1.3, camera=CAMERA, seed=7)
    expected = render(shape, truth["x"], truth["y"], truth["intensity"], 1.3, background=BG)
    rng = np.random.default_rng(1)
    noise = NoiseModel.from_camera(CAMERA) if calibrated else None
    first, sd = filter_frame(rng.poisson(expected).astype(np.float32), 1.3, noise=noise)
    second, _ = filter_frame(rng.poisson(expected).astype(np.float32), 1.3, noise=noise)
    inner = (slice(12, -12), slice(12, -12))
    # typical pixel (robust: the cores of spots have far more noise)
    actual = 1.4826 * np.median(np.abs((first - second)[inner])) / np.sqrt(2)
    # the model uses the background level (a spot's own light is not noise
    # under the hypothesis that no spot is there): at most the actual noise
    # and, in a sparse frame, nearly all of it
    assert np.median(sd[inner]) <= 1.05 * actual
    if area == 400:
        assert np.median(sd[inner]) == pytest.approx(actual, rel=0.1)


def test_correlated_noise_is_measured():
    # white noise smoothed by a Gaussian of 0.7 px: neighbouring pixels correlate
    # (interpolated or denoised data); pixel differences alone would see too
    # little noise at the scale of a spot and detect thousands of noise peaks
    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.normal(0, 10.0, (400, 520)), 0.7)
    model = estimate_noise(noise + 500.0, 1.3)
    assert model.correlation > 2.0
    coords, _ = find_peaks(noise + 500.0, 1.3)
    assert len(coords) <= 3


# --------------------------------------------------------------- background
def _cells_frame(rng, shape):
    """Background of blurred 'cells' (steps of +150 photons/px, sigma 2 px edges,
    ~40 px wide) on 10 photons/px, with a gradient."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    cells = np.zeros(shape)
    for cx, cy, r in ((60, 50, 22), (170, 90, 28), (90, 120, 18)):
        cells[np.hypot(xx - cx, yy - cy) < r] = 150.0
    return 10.0 + 0.1 * xx + ndimage.gaussian_filter(cells, 2.0)


def test_background_follows_cells_not_spots():
    rng = np.random.default_rng(5)
    shape = (170, 230)
    truth = _cells_frame(rng, shape)
    xy = rng.uniform(5, [shape[1] - 5, shape[0] - 5], (60, 2))
    spots = render(shape, xy[:, 0], xy[:, 1], 4000.0, 1.3)
    frame = rng.poisson(truth + spots).astype(np.float32)
    bg = local_background(frame, 1.3, NoiseModel.from_camera(CAMERA))
    sd = np.sqrt(truth)
    err = (bg - truth) / sd
    # inside cells and outside them, away from the edges (the background's
    # scale is ~3 sigma: it rounds a step of 40 noise standard deviations)
    edge = ndimage.gaussian_gradient_magnitude(truth, 1.0) > 1.0
    flat = ~ndimage.binary_dilation(edge, iterations=6)
    assert np.sqrt(np.mean(err[flat] ** 2)) < 0.5
    # under the spots (4000 photons: peak ~375 photons/px) the background
    # stays the cells': spots are left out, not averaged in
    at_spots = np.rint(xy[:, ::-1]).astype(int)
    under = err[at_spots[:, 0], at_spots[:, 1]][flat[at_spots[:, 0], at_spots[:, 1]]]
    assert len(under) > 20
    assert np.median(np.abs(under)) < 0.5


def test_blocks_find_what_the_whole_frame_finds(monkeypatch):
    rng = np.random.default_rng(8)
    shape = (300, 170)
    truth = _cells_frame(rng, (300, 230))[:, :170]
    xy = rng.uniform(0, [shape[1] - 1, shape[0] - 1], (150, 2))
    frame = rng.poisson(truth + render(shape, xy[:, 0], xy[:, 1], rng.uniform(300, 3000, 150), 1.3))
    for noise in (NoiseModel.from_camera(CAMERA), estimate_noise(frame, 1.3)):
        whole = find_peaks(frame, 1.3, noise=noise)
        monkeypatch.setattr(detection, "BLOCK_PIXELS", 6000)  # blocks of rows with halos
        assert len(detection._blocks(shape, (1.3, 1.3), (2, 2))) > 5
        blocks = find_peaks(frame, 1.3, noise=noise)
        monkeypatch.undo()
        order_w, order_b = np.lexsort(whole[0].T), np.lexsort(blocks[0].T)
        np.testing.assert_array_equal(whole[0][order_w], blocks[0][order_b])
        np.testing.assert_allclose(whole[1][order_w], blocks[1][order_b], rtol=1e-6)


def test_halo_covers_cells():
    for s in (0.8, 1.3, 2.5):
        assert halo(s)[0] >= 3 * 3 * s  # at least the Gaussian neighbourhood
        assert halo(s)[0] % cell_size(s) == 0 or halo(s)[0] > 0


@pytest.mark.parametrize("scale", [3e38 / 500, 1e-40])
def test_float_frames_near_the_limits(scale):
    # float32 frames with values near 3e38 (or tiny ones) give the candidates
    # of the same frame in ordinary units (variances would overflow)
    img, truth = simulate((90, 140), n_spots=12, photons=3000, background=BG, min_separation=10, seed=1)
    frame = img.astype(np.float64)
    ref = find_peaks(frame.astype(np.float32), 1.3)
    extreme = (frame * scale).astype(np.float32)
    assert np.all(np.isfinite(extreme)) and np.max(extreme) > 0
    got = find_peaks(extreme, 1.3)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-3)
    assert len(got[0]) == 12


def test_dim_background_false_alarms_with_skewed_noise():
    # 1 photon/px: Poisson noise is skewed, the threshold is raised to keep
    # the Gaussian false-alarm rate (~0.3 false candidates per 512^2 frame)
    img, _ = simulate((3, 400, 500), n_spots=0, background=1.0, camera=CAMERA, seed=12)
    noise = NoiseModel.from_camera(CAMERA)
    false = sum(len(find_peaks(CAMERA.to_photons(f), 1.3, noise=noise)[0]) for f in img)
    assert false <= 3


# ----------------------------------------- coarse-grid filters without scipy.ndimage
def test_coarse_filters_equal_scipy_ndimage_bit_for_bit():
    """background._filter_axis (NumPy, so that a fit need not import scipy.ndimage)
    gives exactly ndimage's numbers: Gaussian correlation (nearest and zero edges)
    and minimum / maximum filters, on grids down to one cell per axis, with
    kernels wider than the axis, values of any scale, ties (rounded values),
    and the ndimage fallback for values that are not finite; and the same numbers
    when scipy.ndimage is imported (the default then)."""
    from spotfit.background import _filter_axis

    rng = np.random.default_rng(7)
    for trial in range(400):
        shape = tuple(int(n) for n in rng.integers(1, 10, 3))
        axis, half = int(rng.integers(0, 3)), int(rng.integers(1, 6))
        if shape[axis] == 1:  # (left as it is, by both)
            np.testing.assert_array_equal(_filter_axis(np.ones(shape), axis, np.ones(12), half,
                                                       True, 0), np.ones(shape))
            continue
        a = rng.normal(size=shape) * rng.choice([1e-3, 1.0, 1e3])
        if trial % 3 == 0:
            a = np.round(a)
        if trial % 50 == 1:
            a[(0,) * 3] = np.nan
        sigma = rng.uniform(0.3, 4.0)
        kernel = np.zeros(12)
        k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
        kernel[: 2 * half + 1] = k / k.sum()
        for nearest in (True, False):
            want = ndimage.correlate1d(a, kernel[: 2 * half + 1], axis=axis,
                                       mode="nearest" if nearest else "constant", cval=0.0)
            got = _filter_axis(a, axis, kernel, half, nearest, 0, engine="numpy")
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want, err_msg=f"{shape} {axis} {half} {nearest}")
        for minmax, func in ((1, ndimage.minimum_filter1d), (2, ndimage.maximum_filter1d)):
            want = func(a, 2 * half + 1, axis=axis, mode="nearest")
            np.testing.assert_array_equal(_filter_axis(a, axis, kernel, half, True, minmax, engine="numpy"), want)
            np.testing.assert_array_equal(_filter_axis(a, axis, kernel, half, True, minmax), want)
    # an asymmetric kernel goes to ndimage (its general rule), with the same result
    a = rng.normal(size=(4, 7, 9))
    kernel = np.array([0.1, 0.5, 0.4])
    np.testing.assert_array_equal(_filter_axis(a, 2, kernel, 1, False, 0),
                                  ndimage.correlate1d(a, kernel, axis=2, mode="constant"))


def test_filtered_counts_equal_filtering_the_whole_grid():
    # the pixel counts per cell are a product of per-axis profiles, so their
    # Gaussian filtering is too (three 1D passes instead of passes over the grid)
    from spotfit.background import _cell_sums, _filtered_counts, _gauss_kernels

    # pixels per cell of a volume that is not a whole number of cells
    data = np.ones((5, 47, 61), np.float32)
    cells = np.array([2, 3, 4], np.int64)
    coarse_shape = tuple(-(-n // int(c)) for n, c in zip(data.shape, cells))
    _, counts = _cell_sums(data, cells, coarse_shape)
    kernels, k_half = _gauss_kernels([0.8, 1.3, 1.1])
    expected = counts
    for axis in range(3):
        expected = ndimage.correlate1d(expected, kernels[axis, : 2 * k_half[axis] + 1], axis=axis,
                                       mode="constant", cval=0.0)
    np.testing.assert_allclose(_filtered_counts(counts, kernels, k_half), expected, rtol=1e-12)


def test_clipped_variance_of_rows_matches_one_row_at_a_time():
    from spotfit.background import _clipped_variance, _clipped_variance_rows

    rng = np.random.default_rng(13)
    d = rng.normal(0.0, 3.0, (6, 501))
    d[1, :40] += 100.0  # outliers
    d[2] = 5.0  # constant: no spread
    d[3, :495] = 0.0  # MAD 0: the standard deviation takes over
    d[4] = np.round(d[4])  # quantised
    ours = _clipped_variance_rows(d)
    np.testing.assert_allclose(ours, [_clipped_variance(row) for row in d], rtol=1e-12, atol=0)
    assert ours[0] == pytest.approx(9.0, rel=0.15) and ours[2] == 0.0


# --- the pixel kernels of detection and the background, against NumPy in the order of
# --- operations of one sum per pixel (cell, row), bit for bit
_ODD_SHAPES = [(1, 67, 101), (3, 11, 14), (1, 5, 4), (2, 1, 3)]


def _reflect(i, n):
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


@pytest.mark.parametrize("shape", _ODD_SHAPES)
@pytest.mark.parametrize("sigma", [0.6, 1.3, 2.0])
def test_gaussian_row_pass_sums_each_pixel_in_tap_order(shape, sigma):
    from spotfit.filters import _correlate_axis_rows

    rng = np.random.default_rng(7)
    a = (rng.normal(100.0, 30.0, shape) * rng.uniform(0.01, 10.0)).astype(np.float32)
    half = int(np.ceil(4.0 * sigma))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel = (k / k.sum()).astype(np.float32)
    for axis in (0, 1, 2):
        n = shape[axis]
        expected = np.zeros(shape, np.float32)  # acc = 0; acc += w[t] * a[reflect(x + t - half)], t = 0, 1, ...
        for t in range(kernel.size):
            src = np.take(a, [_reflect(i + t - half, n) for i in range(n)], axis=axis)
            expected = expected + kernel[t] * src  # float32 products and sums, as the kernel's
        out = np.full(shape, np.nan, np.float32)
        _correlate_axis_rows(a, kernel, axis, out, 0, shape[0] * shape[1])
        assert np.array_equal(out.view(np.int32), expected.view(np.int32)), axis


@pytest.mark.parametrize("shape", _ODD_SHAPES)
@pytest.mark.parametrize("cells", [(1, 3, 3), (2, 2, 5), (1, 1, 1), (1, 4, 7)])
def test_cell_sums_add_each_row_of_a_cell_in_pixel_order(shape, cells):
    from spotfit.background import _cell_sums_rows

    rng = np.random.default_rng(11)
    data = (rng.lognormal(3.0, 2.0, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
    cells = np.array(cells, np.int64)
    coarse = tuple(-(-n // int(c)) for n, c in zip(shape, cells))
    expected, count = np.zeros(coarse), np.zeros(coarse)
    for iz in range(coarse[0]):
        for iy in range(coarse[1]):
            for z in range(iz * cells[0], min((iz + 1) * cells[0], shape[0])):
                for y in range(iy * cells[1], min((iy + 1) * cells[1], shape[1])):
                    for jx in range(coarse[2]):
                        xs = range(jx * cells[2], min((jx + 1) * cells[2], shape[2]))
                        acc = 0.0
                        for x in xs:
                            acc += float(data[z, y, x])
                        expected[iz, iy, jx] += acc
                        count[iz, iy, jx] += len(xs)
    sums, counts = np.zeros(coarse), np.zeros(coarse)
    _cell_sums_rows(data, cells, sums, counts, 0, coarse[0] * coarse[1])
    assert np.array_equal(sums.view(np.int64), expected.view(np.int64))
    assert np.array_equal(counts, count)


@pytest.mark.parametrize("shape, cells", [((1, 67, 101), (1, 3, 3)), ((3, 11, 14), (2, 2, 5)),
                                          ((1, 5, 4), (1, 3, 3))])
@pytest.mark.parametrize("sign, shift", [(-1.0, 3.25), (1.0, 0.0)])
def test_interpolated_background_is_added_pixel_by_pixel(shape, cells, sign, shift):
    from spotfit.background import _add_interpolated_rows, _axis_weights

    rng = np.random.default_rng(5)
    coarse = rng.uniform(-50.0, 500.0, tuple(-(-n // c) for n, c in zip(shape, cells)))
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    (lz, hz, wz), (ly, hy, wy), (lx, hx, wx) = (
        _axis_weights(n, c, m) for n, c, m in zip(shape, cells, coarse.shape))
    expected = image.copy()
    for z in range(shape[0]):
        for y in range(shape[1]):
            line = coarse[lz[z], ly[y]] * (1 - wy[y]) + coarse[lz[z], hy[y]] * wy[y]
            if coarse.shape[0] > 1:
                other = coarse[hz[z], ly[y]] * (1 - wy[y]) + coarse[hz[z], hy[y]] * wy[y]
                line = line * (1 - wz[z]) + other * wz[z]
            value = sign * (line[lx] * (1 - wx) + line[hx] * wx)
            expected[z, y] = (expected[z, y].astype(np.float64) + value + shift).astype(np.float32)
    out = image.copy()
    _add_interpolated_rows(out, coarse, lz, hz, wz, ly, hy, wy, lx, hx, wx, sign, shift, 0,
                           shape[0] * shape[1])
    assert np.array_equal(out.view(np.int32), expected.view(np.int32))


def test_noise_correlation_smooths_each_band_once_with_the_same_ratio(monkeypatch):
    """_correlation's rounds share each band's detection filter (it does not depend on
    the round): the filter runs once per band, and the ratio is the one of filtering
    the bands again in every round (main's way), exactly; the bands are left as they were."""
    import spotfit.filters as filters
    from dataclasses import replace

    from spotfit.background import (SCALE, Background, NoiseModel, _correlation, _MAX_ASYMMETRY,
                                    _MIN_CORRELATION, _MIN_KEPT)

    rng = np.random.default_rng(17)
    bands = [np.ascontiguousarray(
        (ndimage.gaussian_filter(rng.normal(0, 10.0, (1, 64, 700)), (0, 0.7, 0.7)) + 300.0)
        .astype(np.float32)) for _ in range(3)]
    before = [b.copy() for b in bands]
    sig = (0.0, 1.3, 1.3)
    model = NoiseModel(read_var=30.0, shot=0.0, floor=1e-6, source="measured")

    def every_round():  # the rounds filtering each band again
        ratio = 1.0
        for _ in range(3):
            current = replace(model, correlation=ratio)
            kept, every = [], []
            for band in bands:
                bg = Background.estimate(band, sig, current)
                edge = filters._EdgeNoise(band.shape[1:], sig[1:], filters.SMOOTH, SCALE)
                filtered = filters.gaussian_smooth(band, tuple(filters.SMOOTH * s for s in sig))
                level = bg.full()
                filtered -= level
                r = filtered / (np.sqrt(model.variance(level)) * edge.white_sd)
                m = [int(np.ceil(4 * SCALE * s)) if s > 0 else 0 for s in sig]
                inner = tuple(slice(k, n - k) for k, n in zip(m, band.shape))
                r, level = r[inner], level[inner]
                ok = ~bg.per_pixel(bg.excluded)[inner]
                kept.append((r[ok], level[ok]))
                every.append(r.ravel())
            r_all = np.concatenate(every)
            assert r_all.size >= 2 * _MIN_CORRELATION
            r_kept = np.concatenate([k[0] for k in kept])
            assert r_kept.size >= _MIN_KEPT * r_all.size
            level = np.concatenate([k[1] for k in kept])
            r = r_kept[level <= np.median(level)]
            q16, q50, q84 = np.percentile(r, [15.87, 50.0, 84.13])
            assert ((q84 - q50) - (q50 - q16)) <= _MAX_ASYMMETRY * (q84 - q16)
            new = max(1.0, float((q84 - q16) / 2.0) ** 2)
            done = abs(new - ratio) < 0.05 * ratio
            ratio = new
            if done:
                return ratio
        return ratio

    expected = every_round()
    calls = []
    smooth = filters.gaussian_smooth
    monkeypatch.setattr(filters, "gaussian_smooth", lambda *a: calls.append(1) or smooth(*a))
    got = _correlation(bands, sig, model)
    assert got == expected and got > 1.5  # correlated noise, more than one round
    assert len(calls) == len(bands)
    for b, b0 in zip(bands, before):
        assert np.array_equal(b, b0)


@pytest.mark.parametrize("coarse_shape, cells", [((1, 40, 23), (1, 3, 3)), ((4, 9, 11), (2, 4, 5)),
                                                 ((1, 1, 6), (1, 2, 2))])
def test_background_at_pixels_is_the_multilinear_sum_in_corner_order(coarse_shape, cells):
    """Background.at's gather through one flat index: the corners' terms of main's
    (z, y, x)-indexed sum, added in the same order, bit for bit."""
    from spotfit.background import _interpolate_at

    rng = np.random.default_rng(23)
    coarse = rng.uniform(-10.0, 900.0, coarse_shape)
    cells = np.array(cells, np.int64)
    n = 5000
    zs, ys, xs = (rng.integers(0, m * c, n) for m, c in zip(coarse_shape, cells))
    expected = np.zeros(n)
    corners = []
    for axis, p in enumerate((zs, ys, xs)):
        m = coarse_shape[axis]
        f = (p + 0.5) / cells[axis] - 0.5
        i = np.clip(np.floor(f).astype(np.int64), 0, m - 1)
        if m == 1:
            corners.append(((i, 1.0),))
            continue
        t = np.clip(f - i, 0.0, 1.0)
        corners.append(((i, 1.0 - t), (np.minimum(i + 1, m - 1), t)))
    for jz, wz in corners[0]:
        for jy, wy in corners[1]:
            for jx, wx in corners[2]:
                expected += wz * wy * wx * coarse[jz, jy, jx]
    got = _interpolate_at(coarse, cells, zs, ys, xs)
    assert np.array_equal(got.view(np.int32), expected.astype(np.float32).view(np.int32))


def test_tiles_backgrounds_at_once_are_each_tiles():
    """``detection.background_boxes`` (a frame's tiles' backgrounds in one go, as the
    joint fits of a large frame take them) gives each tile's ``background_box`` bit
    for bit: tiles inside the block, at its edges and hanging over them (clipped)."""
    from spotfit.background import Background

    rng = np.random.default_rng(7)
    ny, nx = 150, 230  # non-square
    yy, xx = np.mgrid[:ny, :nx]
    frame = (BG + 5.0 * np.sin(xx / 23.0) + 0.05 * yy + rng.normal(0, 2.0, (ny, nx))).astype(np.float32)
    model = NoiseModel(read_var=4.0, shot=0.0, floor=1e-6, source="measured")
    bg = Background.estimate(frame[None], (0.0, 1.3, 1.3), model)
    piece = detection.BackgroundPiece((3, 5), (slice(0, ny - 3), slice(0, nx - 5)), bg, 2.5)
    shape = (40, 52)
    shifts = [(0, 0), (3, 5), (60, 100), (ny - 40, nx - 52), (120, 200), (-4, 190)]
    tiles = [piece.moved(s) for s in shifts]
    together = detection.background_boxes(tiles, shape)
    assert together.shape == (len(shifts),) + shape and together.dtype == np.float64
    for k, tile in enumerate(tiles):
        alone = detection.background_box([tile], (0, 0), shape)
        assert np.array_equal(together[k], alone), shifts[k]
    # and it follows the frame: a tile's pixel is the frame's pixel it was cut from
    assert np.array_equal(together[2], detection.background_box([piece], (60, 100), shape))
    assert np.ptp(together[2]) > 1.0  # (a background that varies, so the test can fail)
