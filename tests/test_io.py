"""Tests for spotfit.io (reading / writing TIFFs) and spotfit._atomic.

Every test file is made in ``tmp_path`` with :func:`tifffile.imwrite`; images
are never square (23 x 31) so that x/y mix-ups show.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import spotfit.io as sio
from spotfit._atomic import atomic_path
from spotfit.errors import SpotfitInputError
from spotfit.io import Image, PagedStack, read_image, write_tiff

NY, NX = 23, 31  # rows, columns: never square

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ramp(shape, dtype="uint16", seed=0):
    """Distinct, position-dependent values so any axis mix-up is detected."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=shape).astype(dtype)


def _write(tmp_path, name, data, **kwargs) -> Path:
    path = tmp_path / name
    tifffile.imwrite(path, data, **kwargs)
    return path


def _message(*parts: str) -> str:
    """A regex matching the literal `parts` in order, anything in between."""
    return ".*".join(re.escape(p) for p in parts)


# ----------------------------------------------------------------------------
# Axis handling
# ----------------------------------------------------------------------------


def test_2d_yx_is_one_frame_tyx(tmp_path):
    data = _ramp((NY, NX))
    img = read_image(_write(tmp_path, "yx.tif", data))
    assert img.axes == "TYX"
    assert img.data.shape == (1, NY, NX)
    assert img.n_frames == 1
    assert img.frame_shape == (NY, NX)
    assert not img.is_3d
    assert img.source_axes == "YX"
    assert img.dtype == np.uint16
    assert img.path == str(tmp_path / "yx.tif")
    np.testing.assert_array_equal(img.data[0], data)


def test_imagej_tyx_time_series(tmp_path):
    data = _ramp((5, NY, NX))
    path = _write(tmp_path, "tyx.tif", data, imagej=True, metadata={"axes": "TYX"})
    img = read_image(path)
    assert (img.axes, img.data.shape, img.source_axes) == ("TYX", (5, NY, NX), "TYX")
    frames = list(img.frames())
    assert [t for t, _ in frames] == [0, 1, 2, 3, 4]
    for t, frame in frames:
        assert frame.shape == (NY, NX)
        np.testing.assert_array_equal(frame, data[t])


def test_imagej_file_labelled_z_read_as_time_with_override(tmp_path):
    data = _ramp((5, NY, NX))
    path = _write(tmp_path, "mislabelled.tif", data, imagej=True, metadata={"axes": "ZYX"})
    as_stored = read_image(path)
    assert (as_stored.axes, as_stored.data.shape) == ("TZYX", (1, 5, NY, NX))

    img = read_image(path, axes="TYX")
    assert (img.axes, img.data.shape, img.source_axes) == ("TYX", (5, NY, NX), "TYX")
    np.testing.assert_array_equal(img.data, data)


def test_lowercase_axes_override_is_accepted(tmp_path):
    path = _write(tmp_path, "z.tif", _ramp((5, NY, NX)), imagej=True, metadata={"axes": "ZYX"})
    assert read_image(path, axes="tyx").axes == "TYX"


def test_zyx_becomes_tzyx_with_one_frame(tmp_path):
    data = _ramp((6, NY, NX))
    path = _write(tmp_path, "zyx.tif", data, imagej=True, metadata={"axes": "ZYX"})
    img = read_image(path)
    assert img.axes == "TZYX"
    assert img.data.shape == (1, 6, NY, NX)
    assert img.frame_shape == (6, NY, NX)
    assert img.is_3d
    np.testing.assert_array_equal(img.data[0], data)


def test_tzyx_hyperstack(tmp_path):
    data = _ramp((3, 4, NY, NX))
    path = _write(tmp_path, "tzyx.tif", data, imagej=True, metadata={"axes": "TZYX"})
    img = read_image(path)
    assert (img.axes, img.data.shape) == ("TZYX", (3, 4, NY, NX))
    np.testing.assert_array_equal(img.data, data)


def test_leading_unknown_axis_of_3d_file_is_time(tmp_path):
    # A plain multi-page TIFF: tifffile reports the stack axis as 'Q'.
    data = _ramp((5, NY, NX))
    path = _write(tmp_path, "q.tif", data)
    img = read_image(path)
    assert (img.source_axes, img.axes, img.data.shape) == ("QYX", "TYX", (5, NY, NX))

    stack = read_image(path, axes="ZYX")
    assert (stack.axes, stack.data.shape) == ("TZYX", (1, 5, NY, NX))
    np.testing.assert_array_equal(stack.data[0], data)


def test_unknown_axes_of_4d_file_need_override(tmp_path):
    data = _ramp((3, 2, NY, NX))
    path = _write(tmp_path, "qq.tif", data)
    with pytest.raises(
        SpotfitInputError,
        match=_message(str(path), "cannot tell what axis 'Q'", "QQYX", "`axes='TZYX'`"),
    ):
        read_image(path)
    img = read_image(path, axes="TZYX")
    assert (img.axes, img.data.shape) == ("TZYX", (3, 2, NY, NX))
    np.testing.assert_array_equal(img.data, data)


def test_axes_override_transposes_x_before_y(tmp_path):
    data = _ramp((NX, NY))  # stored column-major by some odd software
    path = _write(tmp_path, "xy.tif", data)
    img = read_image(path, axes="XY")
    assert img.data.shape == (1, NY, NX)
    np.testing.assert_array_equal(img.data[0], data.T)


def test_size_one_z_is_dropped(tmp_path):
    data = _ramp((3, 1, NY, NX))
    path = _write(tmp_path, "tz1.tif", data, imagej=True, metadata={"axes": "TZYX"})
    img = read_image(path)
    assert (img.axes, img.data.shape) == ("TYX", (3, NY, NX))


@pytest.mark.parametrize(
    ("axes", "reason"),
    [
        ("TZYX", "4 letters given, one per dimension needed"),
        ("YX", "2 letters given, one per dimension needed"),
        ("TQX", "unknown letter(s) 'Q'"),
        ("TYY", "repeated letter(s) 'Y'"),
        ("TZC", "Y and X are required"),
    ],
)
def test_bad_axes_override(tmp_path, axes, reason):
    path = _write(tmp_path, "f.tif", _ramp((5, NY, NX)), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(
        SpotfitInputError,
        match=_message(
            f"axes {axes!r} does not fit {path}", reason,
            f"shape (5, {NY}, {NX}), stored axes 'TYX'",
        ),
    ):
        read_image(path, axes=axes)


# ----------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------


@pytest.fixture
def cyx_file(tmp_path):
    data = _ramp((3, NY, NX))
    return _write(tmp_path, "cyx.tif", data, imagej=True, metadata={"axes": "CYX"}), data


def test_channel_axis_requires_channel(cyx_file):
    path, _ = cyx_file
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"{path} has 3 channels (axis C); choose one with `channel` (0 to 2)"),
    ):
        read_image(path)


def test_channel_selects_plane(cyx_file):
    path, data = cyx_file
    img = read_image(path, channel=1)
    assert (img.axes, img.data.shape, img.source_axes) == ("TYX", (1, NY, NX), "CYX")
    np.testing.assert_array_equal(img.data[0], data[1])


@pytest.mark.parametrize("channel", [3, -1])
def test_channel_out_of_range(cyx_file, channel):
    path, _ = cyx_file
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"channel {channel} is out of range for {path}", "valid: 0 to 2"),
    ):
        read_image(path, channel=channel)


def test_channel_must_be_an_integer(cyx_file):
    path, _ = cyx_file
    with pytest.raises(SpotfitInputError, match="^channel must be a whole number"):
        read_image(path, channel=1.5)


def test_channel_without_channel_axis(tmp_path):
    path = _write(tmp_path, "yx.tif", _ramp((NY, NX)))
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"channel 0 given but {path} has no channel axis", "'YX'"),
    ):
        read_image(path, channel=0)


def test_hyperstack_tzcyx_with_channel(tmp_path):
    data = _ramp((2, 3, 2, NY, NX))
    path = _write(tmp_path, "tzcyx.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    img = read_image(path, channel=1)
    assert (img.axes, img.data.shape) == ("TZYX", (2, 3, NY, NX))
    np.testing.assert_array_equal(img.data, data[:, :, 1])


def test_size_one_channel_is_dropped(tmp_path):
    data = _ramp((1, NY, NX))
    path = _write(tmp_path, "c1.tif", data)  # stored as QYX, Q of size 1
    img = read_image(path, axes="CYX")
    assert (img.axes, img.data.shape) == ("TYX", (1, NY, NX))
    np.testing.assert_array_equal(img.data, data)
    arr = Image.from_array(data, "CYX")
    assert (arr.axes, arr.data.shape) == ("TYX", (1, NY, NX))


def test_stack_of_four_stored_as_samples_can_be_overridden(tmp_path):
    # tifffile writes a plain (4, Y, X) array as 4 samples per pixel ("SYX").
    data = _ramp((4, NY, NX))
    path = _write(tmp_path, "four.tif", data)
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"{path} has 4 channels (axis S", "`channel`", "`axes`"),
    ):
        read_image(path)
    img = read_image(path, axes="TYX")
    assert (img.axes, img.data.shape) == ("TYX", (4, NY, NX))
    np.testing.assert_array_equal(img.data, data)


def test_rgb_needs_channel(tmp_path):
    rgb = _ramp((NY, NX, 3), dtype="uint8")
    path = _write(tmp_path, "rgb.tif", rgb, photometric="rgb")
    with pytest.raises(
        SpotfitInputError,
        match=_message(
            f"{path} has 3 channels (axis S; samples per pixel, e.g. RGB); "
            "choose one with `channel` (0 to 2)"
        ),
    ):
        read_image(path)
    img = read_image(path, channel=2)
    assert (img.axes, img.data.shape, img.source_axes) == ("TYX", (1, NY, NX), "YXS")
    np.testing.assert_array_equal(img.data[0], rgb[..., 2])


# ----------------------------------------------------------------------------
# Pixel types and values
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [d.name for d in sio.SUPPORTED_DTYPES])
def test_supported_dtypes_preserve_values(tmp_path, dtype):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        info = np.finfo(dtype)
        data = rng.normal(0, 1e3, size=(2, NY, NX)).astype(dtype)
        data[0, 0, :3] = [info.max, info.min, info.tiny]
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(2, NY, NX), dtype=dtype, endpoint=True)
        data[0, 0, :2] = [info.min, info.max]
    path = _write(tmp_path, f"{dtype}.tif", data)
    img = read_image(path)
    assert img.dtype == np.dtype(dtype)
    assert img.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(img.data, data)


def test_big_endian_file(tmp_path):
    data = _ramp((5, NY, NX))
    path = _write(tmp_path, "be.tif", data, byteorder=">")
    img = read_image(path)
    assert img.dtype == np.dtype("uint16")  # native, whatever the file says
    np.testing.assert_array_equal(img.data, data)
    for t, frame in img.frames():
        assert frame.dtype == np.dtype("=u2")
        np.testing.assert_array_equal(frame, data[t])


@pytest.mark.parametrize("dtype", ["bool", "complex64", "float16", "int64", "uint64"])
def test_unsupported_dtype(tmp_path, dtype):
    data = np.ones((NY, NX), dtype=dtype)
    path = _write(tmp_path, f"{dtype}.tif", data)
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"{path}: unsupported pixel type {np.dtype(dtype).name}", "supported:"),
    ):
        read_image(path)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_and_inf_pixels_are_counted(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(sio, "_SCAN_BYTES", 1)  # one frame per block: exercise chunking
    data = np.ones((5, NY, NX), dtype=dtype)
    data[0, 1, 2] = np.nan
    data[3, 5, 30] = np.nan
    data[2, 22, 0] = -np.inf
    path = _write(tmp_path, "nan.tif", data)
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"{path}: 2 NaN and 1 infinite pixel values (of {data.size})"),
    ):
        read_image(path)


def test_finite_float_is_accepted(tmp_path):
    data = np.linspace(-1, 1, NY * NX, dtype="float32").reshape(NY, NX)
    img = read_image(_write(tmp_path, "ok.tif", data))
    np.testing.assert_array_equal(img.data[0], data)


# ----------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: no such file")):
        read_image(path)


def test_directory(tmp_path):
    with pytest.raises(SpotfitInputError, match=_message(f"{tmp_path}: is a directory")):
        read_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: empty file")):
        read_image(path)


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), " (it looks like a PNG file)"),
        (b"x,y\n1.0,2.0\n", ""),
    ],
    ids=["png", "text"],
)
def test_not_a_tiff(tmp_path, content, hint):
    path = tmp_path / "image.tif"
    path.write_bytes(content)
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: not a TIFF file{hint}")):
        read_image(path)


def _truncate(path: Path, n_bytes: int) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated.tif")
    out.write_bytes(data[:n_bytes])
    return out


@pytest.mark.parametrize(
    ("kind", "keep"),
    [
        ("imagej-movie", 0.5),  # tifffile would silently return frame 0 only
        ("plain-2d", -100),  # inside the (memory-mapped) pixel data
        ("compressed", -10),  # zlib stream cut short
        ("tiled", 0.5),
        ("plain-2d", 10),  # inside the first IFD
    ],
)
def test_truncated_tiff(tmp_path, kind, keep):
    data = _ramp((6, NY, NX))
    if kind == "imagej-movie":
        full = _write(tmp_path, "full.tif", data, imagej=True, metadata={"axes": "TYX"})
    elif kind == "plain-2d":
        full = _write(tmp_path, "full.tif", data[0], metadata=None)
    elif kind == "compressed":
        full = _write(
            tmp_path, "full.tif", data, compression="zlib", imagej=True, metadata={"axes": "TYX"}
        )
    else:
        full = _write(tmp_path, "full.tif", _ramp((64, 80)), tile=(16, 16))
    size = full.stat().st_size
    path = _truncate(full, int(size * keep) if isinstance(keep, float) else keep % size)
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: corrupt or truncated TIFF")):
        read_image(path)


def test_corrupt_ifd_offset(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00" + (2**31 - 1).to_bytes(4, "little") + bytes(32))
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: corrupt or truncated TIFF")):
        read_image(path)


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about writing it
        tifffile.imwrite(path, np.zeros((0, NX), dtype="uint16"))
    with pytest.raises(SpotfitInputError, match=_message(f"{path}: image has no pixels")):
        read_image(path)


@pytest.mark.parametrize("shape", [(2, NX), (NY, 2), (5, 2, NX)])
def test_image_smaller_than_3x3(tmp_path, shape):
    path = _write(tmp_path, "small.tif", np.ones(shape, dtype="uint16"))
    ny, nx = shape[-2:]
    with pytest.raises(
        SpotfitInputError,
        match=_message(f"{path}: image is too small ({ny} rows x {nx} columns)", "3 x 3"),
    ):
        read_image(path)


# ----------------------------------------------------------------------------
# Physical pixel size
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "per_unit", "expected"),
    [
        ("um", 1 / 0.16, 0.16),
        ("micron", 1 / 0.16, 0.16),
        ("\\u00B5m", 1 / 0.16, 0.16),  # as ImageJ 1.53 writes it
        ("nm", 1 / 160, 0.16),
        ("inch", 1 / 0.16, None),
        ("pixel", 1 / 0.16, None),
        (None, 1 / 0.16, None),
        ("um", 2147483646 / 5000, None),  # uncalibrated ImageJ: implausible
    ],
)
def test_pixel_size_from_imagej_resolution(tmp_path, unit, per_unit, expected):
    metadata = {"axes": "TYX"} if unit is None else {"axes": "TYX", "unit": unit}
    path = _write(
        tmp_path, "px.tif", _ramp((2, NY, NX)), imagej=True,
        resolution=(per_unit, per_unit), metadata=metadata,
    )
    img = read_image(path)
    assert img.pixel_size == (None if expected is None else pytest.approx(expected, rel=1e-6))
    assert img.z_step is None


def test_z_step_from_imagej_spacing(tmp_path):
    path = _write(
        tmp_path, "z.tif", _ramp((4, NY, NX)), imagej=True, resolution=(1 / 0.107, 1 / 0.107),
        metadata={"axes": "ZYX", "unit": "um", "spacing": 0.25},
    )
    img = read_image(path)
    assert img.pixel_size == pytest.approx(0.107, rel=1e-6)
    assert img.z_step == pytest.approx(0.25)


def test_pixel_size_from_ome(tmp_path):
    path = _write(
        tmp_path, "ome.tif", _ramp((3, 2, NY, NX)), ome=True,
        metadata={
            "axes": "TZYX",
            "PhysicalSizeX": 0.1, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeZ": 250, "PhysicalSizeZUnit": "nm",
        },
    )
    img = read_image(path)
    assert (img.axes, img.data.shape) == ("TZYX", (3, 2, NY, NX))
    assert img.pixel_size == pytest.approx(0.1)
    assert img.z_step == pytest.approx(0.25)


def test_pixel_size_from_metric_resolution_unit(tmp_path):
    path = _write(
        tmp_path, "cm.tif", _ramp((NY, NX)),
        resolution=(1e4 / 0.2, 1e4 / 0.2), resolutionunit="CENTIMETER",
    )
    assert read_image(path).pixel_size == pytest.approx(0.2)


def test_broken_metadata_never_fails_the_read(tmp_path, monkeypatch):
    def broken(unit):
        raise RuntimeError("boom")

    monkeypatch.setattr(sio, "_unit_in_um", broken)
    path = _write(
        tmp_path, "px.tif", _ramp((2, NY, NX)), imagej=True,
        resolution=(10, 10), metadata={"axes": "TYX", "unit": "um"},
    )
    img = read_image(path)
    assert img.pixel_size is None
    assert img.data.shape == (2, NY, NX)


# ----------------------------------------------------------------------------
# Memory mapping
# ----------------------------------------------------------------------------


def test_uncompressed_file_is_memory_mapped_read_only(tmp_path):
    data = _ramp((5, NY, NX))
    path = _write(tmp_path, "mm.tif", data, imagej=True, metadata={"axes": "TYX"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    img = read_image(path)
    assert isinstance(img.data, np.memmap)
    assert not img.data.flags.writeable
    with pytest.raises(ValueError):
        img.data[0, 0, 0] = 1
    np.testing.assert_array_equal(img.data[3], data[3])
    total = sum(int(frame.sum()) for _, frame in img.frames())
    assert total == int(data.sum())
    del img
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_compressed_file_is_loaded(tmp_path):
    data = _ramp((5, NY, NX))
    path = _write(
        tmp_path, "z.tif", data, compression="zlib", imagej=True, metadata={"axes": "TYX"}
    )
    img = read_image(path)
    assert not isinstance(img.data, np.memmap)
    np.testing.assert_array_equal(img.data, data)


def test_a_paged_stack_owns_its_tifffile_without_marking_it(tmp_path):
    """The open TiffFile is handed to the PagedStack; nothing of spotfit's is set on it."""
    path = _write(tmp_path, "z.tif", _ramp((4, NY, NX)), compression="zlib", imagej=True,
                  metadata={"axes": "TYX"})
    img = read_image(path)
    assert isinstance(img.data, PagedStack)
    tif = img.data._tif
    assert not [name for name in vars(tif) if "spotfit" in name]
    assert not tif.filehandle.closed  # still open: the stack reads pages from it
    img.close()
    assert tif.filehandle.closed


# ----------------------------------------------------------------------------
# The Image container
# ----------------------------------------------------------------------------


def test_image_validates_axes_and_shape():
    with pytest.raises(SpotfitInputError, match="'TYX' or 'TZYX'"):
        Image(np.zeros((NY, NX)), "YX")
    with pytest.raises(SpotfitInputError, match="must have 4 dimensions"):
        Image(np.zeros((2, NY, NX)), "TZYX")


def test_image_is_frozen():
    img = Image(np.zeros((2, NY, NX), dtype="float32"), "TYX")
    assert img.source_axes == "TYX"
    assert img.dtype == np.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        img.axes = "TZYX"


def test_image_from_array():
    data = _ramp((4, NY, NX))
    img = Image.from_array(data, "ZYX", pixel_size=0.1)
    assert (img.axes, img.data.shape, img.pixel_size) == ("TZYX", (1, 4, NY, NX), 0.1)
    np.testing.assert_array_equal(img.data[0], data)
    with pytest.raises(SpotfitInputError, match="NaN"):
        Image.from_array(np.full((NY, NX), np.nan), "YX")
    with pytest.raises(SpotfitInputError, match=_message("more than one channel axis ('CS'")):
        Image.from_array(np.zeros((2, 3, NY, NX)), "CSYX", channel=0)


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def test_write_tiff_roundtrip_tzyx(tmp_path):
    data = np.random.default_rng(2).normal(100, 10, size=(2, 3, NY, NX))  # float64
    path = tmp_path / "sim.tif"
    write_tiff(path, data, "TZYX", pixel_size=0.107, z_step=0.25)
    assert sorted(os.listdir(tmp_path)) == ["sim.tif"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "TZYX"
    img = read_image(path)
    assert (img.axes, img.data.shape, img.dtype) == ("TZYX", (2, 3, NY, NX), np.float32)
    np.testing.assert_array_equal(img.data, data.astype("float32"))
    assert img.pixel_size == pytest.approx(0.107, rel=1e-6)
    assert img.z_step == pytest.approx(0.25)


def test_write_tiff_reorders_axes_for_imagej(tmp_path):
    data = _ramp((NY, NX, 4))  # Y, X, T
    path = tmp_path / "yxt.tif"
    write_tiff(path, data, "YXT")
    img = read_image(path)
    assert (img.axes, img.data.shape) == ("TYX", (4, NY, NX))
    np.testing.assert_array_equal(img.data, np.moveaxis(data, -1, 0))


def test_write_tiff_errors(tmp_path):
    with pytest.raises(SpotfitInputError, match=_message("axes 'TYX' does not fit", "3 letters")):
        write_tiff(tmp_path / "a.tif", np.zeros((NY, NX), "uint16"), "TYX")
    with pytest.raises(SpotfitInputError, match="cannot write pixel type int32"):
        write_tiff(tmp_path / "a.tif", np.zeros((NY, NX), "int32"), "YX")
    with pytest.raises(SpotfitInputError, match="pixel_size must be a positive number"):
        write_tiff(tmp_path / "a.tif", np.zeros((NY, NX), "uint16"), "YX", pixel_size=0)
    missing = tmp_path / "no" / "a.tif"
    with pytest.raises(SpotfitInputError, match=_message(str(missing), "does not exist")):
        write_tiff(missing, np.zeros((NY, NX), "uint16"), "YX")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# atomic_path
# ----------------------------------------------------------------------------


def test_atomic_path_writes_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.csv.") and tmp.name.endswith(".tmp.csv")
        assert not target.exists()
        tmp.write_text("x,y\n1,2\n")
    assert target.read_text() == "x,y\n1,2\n"
    assert os.listdir(tmp_path) == ["out.csv"]


def test_temporary_names_are_made_and_recognised_in_one_place(tmp_path):
    from spotfit._atomic import remove_stale_temporaries, temporary_name, temporary_pattern

    target = tmp_path / ("x" * 200 + ".csv")  # long names are cut
    name = temporary_name(target, "0123abcd")
    assert name.startswith(".xxx") and name.endswith(".0123abcd.tmp.csv") and len(name) < 160
    assert temporary_pattern(target).fullmatch(name)
    assert not temporary_pattern(target).fullmatch(temporary_name(target, "0123abcd", "new"))
    assert not temporary_pattern(tmp_path / "y.csv").fullmatch(name)
    (tmp_path / name).write_text("left by a killed run")
    assert remove_stale_temporaries(target) == [str(tmp_path / name)]
    with atomic_path(target) as tmp:  # what atomic_path makes is what is recognised
        assert temporary_pattern(target).fullmatch(tmp.name)


def test_atomic_path_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_body_raises_creates_nothing(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_atomic_path_failure_keeps_existing_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new, partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.csv"]


def test_atomic_path_missing_directory(tmp_path):
    target = tmp_path / "missing" / "out.csv"
    with pytest.raises(
        SpotfitInputError, match=_message(f"{target}: cannot write", "does not exist")
    ):
        with atomic_path(target):
            pass  # pragma: no cover


def test_atomic_path_onto_directory(tmp_path):
    with pytest.raises(SpotfitInputError, match=_message(f"{tmp_path}: is a directory")):
        with atomic_path(tmp_path):
            pass  # pragma: no cover


# ----------------------------------------------------------------------------
# Real files (../shared/data; see its README for what they are)
# ----------------------------------------------------------------------------

REAL_FILES = [
    # (file, read_image kwargs, axes, shape, source_axes, pixel_size in µm)
    ("spotiflow-samples/img_hybiss_2d.tif", {}, "TYX", (1, 512, 512), "YX", None),
    ("spotiflow-samples/img_terra_2d.tif", {}, "TYX", (1, 1024, 1024), "YX", None),
    ("spotiflow-samples/img_synth_3d.tif", {}, "TYX", (32, 128, 128), "QYX", None),
    ("spotiflow-samples/img_synth_3d.tif", {"axes": "ZYX"}, "TZYX", (1, 32, 128, 128), "ZYX",
     None),
    ("airlocalize-examples/2DsmFISH_humCells.tif", {}, "TYX", (1, 319, 507), "YX", None),
    ("airlocalize-examples/movie.tif", {}, "TZYX", (1, 120, 100, 100), "ZYX", None),
    ("airlocalize-examples/movie.tif", {"axes": "TYX"}, "TYX", (120, 100, 100), "TYX", None),
    ("picasso-testdata/testdata.tif", {}, "TYX", (100, 32, 32), "TYX", 0.16),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "axes", "shape", "source_axes", "pixel_size"),
    REAL_FILES,
    ids=[f"{name.split('/')[-1]}{'-' + kw['axes'] if kw else ''}" for name, kw, *_ in REAL_FILES],
)
def test_real_files(name, kwargs, axes, shape, source_axes, pixel_size):
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"real test data not available: {path}")
    img = read_image(path, **kwargs)
    assert (img.axes, img.data.shape, img.source_axes) == (axes, shape, source_axes)
    assert img.dtype == np.uint16
    assert img.pixel_size == (None if pixel_size is None else pytest.approx(pixel_size))
    t, frame = next(img.frames())
    assert t == 0 and frame.shape == shape[1:]
    assert frame.max() > frame.min()  # real content, not zeros
