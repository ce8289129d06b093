"""spotfit.near (neighbours without scipy.spatial) against scipy's k-d tree and graph
components, and spotfit.background's Gaussian and maximum filters against scipy.ndimage,
bit for bit: joint fits use them instead (importing scipy took longer than a small fit)."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from spotfit import near
from spotfit.background import gaussian_filter, maximum_filter

GAP = 1e7  # a frame as a far-away coordinate (spotfit.group._FRAME_GAP)


def _points(rng, n, ndim, frames=1, whole=False):
    """Positions in a non-square field (x up to 70 px, y up to 45, z up to 12), with the
    frame as an extra coordinate ``frame * GAP``."""
    extent = np.array([70.0, 45.0, 12.0][:ndim])
    p = rng.uniform(0, 1, (n, ndim)) * extent
    if whole:
        p = np.round(p)
    return np.column_stack([p, rng.integers(0, frames, n) * GAP])


def _assert_same_or_tied(q, p, got, want):
    """The same nearest points, or (whole-number positions) others exactly as near."""
    assert np.array_equal(got == len(p), want == len(p))
    found = got < len(p)
    differ = found & (got != want)
    assert not differ[~np.all(q == np.round(q), axis=1)].any()  # off the pixel grid: no ties
    assert np.array_equal(np.sum((q[differ] - p[got[differ]]) ** 2, axis=1),
                          np.sum((q[differ] - p[want[differ]]) ** 2, axis=1))


@pytest.mark.parametrize("all_pairs", [near._ALL_PAIRS, 0])
@pytest.mark.parametrize("ndim,frames,whole", [(2, 1, False), (2, 3, False), (3, 2, False), (2, 2, True)])
def test_pairs_nearest_and_any_within_are_the_k_d_trees(ndim, frames, whole, all_pairs, monkeypatch):
    """Few points (every pair compared, :data:`spotfit.near._ALL_PAIRS`) and many (the
    grid), and the grid alone (``all_pairs`` 0)."""
    monkeypatch.setattr(near, "_ALL_PAIRS", all_pairs)
    rng = np.random.default_rng(40 + ndim + frames)
    for n, m in ((0, 5), (1, 1), (40, 25), (600, 300)):
        p, q = _points(rng, n, ndim, frames, whole), _points(rng, m, ndim, frames, whole)
        for reach in (0.7, 2.5, 6.0):
            i, j = near.pairs_within(q, p, reach)
            got = set(zip(i.tolist(), j.tolist()))
            assert len(got) == len(i)
            if n and m:
                tree = cKDTree(p)
                want = cKDTree(q).sparse_distance_matrix(tree, reach, output_type="ndarray")
                assert got == set(zip(want["i"].tolist(), want["j"].tolist()))
                dist, index = near.nearest(q, p, reach)
                d, k = tree.query(q, distance_upper_bound=reach * (1 + 1e-12))
                np.testing.assert_array_equal(dist, d)
                _assert_same_or_tied(q, p, index, k)
                assert np.array_equal(near.any_within(q, p, reach), np.isfinite(d))
                d_strict, _ = tree.query(q, distance_upper_bound=reach)
                assert np.array_equal(near.any_within(q, p, reach, strict=True), np.isfinite(d_strict))
                d_inf, _ = tree.query(q, p=np.inf, distance_upper_bound=reach)
                assert np.array_equal(near.any_within(q, p, reach, chebyshev=True, strict=True),
                                      np.isfinite(d_inf))
                _assert_same_or_tied(q, p, near.nearest_of_all(q, p, reach), tree.query(q)[1])
            else:
                assert len(i) == 0 and not near.any_within(q, p, reach).any()


def test_boundaries_and_ties():
    """At exactly ``reach``: a pair (the tree's ``<=``), found by ``nearest``, not by a
    strict ``any_within`` (``query``'s ``distance_upper_bound`` is strict); of two points
    exactly as near, the first."""
    p = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]])
    q = np.array([[3.0, 0.0], [0.0, 5.0]])
    i, j = near.pairs_within(q, p, 5.0)
    assert set(zip(i.tolist(), j.tolist())) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    dist, index = near.nearest(q, p, 5.0)
    np.testing.assert_array_equal(dist, [3.0, 3.1622776601683795])
    np.testing.assert_array_equal(index, [0, 1])  # 0 and 2 tie at 3 px for the first query
    assert near.any_within(q, p, 3.0).tolist() == [True, False]
    assert near.any_within(q, p, 3.0, strict=True).tolist() == [False, False]
    far = np.array([[1000.0, -500.0]])
    assert near.nearest_of_all(far, p, 1.0).tolist() == [2]  # (6, 0), 1113 px away: found by widening


@pytest.mark.parametrize("n,reach", [(1, 1.0), (50, 3.0), (400, 2.0), (400, 6.0)])
def test_components_are_scipys(n, reach):
    """The labels of connected components, in scipy's order (chains and isolated nodes)."""
    rng = np.random.default_rng(n)
    p = rng.uniform(0, 1, (n, 2)) * [90.0, 60.0]
    i, j = near.pairs_within(p, p, reach)
    labels = near.components(n, i, j)
    pairs = cKDTree(p).query_pairs(reach, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, want = connected_components(graph, directed=False)
    np.testing.assert_array_equal(labels, want)
    chain = np.arange(200)  # a long chain, numbered backwards
    np.testing.assert_array_equal(near.components(201, chain[::-1] + 1, chain[::-1]), np.zeros(201))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_gaussian_and_maximum_filters_are_ndimages_bit_for_bit(dtype, mode):
    rng = np.random.default_rng(7)
    stacks = [rng.normal(10, 3, (5, 13, 17)), rng.normal(0, 1, (3, 7, 9, 11)), rng.normal(0, 1, (2, 2, 23))]
    for a in stacks:
        a = a.astype(dtype)
        before = a.copy()
        for sigma in ((0, 1.3, 0.9), (0, 2.5, 1.6), (0, 0.4, 3.0)):
            sigma = sigma + (1.1,) * (a.ndim - 3)
            for truncate in (3.0, 4.0):
                got = gaussian_filter(a, sigma, mode=mode, truncate=truncate, engine="numpy")
                want = ndimage.gaussian_filter(a, sigma, mode=mode, truncate=truncate)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)
        half = (0,) + (1,) * (a.ndim - 1)
        np.testing.assert_array_equal(
            maximum_filter(a, half), ndimage.maximum_filter(a, size=tuple(2 * h + 1 for h in half),
                                                            mode="constant", cval=-np.inf))
        np.testing.assert_array_equal(a, before)  # the input is left as it was


@pytest.mark.parametrize("table", [1 << 21, 0])
@pytest.mark.parametrize("piece", [1 << 22, 5, 1])
def test_candidate_pairs_come_offset_after_offset(table, piece, monkeypatch):
    """The grid lookup's pairs are those of each neighbouring cell in turn (the order
    callers have always seen): per offset of the cells, by query, the points of a cell
    in index order -- checked against that order built by hand on a non-square cloud;
    the same when the lookups are done in pieces of a few pairs (memory's bound)."""
    monkeypatch.setattr(near, "_CELL_TABLE", table)
    monkeypatch.setattr(near, "_PIECE", piece)
    monkeypatch.setattr(near, "_ALL_PAIRS", 0)  # (few points are compared all at once)
    rng = np.random.default_rng(11)
    a = np.rint(rng.uniform(0, [90, 40], (70, 2)))
    b = np.rint(rng.uniform(0, [90, 40], (50, 2)))
    reach = 6.0
    i, j, d2 = near._candidates(a, b, reach)
    low = np.minimum(a.min(axis=0), b.min(axis=0))
    ca, cb = (a - low) // 6 + 1, (b - low) // 6 + 1
    expect = []
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            for p in range(len(a)):
                for q in np.flatnonzero((cb == ca[p] + [oy, ox]).all(axis=1)):
                    if np.sum((a[p] - b[q]) ** 2) <= reach * reach:
                        expect.append((p, q))
    assert len(expect) > 20
    assert [tuple(v) for v in np.column_stack([i, j]).tolist()] == expect
    np.testing.assert_array_equal(d2, np.sum((a[i] - b[j]) ** 2, axis=1))


@pytest.mark.parametrize("all_pairs", [near._ALL_PAIRS, 0])
def test_points_that_are_not_finite_have_no_neighbours(all_pairs, monkeypatch):
    """NaN and infinite positions pair with nothing (both ways, every query), whether the
    pairs are compared all at once or through the grid."""
    monkeypatch.setattr(near, "_ALL_PAIRS", all_pairs)
    p = np.array([[1.0, 2.0], [np.nan, 2.0], [np.inf, np.inf], [1.5, 2.5], [40.0, 3.0]])
    i, j = near.pairs_within(p, p, 2.0)
    assert set(zip(i.tolist(), j.tolist())) == {(0, 0), (0, 3), (3, 0), (3, 3), (4, 4)}
    assert near.any_within(p, p[[0]], 1.0, chebyshev=True).tolist() == [True, False, False, True, False]
    dist, index = near.nearest(p, p[[2, 4]], 50.0)
    assert index.tolist() == [1, 2, 2, 1, 1] and np.isinf(dist[1:3]).all()
