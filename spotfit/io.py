"""Read microscopy TIFF files into one axis order; write ImageJ TIFFs.

Every image in spotfit is an :class:`Image` whose ``data`` has the axes
``"TYX"`` (time series of 2D frames; a single image has T = 1) or ``"TZYX"``
(time series of z-stacks; a single stack has T = 1).  Indexing follows the
package convention ``data[t, y, x]`` / ``data[t, z, y, x]``.

How the axes stored in a file are interpreted
---------------------------------------------
The axes of the first image series are taken from the file's ImageJ or OME
metadata as reported by :mod:`tifffile` (``TiffFile.series[0].axes``), or
from the ``axes`` argument (the command line's ``--axes``) which overrides
them.  Letters are mapped as follows:

========================  ==========================================
letter in the file        meaning in spotfit
========================  ==========================================
``T``, ``I``              time (``I``: tifffile's generic image index)
``Z``                     z plane
``C``, ``S``              channel (``S``: samples, e.g. RGB); one is
                          selected with ``channel``
``Y``, ``X``              rows, columns
anything else (``Q`` …)   unknown: a *leading* unknown axis of a 3D file
                          is read as time; size-1 unknown axes are
                          dropped; otherwise the file is rejected and
                          the user must give ``--axes``
========================  ==========================================

Axes of size 1 other than T, Y and X are dropped (a one-plane "z-stack" is
a 2D image).  Files whose metadata are wrong (an ImageJ movie labelled Z,
a z-stack stored without metadata) are read correctly by passing ``axes``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import numbers
import os
import stat
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import tifffile

from spotfit._atomic import atomic_path
from spotfit.errors import SpotfitInputError

__all__ = [
    "Image", "PagedStack", "count_channels", "default_axes", "read_image", "write_tiff",
    "SUPPORTED_DTYPES",
]

#: Pixel types spotfit reads; anything else (bool, complex, float16,
#: 64-bit integers) is rejected with a message naming the file.
SUPPORTED_DTYPES = tuple(
    np.dtype(name)
    for name in (
        "uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64",
    )
)

#: Letters accepted by the ``axes`` override (``--axes``).
AXES_LETTERS = "TZCYXS"

#: Smallest image (rows and columns) spotfit accepts.
MIN_SIDE = 3

# Physical sizes outside this range (µm) are treated as unknown: they come
# from uncalibrated or broken metadata (e.g. ImageJ writing 2e-6 µm/pixel).
_PLAUSIBLE_UM = (1e-3, 1e4)

# Memory used per block of frames when scanning float data for NaN / inf.
_SCAN_BYTES = 64 * 2**20

_UNIT_IN_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6,
}

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_FORMATS = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x89HDF", "HDF5"),
    (b"\x93NUMPY", "NumPy .npy"),
)


# ----------------------------------------------------------------------------
# The image container
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Image:
    """A time series of 2D images or z-stacks in one fixed axis order.

    Parameters
    ----------
    data : (T, Y, X) or (T, Z, Y, X) ndarray or array-like
        Pixel values, axis order exactly `axes`.  For files, either a
        read-only :class:`numpy.memmap` of the input file (uncompressed,
        contiguous files) or a :class:`PagedStack` that reads and decodes
        the TIFF pages of one time point at a time (compressed, tiled or
        scattered files): read it frame by frame (:meth:`frame`,
        :meth:`frames` or ``data[t]``) rather than loading all of it
        (``numpy.asarray(data)`` does load all of it).  A memory map keeps
        the file's byte order (ImageJ writes big-endian), which numpy and
        scipy handle transparently; :meth:`frame` and :meth:`frames` always
        give native byte order.
    axes : {"TYX", "TZYX"}
        Axis order of `data`.  A single 2D image is ``"TYX"`` with T = 1; a
        z-stack without time is ``"TZYX"`` with T = 1.
    path : str or None
        File the image was read from, None for images made in memory.
    pixel_size : float or None
        Pixel size in x and y, in µm per pixel; None when unknown.
    z_step : float or None
        Distance between z planes in µm; None when unknown or 2D.
    source_axes : str, optional
        Axes of the stored series as found in the file (after the user's
        override), e.g. ``"CYX"`` or ``"QYX"``.  Defaults to `axes`.
    dtype : numpy.dtype, optional
        Pixel type of the file, in native byte order (``uint16`` even for a
        big-endian file).  Defaults to ``data.dtype``.
    reader : optional
        For a memory-mapped file: reads frames through the open file
        (``pread``) instead of through the map, so that a file truncated
        while it is being read gives a :class:`SpotfitInputError` rather
        than killing the process with SIGBUS.  Set by :func:`read_image`.
    notes : tuple of str
        Where reading the file's axes was a guess (:func:`axes_notes`), one
        line each, suggesting ``axes``; empty when the axes were given or are
        certain.

    Notes
    -----
    Equality is identity (``eq=False``): comparing pixel arrays element-wise
    is not what ``==`` on an image should mean.
    """

    data: np.ndarray
    axes: str
    path: str | None = None
    pixel_size: float | None = None
    z_step: float | None = None
    source_axes: str | None = None
    dtype: np.dtype | None = None
    reader: "_FileReader | None" = field(default=None, repr=False)
    notes: tuple = ()

    def __post_init__(self):
        if self.axes not in ("TYX", "TZYX"):
            raise SpotfitInputError(
                f"Image axes must be 'TYX' or 'TZYX', not {self.axes!r}"
            )
        ndim = getattr(self.data, "ndim", None)
        if ndim != len(self.axes):
            raise SpotfitInputError(
                f"Image data must have {len(self.axes)} dimensions for axes "
                f"{self.axes!r}, got shape {getattr(self.data, 'shape', None)}"
            )
        if self.source_axes is None:
            object.__setattr__(self, "source_axes", self.axes)
        dtype = self.data.dtype if self.dtype is None else np.dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype.newbyteorder("="))

    @property
    def n_frames(self) -> int:
        """Number of time points T."""
        return int(self.data.shape[0])

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Spatial shape of one time point: ``(ny, nx)`` or ``(nz, ny, nx)``."""
        return tuple(int(n) for n in self.data.shape[1:])

    @property
    def is_3d(self) -> bool:
        """True for z-stacks (axes ``"TZYX"``)."""
        return self.axes == "TZYX"

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(t, frame)`` for each time point, reading one at a time.

        Yields
        ------
        t : int
            Time index, 0-based.
        frame : (Y, X) or (Z, Y, X) ndarray
            ``data[t]`` in native byte order, read by :meth:`frame`: only
            this frame is in memory at a time, whether the file is
            memory-mapped or read page by page.
        """
        for t in range(self.n_frames):
            yield t, self.frame(t)

    def frame(self, t: int) -> np.ndarray:
        """Read time point `t` as an in-memory array in native byte order.

        For a memory-mapped file the frame's bytes are read from the file
        (not through the map, whose pages would stay resident and count
        towards the process' memory until the map is closed, and whose
        access kills the process with SIGBUS if the file was truncated in
        the meantime), so reading a stack frame by frame keeps the memory of
        the process at about one frame, whatever the size of the file.  For
        a compressed or otherwise non-contiguous file only the TIFF pages of
        this frame are read and decoded.

        Parameters
        ----------
        t : int
            Time index, 0-based.

        Returns
        -------
        (Y, X) or (Z, Y, X) ndarray
            A new array (never a view of the caller's or the file's data).

        Raises
        ------
        SpotfitInputError
            If the file was truncated or became unreadable since it was opened.
        """
        view = self.data[t]
        if self.reader is not None and isinstance(view, np.memmap):
            return self.reader.read(view)
        if isinstance(view, np.ndarray):  # a copy: never a view of the caller's array
            return np.array(view, dtype=self.dtype)
        return np.asarray(view, dtype=self.dtype)  # a PagedStack frame is new already

    def close(self) -> None:
        """Release the file behind `data` (a page-by-page stack's open TIFF).

        Memory-mapped and in-memory images need no closing; calling it is
        always safe.  ``with read_image(path) as image:`` closes on exit.
        """
        close = getattr(self.data, "close", None)
        if close is not None and not isinstance(self.data, np.ndarray):
            close()
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return (
            f"Image(shape={tuple(self.data.shape)}, axes={self.axes!r}, "
            f"dtype={self.dtype}, path={self.path!r}, "
            f"pixel_size={self.pixel_size!r}, z_step={self.z_step!r}, "
            f"source_axes={self.source_axes!r})"
        )

    @classmethod
    def from_array(
        cls,
        data,
        axes: str | None = None,
        *,
        channel: int | None = None,
        pixel_size: float | None = None,
        z_step: float | None = None,
    ) -> "Image":
        """Wrap an in-memory array, bringing it into spotfit's axis order.

        Applies the same axis rules, pixel-type and finiteness checks as
        :func:`read_image`.

        Parameters
        ----------
        data : array_like
            Pixel values, e.g. of shape (Y, X), (T, Y, X) or (Z, Y, X).
        axes : str, optional
            One letter from ``TZCYXS`` per dimension of `data`, e.g. ``"YX"``,
            ``"ZYX"`` or ``"TCYX"``.  Default (:func:`default_axes`): ``YX``,
            ``TYX`` or ``TZYX`` by the number of dimensions; an array whose
            last axis has 3 or 4 elements may be a colour image (e.g. RGB
            of shape (424, 640, 3)) and is refused without `axes`.
        channel : int, optional
            Channel to keep when `data` has a channel axis of size > 1.
        pixel_size, z_step : float, optional
            Pixel size in x/y and z distance between planes, in µm.

        Returns
        -------
        Image
        """
        array = np.asarray(data)
        where = "array"
        if axes is None:
            axes = default_axes(array.shape)
        _check_dtype(array.dtype, where)
        plan = _plan_axes(
            _validate_axes_override(axes, array.shape, "", where),
            array.shape, channel, where, overridden=True,
        )
        _check_size(axes.upper(), array.shape, where)
        out, out_axes = _apply_plan(array, plan)
        _check_finite(out, where)
        return cls(
            data=out, axes=out_axes, path=None, pixel_size=pixel_size,
            z_step=z_step, source_axes=axes.upper(), dtype=array.dtype,
        )


def default_axes(shape) -> str:
    """Axes of an array given without them: ``YX``, ``TYX`` or ``TZYX`` by dimension.

    Raises
    ------
    SpotfitInputError
        For other dimensions, and for a 3D or 4D array whose last axis has
        3 or 4 elements: that is the layout of colour images (RGB, RGBA;
        e.g. (424, 640, 3)), read as frames of 3 or 4 pixel columns it
        would give nonsense, so the caller must say which it is.
    """
    shape = tuple(int(n) for n in shape)
    axes = {2: "YX", 3: "TYX", 4: "TZYX"}.get(len(shape))
    if axes is None:
        raise SpotfitInputError(
            f"cannot tell the axes of an array of shape {shape}; pass axes, one letter "
            f"from {AXES_LETTERS} per dimension (e.g. axes='TZCYX')"
        )
    if len(shape) >= 3 and shape[-1] in (3, 4):
        guess = "YXS" if len(shape) == 3 else "TYXS"
        raise SpotfitInputError(
            f"an array of shape {shape} is ambiguous: a colour image ({guess}, then "
            f"choose channel=0..{shape[-1] - 1}) or {axes} with {shape[-1]} columns; "
            f"pass axes (e.g. axes={guess!r} with channel=1, or axes={axes!r})"
        )
    return axes


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_image(
    path, axes: str | None = None, channel: int | None = None, series: int | None = None
) -> Image:
    """Read one image series of a TIFF file (the only one, or `series`), or another image format.

    Parameters
    ----------
    path : str or os.PathLike
        TIFF file (plain, ImageJ, OME or BigTIFF).  Opened read-only.
        PNG, JPEG, BMP, GIF, ... and vendor files (ND2, CZI, LIF) are read
        by :mod:`spotfit.readers` with the same rules.
    axes : str, optional
        Override for the stored axes (the command line's ``--axes``): one
        letter from ``TZCYXS`` per dimension of the stored series, ``Y`` and
        ``X`` required, no repeats, e.g. ``"TYX"`` for an ImageJ movie
        mislabelled as a z-stack, or ``"ZYX"`` for a z-stack stored as
        ``"QYX"``.
    channel : int, optional
        0-based channel to keep; required when the file has a channel axis
        (``C``, or ``S`` samples such as RGB) of size > 1, an error otherwise.
    series : int, optional
        0-based image series to read (the command line's ``--series``);
        required when the file holds several (a multi-position OME-TIFF, a
        multi-page TIFF whose pages differ in shape), which is an error
        without it: spotfit never reads only part of a file silently.

    Returns
    -------
    Image
        ``data`` of shape (T, Y, X) or (T, Z, Y, X) in the file's pixel type.
        Uncompressed, contiguous files are memory-mapped read-only (nothing is
        loaded until used; frames are read through the file, see
        :meth:`Image.frame`); others are read page by page.

    Raises
    ------
    SpotfitInputError
        One line naming the file (and the option) when the file is missing,
        a directory, not a regular file (a pipe, standard input), empty, not
        a TIFF, corrupt or truncated; when it is compressed with a codec
        that needs the ``imagecodecs`` package; when it holds several image
        series and `series` is not given (or out of range); when its axes
        cannot be interpreted or `axes` does not fit; when `channel` is
        missing, out of range or not applicable; for unsupported pixel types
        (bool, complex, float16, 64-bit integers); for NaN or infinite
        pixels; for zero-size images or images smaller than 3 x 3 pixels.

    Notes
    -----
    See the module docstring for how stored axis letters are interpreted.
    A 3D file whose first axis is unknown (tifffile's ``Q``, e.g. a plain
    multi-page TIFF) is read as a time series; pass ``axes="ZYX"`` for a
    z-stack.  The physical pixel size is read on a best-effort basis from
    ImageJ metadata (``unit``, XResolution, ``spacing``), OME metadata
    (``PhysicalSizeX``, ``PhysicalSizeZ``) or a metric TIFF ResolutionUnit;
    it is None when absent, in inches or pixels, or implausible
    (outside 1 nm to 10 mm).
    """
    where = os.fspath(path)
    from spotfit import readers  # PNG, JPEG, ..., ND2, CZI, LIF

    if readers.handles(where):
        if series not in (None, 0):
            raise SpotfitInputError(
                f"series {series} is out of range for {where}: it holds 1 image series "
                "(valid: 0)", parameter="series",
            )
        array, stored, pixel_size, z_step = readers.read_stored(where, grey=axes is None and channel is None)
        return _stored_image(array, stored, where, axes, channel, pixel_size, z_step)
    _check_file(where)

    with _TifffileErrors() as logged:
        try:
            tif = tifffile.TiffFile(where)
        except Exception as exc:  # tifffile raises many types for bad files
            raise _corrupt(where, exc) from exc
        with _ClosingUnlessPaged(tif) as closing:
            index = series
            series = _select_series(tif, where, logged, index)

            shape = tuple(int(n) for n in series.shape)
            stored_axes = str(series.axes)
            file_dtype = np.dtype(series.dtype)
            if 0 in shape or len(shape) == 0:
                raise SpotfitInputError(
                    f"{where}: image has no pixels (shape {shape}, axes {stored_axes})"
                )
            _check_dtype(file_dtype, where)
            source_axes = (
                stored_axes
                if axes is None
                else _validate_axes_override(axes, shape, stored_axes, where)
            )
            plan = _plan_axes(source_axes, shape, channel, where, overridden=axes is not None)
            _check_size(source_axes, shape, where)
            pixel_size, z_step = _physical_sizes(tif, series, index or 0)
            array = _map_pixels(tif, series, where)
            reader = None
            if array is not None:
                reader = _FileReader(where, array)
            else:
                _check_codec(series, where)
                array = PagedStack.open(tif, series, plan, where)
                closing.keep = array is not None  # the stack now owns the open file
            if array is None:  # a layout not split into pages: load it all
                array = _load_pixels(series, where)
            logged.check(where)

    if isinstance(array, PagedStack):
        data, out_axes = array, array.axes
    else:
        data, out_axes = _apply_plan(array, plan)
    image = Image(
        data=data,
        axes=out_axes,
        path=where,
        pixel_size=pixel_size,
        z_step=z_step if out_axes == "TZYX" else None,
        source_axes=source_axes,
        dtype=file_dtype,
        reader=reader,
        notes=() if axes is not None else axes_notes(source_axes, shape, plan, z_step),
    )
    try:
        _check_finite(data, where, reader.read if reader is not None else np.asarray)
    except BaseException:
        image.close()
        raise
    return image


def _stored_image(array, stored_axes, where, axes, channel, pixel_size, z_step) -> Image:
    """An :class:`Image` of pixels read by :mod:`spotfit.readers`, with the axis rules
    and checks of TIFF files."""
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 0 or 0 in shape:
        raise SpotfitInputError(
            f"{where}: image has no pixels (shape {shape}, axes {stored_axes})"
        )
    _check_dtype(array.dtype, where)
    source_axes = (
        stored_axes if axes is None
        else _validate_axes_override(axes, shape, stored_axes, where)
    )
    plan = _plan_axes(source_axes, shape, channel, where, overridden=axes is not None)
    _check_size(source_axes, shape, where)
    data, out_axes = _apply_plan(array, plan)
    _check_finite(data, where)
    return Image(
        data=data, axes=out_axes, path=where, pixel_size=pixel_size,
        z_step=z_step if out_axes == "TZYX" else None, source_axes=source_axes,
        dtype=np.dtype(array.dtype),
        notes=() if axes is not None else axes_notes(source_axes, shape, plan, z_step),
    )


def count_channels(path, axes: str | None = None, series: int | None = None) -> int:
    """Number of channels of a TIFF file's image series (1 without a channel axis).

    Reads only the file's header.  Used for ``--channel all``: the image is
    then read once per channel with ``read_image(path, axes, channel=c)``.

    Parameters
    ----------
    path : str or os.PathLike
    axes : str, optional
        Override for the stored axes, as in :func:`read_image`.
    series : int, optional
        Image series, as in :func:`read_image`.

    Returns
    -------
    int
        Size of the channel axis (``C``, or ``S`` samples such as RGB), or 1.
        When the file has several channel axes, :func:`read_image` reports it.

    Raises
    ------
    SpotfitInputError
        As :func:`read_image` for missing, empty, non-TIFF or corrupt files
        and for an `axes` override that does not fit.
    """
    where = os.fspath(path)
    from spotfit import readers

    if readers.handles(where):
        array, stored, _, _ = readers.read_stored(where, grey=axes is None)
        shape = tuple(int(n) for n in array.shape)
        letters = stored if axes is None else _validate_axes_override(axes, shape, stored, where)
        sizes = [n for a, n in zip(letters, shape) if a in "CS" and n > 1]
        return sizes[0] if sizes else 1
    _check_file(where)
    with _TifffileErrors() as logged:
        try:
            tif = tifffile.TiffFile(where)
        except Exception as exc:
            raise _corrupt(where, exc) from exc
        with tif:
            series = _select_series(tif, where, logged, series)
            shape = tuple(int(n) for n in series.shape)
            stored_axes = str(series.axes)
    letters = (
        stored_axes if axes is None
        else _validate_axes_override(axes, shape, stored_axes, where)
    )
    sizes = [n for a, n in zip(letters, shape) if a in "CS" and n > 1]
    return sizes[0] if sizes else 1


def _check_file(where: str) -> None:
    """Reject missing files, directories, empty files and non-TIFF files."""
    if where == "-":
        raise SpotfitInputError(
            "-: spotfit cannot read an image from standard input; save it to a file and "
            "give its path"
        )
    try:
        st = os.stat(where)
    except FileNotFoundError:
        raise SpotfitInputError(f"{where}: no such file") from None
    except OSError as exc:
        raise SpotfitInputError(f"{where}: cannot open ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise SpotfitInputError(f"{where}: is a directory, not a TIFF file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else (
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
            if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        )
        raise SpotfitInputError(
            f"{where}: is {kind}, not an image file; spotfit reads image files only (not "
            "standard input or pipes): save the image to a file first"
        )
    try:
        with open(where, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise SpotfitInputError(
            f"{where}: cannot open ({exc.strerror or exc})"
        ) from exc
    if not head:
        raise SpotfitInputError(f"{where}: empty file (0 bytes), not a TIFF image")
    if head[:4] not in _TIFF_MAGIC:
        kind = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
        hint = f" (it looks like a {kind} file)" if kind else ""
        raise SpotfitInputError(f"{where}: not a TIFF file{hint}")


#: How to get the codecs tifffile lacks.
CODECS_HINT = "pip install imagecodecs"


def _corrupt(where: str, exc: BaseException, compression: str | None = None) -> SpotfitInputError:
    """The error for a file tifffile cannot read: a missing codec, or damage."""
    if _needs_codecs(exc):
        how = f"compressed with {compression}" if compression else "compressed"
        return SpotfitInputError(
            f"{where}: {how}, which needs the imagecodecs package to decode: {CODECS_HINT}"
        )
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return SpotfitInputError(f"{where}: corrupt or truncated TIFF file ({detail})")


def _needs_codecs(exc: BaseException) -> bool:
    """True for tifffile's "this compression needs imagecodecs" failures."""
    return isinstance(exc, ImportError) or "imagecodecs" in str(exc)


def _check_codec(series, where: str) -> None:
    """Decode the first page of a compressed series now: a missing codec or a broken
    first page is reported when the file is opened, not in the middle of a run."""
    try:
        keyframe = series.keyframe
        compression = getattr(keyframe.compression, "name", str(keyframe.compression))
        if int(keyframe.compression) == 1:  # uncompressed
            return
        keyframe.asarray(maxworkers=1)
    except Exception as exc:
        raise _corrupt(where, exc, locals().get("compression")) from exc


class _TifffileErrors(logging.Filter):
    """Collect (and silence) tifffile's ERROR log records in this thread.

    tifffile reports some damage only through its logger and then returns a
    partial result: e.g. a truncated ImageJ movie is logged as "ImageJ series
    metadata invalid or corrupted file" and read as its first frame only.
    Such records are turned into a :class:`SpotfitInputError`.
    """

    def __init__(self):
        super().__init__()
        self._thread = threading.get_ident()
        self.messages: list[str] = []
        self._logger = logging.getLogger("tifffile")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self._thread and record.levelno >= logging.ERROR:
            self.messages.append(record.getMessage())
            return False
        return True

    def check(self, where: str) -> None:
        if self.messages:
            raise _corrupt(where, RuntimeError(self.messages[0]))

    def __enter__(self):
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc_info):
        self._logger.removeFilter(self)
        return False


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if np.dtype(dtype).newbyteorder("=") not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise SpotfitInputError(
            f"{where}: unsupported pixel type {np.dtype(dtype).name} "
            f"(supported: {names})"
        )


def _check_size(source_axes: str, shape: tuple[int, ...], where: str) -> None:
    ny = shape[source_axes.index("Y")]
    nx = shape[source_axes.index("X")]
    if ny < MIN_SIDE or nx < MIN_SIDE:
        raise SpotfitInputError(
            f"{where}: image is too small ({ny} rows x {nx} columns); spotfit "
            f"needs at least {MIN_SIDE} x {MIN_SIDE} pixels"
        )


def _map_pixels(tif: tifffile.TiffFile, series, where: str) -> np.memmap | None:
    """Memory-map the series if stored uncompressed and contiguous, else None.

    The map keeps the file's byte order: ImageJ writes big-endian files, and
    copying a multi-gigabyte movie only to swap bytes would defeat the map.
    """
    file_size = os.path.getsize(where)
    offset = series.dataoffset
    if offset is not None:
        file_dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        nbytes = int(np.prod(series.shape)) * file_dtype.itemsize
        if offset + nbytes > file_size:
            raise SpotfitInputError(
                f"{where}: corrupt or truncated TIFF file (pixel data needs "
                f"{offset + nbytes} bytes, the file has {file_size})"
            )
        try:
            return np.memmap(
                where, dtype=file_dtype, mode="r", offset=offset, shape=tuple(series.shape)
            )
        except (OSError, ValueError):
            pass  # e.g. a file system without mmap: read it page by page
    return None


def _load_pixels(series, where: str) -> np.ndarray:
    """Read and decode a whole series (layouts :class:`PagedStack` cannot split)."""
    try:
        return series.asarray(maxworkers=1)
    except Exception as exc:
        raise _corrupt(where, exc) from exc


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read into `buffer` from `offset` of `fd`; the number of bytes read (0 at the end)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)  # pragma: no cover - platforms without preadv
    buffer[:len(data)] = data
    return len(data)


class _FileReader:
    """Reads pieces of a memory-mapped TIFF through the open file, never through the map.

    Touching a page of a map whose file has been truncated since it was
    mapped kills the process with SIGBUS; reading the same bytes with
    ``pread`` instead gives a short read, reported as a
    :class:`SpotfitInputError`.  The file is opened once (so a file renamed
    or replaced meanwhile is still the one read) and closed by
    :meth:`close` or when the reader is garbage-collected.

    Parameters
    ----------
    where : str
        The file (for opening and for messages).
    array : numpy.memmap
        The map of the file's pixel data, as made by :func:`_map_pixels`;
        every view passed to :meth:`read` must be a view of it.
    """

    def __init__(self, where: str, array: np.memmap):
        self._where = where
        self._base = int(array.__array_interface__["data"][0])
        self._offset = int(array.offset)
        self._fd = os.open(where, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read(self, view: np.ndarray) -> np.ndarray:
        """A new, contiguous, native-order array with the values of `view` (a view of the map)."""
        native = view.dtype.newbyteorder("=")
        if view.size == 0:
            return np.empty(view.shape, dtype=native)
        if self._fd is None:
            raise SpotfitInputError(f"{self._where}: the image was closed")
        address = int(view.__array_interface__["data"][0])
        low = address + sum(s * (n - 1) for s, n in zip(view.strides, view.shape) if s < 0)
        high = address + view.itemsize + sum(
            s * (n - 1) for s, n in zip(view.strides, view.shape) if s > 0
        )
        start = self._offset + (low - self._base)
        buffer = np.empty(high - low, dtype=np.uint8)
        got = 0
        while got < buffer.size:
            try:
                n = _pread_into(self._fd, memoryview(buffer)[got:], start + got)
            except OSError as exc:
                raise SpotfitInputError(
                    f"{self._where}: cannot read ({exc.strerror or exc})"
                ) from exc
            if n == 0:
                size = os.fstat(self._fd).st_size
                raise SpotfitInputError(
                    f"{self._where}: the file was truncated while being read (its pixel data "
                    f"need {start + buffer.size} bytes, it now has {size}); was it being "
                    "written or copied?"
                )
            got += n
        piece = np.ndarray(view.shape, dtype=view.dtype, buffer=buffer,
                           offset=address - low, strides=view.strides)
        if piece.flags.c_contiguous and view.dtype == native:
            return piece  # the view's bytes exactly: the buffer is the frame
        return np.ascontiguousarray(piece, dtype=native)

    def close(self) -> None:
        """Close the file (further reads fail)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()


def _select_series(tif, where: str, logged, index=None) -> "tifffile.TiffPageSeries":
    """The image series to read: the only one, or number `index`; clear errors otherwise."""
    try:
        found = list(tif.series)
    except Exception as exc:
        raise _corrupt(where, exc) from exc
    logged.check(where)
    if not found:
        raise SpotfitInputError(f"{where}: corrupt or truncated TIFF file (no image found)")
    n = len(found)
    if index is None:
        if n > 1:
            raise SpotfitInputError(
                f"{where} holds {n} image series ({_describe_series(found)}); spotfit reads "
                f"one at a time: choose one with `series=N` (0 to {n - 1})", parameter="series"
            )
        return found[0]
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise SpotfitInputError(
            f"series must be a whole number (0-based), not {index!r}", parameter="series"
        )
    if not 0 <= index < n:
        raise SpotfitInputError(
            f"series {index} is out of range for {where}: it holds {n} image series "
            f"(valid: 0 to {n - 1})", parameter="series",
        )
    return found[int(index)]


def _describe_series(found, limit: int = 4) -> str:
    parts = []
    for i, s in enumerate(found[:limit]):
        try:
            parts.append(f"{i}: {'x'.join(str(n) for n in s.shape)} {s.axes}")
        except Exception:
            parts.append(f"{i}: ?")
    if len(found) > limit:
        parts.append(f"... {len(found) - limit} more")
    return ", ".join(parts)


class _ClosingUnlessPaged:
    """Close a TiffFile on leaving the block unless a PagedStack took it over (``keep``)."""

    def __init__(self, tif: tifffile.TiffFile):
        self.tif = tif
        self.keep = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self.keep:
            self.tif.close()
        return False


class FrameStack:
    """Base of the array-likes ``(T, ...)`` that read one frame at a time.

    A subclass sets ``shape``, ``ndim`` and ``dtype`` and defines
    ``_frame(t)``, frame `t` as a new array; this class gives the rest of the
    array interface: ``stack[t]`` (one frame, negative `t` counted from the
    end), ``stack[a:b]`` (those frames, stacked), any other index through
    ``numpy.asarray(stack)``, which reads every frame.
    """

    shape: tuple
    dtype: np.dtype

    def _frame(self, t: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(first, numbers.Integral) and not isinstance(first, bool):
            t = int(first)
            if t < 0:
                t += self.shape[0]
            if not 0 <= t < self.shape[0]:
                raise IndexError(f"frame {first} is out of range for {self.shape[0]} frames")
            return self._frame(t)[rest] if rest else self._frame(t)
        if isinstance(first, slice):
            frames = [self._frame(t) for t in range(*first.indices(self.shape[0]))]
            block = np.stack(frames) if frames else np.empty((0,) + self.shape[1:], self.dtype)
            return block[(slice(None),) + rest] if rest else block
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


class PagedStack(FrameStack):
    """A ``(T, Y, X)`` or ``(T, Z, Y, X)`` array-like over a TIFF series read page by page.

    Used for files that cannot be memory-mapped (compressed, tiled, or with
    pages scattered through the file): indexing one time point reads and
    decodes only the TIFF pages that hold it (for a TZCYX hyperstack and one
    channel, the Z pages of that channel at that time), so memory does not
    grow with the number of frames.  ``numpy.asarray(stack)`` reads all of
    it.  The TIFF file stays open (read-only) until :meth:`close` is called
    or the stack is garbage-collected.

    Attributes
    ----------
    shape : tuple of int
        ``(T, Y, X)`` or ``(T, Z, Y, X)``.
    ndim : int
    dtype : numpy.dtype
        Pixel type, native byte order.
    axes : {"TYX", "TZYX"}
    """

    def __init__(self, tif, series, n_page_axes: int, plan: "_AxesPlan", where: str):
        self._tif = tif
        self._series = series
        self._stored = tuple(int(n) for n in series.shape)
        self._k = n_page_axes
        self._index = plan.index
        self._where = where
        self._cache: tuple = ((), None)
        kept = plan.kept
        slots = [i for i, ix in enumerate(plan.index) if isinstance(ix, slice)]
        self._t_axis = slots[kept.index("T")] if "T" in kept else None
        spatial = kept.replace("T", "")
        self._order = [spatial.index(r) for r in "ZYX" if r in spatial]
        frame_shape = tuple(self._stored[slots[kept.index(r)]] for r in "ZYX" if r in spatial)
        n_frames = self._stored[self._t_axis] if self._t_axis is not None else 1
        self.shape = (n_frames,) + frame_shape
        self.ndim = len(self.shape)
        self.dtype = np.dtype(series.dtype).newbyteorder("=")
        self.axes = "TZYX" if "Z" in spatial else "TYX"
        compression = getattr(series.keyframe, "compression", None)
        self._compression = getattr(compression, "name", None)

    @classmethod
    def open(cls, tif, series, plan: "_AxesPlan", where: str) -> "PagedStack | None":
        """A PagedStack over `series`, or None if its pages do not split its shape.

        Checks that every page's data lies inside the file, so a truncated
        file is reported now rather than when its last frame is read.
        """
        try:
            pages = list(series.pages)
            keyframe = series.keyframe
        except Exception as exc:
            raise _corrupt(where, exc) from exc
        if not pages or any(page is None for page in pages):
            return None  # e.g. an OME file with missing pages: tifffile fills them
        file_size = os.path.getsize(where)
        for page in pages:
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > file_size:
                raise SpotfitInputError(
                    f"{where}: corrupt or truncated TIFF file (pixel data of a page "
                    f"ends at byte {max(ends)}, the file has {file_size})"
                )
        shape = tuple(int(n) for n in series.shape)
        page_size = math.prod(keyframe.shape)
        for k in range(len(shape) + 1):
            if math.prod(shape[:k]) == len(pages) and math.prod(shape[k:]) == page_size:
                return cls(tif, series, k, plan, where)
        return None

    def __repr__(self) -> str:
        return f"PagedStack(shape={self.shape}, dtype={self.dtype}, path={self._where!r})"

    def close(self) -> None:
        """Close the TIFF file (further reads fail)."""
        self._cache = ((), None)
        tif, self._tif = self._tif, None
        if tif is not None:
            tif.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -------------------------------------------------------------- reading
    def _frame(self, t: int) -> np.ndarray:
        """Read the pages of time point `t`; ``(Y, X)`` or ``(Z, Y, X)`` native order."""
        if self._tif is None:
            raise ValueError(f"{self._where}: the image was closed")
        index = list(self._index)
        if self._t_axis is not None:
            index[self._t_axis] = t
        k = self._k
        ranges = [
            range(n) if isinstance(i, slice) else (i,)
            for i, n in zip(index[:k], self._stored[:k])
        ]
        keys = tuple(
            int(np.ravel_multi_index(c, self._stored[:k])) if k else 0
            for c in itertools.product(*ranges)
        )
        cached_keys, block = self._cache
        if cached_keys != keys:
            with _TifffileErrors() as logged:
                try:
                    block = self._tif.asarray(key=list(keys), series=self._series, maxworkers=1)
                except Exception as exc:
                    raise _corrupt(self._where, exc, self._compression) from exc
                logged.check(self._where)
            block = np.asarray(block).reshape([len(r) for r in ranges] + list(self._stored[k:]))
            self._cache = (keys, block)
        inner = tuple(slice(None) if isinstance(i, slice) else 0 for i in index[:k])
        frame = block[inner + tuple(index[k:])]
        return np.ascontiguousarray(np.transpose(frame, self._order), dtype=self.dtype)


def _check_finite(data: np.ndarray, where: str, read=np.asarray) -> None:
    """Reject float data with NaN or infinite pixels, scanning blocks of frames.

    ``read(block)`` turns a block ``data[a:b]`` into an in-memory array
    (for a memory map: :meth:`_FileReader.read`, so the map is not touched).
    """
    if data.dtype.kind != "f" or data.size == 0:
        return
    frame_bytes = max(1, data.nbytes // max(1, data.shape[0]))
    step = max(1, _SCAN_BYTES // frame_bytes)
    n_nan = n_inf = 0
    for start in range(0, data.shape[0], step):
        block = read(data[start:start + step])
        n_nan += int(np.count_nonzero(np.isnan(block)))
        n_inf += int(np.count_nonzero(np.isinf(block)))
        del block
    if n_nan or n_inf:
        hint = ("; if NaN marks no data (as registration leaves it), replace it with 0, which "
                "spotfit leaves out as padding, or in Python pass numpy.ma.masked_invalid(image)"
                if n_nan else "")
        raise SpotfitInputError(
            f"{where}: {n_nan} NaN and {n_inf} infinite pixel values "
            f"(of {data.size}); spotfit needs finite pixels{hint}"
        )


# ----------------------------------------------------------------------------
# Axes
# ----------------------------------------------------------------------------


def _validate_axes_override(axes, shape: tuple[int, ...], stored_axes: str, where: str) -> str:
    """Check a user-given axes string (the ``axes`` parameter) against the stored shape;
    return it upper-case."""
    stored = f", stored axes {stored_axes!r}" if stored_axes else ""

    def fail(reason: str):
        raise SpotfitInputError(
            f"axes {axes!r} does not fit {where}: {reason} "
            f"(the image has {len(shape)} dimensions, shape {shape}{stored})", parameter="axes"
        )

    if not isinstance(axes, str):
        fail("give a string of axis letters")
    letters = axes.upper()
    bad = sorted({a for a in letters if a not in AXES_LETTERS})
    if bad:
        fail(f"unknown letter(s) {''.join(bad)!r}, use letters from {AXES_LETTERS}")
    repeated = sorted({a for a in letters if letters.count(a) > 1})
    if repeated:
        fail(f"repeated letter(s) {''.join(repeated)!r}")
    if "Y" not in letters or "X" not in letters:
        fail("Y and X are required")
    if len(letters) != len(shape):
        fail(f"{len(letters)} letters given, one per dimension needed")
    return letters


_ROLE_NAMES = {"T": "time", "Z": "z", "C": "channel"}


@dataclass(frozen=True)
class _AxesPlan:
    """How to turn a stored array into spotfit's axis order.

    ``index``: per stored axis, an integer (keep that element, dropping the
    axis) or ``slice(None)``; ``kept``: the roles ("T", "Z", "Y", "X") of the
    axes left after indexing, in stored order; ``roles``: per stored axis,
    its role or "drop".
    """

    index: tuple
    kept: str
    roles: tuple = ()


def _plan_axes(
    source_axes: str,
    shape: tuple[int, ...],
    channel,
    where: str,
    overridden: bool = False,
) -> _AxesPlan:
    """Interpret axis letters; pick the channel; plan squeezing and transposing.

    Messages name the parameters ``axes`` and ``channel`` (the command line
    names its options instead, see :class:`~spotfit.errors.SpotfitInputError`).
    """
    described = f"axes {source_axes!r}, shape {shape}"
    roles = []
    for i, (letter, size) in enumerate(zip(source_axes, shape)):
        if letter in "TI":
            role = "T"
        elif letter in "ZYX":
            role = letter
        elif letter in "CS":
            role = "C"
        elif size == 1:
            role = "drop"
        elif i == 0 and len(shape) == 3 and source_axes[1:] in ("YX", "XY"):
            role = "T"  # a leading unknown axis of a 3D file: a time series
        else:
            raise SpotfitInputError(
                f"{where}: cannot tell what axis {letter!r} (size {size}) is "
                f"({described}); give all axes with `axes`, e.g. `axes='TZYX'`", parameter="axes"
            )
        roles.append(role)

    for needed in "YX":
        if needed not in roles:
            raise SpotfitInputError(
                f"{where}: no {needed} axis found ({described}); give the axes "
                f"with `axes`", parameter="axes"
            )

    # A role on two axes: keep the one of size > 1, drop size-1 duplicates.
    for role in "TZC":
        positions = [i for i, r in enumerate(roles) if r == role]
        if len(positions) > 1:
            big = [i for i in positions if shape[i] > 1]
            if len(big) > 1:
                letters = "".join(source_axes[i] for i in big)
                raise SpotfitInputError(
                    f"{where}: more than one {_ROLE_NAMES[role]} axis ({letters!r}; "
                    f"{described}); give the axes with `axes`", parameter="axes"
                )
            keep = big[0] if big else positions[0]
            for i in positions:
                if i != keep:
                    roles[i] = "drop"

    # Channel selection.
    index: list = [slice(None)] * len(shape)
    channel_axis = roles.index("C") if "C" in roles else None
    if channel is not None and (
        isinstance(channel, bool) or not isinstance(channel, numbers.Integral)
    ):
        raise SpotfitInputError(
            f"channel must be a whole number (0-based channel), not {channel!r}",
            parameter="channel",
        )
    if channel_axis is None:
        if channel is not None:
            raise SpotfitInputError(
                f"channel {channel} given but {where} has no channel axis "
                f"({described})", parameter="channel"
            )
    else:
        n_channels = shape[channel_axis]
        letter = source_axes[channel_axis]
        kind = "; samples per pixel, e.g. RGB" if letter == "S" else ""
        if channel is None:
            if n_channels > 1:
                hint = (
                    "" if overridden
                    else f", or give `axes` if axis {letter} is not channels"
                )
                raise SpotfitInputError(
                    f"{where} has {n_channels} channels (axis {letter}{kind}); "
                    f"choose one with `channel` (0 to {n_channels - 1}){hint}",
                    parameter="channel",
                )
            channel = 0
        if not 0 <= channel < n_channels:
            raise SpotfitInputError(
                f"channel {channel} is out of range for {where}: it has "
                f"{n_channels} channel(s) (axis {letter}), valid: 0 to {n_channels - 1}",
                parameter="channel",
            )
        index[channel_axis] = int(channel)
        roles[channel_axis] = "drop"

    # Squeeze other size-1 axes away (a one-plane z-stack is a 2D image).
    for i, role in enumerate(roles):
        if role == "drop":
            if not isinstance(index[i], int):
                index[i] = 0
        elif role == "Z" and shape[i] == 1:
            index[i] = 0
            roles[i] = "drop"

    kept = "".join(r for r in roles if r != "drop")
    return _AxesPlan(index=tuple(index), kept=kept, roles=tuple(roles))


def axes_notes(source_axes: str, shape, plan: _AxesPlan, z_step) -> tuple:
    """Where the reading of a file's axes was a guess: one note each, suggesting ``axes``.

    * a stored axis read as time without being labelled time (tifffile's
      ``I`` of a plain multi-page TIFF, a leading unknown ``Q``);
    * images labelled as z planes (e.g. ImageJ's default for any stack,
      "slices") with no z step recorded, and no time axis: perhaps a movie.

    Only for axes taken from the file (not given by the user).
    """
    notes = []
    for i, (letter, n) in enumerate(zip(source_axes, shape)):
        if plan.roles[i] == "T" and letter != "T" and n > 1:
            hint = source_axes[:i] + "Z" + source_axes[i + 1:]
            notes.append(
                f"its {n} images are not labelled as time or z (axes {source_axes!r}); read as "
                f"{n} time frames. If they are z planes, give `axes='{hint}'`")
    if "T" not in plan.roles and z_step is None:
        for i, (letter, n) in enumerate(zip(source_axes, shape)):
            if plan.roles[i] == "Z" and n > 1:
                hint = source_axes[:i] + "T" + source_axes[i + 1:]
                notes.append(
                    f"its {n} images are labelled as z planes but no z step is recorded: read "
                    f"as one z-stack of {n} planes (3D). If they are time points, give "
                    f"`axes='{hint}'`")
    return tuple(notes)


def _apply_plan(array: np.ndarray, plan: _AxesPlan) -> tuple[np.ndarray, str]:
    """Index, transpose to T(Z)YX and add a T axis; views only (maps stay maps)."""
    view = array[plan.index]
    order = "".join(r for r in "TZYX" if r in plan.kept)
    view = np.transpose(view, [plan.kept.index(r) for r in order])
    if "T" not in order:
        view = view[np.newaxis]
        order = "T" + order
    return view, order


# ----------------------------------------------------------------------------
# Physical pixel size
# ----------------------------------------------------------------------------


def _physical_sizes(tif: tifffile.TiffFile, series=None, index: int = 0
                    ) -> tuple[float | None, float | None]:
    """Best-effort (pixel_size, z_step) in µm from OME, ImageJ or TIFF tags of a series."""
    try:
        if tif.is_ome:
            sizes = _ome_sizes(tif.ome_metadata, index)
            if sizes != (None, None):
                return sizes
        page = series.keyframe if series is not None else tif.pages.first
        if tif.is_imagej:
            meta = tif.imagej_metadata or {}
            factor = _unit_in_um(meta.get("unit"))
            if factor is not None:
                pixel = _per_resolution(page, factor)
                spacing = meta.get("spacing")
                z_step = _plausible(float(spacing) * factor) if spacing else None
                if pixel is not None or z_step is not None:
                    return pixel, z_step
        unit = page.tags.valueof("ResolutionUnit")
        factor = {3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit) if unit is not None else 1)
        if factor is not None:
            return _per_resolution(page, factor), None
    except Exception:  # metadata is best effort: never fail the read
        pass
    return None, None


def _unit_in_um(unit) -> float | None:
    if not isinstance(unit, str):
        return None
    text = unit.strip().lower().replace("\\u00b5", "µ").replace("\\u03bc", "μ")
    return _UNIT_IN_UM.get(text)


def _per_resolution(page, factor: float) -> float | None:
    """Pixel size in µm from XResolution (pixels per unit) times unit in µm."""
    value = page.tags.valueof("XResolution")
    if value is None:
        return None
    numerator, denominator = value
    if not numerator or not denominator:
        return None
    return _plausible(denominator / numerator * factor)


def _ome_sizes(xml: str, index: int = 0) -> tuple[float | None, float | None]:
    root = ElementTree.fromstring(xml)
    all_pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    pixels = all_pixels[index] if index < len(all_pixels) else None
    if pixels is None:
        return None, None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _unit_in_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is None or factor is None:
            return None
        return _plausible(float(value) * factor)

    return size("X"), size("Z")


def _plausible(um: float) -> float | None:
    low, high = _PLAUSIBLE_UM
    return float(um) if np.isfinite(um) and low <= um <= high else None


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------

_IMAGEJ_DTYPES = tuple(np.dtype(d) for d in ("uint8", "uint16", "int16", "float32"))


def write_tiff(
    path,
    data,
    axes: str,
    *,
    pixel_size: float | None = None,
    z_step: float | None = None,
    into=None,
) -> None:
    """Write an ImageJ-compatible TIFF atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; replaced atomically (see :func:`spotfit._atomic.atomic_path`).
    data : array_like
        Pixel values, axis order `axes`; uint8, uint16, int16 or float32
        (float64 is stored as float32, since ImageJ has no float64 type).
    axes : str
        One letter from ``TZCYX`` per dimension of `data`, Y and X required,
        e.g. ``"TYX"``, ``"TZYX"`` or ``"YX"``.  Axes are reordered to
        ImageJ's TZCYX order when needed.
    pixel_size : float, optional
        Pixel size in x and y, in µm (stored as resolution with unit "um").
    z_step : float, optional
        Distance between z planes, in µm (ImageJ ``spacing``).
    into : str or os.PathLike, optional
        Write to this (temporary) file instead, as is: for a caller that
        writes several files as one (:func:`spotfit._atomic.atomic_group`).
        `path` is then only used in messages.

    Raises
    ------
    SpotfitInputError
        When `axes` does not fit `data`, the pixel type cannot be stored,
        `pixel_size` or `z_step` is not positive, or the output directory
        does not exist; the message names `path`.
    """
    where = os.fspath(path)
    array = np.asarray(data)
    if isinstance(axes, str) and "S" in axes.upper():
        raise SpotfitInputError(
            f"{where}: cannot write axes {axes!r}: use C for channels, not S"
        )
    letters = _validate_axes_override(axes, array.shape, "", where)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype.newbyteorder("=") not in _IMAGEJ_DTYPES:
        raise SpotfitInputError(
            f"{where}: cannot write pixel type {array.dtype.name} to an ImageJ TIFF "
            f"(use uint8, uint16, int16 or float32)"
        )
    order = [letters.index(a) for a in "TZCYX" if a in letters]
    array = np.ascontiguousarray(np.transpose(array, order))
    letters = "".join(letters[i] for i in order)

    for name, value in (("pixel_size", pixel_size), ("z_step", z_step)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise SpotfitInputError(
                f"{where}: {name} must be a positive number of µm, not {value!r}"
            )

    metadata: dict = {"axes": letters}
    resolution = None
    if pixel_size is not None:
        resolution = (1.0 / float(pixel_size), 1.0 / float(pixel_size))
        metadata["unit"] = "um"
    if z_step is not None:
        metadata["spacing"] = float(z_step)
    write = functools.partial(
        tifffile.imwrite, data=array, imagej=True, metadata=metadata, resolution=resolution
    )
    if into is not None:
        write(into)
        return
    with atomic_path(where) as tmp:
        write(tmp)
