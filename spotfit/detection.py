"""Candidate detection: spot-scale filter, noise-model threshold, local maxima.

Pipeline of :func:`find_peaks`, for one 2D frame or 3D stack:

1. **Background** (:mod:`spotfit.background`): the expected level at every
   pixel, following cells, nuclei, illumination and anything wider than a
   few PSF sigmas, but not spots (they are clipped out).
2. **Filter**: the frame smoothed by a Gaussian of ``SMOOTH`` (0.7) PSF
   sigmas, minus the background.  The PSF itself (``SMOOTH = 1``) is the
   matched filter of an isolated spot in white noise; 0.7 keeps 94 % of its
   signal-to-noise ratio and separates spots ~20 % closer (measured: recall
   of 1 spot per 10 x 10 px 0.75 instead of 0.70, textured cells 0.96
   instead of 0.91).  Unlike a difference of Gaussians, the background does
   not subtract the neighbours' light, so clustered spots keep their height.
3. **Noise** of the filtered frame at every pixel, from a noise model of the
   pixels (:class:`~spotfit.background.NoiseModel`) evaluated at the
   background level and propagated through the filter: the camera's model
   (shot noise, EM excess, read noise, sCMOS maps) when it is calibrated,
   otherwise the frame's own photon-transfer curve measured from high-order
   pixel differences and scaled by how correlated its noise is.  Neither
   depends on how many spots the frame holds (the measured variance at the
   background stays within ~5 % from 1 spot per 400 px^2 to 1 per 16 px^2),
   so one threshold means one false-alarm rate in a sparse and in a covered
   frame, and bright nuclei (more shot noise) get a higher bar than the dark
   space between cells.  Mirrored edges fold the filter kernel (filtered
   noise up to ~1.4x larger on the edge rows, ~1.8x in the corners); this
   is computed exactly per pixel (:class:`_EdgeNoise`).
4. **Local maxima** of the filtered frame whose signal-to-noise ratio
   exceeds ``threshold``, with the rule of
   ``skimage.feature.peak_local_max(..., exclude_border=False)`` (spots
   touching the border are kept).  The score of a candidate is its filtered
   height divided by the noise there.  Where the noise is skewed (Poisson
   noise of dim backgrounds: a few photons per pixel) the threshold is
   raised to the value with the false-alarm probability that ``threshold``
   has for Gaussian noise.

Large frames (more than ``BLOCK_PIXELS``) are processed in blocks of rows
with a halo (:func:`detection_halo`), so memory follows the block, not the
frame (a 20000 x 20000 frame: ~0.25 GB beyond the frame itself), with the
same candidates as the whole frame.  A 2048 x 2048 frame takes ~0.1 s.

Default threshold
-----------------
``DEFAULT_THRESHOLD = 5``, measured on simulated, isolated spots (min.
separation 10 px) with PSF sigma 1.3 px, 30 images of 200 x 300 px with 60
spots each, matched to the truth within 1.5 px (with the camera's noise
model | measured noise):

* faint, 300 photons on 50 photons/px: recall 0.987 | 0.986, precision
  0.998 | 0.998;
* bright, 5000 photons on 10 photons/px: recall 1.000, precision 0.999 |
  1.000;
* pure background, false candidates per 512 x 512 image (mean of 30):
  0.07 | 0.10 at 50 photons/px, 0.13 | 0.10 at 10 photons/px, 0.07 | 0.10
  for an sCMOS-like 2 photons/px + 1.5 e- read noise, 0.30 | 0.27 at
  1 photon/px, 0.63 | 0.27 for an EMCCD (EM gain 100, 5 photons/px) and
  25 | 66 at 0.2 photons/px (there the measured model cannot tell how
  skewed the noise is; give the camera).

:func:`find_peaks_stack` gives the same candidates for each frame of a stack
of small 2D frames sharing a noise model (a camera's) in one pass over the
stack: per small frame, the calls cost more than the work.
:func:`spotfit.detect` (:mod:`spotfit.api`) runs this frame by frame (small
frames a stack at a time) over an image or a time-lapse and returns a table.  Coordinates follow
:mod:`spotfit`: 0-based pixel centres, ``x`` = column, ``y`` = row,
``z`` = plane.
"""

from __future__ import annotations

import math

import numpy as np

from spotfit._jit import njit, over_windows
from spotfit.errors import SpotfitInputError
from spotfit.filters import (  # noqa: F401  (dog_filter, DOG_RATIO: the public names stay here too)
    DOG_RATIO, PARALLEL_PIXELS, SMOOTH, _EdgeNoise, dog_filter, gaussian_smooth,
)

__all__ = [
    "find_peaks",
    "find_peaks_stack",
    "filter_frame",
    "detection_halo",
    "gaussian_smooth",
    "dog_filter",
    "default_min_distance",
    "DEFAULT_THRESHOLD",
    "DOG_RATIO",
]

#: Default detection threshold, in signal-to-noise units of the filtered
#: image (see the module docstring for how it was chosen).
DEFAULT_THRESHOLD = 5.0

# The noise is estimated on at most this many pixels (a regular sub-grid):
# the median of ~250k values is as good as that of millions, and cheaper.
_NOISE_SAMPLES = 250_000
# Noise floor, relative to the largest |value| of the frame, below which the
# filtered image is treated as noise-free (float32 rounding is ~1e-7).
_NOISE_FLOOR = 16 * float(np.finfo(np.float32).eps)


def default_min_distance(sigma):
    """Default ``min_distance`` of :func:`find_peaks`, in pixels.

    ``max(1, round(1.5 * sigma))`` per axis: 2 px for sigma 1.3 px, 3
    planes for an axial sigma of 2 planes.  Two spots closer than ~2 sigma
    merge into one maximum of the filtered image anyway, while noise on one
    spot can make extra maxima within ~1 sigma of its centre.

    Parameters
    ----------
    sigma : float or sequence of float
        PSF sigma in pixels, scalar or per axis.

    Returns
    -------
    int or tuple of int
        An int for a scalar `sigma`, else one int per axis.
    """
    radii = tuple(max(1, int(math.floor(1.5 * float(s) + 0.5))) for s in np.atleast_1d(sigma))
    return radii[0] if np.ndim(sigma) == 0 else radii


def _check_options(sigma, threshold, min_distance, ndim=None):
    """Validate options; returns sigma as a tuple of floats (one per axis)."""
    sig = np.atleast_1d(np.asarray(sigma, dtype=float)) if _is_number_like(sigma) else None
    if (
        sig is None
        or sig.ndim != 1
        or sig.size == 0
        or not np.all(np.isfinite(sig))
        or np.any(sig <= 0)
    ):
        raise SpotfitInputError(f"sigma must be > 0 pixels, got {sigma!r}", parameter="sigma")
    if ndim is not None and sig.size not in (1, ndim):
        raise SpotfitInputError(
            f"sigma needs 1 or {ndim} values for {ndim}D data, got {sig.size}", parameter="sigma"
        )
    if (
        not _is_number_like(threshold)
        or np.ndim(threshold) != 0
        or not np.isfinite(float(threshold))
        or float(threshold) <= 0
    ):
        raise SpotfitInputError(
            f"threshold must be > 0 (signal-to-noise units), got {threshold!r}", parameter="threshold"
        )
    if min_distance is not None:
        if (
            not _is_number_like(min_distance)
            or np.ndim(min_distance) != 0
            or not np.isfinite(float(min_distance))
            or float(min_distance) != int(min_distance)
            or int(min_distance) < 1
        ):
            raise SpotfitInputError(
                f"min_distance must be an integer >= 1 pixel, got {min_distance!r}",
                parameter="min_distance",
            )
    return tuple(float(s) for s in sig)


def _is_number_like(value) -> bool:
    try:
        np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


def find_peaks(frame, sigma, threshold=DEFAULT_THRESHOLD, min_distance=None, noise=None, backgrounds=None):
    """Find spot candidates in one 2D image or 3D stack.

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        One image, already in photons (with a calibrated camera) or ADU
        above the baseline.  Converted to float32.
    sigma : float or sequence of float
        PSF sigma in pixels: a scalar for all axes or one value per axis in
        array order (``(sigma_z, sigma_y, sigma_x)`` for a stack).
    threshold : float
        Minimum score (signal-to-noise ratio of the filtered image) of a
        candidate.  Default :data:`DEFAULT_THRESHOLD`.
    min_distance : int, optional
        Minimum separation of two candidates in pixels, on all axes: a
        candidate is the maximum of the box of half-width `min_distance`
        around it (Chebyshev distance), so of two closer maxima the brighter
        is kept.  Default :func:`default_min_distance` ``(sigma)``, per axis.
    noise : spotfit.background.NoiseModel, optional
        Pixel noise of the frame as a function of the background level, in
        the frame's units: :meth:`NoiseModel.from_camera` for photons from a
        calibrated camera.  Default: measured on the frame
        (:func:`spotfit.background.estimate_noise`); to process a frame in
        blocks, measure it once on the whole frame and pass it to every
        block.
    backgrounds : list, optional
        If given, the local background that detection estimated is appended
        to it, one :class:`BackgroundPiece` per block of the frame (the fits
        take its shape across each window as known light:
        :func:`spotfit.single.fit_batch`).

    Returns
    -------
    coords : (n, frame.ndim) ndarray of int
        Pixel indices of the maxima in array order (``(row, col)`` or
        ``(plane, row, col)``), sorted by decreasing score.
    score : (n,) ndarray of float64
        Filtered height of each maximum above the local background divided
        by the standard deviation the noise model predicts for it
        (signal-to-noise units).

    Raises
    ------
    SpotfitInputError
        For invalid options (the message names ``sigma``,
        ``threshold`` or ``min_distance``) or non-finite pixels.

    Notes
    -----
    A frame without noise (e.g. a constant one) has a measured noise of 0;
    the noise is then floored at ``16 * eps(float32)`` times the largest
    deviation from the median (float32 rounding level), so a constant frame
    gives no candidates and a noise-free rendering gives its spots.
    """
    data = np.asarray(frame)
    if data.ndim not in (2, 3):
        raise SpotfitInputError(f"find_peaks needs a 2D or 3D array, got shape {data.shape}")
    sig = _check_options(sigma, threshold, min_distance, data.ndim)
    if len(sig) == 1:
        sig = sig * data.ndim
    if min_distance is None:
        radii = default_min_distance(sig)
    else:
        radii = (int(min_distance),) * data.ndim
    empty = (np.empty((0, data.ndim), dtype=np.intp), np.empty(0, dtype=float))
    if data.size == 0:
        return empty
    prepared = _Prepared.of(data, sig, noise)
    if prepared is None:  # no noise at all: nothing to find
        return empty
    coords, snr = [empty[0]], [empty[1]]
    for block, origin, interior in _blocks(data.shape, sig, radii):
        c, s = _block_peaks(prepared, data[block], origin, interior, float(threshold), radii, backgrounds)
        coords.append(c)
        snr.append(s)
    coords, snr = np.concatenate(coords), np.concatenate(snr)
    order = np.argsort(-snr, kind="stable")
    return coords[order].astype(np.intp).reshape(-1, data.ndim), snr[order].astype(float)


def find_peaks_stack(frames, sigma, threshold=DEFAULT_THRESHOLD, min_distance=None, noise=None,
                     backgrounds=None):
    """:func:`find_peaks` of each 2D frame of a stack, in one pass over the stack.

    Each frame's result is exactly (bit for bit) what :func:`find_peaks` gives
    for it alone: its own level shift, float32 rounding floor, local
    background, noise and threshold.  For movies of many small frames the
    pipeline's steps then run once per stack instead of once per frame (per
    small frame, the calls cost more than the work).  Stacks where that would
    not hold or not help -- no shared noise model, frames far from unit range,
    frames of more than ``_NOISE_SAMPLES`` pixels, stacks of more than
    ``BLOCK_PIXELS``, smoothing by FFT -- are detected frame by frame.

    Parameters
    ----------
    frames : (n, ny, nx) array_like
        The frames, stacked along the first axis.
    sigma, threshold, min_distance
        As in :func:`find_peaks` (2D: a scalar or ``(sigma_y, sigma_x)``).
    noise : spotfit.background.NoiseModel, optional
        One noise model for every frame (a calibrated camera's); default:
        each frame's own, measured on it (then frame by frame).
    backgrounds : list of list, optional
        One list per frame; each gets that frame's :class:`BackgroundPiece`.

    Returns
    -------
    list of (coords, score)
        Per frame, as :func:`find_peaks` returns them.
    """
    from spotfit.background import SCALE, Background
    from spotfit.filters import _DIRECT_SIGMA

    stack = np.asarray(frames)
    if stack.ndim != 3:
        raise SpotfitInputError(f"find_peaks_stack needs a 3D array of 2D frames, got shape {stack.shape}")
    n, ny, nx = stack.shape
    sig = _check_options(sigma, threshold, min_distance, 2)
    sig = sig * 2 if len(sig) == 1 else sig
    pieces = backgrounds if backgrounds is not None else [None] * n

    def one_by_one():
        return [find_peaks(stack[t], sigma, threshold, min_distance, noise, pieces[t]) for t in range(n)]

    if (noise is None or n < 2 or stack.size == 0 or stack.size > BLOCK_PIXELS
            or ny * nx > _NOISE_SAMPLES or SMOOTH * max(sig) > _DIRECT_SIGMA):
        return one_by_one()
    low, high = np.min(stack, axis=(1, 2)), np.max(stack, axis=(1, 2))
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise SpotfitInputError("image contains NaN or infinite pixels")
    lo, hi = low.astype(np.float64), high.astype(np.float64)
    biggest = np.maximum(np.abs(lo), np.abs(hi))
    if np.any(_off_unit_range(biggest)):
        return one_by_one()  # (a frame to rescale: its working units differ)
    radii = default_min_distance(sig) if min_distance is None else (int(min_distance),) * 2
    # _Prepared.of per frame (factor 1; a small frame's sub-grid is all of it)
    shift = np.median(stack.reshape(n, -1).astype(np.float64), axis=1).astype(np.float32).astype(np.float64)
    floor = _rounding_floor(lo, hi, shift)
    live = np.maximum(floor, _max_variance(noise)) > 0  # frames with any noise at all
    results = [(np.empty((0, 2), dtype=np.intp), np.empty(0, dtype=float)) for _ in range(n)]
    if not live.any():
        return results
    edge = _EdgeNoise((ny, nx), sig, SMOOTH, SCALE)
    frame_of, coords, snr, background = _stack_peaks(
        np.ascontiguousarray(stack, dtype=np.float32), sig, shift, floor, noise, edge, float(threshold), radii)
    for t in range(n):
        if pieces[t] is not None and live[t]:
            plane = Background(background.coarse[t:t + 1], background.cells, (1, ny, nx),
                               background.excluded[t:t + 1], background.means[t:t + 1])
            pieces[t].append(BackgroundPiece((0, 0), (slice(0, ny), slice(0, nx)), plane, 1.0))
    bounds = np.searchsorted(frame_of, np.arange(n + 1))
    for t in np.flatnonzero(live):
        part = slice(bounds[t], bounds[t + 1])
        results[t] = (coords[part], snr[part])
    return results


def _stack_peaks(data, sig, shift, floor, noise, edge, threshold, radii):
    """:func:`_block_peaks` of every frame of a (n, ny, nx) float32 stack (one block per
    frame; ``shift`` and ``floor`` per frame): the candidates' frames (increasing),
    ``(row, col)`` and scores (each frame's by decreasing score) and the stack's
    :class:`~spotfit.background.Background` (its planes are the frames')."""
    from spotfit.background import Background, _add_interpolated_rows, _axis_weights

    n, ny, nx = data.shape
    background = Background.estimate(data, (0.0,) + tuple(sig), noise)
    work = data - shift.astype(np.float32)[:, None, None]
    filtered = gaussian_smooth(work, (0.0,) + tuple(SMOOTH * s for s in sig))
    # background.subtract_from frame by frame (each frame's own shift)
    zero = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1))
    weights = [w for m, c, k in zip((ny, nx), background.cells[1:], background.coarse.shape[1:])
               for w in _axis_weights(m, int(c), k)]
    for t in range(n):
        over_windows(_add_interpolated_rows, ny, filtered[t:t + 1], background.coarse[t:t + 1], *zero,
                     *weights, -1.0, float(shift[t]), threaded=False)
    cand = _screen(filtered, background, noise, floor, threshold * edge.white_sd * edge.min_relative,
                   (0,) + tuple(radii), planes=False)
    cand = cand[_order_peaks(filtered, cand, (1,) + tuple(radii))]
    t, y, x = np.unravel_index(cand, filtered.shape)
    sd, skew = _noise_sd((t, y, x), (y, x), background, noise, edge, floor[t])
    snr = filtered.ravel()[cand] / sd
    keep = snr > _skewed_threshold(threshold, skew)
    t, y, x, snr = t[keep], y[keep], x[keep], snr[keep].astype(float)
    order = np.lexsort((-snr, t))
    coords = np.column_stack([y[order], x[order]]).astype(np.intp).reshape(-1, 2)
    return t[order], coords, snr[order], background


class _Prepared:
    """What every block of a frame shares: working scale, level shift, noise model, floor.

    Frames whose values are far from 1 (beyond 2^+-40, e.g. float images near
    the float32 limits) are multiplied by a power of two (exact), and the
    noise model with them, so that variances neither overflow nor underflow;
    ``factor`` is that power of two (1 for most frames).  ``shift`` is the
    typical level (median of a sub-grid), removed before filtering so that
    float32 rounding scales with the fluctuations only; ``floor`` is the
    smallest variance (float32 rounding of the frame).
    """

    def __init__(self, sig, factor, shift, noise, floor, edge):
        self.sig, self.factor, self.shift = sig, factor, shift
        self.noise, self.floor, self.edge = noise, floor, edge

    @classmethod
    def of(cls, data, sig, noise):
        from spotfit.background import SCALE, _extremes, estimate_noise

        # (on the threads for large frames; NaN propagates: no mask array)
        lo, hi = _extremes(data.reshape((1,) * (3 - data.ndim) + data.shape))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SpotfitInputError("image contains NaN or infinite pixels")
        biggest = max(abs(lo), abs(hi))
        factor = 1.0
        if _off_unit_range(biggest):
            factor = 2.0 ** int(round(math.log2(1024.0 / biggest)))
        if noise is None:
            noise = estimate_noise(data, sig)
        if factor != 1.0:
            noise = noise.scaled(factor)
        shift = float(np.float32(np.median(_subgrid(data).astype(np.float64) * factor)))
        floor = float(_rounding_floor(lo * factor, hi * factor, shift))
        if not max(floor, _max_variance(noise)) > 0:
            return None
        return cls(sig, factor, shift, noise, floor, _EdgeNoise(data.shape, sig, SMOOTH, SCALE))

    def working(self, block) -> np.ndarray:
        """A block of the frame in working units, float32."""
        if self.factor == 1.0:
            return np.asarray(block, dtype=np.float32)
        return (np.asarray(block, dtype=np.float64) * self.factor).astype(np.float32)


#: frames whose largest |value| lies outside this range are rescaled first
_UNIT_RANGE = (2.0**-40, 2.0**40)


def _off_unit_range(biggest):
    """Whether frames whose largest |value| is ``biggest`` (a number or an array of
    them) are rescaled (:class:`_Prepared`)."""
    return (biggest > 0) & ~((biggest > _UNIT_RANGE[0]) & (biggest < _UNIT_RANGE[1]))


def _rounding_floor(lo, hi, shift):
    """The smallest variance of a frame of values ``lo .. hi`` filtered after removing
    ``shift`` (float32 rounding; numbers or arrays, one per frame)."""
    return (_NOISE_FLOOR * np.maximum(hi - shift, shift - lo)) ** 2
#: frames larger than this many pixels are processed in blocks of rows
BLOCK_PIXELS = 1 << 24


def detection_halo(sigma, min_distance=None) -> tuple:
    """Pixels per axis around a block of a frame that decide its candidates.

    :func:`find_peaks` finds a frame's candidates block by block when the
    frame is large (``BLOCK_PIXELS``), each block padded by this many rows of
    the frame (rounded up to whole background cells,
    :func:`spotfit.background.cell_size`), and gets those of the whole frame.
    The same holds for a caller's blocks that start at multiples of the cell
    size, given the frame's noise model (a camera's, or
    :func:`spotfit.background.estimate_noise` of the whole frame) as
    ``noise``, away from the frame's edges (the edge-noise correction needs
    a pixel's position in the frame).

    Parameters
    ----------
    sigma : float or sequence of float
        PSF sigma per axis (array order).
    min_distance : int, optional
        As in :func:`find_peaks`.

    Returns
    -------
    tuple of int
        Halo per axis, pixels.
    """
    from spotfit.background import halo

    sig = np.atleast_1d(np.asarray(sigma, dtype=float))
    radii = default_min_distance(tuple(sig)) if min_distance is None else (int(min_distance),) * sig.size
    radii = np.broadcast_to(np.atleast_1d(radii), sig.shape)
    return tuple(int(h + math.ceil(4.0 * SMOOTH * s) + r) for h, s, r in zip(halo(sig), sig, radii))


def _blocks(shape, sig, radii):
    """Blocks of rows (with halos) covering a frame: (block slices, origin, interior slices)."""
    from spotfit.background import cell_size

    nd = len(shape)
    full = tuple(slice(0, n) for n in shape)
    size = int(np.prod(shape))
    if size <= BLOCK_PIXELS:
        return [(full, (0,) * nd, full)]
    axis = nd - 2  # rows
    cell = cell_size(sig[axis])
    halo = detection_halo(sig, max(radii))[axis]
    halo = -(-halo // cell) * cell
    per_row = size // shape[axis]
    rows = max(cell, (BLOCK_PIXELS // per_row - 2 * halo) // cell * cell)
    out = []
    for r0 in range(0, shape[axis], rows):
        r1 = min(r0 + rows, shape[axis])
        b0, b1 = max(0, r0 - halo), min(shape[axis], r1 + halo)
        block, interior, origin = list(full), list(full), [0] * nd
        block[axis] = slice(b0, b1)
        interior[axis] = slice(r0 - b0, r1 - b0)
        origin[axis] = b0
        out.append((tuple(block), tuple(origin), tuple(interior)))
    return out


class BackgroundPiece:
    """The local background detection estimated on one block of a frame.

    Attributes
    ----------
    origin : tuple of int
        Frame index of the block's first pixel (array order).
    interior : tuple of slice
        The part of the block it stands for (block coordinates; the blocks'
        interiors tile the frame).
    background : spotfit.background.Background
        On the block, in detection's working units (``factor`` times the frame's).
    factor : float
    """

    def __init__(self, origin, interior, background, factor):
        self.origin, self.interior = tuple(int(o) for o in origin), tuple(interior)
        self.background, self.factor = background, float(factor)

    def bounds(self):
        """First and one-past-last frame index of the interior per axis (array order)."""
        lo = np.array([o + (sl.start or 0) for o, sl in zip(self.origin, self.interior)], np.int64)
        hi = np.array([o + sl.stop for o, sl in zip(self.origin, self.interior)], np.int64)
        return lo, hi

    def extent(self):
        """First and one-past-last frame index of the whole block per axis (array order)."""
        shape = self.background.shape[3 - len(self.origin):]
        lo = np.array(self.origin, np.int64)
        return lo, lo + np.array(shape, np.int64)

    def at(self, index) -> np.ndarray:
        """Background (frame units, float64) at frame pixels ``index`` (int arrays, array order)."""
        local = [np.asarray(i, np.int64) - o for i, o in zip(index, self.origin)]
        local = [np.zeros_like(local[0])] * (3 - len(local)) + local
        return self.background.at(local).astype(np.float64) / self.factor


    def box(self, axes) -> np.ndarray:
        """:meth:`at` every pixel of the box of frame pixels ``axes`` (1-d int arrays,
        array order): an array of the box's shape."""
        local = [np.asarray(i, np.int64) - o for i, o in zip(axes, self.origin)]
        local = [np.zeros(1, np.int64)] * (3 - len(local)) + local
        values = self.background.box(local).astype(np.float64) / self.factor
        return values.reshape([len(a) for a in axes])

    def moved(self, shift) -> "BackgroundPiece":
        """The same piece in the coordinates of a crop of the frame starting at ``shift``
        (frame index, array order): a tile's pixel ``i`` is the frame's ``i + shift``."""
        return BackgroundPiece(np.subtract(self.origin, shift), self.interior, self.background,
                               self.factor)


def background_at(pieces, index) -> np.ndarray:
    """The local background of :class:`BackgroundPiece` s ``pieces`` at frame pixels
    ``index`` (int arrays, array order, any shape; float64, frame units).

    A pixel takes the value of the block whose interior holds it, else of any block
    holding it; a pixel outside every block (beyond the frame) takes that of the
    nearest pixel of the blocks.
    """
    nd = len(index)
    extents = [p.extent() for p in pieces]
    lo = np.min([e[0] for e in extents], axis=0)
    hi = np.max([e[1] for e in extents], axis=0)
    shape = np.shape(index[0])
    index = [np.clip(np.asarray(index[a], np.int64).ravel(), lo[a], hi[a] - 1) for a in range(nd)]
    if len(pieces) == 1:
        return pieces[0].at(index).reshape(shape)
    values = np.full(index[0].shape, np.nan)
    for use_interior in (True, False):  # a block's interior first, else any block holding the pixel
        for p, extent in zip(pieces, extents):
            plo, phi = p.bounds() if use_interior else extent
            inside = np.isnan(values)
            for a in range(nd):
                inside &= (index[a] >= plo[a]) & (index[a] < phi[a])
            if inside.any():
                values[inside] = p.at([i[inside] for i in index])
    return values.reshape(shape)


def background_box(pieces, lo, shape) -> np.ndarray:
    """:func:`background_at` every pixel of the box of ``shape`` from frame pixel
    ``lo`` (array order): an array of ``shape``, the same numbers; one piece's
    with its weights per row and column (:meth:`BackgroundPiece.box`)."""
    if len(pieces) != 1:
        return background_at(pieces, [a + o for a, o in zip(np.indices(shape), lo)])
    low, high = pieces[0].extent()
    axes = [np.clip(np.arange(o, o + n, dtype=np.int64), low[a], high[a] - 1)
            for a, (o, n) in enumerate(zip(lo, shape))]
    return pieces[0].box(axes)


def background_boxes(pieces, shape) -> np.ndarray:
    """:func:`background_box` ``([p], (0, ...), shape)`` of each of ``pieces`` (one
    :class:`BackgroundPiece` per crop of a frame, all of one block's background and
    factor: the tiles of a frame, :meth:`BackgroundPiece.moved`) at once:
    ``(k,) + shape``, the same numbers."""
    first, nd = pieces[0], len(shape)
    origin = np.array([p.origin for p in pieces], np.int64).reshape(len(pieces), nd)
    block = np.array(first.background.shape[3 - nd:], np.int64)
    # each crop's pixels clipped to its block (background_box), in block coordinates (box)
    local = [np.clip(np.arange(n, dtype=np.int64)[None, :], origin[:, a, None],
                     origin[:, a, None] + block[a] - 1) - origin[:, a, None] for a, n in enumerate(shape)]
    local = [np.zeros((len(pieces), 1), np.int64)] * (3 - nd) + local
    values = first.background.boxes(local).astype(np.float64) / first.factor
    return values.reshape((len(pieces),) + tuple(shape))


def _block_peaks(prepared, raw, origin, interior, threshold, radii, backgrounds=None):
    """Candidates of one block whose maxima lie in its interior, in frame coordinates;
    the block's local background is appended to ``backgrounds`` (a list) if given."""
    from spotfit.background import Background, _as_volume, _sigmas

    p, edge = prepared, prepared.edge
    data = p.working(raw)
    volume = _as_volume(data)
    background = Background.estimate(volume, _sigmas(p.sig, data.ndim), p.noise)
    if backgrounds is not None:
        backgrounds.append(BackgroundPiece(origin, interior, background, p.factor))
    filtered = gaussian_smooth(_minus(data, np.float32(p.shift)), tuple(SMOOTH * s for s in p.sig))
    background.subtract_from(filtered.reshape(volume.shape), p.shift)
    # local maxima of the filtered image (border pixels included), in the
    # interior, among the pixels above the threshold for the smallest noise
    # around them ...
    # (the screen keeps only the pixels that are maxima of their box: one pass
    # over the frame, no array of every bright pixel)
    cand = _screen(filtered, background, p.noise, p.floor, threshold * edge.white_sd * edge.min_relative,
                   radii)
    inside = np.ones(len(cand), bool)
    for i, sl in zip(np.unravel_index(cand, filtered.shape), interior):
        inside &= (i >= sl.start) & (i < sl.stop)
    cand = cand[inside]
    cand = cand[_order_peaks(filtered, cand, radii)]
    # ... whose signal-to-noise ratio exceeds the threshold (raised where the
    # noise is skewed)
    local = np.unravel_index(cand, filtered.shape)
    in_frame = tuple(i + o for i, o in zip(local, origin))
    sd, skew = _noise_sd(local, in_frame, background, p.noise, edge, p.floor)
    snr = filtered.ravel()[cand] / sd
    keep = snr > _skewed_threshold(threshold, skew)
    coords = np.column_stack([i[keep] for i in in_frame]) if len(cand) else np.zeros((0, data.ndim))
    return coords.astype(np.intp).reshape(-1, data.ndim), snr[keep].astype(float)


def _minus(data: np.ndarray, value) -> np.ndarray:
    """``data - value`` (a new array; the same numbers), large arrays in strips of rows
    on the kernel threads."""
    from spotfit.filters import PARALLEL_PIXELS

    out = np.empty(np.broadcast_shapes(data.shape, np.shape(value)), np.result_type(data, value))
    if data.ndim == 0 or data.size < PARALLEL_PIXELS or out.shape != data.shape:
        np.subtract(data, value, out=out)
        return out
    n = data.shape[0]
    strips = min(8, n)

    def run(first, last):
        for k in range(first, last):
            rows = slice(k * n // strips, (k + 1) * n // strips)
            np.subtract(data[rows], value, out=out[rows])

    over_windows(run, strips, threaded=True)
    return out


def filter_frame(frame, sigma, noise=None):
    """The detection filter of :func:`find_peaks` and its noise, at every pixel.

    For looking at what detection sees (the whole frame at once, not in
    blocks).

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        One frame (photons or ADU above the baseline).
    sigma : float or sequence of float
        PSF sigma in pixels, scalar or per axis (array order).
    noise : NoiseModel, optional
        As in :func:`find_peaks` (default: measured on the frame).

    Returns
    -------
    filtered : ndarray of float32
        ``G(SMOOTH * sigma) * frame - background``: the frame smoothed at the
        scale of a spot minus the local background
        (:func:`spotfit.background.local_background`), in the frame's units.
    sd : ndarray of float32
        Standard deviation of `filtered` at each pixel where no spot is:
        the noise model at the background level, propagated through the
        filter and the background estimate, larger within the kernel reach
        of the edges (mirror-reflected kernel, :class:`_EdgeNoise`).
    """
    from spotfit.background import Background, _as_volume, _sigmas

    data = np.asarray(frame)
    sig = _check_options(sigma, DEFAULT_THRESHOLD, None, data.ndim)
    sig = sig * data.ndim if len(sig) == 1 else sig
    p = _Prepared.of(data, sig, noise)
    if p is None:
        return np.zeros(data.shape, np.float32), np.zeros(data.shape, np.float32)
    work = p.working(data)
    volume = _as_volume(work)
    background = Background.estimate(volume, _sigmas(sig, data.ndim), p.noise)
    filtered = gaussian_smooth(work - np.float32(p.shift), tuple(SMOOTH * s for s in sig))
    background.subtract_from(filtered.reshape(volume.shape), p.shift)
    index = tuple(np.indices(data.shape).reshape(data.ndim, -1))
    sd = _noise_sd(index, index, background, p.noise, p.edge, p.floor)[0].reshape(data.shape)
    return filtered / np.float32(p.factor), (sd / p.factor).astype(np.float32)


def _screen(filtered, background, noise, floor, factor, radii=None, planes=True):
    """Flat indices of the pixels whose filtered value exceeds ``factor`` times a lower
    bound of their noise standard deviation (the smallest of the cells around them),
    increasing; with ``radii`` (half-widths per axis of `filtered`) only those that
    are also maxima of their box (:func:`_local_maxima`'s first step).  ``floor``: a
    number, or one per plane of a stack of 2D frames (``planes`` False: the cells'
    planes are frames, not mixed)."""
    from spotfit.background import _box_filter, in_strips

    rv = noise.read_var
    rv_min = float(np.min(rv)) if np.ndim(rv) else float(rv)

    cells = np.array([1 if planes else 0, 1, 1], np.int64)  # interpolation uses +-1 cell

    def limit_of(coarse, least=max(noise.floor, floor) if np.ndim(floor) == 0 else None):
        level = _box_filter(coarse, cells, True)
        var = np.maximum(rv_min + noise.shot * np.maximum(level, 0.0), least) * noise.correlation
        return (factor * np.sqrt(var)).astype(np.float32)

    arrays = (background.coarse,)
    if np.ndim(floor):  # (one per plane, as an array of the grid's shape: strips slice it)
        least = np.maximum(noise.floor, np.asarray(floor, np.float64))
        arrays += (np.ascontiguousarray(np.broadcast_to(least[:, None, None], background.coarse.shape)),)
    limit = in_strips(limit_of, arrays, 1)  # (on threads for large grids)
    volume = filtered.reshape(background.shape)
    box = np.zeros(3, np.int64)
    if radii is not None:
        box[3 - len(radii):] = [int(r) for r in radii]
    return _above(volume, limit, background.cells, box)


@njit(nogil=True, inline="always")
def _row_peaks(volume, limit, cells, cell_x, box, r, out, pos, fill):
    """Pixels of row ``r`` (of the ``nz * ny`` rows of `volume`) above their cell's
    `limit` and, if ``box`` (half-widths ``(rz, ry, rx)``) is not all zeros, >= every
    pixel of the box around them (clipped at the edges): their flat indices written to
    `out` from ``pos`` on if ``fill``; returns ``pos`` plus their number."""
    nz, ny, nx = volume.shape
    cz, cy = cells[0], cells[1]
    rz, ry, rx = box[0], box[1], box[2]
    check = rz > 0 or ry > 0 or rx > 0
    z, y = r // ny, r % ny
    row = volume[z, y]
    lim = limit[z // cz, y // cy]
    k = pos
    for x in range(nx):
        h = row[x]
        if not h > lim[cell_x[x]]:
            continue
        if check:
            peak = True
            for zz in range(max(z - rz, 0), min(z + rz + 1, nz)):
                for yy in range(max(y - ry, 0), min(y + ry + 1, ny)):
                    other = volume[zz, yy]
                    for xx in range(max(x - rx, 0), min(x + rx + 1, nx)):
                        if other[xx] > h:
                            peak = False
                            break
                    if not peak:
                        break
                if not peak:
                    break
            if not peak:
                continue
        if fill:
            out[k] = r * nx + x
        k += 1
    return k


@njit(nogil=True)
def _above_rows(volume, limit, cells, cell_x, box, first, out, fill, start, stop):
    """:func:`_row_peaks` of rows ``start .. stop``: counted into ``first[r]`` (``fill``
    False), or their flat indices written to `out` from position ``first[r]`` on
    (``fill`` True)."""
    for r in range(start, stop):
        if fill:
            _row_peaks(volume, limit, cells, cell_x, box, r, out, first[r], True)
        else:
            first[r] = _row_peaks(volume, limit, cells, cell_x, box, r, out, 0, False)


@njit(nogil=True)
def _above_ranges(volume, limit, cells, cell_x, box, bounds, cap, out, found, first, last):
    """:func:`_row_peaks` of the row ranges ``first .. last`` (range ``k``: rows
    ``bounds[k] .. bounds[k + 1]``) in one pass: range ``k`` writes its pixels to
    ``out[k * cap:]`` and their number to ``found[k]``, or -1 when a row might not
    fit in ``cap`` any more (a row writes at most ``nx``)."""
    nx = volume.shape[2]
    for k in range(first, last):
        base = k * cap
        pos = base
        for r in range(bounds[k], bounds[k + 1]):
            if pos + nx > base + cap:
                pos = base - 1
                break
            pos = _row_peaks(volume, limit, cells, cell_x, box, r, out, pos, True)
        found[k] = pos - base


#: :func:`_above`: pixels per candidate its single pass makes room for (maxima of
#: boxes of 3 x 3 pixels or more are at most one in 4 pixels, bar ties); a range of
#: rows with more is scanned again in two passes
_ABOVE_ROOM = 4


def _above(volume, limit, cells, box):
    """Flat indices of the pixels of `volume` above their cell's `limit` (and maxima of
    their ``box``), increasing (:func:`_row_peaks`): one pass over ranges of rows, each
    writing to room of its own (:func:`_above_ranges`; on threads for large frames), or
    where that overflows, counted per row, then filled (:func:`_above_rows`)."""
    from spotfit._jit import kernel_threads

    nz, ny, nx = volume.shape
    rows, threaded = nz * ny, volume.size >= PARALLEL_PIXELS
    cell_x = np.arange(nx, dtype=np.int64) // int(cells[2])
    ranges = min(rows, 4 * kernel_threads()) if threaded else 1
    bounds = np.array([k * rows // ranges for k in range(ranges + 1)], np.int64)
    cap = int(np.max(np.diff(bounds))) * nx // _ABOVE_ROOM + nx
    out = np.empty(ranges * cap, np.int64)
    found = np.zeros(ranges, np.int64)
    over_windows(_above_ranges, ranges, volume, limit, cells, cell_x, box, bounds, cap, out, found,
                 threaded=threaded)
    parts = []
    for k in range(ranges):
        if found[k] >= 0:
            parts.append(out[k * cap: k * cap + found[k]])
        else:
            parts.append(_above_two_pass(volume, limit, cells, cell_x, box, bounds[k], bounds[k + 1]))
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def _above_two_pass(volume, limit, cells, cell_x, box, start, stop):
    """:func:`_above` of rows ``start .. stop``: counted per row, then filled."""
    counts = np.zeros(volume.shape[0] * volume.shape[1], np.int64)
    none = np.zeros(0, np.int64)
    _above_rows(volume, limit, cells, cell_x, box, counts, none, False, start, stop)
    first = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=first[1:])
    out = np.empty(int(counts.sum()), np.int64)
    first -= first[start]
    _above_rows(volume, limit, cells, cell_x, box, first, out, True, start, stop)
    return out


def _noise_sd(index, frame_index, background, noise, edge, floor):
    """Standard deviation and skewness of the filtered frame's noise at some pixels.

    ``index`` are the pixels' indices in the block that `background`
    describes, ``frame_index`` the same pixels' indices in the frame (for
    per-pixel camera maps and the edges' folded kernels).  The skewness is
    that of the smoothing kernel applied to Poisson counts (third cumulant
    ``shot * (var - read_var)`` per pixel, in the data's units), ignoring
    the background's small share: it makes the noise of dim backgrounds
    heavy-tailed on the bright side, so that there the threshold is raised
    (:func:`_skewed_threshold`).
    """
    nd = len(index)
    full = (np.zeros_like(index[0]),) * (3 - nd) + tuple(index)
    level = background.at(full)
    var = np.maximum(noise.variance(level, index=frame_index), floor)
    sd = np.sqrt(var * noise.correlation) * edge.white_sd * edge.relative(frame_index)
    # Poisson part of the variance: all of it for a measured model (whose
    # read_var mixes read noise with an unknown camera offset)
    rv = noise.read_var if noise.source == "camera" else 0.0
    if np.ndim(rv):
        rv = np.asarray(rv, np.float64)[tuple(frame_index[-rv.ndim:])]
    k3 = noise.shot * np.maximum(var - np.maximum(rv, 0), 0)
    skew = k3 * edge.kernel_k3 / np.maximum(var * edge.kernel_k2, 1e-300) ** 1.5
    return sd, skew


def _skewed_threshold(threshold, skew):
    """Signal-to-noise ratio with the false-alarm probability that `threshold`
    has for Gaussian noise, for noise of skewness `skew` (the inverse of
    Wilson and Hilferty's cube-root normal approximation of gamma-like
    noise; `threshold` itself for symmetric noise)."""
    g = np.maximum(np.asarray(skew, np.float64), 1e-6)
    x = 2.0 / g * ((1.0 + g / 6.0 * (threshold - g / 6.0)) ** 3 - 1.0)
    return np.where(np.asarray(skew) > 1e-6, x, threshold)


def _max_variance(noise) -> float:
    return float(np.max(noise.read_var)) + (1.0 if noise.shot > 0 else 0.0)


def _subgrid_index(shape) -> list:
    """Per-axis indices of a regular sub-grid with at most ~``_NOISE_SAMPLES`` points."""
    size = int(np.prod(shape))
    step = max(1, int(math.ceil((size / _NOISE_SAMPLES) ** (1.0 / len(shape)))))
    return [np.arange(0, n, step) for n in shape]


def _subgrid(a: np.ndarray) -> np.ndarray:
    """A regular sub-grid of ``a`` (see :func:`_subgrid_index`), flattened."""
    return a[np.ix_(*_subgrid_index(a.shape))].ravel()


@njit(cache=True)
def _is_box_maximum(volume, coords, rz, ry, rx):
    """For each ``(z, y, x)`` in ``coords``: is it >= every pixel of the box of
    half-widths ``(rz, ry, rx)`` around it (the box clipped at the edges)?"""
    nz, ny, nx = volume.shape
    out = np.ones(coords.shape[0], dtype=np.bool_)
    for i in range(coords.shape[0]):
        z, y, x = coords[i, 0], coords[i, 1], coords[i, 2]
        h = volume[z, y, x]
        for zz in range(max(z - rz, 0), min(z + rz + 1, nz)):
            for yy in range(max(y - ry, 0), min(y + ry + 1, ny)):
                for xx in range(max(x - rx, 0), min(x + rx + 1, nx)):
                    if volume[zz, yy, xx] > h:
                        out[i] = False
                        break
                if not out[i]:
                    break
            if not out[i]:
                break
    return out


#: more neighbour offsets than this: :func:`_close_pairs` asks a k-d tree instead
MAX_PAIR_OFFSETS = 256


def _close_pairs(coords, shape, radii) -> np.ndarray:
    """Pairs ``(i, j)`` of rows of ``coords`` (distinct integer positions, ``(n, d)``,
    in an array of ``shape``) closer than ``radii`` on every axis: ``|d_a| <= r_a - 1``.

    Each pair once, in no particular order, ``(m, 2)``.  The neighbours are looked up
    offset by offset among the sorted flat positions, so that detection need not
    import ``scipy.spatial`` (which took longer than fitting a small frame); with more
    than :data:`MAX_PAIR_OFFSETS` offsets (very large radii), by
    ``scipy.spatial.cKDTree.query_pairs`` in units of the radii (a Chebyshev distance
    of at most ``1 - 0.5 / max(radii)``, the same pairs for integer positions).
    """
    import itertools

    coords = np.asarray(coords, dtype=np.int64)
    spans = [range(-(int(r) - 1), int(r)) for r in radii]
    if math.prod(len(s) for s in spans) > 2 * MAX_PAIR_OFFSETS:
        from scipy.spatial import cKDTree

        scaled = coords / np.asarray(radii, dtype=float)
        return cKDTree(scaled).query_pairs(1 - 0.5 / max(radii), p=np.inf, output_type="ndarray")
    shape = np.asarray(shape, dtype=np.int64)
    keys = np.ravel_multi_index(tuple(coords.T), tuple(shape))
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    zero = (0,) * coords.shape[1]
    found = [np.zeros((0, 2), dtype=np.intp)]
    for offset in itertools.product(*spans):
        if offset <= zero:  # each pair once: the lexicographically positive offset of the two
            continue
        moved = coords + np.asarray(offset, dtype=np.int64)
        inside = np.flatnonzero(np.all((moved >= 0) & (moved < shape), axis=1))
        if inside.size == 0:
            continue
        k = np.ravel_multi_index(tuple(moved[inside].T), tuple(shape))
        at = np.minimum(np.searchsorted(ordered, k), len(ordered) - 1)
        hit = ordered[at] == k
        found.append(np.column_stack([inside[hit], order[at[hit]]]))
    return np.concatenate(found)


def _local_maxima(filtered: np.ndarray, cand: np.ndarray, radii) -> np.ndarray:
    """Which candidate pixels are maxima of their neighbourhood.

    With equal `radii` on all axes and ``cand = flatnonzero(filtered > t)``
    this finds the peaks of ``skimage.feature.peak_local_max(filtered,
    min_distance=r, threshold_abs=t, exclude_border=False)``: a pixel is a
    peak if it equals the maximum of the box of half-widths `radii` around
    it (the box clipped at the image edge), and of equal peaks closer than
    the radius on every axis the first in raster order is kept.  Only the
    candidates are examined instead of running a maximum filter over the
    whole image (~10x faster on a 2048 x 2048 frame).

    Parameters
    ----------
    filtered : ndarray
        Filtered image.
    cand : (m,) ndarray of int
        Flat indices of the candidate pixels, increasing.
    radii : sequence of int
        Half-width of the neighbourhood per axis, in pixels (>= 1).

    Returns
    -------
    (n,) ndarray of int
        Positions in `cand` of the peaks, by decreasing height (ties in
        raster order).
    """
    if cand.size == 0:
        return np.empty(0, dtype=np.intp)
    idx = np.unravel_index(cand, filtered.shape)
    volume = filtered.reshape((1,) * (3 - filtered.ndim) + filtered.shape)  # as (nz, ny, nx)
    rz, ry, rx = ((0,) * (3 - len(radii)) + tuple(int(r) for r in radii))
    coords = np.stack([np.zeros_like(idx[0])] * (3 - filtered.ndim) + list(idx), axis=1)
    is_max = _is_box_maximum(volume, np.ascontiguousarray(coords, dtype=np.int64), rz, ry, rx)
    peaks = np.flatnonzero(is_max)
    return peaks[_order_peaks(filtered, cand[peaks], radii)]


def _order_peaks(filtered: np.ndarray, cand: np.ndarray, radii) -> np.ndarray:
    """The second step of :func:`_local_maxima`, for candidates that are all maxima of
    their box (flat indices, increasing): their positions in `cand` by decreasing
    height (ties in raster order), of equal peaks closer than the radii the first."""
    if cand.size == 0:
        return np.empty(0, dtype=np.intp)
    idx = np.unravel_index(cand, filtered.shape)
    height = filtered.ravel()[cand]
    peaks = np.argsort(-height, kind="stable")
    if max(radii) > 1 and len(peaks) > 1:
        # Only equal peaks can be closer than the radii: keep the first.  In
        # units of the radius per axis, "|d_a| <= r_a - 1 on every axis" is a
        # Chebyshev distance below 1 - 0.5 / max(radii) for integer d.  Pairs are
        # looked for among the peaks whose height another peak shares (sorted by
        # height, they have an equal neighbour): usually none.
        ordered = height[peaks]
        tied = np.zeros(len(peaks), dtype=bool)
        tied[1:] = ordered[1:] == ordered[:-1]
        tied[:-1] |= tied[1:]
        tied = np.flatnonzero(tied)
        pairs = np.zeros((0, 2), dtype=np.int64)
        if len(tied) > 1:
            pairs = tied[_close_pairs(np.column_stack([i[peaks[tied]] for i in idx]), filtered.shape, radii)]
        if len(pairs):
            keep = np.ones(len(peaks), dtype=bool)
            for i, j in sorted(map(tuple, np.sort(pairs, axis=1))):
                if keep[i]:
                    keep[j] = False
            peaks = peaks[keep]
    return peaks
