"""Blockwise detection and fitting of images larger than memory, on one machine or a Dask cluster.

A frame (a 2D image or a 3D stack of a time point) is cut into *blocks*:
a core, and a halo around it of :func:`halo` pixels per axis.  Each block
is read (only it: a Zarr, Dask or memory-mapped array is never loaded
whole), detected and fitted with the functions the in-memory path uses
(:mod:`spotfit.detection`, :mod:`spotfit.single`), and keeps the spots whose
*detected pixel* lies in its core.  Cores tile the frame, so every spot is
fitted once, by one block; the halo is wide enough that what decides a core
spot -- its detection (filter, local background, local maxima), its
window and the neighbours masked out of it -- is the same as in the whole
frame.  What is per frame rather than per pixel is measured once per
frame, beforehand, on the whole frame (lazily: sub-grids and bands, not
all pixels): the detection's working scale and noise model (the camera's,
or :func:`spotfit.background.estimate_noise`'s bands), the image noise of
an uncalibrated camera (:func:`spotfit.start.image_noise`'s rows) and its
measured fit-noise model (:func:`spotfit.single.frame_variance`, from the
windows it picks among all the frame's candidates, cut block by block).
The table is therefore the table of the whole frame in memory: same rows,
in the same order, values equal to floating-point noise.

Execution
---------
Blocks are tasks.  Without a scheduler they run one after the other in
this process (each using the machine's cores through the compiled
kernels); with a :class:`dask.distributed.Client`, a scheduler address
(``tcp://host:8786``) or ``"local:N"`` (a :class:`~dask.distributed.LocalCluster`
of N single-threaded worker processes started for the run), each block is
a Dask task that reads its own pixels on the worker.  A block whose fit
raises is reported (:class:`BlockError`, naming the block) and the others
are kept; a worker that dies is replaced and its blocks recomputed by Dask.
Dask (``pip install 'spotfit[dask]'``) is imported only when used.

Dense fields: a frame within one block is fitted by the in-memory path
(``frame_fit``, which :func:`spotfit.fit` passes), joint fits of dense
frames included; a dense frame cut into several blocks is refused with a
clear error (its spots would be fitted one by one).

Limits: not ``crowded``; dense frames within one block only; scalar camera
values (no per-pixel maps); no masked pixels.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from spotfit.camera import Camera, as_camera
from spotfit.config import FitConfig, Setup, make_config
from spotfit.errors import SpotfitInputError, SpotfitWarning

__all__ = ["halo", "plan_blocks", "fit_blocks", "detect_blocks", "BlockError", "Block",
           "BLOCK_VOXELS", "is_lazy"]

#: core voxels of a block by default: ~1 GB of working memory per block
#: (detection holds a few float32 copies of the block with its halo; measured
#: by benchmarks/scale.py: ~25 bytes per voxel read plus ~0.2 GB)
BLOCK_VOXELS = 1 << 24

#: environment variable read for the scheduler when none is given
SCHEDULER_ENV = "SPOTFIT_SCHEDULER"


# ------------------------------------------------------------------ geometry
def halo(config: FitConfig, ndim: int, task: str = "fit") -> tuple:
    """Pixels per axis (array order) around a block's core that decide its spots.

    The detection's reach (:func:`spotfit.detection.detection_halo`: local
    background, filter, local maxima) plus, for fits, the window half-size
    and the reach of the neighbour masking
    (:data:`spotfit.single.NEIGHBOUR_REACH` sigmas), so that the candidates
    that shape a core spot's window are found as in the whole frame;
    rounded up to whole background cells (:func:`spotfit.background.cell_size`).

    Parameters
    ----------
    config : FitConfig
    ndim : {2, 3}
        Dimensions of a frame.
    task : {"fit", "detect"}

    Returns
    -------
    tuple of int
    """
    det, reach, cells = _reaches(config, ndim, task)
    return tuple(-(-(d + r) // c) * c for d, r, c in zip(det, reach, cells))


def _reaches(config, ndim, task):
    """(detection halo, fit reach, cell size) per axis, array order."""
    from spotfit.background import cell_size
    from spotfit.detection import default_min_distance, detection_halo
    from spotfit.single import NEIGHBOUR_REACH

    sig = np.broadcast_to(np.atleast_1d(config.detection_sigma(ndim)), (ndim,))
    radii = default_min_distance(tuple(sig)) if config.min_distance is None else (config.min_distance,) * ndim
    det = detection_halo(tuple(sig), max(np.atleast_1d(radii)))
    if task == "fit":
        half = config.half_size(ndim)
        reach = tuple(int(h + math.ceil(NEIGHBOUR_REACH * config.sigma)) + 1 for h in half)
    else:
        reach = (0,) * ndim
    cells = tuple(cell_size(s) for s in sig)
    return det, reach, cells


@dataclass(frozen=True)
class Block:
    """One block of a frame: its core (the spots it owns) and what is read (core + halo).

    Attributes
    ----------
    index : tuple of int
        Position in the grid of blocks (array order).
    core, read : tuple of slice
        In frame coordinates.
    exact : tuple of slice
        The part of ``read`` whose candidates are those of the whole frame
        (core grown by the fit's reach), in frame coordinates.
    """

    index: tuple
    core: tuple
    read: tuple
    exact: tuple

    @property
    def origin(self) -> tuple:
        return tuple(s.start for s in self.read)

    def describe(self) -> str:
        return "block " + ",".join(map(str, self.index)) + " (" + ", ".join(
            f"{a} {s.start}:{s.stop}" for a, s in zip("zyx"[3 - len(self.core):], self.core)) + ")"


def plan_blocks(frame_shape, config: FitConfig, block_size=None, chunks=None, task: str = "fit",
                budget: int = BLOCK_VOXELS) -> list:
    """Cut a frame into :class:`Block` s.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(ny, nx)`` or ``(nz, ny, nx)``.
    config : FitConfig
    block_size : int or tuple of int, optional
        Core size per axis (array order; an int for every axis), rounded up
        to whole background cells.  Default: planes whole, rows and columns
        halved until a core holds at most `budget` voxels, then aligned to
        the storage `chunks` where they are smaller than the core.
    chunks : tuple of int, optional
        Storage chunk shape of the frame (Zarr, Dask).
    task : {"fit", "detect"}
    budget : int
        Voxels per core for the default size.

    Returns
    -------
    list of Block
        In raster order of their cores.
    """
    shape = tuple(int(n) for n in frame_shape)
    nd = len(shape)
    det, reach, cells = _reaches(config, nd, task)
    pad = halo(config, nd, task)
    if block_size is None:
        core = list(shape)
        order = [nd - 2, nd - 1]
        while int(np.prod(core)) > budget:
            a = max(order, key=lambda i: core[i])
            if core[a] <= 2 * pad[a] and nd == 3 and core[0] > 2 * pad[0]:
                a = 0  # rows and columns down to their halo: cut planes too
            elif core[a] <= 2 * cells[a]:
                break
            core[a] = -(-core[a] // 2)
        if chunks is not None:  # whole storage chunks, as near as whole background cells allow
            for a, c in enumerate(chunks):
                c = int(c)
                if c and core[a] < shape[a] and core[a] > c:
                    core[a] = max(cells[a], int(round(core[a] // c * c / cells[a])) * cells[a])
    else:
        size = np.broadcast_to(np.atleast_1d(np.asarray(block_size, dtype=np.int64)), (nd,))
        if np.any(size < 1):
            raise SpotfitInputError(f"block_size must be positive, got {tuple(size)}",
                                    parameter="block_size")
        core = [min(int(s), n) for s, n in zip(size, shape)]
    core = [min(n, -(-c // cl) * cl) for c, cl, n in zip(core, cells, shape)]
    starts = [range(0, n, c) for n, c in zip(shape, core)]
    blocks = []
    for index in np.ndindex(*[len(s) for s in starts]):
        c0 = [starts[a][i] for a, i in enumerate(index)]
        c1 = [min(shape[a], c0[a] + core[a]) for a in range(nd)]
        read = tuple(slice(max(0, a0 - p), min(n, a1 + p)) for a0, a1, p, n in zip(c0, c1, pad, shape))
        exact = tuple(slice(max(0, a0 - r), min(n, a1 + r)) for a0, a1, r, n in zip(c0, c1, reach, shape))
        blocks.append(Block(tuple(int(i) for i in index), tuple(slice(a0, a1) for a0, a1 in zip(c0, c1)),
                            read, exact))
    return blocks


# ------------------------------------------------------------- per frame
@dataclass
class _FrameInfo:
    """What is per frame, measured once on the whole frame (lazily)."""

    t: int
    prepared: object = None  # detection's _Prepared, None: no noise, nothing to find
    image_var: float = 0.0
    variance: np.ndarray | None = None
    noise: object = None  # the frame's NoiseModel in photons (not rescaled)


def _measure_frame(frame, t, config, camera, ndim, task, compute) -> _FrameInfo:
    """The per-frame quantities of :func:`spotfit.detection.find_peaks` and the fits.

    ``frame`` is a lazy array (Dask) of raw values; ``compute(*lazy)``
    computes several lazy objects at once.  One pass over the frame's
    storage chunks (a task each) gives its minimum and maximum, the
    detection's sub-grid, and for an uncalibrated camera the noise bands of
    :func:`spotfit.background.estimate_noise` and the ~64 rows of
    :func:`spotfit.start.image_noise`: the same pixels and the same
    arithmetic as the in-memory functions.
    """
    import dask

    from spotfit import background, detection, filters
    from spotfit.start import image_noise

    sig = detection._check_options(config.detection_sigma(ndim), 1.0, config.min_distance, ndim)
    if len(sig) == 1:
        sig = sig * ndim
    shape = tuple(int(n) for n in frame.shape)
    grid = detection._subgrid_index(shape)
    steps = tuple(int(g[1] - g[0]) if len(g) > 1 else max(1, n) for g, n in zip(grid, shape))
    rows = None
    if task == "fit" and not camera.calibrated:
        flat_rows = int(np.prod(shape[:-1]))
        rows = np.column_stack(np.unravel_index(np.arange(0, flat_rows, max(1, flat_rows // 64)),
                                                shape[:-1]))
    vol_shape = (1,) * (3 - ndim) + shape
    spans = background._bands(vol_shape) if not camera.calibrated else []
    starts = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in frame.chunks]
    pieces = frame.to_delayed()
    tasks = [dask.delayed(_chunk_pass, pure=True)(pieces[idx], tuple(int(starts[a][i]) for a, i in enumerate(idx)),
                                                  steps, rows, spans, camera)
             for idx in np.ndindex(pieces.shape)]
    parts = compute(*tasks)
    lo = min(p["lo"] for p in parts)
    hi = max(p["hi"] for p in parts)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpotfitInputError(f"frame {t} contains NaN or infinite pixels")
    sub = np.zeros(tuple(len(g) for g in grid), np.float32)
    band_data = [np.zeros((vol_shape[0], r1 - r0, vol_shape[2]), np.float32) for r0, r1 in spans]
    row_data = None if rows is None else np.zeros((len(rows), shape[-1]), np.float32)
    for p in parts:
        first, values = p["sub"]
        sub[tuple(slice(f, f + n) for f, n in zip(first, values.shape))] = values
        for k, x0, seg in p["rows"]:
            row_data[k, x0:x0 + len(seg)] = seg
        for b, where, seg in p["bands"]:
            band_data[b][where] = seg
    biggest = max(abs(lo), abs(hi))
    factor = 1.0
    if biggest > 0 and not detection._UNIT_RANGE[0] < biggest < detection._UNIT_RANGE[1]:
        factor = 2.0 ** int(round(math.log2(1024.0 / biggest)))
    if camera.calibrated:
        noise = background.NoiseModel.from_camera(camera)
    else:
        noise = _estimate_noise(band_data, sig, ndim, biggest)
    info = _FrameInfo(t, noise=noise)
    if row_data is not None:
        info.image_var = image_noise(row_data)
    if factor != 1.0:
        noise = noise.scaled(factor)
    shift = float(np.float32(np.median(sub.ravel().astype(np.float64) * factor)))
    floor = (detection._NOISE_FLOOR * max(hi * factor - shift, shift - lo * factor)) ** 2
    if max(floor, detection._max_variance(noise)) > 0:
        info.prepared = detection._Prepared(sig, factor, shift, noise, floor,
                                            filters._EdgeNoise(shape, sig, filters.SMOOTH,
                                                               background.SCALE))
    return info


def _chunk_pass(raw, offset, steps, rows, spans, camera) -> dict:
    """What :func:`_measure_frame` needs of one storage chunk (at ``offset`` in the frame)."""
    photons = camera.to_photons(np.asarray(raw))
    out = {"lo": float(np.min(photons)), "hi": float(np.max(photons)), "rows": [], "bands": []}
    sel = [np.arange(-(-o // s) * s, o + n, s) - o for o, n, s in zip(offset, photons.shape, steps)]
    first = tuple(int((sl[0] + o) // s) if len(sl) else 0 for sl, o, s in zip(sel, offset, steps))
    out["sub"] = (first, photons[np.ix_(*sel)])
    if rows is not None:
        lead = np.asarray(offset[:-1])
        inside = np.all((rows >= lead) & (rows < lead + np.asarray(photons.shape[:-1])), axis=1)
        for k in np.flatnonzero(inside):
            out["rows"].append((int(k), offset[-1], photons[tuple(rows[k] - lead)].copy()))
    if spans:
        vol = photons.reshape((1,) * (3 - photons.ndim) + photons.shape)
        z0, y0, x0 = (0,) * (3 - photons.ndim) + tuple(offset)
        for b, (r0, r1) in enumerate(spans):
            a, e = max(r0, y0), min(r1, y0 + vol.shape[1])
            if a < e:
                where = (slice(z0, z0 + vol.shape[0]), slice(a - r0, e - r0), slice(x0, x0 + vol.shape[2]))
                out["bands"].append((b, where, vol[:, a - y0:e - y0].copy()))
    return out


def _estimate_noise(bands, sig, ndim, biggest):
    """:func:`spotfit.background.estimate_noise` of a frame from its bands (photons, float32)."""
    from spotfit import background

    sigmas = background._sigmas(sig, ndim)
    factor = 1.0
    if biggest > 0 and not 2.0**-40 < biggest < 2.0**40:
        factor = 2.0 ** int(round(math.log2(1024.0 / biggest)))
    floor = max((16 * float(np.finfo(np.float32).eps) * biggest * factor) ** 2, 1e-30)
    bands = [np.ascontiguousarray((b.astype(np.float64) * factor).astype(np.float32)) for b in bands]
    model = background._measure(bands, sigmas, floor)
    return model if factor == 1.0 else model.scaled(1.0 / factor)


# ---------------------------------------------------------------- block tasks
class BlockError(Exception):
    """A block whose detection or fit failed (the others are kept)."""

    def __init__(self, block: Block, frames, message: str):
        self.block, self.frames, self.message = block, frames, message
        super().__init__(f"{block.describe()}, frames {frames[0]}-{frames[-1]}: {message}")


@dataclass
class _Candidates:
    """A block's candidates of one frame: those of its exact region, frame coordinates."""

    coords: np.ndarray
    score: np.ndarray
    core: np.ndarray  # bool: detected pixel in the block's core
    background: list | None = None  # detection's local background (BackgroundPiece, frame coordinates)


def _detect_one(prepared, photons, block: Block, config, ndim) -> _Candidates:
    from spotfit import detection

    empty = _Candidates(np.zeros((0, ndim), np.intp), np.zeros(0), np.zeros(0, bool))
    if prepared is None:
        return empty
    radii = (detection.default_min_distance(prepared.sig) if config.min_distance is None
             else (int(config.min_distance),) * ndim)
    threshold = detection.DEFAULT_THRESHOLD if config.threshold is None else float(config.threshold)
    interior = tuple(slice(e.start - r.start, e.stop - r.start) for e, r in zip(block.exact, block.read))
    background = []
    coords, score = detection._block_peaks(prepared, photons, block.origin, interior, threshold, radii,
                                           background)
    core = np.ones(len(coords), bool)
    for a, s in enumerate(block.core):
        core &= (coords[:, a] >= s.start) & (coords[:, a] < s.stop)
    return _Candidates(coords, score, core, background)


def _raster(coords):
    return np.lexsort(coords.T[::-1]) if len(coords) else np.zeros(0, np.int64)


def _fit_one(setup, t, raw, photons, block: Block, cand: _Candidates, image_var, variance,
             whole=False):
    """Table rows of the block's core candidates of frame ``t``, in raster order, frame coordinates."""
    from spotfit import single, table

    order = _raster(cand.coords)
    coords = cand.coords[order]
    rows = np.flatnonzero(cand.core[order])
    if len(rows) == 0:
        return table.empty(setup.ndim)
    local = coords - np.asarray(block.origin)
    saturated = _clipped(raw)
    size = single.batch_size(setup)
    if whole and variance is None and not setup.camera.calibrated and len(rows) > size:
        # a whole frame in several solves: its noise model measured up front, as in memory
        variance = single.frame_variance(setup, photons, local, image_var)
    parts = []
    for start in range(0, len(rows), size):
        batch = single.cut_frame(setup, t, photons, local, image_var, rows=rows[start:start + size],
                                 saturated=saturated, variance=variance, background=cand.background)
        batch.windows.origin += np.asarray(block.origin[::-1], dtype=batch.windows.origin.dtype)
        parts.append(single.fit_batch(setup, batch))
    from spotfit.lighttable import as_frame, concat

    out = as_frame(concat(parts))
    for a in range(setup.ndim):  # the detected pixel: the in-memory row order
        out[f"_d{a}"] = coords[rows, a]
    return out


def _clipped(raw):
    """Pixels a camera clipped (:func:`spotfit.camera.clipped_pixels`, as the in-memory
    path), or None."""
    from spotfit.camera import clipped_pixels

    return clipped_pixels(raw)


def _threads(n):
    if n:
        from spotfit._jit import set_kernel_threads

        set_kernel_threads(n)


def _block_task(raw, block, frames, infos, config, camera, ndim, task, cands=None, threads=None):
    """One block over its frames: ``("ok", result)`` or ``("error", message)``.

    ``task``: ``"detect"`` (candidates per frame), ``"fit"`` (detect and fit:
    a table), ``"refit"`` (fit the given candidates ``cands``: a table).
    Errors of the block are returned, not raised, so that one bad block
    does not stop the others (a lost worker is Dask's to recompute).
    """
    try:
        _threads(threads)
        setup = Setup.resolve(dataclasses.replace(config, workers=threads or config.workers), camera,
                              ndim) if task != "detect" else None
        out = []
        raw = np.asarray(raw)
        for k, t in enumerate(frames):
            info = infos[k]
            frame_raw = raw[k]
            photons = camera.to_photons(frame_raw)
            if info is None:  # the block is the whole frame: measured here, as in memory
                info = _whole_frame_info(photons, t, config, camera, ndim, task)
            c = cands[k] if cands is not None else _detect_one(info.prepared, photons, block, config, ndim)
            if task == "detect":
                out.append(c)
            else:
                out.append(_fit_one(setup, t, frame_raw, photons, block, c, info.image_var, info.variance,
                                    whole=infos[k] is None))
        return ("ok", out)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a block's failure is reported with the block
        return ("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, SpotfitInputError) else str(exc))


def _frames_task(raw, frames, config, camera, ndim, frame_fit, threads=None):
    """Whole frames of a block task fitted by the in-memory path ``frame_fit``:
    ``("ok", [table of each frame])`` or ``("error", message)``."""
    try:
        _threads(threads)
        cfg = dataclasses.replace(config, workers=threads or config.workers)
        result = frame_fit(np.asarray(raw), cfg, camera, ndim)
        frame = result["frame"].to_numpy()
        out = []
        for k, t in enumerate(frames):
            part = result[frame == k].reset_index(drop=True)
            part["frame"] = t
            out.append(part)
        return ("ok", out)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a block's failure is reported with the block
        return ("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, SpotfitInputError) else str(exc))


def _whole_frame_info(photons, t, config, camera, ndim, task) -> _FrameInfo:
    """:class:`_FrameInfo` of a frame in memory, by the in-memory functions."""
    from spotfit import detection
    from spotfit.background import NoiseModel, estimate_noise
    from spotfit.start import image_noise

    sig = detection._check_options(config.detection_sigma(ndim), 1.0, config.min_distance, ndim)
    if len(sig) == 1:
        sig = sig * ndim
    noise = NoiseModel.from_camera(camera) if camera.calibrated else estimate_noise(photons, sig)
    info = _FrameInfo(t, prepared=detection._Prepared.of(photons, sig, noise))
    if task == "fit" and not camera.calibrated:
        info.image_var = image_noise(photons)
    return info


def _variance_windows(raw, block, cand: _Candidates, picked, frame_shape, config, camera, ndim,
                      image_var):
    """Windows of the picked candidates (frame coordinates, raster order) that this block
    owns, their origins in the frame, and their places among the picked:
    ``("ok", (batch or None, places))`` or ``("error", message)``."""
    from spotfit import single

    try:
        setup = Setup.resolve(config, camera, ndim)
        order = _raster(cand.coords)
        coords = cand.coords[order]
        keys = np.ravel_multi_index(tuple(coords.T), frame_shape)
        wanted = np.ravel_multi_index(tuple(np.asarray(picked).T), frame_shape)  # ascending
        places = np.minimum(np.searchsorted(wanted, keys), max(len(wanted) - 1, 0))
        rows = np.flatnonzero(cand.core[order] & (wanted[places] == keys)) if len(wanted) else []
        if len(rows) == 0:
            return ("ok", (None, np.zeros(0, np.int64)))
        photons = camera.to_photons(np.asarray(raw))
        batch = single.cut_frame(setup, 0, photons, coords - np.asarray(block.origin), image_var,
                                 rows=rows)
        batch.windows.origin += np.asarray(block.origin[::-1], dtype=batch.windows.origin.dtype)
        return ("ok", (batch, places[rows]))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        return ("error", str(exc) if isinstance(exc, SpotfitInputError) else f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- engines
class _Serial:
    """Blocks one after the other in this process."""

    client = None

    def compute(self, *lazy):
        import dask

        return dask.compute(*lazy, scheduler="synchronous")

    def run(self, calls, progress=None):
        out = []
        for i, (func, args) in enumerate(calls):
            args = [np.asarray(a) if hasattr(a, "__dask_graph__") else a for a in args]
            out.append(func(*args))
            if progress is not None:
                progress(i + 1, len(calls))
        return out

    threads = None

    def close(self):
        pass


class _Distributed:
    """Blocks as tasks of a dask.distributed cluster (each worker reads its block)."""

    def __init__(self, client, owned=()):
        self.client, self.owned = client, list(owned)
        self.threads = 1

    def compute(self, *lazy):
        return self.client.compute(list(lazy), sync=True)

    def run(self, calls, progress=None):
        import dask
        from distributed import as_completed

        # each block's pixels read by its own task (the slice fused into the
        # storage reads), not as chunks shared between blocks' tasks
        tasks = [dask.delayed(func, pure=False)(*[dask.optimize(a)[0] if hasattr(a, "__dask_graph__")
                                                  else a for a in args]) for func, args in calls]
        futures = self.client.compute(tasks)
        index = {f.key: i for i, f in enumerate(futures)}
        out = [None] * len(futures)
        done = 0
        for future in as_completed(futures):
            out[index[future.key]] = future.result()
            done += 1
            if progress is not None:
                progress(done, len(futures))
        return out

    def close(self):
        for thing in reversed(self.owned):
            thing.close()


def engine(scheduler=None):
    """The engine of a ``scheduler``: None (``SPOTFIT_SCHEDULER`` or this process),
    a :class:`distributed.Client`, an address, or ``"local:N"``."""
    if scheduler is None and not _in_dask_worker():  # a task's own blocks stay in its worker
        scheduler = os.environ.get(SCHEDULER_ENV) or None
    if scheduler is None or scheduler == "serial":
        _require_dask()
        return _Serial()
    _require_dask(distributed=True)
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return _Distributed(scheduler)
    text = str(scheduler)
    if text.startswith("local"):
        n = text.partition(":")[2] or str(os.cpu_count() or 1)
        try:
            n = int(n)
        except ValueError:
            raise SpotfitInputError(f"scheduler local:N needs a number of workers, got {text!r}",
                                    parameter="scheduler") from None
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        return _Distributed(client, owned=(cluster, client))
    try:
        client = Client(text, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise SpotfitInputError(f"cannot reach the Dask scheduler at {text} ({exc})",
                                parameter="scheduler") from exc
    return _Distributed(client, owned=(client,))


def _in_dask_worker() -> bool:
    """True inside a task of a dask.distributed worker (e.g. one file of a batch)."""
    import sys

    if "distributed" not in sys.modules:
        return False
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ValueError, ImportError):
        return False


def _require_dask(distributed=False):
    try:
        import dask.array  # noqa: F401

        if distributed:
            import distributed as _  # noqa: F401
    except ImportError as exc:
        raise SpotfitInputError("blockwise fitting needs Dask: pip install 'spotfit[dask]'") from exc


def is_lazy(data) -> bool:
    """True for a Dask or Zarr array (fitted blockwise by :func:`spotfit.fit`;
    :func:`spotfit.readers.is_lazy`, which the in-memory path asks without
    importing this module)."""
    from spotfit.readers import is_lazy as lazy

    return lazy(data)


# ---------------------------------------------------------------- the runs
@dataclass
class _Run:
    data: object  # dask array (T, [Z,] Y, X) of raw values
    config: FitConfig
    camera: Camera
    ndim: int
    task: str
    blocks: list
    t_chunk: int
    errors: list = field(default_factory=list)
    in_memory: bool = False  # whole frames fitted by the in-memory path
    infos: list = field(default_factory=list)  # _FrameInfo per frame (None: measured in the tasks)


def _as_dask(data, axes):
    """A Dask array ``(T, [Z,] Y, X)`` of ``data`` (Dask, Zarr or NumPy) with ``axes`` letters."""
    import dask.array as da

    if not hasattr(data, "__dask_graph__"):
        data = da.from_zarr(data) if type(data).__module__.startswith("zarr") else da.from_array(
            data, chunks="auto")
    if axes is None:
        axes = {2: "YX", 3: "TYX", 4: "TZYX"}.get(data.ndim)
        if axes is None:
            raise SpotfitInputError(f"give axes for a {data.ndim}D array (letters TZYX)",
                                    parameter="axes")
    axes = axes.upper()
    if len(axes) != data.ndim or set(axes) - set("TZYX") or len(set(axes)) != len(axes) \
            or not {"Y", "X"} <= set(axes):
        raise SpotfitInputError(f"axes {axes!r} do not fit a {data.ndim}D array (letters from TZYX, "
                                "Y and X required)", parameter="axes")
    order = [axes.index(a) for a in "TZYX" if a in axes]
    data = data.transpose(order)
    if "T" not in axes:
        data = data[None]
    return data, "TZYX" if "Z" in axes else "TYX"


def _check_camera(camera):
    for name in ("baseline", "gain", "read_noise"):
        if np.ndim(getattr(camera, name)) > 0:
            raise SpotfitInputError(f"blockwise fitting takes scalar camera values, not a per-pixel "
                                    f"{name} map", parameter=name)


def _prepare_run(data, config, camera, axes, block_size, task) -> _Run:
    data, axes = _as_dask(data, axes)
    ndim = 3 if axes == "TZYX" else 2
    config.check_frame(tuple(int(n) for n in data.shape[1:]), window=task == "fit")
    if config.crowded:
        raise SpotfitInputError("blockwise fitting does not do crowded fits yet; fit without "
                                "crowded, or a part that fits in memory", parameter="crowded")
    _check_camera(camera)
    if task == "fit":
        Setup.resolve(config, camera, ndim)  # early errors (estimator vs camera)
    chunks = tuple(c[0] for c in data.chunks[1:])
    blocks = plan_blocks(data.shape[1:], config, block_size, chunks=chunks, task=task)
    # frames per task: several small frames together, up to the voxel budget
    frame_voxels = int(np.prod(data.shape[1:]))
    t_chunk = 1 if len(blocks) > 1 else max(1, min(int(data.shape[0]), BLOCK_VOXELS // max(1, frame_voxels)))
    return _Run(data, config, camera, ndim, task, blocks, t_chunk)


def _frame_infos(run: _Run, eng) -> list:
    """:func:`_measure_frame` of every frame."""
    return [_measure_frame(run.data[t], t, run.config, run.camera, run.ndim, run.task, eng.compute)
            for t in range(run.data.shape[0])]


def _calls(run, infos, task, cands=None, threads=None, frame_fit=None):
    """(function, args) of every (frame chunk, block); blocks of whole frames go to
    ``frame_fit`` (the in-memory path) when given."""
    T = run.data.shape[0]
    calls, keys = [], []
    for t0 in range(0, T, run.t_chunk):
        frames = list(range(t0, min(T, t0 + run.t_chunk)))
        for b, block in enumerate(run.blocks):
            raw = run.data[(slice(frames[0], frames[-1] + 1),) + block.read]
            if frame_fit is not None:
                calls.append((_frames_task, (raw, frames, run.config, run.camera, run.ndim,
                                             frame_fit, threads)))
                keys.append((frames, b))
                continue
            cb = None if cands is None else [cands[(t, b)] for t in frames]
            calls.append((_block_task, (raw, block, frames, [infos[t] for t in frames], run.config,
                                        run.camera, run.ndim, task, cb, threads)))
            keys.append((frames, b))
    return calls, keys


def _collect(run, keys, results):
    """Results per (frame, block), errors recorded in ``run.errors``."""
    out = {}
    for (frames, b), (status, value) in zip(keys, results):
        if status == "error":
            run.errors.append(BlockError(run.blocks[b], frames, value))
            continue
        for t, v in zip(frames, value):
            out[(t, b)] = v
    return out


def _frame_variance(run, eng, infos, cands):
    """The measured fit-noise model of each frame (uncalibrated camera), as
    :func:`spotfit.single.frame_variance` on the whole frame."""
    from spotfit import single, solver

    setup = Setup.resolve(run.config, run.camera, run.ndim)
    first = single._reduced(setup) if single._selects(setup) else setup
    for t, info in enumerate(infos):
        core = [cands[(t, b)].coords[cands[(t, b)].core] for b in range(len(run.blocks)) if (t, b) in cands]
        coords = np.concatenate(core) if core else np.zeros((0, run.ndim), np.intp)
        if len(coords) == 0:
            continue
        coords = coords[_raster(coords)]
        picked = coords[solver.regression_rows(np.zeros(len(coords), np.int64))]
        calls, owners = [], []
        for b, block in enumerate(run.blocks):
            c = cands.get((t, b))
            if c is None or not c.core.any():
                continue
            raw = run.data[(t,) + block.read]
            calls.append((_variance_windows, (raw, block, c, picked, tuple(run.data.shape[1:]),
                                              run.config, run.camera, run.ndim, info.image_var)))
            owners.append(b)
        parts = []
        for b, (status, value) in zip(owners, eng.run(calls)):
            if status == "error":  # the frame's model is measured without this block's windows
                run.errors.append(BlockError(run.blocks[b], [t], value))
            elif value[0] is not None:
                parts.append(value)
        if not parts:
            continue
        batch = single.Batch.join([p[0] for p in parts])
        where = np.concatenate([p[1] for p in parts])
        batch = single._take(batch, np.argsort(where))
        info.variance = single._solve(first, batch).variance[0]


def _run_blocks(data, config, camera, axes, block_size, scheduler, task, progress, frame_fit=None):
    run = _prepare_run(data, config, camera, axes, block_size, task)
    eng = engine(scheduler)
    try:
        whole = len(run.blocks) == 1  # blocks of whole frames: per-frame quantities in the task
        run.in_memory = whole and task == "fit" and frame_fit is not None
        infos = [None] * run.data.shape[0] if whole else _frame_infos(run, eng)
        two_pass = task == "fit" and not camera.calibrated and not whole
        first_task = "detect" if (task == "detect" or two_pass) else "fit"
        calls, keys = _calls(run, infos, first_task, threads=eng.threads,
                             frame_fit=frame_fit if run.in_memory else None)
        out = _collect(run, keys, eng.run(calls, progress=None if two_pass else progress))
        if two_pass:
            _frame_variance(run, eng, infos, out)
            cands = out
            ok = {k for k in cands}
            calls, keys = _calls(run, infos, "refit", cands=_Defaulting(cands, run.ndim),
                                 threads=eng.threads)
            keep = [i for i, (frames, b) in enumerate(keys) if all((t, b) in ok for t in frames)]
            calls, keys = [calls[i] for i in keep], [keys[i] for i in keep]
            out = _collect(run, keys, eng.run(calls, progress=progress))
        run.infos = infos
        return run, out
    finally:
        eng.close()


class _Defaulting(dict):
    """Candidates per (frame, block); empty for blocks whose detection failed."""

    def __init__(self, cands, ndim):
        super().__init__(cands)
        self.ndim = ndim

    def __missing__(self, key):
        return _Candidates(np.zeros((0, self.ndim), np.intp), np.zeros(0), np.zeros(0, bool))


def _report(run, on_error):
    if not run.errors:
        return
    if on_error == "raise":
        raise run.errors[0]
    for e in run.errors:
        warnings.warn(str(e), SpotfitWarning, stacklevel=3)


def fit_blocks(data, config: FitConfig | None = None, camera: Camera | None = None,
               axes: str | None = None, block_size=None, scheduler=None, progress=None,
               on_error: str = "warn", frame_fit=None, **options):
    """Detect and fit every spot of a large array block by block.

    Parameters
    ----------
    data : dask.array.Array, zarr.Array or ndarray
        Raw pixel values; read block by block (a Dask or Zarr array is
        never loaded whole).
    config, camera, **options
        As in :func:`spotfit.fit` (single-spot fits; scalar camera values).
    axes : str, optional
        Letters of ``data``'s axes among ``TZYX`` (default ``YX``, ``TYX``,
        ``TZYX`` by dimension; a 3D volume is ``"ZYX"``).
    block_size : int or tuple of int, optional
        Core size of a block per frame axis (array order); default from
        the storage chunks and :data:`BLOCK_VOXELS` (:func:`plan_blocks`).
    scheduler : optional
        None (this process, or ``SPOTFIT_SCHEDULER`` if set), a
        :class:`distributed.Client`, a scheduler address or ``"local:N"``.
    progress : callable, optional
        ``progress(blocks_done, blocks_total)``, fed as tasks complete.
    on_error : {"warn", "raise"}
        A block whose fit fails: a :class:`SpotfitWarning` naming it (its
        spots are missing, the others kept), or raise :class:`BlockError`.
    frame_fit : callable, optional
        ``frame_fit(raw, config, camera, ndim)`` -> the in-memory table of
        whole frames ``raw`` (``(k, [nz,] ny, nx)`` raw values, frames
        numbered from 0); tasks whose block is a whole frame call it, so that
        dense frames get the joint fits they get in memory (:func:`spotfit.fit`
        passes its own in-memory path).  Without it blocks are fitted spot by
        spot, and a dense frame (:func:`spotfit.group.coverage`) is refused.

    Returns
    -------
    pandas.DataFrame
        The table :func:`spotfit.fit` gives for the whole array in memory
        (same rows and order; values equal to floating-point noise).

    Raises
    ------
    SpotfitInputError
        Bad options, or a dense frame cut into several blocks (its spots
        would be fitted one by one, unlike in memory).
    """
    import pandas as pd

    from spotfit import table

    config = make_config(config, options)
    camera = as_camera(camera)
    run, out = _run_blocks(data, config, camera, axes, block_size, scheduler, "fit", progress,
                           frame_fit=frame_fit)
    _report(run, on_error)
    parts = []
    for t in range(run.data.shape[0]):
        rows = [out[(t, b)] for b in range(len(run.blocks)) if (t, b) in out and len(out[(t, b)])]
        if not rows:
            continue
        if not run.in_memory:
            _refuse_dense(t, sum(len(r) for r in rows), run)
        part = pd.concat(rows, ignore_index=True) if len(rows) > 1 else rows[0]
        parts.append(part)
    if not parts:
        return table.empty(run.ndim)
    result = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    result = _raster_rows(result, run)
    if not run.in_memory:
        result = _overlapping(result, run, frame_fit)
    return result.drop(columns=[c for c in result if c.startswith("_d")])


class _FrameReader:
    """Pixels of one frame of a lazy array, read on demand: ``reader[crop]`` gives
    photons (``kind="photons"``) or the clipped pixels (``"clipped"``) of a crop."""

    def __init__(self, frame, camera, kind="photons"):
        self.frame, self.camera, self.kind = frame, camera, kind
        self.shape = tuple(int(n) for n in frame.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, crop):
        raw = np.asarray(self.frame[crop])
        if self.kind == "photons":
            return self.camera.to_photons(raw)
        clipped = _clipped(raw)
        return np.zeros(raw.shape, bool) if clipped is None else clipped


def _overlapping(result, run, frame_fit):
    """Joint fits where the single fits of a 2D frame cut into blocks say that spots
    overlap, as in memory (:func:`spotfit.fields._fit_sparse`): tiles around them
    (read from the lazy array), or the whole frame through ``frame_fit`` when it is
    small.  Without ``frame_fit``, or for z-stacks, the single fits stand."""
    from spotfit import fields, table

    if run.ndim != 2 or frame_fit is None or not len(result):
        return result
    setup = Setup.resolve(run.config, run.camera, run.ndim)
    frame = result["frame"].to_numpy()
    out, changed = [], False
    for t in np.unique(frame):
        rows = result[frame == t].reset_index(drop=True).drop(columns=["_d0", "_d1"])
        coords = result.loc[frame == t, ["_d0", "_d1"]].to_numpy().astype(np.intp)
        info = run.infos[t] if run.infos and run.infos[t] is not None else None
        f = fields.Frame(int(t), _FrameReader(run.data[t], run.camera), coords=coords,
                         saturated=_FrameReader(run.data[t], run.camera, "clipped"),
                         image_var=0.0 if info is None else info.image_var,
                         noise=None if info is None else info.noise)
        hot = fields._overlaps(setup, f, rows)
        if not hot.any():
            out.append(rows)
            continue
        changed = True
        if fields.fits_whole(setup, f.photons.shape):  # small: the frame in memory
            whole = frame_fit(np.asarray(run.data[t:t + 1]), run.config, run.camera, run.ndim)
            whole["frame"] = np.int64(t)
            out.append(whole)
            continue
        (joint, replaced), = fields._fit_tiles(setup, [(f, rows, hot)])
        joint = joint.drop(columns=[c for c in joint if c in table._GROUP])
        out.append(fields.merge_joint(rows[~replaced], [joint]) if len(joint) else rows[~replaced])
    if not changed:
        return result
    import pandas as pd

    return pd.concat(out, ignore_index=True)


def _refuse_dense(t, n, run):
    """Raise if frame ``t``, with ``n`` candidates fitted one by one, is a dense field
    (:func:`spotfit.group.coverage`): in memory its overlapping spots are fitted
    jointly, which blocks of part of a frame do not do (yet)."""
    from spotfit.group import DENSE_COVERAGE, coverage

    shape = tuple(int(v) for v in run.data.shape[1:])
    c = coverage(np.empty((n, run.ndim)), shape, run.config)
    if c >= DENSE_COVERAGE:
        where = f"frame {t}" if run.data.shape[0] > 1 else "the image"
        raise SpotfitInputError(
            f"{where} is a dense field ({n} spots, coverage {c:.2f} >= {DENSE_COVERAGE}): its "
            "overlapping spots need joint fits, which blockwise fitting does only for frames "
            f"within one block; give a block size of at least the frame {shape} (`block_size`) "
            "or fit it in memory", parameter="block_size")


def _raster_rows(result, run):
    """Rows per frame in the raster order of their windows' centres (the detected pixels,
    columns ``_d0``...: kept), as the in-memory path gives them (rows of whole frames
    fitted in memory already are)."""
    if not len(result) or run.in_memory:
        return result
    keys = [result[f"_d{a}"].to_numpy() for a in range(run.ndim)][::-1] + [result["frame"].to_numpy()]
    return result.iloc[np.lexsort(keys)].reset_index(drop=True)


def detect_blocks(data, config: FitConfig | None = None, camera: Camera | None = None,
                  axes: str | None = None, block_size=None, scheduler=None, progress=None,
                  on_error: str = "warn", **options):
    """Detect spot candidates of a large array block by block (:func:`spotfit.detect`'s table).

    Parameters as in :func:`fit_blocks`.
    """
    import pandas as pd

    config = make_config(config, options)
    camera = as_camera(camera)
    run, out = _run_blocks(data, config, camera, axes, block_size, scheduler, "detect", progress)
    _report(run, on_error)
    frames, coords, scores = [np.empty(0, np.int64)], [np.empty((0, run.ndim), np.intp)], [np.empty(0)]
    for (t, b), c in sorted(out.items()):
        frames.append(np.full(int(c.core.sum()), t, np.int64))
        coords.append(c.coords[c.core])
        scores.append(c.score[c.core])
    frames, coords = np.concatenate(frames), np.concatenate(coords)
    cols = {"frame": frames, "x": coords[:, -1].astype(float), "y": coords[:, -2].astype(float)}
    if run.ndim == 3:
        cols["z"] = coords[:, 0].astype(float)
    cols["score"] = np.concatenate(scores).astype(float)
    keys = [cols["x"], cols["y"]] + ([cols["z"]] if run.ndim == 3 else []) + [frames]
    order = np.lexsort(keys)
    return pd.DataFrame({k: v[order] for k, v in cols.items()})
