"""Non-TIFF inputs (spotfit.readers), --invert (spotfit.invert) and ambiguous arrays.

Every file is made by the test in tmp_path; images are non-square so that
x/y mix-ups show.  Positions are compared with the simulation's truth in
pixels (0-based pixel centres).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

import spotfit
from spotfit import io as sio
from spotfit import readers
from spotfit.camera import Camera
from spotfit.errors import SpotfitInputError, SpotfitWarning
from spotfit.invert import invert_image
from spotfit.io import Image, read_image, write_tiff
from spotfit.simulation import simulate

iio = pytest.importorskip("imageio.v3")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TRACKPY = DATA / "trackpy-tests"


def spots_8bit(seed=0, shape=(48, 72), n_spots=8):
    """A uint8 image of bright spots on a dark background, with its truth."""
    image, truth = simulate(shape, n_spots=n_spots, photons=2500, background=5, sigma=1.3,
                            camera=Camera(baseline=10, gain=1), border=5, min_separation=8,
                            seed=seed)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def nearest(table, truth):
    """Distance (px) from each true spot to the nearest converged fit (bright 8-bit spots
    reach 255 and are flagged saturated: they converged too)."""
    ok = table[table["status"].isin(["converged", "saturated"])]
    d, _ = cKDTree(np.c_[ok["x"], ok["y"]]).query(np.c_[truth["x"], truth["y"]])
    return d


def run_cli(*args):
    """Invoke the CLI in-process (click's CliRunner); uncaught exceptions fail the test."""
    from click.testing import CliRunner

    from spotfit.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {result.stderr}") from result.exception
    return result


# ----------------------------------------------------------------------------
# Common formats through imageio
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".gif", ".webp", ".pgm"])
def test_lossless_grey_formats_read_exactly(tmp_path, suffix):
    image, _ = spots_8bit()
    path = tmp_path / f"spots{suffix}"
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    if suffix == ".gif":  # imageio's GIF writer and Pillow >= 13 disagree: write with Pillow
        from PIL import Image as PILImage

        PILImage.fromarray(image).save(path)
    else:
        iio.imwrite(path, image, **kwargs)
    img = read_image(path)
    assert img.axes == "TYX" and img.data.shape == (1, 48, 72)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img.frame(0), image)


def test_png_16bit_keeps_its_values(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 65535, (20, 31), dtype=np.uint16)
    iio.imwrite(tmp_path / "deep.png", image)
    img = read_image(tmp_path / "deep.png")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img.frame(0), image)


def write_png(path, array, colour_type):
    """A minimal PNG (signature, IHDR, one IDAT, IEND) of 16-bit samples, big-endian."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ny, nx = array.shape[:2]
    rows = b"".join(b"\x00" + np.ascontiguousarray(row, dtype=">u2").tobytes() for row in array)
    ihdr = struct.pack(">IIBBBBB", nx, ny, 16, colour_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_png_16bit_colour_is_refused_not_truncated(tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 65535, (9, 14), dtype=np.uint16)
    write_png(tmp_path / "grey16.png", grey, colour_type=0)  # our encoder, checked on grey
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png").frame(0), grey)
    write_png(tmp_path / "rgb16.png", rng.integers(0, 65535, (9, 14, 3), dtype=np.uint16), 2)
    with pytest.raises(SpotfitInputError, match="16-bit colour PNG.*TIFF"):
        read_image(tmp_path / "rgb16.png", channel=0)


def test_jpeg_is_read_approximately(tmp_path):
    image, _ = spots_8bit()
    iio.imwrite(tmp_path / "spots.jpg", image, quality=95)
    img = read_image(tmp_path / "spots.jpg")
    assert img.data.shape == (1, 48, 72) and img.dtype == np.uint8
    assert np.abs(img.frame(0).astype(int) - image).mean() < 2  # lossy, 95% quality


def test_fit_png_finds_the_true_spots(tmp_path):
    image, truth = spots_8bit(seed=3)
    iio.imwrite(tmp_path / "spots.png", image)
    table = spotfit.fit(tmp_path / "spots.png", sigma=1.3)
    d = nearest(table, truth)
    assert np.all(d < 0.3), d  # px


def test_rgb_is_an_s_axis_like_rgb_tiffs(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 255, (21, 34, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    write_tiff_rgb = tmp_path / "rgb.tif"
    import tifffile

    tifffile.imwrite(write_tiff_rgb, rgb, photometric="rgb")
    for path in (tmp_path / "rgb.png", write_tiff_rgb):
        with pytest.raises(SpotfitInputError, match="3 channels.*`channel`"):
            read_image(path)
        for c in range(3):
            img = read_image(path, channel=c)
            assert img.source_axes == "YXS"
            np.testing.assert_array_equal(img.frame(0), rgb[..., c])
    assert spotfit.io.count_channels(tmp_path / "rgb.png") == 3


def test_grey_saved_as_colour_is_one_channel(tmp_path):
    image, _ = spots_8bit()
    iio.imwrite(tmp_path / "grey_rgb.png", np.dstack([image] * 3))
    iio.imwrite(tmp_path / "grey_rgba.png", np.dstack([image] * 3 + [np.full_like(image, 255)]))
    for name in ("grey_rgb.png", "grey_rgba.png"):
        img = read_image(tmp_path / name)
        assert img.source_axes == "YX"
        np.testing.assert_array_equal(img.frame(0), image)
        assert spotfit.io.count_channels(tmp_path / name) == 1
    # asking for a channel still works
    np.testing.assert_array_equal(read_image(tmp_path / "grey_rgb.png", channel=2).frame(0), image)


def test_animated_gif_is_a_time_series(tmp_path):
    from PIL import Image as PILImage

    frames = [spots_8bit(seed=s)[0] for s in range(3)]
    pil = [PILImage.fromarray(f) for f in frames]
    pil[0].save(tmp_path / "movie.gif", save_all=True, append_images=pil[1:])
    img = read_image(tmp_path / "movie.gif")
    assert img.axes == "TYX" and img.data.shape == (3, 48, 72)
    for t in range(3):
        np.testing.assert_array_equal(img.frame(t), frames[t])


def test_format_found_by_content_and_tiff_by_magic(tmp_path):
    image, _ = spots_8bit()
    iio.imwrite(tmp_path / "a.png", image)
    os.rename(tmp_path / "a.png", tmp_path / "a.dat")  # a PNG without its suffix
    np.testing.assert_array_equal(read_image(tmp_path / "a.dat").frame(0), image)
    write_tiff(tmp_path / "b.png", image, "YX")  # a TIFF named .png: read as TIFF
    assert not readers.handles(str(tmp_path / "b.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "b.png").frame(0), image)


def test_bad_files_give_one_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(SpotfitInputError, match=r"broken\.png: cannot read PNG file"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SpotfitInputError, match=r"empty\.jpg: empty file"):
        read_image(tmp_path / "empty.jpg")
    tiny = np.zeros((2, 9), np.uint8)
    iio.imwrite(tmp_path / "tiny.png", tiny)
    with pytest.raises(SpotfitInputError, match="too small"):
        read_image(tmp_path / "tiny.png")


def test_cli_fits_png_and_batch_folders_take_pngs(tmp_path):
    image, truth = spots_8bit(seed=4)
    folder = tmp_path / "data"
    folder.mkdir()
    iio.imwrite(folder / "one.png", image)
    iio.imwrite(folder / "two.jpeg", image, quality=95)
    (folder / "notes.txt").write_text("not an image")
    from spotfit.batch import expand_inputs

    assert [Path(f).name for f in expand_inputs([folder])] == ["one.png", "two.jpeg"]
    out = tmp_path / "one.csv"
    run = run_cli("fit", str(folder / "one.png"), "--out", str(out))
    assert run.exit_code == 0, run.stderr
    import pandas as pd

    assert np.all(nearest(pd.read_csv(out), truth) < 0.3)


# ----------------------------------------------------------------------------
# --invert
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32"])
def test_invert_values_and_input_untouched(dtype):
    rng = np.random.default_rng(5)
    if np.dtype(dtype).kind == "f":
        data = rng.uniform(-3, 70, (2, 9, 13)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, (2, 9, 13), dtype=dtype, endpoint=True)
    before = data.copy()
    inv = invert_image(Image.from_array(data, "TYX"))
    if np.dtype(dtype).kind == "f":
        expected = (data.max() + data.min()) - data
    else:
        info = np.iinfo(dtype)
        expected = (int(info.max) + int(info.min) - data.astype(np.int64)).astype(dtype)
    for t in range(2):
        got = inv.frame(t)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, expected[t])
    np.testing.assert_array_equal(np.asarray(inv.data), expected)
    np.testing.assert_array_equal(data, before)


def test_invert_finds_dark_spots_on_light_background(tmp_path):
    image, truth = spots_8bit(seed=6, shape=(50, 77))
    dark = (255 - image.astype(np.int16) - 40).clip(0, 255).astype(np.uint8)  # light bg
    iio.imwrite(tmp_path / "dark.png", dark)
    assert len(spotfit.fit(tmp_path / "dark.png")[lambda t: t.status == "converged"]) < len(truth)
    table = spotfit.fit(tmp_path / "dark.png", invert=True)
    assert np.all(nearest(table, truth) < 0.3)
    assert (table["unit"] == "ADU").all()
    # the same through an in-memory array, a TIFF stack and the CLI
    np.testing.assert_allclose(
        spotfit.fit(dark, invert=True)["x"].to_numpy(), table["x"].to_numpy())
    out = tmp_path / "dark.csv"
    run = run_cli("fit", tmp_path / "dark.png", "--invert", "--out", out)
    assert run.exit_code == 0, run.stderr
    import pandas as pd

    np.testing.assert_allclose(pd.read_csv(out)["x"], table["x"], atol=1e-5)


def _spotfit_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, SpotfitWarning)]


def test_a_dark_on_light_image_without_invert_says_so(tmp_path):
    """spotfit finds bright spots: an image of dark ones gives no converged spots, and a
    warning that names the dark objects and ``invert``; with ``invert`` none."""
    import warnings

    image, truth = spots_8bit(seed=11, shape=(230, 310), n_spots=40)
    dark = (255 - image.astype(np.int16) - 40).clip(0, 255).astype(np.uint8)
    before = dark.copy()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        table = spotfit.fit(dark)
    [message] = _spotfit_warnings(record)
    assert (table["status"] == "converged").sum() <= 2  # rows on the bright rims: not_spot
    counts = message.split(" spot-like objects clearly darker")[0]
    assert 30 <= int(counts) <= 45, message  # 40 spots, all in the central 230 x 256 px
    assert "230 x 256 px" in message and message.endswith("use `invert=True`")
    np.testing.assert_array_equal(dark, before)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        table = spotfit.fit(dark, invert=True)
        found = spotfit.detect(dark, invert=True)
    assert _spotfit_warnings(record) == []
    assert len(found) >= len(truth) and np.all(nearest(table, truth) < 0.3)
    # a stack: the first frame is looked at, and named
    with pytest.warns(SpotfitWarning, match="^frame 0: .* darker than the background"):
        spotfit.detect(np.stack([dark, dark]))
    # the command line names the option
    iio.imwrite(tmp_path / "dark.png", dark)
    run = run_cli("detect", tmp_path / "dark.png", "--out", tmp_path / "d.csv")
    assert run.exit_code == 0, run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("Warning:")]
    assert "darker than the background" in line and line.endswith("use --invert"), line
    run = run_cli("fit", tmp_path / "dark.png", "--invert", "--out", tmp_path / "f.csv")
    assert run.exit_code == 0 and "Warning" not in run.stderr, run.stderr


def test_invert_of_a_bright_spot_image_says_so():
    import warnings

    image, _ = spots_8bit(seed=12, shape=(230, 310), n_spots=40)
    with pytest.warns(SpotfitWarning, match=r"inverted image holds \d+ .* leave out `invert`$"):
        spotfit.fit(image, invert=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(spotfit.fit(image)) >= 40
    assert _spotfit_warnings(record) == []


def test_a_dark_z_stack_gets_the_warning_and_its_inverse_none():
    import warnings

    image, truth = simulate((20, 90, 110), n_spots=30, photons=3000, background=5, sigma=1.3,
                            sigma_z=2.0, z_stack=True, camera=Camera(baseline=10, gain=1), seed=3,
                            min_separation=8)
    dark = image.max() + 20 - image
    options = dict(axes="ZYX", sigma=1.3, sigma_z=2.0)
    with pytest.warns(SpotfitWarning, match=r"^30 spot-like objects clearly darker .* in the central "
                                            r"90 x 110 px of 20 planes\)"):
        spotfit.detect(dark, **options)
    with pytest.warns(SpotfitWarning, match=r"^the inverted image holds 30 .* leave out `invert`$"):
        spotfit.detect(image, invert=True, **options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(spotfit.detect(dark, invert=True, **options)) == len(truth)
    assert _spotfit_warnings(record) == []


def test_bright_spots_and_noise_are_not_looked_at_upside_down(monkeypatch):
    """Bright spots and Poisson noise make the upper tail of the pixels the longer: no
    second detection, no warning; a Gaussian-noise frame may be looked at, and has no
    clear dark objects."""
    import warnings

    import spotfit.detection

    calls = []
    real = spotfit.detection.find_peaks
    monkeypatch.setattr(spotfit.detection, "find_peaks", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(13)
    image, _ = spots_8bit(seed=14, shape=(181, 362), n_spots=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(spotfit.detect(image)) == 3 and len(calls) == 1
        spotfit.detect(rng.poisson(50.0, (300, 410)).astype(np.uint16))
        assert len(calls) == 2
        spotfit.detect(np.zeros((40, 60), np.uint16))
        for seed in range(3):  # symmetric noise: either tail can be the longer
            spotfit.detect(np.random.default_rng(seed).normal(100.0, 5.0, (300, 410)))
    assert _spotfit_warnings(record) == []


@pytest.mark.skipif(not (TRACKPY / "image_sequence" / "T76S3F00001.png").exists(),
                    reason="trackpy test data not available")
def test_trackpy_colloids_without_invert_get_the_warning():
    with pytest.warns(SpotfitWarning, match=r"clearly darker than the background and 0 clearly brighter"):
        spotfit.detect(TRACKPY / "image_sequence" / "T76S3F00001.png")


def test_invert_refuses_a_camera_calibration(tmp_path):
    image, _ = spots_8bit()
    with pytest.raises(SpotfitInputError, match="^invert cannot be combined"):
        spotfit.fit(image, invert=True, camera=Camera(gain=2))
    iio.imwrite(tmp_path / "x.png", image)
    run = run_cli("fit", tmp_path / "x.png", "--invert", "--gain", "2")
    assert run.exit_code == 1
    assert "Error: --invert cannot be combined" in run.stderr
    assert "Traceback" not in run.stderr


def test_invert_is_recorded_in_the_batch_sidecar(tmp_path):
    import json

    from spotfit.batch import run_batch

    image, _ = spots_8bit()
    iio.imwrite(tmp_path / "a.png", 255 - image)
    summary = run_batch([tmp_path / "a.png"], tmp_path / "out", workers=1, invert=True)
    assert summary.failed == []
    sidecar = json.loads((tmp_path / "out" / "a.json").read_text())
    assert sidecar["parameters"]["invert"] is True
    # --config replays it: the same table, byte for byte
    again = tmp_path / "again.csv"
    result = run_cli("fit", tmp_path / "a.png", "--config", tmp_path / "out" / "a.json",
                     "--out", again)
    assert result.exit_code == 0, result.stderr
    assert again.read_bytes() == (tmp_path / "out" / "a.csv").read_bytes()
    # detect takes --invert too
    result = run_cli("detect", tmp_path / "a.png", "--invert", "--out", tmp_path / "d.csv")
    assert result.exit_code == 0, result.stderr
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "d.csv")) == len(pd.read_csv(again))


@pytest.mark.skipif(not (TRACKPY / "reproducibility_v0.4.npz").exists(),
                    reason="trackpy test data not available")
def test_trackpy_colloids_with_invert_agree_with_trackpy():
    """trackpy's locate(invert(frame1)) positions vs spotfit --invert, defaults."""
    reference = np.load(TRACKPY / "reproducibility_v0.4.npz")["arr_3"]  # (y, x)
    table = spotfit.fit(TRACKPY / "image_sequence" / "T76S3F00001.png", invert=True)
    # colloids ~3 px wide are wider than 2x the default sigma (1.3 px): many rows are
    # not_spot (no diffraction-limited spot), their positions fitted all the same
    ok = table[table["status"].isin(["converged", "not_spot"])]
    d, _ = cKDTree(np.c_[ok["y"], ok["x"]]).query(reference[:, :2])
    assert (d < 1.0).mean() >= 0.95, (d < 1.0).mean()  # within 1 px


# ----------------------------------------------------------------------------
# Arrays without axes
# ----------------------------------------------------------------------------


def test_ambiguous_colour_array_is_refused_without_axes():
    rgb = np.zeros((424, 640, 3), np.uint8)
    with pytest.raises(SpotfitInputError, match=r"\(424, 640, 3\) is ambiguous.*axes"):
        spotfit.fit(rgb)
    with pytest.raises(SpotfitInputError, match="ambiguous"):
        Image.from_array(np.zeros((5, 40, 60, 4), np.uint8))
    with pytest.raises(SpotfitInputError, match="ambiguous"):
        spotfit.detect(rgb, sigma=1.3)
    assert len(spotfit.detect(Image.from_array(rgb, "YXS", channel=0), sigma=1.3)) == 0
    img = Image.from_array(rgb, "YXS", channel=1)
    assert img.data.shape == (1, 424, 640)
    assert Image.from_array(np.zeros((10, 20, 30))).axes == "TYX"  # not ambiguous


def test_colour_array_with_axes_fits_the_chosen_channel():
    image, truth = spots_8bit(seed=7)
    rgb = np.dstack([np.zeros_like(image), image, np.zeros_like(image)])
    table = spotfit.fit(rgb, axes="YXS", channel=1)
    assert np.all(nearest(table, truth) < 0.3)


# ----------------------------------------------------------------------------
# Vendor formats (optional extras)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, module, extra", [
    (".nd2", "nd2", "nd2"), (".czi", "pylibCZIrw", "czi"), (".lif", "readlif", "lif"),
])
def test_missing_vendor_reader_names_the_extra(tmp_path, monkeypatch, suffix, module, extra):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    if module == "pylibCZIrw":
        monkeypatch.setitem(sys.modules, "pylibCZIrw.czi", None)
    if module == "readlif":
        monkeypatch.setitem(sys.modules, "readlif.reader", None)
    with pytest.raises(SpotfitInputError, match=rf"pip install 'spotfit\[{extra}\]'"):
        read_image(path)


def test_nd2_layout_maps_axes_and_sizes():
    """nd2's sizes / voxel_size() -> stored axes and µm (nd2 cannot write files)."""
    data = np.zeros((3, 5, 2, 16, 24), np.uint16)
    sizes = {"T": 3, "Z": 5, "C": 2, "Y": 16, "X": 24}
    array, axes, pixel, z_step = readers._nd2_layout(data, sizes, (0.108, 0.108, 0.3))
    assert axes == "TZCYX" and pixel == 0.108 and z_step == 0.3
    img = sio._stored_image(array, axes, "x.nd2", None, 1, pixel, z_step)
    assert img.axes == "TZYX" and img.data.shape == (3, 5, 16, 24) and img.z_step == 0.3
    _, axes, pixel, z_step = readers._nd2_layout(data[0, 0, 0], {"Y": 16, "X": 24}, (0, 0, 0))
    assert axes == "YX" and pixel is None and z_step is None


def test_czi_round_trip(tmp_path):
    pyczi = pytest.importorskip("pylibCZIrw.czi")
    rng = np.random.default_rng(8)
    planes = rng.integers(0, 4000, (2, 3, 18, 27), dtype=np.uint16)  # (T, C, Y, X)
    path = tmp_path / "scan.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as doc:
        for t in range(2):
            for c in range(3):
                doc.write(data=planes[t, c][..., None], plane={"T": t, "C": c})
        doc.write_metadata(scale_x=1.3e-7, scale_y=1.3e-7, scale_z=5e-7)  # metres
    with pytest.raises(SpotfitInputError, match="3 channels"):
        read_image(path)
    img = read_image(path, channel=1)
    assert img.axes == "TYX" and img.data.shape == (2, 18, 27)
    assert img.pixel_size == pytest.approx(0.13)
    for t in range(2):
        np.testing.assert_array_equal(img.frame(t), planes[t, 1])


def write_minimal_lif(path, planes, pixel_um):
    """A one-series Leica LIF file with (T, C, Y, X) uint16 planes, as readlif parses it.

    Layout (readlif.reader.LifFile): magic 0x70, size, 0x2A, the UTF-16 XML
    header; then one memory block: magic, size, 0x2A, its length, 0x2A, a
    UTF-16 description, the pixels (x fastest, then channel, then time).
    """
    import struct

    n_t, n_c, n_y, n_x = planes.shape
    dims = "".join(
        f'<DimensionDescription DimID="{dim}" NumberOfElements="{n}" Length="{length}" '
        f'BytesInc="{inc}"/>'
        for dim, n, length, inc in (
            (1, n_x, (n_x - 1) * pixel_um * 1e-6, 2),
            (2, n_y, (n_y - 1) * pixel_um * 1e-6, 2 * n_x),
            (4, n_t, float(n_t), 2 * n_x * n_y * n_c),
        )
    )
    channels = "".join(
        f'<ChannelDescription Resolution="16" BytesInc="{c * 2 * n_x * n_y}"/>' for c in range(n_c)
    )
    pixels = np.ascontiguousarray(planes, dtype="<u2").tobytes()
    xml = (
        '<LMSDataContainerHeader Version="2"><Element Name="test"><Data/><Memory Size="0"/>'
        '<Children><Element Name="series 1"><Data><Image><ImageDescription>'
        f"<Channels>{channels}</Channels><Dimensions>{dims}</Dimensions>"
        f'</ImageDescription></Image></Data><Memory Size="{len(pixels)}" MemoryBlockID="B1"/>'
        "</Element></Children></Element></LMSDataContainerHeader>"
    )
    header = xml.encode("utf-16-le")
    description = "MemBlock_1".encode("utf-16-le")
    with open(path, "wb") as fh:
        fh.write(b"\x70\x00\x00\x00" + struct.pack("<I", len(header) + 5) + b"\x2a")
        fh.write(struct.pack("<I", len(header) // 2) + header)
        fh.write(b"\x70\x00\x00\x00" + struct.pack("<I", 0) + b"\x2a")
        fh.write(struct.pack("<I", len(pixels)) + b"\x2a")
        fh.write(struct.pack("<I", len(description) // 2) + description + pixels)


def test_lif_round_trip(tmp_path):
    pytest.importorskip("readlif")
    rng = np.random.default_rng(9)
    planes = rng.integers(0, 4000, (3, 2, 17, 29), dtype=np.uint16)  # (T, C, Y, X)
    path = tmp_path / "scan.lif"
    write_minimal_lif(path, planes, pixel_um=0.13)
    with pytest.raises(SpotfitInputError, match="2 channels"):
        read_image(path)
    img = read_image(path, channel=1)
    assert img.axes == "TYX" and img.data.shape == (3, 17, 29)
    assert img.pixel_size == pytest.approx(0.13)
    for t in range(3):
        np.testing.assert_array_equal(img.frame(t), planes[t, 1])


def test_nd2_style_dask_array_is_read_frame_by_frame():
    """nd2 hands spotfit a dask array (to_dask): axes plan and frames work on it lazily."""
    da = pytest.importorskip("dask.array")
    stored = np.arange(3 * 2 * 2 * 9 * 11, dtype=np.uint16).reshape(3, 2, 2, 9, 11)  # TZCYX
    lazy = da.from_array(stored, chunks=(1, 1, 1, 9, 11))
    array, axes, pixel, z_step = readers._nd2_layout(
        lazy, {"T": 3, "Z": 2, "C": 2, "Y": 9, "X": 11}, (0.2, 0.2, 0.5))
    img = sio._stored_image(array, axes, "x.nd2", None, 1, pixel, z_step)
    assert img.axes == "TZYX" and img.z_step == 0.5
    frame = img.frame(2)
    assert isinstance(frame, np.ndarray)
    np.testing.assert_array_equal(frame, stored[2, :, 1])
