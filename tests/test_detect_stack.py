"""find_peaks_stack: a stack of small 2D frames detected in one pass gives, frame by
frame, exactly what find_peaks gives each frame alone (seeded, non-square frames)."""

import numpy as np
import pytest

import spotfit
from spotfit import api
from spotfit.background import NoiseModel
from spotfit.camera import Camera
from spotfit.detection import find_peaks, find_peaks_stack
from spotfit.errors import SpotfitInputError
from spotfit.filters import PARALLEL_PIXELS
from spotfit.simulation import render

SHAPE = (37, 29)  # px, rows x columns
SIGMA = 1.1  # px


def movie(n, seed, camera):
    """``n`` frames of ``SHAPE`` in photons: backgrounds from 0.3 to 3000 photons/px and
    spot brightness from 200 to 20000 photons (very different noise levels), every
    fifth frame without spots, one with a gradient; camera read noise added."""
    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    yy, xx = np.mgrid[:ny, :nx]
    levels = [0.3, 5.0, 60.0, 3000.0]
    frames = []
    for t in range(n):
        mu = np.full(SHAPE, levels[t % 4]) * (1.0 + (0.5 * xx / nx if t % 7 == 3 else 0.0))
        if t % 5:
            k = int(rng.integers(3, 25))
            mu = mu + render(SHAPE, rng.uniform(-0.5, nx - 0.5, k), rng.uniform(-0.5, ny - 0.5, k),
                             rng.uniform(200, 20000, k) * (1 + 4 * (t % 4 == 3)), SIGMA)
        read = np.sqrt(np.broadcast_to(np.asarray(camera.read_noise, float) ** 2, SHAPE))
        frames.append((rng.poisson(mu) + rng.normal(0.0, 1.0, SHAPE) * read).astype(np.float32))
    return np.stack(frames)


def assert_as_alone(stack, noise, **options):
    pieces = [[] for _ in stack]
    found = find_peaks_stack(stack, SIGMA, noise=noise, backgrounds=pieces, **options)
    assert len(found) == len(stack)
    n_found = 0
    for t, (coords, score) in enumerate(found):
        alone = []
        c, s = find_peaks(stack[t], SIGMA, noise=noise, backgrounds=alone, **options)
        assert coords.dtype == c.dtype and score.dtype == s.dtype
        np.testing.assert_array_equal(coords, c)
        np.testing.assert_array_equal(score, s)  # bit for bit, in the same order
        assert len(pieces[t]) == len(alone)
        for a, b in zip(pieces[t], alone):
            assert a.origin == b.origin and a.interior == b.interior and a.factor == b.factor
            for name in ("coarse", "excluded", "means"):
                np.testing.assert_array_equal(getattr(a.background, name), getattr(b.background, name))
            index = tuple(np.indices(SHAPE).reshape(2, -1))
            np.testing.assert_array_equal(a.at(index), b.at(index))
        n_found += len(c)
    return found, n_found


@pytest.mark.parametrize("camera", [
    Camera(baseline=500.0, gain=1.0, read_noise=8.0),
    Camera(baseline=100.0, gain=0.5,  # sCMOS-like: a read noise map
           read_noise=np.random.default_rng(1).uniform(0.8, 3.0, SHAPE)),
])
def test_stack_equals_each_frame_alone(camera):
    stack = movie(20, seed=4, camera=camera)
    found, n_found = assert_as_alone(stack, NoiseModel.from_camera(camera))
    assert n_found > 100  # the frames do have spots ...
    assert all(len(found[t][0]) == 0 for t in range(0, 20, 5))  # ... bar the empty ones


def test_stack_options_and_threads():
    """Other thresholds and separations, and a stack large enough for the threaded steps."""
    camera = Camera(baseline=500.0, gain=1.0, read_noise=8.0)
    n = PARALLEL_PIXELS // (SHAPE[0] * SHAPE[1]) + 8
    stack = movie(n, seed=5, camera=camera)
    assert stack.size >= PARALLEL_PIXELS
    assert_as_alone(stack, NoiseModel.from_camera(camera))
    assert_as_alone(stack[:12], NoiseModel.from_camera(camera), threshold=3.0, min_distance=1)


def test_stack_falls_back_to_frames():
    """Measured noise (one model per frame) and rescaled frames: frame by frame."""
    camera = Camera(baseline=500.0, gain=1.0, read_noise=8.0)
    stack = movie(6, seed=6, camera=camera)
    assert_as_alone(stack, None)
    assert_as_alone(stack * np.float32(2.0**50), NoiseModel.from_camera(camera).scaled(2.0**50))


def test_stack_bad_input():
    noise = NoiseModel.from_camera(Camera(baseline=0.0, gain=1.0, read_noise=1.0))
    stack = np.ones((3,) + SHAPE, np.float32)
    stack[1, 2, 3] = np.nan
    with pytest.raises(SpotfitInputError, match="NaN"):
        find_peaks_stack(stack, SIGMA, noise=noise)
    with pytest.raises(SpotfitInputError, match="3D"):
        find_peaks_stack(stack[0], SIGMA, noise=noise)


def test_movie_detected_in_stacks_as_frame_by_frame(monkeypatch):
    """spotfit.detect of a movie of small frames (stacks of frames) equals its frames
    detected one by one (stacks of one frame)."""
    camera = Camera(baseline=500.0, gain=1.0, read_noise=8.0)
    raw = (movie(24, seed=7, camera=camera) + 500.0).astype(np.float32)
    stacked = spotfit.detect(raw, camera=camera, sigma=SIGMA, axes="TYX")
    monkeypatch.setattr(api, "STACK_PIXELS", 5 * SHAPE[0] * SHAPE[1])  # stacks of 5, and the rest
    five = spotfit.detect(raw, camera=camera, sigma=SIGMA, axes="TYX")
    monkeypatch.setattr(api, "STACK_FRAME_PIXELS", 0)
    alone = spotfit.detect(raw, camera=camera, sigma=SIGMA, axes="TYX")
    assert len(alone) > 100
    for table in (stacked, five):
        assert list(table.columns) == list(alone.columns)
        for c in alone.columns:
            np.testing.assert_array_equal(table[c].to_numpy(), alone[c].to_numpy())
