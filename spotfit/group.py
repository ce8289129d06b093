"""Crowded fields: fit overlapping spots together and find the ones hiding in their tails.

Pipeline for one frame (:meth:`CrowdedFitter.fit_frame`):

1. **Start** from the detected candidates, with moment estimates of each
   spot (:func:`spotfit.start.initial_guess`: centroid, intensity, offset),
   as single-spot fits start.
2. **Group** spots closer than ``group_radius * sigma`` (KD-tree pairs +
   connected components, i.e. union-find); groups larger than
   ``max_group`` are split at the median of their widest axis.
3. **Fit each group jointly**: K Gaussians sharing one width and one offset
   (:class:`~spotfit.models.gaussian.MultiGaussian`), in a window covering
   all members, vectorised over all groups of the same size (in a few solves
   of similar window shapes, :func:`shape_classes`).  The light of
   spots *outside* the group is subtracted from the window first (their
   current models), so a window's neighbours no longer pull its fit; the
   covariance of a group is its joint Fisher information, so every spot's
   errors account for its neighbours.  Each emitter's columns and status
   come from :mod:`spotfit.results`, as for single-spot fits.
4. **Search the residual** (data minus all fitted spots) for significant
   peaks with the detector; a peak farther than ``SEARCH_EXCLUSION * sigma``
   from every known spot becomes a new emitter (a close pair fitted as one
   spot leaves residual lobes about a sigma from the fitted centre), and all
   groups are refitted.
5. **Keep an emitter only if the data need it**: an added emitter stays when
   its Wald statistic ``(N / err_N)^2`` exceeds the BIC penalty of its
   parameters, ``(1 + ndim) * ln(P)`` (``P`` pixels in its window); any
   emitter whose ``N / err_N`` falls below 2 is dropped.  After pruning, the
   affected groups are refitted once more.
"""

from __future__ import annotations

import numpy as np

# neighbours and groups come from spotfit.near, not scipy.spatial and scipy.sparse.csgraph,
# which took longer to import than a small frame takes to fit (tests/test_startup.py);
# and filters from spotfit.background (the same numbers as scipy.ndimage's, without importing it)
from spotfit._jit import njit
from spotfit import near, results, roi, solver, table
from spotfit.config import Setup
from spotfit.models import get_model
from spotfit.models.gaussian import MultiGaussian
from spotfit.single import window_bounds
from spotfit.start import initial_guess

#: a frame whose candidates would cover at least this fraction of it with discs of
#: ``group_radius * sigma`` (:func:`coverage`) is a dense field: its overlapping spots
#: are fitted jointly without ``crowded`` (:func:`spotfit.api.fit`)
DENSE_COVERAGE = 0.2
#: emitters whose intensity is below this many standard errors are removed
MIN_EMITTER_SNR = 2.0
#: residual searches for hidden emitters per frame
SEARCH_ROUNDS = 2
#: residual peaks closer than this many sigma to a known spot are not new emitters
SEARCH_EXCLUSION = 0.5
#: the residual is searched this many sigmas beyond a fitted spot's window
SEARCH_REACH = 1.5
#: a misfit group that one Gaussian wider than this many sigmas both ways explains
#: at least as well (BIC) is a blob, even if that Gaussian misfits too (texture)
BLOB_MINOR = 1.5
#: a group is fitted again in the next round only if a spot within reach of its window
#: changed: added, removed, or moved by more than this many of its standard errors
REFIT_MOVE = 0.25
#: fitted widths stay within this range times the expected sigma
WIDTH_RANGE = (0.9, 1.1)
#: a misfit spot (see MISFIT_SIGMAS) this many sigmas wide is split like one at the width bound
MISFIT_WIDTH = 1.04
#: a group fit whose reduced chi-square exceeds 1 by this many standard
#: deviations with its width at the upper bound is no group of spots (not_spot)
MISFIT_SIGMAS = 4.0


#: a joint fit of several emitters may take this many times ``max_iter`` iterations: its
#: 8-26 parameters share light, and the steps of a group of 5-8 crawl along the valley of
#: two emitters' shared light long after a single spot's fit has stopped
#: (``benchmarks/dense.py``, SMLM 60 per frame: 191 of ~12,000 rows stopped at 50
#: iterations, 22 with this)
JOINT_ITERATIONS = 2


def joint_iterations(max_iter: int, n_emitters: int) -> int:
    """The iteration limit of a joint fit of ``n_emitters`` (``max_iter`` per fit, the
    ``--max-iter`` option; :data:`JOINT_ITERATIONS` times that for several emitters)."""
    return int(max_iter) * (JOINT_ITERATIONS if n_emitters > 1 else 1)


def group_spots(points: np.ndarray, radius: float, max_size: int = 8) -> np.ndarray:
    """Label spots that lie within ``radius`` of each other (transitively).

    Parameters
    ----------
    points : (n, d) ndarray
        Positions, px.
    radius : float
        Linking distance, px.
    max_size : int
        Largest group; bigger connected components are split recursively at
        the median of their widest axis.

    Returns
    -------
    (n,) int ndarray
        Group label of each spot, ``0 .. n_groups - 1``.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    first, second = near.pairs_within(points, points, radius)
    labels = near.components(n, first, second)
    sizes = np.bincount(labels)
    if sizes.max() <= max_size:
        return labels
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    next_label = labels.max() + 1
    for comp in np.flatnonzero(sizes > max_size):  # rare: only oversized components
        stack = [order[bounds[comp] : bounds[comp + 1]]]
        while stack:
            members = stack.pop()
            if len(members) <= max_size:
                labels[members] = next_label
                next_label += 1
                continue
            pts = points[members]
            axis = np.argmax(np.ptp(pts, axis=0))
            split = np.argsort(pts[:, axis], kind="stable")
            half = len(members) // 2
            stack += [members[split[:half]], members[split[half:]]]
    _, labels = np.unique(labels, return_inverse=True)
    return labels


class _Spots:
    """Current estimates of all spots of a chunk of frames (positions in image px, x/y[/z] order).

    ``t`` is each spot's frame within the chunk; ``xyz`` places the spot's
    window and its light (:meth:`CrowdedFitter._render`); ``start`` is where
    its next fit starts: the centroid of a detected spot before its first
    fit (as a single-spot fit starts), else ``xyz``.  ``rec`` holds the last
    fit's output columns (:func:`spotfit.results.measure`: values by column
    name, errors by column name + ``_err``), ``chi2_red``, ``iterations``,
    ``status`` and ``n_pixels``, carried along when spots are removed or
    added.  A ``fixed`` spot is a single-spot fit that stands as it is: its
    light is subtracted from its neighbours' windows, but it is not refitted
    unless a new emitter is found beside it (then it joins that group).
    """

    _ARRAYS = ("xyz", "t", "intensity", "sigma", "offset", "added", "start", "fixed", "single", "locked",
               "ident", "dirty")

    def __init__(self, xyz, t, intensity, sigma, offset, added, start=None, fixed=None, single=None,
                 locked=None, ident=None, dirty=None, rec=None):
        self.xyz = np.asarray(xyz, float)
        self.t = np.asarray(t, np.int64)
        self.intensity = np.asarray(intensity, float)
        self.sigma = np.asarray(sigma, float)  # (n, 1) lateral or (n, 2) lateral + axial
        self.offset = np.asarray(offset, float)
        self.added = np.asarray(added, bool)
        self.start = self.xyz.copy() if start is None else np.asarray(start, float)
        n, nd = self.xyz.shape
        # fixed: a single-spot fit taken as it is (its light only is used), unless a
        # new emitter appears beside it; single: its row among those fits, else -1
        self.fixed = np.zeros(n, bool) if fixed is None else np.asarray(fixed, bool)
        self.single = np.full(n, -1, np.int64) if single is None else np.asarray(single, np.int64)
        # locked: fixed for good (a fit that is no spot: its light is subtracted, nothing more)
        self.locked = np.zeros(n, bool) if locked is None else np.asarray(locked, bool)
        # ident: a number that follows the spot through the rounds (-1 until its first
        # joint fit); dirty: changed since its last joint fit (new, moved, split, freed)
        self.ident = np.full(n, -1, np.int64) if ident is None else np.asarray(ident, np.int64)
        self.dirty = np.ones(n, bool) if dirty is None else np.asarray(dirty, bool)
        if rec is None:
            keys = table.value_columns(nd)
            rec = {k: np.full(n, np.nan) for k in keys + [f"{k}_err" for k in keys]}
            rec.update(chi2_red=np.full(n, np.nan), n_pixels=np.zeros(n),
                       iterations=np.zeros(n, np.int32), status=np.zeros(n, np.int8))
        self.rec = rec

    def __len__(self):
        return len(self.xyz)

    def take(self, keep):
        return _Spots(*(getattr(self, a)[keep] for a in self._ARRAYS),
                      rec={k: v[keep] for k, v in self.rec.items()})

    def extend(self, other):
        return _Spots(*(np.concatenate([getattr(self, a), getattr(other, a)]) for a in self._ARRAYS),
                      rec={k: np.concatenate([v, other.rec[k]]) for k, v in self.rec.items()})

    def keyed(self) -> np.ndarray:
        """Positions with the frame as an extra, far-away coordinate (no links across frames)."""
        return np.column_stack([self.xyz, self.t * _FRAME_GAP])


#: distance between frames in :meth:`_Spots.keyed` (far beyond any grouping radius)
_FRAME_GAP = 1e7


def _dog_windows(data, t, lo, inner, sig, margin, boxes=None) -> np.ndarray:
    """The DoG (``G(sig) - G(DOG_RATIO sig)``, ``mode="nearest"``) of frames ``data``
    (zero outside them, as if padded by ``margin`` px of zeros) in the windows of
    shape ``inner`` from ``lo`` (array order) of frames ``t``: ``(n, P)``, at the
    windows' pixels within the frames (0 at those beyond, which the split leaves out).

    Filtered per frame with zeros beyond its edges (``mode="constant"``: the numbers of
    the frame padded by ``margin`` zeros, whose own edge, where ``"nearest"`` would
    matter, lies beyond the reach of any pixel of the frame); or, when that takes fewer
    operations (``boxes``: force it either way, for tests), in each window's box widened
    by the wider filter's reach: the same values, since a filtered pixel depends only
    on the pixels within the reach.  In a box each filter sees only the pixels the
    window's values depend on: each axis' pass over the box cropped to the window
    widened by that filter's half-width along the axes still to filter, the rows it
    leaves cropped to the window (:func:`_filter_interior`).
    """
    from spotfit.background import gaussian_filter
    from spotfit.filters import DOG_RATIO

    nd = len(inner)
    widths = (tuple(float(s) for s in sig), tuple(float(DOG_RATIO * s) for s in sig))
    reach = np.array([int(4.0 * DOG_RATIO * s + 0.5) for s in sig], np.int64)
    # the filters' half-widths (as gaussian_filter takes them), within the box's reach
    halves = [[int(4.0 * s + 0.5) for s in w] for w in widths]
    fits = all(h <= r for hs in halves for h, r in zip(hs, reach))
    assert all(r <= m for r, m in zip(reach, margin))  # (the margin the numbers are those of)
    box = (1,) + tuple(int(v) for v in np.asarray(inner) + 2 * reach)
    if boxes is None:  # pixels passed through the filters (2 filters, nd passes each)
        per_box = sum(int(np.prod(inner[:a])) * int(np.prod([i + 2 * h for i, h in zip(inner[a:], hs[a:])]))
                      for hs in halves for a in range(nd))
        boxes = fits and len(t) * per_box < 2 * nd * data.size
    if boxes and fits:  # (cut_box leaves pixels outside the frames at zero: the padding)
        stack = roi.cut_box(data, np.column_stack([t, lo - reach]), box, dtype=data.dtype).data
        stack = stack.reshape((len(t),) + box[1:])
        narrow, wide = _side_by_side(*(lambda w=w, hs=hs: _filter_interior(stack, w, hs, reach, inner)
                                       for w, hs in zip(widths, halves)))
        mesh = np.indices(inner).reshape(nd, -1)  # the windows' pixels within the frames
        pix = lo[:, :, None] + mesh[None]
        within = np.all((pix >= 0) & (pix < np.array(data.shape[1:])[None, :, None]), axis=1)
        return np.where(within, (narrow - wide).reshape(len(t), -1), 0.0)
    narrow, wide = _side_by_side(*(lambda w=w: gaussian_filter(data, (0.0,) + w, mode="constant")
                                   for w in widths))
    return roi.cut_box(narrow - wide, np.column_stack([t, lo]), (1,) + tuple(inner)).data


def _filter_interior(stack, widths, halves, reach, inner):
    """``gaussian_filter(stack, (0,) + widths, mode="nearest")`` of boxes ``stack``
    (``(n,) + inner + 2 reach``) at their windows' pixels (``inner`` from ``reach``):
    axis after axis, each pass over the pixels that the windows' values depend on
    (the window widened by ``halves`` along the axes not yet filtered), then cropped
    to the window along its axis.  The same numbers: a pass computes each value from
    its own row, in the same order, and no value kept comes near a cropped edge."""
    from spotfit.background import gaussian_filter

    nd = len(inner)
    a = stack[(slice(None),) + tuple(slice(int(r - h), int(r + i + h)) for r, h, i in zip(reach, halves, inner))]
    for axis in range(nd):
        one = [0.0] * (nd + 1)
        one[axis + 1] = widths[axis]
        a = gaussian_filter(a, tuple(one), mode="nearest")
        a = a[(slice(None),) * (axis + 1) + (slice(halves[axis], halves[axis] + inner[axis]),)]
    return a


def _side_by_side(*jobs) -> list:
    """The results of ``jobs`` (callables), run side by side on the kernel threads
    (:func:`spotfit._jit.over_windows`; NumPy's filters release the GIL): the same
    values as one after the other."""
    from spotfit._jit import over_windows

    out = [None] * len(jobs)

    def run(first, last):
        for k in range(first, last):
            out[k] = jobs[k]()

    over_windows(run, len(jobs), threaded=True)
    return out


class CrowdedFitter:
    """Joint fits of grouped spots over a chunk of frames, for one :class:`~spotfit.config.Setup`.

    The frames of a chunk are stacked, so that every step -- cutting
    windows, rendering the fitted spots, every bucket of equally sized
    groups -- runs once for the chunk rather than once per frame (small
    frames, as in single-molecule movies, are otherwise dominated by the
    per-frame overhead); groups never span two frames.
    """

    def __init__(self, setup: Setup):
        self.setup = setup
        self.config = setup.config
        self.ndim = setup.ndim
        self.integrated = setup.model.integrated
        self.half = setup.half  # array order
        self.emitter = get_model("symmetric", self.ndim, self.integrated)

    # ---------------------------------------------------------- the chunk
    def fit_frames(self, frames, read_var=None, fixed=None):
        """Fit all spots of some frames; returns a :class:`_Spots` with results.

        Alternates joint fits of all groups with residual searches
        (``SEARCH_ROUNDS``) and pruning, then refits: every frame the same rounds.

        Parameters
        ----------
        frames : sequence
            Frames of the same shape with ``photons`` (photons or ADU above
            baseline), ``coords`` (the candidates to fit, ``(n, ndim)`` array
            order), ``valid`` and ``saturated`` (bool maps or None) and
            ``noise`` (the frame's :class:`~spotfit.background.NoiseModel`,
            or None to measure it) attributes.
        read_var : ndarray of the frames' shape, optional
            Read-noise variance map (sCMOS).
        fixed : dict, optional
            Single-spot fits that stand as they are unless a new emitter is
            found beside them: ``xyz`` (n, ndim), ``t`` (frame within
            ``frames``), ``intensity``, ``sigma`` (n, 1) or (n, 2),
            ``offset``, ``row`` (their index, reported back in
            :attr:`_Spots.single`), optionally ``locked`` (bool: never
            refitted, e.g. fits that are no spot).

        Returns
        -------
        _Spots
            With ``labels`` (group of each spot that is not fixed, unique
            within the chunk; -1 for fixed ones).
        """
        cfg = self.config
        self._frames = list(frames)
        self._stack = np.stack([np.asarray(f.photons, dtype=float) for f in self._frames])
        self._valid = _stack_or_none([f.valid for f in self._frames], self._stack.shape, True)
        self._saturated = _stack_or_none([f.saturated for f in self._frames], self._stack.shape, False)
        self._read_var = None if read_var is None else np.broadcast_to(read_var, self._stack.shape)
        spots = self._start()
        if fixed is not None and len(fixed["xyz"]):
            n = len(fixed["xyz"])
            spots = spots.extend(_Spots(fixed["xyz"], fixed["t"], fixed["intensity"], fixed["sigma"],
                                        fixed["offset"], np.zeros(n, bool), fixed=np.ones(n, bool),
                                        single=fixed["row"], locked=fixed.get("locked")))
        radius = cfg.group_radius * cfg.sigma
        labels = np.zeros(0, np.int64)
        # blob tests of misfit groups (run after the last round) and the places
        # whose light changed since the last joint fits (removed or moved spots)
        self._pending, self._sources, self._next_ident = [], [], 0
        # every frame goes through every round and the final refit, so that a
        # frame's results do not depend on the other frames fitted with it (an
        # early stop when no frame changes would tie them together); within a
        # round only the groups near a change are refitted (:meth:`_refit`)
        for round_ in range(SEARCH_ROUNDS + 1):
            before = spots
            spots, labels = self._joint(spots, radius)
            if round_:
                spots = self._revert(before, spots, labels)
                labels = self._labels(spots, radius)
            keep = self._keep(spots)
            if not keep.all():
                self._sources.append(spots.keyed()[~keep])
                spots = spots.take(keep)
            if round_ < SEARCH_ROUNDS:
                new = self._search(spots, radius)
                if len(new):
                    spots = spots.extend(new)
        spots, labels = self._joint(spots, radius)  # refit the survivors
        self._judge_blobs(spots)
        spots.labels = labels
        return spots

    def _judge_blobs(self, spots):
        """Statuses of the last joint fits' emitters, with the blob test (:meth:`_blob`)
        of their misfit groups: run once, on the final fits only (the test
        decides a status, nothing the rounds before depend on)."""
        from spotfit._jit import over_windows

        order = np.argsort(spots.ident, kind="stable")
        tests = []
        for entry in self._pending:
            ids, status, outside, low, sat, data, w, chi2, n_params, candidates, alive = entry
            where = np.clip(np.searchsorted(spots.ident, ids, sorter=order), 0, max(len(spots) - 1, 0))
            members = order[where] if len(spots) else np.zeros_like(ids)
            alive = alive & np.all(spots.ident[members] == ids, axis=1) if len(spots) else alive & False
            tests.append((members, candidates & alive))
        # the tests side by side on the kernel threads (each depends on its windows only),
        # their statuses set in order
        blobs = [None] * len(tests)
        todo = [k for k, (_, which) in enumerate(tests) if which.any()]

        def run(first, last):
            for k in todo[first:last]:
                entry = self._pending[k]
                blobs[k] = self._blob(entry[5], entry[6], entry[7], entry[8], tests[k][1])

        over_windows(run, len(todo), threaded=len(todo) > 1)
        for entry, (members, _), blob in zip(self._pending, tests, blobs):
            ids, status, outside, low, sat = entry[:5]
            if blob is None or not blob.any():
                continue
            for i in range(members.shape[1]):
                state = results.judge(status[i], outside[i], low[i], sat, blob)
                spots.rec["status"][members[blob, i]] = state[blob]
        self._pending = []

    def _windows(self, image, t, lo, shape, dtype=float):
        """Windows of ``shape`` (a frame's axes) starting at ``lo`` (array order) in frames
        ``t`` of a stacked ``image``, as windows of one frame (origin ``x, y[, z]``)."""
        start = np.column_stack([t, lo])
        rv = self._read_var if dtype is float else None
        valid = self._valid if dtype is float else None
        w = roi.cut_box(image, start, (1,) + tuple(shape), dtype=dtype, read_var=rv, valid=valid)
        return roi.Windows(w.data, w.mask, w.origin[:, : self.ndim], roi.Grid(tuple(shape)), w.read_var)

    def _new_spots(self, xyz, t, start, offset, added):
        """Spots at ``xyz`` with the intensity of the moment estimates ``start``."""
        cfg, n = self.config, len(xyz)
        sig = [np.full(n, cfg.sigma)] + ([np.full(n, cfg.axial_sigma())] if self.ndim == 3 else [])
        return _Spots(xyz, t, start[:, self.emitter.intensity_index], np.column_stack(sig), offset,
                      np.full(n, added, bool))

    def _start(self):
        """Moment estimates of the detected spots (centroids, as single-spot fits start)."""
        coords = [np.asarray(f.coords, np.int64).reshape(-1, self.ndim) for f in self._frames]
        t = np.concatenate([np.full(len(c), i, np.int64) for i, c in enumerate(coords)])
        coords = np.concatenate(coords) if coords else np.zeros((0, self.ndim), np.int64)
        half = np.asarray(self.half)
        w = self._windows(self._stack, t, coords - half, tuple(2 * half + 1))
        start = initial_guess(self.emitter, w.data, w.mask, w.grid, self.config)
        spots = self._new_spots(coords[:, ::-1].astype(float), t, start,
                                start[:, self.emitter.offset_index], False)
        spots.start = start[:, list(self.emitter.center_index)] + w.origin
        return spots

    def _render(self, spots: _Spots) -> np.ndarray:
        """The stacked frames' light of all spots (no offset), each drawn in a window of half-size ``half``."""
        image = np.zeros(self._stack.shape, dtype=float)
        if len(spots) == 0:
            return image
        half = np.asarray(self.half)
        centers = np.rint(spots.xyz[:, ::-1]).astype(np.int64)  # array order
        origin_xyz = (centers - half)[:, ::-1]
        grid = roi.Grid(tuple(2 * half + 1))
        rel = spots.xyz - origin_xyz
        cols = [spots.intensity, *rel.T, *spots.sigma.T, np.zeros(len(spots))]
        mu = self.emitter.value(np.column_stack(cols), grid)
        start = np.column_stack([spots.t, (centers - half)])  # array order, with the frame first
        nz = 0 if self.ndim == 2 else image.shape[1]
        _scatter(image.reshape(-1, image.shape[-2], image.shape[-1]), mu, start, np.array(grid.shape), nz)
        return image

    def _background_at(self, t, lo, shape):
        """The frames' local background at the pixels of windows ``shape`` from ``lo``
        (array order) in frames ``t``: ``(n, P)``; pixels outside a frame take the
        value at its nearest edge.  A frame's ``background`` (the detection's, a
        list of :class:`spotfit.detection.BackgroundPiece` in the frame's
        coordinates; a tile's is its frame's, moved) when it has one, else
        :class:`spotfit.background.Background` estimated once per frame.

        Each frame's background is taken at all its pixels once per fit (the
        windows of its spots overlap several times over, round after round) and
        the windows' pixels are gathered from it: the same values."""
        from spotfit.background import Background, _as_volume, _sigmas
        from spotfit.detection import background_box, background_boxes

        dims = self._stack.shape[1:]
        if getattr(self, "_bg_frames", None) is not self._frames:
            self._bg_frames = self._frames
            self._bg_stack = np.zeros(self._stack.shape)
            self._bg_done = np.zeros(len(self._frames), bool)
        # the tiles of a frame (one block's background each, moved) all at once
        shared = {}
        for i in np.unique(t).tolist():
            known = getattr(self._frames[i], "background", None)
            if not self._bg_done[i] and known and len(known) == 1:
                shared.setdefault((id(known[0].background), known[0].factor), []).append(i)
        for rows in shared.values():
            self._bg_stack[rows] = background_boxes([self._frames[i].background[0] for i in rows], dims)
            self._bg_done[rows] = True
        for i in np.unique(t):
            if self._bg_done[i]:
                continue
            known = getattr(self._frames[i], "background", None)  # detection's (BackgroundPiece list)
            if known:
                values = background_box(known, (0,) * len(dims), dims)
            else:
                sig = _sigmas(self.config.detection_sigma(self.ndim), self.ndim)
                photons = _as_volume(np.asarray(self._frames[i].photons, np.float32))
                bg = Background.estimate(photons, sig, self._noise(i))
                values = bg.box([np.zeros(1, np.int64)] * (3 - len(dims)) + [np.arange(n) for n in dims])
            self._bg_stack[i] = np.asarray(values, float).reshape(dims)
            self._bg_done[i] = True
        # each axis' pixels (clipped to the frame), broadcast against the others'
        nd = len(shape)
        index = [t.reshape((-1,) + (1,) * nd)]
        for a, n in enumerate(shape):
            along = np.clip(lo[:, a, None] + np.arange(n), 0, dims[a] - 1)
            index.append(along.reshape((len(t),) + (1,) * a + (n,) + (1,) * (nd - 1 - a)))
        return self._bg_stack[tuple(index)].reshape(len(t), -1)

    def _noise(self, i):
        """Detection noise model of frame ``i`` of the chunk (measured once if need be)."""
        from spotfit.background import NoiseModel, estimate_noise

        f = self._frames[i]
        if getattr(f, "noise", None) is None:
            cam = self.setup.camera
            sig = self.config.detection_sigma(self.ndim)
            f.noise = NoiseModel.from_camera(cam) if cam.calibrated else estimate_noise(f.photons, sig)
        return f.noise

    def _search(self, spots, radius):
        """New emitters: peaks of the residual near the spots being fitted, and the
        residual maximum beside wide spots.

        Around every spot that is not fixed, a window ``SEARCH_REACH`` sigmas
        wider than its fit window is cut from the residual (data minus all
        spots' light, minus the spot's offset), smoothed like the detector
        smooths, and its local maxima (3 x 3) above the detection threshold
        (the frame's noise model at that offset) farther than
        ``SEARCH_EXCLUSION * sigma`` from every known spot become new
        emitters, as does, for every spot whose width hit its upper bound
        (a single Gaussian stretched over an unresolved pair), the maximum of
        the filtered residual in its window.  A fixed spot within the
        grouping radius of a new emitter joins the fits.  The joint refit and
        pruning decide which new emitters stay.
        """
        cfg = self.config
        empty = spots.take(np.zeros(len(spots), bool))
        # around the spots being fitted, not around added ones: a search that
        # follows its own additions walks along texture
        active = np.flatnonzero(~spots.fixed & ~spots.added)
        if len(active) == 0:
            return empty
        light = self._render(spots)
        residual = self._stack - light
        xyz, t = self._residual_peaks(residual, light, spots, active)
        nearest = np.zeros(0, np.int64)
        split = self._wide(spots) | self._misfit_wide(spots)
        if len(xyz):
            keyed, placed = np.column_stack([xyz, t * _FRAME_GAP]), spots.keyed()
            new = ~near.any_within(keyed, placed, SEARCH_EXCLUSION * cfg.sigma)
            if spots.locked.any():  # a blob's leftover light is no hidden spot
                new &= ~near.any_within(keyed, placed[spots.locked], radius)
            wide = self._wide(spots)
            if wide.any():  # around a stretched spot the split below decides instead
                new &= ~near.any_within(keyed, placed[wide], max(self.half))
            xyz, t, keyed = xyz[new], t[new], keyed[new]
            # (a residual peak lies within a window and the search's reach of a spot)
            nearest = near.nearest_of_all(keyed, placed, 2.0 * (max(self.half) + SEARCH_REACH * cfg.sigma) + 1.0)
            if len(xyz):  # fixed spots beside a new emitter are fitted with it
                _, hit = near.pairs_within(keyed, placed, radius)
                hit = np.unique(hit)
                hit = hit[spots.fixed[hit] & ~spots.locked[hit]]
                spots.fixed[hit] = False
                spots.dirty[hit] = True
                spots.start[hit] = spots.xyz[hit]
            # a misfit spot with a new emitter beside it is explained by that one
            if len(xyz):
                beside = near.any_within(placed, keyed, radius)
                split &= self._wide(spots) | ~beside
        half = np.asarray(self.half)
        w = self._windows(residual, t, np.rint(xyz[:, ::-1]).astype(np.int64) - half, tuple(2 * half + 1))
        start = initial_guess(self.emitter, w.data, w.mask, w.grid, cfg)
        found = self._new_spots(xyz, t, start, spots.offset[nearest], True)
        return self._split_wide(residual, spots, extra=found, wide=split)

    def _residual_peaks(self, residual, light, spots, active):
        """Significant local maxima of the smoothed residual around spots ``active``:
        positions ``(m, ndim)`` (x, y[, z]) and frames ``(m,)``, each pixel once.

        The noise a residual peak is compared with is the frame's noise
        model at the fitted level there (offset plus all spots' light): the
        shot noise of a bright spot's own photons is no hidden emitter.
        """
        from spotfit.background import gaussian_filter, maximum_filter
        from spotfit.filters import SMOOTH, _kernel_power

        cfg, nd = self.config, self.ndim
        reach = int(np.ceil(SEARCH_REACH * cfg.sigma))
        half = np.asarray(self.half) + np.array([0] * (nd - 2) + [reach, reach])
        if nd == 3:
            half[0] += int(np.ceil(SEARCH_REACH * cfg.axial_sigma()))
        centre = np.rint(spots.xyz[active][:, ::-1]).astype(np.int64)
        t = spots.t[active]
        shape = tuple(2 * half + 1)
        w = self._windows(residual, t, centre - half, shape)
        # the level a hidden spot would stand on: the frame's local background
        # (it follows cells and texture wider than a spot, not spots)
        offset = self._background_at(t, centre - half, shape)
        data = (w.data - offset) * w.mask
        widths = cfg.widths(nd)[::-1]  # array order
        smoothing = (0,) + tuple(SMOOTH * s for s in widths)
        # noise of the smoothed residual: the frame's noise model at the fitted level
        level = offset + self._windows(light, t, centre - half, shape).data
        smooth, level = _side_by_side(
            lambda: gaussian_filter(data.reshape((-1,) + shape), smoothing, mode="constant", truncate=3.0),
            lambda: gaussian_filter(level.reshape((-1,) + shape), smoothing, mode="nearest", truncate=3.0))
        k2 = float(np.prod([_kernel_power(SMOOTH * s, 2) for s in widths]))
        var = np.empty_like(level)
        models = {}  # frames by noise model (a frame's tiles share its own)
        for i in np.unique(t).tolist():
            models.setdefault(id(self._noise(i)), (self._noise(i), []))[1].append(i)
        for noise, frames in models.values():
            rows = t == frames[0] if len(frames) == 1 else np.isin(t, frames)
            rv = noise.read_var
            read = float(np.mean(rv)) if np.ndim(rv) else float(rv)
            v = read + noise.shot * np.maximum(level[rows], 0.0)
            var[rows] = np.maximum(v, noise.floor) * noise.correlation
        # ... or the residual's own spread there, if larger: structure the fits
        # and the background leave (texture) is no hidden spot either
        flat = smooth.reshape(len(smooth), -1)
        clutter = 1.4826 * np.median(np.abs(flat - np.median(flat, axis=1, keepdims=True)), axis=1)
        sd = np.maximum(np.sqrt(var * k2), clutter.reshape((-1,) + (1,) * nd))
        threshold = cfg.threshold if cfg.threshold is not None else _detection_threshold()
        peak = smooth == maximum_filter(smooth, (0,) + (1,) * nd)
        peak &= smooth > threshold * sd
        inner = np.zeros(shape, bool)
        inner[tuple(slice(1, -1) for _ in shape)] = True  # a window's edge is no maximum
        peak &= inner[None] & w.mask.reshape((-1,) + shape)
        rows, *idx = np.nonzero(peak)
        if len(rows) == 0:
            return np.zeros((0, nd)), np.zeros(0, np.int64)
        pix = np.column_stack(idx) + (centre[rows] - half)  # array order, image pixels
        found = np.unique(np.column_stack([t[rows], pix]), axis=0)
        return found[:, 1:][:, ::-1].astype(float), found[:, 0]

    def _wide(self, spots):
        """Spots whose lateral width reached its upper bound."""
        return spots.sigma[:, 0] >= 0.99 * WIDTH_RANGE[1] * self.config.sigma

    def _misfit_wide(self, spots):
        """Spots being fitted that may be an unresolved pair although their width stayed
        below its bound: wider than ``MISFIT_WIDTH`` sigmas in a misfit window (reduced
        chi-square ``MISFIT_SIGMAS`` above 1: one Gaussian does not explain the light)."""
        dof = np.maximum(spots.rec["n_pixels"] - (2 + self.ndim), 1)
        misfit = spots.rec["chi2_red"] > 1.0 + MISFIT_SIGMAS * np.sqrt(2.0 / dof)
        return ~spots.fixed & ~spots.added & misfit & (spots.sigma[:, 0] >= MISFIT_WIDTH * self.config.sigma)

    def _split_wide(self, residual, spots, extra, wide=None):
        """Split spots stretched to the width bound into two emitters (in place).

        A single Gaussian fitted to an unresolved pair widens until its bound;
        such a spot is replaced by two half-intensity emitters one sigma on
        either side of its centre, along the direction of the strongest
        residual in its window.  The second emitter is returned (with
        ``extra``) as an added spot, so pruning decides whether it stays.
        """
        from spotfit.filters import DOG_RATIO

        cfg = self.config
        wide = np.flatnonzero(self._wide(spots) if wide is None else wide)
        if len(wide) == 0:
            return extra
        # the DoG of the residual (filtered where the frames' pixels are zero: outside
        # them, or not valid) in each stretched spot's window (:func:`_dog_windows`):
        # the filters of the frames that hold one, padded by the wider filter's reach
        # (``pad`` px: the same values as filtering each window padded by ``pad`` on
        # its own), or of each window's box if those hold fewer pixels
        half = np.asarray(self.half)
        pad = np.asarray([int(np.ceil(4 * DOG_RATIO * s)) for s in cfg.widths(self.ndim)[::-1]])
        margin = pad + half + 2  # a window's centre may lie a pixel outside its frame
        frames, t = np.unique(spots.t[wide], return_inverse=True)
        data = residual[frames] if self._valid is None else residual[frames] * self._valid[frames]
        lo = np.rint(spots.xyz[wide][:, ::-1]).astype(np.int64) - half
        inner = tuple(2 * half + 1)
        values = _dog_windows(data, t.ravel(), lo, inner, tuple(cfg.widths(self.ndim)[::-1]), margin)
        w = self._windows(residual, spots.t[wide], lo, inner)
        w = roi.Windows(values, w.mask, w.origin, w.grid)
        best = np.argmax(np.where(w.mask, w.data, -np.inf), axis=1)
        peak = np.column_stack([c[best] for c in w.grid.flat()]) + w.origin  # x, y[, z]
        direction = peak - spots.xyz[wide]
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        ok = norm[:, 0] > 0
        wide, direction = wide[ok], direction[ok] / norm[ok]
        step = direction * cfg.sigma
        centre = spots.xyz[wide].copy()
        self._sources.append(spots.keyed()[wide])
        spots.dirty[wide] = True
        spots.xyz[wide] = centre - step
        spots.start[wide] = centre - step
        spots.intensity[wide] *= 0.5
        split = _Spots(centre + step, spots.t[wide], spots.intensity[wide], spots.sigma[wide],
                       spots.offset[wide], np.ones(len(wide), bool))
        return extra.extend(split)

    def _keep(self, spots):
        """Which spots stay (see the module docstring, step 5)."""
        snr = _snr(spots)
        keep = snr >= MIN_EMITTER_SNR
        # an added emitter must be as significant as a detected one would be
        keep &= ~spots.added | self._significant(spots)
        keep &= np.isfinite(snr)
        # two emitters fitted onto one place have no separate errors (a singular
        # covariance): the light is one emitter's, kept once (the brighter one)
        first, second = self._coincident(spots)
        merged = ~keep[first] & ~keep[second]
        first, second = first[merged], second[merged]
        spots.intensity[first] += spots.intensity[second]
        spots.dirty[first] = True
        keep[first] = np.isfinite(spots.intensity[first]) & (spots.intensity[first] > 0)
        return keep | spots.fixed

    def _coincident(self, spots):
        """Pairs ``(kept, merged)`` of emitters being fitted that lie within
        ``SEARCH_EXCLUSION * sigma`` of each other (each emitter in one pair at most,
        the brighter one first)."""
        free = np.flatnonzero(~spots.fixed)
        if len(free) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keyed = spots.keyed()[free]
        i, j = near.pairs_within(keyed, keyed, SEARCH_EXCLUSION * self.config.sigma)
        a, b = free[i[i < j]], free[j[i < j]]
        swap = spots.intensity[b] > spots.intensity[a]
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        used = np.zeros(len(spots), np.int64)
        np.add.at(used, np.concatenate([a, b]), 1)
        single = (used[a] == 1) & (used[b] == 1)
        return a[single], b[single]

    def _significant(self, spots):
        """Emitters whose last fit passes the test an added emitter must pass: Wald
        statistic above the BIC penalty and ``N / err_N`` at the detection threshold."""
        snr = _snr(spots)
        penalty = (1 + self.ndim) * np.log(np.maximum(spots.rec["n_pixels"], 2))
        threshold = self.config.threshold if self.config.threshold is not None else _detection_threshold()
        return (snr**2 > penalty) & (snr >= threshold)

    def _revert(self, before, after, labels):
        """Undo the additions to a group whose refit made one of its earlier emitters
        insignificant: drop the group's added emitters and give its earlier ones
        their previous estimates back.

        An added emitter that takes half the light of a bright spot it sits
        beside (a residual peak of a slightly misfitted spot) can leave both
        too faint to keep; the evidence was the earlier spot's, not the pair's.
        ``before`` and ``after`` hold the same spots in the same order (before
        and after the refit); ``labels`` are the groups of the refit.
        """
        earlier = ~before.added & ~before.fixed
        weak = earlier & ~(_snr(after) >= MIN_EMITTER_SNR) & (_snr(before) >= MIN_EMITTER_SNR)
        if not weak.any():
            return after
        added_groups = np.unique(labels[before.added & (labels >= 0)])
        # a group whose added emitter is as significant as a detected one has
        # found light that was there: its weak earlier emitter is pruned instead
        # (it gave its light to the new ones: a pair or a spot in a tail)
        strong = before.added & self._significant(after) & (labels >= 0)
        added_groups = np.setdiff1d(added_groups, labels[strong])
        undo = np.isin(labels, np.intersect1d(labels[weak], added_groups)) & (labels >= 0)
        if not undo.any():
            return after
        restore = np.flatnonzero(undo & earlier)
        for a in _Spots._ARRAYS:
            getattr(after, a)[restore] = getattr(before, a)[restore]
        for k, v in after.rec.items():
            v[restore] = before.rec[k][restore]
        after.dirty[restore] = True  # back where they were: their neighbours see them again
        self._sources.append(after.keyed()[undo & before.added])
        return after.take(~(undo & before.added))

    # ---------------------------------------------------------- joint fits
    def _labels(self, spots, radius):
        """Group labels of the spots that are not fixed (-1 for fixed ones)."""
        labels = np.full(len(spots), -1, np.int64)
        free = ~spots.fixed
        labels[free] = group_spots(spots.keyed()[free], radius, self.config.max_group)
        return labels

    def _joint(self, spots: _Spots, radius):
        """Fit the groups near a change jointly (:meth:`_refit`); returns the updated
        spots and the group labels of all."""
        n = len(spots)
        labels = self._labels(spots, radius)
        new = spots.ident < 0
        spots.ident[new] = self._next_ident + np.arange(int(new.sum()))
        self._next_ident += int(new.sum())
        if n == 0 or spots.fixed.all():
            self._sources = []
            spots.dirty[:] = False
            return spots, labels
        free = np.flatnonzero(labels >= 0)
        refit = self._refit(spots, labels)
        self._sources = []
        out = spots.take(np.arange(n))  # a copy to write the new estimates into
        out.dirty[:] = False
        free = free[refit[labels[free]]]
        if len(free) == 0:
            return out, labels
        residual = self._stack - self._render(spots)
        sizes = np.bincount(labels[free])
        order = free[np.argsort(labels[free], kind="stable")]
        starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        # the blob tests of earlier fits of these spots are superseded
        for entry in self._pending:
            entry[-1] &= ~np.isin(entry[0], spots.ident[free]).any(axis=1)
        buckets = []
        for K in np.unique(sizes[sizes > 0]):
            groups = np.flatnonzero(sizes == K)
            members = order[starts[groups][:, None] + np.arange(K)[None, :]]
            lo, hi = self._boxes(spots, members)
            buckets += [members[rows] for rows in shape_classes(hi - lo + 1)]
        self._fit_buckets(residual, spots, buckets, out)
        # the light of spots that moved by more than REFIT_MOVE standard errors
        # changed in their neighbours' windows: those are refitted next time
        moved = self._moved(spots, out, free)
        if len(moved):
            self._sources += [spots.keyed()[moved], out.keyed()[moved]]
        return out, labels

    def _refit(self, spots, labels):
        """Which groups (bool per label) are fitted again: those with a spot that changed
        since its last joint fit (``dirty``: new, split, freed, restored), or within
        reach of a place whose light changed (a spot removed or moved, ``_sources``):
        ``2 * half + 1`` px along each axis, where a spot's light (drawn in a window
        of half-size ``half``) meets a group's window (its members' windows)."""
        n_groups = int(labels.max()) + 1 if (labels >= 0).any() else 0
        refit = np.zeros(n_groups, bool)
        grouped = labels >= 0
        refit[labels[spots.dirty & grouped]] = True
        keyed = spots.keyed()
        sources = [keyed[spots.dirty]] + [s for s in self._sources if len(s)]
        sources = np.concatenate(sources) if sources else np.zeros((0, keyed.shape[1]))
        todo = grouped & ~refit[np.maximum(labels, 0)]
        if len(sources) and todo.any():
            reach = 2 * max(self.half) + 1.0
            close = near.any_within(keyed[todo], sources, reach + 1e-9, chebyshev=True, strict=True)
            refit[labels[todo][close]] = True
        return refit

    def _moved(self, before, after, fitted):
        """Spots among ``fitted`` whose position or intensity changed by more than
        :data:`REFIT_MOVE` of its standard error (or without errors)."""
        nd = self.ndim
        rec = after.rec
        err = np.column_stack([rec[f"{a}_err"][fitted] for a in ("x", "y", "z")[:nd]])
        shift = np.abs(after.xyz[fitted] - before.xyz[fitted])
        dn = np.abs(after.intensity[fitted] - before.intensity[fitted])
        with np.errstate(invalid="ignore"):
            still = np.all(shift <= REFIT_MOVE * err, axis=1) & (dn <= REFIT_MOVE * rec["intensity_err"][fitted])
        return fitted[~still]

    def _boxes(self, spots, members):
        """First and last pixel (array order, ``(G, ndim)`` each) of the boxes of groups
        ``members`` ``(G, K)``: their members' pixels plus the window half-size."""
        half = np.asarray(self.half)  # array order
        pos = spots.xyz[members]  # (G, K, nd) x, y[, z]
        lo = np.floor(pos.min(axis=1)).astype(np.int64)[:, ::-1] - half
        hi = np.ceil(pos.max(axis=1)).astype(np.int64)[:, ::-1] + half
        return lo, hi

    def _fit_buckets(self, residual, spots, buckets, out):
        """:meth:`_fit_bucket` of each of ``buckets`` (members ``(G, K)`` of groups fitted
        in one solve), side by side on the kernel threads
        (:func:`spotfit._jit.over_windows`), the costliest first: one bucket's NumPy
        between its kernels overlaps another's kernels (each bucket's solve then runs in
        its thread).  Each bucket writes its own groups' spots of ``out`` only, and its
        fits depend on its windows only: the same fits as one bucket after the other.
        The blob tests they leave (``_pending``) are queued in bucket order."""
        from spotfit._jit import kernel_threads, over_windows

        pending = [[] for _ in buckets]
        work = np.array([len(m) * float(np.prod(np.ptp(spots.xyz[m], axis=1).max(axis=0) + 1 + 2 * max(self.half)))
                         * (m.shape[1] * (1 + self.ndim) + 2) ** 2 for m in buckets])
        order = np.argsort(-work, kind="stable")
        # a bucket with a thread's share of the work or more is fitted alone, its
        # solve on all threads; the others side by side
        alone = work[order] * kernel_threads() >= work.sum()
        for k in order[alone]:
            self._fit_bucket(residual, spots, buckets[k], out, pending[k])
        rest = order[~alone]

        def run(first, last):
            for k in rest[first:last]:
                self._fit_bucket(residual, spots, buckets[k], out, pending[k])

        over_windows(run, len(rest), threaded=len(rest) > 1)
        for entries in pending:
            self._pending += entries

    def _fit_bucket(self, residual, spots, members, out, pending=None):
        """Joint fits of all groups with the same number of members ``K``.

        Each group's window spans its members plus the window half-size (an
        isolated spot's first fit gets exactly the window and start of a
        single-spot fit).  The blob tests it leaves go to ``pending`` (a list;
        default ``_pending``).
        """
        setup, cfg, nd = self.setup, self.config, self.ndim
        G, K = members.shape
        pos = spots.xyz[members]  # (G, K, nd) x, y[, z]
        t = spots.t[members[:, 0]]
        lo, hi = self._boxes(spots, members)
        shape = tuple(int(s) for s in (hi - lo).max(axis=0) + 1)
        w = self._windows(residual, t, lo, shape)
        # each group sees its own box only (windows of a bucket share the largest
        # shape): a group's fit does not depend on the other groups fitted with it
        mesh = np.indices(shape).reshape(len(shape), -1)
        w.mask &= np.all(mesh[None, :, :] <= (hi - lo)[:, :, None], axis=1)
        model = MultiGaussian(K, nd, self.integrated)
        # data = photons minus the light of spots outside the group
        own = np.zeros((G, model.n_params))
        rel = pos - w.origin[:, None, :]
        rel_start = spots.start[members] - w.origin[:, None, :]
        for i in range(K):
            own[:, model.emitter_index(i, "intensity")] = spots.intensity[members[:, i]]
            for j, a in enumerate(("x", "y", "z")[:nd]):
                own[:, model.emitter_index(i, a)] = rel[:, i, j]
        own[:, model.index("sigma")] = np.median(spots.sigma[members][:, :, 0], axis=1)
        if nd == 3:
            own[:, model.index("sigma_z")] = np.median(spots.sigma[members][:, :, 1], axis=1)
        theta0 = own.copy()
        own[:, model.offset_index] = 0.0
        data = w.data + model.value(own, w.grid) * w.mask  # `own`: the light _render took out
        theta0[:, model.offset_index] = np.median(spots.offset[members], axis=1)
        for i in range(K):  # the fit starts where each spot's `start` says
            for j, a in enumerate(("x", "y", "z")[:nd]):
                theta0[:, model.emitter_index(i, a)] = rel_start[:, i, j]
        lower, upper = window_bounds(model, setup.estimator, w)
        # A PSF is as wide as the optics make it: a width free to grow would let
        # one Gaussian swallow two close spots, so widths stay near the expected
        # sigma (WIDTH_RANGE).
        expected = {"sigma": cfg.sigma, "sigma_z": cfg.axial_sigma()}
        for name in model.width_names:
            lower[:, model.index(name)] = WIDTH_RANGE[0] * expected[name]
            upper[:, model.index(name)] = WIDTH_RANGE[1] * expected[name]
        theta0 = np.clip(theta0, lower, upper)
        free = ~model.width_mask if cfg.fix_sigma else np.ones(model.n_params, bool)
        sol = solver.solve(model, setup.estimator, data, w.mask, w.grid, theta0, noise=setup.noise(w.read_var),
                           lower=lower, upper=upper, free=free, max_iter=joint_iterations(cfg.max_iter, K), groups=t,
                           active_set=True, rough_start=True)
        finite = np.all(np.isfinite(sol.theta), axis=1)
        theta = np.where(finite[:, None], sol.theta, theta0)
        sat = np.zeros(G, bool)
        if self._saturated is not None:
            s = self._windows(self._saturated, t, lo, shape, dtype=bool)
            sat = np.any(s.data & w.mask, axis=1)
        em = model.emitter_model
        centre = list(em.center_index)
        rec = out.rec
        # a group whose PSFs are as wide as allowed and still misfit is no group
        # of spots (nuclear texture, a blob): its emitters are not spots
        dof = np.maximum(w.mask.sum(axis=1) - model.n_params, 1)
        pegged = theta[:, model.index("sigma")] >= (1 - 1e-3) * upper[:, model.index("sigma")]
        misfit = sol.chi2_red > 1.0 + MISFIT_SIGMAS * np.sqrt(2.0 / dof)
        candidates = pegged & misfit  # blob tests: after the last round (_judge_blobs)
        blob = np.zeros(G, bool)
        # every emitter of every group at once: row g * K + i is emitter i of group g
        idx = np.array([model.emitter_params(i) for i in range(K)])  # (K, emitter's parameters)
        ke = idx.shape[1]
        flat = members.ravel()
        th_all = theta[:, idx]  # (G, K, ke)
        # the columns emitter by emitter (results.measure's quadratic forms are summed
        # in an order that depends on the batch, so per emitter as ever: the same bits)
        each = [results.measure(em, th_all[:, i], sol.cov[:, idx[i]][:, :, idx[i]], w.origin) for i in range(K)]
        values, errors = ({key: np.column_stack([part[j][key] for part in each]).reshape(G * K) for key in each[0][j]}
                          for j in (0, 1))
        outside = ~w.inside(th_all[:, :, centre].reshape(G * K, len(centre)), rows=np.repeat(np.arange(G), K))
        low = results.low_signal(values["intensity"], errors["intensity"], cfg.min_snr)
        state = emitter_status(sol, idx, model.offset_index).reshape(G * K)
        rec["status"][flat] = results.judge(state, outside, low, np.repeat(sat, K), np.repeat(blob, K))
        for key, v in values.items():
            rec[key][flat] = v
            rec[f"{key}_err"][flat] = errors[key]
        rec["chi2_red"][flat] = np.repeat(sol.chi2_red, K)
        rec["iterations"][flat] = np.repeat(sol.iterations, K)
        rec["n_pixels"][flat] = np.repeat(w.mask.sum(axis=1), K)
        th = th_all[finite].reshape(-1, ke)  # keep old estimates where a fit failed
        ok = members[finite].ravel()
        out.intensity[ok] = th[:, em.intensity_index]
        out.xyz[ok] = th[:, centre] + np.repeat(w.origin[finite], K, axis=0)
        out.start[ok] = out.xyz[ok]
        out.sigma[ok, 0] = th[:, em.index("sigma")]
        if nd == 3:
            out.sigma[ok, 1] = th[:, em.index("sigma_z")]
        out.offset[ok] = th[:, em.offset_index]
        # (per emitter, for the blob tests)
        outs, lows, states = (list(a.reshape(G, K).T) for a in (outside, low, state))
        if candidates.any():
            (self._pending if pending is None else pending).append(
                [out.ident[members], states, outs, lows, sat, data, w, sol.chi2_red * dof, model.n_params,
                 candidates, np.ones(G, bool)])

    def _blob(self, data, w, chi2, n_params, candidates):
        """Which misfit groups one wide Gaussian explains as well as their emitters.

        For each candidate group, the setup's single-spot model (widths
        free) is fitted to the group's window; if it fits (reduced
        chi-square within ``MISFIT_SIGMAS`` of 1) or is wider than
        ``BLOB_MINOR`` sigmas both ways (textured light misfits both), and
        its chi-square plus the BIC penalty of its parameters is no larger
        than the group's, the group is a blob of light (texture, an
        aggregate), not spots.
        A cluster of spots the search has not yet resolved is misfit by one
        wide Gaussian too, and stays.
        """
        out = np.zeros(len(candidates), bool)
        rows = np.flatnonzero(candidates)
        if len(rows) == 0:
            return out
        setup, m = self.setup, self.setup.model
        sub = roi.Windows(data[rows], w.mask[rows], w.origin[rows], w.grid,
                          None if w.read_var is None else w.read_var[rows])
        theta0 = initial_guess(m, sub.data, sub.mask, sub.grid, self.config)
        lower, upper = window_bounds(m, setup.estimator, sub)
        sol = solver.solve(m, setup.estimator, sub.data, sub.mask, sub.grid, theta0,
                           noise=setup.noise(sub.read_var), lower=lower, upper=upper,
                           max_iter=self.config.max_iter, bias_correct=False, boxed=True, active_set=True)
        pixels = sub.mask.sum(axis=1)
        dof = np.maximum(pixels - m.n_params, 1)
        penalty = np.log(np.maximum(pixels, 2))
        blob_cost = sol.chi2_red * dof + m.n_params * penalty
        group_cost = chi2[rows] + n_params * penalty
        fits = sol.chi2_red <= 1.0 + MISFIT_SIGMAS * np.sqrt(2.0 / dof)  # the blob explains the data
        # ... or is wide both ways: then neither explains textured light, and
        # the cheaper description (one wide blob) wins
        values, _ = results.measure(m, sol.theta, sol.cov, sub.origin)
        wide = np.minimum(values["sigma_x"], values["sigma_y"]) > BLOB_MINOR * self.config.sigma
        out[rows] = np.isfinite(blob_cost) & (blob_cost <= group_cost) & (fits | wide)
        return out

    # --------------------------------------------------------------- table
    def table(self, spots: _Spots, group_offset: int, light: bool = False):
        """Rows of the chunk, by frame and in raster order within a frame
        (columns of :func:`spotfit.table.columns` + group columns); ``light``:
        a :class:`~spotfit.lighttable.LightTable`, else a DataFrame."""
        nd = self.ndim
        free = ~spots.fixed
        labels = np.unique(spots.labels[free], return_inverse=True)[1].astype(np.int64)
        spots = spots.take(free)
        spots.labels = labels
        n = len(spots)
        rec = spots.rec
        keys = table.value_columns(nd)
        frame = np.array([f.t for f in self._frames], np.int64)[spots.t] if n else np.zeros(0, np.int64)
        t = table.build(frame, {k: rec[k] for k in keys},
                        {k: rec[f"{k}_err"] for k in keys}, rec["chi2_red"], rec["iterations"],
                        results.status_names(rec["status"]), self.setup.camera.unit, nd, light=light)
        sizes = np.bincount(spots.labels) if n else np.zeros(0, np.int64)
        t["group_id"] = spots.labels.astype(np.int64) + group_offset
        t["group_size"] = sizes[spots.labels].astype(np.int64)
        order = np.lexsort(tuple(spots.xyz[:, j] for j in range(nd)) + (frame,))  # frame, then raster
        t = t.iloc[order]
        return t if light else t.reset_index(drop=True)


@njit(cache=True)
def _scatter(image, values, start, shape, nz):
    """Add window values ``(n, P)`` into ``image`` ((T, ny, nx) frames, or (T * nz, ny, nx)
    for z-stacks of ``nz`` planes) at array-order starts ``(t, [z,] y, x)``; pixels
    outside are dropped.  ``nz = 0`` for 2D frames."""
    nt, ny, nx = image.shape
    for i in range(values.shape[0]):
        p = 0
        if nz == 0:
            t, y0, x0 = start[i, 0], start[i, 1], start[i, 2]
            for dy in range(shape[0]):
                y = y0 + dy
                for dx in range(shape[1]):
                    x = x0 + dx
                    if 0 <= y < ny and 0 <= x < nx:
                        image[t, y, x] += values[i, p]
                    p += 1
        else:
            t, z0, y0, x0 = start[i, 0], start[i, 1], start[i, 2], start[i, 3]
            for dz in range(shape[0]):
                z = z0 + dz
                for dy in range(shape[1]):
                    y = y0 + dy
                    for dx in range(shape[2]):
                        x = x0 + dx
                        if 0 <= z < nz and 0 <= y < ny and 0 <= x < nx:
                            image[t * nz + z, y, x] += values[i, p]
                        p += 1
    return image


#: a bucket of equally sized groups is fitted in windows of a few shapes rather than one
#: (:func:`shape_classes`) when a shape saves at least this many window pixels: each
#: window spans the largest box of its solve, and the fits' cost grows with its pixels
SHAPE_SAVING = 2000
#: at most this many shapes per bucket (a solve costs a few ms of overhead)
SHAPE_CLASSES = 6


def shape_classes(extent, saving=SHAPE_SAVING, most=SHAPE_CLASSES):
    """Split groups into solves of similar window shapes.

    The windows of one solve share one shape, the largest box among them
    (each group still sees its own box only: the others' extra pixels are
    masked, so the split changes no group's fit, only the pixels a solve
    runs over).  Groups are sorted by their box's longest side, then its
    pixels, and cut into at most ``most`` runs so as to minimise the pixels
    of all windows plus ``saving`` per extra solve (dynamic programming
    over cuts at up to 32 quantiles).

    Parameters
    ----------
    extent : (G, d) ndarray
        Box size of each group along each axis, px.
    saving : float
        Window pixels an extra solve must save.
    most : int
        Largest number of solves.

    Returns
    -------
    list of int ndarray
        Group indices of each solve (together each group once).
    """
    G = len(extent)
    area = np.prod(extent, axis=1)
    order = np.lexsort((area, extent.max(axis=1)))
    if G < 2 or most < 2 or np.ptp(area) * G < saving:
        return [order]
    ext = extent[order]
    cuts = np.unique(np.linspace(0, G, min(G, 32) + 1).astype(np.int64))
    m = len(cuts)
    cost = np.full((m, m), np.inf)  # cost[i, j]: one solve of groups cuts[i] .. cuts[j]
    for i in range(m - 1):
        top = np.maximum.accumulate(ext[cuts[i]:], axis=0)  # largest box from cuts[i] on
        n = cuts[i + 1:] - cuts[i]
        cost[i, i + 1:] = n * np.prod(top[n - 1], axis=1) + saving
    best = np.full((most + 1, m), np.inf)  # best[c, j]: groups 0 .. cuts[j] in c solves
    back = np.zeros((most + 1, m), np.int64)
    best[0, 0] = 0.0
    for c in range(1, most + 1):
        total = best[c - 1][:, None] + cost
        back[c] = np.argmin(total, axis=0)
        best[c] = total[back[c], np.arange(m)]
    c = int(np.argmin(best[:, m - 1]))
    out, j = [], m - 1
    while c > 0:
        i = back[c, j]
        out.append(order[cuts[i]:cuts[j]])
        j, c = i, c - 1
    return out[::-1]


def coverage(coords, shape, config) -> float:
    """How crowded a frame is: its candidates' number times the area (volume) of a
    disc (ball) of ``group_radius * sigma`` px, over the frame's area (volume).

    About the fraction of the frame within the grouping radius of a spot
    when spots do not overlap; above 1 in frames covered with spots.
    """
    r = config.group_radius * config.sigma
    if len(shape) == 3:
        rz = config.group_radius * config.axial_sigma()
        unit = 4.0 / 3.0 * np.pi * r * r * rz
    else:
        unit = np.pi * r * r
    return float(len(coords) * unit / max(int(np.prod(shape)), 1))


def reach(config, ndim: int = 2) -> dict:
    """How far, in pixels, the processing of a spot looks from it (for blockwise engines).

    A block of a frame processed on its own gives the whole frame's results
    for the spots in its interior when it is padded by at least ``halo``
    pixels of the frame along each axis.

    Parameters
    ----------
    config : spotfit.FitConfig
    ndim : int
        2 for images, 3 for z-stacks.

    Returns
    -------
    dict
        Per array axis (tuples of int, ``(y, x)`` or ``(z, y, x)``):

        ``detection``
            :func:`spotfit.detection.detection_halo`: the pixels that decide
            a candidate (local background, filter, ``min_distance``).
        ``fit``
            A spot's fit: its window, the residual search around it and the
            group it may join -- up to ``max_group`` spots each within
            ``group_radius * sigma`` of the next -- with its neighbours'
            windows.
        ``halo``
            The larger of the two, per axis: the padding a block needs.
    """
    import math

    from spotfit.detection import detection_halo

    sig = config.detection_sigma(ndim)
    sig = (sig,) * ndim if np.ndim(sig) == 0 else tuple(sig)
    det = detection_halo(sig, config.min_distance)
    half = config.half_size(ndim)
    chain = (max(config.max_group, 1) - 1) * config.group_radius
    fit = tuple(int(2 * h + math.ceil((chain + SEARCH_REACH) * s)) for h, s in zip(half, sig))
    return {"detection": tuple(int(v) for v in det), "fit": fit,
            "halo": tuple(max(a, b) for a, b in zip(det, fit))}


def _detection_threshold() -> float:
    from spotfit.detection import DEFAULT_THRESHOLD

    return DEFAULT_THRESHOLD


def _snr(spots) -> np.ndarray:
    """``intensity / intensity_err`` of each spot's last fit (0 where unknown)."""
    err = spots.rec["intensity_err"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return spots.intensity / np.where(err > 0, err, np.inf)


def _stack_or_none(maps, shape, fill):
    """Per-frame bool maps stacked (a frame without one gets ``fill``), or None if none has one."""
    if all(m is None for m in maps):
        return None
    return np.stack([np.asarray(m, bool) if m is not None else np.full(shape[1:], fill) for m in maps])


def n_groups(spots) -> int:
    """Number of groups in a :meth:`CrowdedFitter.fit_frames` result."""
    return int(spots.labels.max()) + 1 if len(spots) else 0


__all__ = ["group_spots", "CrowdedFitter", "MIN_EMITTER_SNR", "reach"]


def emitter_status(sol, idx, offset_index):
    """The solve's status of one emitter of joint fits (``idx``: its parameters), ``(G,)``;
    or of each of several (``idx`` ``(K, k_e)``: emitter ``i``'s in row ``i``), ``(G, K)``.

    The solver flags a whole window ``low_signal`` when the bias correction
    of any of its parameters is unstable (:func:`spotfit.solver.solve`); in
    a joint fit that is often one faint or unresolved emitter among bright
    ones.  The flag stays on the emitters whose own parameters (or the
    shared offset) are concerned; the others keep ``converged`` (their
    estimates are the plain MLE, and their own significance is judged by
    :func:`spotfit.results.low_signal`).
    """
    from spotfit._kernels import CONVERGED, LOW_SIGNAL

    idx = np.asarray(idx, np.int64)
    status = sol.status if idx.ndim == 1 else np.repeat(sol.status[:, None], len(idx), axis=1)
    if sol.unstable is None or not sol.unstable.any():
        return status
    cols = np.concatenate([idx, np.full(idx.shape[:-1] + (1,), offset_index)], axis=-1)
    own = sol.unstable[:, cols].any(axis=-1)
    some = sol.unstable.any(axis=1) if idx.ndim == 1 else sol.unstable.any(axis=1)[:, None]
    return np.where((status == LOW_SIGNAL) & some & ~own, CONVERGED, status).astype(status.dtype)
