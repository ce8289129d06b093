"""Neighbours among points, without ``scipy.spatial``.

Joint fits ask which spots lie near which: pairs within a distance, the nearest spot
within a distance, whether any lies within one, and the groups that chains of close
pairs link.  ``scipy.spatial``'s k-d tree answers all of these, but importing it (with
``scipy.sparse``'s graphs) took ~0.15-0.3 s of every ``spotfit fit`` that made a joint
fit, longer than fitting a small frame.  Here the points are put in a grid of cells as
wide as the distance asked about, so that a point's neighbours are in its own cell and
the adjacent ones, and the distances of those candidate pairs are compared exactly:

* :func:`pairs_within` -- all pairs at most ``reach`` apart (the k-d tree's
  ``sparse_distance_matrix`` and ``query_pairs``);
* :func:`nearest` -- each query's nearest point within ``reach`` (its ``query`` with a
  distance bound);
* :func:`any_within` -- whether any point lies within ``reach`` (Euclidean or Chebyshev);
* :func:`components` -- connected components of a graph given by its edges
  (``scipy.sparse.csgraph.connected_components``, the same labels).

Distances are computed as the k-d tree computes them (the sum of squared differences
over the axes in order; its square root), so the answers are the tree's; where two
points are exactly as near, :func:`nearest` takes the first.  Positions are ``(n, d)``
arrays, any ``d``; a frame can be an extra coordinate far away (``spotfit.group``).
"""

from __future__ import annotations

import itertools

import numpy as np

#: :func:`pairs_within` looks its grid's cells up in a table of up to this many cells
#: (or 8 per point; else, and with 0, by binary search) ...
_CELL_TABLE = 1 << 21
#: ... and of at most this many cells per point (queries and points) (a table of
#: millions of cells for a few thousand points, as a sub-pixel reach gives on a large
#: frame, took longer to build than the binary searches it saved)
_CELLS_PER_POINT = 256
#: candidate pairs looked at per piece in :func:`_candidates` (its peak memory: ~40 bytes each)
_PIECE = 1 << 22
#: :func:`_candidates` compares every pair of up to this many (``len(a) * len(b)``, a few
#: bytes each) at once instead of building a grid: a joint fit's few hundred spots (the
#: grid's bookkeeping took ~1 ms per query there, all pairs ~0.2 ms)
_ALL_PAIRS = 1 << 16


def pairs_within(points, others, reach):
    """All pairs ``(i, j)`` of ``points[i]`` and ``others[j]`` (``(n, d)`` and ``(m, d)``)
    at most ``reach`` apart; two int64 arrays, in no particular order.

    The pairs of ``scipy.spatial.cKDTree(points).sparse_distance_matrix(cKDTree(others),
    reach)``: the squared distance against ``reach * reach``, as the k-d tree compares
    them (for positions on the pixel grid, whole numbers such as the candidates',
    exactly, in integers).
    """
    points = np.asarray(points, dtype=float)
    others = np.asarray(others, dtype=float)
    i, j, _ = _candidates(points, others, reach)
    return i, j


def nearest(queries, points, reach):
    """Each query's nearest point at most ``reach`` away: ``(distance, index)``, ``(m,)``
    each; ``(inf, len(points))`` where there is none (as ``cKDTree.query`` with a
    distance bound reports it).  Of points exactly as near, the first."""
    queries = np.asarray(queries, dtype=float)
    points = np.asarray(points, dtype=float)
    dist = np.full(len(queries), np.inf)
    index = np.full(len(queries), len(points), np.int64)
    i, j, d2 = _candidates(queries, points, reach)
    if len(i):
        order = np.lexsort((j, d2, i))  # per query: nearest first, then the first point
        first = order[np.r_[True, i[order][1:] != i[order][:-1]]]
        dist[i[first]] = np.sqrt(d2[first])
        index[i[first]] = j[first]
    return dist, index


def nearest_of_all(queries, points, reach) -> np.ndarray:
    """Index of each query's nearest point, however far (``cKDTree.query``'s index; of
    points exactly as near, the first): looked for within ``reach`` (the distance within
    which the caller expects it), then within four times that, and so on, until every
    query has one.  ``(m,)`` int64."""
    queries = np.asarray(queries, dtype=float)
    points = np.asarray(points, dtype=float)
    index = np.full(len(queries), len(points), np.int64)
    if len(queries) == 0 or len(points) == 0:
        return index
    lo = np.minimum(queries.min(axis=0), points.min(axis=0))
    hi = np.maximum(queries.max(axis=0), points.max(axis=0))
    span = float(np.sqrt(np.sum((hi - lo) ** 2)))
    reach = max(float(reach), 1e-3)
    todo = np.arange(len(queries))
    while len(todo):
        _, found = nearest(queries[todo], points, reach)
        index[todo] = found
        todo = todo[found == len(points)]
        if reach > span:  # everything was within reach: the rest are at infinity
            break
        reach *= 4.0
    return index


def any_within(queries, points, reach, chebyshev=False, strict=False):
    """Whether any of ``points`` lies within ``reach`` of each query (bool ``(m,)``):
    Euclidean distance, or the largest difference along an axis (``chebyshev``); at most
    ``reach`` apart, or less than it (``strict``)."""
    queries = np.asarray(queries, dtype=float)
    points = np.asarray(points, dtype=float)
    out = np.zeros(len(queries), bool)
    if chebyshev:
        i, j, _ = _candidates(queries, points, reach, distances=False)
        d = np.abs(queries[i] - points[j]).max(axis=1) if len(i) else np.zeros(0)
        bound = reach
    else:
        i, j, d = _candidates(queries, points, reach)
        bound = reach * reach
    out[i[d < bound if strict else d <= bound]] = True
    return out


def components(n: int, first, second) -> np.ndarray:
    """Connected components of the graph of ``n`` nodes and edges ``first[k] -- second[k]``:
    a label per node, ``0 .. n_components - 1`` in the order of each component's first
    node (``scipy.sparse.csgraph.connected_components(..., directed=False)``'s labels).

    Each node takes the smallest label among its neighbours until none changes, with the
    labels' own labels followed (pointer jumping) so that long chains take few rounds.
    """
    labels = np.arange(n, dtype=np.int64)
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    if len(first) == 0:
        return labels
    while True:
        low = np.minimum(labels[first], labels[second])
        new = labels.copy()
        np.minimum.at(new, first, low)
        np.minimum.at(new, second, low)
        np.minimum.at(new, labels, new)  # a root takes its members' smallest label too
        while True:  # every label to its root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def _all_pairs(a, b, reach, distances):
    """:func:`_candidates` of few points: every pair compared (the same pairs and squared
    distances, in ``(i, j)`` order; without ``distances`` the pairs within ``reach``
    along every axis).  Points that are not finite have no neighbours.  (Whole
    coordinates: a pair within ``reach`` has a small squared distance, exact in floats
    as in the grid's integers; a far pair's rounding keeps it far.)"""
    with np.errstate(invalid="ignore"):
        diff = a[:, None, :] - b[None, :, :]
        if distances:
            d2 = np.sum(diff ** 2, axis=2).astype(float)
            i, j = np.nonzero(d2 <= reach * reach)
            return i.astype(np.int64), j.astype(np.int64), d2[i, j]
        i, j = np.nonzero(np.all(np.abs(diff) <= reach, axis=2))
    return i.astype(np.int64), j.astype(np.int64), None


def _candidates(a, b, reach, distances=True):
    """Pairs ``(i, j)`` of rows of ``a`` and ``b`` in the same or adjacent cells of a grid
    at least ``reach`` wide: with ``distances``, those at most ``reach`` apart and their
    squared distances; else every candidate (all pairs within ``reach`` along each axis
    are among them) and ``None``."""
    none = np.zeros(0, np.int64)
    if len(a) == 0 or len(b) == 0 or not reach >= 0:
        return none, none, np.zeros(0)
    if len(a) * len(b) <= _ALL_PAIRS:
        return _all_pairs(a, b, reach, distances)
    whole = (np.isfinite(reach) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
             and np.all(a == np.round(a)) and np.all(b == np.round(b))
             and max(np.abs(a).max(), np.abs(b).max()) < 2.0**31)
    lone = [False] * a.shape[1]  # axes along which a neighbour is in the same cell only
    if whole:  # cells of whole pixels; distances exactly, in integers
        a, b = a.astype(np.int64), b.astype(np.int64)
        cell = max(1, int(np.ceil(reach)))
        low = np.minimum(a.min(axis=0), b.min(axis=0))
        ca, cb = (a - low) // cell + 1, (b - low) // cell + 1  # cells from 1: a neighbour's from 0
    else:  # cells a little wider than reach: rounding cannot move a neighbour two cells away
        finite_a, finite_b = np.isfinite(a).all(axis=1), np.isfinite(b).all(axis=1)
        if not (finite_a.all() and finite_b.all()):  # (no neighbours of, or at, infinity)
            ia, ib = np.flatnonzero(finite_a), np.flatnonzero(finite_b)
            i, j, d2 = _candidates(a[ia], b[ib], reach, distances)
            return ia[i], ib[j], d2
        cell = reach * (1.0 + 1e-6) if reach > 0 else 1.0
        low = np.minimum(a.min(axis=0), b.min(axis=0))
        ka, kb = np.floor((a - low) / cell).astype(np.int64), np.floor((b - low) / cell).astype(np.int64)
        # renumber each axis' occupied cells 1, 2, ... in order, one number more between two
        # that were not adjacent: a frame far away along an extra axis is one cell, adjacent
        # to no other frame's (a pair two or more cells apart is farther than reach)
        ca, cb = np.empty_like(ka), np.empty_like(kb)
        for axis in range(a.shape[1]):
            occupied, inverse = np.unique(np.concatenate([ka[:, axis], kb[:, axis]]), return_inverse=True)
            gap = np.diff(occupied) > 1
            number = np.arange(1, len(occupied) + 1)
            number[1:] += np.cumsum(gap)
            ca[:, axis], cb[:, axis] = number[inverse[: len(a)]], number[inverse[len(a):]]
            lone[axis] = bool(gap.all())  # no two occupied cells adjacent (frames)
    dims = tuple(int(n) for n in np.maximum(ca.max(axis=0), cb.max(axis=0)) + 2)
    size = float(np.prod(np.asarray(dims, dtype=np.float64)))
    if size >= 2.0**62:  # (too many cells for one int64 key: all pairs, compared below)
        i, j = np.divmod(np.arange(len(a) * len(b), dtype=np.int64), len(b))
        return i, j, (np.sum((a[i] - b[j]) ** 2, axis=1).astype(float) if distances else None)
    keys = np.ravel_multi_index(tuple(cb.T), dims)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    table = None
    if _CELL_TABLE > 0 and size <= max(min(_CELL_TABLE, _CELLS_PER_POINT * (len(a) + len(b))), 8 * len(b)):
        # first index and count per cell, looked up directly
        per_cell = np.bincount(keys, minlength=int(size))
        table = (np.cumsum(per_cell) - per_cell, per_cell)
    # along an axis whose points all lie in one cell, or in cells no two of which are
    # adjacent (the frames' extra axis), only a point's own cell holds its neighbours
    spread = [(0,) if lone[axis] or ca[:, axis].min() == ca[:, axis].max() == cb[:, axis].min() == cb[:, axis].max()
              else (-1, 0, 1) for axis in range(a.shape[1])]
    # every offset's cells at once, offset after offset (the pairs in that order)
    offsets = np.array(list(itertools.product(*spread)), np.int64)
    k = np.ravel_multi_index(tuple((ca[None, :, :] + offsets[:, None, :]).reshape(-1, a.shape[1]).T), dims)
    if table is not None:
        start, count = table[0][k], table[1][k]
    else:
        start = np.searchsorted(ordered, k, side="left")
        count = np.searchsorted(ordered, k, side="right") - start
    ends = np.cumsum(count)
    total = int(ends[-1])
    if total == 0:
        return none, none, np.zeros(0)
    point = np.tile(np.arange(len(a), dtype=np.int64), len(offsets))
    # in pieces of about _PIECE candidate pairs (lookups in order): a bounded peak of
    # memory when millions of points each have several neighbours
    cuts = np.searchsorted(ends, np.arange(_PIECE, total, _PIECE), side="left") + 1
    own, other, dist = [], [], []
    for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(count)]])):
        c = count[lo:hi]
        n = int(c.sum())
        if n == 0:
            continue
        i = np.repeat(point[lo:hi], c)
        j = order[np.repeat(start[lo:hi] - (np.cumsum(c) - c), c) + np.arange(n)].astype(np.int64)
        if distances:
            d2 = np.sum((a[i] - b[j]) ** 2, axis=1).astype(float)
            keep = d2 <= reach * reach  # (the k-d tree's comparison)
            i, j = i[keep], j[keep]
            dist.append(d2[keep])
        own.append(i)
        other.append(j)
    if len(own) == 1:
        return own[0], other[0], (dist[0] if distances else None)
    return np.concatenate(own), np.concatenate(other), (np.concatenate(dist) if distances else None)
