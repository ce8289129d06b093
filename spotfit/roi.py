"""Fitting windows: cutting them out, masking what a fit must not see, converting coordinates.

This module is the one place where window-relative coordinates meet image
coordinates.  A window of half-size ``h`` around the integer pixel ``c``
spans pixels ``c - h .. c + h`` on each axis; its *origin* is the image
coordinate of its first pixel (``c - h``), so

    image coordinate = origin + window-relative coordinate

on every axis, also for windows that stick out of the image.  Pixels outside
the image are masked (``mask == False``) and carry no weight in the fit, so
spots at the border are fitted in their truncated windows without being
shifted or dropped; so are pixels the caller marks invalid (the mask of a
masked array) and, in single-spot fits, a neighbouring candidate's pixels
(:func:`mask_neighbours`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spotfit.models import Grid
from spotfit.near import pairs_within


@dataclass
class Windows:
    """A batch of equally sized windows.

    Attributes
    ----------
    data : (n, P) ndarray
        Pixel values, flattened in C order (x fastest); 0 where masked.
    mask : (n, P) bool ndarray
        True for pixels inside the image.
    origin : (n, ndim) int ndarray
        Image coordinates of each window's first pixel, ordered
        ``(x, y[, z])``.
    grid : Grid
        Window shape, in array order.
    read_var : (n, P) ndarray or None
        Per-pixel read-noise variance (sCMOS maps), if any.
    """

    data: np.ndarray
    mask: np.ndarray
    origin: np.ndarray
    grid: Grid
    read_var: np.ndarray | None = None

    def __len__(self):
        return self.data.shape[0]

    def to_image(self, rel: np.ndarray) -> np.ndarray:
        """Window-relative ``(n, ndim)`` coordinates ``(x, y[, z])`` -> image."""
        return rel + self.origin

    def valid_extent(self, start: int = 0, stop: int | None = None):
        """First and last unmasked pixel of each window along each axis.

        Returns
        -------
        first, last : (m, ndim) ndarray
            Window-relative pixel-centre coordinates ordered ``(x, y[, z])``
            for windows ``start:stop``.
        """
        flat = self.mask[start:stop]
        nd = self.grid.ndim
        first = np.zeros((len(flat), nd))
        last = np.broadcast_to(np.array(self.grid.shape[::-1], float) - 1, (len(flat), nd)).copy()
        cut = ~flat.all(axis=1)  # only windows with masked pixels need the work
        if cut.any():
            mask = flat[cut].reshape((-1,) + self.grid.shape)
            for a in range(nd):  # array axis a -> coordinate index nd - 1 - a
                other = tuple(b + 1 for b in range(nd) if b != a)
                valid = mask.any(axis=other)
                size = valid.shape[1]
                first[cut, nd - 1 - a] = np.argmax(valid, axis=1)
                last[cut, nd - 1 - a] = size - 1 - np.argmax(valid[:, ::-1], axis=1)
        return first, last

    def inside(self, rel: np.ndarray, rows=None) -> np.ndarray:
        """True where window-relative ``(x, y[, z])`` lies in a valid pixel.

        A centre counts as inside when it falls within the window's extent
        ``[-1/2, S - 1/2)`` and on an image pixel (not in the masked part
        of a border-truncated window).  ``rows``: the window of each position
        (default: one position per window, in order).
        """
        shape_xyz = np.array(self.grid.shape[::-1])
        idx = np.floor(rel + 0.5).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < shape_xyz), axis=1)
        flat = np.zeros(len(idx), dtype=np.int64)
        stride = 1
        for a in range(idx.shape[1]):  # x fastest
            flat += np.clip(idx[:, a], 0, shape_xyz[a] - 1) * stride
            stride *= shape_xyz[a]
        return ok & self.mask[np.arange(len(self)) if rows is None else rows, flat]


def cut(image: np.ndarray, centers: np.ndarray, half_size, dtype=float, read_var=None,
        valid=None) -> Windows:
    """Cut windows centred on integer pixels.

    Parameters
    ----------
    image : (ny, nx) or (nz, ny, nx) ndarray
    centers : (n, image.ndim) int ndarray
        Window centres in *array* order (row, col) or (plane, row, col), as
        returned by detection.
    half_size : int or sequence of int
        Half-size per array axis; the window has ``2 h + 1`` pixels per axis.
    dtype : numpy dtype
        Output dtype of ``data``.
    read_var : ndarray of image's shape, optional
        Per-pixel read-noise variance map, cut into ``Windows.read_var``.
    valid : bool ndarray of image's shape, optional
        False for pixels to leave out (masked like pixels outside the image).

    Returns
    -------
    Windows
    """
    ndim = image.ndim
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, ndim)
    half = np.broadcast_to(np.asarray(half_size, dtype=np.int64), (ndim,))
    shape = tuple(int(2 * h + 1) for h in half)
    return cut_box(image, centers - half, shape, dtype=dtype, read_var=read_var, valid=valid)


def cut_box(image: np.ndarray, start: np.ndarray, shape, dtype=float, read_var=None, valid=None) -> Windows:
    """Cut windows of a given shape whose first pixel is at ``start``.

    Parameters
    ----------
    image : (ny, nx) or (nz, ny, nx) ndarray (any number of axes)
    start : (n, image.ndim) int ndarray
        Array index of each window's first pixel, in array order; may lie
        outside the image (those pixels are masked).
    shape : tuple of int
        Window shape in array order.
    dtype, read_var, valid
        As in :func:`cut`.

    Returns
    -------
    Windows
    """
    image = np.asarray(image)
    ndim = image.ndim
    start = np.asarray(start, dtype=np.int64).reshape(-1, ndim)
    shape = tuple(int(s) for s in shape)
    n = start.shape[0]
    size = int(np.prod(shape))
    # windows within the image are copied from a sliding-window view (whole windows
    # at a time); the others through clipped indices, their outside pixels masked
    inside = np.all((start >= 0) & (start <= np.array(image.shape) - np.array(shape)), axis=1)
    border = np.flatnonzero(~inside)
    inside = None if len(border) == 0 else np.flatnonzero(inside)
    sel, mask = [], np.ones((len(border),) + (1,) * ndim, dtype=bool)
    for a in range(ndim):  # index arrays broadcast to (m, *shape)
        i = start[border, a : a + 1] + np.arange(shape[a])[None, :]
        view = (slice(None),) + tuple(slice(None) if b == a else None for b in range(ndim))
        mask = mask & ((i >= 0) & (i < image.shape[a]))[view]
        sel.append(np.clip(i, 0, image.shape[a] - 1)[view])
    sel = tuple(sel)
    mask_border = mask.reshape(len(border), size)
    mask = np.ones((n, size), bool)
    mask[border] = mask_border
    data = _gather(image, start, shape, dtype, inside, border, sel)
    if valid is not None:
        mask &= _gather(np.asarray(valid, dtype=bool), start, shape, bool, inside, border, sel)
    if len(border) or valid is not None:
        data[~mask] = 0
    origin = start[:, ::-1].copy()
    rv = None
    if read_var is not None:
        rv = _gather(np.broadcast_to(read_var, image.shape), start, shape, float, inside, border, sel)
    return Windows(data=data, mask=mask, origin=origin, grid=Grid(shape), read_var=rv)


def _gather(image, start, shape, dtype, inside, border, sel) -> np.ndarray:
    """``image``'s pixels in windows of ``shape`` from ``start``, ``(n, P)`` of ``dtype``:
    windows ``inside`` (None: all but ``border``) from a sliding-window view of the
    image, windows ``border`` by the clipped index arrays ``sel``."""
    from numpy.lib.stride_tricks import sliding_window_view

    n, size = len(start), int(np.prod(shape))
    if len(border) == n:
        return np.asarray(image[sel], dtype=dtype).reshape(n, size)
    windows = sliding_window_view(image, shape)
    if inside is None:
        return np.asarray(windows[tuple(start.T)], dtype=dtype).reshape(n, size)
    out = np.empty((n, size), dtype)
    out[inside] = windows[tuple(start[inside].T)].reshape(len(inside), size)
    out[border] = image[sel].reshape(len(border), size)
    return out


def scatter_add(image: np.ndarray, windows_values: np.ndarray, origin: np.ndarray, grid: Grid) -> None:
    """Add window values ``(n, P)`` back into ``image`` at their origins (in place).

    ``origin`` is ``(n, ndim)`` in ``(x, y[, z])`` order, as in
    :class:`Windows`; pixels outside the image are dropped.
    """
    ndim = image.ndim
    start = np.asarray(origin, dtype=np.int64)[:, ::-1]  # array order
    flat = np.zeros(windows_values.shape, dtype=np.int64)
    ok = np.ones(windows_values.shape, dtype=bool)
    stride = 1
    mesh = np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij")
    for a in range(ndim - 1, -1, -1):
        i = start[:, a : a + 1] + mesh[a].ravel()[None, :]
        ok &= (i >= 0) & (i < image.shape[a])
        flat += np.clip(i, 0, image.shape[a] - 1) * stride
        stride *= image.shape[a]
    image.ravel()[:] += np.bincount(flat[ok], weights=windows_values[ok], minlength=image.size)


#: window pixels of neighbour pairs examined at a time by :func:`mask_neighbours`
_PAIR_PIXELS = 1 << 20


def mask_neighbours(windows: Windows, centers: np.ndarray, radius: float, others=None, frames=None) -> int:
    """Mask, in each window, the pixels that belong to a neighbouring candidate.

    A pixel of window ``i`` is masked when it lies within ``radius`` of
    another candidate ``j`` *and* closer to ``j`` than to ``i``'s own centre
    (the perpendicular bisector), so a neighbour's light does not pull the
    fit while the spot's own pixels are all kept.

    Parameters
    ----------
    windows : Windows
        Windows cut around ``centers`` (same order); ``mask`` is updated in place.
    centers : (n, ndim) int ndarray
        Candidate pixels in array order, as passed to :func:`cut`.
    radius : float
        Reach of a neighbour's light, px (isotropic, also along z).
    others : (m, ndim) int ndarray, optional
        All candidates of the image, in array order (default ``centers``):
        the neighbours looked for, when ``windows`` are only some of them
        (an image fitted in chunks).  A candidate at a window's own centre
        masks nothing.
    frames : (n,) int ndarray, optional
        The frame of each window, when ``windows`` come from several frames
        (``others`` must then be None): a window's neighbours are those of its
        frame only.  The same masks as each frame's windows on their own.

    Returns
    -------
    int
        Number of pixels masked.
    """
    n = len(windows)
    if n == 0:
        return 0
    xyz = np.asarray(centers, float)[:, ::-1]  # x, y[, z]
    other_xyz = xyz if others is None else np.asarray(others, float)[:, ::-1]
    if len(other_xyz) < 2:
        return 0
    reach = radius + np.max(windows.grid.shape) / 2.0
    if frames is None:
        own, other = pairs_within(xyz, other_xyz, reach)
    else:  # the frame as a far-away coordinate: no pairs across frames, the same distances
        keyed = np.column_stack([xyz, np.asarray(frames, float) * (2.0 * np.ceil(reach) + 2.0)])
        own, other = pairs_within(keyed, keyed, reach)
    keep = np.any(xyz[own] != other_xyz[other], axis=1)  # a window's own centre masks nothing
    own, other = own[keep], other[keep]
    if len(own) == 0:
        return 0
    pix = [np.asarray(p, float) for p in windows.grid.flat()]  # window-relative x, y[, z], (P,) each
    hit = np.zeros(windows.mask.shape, dtype=bool)  # a neighbour claims the pixel
    flat_hit = hit.reshape(-1)
    n_pix = hit.shape[1]
    step = max(1, _PAIR_PIXELS // len(pix[0]))  # pairs at a time: bounded (m, P) temporaries
    for start in range(0, len(own), step):
        o, j = own[start:start + step], other[start:start + step]
        rel_other = other_xyz[j] - windows.origin[o]  # (m, ndim)
        rel_own = xyz[o] - windows.origin[o]
        # squared distances axis by axis ((m, P) each; the same sums in the same order)
        d_other = (pix[0][None, :] - rel_other[:, :1]) ** 2
        d_own = (pix[0][None, :] - rel_own[:, :1]) ** 2
        for a in range(1, len(pix)):
            d_other += (pix[a][None, :] - rel_other[:, a:a + 1]) ** 2
            d_own += (pix[a][None, :] - rel_own[:, a:a + 1]) ** 2
        near = (d_other < radius * radius) & (d_other < d_own)
        pair, p = np.nonzero(near)
        flat_hit[o[pair] * n_pix + p] = True  # (repeated indices: any neighbour will do)
    masked = windows.mask & hit
    windows.mask &= ~hit
    windows.data[masked] = 0.0
    return int(masked.sum())


def concatenate(batches) -> Windows:
    """Join windows of the same grid into one batch."""
    batches = list(batches)
    return Windows(
        data=np.concatenate([b.data for b in batches]),
        mask=np.concatenate([b.mask for b in batches]),
        origin=np.concatenate([b.origin for b in batches]),
        grid=batches[0].grid,
        read_var=None if batches[0].read_var is None else np.concatenate([b.read_var for b in batches]),
    )
