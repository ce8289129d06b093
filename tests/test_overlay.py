"""Tests for the QC pictures (spotfit.overlay, ``spotfit show``, ``spotfit fit --qc``).

Pixel-exactness is checked on the written PNG: an image pixel is a
``zoom x zoom`` block of the PNG, and an ellipse's outline is centred on
its fit's position under the package's convention (0-based pixel centres,
x = column, y = row).  Images are never square (rows != columns).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from matplotlib.colors import to_rgb
from PIL import Image as PILImage
from scipy import ndimage

import spotfit
from spotfit import Camera
from spotfit.cli import main
from spotfit.errors import SpotfitInputError
from spotfit.overlay import ELLIPSE_SIGMAS, STATUS_COLOURS, show

NY, NX = 37, 53
ZOOM = 8
CAMERA = Camera(baseline=100, gain=2, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]


def png_pixels(fig) -> np.ndarray:
    """The figure as written to a PNG: (rows, cols, 3) uint8."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return np.asarray(PILImage.open(buffer).convert("RGB"))


def colour_mask(png, colour, tolerance=0):
    target = np.array([round(255 * c) for c in to_rgb(colour)])
    return np.all(np.abs(png.astype(int) - target) <= tolerance, axis=-1)


def green(png):
    """Pixels dominated by the converged colour (outline, antialiased edges included)."""
    p = png.astype(int)
    return (p[..., 1] - np.maximum(p[..., 0], p[..., 2])) > 60


def single_pixel_image():
    """Dark non-square image with bright single pixels; table of fits near them."""
    image = np.full((NY, NX), 100, dtype=np.uint16)
    pixels = [(7, 5), (40, 9), (22, 30), (46, 29)]           # (column, row)
    offsets = [(0.0, 0.0), (0.25, -0.125), (-0.375, 0.25), (0.5, 0.0)]
    for c, r in pixels:
        image[r, c] = 1000
    table = pd.DataFrame({
        "frame": 0,
        "x": [c + dx for (c, _), (dx, _) in zip(pixels, offsets)],
        "y": [r + dy for (_, r), (_, dy) in zip(pixels, offsets)],
        "sigma_x": 1.0, "sigma_y": 1.0, "angle": 0.0, "status": "converged",
    })
    return image, table, pixels, offsets


# ---------------------------------------------------------------------------
# pixel-exact placement
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("decorated", [False, True], ids=["bare", "title+legend"])
def test_markers_sit_on_the_fitted_pixel_positions_in_the_png(decorated):
    image, table, pixels, offsets = single_pixel_image()
    fig = show(image, table, zoom=ZOOM, percentiles=(0, 100), legend=decorated,
               title=None if decorated else False)
    png = png_pixels(fig)
    # the image's place in the PNG: at the left, below the title (if any)
    top = png.shape[0] - round(fig.axes[0].get_window_extent().y1)
    assert top == (26 if decorated else 0)
    inside = np.zeros(png.shape[:2], dtype=bool)
    inside[top:top + NY * ZOOM, :NX * ZOOM] = True
    white = np.all(png > 250, axis=-1) & inside
    labels, n = ndimage.label(white)
    blocks = ndimage.find_objects(labels)
    assert n == len(pixels)
    centres = ndimage.center_of_mass(white, labels, range(1, n + 1))
    for (c, r), (dx, dy) in zip(pixels, offsets):
        # the block of this image pixel: ZOOM x ZOOM PNG pixels, centred where expected
        row_c, col_c = (r + 0.5) * ZOOM - 0.5 + top, (c + 0.5) * ZOOM - 0.5
        k = int(np.argmin([(cy - row_c) ** 2 + (cx - col_c) ** 2 for cy, cx in centres]))
        sl = blocks[k]
        assert (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) == (ZOOM, ZOOM)
        assert centres[k] == pytest.approx((row_c, col_c), abs=1e-9)
        # the ellipse around it: its outline's centroid is at the fit, not the pixel
        reach = int((ELLIPSE_SIGMAS + 1.5) * ZOOM)
        window = np.zeros_like(white)
        window[int(row_c) - reach:int(row_c) + reach, int(col_c) - reach:int(col_c) + reach] = 1
        ys, xs = np.nonzero(green(png) & window.astype(bool))
        assert ys.size > 50
        assert xs.mean() - col_c == pytest.approx(dx * ZOOM, abs=0.5)   # 1/16 image px
        assert ys.mean() - row_c == pytest.approx(dy * ZOOM, abs=0.5)


def test_rotated_ellipse_follows_the_angle_convention():
    """A spot elongated along +0.5 rad (from +x towards +y, y down) is drawn that way."""
    truth_angle = 0.5
    frame, _ = spotfit.simulate((NY, NX), positions=[(30.3, 17.6)], sigma_x=3.0, sigma_y=1.2,
                                angle=truth_angle, photons=3e4, background=10, camera=CAMERA,
                                seed=3)
    table = spotfit.fit(frame, camera=CAMERA, sigma=2.0)
    assert len(table) == 1
    fitted = float(table["angle"].iloc[0])
    assert fitted == pytest.approx(truth_angle, abs=0.05)
    png = png_pixels(show(frame, table, zoom=ZOOM, legend=False, title=False))
    ys, xs = np.nonzero(green(png))
    cov = np.cov(np.vstack([xs, ys]))
    drawn = 0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])  # PNG: x right, y down
    assert drawn == pytest.approx(fitted, abs=0.03)


# ---------------------------------------------------------------------------
# figure content: positions, sizes, colours
# ---------------------------------------------------------------------------
def simulated(seed=1, shape=(NY, NX), **kw):
    return spotfit.simulate(shape, n_spots=kw.pop("n_spots", 8), photons=3000, background=10,
                            sigma=1.3, min_separation=8, border=4, camera=CAMERA, seed=seed,
                            **kw)


def test_ellipses_hold_the_fitted_positions_sizes_and_angles():
    image, _ = simulated()
    table = spotfit.fit(image, camera=CAMERA)
    fig = show(image, table)
    (coll,) = fig.axes[0].collections
    assert coll.get_label() == "converged"
    np.testing.assert_array_equal(coll.get_offsets(), table[["x", "y"]].to_numpy())
    np.testing.assert_allclose(coll.get_widths(), 2 * ELLIPSE_SIGMAS * table["sigma_x"])
    np.testing.assert_allclose(coll.get_heights(), 2 * ELLIPSE_SIGMAS * table["sigma_y"])
    np.testing.assert_allclose(coll.get_angles(), np.degrees(table["angle"]))
    (shown,) = fig.axes[0].images
    assert shown.get_extent() == [-0.5, NX - 0.5, NY - 0.5, -0.5]


def test_without_a_table_show_fits_with_the_same_function_as_fit():
    image, _ = simulated(seed=2)
    expected = spotfit.fit(image, camera=CAMERA, threshold=6)
    fig = show(image, camera=CAMERA, threshold=6)
    offsets = np.vstack([c.get_offsets() for c in fig.axes[0].collections])
    np.testing.assert_array_equal(offsets, expected[["x", "y"]].to_numpy())


def test_status_colours_legend_and_counts():
    image = np.full((NY, NX), 100, dtype=np.uint16)
    names = [s for s in STATUS_COLOURS if s != "spot"]
    rows = []
    for i, name in enumerate(names):
        for j in range(i + 1):  # i + 1 spots of the i-th status
            rows.append({"x": 5.0 + 8 * i, "y": 4.0 + 5.5 * j, "sigma_x": 1.2, "sigma_y": 1.2,
                         "angle": 0.0, "status": name})
    table = pd.DataFrame(rows)
    fig = show(image, table, zoom=4)
    for coll in fig.axes[0].collections:
        colour = STATUS_COLOURS[coll.get_label()]
        edges = coll.get_edgecolor()[:, :3]
        np.testing.assert_allclose(edges, [to_rgb(colour)] * len(edges))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{name}: {i + 1}" for i, name in enumerate(names)]
    assert fig.legends[0].get_title().get_text() == f"{len(table)} spots"
    png = png_pixels(fig)
    for i, name in enumerate(names):
        in_image = colour_mask(png, STATUS_COLOURS[name], tolerance=2)
        in_image[:, NX * 4:] = False  # not the legend's marker
        ys, xs = np.nonzero(in_image)
        assert xs.size >= 20 * (i + 1), name
        # drawn around this status' column of spots only (PNG column -> x: (c + 0.5) / 4 - 0.5)
        assert np.all(np.abs((xs + 0.5) / 4 - 0.5 - (5.0 + 8 * i)) < 2 * 1.2 + 1), name


def test_candidates_without_status_are_drawn():
    image, _ = simulated(seed=3)
    candidates = spotfit.detect(image, sigma=1.3)
    fig = show(image, candidates)
    (coll,) = fig.axes[0].collections
    assert coll.get_label() == "spot" and len(coll.get_offsets()) == len(candidates)


# ---------------------------------------------------------------------------
# time series, z-stacks, crop
# ---------------------------------------------------------------------------
def test_time_series_projection_and_frame():
    movie, _ = simulated(seed=4, shape=(3, NY, NX), n_spots=5)
    table = spotfit.fit(movie, camera=CAMERA)
    fig = show(movie, table)
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == len(table)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), movie.max(axis=0))
    assert "max over 3 frames" in fig.texts[0].get_text()

    fig = show(movie, table, frame=1)
    offsets = np.vstack([c.get_offsets() for c in fig.axes[0].collections])
    np.testing.assert_array_equal(offsets, table.loc[table["frame"] == 1, ["x", "y"]].to_numpy())
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), movie[1])
    with pytest.raises(SpotfitInputError, match="frame 3 is out of range"):
        show(movie, table, frame=3)


def test_z_stack_is_projected_and_coloured_by_z():
    stack, _ = spotfit.simulate((9, NY, NX), n_spots=6, photons=6000, background=10, sigma=1.3,
                                sigma_z=1.5, z_stack=True, min_separation=8, border=4,
                                camera=CAMERA, seed=5)
    table = spotfit.fit(stack, camera=CAMERA, axes="ZYX")
    assert "z" in table.columns and len(table) >= 4
    fig = show(stack, table, axes="ZYX")
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), stack.max(axis=0))
    colls = fig.axes[0].collections
    arrays = np.concatenate([c.get_array() for c in colls])
    offsets = np.vstack([c.get_offsets() for c in colls])
    order = np.lexsort(offsets.T)
    expected = table[["x", "y", "z"]].to_numpy()[np.lexsort(table[["x", "y"]].to_numpy().T)]
    np.testing.assert_allclose(offsets[order], expected[:, :2])
    np.testing.assert_allclose(arrays[order], expected[:, 2])
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "z (planes)"  # the colour bar
    assert "max over 9 planes" in fig.texts[0].get_text()


def test_crop_shows_only_its_region():
    image, _ = simulated(seed=6)
    table = spotfit.fit(image, camera=CAMERA)
    fig = show(image, table, crop="10:40,5:30")
    ax = fig.axes[0]
    assert ax.get_xlim() == (9.5, 39.5) and ax.get_ylim() == (29.5, 4.5)
    np.testing.assert_array_equal(ax.images[0].get_array(), image[5:30, 10:40])
    inside = table[(table.x >= 9.5) & (table.x < 39.5) & (table.y >= 4.5) & (table.y < 29.5)]
    offsets = np.vstack([c.get_offsets() for c in ax.collections] or [np.empty((0, 2))])
    np.testing.assert_array_equal(offsets, inside[["x", "y"]].to_numpy())
    with pytest.raises(SpotfitInputError, match="not inside the image"):
        show(image, table, crop="10:80,5:30")
    with pytest.raises(SpotfitInputError, match="X0:X1,Y0:Y1"):
        show(image, table, crop="10-40,5-30")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def write_sim(tmp_path, name="cells.tif", shape=(NY, NX), seed=1):
    image, _ = simulated(seed=seed, shape=shape)
    path = tmp_path / name
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "YX" if image.ndim == 2
                                                          else "TYX"})
    return path


def read_png(path):
    return np.asarray(PILImage.open(path).convert("RGB"))


def test_show_command_with_and_without_a_table(tmp_path):
    tif = write_sim(tmp_path)
    csv = tmp_path / "spots.csv"
    runner = CliRunner()
    result = runner.invoke(main, ["fit", str(tif), "--out", str(csv), *CAMERA_ARGS])
    assert result.exit_code == 0, result.output
    with_table = tmp_path / "with.png"
    result = runner.invoke(main, ["show", str(tif), str(csv), "--out", str(with_table),
                                  "--zoom", "4"])
    assert result.exit_code == 0, result.output
    fitted = tmp_path / "fitted.png"
    result = runner.invoke(main, ["show", str(tif), "--out", str(fitted), "--zoom", "4",
                                  *CAMERA_ARGS])
    assert result.exit_code == 0, result.output
    # the same fits drawn either way: the same picture (up to antialiasing of positions
    # rounded to 8 digits in the CSV)
    difference = np.abs(read_png(with_table).astype(int) - read_png(fitted))
    assert difference.max() <= 2 and np.count_nonzero(difference) < 10
    assert read_png(fitted).shape[1] == NX * 4 + 180


@pytest.mark.parametrize("args, message", [
    (["--crop", "0:10"], "X0:X1,Y0:Y1"),
    (["--frame", "2"], "--frame 2 is out of range"),
    (["--channel", "all"], "--channel all"),
    (["--percentiles", "99,1"], "LO,HI"),
])
def test_show_command_errors(tmp_path, args, message):
    tif = write_sim(tmp_path)
    out = tmp_path / "qc.png"
    result = CliRunner().invoke(main, ["show", str(tif), "--out", str(out), *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_fit_qc_writes_a_picture_beside_the_table(tmp_path):
    tif = write_sim(tmp_path)
    out = tmp_path / "res" / "cells_spots.csv"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["fit", str(tif), "--out", str(out), "--qc", *CAMERA_ARGS])
    assert result.exit_code == 0, result.output
    qc = tmp_path / "res" / "cells_spots_qc.png"
    assert "cells_spots_qc.png" in result.stderr
    assert green(read_png(qc)).sum() > 100  # the fits are drawn
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "cells_spots.csv", "cells_spots.json", "cells_spots_qc.png"]
    result = CliRunner().invoke(main, ["fit", str(tif), "--qc"])
    assert result.exit_code == 2 and "--qc" in result.output


def test_batch_qc_pictures_and_skip_existing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        write_sim(inputs, f"cell{i}.tif", seed=10 + i)
    out = tmp_path / "out"
    args = ["fit", str(inputs), "--out-dir", str(out), "--workers", "1", *CAMERA_ARGS]
    result = CliRunner().invoke(main, [*args, "--qc"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "cell0.csv", "cell0.json", "cell0_qc.png", "cell1.csv", "cell1.json", "cell1_qc.png",
        "report.html"]
    # a missing picture makes --skip-existing redo that file (only)
    (out / "cell1_qc.png").unlink()
    result = CliRunner().invoke(main, [*args, "--qc", "--skip-existing"])
    assert result.exit_code == 0, result.output
    assert "1 ok, 0 failed, 1 skipped" in result.stderr
    assert (out / "cell1_qc.png").is_file()


_LAZY = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from spotfit.cli import main
    codes = [CliRunner().invoke(main, a).exit_code for a in json.loads(sys.argv[1])]
    heavy = [m for m in sys.modules if m.split(".")[0] in ("numpy", "matplotlib", "pandas")]
    print(json.dumps({"codes": codes, "heavy": heavy}))
""")


def test_help_of_the_new_commands_imports_neither_numpy_nor_matplotlib(tmp_path):
    cheap = [["show", "--help"], ["render", "--help"], ["fit", "--help"], ["show"],
             ["render", "x.csv", "--out", "x.jpg", "--pixel-size", "10"],
             ["show", "a.tif", "--out", "q.png", "--percentiles", "5"]]
    proc = subprocess.run([sys.executable, "-c", _LAZY, json.dumps(cheap)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 2, 2, 2], "heavy": []}
