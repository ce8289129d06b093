"""Tests of spotfit.simulation: rendering, placement, noise, camera, files."""

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.special import ndtr

from spotfit.camera import Camera
from spotfit.errors import SpotfitInputError, SpotfitWarning
from spotfit.simulation import DEFAULT_CAMERA, render, simulate, write_simulation

SHAPE = (40, 53)  # (ny, nx): never square, so x/y swaps show


# ---------------------------------------------------------------- render
@pytest.mark.parametrize(
    "sigma_x, sigma_y, angle",
    [(1.3, None, 0.0), (0.8, 2.1, 0.0), (1.0, 2.0, 0.6), (2.0, 1.2, -2.0)],
)
def test_render_integrates_to_photons(sigma_x, sigma_y, angle):
    img = render(SHAPE, 26.3, 19.7, 1000.0, sigma_x, sigma_y, angle)
    assert img.shape == SHAPE and img.dtype == np.float64
    assert img.sum() == pytest.approx(1000.0, rel=0.005)  # 0.5 % of the photons
    assert np.all(img >= 0)


def test_render_places_x_on_columns_and_y_on_rows():
    img = render(SHAPE, x=45.0, y=7.0, photons=100.0, sigma_x=1.0)
    assert np.unravel_index(np.argmax(img), img.shape) == (7, 45)


@pytest.mark.parametrize("sigma", [1.0, 1.3, 2.0])
def test_erf_and_supersampled_agree_for_axis_aligned(sigma):
    kw = dict(x=[20.2, 7.0, 51.6], y=[13.4, 30.5, 0.2], photons=[500.0, 800.0, 300.0])
    exact = render(SHAPE, sigma_x=sigma, sigma_y=1.2 * sigma, method="erf", **kw)
    sampled = render(SHAPE, sigma_x=sigma, sigma_y=1.2 * sigma, method="supersample", **kw)
    # midpoint rule with 7x7 sub-pixels: error < 0.2 % of the peak pixel for sigma >= 1 px
    assert np.abs(exact - sampled).max() < 0.002 * exact.max()


def test_rotated_spot_has_the_rotated_covariance():
    sx, sy, angle = 2.5, 1.2, 0.5
    img = render((61, 67), 33.2, 30.4, 1.0, sx, sy, angle)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    w = img / img.sum()
    mx, my = (w * xx).sum(), (w * yy).sum()
    cov = np.array(
        [
            [(w * (xx - mx) ** 2).sum(), (w * (xx - mx) * (yy - my)).sum()],
            [(w * (xx - mx) * (yy - my)).sum(), (w * (yy - my) ** 2).sum()],
        ]
    )
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # pixel integration adds a box of variance 1/12 px^2 per axis
    expected = rot @ np.diag([sx**2, sy**2]) @ rot.T + np.eye(2) / 12
    assert (mx, my) == (pytest.approx(33.2, abs=1e-3), pytest.approx(30.4, abs=1e-3))
    np.testing.assert_allclose(cov, expected, atol=0.01)  # px^2
    # the same spot described with swapped axes and angle + pi/2
    same = render((61, 67), 33.2, 30.4, 1.0, sy, sx, angle + np.pi / 2)
    np.testing.assert_allclose(same, img, atol=1e-12)


def test_render_3d_integrates_and_profiles_z():
    img = render((15, 30, 34), 16.0, 14.5, 2000.0, 1.3, z=7.0, sigma_z=2.0)
    assert img.shape == (15, 30, 34)
    assert img.sum() == pytest.approx(2000.0, rel=0.005)
    planes = img.sum(axis=(1, 2))
    assert np.argmax(planes) == 7
    # symmetric about plane 7 (z = 7 is a plane centre)
    np.testing.assert_allclose(planes[:7], planes[8:][::-1], rtol=1e-9)


def test_render_edge_spot_loses_outside_flux_and_background_adds():
    img = render(SHAPE, 0.0, 0.0, 400.0, 1.3, background=2.5)
    # centred on the corner pixel: the image starts 0.5 px before the centre
    inside = ndtr(0.5 / 1.3) ** 2
    assert img.sum() - 2.5 * img.size == pytest.approx(400.0 * inside, rel=1e-6)


def test_render_wide_spot_outside_the_image_adds_its_tail():
    # centre 30 px left of a 12 x 10 image, sigma 20 px: exact erf product
    img = render((10, 12), -30.0, 5.0, 1e4, 20.0)
    x, y = np.arange(12), np.arange(10)
    px = ndtr((x + 0.5 + 30) / 20) - ndtr((x - 0.5 + 30) / 20)
    py = ndtr((y + 0.5 - 5) / 20) - ndtr((y - 0.5 - 5) / 20)
    np.testing.assert_allclose(img, 1e4 * np.outer(py, px), rtol=1e-9)


def test_render_many_spots_equals_sum_of_single_spots():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-2, 55, 30), rng.uniform(-2, 42, 30)
    ph = rng.uniform(100, 900, 30)
    together = render(SHAPE, x, y, ph, 1.4, 1.9, 0.3)
    apart = sum(render(SHAPE, x[i], y[i], ph[i], 1.4, 1.9, 0.3) for i in range(30))
    np.testing.assert_allclose(together, apart, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(photons=-1.0), "photons"),
        (dict(sigma_x=0.0), "sigma_x"),
        (dict(sigma_y=-1.0), "sigma_y"),
        (dict(x=np.nan), "x must be finite"),
        (dict(x=[1.0, 2.0], y=[1.0, 2.0, 3.0]), "different lengths"),
        (dict(z=1.0, sigma_z=1.0), "3D shape"),
        (dict(angle=0.5, sigma_y=2.0, method="erf"), "axis-aligned"),
    ],
)
def test_render_validation(kwargs, match):
    args = dict(x=5.0, y=5.0, photons=10.0, sigma_x=1.0)
    args.update(kwargs)
    with pytest.raises(SpotfitInputError, match=match):
        render(SHAPE, **args)


# ---------------------------------------------------------------- simulate
def test_truth_table_columns_and_ranges():
    img, truth = simulate(
        (3, 40, 70), n_spots=12, photons=(200, 900), background=5.0, sigma_x=1.1,
        sigma_y=1.6, angle="random", border=3.0, seed=11,
    )
    assert img.shape == (3, 40, 70) and img.dtype == np.uint16
    assert list(truth.columns) == [
        "frame", "x", "y", "intensity", "sigma_x", "sigma_y", "angle", "offset"
    ]
    assert truth["frame"].dtype == np.int64
    assert truth.groupby("frame").size().to_dict() == {0: 12, 1: 12, 2: 12}
    assert truth["x"].between(3.0, 70 - 1 - 3.0).all()
    assert truth["y"].between(3.0, 40 - 1 - 3.0).all()
    assert truth["intensity"].between(200, 900).all()
    assert (truth["sigma_x"] == 1.1).all() and (truth["sigma_y"] == 1.6).all()
    assert truth["angle"].between(0, np.pi).all() and truth["angle"].nunique() == 36
    assert (truth["offset"] == 5.0).all()


def test_truth_matches_image():
    # bright spots without background: each truth position is the centroid
    # of the counts around it (to 0.05 px)
    img, truth = simulate(
        (48, 64), n_spots=6, photons=1e5, background=0.0, min_separation=12, border=6,
        seed=2, dtype="float64",
    )
    counts = DEFAULT_CAMERA.to_photons(img, np.float64)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    assert counts.sum() == pytest.approx(truth["intensity"].sum(), rel=0.01)
    for row in truth.itertuples():
        near = (xx - row.x) ** 2 + (yy - row.y) ** 2 < 5.0**2
        w = counts * near
        assert (w * xx).sum() / w.sum() == pytest.approx(row.x, abs=0.05)
        assert (w * yy).sum() / w.sum() == pytest.approx(row.y, abs=0.05)


def test_seeds_are_reproducible():
    a_img, a_truth = simulate((30, 41), n_spots=5, seed=123)
    b_img, b_truth = simulate((30, 41), n_spots=5, seed=123)
    c_img, _ = simulate((30, 41), n_spots=5, seed=124)
    np.testing.assert_array_equal(a_img, b_img)
    pd.testing.assert_frame_equal(a_truth, b_truth)
    assert not np.array_equal(a_img, c_img)
    d_img, _ = simulate((30, 41), n_spots=5, seed=np.random.default_rng(123))
    np.testing.assert_array_equal(a_img, d_img)


def test_min_separation_is_honoured():
    _, truth = simulate((2, 80, 120), n_spots=60, min_separation=9.0, seed=5)
    for _, frame in truth.groupby("frame"):
        xy = frame[["x", "y"]].to_numpy()
        d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
        assert d[np.triu_indices(len(xy), 1)].min() >= 9.0


def test_impossible_min_separation_is_reported():
    with pytest.raises(SpotfitInputError, match="n_spots 500 cannot be placed with min_separation 10"):
        simulate((60, 90), n_spots=500, min_separation=10, seed=0)


@pytest.mark.parametrize(
    "camera",
    [
        Camera(baseline=100.0, gain=2.0, read_noise=3.0),
        Camera(baseline=500.0, gain=10.0, em_gain=50.0, read_noise=40.0),
        None,
    ],
)
def test_flat_image_mean_and_variance_follow_camera(camera):
    bg = 20.0
    img, truth = simulate((256, 300), n_spots=0, background=bg, camera=camera, seed=9)
    assert len(truth) == 0
    cam = DEFAULT_CAMERA if camera is None else camera
    expected_adu = cam.baseline + bg * cam.em_gain / cam.gain
    # mean of 76 800 pixels: standard error < 0.05 ADU here; allow 0.1 %
    assert img.mean() == pytest.approx(expected_adu, rel=1e-3)
    # round trip to photons: mean bg, variance excess * bg + read variance
    # (+ the rounding to whole ADU, 1/12 ADU^2, in photons^2)
    photons = cam.to_photons(img, np.float64)
    assert photons.mean() == pytest.approx(bg, rel=0.01)
    rounding = (cam.gain / cam.em_gain) ** 2 / 12
    expected_var = cam.excess_noise * bg + cam.read_variance() + rounding
    assert photons.var() == pytest.approx(expected_var, rel=0.03)  # ~3 standard errors


def test_integer_output_is_clipped_to_dtype_with_a_warning():
    with pytest.warns(SpotfitWarning, match=r"exceed the uint8 maximum \(255 ADU\)"):
        img, _ = simulate((20, 30), n_spots=3, photons=1e6, background=0.0, seed=1,
                          dtype="uint8")
    assert img.dtype == np.uint8 and img.max() == 255


def test_explicit_positions_on_non_square_image():
    pos = pd.DataFrame({"frame": [0, 1, 1], "x": [50.0, 3.0, 60.0], "y": [10.0, 15.0, 2.0],
                        "intensity": [5e4, 5e4, 5e4]})
    img, truth = simulate((2, 20, 64), positions=pos, background=0.0, seed=4, dtype="float32")
    assert list(truth["frame"]) == [0, 1, 1]
    np.testing.assert_array_equal(truth["x"], pos["x"])
    assert np.unravel_index(np.argmax(img[0]), img[0].shape) == (10, 50)
    # an (n, 2) array is used in every frame
    img, truth = simulate((3, 20, 64), positions=[[5.0, 6.0]], seed=4)
    assert list(truth["frame"]) == [0, 1, 2] and (truth["x"] == 5.0).all()


def test_z_stack():
    img, truth = simulate(
        (2, 9, 30, 40), z_stack=True, sigma_z=1.8, n_spots=4, photons=3000, seed=8
    )
    assert img.shape == (2, 9, 30, 40)
    assert list(truth.columns) == [
        "frame", "x", "y", "z", "intensity", "sigma_x", "sigma_y", "sigma_z", "angle",
        "offset",
    ]
    assert truth["z"].between(0, 8).all() and (truth["sigma_z"] == 1.8).all()
    with pytest.raises(SpotfitInputError, match="^sigma_z"):
        simulate((9, 30, 40), z_stack=True, n_spots=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(photons=-5.0), "photons"),
        (dict(photons=(500, 100)), "photons"),
        (dict(background=-1.0), "background"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma_y=-1.0), "sigma_y"),
        (dict(border=-1.0), "border"),
        (dict(border=15.0), "border"),
        (dict(min_separation=-2.0), "min_separation"),
        (dict(n_spots=-1), "n_spots"),
        (dict(angle="sideways"), "angle"),
        (dict(positions=[[1.0, 2.0]]), "n_spots"),
        (dict(shape=(5, 5, 5, 5)), "shape"),
        (dict(dtype="U8"), "dtype"),
        (dict(positions=pd.DataFrame({"x": [1.0], "y": [2.0], "photons": [9.0]}), n_spots=None),
         "positions"),
    ],
)
def test_simulate_validation(kwargs, match):
    """Errors name the Python parameter, first in the message and as ``.parameter``."""
    args = dict(shape=(25, 31), n_spots=3, seed=0)
    args.update(kwargs)
    with pytest.raises(SpotfitInputError, match=f"^(give either )?{match}") as info:
        simulate(**args)
    assert info.value.parameter == match


def test_write_simulation_round_trip(tmp_path):
    img, truth = simulate((2, 24, 35), n_spots=4, seed=6)
    tif, csv = tmp_path / "sim.tif", tmp_path / "sim.csv"
    write_simulation(tif, csv, img, truth, "TYX")
    with tifffile.TiffFile(tif) as f:
        assert f.series[0].axes == "TYX"
        np.testing.assert_array_equal(f.asarray(), img)
    back = pd.read_csv(csv)
    pd.testing.assert_frame_equal(back, truth, check_dtype=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.csv", "sim.tif"]
    with pytest.raises(SpotfitInputError):
        write_simulation(tmp_path / "a.tif", tmp_path / "missing" / "a.csv", img, truth, "TYX")
    assert not (tmp_path / "a.tif").exists()
