"""Read image files other than TIFF: common 8/16-bit formats and vendor formats.

:func:`spotfit.io.read_image` handles TIFF itself and asks :func:`read_stored`
here for every other file it recognises (see :func:`handles`).  Each reader
returns the stored pixels with their axis letters; :mod:`spotfit.io` applies
the same axis rules, pixel-type and finiteness checks as for TIFF, so
``--axes``, ``--channel`` and the :class:`Image` that comes out mean exactly
what they mean for a TIFF.  (This module imports nothing of
:mod:`spotfit.io`.)

Formats
-------
=====================================  ===================================  ==============
suffix                                 read by                              install
=====================================  ===================================  ==============
``.png .jpg .jpeg .bmp .gif .webp``    :mod:`imageio` (its Pillow plugin)   always
``.pgm .ppm .pnm``
``.nd2`` (Nikon)                       ``nd2``                              ``spotfit[nd2]``
``.czi`` (Zeiss)                       ``pylibCZIrw`` (Zeiss' libCZI)       ``spotfit[czi]``
``.lif`` (Leica)                       ``readlif``                          ``spotfit[lif]``
``.zarr`` folders (OME-Zarr, Zarr)     ``zarr`` + ``dask`` (lazily)         ``spotfit[dask]``
=====================================  ===================================  ==============

A Zarr folder is read lazily, as a Dask array of its full-resolution level
(OME-Zarr: the first dataset of its ``multiscales``, axes and pixel sizes
from its metadata; a plain Zarr array: the last two axes ``YX``), and fitted
block by block (:mod:`spotfit.blockwise`).

imageio is already installed with scikit-image (a core dependency), is the
reader scikit-image itself uses, and covers all of Pillow's formats with one
call that also returns every frame of an animated GIF.  Colour images are
read with their samples on an ``S`` axis, exactly like RGB TIFFs (choose one
with ``--channel``); a colour file whose colour samples are equal in every
pixel (a grey image saved as RGB, or a palette GIF of grey levels) is read as
one grey channel, with a constant alpha channel ignored.

The vendor libraries are imported only when such a file is read; without
them the error names the extra to install.  ND2 files are read lazily (one
frame at a time, through nd2's dask array); CZI and LIF files are read into
memory plane by plane (the first scene / image series only).
"""

from __future__ import annotations

import os

import numpy as np

from spotfit.errors import SpotfitInputError

__all__ = ["IMAGEIO_SUFFIXES", "VENDOR_SUFFIXES", "SUFFIXES", "handles", "read_stored"]

#: File suffixes read through imageio (lower case).
IMAGEIO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm")

#: Vendor suffix -> (format name, import name, extra that installs it).
VENDOR_SUFFIXES = {
    ".nd2": ("Nikon ND2", "nd2", "nd2"),
    ".czi": ("Zeiss CZI", "pylibCZIrw", "czi"),
    ".lif": ("Leica LIF", "readlif", "lif"),
}

#: Every suffix handled here (TIFF is read by :mod:`spotfit.io`).
SUFFIXES = IMAGEIO_SUFFIXES + tuple(VENDOR_SUFFIXES)

#: Files that mark a folder as a Zarr store (v2 and v3).
ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# First bytes of the formats read through imageio, so that e.g. a PNG saved
# under another name is still recognised.
_MAGIC = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
)


def _suffix(where: str) -> str:
    return os.path.splitext(where)[1].lower()


def _head(where: str, n: int = 16) -> bytes:
    try:
        with open(where, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def handles(where: str) -> bool:
    """True when `where` is an existing file that this module reads.

    Decided by the suffix (:data:`SUFFIXES`) or by the first bytes of a
    PNG, JPEG, GIF or BMP file; a file that starts like a TIFF is left to
    :mod:`spotfit.io`, whatever its name.
    """
    if is_zarr(where):
        return True
    if not os.path.isfile(where):
        return False
    head = _head(where)
    if head[:4] in _TIFF_MAGIC:  # a TIFF whatever its name: spotfit.io reads it
        return False
    if _suffix(where) in SUFFIXES:
        return True
    return any(head.startswith(magic) for magic, _ in _MAGIC)


def read_stored(where: str, grey: bool = True):
    """The stored pixels of a non-TIFF image file, with their axis letters.

    :func:`spotfit.io.read_image` applies spotfit's axis rules and checks to
    them (those of TIFF files), so ``--axes``, ``--channel`` and the
    resulting :class:`~spotfit.io.Image` mean what they mean for a TIFF.

    Parameters
    ----------
    where : str
        File path; :func:`handles` must be true for it.
    grey : bool
        Read a colour file whose samples are equal in every pixel as one
        grey channel (when the caller gives no ``axes`` or ``channel``).

    Returns
    -------
    array : ndarray or lazy array
        In memory (imageio, CZI, LIF) or read frame by frame (ND2).
    stored_axes : str
        ``YX`` for a grey image, ``YXS`` for a colour image, ``TYX``/``TYXS``
        for an animation; vendor files report their own (e.g. ``TZCYX``).
    pixel_size, z_step : float or None
        µm, when the file says.

    Raises
    ------
    SpotfitInputError
        Naming the file: unreadable or corrupt file, missing optional
        reader (naming the extra to install).
    """
    array, stored_axes, pixel_size, z_step = _read_stored(where)
    if grey:
        array, stored_axes = _grey_from_colour(array, stored_axes)
    return array, stored_axes, pixel_size, z_step


# ----------------------------------------------------------------------------
# Common
# ----------------------------------------------------------------------------


def _read_stored(where: str):
    """(array, stored axes, pixel size µm or None, z step µm or None)."""
    if not os.path.exists(where):
        raise SpotfitInputError(f"{where}: no such file")
    if is_zarr(where):
        return _read_zarr(where)
    if os.path.isdir(where):
        raise SpotfitInputError(f"{where}: is a directory, not an image file")
    if os.path.getsize(where) == 0:
        raise SpotfitInputError(f"{where}: empty file (0 bytes), not an image")
    suffix = _suffix(where)
    if suffix == ".nd2":
        return _read_nd2(where)
    if suffix == ".czi":
        return _read_czi(where)
    if suffix == ".lif":
        return _read_lif(where)
    return _read_imageio(where)


def _grey_from_colour(array, stored_axes: str):
    """Drop an ``S`` axis whose colour samples are equal everywhere (grey stored as colour).

    RGB: R == G == B in every pixel.  RGBA: the same, with a constant alpha.
    Anything else is left as it is (the user picks a channel).
    """
    if "S" not in stored_axes or not isinstance(array, np.ndarray):
        return array, stored_axes
    s = stored_axes.index("S")
    n = array.shape[s]
    if n not in (3, 4):
        return array, stored_axes
    samples = np.moveaxis(array, s, 0)
    colour = samples[:3]
    if not (np.array_equal(colour[0], colour[1]) and np.array_equal(colour[0], colour[2])):
        return array, stored_axes
    if n == 4 and not np.all(samples[3] == samples[3].flat[0]):
        return array, stored_axes
    return np.ascontiguousarray(samples[0]), stored_axes.replace("S", "")


def _missing(where: str, suffix: str) -> SpotfitInputError:
    name, module, extra = VENDOR_SUFFIXES[suffix]
    return SpotfitInputError(
        f"{where}: reading {name} files needs the optional package {module!r}: "
        f"pip install 'spotfit[{extra}]' (or 'spotfit[vendor]' for ND2, CZI and LIF)"
    )


def _unreadable(where: str, kind: str, exc: BaseException) -> SpotfitInputError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return SpotfitInputError(f"{where}: cannot read {kind} file ({detail})")


# ----------------------------------------------------------------------------
# imageio: PNG, JPEG, BMP, GIF, WebP, PNM
# ----------------------------------------------------------------------------


def _read_imageio(where: str):
    import imageio.v3 as iio

    head = _head(where)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    kind = kind or _suffix(where).lstrip(".").upper() or "image"
    # GIF frames are palette images: decoded to RGB (some of Pillow's palette
    # modes are not converted by imageio itself).
    options = {"mode": "RGB"} if kind == "GIF" else {}
    try:
        with iio.imopen(where, "r", plugin="pillow") as fh:
            batch = bool(fh.properties(index=None).is_batch)
            array = np.asarray(fh.read(index=None, **options))
    except Exception as exc:  # Pillow raises many types for bad files
        if "can not handle" in str(exc):  # imageio's words for a file Pillow rejected
            exc = ValueError("corrupt, truncated or an unsupported variant")
        error = _unreadable(where, kind, exc)
        if _suffix(where) in (".tif", ".tiff"):
            error = SpotfitInputError(
                f"{where}: not a TIFF file (it looks like a {kind} file), and it cannot be "
                f"read as one either{str(error).split(' file', 1)[1]}"
            )
        raise error from exc
    if kind == "PNG" and len(head) >= 16 and array.dtype.itemsize == 1:
        _check_png_depth(where)
    spatial = {2: "YX", 3: "YXS"}.get(array.ndim - int(batch))
    if spatial is None:
        raise SpotfitInputError(
            f"{where}: unexpected {kind} layout (shape {array.shape})"
        )
    return array, ("T" if batch else "") + spatial, None, None


def _check_png_depth(where: str) -> None:
    """Refuse a 16-bit colour PNG: Pillow decodes it to 8 bits per sample.

    The PNG header (IHDR, bytes 24 and 25) gives the bit depth and colour
    type (2: RGB, 6: RGBA).  16-bit grey PNGs are read at full depth.
    """
    with open(where, "rb") as fh:
        ihdr = fh.read(26)
    if len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 6):
        raise SpotfitInputError(
            f"{where}: a 16-bit colour PNG, which Pillow (imageio's reader) can only read "
            "as 8 bits per colour; save it as TIFF (or as 16-bit grey PNGs, one per channel)"
        )


# ----------------------------------------------------------------------------
# Vendor formats
# ----------------------------------------------------------------------------


def _read_nd2(where: str):
    try:
        import nd2
    except ImportError as exc:
        raise _missing(where, ".nd2") from exc
    try:
        with nd2.ND2File(where) as fh:
            sizes = dict(fh.sizes)
            data = fh.to_dask()
            voxel = fh.voxel_size()
    except Exception as exc:
        raise _unreadable(where, "ND2", exc) from exc
    return _nd2_layout(data, sizes, voxel)


def _nd2_layout(data, sizes: dict, voxel):
    """Stored axes and physical sizes from nd2's ``sizes`` and ``voxel_size()``.

    nd2 names axes ``T`` (time), ``P`` (stage position), ``Z``, ``C``,
    ``Y``, ``X`` and ``S`` (RGB samples); spotfit reads them with the same
    letters (a position axis of size > 1 needs ``--axes``).
    """
    letters = "".join(str(k)[0].upper() for k in sizes)
    if len(letters) != getattr(data, "ndim", len(letters)):
        letters = letters[-data.ndim:]
    x, _, z = (float(v) if v else None for v in tuple(voxel)[:3])
    pixel = x if x and np.isfinite(x) and x > 0 else None
    step = z if z and np.isfinite(z) and z > 0 and "Z" in letters else None
    return data, letters, pixel, step


def _read_czi(where: str):
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError as exc:
        raise _missing(where, ".czi") from exc
    try:
        with pyczi.open_czi(where) as doc:
            return _czi_planes(doc)
    except SpotfitInputError:
        raise
    except Exception as exc:
        raise _unreadable(where, "CZI", exc) from exc


def _czi_planes(doc):
    """Read the first scene of an open pylibCZIrw document as (T, Z, C, Y, X[, S])."""
    box = doc.total_bounding_box
    count = {d: int(box[d][1] - box[d][0]) if d in box else 1 for d in "TZC"}
    start = {d: int(box[d][0]) if d in box else 0 for d in "TZC"}
    scenes = doc.scenes_bounding_rectangle
    roi = scenes[min(scenes)] if scenes else doc.total_bounding_rectangle
    planes = []
    for t in range(count["T"]):
        for z in range(count["Z"]):
            for c in range(count["C"]):
                plane = {"T": start["T"] + t, "Z": start["Z"] + z, "C": start["C"] + c}
                planes.append(np.asarray(doc.read(plane=plane, roi=roi)))
    samples = planes[0].shape[-1] if planes[0].ndim == 3 else 1
    array = np.stack(planes).reshape(
        (count["T"], count["Z"], count["C"]) + planes[0].shape[:2] + ((samples,) if samples > 1 else ())
    )
    if samples == 3:  # libCZI returns colour as BGR
        array = array[..., ::-1]
    axes = "TZCYX" + ("S" if samples > 1 else "")
    pixel, z_step = _czi_scaling(doc)
    return np.ascontiguousarray(array), axes, pixel, z_step


def _czi_scaling(doc) -> tuple:
    """(pixel size, z step) in µm from the CZI metadata's Scaling/Items/Distance (metres)."""
    try:
        items = doc.metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
    except (KeyError, TypeError, AttributeError):
        return None, None
    items = items if isinstance(items, list) else [items]
    metres = {str(d.get("@Id")): d.get("Value") for d in items if isinstance(d, dict)}
    return _um(metres.get("X"), 1e6), _um(metres.get("Z"), 1e6)


def _read_lif(where: str):
    try:
        from readlif.reader import LifFile
    except ImportError as exc:
        raise _missing(where, ".lif") from exc
    try:
        # readlif opens (and leaves open) the file for every plane when given
        # a path; given an open file it reads through that one.
        with open(where, "rb") as fh:
            return _lif_planes(LifFile(fh).get_image(0))
    except SpotfitInputError:
        raise
    except Exception as exc:
        raise _unreadable(where, "LIF", exc) from exc


def _lif_planes(image):
    """Read the first image series of a readlif ``LifImage`` as (T, Z, C, Y, X)."""
    dims = image.dims  # x, y, z, t, m
    n_t, n_z, n_c = int(dims.t), int(dims.z), int(image.channels)
    planes = [
        np.asarray(image.get_frame(z=z, t=t, c=c))
        for t in range(n_t) for z in range(n_z) for c in range(n_c)
    ]
    array = np.stack(planes).reshape((n_t, n_z, n_c) + planes[0].shape)
    scale = tuple(image.scale) + (None,) * 4  # pixels per µm: x, y, z, t
    pixel = _um(1.0 / scale[0] if scale[0] else None, 1.0)
    z_step = _um(1.0 / scale[2] if scale[2] else None, 1.0)
    return array, "TZCYX", pixel, z_step


def _um(value, factor: float) -> float | None:
    """``value * factor`` µm when a plausible size (1 nm to 10 mm), else None."""
    try:
        um = float(value) * factor
    except (TypeError, ValueError):
        return None
    return um if np.isfinite(um) and 1e-3 <= um <= 1e4 else None


# ----------------------------------------------------------------------------
# Zarr and OME-Zarr (folders), read lazily
# ----------------------------------------------------------------------------

#: OME-NGFF space units -> µm
_NGFF_UNITS = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "meter": 1e6,
               "angstrom": 1e-4, "picometer": 1e-6, "centimeter": 1e4}


def is_lazy(data) -> bool:
    """True for a Dask or Zarr array (fitted block by block, :mod:`spotfit.blockwise`)."""
    mod = type(data).__module__.split(".")[0]
    return mod in ("dask", "zarr")


def is_zarr(where: str) -> bool:
    """True for a folder holding a Zarr group or array (by its marker files)."""
    return os.path.isdir(where) and any(os.path.isfile(os.path.join(where, m)) for m in ZARR_MARKERS)


def _read_zarr(where: str):
    """(dask array, axes, pixel size µm, z step µm) of a Zarr / OME-Zarr folder, nothing loaded."""
    try:
        import dask.array as da
        import zarr
    except ImportError as exc:
        raise SpotfitInputError(f"{where}: reading Zarr folders needs the optional packages "
                                "'zarr' and 'dask': pip install 'spotfit[dask]'") from exc
    try:
        node = zarr.open(where, mode="r")
    except Exception as exc:  # zarr raises many types for bad stores
        raise _unreadable(where, "Zarr", exc) from exc
    pixel_size = z_step = None
    if isinstance(node, zarr.Array):
        array = node
        axes = "Q" * max(0, array.ndim - 2) + "YX"
    else:
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise SpotfitInputError(f"{where}: a Zarr group without OME-Zarr 'multiscales' "
                                    "metadata; give the path of its image array")
        ms = multiscales[0]
        dataset = ms["datasets"][0]
        try:
            array = node[dataset["path"]]
        except Exception as exc:
            raise _unreadable(where, "OME-Zarr", exc) from exc
        names = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
        if len(names) != array.ndim:
            names = ["t", "c", "z", "y", "x"][5 - array.ndim:]
        letters = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}
        axes = "".join(letters.get(n.lower(), "Q") for n in names)
        scale = _ngff_scale(ms, dataset, array.ndim)
        units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])]
        if scale is not None and len(units) == array.ndim:
            sizes = {}
            for letter, s, u in zip(axes, scale, units):
                factor = _NGFF_UNITS.get(str(u).lower()) if u else None
                if factor is not None and s > 0:
                    sizes[letter] = float(s) * factor
            pixel_size = sizes.get("X")
            z_step = sizes.get("Z")
    return da.from_zarr(array), axes, pixel_size, z_step


def _ngff_scale(ms: dict, dataset: dict, ndim: int):
    """The scale of a multiscale's dataset (its own and the multiscale's transformations)."""
    scale = np.ones(ndim)
    found = False
    for transforms in (dataset.get("coordinateTransformations", []),
                       ms.get("coordinateTransformations", [])):
        for tr in transforms:
            if tr.get("type") == "scale" and len(tr.get("scale", [])) == ndim:
                scale *= np.asarray(tr["scale"], float)
                found = True
    return scale if found else None
