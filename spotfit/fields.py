"""Which fits a frame gets: single-spot fits, joint fits where spots overlap, or joint fits everywhere.

The in-memory fitting pipeline after detection, for frames of candidates
(:class:`Frame`: photons, candidates, what is known about the pixels):

* :func:`fit_frames` -- the default.  A dense frame (its candidates cover at
  least :data:`spotfit.group.DENSE_COVERAGE` of it, :func:`spotfit.group.coverage`)
  gets the crowded-field fits (:func:`fit_dense`, without the group columns);
  another frame gets single-spot fits (:mod:`spotfit.single`), then joint fits
  where its single fits say spots overlap (:func:`_overlaps`): the whole frame
  if it is small, else tiles of :data:`TILE_CORE` px around the overlaps.
* :func:`fit_dense` -- ``crowded=True``: single-spot fits where spots stand
  alone, joint fits (:class:`spotfit.group.CrowdedFitter`) where they do not,
  with the group columns.

:mod:`spotfit.api` prepares and detects the frames and calls these;
:mod:`spotfit.blockwise` calls them for blocks of frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spotfit import single, table
from spotfit.config import Setup
from spotfit.lighttable import LightTable, as_frame, concat
from spotfit import group as _group

__all__ = ["Frame", "fit_frames", "fit_dense", "fit_single"]


@dataclass
class Frame:
    """One frame ready for fitting: photons, candidates, and what is known about its pixels."""

    t: int
    photons: np.ndarray
    coords: np.ndarray | None = None
    score: np.ndarray | None = None
    valid: np.ndarray | None = None
    saturated: np.ndarray | None = None
    image_var: float = 0.0
    notes: dict = field(default_factory=dict)  # warnings' texts by kind (:func:`spotfit.api._prepare`)
    noise: object = None  # the detection's NoiseModel of this frame
    background: list | None = None  # the detection's local background (BackgroundPiece per block)
    close: tuple | None = None  # (coords, first, second): pairs of candidates (:func:`_close_pairs`)


def fit_frames(setup: Setup, frames):
    """The default: single-spot fits of frames whose spots stand apart, the
    crowded-field fits (:func:`fit_dense`, without the group columns) of dense
    frames (:data:`DENSE_COVERAGE`).

    Consecutive frames of a kind are fitted together in runs (at most
    :data:`CROWDED_CHUNK` pixels of dense frames, or a single-spot solve's
    worth of windows), in frame order.  Returns a
    :class:`~spotfit.lighttable.LightTable` where no frame is dense (no
    pandas, joint fits of overlapping spots included), else a DataFrame.
    """
    parts, run, kind, size = [], [], None, 0
    chunk = single.batch_size(setup)

    def flush():
        if run:
            if kind:
                parts.append(_without_group(fit_dense(setup, run)))
            else:
                parts.append(_fit_sparse(setup, run))
            run.clear()
        return 0

    for f in frames:
        dense = _group.coverage(f.coords, f.photons.shape, setup.config) >= _group.DENSE_COVERAGE
        amount = f.photons.size if dense else len(f.coords)
        if run and (dense != kind or size + amount > (CROWDED_CHUNK if dense else chunk)):
            size = flush()
        kind = dense
        run.append(f)
        size += amount
    flush()
    parts = [p for p in parts if len(p)]
    if not parts:
        return table.empty(setup.ndim, light=True)
    return concat(parts)


def _fit_sparse(setup: Setup, frames):
    """Frames whose spots mostly stand apart: single-spot fits, then the
    crowded-field fits (:func:`fit_dense`) where a frame's single fits say
    that spots overlap (:func:`_overlaps`): the whole frame if it is small,
    else the tiles of :data:`TILE_CORE` px around the overlaps (with a margin
    of :func:`_tile_margin` px), whose cores' rows replace the single fits
    there.  Spots that stand apart keep their single-spot fit."""
    for f in frames:  # candidates in raster order (z, y, x), as the rows of their single fits
        if f.coords is not None and len(f.coords) > 1:
            order = np.lexsort(f.coords.T[::-1])
            f.coords = f.coords[order]
            f.score = None if f.score is None else f.score[order]
    singles = fit_single(setup, frames, raster=True)
    if len(singles) == 0:
        return singles
    t = singles["frame"].to_numpy()
    parts, whole, done = [], [], np.zeros(len(singles), bool)
    tiled, tiled_rows = [], []
    for f in frames:
        if len(f.coords) == 0:
            continue
        if setup.ndim == 3:  # z-stacks: the single-spot path (the blockwise engine's too)
            break
        rows = np.flatnonzero(t == f.t)
        hot = _overlaps(setup, f, singles.iloc[rows])
        if not hot.any():
            continue
        if fits_whole(setup, f.photons.shape):
            whole.append(f)
            done[rows] = True
            continue
        tiled.append((f, singles.iloc[rows], hot))
        tiled_rows.append(rows)
    if tiled:  # the tiles of all frames in one pass
        for rows, (joint, replaced) in zip(tiled_rows, _fit_tiles(setup, tiled)):
            parts.append(joint)
            done[rows[replaced]] = True
    if whole:
        joint = fit_dense(setup, whole, singles=singles[np.isin(t, [f.t for f in whole])],
                          light=isinstance(singles, LightTable))
        bad = np.isin(joint["frame"].to_numpy(), _misfit_regions(setup, joint))
        done &= ~np.isin(t, joint["frame"].to_numpy()[bad])  # those frames keep their single fits
        parts.append(joint[~bad])
    parts = [_without_group(p) for p in parts if len(p)]
    if not parts:
        return singles
    return merge_joint(singles[~done], parts)


def _without_group(part):
    """``part`` (a DataFrame or :class:`~spotfit.lighttable.LightTable`) without the group columns."""
    return part[[c for c in part.columns if c not in table._GROUP]]


def merge_joint(singles, parts):
    """The rows of frames: ``singles`` (single-spot fits, in raster order of their
    candidates per frame) and ``parts`` (joint fits' rows); a frame with joint
    rows has its rows in raster order of their fitted positions (by y, then x),
    another keeps its single fits' order.  :class:`~spotfit.lighttable.LightTable` s
    give one, else a DataFrame."""
    out = concat([singles] + list(parts))
    t = out["frame"].to_numpy()
    joint = np.isin(t, np.concatenate([p["frame"].to_numpy() for p in parts]))
    idx = np.arange(len(out), dtype=float)
    keys = [np.where(joint, out["x"].to_numpy(), idx), np.where(joint, out["y"].to_numpy(), 0.0), t]
    return _renumbered(out.iloc[np.lexsort(keys)])


def _renumbered(rows):
    """``rows`` with a fresh index (a DataFrame's; a LightTable has none)."""
    return rows if isinstance(rows, LightTable) else rows.reset_index(drop=True)


def fits_whole(setup: Setup, shape) -> bool:
    """Whether a frame of ``shape`` whose spots overlap is fitted jointly whole
    (small: at most :data:`TILE_FRAME` tiles, or narrower than a tile, or with
    per-pixel camera maps), not in tiles (:func:`_fit_tiles`)."""
    size = _tile_size(setup)
    return int(np.prod(shape)) <= TILE_FRAME * size ** 2 or min(shape) < size or \
        (setup.read_var_map() is not None and np.ndim(setup.read_var_map()) > 0)


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
        close = frame.close
        if close is None or not np.array_equal(close[0], coords):
            close = _close_pairs(setup, coords)
        first, second = close[1:]
        pairs = np.column_stack([first, second])[first < second]
        pairs = pairs[spot[pairs[:, 0]] & spot[pairs[:, 1]]]
        hot[pairs.ravel()] = True
    # a pair's minor axis is the PSF's; a minor axis narrower than the joint fits' smallest
    # width is an elongated PSF (astigmatism, a wrong --sigma), not two spots
    from spotfit.group import WIDTH_RANGE

    hot |= spot & (big > SUSPECT_WIDTH * cfg.sigma) & (big > SUSPECT_ELONGATION * small) & \
        (small >= WIDTH_RANGE[0] * cfg.sigma)
    return hot


def _close_pairs(setup: Setup, coords) -> tuple:
    """``(coords, first, second)``: the pairs of candidates ``coords`` (array order) within
    ``group_radius * sigma`` of each other, both ways (:func:`_overlaps`; the k-d tree's
    query_pairs, without importing scipy.spatial)."""
    from spotfit.near import pairs_within

    cfg = setup.config
    xy = coords[:, ::-1].astype(float)
    return (coords,) + tuple(pairs_within(xy, xy, cfg.group_radius * cfg.sigma))


def _find_close_pairs(setup: Setup, f, coords):
    """A job for the threads that fit frame ``f``'s candidates ``coords`` (the joint
    fits' search for overlapping spots needs their pairs next, :func:`_overlaps`)."""
    def job():
        f.close = _close_pairs(setup, coords) if setup.ndim == 2 and len(coords) > 1 else None
    return job


def _fit_tiles(setup: Setup, jobs) -> list:
    """Joint fits of large frames in the tiles around their overlapping spots.

    ``jobs``: ``(frame, singles, hot)`` per frame: the frame, its single-spot fits
    (rows of its candidates, in raster order) and which of them overlap
    (:func:`_overlaps`).  Each frame is cut into cores of :data:`TILE_CORE` px;
    each core within 2 px of an overlapping spot is fitted (:func:`fit_dense`,
    with the frame's single fits of the candidates in it) with a margin of
    :func:`_tile_margin` px, and keeps the rows whose fitted position lies in the
    core.  The tiles of all frames are fitted together (one pass of the
    crowded-field engine for all: its fixed cost, not the tiles' work, is most
    of it when a frame has a few overlaps; each tile's fits do not depend on
    the others).  Returns, per job, those rows (frame coordinates) and which
    rows of its ``singles`` they replace (those whose fit lies in a fitted core).
    """
    core, size = TILE_CORE, _tile_size(setup)
    margin = (size - core) // 2
    tiles, local, plans = [], [], []
    for frame, singles, hot in jobs:
        ny, nx = frame.photons.shape
        xy = np.column_stack([singles["x"].to_numpy(), singles["y"].to_numpy()])
        finite = np.isfinite(xy).all(axis=1)  # a failed fit without a position stays as it is
        xy = np.where(finite[:, None], xy, frame.coords[:, ::-1])
        cells_y, cells_x = -(-ny // core), -(-nx // core)

        def cell(pos, cells_y=cells_y, cells_x=cells_x):  # core of each x, y position
            c = np.floor(np.rint(pos) / core)
            return np.clip(c[:, 1], 0, cells_y - 1).astype(np.int64) * cells_x + \
                np.clip(c[:, 0], 0, cells_x - 1).astype(np.int64)

        near = [cell(xy[hot] + d) for d in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2), (2, 2), (-2, -2), (2, -2), (-2, 2))]
        cells = np.unique(np.concatenate(near))
        cy, cx = np.divmod(cells, cells_x)
        y0 = np.clip(cy * core - margin, 0, max(ny - size, 0))
        x0 = np.clip(cx * core - margin, 0, max(nx - size, 0))
        tile, inside = _in_boxes(frame.coords[:, ::-1], x0, y0, size, core)
        picked = np.split(inside, np.cumsum(np.bincount(tile, minlength=len(cells)))[:-1])
        origins = np.column_stack([x0, y0]).astype(float)
        first = len(tiles)  # this frame's tiles are frames first, first + 1, ... of the fits
        for k, (a, b, rows) in enumerate(zip(y0.tolist(), x0.tolist(), picked)):  # views of the frame
            crop = (slice(a, a + size), slice(b, b + size))
            tiles.append(Frame(first + k, frame.photons[crop], coords=frame.coords[rows] - [a, b],
                               valid=None if frame.valid is None else frame.valid[crop],
                               saturated=None if frame.saturated is None else frame.saturated[crop],
                               image_var=frame.image_var, noise=frame.noise,
                               background=None if not frame.background else
                               [p.moved((a, b)) for p in frame.background]))
        # the tiles' single fits: the frame's, in tile coordinates, frame = tile
        moved = _renumbered(singles.iloc[inside])
        moved["x"] = moved["x"].to_numpy() - origins[tile, 0]
        moved["y"] = moved["y"].to_numpy() - origins[tile, 1]
        moved["frame"] = (first + tile).astype(np.int64)
        local.append(moved)
        plans.append((frame.t, cell, cells, origins, first, xy, finite))
    joint = fit_dense(setup, tiles, singles=concat(local), light=isinstance(jobs[0][1], LightTable))
    bad = _misfit_regions(setup, joint)  # tiles whose cores keep their single fits
    joint = joint[~np.isin(joint["frame"].to_numpy(), bad)]
    k_all = joint["frame"].to_numpy()
    out = []
    for t, cell, cells, origins, first, xy, finite in plans:
        kept = ~np.isin(np.arange(first, first + len(cells)), bad)
        replaced = np.isin(cell(xy), cells[kept]) & finite
        mine = joint[(k_all >= first) & (k_all < first + len(cells))]
        if len(mine) == 0:
            out.append((mine, replaced))
            continue
        k = mine["frame"].to_numpy() - first
        origin = origins[k]
        mine = mine.copy()
        mine["x"] = mine["x"].to_numpy() + origin[:, 0]
        mine["y"] = mine["y"].to_numpy() + origin[:, 1]
        pos = np.column_stack([mine["x"].to_numpy(), mine["y"].to_numpy()])
        inside = np.isfinite(pos).all(axis=1)
        inside[inside] = cell(pos[inside]) == cells[k[inside]]
        mine = mine[inside].copy()
        mine["frame"] = np.int64(t)
        out.append((mine, replaced))
    return out


def _in_boxes(xy, x0, y0, size, cell):
    """The points ``xy`` (whole x, y >= 0) in the boxes of ``size`` px from
    ``x0, y0``: pairs (box, point), by box, then point; found through a grid
    of ``cell`` px (a box's points are in the cells it touches)."""
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    if len(xy) == 0 or len(x0) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = int(xy[:, 0].max()) // cell + 1
    keys = (xy[:, 1] // cell) * width + xy[:, 0] // cell
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    span = -(-size // cell) + 1  # cells a box touches along an axis, at most
    dy, dx = (a.ravel() for a in np.indices((span, span)))
    by = (y0[:, None] // cell + dy[None]).ravel()
    bx = (x0[:, None] // cell + dx[None]).ravel()
    box = np.repeat(np.arange(len(x0)), span * span)
    use = bx < width
    box, k = box[use], (by * width + bx)[use]
    start = np.searchsorted(ordered, k, side="left")
    count = np.searchsorted(ordered, k, side="right") - start
    box = np.repeat(box, count)
    point = order[np.repeat(start - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))]
    x, y = xy[point, 0], xy[point, 1]
    hit = (x >= x0[box]) & (x < x0[box] + size) & (y >= y0[box]) & (y < y0[box] + size)
    box, point = box[hit], point[hit]
    order = np.lexsort((point, box))
    return box[order], point[order]


def fit_single(setup: Setup, frames, raster: bool):
    """Single-spot fits of every candidate of every frame; one table
    (a :class:`~spotfit.lighttable.LightTable`)."""
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
        pieces = _pieces(setup, n, chunk)
        if pieces > 1:  # one frame, several solves: its noise model is measured up front
            n_pending = flush()
            variance = None
            if not setup.camera.calibrated:
                variance = single.frame_variance(setup, f.photons, coords, f.image_var, valid=f.valid)
            parts.extend(_fit_pieces(setup, f, coords, pieces, variance, cut))
            continue
        if not setup.camera.calibrated and single.in_pieces(setup, n):  # one solve, in pieces,
            n_pending = flush()  # each cutting its own windows (the frame's noise model in between)
            parts.append(single.fit_batch(setup, single.Uncut(setup, f.t, f.photons, coords, f.image_var, cut,
                                                              beside=(_find_close_pairs(setup, f, coords),))))
            continue
        if n_pending + n > chunk:
            n_pending = flush()
        pending.append(single.cut_frame(setup, f.t, f.photons, coords, f.image_var, **cut))
        n_pending += n
    flush()
    if not parts:
        return table.empty(setup.ndim, light=True)
    return concat(parts)


#: a frame with at least this many candidates is fitted in pieces, one per thread at a time
#: (:func:`_fit_pieces`)
PIECE_WINDOWS = 4096


def _pieces(setup: Setup, n: int, chunk: int) -> int:
    """How many solves the ``n`` candidates of one frame take: one per ``chunk``
    windows, and with a calibrated camera from :data:`PIECE_WINDOWS` on a multiple
    of the threads (without one, pieces need the frame's noise model measured up
    front, :func:`spotfit.single.frame_variance`: a fifth more solves than the
    overlap saves)."""
    from spotfit._jit import kernel_threads

    pieces = -(-n // chunk)
    setup.use_threads()
    threads = kernel_threads()
    if setup.camera.calibrated and n >= PIECE_WINDOWS and threads > 1:
        pieces = threads * -(-pieces // threads)
    return pieces


def _fit_pieces(setup: Setup, f, coords, pieces: int, variance, cut) -> list:
    """Table parts of the single-spot fits of frame ``f``'s candidates ``coords`` in
    ``pieces`` solves of consecutive candidates, run side by side on the kernel
    threads (:func:`spotfit._jit.over_windows`; each piece's own kernels then run in
    its thread): a piece's NumPy between its kernels overlaps another's work.  Each
    window's fit depends on the window and on its frame's noise model ``variance``
    (measured up front) only, so the rows are those of one solve."""
    from spotfit._jit import over_windows

    n = len(coords)
    bounds = [(k * n // pieces, (k + 1) * n // pieces) for k in range(pieces)]
    out = [None] * pieces
    pairs = _find_close_pairs(setup, f, coords)  # one more job beside the pieces

    def run(first, last):
        for k in range(first, last):
            if k == pieces:
                pairs()
                continue
            rows = np.arange(*bounds[k])
            out[k] = single.fit_batch(setup, single.cut_frame(
                setup, f.t, f.photons, coords, f.image_var, rows=rows, variance=variance, **cut))

    over_windows(run, pieces + 1, threaded=True)
    return out


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
#: a grouped candidate whose symmetric single-spot fit converged narrower than this
#: many sigmas is no blob (``BLOB_WIDTH``, minor axis): the joint fits replace its
#: single fit, so it keeps the symmetric fit without model choice (score test and
#: refit with the richer model), which only a blob's or an isolated spot's row needs
CHOOSE_WIDTH = 1.3
#: a dense frame's candidate whose symmetric single fit is already a suspect keeps it
#: without the model choice (:func:`settled_by_symmetric`)
SETTLE_SYMMETRIC = True
NOT_SPOT_JOINS = True


def fit_dense(setup: Setup, frames, singles=None, light: bool = False):
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
    same frames, rows of a frame in raster order).  ``light``: a
    :class:`~spotfit.lighttable.LightTable` (``singles`` one too, if given),
    else a DataFrame.
    """
    from spotfit.group import CrowdedFitter

    singles = None if singles is None else (singles if light else as_frame(singles))
    setup.use_threads()
    crowd = CrowdedFitter(setup)
    read_var = setup.read_var_map()
    parts, chunk, pixels, groups = [], [], 0, 0

    def flush():
        nonlocal groups
        if chunk:
            mine = None if singles is None else singles[np.isin(singles["frame"].to_numpy(), [f.t for f in chunk])]
            part = _dense_chunk(setup, crowd, chunk, read_var, groups, singles=mine, light=light)
            groups += int(part["group_id"].to_numpy().max()) + 1 - groups if len(part) else 0
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
        return table.empty(setup.ndim, crowded=True, light=light)
    return concat(parts)


@dataclass
class _Candidates:
    """A frame of a chunk with the candidates the joint fits start from."""

    t: int
    photons: np.ndarray
    coords: np.ndarray
    valid: np.ndarray | None
    saturated: np.ndarray | None
    noise: object
    background: list | None = None  # the detection's local background (BackgroundPiece per block)


def _dense_chunk(setup: Setup, crowd, chunk, read_var, group_offset, singles=None, light=False):
    """:func:`fit_dense` on one chunk of frames; its table rows, by frame and raster order,
    group ids from ``group_offset`` on (``singles``: the chunk's single-spot fits, if known;
    ``light``: a LightTable)."""
    from spotfit import results
    from spotfit._kernels import CONVERGED, NOT_SPOT

    cfg, nd = setup.config, setup.ndim
    radius = cfg.group_radius * cfg.sigma
    # 1. single-spot fits of the candidates that stand alone
    size = single.batch_size(setup)
    batches = []
    for f in chunk:
        f.coords = f.coords[np.lexsort(f.coords.T[::-1])]  # raster order (z, y, x)
    alone = _isolated(chunk, radius)
    together = None  # small frames' windows cut in one go (single.cut_frames): the same windows
    if singles is None and len({f.photons.shape for f in chunk}) == 1 and \
            (setup.camera.calibrated or all(len(f.coords) <= size for f in chunk)):
        together = single.cut_frames(setup, chunk, read_var=read_var)
    first = 0
    for f, isolated in zip(chunk, alone):
        coords = f.coords
        if singles is not None:
            continue
        if together is not None:  # the same pieces of the frame as below, from the windows cut together
            choose = np.where(isolated, 0.0, CHOOSE_WIDTH * cfg.sigma)
            for start in range(0, len(coords), size):
                stop = min(start + size, len(coords))
                batches.append((single._take(together, slice(first + start, first + stop)), choose[start:stop]))
            first += len(coords)
            continue
        rows = np.arange(len(coords))  # every candidate: a grouped one may be a blob
        cut = dict(saturated=f.saturated, valid=f.valid, read_var=read_var)
        variance = None  # a frame fitted in several solves: its noise model measured up front
        if len(rows) > size and not setup.camera.calibrated:
            variance = single.frame_variance(setup, f.photons, coords, f.image_var, valid=f.valid)
        # a grouped candidate's model choice only where its fit may be a blob's
        choose = np.where(isolated, 0.0, CHOOSE_WIDTH * cfg.sigma)
        for start in range(0, len(rows), size):
            batches.append((single.cut_frame(setup, f.t, f.photons, coords, f.image_var,
                                             rows=rows[start:start + size], variance=variance, **cut),
                            choose[start:start + size]))
    singles = _fit_batches(setup, batches, size, light) if singles is None else _renumbered(singles)
    # 2. which single fits stand
    status = singles["status"].to_numpy() if len(singles) else np.zeros(0, object)
    sx, sy = singles["sigma_x"].to_numpy(), singles["sigma_y"].to_numpy()
    ok, suspect, blob = _judge_singles(setup, singles)
    grouped = ~np.concatenate(alone) if alone else np.zeros(0, bool)  # singles are in raster order per frame
    # grouped candidates are fitted jointly unless their own fit is a blob
    suspect |= grouped & ~blob & (status != results.STATUS_NAMES[NOT_SPOT]) | grouped & ~blob & ok
    stands = ~suspect
    # 3. joint fits of the groups and the suspects, the standing fits' light subtracted
    numbers = np.array([f.t for f in chunk], np.int64)  # chunk frame of each single fit
    by_number = np.argsort(numbers, kind="stable")
    t_single = by_number[np.searchsorted(numbers[by_number], singles["frame"].to_numpy().astype(np.int64))]
    xyz = np.column_stack([singles[c].to_numpy() for c in ("x", "y", "z")[:nd]]) if len(singles) \
        else np.zeros((0, nd))
    engine_frames = []
    for i, f in enumerate(chunk):
        mine = t_single == i
        active = np.concatenate([f.coords[suspect[mine] & grouped[mine]],
                                 np.rint(xyz[suspect & ~grouped & mine][:, ::-1]).astype(np.int64).reshape(-1, nd)])
        engine_frames.append(_Candidates(i, f.photons, active, f.valid, f.saturated, f.noise,
                                         f.background))
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
    joint = table.empty(nd, crowded=True, light=light)
    if any(len(e.coords) for e in engine_frames):
        spots = crowd.fit_frames(engine_frames, read_var, fixed=fixed)
        joint = crowd.table(spots, group_offset, light=light)
        joint["frame"] = np.array([f.t for f in chunk], np.int64)[joint["frame"].to_numpy()]
        keep[spots.single[~spots.fixed & (spots.single >= 0)]] = False
    alone_rows = singles[keep].copy()
    first = int(joint["group_id"].to_numpy().max()) + 1 if len(joint) else group_offset
    alone_rows["group_id"] = np.arange(first, first + len(alone_rows), dtype=np.int64)
    alone_rows["group_size"] = np.ones(len(alone_rows), np.int64)
    out = concat([alone_rows, joint])
    keys = [out[c].to_numpy() for c in ("x", "y", "z")[:nd]] + [out["frame"].to_numpy()]
    return _renumbered(out.iloc[np.lexsort(keys)])


def _isolated(chunk, radius):
    """Per frame of ``chunk``: which candidates have no other of their frame within
    ``radius`` px (bool arrays); all frames' pairs in one grid lookup
    (:func:`spotfit.near.pairs_within`, the frame a coordinate farther apart than
    ``radius``)."""
    from spotfit.near import pairs_within

    sizes = [len(f.coords) for f in chunk]
    if sum(sizes) == 0:
        return [np.ones(0, bool) for _ in chunk]
    t = np.repeat(np.arange(len(chunk)), sizes)
    xyz = np.concatenate([f.coords[:, ::-1] for f in chunk if len(f.coords)]).astype(float)
    points = np.column_stack([xyz, t * (np.ceil(radius) + 1.0)])
    first, second = pairs_within(points, points, radius)
    grouped = np.zeros(len(points), bool)
    grouped[first[first != second]] = True
    return np.split(~grouped, np.cumsum(sizes)[:-1])


def _judge_singles(setup: Setup, singles):
    """Which single-spot fits are usable (``converged``, or ``not_spot`` with
    :data:`NOT_SPOT_JOINS`), suspects (perhaps several spots: wider than
    ``SUSPECT_WIDTH`` sigmas, elongated by ``SUSPECT_ELONGATION``, or misfit by
    ``SUSPECT_CHI2`` standard deviations) and blobs (wider than ``BLOB_WIDTH``
    sigmas both ways); three bool arrays over the rows."""
    from spotfit import results
    from spotfit._kernels import CONVERGED, NOT_SPOT

    status = singles["status"].to_numpy() if len(singles) else np.zeros(0, object)
    ok = (status == results.STATUS_NAMES[CONVERGED]) | (NOT_SPOT_JOINS & (status == results.STATUS_NAMES[NOT_SPOT]))
    sx, sy = singles["sigma_x"].to_numpy(), singles["sigma_y"].to_numpy()
    suspect, blob = _suspect_or_blob(setup, ok, sx, sy, singles["chi2_red"].to_numpy())
    return ok, suspect, blob


def _suspect_or_blob(setup: Setup, ok, sx, sy, chi2):
    """:func:`_judge_singles`' suspects and blobs among fits ``ok`` of widths ``sx, sy``
    and reduced chi-square ``chi2``; two bool arrays."""
    cfg = setup.config
    big, small = np.maximum(sx, sy), np.minimum(sx, sy)
    dof = np.prod([2 * h + 1 for h in setup.half]) - setup.model.n_params
    chi2_limit = 1.0 + SUSPECT_CHI2 * np.sqrt(2.0 / max(dof, 1))
    # a PSF-narrow minor axis with a long major one (or a misfit) is a row of
    # spots; a fit wide both ways is a blob (texture, aggregate), left as it is
    # (a fit between the two, minor axis 1.2-1.5 sigmas, is a cluster of
    # unresolved spots as often as not: the joint fits and their blob test decide)
    blob = ok & (small > BLOB_WIDTH * cfg.sigma)
    suspect = ok & ~blob & ((big > SUSPECT_WIDTH * cfg.sigma) | (big > SUSPECT_ELONGATION * small)
                            | (chi2 > chi2_limit))
    return suspect, blob


def settled_by_symmetric(setup: Setup):
    """The rule (``settled`` of :func:`spotfit.single.fit_batch`) by which a dense
    frame's single fit keeps its symmetric fit without the model choice: a converged
    symmetric fit that is already a suspect (:func:`_judge_singles`: wider than
    ``SUSPECT_WIDTH`` sigmas or misfit, but no blob).  The joint fits replace such a
    fit whatever the richer model would say, unless that made it a blob (its minor
    axis wider than ``BLOB_WIDTH`` sigmas, which a round fit no wider than that
    rarely hides: ~1% of them) or a failed fit: so the richer fit, most of a dense
    field's single-fit cost, is left out."""
    from spotfit._kernels import CONVERGED

    def settled(values, chi2, status):
        ok = np.asarray(status) == CONVERGED
        return _suspect_or_blob(setup, ok, values["sigma_x"], values["sigma_y"], chi2)[0]
    return settled


def _near_active(xyz, t, engine_frames, setup, seeds=None):
    """Which single fits at ``xyz`` (x, y[, z]) in chunk frames ``t`` lie within the
    reach of a joint fit: a candidate fitted jointly, its residual search
    (window + ``SEARCH_REACH`` sigmas), a new emitter's group window and
    grouping radius, and a window half-size (their own light); ``seeds``
    (bool over ``xyz``) count as candidates fitted jointly."""
    from spotfit.group import SEARCH_REACH
    from spotfit.near import any_within

    out = np.zeros(len(xyz), bool)
    active = [np.column_stack([e.coords[:, ::-1].astype(float), np.full(len(e.coords), i * 1e7)])
              for i, e in enumerate(engine_frames) if len(e.coords)]
    if seeds is not None and seeds.any():
        active.append(np.column_stack([xyz[seeds], t[seeds] * 1e7]))
    if not active or len(xyz) == 0:
        return out
    cfg = setup.config
    r = 4 * max(setup.half) + (SEARCH_REACH + cfg.group_radius) * cfg.sigma + 1.0
    return any_within(np.column_stack([xyz, t * 1e7]), np.concatenate(active), r, strict=True)


def _fit_batches(setup: Setup, batches, size, light=False):
    """Single-spot fits of batches of windows ``(batch, choose_width)`` (as
    :func:`spotfit.single.fit_batch`), joined into solves of at most ``size`` windows;
    a DataFrame (``light``: a LightTable)."""
    parts, pending, n = [], [], 0

    settled = settled_by_symmetric(setup) if SETTLE_SYMMETRIC else None

    def solve():
        batch = single.Batch.join([b for b, _ in pending])
        parts.append(single.fit_batch(setup, batch, np.concatenate([c for _, c in pending]), settled))

    for b, choose in batches:
        if pending and n + len(b) > size:
            solve()
            pending, n = [], 0
        pending.append((b, choose))
        n += len(b)
    if pending:
        solve()
    if not parts:
        return table.empty(setup.ndim, light=light)
    out = concat(parts)
    return out if light else as_frame(out)
