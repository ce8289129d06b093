"""Windows: cutting, masks, window <-> image coordinates, neighbour masking.

Images are non-square and filled with ``value = 1000 * row + col`` (``+ 10^6 *
plane``), so every pixel says where it came from.
"""

import numpy as np
import pytest

from spotfit import roi
from spotfit.models import Grid

NY, NX = 20, 31


def _ramp(shape):
    idx = np.indices(shape)
    out = 1000.0 * idx[-2] + idx[-1]
    if len(shape) == 3:
        out = out + 1e6 * idx[0]
    return out


def test_cut_takes_the_pixels_around_each_centre():
    image = _ramp((NY, NX))
    w = roi.cut(image, np.array([[5, 7], [10, 20]]), 2)  # (row, col)
    assert w.grid.shape == (5, 5) and w.data.shape == (2, 25)
    np.testing.assert_array_equal(w.origin, [[5, 3], [18, 8]])  # (x, y) of the first pixel
    block = w.data[0].reshape(5, 5)
    np.testing.assert_array_equal(block, image[3:8, 5:10])
    assert w.mask.all()


def test_border_windows_are_masked_outside_and_keep_their_origin():
    image = _ramp((NY, NX))
    w = roi.cut(image, np.array([[0, NX - 1]]), (1, 2))  # top-right corner, 3 x 5 window
    mask = w.mask[0].reshape(3, 5)
    np.testing.assert_array_equal(mask[0], False)  # row -1
    np.testing.assert_array_equal(mask[:, 3:], False)  # cols NX, NX + 1
    assert mask[1:, :3].all()
    data = w.data[0].reshape(3, 5)
    assert np.all(data[~mask] == 0)
    np.testing.assert_array_equal(data[1:, :3], image[0:2, NX - 3:NX])
    np.testing.assert_array_equal(w.origin[0], [NX - 3, -1])
    first, last = w.valid_extent()
    np.testing.assert_array_equal(first[0], [0, 1])  # x, y of the first valid pixel
    np.testing.assert_array_equal(last[0], [2, 2])


def test_valid_map_masks_like_the_border():
    image = _ramp((NY, NX))
    valid = np.ones((NY, NX), bool)
    valid[6, 8] = False
    w = roi.cut(image, np.array([[5, 7]]), 2, valid=valid)
    mask = w.mask[0].reshape(5, 5)
    assert not mask[3, 3] and mask.sum() == 24  # pixel (row 6, col 8) = window (3, 3)
    assert w.data[0].reshape(5, 5)[3, 3] == 0


def test_cut_3d_and_read_variance_follow_the_same_pixels():
    image = _ramp((6, NY, NX))
    read_var = image * 2
    w = roi.cut(image, np.array([[2, 5, 7]]), (1, 2, 3), read_var=read_var)
    assert w.grid.shape == (3, 5, 7)
    np.testing.assert_array_equal(w.data[0].reshape(3, 5, 7), image[1:4, 3:8, 4:11])
    np.testing.assert_array_equal(w.read_var, 2 * w.data)
    np.testing.assert_array_equal(w.origin[0], [4, 3, 1])  # x, y, z


def test_window_and_image_coordinates():
    w = roi.cut(_ramp((NY, NX)), np.array([[5, 7], [0, 0]]), 2)
    rel = np.array([[2.25, 1.5], [0.0, 0.0]])
    np.testing.assert_allclose(w.to_image(rel), [[7.25, 4.5], [-2.0, -2.0]])
    # inside: within [-1/2, S - 1/2) and on an image pixel
    assert w.inside(np.array([[-0.49, 4.49], [2.0, 2.0]])).tolist() == [True, True]
    assert w.inside(np.array([[4.5, 0.0], [1.0, 2.0]])).tolist() == [False, False]  # beyond; masked pixel


def test_scatter_add_inverts_cut():
    image = np.zeros((NY, NX))
    grid = Grid((3, 5))
    values = np.arange(30, dtype=float).reshape(2, 15)
    origin = np.array([[2, 4], [NX - 2, NY - 2]])  # the second sticks out of the image
    roi.scatter_add(image, values, origin, grid)
    np.testing.assert_array_equal(image[4:7, 2:7], values[0].reshape(3, 5))
    assert image[NY - 2:, NX - 2:].tolist() == [[15.0, 16.0], [20.0, 21.0]]
    assert image.sum() == values[0].sum() + 15 + 16 + 20 + 21


def test_neighbour_pixels_are_masked_on_the_bisector():
    """Two candidates 4 px apart along x: each window loses the pixels within the reach of the
    other that are nearer to it, and keeps its own half."""
    image = np.zeros((NY, NX))
    centres = np.array([[10, 10], [10, 14]])
    w = roi.cut(image, centres, 3)
    n = roi.mask_neighbours(w, centres, radius=2.5)
    left = w.mask[0].reshape(7, 7)
    right = w.mask[1].reshape(7, 7)
    cols = np.arange(7) + 7  # image columns 7..13 of the left window; the neighbour is at 14
    assert not left[1:6, cols == 13].any()  # within 2.5 px of the neighbour (rows 8-12)
    assert left[0, cols == 13].all() and left[6, cols == 13].all()  # 3.2 px away: kept
    assert left[:, cols == 12].all()  # on the bisector (x = 12): kept (not nearer to the other)
    assert left[:, cols <= 11].all()  # its own half is whole
    assert (~left).sum() == 5
    np.testing.assert_array_equal(left, right[:, ::-1])  # symmetric
    assert n == (~w.mask).sum()


def test_neighbours_from_all_candidates_when_cut_in_chunks():
    """Windows cut for some candidates, neighbours looked for among all: the same masks."""
    rng = np.random.default_rng(3)
    centres = np.unique(rng.integers(0, (NY, NX), (40, 2)), axis=0)
    image = np.zeros((NY, NX))
    whole = roi.cut(image, centres, 3)
    roi.mask_neighbours(whole, centres, 3.0)
    for part in np.array_split(np.arange(len(centres)), 3):
        chunk = roi.cut(image, centres[part], 3)
        roi.mask_neighbours(chunk, centres[part], 3.0, others=centres)
        np.testing.assert_array_equal(chunk.mask, whole.mask[part])


def test_concatenate_keeps_order_and_read_variance():
    image = _ramp((NY, NX))
    a = roi.cut(image, np.array([[3, 3]]), 1, read_var=image)
    b = roi.cut(image, np.array([[9, 9], [12, 20]]), 1, read_var=image)
    both = roi.concatenate([a, b])
    assert len(both) == 3
    np.testing.assert_array_equal(both.data, np.concatenate([a.data, b.data]))
    np.testing.assert_array_equal(both.read_var, both.data)
    np.testing.assert_array_equal(both.origin[1:], b.origin)


@pytest.mark.parametrize("half", [0, 1, 4])
def test_window_size(half):
    w = roi.cut(np.zeros((NY, NX)), np.array([[5, 5]]), half)
    assert w.grid.shape == (2 * half + 1, 2 * half + 1)


@pytest.mark.parametrize("table", [True, False], ids=["cell-table", "binary-search"])
def test_pairs_within_are_the_k_d_trees_pairs(table, monkeypatch):
    """near.pairs_within (a grid of cells, so that fitting need not import
    scipy.spatial) finds exactly the k-d tree's pairs: 2D and 3D, sparse and crowded,
    reaches on and beside the distance of some pairs (5.0, sqrt(29), 7.4), duplicates
    among the others, and positions off the pixel grid (the k-d tree itself)."""
    from scipy.spatial import cKDTree

    from spotfit import near
    from spotfit.near import pairs_within

    if not table:
        monkeypatch.setattr(near, "_CELL_TABLE", 0)
    rng = np.random.default_rng(5)

    def kd(p, o, reach):
        m = cKDTree(p).sparse_distance_matrix(cKDTree(o), reach, output_type="ndarray")
        return set(zip(m["i"].tolist(), m["j"].tolist()))

    for shape in ((41, 67), (7, 30, 45)):
        for n, m in ((1, 1), (30, 50), (400, 300)):
            for reach in (5.0, float(np.sqrt(29.0)), 7.4, 0.5):
                p = np.column_stack([rng.integers(0, s, n) for s in shape]).astype(float)
                o = np.column_stack([rng.integers(0, s, m) for s in shape]).astype(float)
                o[: m // 5] = o[m // 5: 2 * (m // 5)]  # duplicates
                i, j = pairs_within(p, o, reach)
                got = set(zip(i.tolist(), j.tolist()))
                assert len(got) == len(i)  # each pair once
                assert got == kd(p, o, reach), (shape, n, m, reach)
    # with itself, as fields._overlaps asks: the tree's query_pairs
    p = np.column_stack([rng.integers(0, 50, 300), rng.integers(0, 70, 300)]).astype(float)
    i, j = pairs_within(p, p, 2.6)
    want = cKDTree(p).query_pairs(2.6, output_type="ndarray")
    assert set(zip(i[i < j].tolist(), j[i < j].tolist())) == set(map(tuple, want.tolist()))
    p = rng.uniform(0, 30, (50, 2))
    i, j = pairs_within(p, p, 4.0)
    assert set(zip(i.tolist(), j.tolist())) == kd(p, p, 4.0)
    assert [len(x) for x in pairs_within(np.zeros((0, 2)), p, 4.0)] == [0, 0]


def _cut_box_by_indices(image, start, shape, dtype=float, read_var=None, valid=None):
    """The pixels of windows through clipped index arrays, outside pixels masked:
    an independent oracle for :func:`roi.cut_box`."""
    n, ndim = start.shape
    idx = np.indices(shape).reshape(ndim, -1)  # (ndim, P), array order
    pix = start[:, :, None] + idx[None]  # (n, ndim, P)
    mask = np.all((pix >= 0) & (pix < np.array(image.shape)[None, :, None]), axis=1)
    clipped = tuple(np.clip(pix[:, a], 0, image.shape[a] - 1) for a in range(ndim))
    data = np.asarray(image[clipped], dtype=dtype)
    if valid is not None:
        mask &= valid[clipped]
    data[~mask] = 0
    rv = None if read_var is None else np.asarray(np.broadcast_to(read_var, image.shape)[clipped], float)
    return data, mask, rv


@pytest.mark.parametrize("shape, box", [((NY, NX), (5, 7)), ((6, NY, NX), (3, 5, 5)), ((NY, 4), (5, 7))],
                         ids=["2d", "3d", "window wider than the image"])
@pytest.mark.parametrize("inside", [True, False], ids=["all inside", "some at the border"])
def test_cut_box_of_inside_and_border_windows_takes_the_indexed_pixels(shape, box, inside):
    """Windows within the image are copied from a sliding view, the others through
    clipped indices: each window, its mask, left-out pixels and read variance as
    indexing pixel by pixel gives them (float32 image, float64 windows)."""
    rng = np.random.default_rng(31)
    image = (_ramp(shape) + rng.random(shape)).astype(np.float32)
    valid = rng.random(shape) > 0.1
    read_var = rng.random(shape) + 1.0
    high = np.array(shape) - np.array(box)
    if inside and np.all(high >= 0):
        start = np.column_stack([rng.integers(0, h + 1, 50) for h in high])
    else:
        start = np.column_stack([rng.integers(-b, s + 1, 50) for b, s in zip(box, shape)])
        start[0] = 0  # one window inside, where there is room
        start[0] = np.minimum(start[0], np.maximum(high, 0))
    for options in ({}, {"valid": valid}, {"read_var": read_var}, {"valid": valid, "read_var": read_var}):
        w = roi.cut_box(image, start, box, **options)
        data, mask, rv = _cut_box_by_indices(image, start, box, **options)
        assert w.data.dtype == np.float64 and w.mask.dtype == bool
        np.testing.assert_array_equal(w.data, data)
        np.testing.assert_array_equal(w.mask, mask)
        np.testing.assert_array_equal(w.origin, start[:, ::-1])
        if read_var is not None and "read_var" in options:
            np.testing.assert_array_equal(w.read_var, rv)
        else:
            assert w.read_var is None
    flags = roi.cut_box(valid, start, box, dtype=bool)
    np.testing.assert_array_equal(flags.data, _cut_box_by_indices(valid, start, box, dtype=bool)[0])
