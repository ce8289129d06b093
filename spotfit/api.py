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
the baseline), detection (:func:`spotfit.detection.find_peaks`), then either
single-spot fits (:mod:`spotfit.single`; windows of several frames are
pooled into one solve, a frame with very many candidates is split) or
crowded-field fits (:mod:`spotfit.group`), and the table
(:mod:`spotfit.table`).  Results do not depend on how frames are pooled or
split: everything that is not per window is per frame.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from spotfit import single, table
from spotfit.group import DENSE_COVERAGE, coverage  # noqa: F401 (public here too)
from spotfit.camera import Camera
from spotfit.config import FitConfig, Setup, make_config
from spotfit.errors import SpotfitInputError, SpotfitWarning

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
    camera : Camera, optional
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
    camera = camera or Camera()
    if _lazy(image):
        return _blockwise("fit", image, config, camera, axes, on_frame)
    with _Input(image, axes, channel, config, camera, window=True, invert=invert,
                series=series) as (img, valid, ndim):
        return _fit_image(img, valid, ndim, config, camera, _per_frame(on_frame))


def _lazy(image) -> bool:
    """A Dask or Zarr array (or an Image of one): fitted block by block (:mod:`spotfit.blockwise`)."""
    from spotfit.blockwise import is_lazy

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
    """The fit table of an open image; ``report(t, n_frames, n_found)`` after each frame."""
    setup = Setup.resolve(config, camera, ndim)
    frames = _frames(img, valid, setup, report)
    result = _fit_dense(setup, frames) if config.crowded else _fit_auto(setup, frames)
    return _with_units(result, img)


def _fit_auto(setup: Setup, frames):
    """The default: single-spot fits of frames whose spots stand apart, the
    crowded-field fits (:func:`_fit_dense`, without the group columns) of dense
    frames (:data:`DENSE_COVERAGE`).

    Consecutive frames of a kind are fitted together in runs (at most
    :data:`CROWDED_CHUNK` pixels of dense frames, or a single-spot solve's
    worth of windows), in frame order.
    """
    import pandas as pd

    parts, run, kind, size = [], [], None, 0
    chunk = single.batch_size(setup)

    def flush():
        if run:
            if kind:
                part = _fit_dense(setup, run)
                parts.append(part.drop(columns=[c for c in table._GROUP if c in part]))
            else:
                parts.append(_fit_sparse(setup, run))
            run.clear()
        return 0

    for f in frames:
        dense = coverage(f.coords, f.photons.shape, setup.config) >= DENSE_COVERAGE
        amount = f.photons.size if dense else len(f.coords)
        if run and (dense != kind or size + amount > (CROWDED_CHUNK if dense else chunk)):
            size = flush()
        kind = dense
        run.append(f)
        size += amount
    flush()
    parts = [p for p in parts if len(p)]
    if not parts:
        return table.empty(setup.ndim)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _fit_sparse(setup: Setup, frames):
    """Frames whose spots mostly stand apart: single-spot fits, then the
    crowded-field fits (:func:`_fit_dense`) where a frame's single fits say
    that spots overlap (:func:`_overlaps`): the whole frame if it is small,
    else the tiles of :data:`TILE_CORE` px around the overlaps (with a margin
    of :func:`_tile_margin` px), whose cores' rows replace the single fits
    there.  Spots that stand apart keep their single-spot fit."""
    import pandas as pd

    for f in frames:  # candidates in raster order (z, y, x), as the rows of their single fits
        if f.coords is not None and len(f.coords) > 1:
            order = np.lexsort(f.coords.T[::-1])
            f.coords = f.coords[order]
            f.score = None if f.score is None else f.score[order]
    singles = _fit_single(setup, frames, raster=True)
    if len(singles) == 0:
        return singles
    t = singles["frame"].to_numpy()
    parts, whole, done = [], [], np.zeros(len(singles), bool)
    for f in frames:
        if len(f.coords) == 0:
            continue
        if setup.ndim == 3:  # z-stacks: the single-spot path (the blockwise engine's too)
            break
        rows = np.flatnonzero(t == f.t)
        hot = _overlaps(setup, f, singles.iloc[rows])
        if not hot.any():
            continue
        if f.photons.size <= TILE_FRAME * _tile_size(setup) ** 2 or min(f.photons.shape) < _tile_size(setup) or \
                (setup.read_var_map() is not None and np.ndim(setup.read_var_map())):
            whole.append(f)
            done[rows] = True
            continue
        joint, replaced = _fit_tiles(setup, f, singles.iloc[rows], hot)
        parts.append(joint)
        done[rows[replaced]] = True
    if whole:
        joint = _fit_dense(setup, whole, singles=singles[np.isin(t, [f.t for f in whole])])
        bad = np.isin(joint["frame"].to_numpy(), _misfit_regions(setup, joint))
        done &= ~np.isin(t, joint["frame"].to_numpy()[bad])  # those frames keep their single fits
        parts.append(joint[~bad])
    if not parts:
        return singles
    parts = [p.drop(columns=[c for c in table._GROUP if c in p]) for p in parts]
    out = pd.concat([singles[~done]] + parts, ignore_index=True)
    keys = [out[c].to_numpy() for c in ("x", "y", "z")[:setup.ndim]] + [out["frame"].to_numpy()]
    return out.iloc[np.lexsort(keys)].reset_index(drop=True)


#: a frame larger than this many tiles (:func:`_tile_size`) is fitted jointly
#: only in the tiles around its overlapping spots, a smaller one whole
TILE_FRAME = 16
#: core of a tile, px: rows whose fitted position falls in it come from the tile
TILE_CORE = 32


def _tile_margin(setup: Setup) -> int:
    """Pixels around a tile's core: a joint fit's window, the residual search
    around it, a grouping radius, and its neighbours' windows."""
    from spotfit.group import SEARCH_REACH

    cfg, h = setup.config, max(setup.half)
    return int(2 * h + np.ceil((SEARCH_REACH + cfg.group_radius) * cfg.sigma))


def _tile_size(setup: Setup) -> int:
    return TILE_CORE + 2 * _tile_margin(setup)


#: a region with this many emitters pinned at the width bound in misfit groups keeps
#: its single fits (:func:`_misfit_regions`)
MISFIT_REGION = 2


def _misfit_regions(setup: Setup, joint) -> np.ndarray:
    """Frames (tiles) of joint fits that did not explain their light: an emitter
    pinned at the upper width bound of the joint fits (``WIDTH_RANGE``) in a group
    misfit by ``SUSPECT_CHI2`` standard deviations -- textured light that the
    residual search fills with PSF-wide emitters.  Such a region keeps its
    single-spot fits."""
    from spotfit import results
    from spotfit._kernels import CONVERGED
    from spotfit.group import WIDTH_RANGE

    if len(joint) == 0:
        return np.zeros(0, np.int64)
    cfg = setup.config
    sx, sy = joint["sigma_x"].to_numpy(), joint["sigma_y"].to_numpy()
    dof = np.prod([2 * h + 1 for h in setup.half]) - setup.model.n_params
    pinned = (sx == sy) & (sx >= 0.99 * WIDTH_RANGE[1] * cfg.sigma) & (sx <= 1.001 * WIDTH_RANGE[1] * cfg.sigma)
    misfit = joint["chi2_red"].to_numpy() > 1.0 + SUSPECT_CHI2 * np.sqrt(2.0 / max(dof, 1))
    converged = joint["status"].to_numpy() == results.STATUS_NAMES[CONVERGED]
    frames, count = np.unique(joint["frame"].to_numpy()[pinned & misfit & converged], return_counts=True)
    return frames[count >= MISFIT_REGION]


def _overlaps(setup: Setup, frame, singles) -> np.ndarray:
    """Which single-spot fits of a frame (rows of its candidates, in raster order)
    need the joint fits: a candidate within ``group_radius * sigma`` of
    another, or a fit wider than ``SUSPECT_WIDTH`` sigmas along one axis,
    elongated by ``SUSPECT_ELONGATION`` and at least ``WIDTH_RANGE[0]`` sigmas
    wide across (two spots closer than the detector separates); both only
    among converged fits narrower than ``BLOB_WIDTH`` sigmas; bool per row."""
    from scipy.spatial import cKDTree

    from spotfit import results
    from spotfit._kernels import CONVERGED

    cfg = setup.config
    coords = frame.coords
    sx, sy = singles["sigma_x"].to_numpy(), singles["sigma_y"].to_numpy()
    big, small = np.maximum(sx, sy), np.minimum(sx, sy)
    # spots: converged fits narrower than a blob (texture, aggregates are left alone)
    spot = (singles["status"].to_numpy() == results.STATUS_NAMES[CONVERGED]) & (small <= BLOB_WIDTH * cfg.sigma)
    hot = np.zeros(len(coords), bool)
    if len(coords) > 1:
        pairs = cKDTree(coords[:, ::-1].astype(float)).query_pairs(cfg.group_radius * cfg.sigma,
                                                                   output_type="ndarray")
        pairs = pairs[spot[pairs[:, 0]] & spot[pairs[:, 1]]]
        hot[pairs.ravel()] = True
    # a pair's minor axis is the PSF's; a minor axis narrower than the joint fits' smallest
    # width is an elongated PSF (astigmatism, a wrong --sigma), not two spots
    from spotfit.group import WIDTH_RANGE

    hot |= spot & (big > SUSPECT_WIDTH * cfg.sigma) & (big > SUSPECT_ELONGATION * small) & \
        (small >= WIDTH_RANGE[0] * cfg.sigma)
    return hot


def _fit_tiles(setup: Setup, frame, singles, hot):
    """Joint fits of a large frame in the tiles around its overlapping spots ``hot``.

    The frame is cut into cores of :data:`TILE_CORE` px; each core within
    2 px of an overlapping spot is fitted (:func:`_fit_dense`, with the
    frame's single fits of the candidates in it) with a margin of
    :func:`_tile_margin` px, and keeps the rows whose fitted position lies in
    the core.  Returns those rows (frame coordinates) and which rows of
    ``singles`` they replace (those whose fit lies in a fitted core).
    """
    import pandas as pd

    ny, nx = frame.photons.shape
    core, size = TILE_CORE, _tile_size(setup)
    margin = (size - core) // 2
    xy = singles[["x", "y"]].to_numpy()
    finite = np.isfinite(xy).all(axis=1)  # a failed fit without a position stays as it is
    xy = np.where(finite[:, None], xy, frame.coords[:, ::-1])
    cells_y, cells_x = -(-ny // core), -(-nx // core)

    def cell(pos):  # core of each x, y position
        c = np.floor(np.rint(pos) / core)
        return np.clip(c[:, 1], 0, cells_y - 1).astype(np.int64) * cells_x + \
            np.clip(c[:, 0], 0, cells_x - 1).astype(np.int64)

    near = [cell(xy[hot] + d) for d in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2), (2, 2), (-2, -2), (2, -2), (-2, 2))]
    cells = np.unique(np.concatenate(near))
    tiles, picked, origins = [], [], []
    cxy = frame.coords[:, ::-1]
    for k, c in enumerate(cells):
        cy, cx = divmod(int(c), cells_x)
        y0 = int(np.clip(cy * core - margin, 0, max(ny - size, 0)))
        x0 = int(np.clip(cx * core - margin, 0, max(nx - size, 0)))
        inside = np.flatnonzero((cxy[:, 0] >= x0) & (cxy[:, 0] < x0 + size) & (cxy[:, 1] >= y0)
                                & (cxy[:, 1] < y0 + size))
        crop = (slice(y0, y0 + size), slice(x0, x0 + size))
        tiles.append(_Frame(k, frame.photons[crop], coords=frame.coords[inside] - [y0, x0],
                            valid=None if frame.valid is None else frame.valid[crop],
                            saturated=None if frame.saturated is None else frame.saturated[crop],
                            image_var=frame.image_var, noise=frame.noise))
        picked.append(inside)
        origins.append((x0, y0))
    # the tiles' single fits: the frame's, in tile coordinates, frame = tile
    tile = np.repeat(np.arange(len(cells)), [len(p) for p in picked])
    origins = np.asarray(origins, float)
    local = singles.iloc[np.concatenate(picked)].reset_index(drop=True)
    local["x"] = local["x"].to_numpy() - origins[tile, 0]
    local["y"] = local["y"].to_numpy() - origins[tile, 1]
    local["frame"] = tile.astype(np.int64)
    joint = _fit_dense(setup, tiles, singles=local)
    bad = _misfit_regions(setup, joint)  # tiles whose cores keep their single fits
    joint = joint[~np.isin(joint["frame"].to_numpy(), bad)]
    replaced = np.isin(cell(xy), cells[~np.isin(np.arange(len(cells)), bad)]) & finite
    if len(joint) == 0:
        return joint, replaced
    k = joint["frame"].to_numpy()
    origin = origins[k]
    joint["x"] += origin[:, 0]
    joint["y"] += origin[:, 1]
    pos = joint[["x", "y"]].to_numpy()
    mine = np.isfinite(pos).all(axis=1)
    mine[mine] = cell(pos[mine]) == cells[k[mine]]
    joint = joint[mine].copy()
    joint["frame"] = np.int64(frame.t)
    return joint, replaced


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
    camera = camera or Camera()
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
    if prepared.dark:
        warnings.warn(prepared.dark, SpotfitWarning, stacklevel=2)
    prepared.coords = np.rint(pos[:, ::-1]).astype(np.int64)  # (x, y[, z]) -> array order
    return _fit_single(setup, [prepared], raster=False)


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
    camera = camera or Camera()
    if _lazy(image):
        return _blockwise("detect", image, config, camera, axes, on_frame)
    with _Input(image, axes, channel, config, camera, window=False, invert=invert,
                series=series) as (img, valid, ndim):
        return _detect_image(img, valid, ndim, config, camera, _per_frame(on_frame))


def _detect_image(img, valid, ndim, config, camera, report=None):
    """The detection table of an open image; ``report(t, n_frames, n_found)`` after each frame."""
    import pandas as pd

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
    return _with_units(pd.DataFrame({k: v[order] for k, v in cols.items()}), img)


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
                 block_size=None, scheduler=None):
    """Read one image file, detect or fit every frame; the table and how the file was read.

    The per-file step of ``spotfit fit`` and ``spotfit detect``, for one
    file or each file of a batch, so one file gives the same table either way.

    Parameters
    ----------
    path : str or os.PathLike
    task : {"fit", "detect"}
    config : FitConfig, optional
    camera : Camera, optional
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

    Returns
    -------
    table : pandas.DataFrame
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

    import pandas as pd

    from spotfit.config import resolved_values
    from spotfit.io import count_channels, read_image

    if task not in TASKS:
        raise SpotfitInputError(f"task must be one of {', '.join(TASKS)}, not {task!r}",
                                parameter="task")
    config = make_config(config, {})
    camera = camera or Camera()
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
    table = pd.concat(non_empty, ignore_index=True) if len(non_empty) > 1 else non_empty[0]
    info["timings_s"] = timings
    return table, info


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
@dataclass
class _Frame:
    """One frame ready for fitting: photons, candidates, and what is known about its pixels."""

    t: int
    photons: np.ndarray
    coords: np.ndarray | None = None
    score: np.ndarray | None = None
    valid: np.ndarray | None = None
    saturated: np.ndarray | None = None
    image_var: float = 0.0
    dark: str | None = None
    noise: object = None  # the detection's NoiseModel of this frame
    background: list | None = None  # the detection's local background (BackgroundPiece per block)


def _prepare(setup, t, raw, valid=None, camera=None) -> _Frame:
    """Camera conversion of one frame, its image noise and its clipped pixels.

    ``setup`` is a :class:`Setup` (fits) or a :class:`FitConfig`
    (detection only, with ``camera``).
    """
    from spotfit.start import image_noise

    camera = camera or setup.camera
    photons = camera.to_photons(raw)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        # left-out pixels neither make nor hide peaks: the frame's typical level
        photons[~valid] = np.median(photons[valid]) if valid.any() else 0.0
    f = _Frame(t, photons, valid=valid, dark=_dark(camera, photons, t))
    if isinstance(setup, Setup):
        if not camera.calibrated:
            f.image_var = image_noise(photons)
        f.saturated = _clipped(raw, valid)
    return f


def _clipped(raw, valid):
    """Pixels at the maximum of an integer pixel type (None if there are none)."""
    raw = np.asarray(raw)
    if raw.dtype.kind not in "ui":
        return None
    top = np.iinfo(raw.dtype).max
    if raw.max() < top:
        return None
    clipped = raw == top
    return clipped if valid is None else clipped & valid


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


def _frames(img, valid_img, setup, report=None, camera=None):
    """Prepared, detected frames of ``img``, one at a time; ``report(t, n_frames, n_found)``
    after each (``n_found``: the frame's candidates).

    Gives at most one :class:`SpotfitWarning` about a dark frame per call.
    """
    from spotfit.background import NoiseModel, estimate_noise
    from spotfit.detection import find_peaks

    config = setup.config if isinstance(setup, Setup) else setup
    ndim = 3 if img.is_3d else 2
    sigma, options = config.detection_sigma(ndim), config.detection_options()
    cam = camera or setup.camera
    # a calibrated camera's noise model; otherwise each frame's, measured on it
    camera_noise = NoiseModel.from_camera(cam) if cam.calibrated else None
    warned = False
    valid_frames = valid_img.frames() if valid_img is not None else None
    for t, raw in img.frames():
        valid = next(valid_frames)[1].astype(bool) if valid_frames is not None else None
        f = _prepare(setup, t, raw, valid, camera)
        if f.dark and not warned:
            warnings.warn(f.dark, SpotfitWarning, stacklevel=3)
            warned = True
        f.noise = camera_noise if camera_noise is not None else estimate_noise(f.photons, sigma)
        f.background = []
        f.coords, f.score = find_peaks(f.photons, sigma, noise=f.noise, backgrounds=f.background, **options)
        if f.valid is not None and len(f.coords):
            keep = f.valid[tuple(f.coords.T)]
            f.coords, f.score = f.coords[keep], f.score[keep]
        yield f
        if report is not None:
            report(t, img.n_frames, len(f.coords))


# -------------------------------------------------------------- pipelines
def _fit_single(setup: Setup, frames, raster: bool):
    """Single-spot fits of every candidate of every frame; one table."""
    import pandas as pd

    chunk = single.batch_size(setup)
    read_var = setup.read_var_map()
    parts, pending = [], []  # table parts; batches of whole frames waiting for one solve

    def flush():  # returns the windows now pending: none
        if pending:
            parts.append(single.fit_batch(setup, single.Batch.join(pending)))
            pending.clear()
        return 0

    n_pending = 0
    for f in frames:
        coords = f.coords
        if len(coords) == 0:
            continue
        if raster:
            coords = coords[np.lexsort(coords.T[::-1])]  # rows in raster order (z, y, x)
        n = len(coords)
        cut = dict(saturated=f.saturated, valid=f.valid, read_var=read_var, background=f.background)
        if n > chunk:  # one frame, several solves: its noise model is measured up front
            n_pending = flush()
            variance = None
            if not setup.camera.calibrated:
                variance = single.frame_variance(setup, f.photons, coords, f.image_var, valid=f.valid)
            for start in range(0, n, chunk):
                rows = np.arange(start, min(n, start + chunk))
                parts.append(single.fit_batch(setup, single.cut_frame(
                    setup, f.t, f.photons, coords, f.image_var, rows=rows, variance=variance, **cut)))
            continue
        if n_pending + n > chunk:
            n_pending = flush()
        pending.append(single.cut_frame(setup, f.t, f.photons, coords, f.image_var, **cut))
        n_pending += n
    flush()
    if not parts:
        return table.empty(setup.ndim)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


#: pixels of the frames fitted together by the crowded path (a few float64 copies each)
CROWDED_CHUNK = 1 << 22

#: a single-spot fit is re-examined jointly (it may be two spots, or hide one
#: in its tail) when its larger width exceeds this many PSF sigmas, ...
SUSPECT_WIDTH = 1.2
#: ... when one width exceeds the other this many times, ...
SUSPECT_ELONGATION = 1.15
#: ... or when its reduced chi-square exceeds 1 by this many standard deviations
SUSPECT_CHI2 = 4.0
#: a single-spot fit wider than this many PSF sigmas both ways is a blob (not
#: spots, even among other candidates): it is not fitted jointly
BLOB_WIDTH = 1.5
NOT_SPOT_JOINS = True


def _fit_dense(setup: Setup, frames, singles=None):
    """Crowded fields (``crowded=True``): single-spot fits where spots stand alone, joint fits where they do not.

    Per chunk of frames (:data:`CROWDED_CHUNK` pixels, one frame at least):

    1. Candidates with no other candidate within ``group_radius * sigma``
       get single-spot fits (:mod:`spotfit.single`: the rotated Gaussian,
       widths free, all windows in one solve).
    2. A single fit that looks like one PSF (widths within
       ``SUSPECT_WIDTH`` sigmas, ``SUSPECT_ELONGATION``, reduced chi-square
       as expected) stands, as does one that is no spot (``not_spot``) or
       failed; the others are suspects: perhaps two spots closer than the
       detector separates, or a spot with a faint one in its tail.
    3. The other candidates (groups) and the suspects are fitted jointly
       (:class:`spotfit.group.CrowdedFitter`), with the standing fits' light
       subtracted from their windows; the residual around them is searched
       for hidden emitters, which stay if the likelihood needs them (a
       standing fit beside a new emitter joins its group).

    The table has the columns of the single-spot path plus ``group_id`` and
    ``group_size`` (1 for a standing single fit); isolated spots are
    exactly what single-spot fitting gives.  ``singles``: the single-spot
    fits of step 1 when they are already known (:func:`_fit_single` of the
    same frames, rows of a frame in raster order).
    """
    import pandas as pd

    from spotfit.group import CrowdedFitter

    setup.use_threads()
    crowd = CrowdedFitter(setup)
    read_var = setup.read_var_map()
    parts, chunk, pixels, groups = [], [], 0, 0

    def flush():
        nonlocal groups
        if chunk:
            mine = None if singles is None else singles[singles["frame"].isin([f.t for f in chunk]).to_numpy()]
            part = _dense_chunk(setup, crowd, chunk, read_var, groups, singles=mine)
            groups += int(part["group_id"].max()) + 1 - groups if len(part) else 0
            parts.append(part)
            chunk.clear()
        return 0

    for f in frames:
        if len(f.coords) == 0:
            continue
        if chunk and pixels + f.photons.size > CROWDED_CHUNK:
            pixels = flush()
        chunk.append(f)
        pixels += f.photons.size
    flush()
    if not parts:
        return table.empty(setup.ndim, crowded=True)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


@dataclass
class _Candidates:
    """A frame of a chunk with the candidates the joint fits start from."""

    t: int
    photons: np.ndarray
    coords: np.ndarray
    valid: np.ndarray | None
    saturated: np.ndarray | None
    noise: object


def _dense_chunk(setup: Setup, crowd, chunk, read_var, group_offset, singles=None):
    """:func:`_fit_dense` on one chunk of frames; its table rows, by frame and raster order,
    group ids from ``group_offset`` on (``singles``: the chunk's single-spot fits, if known)."""
    import pandas as pd
    from scipy.spatial import cKDTree

    from spotfit import results
    from spotfit._kernels import CONVERGED, NOT_SPOT

    cfg, nd = setup.config, setup.ndim
    radius = cfg.group_radius * cfg.sigma
    # 1. single-spot fits of the candidates that stand alone
    size = single.batch_size(setup)
    batches, alone = [], []
    for f in chunk:
        coords = f.coords[np.lexsort(f.coords.T[::-1])]  # raster order (z, y, x)
        f.coords = coords
        isolated = np.ones(len(coords), bool)
        if len(coords) > 1:
            d, _ = cKDTree(coords[:, ::-1].astype(float)).query(coords[:, ::-1].astype(float), k=2)
            isolated = d[:, 1] > radius
        alone.append(isolated)
        if singles is not None:
            continue
        rows = np.arange(len(coords))  # every candidate: a grouped one may be a blob
        cut = dict(saturated=f.saturated, valid=f.valid, read_var=read_var)
        variance = None  # a frame fitted in several solves: its noise model measured up front
        if len(rows) > size and not setup.camera.calibrated:
            variance = single.frame_variance(setup, f.photons, coords, f.image_var, valid=f.valid)
        for start in range(0, len(rows), size):
            batches.append(single.cut_frame(setup, f.t, f.photons, coords, f.image_var,
                                            rows=rows[start:start + size], variance=variance, **cut))
    singles = _fit_batches(setup, batches, size) if singles is None else singles.reset_index(drop=True)
    # 2. which single fits stand
    status = singles["status"].to_numpy() if len(singles) else np.zeros(0, object)
    sx, sy = singles["sigma_x"].to_numpy(), singles["sigma_y"].to_numpy()
    ok, suspect, blob = _judge_singles(setup, singles)
    grouped = ~np.concatenate(alone) if alone else np.zeros(0, bool)  # singles are in raster order per frame
    # grouped candidates are fitted jointly unless their own fit is a blob
    suspect |= grouped & ~blob & (status != results.STATUS_NAMES[NOT_SPOT]) | grouped & ~blob & ok
    stands = ~suspect
    # 3. joint fits of the groups and the suspects, the standing fits' light subtracted
    frame_of = {f.t: i for i, f in enumerate(chunk)}
    t_single = np.array([frame_of[t] for t in singles["frame"].to_numpy()], np.int64)
    xyz = singles[["x", "y", "z"][:nd]].to_numpy() if len(singles) else np.zeros((0, nd))
    engine_frames = []
    for i, f in enumerate(chunk):
        mine = t_single == i
        active = np.concatenate([f.coords[suspect[mine] & grouped[mine]],
                                 np.rint(xyz[suspect & ~grouped & mine][:, ::-1]).astype(np.int64).reshape(-1, nd)])
        engine_frames.append(_Candidates(i, f.photons, active, f.valid, f.saturated, f.noise))
    widths = [np.sqrt(sx * sy)] + ([singles["sigma_z"].to_numpy()] if nd == 3 else [])
    # the standing fits that matter: those whose light reaches the joint fits'
    # windows or the residual search around them (the rest stand as they are)
    # (a standing fit as wide as a joint fit's widest PSF is split by the
    # engine, so it counts as a joint fit here)
    from spotfit.group import WIDTH_RANGE

    stretched = stands & (np.sqrt(sx * sy) >= 0.99 * WIDTH_RANGE[1] * cfg.sigma)
    near = stands & (stretched | _near_active(xyz, t_single, engine_frames, setup, seeds=stretched))
    fixed = {"xyz": xyz[near], "t": t_single[near], "intensity": singles["intensity"].to_numpy()[near],
             "sigma": np.column_stack(widths)[near], "offset": singles["offset"].to_numpy()[near],
             "row": np.flatnonzero(near), "locked": (status != results.STATUS_NAMES[CONVERGED])[near]}
    keep = stands.copy()  # suspects are fitted again jointly
    joint = table.empty(nd, crowded=True)
    if any(len(e.coords) for e in engine_frames):
        spots = crowd.fit_frames(engine_frames, read_var, fixed=fixed)
        joint = crowd.table(spots, group_offset)
        joint["frame"] = np.array([f.t for f in chunk], np.int64)[joint["frame"].to_numpy()]
        keep[spots.single[~spots.fixed & (spots.single >= 0)]] = False
    alone_rows = singles[keep].copy()
    first = int(joint["group_id"].max()) + 1 if len(joint) else group_offset
    alone_rows["group_id"] = np.arange(first, first + len(alone_rows), dtype=np.int64)
    alone_rows["group_size"] = np.ones(len(alone_rows), np.int64)
    out = pd.concat([alone_rows, joint], ignore_index=True)
    keys = [out[c].to_numpy() for c in ("x", "y", "z")[:nd]] + [out["frame"].to_numpy()]
    return out.iloc[np.lexsort(keys)].reset_index(drop=True)


def _judge_singles(setup: Setup, singles):
    """Which single-spot fits are usable (``converged``, or ``not_spot`` with
    :data:`NOT_SPOT_JOINS`), suspects (perhaps several spots: wider than
    ``SUSPECT_WIDTH`` sigmas, elongated by ``SUSPECT_ELONGATION``, or misfit by
    ``SUSPECT_CHI2`` standard deviations) and blobs (wider than ``BLOB_WIDTH``
    sigmas both ways); three bool arrays over the rows."""
    from spotfit import results
    from spotfit._kernels import CONVERGED, NOT_SPOT

    cfg = setup.config
    status = singles["status"].to_numpy() if len(singles) else np.zeros(0, object)
    ok = (status == results.STATUS_NAMES[CONVERGED]) | (NOT_SPOT_JOINS & (status == results.STATUS_NAMES[NOT_SPOT]))
    sx, sy = singles["sigma_x"].to_numpy(), singles["sigma_y"].to_numpy()
    big, small = np.maximum(sx, sy), np.minimum(sx, sy)
    dof = np.prod([2 * h + 1 for h in setup.half]) - setup.model.n_params
    chi2_limit = 1.0 + SUSPECT_CHI2 * np.sqrt(2.0 / max(dof, 1))
    # a PSF-narrow minor axis with a long major one (or a misfit) is a row of
    # spots; a fit wide both ways is a blob (texture, aggregate), left as it is
    # (a fit between the two, minor axis 1.2-1.5 sigmas, is a cluster of
    # unresolved spots as often as not: the joint fits and their blob test decide)
    blob = ok & (small > BLOB_WIDTH * cfg.sigma)
    suspect = ok & ~blob & (
        (big > SUSPECT_WIDTH * cfg.sigma) | (big > SUSPECT_ELONGATION * small)
        | (singles["chi2_red"].to_numpy() > chi2_limit))
    return ok, suspect, blob


def _near_active(xyz, t, engine_frames, setup, seeds=None):
    """Which single fits at ``xyz`` (x, y[, z]) in chunk frames ``t`` lie within the
    reach of a joint fit: a candidate fitted jointly, its residual search
    (window + ``SEARCH_REACH`` sigmas), a new emitter's group window and
    grouping radius, and a window half-size (their own light); ``seeds``
    (bool over ``xyz``) count as candidates fitted jointly."""
    from scipy.spatial import cKDTree

    from spotfit.group import SEARCH_REACH

    out = np.zeros(len(xyz), bool)
    active = [np.column_stack([e.coords[:, ::-1].astype(float), np.full(len(e.coords), i * 1e7)])
              for i, e in enumerate(engine_frames) if len(e.coords)]
    if seeds is not None and seeds.any():
        active.append(np.column_stack([xyz[seeds], t[seeds] * 1e7]))
    if not active or len(xyz) == 0:
        return out
    cfg = setup.config
    r = 4 * max(setup.half) + (SEARCH_REACH + cfg.group_radius) * cfg.sigma + 1.0
    d, _ = cKDTree(np.concatenate(active)).query(np.column_stack([xyz, t * 1e7]), distance_upper_bound=r)
    return np.isfinite(d)


def _fit_batches(setup: Setup, batches, size):
    """Single-spot fits of batches of windows, joined into solves of at most ``size`` windows."""
    import pandas as pd

    parts, pending, n = [], [], 0
    for b in batches:
        if pending and n + len(b) > size:
            parts.append(single.fit_batch(setup, single.Batch.join(pending)))
            pending, n = [], 0
        pending.append(b)
        n += len(b)
    if pending:
        parts.append(single.fit_batch(setup, single.Batch.join(pending)))
    if not parts:
        return table.empty(setup.ndim)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
