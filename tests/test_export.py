"""Exports (spotfit.export, ``spotfit export``): ThunderSTORM, Picasso, Parquet.

Each output is read back by the target tool's own reader where it can be
installed here (Picasso's ``picasso.io.load_locs`` and ``import_ts``; pandas
and pyarrow for Parquet), and always by a reader written from the tool's
documented format / source (ThunderSTORM's DLM importer, Picasso's
``load_locs`` + ``ensure_sanity``), so CI without Picasso still checks them.
Tables come from fits of simulated, non-square images with known truth.
"""

import json
import re
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spotfit
from spotfit import export
from spotfit.camera import Camera
from spotfit.errors import SpotfitInputError
from spotfit.io import write_tiff
from spotfit.simulation import simulate

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "picasso-testdata"
PIXEL_UM = 0.107  # not 0.1 or 0.16: a factor mix-up shows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fit table of a simulated 3-frame movie (48 x 70 px, 0.107 µm/px) and its image."""
    folder = tmp_path_factory.mktemp("fit")
    image, truth = simulate((3, 48, 70), n_spots=6, photons=3000, background=15, sigma=1.3,
                            camera=Camera(baseline=100, gain=2), border=5, min_separation=9,
                            seed=11)
    path = folder / "movie.tif"
    write_tiff(path, image, "TYX", pixel_size=PIXEL_UM)
    # the rotated model for every spot (round spots would get the symmetric one by default):
    # the exporters' rotated-model columns (sigma1/sigma2, angle) are what is tested
    table = spotfit.fit(path, camera=Camera(baseline=100, gain=2), select_model=False)
    assert (table["status"] == "converged").sum() >= 15
    return table, path


def needs_export_extra():
    """Skip unless the ``export`` extra is installed (h5py, pyyaml; pyarrow for Parquet)."""
    pytest.importorskip("h5py")
    pytest.importorskip("yaml")


def picasso_io():
    """picasso.io if installed (it silences tifffile's logger on import: restored)."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import picasso.io as pio
    except Exception:  # not installed, or its dependencies are not
        pio = None
    finally:
        logger.setLevel(level)
    return pio


def quietly(function, *args):
    """Call a Picasso function; its pandas deprecation warnings are not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args)


# ----------------------------------------------------------------------------
# ThunderSTORM
# ----------------------------------------------------------------------------


def read_like_thunderstorm(path):
    """ThunderSTORM's DLMImportExport.importFromFile, in Python.

    Header: labels split on ',', trimmed, surrounding quotes removed, parsed
    as ``name [unit]``; rows: every field through Java's Double.parseDouble
    (which accepts ``NaN`` but not an empty field); ``id`` is dropped.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    labels = [f.strip()[1:-1] for f in lines[0].split(",")]
    assert all(f.strip().startswith('"') and f.strip().endswith('"') for f in lines[0].split(","))
    names, units = [], []
    for label in labels:
        if "[" in label:
            names.append(label[:label.rindex("[")].strip())
            units.append(label[label.rindex("[") + 1:label.rindex("]")].strip())
        else:
            names.append(label)
            units.append("")
    rows = []
    for line in lines[1:]:
        fields = line.split(",")
        assert len(fields) == len(labels)
        for f in fields:  # what Java's Double.parseDouble accepts (no grouping, no empty)
            assert re.fullmatch(r"NaN|-?\d+(\.\d*)?([eE][-+]?\d+)?", f), f
        rows.append([float(f) for f in fields])
    values = np.array(rows).reshape(-1, len(labels))
    keep = [i for i, n in enumerate(names) if n != "id"]
    return {names[i]: values[:, i] for i in keep}, dict(zip(names, units))


def test_thunderstorm_columns_units_origin(fitted, tmp_path):
    table, _ = fitted
    out = tmp_path / "ts.csv"
    assert export.export(table, out, "thunderstorm") == [str(out)]
    columns, units = read_like_thunderstorm(out)
    assert list(units) == ["id", "frame", "x", "y", "sigma", "sigma1", "sigma2", "intensity",
                           "offset", "bkgstd", "uncertainty_xy"]
    assert units["x"] == units["y"] == units["sigma"] == units["uncertainty_xy"] == "nm"
    assert units["intensity"] == units["offset"] == units["bkgstd"] == "photon"
    ok = table[table["status"] == "converged"]
    px_nm = PIXEL_UM * 1000
    np.testing.assert_array_equal(columns["frame"], ok["frame"] + 1)  # 1-based
    # origin at the corner of the first pixel: its centre is at 0.5 px
    np.testing.assert_allclose(columns["x"], (ok["x"] + 0.5) * px_nm, rtol=1e-7)
    np.testing.assert_allclose(columns["y"], (ok["y"] + 0.5) * px_nm, rtol=1e-7)
    np.testing.assert_allclose(columns["sigma"], np.sqrt(ok["sigma_x"] * ok["sigma_y"]) * px_nm,
                               atol=1e-4)
    np.testing.assert_allclose(columns["intensity"], ok["intensity"], atol=1e-4)
    np.testing.assert_allclose(columns["bkgstd"], np.sqrt(ok["offset"]), atol=1e-4)
    np.testing.assert_allclose(columns["uncertainty_xy"],
                               np.sqrt((ok["x_err"] ** 2 + ok["y_err"] ** 2) / 2) * px_nm, atol=1e-4)
    # pandas reads it as well, with the labels as column names
    back = pd.read_csv(out)
    assert "x [nm]" in back.columns and back["id"].tolist() == list(range(1, len(ok) + 1))


def test_thunderstorm_all_rows_write_nan_and_adu(tmp_path):
    image, _ = simulate((40, 66), n_spots=5, photons=2000, background=10, seed=12,
                        camera=Camera(baseline=100, gain=1), border=4)
    table = spotfit.fit(image, model="symmetric")  # no gain: ADU
    table.loc[0, "status"] = "singular"
    table.loc[0, ["x_err", "y_err"]] = np.nan
    out = tmp_path / "ts.csv"
    export.write_thunderstorm(table, out, pixel_size=0.1, rows="all")
    columns, units = read_like_thunderstorm(out)
    assert units["intensity"] == "ADU" and "sigma1" not in units  # round spots: one sigma
    assert np.isnan(columns["uncertainty_xy"][0]) and np.isnan(columns["bkgstd"]).all()
    assert len(columns["x"]) == len(table)


def test_thunderstorm_through_picasso_import_ts(fitted, tmp_path):
    pio = picasso_io()
    if pio is None:
        pytest.skip("picasso (picassosr) not installed")
    table, _ = fitted
    out = tmp_path / "ts.csv"
    export.write_thunderstorm(table, out)
    locs, _ = quietly(pio.import_ts, str(out), PIXEL_UM * 1000)
    ok = table[table["status"] == "converged"]
    # Picasso's import divides by the pixel size without the half-pixel shift
    np.testing.assert_allclose(locs["x"], ok["x"] + 0.5, atol=1e-4)
    np.testing.assert_array_equal(locs["frame"], ok["frame"] - ok["frame"].min())


# ----------------------------------------------------------------------------
# Picasso
# ----------------------------------------------------------------------------

#: Picasso's locs dtypes (localize.locs_from_fits_gauss, MLE fit).
PICASSO_DTYPES = {"frame": "<u4", "x": "<f4", "y": "<f4", "photons": "<f4", "sx": "<f4",
                  "sy": "<f4", "bg": "<f4", "lpx": "<f4", "lpy": "<f4", "ellipticity": "<f4",
                  "net_gradient": "<f4", "photons_unc": "<f4", "bg_unc": "<f4",
                  "sx_unc": "<f4", "sy_unc": "<f4", "iterations": "<i4"}


def load_locs_like_picasso(path):
    """picasso.io.load_locs (0.11) re-implemented from its source.

    Reads the compound ``locs`` dataset with h5py, the metadata from the
    ``.yaml`` beside it (``yaml.load_all``), and applies ``lib.ensure_sanity``:
    ``Width``, ``Height``, ``Frames`` required; rows with NaN/inf, ``x >=
    Width``, ``y >= Height`` or negative x, y, lpx, lpy, photons,
    ellipticity, sx, sy dropped.
    """
    h5py = pytest.importorskip("h5py")
    yaml = pytest.importorskip("yaml")
    with h5py.File(path, "r") as fh:
        locs = fh["locs"][...]
        embedded = json.loads(fh["metadata"][()])
    with open(Path(path).with_suffix(".yaml")) as fh:
        info = list(yaml.load_all(fh, Loader=yaml.SafeLoader))
    assert info == embedded

    def meta(key):
        return next(d[key] for d in reversed(info) if key in d)

    frame = pd.DataFrame({n: locs[n] for n in locs.dtype.names})
    frame = frame.replace([np.inf, -np.inf], np.nan).dropna()
    frame = frame[(frame["x"] < meta("Width")) & (frame["y"] < meta("Height"))]
    for name in ("x", "y", "lpx", "lpy", "photons", "ellipticity", "sx", "sy"):
        frame = frame[frame[name] >= 0]
    assert meta("Frames") >= 1
    return frame, info, locs.dtype


def test_picasso_locs_fields_values_and_metadata(fitted, tmp_path):
    needs_export_extra()
    table, image = fitted
    out = tmp_path / "locs.hdf5"
    info = export.image_info(image)
    written = export.export(table, out, "picasso", width=info["width"], height=info["height"],
                            frames=info["frames"], source=info["source"])
    assert written == [str(out), str(tmp_path / "locs.yaml")]
    locs, meta, dtype = load_locs_like_picasso(out)
    fields = {name: dtype[name].str for name in dtype.names}
    assert {k: fields[k] for k in PICASSO_DTYPES} == PICASSO_DTYPES
    assert "angle" in fields  # rotated model: Picasso's angle column, degrees
    assert meta[0]["Width"] == 70 and meta[0]["Height"] == 48 and meta[0]["Frames"] == 3
    assert meta[1]["Pixelsize"] == pytest.approx(107.0)
    ok = table[table["status"] == "converged"]
    assert len(locs) == len(ok)
    # Picasso's pixel convention is spotfit's: no shift
    np.testing.assert_allclose(locs["x"], ok["x"], atol=1e-5 * 70)
    np.testing.assert_allclose(locs["y"], ok["y"], atol=1e-5 * 48)
    np.testing.assert_array_equal(locs["frame"], ok["frame"])
    np.testing.assert_allclose(locs["photons"], ok["intensity"], rtol=1e-6)
    np.testing.assert_allclose(locs["lpx"], ok["x_err"], rtol=1e-6)
    np.testing.assert_allclose(locs["angle"], np.rad2deg(ok["angle"]), rtol=1e-6, atol=1e-6)



def test_picasso_pair_is_replaced_together_or_not_at_all(fitted, tmp_path, monkeypatch):
    # the YAML cannot be put in place (e.g. an I/O error on rename): the
    # previous HDF5 + YAML pair must stay as it was, never a new HDF5 beside
    # an old YAML
    needs_export_extra()
    import os

    table, image = fitted
    out = tmp_path / "locs.hdf5"
    size = dict(width=70, height=48, frames=3)
    export.export(table, out, "picasso", **size)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = os.replace
    calls = []

    def failing_yaml(src, dst):  # the first rename onto the YAML fails, not the roll-back
        if str(dst).endswith(".yaml"):
            calls.append(dst)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_yaml)
    with pytest.raises(SpotfitInputError, match="locs.yaml: cannot write"):
        export.export(table.iloc[:3], out, "picasso", **size)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

def test_picasso_load_locs_reads_it(fitted, tmp_path):
    pio = picasso_io()
    if pio is None:
        pytest.skip("picasso (picassosr) not installed")
    table, image = fitted
    out = tmp_path / "locs.hdf5"
    info = export.image_info(image)
    export.write_picasso(table, out, info["width"], info["height"], info["frames"])
    locs, meta = quietly(pio.load_locs, str(out))
    ok = table[table["status"] == "converged"]
    assert len(locs) == len(ok)
    np.testing.assert_allclose(locs["x"], ok["x"], atol=1e-4)
    assert pio.lib.get_from_metadata(meta, "Pixelsize") == pytest.approx(107.0)


@pytest.mark.skipif(not (DATA / "testdata.tif").exists(), reason="Picasso test data absent")
def test_picasso_testdata_round_trip_matches_picassos_own_fits(tmp_path):
    """Fit Picasso's simulated movie, export, read back: Picasso's own MLE locs agree."""
    h5py = pytest.importorskip("h5py")
    table = spotfit.fit(DATA / "testdata.tif", camera=Camera(gain=1), sigma=0.82)
    out = tmp_path / "t_locs.hdf5"
    info = export.image_info(DATA / "testdata.tif")
    export.write_picasso(table, out, info["width"], info["height"], info["frames"])
    pio = picasso_io()
    locs = (pd.DataFrame(quietly(pio.load_locs, str(out))[0]) if pio is not None
            else load_locs_like_picasso(out)[0])
    with h5py.File(DATA / "testdata_locs.hdf5", "r") as fh:
        reference = fh["locs"][...]
    reference = reference[reference["frame"] < info["frames"]]
    distances, ratios = [], []
    for ref in reference:
        same = locs[locs["frame"] == ref["frame"]]
        d = np.hypot(same["x"] - ref["x"], same["y"] - ref["y"]).to_numpy()
        assert len(d), f"no spot in frame {ref['frame']}"
        distances.append(d.min())
        ratios.append(same["photons"].to_numpy()[d.argmin()] / ref["photons"])
    assert len(distances) >= 25
    assert np.max(distances) < 0.02  # px
    assert abs(np.median(ratios) - 1) < 0.06  # photons


def test_picasso_needs_the_image_size(fitted, tmp_path):
    table, _ = fitted
    with pytest.raises(SpotfitInputError, match="Picasso needs the image size"):
        export.export(table, tmp_path / "x.hdf5", "picasso")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Parquet, CSV, errors
# ----------------------------------------------------------------------------


def test_parquet_round_trip_keeps_every_row(fitted, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table, _ = fitted
    out = tmp_path / "spots.parquet"
    export.export(table, out, "parquet", pixel_size=PIXEL_UM)
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, table.reset_index(drop=True))
    meta = json.loads(pq.read_schema(out).metadata[b"spotfit"])
    assert meta["pixel_size_um"] == PIXEL_UM
    # and spotfit reads it back as a table to export from
    np.testing.assert_array_equal(export.read_table(out)["x"], table["x"])


def test_pixel_size_from_x_um_or_error(fitted):
    table, _ = fitted
    assert export.pixel_size_of(table) == pytest.approx(PIXEL_UM, rel=1e-6)
    bare = table.drop(columns=[c for c in table.columns if "_um" in c])
    with pytest.raises(SpotfitInputError, match="pixel size is unknown.*`pixel_size`"):
        export.thunderstorm_table(bare)
    assert export.pixel_size_of(bare, 0.2) == 0.2


def test_detection_tables_and_channels_refused(fitted, tmp_path):
    table, _ = fitted
    detections = pd.DataFrame({"frame": [0], "x": [1.0], "y": [2.0], "score": [9.0]})
    with pytest.raises(SpotfitInputError, match="detection table"):
        export.thunderstorm_table(detections, pixel_size=0.1)
    two = pd.concat([table.assign(channel=0), table.assign(channel=1)], ignore_index=True)
    with pytest.raises(SpotfitInputError, match="`channel=N`"):
        export.thunderstorm_table(two)
    assert len(export.thunderstorm_table(two, channel=1)) == (table["status"] == "converged").sum()


def test_missing_optional_package_names_the_extra(fitted, tmp_path, monkeypatch):
    table, _ = fitted
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SpotfitInputError, match=r"pip install 'spotfit\[export\]'"):
        export.write_picasso(table, tmp_path / "x.hdf5", 70, 48, 3)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SpotfitInputError, match=r"'pyarrow'.*spotfit\[export\]"):
        export.write_parquet(table, tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def run_cli(*args):
    """Invoke the CLI in-process (click's CliRunner); uncaught exceptions fail the test."""
    from click.testing import CliRunner

    from spotfit.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {result.stderr}") from result.exception
    return result


def test_cli_export_formats(fitted, tmp_path):
    table, image = fitted
    spots = tmp_path / "spots.csv"
    spotfit.write_table(table, spots)
    result = run_cli("export", spots, "--format", "thunderstorm")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "spots_thunderstorm.csv").exists()
    result = run_cli("export", spots, "--format", "picasso")
    assert result.exit_code == 1 and "Error:" in result.stderr and "--image" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "spots_locs.hdf5").exists()
    result = run_cli("export", spots, "--format", "csv", "--out", spots)
    assert result.exit_code == 1 and "overwrite the input" in result.stderr


def test_cli_export_picasso_with_the_image(fitted, tmp_path):
    needs_export_extra()
    table, image = fitted
    spots = tmp_path / "spots.csv"
    spotfit.write_table(table, spots)
    result = run_cli("export", spots, "--format", "picasso", "--image", image)
    assert result.exit_code == 0, result.stderr
    locs, meta, _ = load_locs_like_picasso(tmp_path / "spots_locs.hdf5")
    assert meta[0]["Width"] == 70 and len(locs) == (table["status"] == "converged").sum()


def test_cli_export_of_a_batch_uses_its_sidecar(tmp_path):
    needs_export_extra()
    image, _ = simulate((2, 40, 52), n_spots=4, photons=3000, background=10, seed=13,
                        camera=Camera(baseline=100, gain=1), border=5)
    (tmp_path / "data").mkdir()
    write_tiff(tmp_path / "data" / "cell.tif", image, "TYX")
    result = run_cli("fit", tmp_path / "data", "--out-dir", tmp_path / "out", "--gain", "1",
                 "--baseline", "100", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    spots = tmp_path / "out" / "cell.csv"
    result = run_cli("export", spots, "--format", "picasso", "--pixel-size", "0.1")
    assert result.exit_code == 0, result.stderr
    _, meta, _ = load_locs_like_picasso(tmp_path / "out" / "cell_locs.hdf5")
    assert (meta[0]["Width"], meta[0]["Height"], meta[0]["Frames"]) == (52, 40, 2)
    assert meta[1]["Pixelsize"] == pytest.approx(100.0)


def test_cli_export_choices_match_the_library():
    from spotfit.cli import EXPORT_FORMATS

    assert EXPORT_FORMATS == export.FORMATS


def test_cli_fit_format_thunderstorm_and_usage_errors(fitted, tmp_path):
    table, image = fitted
    result = run_cli("fit", image, "--format", "thunderstorm", "--out", tmp_path / "ts.csv")
    assert result.exit_code == 0, result.stderr
    assert read_like_thunderstorm(tmp_path / "ts.csv")[1]["intensity"] == "ADU"
    for args in (["--format", "parquet"], ["--format", "parquet", "--out-dir", tmp_path / "o"]):
        result = run_cli("fit", image, *args)
        assert result.exit_code == 2 and "--format parquet" in result.stderr


def test_cli_fit_format_writes_the_export_directly(fitted, tmp_path):
    needs_export_extra()
    table, image = fitted
    out = tmp_path / "direct_locs.hdf5"
    result = run_cli("fit", image, "--baseline", "100", "--gain", "2", "--no-select-model",
                     "--format", "picasso", "--out", out)
    assert result.exit_code == 0, result.stderr
    locs, meta, _ = load_locs_like_picasso(out)
    ok = table[table["status"] == "converged"]
    np.testing.assert_allclose(locs["x"], ok["x"], atol=1e-4)
    assert (meta[0]["Width"], meta[0]["Height"], meta[0]["Frames"]) == (70, 48, 3)
    assert meta[1]["Pixelsize"] == pytest.approx(107.0)  # from the TIFF's metadata


def test_z_stack_tables_get_z_in_nm():
    """3D tables: z [nm] = z * z_step (from z_um or --z-step); without a z step, an error."""
    table = pd.DataFrame({
        "frame": [0, 1], "x": [3.0, 7.5], "y": [2.0, 4.25], "z": [1.5, 4.0],
        "intensity": [900.0, 1200.0], "sigma_x": [1.2, 1.3], "sigma_y": [1.2, 1.3],
        "sigma_z": [2.1, 2.2], "offset": [10.0, 12.0], "x_err": [0.05, 0.04],
        "y_err": [0.05, 0.04], "z_err": [0.2, 0.1], "intensity_err": [30.0, 35.0],
        "status": ["converged", "converged"], "unit": ["photon", "photon"],
    })
    with pytest.raises(SpotfitInputError, match="give `z_step` in µm"):
        export.thunderstorm_table(table, pixel_size=0.1)
    ts = export.thunderstorm_table(table, pixel_size=0.1, z_step=0.25)
    np.testing.assert_allclose(ts["z [nm]"], [375.0, 1000.0])
    np.testing.assert_allclose(ts["uncertainty_z [nm]"], [50.0, 25.0])
    np.testing.assert_allclose(ts["x [nm]"], [350.0, 800.0])
    with_um = table.assign(x_um=table["x"] * 0.1, z_um=table["z"] * 0.25)
    np.testing.assert_allclose(export.thunderstorm_table(with_um)["z [nm]"], [375.0, 1000.0])
    locs = export.picasso_locs(with_um)
    np.testing.assert_allclose(locs["z"], [375.0, 1000.0])
    assert "angle" not in locs.dtype.names  # no angle column in 3D tables
