"""Tests for rendering localisations into images (spotfit.rendering, ``spotfit render``).

Known answers: sums of counts (every localisation adds exactly 1), the
centroid and second moments of a single localisation's Gaussian, and the
geometry of the grid (a camera pixel is an m x m block of output pixels).
Fields are never square (NY != NX) so that x/y mix-ups show.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.table
from spotfit.cli import main
from spotfit.errors import SpotfitInputError
from spotfit.rendering import colour_preview, draw, prepare, render

NY, NX = 23, 37          # camera image, px: never square
CAM = 160.0              # nm per camera pixel
OUT = 20.0               # nm per output pixel
M = CAM / OUT            # 8 output pixels per camera pixel
CENTROID_TOL = 0.01      # output px


def table(x, y, **columns):
    """A spotfit-like table: converged rows with positions (camera px)."""
    n = len(np.atleast_1d(x))
    data = {"frame": np.zeros(n, dtype=int), "x": x, "y": y,
            "x_err": np.full(n, 0.1), "y_err": np.full(n, 0.1),
            "intensity": np.full(n, 1000.0), "status": ["converged"] * n}
    data.update(columns)
    return pd.DataFrame(data)


def uniform_table(n, seed, border=0.0, **columns):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5 + border, NX - 0.5 - border, n)
    y = rng.uniform(-0.5 + border, NY - 0.5 - border, n)
    return table(x, y, **columns)


def to_output(v):
    """Camera px -> output px (0-based centres), the documented mapping."""
    return (np.asarray(v) + 0.5) * M - 0.5


def centroid(image):
    yy, xx = np.indices(image.shape)
    s = image.sum(dtype=np.float64)
    return (image * xx).sum(dtype=np.float64) / s, (image * yy).sum(dtype=np.float64) / s


# ---------------------------------------------------------------------------
# histogram
# ---------------------------------------------------------------------------
def test_histogram_counts_every_localisation_and_duplicates():
    t = uniform_table(5000, seed=1)
    image = render(t, OUT, method="histogram", camera_pixel_size=CAM, shape=(NY, NX))
    assert image.dtype == np.float32
    assert image.shape == (NY * M, NX * M)
    assert image.sum(dtype=np.float64) == 5000

    # two localisations in the same output pixel count twice (and three, thrice)
    same = table([10.01, 10.02, 4.0, 10.03], [7.01, 7.02, 3.0, 7.015])
    image = render(same, OUT, method="histogram", camera_pixel_size=CAM, shape=(NY, NX))
    row, col = int(np.floor(to_output(7.01) + 0.5)), int(np.floor(to_output(10.01) + 0.5))
    assert image[row, col] == 3
    assert image.sum() == 4
    # the naive one-liner loses them: only one count survives in that pixel
    naive = np.zeros_like(image)
    u = np.floor(to_output(same["x"]) + 0.5).astype(int)
    v = np.floor(to_output(same["y"]) + 0.5).astype(int)
    naive[v, u] = 1
    assert naive.sum() == 2


def test_a_camera_pixel_is_an_m_by_m_block_of_output_pixels():
    """Localisations filling camera pixel (x=3, y=2) land in output rows 16..23, cols 24..31."""
    rng = np.random.default_rng(2)
    x = 3 + rng.uniform(-0.5, 0.5, 2000)
    y = 2 + rng.uniform(-0.5, 0.5, 2000)
    image = render(table(x, y), OUT, method="histogram", camera_pixel_size=CAM, shape=(NY, NX))
    rows, cols = np.nonzero(image)
    assert rows.min() == 2 * M and rows.max() == 3 * M - 1
    assert cols.min() == 3 * M and cols.max() == 4 * M - 1
    assert np.count_nonzero(image) == M * M  # the whole block, nothing else


def test_positions_outside_the_field_are_left_out():
    t = table([-0.6, 0.0, NX - 0.5, NX - 0.51, 5.0], [3.0, 3.0, 3.0, 3.0, NY - 0.5])
    points = prepare(t, OUT, method="histogram", camera_pixel_size=CAM, shape=(NY, NX))
    assert points.counts["outside"] == 3 and points.n == 2
    assert draw(points).sum() == 2


# ---------------------------------------------------------------------------
# gaussian
# ---------------------------------------------------------------------------
def test_gaussian_conserves_counts_inside_and_loses_only_at_the_border():
    rng = np.random.default_rng(3)
    inner = uniform_table(3000, seed=4, border=1.0,
                          x_err=rng.uniform(0.03, 0.2, 3000), y_err=rng.uniform(0.03, 0.2, 3000))
    image = render(inner, OUT, camera_pixel_size=CAM, shape=(NY, NX))
    # every kernel (<= 4 sigma = 0.8 camera px) lies inside: the sum is exact
    assert image.sum(dtype=np.float64) == pytest.approx(3000, rel=1e-5)

    edge = table([0.0 - 0.5, 10.0], [5.0, NY - 0.5 - 1e-9], x_err=[0.1, 0.1], y_err=[0.1, 0.1])
    image = render(edge, OUT, camera_pixel_size=CAM, shape=(NY, NX), status="all")
    # each sits on the border: about half of it is lost
    assert image.sum(dtype=np.float64) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("sigma_px", [0.5, 0.8, 1.5, 3.0])
def test_isolated_localisation_centroid_is_at_its_position(sigma_px):
    rng = np.random.default_rng(int(sigma_px * 10))
    err = sigma_px / M  # camera px
    for _ in range(20):
        x, y = rng.uniform(5, NX - 5), rng.uniform(5, NY - 5)
        image = render(table([x], [y], x_err=[err], y_err=[err]), OUT, camera_pixel_size=CAM,
                       shape=(NY, NX), min_sigma=0)
        assert image.sum(dtype=np.float64) == pytest.approx(1.0, rel=1e-6)
        cx, cy = centroid(image)
        assert abs(cx - to_output(x)) < CENTROID_TOL
        assert abs(cy - to_output(y)) < CENTROID_TOL


def test_widths_are_each_localisations_precision_with_a_floor():
    x, y = 17.3, 11.6
    image = render(table([x], [y], x_err=[0.4], y_err=[0.2]), OUT, camera_pixel_size=CAM,
                   shape=(NY, NX))
    yy, xx = np.indices(image.shape)
    cx, cy = centroid(image)
    var_x = (image * (xx - cx) ** 2).sum() / image.sum()
    var_y = (image * (yy - cy) ** 2).sum() / image.sum()
    # pixel-integrated Gaussian: variance sigma^2 + 1/12 (px^2); sigma = err * M
    assert var_x == pytest.approx((0.4 * M) ** 2 + 1 / 12, rel=0.01)
    assert var_y == pytest.approx((0.2 * M) ** 2 + 1 / 12, rel=0.01)

    # a tiny error is floored at --min-sigma (nm)
    points = prepare(table([x], [y], x_err=[1e-6], y_err=[0.5]), OUT, camera_pixel_size=CAM,
                     shape=(NY, NX), min_sigma=50.0)
    assert points.sigma_x[0] == pytest.approx(50.0 / OUT)
    assert points.sigma_y[0] == pytest.approx(0.5 * CAM / OUT)
    # a fixed width replaces the errors
    points = prepare(table([x], [y]), OUT, camera_pixel_size=CAM, sigma=30.0)
    assert points.sigma_x[0] == points.sigma_y[0] == pytest.approx(1.5)


def test_3d_stack_conserves_counts_and_places_z():
    rng = np.random.default_rng(5)
    n = 400
    nz, dz_cam, dz_out = 9, 300.0, 100.0
    t = uniform_table(n, seed=6, border=1.5, z=rng.uniform(1.5, nz - 2.5, n),
                      z_err=rng.uniform(0.05, 0.2, n))
    hist = render(t, OUT, method="histogram", z_step=dz_out, camera_pixel_size=CAM,
                  camera_z_step=dz_cam, shape=(nz, NY, NX))
    assert hist.shape == (nz * 3, NY * M, NX * M)
    assert hist.sum() == n
    gauss = render(t, OUT, z_step=dz_out, camera_pixel_size=CAM, camera_z_step=dz_cam,
                   shape=(nz, NY, NX))
    assert gauss.sum(dtype=np.float64) == pytest.approx(n, rel=1e-5)

    z = 4.37
    one = render(table([20.2], [9.9], z=[z], z_err=[0.5]), OUT, z_step=dz_out,
                 camera_pixel_size=CAM, camera_z_step=dz_cam, shape=(nz, NY, NX))
    profile = one.sum(axis=(1, 2), dtype=np.float64)
    zc = (profile * np.arange(profile.size)).sum() / profile.sum()
    assert abs(zc - ((z + 0.5) * dz_cam / dz_out - 0.5)) < CENTROID_TOL


# ---------------------------------------------------------------------------
# filters, units, field
# ---------------------------------------------------------------------------
def test_filters_and_their_counts():
    t = table([1.0, 2.0, 3.0, 4.0, 5.0, np.nan], [1.0] * 6,
              status=["converged", "low_signal", "converged", "converged", "converged",
                      "converged"],
              intensity=[100.0, 500.0, 50.0, 800.0, 900.0, 900.0],
              x_err=[0.1, 0.1, 0.1, 0.5, 0.1, 0.1])
    original = t.copy()
    points = prepare(t, OUT, camera_pixel_size=CAM, shape=(NY, NX), min_intensity=80,
                     max_err=30.0)
    assert points.counts == {"read": 6, "status": 1, "min_intensity": 1, "max_err": 1,
                             "not_finite": 1, "outside": 0, "kept": 2}
    np.testing.assert_allclose(points.x, to_output([1.0, 5.0]))
    pd.testing.assert_frame_equal(t, original)  # the caller's table is not modified
    assert prepare(t, OUT, camera_pixel_size=CAM, status="all").counts["status"] == 0
    assert prepare(t, OUT, camera_pixel_size=CAM, status="low_signal,converged").n == 5


def test_camera_pixel_size_from_the_um_columns_or_a_clear_error():
    t = uniform_table(50, seed=7)
    with pytest.raises(SpotfitInputError, match="camera_pixel_size"):
        prepare(t, OUT)
    t = spotfit.table.add_physical_units(t, CAM / 1000)
    points = prepare(t, OUT, shape=(NY, NX))
    assert points.scale == pytest.approx(M, rel=1e-7)
    with pytest.raises(SpotfitInputError, match="'z' column"):
        prepare(t, OUT, z_step=100.0)


def test_field_defaults_to_the_last_localisation():
    t = table([10.2, 30.6], [4.0, 12.4])
    # x = 30.6 lies in pixel 31 ([30.5, 31.5)): 32 columns; y = 12.4 in row 12: 13 rows
    assert prepare(t, OUT, camera_pixel_size=CAM).shape == (13 * M, 32 * M)


def test_colour_preview_hue_follows_time():
    early = table([5.0] * 10, [5.0] * 10, frame=np.zeros(10, dtype=int))
    late = table([30.0] * 10, [15.0] * 10, frame=np.full(10, 99))
    points = prepare(pd.concat([early, late]), OUT, camera_pixel_size=CAM, shape=(NY, NX),
                     keep=("frame",))
    rgb, limits = colour_preview(points, "time")
    assert rgb.shape == (NY * M, NX * M, 3) and rgb.dtype == np.uint8
    assert limits == (0.0, 99.0)
    first = rgb[int(to_output(5.0) + 0.5), int(to_output(5.0) + 0.5)].astype(int)
    last = rgb[int(to_output(15.0) + 0.5), int(to_output(30.0) + 0.5)].astype(int)
    assert first[2] > first[0]   # turbo: early = blue
    assert last[0] > last[2]     # late = red
    assert rgb[0, 0].tolist() == [0, 0, 0]  # empty = black


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _write_fit_table(path, t):
    spotfit.write_table(spotfit.table.add_physical_units(t, CAM / 1000), path)


def test_render_command_writes_a_float32_tiff_with_its_pixel_size(tmp_path):
    csv = tmp_path / "spots.csv"
    _write_fit_table(csv, uniform_table(700, seed=8))
    before = hashlib.sha256(csv.read_bytes()).hexdigest()
    out = tmp_path / "image.tif"
    result = CliRunner().invoke(main, ["render", str(csv), "--out", str(out), "--pixel-size",
                                       "20", "--method", "histogram", "--shape", f"{NY}x{NX}"])
    assert result.exit_code == 0, result.output
    assert "700 of 700 localisations rendered" in result.stderr
    with tifffile.TiffFile(out) as tif:
        data = tif.asarray()
        assert tif.imagej_metadata["unit"] == "um"
    assert data.dtype == np.float32 and data.shape == (NY * M, NX * M)
    assert data.sum() == 700
    assert spotfit.read_image(out).pixel_size == pytest.approx(0.02)
    assert hashlib.sha256(csv.read_bytes()).hexdigest() == before

    png = tmp_path / "preview.png"
    result = CliRunner().invoke(main, ["render", str(csv), "-o", str(png), "--pixel-size", "40",
                                       "--color", "time"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_command_3d_stack(tmp_path):
    rng = np.random.default_rng(9)
    t = uniform_table(200, seed=10, border=1.5, z=rng.uniform(1, 5, 200),
                      z_err=np.full(200, 0.1))
    csv = tmp_path / "spots3d.csv"
    spotfit.write_table(spotfit.table.add_physical_units(t, CAM / 1000, 0.3), csv)
    out = tmp_path / "stack.tif"
    result = CliRunner().invoke(main, ["render", str(csv), "-o", str(out), "--pixel-size", "40",
                                       "--z-step", "150", "--shape", f"7x{NY}x{NX}"])
    assert result.exit_code == 0, result.output
    image = spotfit.read_image(out, axes="ZYX")
    assert image.data.shape == (1, 14, NY * 4, NX * 4)
    assert image.z_step == pytest.approx(0.15)
    assert np.asarray(image.data).sum(dtype=np.float64) == pytest.approx(200, rel=1e-5)


@pytest.mark.parametrize("args, code, message", [
    (["--out", "o.tif", "--pixel-size", "20", "--color", "time"], 2, "--color"),
    (["--out", "o.jpg", "--pixel-size", "20"], 2, ".tif, .tiff or .png"),
    (["--out", "o.tif", "--pixel-size", "0"], 2, "--pixel-size"),
    (["--out", "o.tif", "--pixel-size", "20", "--z-step", "100"], 1, "'z' column"),
])
def test_render_command_errors(tmp_path, args, code, message):
    csv = tmp_path / "spots.csv"
    _write_fit_table(csv, uniform_table(20, seed=11))
    argv = ["render", str(csv)] + [str(tmp_path / a) if a.startswith("o.") else a for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spots.csv"]  # nothing written
