"""The Python API: :func:`fit`, :func:`fit_spots` and :func:`detect`, image in, table out;
:func:`process_file`, one file in, its table and a description of how it was read out.

These are the functions the command line calls and users call.
:func:`fit` and :func:`detect` take the same inputs -- an image path, an
:class:`~spotfit.io.Image` or an array (also a masked array, or a nested
list), a :class:`~spotfit.config.FitConfig` and/or its fields as keywords,
a :class:`~spotfit.camera.Camera`, ``axes``, ``channel`` and ``series`` --
and report progress through an optional callback ``on_frame(t, n_frames)``,
called after each frame.  :func:`process_file` is the per-file step of
``spotfit fit``/``detect`` (one file, or each file of a batch): read with
the user's overrides (pixel size, ``channel="all"``), detect or fit, and
say what was read (axes, frames, notes where the axes were a guess, the
resolved parameters), reporting frames and spots as it goes.

Per frame the pipeline is: camera conversion (ADU -> photons, or ADU above
the baseline), detection (:func:`spotfit.detection.find_peaks`), then the
fits :mod:`spotfit.fields` chooses (single-spot fits, :mod:`spotfit.single`:
windows of several frames pooled into one solve, a frame with very many
candidates split; joint fits, :mod:`spotfit.group`, where spots overlap), and
the table (:mod:`spotfit.table`).  Results do not depend on how frames are pooled or
split: everything that is not per window is per frame.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from spotfit import table
from spotfit import fields
from spotfit.camera import Camera, as_camera
from spotfit.config import FitConfig, Setup, make_config
from spotfit.errors import SpotfitInputError, SpotfitWarning
from spotfit.lighttable import as_frame, concat

#: a warning is given when the baseline is above this fraction of a frame's pixels
DARK_FRACTION = 0.99

# --------------------------------------------------------------------- API
def fit(image, config: FitConfig | None = None, camera: Camera | None = None,
        axes: str | None = None, channel: int | None = None, on_frame=None, invert: bool = False,
        series: int | None = None, **options):
    """Detect and fit every spot of an image or stack.

    Parameters
    ----------
    image : str, os.PathLike, spotfit.io.Image or array_like
        A TIFF path, an image from :func:`spotfit.read_image`, or an array:
        ``(ny, nx)``, ``(T, ny, nx)``, ``(T, nz, ny, nx)``, or any layout
        with ``axes``.  Masked pixels of a ``numpy.ma.MaskedArray`` are left
        out of detection and fits.
    config : FitConfig, optional
    camera : Camera or mapping, optional
        Without a calibrated camera, values are in ADU above baseline and the
        least-squares estimator is used by default.
    axes : str, optional
        Axes of a path's or an array's dimensions (letters ``TZCYXS``);
        arrays default to ``YX``, ``TYX``, ``TZYX`` by dimension
        (:func:`spotfit.io.default_axes`; a colour-like array such as
        ``(424, 640, 3)`` needs them).
    channel : int, optional
        Channel to use when the image has several.
    on_frame : callable, optional
        ``on_frame(t, n_frames)``, called after each frame is processed.
    invert : bool
        Dark objects on a light background (e.g. bright-field colloids):
        use the inverted image (:mod:`spotfit.invert`).  Not with a
        calibrated camera.
    series : int, optional
        Image series of a file that holds several (:func:`spotfit.read_image`).
    **options
        Override fields of ``config`` (e.g. ``sigma=1.5, estimator="mle"``).

    Returns
    -------
    pandas.DataFrame
        One row per detected spot, columns as in :func:`spotfit.table.columns`
        (documented in the README), plus ``x_um``... when the image knows its
        pixel size (:func:`spotfit.table.add_physical_units`) and the group
        columns with ``crowded``.  Failed fits are kept and flagged in
        ``status``.
    """
    config = make_config(config, options)
    camera = as_camera(camera)
    if _lazy(image):
        return _blockwise("fit", image, config, camera, axes, on_frame)
    with _Input(image, axes, channel, config, camera, window=True, invert=invert,
                series=series) as (img, valid, ndim):
        return as_frame(_fit_image(img, valid, ndim, config, camera, _per_frame(on_frame)))


def _lazy(image) -> bool:
    """A Dask or Zarr array (or an Image of one): fitted block by block (:mod:`spotfit.blockwise`,
    not imported for an array in memory)."""
    from spotfit.readers import is_lazy

    return is_lazy(image) or (type(image).__name__ == "Image" and is_lazy(getattr(image, "data", None)))


def _blockwise(task, image, config, camera, axes=None, on_frame=None, block_size=None,
               scheduler=None, progress=None):
    """:func:`spotfit.blockwise.fit_blocks` / ``detect_blocks`` of an array or an Image of one."""
    from spotfit import blockwise

    img = image if type(image).__name__ == "Image" else None
    data = image if img is None else image.data
    if img is not None:
        axes = img.axes
    if progress is None and on_frame is not None:
        progress = on_frame  # (blocks done, blocks in all)
    if task == "fit":
        result = blockwise.fit_blocks(data, config, camera, axes=axes, block_size=block_size,
                                      scheduler=scheduler, progress=progress, frame_fit=_fit_frames)
    else:
        result = blockwise.detect_blocks(data, config, camera, axes=axes, block_size=block_size,
                                         scheduler=scheduler, progress=progress)
    return result if img is None else _with_units(result, img)


def _fit_frames(raw, config, camera, ndim):
    """The in-memory table of whole frames ``raw`` ``(k, [nz,] ny, nx)`` (frames numbered
    from 0): what :mod:`spotfit.blockwise` runs for blocks that are whole frames."""
    return fit(raw, config=config, camera=camera, axes="TZYX" if ndim == 3 else "TYX")


def _fit_image(img, valid, ndim, config, camera, report=None):
    """The fit table of an open image (a :class:`~spotfit.lighttable.LightTable` or a
    DataFrame); ``report(t, n_frames, n_found)`` after each frame."""
    setup = Setup.resolve(config, camera, ndim)
    said = set()
    frames = _frames(img, valid, setup, report, said=said)
    result = fields.fit_dense(setup, frames) if config.crowded else fields.fit_frames(setup, frames)
    if "contrast" not in said:  # (dark objects' fits are wide: that warning says why)
        _warn_widths(result, config, ndim)
    return _with_units(result, img)


#: a warning is given when more than this share of the significant fits (``converged``
#: and ``not_spot``), and at least :data:`WIDE_MIN_ROWS` of them, are ``not_spot`` by
#: being wider than 2 sigmas (the images of ``../shared/data``: 0-19 %; spots of sigma 3 px fitted
#: with the default 1.3 px: 80 %)
WIDE_SHARE = 0.5
WIDE_MIN_ROWS = 10


def _warn_widths(result, config, ndim) -> None:
    """A :class:`SpotfitWarning` when most significant fits (``converged`` or
    ``not_spot``) are ``not_spot`` by their width: the spots are probably wider than the
    sigma given (the default 1.3 px, say)."""
    from spotfit.results import MAX_WIDTH

    if len(result) == 0:
        return
    status = result["status"].to_numpy()
    widest = np.maximum(result["sigma_x"].to_numpy(), result["sigma_y"].to_numpy()) > MAX_WIDTH * config.sigma
    if ndim == 3:
        widest |= result["sigma_z"].to_numpy() > MAX_WIDTH * config.axial_sigma()
    wide = int(np.count_nonzero((status == "not_spot") & widest))
    significant = int(np.count_nonzero((status == "not_spot") | (status == "converged")))
    if wide < WIDE_MIN_ROWS or wide <= WIDE_SHARE * significant:
        return
    used = f"{config.sigma:g} px" + (f", {config.axial_sigma():g} planes in z" if ndim == 3 else "")
    warnings.warn(f"{wide} of {significant} fitted spots ({100 * wide / significant:.0f}%) are wider than "
                  f"{MAX_WIDTH:g} x the sigma used ({used}) and flagged not_spot: if your spots are "
                  "that wide, give their `sigma` (measure it: `sigma='auto'` on the command line, "
                  "spotfit.psf.estimate_sigma in Python)", SpotfitWarning, stacklevel=3)


def _per_frame(on_frame):
    """The public ``on_frame(t, n_frames)`` as an internal ``report(t, n_frames, n_found)``."""
    return None if on_frame is None else (lambda t, n_frames, n_found: on_frame(t, n_frames))


def fit_spots(image, positions, config: FitConfig | None = None, camera: Camera | None = None,
              frame: int = 0, **options):
    """Fit spots at given positions in one 2D image or 3D stack.

    Parameters
    ----------
    image : (ny, nx) or (nz, ny, nx) array_like
        Raw camera values of one frame (a masked array's masked pixels are
        left out of the fits).
    positions : (n, 2) or (n, 3) array_like
        Approximate centres as ``(x, y)`` or ``(x, y, z)`` in px; windows are
        centred on the nearest pixel.  Must be finite.
    config, camera, **options
        As in :func:`fit` (``crowded`` is ignored: each position gets its
        own window).
    frame : int
        Value of the ``frame`` column.

    Returns
    -------
    pandas.DataFrame
        One row per position, in the order given.
    """
    config = make_config(config, options)
    camera = as_camera(camera)
    raw, valid = _split_mask(image)
    raw = _pixel_array(raw)
    ndim = raw.ndim
    if ndim not in (2, 3):
        raise SpotfitInputError(f"image must be a 2D or 3D frame for fit_spots, got shape {raw.shape}",
                                parameter="image")
    pos = np.asarray(positions, dtype=float)
    if pos.size and (pos.ndim != 2 or pos.shape[1] != ndim) and pos.shape != (ndim,):
        raise SpotfitInputError(
            f"positions must be an (n, {ndim}) array of {'x, y, z' if ndim == 3 else 'x, y'} for a "
            f"{ndim}D image, got shape {pos.shape}", parameter="positions")
    pos = pos.reshape(-1, ndim)
    if not np.all(np.isfinite(pos)):
        raise SpotfitInputError("positions must be finite (no NaN or infinite coordinates)",
                                parameter="positions")
    camera.check_shape(raw.shape)
    config.check_frame(raw.shape, window=True)
    setup = Setup.resolve(config, camera, ndim)
    if len(pos) == 0:
        return table.empty(ndim)
    prepared = _prepare(setup, int(frame), raw, valid)
    for note in prepared.notes.values():
        warnings.warn(note, SpotfitWarning, stacklevel=2)
    prepared.coords = np.rint(pos[:, ::-1]).astype(np.int64)  # (x, y[, z]) -> array order
    return as_frame(fields.fit_single(setup, [prepared], raster=False))


def detect(image, config: FitConfig | None = None, camera: Camera | None = None,
           axes: str | None = None, channel: int | None = None, on_frame=None, invert: bool = False,
           series: int | None = None, **options):
    """Detect spot candidates in every frame of an image.

    Takes what :func:`fit` takes; only the detection options of the
    configuration matter (``sigma``, ``sigma_z``, ``threshold``,
    ``min_distance``).

    Parameters
    ----------
    image, config, camera, axes, channel, on_frame, invert, series, **options
        As in :func:`fit`.  With a calibrated camera the noise that scores
        are relative to comes from the camera's noise model
        (:meth:`spotfit.background.NoiseModel.from_camera`), otherwise it is
        measured on each frame (:func:`spotfit.background.estimate_noise`).

    Returns
    -------
    pandas.DataFrame
        One row per candidate, sorted by ``frame``, (``z``,) ``y``, ``x``:
        ``frame`` (int64, 0 for a single image), ``x``, ``y`` (float64,
        pixels; integer pixel positions of the maxima), ``z`` (float64,
        planes; z-stacks only) and ``score`` (float64, signal-to-noise),
        plus ``x_um``... when the image knows its pixel size.  No
        candidates give an empty table with the same columns and dtypes.
    """
    config = make_config(config, options)
    camera = as_camera(camera)
    if _lazy(image):
        return _blockwise("detect", image, config, camera, axes, on_frame)
    with _Input(image, axes, channel, config, camera, window=False, invert=invert,
                series=series) as (img, valid, ndim):
        return as_frame(_detect_image(img, valid, ndim, config, camera, _per_frame(on_frame)))


def _detect_image(img, valid, ndim, config, camera, report=None):
    """The detection table of an open image (a :class:`~spotfit.lighttable.LightTable`);
    ``report(t, n_frames, n_found)`` after each frame."""
    from spotfit.lighttable import LightTable

    frames, coords, scores = [np.empty(0, np.int64)], [np.empty((0, ndim), np.intp)], [np.empty(0)]
    for f in _frames(img, valid, config, report, camera=camera):
        frames.append(np.full(len(f.coords), f.t, dtype=np.int64))
        coords.append(f.coords)
        scores.append(f.score)
    frames, coords = np.concatenate(frames), np.concatenate(coords)
    # table in spotfit's conventions: x = column, y = row, z = plane
    cols = {"frame": frames, "x": coords[:, -1].astype(float), "y": coords[:, -2].astype(float)}
    if ndim == 3:
        cols["z"] = coords[:, 0].astype(float)
    cols["score"] = np.concatenate(scores).astype(float)
    keys = [cols["x"], cols["y"]] + ([cols["z"]] if ndim == 3 else []) + [frames]
    order = np.lexsort(keys)  # the last key is the primary one
    return _with_units(LightTable({k: v[order] for k, v in cols.items()}), img)


# ------------------------------------------------------------ one file
#: What :func:`process_file` can do to a file.
TASKS = ("fit", "detect")

#: Physical sizes above these (µm) are warned about: a camera pixel seen in
#: the sample is ~0.03-2 µm, so ``160`` is nm given as µm.
IMPLAUSIBLE_PIXEL_UM = 10.0
IMPLAUSIBLE_Z_STEP_UM = 50.0


def process_file(path, task: str = "fit", config: FitConfig | None = None,
                 camera: Camera | None = None, axes: str | None = None, channel=None,
                 pixel_size: float | None = None, z_step: float | None = None,
                 invert: bool = False, series: int | None = None, progress=None,
                 block_size=None, scheduler=None, light: bool = False):
    """Read one image file, detect or fit every frame; the table and how the file was read.

    The per-file step of ``spotfit fit`` and ``spotfit detect``, for one
    file or each file of a batch, so one file gives the same table either way.

    Parameters
    ----------
    path : str or os.PathLike
    task : {"fit", "detect"}
    config : FitConfig, optional
    camera : Camera or mapping, optional
    axes, series : optional
        As in :func:`spotfit.read_image`.
    channel : int or "all", optional
        One channel, or ``"all"``: every channel in turn, with a ``channel``
        column (0-based) after ``frame`` (0 for a file without channels).
    pixel_size, z_step : float, optional
        µm per pixel and between planes, overriding the file's metadata;
        with a known pixel size the table gets ``x_um``, ``y_um`` (``z_um``)
        columns, once (:func:`spotfit.table.add_physical_units`).  A size
        beyond :data:`IMPLAUSIBLE_PIXEL_UM` (:data:`IMPLAUSIBLE_Z_STEP_UM`),
        given or read, is warned about (nm given as µm?).
    invert : bool
        Dark objects on a light background (:mod:`spotfit.invert`).
    progress : callable, optional
        ``progress(frames_done, frames_total, spots_found)`` after each
        frame (over all channels with ``channel="all"``); ``spots_found``
        counts the candidates detected so far.
    block_size, scheduler : optional
        For a file read lazily (Zarr / OME-Zarr): fitted block by block
        (:func:`spotfit.blockwise.fit_blocks`, with these), ``progress``
        then counting blocks (``spots_found`` 0).
    light : bool
        Return the table as it was made: a :class:`spotfit.lighttable.LightTable`
        where no step needed pandas (single-spot fits, detection; what the
        command line writes as CSV without importing pandas), else a DataFrame.

    Returns
    -------
    table : pandas.DataFrame (or LightTable, with ``light``)
    info : dict
        ``shape``, ``axes`` (``TYX``/``TZYX``), ``source_axes`` (as read),
        ``dtype``, ``frames``, ``channels``, ``channel`` (as given),
        ``pixel_size_um``/``z_step_um`` used (None: unknown) and where they
        came from (``pixel_size_from``, ``z_step_from``: ``option`` or
        ``metadata``), ``notes`` (:attr:`spotfit.io.Image.notes`: where the
        axes were a guess), ``resolved`` (:func:`spotfit.config.resolved_values`:
        the parameters actually used) and ``timings_s`` (``read`` and
        ``fit``/``detect`` seconds).

    Raises
    ------
    SpotfitInputError
        For bad files and parameters (the message names the file or the
        parameter).
    """
    import dataclasses
    import time

    from spotfit.config import resolved_values
    from spotfit.io import count_channels, read_image

    if task not in TASKS:
        raise SpotfitInputError(f"task must be one of {', '.join(TASKS)}, not {task!r}",
                                parameter="task")
    config = make_config(config, {})
    camera = as_camera(camera)
    if invert:
        from spotfit.invert import check_camera

        check_camera(camera)
    for name, value in (("pixel_size", pixel_size), ("z_step", z_step)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise SpotfitInputError(f"{name} must be a positive number of µm, got {value!r}",
                                    parameter=name)
    where = os.fspath(path)
    timings = {"read": 0.0, task: 0.0}
    channels = [channel]
    if channel == "all":
        start = time.perf_counter()
        n_channels = count_channels(where, axes, series=series)
        timings["read"] += time.perf_counter() - start
        channels = list(range(n_channels)) if n_channels > 1 else [None]

    tables, info, found = [], {}, 0
    for k, c in enumerate(channels):
        start = time.perf_counter()
        img = read_image(where, axes=axes, channel=c, series=series)
        timings["read"] += time.perf_counter() - start
        with img:
            given = {"pixel_size": pixel_size, "z_step": z_step if img.is_3d else None}
            scaled = dataclasses.replace(img, **{n: float(v) for n, v in given.items() if v is not None})
            if k == 0:
                _warn_implausible(scaled, given)

            def report(t, n_frames, n_found, k=k):
                nonlocal found
                found += n_found
                if progress is not None:
                    progress(k * n_frames + t + 1, len(channels) * n_frames, found)

            start = time.perf_counter()
            if _lazy(scaled) and not invert:
                ndim = 3 if scaled.is_3d else 2
                blocks = None if progress is None else (
                    lambda done, total, k=k: progress(k * total + done, len(channels) * total, 0))
                table = _blockwise(task, scaled, config, camera, block_size=block_size,
                                   scheduler=scheduler, progress=blocks)
            else:
                with _Input(scaled, None, None, config, camera, window=task == "fit",
                            invert=invert) as (use, valid, ndim):
                    run = _fit_image if task == "fit" else _detect_image
                    table = run(use, valid, ndim, config, camera, report)
            timings[task] += time.perf_counter() - start
            if channel == "all":
                table.insert(1, "channel", np.full(len(table), c or 0, dtype=np.int64))
            tables.append(table)
            info = _describe(scaled, given, channel, len(channels), ndim)
            info["resolved"] = resolved_values(config, camera, ndim, task)
    non_empty = [t for t in tables if len(t)] or tables[:1]
    table = concat(non_empty)
    info["timings_s"] = timings
    return (table if light else as_frame(table)), info


def _describe(img, given, channel, n_channels, ndim) -> dict:
    """How an image was read, for :func:`process_file`'s ``info``."""
    def origin(name, value):
        return None if value is None else ("option" if given[name] is not None else "metadata")

    z_step = img.z_step if ndim == 3 else None
    return {
        "shape": [int(n) for n in img.data.shape],
        "axes": img.axes,
        "source_axes": img.source_axes,
        "dtype": str(img.dtype),
        "frames": img.n_frames,
        "channels": n_channels if channel == "all" else 1,
        "channel": channel,
        "pixel_size_um": img.pixel_size,
        "pixel_size_from": origin("pixel_size", img.pixel_size),
        "z_step_um": z_step,
        "z_step_from": origin("z_step", z_step),
        "notes": list(img.notes),
    }


def _warn_implausible(img, given) -> None:
    """One warning per physical size beyond what a microscope camera sees (nm given as µm?)."""
    for name, value, limit, what in (
            ("pixel_size", img.pixel_size, IMPLAUSIBLE_PIXEL_UM, "µm per pixel"),
            ("z_step", img.z_step, IMPLAUSIBLE_Z_STEP_UM, "µm between planes")):
        if value is None or value <= limit:
            continue
        if given[name] is not None:
            text = (f"{value:g} {what} (`{name}`) is implausible, above {limit:g} µm: did you "
                    f"give nm? It is in µm: {value / 1000:g} for {value:g} nm")
        else:
            text = (f"the file's metadata give {value:g} {what}, which is implausible (above "
                    f"{limit:g} µm); if that is wrong, give `{name}` in µm")
        warnings.warn(text, SpotfitWarning, stacklevel=3)


# ------------------------------------------------------------------ input
def as_image(image, axes=None, channel=None, series=None):
    """An :class:`~spotfit.io.Image` of a path, an Image or an array.

    A path is opened here (the caller closes the Image), its ``series`` if
    it holds several; an array (also a nested list; a masked array's data)
    is wrapped with :meth:`spotfit.io.Image.from_array`, its ``axes``
    defaulting to :func:`spotfit.io.default_axes`.
    """
    from spotfit.io import Image, read_image

    if isinstance(image, Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, axes=axes, channel=channel, series=series)
    return Image.from_array(_pixel_array(_split_mask(image)[0]), axes, channel=channel)


class _Input:
    """``with _Input(image, axes, channel, config, camera, window, invert, series) as (img, valid, ndim)``.

    An open :class:`~spotfit.io.Image` (:func:`as_image`; closed on exit if
    opened here from a path), inverted with ``invert``, checked against the
    camera's maps and the configuration's sigma (and ``window``); for a
    masked array with masked pixels, an Image of its validity (1 = use the
    pixel), else None; the frames' dimensions.
    """

    def __init__(self, image, axes, channel, config, camera, window, invert=False, series=None):
        from spotfit.io import Image

        if invert:
            from spotfit.invert import check_camera

            check_camera(camera)
        self.opened = isinstance(image, (str, os.PathLike))
        self.img = as_image(image, axes, channel, series)
        valid = _split_mask(image)[1] if not isinstance(image, (str, os.PathLike, Image)) else None
        self.valid = None if valid is None else Image.from_array(valid.astype(np.uint8), axes, channel=channel)
        try:
            if invert:
                from spotfit.invert import invert_image

                self.img = invert_image(self.img)
            camera.check_shape(self.img.frame_shape, source=str(self.img.path or "image"))
            config.check_frame(self.img.frame_shape, window=window)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self.img, self.valid, 3 if self.img.is_3d else 2

    def __exit__(self, *exc):
        if self.opened:
            self.img.close()
        return False


def _with_units(result, img):
    """µm columns when the image knows its pixel size (:func:`spotfit.table.add_physical_units`)."""
    return table.add_physical_units(result, img.pixel_size, img.z_step if img.is_3d else None)


def _split_mask(image):
    """``(data, valid)`` of a masked array (``valid`` None if nothing is masked)."""
    if isinstance(image, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(image)
        if mask.any():
            return image.filled(np.zeros((), image.dtype)), ~mask
        return image.data, None
    return image, None


def _pixel_array(image) -> np.ndarray:
    """An array of a pixel type spotfit reads; other integer (and bool) types as float64."""
    arr = np.asarray(image)
    if arr.dtype.kind == "b" or arr.dtype in (np.dtype(np.int64), np.dtype(np.uint64)):
        arr = arr.astype(np.float64)
    return arr


# ------------------------------------------------------------------ frames
def _prepare(setup, t, raw, valid=None, camera=None) -> fields.Frame:
    """Camera conversion of one frame, its image noise and its clipped pixels.

    ``setup`` is a :class:`Setup` (fits) or a :class:`FitConfig`
    (detection only, with ``camera``).
    """
    from spotfit.padding import find_padding, padding_note
    from spotfit.start import image_noise

    camera = camera or setup.camera
    photons = camera.to_photons(raw)
    padding, padded = find_padding(raw), None
    if padding is not None and valid is not None:  # masked already: nothing new
        padding &= np.asarray(valid, dtype=bool)
        padding = padding if padding.any() else None
    if padding is not None:
        padded = padding_note(raw, padding, t)
        valid = ~padding if valid is None else np.asarray(valid, dtype=bool) & ~padding
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        # left-out pixels neither make nor hide peaks: the frame's typical level
        photons[~valid] = np.median(photons[valid]) if valid.any() else 0.0
    notes = {"dark": _dark(camera, photons, t), "padded": padded,
             "floor": None if camera.calibrated else _floor(raw, valid, t)}
    f = fields.Frame(t, photons, valid=valid, notes={k: v for k, v in notes.items() if v})
    if isinstance(setup, Setup):
        if not camera.calibrated:
            f.image_var = image_noise(photons, valid)
        f.saturated = _clipped(raw, valid)
    return f


def _clipped(raw, valid):
    """:func:`spotfit.camera.clipped_pixels` of ``raw`` among the ``valid`` ones (None if
    there are none)."""
    from spotfit.camera import clipped_pixels

    clipped = clipped_pixels(raw)
    return clipped if valid is None or clipped is None else clipped & valid


#: without a camera, a warning is given when at least this fraction of a frame's pixels
#: are 0 (a background subtracted and clipped before spotfit: from ~70 % on, the noise
#: measured on the frame is too low and noise makes spots -- 300 x 410 px, 40 spots:
#: 46 candidates at 71 %, 152 at 80 %)
FLOOR_FRACTION = 0.5


def _floor(raw, valid, t):
    """A warning's text when :data:`FLOOR_FRACTION` of the frame's (valid) pixels are 0."""
    raw = np.asarray(raw)
    if raw.size == 0 or raw.dtype.kind not in "uif":
        return None
    sample = raw if valid is None else raw[valid]
    sample = sample.ravel()[:: max(1, sample.size // 65536)]
    share = np.count_nonzero(sample == 0) / max(sample.size, 1)
    if not FLOOR_FRACTION <= share < 1.0:  # (a blank frame: nothing to say)
        return None
    return (f"{min(100 * share, 99.9):.1f}% of the pixels of frame {t} are 0: a background "
            "subtracted and clipped at 0 before spotfit? The noise measured on such a frame is "
            "too low (noise makes spots) and intensities are biased; give spotfit the image as "
            "recorded (it fits the background itself), or the camera (`gain`, `baseline`)")


def _dark(camera, photons, t):
    """A warning's text when the baseline is above almost every pixel (:data:`DARK_FRACTION`)."""
    baseline = np.asarray(camera.baseline)
    if not np.any(baseline != 0):
        return None
    sample = photons.ravel()[:: max(1, photons.size // 65536)]
    dark = np.count_nonzero(sample < 0) / max(sample.size, 1)
    if dark < DARK_FRACTION:
        return None
    level = f"{float(baseline):g} ADU" if baseline.ndim == 0 else "map"
    return (f"baseline ({level}) is above {100 * dark:.1f}% of the pixels of frame {t}: "
            "results are doubtful; is the baseline right?")


#: :func:`_frames` detects 2D frames of at most this many pixels, with a camera's
#: noise model, in stacks (:func:`spotfit.detection.find_peaks_stack`: the same
#: candidates, one pass per stack instead of per frame) of up to STACK_PIXELS pixels
STACK_FRAME_PIXELS = 128 * 128
STACK_PIXELS = 1 << 18


def _frames(img, valid_img, setup, report=None, camera=None, said=None):
    """Prepared, detected frames of ``img``, one at a time; ``report(t, n_frames, n_found)``
    after each (``n_found``: the frame's candidates).  Small 2D frames with a calibrated
    camera are read and detected a stack at a time (:data:`STACK_FRAME_PIXELS`).

    Gives at most one :class:`SpotfitWarning` of each kind of a frame's notes per call
    (a dark frame, padding left out, a clipped floor: :func:`_prepare`), and one when
    the first frame looks dark on light (or, inverted, bright on dark:
    :func:`spotfit.invert.contrast_hint`; ``"contrast"`` is then added to the set
    ``said``, if given).
    """
    from spotfit.background import NoiseModel, estimate_noise
    from spotfit.invert import InvertedStack, contrast_hint

    config = setup.config if isinstance(setup, Setup) else setup
    ndim = 3 if img.is_3d else 2
    sigma, options = config.detection_sigma(ndim), config.detection_options()
    cam = camera or setup.camera
    # a calibrated camera's noise model; otherwise each frame's, measured on it
    camera_noise = NoiseModel.from_camera(cam) if cam.calibrated else None
    warned = set()  # the kinds of Frame.notes given (once per call each)
    valid_frames = valid_img.frames() if valid_img is not None else None
    pending = []
    first = [True]

    def detected(frames):
        for f in _detected(frames, sigma, options, img.n_frames, report):
            if first[0]:
                first[0] = False
                where = f"frame {f.t}: " if img.n_frames > 1 else ""
                hint = contrast_hint(f.photons, sigma, options, f.coords, f.score,
                                     inverted=isinstance(img.data, InvertedStack), valid=f.valid, where=where)
                if hint:
                    warnings.warn(hint, SpotfitWarning, stacklevel=4)
                    if said is not None:
                        said.add("contrast")
            yield f

    for t, raw in img.frames():
        valid = next(valid_frames)[1].astype(bool) if valid_frames is not None else None
        f = _prepare(setup, t, raw, valid, camera)
        for kind, note in f.notes.items():
            if kind not in warned:
                warnings.warn(note, SpotfitWarning, stacklevel=3)
                warned.add(kind)
        f.noise = camera_noise if camera_noise is not None else estimate_noise(f.photons, sigma, f.valid)
        pending.append(f)
        size = f.photons.size
        if (camera_noise is not None and ndim == 2 and 0 < size <= STACK_FRAME_PIXELS
                and len(pending) < STACK_PIXELS // size):
            continue
        yield from detected(pending)
        pending = []
    yield from detected(pending)


def _detected(frames, sigma, options, n_frames, report):
    """:func:`_frames`' detection of prepared ``frames`` (one noise model for all when
    more than one: a stack of small frames), each yielded and then reported."""
    from spotfit.detection import find_peaks, find_peaks_stack

    for f in frames:
        f.background = []
    if len(frames) > 1 and len({f.photons.shape for f in frames}) == 1 and frames[0].photons.ndim == 2:
        found = find_peaks_stack(np.stack([f.photons for f in frames]), sigma, noise=frames[0].noise,
                                 backgrounds=[f.background for f in frames], **options)
    else:
        found = [find_peaks(f.photons, sigma, noise=f.noise, backgrounds=f.background, **options)
                 for f in frames]
    for f, (coords, score) in zip(frames, found):
        f.coords, f.score = coords, score
        if f.valid is not None and len(f.coords):
            keep = f.valid[tuple(f.coords.T)]
            f.coords, f.score = f.coords[keep], f.score[keep]
        yield f
        if report is not None:
            report(f.t, n_frames, len(f.coords))
