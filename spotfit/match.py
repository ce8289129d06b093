"""One-to-one matching of found spots to true (or reference) spots.

Used by tests and benchmarks to score detection and localisation against a
ground truth such as the table of :func:`spotfit.simulation.simulate`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from spotfit.errors import SpotfitInputError

__all__ = ["match_spots", "detection_scores"]


def _as_points(points, name):
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise SpotfitInputError(
            f"{name} must be an (n, d) array of coordinates, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise SpotfitInputError(f"{name} coordinates must be finite")
    return arr


def match_spots(found, truth, radius):
    """Match two point sets one-to-one within a radius.

    Among all one-to-one pairings of points closer than `radius`, the one
    with the **most pairs** is chosen and, among those, the one with the
    smallest sum of distances (an optimal assignment, not greedy).  It is
    solved with :func:`scipy.optimize.linear_sum_assignment` separately on
    each connected group of candidate pairs (found with a KD-tree), so
    large, sparse point sets stay fast.

    Parameters
    ----------
    found : (n, d) array_like
        Found coordinates (any units, e.g. ``x, y`` in pixels).
    truth : (m, d) array_like
        Reference coordinates, same units and column order.
    radius : float
        Largest distance of a matched pair (inclusive), same units.

    Returns
    -------
    i_found : (k,) ndarray of int
        Row indices into `found`, increasing.
    i_truth : (k,) ndarray of int
        Matching row indices into `truth`.
    """
    found = _as_points(found, "found")
    truth = _as_points(truth, "truth")
    if not (np.ndim(radius) == 0 and np.isfinite(radius) and radius > 0):
        raise SpotfitInputError(f"radius must be > 0, got {radius!r}")
    empty = (np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp))
    if len(found) == 0 or len(truth) == 0:
        return empty
    if found.shape[1] != truth.shape[1]:
        raise SpotfitInputError(
            f"found has {found.shape[1]} coordinates per point but truth has {truth.shape[1]}"
        )

    # candidate pairs within radius (sparse n x m distance matrix)
    # ("ndarray" output keeps pairs at distance 0, which sparse matrices may drop)
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
    rows, cols, d = pairs["i"].astype(np.intp), pairs["j"].astype(np.intp), pairs["v"]
    if rows.size == 0:
        return empty
    n, m = len(found), len(truth)

    # connected groups of the bipartite candidate graph (found i -> node i,
    # truth j -> node n + j); most groups are a single pair
    graph = coo_matrix((np.ones(rows.size), (rows, n + cols)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    pair_label = label[rows]
    order = np.argsort(pair_label, kind="stable")
    rows, cols, d, pair_label = rows[order], cols[order], d[order], pair_label[order]
    starts = np.flatnonzero(np.r_[True, pair_label[1:] != pair_label[:-1]])
    ends = np.r_[starts[1:], rows.size]

    out_f, out_t = [], []
    single = (ends - starts) == 1
    out_f.append(rows[starts[single]])
    out_t.append(cols[starts[single]])
    for s, e in zip(starts[~single], ends[~single]):
        r, c, dd = rows[s:e], cols[s:e], d[s:e]
        uf, ri = np.unique(r, return_inverse=True)
        ut, ci = np.unique(c, return_inverse=True)
        # cost d - big for a candidate pair, 0 otherwise: minimising it first
        # maximises the number of pairs, then minimises their total distance
        big = radius * (min(len(uf), len(ut)) + 1.0)
        cost = np.zeros((len(uf), len(ut)))
        cost[ri, ci] = dd - big
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] < 0
        out_f.append(uf[a[ok]])
        out_t.append(ut[b[ok]])
    i_found = np.concatenate(out_f).astype(np.intp)
    i_truth = np.concatenate(out_t).astype(np.intp)
    order = np.argsort(i_found)
    return i_found[order], i_truth[order]


def detection_scores(found, truth, radius) -> dict:
    """Recall, precision and F1 of found spots against the truth.

    Parameters
    ----------
    found : (n, d) array_like
        Found coordinates.
    truth : (m, d) array_like
        True coordinates (same units and column order).
    radius : float
        Matching radius (see :func:`match_spots`).

    Returns
    -------
    dict
        ``recall`` = matched / m (1.0 if m == 0), ``precision`` =
        matched / n (1.0 if n == 0), ``f1`` (harmonic mean; 0.0 if both are
        0), ``n_matched``, ``n_found`` (n) and ``n_truth`` (m).
    """
    found = _as_points(found, "found")
    truth = _as_points(truth, "truth")
    i_found, _ = match_spots(found, truth, radius)
    k = len(i_found)
    recall = k / len(truth) if len(truth) else 1.0
    precision = k / len(found) if len(found) else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "n_matched": k,
        "n_found": len(found),
        "n_truth": len(truth),
    }
