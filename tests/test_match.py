"""Tests of spotfit.match: one-to-one matching of point sets within a radius."""

import itertools

import numpy as np
import pytest

from spotfit.errors import SpotfitInputError
from spotfit.match import detection_scores, match_spots


def test_exact_pairs_in_any_order():
    truth = np.array([[10.0, 5.0], [3.0, 40.0], [25.0, 25.0]])
    found = truth[[2, 0, 1]] + 0.1
    i_found, i_truth = match_spots(found, truth, radius=1.0)
    np.testing.assert_array_equal(i_found, [0, 1, 2])
    np.testing.assert_array_equal(i_truth, [2, 0, 1])


def test_one_to_one_keeps_nearest():
    # two found spots near one true spot: only the nearer one is matched
    found = np.array([[0.0, 0.0], [0.3, 0.0]])
    truth = np.array([[0.25, 0.0]])
    i_found, i_truth = match_spots(found, truth, radius=1.0)
    np.testing.assert_array_equal(i_found, [1])
    np.testing.assert_array_equal(i_truth, [0])


def test_optimal_not_greedy():
    # greedy nearest-first would pair B-P (0.1) and leave A and Q unmatched;
    # the optimal matching pairs A-P (0.9) and B-Q (0.95)
    found = np.array([[0.0, 0.0], [1.0, 0.0]])  # A, B
    truth = np.array([[0.9, 0.0], [1.95, 0.0]])  # P, Q
    i_found, i_truth = match_spots(found, truth, radius=1.0)
    np.testing.assert_array_equal(i_found, [0, 1])
    np.testing.assert_array_equal(i_truth, [0, 1])


def test_radius_is_inclusive_and_exclusive_beyond():
    found = np.array([[0.0, 0.0], [10.0, 0.0]])
    truth = np.array([[0.5, 0.0], [10.5 + 1e-9, 0.0]])
    i_found, i_truth = match_spots(found, truth, radius=0.5)
    np.testing.assert_array_equal(i_found, [0])
    np.testing.assert_array_equal(i_truth, [0])


def test_zero_distance_and_3d():
    found = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    truth = np.array([[5.0, 5.0, 6.5], [1.0, 2.0, 3.0]])
    i_found, i_truth = match_spots(found, truth, radius=1.0)
    np.testing.assert_array_equal(i_found, [0])
    np.testing.assert_array_equal(i_truth, [1])


@pytest.mark.parametrize("n_found, n_truth", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs(n_found, n_truth):
    i_found, i_truth = match_spots(np.zeros((n_found, 2)), np.ones((n_truth, 2)), 1.0)
    assert i_found.shape == (0,) and i_truth.shape == (0,)
    assert i_found.dtype.kind == "i"


def test_matches_brute_force_on_small_random_sets():
    rng = np.random.default_rng(7)
    radius = 1.0
    for _ in range(40):
        found = rng.uniform(0, 3, (rng.integers(0, 6), 2))
        truth = rng.uniform(0, 3, (rng.integers(0, 6), 2))
        i_found, i_truth = match_spots(found, truth, radius)
        # one-to-one, all within radius
        assert len(set(i_found)) == len(i_found) and len(set(i_truth)) == len(i_truth)
        d = np.linalg.norm(found[i_found] - truth[i_truth], axis=1)
        assert np.all(d <= radius)
        # brute force: most pairs, then least total distance
        best = (0, 0.0)
        dist = np.linalg.norm(found[:, None] - truth[None], axis=2)
        n, m = dist.shape
        for k in range(min(n, m), 0, -1):
            totals = [
                dist[list(rows), list(perm)].sum()
                for rows in itertools.combinations(range(n), k)
                for perm in itertools.permutations(range(m), k)
                if np.all(dist[list(rows), list(perm)] <= radius)
            ]
            if totals:
                best = (k, min(totals))
                break
        assert len(i_found) == best[0]
        assert d.sum() == pytest.approx(best[1], abs=1e-9)


def test_detection_scores():
    found = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
    truth = np.array([[0.5, 0.0], [5.0, 5.2]])
    s = detection_scores(found, truth, 1.0)
    assert s["n_matched"] == 2 and s["n_found"] == 3 and s["n_truth"] == 2
    assert s["recall"] == 1.0
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(0.8)


def test_detection_scores_empty_conventions():
    assert detection_scores(np.zeros((0, 2)), np.zeros((0, 2)), 1.0)["f1"] == 1.0
    s = detection_scores(np.zeros((2, 2)), np.zeros((0, 2)), 1.0)
    assert s["precision"] == 0.0 and s["recall"] == 1.0


def test_invalid_inputs():
    with pytest.raises(SpotfitInputError, match="radius"):
        match_spots(np.zeros((1, 2)), np.zeros((1, 2)), 0)
    with pytest.raises(SpotfitInputError, match="coordinates per point"):
        match_spots(np.zeros((1, 2)), np.zeros((1, 3)), 1.0)
    with pytest.raises(SpotfitInputError, match="found"):
        match_spots(np.zeros(3), np.zeros((1, 2)), 1.0)
