"""Tests of spotfit.detection and spotfit.detect on simulated images with known truth.

Found spots are matched one-to-one to the truth within ``RADIUS`` (in
pixels) before counting; all images are non-square and seeded.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max

from spotfit import detect
from spotfit.camera import Camera
from spotfit.detection import (
    DEFAULT_THRESHOLD,
    _EdgeNoise,
    _local_maxima,
    default_min_distance,
    dog_filter,
    find_peaks,
)
from spotfit.errors import SpotfitInputError, SpotfitWarning
from spotfit.io import Image
from spotfit.match import detection_scores
from spotfit.simulation import DEFAULT_CAMERA, render, simulate

RADIUS = 1.5  # px: a detection within 1.5 px of a true centre counts as found
COLUMNS = ["frame", "x", "y", "score"]


def scores_per_frame(found, truth, cols=("x", "y"), scale=None):
    """Detection counts summed over frames (matching never crosses frames)."""
    scale = np.ones(len(cols)) if scale is None else np.asarray(scale)
    matched = n_found = n_truth = 0
    for t in sorted(set(truth["frame"]) | set(found["frame"])):
        f = found.loc[found["frame"] == t, list(cols)].to_numpy() / scale
        g = truth.loc[truth["frame"] == t, list(cols)].to_numpy() / scale
        s = detection_scores(f.reshape(-1, len(cols)), g.reshape(-1, len(cols)), RADIUS)
        matched += s["n_matched"]
        n_found += s["n_found"]
        n_truth += s["n_truth"]
    return matched / max(n_truth, 1), matched / max(n_found, 1)


# ------------------------------------------------------ recall / precision
@pytest.mark.parametrize(
    "photons, background",
    [
        (300.0, 50.0),  # faint: filtered peak SNR ~8 on average
        (5000.0, 10.0),  # bright
    ],
)
def test_recall_and_precision_with_defaults(photons, background):
    # 4 frames x 60 isolated spots (>= 10 px apart), PSF sigma 1.3 px
    img, truth = simulate(
        (4, 200, 300), n_spots=60, photons=photons, background=background, sigma=1.3,
        min_separation=10.0, seed=2024,
    )
    found = detect(img, camera=DEFAULT_CAMERA)
    recall, precision = scores_per_frame(found, truth)
    assert recall >= 0.98  # fraction of the 240 true spots
    assert precision >= 0.98  # fraction of the detections


def test_units_do_not_change_measured_scores():
    # without a calibration the noise is measured on the frame, in its units:
    # ADU with a baseline and photons give the same candidates and scores
    cam = Camera(baseline=100.0, gain=2.5)
    img, _ = simulate((90, 130), n_spots=20, photons=800, background=20, camera=cam, seed=3)
    in_adu = detect(img)  # raw ADU with the baseline
    in_photons = detect(cam.to_photons(img, np.float64))  # photons, noise still measured
    pd.testing.assert_frame_equal(in_photons[["frame", "x", "y"]], in_adu[["frame", "x", "y"]])
    np.testing.assert_allclose(in_photons["score"], in_adu["score"], rtol=1e-3)


def test_camera_noise_and_measured_noise_agree():
    # a calibrated camera's noise model and the noise measured on the frame
    # describe the same noise: same candidates, scores within 10 %
    cam = Camera(baseline=100.0, gain=2.5, read_noise=2.0)
    img, _ = simulate((2, 150, 190), n_spots=30, photons=1500, background=20, camera=cam,
                      min_separation=8.0, seed=3)
    with_camera = detect(img, camera=cam)
    measured = detect(img)
    pd.testing.assert_frame_equal(with_camera[["frame", "x", "y"]], measured[["frame", "x", "y"]])
    np.testing.assert_allclose(with_camera["score"], measured["score"], rtol=0.10)


@pytest.mark.parametrize("photons, background", [(1000.0, 50.0), (1000.0, 10.0)])
def test_spots_at_every_border_are_found(photons, background):
    # A spot centred on an edge pixel has only 62 % of its photons inside the
    # image (42 % in a corner), so its SNR is lower than inside: 300-photon
    # spots on 50 photons/px score ~6 on edges and ~5 in corners (~8 inside).
    ny, nx = 70, 110
    offsets = [0.0, 0.4, 1.0, 1.6, 2.0]  # distance of the centre from the edge pixel, px
    pos = []
    for i, d in enumerate(offsets):
        a = 12.0 + 18.0 * i  # position along the edge, away from the corners
        pos += [(a, d), (a, ny - 1 - d), (d, a * ny / nx + 6), (nx - 1 - d, a * ny / nx + 6)]
    pos += [(0.0, 0.0), (nx - 1.0, 0.0), (0.0, ny - 1.0), (nx - 1.0, ny - 1.0)]  # corners
    truth_xy = np.array(pos)
    img, truth = simulate(
        (3, ny, nx), positions=truth_xy, photons=photons, background=background, seed=17
    )
    found = detect(img, camera=DEFAULT_CAMERA)
    recall, precision = scores_per_frame(found, truth)
    assert recall == 1.0  # all 3 x 24 spots within 2 px of an edge
    assert precision == 1.0


@pytest.mark.parametrize(
    "background, camera",
    [
        (50.0, None),
        (10.0, Camera(baseline=100.0, gain=0.5, read_noise=1.5)),  # sCMOS-like
    ],
)
def test_pure_noise_gives_almost_no_detections(background, camera):
    # measured: 0.05-0.25 false candidates per 512 x 512 frame on average
    img, _ = simulate((512, 520), n_spots=0, background=background, camera=camera, seed=99)
    found = detect(img, camera=camera or DEFAULT_CAMERA)
    assert len(found) <= 3


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((40, 57)),
        np.full((40, 57), 100, dtype=np.uint16),
        np.full((2, 40, 57), 3.7, dtype=np.float32),
        np.full((2, 6, 40, 57), 1e4),
    ],
    ids=["zeros", "uint16-100", "tyx-float32", "tzyx"],
)
def test_constant_image_gives_no_spots_and_no_warnings(image):
    """No spots, no warnings -- except the one about a baseline above every pixel."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = detect(image)
        camera = Camera(baseline=100.0, gain=2.0)
        if np.all(image < 100):
            with pytest.warns(SpotfitWarning, match="baseline"):
                found_cam = detect(image, camera=camera)
        else:
            found_cam = detect(image, camera=camera)
    for table in (found, found_cam):
        assert len(table) == 0
        expected = COLUMNS[:3] + (["z"] if image.ndim == 4 else []) + ["score"]
        assert list(table.columns) == expected
        assert table["frame"].dtype == np.int64
        assert all(table[c].dtype == np.float64 for c in expected[1:])


def test_noise_free_rendering_finds_its_spots():
    xy = np.array([[10.2, 7.9], [40.0, 30.0], [71.6, 12.4]])
    img = render((45, 80), xy[:, 0], xy[:, 1], 500.0, 1.3)
    coords, score = find_peaks(img, 1.3)
    assert len(coords) == 3
    np.testing.assert_array_equal(np.sort(coords[:, 1]), np.rint(xy[:, 0]))


# ------------------------------------------------------------- stacks / API
def test_time_lapse_frames_and_order():
    pos = pd.DataFrame(
        {
            "frame": [0, 2, 2, 2, 3],
            "x": [30.0, 80.0, 10.0, 50.0, 5.0],
            "y": [20.0, 5.0, 40.0, 40.0, 33.0],
        }
    )
    img, truth = simulate((4, 48, 96), positions=pos, photons=2000, background=10, seed=1)
    found = detect(img, camera=DEFAULT_CAMERA)
    assert list(found.columns) == COLUMNS
    assert list(found["frame"]) == [0, 2, 2, 2, 3]  # frame 1 is empty
    # sorted by frame, then y, then x
    np.testing.assert_array_equal(found["y"], [20.0, 5.0, 40.0, 40.0, 33.0])
    np.testing.assert_array_equal(found["x"], [30.0, 80.0, 10.0, 50.0, 5.0])
    # a single 2D frame is frame 0; an Image and a nested list work as the array does
    single = detect(img[2], camera=DEFAULT_CAMERA)
    assert (single["frame"] == 0).all() and len(single) == 3
    pd.testing.assert_frame_equal(detect(Image.from_array(img, "TYX"), camera=DEFAULT_CAMERA), found)
    pd.testing.assert_frame_equal(detect(img.tolist(), camera=DEFAULT_CAMERA), found)


def test_z_stack_detection():
    sigma_z = 2.0  # planes
    img, truth = simulate(
        (2, 14, 48, 64), z_stack=True, sigma_z=sigma_z, n_spots=12, photons=3000,
        background=10, min_separation=10, seed=5,
    )
    found = detect(img, sigma=1.3, sigma_z=sigma_z, camera=DEFAULT_CAMERA)
    assert list(found.columns) == ["frame", "x", "y", "z", "score"]
    # match in (x, y, z / 2): 1.5 px laterally, 3 planes axially
    recall, precision = scores_per_frame(found, truth, ("x", "y", "z"), scale=(1, 1, 2))
    assert recall >= 0.95 and precision >= 0.95  # of 24 spots
    # one z-stack given with its axes
    one = detect(Image.from_array(img[1:], "TZYX"), sigma=1.3, sigma_z=2.0, camera=DEFAULT_CAMERA)
    zyx = detect(img[1], sigma=1.3, sigma_z=2.0, camera=DEFAULT_CAMERA, axes="ZYX")
    pd.testing.assert_frame_equal(one, zyx)
    assert default_min_distance((2.0, 1.3, 1.3)) == (3, 2, 2)


def test_min_distance_merges_close_spots():
    img = render((40, 61), [25.0, 31.0], [20.0, 20.0], 5000.0, 1.3, background=10.0)
    noisy = np.random.default_rng(0).poisson(img).astype(np.float32)
    assert default_min_distance(1.3) == 2
    assert len(find_peaks(noisy, 1.3)[0]) == 2  # 6 px apart: resolved
    coords, _ = find_peaks(noisy, 1.3, min_distance=7)
    assert len(coords) == 1


def test_find_peaks_output_types_and_order():
    img, _ = simulate((60, 75), n_spots=8, photons=(300, 3000), background=10, seed=8)
    coords, score = find_peaks(DEFAULT_CAMERA.to_photons(img), 1.3)
    assert coords.dtype.kind == "i" and coords.shape == (len(score), 2)
    assert score.dtype == np.float64
    assert np.all(np.diff(score) <= 0)  # decreasing score
    assert np.all(score > DEFAULT_THRESHOLD)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.3), "sigma"),
        (dict(sigma=np.nan), "sigma"),
        (dict(sigma="wide"), "sigma"),
        (dict(sigma=(1.0, 1.0, 1.0)), "sigma"),  # one lateral sigma, plus sigma_z
        (dict(sigma=True), "sigma"),
        (dict(sigma_z=-2.0), "sigma_z"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=-2.0), "threshold"),
        (dict(min_distance=0), "min_distance"),
        (dict(min_distance=1.5), "min_distance"),
    ],
)
def test_invalid_options_name_the_parameter(kwargs, name):
    with pytest.raises(SpotfitInputError, match=f"^{name} must be") as info:
        detect(np.zeros((2, 20, 30)), **kwargs)
    assert info.value.parameter == name


def test_find_peaks_errors_name_the_parameter():
    with pytest.raises(SpotfitInputError, match="^sigma must be > 0") as info:
        find_peaks(np.zeros((20, 30)), -1.0)
    assert info.value.parameter == "sigma"
    with pytest.raises(SpotfitInputError, match="^threshold must be > 0"):
        find_peaks(np.zeros((20, 30)), 1.3, threshold=0)


def test_bad_images_are_rejected():
    with pytest.raises(SpotfitInputError, match="5 channels .* choose one with `channel`"):
        detect(np.zeros((5, 20, 30)), axes="CYX")  # as fit: axes and channel of any layout
    assert len(detect(np.zeros((5, 20, 30)), axes="CYX", channel=1)) == 0
    with pytest.raises(SpotfitInputError, match="pass axes"):
        detect(np.zeros((2, 2, 5, 20, 30)))
    with pytest.raises(SpotfitInputError, match="NaN"):
        detect(np.full((20, 30), np.nan))


# ------------------------------------------------------ building blocks
def test_dog_filter_matches_scipy_gaussian_filters():
    rng = np.random.default_rng(4)
    for shape, sigma in [((50, 73), (1.3, 1.3)), ((9, 30, 41), (2.0, 1.2, 1.2))]:
        data = rng.normal(0.0, 1.0, shape).astype(np.float32)
        ours = dog_filter(data, sigma)
        ref = ndimage.gaussian_filter(data, sigma, mode="reflect") - ndimage.gaussian_filter(
            data, [3.0 * s for s in sigma], mode="reflect"
        )
        assert ours.dtype == np.float32 and ours.shape == shape
        # different kernel truncation only: < 0.2 % of the filtered noise
        assert np.abs(ours - ref).max() < 2e-3 * ref.std()


def test_local_maxima_match_peak_local_max_including_ties():
    rng = np.random.default_rng(5)
    for shape in [(61, 87), (12, 30, 26)]:
        data = rng.normal(0.0, 1.0, shape).astype(np.float32)
        filtered = np.round(dog_filter(data, 1.0) * 20) / 20  # plateaus make ties
        t = 0.5 * filtered.std()
        cand = np.flatnonzero(filtered.ravel() > t)
        for r in (1, 2, 3):
            peaks = _local_maxima(filtered, cand, (r,) * len(shape))
            ours = np.column_stack(np.unravel_index(cand[peaks], shape))
            ref = peak_local_max(filtered, min_distance=r, threshold_abs=t, exclude_border=False)
            np.testing.assert_array_equal(ours, ref)


def test_edge_noise_model_matches_filtered_white_noise():
    shape, sigma, n = (36, 47), (1.3, 1.3), 400
    rng = np.random.default_rng(6)
    var = np.zeros(shape)
    for _ in range(n):
        var += dog_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma) ** 2
    std = np.sqrt(var / n)
    edge = _EdgeNoise(shape, sigma)
    model = edge.relative(np.ix_(np.arange(36), np.arange(47))) * np.sqrt(edge._v_inf)
    assert model[18, 23] == pytest.approx(np.sqrt(edge._v_inf), rel=1e-6)  # interior
    assert model[0, 0] > 1.7 * model[18, 23]  # corners are noisier,
    assert model[0, 23] > 1.3 * model[18, 23]  # and edge rows
    # per pixel: within 4 standard errors (1 / sqrt(2 n) = 3.5 %)
    np.testing.assert_allclose(std, model, rtol=0.14)
    # averaged over the 3-px edge band (~500 correlated pixels): within 2 %
    band = np.ones(shape, dtype=bool)
    band[3:-3, 3:-3] = False
    assert (std[band] / model[band]).mean() == pytest.approx(1.0, abs=0.02)


def test_close_pairs_are_the_k_d_trees_pairs():
    """detection._close_pairs (offset lookups, so that detection need not import
    scipy.spatial) finds exactly the pairs the k-d tree found: closer than the radius
    on every axis, in 2D and 3D, with equal and unequal radii, crowded and sparse,
    at the edges; and with radii too large for offset lookups (the k-d tree itself)."""
    from scipy.spatial import cKDTree

    from spotfit.detection import _close_pairs

    rng = np.random.default_rng(11)
    cases = [((37, 52), (2, 2)), ((37, 52), (3, 3)), ((9, 11), (2, 4)), ((5, 23, 31), (1, 2, 2)),
             ((6, 14, 19), (2, 3, 3)), ((40, 44), (20, 20))]
    for shape, radii in cases:
        for n in (2, 30, 300):
            flat = rng.choice(int(np.prod(shape)), size=min(n, int(np.prod(shape))), replace=False)
            coords = np.column_stack(np.unravel_index(flat, shape))
            scaled = coords / np.asarray(radii, dtype=float)
            want = cKDTree(scaled).query_pairs(1 - 0.5 / max(radii), p=np.inf, output_type="ndarray")
            got = _close_pairs(coords, shape, radii)
            as_set = lambda p: {tuple(sorted(map(int, q))) for q in p}  # noqa: E731
            assert as_set(got) == as_set(want), (shape, radii, n)
            assert len(got) == len(as_set(got))  # each pair once
            d = np.abs(coords[:, None, :] - coords[None, :, :])
            brute = np.all(d <= np.asarray(radii) - 1, axis=2) & ~np.eye(len(coords), dtype=bool)
            assert len(got) == brute.sum() // 2


def test_screen_with_a_box_keeps_exactly_the_box_maxima_above_the_limit():
    # the fused screen (threshold and box maximum in one pass over the frame)
    # against scipy: pixels above their cell's limit that equal the maximum of
    # their box clipped at the edges (= a maximum filter with nearest edges)
    from spotfit.detection import _above

    rng = np.random.default_rng(11)
    for shape, cells, radii in [((1, 53, 71), (1, 3, 3), (0, 2, 2)),
                                ((1, 40, 37), (1, 2, 4), (0, 1, 3)),
                                ((9, 23, 31), (2, 3, 3), (1, 2, 2))]:
        volume = np.round(rng.normal(0.0, 1.0, shape) * 4).astype(np.float32) / 4  # plateaus: ties
        coarse = tuple(-(-n // c) for n, c in zip(shape, cells))
        limit = rng.uniform(-0.5, 1.0, coarse).astype(np.float32)
        per_pixel = limit
        for axis, c in enumerate(cells):
            per_pixel = np.repeat(per_pixel, c, axis=axis)
        per_pixel = per_pixel[: shape[0], : shape[1], : shape[2]]
        box = ndimage.maximum_filter(volume, size=[2 * r + 1 for r in radii], mode="nearest")
        expected = np.flatnonzero((volume > per_pixel) & (volume >= box))
        found = _above(volume, limit, np.array(cells, np.int64), np.array(radii, np.int64))
        np.testing.assert_array_equal(found, expected)
        # without a box: every pixel above its limit
        found = _above(volume, limit, np.array(cells, np.int64), np.zeros(3, np.int64))
        np.testing.assert_array_equal(found, np.flatnonzero(volume > per_pixel))


def _folded_sums_by_sparse_matrix(n, sigma, wide):
    """The edge-noise sums as they were computed with ``scipy.sparse`` (a folded kernel
    matrix per Gaussian): the reference of :func:`spotfit.filters._folded_row_sums`."""
    import math

    from scipy.sparse import csr_matrix

    reach = int(math.ceil(4.0 * wide))
    k = np.arange(-reach, reach + 1)
    g1 = np.exp(-0.5 * (k / sigma) ** 2)
    g1 /= g1.sum()
    g2 = np.exp(-0.5 * (k / wide) ** 2)
    g2 /= g2.sum()
    m = np.mod(np.arange(n)[:, None] + k[None, :], 2 * n)
    cols = np.where(m < n, m, 2 * n - 1 - m).ravel()
    rows = np.repeat(np.arange(n), k.size)
    k1 = csr_matrix((np.tile(g1, n), (rows, cols)), shape=(n, n))
    k2 = csr_matrix((np.tile(g2, n), (rows, cols)), shape=(n, n))
    return [np.asarray(p.multiply(q).sum(axis=1)).ravel() for p, q in ((k1, k1), (k1, k2), (k2, k2))]


@pytest.mark.parametrize("sigma", [0.4, 0.91, 1.3, 2.6])
def test_edge_noise_sums_are_the_sparse_matrix_ones_bit_for_bit(sigma):
    """The edge-noise sums no longer build scipy.sparse matrices (importing scipy.sparse
    was a tenth of a small fit's run): same operations in the same order, same bits, on
    axes longer and shorter than the kernel's reach (the latter still use scipy.sparse)."""
    from spotfit.filters import DOG_RATIO, _folded_sums

    wide = DOG_RATIO * sigma
    for n in (1, 2, 5, 9, 16, 17, 31, 64, 127, 500, 2049):
        _folded_sums.cache_clear()
        ours = _folded_sums(n, sigma, wide)[0]
        for got, want in zip(ours, _folded_sums_by_sparse_matrix(n, sigma, wide)):
            assert got.dtype == want.dtype and got.shape == (n,)
            np.testing.assert_array_equal(got, want, err_msg=f"n={n}, sigma={sigma}")
    _folded_sums.cache_clear()
