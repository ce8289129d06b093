"""The command line's table without pandas (:mod:`spotfit.lighttable`) is the DataFrame it stands for.

``spotfit fit`` builds single-spot tables as a :class:`LightTable` and writes
them without importing pandas (issue #14: start-up of a small fit); these
tests hold it to the DataFrame the Python API returns for the same rows: the
same columns and dtypes after :func:`as_frame`, the same CSV bytes as
``DataFrame.to_csv(index=False, float_format="%.8g")`` (Python renderer for
small tables, the compiled one for large), the same table from
:func:`spotfit.api.process_file` either way.
"""

import numpy as np
import pandas as pd
import pytest

import spotfit
from spotfit import provenance, table
from spotfit._csv import to_csv_bytes
from spotfit.lighttable import LightTable, as_frame, concat

EDGE = [0.0, -0.0, 1.0, 10.0, 1e8, 99999999.5, 9.99999995, 1e-4, 1e-5, 123456789.0, -2.25, np.nan,
        np.inf, -np.inf, 2047.123456789, 1 / 3, 5e-324, 1.7976931348623157e308]


def _reference(df) -> bytes:
    return df.to_csv(index=False, float_format="%.8g").encode()


def _light(rng, n):
    """A table with every kind of column spotfit writes (float, int64, int32, bool, text)."""
    v = np.concatenate([rng.normal(0, 1, n) * 10.0 ** rng.integers(-12, 12, n), EDGE])[:n]
    return LightTable({
        "frame": np.arange(n, dtype=np.int64) - 3,
        "x": v,
        "y": v[::-1].copy(),
        "iterations": np.arange(n, dtype=np.int32),
        "flag": np.arange(n) % 2 == 0,
        "status": np.where(np.arange(n) % 3 == 0, "converged", "low_signal").astype(object),
        "note": np.array(['a, "b"' if i % 5 == 0 else "plain" for i in range(n)], dtype=object),
    })


@pytest.mark.parametrize("n", [0, 1, 18, 300])
def test_python_rendering_is_pandas_text(n):
    t = _light(np.random.default_rng(n), n)
    assert t.to_csv_bytes() == _reference(as_frame(t))
    assert to_csv_bytes(t) == _reference(as_frame(t))  # (small: the Python renderer)


def test_compiled_rendering_of_a_light_table_is_pandas_text():
    t = _light(np.random.default_rng(5), 6000)
    assert to_csv_bytes(t, compiled=True) == _reference(as_frame(t))


def _build(light, n=4, ndim=2):
    rng = np.random.default_rng(ndim)
    values = {c: rng.normal(size=n) for c in table.value_columns(ndim)}
    errors = {c: np.abs(rng.normal(size=n)) for c in table.value_columns(ndim)}
    status = np.array(["converged", "low_signal", "converged", "not_spot"][:n], dtype=object)
    return table.build(np.arange(n) // 2, values, errors, rng.normal(size=n), np.arange(n), status,
                       "photon", ndim, light=light)


@pytest.mark.parametrize("ndim", [2, 3])
def test_built_light_table_is_the_built_frame(ndim):
    light, frame = _build(True, ndim=ndim), _build(False, ndim=ndim)
    assert isinstance(light, LightTable) and isinstance(frame, pd.DataFrame)
    pd.testing.assert_frame_equal(as_frame(light), frame, check_index_type=True)
    assert to_csv_bytes(light) == to_csv_bytes(frame)


@pytest.mark.parametrize("ndim,crowded", [(2, False), (3, False), (2, True)])
def test_empty_light_table_is_the_empty_frame(ndim, crowded):
    pd.testing.assert_frame_equal(as_frame(table.empty(ndim, crowded, light=True)),
                                  table.empty(ndim, crowded), check_index_type=True)
    assert to_csv_bytes(table.empty(ndim, crowded, light=True)) == to_csv_bytes(table.empty(ndim, crowded))


def test_rows_columns_and_concat_as_in_pandas():
    light, frame = _build(True), _build(False)
    mask = np.array([True, False, True, True])
    pd.testing.assert_frame_equal(as_frame(light[mask]), frame[mask].reset_index(drop=True))
    pd.testing.assert_frame_equal(as_frame(light.iloc[np.array([3, 0])]),
                                  frame.iloc[[3, 0]].reset_index(drop=True))
    pd.testing.assert_frame_equal(as_frame(concat([light, light[mask]])),
                                  pd.concat([frame, frame[mask]], ignore_index=True))
    # a part that is a DataFrame makes the whole a DataFrame
    mixed = concat([light, frame])
    assert isinstance(mixed, pd.DataFrame)
    pd.testing.assert_frame_equal(mixed, pd.concat([frame, frame], ignore_index=True))
    assert int((light["status"] == "converged").sum()) == int((frame["status"] == "converged").sum())
    both = [light.copy(), frame.copy()]
    for t in both:
        t.insert(1, "channel", np.full(len(t), 2, np.int64))
    pd.testing.assert_frame_equal(as_frame(both[0]), both[1])
    with pytest.raises(ValueError):
        both[0].insert(0, "channel", 0)


def test_physical_units_of_a_light_table_as_of_a_frame():
    for ndim in (2, 3):
        light = table.add_physical_units(_build(True, ndim=ndim), 0.107, 0.3)
        frame = table.add_physical_units(_build(False, ndim=ndim), 0.107, 0.3)
        pd.testing.assert_frame_equal(as_frame(light), frame)


def test_sidecar_status_counts_need_no_pandas():
    light, frame = _build(True), _build(False)
    st = type("St", (), {"st_size": 1, "st_mtime": 0.0, "st_mtime_ns": 0})()
    info = {k: None for k in ("shape", "axes", "source_axes", "dtype", "frames", "channels", "notes",
                              "resolved", "pixel_size_um", "pixel_size_from", "z_step_um", "z_step_from")}
    docs = [provenance.document("fit", "a.tif", st, t, info, {}, "a.csv", 1, {}, {}) for t in (light, frame)]
    assert docs[0]["status_counts"] == docs[1]["status_counts"] == {"converged": 2, "low_signal": 1,
                                                                     "not_spot": 1}


@pytest.mark.parametrize("crowded", [False, True])
def test_process_file_light_or_not_gives_the_same_table(tmp_path, crowded):
    from spotfit.api import process_file
    from spotfit.io import write_tiff

    # three frames, a close pair in one (the joint fits: a DataFrame), the others apart
    rng = np.random.default_rng(3)
    frames = []
    for k in range(3):
        xy = np.array([[12.3, 10.7], [40.2, 30.4], [30.5, 20.0]]) + k
        if k == 1:
            xy = np.vstack([xy, [33.0, 20.5]])
        frames.append(spotfit.simulate((48, 72), positions=xy, photons=2000, background=20, sigma=1.3,
                                       seed=rng)[0])
    path = tmp_path / "movie.tif"
    write_tiff(str(path), np.stack(frames), "TYX")
    camera = spotfit.Camera(baseline=100, gain=1)
    for task in ("fit", "detect"):
        light, _ = process_file(path, task, camera=camera, pixel_size=0.1, light=True,
                                config=spotfit.FitConfig(crowded=crowded))
        frame, _ = process_file(path, task, camera=camera, pixel_size=0.1,
                                config=spotfit.FitConfig(crowded=crowded))
        assert isinstance(frame, pd.DataFrame)
        pd.testing.assert_frame_equal(as_frame(light), frame, check_index_type=True)
        assert to_csv_bytes(light) == to_csv_bytes(frame)
