"""The Python API's contract: inputs, options, errors, and results that do not depend on how
the work is split.

Images are simulated, non-square and seeded; spots isolated unless stated.
"""

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.fields
import spotfit.group
from spotfit import single
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.config import FitConfig, option_metadata
from spotfit.match import match_spots

CAMERA = Camera(baseline=100.0, gain=1.0)


@pytest.fixture(scope="module")
def movie():
    img, truth = spotfit.simulate((3, 70, 96), n_spots=14, photons=(800, 4000), background=15, sigma=1.3,
                                  camera=CAMERA, min_separation=11, border=4, seed=21)
    return img, truth


# ------------------------------------------------------------ one results layer
@pytest.mark.parametrize("camera", [CAMERA, Camera(baseline=100.0)], ids=["mle", "lsq-uncalibrated"])
def test_crowded_and_single_fits_of_isolated_spots_agree(camera):
    """Isolated spots fitted by the single-spot and the crowded path (widths held, the same
    symmetric model; the crowded residual search finds nothing to add in this image): every
    column and error agrees to 1e-6 relative, statuses exactly."""
    img, _ = spotfit.simulate((110, 150), n_spots=12, photons=(600, 3000), background=10, sigma=1.3,
                              camera=CAMERA, min_separation=25, border=8, seed=6)
    options = dict(camera=camera, model="symmetric", fix_sigma=True)
    a = spotfit.fit(img, **options)
    b = spotfit.fit(img, crowded=True, **options)
    assert (b.group_size == 1).all() and len(a) == len(b) == 12
    b = b.sort_values(["y", "x"]).reset_index(drop=True)[a.columns]
    a = a.sort_values(["y", "x"]).reset_index(drop=True)
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(b[c], a[c], rtol=1e-6, atol=1e-12, err_msg=c)
        else:
            assert (a[c] == b[c]).all(), c


def test_amplitude_error_propagates_the_width_covariance():
    """amplitude_err = sqrt(g C g^T) over intensity and widths, as sampling the covariance
    gives (Monte Carlo, 2%); ignoring the N-sigma covariance would be off by ~30%."""
    from spotfit.models import get_model
    from spotfit.results import measure

    rng = np.random.default_rng(5)
    model = get_model("symmetric", 2, True)
    theta = np.array([[2000.0, 4.0, 5.0, 1.3, 10.0]])
    cov = np.diag([80.0**2, 0.01, 0.01, 0.04**2, 0.5])[None]
    cov[0, 0, 3] = cov[0, 3, 0] = 0.8 * 80.0 * 0.04  # intensity and width go together
    values, errors = measure(model, theta, cov, np.zeros((1, 2)))
    samples = rng.multivariate_normal(theta[0], cov[0], size=40000)
    amp = samples[:, 0] / (2 * np.pi * samples[:, 3] ** 2)
    assert errors["amplitude"][0] == pytest.approx(np.std(amp), rel=0.02)
    assert values["amplitude"][0] == pytest.approx(2000.0 / (2 * np.pi * 1.3**2))


def test_status_order():
    from spotfit import _kernels as K
    from spotfit.results import STATUS_NAMES, judge

    status = np.array([K.CONVERGED, K.CONVERGED, K.SINGULAR, K.MAX_ITERATIONS, K.CONVERGED, K.CONVERGED])
    outside = np.array([True, False, True, False, False, False])
    low = np.array([True, True, True, True, False, True])
    sat = np.array([True, False, False, True, True, True])
    got = [STATUS_NAMES[c] for c in judge(status, outside, low, sat)]
    assert got == ["left_window", "low_signal", "singular", "max_iterations", "saturated", "saturated"]


# ------------------------------------------------- independent of how work is split
def test_frames_are_fitted_independently(movie):
    """Frame 1 of a movie gives the same rows alone as with the others (uncalibrated: the noise
    model is the frame's own)."""
    img, _ = movie
    for camera in (Camera(baseline=100.0), CAMERA):
        together = spotfit.fit(img, camera=camera)
        alone = spotfit.fit(img[1], camera=camera)
        rows = together[together.frame == 1].drop(columns="frame").reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, alone.drop(columns="frame"), rtol=1e-12)


@pytest.mark.parametrize("camera", [Camera(baseline=100.0), CAMERA], ids=["uncalibrated", "calibrated"])
def test_results_do_not_depend_on_batching(movie, camera, monkeypatch):
    """Solves of 5 windows (frames split into several, pooled with others) give the table of
    one solve per movie."""
    img, _ = movie
    whole = spotfit.fit(img, camera=camera)
    sizes = []
    fit_batch = single.fit_batch
    monkeypatch.setattr(single, "PIXEL_BUDGET", 5 * 81)
    monkeypatch.setattr(single, "fit_batch", lambda setup, batch: sizes.append(len(batch)) or fit_batch(setup, batch))
    chunked = spotfit.fit(img, camera=camera)
    assert max(sizes) == 5 and len(sizes) > len(img)
    pd.testing.assert_frame_equal(chunked, whole, rtol=1e-12)


def test_on_frame_reports_every_frame(movie):
    img, _ = movie
    for call in (spotfit.fit, spotfit.detect):
        seen = []
        call(img, camera=CAMERA, on_frame=lambda t, n: seen.append((t, n)))
        assert seen == [(0, 3), (1, 3), (2, 3)]


# ------------------------------------------------------------- one vocabulary
def test_detect_takes_what_fit_takes(movie, tmp_path):
    img, _ = movie
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "TYX"})
    config = FitConfig(sigma=1.3, threshold=6)
    by_array = spotfit.detect(img, config, CAMERA)
    pd.testing.assert_frame_equal(spotfit.detect(str(path), config, CAMERA), by_array)
    pd.testing.assert_frame_equal(spotfit.detect(spotfit.read_image(path), config=config, camera=CAMERA),
                                  by_array)
    pd.testing.assert_frame_equal(spotfit.detect(img, camera=CAMERA, sigma=1.3, threshold=6), by_array)
    # the candidates fit starts from
    found = spotfit.fit(img, config, CAMERA)
    assert len(found) == len(by_array)


def test_fit_accepts_lists_and_wide_integers(movie):
    img, _ = movie
    frame = img[0]
    expected = spotfit.fit(frame, camera=CAMERA)
    pd.testing.assert_frame_equal(spotfit.fit(frame.tolist(), camera=CAMERA), expected)
    pd.testing.assert_frame_equal(spotfit.fit(frame.astype(np.int64), camera=CAMERA), expected)


def test_fit_config_numbers():
    assert FitConfig(sigma=np.float32(1.3)).sigma == pytest.approx(1.3, rel=1e-7)
    assert type(FitConfig(sigma=np.float32(1.3)).sigma) is float
    assert FitConfig(window=np.int64(4), max_iter=np.int32(20)).window == 4
    cases = [(dict(sigma=True), "sigma"), (dict(sigma=np.bool_(True)), "sigma"),
             (dict(window=2.5), "window"), (dict(window=True), "window"), (dict(max_iter=0), "max_iter"),
             (dict(model="moffat"), "model"), (dict(estimator="ml"), "estimator"),
             (dict(fix_sigma="yes"), "fix_sigma"), (dict(min_snr=-1), "min_snr"),
             (dict(sigma_z=float("inf")), "sigma_z")]
    for kwargs, name in cases:
        with pytest.raises(spotfit.SpotfitInputError, match=f"^{name} ") as info:
            FitConfig(**kwargs)
        assert info.value.parameter == name


def test_fit_config_metadata_matches_the_command_line():
    """Every FitConfig field has help, an option of `spotfit fit` of that name, and the same
    default (the step towards generating the options from the metadata)."""
    import click

    meta = option_metadata()
    assert set(meta) == {f.name for f in dataclasses.fields(FitConfig)}
    options = {p.name: p for p in main.commands["fit"].params if isinstance(p, click.Option)}
    for name, m in meta.items():
        assert m["help"], name
        assert name in options, name
        assert m["cli"].split("/")[0] in options[name].opts, name
        default = options[name].default
        if type(default).__name__ == "Sentinel":  # click >= 8.3: no default
            default = None
        if name == "estimator":
            default = None if default == "auto" else default
        if name == "fix_sigma" or name == "crowded":
            default = bool(default)
        assert default == m["default"], (name, default, m["default"])
        if m["choices"]:
            assert set(m["choices"]) <= set(options[name].type.choices), name


def test_cli_names_the_option_of_a_parameter_error(movie, tmp_path):
    img, _ = movie
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, img[0][:40, :50])
    runner = CliRunner()
    result = runner.invoke(main, ["fit", str(path), "--window", "1000"])
    assert result.exit_code == 1
    assert "Error: --window must be at most the image's larger side (50 px" in result.stderr
    result = runner.invoke(main, ["fit", str(path), "--estimator", "mle"])
    assert result.exit_code == 1
    assert "--estimator mle needs photon counts: give the camera --gain (and --baseline, --em-gain)" \
        in result.stderr
    result = runner.invoke(main, ["detect", str(path), "--sigma", "100"])
    assert result.exit_code == 1 and "Error: --sigma must be at most a quarter" in result.stderr


# ------------------------------------------------------------- bad input
def test_window_and_sigma_are_bounded_by_the_image():
    frame = np.zeros((64, 48), np.uint16)
    for kwargs, name in [(dict(window=1000), "window"), (dict(window=65), "window"),
                         (dict(sigma=1000.0), "sigma"), (dict(sigma=16.5), "sigma")]:
        with pytest.raises(spotfit.SpotfitInputError, match=f"^{name} must be at most") as info:
            spotfit.fit(frame, **kwargs)
        assert info.value.parameter == name
    with pytest.raises(spotfit.SpotfitInputError, match="^sigma_z must be at most half"):
        spotfit.fit(np.zeros((4, 30, 40)), axes="ZYX", sigma=1.3)  # sigma_z 2.6 for 4 planes
    assert len(spotfit.fit(frame, window=64, sigma=16.0)) == 0  # at the limits: fine


def test_fit_spots_refuses_bad_positions():
    frame = np.zeros((30, 40))
    for positions in ([[np.nan, 3.0]], [[1.0, np.inf]]):
        with pytest.raises(spotfit.SpotfitInputError, match="^positions must be finite"):
            spotfit.fit_spots(frame, positions)
    with pytest.raises(spotfit.SpotfitInputError, match=r"^positions must be an \(n, 2\)"):
        spotfit.fit_spots(frame, [[1.0, 2.0, 3.0]])
    assert len(spotfit.fit_spots(frame, np.zeros((0, 2)))) == 0


def test_saturated_spots_are_flagged(movie):
    """A spot with a pixel clipped at the dtype's maximum gets status saturated; its
    neighbours and a float image with the same values do not."""
    img, truth = movie
    frame = img[0].copy()
    row = truth[truth.frame == 0].iloc[0]
    frame[int(round(row.y)), int(round(row.x))] = np.iinfo(np.uint16).max
    for crowded in (False, True):
        found = spotfit.fit(frame, camera=CAMERA, crowded=crowded)
        near = np.hypot(found.x - row.x, found.y - row.y) < 1.5
        assert near.sum() == 1
        assert (found.status[near] == "saturated").all()
        assert (found.status[~near] != "saturated").all()
    as_float = spotfit.fit(frame.astype(np.float32), camera=CAMERA)
    assert (as_float.status != "saturated").all()


def test_a_baseline_above_every_pixel_gives_one_warning(movie):
    img, _ = movie
    with pytest.warns(spotfit.SpotfitWarning, match=r"baseline \(5000 ADU\) is above 100.0% of the pixels") as record:
        spotfit.fit(img, camera=Camera(baseline=5000.0, gain=1.0))
    assert len(record) == 1  # one line, not one per frame
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spotfit.fit(img, camera=CAMERA)


@pytest.mark.parametrize("bits", [12, 14])
def test_spots_at_a_cameras_ceiling_in_a_wider_type_are_saturated(bits):
    """A 12-bit (14-bit) camera's image in a 16-bit file clips at 4095 (16383): the spots
    whose peaks reach it are ``saturated`` (they were ``converged``, with intensities too
    low); a frame whose largest value is 4095 in one pixel only is not clipped there."""
    from spotfit.camera import clipped_pixels

    ceiling = 2**bits - 1
    camera = Camera(baseline=100.0, gain=1.0)
    img, truth = spotfit.simulate((120, 170), n_spots=12, photons=(2000.0, 4.0 * ceiling * 2 * np.pi * 1.69),
                                  background=20.0, sigma=1.3, camera=camera, min_separation=10.0, seed=5)
    clipped = np.minimum(img, ceiling).astype(np.uint16)
    peak = np.array([img[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].max()
                     for x, y in zip(truth.x, truth.y)])
    assert 0 < (peak > ceiling).sum() < len(truth)
    table = spotfit.fit(clipped, camera=camera)
    i, j = match_spots(table[["x", "y"]].to_numpy(), truth[["x", "y"]].to_numpy(), 1.0)
    status = table.status.to_numpy()[i]
    assert len(j) == len(truth)
    assert (status[peak[j] > ceiling] == "saturated").all()
    assert (status[peak[j] < ceiling - 50] == "converged").all()
    one = np.full((20, 30), 100, np.uint16)
    one[5, 5] = ceiling
    assert clipped_pixels(one) is None
    one[5, 6] = ceiling
    assert clipped_pixels(one).sum() == 2


def test_masked_pixels_are_left_out(movie):
    """Whatever hides under the mask changes nothing: not the candidates, not the fits."""
    img, truth = movie
    frame = img[0].astype(np.float64)
    row = truth[truth.frame == 0].iloc[2]
    y, x = int(round(row.y)), int(round(row.x))
    mask = np.zeros(frame.shape, bool)
    mask[y - 1, x + 1] = True  # inside the spot's window
    mask[5, 7] = True  # far from any spot
    results = []
    for garbage in (0.0, 1e6):
        data = frame.copy()
        data[mask] = garbage
        results.append(spotfit.fit(np.ma.masked_array(data, mask=mask), camera=CAMERA))
    pd.testing.assert_frame_equal(results[0], results[1])
    unmasked = frame.copy()
    unmasked[mask] = 1e6
    assert len(spotfit.fit(unmasked, camera=CAMERA)) > len(results[0])  # garbage makes spots
    plain = spotfit.fit(frame, camera=CAMERA)
    assert len(plain) == len(results[0])
    spot = np.argmin(np.hypot(plain.x - row.x, plain.y - row.y))
    assert results[0].x[spot] == pytest.approx(plain.x[spot], abs=0.05)  # one pixel fewer
    assert results[0].x[spot] != plain.x[spot]


@pytest.mark.parametrize("covered", [0.5, 0.8])
def test_a_mask_over_most_of_the_frame_does_not_lower_the_noise(covered):
    """Without a camera the noise is measured on the frame: a mask over most of it (say,
    everything outside a cell) must not count its filled-in pixels as noise-free.
    Before, half a frame masked measured ~half the noise variance and pure noise gave
    ~1,700 candidates per 300 x 400 px; spots on the open part were found among them."""
    from spotfit.background import estimate_noise
    from spotfit.start import image_noise

    rng = np.random.default_rng(21)
    camera = Camera(baseline=100.0, gain=1.0, read_noise=3.0)
    shape = (300, 410)
    open_x = int(shape[1] * (1 - covered))  # the unmasked columns: x < open_x
    img, truth = spotfit.simulate(shape, n_spots=40, photons=2000.0, background=30.0, sigma=1.3,
                                  camera=camera, min_separation=8.0, seed=22)
    img = img.astype(np.float64)
    mask = np.zeros(shape, bool)
    mask[:, open_x:] = True
    img[mask] = rng.uniform(0, 5000, mask.sum())  # whatever the masked pixels hold
    inside = truth[truth.x < open_x - 4]
    noise_only = (100.0 + rng.normal(0.0, np.sqrt(30.0 + 9.0), shape))
    expected = 30.0 + 9.0  # variance of the background pixels, ADU^2
    for data in (img, noise_only):
        found = spotfit.detect(np.ma.masked_array(data, mask=mask), sigma=1.3)
        assert (found.x < open_x).all()
        if data is noise_only:
            assert len(found) <= 2, len(found)  # ~0.1 false candidates per 512 x 512 px
        else:
            d = np.hypot(found.x.to_numpy()[:, None] - inside.x.to_numpy(),
                         found.y.to_numpy()[:, None] - inside.y.to_numpy())
            assert (d.min(axis=0) < 1.5).all()  # every spot of the open part
            assert len(found) <= len(truth[truth.x < open_x]) + 2
    # the measured noise itself, filled with the median as detection fills it (ADU^2)
    filled = noise_only.copy()
    filled[mask] = np.median(noise_only[~mask])
    model = estimate_noise(filled, 1.3, ~mask)
    assert float(model.variance(np.array([100.0]))[0]) == pytest.approx(expected, rel=0.1)
    assert image_noise(filled, ~mask) == pytest.approx(expected, rel=0.1)
    assert image_noise(filled) < 0.7 * expected  # the filled-in pixels, counted
    table = spotfit.fit(np.ma.masked_array(img, mask=mask), sigma=1.3)
    ok = table[table.status == "converged"]
    assert len(ok) >= len(inside) and (ok.x < open_x).all()


def _padded(width, seed=22):
    """Camera data (300 x 410 px, 40 spots) with a zero border ``width`` px wide on the
    top and left (a drift-corrected frame), and its truth."""
    camera = Camera(baseline=100.0, gain=1.0, read_noise=3.0)
    img, truth = spotfit.simulate((300, 410), n_spots=40, photons=2000.0, background=30.0, sigma=1.3,
                                  camera=camera, min_separation=8.0, seed=seed)
    img[:, :width] = 0
    img[:width, :] = 0
    return img, truth[(truth.x > width + 2) & (truth.y > width + 2)]


@pytest.mark.parametrize("width", [10, 205])
def test_zero_padding_is_left_out_as_no_data(width):
    """A registered or stitched frame's zero padding made a step that the local background
    cannot follow (a 10 px border: 110 false candidates along it) and, over half the
    frame, halved the measured noise (1,764 candidates).  Flat regions of one value,
    9 x 9 px or more, that stand apart from the data beside them are left out like
    masked pixels, with a warning; the spots beside them are fitted as ever."""
    img, inside = _padded(width)
    before = img.copy()
    with pytest.warns(spotfit.SpotfitWarning, match=r"^frame 0: \d+ px \([\d.]+% of the frame\) lie in "
                                                    r"flat regions of one value \(value 0\) .* left out as no data"):
        found = spotfit.detect(img, sigma=1.3)
    np.testing.assert_array_equal(img, before)
    d = np.hypot(found.x.to_numpy()[:, None] - inside.x.to_numpy(), found.y.to_numpy()[:, None] - inside.y.to_numpy())
    assert (d.min(axis=0) < 1.5).all()  # every spot
    assert len(found) <= len(inside) + 2  # and ~nothing else
    with pytest.warns(spotfit.SpotfitWarning, match="left out as no data"):
        table = spotfit.fit(img, sigma=1.3)
    ok = table[table.status == "converged"]
    d = np.hypot(ok.x.to_numpy()[:, None] - inside.x.to_numpy(), ok.y.to_numpy()[:, None] - inside.y.to_numpy())
    assert (d.min(axis=0) < 0.3).all() and len(ok) <= len(inside) + 2  # px


def test_a_background_subtracted_and_clipped_at_zero_is_named():
    """Without a camera the noise is measured on the frame; a background subtracted and
    clipped at 0 leaves it too low (noise makes spots from ~70 % zeros on): from half the
    pixels at 0 a warning says so; with the camera's model, or fewer zeros, none."""
    import warnings

    img, _ = _padded(0)
    for subtract, zeros, warned in ((126, 0.29, False), (130, 0.53, True), (135, 0.80, True)):
        clipped = np.clip(img.astype(np.int32) - subtract, 0, None).astype(np.uint16)
        assert (clipped == 0).mean() == pytest.approx(zeros, abs=0.01)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            spotfit.detect(clipped)
            spotfit.detect(clipped, camera=Camera(baseline=0.0, gain=1.0))
        notes = [str(w.message) for w in record]
        assert len(notes) == int(warned), notes
        if warned:
            assert notes[0].startswith(f"{100 * (clipped == 0).mean():.1f}% of the pixels of frame 0 are 0: "
                                       "a background subtracted and clipped at 0 before spotfit?")


def test_nan_padding_is_refused_with_the_two_ways_that_work(tmp_path):
    """NaN is refused (it may be corruption); the error names two ways for NaN that marks
    no data, and both give the spots: 0 (left out as padding) or a masked array."""
    import tifffile

    img, inside = _padded(0)
    img = img.astype(np.float32)
    img[:, :20] = np.nan
    inside = inside[inside.x > 22]
    path = tmp_path / "registered.tif"
    tifffile.imwrite(path, img)
    with pytest.raises(spotfit.SpotfitInputError, match=r"6000 NaN .* replace it with 0, which spotfit "
                                                        r"leaves out as padding, or in Python pass "
                                                        r"numpy.ma.masked_invalid\(image\)$"):
        spotfit.fit(path, sigma=1.3)
    with pytest.warns(spotfit.SpotfitWarning, match="left out as no data"):
        zeros = spotfit.fit(np.nan_to_num(img, nan=0.0), sigma=1.3)
    masked = spotfit.fit(np.ma.masked_invalid(img), sigma=1.3)
    for table in (zeros, masked):
        ok = table[table.status == "converged"]
        d = np.hypot(ok.x.to_numpy()[:, None] - inside.x.to_numpy(), ok.y.to_numpy()[:, None] - inside.y.to_numpy())
        assert (d.min(axis=0) < 0.3).all() and len(ok) <= len(inside) + 3 and (ok.x > 19.5).all()


def test_flat_data_is_not_padding():
    """Flat regions that the data runs into are data: a noise-free simulation's background,
    a lone bright pixel on zeros, a blank frame -- no warning, the spots found."""
    import warnings

    from spotfit.padding import find_padding

    rng = np.random.default_rng(3)  # noise-free spots on a flat 10 ADU, rounded: flat between them
    truth = rng.uniform([8, 8], [162, 112], (12, 2))
    yy, xx = np.mgrid[:120, :170]
    clean = 10.0 + sum(3000.0 / (2 * np.pi * 1.3**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.3**2))
                       for x, y in truth)
    clean = np.rint(clean).astype(np.uint16)
    assert find_padding(clean) is None
    lone = np.zeros((60, 90), np.uint8)
    lone[20, 30] = 200
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(spotfit.detect(clean, sigma=1.3)) == len(truth)
        assert spotfit.detect(lone)[["x", "y"]].values.tolist() == [[30.0, 20.0]]
        assert len(spotfit.detect(np.zeros((60, 90), np.uint16))) == 0
    # (the lone pixel's frame is 99.98 % zeros: said, as for a clipped background)
    assert [str(w.message)[:40] for w in record] == ["99.9% of the pixels of frame 0 are 0: a "]
    assert find_padding(np.full((60, 90), 7, np.uint16)) is None
    # saturated pixels are not padding, however flat: at the type's maximum, or a
    # plateau above the data (a 12-bit camera's 4095 in a 16-bit file)
    sat = _padded(10)[0]
    sat[:10, :] = np.iinfo(sat.dtype).max
    sat[:, :10] = np.iinfo(sat.dtype).max
    assert find_padding(sat) is None
    sat = _padded(0)[0]
    sat[100:115, 200:215] = 4095
    assert find_padding(sat) is None


def test_padding_boxes_against_a_direct_search():
    """:func:`spotfit.padding.find_padding`'s flat boxes (runs of equal values, by
    doubling) on small random arrays with flat patches, against checking every 9 x 9 box."""
    from spotfit import padding

    rng = np.random.default_rng(4)
    k = padding.PADDING_BOX
    for _ in range(60):
        ny, nx = rng.integers(k, 30, 2)
        a = rng.integers(0, 3, (ny, nx)).astype(np.uint8)
        for _ in range(rng.integers(0, 3)):
            y0, x0 = rng.integers(0, ny - k + 1), rng.integers(0, nx - k + 1)
            a[y0:y0 + rng.integers(k, 14), x0:x0 + rng.integers(k, 14)] = rng.integers(0, 3)
        expected = np.zeros(a.shape, bool)
        for y in range(ny - k + 1):
            for x in range(nx - k + 1):
                if (a[y:y + k, x:x + k] == a[y, x]).all():
                    expected[y:y + k, x:x + k] = True
        rows = a[::padding.PADDING_STRIDE]
        runs = padding._runs(rows[:, 1:] == rows[:, :-1], k - 1, 1).any()
        if not runs:  # the cheap look at every PADDING_STRIDE-th row rules boxes out
            assert not expected.any()
            continue
        across = padding._runs(a[:, 1:] == a[:, :-1], k - 1, 1)
        down = padding._runs(a[1:] == a[:-1], k - 1, 0)
        boxes = padding._runs(across, k, 0) & down[:, :nx - k + 1]
        got = padding._spread(padding._spread(boxes, k, 0), k, 1)
        np.testing.assert_array_equal(got, expected)


def test_memory_is_bounded_by_the_batch_not_the_candidates(monkeypatch):
    """A noise frame at threshold 0.5 (a candidate every ~50 px): fitted in batches of 100
    windows, the fit's peak of array memory is a fraction of fitting all candidates at once
    (benchmarks/candidate_memory.py measures whole processes)."""
    import tracemalloc

    import spotfit.api

    frame = (100 + np.random.default_rng(1).poisson(20, (256, 320))).astype(np.uint16)
    # so many candidates make a dense field: the single-spot path is what is measured here
    monkeypatch.setattr(spotfit.group, "DENSE_COVERAGE", np.inf)
    monkeypatch.setattr(spotfit.fields, "_overlaps", lambda setup, frame, singles: np.zeros(len(singles), bool))

    def peak():
        tracemalloc.start()
        found = spotfit.fit(frame, camera=CAMERA, threshold=0.5)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, found

    whole, expected = peak()
    assert len(expected) > 1000
    monkeypatch.setattr(single, "PIXEL_BUDGET", 100 * 81)
    batched, found = peak()
    pd.testing.assert_frame_equal(found, expected)
    assert batched < 0.5 * whole, (batched, whole)


def test_input_errors_keep_their_parameter_across_processes():
    import pickle

    err = pickle.loads(pickle.dumps(spotfit.SpotfitInputError("sigma must be > 0", parameter="sigma")))
    assert str(err) == "sigma must be > 0" and err.parameter == "sigma"


def test_config_choices_are_the_registries():
    """FitConfig's choices (numpy-free, for the command line) name what the registries build."""
    from spotfit.config import ESTIMATOR_CHOICES, MODEL_CHOICES
    from spotfit.estimators import ESTIMATOR_NAMES
    from spotfit.models import MODEL_NAMES, REGISTRY

    assert MODEL_CHOICES == MODEL_NAMES and {name for name, _ in REGISTRY} == set(MODEL_NAMES)
    assert ESTIMATOR_CHOICES == ESTIMATOR_NAMES


def test_camera_given_as_a_mapping_of_its_fields(movie):
    """``camera={"gain": ..., "baseline": ...}`` means the Camera of those fields (the same
    table); anything else is a clear error that names ``camera``, not an AttributeError."""
    img, _ = movie
    frame = img[0]
    expected = spotfit.fit(frame, camera=CAMERA)
    given = spotfit.fit(frame, camera={"baseline": 100.0, "gain": 1.0})
    pd.testing.assert_frame_equal(given, expected)
    assert len(spotfit.detect(frame, camera={"gain": 1.0, "baseline": 100})) > 0
    with pytest.raises(spotfit.SpotfitInputError, match=r"camera has no field 'offset'") as err:
        spotfit.fit(frame, camera={"offset": 100.0, "gain": 1.0})
    assert err.value.parameter == "camera"
    with pytest.raises(spotfit.SpotfitInputError, match=r"camera must be a spotfit.Camera .* got float"):
        spotfit.fit(frame, camera=2.0)
    # simulate takes the same: a mapping gives the image of the Camera
    pixels = [spotfit.simulate((20, 24), n_spots=2, camera=c, seed=3)[0]
              for c in (Camera(baseline=100.0, gain=2.0), {"baseline": 100.0, "gain": 2.0})]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    with pytest.raises(spotfit.SpotfitInputError, match=r"camera must be a spotfit.Camera"):
        spotfit.simulate((20, 24), n_spots=2, camera="sCMOS")
