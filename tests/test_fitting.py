"""End-to-end ``spotfit.fit`` on simulated images with known truth.

Images are non-square (x/y mix-ups show), seeds fixed, spots isolated
(``min_separation``) unless stated.  Tolerances are in pixels unless stated.
"""

import numpy as np
import pytest

import spotfit
from spotfit import solver
from spotfit.camera import Camera
from spotfit.estimators import Noise
from spotfit.match import match_spots
from spotfit.models import Grid, get_model
from spotfit.results import STATUS_NAMES
from spotfit.simulation import simulate

CAMERA = Camera(baseline=100.0, gain=2.0, read_noise=0.0)
MATCH_RADIUS = 1.5  # px


def _match(found, truth):
    i_found, i_truth = match_spots(found[["x", "y"]].to_numpy(), truth[["x", "y"]].to_numpy(), MATCH_RADIUS)
    return i_found, i_truth


def _crlb_lateral(truth, background):
    """sqrt(CRLB) of x for each true spot: pixel-integrated symmetric Gaussian, Poisson noise."""
    model = get_model("symmetric", 2, integrated=True)
    grid = Grid((11, 11))
    frac = truth[["x", "y"]].to_numpy() - np.rint(truth[["x", "y"]].to_numpy()) + 5.0
    theta = np.column_stack([truth.intensity, frac[:, 0], frac[:, 1], truth.sigma_x, np.full(len(truth), background)])
    return solver.crlb(model, theta, grid, Noise(calibrated=True))[:, 1]


@pytest.mark.parametrize(
    "photons,background",
    [(300, 50), (2000, 10)],  # faint: ~9 sigma matched-filter SNR; bright
)
def test_isolated_spots_detection_and_precision(photons, background):
    img, truth = simulate((4, 520, 700), n_spots=300, photons=photons, background=background, sigma=1.3,
                          camera=CAMERA, min_separation=12, border=3, seed=photons)
    found = spotfit.fit(img, camera=CAMERA, sigma=1.3)
    recall_hits, precision_hits = 0, 0
    errors, crlbs = [], []
    for t in range(4):
        f = found[found.frame == t].reset_index(drop=True)
        tr = truth[truth.frame == t].reset_index(drop=True)
        i_f, i_t = _match(f, tr)
        recall_hits += len(i_t) / len(tr)
        precision_hits += len(i_f) / len(f)
        errors.append(np.column_stack([f.x[i_f] - tr.x.to_numpy()[i_t], f.y[i_f] - tr.y.to_numpy()[i_t]]))
        crlbs.append(_crlb_lateral(tr.iloc[i_t], background))
    recall, precision = recall_hits / 4, precision_hits / 4
    assert recall >= 0.98 and precision >= 0.98, (recall, precision)
    err = np.concatenate(errors)
    crlb = np.sqrt(np.mean(np.concatenate(crlbs) ** 2))
    rmse = np.sqrt(np.mean(err**2, axis=0))
    assert np.all(rmse <= 1.5 * crlb), (rmse, crlb)
    assert np.all(np.abs(err.mean(axis=0)) < 0.02), err.mean(axis=0)  # px
    # every detected spot is reported, none silently dropped; most fits converge
    assert found.status.isin(STATUS_NAMES).all()
    assert (found.status == "converged").mean() > 0.9
    assert (found.unit == "photon").all()


def test_spots_at_the_border_are_found_and_unbiased():
    """Spots centred 0-2 px from every edge: found, fitted in truncated windows, no inward bias.

    Spots are >= 13 px apart so that no neighbour enters a window.
    """
    rng = np.random.default_rng(21)
    ny, nx = 100, 150
    along_x = np.linspace(12, nx - 13, 9)  # spots near the top and bottom edges
    along_y = np.linspace(12, ny - 13, 6)  # spots near the left and right edges
    errors = {"left": [], "right": [], "top": [], "bottom": []}
    n_truth = n_found = 0
    for seed in range(12):
        d = rng.uniform(0.0, 2.0, 30)  # distance of the centre from the edge, px
        xs = np.concatenate([along_x, along_x, d[18:24], nx - 1 - d[24:30]])
        ys = np.concatenate([d[:9], ny - 1 - d[9:18], along_y, along_y])
        img, truth = simulate((ny, nx), positions=np.column_stack([xs, ys]), photons=3000, background=10,
                              sigma=1.3, camera=CAMERA, seed=seed)
        found = spotfit.fit(img, camera=CAMERA)
        i_f, i_t = _match(found, truth)
        n_truth += len(truth)
        n_found += len(i_t)
        err = found[["x", "y"]].to_numpy()[i_f] - truth[["x", "y"]].to_numpy()[i_t]
        side = np.repeat(["top", "bottom", "left", "right"], [9, 9, 6, 6])[i_t]
        for name, axis in (("left", 0), ("right", 0), ("top", 1), ("bottom", 1)):
            errors[name].append(err[side == name, axis])
    assert n_found >= 0.98 * n_truth
    for name, errs in errors.items():
        e = np.concatenate(errs)
        assert abs(e.mean()) < 0.02, (name, e.mean())  # px: no push towards the inside
        assert np.sqrt(np.mean(e**2)) < 0.12, name  # px


def test_elongated_rotated_spots():
    img, truth = simulate((300, 410), n_spots=120, photons=8000, background=10, sigma_x=1.2, sigma_y=2.0,
                          angle=0.5, camera=CAMERA, min_separation=16, border=8, seed=5)
    found = spotfit.fit(img, camera=CAMERA, sigma=1.5)
    i_f, i_t = _match(found, truth)
    assert len(i_t) >= 0.98 * len(truth)
    f = found.iloc[i_f]
    assert np.median(f.sigma_x) == pytest.approx(1.2, abs=0.03)  # px
    assert np.median(f.sigma_y) == pytest.approx(2.0, abs=0.03)  # px
    assert np.median(f.angle) == pytest.approx(0.5, abs=0.02)  # rad
    assert np.median(f.intensity / truth.intensity.to_numpy()[i_t]) == pytest.approx(1.0, abs=0.02)


def test_without_camera_values_are_in_adu():
    """Uncalibrated: intensity in ADU above baseline = photons / gain; unit column says ADU."""
    img, truth = simulate((120, 170), n_spots=20, photons=4000, background=10, sigma=1.3, camera=CAMERA,
                          min_separation=14, border=6, seed=2)
    adu = spotfit.fit(img, camera=Camera(baseline=100.0))
    ph = spotfit.fit(img, camera=CAMERA)
    assert (adu.unit == "ADU").all() and (ph.unit == "photon").all()
    i_f, i_t = _match(adu, truth)
    ratio = adu.intensity.to_numpy()[i_f] / (truth.intensity.to_numpy()[i_t] / CAMERA.gain)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    assert np.median(adu.offset) == pytest.approx(10 / CAMERA.gain, abs=0.3)


def test_time_lapse_frames_and_no_spots():
    img, truth = simulate((3, 64, 90), n_spots=5, photons=3000, background=10, camera=CAMERA,
                          min_separation=12, border=5, seed=4)
    found = spotfit.fit(img, camera=CAMERA)
    assert sorted(found.frame.unique()) == [0, 1, 2]
    assert found.groupby("frame").size().tolist() == truth.groupby("frame").size().tolist()
    empty = spotfit.fit(np.full((40, 60), 100, np.uint16))
    assert len(empty) == 0 and list(empty.columns) == list(found.columns)


def test_fit_spots_at_given_positions():
    img, truth = simulate((80, 110), n_spots=8, photons=3000, background=10, camera=CAMERA,
                          min_separation=14, border=6, seed=6)
    pos = truth[["x", "y"]].to_numpy() + 0.4
    out = spotfit.fit_spots(img, pos, camera=CAMERA)
    assert len(out) == 8
    np.testing.assert_allclose(out.x, truth.x, atol=0.15)
    np.testing.assert_allclose(out.y, truth.y, atol=0.15)


def test_scmos_pixel_maps():
    """Per-pixel baseline, gain and read noise (sCMOS) enter the fit: positions and photons
    unbiased, reported x_err matches the observed scatter within 15%."""
    rng = np.random.default_rng(12)
    ny, nx = 200, 260
    baseline = rng.uniform(90, 110, (ny, nx))
    gain = rng.uniform(0.4, 0.6, (ny, nx))  # photoelectrons per ADU
    read_noise = rng.gamma(2.0, 1.5, (ny, nx))  # e- RMS, heavy pixels included
    camera = Camera(baseline=baseline, gain=gain, read_noise=read_noise)
    errs, reported, ratio = [], [], []
    for seed in range(4):
        photons, truth = simulate((ny, nx), n_spots=60, photons=2000, background=10, sigma=1.3,
                                  camera=Camera(baseline=0.0, gain=1.0), min_separation=14, border=6,
                                  seed=seed, dtype="float32")
        noisy = photons + rng.normal(0.0, read_noise)
        raw = noisy / gain + baseline
        found = spotfit.fit(raw, camera=camera)
        i_f, i_t = _match(found, truth)
        assert len(i_t) >= 0.98 * len(truth)
        errs.append(found.x.to_numpy()[i_f] - truth.x.to_numpy()[i_t])
        reported.append(found.x_err.to_numpy()[i_f])
        ratio.append(found.intensity.to_numpy()[i_f] / truth.intensity.to_numpy()[i_t])
    e = np.concatenate(errs)
    assert abs(e.mean()) < 0.01
    assert np.sqrt(np.mean(np.concatenate(reported) ** 2)) == pytest.approx(np.sqrt(np.mean(e**2)), rel=0.15)
    assert np.mean(np.concatenate(ratio)) == pytest.approx(1.0, abs=0.02)


def test_emccd_excess_noise_in_errors():
    """EMCCD (gain 100, excess noise 2): MLE reports errors that match the observed scatter (15%)."""
    camera = Camera(baseline=100.0, gain=20.0, em_gain=100.0, read_noise=30.0)
    errs, reported = [], []
    for seed in range(3):
        img, truth = simulate((200, 260), n_spots=70, photons=1500, background=10, sigma=1.3, camera=camera,
                              min_separation=14, border=6, seed=seed)
        found = spotfit.fit(img, camera=camera)
        i_f, i_t = _match(found, truth)
        assert len(i_t) >= 0.98 * len(truth)
        errs.append(found.x.to_numpy()[i_f] - truth.x.to_numpy()[i_t])
        reported.append(found.x_err.to_numpy()[i_f])
    e = np.concatenate(errs)
    assert np.sqrt(np.mean(np.concatenate(reported) ** 2)) == pytest.approx(np.sqrt(np.mean(e**2)), rel=0.15)


def test_too_few_photons_are_flagged():
    """Spots too faint to trust are reported with status low_signal, not as precise fits."""
    positions = np.column_stack([np.linspace(10, 110, 6), np.full(6, 30.0)])
    img, truth = simulate((60, 124), positions=positions, photons=40, background=20, sigma=1.3, camera=CAMERA,
                          seed=1)
    out = spotfit.fit_spots(img, positions, camera=CAMERA)
    assert len(out) == 6
    assert (out.status != "converged").all()
    bright, _ = simulate((60, 124), positions=positions, photons=3000, background=20, sigma=1.3, camera=CAMERA,
                         seed=1)
    assert (spotfit.fit_spots(bright, positions, camera=CAMERA).status == "converged").all()


@pytest.mark.parametrize("photons,max_flagged,min_flagged", [(500, 1.0, 0.8), (1000, 0.01, 0.0)])
def test_low_signal_flag_follows_the_bound(photons, max_flagged, min_flagged):
    """Background 100 photons/px, sigma 2 px (11 x 11 windows).  500 photons: even the
    Cramer-Rao bound gives the photon count a signal-to-noise of only 2.4 (< min_snr 3), so
    most fits are flagged.  1000 photons (4.7 at the bound): almost none are, and the accepted
    ones are unbiased: photons within 2%, positions within 0.01 px, x_err within 10% of the
    observed scatter (a cut on the fit's own noisy intensity / intensity_err would drop the
    dim fits and bias the rest low)."""
    ys, xs = np.mgrid[10:410:14, 10:570:14]
    positions = np.column_stack([xs.ravel(), ys.ravel()]) + np.random.default_rng(2).uniform(-0.5, 0.5, (xs.size, 2))
    img, truth = simulate((420, 580), positions=positions, photons=photons, background=100, sigma=2.0,
                          camera=CAMERA, seed=photons)
    out = spotfit.fit_spots(img, positions, camera=CAMERA, sigma=2.0, model="symmetric")
    flagged = (out.status == "low_signal").to_numpy()
    assert min_flagged <= flagged.mean() <= max_flagged
    if photons == 1000:
        ok = (out.status == "converged").to_numpy()
        assert np.mean(out.intensity[ok] / truth.intensity[ok]) == pytest.approx(1.0, abs=0.02)
        for axis in ("x", "y"):
            err = out[axis].to_numpy()[ok] - truth[axis].to_numpy()[ok]
            assert abs(err.mean()) <= 0.01
            rms_reported = np.sqrt(np.mean(out[axis + "_err"].to_numpy()[ok] ** 2))
            assert rms_reported == pytest.approx(np.sqrt(np.mean(err**2)), rel=0.10)


def test_neighbour_pixels_are_left_out_of_single_spot_fits():
    """Pairs 5-6 px apart (windows overlap): each fit ignores the pixels of the other
    spot, so positions are not pulled together (RMSE < 0.12 px, all matched within 1 px)."""
    rng = np.random.default_rng(0)
    centres = np.array([(x, y) for x in range(15, 400, 25) for y in range(15, 300, 25)], float)
    angle = rng.uniform(0, np.pi, len(centres))
    for separation in (5.0, 6.0):
        half = 0.5 * separation * np.column_stack([np.cos(angle), np.sin(angle)])
        pos = np.concatenate([centres - half, centres + half])
        img, truth = simulate((310, 410), positions=pos, photons=2000, background=20, sigma=1.3,
                              camera=CAMERA, seed=int(separation))
        found = spotfit.fit(img, camera=CAMERA)
        i_f, i_t = match_spots(found[["x", "y"]].to_numpy(), pos, 1.0)
        assert len(i_t) == len(pos)
        err = found[["x", "y"]].to_numpy()[i_f] - pos[i_t]
        assert np.sqrt(np.mean(err**2)) < 0.12  # px
        ratio = found.intensity.to_numpy()[i_f] / 2000.0
        assert abs(np.mean(ratio) - 1) < 0.08


@pytest.mark.parametrize("crowded", [False, True])
def test_results_do_not_depend_on_the_unit_of_uncalibrated_data(crowded):
    # ADU of any gain, or a normalised float image: the same spots, positions
    # and statuses, intensities in the data's unit (no absolute floor)
    img, truth = simulate((60, 90), n_spots=12, photons=(300.0, 3000.0), background=20.0, sigma=1.3,
                          min_separation=9.0, seed=4)
    img = img.astype(float) - 100.0  # ADU above the baseline
    ref = spotfit.fit(img, sigma=1.3, crowded=crowded)
    assert (ref["status"] == "converged").sum() >= 10
    for k in (1e-6, 1e6):
        t = spotfit.fit(img * k, sigma=1.3, crowded=crowded)
        assert len(t) == len(ref)
        assert (t["status"].to_numpy() == ref["status"].to_numpy()).all()
        np.testing.assert_allclose(t[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy(), atol=1e-3)  # px
        np.testing.assert_allclose(t["intensity"] / k, ref["intensity"], rtol=1e-3)
        np.testing.assert_allclose(t["intensity_err"] / k, ref["intensity_err"], rtol=1e-2)
