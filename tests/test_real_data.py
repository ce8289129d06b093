"""``spotfit fit`` on real (and third-party simulated) microscopy images.

The images live outside the repository in ``../shared/data`` (see its
README); every test skips cleanly when its file is missing.  None of these
images has a ground truth, so the tests check that the command succeeds,
that the number of spots is plausible for what the image shows, that most
fits converge, and that fitted positions lie inside the image.  Two peers'
answers are used as references: trackpy's positions of real colloids and
Picasso's MLE localisations of a simulated DNA-PAINT movie.

Bounds were set after looking at each image and measuring spotfit once
(measured values are quoted next to each bound); they are loose on purpose
so that reasonable changes of the detector or solver pass, while a broken
reader, detector or fitter (zero spots, thousands of noise spots, fits not
converging, x/y swapped) fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import spotfit
from spotfit.cli import main
from spotfit.match import match_spots
from spotfit.table import columns

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Fraction of fits with status "converged" required on every image.
MIN_CONVERGED = 0.8


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real test data not available: {path}")
    return path


@dataclass(frozen=True)
class Case:
    file: str
    args: tuple
    n_min: int
    n_max: int
    ndim: int = 2

    def __str__(self):
        return Path(self.file).stem


CASES = [
    # Real HybISS in-situ sequencing spots, 512 x 512 px: ~150-200 distinct bright
    # dots on a cloudy background.  At the default threshold (5) ~230 candidates
    # are found and 85 % converge (the rest are faint cloud maxima flagged
    # low_signal); threshold 7 keeps the visible dots: measured 173 spots, 93 %
    # converged.
    pytest.param(Case("spotiflow-samples/img_hybiss_2d.tif", ("--threshold", "7"), 80, 400),
                 id="hybiss"),
    # Real live-cell telomere (TERRA) image, 1024 x 1024 px: ~10 nuclei with
    # ~10-30 small dots each on textured nucleoplasm.  The texture makes ~1500
    # maxima above SNR 5 (32 % converged, mostly low_signal); SNR 20 keeps the
    # dots: measured 200 spots, 96 % converged.
    pytest.param(Case("spotiflow-samples/img_terra_2d.tif", ("--threshold", "20"), 80, 600),
                 id="terra"),
    # Synthetic 3D spots, 32 x 128 x 128 (axes tag QYX, really ZYX): ~90 spots
    # in the maximum projection; measured 91 spots, 91 % converged with the 3D
    # (elliptical) model.
    pytest.param(Case("spotiflow-samples/img_synth_3d.tif", ("--axes", "ZYX"), 40, 250, ndim=3),
                 id="synth-3d"),
    # Real smFISH in human cells, 319 x 507 px, PSF sigma 1 px (the authors'
    # .ini): several hundred dots, dense near the nuclei.  Measured at
    # threshold 10: 428 spots, 87 % converged (threshold 5: 640, 74 %).
    pytest.param(Case("airlocalize-examples/2DsmFISH_humCells.tif",
                      ("--sigma", "1", "--threshold", "10"), 150, 1500),
                 id="smfish"),
    # Very noisy real time-lapse, 120 frames of 100 x 100 px labelled Z, PSF
    # sigma 1.1 px (.ini): at most a few spots per frame.  At SNR 5 most of
    # ~450 candidates are noise (24 % converged); SNR 12: measured 93 spots,
    # 95 % converged, i.e. < 1 per frame.
    pytest.param(Case("airlocalize-examples/movie.tif",
                      ("--axes", "TYX", "--sigma", "1.1", "--threshold", "12"), 20, 500),
                 id="movie"),
    # Picasso's simulated DNA-PAINT movie, 100 frames of 32 x 32 px, PSF sigma
    # 0.82 px: a few blinking binding sites; Picasso itself localised 30 spots
    # in these frames, spotfit 31 (100 % converged).  testdata.yaml states no
    # camera baseline or gain, so the fit runs in ADU with least squares.
    pytest.param(Case("picasso-testdata/testdata.tif", ("--sigma", "0.82"), 20, 60),
                 id="picasso"),
]


def fit_cli(path: Path, args, out: Path) -> pd.DataFrame:
    result = CliRunner().invoke(main, ["fit", str(path), *args, "--out", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{path} (")
    return pd.read_csv(out)


@pytest.mark.parametrize("case", CASES)
def test_fit_real_image(case: Case, tmp_path):
    path = data_file(case.file)
    table = fit_cli(path, case.args, tmp_path / "spots.csv")
    assert list(table.columns)[: len(columns(case.ndim))] == columns(case.ndim)
    assert case.n_min <= len(table) <= case.n_max, len(table)

    status = table["status"].value_counts()
    converged = status.get("converged", 0) / len(table)
    assert converged >= MIN_CONVERGED, status.to_dict()
    assert (table["unit"] == "ADU").all()  # no --gain given

    axes = dict(zip(case.args[::2], case.args[1::2])).get("--axes")
    with spotfit.read_image(path, axes=axes) as image:
        n_frames, frame_shape = image.n_frames, image.frame_shape
    assert table["frame"].between(0, n_frames - 1).all()
    ok = table[table["status"] == "converged"]
    sizes = dict(zip("zyx"[-len(frame_shape):], frame_shape))
    for axis, size in sizes.items():
        # pixel centres run from 0 to size - 1; the image covers [-0.5, size - 0.5]
        assert ok[axis].between(-0.5, size - 0.5).all(), axis
    assert np.isfinite(ok[["intensity", "intensity_err", "x_err", "y_err"]]).all().all()
    assert (ok["intensity"] > 0).all()


@pytest.mark.parametrize("file", ["spotiflow-samples/img_terra_2d.tif", "spotiflow-samples/img_hybiss_2d.tif",
                                  "airlocalize-examples/2DsmFISH_humCells.tif"],
                         ids=["terra", "hybiss", "smfish"])
def test_few_converged_fits_wider_than_twice_sigma(file):
    """Issue #10: with default options (sigma 1.3 px), at most 2 % of the converged rows
    are wider than 2 x sigma on the cell images.  The original detector's noise
    (the MAD of the filtered frame, set by the dark space between cells) put
    hundreds of candidates on the bright, textured nuclei, whose fits came out
    3-6 px wide and converged (measured on Terra: 64 % of the converged rows).
    Now the noise follows the background level, and a fit wider than 2 sigma
    is ``not_spot``.  Measured: Terra 696 rows, 416 converged, 268 not_spot;
    HybISS 249 / 199 / 46; smFISH 823 / 592 / 149; no converged row wider."""
    path = data_file(file)
    table = spotfit.fit(path)
    ok = table[table["status"] == "converged"]
    assert len(ok) >= 100
    wide = np.maximum(ok["sigma_x"], ok["sigma_y"]) > 2 * 1.3
    assert wide.mean() <= 0.02, wide.mean()
    # and the not_spot rows are the wide ones (or widths at a bound)
    odd = table[table["status"] == "not_spot"]
    assert (np.maximum(odd["sigma_x"], odd["sigma_y"]) > 2 * 1.3).mean() > 0.8


def test_trackpy_reference_positions():
    """Real colloids (dark on light): compare with trackpy's ``locate``.

    trackpy v0.4 located 344 colloids in the inverted frame 1 with
    ``diameter=9, minmass=140`` (``arr_3``, (y, x) positions, the same pixel
    convention as spotfit).  ~9 px diameter colloids are roughly Gaussian
    spots of sigma ~2 px.  Measured (sigma 2, default threshold): 476 spots
    found (spotfit keeps fainter colloids that minmass drops), 315 of 344
    trackpy positions (92 %) matched within 1.5 px, median distance 0.18 px,
    RMS 0.41 px.  The RMS is dominated by touching colloids, where trackpy's
    centroid in a 9 px mask and a Gaussian fit in an 11 px window see
    different neighbours; the median shows the agreement on isolated ones.
    """
    frame = data_file("trackpy-tests/image_sequence/T76S3F00001.png")
    ref_file = data_file("trackpy-tests/reproducibility_v0.4.npz")
    from skimage.io import imread

    image = imread(frame)
    assert image.shape == (424, 640) and image.dtype == np.uint8
    inverted = (255 - image.astype(np.int16)).astype(np.uint8)
    with np.load(ref_file) as ref:
        trackpy_yx = ref["arr_3"]
    assert trackpy_yx.shape == (344, 2)

    table = spotfit.fit(inverted, sigma=2.0)
    found_yx = table[["y", "x"]].to_numpy()
    i_found, i_ref = match_spots(found_yx, trackpy_yx, 1.5)
    assert len(i_found) >= 0.85 * len(trackpy_yx)  # measured 92 %
    distance = np.hypot(*(found_yx[i_found] - trackpy_yx[i_ref]).T)
    assert np.median(distance) < 0.25  # px; measured 0.18
    assert np.sqrt(np.mean(distance**2)) < 0.5  # px; measured 0.41
    # no systematic shift between the two pixel conventions
    assert np.all(np.abs(np.mean(found_yx[i_found] - trackpy_yx[i_ref], axis=0)) < 0.1)
    assert (table["status"].iloc[i_found] == "converged").mean() >= 0.9  # measured 99.7 %


def test_picasso_reference_localisations():
    """Picasso's own MLE localisations of the same simulated movie.

    ``testdata_locs.hdf5`` covers 1000 frames; the TIFF holds the first 100,
    in which Picasso localised 30 spots (about 14,000 photons each).  Measured:
    all 30 matched, positions agree to 0.007 px RMS per axis with no offset,
    i.e. Picasso uses the same pixel-centre convention.  Picasso fits with
    MLE and its camera model, spotfit here with least squares in ADU, so the
    bound (0.05 px) allows for the difference of the estimators while
    still catching any half-pixel convention error.
    """
    tif = data_file("picasso-testdata/testdata.tif")
    locs_file = data_file("picasso-testdata/testdata_locs.hdf5")
    h5py = pytest.importorskip("h5py")

    with h5py.File(locs_file, "r") as fh:
        locs = fh["locs"][:]
    locs = locs[locs["frame"] < 100]
    table = spotfit.fit(tif, sigma=0.82)
    # frame * 1000 keeps spots of different frames from ever matching
    found = np.column_stack([table["frame"] * 1000.0, table["x"], table["y"]])
    ref = np.column_stack([locs["frame"] * 1000.0, locs["x"], locs["y"]])
    i_found, i_ref = match_spots(found, ref, 1.0)
    assert len(i_found) >= len(ref) - 2  # measured: all 30
    d = found[i_found, 1:] - ref[i_ref, 1:]
    assert np.all(np.sqrt(np.mean(d**2, axis=0)) < 0.05)  # px per axis
