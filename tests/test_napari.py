"""The napari plugin without a display: the reader's layer data, the widget's function, the manifest.

napari itself (and Qt) is not needed: the reader and the fitting behind the
widget return plain layer-data tuples (spotfit.napari._layers).  The npe2
manifest is validated when npe2 is installed; the widget module (magicgui)
is imported when magicgui is installed.
"""

import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

import spotfit
from spotfit.camera import Camera
from spotfit.napari import _layers
from spotfit.simulation import simulate

PACKAGE = Path(spotfit.__file__).parent
MANIFEST = PACKAGE / "napari" / "napari.yaml"


@pytest.fixture(scope="module")
def movie():
    """A 3-frame simulated movie (44 x 63 px) and its truth."""
    return simulate((3, 44, 63), n_spots=5, photons=3000, background=10, sigma=1.3,
                    camera=Camera(baseline=100, gain=1), border=5, min_separation=9, seed=21)


def test_reader_layer_data_time_aware(movie, tmp_path):
    image, truth = movie
    table = spotfit.fit(image, camera=Camera(baseline=100, gain=1))
    table.loc[0, "status"] = "low_signal"
    path = tmp_path / "movie_spots.csv"
    spotfit.write_table(table, path)
    reader = _layers.get_reader(str(path))
    assert reader is _layers.read_tables
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "points" and kwargs["ndim"] == 3 and kwargs["name"] == "movie_spots"
    assert data.shape == (len(table), 3)
    np.testing.assert_array_equal(data[:, 0], table["frame"])  # t
    np.testing.assert_allclose(data[:, 1], table["y"], rtol=1e-7)  # then row
    np.testing.assert_allclose(data[:, 2], table["x"], rtol=1e-7)  # then column
    assert list(kwargs["features"].columns) == list(table.columns)
    np.testing.assert_allclose(kwargs["features"]["intensity"], table["intensity"], rtol=1e-7)
    colours = kwargs["face_color"]
    assert colours.shape == (len(table), 4)
    np.testing.assert_array_equal(colours[0], _layers.STATUS_COLOURS["low_signal"])
    np.testing.assert_array_equal(colours[1:], np.tile(_layers.STATUS_COLOURS["converged"],
                                                       (len(table) - 1, 1)))
    np.testing.assert_allclose(kwargs["size"], 4 * np.sqrt(table["sigma_x"] * table["sigma_y"]),
                               rtol=1e-6)
    # each true spot has a point in its frame, at its position (t, y, x)
    for t in range(3):
        mine = data[data[:, 0] == t][:, 1:]
        want = truth[truth["frame"] == t][["y", "x"]].to_numpy()
        d, _ = cKDTree(mine).query(want)
        assert np.all(d < 0.2)


def test_reader_z_stacks_and_channels(tmp_path):
    table = pd.DataFrame({
        "frame": [0, 0, 1], "channel": [0, 1, 1], "x": [3.5, 10.0, 20.25],
        "y": [4.0, 8.5, 2.0], "z": [1.0, 2.5, 3.0], "sigma_x": [1.0, 1.2, 1.1],
        "sigma_y": [1.0, 1.2, 1.1], "status": ["converged", "singular", "weird"],
    })
    path = tmp_path / "stack.csv"
    table.to_csv(path, index=False)
    layers = _layers.get_reader(str(path))(str(path))
    assert [k["name"] for _, k, _ in layers] == ["stack channel 0", "stack channel 1"]
    data, kwargs, _ = layers[1]
    assert kwargs["ndim"] == 4
    np.testing.assert_array_equal(data, [[0, 2.5, 8.5, 10.0], [1, 3.0, 2.0, 20.25]])  # t z y x
    np.testing.assert_array_equal(kwargs["face_color"][0], _layers.STATUS_COLOURS["singular"])
    np.testing.assert_array_equal(kwargs["face_color"][1], _layers.OTHER_COLOUR)


def test_reader_declines_other_files(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "det.csv").write_text("frame,x,y,score\n0,1,2,9\n")
    assert _layers.get_reader(str(tmp_path / "other.csv")) is None
    assert _layers.get_reader(str(tmp_path / "missing.csv")) is None
    assert _layers.get_reader([str(tmp_path / "det.csv")]) is _layers.read_tables  # detections


def test_reader_reads_parquet(movie, tmp_path):
    pytest.importorskip("pyarrow")
    from spotfit.export import write_parquet

    image, _ = movie
    table = spotfit.fit(image[0])
    write_parquet(table, tmp_path / "one.parquet")
    [(data, kwargs, _)] = _layers.get_reader(str(tmp_path / "one.parquet"))(
        str(tmp_path / "one.parquet"))
    np.testing.assert_allclose(data[:, 2], table["x"])


def test_widget_function_fits_the_layer(movie):
    image, truth = movie
    # a time series layer: (t, y, x)
    data, kwargs, kind = _layers.fit_to_points(image, baseline=100, gain=1, name="cells")
    assert kind == "points" and kwargs["name"] == "cells spots" and data.shape[1] == 3
    table = kwargs["features"]
    ok = data[table["status"].to_numpy() == "converged"]
    d, _ = cKDTree(ok).query(truth[["frame", "y", "x"]].to_numpy())
    assert np.all(d < 0.2)
    assert (table["unit"] == "photon").all()
    # one 2D image: (y, x) points for a 2D layer
    data2, kwargs2, _ = _layers.fit_to_points(image[1], baseline=100, gain=1)
    assert kwargs2["ndim"] == 2 and data2.shape[1] == 2
    first = truth[truth["frame"] == 1][["y", "x"]].to_numpy()
    assert np.all(cKDTree(data2).query(first)[0] < 0.2)
    # an RGB layer: the chosen colour sample
    rgb = np.stack([np.zeros_like(image[1]), image[1], np.zeros_like(image[1])], axis=-1)
    data3, _, _ = _layers.fit_to_points(rgb, rgb=True, channel=1, baseline=100, gain=1)
    assert np.all(cKDTree(data3).query(first)[0] < 0.2)


def test_manifest_is_valid_and_its_commands_import():
    with warnings.catch_warnings():  # npe2's pydantic models warn on import: not ours
        warnings.simplefilter("ignore")
        npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "spotfit"
    reader = manifest.contributions.readers[0]
    assert "*.csv" in reader.filename_patterns
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        if module.endswith("_widget"):
            pytest.importorskip("magicgui")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = getattr(importlib.import_module(module), name)
        assert callable(target)


def test_entry_point_names_the_manifest():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    entry = pyproject["project"]["entry-points"]["napari.manifest"]["spotfit"]
    module, resource = entry.split(":")
    assert (PACKAGE.parent / module.replace(".", "/") / resource) == MANIFEST
    assert "napari.yaml" in pyproject["tool"]["setuptools"]["package-data"]["spotfit.napari"]


def test_layer_data_makes_napari_points_layers(movie, tmp_path):
    """With napari installed (no display needed): its Points layer accepts the layer data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = pytest.importorskip("napari.layers")
    image, _ = movie
    table = spotfit.fit(image, camera=Camera(baseline=100, gain=1))
    data, kwargs, kind = _layers.table_to_points(table, "spots")
    with warnings.catch_warnings():  # napari's pydantic models warn while building: not ours
        warnings.simplefilter("ignore")
        layer = layers.Layer.create(data, kwargs, kind)
    assert isinstance(layer, layers.Points) and layer.ndim == 3
    np.testing.assert_allclose(layer.data, data)
    np.testing.assert_allclose(layer.face_color, kwargs["face_color"])
    assert list(layer.features.columns) == list(table.columns)
