"""Tables: one schema for column order, dtypes and units -- the README documents the same."""

import pathlib
import re

import numpy as np
import pandas as pd
import pytest

import spotfit
from spotfit import table
from spotfit.results import STATUS_NAMES

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_columns():
    """``{column: unit}`` from the README's output-column table."""
    text = README.read_text(encoding="utf-8")
    start = text.index("| column | unit | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        units = [u.strip() for u in cells[1].split(",")]
        for i, name in enumerate(names):
            rows[name] = units[i] if len(units) == len(names) else units[0]
    return rows


def test_column_order_2d_and_3d():
    assert table.columns(2) == [
        "frame", "x", "y", "intensity", "amplitude", "sigma_x", "sigma_y", "angle", "offset",
        "x_err", "y_err", "intensity_err", "amplitude_err", "sigma_x_err", "sigma_y_err", "angle_err",
        "offset_err", "chi2_red", "iterations", "status", "unit"]
    assert table.columns(3)[:10] == ["frame", "x", "y", "z", "intensity", "amplitude", "sigma_x",
                                     "sigma_y", "sigma_z", "offset"]
    assert "angle" not in table.columns(3)
    assert table.columns(2, crowded=True)[-2:] == ["group_id", "group_size"]


@pytest.mark.parametrize("ndim,crowded", [(2, False), (3, False), (2, True)])
def test_empty_tables_have_the_schema_dtypes(ndim, crowded):
    t = table.empty(ndim, crowded)
    assert list(t.columns) == table.columns(ndim, crowded) and len(t) == 0
    for c in t.columns:
        assert t[c].dtype == pd.Series(dtype=table.column(c).dtype).dtype, c


def test_build_fills_columns_in_order_with_schema_dtypes():
    n = 3
    values = {c: np.arange(n, dtype=float) + i for i, c in enumerate(table.value_columns(2))}
    errors = {c: v / 10 for c, v in values.items()}
    t = table.build(np.array([0, 0, 2]), values, errors, np.ones(n), np.array([3, 4, 5]),
                    np.array(["converged"] * n, dtype=object), "photon", 2)
    assert list(t.columns) == table.columns(2)
    np.testing.assert_array_equal(t["offset_err"], errors["offset"])
    assert t["frame"].dtype == np.int64 and t["iterations"].dtype == np.int32
    assert (t["unit"] == "photon").all()


def test_fit_tables_follow_the_schema():
    img, _ = spotfit.simulate((40, 61), n_spots=3, photons=3000, min_separation=10, border=5, seed=2)
    for crowded in (False, True):
        t = spotfit.fit(img, camera=spotfit.Camera(baseline=100, gain=1), crowded=crowded)
        assert list(t.columns) == table.columns(2, crowded)
        for c in t.columns:  # text is "str": pandas' string dtype from pandas 3, else object
            assert t[c].dtype == pd.Series(dtype=table.column(c).dtype).dtype, c


def test_readme_documents_every_column_with_the_schema_unit():
    documented = _readme_columns()
    names = set(table.columns(2, True)) | set(table.columns(3)) | {"channel"}
    names |= {"x_um", "y_um", "z_um", "x_um_err", "y_um_err", "z_um_err"}
    for name in sorted(names):
        assert name in documented, f"README lacks column {name}"
        want = table.column(name).unit
        assert documented[name] == want, (name, documented[name], want)


def test_readme_documents_every_status():
    text = README.read_text(encoding="utf-8")
    for name in STATUS_NAMES:
        assert f"| `{name}` |" in text, name


def test_truth_and_fit_tables_share_names():
    _, truth = spotfit.simulate((40, 61), n_spots=3, seed=1)
    assert set(truth.columns) - {"frame"} <= set(table.columns(2))


def test_physical_units_are_appended_in_schema_order():
    t = pd.DataFrame({"x": [1.0], "y": [2.0], "z": [3.0], "x_err": [0.1], "y_err": [0.2], "z_err": [0.5]})
    out = table.add_physical_units(t, 0.1, 0.3)
    assert list(out.columns)[6:] == ["x_um", "y_um", "z_um", "x_um_err", "y_um_err", "z_um_err"]
    assert out["z_um_err"][0] == pytest.approx(0.15)
    assert table.add_physical_units(t, None) is t
    with pytest.raises(spotfit.SpotfitInputError, match="pixel_size must be a positive"):
        table.add_physical_units(t, 0.0)


def test_every_schema_column_has_a_unit_and_meaning():
    for c in table.SCHEMA:
        assert c.unit and c.meaning and np.dtype(c.dtype)
    assert table.column("offset_err").unit == table.column("offset").unit
    with pytest.raises(KeyError):
        table.column("photons")
