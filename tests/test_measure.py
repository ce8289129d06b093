"""Intensities at known positions (spotfit.measure, ``spotfit measure``) against known truth.

Movies are simulated with per-frame photon counts (blinking, bleaching, spots
that vanish), seeded, on non-square frames (70 x 110 px) so that x/y mix-ups
show.  Relative errors are fractions of the true photon count; "pull" is
(measured - true) / reported error, whose standard deviation is 1 when the
reported errors are honest.
"""

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
from spotfit import photometry
from spotfit._photometry_kernels import LSQ, MLE, measure_windows
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.models import Grid, get_model
from spotfit.simulation import simulate

CAMERA = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]
NY, NX = 70, 110
SIGMA = 1.3


def _grid(rng, nx=NX, ny=NY, cols=4, rows=4, border=8.0):
    """Spot centres on a jittered grid (x, y), well apart."""
    xs, ys = np.meshgrid(np.linspace(border, nx - 1 - border, cols), np.linspace(border, ny - 1 - border, rows))
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    return xy + rng.uniform(-0.5, 0.5, xy.shape)


def _movie(xy, photons, background=10.0, seed=0, camera=CAMERA, shape=(NY, NX)):
    """A TYX movie of spots at fixed ``xy`` with ``photons[t, i]``; returns image and truth."""
    T, n = photons.shape
    truth = pd.DataFrame({
        "frame": np.repeat(np.arange(T), n), "x": np.tile(xy[:, 0], T),
        "y": np.tile(xy[:, 1], T), "photons": photons.ravel(),
    })
    img, _ = simulate((T,) + shape, positions=truth.rename(columns={"photons": "intensity"}),
                      background=background, sigma=SIGMA,
                      camera=camera, seed=seed)
    truth["spot_id"] = np.tile(np.arange(n), T)
    return img, truth


def _blinking(rng, T, n, lo=1000.0, hi=4000.0):
    """Per-frame photons: on at a per-spot level, blinking off 15% of frames, bleached at a random frame."""
    level = rng.uniform(lo, hi, n)
    bleach = rng.integers(T // 3, T + T // 3, n)
    on = (rng.random((T, n)) < 0.85) & (np.arange(T)[:, None] < bleach[None, :])
    return np.where(on, level[None, :], 0.0)


def _joined(table, truth):
    out = table.merge(truth[["frame", "spot_id", "photons"]], on=["frame", "spot_id"], validate="1:1")
    assert len(out) == len(table) == len(truth)
    return out


# ------------------------------------------------------------------ traces
@pytest.fixture(scope="module")
def blinking_movie():
    rng = np.random.default_rng(7)
    xy = _grid(rng)
    photons = _blinking(rng, 200, len(xy))
    img, truth = _movie(xy, photons, background=5.0, seed=8)
    return xy, img, truth


@pytest.mark.parametrize("estimator", ["lsq", "mle"])
def test_traces_recover_per_frame_photons(blinking_movie, estimator):
    """Blinking/bleaching spots: per-frame photons recovered, unbiased, with honest errors."""
    xy, img, truth = blinking_movie
    table = spotfit.measure(img, xy, camera=CAMERA, estimator=estimator)
    m = _joined(table, truth)
    on = m.photons >= 1000
    rel = (m.intensity / m.photons - 1.0)[on]
    assert on.sum() > 1500
    # mle reaches the bound; unweighted lsq gives the background pixels too much weight
    assert np.median(np.abs(rel)) <= (0.02 if estimator == "mle" else 0.025), np.median(np.abs(rel))
    assert abs(rel.mean()) <= 0.005, rel.mean()  # SE of the mean ~0.05%
    pull = (m.intensity - m.photons) / m.intensity_err
    assert 0.92 <= pull[on].std() <= 1.08, pull[on].std()
    off = m.photons == 0
    assert off.sum() > 500
    assert 0.9 <= pull[off].std() <= 1.1, pull[off].std()
    # a spot that is off measures 0 on average, negative about as often as positive
    off_n = m.intensity[off]
    assert abs(off_n.mean()) <= 4 * off_n.std() / np.sqrt(off.sum()), off_n.mean()
    assert 0.4 <= (off_n < 0).mean() <= 0.6
    assert (m.status[off] == "low_signal").mean() >= 0.98
    assert (m.status[on] == "converged").all()
    assert (m.unit == "photon").all()
    bg = m.background
    assert abs(bg.mean() - 5.0) < 0.05 and 0.9 <= ((bg - 5.0) / m.background_err).std() <= 1.1


def test_wlsq_traces(blinking_movie):
    """wlsq: bright frames within 1% (its data-based weights bias faint ones; see the README)."""
    xy, img, truth = blinking_movie
    m = _joined(spotfit.measure(img, xy, camera=CAMERA, estimator="wlsq"), truth)
    on = m.photons >= 1000
    rel = (m.intensity / m.photons - 1.0)[on]
    assert np.median(np.abs(rel)) <= 0.02 and abs(rel.mean()) <= 0.01, rel.mean()


def test_aperture_sum_is_model_free_and_honest(blinking_movie):
    """Aperture of radius 3 sigma: 98.9% of a Gaussian's light, errors match the scatter."""
    xy, img, truth = blinking_movie
    m = _joined(spotfit.measure(img, xy, camera=CAMERA), truth)
    assert (m.aperture_status == "ok").all()
    on = m.photons >= 1000
    rel = (m.aperture_intensity / m.photons - 1.0)[on]
    assert -0.03 <= rel.mean() <= -0.003, rel.mean()  # centre-in-circle pixels, 3 sigma
    pull = (m.aperture_intensity - 0.989 * m.photons) / m.aperture_intensity_err
    assert 0.9 <= pull.std() <= 1.1, pull.std()
    assert abs(m.aperture_background.mean() - 5.0) < 0.1


def test_traces_without_camera_are_in_adu_with_measured_noise():
    """No gain: ADU above baseline, lsq, errors from a noise model fitted to the data.

    The PSF's sigma is given, so the profile is pixel-integrated (a point-sampled
    one, fit's default without gain, needs the sampled width, see the README).
    """
    rng = np.random.default_rng(11)
    xy = _grid(rng)
    photons = _blinking(rng, 120, len(xy), 1500, 4000)
    img, truth = _movie(xy, photons, seed=12)
    table = spotfit.measure(img, xy, camera=Camera(baseline=100.0), integrated=True)
    m = _joined(table, truth)
    adu = m.photons / 2.0  # the simulated camera's gain is 2 photons per ADU
    on = m.photons > 0
    assert (m.unit == "ADU").all()
    assert abs((m.intensity / adu - 1.0)[on].mean()) <= 0.005
    pull = (m.intensity - adu) / m.intensity_err
    assert 0.88 <= pull.std() <= 1.12, pull.std()


def test_a_vanishing_spot_gets_a_status_not_a_crash():
    """A spot that bleaches: low_signal afterwards; an all-dark window (mle): singular."""
    rng = np.random.default_rng(5)
    xy = np.array([[30.3, 20.6], [80.7, 45.2]])
    photons = np.zeros((20, 2))
    photons[:8, 0] = 3000.0
    photons[:, 1] = 3000.0
    img, truth = _movie(xy, photons, seed=6)
    m = _joined(spotfit.measure(img, xy, camera=CAMERA), truth)
    first = m[m.spot_id == 0].sort_values("frame")
    assert (first.status[:8] == "converged").all()
    assert (first.status[8:] == "low_signal").all()
    assert np.all(np.abs(first.intensity[8:]) < 4 * first.intensity_err[8:])
    # no photons at all (background 0, no read noise): the likelihood has no interior maximum
    dark = np.full((3, NY, NX), 100, np.uint16)
    table = spotfit.measure(dark, xy, camera=Camera(baseline=100.0, gain=1.0))
    assert (table.status == "singular").all() and table.intensity.isna().all()
    lsq = spotfit.measure(dark, xy, camera=Camera(baseline=100.0, gain=1.0), estimator="lsq")
    assert (lsq.intensity == 0).all() and (lsq.status == "low_signal").all()
    del rng


# ------------------------------------------------------------- geometry
def test_spots_at_the_border_are_measured_in_truncated_windows():
    """Centres 0-1.5 px from every edge: unbiased model intensities; apertures flagged."""
    rng = np.random.default_rng(21)
    d = rng.uniform(0.0, 1.5, 16)
    xs = np.concatenate([d[:4], NX - 1 - d[4:8], np.linspace(20, 90, 4), np.linspace(20, 90, 4)])
    ys = np.concatenate([np.linspace(12, 58, 4), np.linspace(12, 58, 4), d[8:12], NY - 1 - d[12:16]])
    xy = np.column_stack([xs, ys])
    photons = np.full((80, len(xy)), 3000.0)
    img, truth = _movie(xy, photons, seed=22)
    m = _joined(spotfit.measure(img, xy, camera=CAMERA), truth)
    rel = m.intensity / m.photons - 1.0
    per_spot = rel.groupby(m.spot_id).mean()
    assert np.all(np.abs(per_spot) < 0.03), per_spot.to_numpy()  # SE per spot ~0.4%
    assert abs(rel.mean()) < 0.005
    assert (m.status == "converged").all()
    pull = (m.intensity - m.photons) / m.intensity_err
    assert 0.9 <= pull.std() <= 1.1
    assert (m.aperture_status == "truncated").all()


def test_overlapping_spots_are_fitted_jointly():
    """Pairs 2.5 px apart: each spot's photons recovered; the neighbour is a column of the fit."""
    rng = np.random.default_rng(31)
    left = _grid(rng, cols=3, rows=3, border=12.0)
    right = left + np.array([2.5, 0.4])
    xy = np.vstack([left, right])
    photons = np.column_stack([np.full((60, 9), 2000.0), np.full((60, 9), 4000.0)])
    img, truth = _movie(xy, photons, seed=32)
    table = spotfit.measure(img, xy, camera=CAMERA)
    m = _joined(table, truth)
    assert (m.neighbours == 1).all()
    rel = (m.intensity / m.photons - 1.0).groupby(m.photons).mean()
    assert np.all(np.abs(rel) < 0.01), rel
    pull = (m.intensity - m.photons) / m.intensity_err
    assert 0.9 <= pull.std() <= 1.1
    assert (m.aperture_status == "crowded").all()
    # measured alone, each spot would swallow a good part of its neighbour's light
    alone = spotfit.measure(img, left, camera=CAMERA)
    assert alone.intensity.mean() > 1.1 * 2000


def test_refine_holds_positions_fitted_on_the_summed_frames():
    """Positions given 0.7 px off: biased low as given, right after --refine."""
    rng = np.random.default_rng(41)
    xy = _grid(rng)
    photons = _blinking(rng, 40, len(xy), 1500, 3000)
    img, truth = _movie(xy, photons, seed=42)
    off = xy + rng.choice([-0.7, 0.7], xy.shape)
    bad = _joined(spotfit.measure(img, off, camera=CAMERA), truth)
    on = bad.photons > 0
    assert (bad.intensity / bad.photons)[on].mean() < 0.9
    table = spotfit.measure(img, off, camera=CAMERA, refine=True)
    m = _joined(table, truth)
    on = m.photons > 0
    assert m.refined.all()
    moved = table.drop_duplicates("spot_id")[["x", "y"]].to_numpy()
    assert np.max(np.abs(moved - xy)) < 0.1  # px; the sum of ~30 frames of ~2000 photons
    assert abs((m.intensity / m.photons - 1.0)[on].mean()) < 0.01
    # every frame of a spot uses the same position: drift-free
    assert (table.groupby("spot_id").x.nunique() == 1).all()


# -------------------------------------------------------- colocalisation
def _two_channels(seed):
    """A CYX image: channel 0 has every spot, channel 1 only the first half."""
    rng = np.random.default_rng(seed)
    xy = _grid(rng, cols=5, rows=3)
    n = len(xy)
    present = np.arange(n) < n // 2
    frames = []
    for c, photons in enumerate((np.full(n, 3000.0), np.where(present, 1500.0, 0.0))):
        pos = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "intensity": photons})
        img, _ = simulate((NY, NX), positions=pos, background=10.0, sigma=SIGMA, camera=CAMERA,
                          seed=seed + c)
        frames.append(img)
    return np.stack(frames), xy, present


def _check_colocalisation(found, measured, xy, present):
    d = np.hypot(found.x.to_numpy()[:, None] - xy[None, :, 0], found.y.to_numpy()[:, None] - xy[None, :, 1])
    truth_of = np.argmin(d, axis=1)
    assert len(found) == len(xy) and np.all(d.min(axis=1) < 0.5)
    measured = measured.sort_values("spot_id")
    has = present[truth_of[measured.spot_id.to_numpy()]]
    assert (measured.channel == 1).all()
    yes, no = measured[has], measured[~has]
    assert (yes.status == "converged").all()
    assert np.all(np.abs(yes.intensity / 1500.0 - 1.0) < 0.15)
    assert abs(yes.intensity.mean() / 1500.0 - 1.0) < 0.05
    assert (no.status == "low_signal").all()
    assert np.all(np.abs(no.intensity) < 4 * no.intensity_err)


def test_two_channel_colocalisation():
    """Fit channel 0, measure channel 1 at those positions: present and absent spots told apart."""
    image, xy, present = _two_channels(51)
    found = spotfit.fit(image, camera=CAMERA, axes="CYX", channel=0)
    measured = spotfit.measure(image, found, camera=CAMERA, axes="CYX", channel=1)
    _check_colocalisation(found, measured, xy, present)


def test_two_channel_colocalisation_command_line(tmp_path):
    """The README's colocalisation commands, on a two-channel ImageJ TIFF."""
    image, xy, present = _two_channels(61)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "CYX"})
    runner = CliRunner()
    spots, coloc = tmp_path / "spots_c0.csv", tmp_path / "coloc.csv"
    r = runner.invoke(main, ["fit", str(path), "--channel", "0", *CAMERA_ARGS, "--out", str(spots)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["measure", str(path), "--at", str(spots), "--channel", "1", *CAMERA_ARGS,
                             "--out", str(coloc)])
    assert r.exit_code == 0, r.output
    assert "15 spots, 15 measurements" in r.stderr
    _check_colocalisation(pd.read_csv(spots), pd.read_csv(coloc), xy, present)
    both = tmp_path / "both.csv"
    r = runner.invoke(main, ["measure", str(path), "--at", str(spots), "--channel", "all",
                             *CAMERA_ARGS, "--out", str(both)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(both)
    assert list(table.channel[:2]) == [0, 1] and len(table) == 30


# ------------------------------------------------------------------- CLI
@pytest.fixture()
def movie_file(tmp_path):
    rng = np.random.default_rng(71)
    xy = _grid(rng, cols=3, rows=2)
    photons = _blinking(rng, 6, len(xy), 2000, 3000)
    img, truth = _movie(xy, photons, seed=72)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "TYX"})
    return path, xy, truth


def test_positions_from_any_csv(tmp_path, movie_file):
    """A CSV with only x, y: every spot in every frame; --wide gives one column per frame."""
    path, xy, truth = movie_file
    spots = tmp_path / "mine.csv"
    pd.DataFrame({"y": xy[:, 1], "x": xy[:, 0], "note": "a"}).to_csv(spots, index=False)
    out = tmp_path / "traces.csv"
    r = CliRunner().invoke(main, ["measure", str(path), "--at", str(spots), *CAMERA_ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out)
    assert list(table.columns) == photometry.columns(2)
    assert len(table) == 6 * len(xy)
    m = _joined(table, truth)
    on = m.photons > 0
    assert np.all(np.abs(m.intensity / m.photons - 1.0)[on] < 0.15)
    assert np.allclose(table.sigma_x, SIGMA) and np.allclose(table.angle, 0.0)
    wide = tmp_path / "wide.csv"
    r = CliRunner().invoke(main, ["measure", str(path), "--at", str(spots), *CAMERA_ARGS, "--wide",
                                  "--frames", "1-3,5", "--out", str(wide)])
    assert r.exit_code == 0, r.output
    w = pd.read_csv(wide)
    assert list(w.columns) == ["spot_id", "channel", "x", "y", "unit", "intensity_1", "intensity_2",
                               "intensity_3", "intensity_5"]
    assert len(w) == len(xy)
    long = table.set_index(["spot_id", "frame"]).intensity
    for t in (1, 2, 3, 5):
        assert np.allclose(w[f"intensity_{t}"], long.xs(t, level="frame").to_numpy(), rtol=1e-7)


def test_positions_from_a_fit_table_of_one_frame(tmp_path, movie_file):
    """fit, then measure every frame at the spots of frame 0 with their fitted widths."""
    path, xy, truth = movie_file
    spots, out = tmp_path / "spots.csv", tmp_path / "m.csv"
    runner = CliRunner()
    assert runner.invoke(main, ["fit", str(path), *CAMERA_ARGS, "--out", str(spots)]).exit_code == 0
    fitted = pd.read_csv(spots)
    r = runner.invoke(main, ["measure", str(path), "--at", str(spots), "--at-frame", "0", *CAMERA_ARGS,
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out)
    first = fitted[fitted.frame == 0]
    assert sorted(table.spot_id.unique()) == list(first.index)  # row numbers of spots.csv
    row = table[table.spot_id == first.index[0]].iloc[0]
    assert row.sigma_x == pytest.approx(first.sigma_x.iloc[0], rel=1e-6)
    assert row.angle == pytest.approx(first.angle.iloc[0], rel=1e-6, abs=1e-9)
    # --match-frames: each fitted spot measured in its own frame only
    r = runner.invoke(main, ["measure", str(path), "--at", str(spots), "--match-frames", *CAMERA_ARGS,
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out)
    assert len(table) == len(fitted)
    assert np.array_equal(table.frame.to_numpy(), fitted.frame.to_numpy()[table.spot_id])


@pytest.mark.parametrize("content,message", [
    ("x,z\n1,2\n", "no column y"),
    ("x,y\n1,\n", "row 0 has no position"),
    ("x,y\n3,4\n1,abc\n", "column 'y' is not numeric"),
    ("x,y\n3,4\n200,4\n", "row 1 (x=200, y=4) is outside the image"),
    ("", "cannot read the table"),
    ("x,y,sigma_x,sigma_y\n3,4,1.2,\n", "row 0 has no width"),
])
def test_bad_positions_are_refused_clearly(tmp_path, movie_file, content, message):
    path, _, _ = movie_file
    spots = tmp_path / "bad.csv"
    spots.write_text(content)
    out = tmp_path / "m.csv"
    r = CliRunner().invoke(main, ["measure", str(path), "--at", str(spots), *CAMERA_ARGS, "--out", str(out)])
    assert r.exit_code == 1
    assert message in r.stderr and str(spots) in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--frames", "3-9"], "frame 6 does not exist"),
    (["--frames", "a"], "--frames 'a'"),
    (["--at-frame", "4"], "needs a 'frame' column"),
    (["--at-frame", "0", "--match-frames"], "cannot be combined"),
    (["--estimator", "mle", "--gain", "0"], None),
])
def test_bad_options_are_refused_clearly(tmp_path, movie_file, args, message):
    path, xy, _ = movie_file
    spots = tmp_path / "xy.csv"
    pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}).to_csv(spots, index=False)
    r = CliRunner().invoke(main, ["measure", str(path), "--at", str(spots), *CAMERA_ARGS, *args])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output
    if message:
        assert message in r.stderr


def test_no_positions_give_an_empty_table(movie_file):
    path, _, _ = movie_file
    table = spotfit.measure(str(path), pd.DataFrame({"x": [], "y": []}), camera=CAMERA)
    assert len(table) == 0 and list(table.columns) == photometry.columns(2)
    assert len(photometry.wide(table)) == 0


def test_aperture_layout_in_chunks_is_the_same(movie_file, monkeypatch):
    """Aperture pixels found in chunks of spots (bounded memory) give the same sums."""
    path, xy, _ = movie_file
    # a read-noise map: its sums over each aperture and annulus are taken in chunks
    camera = Camera(baseline=100.0, gain=2.0,
                    read_noise=np.random.default_rng(5).uniform(1.0, 2.0, (NY, NX)))
    whole = spotfit.measure(str(path), xy, camera=camera)
    monkeypatch.setattr(photometry, "APERTURE_CHUNK", 4)
    chunked = spotfit.measure(str(path), xy, camera=camera)
    pd.testing.assert_frame_equal(whole, chunked)


def test_mle_without_a_camera_is_refused(tmp_path, movie_file):
    path, xy, _ = movie_file
    with pytest.raises(spotfit.SpotfitInputError, match="needs photon counts"):
        spotfit.measure(str(path), xy, estimator="mle")


def test_help_and_usage_errors_do_not_import_numpy():
    """``spotfit measure --help`` and a usage error answer without the scientific stack."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from spotfit.cli import main\n"
        "codes = [CliRunner().invoke(main, a).exit_code for a in "
        "(['measure', '--help'], ['measure', 'img.tif'], ['measure', 'i.tif', '--at', 'a.csv', '--sigma', '0'])]\n"
        "print(json.dumps([codes, sorted(m for m in ('numpy', 'pandas', 'scipy') if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    codes, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert codes == [0, 2, 2] and loaded == []


def test_inputs_are_not_modified(movie_file):
    path, xy, _ = movie_file
    img = tifffile.imread(path)
    positions = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "sigma_x": 1.3, "sigma_y": 1.3})
    before_img, before_pos = img.copy(), positions.copy()
    spotfit.measure(img, positions, camera=CAMERA, refine=True)
    assert np.array_equal(img, before_img)
    pd.testing.assert_frame_equal(positions, before_pos)


# ------------------------------------------------------------------ z-stacks
def test_z_stack_intensities():
    """3D: spots in a z-stack time series measured at (x, y, z), elliptical 3D profile."""
    rng = np.random.default_rng(81)
    xy = _grid(rng, nx=60, ny=44, cols=3, rows=2)
    z = rng.uniform(4, 8, len(xy))
    T = 12
    pos = pd.DataFrame({"frame": np.repeat(np.arange(T), len(xy)), "x": np.tile(xy[:, 0], T),
                        "y": np.tile(xy[:, 1], T), "z": np.tile(z, T), "intensity": 4000.0})
    img, _ = simulate((T, 13, 44, 60), positions=pos, background=5.0, sigma=SIGMA, sigma_z=2.5,
                      camera=CAMERA, seed=82, z_stack=True)
    table = spotfit.measure(img, np.column_stack([xy, z]), camera=CAMERA, sigma_z=2.5)
    assert "z" in table.columns and "sigma_z" in table.columns
    rel = table.intensity / 4000.0 - 1.0
    assert abs(rel.mean()) < 0.01 and (table.status == "converged").all()
    pull = (table.intensity - 4000.0) / table.intensity_err
    assert 0.8 <= pull.std() <= 1.2


# ------------------------------------------------------------------ kernel
def _reference_problem(rng, neighbour):
    """One 9 x 11 window with its spot (and a neighbour), Poisson data, read noise."""
    grid = Grid((9, 11))
    model = get_model("elliptical", 2, integrated=True)
    centres = np.array([[5.2, 3.9]] + ([[7.9, 5.1]] if neighbour else []))
    theta = model.from_moments(centres, np.array([[1.3, 1.5]] * len(centres)), np.ones(len(centres)),
                               np.zeros(len(centres)))
    g = model.value(theta, grid)
    rv = 2.0
    truth = np.array([800.0] + ([1500.0] if neighbour else []))
    mu = truth @ g + 6.0
    d = rng.poisson(mu + rv) - rv + 0.0
    return g, d.astype(np.float32), rv, grid


def _kernel(g, d, rv, est, valid=None):
    """The compiled kernel on one window of photons (no camera conversion, no aperture)."""
    P = d.size
    valid = np.ones(P, bool) if valid is None else valid
    pix = np.concatenate([np.flatnonzero(valid), np.flatnonzero(~valid)])  # valid pixels first
    outs = [np.zeros((1, 1)) for _ in range(5)]
    it, st = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int8)
    measure_windows(d[None], np.zeros(1), np.ones(1), pix[None], np.array([valid.sum()]),
                    np.array([0, len(g)]), np.ascontiguousarray(g[:, pix]), np.array([rv]),
                    np.zeros((1, 0), np.uint8), np.zeros((1, 3), np.int64), np.zeros(6, np.int64),
                    est, True, 1.0, 0.0, 0.0, 0.0, 100, 1e-6, np.inf, 1, False, 0, *outs, it, st,
                    np.zeros((1, 1), np.int8), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((0, 0, 5)))
    return [o[0, 0] for o in outs], it[0, 0], st[0, 0]


@pytest.mark.parametrize("neighbour", [False, True])
def test_kernel_matches_numpy_and_scipy(neighbour):
    """LSQ = numpy lstsq; MLE = scipy's maximum of the Poisson likelihood; MLE errors = CRLB."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(91)
    g, d, rv, _ = _reference_problem(rng, neighbour)
    X = np.vstack([g, np.ones(g.shape[1])]).T
    (n, n_var, b, b_var, _), _, status = _kernel(g, d, rv, LSQ)
    coef = np.linalg.lstsq(X, d.astype(float), rcond=None)[0]
    assert status == 0 and np.allclose([n, b], coef[[0, -1]], rtol=1e-9)
    mu = X @ coef
    pinv = np.linalg.pinv(X)
    assert np.isclose(n_var, np.sum(pinv[0] ** 2 * (np.maximum(mu, 0) + rv)), rtol=1e-9)

    (n, n_var, b, b_var, _), iterations, status = _kernel(g, d, rv, MLE)
    y = np.maximum(d + rv, 0.0)

    def nll(theta):
        m = X @ theta + rv
        return np.sum(m - y * np.log(m)) if np.all(m > 0) else np.inf

    best = minimize(nll, coef, method="Nelder-Mead", options=dict(xatol=1e-8, fatol=1e-12, maxiter=20000))
    assert status == 0 and 1 <= iterations < 20
    assert np.allclose([n, b], best.x[[0, -1]], rtol=1e-5)
    m = X @ np.concatenate([best.x[:-1], best.x[-1:]]) + rv
    cov = np.linalg.inv(X.T @ (X / m[:, None]))
    assert np.isclose(n_var, cov[0, 0], rtol=1e-3) and np.isclose(b_var, cov[-1, -1], rtol=1e-3)


def test_kernel_status_codes_are_spotfits():
    from spotfit import _kernels, _photometry_kernels as pk

    assert (pk.CONVERGED, pk.MAX_ITERATIONS, pk.SINGULAR) == (
        _kernels.CONVERGED, _kernels.MAX_ITERATIONS, _kernels.SINGULAR)


def test_clipped_pixels_make_a_measurement_saturated():
    """A spot whose peak reaches the top of uint16 is flagged in the frames where it does."""
    xy = np.array([[30.2, 20.7], [80.4, 45.1]])
    photons = np.full((4, 2), 2000.0)
    photons[2, 0] = 3e6  # far beyond 65535 ADU at the peak: clipped
    with pytest.warns(spotfit.SpotfitWarning, match="clipped"):
        img, truth = _movie(xy, photons, seed=3)
    table = spotfit.measure(img, xy, camera=CAMERA)
    flagged = table[table.status == "saturated"]
    assert list(zip(flagged.spot_id, flagged.frame)) == [(0, 2)]


def test_a_cameras_ceiling_in_a_wider_type_makes_a_measurement_saturated():
    """As fits do (spotfit.camera.clipped_pixels): a 12-bit camera's image in a 16-bit file
    clips at 4095; the frame where a spot's peak reaches it is ``saturated``."""
    xy = np.array([[30.2, 20.7], [80.4, 45.1]])
    photons = np.full((4, 2), 2000.0)
    photons[2, 0] = 3e5  # far above 4095 ADU at the peak
    img, truth = _movie(xy, photons, seed=3)
    img = np.minimum(img, 4095).astype(np.uint16)
    assert (img[2] == 4095).sum() >= 2 and img[[0, 1, 3]].max() < 4095
    table = spotfit.measure(img, xy, camera=CAMERA)
    flagged = table[table.status == "saturated"]
    assert list(zip(flagged.spot_id, flagged.frame)) == [(0, 2)]


def test_kernel_masked_pixels_and_singular_windows():
    rng = np.random.default_rng(92)
    g, d, rv, _ = _reference_problem(rng, False)
    valid = np.ones(d.size, bool)
    valid[:40] = False
    (n, *_), _, status = _kernel(g, np.where(valid, d, 1e9).astype(np.float32), rv, LSQ, valid)
    X = np.vstack([g, np.ones(g.shape[1])]).T[valid]
    assert status == 0 and np.isclose(n, np.linalg.lstsq(X, d[valid].astype(float), rcond=None)[0][0])
    twice = np.vstack([g, g])  # two spots at the same place cannot be told apart
    (n, *_), _, status = _kernel(twice, d, rv, LSQ)
    assert status == 2 and np.isnan(n)


def test_a_masked_array_is_refused_not_read_as_zeros():
    image = np.random.default_rng(3).poisson(10.0, (2, 30, 40)).astype(np.float32)
    positions = pd.DataFrame({"x": [20.0], "y": [15.0]})
    masked = np.ma.masked_array(image, mask=np.zeros(image.shape, bool))
    spotfit.measure(masked, positions, sigma=1.3)  # nothing masked: measured as the data
    masked[0, 15, 20] = np.ma.masked
    with pytest.raises(spotfit.SpotfitInputError, match="masked pixels"):
        spotfit.measure(masked, positions, sigma=1.3)


def test_per_pixel_camera_maps_match_numpy_irls():
    """An sCMOS camera (baseline, gain, read noise per pixel): the compiled kernel's map path
    (windows inside the frame read row by row, windows at the border pixel by pixel, and
    the aperture sums) against a Poisson MLE by numpy IRLS on the converted windows, and a
    map of one value against the scalar camera."""
    from spotfit import roi

    rng = np.random.default_rng(31)
    xy = np.vstack([_grid(rng, cols=3, rows=3, border=12.0), [[1.3, 30.6], [60.2, 68.4]]])
    camera = Camera(baseline=rng.uniform(95.0, 105.0, (NY, NX)), gain=rng.uniform(1.6, 2.4, (NY, NX)),
                    read_noise=rng.uniform(1.0, 3.0, (NY, NX)))
    img, truth = _movie(xy, np.full((6, len(xy)), 2500.0), seed=32, camera=camera)
    table = spotfit.measure(img, xy, camera=camera, sigma=SIGMA, fix_sigma=True, integrated=True)
    table = table.sort_values(["frame", "spot_id"])
    assert (table.status == "converged").all()

    # reference: the same estimator (Poisson likelihood of d + read_var with mean
    # mu + read_var), maximised by numpy IRLS to convergence on cut windows
    half = spotfit.FitConfig(sigma=SIGMA).half_size(2)
    photons = camera.to_photons(img, dtype=np.float64)
    rv = np.broadcast_to(camera.read_variance(), (NY, NX))
    centres = np.rint(xy[:, ::-1]).astype(np.int64)
    model = get_model("symmetric", 2, integrated=True)
    expected = []
    for t in range(len(img)):
        w = roi.cut(photons[t], centres, half)
        r = roi.cut(rv, centres, half).data
        theta = model.from_moments(xy - w.origin, np.full((len(xy), 2), SIGMA), np.ones(len(xy)),
                                   np.zeros(len(xy)))
        g = model.value(theta, w.grid)
        for k in range(len(xy)):
            m = w.mask[k]
            X = np.column_stack([g[k][m], np.ones(m.sum())])
            d, v = w.data[k][m], r[k][m]
            coef = np.linalg.lstsq(X, d, rcond=None)[0]
            for _ in range(50):
                wt = 1.0 / np.maximum(X @ coef + v, 1e-6)
                coef = np.linalg.solve(X.T @ (X * wt[:, None]), X.T @ (wt * np.maximum(d, -v)))
            expected.append(coef)
    expected = np.array(expected)
    # the kernel stops when no step exceeds 0.01 standard errors
    assert np.all(np.abs(table.intensity.to_numpy() - expected[:, 0]) < 0.02 * table.intensity_err)
    assert np.all(np.abs(table.background.to_numpy() - expected[:, 1]) < 0.02 * table.background_err)
    assert abs(np.mean(table.intensity) / 2500.0 - 1.0) < 0.03

    # a map of one value takes the map path; the scalar camera the other
    flat = Camera(baseline=np.full((NY, NX), 100.0), gain=np.full((NY, NX), 2.0),
                  read_noise=np.full((NY, NX), 1.5))
    maps = spotfit.measure(img, xy, camera=flat, sigma=SIGMA, fix_sigma=True)
    scalar = spotfit.measure(img, xy, camera=CAMERA, sigma=SIGMA, fix_sigma=True)
    for column in ("intensity", "intensity_err", "background", "aperture_intensity",
                   "aperture_intensity_err"):
        assert np.allclose(maps[column], scalar[column], rtol=1e-9, atol=1e-9, equal_nan=True), column


def _border_movie():
    """A uint16 movie with spots inside, at every border and in a corner, one pixel clipped."""
    rng = np.random.default_rng(41)
    xy = np.vstack([_grid(rng, cols=3, rows=2, border=15.0),
                    [[0.2, 35.3], [NX - 1.3, 20.6], [55.4, 0.4], [30.8, NY - 1.2], [0.6, NY - 0.9]]])
    photons = rng.uniform(800.0, 3000.0, (7, len(xy)))
    img, _ = _movie(xy, photons, seed=42)
    img = img.copy()
    c = np.rint(xy[0]).astype(int)
    img[4, c[1], c[0]] = np.iinfo(np.uint16).max  # clipped in frame 4 only
    return img, xy


@pytest.mark.parametrize("estimator", ["lsq", "wlsq", "mle"])
def test_pixel_types_and_frame_sources_give_the_same_table(tmp_path, monkeypatch, estimator):
    """uint16 frames in memory are read by the kernel as they are; float32 too; other types
    are cast to float32, and a file's frames are read in blocks: every way gives the same
    numbers (integers are exact in float32), with a scalar camera and a per-pixel map, all
    frames or a selection, spots at the borders."""
    img, xy = _border_movie()
    assert img.dtype == np.uint16
    rng = np.random.default_rng(43)
    sensor = Camera(baseline=rng.uniform(95.0, 105.0, (NY, NX)), gain=rng.uniform(1.6, 2.4, (NY, NX)),
                    read_noise=rng.uniform(1.0, 3.0, (NY, NX)))
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, img)
    monkeypatch.setattr(photometry, "BLOCK_VALUES", 3 * NY * NX)  # the file in blocks of 3 frames
    for camera in (CAMERA, sensor):
        for frames in (None, [0, 2, 3, 4, 6]):
            opts = dict(camera=camera, estimator=estimator, sigma=SIGMA, fix_sigma=True, frames=frames)
            ref = spotfit.measure(img, xy, **opts)
            hit = (ref.spot_id == 0) & (ref.frame == 4)
            assert (ref.status[hit] != "converged").all() and (ref.status[~hit] != "saturated").all()
            for other in (img.astype(np.float32), img.astype(np.int32), img[:, ::-1][:, ::-1], path):
                table = spotfit.measure(other, xy, **opts)
                # only uint16 (in memory or in the file) clips at 65535
                clipped = (ref.status == "saturated") & (not hasattr(other, "dtype") or other.dtype == np.uint16)
                assert (table.status == "saturated").tolist() == clipped.tolist()
                for column in ref.columns:
                    if column == "status":
                        same = ref.status == "saturated"
                        assert (table.status[~same] == ref.status[~same]).all()
                    elif ref[column].dtype.kind == "f":
                        assert np.allclose(table[column], ref[column], rtol=1e-12, atol=0,
                                           equal_nan=True), (column, type(other))
                    else:
                        assert (table[column].astype(str) == ref[column].astype(str)).all(), column


def test_aperture_sums_match_a_numpy_reference():
    """The compiled aperture and annulus sums against the definition, pixel by pixel in numpy:
    pixels within R of the spot, annulus R + 1 < r <= 2 R + 1 without the pixels within
    R + 1 of another spot; spots at the borders included (uint16 frames read as they are)."""
    img, xy = _border_movie()
    R = 3.0
    table = spotfit.measure(img, xy, camera=CAMERA, sigma=SIGMA, fix_sigma=True, aperture=R)
    photons = CAMERA.to_photons(img, dtype=np.float64)
    yy, xx = np.mgrid[0:NY, 0:NX]
    dist = np.sqrt((xx[None] - xy[:, 0, None, None]) ** 2 + (yy[None] - xy[:, 1, None, None]) ** 2)
    truncated_spots = 0
    for k in range(len(xy)):
        ap = dist[k] <= R
        others = np.delete(dist, k, axis=0)
        bg = (dist[k] > R + 1) & (dist[k] <= 2 * R + 1) & np.all(others > R + 1, axis=0)
        mine = table[table.spot_id == k].sort_values("frame")
        s_ap = photons[:, ap].sum(axis=1)
        s_bg = photons[:, bg].mean(axis=1)
        assert np.allclose(mine.aperture_background, s_bg, rtol=1e-12, atol=1e-9)
        assert np.allclose(mine.aperture_intensity, s_ap - ap.sum() * s_bg, rtol=1e-12, atol=1e-8)
        # variance from each pixel's own value: excess * d + read_var over both regions
        v_ap = CAMERA.excess_noise * s_ap + ap.sum() * float(CAMERA.read_variance())
        v_bg = CAMERA.excess_noise * photons[:, bg].sum(axis=1) + bg.sum() * float(CAMERA.read_variance())
        var = v_ap + (ap.sum() / bg.sum()) ** 2 * v_bg
        assert np.allclose(mine.aperture_intensity_err, np.sqrt(np.maximum(var, 0)), rtol=1e-12)
        # "truncated": part of the aperture lies outside the image (it outranks "crowded")
        gy, gx = np.mgrid[-5:NY + 5, -5:NX + 5]
        outside = (gx < 0) | (gx >= NX) | (gy < 0) | (gy >= NY)
        truncated = np.any(outside & (np.hypot(gx - xy[k, 0], gy - xy[k, 1]) <= R))
        assert bg.sum() >= photometry.MIN_ANNULUS
        assert np.all((mine.aperture_status == "truncated") == truncated), k
        truncated_spots += truncated
    assert truncated_spots == 5
