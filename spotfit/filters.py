"""The linear filters of detection: Gaussian smoothing, difference of Gaussians,
and the noise they pass near the edges of a frame.

* :func:`gaussian_smooth` -- ``G(sigma)`` with mirror-reflected edges: by a
  direct separable kernel for small sigma (row-parallel), by FFT otherwise.
  :func:`spotfit.detection.find_peaks` smooths at ``SMOOTH`` PSF sigmas.
* :func:`dog_filter` -- ``G(sigma) - G(DOG_RATIO * sigma)`` by FFT (the
  crowded fits' residual search).
* :class:`_EdgeNoise` -- the variance a pair of such filters passes from
  white noise at every pixel, exactly, including the folded kernels of the
  mirrored edges.

Arrays are float32, in array order (``(ny, nx)`` or ``(nz, ny, nx)``);
sigmas in pixels.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from spotfit._jit import njit, over_windows

__all__ = ["gaussian_smooth", "dog_filter", "SMOOTH", "DOG_RATIO"]

#: Width of the detection filter's Gaussian in PSF sigmas (see
#: :mod:`spotfit.detection`)
SMOOTH = 0.7

#: Width ratio of the two Gaussians of :func:`dog_filter` (a constant: cached
#: filter responses depend on it).
DOG_RATIO = 3.0


#: arrays with at least this many pixels run their row kernels on threads
#: (:func:`spotfit._jit.over_windows`); waking the threads costs ~1 ms, more than
#: a small frame's work
PARALLEL_PIXELS = 1 << 18


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
    (``g2``) 1D kernels, of widths ``narrow * sigma`` and ``wide * sigma``
    (the detection filter of :func:`find_peaks` is modelled by the same
    pair, its background standing in for the wide Gaussian).
    :meth:`relative` gives ``sqrt(V / V_interior)`` (1 away from the
    edges).
    """

    def __init__(self, shape, sigma, narrow=1.0, wide=DOG_RATIO):
        sums = [_folded_sums(int(n), narrow * float(s), wide * float(s)) for n, s in zip(shape, sigma)]
        self._abc = [s[0] for s in sums]
        a_inf, b_inf, c_inf = (np.prod([s[1][q] for s in sums]) for q in range(3))
        self._v_inf = a_inf - 2 * b_inf + c_inf
        #: standard deviation of the filtered image in the interior for white noise of unit variance
        self.white_sd = float(math.sqrt(self._v_inf))
        #: sums of the squared and cubed weights of the narrow kernel (interior)
        self.kernel_k2 = float(np.prod([_kernel_power(narrow * float(s), 2) for s in sigma]))
        self.kernel_k3 = float(np.prod([_kernel_power(narrow * float(s), 3) for s in sigma]))
        # the relative noise varies only within the kernel reach of an edge:
        # its minimum is on the grid of those indices plus one interior index
        self.min_relative = float(np.min(self.relative(np.ix_(*[s[2] for s in sums]))))

    def relative(self, index) -> np.ndarray:
        """``sqrt(V / V_interior)`` at integer indices (one array per axis, broadcastable)."""
        pa = pb = pc = 1.0
        for (a, b, c), i in zip(self._abc, index):
            pa, pb, pc = pa * a[i], pb * b[i], pc * c[i]
        return np.sqrt(np.maximum(pa - 2 * pb + pc, 0.0) / self._v_inf).astype(np.float32)


def _kernel_power(sigma: float, power: int) -> float:
    """``sum(g**power)`` of the normalised sampled 1D Gaussian of width `sigma` (truncated at 4 sigma)."""
    half = int(math.ceil(4.0 * sigma))
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    g /= g.sum()
    return float(np.sum(g**power))


@functools.lru_cache(maxsize=32)
def _folded_sums(n: int, sigma: float, wide: float):
    """Folded-kernel sums on an axis of length `n`, for :class:`_EdgeNoise`.

    Returns ``((A, B, C), (A_inf, B_inf, C_inf), indices)``: three (n,)
    arrays, their interior values, and the indices within the kernel reach
    of an edge plus one more.
    """
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
    if n > reach:  # a pixel's weight gathers at most two of the kernel's (see _folded_row_sums)
        abc = _folded_row_sums(n, rows, cols, g1, g2)
    else:  # an axis shorter than the kernel's reach: several folds
        from scipy.sparse import csr_matrix

        k1 = csr_matrix((np.tile(g1, n), (rows, cols)), shape=(n, n))  # duplicates add up
        k2 = csr_matrix((np.tile(g2, n), (rows, cols)), shape=(n, n))
        abc = tuple(np.asarray(p.multiply(q).sum(axis=1)).ravel()
                    for p, q in ((k1, k1), (k1, k2), (k2, k2)))
    interior = (float(g1 @ g1), float(g1 @ g2), float(g2 @ g2))
    near_edge = np.r_[np.arange(min(n, reach + 1)), np.arange(max(0, n - reach - 1), n), n // 2]
    return abc, interior, np.unique(near_edge)


def _folded_row_sums(n, rows, cols, g1, g2):
    """``(A, B, C)`` of :func:`_folded_sums`: the row sums of ``K1 * K1``, ``K1 * K2`` and
    ``K2 * K2``, ``K`` the folded kernels (weights ``g`` at ``(rows, cols)``, duplicates
    added), without ``scipy.sparse`` (importing it cost a small fit 0.05-0.3 s).

    The same operations in the same order as ``scipy.sparse.csr_matrix`` (duplicates
    summed per pixel, products in column order without zeros, ``np.add.reduceat``
    over each row), so the same bits; duplicates come in pairs at most (the axis is
    longer than the kernel's reach), whose sum does not depend on their order.
    """
    key = rows * n + cols
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    w1 = np.add.reduceat(np.tile(g1, n)[order], first)
    w2 = np.add.reduceat(np.tile(g2, n)[order], first)
    row = key[first] // n
    sums = []
    for p in (w1 * w1, w1 * w2, w2 * w2):
        nonzero = p != 0
        data, at = p[nonzero], row[nonzero]
        out = np.zeros(n)
        if data.size:
            start = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])
            out[at[start]] = np.add.reduceat(data, start)
        sums.append(out)
    return tuple(sums)


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
    return _fft_filter(data, sigma, wide=True)


def gaussian_smooth(data, sigma) -> np.ndarray:
    """Gaussian filter ``G(sigma)`` of an array (mirror-reflected edges, float32).

    Equal to ``scipy.ndimage.gaussian_filter(data, sigma, mode="reflect",
    truncate=4)`` to float32 rounding.  Short kernels (sigma up to
    ``_DIRECT_SIGMA`` px) are applied directly, one axis at a time, longer
    ones by FFT.  Parameters and result as in :func:`dog_filter`.
    """
    data = np.asarray(data, dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (data.ndim,))
    if float(np.max(sig)) > _DIRECT_SIGMA:
        return _fft_filter(data, sigma, wide=False)
    out = data.reshape((1,) * (3 - data.ndim) + data.shape)
    for axis, s in zip(range(3 - data.ndim, 3), sig):
        if s <= 0:
            continue
        half = int(math.ceil(4.0 * s))
        k = np.exp(-0.5 * (np.arange(-half, half + 1) / s) ** 2)
        out = _correlate_axis(out, (k / k.sum()).astype(np.float32), axis)
    return out.reshape(data.shape)


#: Gaussian kernels up to this sigma (px) are applied directly rather than by FFT
_DIRECT_SIGMA = 2.0


@njit(error_model="numpy", nogil=True)
def _correlate_axis_rows(a, kernel, axis, out, start, stop):
    """Correlation of a (nz, ny, nx) float32 array with a symmetric 1D kernel
    along `axis`, edges mirror-reflected (``d c b a | a b c d``), into `out`;
    rows ``start .. stop`` of the ``nz * ny`` rows."""
    nz, ny, nx = a.shape
    half = (kernel.size - 1) // 2
    n = a.shape[axis]
    for r in range(start, stop):
        z, y = r // ny, r % ny
        o = out[z, y]
        if axis == 2:
            row = a[z, y]
            padded = np.empty(nx + 2 * half, np.float32)
            for i in range(nx + 2 * half):
                m = i - half
                while m < 0 or m >= nx:  # reflect (repeatedly for tiny axes)
                    m = -m - 1 if m < 0 else 2 * nx - 1 - m
                padded[i] = row[m]
            # tap by tap over the row (vectorised), each pixel's sum in the order of
            # the taps from 0: the numbers of a sum per pixel, 2.5x faster
            o[:] = 0.0
            for t in range(kernel.size):
                w = kernel[t]
                for x in range(nx):
                    o[x] += w * padded[x + t]
        else:
            c = y if axis == 1 else z
            o[:] = 0.0
            for t in range(kernel.size):
                m = c + t - half
                while m < 0 or m >= n:
                    m = -m - 1 if m < 0 else 2 * n - 1 - m
                src = a[z, m] if axis == 1 else a[m, y]
                w = kernel[t]
                for x in range(nx):
                    o[x] += w * src[x]


def _correlate_axis(a, kernel, axis):
    """:func:`_correlate_axis_rows`, on threads for large arrays."""
    out = np.empty_like(a)
    over_windows(_correlate_axis_rows, a.shape[0] * a.shape[1], a, kernel, axis, out,
                 threaded=a.size >= PARALLEL_PIXELS)
    return out


def _fft_filter(data, sigma, wide):
    import scipy.fft  # here: only wide filters use it (tests/test_startup.py)

    data = np.asarray(data, dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (data.ndim,))
    reach = DOG_RATIO if wide else 1.0
    pad = [int(math.ceil(4.0 * reach * s)) for s in sig]
    padded = np.pad(data, [(p, p) for p in pad], mode="symmetric")
    fft_shape = tuple(
        scipy.fft.next_fast_len(n, real=(i == data.ndim - 1)) for i, n in enumerate(padded.shape)
    )
    spectrum = scipy.fft.rfftn(padded, s=fft_shape, workers=-1)
    spectrum *= _transfer(fft_shape, tuple(float(s) for s in sig), wide)
    out = scipy.fft.irfftn(spectrum, s=fft_shape, workers=-1)
    crop = tuple(slice(p, p + n) for p, n in zip(pad, data.shape))
    return np.ascontiguousarray(out[crop], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _transfer(fft_shape, sigma, wide):
    """Frequency response of G(sigma) [- G(DOG_RATIO sigma)] on an rfftn grid (cached per shape)."""
    import scipy.fft

    narrow, broad = np.ones(1, np.float32), np.ones(1, np.float32)
    for axis, (n, s) in enumerate(zip(fft_shape, sigma)):
        last = axis == len(fft_shape) - 1
        k = scipy.fft.rfftfreq(n) if last else scipy.fft.fftfreq(n)
        k2 = (2 * np.pi * k) ** 2
        shape = [1] * len(fft_shape)
        shape[axis] = k.size
        narrow = narrow * np.exp(-0.5 * s * s * k2).astype(np.float32).reshape(shape)
        if wide:
            broad = broad * np.exp(-0.5 * (DOG_RATIO * s) ** 2 * k2).astype(np.float32).reshape(shape)
    h = narrow - broad if wide else narrow
    h.flags.writeable = False
    return h
