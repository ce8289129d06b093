"""Padding: the regions of a frame that hold no data.

Registered, drift-corrected, rotated or stitched images fill what the camera
did not see with one value (usually 0).  Left in, the step from it to the
camera's baseline makes false spots along its edge (the local background
cannot follow a step) and, over a large part of a frame, it halves the noise
measured on the frame.  :func:`find_padding` finds it -- flat regions of one
value, :data:`PADDING_BOX` px square or more, that border the data with a
step (:func:`_stepped`) -- and the caller leaves it out like masked pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["find_padding", "padding_note", "PADDING_BOX"]

#: a pixel is no data when it lies in a box of at least this many pixels square (per
#: plane) whose pixels all hold one value (the padding of registered, drift-corrected,
#: rotated or stitched images) ...
PADDING_BOX = 9
#: ... and stands apart from the data beside it by a step of more than this fraction of
#: the data's range (1st to 99th percentile): zero padding beside a camera's baseline,
#: not the flat background of a noise-free simulation or a flat patch of an 8-bit
#: image (trackpy's colloid frame holds a 9 x 10 px patch of 129 among values 95-139)
PADDING_STEP = 0.25
#: the most frequent values of flat regions looked at
PADDING_VALUES = 8
#: rows sampled to rule padding out cheaply (a PADDING_BOX box spans at least two of
#: every PADDING_STRIDE-th row)
PADDING_STRIDE = 4


def find_padding(raw):
    """Pixels of ``raw`` in flat regions of at least :data:`PADDING_BOX` x
    :data:`PADDING_BOX` px (per plane), as a bool map of its shape; None if there are
    none, or if the whole frame is one value (a blank frame has no spots to protect).
    Regions at an integer type's maximum are not padding (saturated pixels:
    :func:`spotfit.api._clipped`).

    Costs ~1 ms per 4 x 10^6 pixels when there is none (every
    :data:`PADDING_STRIDE`-th row looked at for runs of equal values), ~65 ms when
    there is some (a few dozen passes over the frame's booleans; the values of the
    flat regions from ~1/4 megapixel of samples).

    Parameters
    ----------
    raw : (ny, nx) or (nz, ny, nx) array_like
        One frame as read (any pixel type); not modified.

    Returns
    -------
    ndarray of bool of the frame's shape, or None
    """
    a = np.asarray(raw)
    k = PADDING_BOX
    if a.ndim < 2 or a.shape[-1] < k or a.shape[-2] < k:
        return None
    x, y = a.ndim - 1, a.ndim - 2
    rows = a[..., ::PADDING_STRIDE, :]
    if not _runs(rows[..., 1:] == rows[..., :-1], k - 1, x).any():
        return None  # no run of k equal values in the rows looked at
    # boxes (their first pixel) whose k x k pixels hold one value: each row's k pixels
    # equal, in k rows, and the first column's k pixels equal
    across = _runs(a[..., 1:] == a[..., :-1], k - 1, x)  # (.., ny, nx - k + 1)
    down = _runs(a[..., 1:, :] == a[..., :-1, :], k - 1, y)  # (.., ny - k + 1, nx)
    boxes = _runs(across, k, y) & down[..., : a.shape[-1] - k + 1]
    if a.dtype.kind in "ui":
        boxes &= a[..., : boxes.shape[-2], : boxes.shape[-1]] != np.iinfo(a.dtype).max
    if not boxes.any():
        return None
    flat = _spread(_spread(boxes, k, y), k, x)
    if flat.all():
        return None  # a blank frame: nothing to leave out
    padding = _stepped(a, flat)
    return padding if padding.any() else None


def _stepped(a, flat):
    """The regions of ``flat`` (one value each) below the data's median that border
    the data along ``2 * PADDING_BOX`` px or more and stand apart from it by a step of
    more than :data:`PADDING_STEP` of the data's range: padding (zeros beside a
    camera's baseline) rather than a flat background that the data runs into
    (noise-free simulations, a lone bright pixel on zeros, 8-bit images with a flat
    patch) or a bright plateau (a blob saturating a 12-bit camera at 4095 in a 16-bit
    file)."""
    step = max(1, a.size // 262144)  # ~1/4 megapixel of samples: sorting them is cheap
    every, where = a.ravel()[::step], flat.ravel()[::step]
    rest = every[~where].astype(np.float64)
    if rest.size == 0:
        return np.zeros(flat.shape, bool)
    low, middle, high = np.percentile(rest, [1.0, 50.0, 99.0])
    values, counts = np.unique(every[where], return_counts=True)
    out = np.zeros(flat.shape, bool)
    for v in values[np.argsort(-counts, kind="stable")][:PADDING_VALUES]:
        region = flat if len(values) == 1 else flat & (a == v)
        ring = region.copy()  # the pixels next to the region (8-connected), outside the flat ones
        for axis in (a.ndim - 2, a.ndim - 1):
            ring = _spread(ring, 3, axis)[tuple(slice(1, -1) if i == axis else slice(None)
                                                for i in range(a.ndim))]
        ring &= ~flat
        if v < middle and np.count_nonzero(ring) >= 2 * PADDING_BOX and \
                abs(float(np.median(a[ring])) - float(v)) > PADDING_STEP * (high - low):
            out |= region
    return out


def _runs(m, k, axis):
    """``out[i] = all(m[i : i + k])`` along ``axis`` (length shorter by ``k - 1``), by
    doubling: ~log2(k) passes."""
    def shifted(arr, first, length):
        index = [slice(None)] * arr.ndim
        index[axis] = slice(first, first + length)
        return arr[tuple(index)]

    n = m.shape[axis]
    out, span = m, 1
    while span * 2 <= k:  # out[i]: all of m[i : i + span]
        length = out.shape[axis] - span
        out = shifted(out, 0, length) & shifted(out, span, length)
        span *= 2
    if span < k:  # the rest, from the start of the last span that ends at i + k
        length = n - k + 1
        out = shifted(out, 0, length) & shifted(out, k - span, length)
    return out


def _spread(m, k, axis):
    """``out[j] = any(m[j - k + 1 : j + 1])`` along ``axis`` (longer by ``k - 1``): the
    pixels of the runs of ``k`` that start where ``m`` is True."""
    pad = [(0, 0)] * m.ndim
    pad[axis] = (k - 1, k - 1)
    padded = np.pad(m, pad)
    return ~_runs(~padded, k, axis)


def padding_note(raw, padding, t) -> str:
    """A warning's text about the pixels ``padding`` (:func:`find_padding`) left out of
    frame ``t`` of the frame ``raw``."""
    raw = np.asarray(raw)
    step = max(1, raw.size // 262144)
    values = np.unique(raw.ravel()[::step][padding.ravel()[::step]])
    value = f"value {values[0]:g}" if len(values) == 1 else "several values"
    count = int(np.count_nonzero(padding))
    return (f"frame {t}: {count} px ({100 * count / padding.size:.1f}% of the frame) lie in flat "
            f"regions of one value ({value}) of {PADDING_BOX} x {PADDING_BOX} px or more: left "
            "out as no data, like masked pixels (the padding of a registered, drift-corrected "
            "or stitched image)")
