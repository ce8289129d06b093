"""Sparse frames fitted jointly where their spots overlap, by default (issue #10, "real fields").

Simulated, seeded, non-square images with known truth: isolated spots keep
their single-spot fit; close pairs that the detector sees as one candidate
are split; large frames are fitted jointly only in tiles around the
overlaps; textured light keeps its single fits.
"""

import numpy as np
import pandas as pd
import pytest

import spotfit
import spotfit.fields
import spotfit.group
import spotfit.api
from spotfit.camera import Camera
from spotfit.match import match_spots
from spotfit.simulation import render

CAMERA = Camera(baseline=100.0, gain=1.0, read_noise=1.5)


def _frame(shape, sigma, n_single, n_pairs, separation, seed, photons=3000.0, background=20.0):
    """Isolated spots and close pairs on a grid (cells 16 px apart), Poisson + read noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[10:shape[0] - 8:16, 10:shape[1] - 8:16]
    sites = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    sites = sites[rng.permutation(len(sites))[: n_single + n_pairs]] + rng.uniform(-1, 1, (n_single + n_pairs, 2))
    angle = rng.uniform(0, np.pi, n_pairs)
    half = 0.5 * separation * np.column_stack([np.cos(angle), np.sin(angle)])
    pairs = sites[n_single:]
    xy = np.concatenate([sites[:n_single], pairs - half, pairs + half])
    mu = render(shape, xy[:, 0], xy[:, 1], photons, sigma, background=background)
    img = (100 + rng.poisson(mu) + rng.normal(0, 1.5, shape)).astype(np.float32)
    return img, xy


def _single_only(monkeypatch):
    monkeypatch.setattr(spotfit.fields, "_overlaps", lambda setup, frame, singles: np.zeros(len(singles), bool))


def _recall(table, xy, radius=0.75, everything=None):
    """Fraction of ``xy`` found within ``radius`` (converged rows), and the converged
    rows farther than 1.5 px from every spot of ``everything``."""
    ok = table[table.status == "converged"]
    i, j = match_spots(ok[["x", "y"]].to_numpy(), xy, radius)
    everything = xy if everything is None else everything
    found = match_spots(ok[["x", "y"]].to_numpy(), everything, 1.5)[0]
    return len(j) / len(xy), len(ok) - len(found)


@pytest.mark.parametrize("seed", [1, 2])
def test_close_pairs_in_a_sparse_frame_are_split_by_default(monkeypatch, seed):
    # a 70 x 110 px frame (sparse: coverage ~0.05) of 8 isolated spots and 6 pairs
    # 1.6 px apart (1.9 sigma; one candidate each): the default finds >= 90 % of the
    # pairs' spots within 0.75 px, the single-spot path alone almost none (one fit between two)
    sigma = 0.85
    img, xy = _frame((70, 110), sigma, 8, 6, 1.6, seed)
    default = spotfit.fit(img, camera=CAMERA, sigma=sigma)
    assert spotfit.group.coverage(np.zeros((14, 2)), img.shape, spotfit.FitConfig(sigma=sigma)) < \
        spotfit.group.DENSE_COVERAGE
    _single_only(monkeypatch)
    single = spotfit.fit(img, camera=CAMERA, sigma=sigma)
    pairs = xy[8:]
    r_default, fp_default = _recall(default, pairs, everything=xy)
    r_single, _ = _recall(single, pairs)
    assert r_default >= 0.9 and r_single <= 0.2, (r_default, r_single)
    assert fp_default <= 1
    # isolated spots keep their single-spot fit, row for row
    cols = ["x", "y", "intensity", "sigma_x", "sigma_y", "status"]
    iso_d = default.iloc[match_spots(default[["x", "y"]].to_numpy(), xy[:8], 1.0)[0]]
    iso_s = single.iloc[match_spots(single[["x", "y"]].to_numpy(), xy[:8], 1.0)[0]]
    pd.testing.assert_frame_equal(iso_d[cols].sort_values("x").reset_index(drop=True),
                                  iso_s[cols].sort_values("x").reset_index(drop=True))
    assert list(default.columns) == list(single.columns)  # no group columns by default


def test_the_tiles_of_a_stacks_frames_are_fitted_in_one_pass_with_each_frames_own_rows(monkeypatch):
    # three large frames (230 x 300 px) with pairs 1.6 px apart and one without any: the
    # tiles of all frames go through the crowded-field engine once, and each frame gets
    # the rows it gets when fitted alone, bit for bit
    sigma = 0.85
    frames = [_frame((230, 300), sigma, 60, n, 1.6, seed)[0] for seed, n in ((11, 4), (12, 0), (13, 2))]
    stack = np.stack(frames)
    calls = []
    tiles = spotfit.fields._fit_tiles
    monkeypatch.setattr(spotfit.fields, "_fit_tiles", lambda setup, jobs: calls.append(len(jobs)) or tiles(setup, jobs))
    together = spotfit.fit(stack, camera=CAMERA, sigma=sigma, axes="TYX")
    assert calls == [2]  # the frame without overlaps has no tiles
    for t, img in enumerate(frames):
        alone = spotfit.fit(img[None], camera=CAMERA, sigma=sigma, axes="TYX")
        alone["frame"] = np.int64(t)
        pd.testing.assert_frame_equal(together[together["frame"] == t].reset_index(drop=True), alone,
                                      check_exact=True)
    assert calls[1:] == [1, 1]


def test_large_frames_are_fitted_jointly_in_tiles_around_the_overlaps(monkeypatch):
    # 230 x 300 px (larger than TILE_FRAME tiles): 150 isolated spots and 10 pairs; only
    # tiles around the pairs are fitted jointly, the rest is the single-spot path's
    sigma = 0.85
    img, xy = _frame((230, 300), sigma, 150, 10, 1.6, 3)
    assert img.size > spotfit.fields.TILE_FRAME * spotfit.fields._tile_size(
        spotfit.config.Setup.resolve(spotfit.FitConfig(sigma=sigma), CAMERA, 2)) ** 2
    calls = []
    tiles = spotfit.fields._fit_tiles
    monkeypatch.setattr(spotfit.fields, "_fit_tiles", lambda *a: calls.append(1) or tiles(*a))
    default = spotfit.fit(img, camera=CAMERA, sigma=sigma)
    assert calls
    r_default, fp = _recall(default, xy[150:], everything=xy)
    _single_only(monkeypatch)
    single = spotfit.fit(img, camera=CAMERA, sigma=sigma)
    r_single, _ = _recall(single, xy[150:])
    assert r_default >= 0.9 and r_single <= 0.2 and fp <= 2, (r_default, r_single, fp)
    # every spot once; rows in raster order by frame like the single-spot path's
    assert _recall(default, xy[:150])[0] == 1.0
    keys = default[["frame", "y", "x"]].to_numpy()
    assert len(default) == len(np.unique(np.rint(keys * 10), axis=0))


def test_bright_isolated_spots_are_not_split_by_default():
    # issue #10: 60 spots of 4000-8000 photons over 10 photons/px, 16 px apart (seed 9)
    rng = np.random.default_rng(9)
    ys, xs = np.mgrid[10:130:16, 10:230:16]
    xy = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)[:60] + rng.uniform(-1, 1, (60, 2))
    mu = render((140, 240), xy[:, 0], xy[:, 1], rng.uniform(4000, 8000, 60), 1.3, background=10.0)
    img = (rng.poisson(mu) + 100).astype(np.uint16)
    table = spotfit.fit(img, camera=Camera(baseline=100.0, gain=1.0))
    ok = table[table.status == "converged"]
    i, j = match_spots(ok[["x", "y"]].to_numpy(), xy, 1.0)
    assert len(j) == 60 and len(ok) == 60 and len(table) == 60


def test_regions_whose_joint_fits_misfit_at_the_width_bound_keep_their_single_fits():
    setup = spotfit.config.Setup.resolve(spotfit.FitConfig(sigma=1.0), CAMERA, 2)
    top = spotfit.group.WIDTH_RANGE[1]
    joint = pd.DataFrame({"frame": [0, 0, 0, 1, 1, 2, 2, 3, 3, 4],
                          "sigma_x": [1.0, top, top, top, top, top, top, 1.8, 1.8, top],
                          "sigma_y": [1.0, top, top, top, top, top, top, 1.2, 1.2, top],
                          "chi2_red": [1.0, 9.0, 9.0, 1.1, 1.1, 9.0, 9.0, 9.0, 9.0, 9.0],
                          "status": ["converged"] * 5 + ["low_signal"] * 2 + ["converged"] * 3})
    # frame 0: two emitters pinned and misfit; 1: pinned but fitting; 2: not converged;
    # 3: free (single) fits; 4: one pinned misfit emitter only (MISFIT_REGION = 2)
    assert spotfit.fields.MISFIT_REGION == 2
    assert spotfit.fields._misfit_regions(setup, joint).tolist() == [0]


@pytest.mark.parametrize("camera", [CAMERA, None])
def test_tiles_fitted_together_give_the_rows_of_tiles_fitted_one_by_one(monkeypatch, camera):
    # 230 x 300 px, 150 isolated spots and 10 pairs 1.6 px apart (seed 5): the tiles
    # around the pairs are fitted in one pass of the joint fitter; fitting each tile
    # on its own gives the same table (with a camera bit for bit; without one, the
    # noise model the joint solves measure sums over other windows: the last bits,
    # ~5e-15 relative on seed 5), and the pairs are split either way
    sigma = 0.85
    img, xy = _frame((230, 300), sigma, 150, 10, 1.6, 5)
    dense, passes = spotfit.fields.fit_dense, []

    def counted(setup, frames, singles=None, light=False):
        passes.append(len(frames))
        return dense(setup, frames, singles=singles, light=light)

    monkeypatch.setattr(spotfit.fields, "fit_dense", counted)
    together = spotfit.fit(img, camera=camera, sigma=sigma)
    assert len(passes) == 1 and passes[0] >= 4, passes  # several tiles, one pass

    def one_by_one(setup, frames, singles=None, light=False):
        t = singles["frame"].to_numpy()
        parts = [dense(setup, [f], singles=singles[t == f.t], light=light) for f in frames]
        passes.append(len(parts))
        return spotfit.lighttable.concat(parts)

    monkeypatch.setattr(spotfit.fields, "fit_dense", one_by_one)
    apart = spotfit.fit(img, camera=camera, sigma=sigma)
    if camera is None:
        pd.testing.assert_frame_equal(together, apart, check_exact=False, rtol=1e-12, atol=0.0)
    else:
        pd.testing.assert_frame_equal(together, apart, check_exact=True)
    assert np.array_equal(together[["x", "y"]].to_numpy(), apart[["x", "y"]].to_numpy())
    r, fp = _recall(together, xy[150:], everything=xy)
    assert r >= 0.9 and fp <= 2, (r, fp)
