"""Stages split into strips, bands or blocks for numba's threads give the same numbers as
in one piece: the background's coarse grid, the noise estimate, the score-test gate and
the CSV writer, the screen of detection's maxima, a large frame's single fits in pieces
(non-square frames, strip boundaries at awkward places, 3D stacks)."""

import sys

import numpy as np
import pandas as pd
import pytest

import spotfit
from spotfit import _csv, _jit, background, single
from spotfit.background import NoiseModel, estimate_noise
from spotfit.simulation import render

CAMERA = spotfit.Camera(baseline=100.0, gain=1.0)


def _frame(shape, n_spots, seed, sigma=1.3):
    """Spots over a textured, sloped background, Poisson noise (photons), float32."""
    rng = np.random.default_rng(seed)
    ny, nx = shape[-2:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    level = 15.0 + 10.0 * xx / nx + 25.0 * np.exp(-((xx - 0.3 * nx) ** 2 + (yy - 0.6 * ny) ** 2) / (0.05 * nx * ny))
    frames = []
    for _ in range(shape[0] if len(shape) == 3 else 1):
        xy = rng.uniform(3, [nx - 3, ny - 3], size=(n_spots, 2))
        light = render((ny, nx), xy[:, 0], xy[:, 1], rng.uniform(300, 3000, n_spots), sigma)
        frames.append(rng.poisson(level + light).astype(np.float32))
    return np.stack(frames) if len(shape) == 3 else frames[0]


def _coarse_inputs(volume, sig, noise, monkeypatch):
    """The arguments Background.estimate gives :func:`background._coarse_in_strips`."""
    seen = []

    def capture(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    original = background._coarse_in_strips
    monkeypatch.setattr(background, "_coarse_in_strips", capture)
    reference = background.Background.estimate(volume, sig, noise)
    monkeypatch.setattr(background, "_coarse_in_strips", original)
    return seen[0], reference


@pytest.mark.parametrize("shape, sig", [
    ((1, 301, 517), (0.0, 1.3, 1.3)),  # wide, odd sizes: strips along rows of cells
    ((1, 611, 97), (0.0, 1.3, 1.3)),  # tall, narrow
    ((1, 205, 230), (0.0, 2.6, 1.1)),  # anisotropic cells
    ((37, 20, 41), (1.6, 1.3, 1.3)),  # a stack with more planes than rows of cells: strips along z
    ((9, 95, 64), (1.6, 1.3, 1.3)),  # a stack split along rows
])
@pytest.mark.parametrize("engine", ["numpy", "ndimage"])
def test_coarse_background_in_strips_is_the_same_as_in_one_piece(shape, sig, engine, monkeypatch):
    # the background's correlations run on NumPy until scipy.ndimage is imported
    import scipy.ndimage  # noqa: F401

    if engine == "numpy":
        monkeypatch.delitem(sys.modules, "scipy.ndimage")
    data = _frame(shape, max(4, shape[-1] * shape[-2] // 300), seed=sum(shape))
    volume = data.reshape((1,) * (3 - data.ndim) + data.shape)
    for noise in (NoiseModel.from_camera(CAMERA), estimate_noise(data, tuple(s for s in sig if s > 0)
                                                                 if data.ndim == 2 else sig)):
        args, reference = _coarse_inputs(volume, sig, noise, monkeypatch)
        whole = background._coarse_background(*args)
        axis = 0 if args[0].shape[0] > args[0].shape[1] else 1
        n = args[0].shape[axis]
        # two strips, three, a prime count, strips of one or two cells (narrower than
        # the margin), one strip per cell
        for strips in sorted({2, 3, 7, max(2, n // 2), n - 1, n}):
            parts = background._coarse_in_strips(*args, strips=strips)
            for a, b in zip(whole, parts):
                assert np.array_equal(a, b), (strips, np.max(np.abs(np.asarray(a, float) - b)))
        assert np.array_equal(reference.coarse, whole[0])


def test_large_grids_are_estimated_in_strips_and_small_ones_not(monkeypatch):
    calls = []
    original = background._coarse_background

    def count(sums, *args):
        calls.append(sums.shape)
        return original(sums, *args)

    monkeypatch.setattr(background, "_coarse_background", count)
    noise = NoiseModel.from_camera(CAMERA)
    small = _frame((200, 150), 20, seed=1)[None]
    background.Background.estimate(small, (0.0, 1.3, 1.3), noise)
    assert calls == [(1, 67, 50)]  # one piece: not worth waking the threads
    calls.clear()
    monkeypatch.setattr(background, "PARALLEL_CELLS", 1)
    import numba

    background.Background.estimate(small, (0.0, 1.3, 1.3), noise)
    assert len(calls) == max(1, numba.get_num_threads())


@pytest.mark.parametrize("shape", [(700, 500), (611, 1031), (6, 300, 257)])
def test_noise_estimate_on_threads_is_the_same(shape, monkeypatch):
    data = _frame(shape, 60, seed=shape[0]) + 100.0
    original = background._per_band
    models = []
    for threaded in (False, True):
        monkeypatch.setattr(background, "_per_band",
                            lambda func, bands, threaded=threaded: original(func, bands, threaded))
        models.append(estimate_noise(data, 1.3))
    a, b = models
    for name in ("read_var", "shot", "floor", "correlation"):
        assert float(getattr(a, name)) == float(getattr(b, name)), name
    assert len(background._bands((1,) + shape[-2:] if len(shape) == 2 else shape)) > 1


def test_per_band_keeps_the_order_of_the_bands():
    bands = [np.full((1, 3, 4), k, np.float32) for k in range(11)]
    assert [float(x) for x in background._per_band(lambda b: b.sum(), bands, threaded=True)] == \
        [12.0 * k for k in range(11)]


@pytest.mark.parametrize("camera", [CAMERA, spotfit.Camera()], ids=["mle", "lsq"])
def test_score_gate_in_blocks_gives_the_same_table(camera, monkeypatch):
    """Blocks of 8 and 24 windows (boundaries everywhere in a frame of ~600 candidates)
    give exactly the table of one block."""
    image = (_frame((203, 517), 600, seed=5) + 100.0).astype(np.uint16)
    tables = []
    for block in (10**9, 8, 24):
        monkeypatch.setattr(single, "GATE_BLOCK", block)
        tables.append(spotfit.fit(image, camera=camera, sigma=1.3))
    assert len(tables[0]) > 400
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other, check_exact=True)


def test_quadrupole_score_of_blocks_is_that_of_all_windows(monkeypatch):
    seen = []
    original = single._doubtful

    def capture(*args):
        seen.append(args)
        return original(*args)

    monkeypatch.setattr(single, "_doubtful", capture)
    image = (_frame((150, 331), 300, seed=8) + 100.0).astype(np.uint16)
    spotfit.fit(image, camera=spotfit.Camera(), sigma=1.3)
    setup, reduced, batch, theta, limit, rv = max(seen, key=lambda a: len(a[3]))
    n = len(theta)
    whole = single._quadrupole_score(setup, reduced, batch, theta, rv)
    for block in (8, 16, 1024):
        parts = np.concatenate([
            single._quadrupole_score(setup, reduced, single._take(batch, slice(a, a + block)),
                                     theta[a:a + block], None if rv is None else rv[a:a + block])
            for a in range(0, n, block)])
        assert np.array_equal(whole, parts, equal_nan=True)


@pytest.mark.parametrize("n, block", [(20_011, 2048), (5_003, 7), (13, 4), (4, 4)])
def test_csv_rendered_in_blocks_matches_pandas(n, block, monkeypatch):
    monkeypatch.setattr(_csv, "RENDER_BLOCK", block)
    rng = np.random.default_rng(n)
    df = pd.DataFrame({
        "frame": rng.integers(-5, 10**6, n),
        "x": rng.normal(0, 1, n) * 10.0 ** rng.integers(-12, 12, n),
        "status": np.where(rng.random(n) < 0.5, "converged", "not_spot"),
        "ok": rng.random(n) < 0.3,
        "y": np.where(rng.random(n) < 0.05, np.nan, rng.uniform(0, 2048, n)),
    })
    assert _csv.to_csv_bytes(df, compiled=True) == df.to_csv(index=False, float_format="%.8g").encode()


def test_over_windows_runs_nested_calls_in_the_calling_thread():
    """A range that itself calls over_windows (a pool worker waiting on its own pool
    would never return) gets every item done exactly once."""
    out = np.zeros((12, 50), np.int64)

    def inner(row, start, stop):
        out[row, start:stop] += 1

    def outer(start, stop):
        for row in range(start, stop):
            _jit.over_windows(inner, out.shape[1], row, threaded=True)

    _jit.over_windows(outer, out.shape[0], threaded=True)
    assert (out == 1).all()


@pytest.mark.parametrize("shape", [(1, 257, 131), (23, 9, 40), (4, 61, 17)])
def test_in_strips_keeps_the_cores_of_strips_with_margins(shape):
    """A 3-cell running maximum and a pointwise product, in every number of strips up
    to one per cell, equal the whole grid's."""
    rng = np.random.default_rng(shape[1])
    a, b = rng.normal(size=shape), rng.normal(size=shape)

    def func(x, y):
        return background._box_filter(x, np.ones(3, np.int64), False), (x * y).astype(np.float32)

    whole = func(a, b)
    n = shape[background.strip_axis(shape)]
    for strips in sorted({2, 3, 5, n - 1, n}):
        parts = background.in_strips(func, (a, b), 1, strips)
        assert all(np.array_equal(w, p) and w.dtype == p.dtype for w, p in zip(whole, parts)), strips
    assert np.array_equal(background.in_strips(lambda x: x * 2, (a,), 0, 4), a * 2)


@pytest.mark.parametrize("camera", [CAMERA, None], ids=["camera", "measured noise"])
def test_detection_with_striped_grids_finds_the_same_candidates(camera, monkeypatch):
    from spotfit.detection import find_peaks

    frame = _frame((331, 517), 500, seed=11)
    noise = NoiseModel.from_camera(camera) if camera is not None else None
    found = []
    for cells in (10**12, 1):  # one piece; strips on the threads even for this small grid
        monkeypatch.setattr(background, "PARALLEL_CELLS", cells)
        found.append(find_peaks(frame, 1.3, noise=noise))
    (c0, s0), (c1, s1) = found
    assert len(c0) > 300
    assert np.array_equal(c0, c1) and np.array_equal(s0, s1)


@pytest.mark.parametrize("pieces_from", [10**9, 100])
def test_large_frame_fitted_in_pieces_gives_the_table_of_one_solve(pieces_from, monkeypatch):
    """A frame fitted in one piece per thread (calibrated camera, from PIECE_WINDOWS
    candidates on) has exactly the table of one solve; so has one split into more
    pieces than threads (a batch size of 150 windows)."""
    from spotfit import fields

    image = (_frame((301, 517), 400, seed=21) + 100.0).astype(np.uint16)
    monkeypatch.setattr(_jit, "MIN_THREADED_WINDOWS", 1)
    monkeypatch.setattr(fields, "PIECE_WINDOWS", 10**9)
    whole = spotfit.fit(image, camera=CAMERA, sigma=1.3, workers=2)
    assert len(whole) > 300
    monkeypatch.setattr(fields, "PIECE_WINDOWS", 100)
    if pieces_from == 100:
        monkeypatch.setattr(single, "batch_size", lambda setup: 150)
    seen = []
    original = fields._fit_pieces
    monkeypatch.setattr(fields, "_fit_pieces", lambda *a: seen.append(a[3]) or original(*a))
    pieces = spotfit.fit(image, camera=CAMERA, sigma=1.3, workers=2)
    assert seen and seen[0] >= 2
    pd.testing.assert_frame_equal(whole, pieces, check_exact=True)


@pytest.mark.parametrize("camera, read_map", [(spotfit.Camera(), False), (CAMERA, False), (CAMERA, True)],
                         ids=["lsq", "mle", "mle read-noise map"])
def test_compiled_quadrupole_score_is_the_numpy_one(camera, read_map, monkeypatch):
    seen = []
    original = single._doubtful
    monkeypatch.setattr(single, "_doubtful", lambda *a: seen.append(a) or original(*a))
    # (a dense frame: every candidate's symmetric fit through the gate, suspects' too)
    monkeypatch.setattr(spotfit.fields, "SETTLE_SYMMETRIC", False)
    image = (_frame((150, 331), 300, seed=8) + 100.0).astype(np.uint16)
    if read_map:
        rn = np.random.default_rng(3).uniform(1.0, 3.0, image.shape)
        camera = spotfit.Camera(baseline=100.0, gain=1.0, read_noise=rn)
    spotfit.fit(image, camera=camera, sigma=1.3)
    setup, reduced, batch, theta, limit, rv = max(seen, key=lambda a: len(a[3]))
    assert len(theta) > 200
    compiled = single._quadrupole_score(setup, reduced, batch, theta, rv)
    numpy = single._quadrupole_numpy(setup, reduced, batch, theta, rv)
    assert np.array_equal(np.isinf(compiled), np.isinf(numpy))
    fin = np.isfinite(numpy)
    assert np.allclose(compiled[fin], numpy[fin], rtol=1e-9, atol=1e-12)
    assert np.array_equal(compiled <= single.SCORE_GATE * limit, numpy <= single.SCORE_GATE * limit)


@pytest.mark.parametrize("shape, box, plateau", [
    ((1, 301, 517), (0, 2, 2), False), ((3, 40, 57), (1, 1, 1), False),
    ((1, 200, 130), (0, 0, 0), False),  # every pixel above the limit: ranges overflow
    ((1, 120, 90), (0, 1, 1), True),  # a plateau: every pixel a maximum
])
def test_screen_in_one_pass_finds_what_two_passes_find(shape, box, plateau, monkeypatch):
    from spotfit import detection

    rng = np.random.default_rng(sum(shape))
    volume = np.full(shape, 5.0, np.float32) if plateau else rng.normal(size=shape).astype(np.float32)
    cells = np.array([1, 4, 4], np.int64)
    limit = np.full((shape[0], -(-shape[1] // 4), -(-shape[2] // 4)), 0.5, np.float32)
    limit[..., ::3] = -2.0
    cell_x = np.arange(shape[2], dtype=np.int64) // 4
    box = np.array(box, np.int64)
    expected = detection._above_two_pass(volume, limit, cells, cell_x, box, 0, shape[0] * shape[1])
    assert len(expected) > 0 and np.all(np.diff(expected) > 0)
    for pixels in (10**12, 1):  # one range; ranges on the threads
        monkeypatch.setattr(detection, "PARALLEL_PIXELS", pixels)
        assert np.array_equal(detection._above(volume, limit, cells, box), expected)


def _in_one_piece(monkeypatch):
    """Threads for every batch, but each frame and each model choice in one piece."""
    from spotfit import fields

    monkeypatch.setattr(_jit, "MIN_THREADED_WINDOWS", 1)
    monkeypatch.setattr(fields, "PIECE_WINDOWS", 10**9)
    monkeypatch.setattr(single, "PIECE_WINDOWS", 10**9)


def _in_pieces(monkeypatch, windows):
    """The model choice of batches from ``windows`` in pieces; the list that collects the
    arguments of each such batch's :func:`spotfit.single._select_in_pieces`."""
    monkeypatch.setattr(single, "PIECE_WINDOWS", windows)
    calls = []
    original = single._select_in_pieces
    monkeypatch.setattr(single, "_select_in_pieces", lambda *a: calls.append(a) or original(*a))
    return calls


@pytest.mark.parametrize("camera", [spotfit.Camera(), CAMERA], ids=["lsq", "mle"])
def test_model_choice_in_pieces_gives_the_table_of_one_piece(camera, monkeypatch):
    """What follows the symmetric solve of a large batch, run in pieces side by side
    (single.PIECE_WINDOWS), gives exactly the table of one piece, with and without a
    camera (the frame's measured noise model shared by the pieces)."""
    image = (_frame((301, 517), 400, seed=22) + 100.0).astype(np.uint16)
    _in_one_piece(monkeypatch)
    whole = spotfit.fit(image, camera=camera, sigma=1.3, workers=2)
    assert len(whole) > 300
    calls = _in_pieces(monkeypatch, 100)
    pieces = spotfit.fit(image, camera=camera, sigma=1.3, workers=2)
    assert calls and len(calls[0][1]) > 300
    pd.testing.assert_frame_equal(whole, pieces, check_exact=True)


@pytest.mark.parametrize("camera", [spotfit.Camera(), CAMERA], ids=["lsq", "mle"])
def test_starting_values_in_blocks_give_the_table_of_one_block(camera, monkeypatch):
    image = (_frame((203, 517), 500, seed=23) + 100.0).astype(np.uint16)
    tables = []
    for block in (10**9, 7, 64):
        monkeypatch.setattr(single, "START_BLOCK", block)
        tables.append(spotfit.fit(image, camera=camera, sigma=1.3, workers=2))
    assert len(tables[0]) > 300
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other, check_exact=True)


def test_model_choice_in_pieces_keeps_the_grouped_candidates_choice(monkeypatch):
    """Dense frames pass ``choose_width`` (grouped candidates keep their symmetric fit
    without a choice) and the ``settled`` rule to the single-spot fits; in pieces each
    piece takes its own windows' widths and the rule, and the table is that of one piece."""
    movie, _ = spotfit.simulate((6, 32, 44), n_spots=70, photons=3000, background=20, sigma=1.1,
                                min_separation=1.0, border=1, camera=CAMERA, seed=24)
    _in_one_piece(monkeypatch)
    whole = spotfit.fit(movie, camera=CAMERA, sigma=1.1, workers=2)
    assert len(whole) > 200
    calls = _in_pieces(monkeypatch, 50)
    selected = []  # (windows, widths) of each piece's model choice
    select = single._select
    monkeypatch.setattr(single, "_select", lambda setup, reduced, batch, sol, width=None, settled=None: (
        selected.append((len(batch), width, settled)) or select(setup, reduced, batch, sol, width, settled)))
    pieces = spotfit.fit(movie, camera=CAMERA, sigma=1.1, workers=2)
    widths = [a[2] for a in calls]
    assert any(w is not None and np.ndim(w) == 1 and np.any(w > 0) for w in widths), widths
    assert len(selected) > 1 and all(np.shape(w) == (n,) for n, w, _ in selected), selected
    assert all(callable(rule) for _, _, rule in selected)  # every piece applies the settled rule
    pd.testing.assert_frame_equal(whole, pieces, check_exact=True)


@pytest.mark.parametrize("shape, sig", [((4, 60, 53), (1.3, 1.3)), ((3, 9, 40, 37), (2.0, 1.3, 1.1))],
                         ids=["2d", "3d"])
def test_dog_in_window_boxes_is_the_dog_of_padded_frames(shape, sig):
    """The split of stretched joint fits filters each window's box widened by the
    filter's reach, or the frames with zeros beyond their edges, instead of the padded
    frames: the same values at the windows' pixels within the frames, windows at the
    frames' edges (a pixel beyond) included."""
    from spotfit.filters import DOG_RATIO
    from spotfit.group import _dog_windows

    rng = np.random.default_rng(27)
    data = rng.normal(10.0, 3.0, shape) * (rng.random(shape) > 0.05)
    half = np.array([3] * (len(shape) - 1))
    inner = tuple(2 * half + 1)
    margin = np.array([int(np.ceil(4 * DOG_RATIO * s)) for s in sig]) + half + 2
    n = 40
    t = rng.integers(0, shape[0], n)
    lo = np.column_stack([rng.integers(-h - 1, m - h + 1, n) for h, m in zip(half, shape[1:])])
    lo[0] = -half - 1  # the extremes: a centre a pixel outside the frame
    lo[1] = np.array(shape[1:]) - half
    boxes = _dog_windows(data, t, lo, inner, sig, margin, boxes=True)
    frames = _dog_windows(data, t, lo, inner, sig, margin, boxes=False)
    assert boxes.shape == (n, int(np.prod(inner)))
    assert np.array_equal(boxes, frames)
    assert np.ptp(boxes) > 0
    # both: the DoG of the frames padded by `margin` zeros, at the windows' pixels within
    # the frames (0 beyond them)
    from spotfit import roi
    from spotfit.background import gaussian_filter

    padded = np.pad(data, [(0, 0)] + [(int(m), int(m)) for m in margin])
    dog = gaussian_filter(padded, (0,) + tuple(sig), mode="nearest") - \
        gaussian_filter(padded, (0,) + tuple(DOG_RATIO * s for s in sig), mode="nearest")
    want = roi.cut_box(dog, np.column_stack([t, lo + margin]), (1,) + inner).data
    pix = lo[:, :, None] + np.indices(inner).reshape(len(inner), -1)[None]
    within = np.all((pix >= 0) & (pix < np.array(shape[1:])[None, :, None]), axis=1)
    assert (~within).any() and np.array_equal(boxes, np.where(within, want, 0.0))


def test_fits_in_pieces_measure_the_noise_model_of_one_solve(monkeypatch):
    """solver.minimise + solver.finish is solver.solve; fits of consecutive pieces, their
    regression windows' statistics joined (noise_sums, noise_model), give each frame the
    noise model, covariances and chi-square of one solve: two frames, regression windows
    a subset of each frame's (REGRESSION_WINDOWS), pieces that cut across frames."""
    from spotfit import solver
    from spotfit.config import FitConfig, Setup
    from spotfit.start import image_noise

    monkeypatch.setattr(solver, "REGRESSION_WINDOWS", 37)
    setup = Setup.resolve(FitConfig(sigma=1.3), spotfit.Camera(), 2)
    reduced = single._reduced(setup)
    batches = []
    for t, seed in enumerate((28, 29)):
        photons = _frame((120, 231), 150, seed=seed) * (1.0 + t)  # the frames' noise differs
        coords = np.argwhere(photons > np.percentile(photons, 98.0))[::4]
        batches.append(single.cut_frame(setup, t, photons, coords, image_noise(photons)))
    batch = single.Batch.join(batches)
    assert len(batch) > 100 and len(np.unique(batch.frame)) == 2
    whole = single._solve(reduced, batch)
    regression = solver.regression_rows(batch.frame)
    assert 0 < len(regression) < len(batch) // 2
    bounds = [(0, 41), (41, len(batch) // 2 + 3), (len(batch) // 2 + 3, len(batch))]
    fits = [single._minimise(reduced, single._take(batch, slice(a, b))) for a, b in bounds]
    sums = [solver.noise_sums(f, regression[(regression >= a) & (regression < b)] - a)
            for f, (a, b) in zip(fits, bounds)]
    variance = solver.noise_model(batch.frame, np.concatenate(sums))
    assert np.array_equal(variance, whole.variance)
    assert not np.array_equal(variance[0], variance[-1])  # one model per frame
    for f, (a, b) in zip(fits, bounds):
        part = solver.finish(f, groups=batch.frame[a:b], variance=variance[a:b])
        for name in ("theta", "cov", "cost", "chi2_red", "iterations", "status", "bias", "variance"):
            assert np.array_equal(getattr(part, name), getattr(whole, name)[a:b], equal_nan=True), name


@pytest.mark.parametrize("camera", [spotfit.Camera(), spotfit.Camera(baseline=100.0),
                                    spotfit.Camera(baseline=100.5, gain=0.37, em_gain=3.0)],
                         ids=["none", "baseline", "calibrated"])
@pytest.mark.parametrize("raw", ["uint16", ">u2", "float64 3d"])
def test_photons_in_strips_are_those_of_one_pass(camera, raw, monkeypatch):
    """Large frames are converted to photons in strips of rows side by side
    (camera.STRIP_PIXELS): the same numbers as the whole frame at once, big-endian
    input and stacks included; the input is left alone; an overflow still names the
    camera values."""
    from spotfit import camera as camera_module

    rng = np.random.default_rng(30)
    if raw == "float64 3d":
        adu = rng.normal(300.0, 50.0, (3, 37, 61))
    else:
        adu = rng.integers(0, 60000, (203, 117)).astype(raw)
    before = adu.copy()
    monkeypatch.setattr(camera_module, "STRIP_PIXELS", 10**12)
    whole = camera.to_photons(adu)
    monkeypatch.setattr(camera_module, "STRIP_PIXELS", 1)
    calls = []
    original = camera_module.Camera._convert
    monkeypatch.setattr(camera_module.Camera, "_convert", lambda *a: calls.append(a) or original(*a))
    strips = camera.to_photons(adu)
    assert len(calls) == camera_module.STRIPS
    assert strips.dtype == whole.dtype == np.float32 and strips.dtype.isnative
    assert np.array_equal(strips, whole)
    assert np.array_equal(adu, before)
    with pytest.raises(spotfit.SpotfitInputError, match="gain"):
        spotfit.Camera(baseline=0.0, gain=1e300).to_photons(adu)


@pytest.mark.parametrize("camera", [spotfit.Camera(), CAMERA], ids=["lsq", "mle"])
def test_close_pairs_found_beside_the_pieces_are_those_overlaps_finds(camera, monkeypatch):
    """A frame fitted in pieces has its candidates' close pairs found by one more job
    on the threads (fields._find_close_pairs); the search for overlapping spots uses
    them (and searches itself without them): the same overlapping spots."""
    from spotfit import fields, near

    image = (_frame((301, 517), 600, seed=32) + 100.0).astype(np.uint16)
    monkeypatch.setattr(_jit, "MIN_THREADED_WINDOWS", 1)
    monkeypatch.setattr(single, "PIECE_WINDOWS", 100)
    monkeypatch.setattr(fields, "PIECE_WINDOWS", 100)
    seen, searches = [], []
    overlaps, pairs_within = fields._overlaps, near.pairs_within
    monkeypatch.setattr(fields, "_overlaps", lambda *a: seen.append(a) or overlaps(*a))
    spotfit.fit(image, camera=camera, sigma=1.3, workers=2)
    setup, frame, singles = seen[0]
    assert frame.close is not None and np.array_equal(frame.close[0], frame.coords)
    monkeypatch.setattr(near, "pairs_within", lambda *a: searches.append(a) or pairs_within(*a))
    hot = overlaps(setup, frame, singles)
    assert not searches  # the pairs found beside the pieces
    frame.close = None
    assert np.array_equal(overlaps(setup, frame, singles), hot) and len(searches) == 1
    assert hot.sum() > 10


@pytest.mark.parametrize("dtype, nan", [(np.float32, False), (np.float64, False), (np.uint16, False),
                                        (np.float32, True), (np.float64, True)])
def test_extremes_in_strips_are_those_of_the_whole_array(dtype, nan):
    """estimate_noise's range of a large frame, in strips of rows on the threads: the
    whole array's min and max, NaN included."""
    rng = np.random.default_rng(33)
    raw = (rng.normal(500.0, 200.0, (2, 331, 517)) + 1000).astype(dtype)
    if nan:
        raw[1, 300, 7] = np.nan
    for strips in (1, 8, 331):
        low, high = background._extremes(raw, strips)
        if nan:
            assert np.isnan(low) and np.isnan(high)
        else:
            assert (low, high) == (float(np.min(raw)), float(np.max(raw)))


@pytest.mark.parametrize("shape", [(611, 517), (3, 301, 517), (1, 700, 700)])
def test_level_removed_in_strips_is_the_whole_subtraction(shape):
    """Detection removes the frame's typical level in strips of rows on the threads for
    large frames: the same float32 numbers as one subtraction."""
    from spotfit import detection

    data = np.random.default_rng(34).normal(300.0, 40.0, shape).astype(np.float32)
    shift = np.float32(297.31)
    out = detection._minus(data, shift)
    expected = data - shift
    assert out.dtype == expected.dtype == np.float32 and np.array_equal(out, expected)


def test_windows_of_frames_cut_together_are_those_cut_frame_by_frame():
    """single.cut_frames gives, frame after frame, the windows cut_frame gives each frame:
    pixels, masks (image edges, invalid pixels, neighbours of the frame's own candidates
    only), origins, saturation, frame numbers (non-square frames, candidates on the edges,
    a frame with a valid map and a saturated one beside one without)."""
    from types import SimpleNamespace

    from spotfit.config import FitConfig, Setup

    rng = np.random.default_rng(71)
    shape = (23, 37)
    setup = Setup.resolve(FitConfig(sigma=1.2), CAMERA, 2)
    frames = []
    for t in range(4):
        photons = rng.uniform(0.0, 50.0, shape).astype(np.float32)
        n = int(rng.integers(3, 40))
        coords = np.column_stack([rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)])
        coords[0] = (0, shape[1] - 1)  # a corner: a window mostly outside
        coords = np.unique(coords, axis=0)
        valid = rng.random(shape) > 0.1 if t == 1 else None
        saturated = rng.random(shape) > 0.97 if t == 2 else None
        frames.append(SimpleNamespace(t=10 + 3 * t, photons=photons, coords=coords, image_var=float(t + 1),
                                      valid=valid, saturated=saturated))
    read_var = rng.uniform(1.0, 4.0, shape)
    together = single.cut_frames(setup, frames, read_var=read_var)
    one_by_one = single.Batch.join([single.cut_frame(setup, f.t, f.photons, f.coords, f.image_var,
                                                     saturated=f.saturated, valid=f.valid, read_var=read_var)
                                    for f in frames])
    assert len(together) == sum(len(f.coords) for f in frames)
    for name in ("data", "mask", "origin", "read_var"):
        np.testing.assert_array_equal(getattr(together.windows, name), getattr(one_by_one.windows, name))
    assert together.windows.grid.shape == one_by_one.windows.grid.shape
    for name in ("frame", "image_var", "saturated"):
        np.testing.assert_array_equal(getattr(together, name), getattr(one_by_one, name))
    assert together.saturated.any() and (~together.windows.mask).any()


def test_dense_movie_fitted_on_two_threads_gives_the_table_of_one(monkeypatch):
    """A movie of dense frames (joint fits: buckets and blob tests side by side on the
    threads; windows cut for all frames at once) gives exactly the table of one thread,
    and the frames' rows are those of the frames fitted alone, to rounding (their
    buckets' windows are shaped by all the frames' groups)."""
    from spotfit.match import match_spots
    from spotfit.simulation import render as draw

    rng = np.random.default_rng(72)
    shape, sigma = (30, 41), 1.1
    frames, truth = [], []
    for _ in range(3):
        xy = rng.uniform(0.0, [shape[1] - 1, shape[0] - 1], (45, 2))
        mu = draw(shape, xy[:, 0], xy[:, 1], rng.uniform(1000.0, 4000.0, len(xy)), sigma, background=10.0)
        frames.append((rng.poisson(mu) + 100.0).astype(np.float32))
        truth.append(xy)
    movie = np.stack(frames)
    monkeypatch.setattr(_jit, "MIN_THREADED_WINDOWS", 1)
    one = spotfit.fit(movie, camera=CAMERA, sigma=sigma, axes="TYX", workers=1)
    two = spotfit.fit(movie, camera=CAMERA, sigma=sigma, axes="TYX", workers=2)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    for t, frame in enumerate(frames):
        alone = spotfit.fit(frame, camera=CAMERA, sigma=sigma, workers=2)
        mine = two[two["frame"] == t].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine.drop(columns="frame"), alone.drop(columns="frame"), rtol=1e-6)
        ok = mine[mine["status"] == "converged"]
        found, _ = match_spots(ok[["x", "y"]].to_numpy(), truth[t], 1.0)
        assert len(found) >= 0.6 * len(truth[t])  # a crowded frame: most emitters found (px)
