"""Single-spot fits: one window per candidate, neighbours' pixels left out, all windows in one batched solve.

:func:`cut_frame` cuts the windows of (some of) a frame's candidates into a
:class:`Batch`; batches of several frames are joined (:meth:`Batch.join`)
and fitted in one call (:func:`fit_batch`), which returns their table rows.
A batch's results do not depend on what else is in it: every quantity that
is not per window (the image noise, the measured noise model of an
uncalibrated camera) is per frame.  :func:`frame_variance` measures a
frame's noise model up front when the frame is too large for one batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from spotfit import results, roi, solver, table
from spotfit.config import Setup
from spotfit.estimators import Noise
from spotfit._jit import join_alongside, over_windows
from spotfit._kernels import CONVERGED
from spotfit.detection import background_at
from spotfit.start import faint, initial_guess, intensity_floor

#: pixels within this many sigma of another candidate (and nearer to it than to
#: the window's own spot) are left out of a single-spot fit
NEIGHBOUR_REACH = 2.5
#: a fit is tried again over the detection's local background (its shape across
#: the window taken as known light, :func:`_over_background`) when its reduced
#: chi-square exceeds 1 by this many standard deviations, ...
MISFIT_CHI2 = 4.0
#: ... when its larger width exceeds this many PSF sigmas, or when it is not ``converged``
MISFIT_WIDTH = 1.2
#: a ``converged`` 2D fit whose window's detection background varies by more than
#: this many pixel-noise standard deviations (max - min over the window's corners and
#: edges' middles) ...
STRUCTURE = 1.5
#: ... and by more than this fraction of the spot's peak (less is mostly the light of
#: spots themselves in the background estimate: bright or unresolved neighbours) has
#: the background under it refined (:func:`_refine_background`) ...
STRUCTURE_PEAK = 0.04
#: ... in this many rounds of (kriging of the background, refit)
SURFACE_ROUNDS = 2
#: correlation length of the background's texture under a spot, in PSF sigmas
TEXTURE_SCALE = 2.0
#: window pixels fitted in one solve (bounds memory to a few (n, P) float64
#: arrays of this size: 32768 windows of 11 x 11 px)
PIXEL_BUDGET = 32768 * 121


@dataclass
class Batch:
    """Windows to fit, with what is known about each window's frame.

    Attributes
    ----------
    windows : spotfit.roi.Windows
    frame : (n,) int64 ndarray
        Frame index of each window.
    image_var : (n,) ndarray
        Pixel-noise variance of the window's frame (uncalibrated data;
        :func:`spotfit.start.image_noise`).
    saturated : (n,) bool ndarray
        The window's fitted pixels include one clipped at the input's maximum.
    variance : (n, 3) ndarray or None
        Measured noise model of each window's frame (uncalibrated, frames
        fitted in several batches; :func:`frame_variance`), else None:
        measured per frame within the batch.
    background : dict or None
        Frame index -> the detection's local background of that frame (a
        list of :class:`spotfit.detection.BackgroundPiece`), for the frames
        where it is known (:func:`_over_background`).
    """

    windows: roi.Windows
    frame: np.ndarray
    image_var: np.ndarray
    saturated: np.ndarray
    variance: np.ndarray | None = None
    background: dict | None = None

    def __len__(self):
        return len(self.windows)

    @staticmethod
    def join(batches) -> "Batch":
        """One batch of several (same window shape; all or none with ``variance``)."""
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        variance = None
        if batches[0].variance is not None:
            variance = np.concatenate([b.variance for b in batches])
        background = {}
        for b in batches:
            background.update(b.background or {})
        return Batch(roi.concatenate(b.windows for b in batches),
                     np.concatenate([b.frame for b in batches]),
                     np.concatenate([b.image_var for b in batches]),
                     np.concatenate([b.saturated for b in batches]), variance, background or None)


def batch_size(setup: Setup) -> int:
    """Windows per solve for ``setup``'s window shape (:data:`PIXEL_BUDGET`)."""
    pixels = int(np.prod([2 * h + 1 for h in setup.half]))
    return max(1, PIXEL_BUDGET // pixels)


def cut_frame(setup: Setup, t: int, photons, coords, image_var: float, rows=None, saturated=None,
              valid=None, read_var=None, variance=None, background=None) -> Batch:
    """Windows around candidates of one frame.

    Parameters
    ----------
    setup : Setup
    t : int
        Frame index.
    photons : (ny, nx) or (nz, ny, nx) ndarray
        The frame, in photons (or ADU above baseline).
    coords : (m, ndim) int ndarray
        All candidates of the frame, array order (neighbours are looked for
        among all of them).
    image_var : float
        Pixel-noise variance of the frame (:func:`spotfit.start.image_noise`).
    rows : index array, optional
        Candidates to cut windows for (default all).
    saturated, valid : bool ndarray of the frame's shape, optional
        Pixels clipped at the input's maximum; pixels to use (False: left
        out, e.g. a masked array's mask).
    read_var : ndarray of the frame's shape, optional
        Read-noise variance map (sCMOS).
    variance : (3,) ndarray, optional
        The frame's measured noise model (:func:`frame_variance`).
    background : list of spotfit.detection.BackgroundPiece, optional
        The frame's local background as detection estimated it
        (:func:`spotfit.detection.find_peaks`' ``backgrounds``): misfits are
        tried again over it (:func:`_over_background`).

    Returns
    -------
    Batch
    """
    centers = coords if rows is None else coords[rows]
    w = roi.cut(photons, centers, setup.half, read_var=read_var, valid=valid)
    roi.mask_neighbours(w, centers, NEIGHBOUR_REACH * setup.config.sigma, others=coords)
    n = len(w)
    sat = np.zeros(n, bool)
    if saturated is not None:
        s = roi.cut(saturated, centers, setup.half, dtype=bool)
        sat = np.any(s.data & w.mask, axis=1)
    var = None if variance is None else np.broadcast_to(np.asarray(variance, float), (n, 3))
    known = None if not background else {int(t): list(background)}
    return Batch(w, np.full(n, t, dtype=np.int64), np.full(n, float(image_var)), sat, var, known)


def cut_frames(setup: Setup, frames, read_var=None) -> Batch:
    """:func:`cut_frame` of all candidates of ``frames`` (objects with ``t``,
    ``photons``, ``coords``, ``image_var``, ``valid`` and ``saturated``, all of one
    shape) in one cut: the same windows, in frame order (a frame's candidates
    in their order), without their frames' measured noise models.

    Small frames (single-molecule movies) are cut together: per frame, the
    cutting cost more than its few windows.
    """
    frames = [f for f in frames if len(f.coords)]
    if not frames:
        return cut_frame(setup, 0, np.zeros((1,) * setup.ndim), np.zeros((0, setup.ndim), np.int64), 0.0)
    sizes = [len(f.coords) for f in frames]
    t = np.repeat(np.arange(len(frames)), sizes)
    stack = np.stack([f.photons for f in frames]) if len(frames) > 1 else frames[0].photons[None]

    def maps(name, fill):
        if all(getattr(f, name) is None for f in frames):
            return None
        return np.stack([np.full(f.photons.shape, fill) if getattr(f, name) is None else
                         np.asarray(getattr(f, name), bool) for f in frames])

    valid, saturated = maps("valid", True), maps("saturated", False)
    centers = np.concatenate([np.asarray(f.coords, np.int64) for f in frames])
    half = np.asarray(setup.half, np.int64)
    start = np.column_stack([t, centers - half])
    shape = (1,) + tuple(int(2 * h + 1) for h in half)
    rv = None if read_var is None else np.broadcast_to(read_var, stack.shape)
    w = roi.cut_box(stack, start, shape, read_var=rv, valid=valid)
    w = roi.Windows(w.data, w.mask, w.origin[:, : setup.ndim], roi.Grid(shape[1:]), w.read_var)
    roi.mask_neighbours(w, centers, NEIGHBOUR_REACH * setup.config.sigma, frames=t)
    sat = np.zeros(len(w), bool)
    if saturated is not None:
        s = roi.cut_box(saturated, start, shape, dtype=bool)
        sat = np.any(s.data & w.mask, axis=1)
    return Batch(w, np.repeat(np.array([f.t for f in frames], np.int64), sizes),
                 np.repeat(np.array([float(f.image_var) for f in frames]), sizes), sat)


def frame_variance(setup: Setup, photons, coords, image_var: float, valid=None) -> np.ndarray:
    """The measured noise model ``(alpha, beta, floor)`` of an uncalibrated frame.

    Fits the windows :func:`spotfit.solver.regression_rows` picks among all
    of the frame's candidates, as :func:`fit_batch` would within one batch,
    so a frame fitted in several batches gets the same errors as in one.
    """
    rows = solver.regression_rows(np.zeros(len(coords), np.int64))
    batch = cut_frame(setup, 0, photons, coords, image_var, rows=rows, valid=valid)
    first = _reduced(setup) if _selects(setup) else setup  # the fits that measure it in fit_batch
    return _solve(first, batch).variance[0]


def window_bounds(model, estimator, windows: roi.Windows, floor=None):
    """Box constraints ``(n, k)`` of each window's fit.

    The model's bounds (:meth:`~spotfit.models.Model.bounds`); with an
    estimator declaring ``nonnegative_offset`` the offset cannot go negative
    (a Poisson rate); intensities stay above :func:`spotfit.start.intensity_floor`
    (relative to the window's data); in border-truncated windows each centre stays within
    half a pixel of the image, where the data can still constrain it.  ``floor``: the
    windows' :func:`spotfit.start.intensity_floor`, when the caller has it already.
    """
    lower, upper = model.bounds(windows.grid)
    if estimator.nonnegative_offset:
        lower[model.offset_index] = 0.0
    first, last = windows.valid_extent()
    lower = np.repeat(lower[None], len(windows), axis=0)
    upper = np.repeat(upper[None], len(windows), axis=0)
    if floor is None:  # relative to the data: any unit
        floor = intensity_floor(windows.data, windows.mask)
    for i in range(model.n_emitters):
        lower[:, model.emitter_index(i, "intensity")] = floor
    for i in range(model.n_emitters):
        for j, axis in enumerate(("x", "y", "z")[: model.ndim]):
            index = model.emitter_index(i, axis)
            lower[:, index] = np.maximum(lower[:, index], first[:, j] - 0.5)
            upper[:, index] = np.minimum(upper[:, index], last[:, j] + 0.5)
    return lower, upper


def width_limits(model, grid):
    """Bounds of the widths along ``x, y[, z]`` (:meth:`~spotfit.models.Model.bounds`:
    0.3 px to half the window, the rotated model's variances bounded alike)."""
    n = model.ndim
    return (0.3,) * n, (float(max(grid.shape)) / 2.0,) * n


def _solve(setup: Setup, batch: Batch):
    return solver.finish(_minimise(setup, batch), groups=batch.frame, variance=batch.variance)


def _minimise(setup: Setup, batch: Batch) -> solver.Minimised:
    """The fits of :func:`_solve` before their covariance (:func:`spotfit.solver.minimise`)."""
    m, cfg, w = setup.model, setup.config, batch.windows
    setup.use_threads()
    theta0, lower, upper, hold = _starts(setup, batch)
    widths = m.width_mask
    free = ~widths if cfg.fix_sigma else np.ones(m.n_params, bool)
    return solver.minimise(m, setup.estimator, w.data, w.mask, w.grid, theta0, noise=setup.noise(w.read_var),
                           lower=lower, upper=upper, free=free, max_iter=cfg.max_iter,
                           hold_first=None if cfg.fix_sigma else widths, hold_rows=hold, active_set=True)


#: windows per block of a solve's starting values and bounds (:func:`_starts`); the
#: blocks of a batch of two blocks or more run on the kernel threads
START_BLOCK = 1024


def _starts(setup: Setup, batch: Batch):
    """Starting values (:func:`spotfit.start.initial_guess`), bounds (:func:`window_bounds`)
    and which fits first hold their widths (:func:`spotfit.start.faint`) of ``batch``'s
    windows: per window, so computed in blocks of :data:`START_BLOCK` windows side by
    side (:func:`spotfit._jit.over_windows`) for large batches."""
    m, cfg, w = setup.model, setup.config, batch.windows

    def block(rows):
        sub = roi.Windows(w.data[rows], w.mask[rows], w.origin[rows], w.grid,
                          None if w.read_var is None else w.read_var[rows])
        floor = intensity_floor(sub.data, sub.mask)  # (both need it)
        theta0 = initial_guess(m, sub.data, sub.mask, sub.grid, cfg, floor=floor)
        lower, upper = window_bounds(m, setup.estimator, sub, floor=floor)
        return theta0, lower, upper, faint(m, theta0, cfg.sigma, setup.camera.calibrated,
                                           batch.image_var[rows])

    n = len(batch)
    blocks = -(-n // START_BLOCK)
    if blocks < 2:
        return block(slice(None))
    out = [None] * blocks

    def run(first, last):
        for k in range(first, last):
            out[k] = block(slice(k * START_BLOCK, min(n, (k + 1) * START_BLOCK)))

    over_windows(run, blocks, threaded=True)
    return tuple(np.concatenate([o[i] for o in out]) for i in range(4))


def fit_batch(setup: Setup, batch: Batch, choose_width=None, settled=None):
    """Fit every window of ``batch`` in one compiled, parallel solve; return its table rows.

    With ``config.select_model`` (default) and a model richer than the
    symmetric one (``rotated``, ``elliptical``; not with ``fix_sigma``), the
    model is chosen per spot by the data (:func:`_fit_selected`).

    Parameters
    ----------
    setup : Setup
    batch : Batch
    choose_width : float or (n,) ndarray, optional
        With model choice: windows whose symmetric fit converged narrower
        than this (px) keep it without a choice (the crowded-field fits
        need only a grouped candidate's widths when it may be a blob,
        :func:`spotfit.fields.fit_dense`).  Default: every window is chosen
        for.
    settled : callable, optional
        With model choice: ``settled(values, chi2, status) -> (n,) bool`` of the
        symmetric fits' columns (:func:`_columns`; the same rule for each window, on its
        own fit): windows it marks keep the symmetric fit without a choice too (the
        crowded-field fits replace a fit that is already a suspect,
        :func:`spotfit.fields.settled_by_symmetric`).

    Returns
    -------
    spotfit.lighttable.LightTable
        Columns of :func:`spotfit.table.columns`, one row per window (no pandas:
        :func:`spotfit.lighttable.as_frame` makes it a DataFrame).
    """
    if in_pieces(setup, len(batch)):
        return _select_in_pieces(setup, batch, choose_width, settled)
    measured = {}
    columns = _fit_columns(setup, batch, measured, choose_width, settled)
    return _finish(setup, batch, columns, measured.get("variance"))


def _finish(setup: Setup, batch: Batch, columns, variance=None):
    """The table rows of ``batch`` from the columns of its fits: misfits tried again over
    the detection's background (:func:`_over_background`, :func:`_refine_background`)."""
    values, errors, chi2, iterations, status = columns
    if batch.background:
        columns = _over_background(setup, batch, values, errors, chi2, iterations, status, variance)
        values, errors, chi2, iterations, status = _refine_background(setup, batch, *columns, variance)
    return table.build(batch.frame, values, errors, chi2, iterations, results.status_names(status),
                       setup.camera.unit, setup.ndim, light=True)


#: a batch of at least this many windows (model chosen per spot) has what follows its
#: symmetric solve done in one piece per thread side by side (:func:`_select_in_pieces`)
PIECE_WINDOWS = 4096


def in_pieces(setup: Setup, n: int) -> bool:
    """Whether :func:`fit_batch` fits a batch of ``n`` windows in pieces side by side
    (:func:`_select_in_pieces`; an :class:`Uncut` batch only then)."""
    return _selects(setup) and n >= PIECE_WINDOWS and _threads_free()


@dataclass
class Uncut:
    """The windows of a frame's candidates ``coords``, cut piece by piece where they
    are fitted (:func:`_select_in_pieces`, :meth:`piece`) instead of all at once;
    arguments as :func:`cut_frame`'s (``cut``: its keyword arguments)."""

    setup: Setup
    t: int
    photons: np.ndarray
    coords: np.ndarray
    image_var: float
    cut: dict
    #: jobs (callables) run on the threads beside the pieces' first round
    beside: tuple = ()

    def __post_init__(self):
        self.frame = np.full(len(self.coords), self.t, dtype=np.int64)
        self.variance = self.cut.get("variance")
        known = self.cut.get("background")
        self.background = None if not known else {int(self.t): list(known)}

    def __len__(self):
        return len(self.coords)

    def piece(self, first: int, last: int) -> Batch:
        """The batch of windows ``first .. last`` (:func:`cut_frame`)."""
        return cut_frame(self.setup, self.t, self.photons, self.coords, self.image_var,
                         rows=np.arange(first, last), **self.cut)


def _piece(batch, first: int, last: int) -> Batch:
    """Windows ``first .. last`` of a :class:`Batch` or an :class:`Uncut` one."""
    return batch.piece(first, last) if isinstance(batch, Uncut) else _take(batch, slice(first, last))


def _threads_free() -> bool:
    """More than one kernel thread, and this call not inside a range of
    :func:`spotfit._jit.over_windows` (whose other threads are busy)."""
    from spotfit import _jit

    return _jit.kernel_threads() > 1 and not getattr(_jit._WORKING, "on", False)


def _select_in_pieces(setup: Setup, batch: Batch, choose_width=None, settled=None):
    """:func:`fit_batch` with the model chosen per spot, in one piece of consecutive
    windows per thread, side by side (:func:`spotfit._jit.over_windows`), in two
    rounds: the symmetric fits (:func:`spotfit.solver.minimise`; of an :class:`Uncut`
    batch, the piece's windows are cut there first); then, after an
    uncalibrated batch's noise model per frame is measured from the pieces' regression
    windows (:func:`spotfit.solver.noise_sums`, :func:`~spotfit.solver.noise_model`),
    the rest -- covariances, columns, score gate and test, richer fits, refits over
    the background, table rows.  Each window's fit depends on its window, and the rest
    on its fit and its frame's noise model only, so the rows are those of one piece."""
    from spotfit._jit import kernel_threads
    from spotfit.lighttable import concat

    setup.use_threads()
    reduced = _reduced(setup)
    n = len(batch)
    pieces = min(2 * kernel_threads(), n)  # two per thread: the pieces' work varies
    bounds = [(k * n // pieces, (k + 1) * n // pieces) for k in range(pieces)]
    subs = [None] * pieces
    measure = not setup.camera.calibrated and batch.variance is None
    regression = solver.regression_rows(batch.frame) if measure else None
    fits, sums, out = [None] * pieces, [None] * pieces, [None] * pieces
    beside = getattr(batch, "beside", ())

    def minimise(first, last):
        for k in range(first, last):
            if k >= pieces:
                beside[k - pieces]()
                continue
            subs[k] = _piece(batch, *bounds[k])
            fits[k] = _minimise(reduced, subs[k])

    def rest(first, last):
        for k in range(first, last):
            a, b = bounds[k]
            sub = subs[k]
            sub.background = batch.background
            sol = solver.finish(fits[k], groups=sub.frame, variance=variance[a:b] if measure else sub.variance)
            width = choose_width[a:b] if np.ndim(choose_width) else choose_width
            out[k] = _finish(setup, sub, _select(setup, reduced, sub, sol, width, settled), sol.variance)

    over_windows(minimise, pieces + len(beside), threaded=True)
    # here, not in the pieces' threads: a first run may compile the covariance kernel in a
    # second process, which this thread waits for once (spotfit._jit.join_alongside)
    join_alongside()
    variance = None
    if measure:  # (each piece's statistics on the threads)
        for k, (a, b) in enumerate(bounds):
            sums[k] = solver.noise_sums(fits[k], regression[(regression >= a) & (regression < b)] - a)
        variance = solver.noise_model(batch.frame, np.concatenate(sums))
    over_windows(rest, pieces, threaded=True)
    return concat(out)


def _fit_columns(setup: Setup, batch: Batch, measured=None, choose_width=None, settled=None):
    """Columns of :func:`_columns` of ``batch``'s fits (model chosen per spot if configured,
    ``choose_width`` and ``settled`` as :func:`fit_batch`); ``measured["variance"]``: the
    noise model measured per window's frame (uncalibrated)."""
    if _selects(setup):
        return _fit_selected(setup, batch, measured, choose_width, settled)
    sol = _solve(setup, batch)
    if measured is not None:
        measured["variance"] = sol.variance
    return _columns(setup, batch, sol)


def window_background(batch: Batch, rows, pixels=None) -> np.ndarray:
    """The detection's local background at every pixel of windows ``rows`` (``(m, P)``; NaN
    where a window's frame has none), frame units; ``pixels``: only at these (flat
    indices into the window, ``(m, len(pixels))``)."""
    w = batch.windows
    nd = w.grid.ndim
    offsets = np.indices(w.grid.shape).reshape(nd, -1)  # array order
    if pixels is not None:
        offsets = offsets[:, pixels]
    out = np.full((len(rows), offsets.shape[1]), np.nan)
    frames = batch.frame[rows]
    for t, pieces in (batch.background or {}).items():
        mine = np.flatnonzero(frames == t)
        if len(mine) == 0:
            continue
        # pixel indices in array order (pixels outside the frame are masked)
        index = [w.origin[rows[mine], nd - 1 - a][:, None] + offsets[a][None, :] for a in range(nd)]
        out[mine] = background_at(pieces, index)
    return out


def _over_background(setup: Setup, batch: Batch, values, errors, chi2, iterations, status, variance=None):
    """Misfits tried again with the local background's shape across the window as known light.

    A spot on a cell's edge, a nucleus' rim or an illumination gradient sits
    on a background that is not flat across its window; a Gaussian plus a
    constant offset then leans towards the brighter side (wider, brighter,
    off-centre).  Detection has estimated that background (it follows
    cells, nuclei and illumination, not spots: :mod:`spotfit.background`).
    Each fit that misfits (reduced chi-square above ``1 + MISFIT_CHI2 *
    sqrt(2 / dof)``, a width above ``MISFIT_WIDTH`` sigmas, or not
    ``converged``) is fitted again with ``b_i - min(b)`` (``b`` the
    background at the window's pixels) added to the model as known light:
    it is taken out of the data and added to the noise variance (with
    ``mle`` this is exactly the Poisson likelihood of the data given the
    model plus that light: ``d + read_var`` is Poisson with mean
    ``mu + read_var``).  The fitted offset is the rest of the background
    (its level at the window's lowest point).  The refit replaces the first
    fit when it is ``converged`` and its reduced chi-square is lower (or the
    first was not ``converged``): same pixels, same number of parameters.
    Its ``offset`` is reported as the background under the detected pixel
    (the fitted level plus the known light there).  Uncalibrated data keep
    the noise model measured on all of the frame's fits (``variance``).
    """
    m, cfg = setup.model, setup.config
    dof = np.prod([2 * h + 1 for h in setup.half]) - m.n_params
    limit = 1.0 + MISFIT_CHI2 * np.sqrt(2.0 / max(dof, 1))
    widths = [values[c] for c in ("sigma_x", "sigma_y", "sigma_z")[:setup.ndim]]
    big = np.max([wd / s for wd, s in zip(widths, setup.widths)], axis=0)
    known = np.isin(batch.frame, np.fromiter(batch.background, np.int64))
    rows = np.flatnonzero(known & (~(chi2 <= limit) | (big > MISFIT_WIDTH) | (status != CONVERGED)))
    if len(rows) == 0:
        return values, errors, chi2, iterations, status
    bg = window_background(batch, rows)
    light = _known_light(batch.windows.mask[rows], bg)
    v2, e2, c2, i2, s2 = _fit_over(setup, batch, rows, light, variance)
    better = (s2 == CONVERGED) & ((c2 < chi2[rows]) | (status[rows] != CONVERGED))
    return _replace(rows, better, light, (values, errors, chi2, iterations, status), (v2, e2, c2, i2, s2))


def _known_light(mask, surface) -> np.ndarray:
    """``surface - min(surface)`` over each window's fitted pixels (0 elsewhere, and
    where ``surface`` is NaN): light taken as known, the rest is the fitted offset."""
    mask = mask & np.isfinite(surface)
    low = np.min(np.where(mask, surface, np.inf), axis=1)
    return np.where(mask, surface - np.where(np.isfinite(low), low, 0.0)[:, None], 0.0)


def _fit_over(setup: Setup, batch: Batch, rows, light, variance=None):
    """Columns of the fits of windows ``rows`` with ``light`` ``(m, P)`` as known light:
    taken out of the data, its shot noise added to the read variance (calibrated data;
    uncalibrated data keep the noise model ``variance`` measured on the frame's fits)."""
    sub = _take(batch, rows, None if setup.camera.calibrated or variance is None else variance[rows])
    sub.background = None
    sub.windows.data = np.where(sub.windows.mask, sub.windows.data - light, 0.0)
    if setup.camera.calibrated:  # the known light's shot noise
        rv = setup.camera.read_variance() if sub.windows.read_var is None else sub.windows.read_var
        sub.windows.read_var = rv + light
    return _fit_columns(setup, sub)


def _replace(rows, better, light, columns, refit):
    """``columns`` (values, errors, chi2, iterations, status) with rows ``rows[better]``
    taken from ``refit`` (columns of ``rows``); a refit's offset is reported as the
    background under the detected pixel (its fitted level plus the known light there)."""
    values, errors, chi2, iterations, status = columns
    v2, e2, c2, i2, s2 = refit
    if not better.any():
        return values, errors, chi2, iterations, status
    take = rows[better]
    values = {key: np.array(v, dtype=float) for key, v in values.items()}
    errors = {key: np.array(v, dtype=float) for key, v in errors.items()}
    for key in v2:
        values[key][take], errors[key][take] = v2[key][better], e2[key][better]
    values["offset"][take] += light[better, light.shape[1] // 2]  # the detected pixel
    chi2, iterations, status = chi2.copy(), iterations.copy(), status.copy()
    chi2[take], iterations[take], status[take] = c2[better], i2[better], s2[better]
    return values, errors, chi2, iterations, status


def _refine_background(setup: Setup, batch: Batch, values, errors, chi2, iterations, status, variance=None):
    """Spots over textured background: the background under each estimated from around it.

    Over textured cells (nuclei, cytoplasm, illumination) the background
    changes within a spot's window on the scale of the PSF, and detection's
    local background ``b`` (smooth over ~3 PSF sigmas,
    :mod:`spotfit.background`) follows it only in part: what is left leans
    the fit towards the brighter side.  Each ``converged`` 2D fit whose
    window's ``b`` varies by more than :data:`STRUCTURE` pixel-noise standard
    deviations and by more than :data:`STRUCTURE_PEAK` of the spot's peak has
    the rest of its background estimated from the window's own pixels,
    :data:`SURFACE_ROUNDS` times: the fitted spot is
    taken out of the data, and what is left minus ``b`` on the pixels more
    than 2 PSF sigmas from the spot's centre is interpolated under the spot
    by kriging (:func:`_texture`): a free quadratic surface plus a texture
    of Gaussian correlation :data:`TEXTURE_SCALE` PSF sigmas, its variance
    measured on those pixels, under pixel noise.  The spot is fitted again
    with ``b`` plus that estimate (minus its minimum) as known light
    (:func:`_fit_over`, a constant offset still free); the second round
    starts from the refit (its centre, its tails).  The result replaces the
    fit when ``converged`` (which rows are ``converged`` does not change).
    The reported errors of ``x``, ``y``, ``intensity`` and ``offset`` add
    the uncertainty of that interpolated background
    (:func:`_texture_inflation`).  Spots on flat background and z-stacks
    keep their fits.
    """
    if setup.ndim != 2 or not batch.background:
        return values, errors, chi2, iterations, status
    w = batch.windows
    known = np.isin(batch.frame, np.fromiter(batch.background, np.int64))
    rows = np.flatnonzero(known & (status == CONVERGED))
    if len(rows) == 0:
        return values, errors, chi2, iterations, status
    # the background's spread over the window, from its corners and edges' middles (the
    # detection's background is smooth on that scale)
    ny, nx = w.grid.shape
    probe = np.delete((np.array([0, ny // 2, ny - 1])[:, None] * nx + np.array([0, nx // 2, nx - 1])[None, :]).ravel(), 4)
    level = window_background(batch, rows, probe)
    level = np.where(w.mask[rows][:, probe], level, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window without any probe: no spread
        spread = np.nanmax(level, axis=1) - np.nanmin(level, axis=1)
        noise = np.sqrt(_pixel_variance(setup, batch, rows, np.nanmean(level, axis=1)))
    A = _surface_basis(w.grid)
    peak = values["intensity"][rows] / (2.0 * np.pi * values["sigma_x"][rows] * values["sigma_y"][rows])
    busy = (spread > STRUCTURE * noise) & (spread > STRUCTURE_PEAK * peak) & \
        (w.mask[rows].sum(axis=1) >= 2 * A.shape[1])
    rows = rows[busy]
    if len(rows) == 0:
        return values, errors, chi2, iterations, status
    bg = window_background(batch, rows)
    mask = w.mask[rows] & np.isfinite(bg)
    bg = np.where(mask, bg, 0.0)
    current = {key: v[rows] for key, v in values.items()}
    for _ in range(SURFACE_ROUNDS):
        spot = _spot_light(setup, w, rows, current)
        var = _pixel_variance(setup, batch, rows, bg + spot)
        q, amplitude = _texture(setup, w, rows, current, w.data[rows] - spot - bg, var, mask, A)
        light = _known_light(mask, bg + q)
        refit = _fit_over(setup, batch, rows, light, variance)
        ok = refit[4] == CONVERGED
        for key in current:
            current[key] = np.where(ok, refit[0][key], current[key])
    v2, e2, c2, i2, s2 = refit
    factor = _texture_inflation(setup, batch, rows, v2, light, mask, amplitude, A)
    for key in ("x", "y", "intensity", "offset"):
        e2[key] = e2[key] * factor[key]
    return _replace(rows, s2 == CONVERGED, light, (values, errors, chi2, iterations, status),
                    (v2, e2, c2, i2, s2))


#: kriging: the free surface's coefficients have this prior variance (effectively unbounded)
_FREE = 1e6


def _texture_covariance(setup: Setup, grid) -> np.ndarray:
    """``(P, P)``: the correlation of the texture between a window's pixels
    (Gaussian, :data:`TEXTURE_SCALE` PSF sigmas)."""
    x, y = grid.flat()[:2]
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    scale = TEXTURE_SCALE * setup.config.sigma
    return np.exp(-d2 / (2.0 * scale * scale))


def _texture(setup: Setup, w, rows, values, residual, var, mask, A):
    """Kriging of the background left in windows ``rows`` (``residual``: data minus spot minus
    detection's background, ``(m, P)``; ``var``: pixel variance) from the pixels more than 2
    PSF sigmas from the fitted centre: a free quadratic surface (``A``, prior variance
    :data:`_FREE`) plus a texture of correlation :func:`_texture_covariance`, whose
    variance ``s2`` is measured on those pixels (mean of ``residual^2 - var``, at least 0).
    Returns the estimate at every pixel ``(m, P)`` and ``s2`` ``(m,)``."""
    x, y = w.grid.flat()[:2]
    cx = values["x"] - w.origin[rows, 0]
    cy = values["y"] - w.origin[rows, 1]
    far = mask & (np.hypot(x[None, :] - cx[:, None], y[None, :] - cy[:, None]) > 2.0 * setup.config.sigma)
    residual = np.where(mask, residual, 0.0)
    s2 = np.maximum(np.sum(np.where(far, residual ** 2 - var, 0.0), axis=1) / np.maximum(far.sum(axis=1), 1), 0.0)
    R = _texture_covariance(setup, w.grid)
    F = _FREE * (A @ A.T)
    z = _far_solve(s2, R, F, var, far, residual[:, :, None])[:, :, 0]
    # K z (R and F symmetric), window by window (one product of all windows' rows would
    # give a window bits that depend on how many windows share it)
    out = s2[:, None] * (z[:, None, :] @ R)[:, 0] + (z[:, None, :] @ F)[:, 0]
    return out, s2


def _far_solve(s2, R, F, noise, far, rhs) -> np.ndarray:
    """Solutions ``z (n, P, m)`` of ``(s2 R + F + N) z = rhs`` in each window, ``N`` the
    pixel noise ``noise`` on its ``far`` pixels and unbounded on the others: the
    system of the far pixels, 0 on the others (:func:`spotfit._kernels.far_solve`, on
    threads).  ``s2 (n,)``; ``R, F (P, P)`` symmetric; ``noise, far (n, P)``; ``rhs
    (n, P, m)``.  A window whose far block is not positive definite to working
    precision (not seen: ``noise > 0``) is solved by least squares."""
    from spotfit._jit import over_windows
    from spotfit._kernels import far_solve

    n = len(s2)
    out = np.empty(rhs.shape)
    f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    over_windows(far_solve, n, f64(R), f64(F), f64(s2), f64(noise), np.ascontiguousarray(far, dtype=bool),
                 f64(rhs), out)
    for i in np.flatnonzero(~np.isfinite(out).all(axis=(1, 2))):
        f = np.flatnonzero(far[i])
        out[i] = 0.0
        block = s2[i] * R[np.ix_(f, f)] + F[np.ix_(f, f)] + np.diag(noise[i, f])
        out[i, f] = np.linalg.lstsq(block, rhs[i, f], rcond=None)[0]
    return out


def _texture_inflation(setup: Setup, batch: Batch, rows, values, light, mask, s2, A) -> dict:
    """Error factors of ``x, y, intensity, offset`` for the uncertainty of the background
    taken as known light: ``sqrt(diag(C0 + G S G^T) / diag(C0))`` with ``C0 = (J^T N^-1 J)^-1``
    the Cramer-Rao covariance of the spot's parameters (``J`` the model's Jacobian, ``N``
    the pixel variance of the model plus the known light), ``G = C0 J^T N^-1`` how an error
    of the known light moves them, and ``S`` the covariance of the kriged background
    (:func:`_texture`) given the pixels away from the spot; the surface's constant is left
    out of ``S`` (it is the fitted offset)."""
    w = batch.windows
    model, theta = _spot_params(setup, w, rows, values)
    theta[:, -1] = values["offset"]  # the fitted level (before the known light is added back)
    mu, jac = _jacobian(model, theta, w.grid)
    inv_var = np.where(mask, 1.0 / _pixel_variance(setup, batch, rows, mu + light), 0.0)
    x, y = w.grid.flat()[:2]
    cx = values["x"] - w.origin[rows, 0]
    cy = values["y"] - w.origin[rows, 1]
    far = mask & (np.hypot(x[None, :] - cx[:, None], y[None, :] - cy[:, None]) > 2.0 * setup.config.sigma)
    R = _texture_covariance(setup, w.grid)
    F = _FREE * (A[:, 1:] @ A[:, 1:].T)
    k = jac.shape[1]
    JN = jac * inv_var[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        fisher = np.einsum("nip,njp->nij", JN, jac)
        fisher += 1e-12 * np.trace(fisher, axis1=1, axis2=2)[:, None, None] * np.eye(k)
        C0 = np.linalg.inv(fisher)
        G = np.einsum("nij,njp->nip", C0, JN)
        # diag(G S G^T), S = K - K (K + noise)^-1 K, with k right-hand sides instead of P
        KG = s2[:, None, None] * (G @ R) + G @ F  # (n, k, P): the rows of K G^T (R, F symmetric)
        noise = 1.0 / np.maximum(inv_var, 1e-30)
        solved = _far_solve(s2, R, F, noise, far, KG.transpose(0, 2, 1))  # (n, P, k)
        extra = np.einsum("nip,nip->ni", G, KG) - np.einsum("nip,npi->ni", KG, solved)
        r = 1.0 + extra / np.diagonal(C0, axis1=1, axis2=2)
    ratio = np.where(np.isfinite(r), np.maximum(r, 1.0), 1.0)
    ratio = np.sqrt(ratio)
    return {name: ratio[:, model.index(name)] for name in ("x", "y", "intensity", "offset")}


def _jacobian(model, theta, grid):
    """``model``'s values ``(n, P)`` and Jacobian ``(n, k, P)`` at ``theta`` by central
    differences of :meth:`~spotfit.models.Model.value` (the kernel every fit compiles;
    relative error ~1e-8, ample for error factors)."""
    mu = model.value(theta, grid)
    n, k = theta.shape
    step = 1e-4 * np.maximum(np.abs(theta), 1.0)
    shifted = np.repeat(theta[:, None, :], 2 * k, axis=1)
    j = np.arange(k)
    shifted[:, 2 * j, j] += step
    shifted[:, 2 * j + 1, j] -= step
    v = model.value(shifted.reshape(n * 2 * k, k), grid).reshape(n, k, 2, -1)
    return mu, (v[:, :, 0] - v[:, :, 1]) / (2.0 * step[:, :, None])


def _surface_basis(grid) -> np.ndarray:
    """``(P, 6)``: the monomials of x, y up to degree 2 (1 first) at the pixels of a 2D
    window, x and y centred on the window and scaled to [-1, 1]."""
    x, y = grid.flat()[:2]
    x = (x - np.mean(x)) / max(np.ptp(x) / 2, 1.0)
    y = (y - np.mean(y)) / max(np.ptp(y) / 2, 1.0)
    return np.column_stack([x ** i * y ** (d - i) for d in range(3) for i in range(d, -1, -1)])


def _pixel_variance(setup: Setup, batch: Batch, rows, level) -> np.ndarray:
    """Pixel variance at expected ``level`` (frame units; ``(m,)`` or ``(m, P)``) in
    windows ``rows`` of ``batch``: the camera's noise model, or for uncalibrated
    data relative weights (the frame's pixel noise plus the level)."""
    level = np.asarray(level, float)
    if setup.camera.calibrated:
        rv = batch.windows.read_var
        if rv is not None and level.ndim == 1:  # sCMOS map: its mean over each window
            return setup.noise(rv[rows].mean(axis=1)).variance(level)
        return setup.noise(None if rv is None else rv[rows]).variance(level)
    shape = (len(rows),) + (1,) * (level.ndim - 1)
    return np.maximum(batch.image_var[rows].reshape(shape), 1e-12) + np.maximum(level, 0.0)


def _spot_params(setup: Setup, w, rows, values):
    """The rotated model (pixel integration as ``setup``'s) and its parameters, offset 0,
    for fitted columns ``values`` of windows ``rows``."""
    from spotfit.models import get_model

    model = get_model("rotated", 2, setup.model.integrated)
    sx, sy, a = values["sigma_x"], values["sigma_y"], np.nan_to_num(values["angle"])
    c, s = np.cos(a), np.sin(a)
    theta = np.column_stack([values["intensity"], values["x"] - w.origin[rows, 0], values["y"] - w.origin[rows, 1],
                             (sx * c) ** 2 + (sy * s) ** 2, (sx * s) ** 2 + (sy * c) ** 2,
                             (sx * sx - sy * sy) * s * c, np.zeros(len(rows))])
    return model, theta


def _spot_light(setup: Setup, w, rows, values) -> np.ndarray:
    """``(m, P)``: the fitted spots' light (no offset) in windows ``rows``."""
    model, theta = _spot_params(setup, w, rows, values)
    return model.value(theta, w.grid)


def _columns(setup: Setup, batch: Batch, sol):
    """Output columns, their errors, reduced chi-square, iterations and status of a solve."""
    m, cfg, w = setup.model, setup.config, batch.windows
    values, errors = results.measure(m, sol.theta, sol.cov, w.origin)
    outside = ~w.inside(sol.theta[:, list(m.center_index)])

    def expected(rows):
        rv = None if w.read_var is None else w.read_var[rows]
        noise = setup.noise(rv)
        if not noise.calibrated:  # constant pixel variance (ADU^2) of each window's frame
            noise = Noise(calibrated=False, excess=0.0,
                          read_var=np.maximum(batch.image_var[rows], 1e-12)[:, None])
        centres = sol.theta[rows][:, list(m.center_index)]
        return results.expected_snr(m, w.data[rows], w.mask[rows], w.grid, centres, setup.widths, noise)

    low = results.low_signal(values["intensity"], errors["intensity"], cfg.min_snr,
                             expected=None if cfg.fix_sigma else expected)
    limits = width_limits(m, w.grid)
    wide = results.not_spot(values, setup.widths, *limits)
    collapsed = results.collapsed(values, limits[0])
    status = results.judge(sol.status, outside, low, batch.saturated, wide, collapsed)
    return values, errors, sol.chi2_red, sol.iterations, status


# ------------------------------------------------------------ model choice
def _selects(setup: Setup) -> bool:
    cfg = setup.config
    return bool(cfg.select_model) and not cfg.fix_sigma and setup.model.name != "symmetric"


def _reduced(setup: Setup) -> Setup:
    """``setup`` with the symmetric model of the same dimensions and pixel integration."""
    from spotfit.models import get_model

    return replace(setup, model=get_model("symmetric", setup.ndim, setup.model.integrated,
                                          sigma=setup.config.sigma))


def _embedding(reduced, full):
    """``embed(theta)``: symmetric parameters as the richer model's (equal widths, angle 0)."""
    widths = [reduced.index(name) for name in reduced.axis_widths]

    def embed(theta):
        return full.from_moments(theta[:, list(reduced.center_index)], theta[:, widths],
                                 theta[:, reduced.intensity_index], theta[:, reduced.offset_index])
    return embed


#: the score test (:func:`spotfit.solver.score_test`) runs on the 2D symmetric fits whose
#: quadrupole score (:func:`_quadrupole_score`) exceeds this fraction of the test's
#: threshold, ...
SCORE_GATE = 0.25
#: ... or whose window has fewer than this fraction of its pixels (neighbours' pixels
#: left out break the symmetry the quadrupole score relies on), or whose width is at a
#: bound or centre off the window; the others are round beyond doubt and keep the
#: symmetric model
GATE_VALID = 0.95


#: windows per block of :func:`_doubtful`'s quadrupole score (a multiple of 8: the
#: blocks' rows keep their memory alignment); blocks run on numba's threads
#: (:func:`spotfit._jit.over_windows`) from two blocks on; the same numbers
GATE_BLOCK = 1024


def _quadrupole_score(setup: Setup, reduced, batch: Batch, theta, residual_var=None) -> np.ndarray:
    """A cheap stand-in for the score statistic of an elongated spot at symmetric fits
    ``theta`` (2D): ``g^T I^-1 g`` over the two quadrupole directions only.

    Stretching a round Gaussian spot of light ``L`` along x (or along the
    diagonal) changes it, to first order, by ``L (dx^2 - dy^2)`` (``L dx dy``),
    ``dx, dy`` the pixel's offset from the centre; ``g`` is the weighted
    residual's projection on those two patterns and ``I`` their Fisher
    information (weights: the noise model at the fitted values, or 1 divided
    by ``residual_var`` for least squares, as in the score test).  The full
    score statistic also projects off the symmetric model's directions (which
    only raises it), so it is at least about this one: a window whose
    quadrupole score is small is round.  One compiled pass over each window's
    pixels (:func:`spotfit._kernels.quadrupole_score`), about a seventh of the
    score test's cost.
    """
    from spotfit._kernels import MODEL, quadrupole_score

    w = batch.windows
    model = reduced.model
    weighted = not (setup.estimator.normalised_cost or not setup.camera.calibrated)
    noise = setup.noise(w.read_var) if weighted else None
    read_var = np.zeros((1, 1)) if noise is None else np.asarray(noise.read_var, float)
    if read_var.ndim == 0 or read_var.size == 1:
        read_var = read_var.reshape(1, 1)
    if read_var.shape == (1, 1) or read_var.shape == w.data.shape:
        x, y = w.grid.flat()[:2]
        t = np.empty(len(theta))
        quadrupole_score(MODEL, model.kernel(w.grid), np.ascontiguousarray(theta, dtype=float),
                         np.ascontiguousarray(w.data, dtype=float), np.ascontiguousarray(w.mask),
                         np.ascontiguousarray(x, dtype=float), np.ascontiguousarray(y, dtype=float),
                         model.index("x"), model.index("y"), model.offset_index, weighted,
                         float(0.0 if noise is None else noise.excess), np.ascontiguousarray(read_var),
                         t, 0, len(theta))
        if residual_var is not None:
            t = t / np.maximum(residual_var, solver.VAR_FLOOR)
        return t
    return _quadrupole_numpy(setup, reduced, batch, theta, residual_var)


def compile_quadrupole_kernel() -> None:
    """Compile (or load from the cache) the score gate's kernel
    (:func:`spotfit._kernels.quadrupole_score`) on two windows of 5 x 5 px with the types
    :func:`_quadrupole_score` passes it.

    On a first run, the fitting process does this while it waits for the second compiling
    process (``meanwhile`` of :func:`spotfit._jit.compile_alongside`) instead of after it.
    """
    from spotfit._kernels import MODEL, quadrupole_score
    from spotfit.models import Grid, get_model

    grid = Grid((5, 5))
    model = get_model("symmetric")
    x, y = grid.flat()[:2]
    theta = np.array([[100.0, 2.0, 2.0, 1.3, 1.0]] * 2)  # intensity, x, y, sigma, offset
    quadrupole_score(MODEL, model.kernel(grid), theta, np.full((2, grid.size), 5.0),
                     np.ones((2, grid.size), bool), np.ascontiguousarray(x, dtype=float),
                     np.ascontiguousarray(y, dtype=float), model.index("x"), model.index("y"),
                     model.offset_index, True, 1.0, np.ones((1, 1)), np.empty(2), 0, 2)


def _quadrupole_numpy(setup: Setup, reduced, batch: Batch, theta, residual_var=None) -> np.ndarray:
    """:func:`_quadrupole_score` in NumPy (a read-noise map of another shape)."""
    w = batch.windows
    model = reduced.model
    mu = model.value(theta, w.grid)
    x, y = w.grid.flat()[:2]
    u = x[None, :] - theta[:, model.index("x"), None]  # dx, then dx^2 - dy^2
    v = y[None, :] - theta[:, model.index("y"), None]  # dy, then dx dy
    dy2 = v * v
    v *= u
    u *= u
    u -= dy2
    if setup.estimator.normalised_cost or not setup.camera.calibrated:
        a = np.where(w.mask, mu - theta[:, model.offset_index, None], 0.0)  # light x weight
    else:
        a = setup.noise(w.read_var).variance(mu)
        np.maximum(a, 1e-12, out=a)
        np.divide(mu - theta[:, model.offset_index, None], a, out=a)
        a *= w.mask
    b = a * (mu - theta[:, model.offset_index, None])  # light^2 x weight
    a *= w.data - mu  # light x weight x residual
    gc, gs = np.einsum("np,np->n", u, a), np.einsum("np,np->n", v, a)
    icc = np.einsum("np,np,np->n", u, u, b)
    iss = np.einsum("np,np,np->n", v, v, b)
    ics = np.einsum("np,np,np->n", u, v, b)
    det = icc * iss - ics * ics
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (iss * gc * gc - 2.0 * ics * gc * gs + icc * gs * gs) / det
    if residual_var is not None:
        t = t / np.maximum(residual_var, solver.VAR_FLOOR)
    return np.where(det > 0, t, np.inf)  # degenerate: let the score test decide


def _doubtful(setup: Setup, reduced, batch: Batch, theta, limit, residual_var=None) -> np.ndarray:
    """Which 2D symmetric fits ``theta`` the score test must decide (bool per window):
    quadrupole score (:func:`_quadrupole_score`) above :data:`SCORE_GATE` of the test's
    threshold ``limit``, fewer than :data:`GATE_VALID` of the window's pixels, or a fit
    at a width bound or centred off the window (no round spot the statistic describes)."""
    w = batch.windows
    n = len(theta)
    quadrupole = np.empty(n)

    def score(first, last):  # blocks of GATE_BLOCK windows
        for k in range(first, last):
            rows = slice(k * GATE_BLOCK, min(n, (k + 1) * GATE_BLOCK))
            quadrupole[rows] = _quadrupole_score(
                setup, reduced, _take(batch, rows), theta[rows],
                None if residual_var is None else residual_var[rows])

    over_windows(score, -(-n // GATE_BLOCK), threaded=n >= 2 * GATE_BLOCK)
    width = theta[:, np.flatnonzero(reduced.model.width_mask)[0]]
    low, high = width_limits(reduced.model, w.grid)
    odd = ~((width > 1.01 * low[0]) & (width < 0.99 * high[0])) | \
        ~w.inside(theta[:, list(reduced.model.center_index)])
    return ~(quadrupole <= SCORE_GATE * limit) | (w.mask.sum(axis=1) < GATE_VALID * w.mask.shape[1]) | odd


def _take(batch: Batch, rows, variance=None) -> Batch:
    w = batch.windows
    windows = roi.Windows(w.data[rows], w.mask[rows], w.origin[rows], w.grid,
                          None if w.read_var is None else w.read_var[rows])
    if variance is None and batch.variance is not None:
        variance = batch.variance[rows]
    return Batch(windows, batch.frame[rows], batch.image_var[rows], batch.saturated[rows], variance)


def _fit_selected(setup: Setup, batch: Batch, measured=None, choose_width=None, settled=None):
    """Symmetric fits everywhere; the richer model where the data support it.

    A spot gets the richer model (``setup.model``) only when its extra
    widths would improve the fit by more than the BIC penalty of ``q``
    parameters, ``q ln P`` (``P`` the window's fitted pixels): the score
    statistic of the richer model at the symmetric fit
    (:func:`spotfit.solver.score_test`, asymptotically chi-square with
    ``q`` degrees of freedom when the spot is round), which costs one
    evaluation of the richer model instead of its fit.  A round spot is
    refitted with the richer model with probability ``exp(-ln P)``-ish
    (about 1% for 9 x 9 windows); an elongated one as soon as its
    elongation is significant.  Faint round spots thus keep the symmetric
    model's precision (two free widths that the data cannot pin down would
    cost ~4% in localisation precision at 300 photons over 50 photons/px)
    and bright elongated spots get their widths and angle.  In 2D the score
    test runs only where :func:`_quadrupole_score` (the same statistic over
    the two elongation patterns alone, in NumPy) exceeds :data:`SCORE_GATE`
    of the threshold, the window lost more than ``1 - GATE_VALID`` of its
    pixels to neighbours, or the symmetric fit is at a width bound or
    centred off the window: the other spots are round beyond doubt.

    ``choose_width`` (per window, px): windows whose symmetric fit converged
    narrower keep it without a test; ``settled`` (a rule on the symmetric fits'
    columns, :func:`fit_batch`): windows it marks keep it too.

    Returns the columns of :func:`_columns`, rows in ``batch`` order.
    """
    reduced = _reduced(setup)
    sol = _solve(reduced, batch)
    if measured is not None:
        measured["variance"] = sol.variance
    return _select(setup, reduced, batch, sol, choose_width, settled)


def _select(setup: Setup, reduced, batch: Batch, sol, choose_width=None, settled=None):
    """:func:`_fit_selected` after the symmetric solve ``sol`` of ``batch``'s windows."""
    values, errors, chi2, iterations, status = _columns(reduced, batch, sol)
    w = batch.windows
    n_valid = w.mask.sum(axis=1)
    k_r = reduced.model.n_params
    residual_var = None
    if setup.estimator.normalised_cost:  # a sum of squares: in units of the residual variance
        residual_var = sol.cost / np.maximum(n_valid - k_r, 1)
    extra = setup.model.n_params - k_r
    limit = extra * np.log(np.maximum(n_valid, 2))
    theta = sol.theta + sol.bias
    test = np.arange(len(batch))
    if choose_width is not None or settled is not None:  # windows that keep the symmetric fit without a test
        from spotfit._kernels import CONVERGED

        keep = np.zeros(len(batch), bool)
        if choose_width is not None:
            keep |= (status == CONVERGED) & (values["sigma_x"] < choose_width)
        if settled is not None:
            keep |= settled(values, chi2, status)
        test = np.flatnonzero(~keep)
    if setup.ndim == 2 and len(test) == len(batch):  # the score test only where the quadrupole score leaves a doubt
        test = np.flatnonzero(_doubtful(setup, reduced, batch, theta, limit, residual_var))
    elif setup.ndim == 2 and len(test):
        test = test[_doubtful(setup, reduced, _take(batch, test), theta[test], limit[test],
                              None if residual_var is None else residual_var[test])]
    score = np.zeros(len(batch))
    if len(test):
        score[test] = solver.score_test(
            setup.model, setup.estimator, w.data[test], w.mask[test], w.grid, theta[test],
            _embedding(reduced.model, setup.model),
            noise=setup.noise(None if w.read_var is None else w.read_var[test]),
            residual_var=None if residual_var is None else residual_var[test])
    rows = np.flatnonzero(~(score <= limit))
    if len(rows) == 0:
        return values, errors, chi2, iterations, status
    measured = None if setup.camera.calibrated else sol.variance[rows]
    sub = _take(batch, rows, measured)
    v2, e2, c2, i2, s2 = _columns(setup, sub, _solve(setup, sub))
    # own copies: a symmetric fit's sigma_x and sigma_y may be views of one array
    values = {key: np.array(v, dtype=float) for key, v in values.items()}
    errors = {key: np.array(v, dtype=float) for key, v in errors.items()}
    for key in v2:
        values[key][rows], errors[key][rows] = v2[key], e2[key]
    chi2, iterations, status = chi2.copy(), iterations.copy(), status.copy()
    chi2[rows], iterations[rows], status[rows] = c2, i2, s2
    return values, errors, chi2, iterations, status
