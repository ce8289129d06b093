"""Candidate detection: PSF-matched filter, noise-relative threshold, local maxima.

Pipeline of :func:`find_peaks`, for one 2D frame or 3D stack:

1. **Filter** with a difference of Gaussians ``G(sigma) - G(DOG_RATIO * sigma)``
   (:func:`dog_filter`, float32, mirror-reflected edges).  ``G(sigma)`` is
   the matched filter of a Gaussian spot in white noise; subtracting the
   wider Gaussian removes the local background (a constant gives exactly 0,
   a linear slope 0 away from the edges).  With ``DOG_RATIO = 3`` the filter
   keeps ~95 % of the matched filter's signal-to-noise ratio (89 % at
   ratio 2, 97 % at 4) while the background estimate still follows changes
   on a scale of ~3 sigma (~4 px for sigma 1.3 px).
2. **Noise** of the *filtered* image, robustly: ``1.4826 * MAD`` (median
   absolute deviation), so spots and their dark rings barely affect it.
   Mirrored edges fold the filter kernel, which makes the filtered noise up
   to ~1.4x larger on the edge rows and ~1.8x in the corners; this is
   computed exactly per pixel (:class:`_EdgeNoise`) and divided out, so
   border pixels are not false-alarm hot spots.
3. **Local maxima** of the filtered image whose signal-to-noise ratio
   exceeds ``threshold``, with the rule of
   ``skimage.feature.peak_local_max(..., exclude_border=False)`` (spots
   touching the border are kept).  The score of a candidate is its filtered
   height divided by the noise at its pixel: a signal-to-noise ratio, so one
   default threshold works for faint and bright images and in any units.

Speed: a 2048 x 2048 float32 frame takes ~0.1 s (one core).  The filter
runs by FFT and maxima are only checked above the threshold because
``scipy.ndimage.gaussian_filter`` (~0.22 s for the two Gaussians) and the
full-image maximum filter of ``peak_local_max`` (~0.15 s) are dominated by
their strided passes along the slow axis.

Default threshold
-----------------
``DEFAULT_THRESHOLD = 5`` was measured on simulated, isolated spots
(min. separation 10 px) with PSF sigma 1.3 px, 30 images of 200 x 300 px
with 60 spots each, matched to the truth within 1.5 px:

* faint, 300 photons on 50 photons/px: recall 0.993, precision 0.999
  (threshold 4.5: recall 0.998; 5.5: 0.984; 6: 0.957);
* bright, 5000 photons on 10 photons/px: recall 1.000, precision 1.000;
* pure background, false candidates per 512 x 512 image (mean of 20-40
  images): 0.05 at 50 photons/px (1.0 at threshold 4.5, 0 at 5.5), 0.25 at
  10 photons/px, 0.25 for an sCMOS-like 2 photons/px + 1.5 e- read noise,
  2.3 at 1 photon/px (shot noise only), 2.6 for an EMCCD (gain 100,
  5 photons/px) and 19 at 0.2 photons/px.  The threshold assumes nearly
  Gaussian filtered noise; with very low backgrounds or EM excess noise its
  tail is heavier and a higher threshold (6-7) may be wanted.

:func:`spotfit.detect` (:mod:`spotfit.api`) runs this frame by frame over an
image or a time-lapse and returns a table.  Coordinates follow
:mod:`spotfit`: 0-based pixel centres, ``x`` = column, ``y`` = row,
``z`` = plane.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
from numba import njit
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from spotfit.errors import SpotfitInputError

__all__ = [
    "find_peaks",
    "dog_filter",
    "default_min_distance",
    "DEFAULT_THRESHOLD",
    "DOG_RATIO",
]

#: Default detection threshold, in signal-to-noise units of the filtered
#: image (see the module docstring for how it was chosen).
DEFAULT_THRESHOLD = 5.0

#: Width ratio of the two Gaussians of the difference-of-Gaussians filter
#: (a constant: cached filter responses depend on it).
DOG_RATIO = 3.0

# MAD -> standard deviation for Gaussian noise.
_MAD_TO_SIGMA = 1.4826
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


def find_peaks(frame, sigma, threshold=DEFAULT_THRESHOLD, min_distance=None):
    """Find spot candidates in one 2D image or 3D stack.

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        One image, already in photons or ADU above baseline (a constant
        offset does not matter).  Converted to float32.
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

    Returns
    -------
    coords : (n, frame.ndim) ndarray of int
        Pixel indices of the maxima in array order (``(row, col)`` or
        ``(plane, row, col)``), sorted by decreasing score.
    score : (n,) ndarray of float64
        Filtered height of each maximum divided by the robust noise of the
        filtered image at that pixel (signal-to-noise units).

    Raises
    ------
    SpotfitInputError
        For invalid options (the message names ``sigma``,
        ``threshold`` or ``min_distance``) or non-finite pixels.

    Notes
    -----
    The noise is estimated from the frame itself, so it should hold mostly
    background.  A frame without noise in most of its pixels (e.g. a
    constant one) has a noise estimate of 0; the noise is then floored at
    ``16 * eps(float32)`` times the largest deviation from the median
    (float32 rounding level), so a constant frame gives no candidates and a
    noise-free rendering gives its spots.
    """
    data = np.asarray(frame, dtype=np.float32)
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
    if not np.all(np.isfinite(data)):
        raise SpotfitInputError("image contains NaN or infinite pixels")

    # 0. remove the typical level (a constant frame becomes exactly 0, and
    #    float32 rounding in the filter scales with the fluctuations only)
    data = data - np.float32(np.median(_subgrid(data)))

    # 1. difference-of-Gaussians filter (reflective edges)
    filtered = dog_filter(data, sig)
    flat = filtered.ravel()
    edge = _EdgeNoise(filtered.shape, sig)

    # 2. robust noise of the filtered image, as in the interior (mirrored
    #    edges carry up to ~1.4x more, corners ~1.8x), floored at the float32
    #    rounding level
    sub_index = np.ix_(*_subgrid_index(filtered.shape))
    sample = (filtered[sub_index] / edge.relative(sub_index)).ravel()
    med = np.median(sample)
    noise = _MAD_TO_SIGMA * float(np.median(np.abs(sample - med)))
    noise = max(noise, _NOISE_FLOOR * float(np.max(np.abs(data))))
    if not noise > 0:  # constant frame: nothing to find
        return empty

    # 3. pixels whose signal-to-noise ratio exceeds the threshold ...
    cand = np.flatnonzero(flat > float(threshold) * noise * edge.min_relative)
    snr = flat[cand] / (noise * edge.relative(np.unravel_index(cand, filtered.shape)))
    above = snr > float(threshold)
    cand, snr = cand[above], snr[above]

    # 4. ... that are local maxima of the filtered image (border pixels included)
    peaks = _local_maxima(filtered, cand, radii)
    peaks = peaks[np.argsort(-snr[peaks], kind="stable")]
    coords = np.column_stack(np.unravel_index(cand[peaks], filtered.shape))
    return coords.astype(np.intp).reshape(-1, data.ndim), snr[peaks].astype(float)


def _subgrid_index(shape) -> list:
    """Per-axis indices of a regular sub-grid with at most ~``_NOISE_SAMPLES`` points."""
    size = int(np.prod(shape))
    step = max(1, int(math.ceil((size / _NOISE_SAMPLES) ** (1.0 / len(shape)))))
    return [np.arange(0, n, step) for n in shape]


def _subgrid(a: np.ndarray) -> np.ndarray:
    """A regular sub-grid of ``a`` (see :func:`_subgrid_index`), flattened."""
    return a[np.ix_(*_subgrid_index(a.shape))].ravel()


class _EdgeNoise:
    """Noise of the DoG-filtered image near the edges, relative to the interior.

    With mirrored edges a pixel near the edge is filtered with a *folded*
    kernel (the weights of mirrored pixels add to those of the real ones),
    so white noise comes out stronger there.  For white noise of unit
    variance the filtered variance at index ``(i_0, i_1[, i_2])`` is
    exactly::

        V = prod_a A_a[i_a] - 2 prod_a B_a[i_a] + prod_a C_a[i_a]

    with ``A``, ``B``, ``C`` the per-axis sums ``sum g1**2``,
    ``sum g1 * g2`` and ``sum g2**2`` of the folded narrow (``g1``) and wide
    (``g2``) 1D kernels.  :meth:`relative` gives ``sqrt(V / V_interior)``
    (1 away from the edges).
    """

    def __init__(self, shape, sigma):
        sums = [_folded_sums(int(n), float(s)) for n, s in zip(shape, sigma)]
        self._abc = [s[0] for s in sums]
        a_inf, b_inf, c_inf = (np.prod([s[1][q] for s in sums]) for q in range(3))
        self._v_inf = a_inf - 2 * b_inf + c_inf
        # the relative noise varies only within the kernel reach of an edge:
        # its minimum is on the grid of those indices plus one interior index
        self.min_relative = float(np.min(self.relative(np.ix_(*[s[2] for s in sums]))))

    def relative(self, index) -> np.ndarray:
        """``sqrt(V / V_interior)`` at integer indices (one array per axis, broadcastable)."""
        pa = pb = pc = 1.0
        for (a, b, c), i in zip(self._abc, index):
            pa, pb, pc = pa * a[i], pb * b[i], pc * c[i]
        return np.sqrt(np.maximum(pa - 2 * pb + pc, 0.0) / self._v_inf).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _folded_sums(n: int, sigma: float):
    """Folded-kernel sums on an axis of length `n`, for :class:`_EdgeNoise`.

    Returns ``((A, B, C), (A_inf, B_inf, C_inf), indices)``: three (n,)
    arrays, their interior values, and the indices within the kernel reach
    of an edge plus one more.
    """
    wide = DOG_RATIO * sigma
    reach = int(math.ceil(4.0 * wide))  # the padding of dog_filter
    k = np.arange(-reach, reach + 1)
    g1 = np.exp(-0.5 * (k / sigma) ** 2)
    g1 /= g1.sum()
    g2 = np.exp(-0.5 * (k / wide) ** 2)
    g2 /= g2.sum()
    # symmetric extension (period 2n): index m maps to pixel m or 2n - 1 - m
    m = np.mod(np.arange(n)[:, None] + k[None, :], 2 * n)
    cols = np.where(m < n, m, 2 * n - 1 - m).ravel()
    rows = np.repeat(np.arange(n), k.size)
    k1 = csr_matrix((np.tile(g1, n), (rows, cols)), shape=(n, n))  # duplicates add up
    k2 = csr_matrix((np.tile(g2, n), (rows, cols)), shape=(n, n))
    abc = tuple(
        np.asarray(p.multiply(q).sum(axis=1)).ravel() for p, q in ((k1, k1), (k1, k2), (k2, k2))
    )
    interior = (float(g1 @ g1), float(g1 @ g2), float(g2 @ g2))
    near_edge = np.r_[np.arange(min(n, reach + 1)), np.arange(max(0, n - reach - 1), n), n // 2]
    return abc, interior, np.unique(near_edge)


def dog_filter(data, sigma) -> np.ndarray:
    """Difference-of-Gaussians ``G(sigma) - G(DOG_RATIO * sigma)`` of an array.

    Computed in float32 by FFT on a copy padded by mirror reflection
    (``numpy.pad(mode="symmetric")``, the same edge rule as
    ``scipy.ndimage``'s ``"reflect"``) over 4 sigmas of the wider Gaussian,
    so the result equals ``gaussian_filter(data, sigma) -
    gaussian_filter(data, DOG_RATIO * sigma)`` (mode ``"reflect"``) to
    ~1e-3 of the noise, at a third of the cost (the strided passes of
    ``scipy.ndimage`` along the slow axes dominate its run time).

    Parameters
    ----------
    data : (ny, nx) or (nz, ny, nx) array_like
        Image.
    sigma : float or sequence of float
        Gaussian sigma of the narrow kernel per axis, in pixels.

    Returns
    -------
    ndarray of float32, same shape as `data`
    """
    data = np.asarray(data, dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (data.ndim,))
    pad = [int(math.ceil(4.0 * DOG_RATIO * s)) for s in sig]
    padded = np.pad(data, [(p, p) for p in pad], mode="symmetric")
    fft_shape = tuple(
        scipy.fft.next_fast_len(n, real=(i == data.ndim - 1)) for i, n in enumerate(padded.shape)
    )
    spectrum = scipy.fft.rfftn(padded, s=fft_shape, workers=-1)
    spectrum *= _dog_transfer(fft_shape, tuple(float(s) for s in sig))
    out = scipy.fft.irfftn(spectrum, s=fft_shape, workers=-1)
    crop = tuple(slice(p, p + n) for p, n in zip(pad, data.shape))
    return np.ascontiguousarray(out[crop], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _dog_transfer(fft_shape, sigma):
    """Frequency response of the DoG on an rfftn grid (cached: one per frame shape)."""
    narrow, wide = np.ones(1, np.float32), np.ones(1, np.float32)
    for axis, (n, s) in enumerate(zip(fft_shape, sigma)):
        last = axis == len(fft_shape) - 1
        k = scipy.fft.rfftfreq(n) if last else scipy.fft.fftfreq(n)
        k2 = (2 * np.pi * k) ** 2
        shape = [1] * len(fft_shape)
        shape[axis] = k.size
        narrow = narrow * np.exp(-0.5 * s * s * k2).astype(np.float32).reshape(shape)
        wide = wide * np.exp(-0.5 * (DOG_RATIO * s) ** 2 * k2).astype(np.float32).reshape(shape)
    h = narrow - wide
    h.flags.writeable = False
    return h


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
    height = filtered.ravel()[cand]
    volume = filtered.reshape((1,) * (3 - filtered.ndim) + filtered.shape)  # as (nz, ny, nx)
    rz, ry, rx = ((0,) * (3 - len(radii)) + tuple(int(r) for r in radii))
    coords = np.stack([np.zeros_like(idx[0])] * (3 - filtered.ndim) + list(idx), axis=1)
    is_max = _is_box_maximum(volume, np.ascontiguousarray(coords, dtype=np.int64), rz, ry, rx)
    peaks = np.flatnonzero(is_max)
    peaks = peaks[np.argsort(-height[peaks], kind="stable")]
    if max(radii) > 1 and len(peaks) > 1:
        # Only equal peaks can be closer than the radii: keep the first.  In
        # units of the radius per axis, "|d_a| <= r_a - 1 on every axis" is a
        # Chebyshev distance below 1 - 0.5 / max(radii) for integer d.
        scaled = np.column_stack([i[peaks] for i in idx]) / np.asarray(radii, dtype=float)
        pairs = cKDTree(scaled).query_pairs(1 - 0.5 / max(radii), p=np.inf, output_type="ndarray")
        if len(pairs):
            keep = np.ones(len(peaks), dtype=bool)
            for i, j in sorted(map(tuple, np.sort(pairs, axis=1))):
                if keep[i]:
                    keep[j] = False
            peaks = peaks[keep]
    return peaks
