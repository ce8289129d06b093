"""Local background and pixel noise of a frame: what a spot is compared with.

Detection asks, at every pixel, whether the light above the local background
is more than the noise can explain.  Both halves live here:

* :class:`NoiseModel` -- the variance of a pixel as a function of its
  expected background level, ``var = read_var + shot * max(level, 0)``.
  With a calibrated camera it is the camera's noise model
  (:meth:`NoiseModel.from_camera`: Poisson shot noise, EM excess factor,
  read noise, per pixel for sCMOS maps).  Without one it is measured on the
  frame (:func:`estimate_noise`) from fourth-order pixel differences, which
  smooth signals such as spots and cells barely touch, binned by background
  level: the photon-transfer curve of the frame.  Spots cannot inflate
  either: the camera model does not look at the data, and the measurement
  leaves out the pixels of spots and uses statistics that tolerate the
  rest.
* :func:`local_background` -- the expected background level at every pixel,
  following cells, nuclei and illumination on scales above ~3 PSF sigmas but
  not spots: a masked mean over a neighbourhood of ~3 sigma, from which the
  pixels of spots (more than ``CLIP`` noise standard deviations above the
  background, and their neighbours) are left out, iterated from a lower
  envelope.  It is computed on a coarse grid of cells ~1.5 sigma wide and
  interpolated, so it costs a few passes over the frame.

Both are local: a block of a frame with a halo of :func:`halo` pixels gives
the same values as the whole frame, provided the same :class:`NoiseModel`
is used (without a camera, estimate it once per frame and pass it along).

Units are those of the frame: photons with a calibrated camera, ADU above
the baseline otherwise.  Arrays are in array order (``(ny, nx)`` or
``(nz, ny, nx)``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Union

import numpy as np

from spotfit._jit import njit, over_windows
from spotfit.errors import SpotfitInputError
from spotfit.filters import PARALLEL_PIXELS

__all__ = ["NoiseModel", "estimate_noise", "local_background", "halo", "cell_size", "CLIP"]

#: cells whose mean is more than this many pixel-noise standard deviations
#: above the background are left out of the background estimate as spots ...
CLIP = 2.0
#: ... and so are the cells within this many PSF sigmas of them (their tails)
DILATE = 1.0
#: background neighbourhood: Gaussian weights of this many PSF sigmas
SCALE = 3.0
#: cell size of the coarse grid, in PSF sigmas (rounded; at least 1 px)
CELL = 2.0
#: where less than this fraction of a neighbourhood's weight is left after
#: clipping, the lower envelope fills in
MIN_COVERAGE = 0.25
#: the lower envelope: grey opening over boxes reaching this many PSF sigmas
#: (rounded to whole cells, at least one) on each side of a cell
ENVELOPE = 2.0

# Clipped second moment: |d| < 4 s keeps 99.994 % of Gaussian noise and
# 99.89 % of its variance.
_CLIP_SIGMAS = 4.0
_CLIP_VARIANCE = 0.99893
_MAD_TO_SIGMA = 1.4826
# median minus lower quartile of a normal distribution, in standard deviations
_IQR_HALF = 0.6745
# fewest pixels per half of the levels to measure the noise correlation
_MIN_CORRELATION = 200
# pixels sampled for the noise measurement
_NOISE_SAMPLES = 150_000
# a pixel whose cell mean is this many standard errors from the smooth
# background is not used for the photon-transfer fit
_STRAY = 3.0
# rounds of background estimate + photon-transfer fit
_NOISE_ITERATIONS = 1
# fewest pixels per background-level bin of the photon-transfer fit
_MIN_BIN = 100
_MAX_BINS = 12
# pixels used for the photon-transfer fit
_FIT_SAMPLES = 60_000

Array = Union[float, np.ndarray]


# ---------------------------------------------------------------------------
# noise model
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NoiseModel:
    """Pixel variance as a function of the expected level: ``read_var + shot * max(level, 0)``.

    Parameters
    ----------
    read_var : float or (ny, nx) ndarray
        Variance at level 0, in data units squared (photons^2 or ADU^2):
        read noise; a per-pixel map for sCMOS cameras.  Without a camera
        it may be negative (an unknown camera offset is part of the level);
        :meth:`variance` is floored at ``floor``.
    shot : float
        Variance per unit of level: 1 for photons, 2 for an EMCCD (excess
        noise factor), the ADU per photoelectron for a measured model.
    floor : float
        Smallest variance returned, data units squared (> 0).
    source : str
        ``"camera"`` or ``"measured"``: where the model comes from.
    correlation : float
        Variance of the detection filter's output over the variance the
        model predicts for independent pixels (>= 1).  1 for a camera;
        measured images whose noise is correlated between neighbouring
        pixels (interpolated, binned, denoised data) have more noise at the
        scale of a spot than their pixel differences show.
    """

    read_var: Array = 0.0
    shot: float = 1.0
    floor: float = 1e-12
    source: str = "camera"
    correlation: float = 1.0

    @classmethod
    def from_camera(cls, camera) -> "NoiseModel":
        """The camera's noise model in photons (``camera`` must be calibrated)."""
        if not camera.calibrated:
            raise SpotfitInputError("a noise model from the camera needs its `gain`", parameter="gain")
        rv = camera.read_variance()
        floor = 1e-6 * max(float(np.max(rv)), 1.0)
        return cls(read_var=rv, shot=float(camera.excess_noise), floor=floor, source="camera")

    def variance(self, level: np.ndarray, index=None) -> np.ndarray:
        """Expected variance of pixels at background ``level``.

        Parameters
        ----------
        level : ndarray
            Expected background, data units; the frame's shape (or, with
            `index`, the shape of the indexed pixels).
        index : tuple of arrays, optional
            Pixel indices of `level` into the frame (used to pick a
            per-pixel ``read_var`` map).

        Returns
        -------
        ndarray of float64
        """
        rv = self.read_var
        if np.ndim(rv) > 0:
            rv = np.asarray(rv, dtype=np.float64)
            if index is not None:
                rv = rv[tuple(index[-rv.ndim:])]
        var = rv + self.shot * np.maximum(np.asarray(level, dtype=np.float64), 0.0)
        return np.maximum(var, self.floor)

    def scaled(self, factor: float) -> "NoiseModel":
        """The same noise for data multiplied by `factor`."""
        rv = self.read_var
        rv = rv * factor**2 if np.ndim(rv) == 0 else np.asarray(rv, float) * factor**2
        return replace(self, read_var=rv, shot=self.shot * factor, floor=self.floor * factor**2)

    def as_dict(self) -> dict:
        """Scalar summary for provenance records."""
        rv = self.read_var
        return {
            "source": self.source,
            "read_var": float(rv) if np.ndim(rv) == 0 else f"map{np.shape(rv)}",
            "shot": float(self.shot),
            "correlation": float(self.correlation),
        }


# ---------------------------------------------------------------------------
# local background
# ---------------------------------------------------------------------------
def halo(sigma) -> tuple:
    """Pixels per axis beyond which a pixel does not change the local background.

    The background of a cell depends on the cells within the grey opening
    (twice its half-width), the dilation of spots and the Gaussian
    neighbourhood; each pixel's value interpolates the two nearest cells.  A
    block that starts at a multiple of :func:`cell_size` and is padded by
    this many pixels of the frame (fewer only where the frame ends) has, in
    its interior, the background of the whole frame for the same noise
    model.
    """
    sig = np.atleast_1d(np.asarray(sigma, dtype=float))
    out = []
    for s in sig:
        c = cell_size(s)
        env = max(1, int(round(ENVELOPE * s / c)))
        reach = int(math.ceil(DILATE * s / c))
        k_half = int(math.ceil(3.0 * SCALE * s / c))
        cells = 2 * env + reach + k_half + 2  # + interpolation and the detection screen
        out.append(int(cells * c + c))
    return tuple(out)


def cell_size(sigma: float) -> int:
    """Side of the background's coarse cells along an axis of PSF sigma `sigma`, px."""
    return max(1, int(round(CELL * float(sigma))))


_cell = cell_size


def local_background(frame, sigma, noise: NoiseModel) -> np.ndarray:
    """Expected background level at every pixel, following structure but not spots.

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        One frame, photons or ADU above the baseline.
    sigma : float or sequence of float
        PSF sigma in pixels, scalar or per axis in array order.
    noise : NoiseModel
        Noise model of the frame (decides which pixels are too bright to be
        background).

    Returns
    -------
    ndarray of float32, shape of `frame`

    Notes
    -----
    On a coarse grid of cells ~``CELL`` sigma wide: start from a lower
    envelope (grey opening of the cell means over ``ENVELOPE`` sigmas,
    smoothed), then ``ITERATIONS`` times: leave out every pixel brighter
    than the current background (at least the envelope) plus ``CLIP`` noise
    standard deviations, and the pixels within ``DILATE`` sigmas of it, and
    take the Gaussian-weighted mean (``SCALE`` sigmas) of the remaining
    pixels; where clipping left less than ``MIN_COVERAGE`` of the weight (a
    bright spot, a crowd of spots), the smoothed envelope fills in.  The
    coarse result is interpolated (multilinearly) to every pixel.
    """
    data = _as_volume(frame)
    sig = _sigmas(sigma, np.ndim(frame))
    return Background.estimate(data, sig, noise).full().reshape(np.shape(frame))


def _as_volume(frame) -> np.ndarray:
    a = np.asarray(frame, dtype=np.float32)
    return np.ascontiguousarray(a.reshape((1,) * (3 - a.ndim) + a.shape))


def _sigmas(sigma, ndim) -> tuple:
    """Sigma per axis of the (nz, ny, nx) volume (z sigma 0 for a 2D frame)."""
    sig = np.atleast_1d(np.asarray(sigma, dtype=float))
    if sig.size == 1:
        sig = np.repeat(sig, ndim)
    return (0.0,) * (3 - ndim) + tuple(float(s) for s in sig)


class Background:
    """The background of a (nz, ny, nx) volume on its coarse grid of cells.

    Attributes
    ----------
    coarse : (mz, my, mx) ndarray of float64
        Background at the cell centres (cell ``i`` covers pixels
        ``i * cell ... (i + 1) * cell - 1``; its centre is at
        ``(i + 0.5) * cell - 0.5``).
    cells : (3,) ndarray of int64
        Cell size per axis, pixels.
    shape : tuple
        Shape of the volume.
    excluded : (mz, my, mx) ndarray of bool
        Cells left out as (parts of) spots.
    means : (mz, my, mx) ndarray of float64
        Mean of the pixels of each cell.
    """

    def __init__(self, coarse, cells, shape, excluded, means):
        self.coarse = coarse
        self.cells = cells
        self.shape = shape
        self.excluded = excluded
        self.means = means

    @classmethod
    def estimate(cls, data: np.ndarray, sig: tuple, noise: NoiseModel) -> "Background":
        """Estimate the background of a (nz, ny, nx) float32 volume (see :func:`local_background`)."""
        cells = np.array([_cell(s) if s > 0 else 1 for s in sig], np.int64)
        coarse_shape = tuple(-(-n // int(c)) for n, c in zip(data.shape, cells))
        sums, counts = _cell_sums(data, cells, coarse_shape)
        scale = [SCALE * s / c for s, c in zip(sig, cells)]
        half = np.array([max(1, int(round(ENVELOPE * s / c))) if s > 0 else 0 for s, c in zip(sig, cells)],
                        np.int64)
        reach = np.array([int(math.ceil(DILATE * s / c)) if s > 0 else 0 for s, c in zip(sig, cells)],
                         np.int64)
        kernels, k_half = _gauss_kernels(scale)
        read_var = _cell_read_variance(noise, cells, data.shape, coarse_shape)
        coarse, excluded, means = _coarse_in_strips(
            sums, counts, read_var, float(noise.shot), float(noise.correlation), float(noise.floor),
            half, reach, kernels, k_half, CLIP, MIN_COVERAGE)
        return cls(coarse, cells, data.shape, excluded, means)

    def full(self) -> np.ndarray:
        """Background at every pixel (float32, the volume's shape)."""
        out = np.zeros(self.shape, np.float32)
        _add_interpolated(out, self.coarse, self.cells, 1.0, 0.0)
        return out

    def subtract_from(self, image: np.ndarray, shift: float = 0.0) -> None:
        """``image -= background - shift``, in place ((nz, ny, nx) float32)."""
        _add_interpolated(image, self.coarse, self.cells, -1.0, shift)

    def at(self, index) -> np.ndarray:
        """Background at pixels ``(z, y, x)`` (integer arrays), float32."""
        z, y, x = (np.ascontiguousarray(i, dtype=np.int64) for i in index)
        return _interpolate_at(self.coarse, self.cells, z, y, x)

    def box(self, axes) -> np.ndarray:
        """Background at every pixel of the box ``z x y x x`` of pixels ``axes``
        (three 1-d integer arrays), float32 ``(len(z), len(y), len(x))``: the
        numbers :meth:`at` gives at those pixels, with the interpolation weights
        computed once per row and column."""
        return _interpolate_box(self.coarse, self.cells, *(np.asarray(a, np.int64) for a in axes))

    def boxes(self, axes) -> np.ndarray:
        """:meth:`box` of ``k`` boxes of one shape at once: ``axes`` are three
        ``(k, n)`` integer arrays (a box's pixels per row); float32
        ``(k, nz, ny, nx)``, the same numbers."""
        return _interpolate_boxes(self.coarse, self.cells, *(np.asarray(a, np.int64) for a in axes))

    def per_pixel(self, cell_values) -> np.ndarray:
        """Values of the cells (e.g. :attr:`excluded`, :attr:`means`) at each pixel."""
        out = cell_values
        for axis, c in enumerate(self.cells):
            out = np.repeat(out, int(c), axis=axis)
        return out[tuple(slice(0, n) for n in self.shape)]


def _cell_read_variance(noise: NoiseModel, cells, shape, coarse_shape) -> np.ndarray:
    """The noise model's ``read_var`` per cell (a map is averaged over each cell)."""
    rv = noise.read_var
    if np.ndim(rv) == 0:
        return np.full(coarse_shape, float(rv))
    rv = np.asarray(rv, dtype=np.float32)
    rv3 = np.broadcast_to(rv.reshape((1,) * (3 - rv.ndim) + rv.shape), shape)
    s, c = _cell_sums(np.ascontiguousarray(rv3), cells, coarse_shape)
    return s / np.maximum(c, 1.0)


def _gauss_kernels(scale):
    """Gaussian kernels (one row per axis, sigma in cells, truncated at 3 sigma) and
    their half-widths; an axis of scale 0 gets the identity."""
    halves = np.array([int(math.ceil(3.0 * s)) if s > 0 else 0 for s in scale], np.int64)
    kernels = np.zeros((len(scale), 2 * int(halves.max()) + 1))
    for a, (s, h) in enumerate(zip(scale, halves)):
        if s > 0:
            k = np.exp(-0.5 * (np.arange(-h, h + 1) / s) ** 2)
            kernels[a, : 2 * h + 1] = k / k.sum()
        else:
            kernels[a, 0] = 1.0
    return kernels, halves


def _coarse_background(sums, counts, read_var, shot, correlation, floor, half, reach, kernels,
                       k_half, clip, min_coverage):
    """The background on the coarse grid (see :meth:`Background.estimate`).

    Returns the background per cell, the cells left out as spots and the
    cell means.  NumPy, not compiled: the grid has a few cells per
    PSF width, and compiling this took a third of a first run's compile time.
    """
    means = sums / np.maximum(counts, 1.0)
    # every array below is finite where the sums are (cell means, their extremes, 0/1
    # flags, sums of finite values): checked once, not by each filter pass
    finite = bool(np.isfinite(means).all())
    # 1. lower envelope: grey opening of the cell means
    envelope = means
    for axis in range(3):
        envelope = _filter_axis(envelope, axis, kernels[axis], half[axis], True, 1, finite=finite)
    for axis in range(3):
        envelope = _filter_axis(envelope, axis, kernels[axis], half[axis], True, 2, finite=finite)
    # 2. spots: cells brighter than the envelope by `clip` pixel-noise
    #    standard deviations, dilated by `reach` cells
    # (the steps cell by cell in blocks of cells that stay in the processor's cache,
    # :func:`_cell_blocks`: the same operations on each cell)
    blocks = _cell_blocks(means.shape)
    bright = np.empty(means.shape)
    for b in blocks:
        env = envelope[b]
        var = np.maximum(read_var[b] + shot * np.maximum(env, 0.0), floor) * correlation
        bright[b] = means[b] > env + clip * np.sqrt(var)
    for axis in range(3):
        bright = _filter_axis(bright, axis, kernels[axis], reach[axis], True, 2, finite=True)
    # 3. Gaussian-weighted means (normalised convolutions) of the other cells,
    #    of all cells' envelope, and the weights themselves
    kept_sum, kept_count, env_sum = (np.empty(means.shape) for _ in range(3))
    excluded = np.empty(means.shape, bool)
    for b in blocks:
        out = np.greater(bright[b], 0, out=excluded[b])
        kept_sum[b] = np.where(out, 0.0, sums[b])
        kept_count[b] = np.where(out, 0.0, counts[b])
        np.multiply(envelope[b], counts[b], out=env_sum[b])
    for axis in range(3):
        if k_half[axis] > 0:
            kept_sum = _filter_axis(kept_sum, axis, kernels[axis], k_half[axis], False, 0, finite=finite)
            kept_count = _filter_axis(kept_count, axis, kernels[axis], k_half[axis], False, 0, finite=finite)
            env_sum = _filter_axis(env_sum, axis, kernels[axis], k_half[axis], False, 0, finite=finite)
    weight = np.broadcast_to(np.maximum(_filtered_counts(counts, kernels, k_half), 1e-12), means.shape)
    coarse = np.empty(means.shape)
    for b in blocks:
        w, count = weight[b], kept_count[b]
        start = env_sum[b] / w
        t = np.clip(count / w / min_coverage, 0.0, 1.0)
        kept = count > 0
        value = np.where(kept, t * (kept_sum[b] / np.where(kept, count, 1.0)) + (1.0 - t) * start, start)
        # 4. never below the envelope: at sharp edges (a cell's, a nucleus')
        #    the smooth mean lags behind, the envelope does not
        np.maximum(value, envelope[b], out=coarse[b])
    return coarse, excluded, means


def _cell_blocks(shape) -> list:
    """Index tuples of blocks of about :data:`FILTER_BLOCK` cells of a grid of ``shape``:
    ranges along its outermost axis of more than one cell."""
    axis = next((a for a in range(len(shape)) if shape[a] > 1), 0)
    size = max(int(shape[axis]), 1)
    step = max(1, min(size, FILTER_BLOCK // max(1, int(np.prod(shape)) // size)))
    return [(slice(None),) * axis + (slice(lo, min(lo + step, size)),) for lo in range(0, size, step)]


#: coarse grids of at least this many cells are estimated in strips, one per
#: thread (:func:`in_strips`); a 2048 x 2048 frame at sigma 1.3 px has
#: 683 x 683 cells, a 256 x 256 one 86 x 86 (not worth waking the threads)
PARALLEL_CELLS = 1 << 16


def _coarse_in_strips(sums, counts, read_var, shot, correlation, floor, half, reach, kernels,
                      k_half, clip, min_coverage, strips=None):
    """:func:`_coarse_background` of the grid in strips (:func:`in_strips`); the same
    numbers.  Each strip is computed with a margin of ``2 half + reach + k_half``
    cells on each side (as far as an edge of the strip can reach through the
    opening, the dilation and the weighted means) and only its core is kept."""
    axis = strip_axis(sums.shape)
    margin = 2 * int(half[axis]) + int(reach[axis]) + int(k_half[axis])
    return in_strips(
        lambda s, c, r: _coarse_background(s, c, r, shot, correlation, floor, half, reach, kernels,
                                           k_half, clip, min_coverage),
        (sums, counts, read_var), margin, strips)


def strip_axis(shape) -> int:
    """The axis of a (nz, ny, nx) grid that :func:`in_strips` cuts: the longer of planes and rows."""
    return 0 if shape[0] > shape[1] else 1


def in_strips(func, arrays, margin: int, strips=None):
    """``func(*arrays)`` (arrays of one (nz, ny, nx) shape; returns a tuple of arrays of
    that shape, or one array) computed in strips along :func:`strip_axis`, on numba's
    threads (:func:`spotfit._jit.over_windows`): each strip with ``margin`` more
    cells on each side, of which only its core is kept.  The same numbers as in one
    piece when no output value depends on inputs more than ``margin`` cells away
    along that axis.  ``strips``: how many (default: the kernels' threads,
    :func:`spotfit._jit.kernel_threads`, for grids of :data:`PARALLEL_CELLS` cells
    or more, else 1); for tests.
    """
    from spotfit._jit import kernel_threads

    shape = arrays[0].shape
    axis = strip_axis(shape)
    n = shape[axis]
    if strips is None:
        strips = kernel_threads() if arrays[0].size >= PARALLEL_CELLS else 1
    strips = max(1, min(int(strips), n))
    if strips == 1:
        return func(*arrays)
    lead = (slice(None),) * axis
    outputs = []

    def run(first, last):
        for k in range(first, last):
            lo, hi = k * n // strips, (k + 1) * n // strips
            a, b = max(lo - margin, 0), min(hi + margin, n)
            part = func(*(x[lead + (slice(a, b),)] for x in arrays))
            single = not isinstance(part, tuple)
            part = (part,) if single else part
            if not outputs:
                with lock:
                    if not outputs:
                        outputs.extend(np.empty(shape, p.dtype) for p in part)
                        outputs.append(single)
            for out, value in zip(outputs, part):
                out[lead + (slice(lo, hi),)] = value[lead + (slice(lo - a, hi - a),)]

    import threading

    lock = threading.Lock()
    over_windows(run, strips, threaded=True)
    return outputs[0] if outputs[-1] else tuple(outputs[:-1])


def _filtered_counts(counts, kernels, k_half):
    """``counts`` (pixels per cell) filtered like the sums in :func:`_coarse_background`.

    The cells tile a box, so ``counts`` is the outer product of the pixels per
    cell along each axis, and so is its separable filtering: three 1D passes
    instead of passes over the whole grid.
    """
    total = float(counts.flat[0])
    if total <= 0:
        return np.zeros_like(counts)
    out = np.ones((1, 1, 1))
    for axis in range(3):
        index = [0, 0, 0]
        index[axis] = slice(None)
        profile = counts[tuple(index)] / (total if axis < 2 else 1.0)  # product = counts
        if k_half[axis] > 0:
            profile = _filter_axis(profile.reshape(-1, 1, 1), 0, kernels[axis], k_half[axis], False, 0).ravel()
        shape = [1, 1, 1]
        shape[axis] = -1
        out = out * profile.reshape(shape)
    return out


@njit(nogil=True)
def _cell_sums_rows(data, cells, sums, counts, start, stop):
    """Sum and count of the pixels of every coarse cell, into `sums` and `counts`
    (zeros of the coarse grid's shape); rows of cells ``start .. stop`` of the
    ``mz * my`` rows."""
    nz, ny, nx = data.shape
    cz, cy, cx = cells[0], cells[1], cells[2]
    mz, my, mx = sums.shape
    for r in range(start, stop):
        iz, iy = r // my, r % my
        for z in range(iz * cz, min((iz + 1) * cz, nz)):
            for y in range(iy * cy, min((iy + 1) * cy, ny)):
                row = data[z, y]
                for jx in range(mx):
                    x1 = min((jx + 1) * cx, nx)
                    acc = 0.0
                    for x in range(jx * cx, x1):
                        acc += row[x]
                    sums[iz, iy, jx] += acc
                    counts[iz, iy, jx] += x1 - jx * cx


def _cell_sums(data, cells, coarse_shape):
    """Sum and count of the pixels of every coarse cell (:func:`_cell_sums_rows`, on
    threads for large frames)."""
    sums = np.zeros(coarse_shape)
    counts = np.zeros(coarse_shape)
    over_windows(_cell_sums_rows, coarse_shape[0] * coarse_shape[1], data, cells, sums, counts,
                 threaded=data.size >= PARALLEL_PIXELS)
    return sums, counts


def _filter_axis(a, axis, kernel, half, nearest, minmax, engine=None, finite=None):
    """One separable pass along `axis` of a 3D float64 array: correlation with
    ``kernel[:2 half + 1]`` (minmax 0), or the minimum (1) / maximum (2) over
    ``2 half + 1`` cells.  Edges: nearest value (``nearest``, always for the
    minimum and maximum) or zeros.  An axis of length 1 is left as it is.

    The same numbers as ``scipy.ndimage.correlate1d`` (``mode="nearest"`` or
    ``"constant"``), ``minimum_filter1d`` and ``maximum_filter1d``
    (``mode="nearest"``), computed with NumPy in the same order of operations
    (tests/test_background.py checks they are equal bit for bit): importing
    ``scipy.ndimage`` took longer than a small frame's whole fit.  A kernel that
    is not symmetric, or values that are not finite, go to ``scipy.ndimage``, and so
    do correlations once ``scipy.ndimage`` is imported (joint fits import it), being the
    faster of the two then (``engine``: ``None`` decides so, ``"numpy"`` forces NumPy
    where it applies, for tests).  ``finite``: whether every value of ``a`` is finite,
    when the caller knows (else it is checked; a pass over ``a``).

    The minimum and maximum take the window within the array at its edges (the same
    as the nearest value repeated: an extreme of a repeated value is that value), no
    padded copy.
    """
    half = int(half)
    if half == 0 or a.shape[axis] == 1:
        return a
    weights = np.asarray(kernel[: 2 * half + 1], dtype=np.float64)
    # ndimage's test for a symmetric kernel, whose sum it takes pairwise from the centre
    symmetric = bool(np.all(np.abs(weights[half + 1:] - weights[half - 1::-1]) <= np.finfo(float).eps))
    if not (symmetric or minmax) or (engine is None and not minmax and "scipy.ndimage" in sys.modules) \
            or not (np.isfinite(a).all() if finite is None else finite):
        # (correlations: ndimage is the faster once imported; minima and maxima: NumPy,
        # ~1.5-2.5x faster than ndimage's on a 2048 x 2048 frame's grid of cells)
        return _filter_axis_ndimage(a, axis, weights, half, nearest, minmax)
    n = a.shape[axis]
    a = np.asarray(a, dtype=np.float64)
    lead = (slice(None),) * axis  # slices along `axis` itself: no transposed copies

    def part(start, stop):
        return a[lead + (slice(start, stop),)]

    if minmax:  # cell i: the extreme of cells max(i - half, 0) .. min(i + half, n - 1)
        extreme = np.minimum if minmax == 1 else np.maximum
        out = a.copy()
        for j in range(1, min(half, n - 1) + 1):
            o = out[lead + (slice(0, n - j),)]
            extreme(o, part(j, n), out=o)  # the cell j further on
            o = out[lead + (slice(j, n),)]
            extreme(o, part(0, n - j), out=o)  # the cell j before
        return out

    if nearest:
        first, last = part(0, 1), part(n - 1, n)
    else:
        first = last = np.zeros(a.shape[:axis] + (1,) + a.shape[axis + 1:])
    padded = np.concatenate([np.repeat(first, half, axis), a, np.repeat(last, half, axis)], axis)
    out = np.empty(a.shape)
    # correlations in blocks of about :data:`FILTER_BLOCK` cells along the outermost axis of
    # more than one cell (`axis` itself too: a block then reads its margin of the padded
    # array): a block's passes stay in the processor's cache; each cell's operations are
    # the same
    block = next(b for b in range(a.ndim) if a.shape[b] > 1)
    size = a.shape[block]
    step = max(1, min(size, FILTER_BLOCK // max(1, a.size // size)))
    outer = (slice(None),) * block
    pair = np.empty(a.shape[:block] + (step,) + a.shape[block + 1:])
    for lo in range(0, size, step):
        hi = min(lo + step, size)
        if block == axis:
            def shifted(j, lo=lo, hi=hi):  # the block moved by j cells along `axis` (-half .. half)
                return padded[outer + (slice(half + j + lo, half + j + hi),)]
        else:
            rows = padded[outer + (slice(lo, hi),)]

            def shifted(j, rows=rows):
                return rows[lead + (slice(half + j, half + j + n),)]

        o = out[outer + (slice(lo, hi),)]
        # (the operations of one expression per cell, into arrays made once)
        np.multiply(shifted(0), weights[half], out=o)
        p = pair[outer + (slice(0, hi - lo),)]
        for j in range(-half, 0):
            np.add(shifted(j), shifted(-j), out=p)
            p *= weights[half + j]
            o += p
    return out


#: cells per block of :func:`_filter_axis` (a block's arrays fit in a core's cache)
FILTER_BLOCK = 1 << 14


def _filter_axis_ndimage(a, axis, weights, half, nearest, minmax):
    """:func:`_filter_axis` by ``scipy.ndimage`` (kernels that are not symmetric, values
    that are not finite)."""
    from scipy import ndimage

    if minmax == 0:
        return ndimage.correlate1d(a, weights, axis=axis,
                                   mode="nearest" if nearest else "constant", cval=0.0)
    extreme = ndimage.minimum_filter1d if minmax == 1 else ndimage.maximum_filter1d
    return extreme(a, 2 * half + 1, axis=axis, mode="nearest")


def _box_filter(a, half, minimum):
    """Separable minimum (or maximum) over boxes of ``2 half + 1`` cells (nearest edges)."""
    out = np.ascontiguousarray(a, dtype=np.float64)
    for axis, h in enumerate(half):
        if h > 0 and out.shape[axis] > 1:
            out = _filter_axis(out, axis, np.zeros(1), int(h), True, 1 if minimum else 2)
    return out


def gaussian_filter(a, sigma, mode="nearest", truncate=4.0, engine=None):
    """``scipy.ndimage.gaussian_filter(a, sigma, mode=mode, truncate=truncate)``, the same
    numbers (``mode`` ``"nearest"`` or ``"constant"``; an axis with ``sigma`` 0 is not
    filtered), without importing ``scipy.ndimage`` for it: the separable passes of
    :func:`_filter_axis` with ndimage's Gaussian weights, each pass rounded to ``a``'s
    dtype as ndimage's output array is.  ``sigma``: one per axis, px; ``engine``: as
    :func:`_filter_axis` (``"numpy"`` even when ``scipy.ndimage`` is imported, for tests)."""
    a = np.asarray(a)
    out = a
    for axis, s in enumerate(np.broadcast_to(np.asarray(sigma, dtype=float), (a.ndim,))):
        if not s > 1e-15:
            continue
        half = int(truncate * float(s) + 0.5)
        if a.shape[axis] == 1 and half > 0:  # (ndimage sums the edge value's taps: its numbers)
            from scipy import ndimage

            return ndimage.gaussian_filter(a, sigma, mode=mode, truncate=truncate)
        x = np.arange(-half, half + 1)
        weights = np.exp(-0.5 / (s * s) * x**2)  # (ndimage's _gaussian_kernel1d)
        weights = weights / weights.sum()
        out = np.asarray(_filter_axis(out, axis, weights, half, mode == "nearest", 0, engine), dtype=a.dtype)
    return out.copy() if out is a else out


def maximum_filter(a, half):
    """``scipy.ndimage.maximum_filter(a, size=2 * half + 1)`` with ``mode="constant",
    cval=-inf`` (an edge value is its own neighbour then, as with ``"nearest"``), the same
    numbers, without importing ``scipy.ndimage`` for it; ``half``: one per axis."""
    out = np.asarray(a)
    for axis, h in enumerate(half):
        if h > 0 and out.shape[axis] > 1:
            out = _filter_axis(out, axis, np.zeros(1), int(h), True, 2)
    return np.asarray(out, dtype=np.asarray(a).dtype)


def _axis_weights(n, c, m):
    """Interpolation indices and weights along one axis (cell centres at (i + 0.5) c - 0.5)."""
    f = (np.arange(n) + 0.5) / c - 0.5
    lo = np.clip(np.floor(f).astype(np.int64), 0, m - 1)
    hi = np.minimum(lo + 1, m - 1)
    return lo, hi, np.clip(f - lo, 0.0, 1.0)


@njit(nogil=True)
def _add_interpolated_rows(image, coarse, lz, hz, wz, ly, hy, wy, lx, hx, wx, sign, shift, start, stop):
    """In place, for every pixel of rows ``start .. stop`` (of the ``nz * ny``):
    ``image[p] += sign * B(p) + shift`` with ``B`` the coarse grid interpolated
    multilinearly (indices and weights per axis: :func:`_axis_weights`)."""
    nz, ny, nx = image.shape
    mz, my, mx = coarse.shape
    line = np.empty(mx)
    # each row's two corner values per pixel gathered first: the sums below then run
    # vectorised (the same operations per pixel)
    low, high = np.empty(nx), np.empty(nx)
    for r in range(start, stop):
        z, y = r // ny, r % ny
        # interpolate along z and y on the coarse columns, then along x
        for j in range(mx):
            a = coarse[lz[z], ly[y], j] * (1 - wy[y]) + coarse[lz[z], hy[y], j] * wy[y]
            if mz > 1:
                b = coarse[hz[z], ly[y], j] * (1 - wy[y]) + coarse[hz[z], hy[y], j] * wy[y]
                a = a * (1 - wz[z]) + b * wz[z]
            line[j] = a
        for x in range(nx):
            low[x] = line[lx[x]]
            high[x] = line[hx[x]]
        row = image[z, y]
        for x in range(nx):
            row[x] = row[x] + sign * (low[x] * (1 - wx[x]) + high[x] * wx[x]) + shift



def _add_interpolated(image, coarse, cells, sign, shift):
    """:func:`_add_interpolated_rows`, on numba's threads for large frames."""
    weights = [w for n, c, m in zip(image.shape, cells, coarse.shape) for w in _axis_weights(n, int(c), m)]
    over_windows(_add_interpolated_rows, image.shape[0] * image.shape[1], image, coarse, *weights,
                 float(sign), float(shift), threaded=image.size >= PARALLEL_PIXELS)


def _interpolate_at(coarse, cells, zs, ys, xs):
    """The coarse grid interpolated multilinearly at pixels ``(zs, ys, xs)``, float32."""
    out = np.zeros(len(zs))
    corners = []
    for axis, p in enumerate((zs, ys, xs)):
        m = coarse.shape[axis]
        f = (p + 0.5) / cells[axis] - 0.5
        i = np.clip(np.floor(f).astype(np.int64), 0, m - 1)
        if m == 1:  # one cell along the axis (a 2D frame's z): one corner, weight 1
            corners.append(((i, 1.0),))
            continue
        t = np.clip(f - i, 0.0, 1.0)
        corners.append(((i, 1.0 - t), (np.minimum(i + 1, m - 1), t)))
    flat, (my, mx) = coarse.ravel(), coarse.shape[1:]  # (one flat index: ~25% faster)
    for (jz, wz) in corners[0]:
        for (jy, wy) in corners[1]:
            for (jx, wx) in corners[2]:
                out += wz * wy * wx * flat[(jz * my + jy) * mx + jx]
    return out.astype(np.float32)


def _interpolate_box(coarse, cells, zs, ys, xs):
    """:func:`_interpolate_at` at every pixel of the box ``zs x ys x xs`` (1-d pixel
    indices per axis), float32 ``(len(zs), len(ys), len(xs))``: the weights of
    each axis on its own, then the same products and sums per pixel, in the
    same order (the same numbers)."""
    return _interpolate_boxes(coarse, cells, zs[None], ys[None], xs[None])[0]


def _interpolate_boxes(coarse, cells, zs, ys, xs):
    """:func:`_interpolate_box` of ``k`` boxes of one shape at once: ``zs``, ``ys``,
    ``xs`` are ``(k, n)`` pixel indices (a box's per row), float32 ``(k, nz, ny, nx)``;
    the same products and sums per pixel, in the same order (the same numbers)."""
    k = len(zs)
    out = np.zeros((k, zs.shape[1], ys.shape[1], xs.shape[1]))
    corners = []
    for axis, p in enumerate((zs, ys, xs)):
        m = coarse.shape[axis]
        f = (p + 0.5) / cells[axis] - 0.5
        i = np.clip(np.floor(f).astype(np.int64), 0, m - 1)
        shape = [k, 1, 1, 1]
        shape[axis + 1] = p.shape[1]
        if m == 1:
            corners.append(((i.reshape(shape), 1.0),))
            continue
        t = np.clip(f - i, 0.0, 1.0)
        corners.append(((i.reshape(shape), (1.0 - t).reshape(shape)),
                        (np.minimum(i + 1, m - 1).reshape(shape), t.reshape(shape))))
    for (jz, wz) in corners[0]:
        for (jy, wy) in corners[1]:
            for (jx, wx) in corners[2]:
                out += wz * wy * wx * coarse[jz, jy, jx]
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# noise measured on the frame
# ---------------------------------------------------------------------------
def estimate_noise(frame, sigma, valid=None) -> NoiseModel:
    """Measure the noise model of a frame without a camera calibration.

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        One frame in ADU (a constant offset does not matter).
    sigma : float or sequence of float
        PSF sigma in pixels (decides the background scale and which pixels
        belong to spots).
    valid : bool array_like of the frame's shape, optional
        False for pixels left out (a masked image's masked ones, whatever
        value they hold): only differences and filtered values whose pixels
        are all valid are measured.  Without it a frame half filled with a
        constant would measure half its noise variance.

    Returns
    -------
    NoiseModel
        ``read_var + shot * level`` fitted to the variance of pixel
        differences against the local background level (``source =
        "measured"``); ``shot = 0`` (one variance for all pixels) when the
        frame has too few pixels or too narrow a range of levels to tell.

    Notes
    -----
    1. A global variance from the clipped second moment of the eighth-order
       differences ``d = [1, -4, 6, -4, 1] (x) [1, -4, 6, -4, 1]``
       (variance ``4900 v`` for white noise of variance ``v``; smooth
       signals such as spots and cells contribute little: a spot of sigma
       1.3 px leaves at most 0.4 standard deviations per 1000 photons over
       unit noise, a quadratic background nothing).
    2. The local background (:func:`local_background`) with that variance;
       the pixels it leaves out as spots, and those whose cell mean strays
       from the smooth background (sharp edges, spots' tails), are set
       aside.
    3. The remaining pixels are binned by background level (equal counts);
       each bin's clipped variance of ``d`` gives one point of the frame's
       photon-transfer curve, and ``read_var + shot * level`` is fitted to
       them by weighted least squares (``shot >= 0``).

    Frames larger than ``_NOISE_SAMPLES`` pixels are measured on evenly
    spaced bands of ``_BAND`` rows (all columns and planes) that together
    hold about that many pixels.
    """
    raw = np.asarray(frame)
    ndim = raw.ndim
    raw = raw.reshape((1,) * (3 - ndim) + raw.shape)  # a view: bands are converted one by one
    sig = _sigmas(sigma, ndim)
    biggest = max(abs(v) for v in _extremes(raw)) if raw.size else 0.0
    factor = 1.0
    if biggest > 0 and not 2.0**-40 < biggest < 2.0**40:  # measure in a safe range
        factor = 2.0 ** int(round(math.log2(1024.0 / biggest)))
    floor = max((16 * float(np.finfo(np.float32).eps) * biggest * factor) ** 2, 1e-30)
    rows = _bands(raw.shape)
    bands = [np.ascontiguousarray((raw[:, r0:r1].astype(np.float64) * factor).astype(np.float32))
             for r0, r1 in rows]
    masks = None
    if valid is not None and not np.all(valid):
        valid = np.asarray(valid, bool).reshape(raw.shape)
        masks = [np.ascontiguousarray(valid[:, r0:r1]) for r0, r1 in rows]
    model = _measure(bands, sig, floor, masks)
    return model if factor == 1.0 else model.scaled(1.0 / factor)


def _extremes(raw, strips: int = 8) -> tuple:
    """``(min, max)`` of a (nz, ny, nx) array (NaN if it holds one), as floats; of large
    ones in strips of rows on the kernel threads (the same numbers)."""
    ny = raw.shape[1]
    strips = min(strips, ny) if raw.size >= PARALLEL_PIXELS else 1
    low, high = np.empty(strips, raw.dtype), np.empty(strips, raw.dtype)

    def run(first, last):
        for k in range(first, last):
            part = raw[:, k * ny // strips:(k + 1) * ny // strips]
            low[k], high[k] = np.min(part), np.max(part)

    over_windows(run, strips, threaded=strips > 1)
    return float(np.min(low)), float(np.max(high))


def _measure(bands, sig, floor, masks=None) -> NoiseModel:
    """:func:`estimate_noise` on bands (nz, rows, nx) of float32 data in a safe range;
    ``masks``: the bands' valid pixels (bool, the same shapes), or None for all."""
    diffs = _per_band(_differences, bands)
    usable = None if masks is None else [_whole_supports(m) for m in masks]
    if usable is not None:
        diffs = [d[u] for d, u in zip(diffs, usable)]
    d_all = np.concatenate([d.ravel() for d in diffs]) if diffs else np.zeros(0)
    if d_all.size == 0:
        return NoiseModel(read_var=floor, shot=0.0, floor=floor, source="measured")
    step = max(1, d_all.size // _FIT_SAMPLES)
    var0 = _clipped_variance(d_all[::step]) / _D_GAIN
    model = NoiseModel(read_var=max(var0, floor), shot=0.0, floor=floor, source="measured")
    if not var0 > floor:
        return model
    # the expected level seen by each difference: the data averaged with the
    # operator's squared weights (spots included: their photons are noise too)
    levels = _per_band(_weighted_level, bands)
    if usable is not None:
        levels = [level[u] for level, u in zip(levels, usable)]
    levels = np.concatenate([level.ravel() for level in levels])
    fitted = _fit_transfer(d_all, levels, floor, var0)
    model = model if fitted is None else fitted
    return replace(model, correlation=_correlation(bands, sig, model, masks))


def _whole_supports(valid: np.ndarray) -> np.ndarray:
    """Which of :func:`_differences`' values (shape (nz, ny - 4, nx - 4)) have all 5 x 5
    pixels of their support in ``valid`` (nz, ny, nx)."""
    nz, ny, nx = valid.shape
    if ny < 5 or nx < 5:
        return np.zeros((nz, 0, 0), bool)
    bad = (~valid).astype(np.int32)
    across = sum(bad[:, :, i:nx - 4 + i] for i in range(5))
    return sum(across[:, i:ny - 4 + i] for i in range(5)) == 0


def _correlation(bands, sig, model, masks=None) -> float:
    """Variance of the detection filter's noise over its white-noise prediction (>= 1).

    Noise correlated between neighbouring pixels (interpolated, binned,
    denoised data) has more power at the scale of a spot than the pixel
    differences show.  The ratio is measured directly: the detection filter
    is applied to the bands, divided by the noise the model predicts for
    white noise, and the spread of the result ((q84 - q16) / 2, squared) is
    the ratio.  Spots only add light, so the pixels the background leaves
    out as spots are not used, and of the others the darker half; if fewer
    than ``_MIN_KEPT`` of the pixels are left (a frame covered with spots,
    or a model so small that every cell looks like a spot) all pixels are
    used.  The result is trusted only if the distribution is symmetric
    (asymmetry below ``_MAX_ASYMMETRY``): a skewed one is dominated by the
    light of spots, and the noise is then taken as white.  Two rounds, the
    second with the background clipped at the corrected noise.  ``masks``:
    the bands' valid pixels; filtered values that reach a left-out pixel are
    not used.
    """
    from spotfit.filters import SMOOTH, _EdgeNoise, gaussian_smooth

    axes = [a for a, s in enumerate(sig) if s > 0]  # a 2D frame has no z sigma

    def smooth(band):  # what does not depend on the round: once per band
        edge = _EdgeNoise(tuple(band.shape[a] for a in axes), tuple(sig[a] for a in axes),
                          SMOOTH, SCALE)
        return gaussian_smooth(band, tuple(SMOOTH * s for s in sig)), edge

    smoothed = {id(band): done for band, done in zip(bands, _per_band(smooth, bands))}
    reach = {}  # the pixels whose filtered value, background subtracted, no left-out pixel reaches
    if masks is not None:
        from scipy.ndimage import minimum_filter

        for band, m in zip(bands, masks):
            size = [2 * int(math.ceil(4 * SCALE * s)) + 1 if s > 0 else 1 for s in sig]
            reach[id(band)] = minimum_filter(m, size=size, mode="nearest")
    ratio = 1.0
    for _ in range(3):
        current = replace(model, correlation=ratio)

        def measure(band):
            bg = Background.estimate(band, sig, current)
            smoothed_band, edge = smoothed[id(band)]
            level = bg.full()
            filtered = smoothed_band - level
            r = filtered / (np.sqrt(model.variance(level)) * edge.white_sd)
            m = [int(math.ceil(4 * SCALE * s)) if s > 0 else 0 for s in sig]
            inner = tuple(slice(k, n - k) for k, n in zip(m, band.shape))
            r, level = r[inner], level[inner]
            ok = ~bg.per_pixel(bg.excluded)[inner]
            if id(band) in reach:
                clean = reach[id(band)][inner]
                ok &= clean
                return (r[ok], level[ok]), r[clean]
            return (r[ok], level[ok]), r.ravel()

        kept, every = zip(*_per_band(measure, bands))
        r_all = np.concatenate(every)
        if r_all.size < 2 * _MIN_CORRELATION:
            return max(1.0, ratio)
        r_kept = np.concatenate([k[0] for k in kept])
        if r_kept.size >= max(_MIN_KEPT * r_all.size, 2 * _MIN_CORRELATION):
            level = np.concatenate([k[1] for k in kept])
            r = r_kept[level <= np.median(level)]
        else:
            r = r_all
        q16, q50, q84 = np.percentile(r, [15.87, 50.0, 84.13])
        if ((q84 - q50) - (q50 - q16)) > _MAX_ASYMMETRY * (q84 - q16):
            return 1.0
        new = max(1.0, float((q84 - q16) / 2.0) ** 2)
        done = abs(new - ratio) < 0.05 * ratio
        ratio = new
        if done:
            break
    return ratio


def _per_band(func, bands, threaded=None) -> list:
    """``[func(band) for band in bands]``, the bands shared out among numba's threads
    (:func:`spotfit._jit.over_windows`) when they hold :data:`PARALLEL_PIXELS` pixels
    or more together (``threaded``: force it, for tests); the same list."""
    out = [None] * len(bands)

    def run(start, stop):
        for k in range(start, stop):
            out[k] = func(bands[k])

    if threaded is None:
        threaded = sum(b.size for b in bands) >= PARALLEL_PIXELS
    over_windows(run, len(bands), threaded=threaded)
    return out


#: fewest of a frame's pixels left by the background's clipping to measure the
#: noise correlation on them alone
_MIN_KEPT = 0.2
#: largest asymmetry ((q84 - q50) - (q50 - q16)) / (q84 - q16) of noise
_MAX_ASYMMETRY = 0.15


def _weighted_level(data: np.ndarray) -> np.ndarray:
    """Mean of the 5 x 5 pixels under each difference, weighted like its variance
    (``[1, 16, 36, 16, 1] / 70`` per axis), shape (nz, ny - 4, nx - 4)."""
    a = data.astype(np.float64)
    w = np.array([1.0, 16.0, 36.0, 16.0, 1.0]) / 70.0
    lx = sum(w[i] * a[:, :, i:a.shape[2] - 4 + i] for i in range(5))
    return sum(w[i] * lx[:, i:lx.shape[1] - 4 + i] for i in range(5))


#: rows per band of the noise measurement of large frames
_BAND = 64
#: difference operator's variance gain for white noise: sum([1, -4, 6, -4, 1]^2)^2
_D_GAIN = 4900.0


def _bands(shape):
    """Row ranges of the bands measured (the whole frame if it is small)."""
    nz, ny, nx = shape
    if nz * ny * nx <= _NOISE_SAMPLES or ny <= 2 * _BAND:
        return [(0, ny)]
    n_bands = max(1, min(ny // _BAND, int(math.ceil(_NOISE_SAMPLES / (nz * _BAND * nx)))))
    starts = np.linspace(0, ny - _BAND, n_bands).round().astype(int)
    return [(int(r), int(r) + _BAND) for r in starts]


def _differences(data: np.ndarray) -> np.ndarray:
    """Eighth-order differences ``[1, -4, 6, -4, 1] (x) [1, -4, 6, -4, 1]`` (lateral,
    per plane) of the interior pixels, shape (nz, ny - 4, nx - 4), float64."""
    nz, ny, nx = data.shape
    if ny < 5 or nx < 5:
        return np.zeros((nz, 0, 0))
    a = data.astype(np.float64)
    dx = a[:, :, :-4] - 4 * a[:, :, 1:-3] + 6 * a[:, :, 2:-2] - 4 * a[:, :, 3:-1] + a[:, :, 4:]
    return dx[:, :-4] - 4 * dx[:, 1:-3] + 6 * dx[:, 2:-2] - 4 * dx[:, 3:-1] + dx[:, 4:]


def _clipped_variance(d: np.ndarray) -> float:
    """Variance of the central part of ``d`` (|d - median| < 4 s, iterated), corrected
    for the clipping: robust to a minority of outliers and not quantised like a MAD."""
    if d.size == 0:
        return 0.0
    med = float(np.median(d))
    dev = np.abs(d - med)  # |d - med|, and its square: computed once for every round
    s = _MAD_TO_SIGMA * float(np.median(dev))
    if not s > 0:
        s = float(np.std(d))
    if not s > 0:
        return 0.0
    square = dev * dev
    for _ in range(3):
        c = square[dev < _CLIP_SIGMAS * s]
        if c.size < 10:
            break
        s = math.sqrt(float(np.mean(c)) / _CLIP_VARIANCE)
    return s * s


def _clipped_variance_rows(d: np.ndarray) -> np.ndarray:
    """:func:`_clipped_variance` of each row of a 2D array, all rows at once."""
    out = np.zeros(d.shape[0])
    if d.size == 0:
        return out
    med = np.median(d, axis=1)
    dev = np.abs(d - med[:, None])
    s = _MAD_TO_SIGMA * np.median(dev, axis=1)
    flat = ~(s > 0)
    if flat.any():
        s[flat] = np.std(d[flat], axis=1)
    active = s > 0
    square = dev * dev
    for _ in range(3):
        inside = dev < _CLIP_SIGMAS * s[:, None]
        count = inside.sum(axis=1)
        active &= count >= 10
        if not active.any():
            break
        total = np.where(inside, square, 0.0).sum(axis=1)
        s = np.where(active, np.sqrt(total / np.maximum(count, 1) / _CLIP_VARIANCE), s)
    return np.where(s > 0, s * s, 0.0)


def _sorted_median(a: np.ndarray) -> float:
    """``np.median`` of a sorted 1D array (non-empty), without sorting it again."""
    m = a.size // 2
    return float(a[m]) if a.size % 2 else float(np.mean(a[m - 1:m + 1]))


def _fit_transfer(d, level, floor, overall):
    """Weighted least-squares fit of ``var(d) / gain = a + b * level`` over level bins.

    ``overall`` (the variance of all differences) is the model when no slope
    describes the bins: too few levels, a non-positive slope, or a line
    below half of some bin's variance.
    """
    if d.size > _FIT_SAMPLES:  # plenty for 12 variances; sorting more costs time
        step = int(math.ceil(d.size / _FIT_SAMPLES))
        d, level = d[::step], level[::step]
    n = d.size
    if n < 2 * _MIN_BIN:
        if n < 50:
            return None
        v = _clipped_variance(d) / _D_GAIN
        return NoiseModel(read_var=max(v, floor), shot=0.0, floor=floor, source="measured")
    bins = int(min(_MAX_BINS, n // _MIN_BIN))
    order = np.argsort(level, kind="stable")
    # equal-count bins of the levels: contiguous runs of the sorted arrays
    level, d = level[order], d[order]
    # (the sizes of numpy.array_split: the first n % bins bins hold one more)
    big, size = n % bins, n // bins
    edges = np.r_[0, np.cumsum([size + 1] * big + [size] * (bins - big))]
    lev = np.array([_sorted_median(level[a:b]) for a, b in zip(edges[:-1], edges[1:])])
    cut = big * (size + 1)
    var = np.concatenate([_clipped_variance_rows(d[:cut].reshape(big, size + 1)),
                          _clipped_variance_rows(d[cut:].reshape(bins - big, size))]) / _D_GAIN
    cnt = np.diff(edges).astype(float)
    ok = var > 0
    lev, var, cnt = lev[ok], var[ok], cnt[ok]
    if len(var) == 0:
        return None
    w = cnt / np.maximum(var, floor) ** 2  # a variance estimate's variance ~ 2 var^2 / n
    # one variance for all levels: that of all the differences together
    a, b = float(overall), 0.0
    if len(var) >= 3 and np.ptp(lev) > 0:
        A = np.column_stack([np.ones_like(lev), lev]) * np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(A, var * np.sqrt(w), rcond=None)
        line = coef[0] + coef[1] * lev
        # a slope only where it describes the bins: in a dim frame (a few counts
        # per pixel) the level and the differences share the same counts, and
        # the fitted line can fall far below the variance it should describe
        if coef[1] > 0 and np.all(line > 0.5 * var):
            a, b = float(coef[0]), float(coef[1])
    # a floor well below every measured bin keeps extrapolation positive
    return NoiseModel(read_var=a, shot=b, floor=max(0.25 * float(np.min(var)), floor), source="measured")


