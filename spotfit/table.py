"""Result tables: the one column schema, assembly of fit tables, physical units, atomic CSV writing.

:data:`SCHEMA` lists every column spotfit writes -- fit, detection and
ground-truth tables -- with its dtype, unit and meaning (the README's column
table says the same); :func:`columns` gives the order of a fit table,
:func:`empty` and :func:`build` make tables in that order and with those
dtypes.  Truth tables (:func:`spotfit.simulation.simulate`) use the fit
tables' names for the same quantities (``intensity``, ``offset``, ...).
Pixel coordinates follow the convention stated in :mod:`spotfit`.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np


class Column(NamedTuple):
    """One column of spotfit's tables."""

    name: str
    dtype: str
    unit: str
    meaning: str


#: Every column, in table order.  "signal" is photons with a calibrated
#: camera, ADU above baseline otherwise (see the ``unit`` column).
SCHEMA = (
    Column("frame", "int64", "-", "time index of the frame (0-based)"),
    Column("channel", "int64", "-", "channel index (0-based); only with --channel all"),
    Column("x", "float64", "px", "fitted centre, column (0-based pixel centres)"),
    Column("y", "float64", "px", "fitted centre, row"),
    Column("z", "float64", "planes", "fitted centre, plane (3D fits only)"),
    Column("intensity", "float64", "signal", "integrated signal of the spot above the offset (N)"),
    Column("amplitude", "float64", "signal/px",
           "peak of the fitted Gaussian density: intensity / (2 pi sigma_x sigma_y) in 2D, "
           "intensity / ((2 pi)^1.5 sigma_x sigma_y sigma_z) per voxel in 3D"),
    Column("sigma_x", "float64", "px", "Gaussian sigma along the spot's first axis (along x when angle = 0)"),
    Column("sigma_y", "float64", "px", "Gaussian sigma perpendicular to it (symmetric: equal to sigma_x)"),
    Column("sigma_z", "float64", "planes", "Gaussian sigma along z (3D fits only)"),
    Column("angle", "float64", "rad",
           "rotation of the sigma_x axis from +x towards +y, in [-pi/4, pi/4); 0 for symmetric "
           "and elliptical (2D only)"),
    Column("offset", "float64", "signal/px", "local background per pixel"),
    # standard errors of the values above, same order: "<name>_err", same unit
    Column("chi2_red", "float64", "-", "reduced chi-square of the fit, ~1 for a good fit"),
    Column("iterations", "int32", "-", "solver iterations used"),
    # "str": pandas' string dtype (pandas >= 3), object holding str before
    Column("status", "str", "-", "fit status (see spotfit.results.STATUS_NAMES)"),
    Column("unit", "str", "-", "unit of signal: photon or ADU"),
    # detection tables
    Column("score", "float64", "-", "detection signal-to-noise ratio of the candidate"),
    # physical units, appended when the pixel size is known (add_physical_units)
    Column("x_um", "float64", "µm", "x * pixel_size"),
    Column("y_um", "float64", "µm", "y * pixel_size"),
    Column("z_um", "float64", "µm", "z * z_step (3D, when the z step is known)"),
    Column("x_um_err", "float64", "µm", "x_err * pixel_size"),
    Column("y_um_err", "float64", "µm", "y_err * pixel_size"),
    Column("z_um_err", "float64", "µm", "z_err * z_step"),
    # crowded fields
    Column("group_id", "int64", "-", "spots fitted jointly share a group id (unique within the table)"),
    Column("group_size", "int64", "-", "number of spots in the group (1 for an isolated spot)"),
)

_BY_NAME = {c.name: c for c in SCHEMA}
_VALUES = ("x", "y", "z", "intensity", "amplitude", "sigma_x", "sigma_y", "sigma_z", "angle", "offset")
_QUALITY = ("chi2_red", "iterations", "status", "unit")
_GROUP = ("group_id", "group_size")


def column(name: str) -> Column:
    """The schema entry of a column; ``<value>_err`` columns share their value's unit."""
    if name.endswith("_err") and name[:-4] in _VALUES:
        value = _BY_NAME[name[:-4]]
        return Column(name, "float64", value.unit, f"standard error of {value.name}")
    return _BY_NAME[name]


def value_columns(ndim: int = 2) -> list:
    """The fitted values of a 2D or 3D fit table, in order (no ``z``/``sigma_z`` in 2D,
    no ``angle`` in 3D)."""
    skip = ("z", "sigma_z") if ndim == 2 else ("angle",)
    return [c for c in _VALUES if c not in skip]


def columns(ndim: int = 2, crowded: bool = False) -> list:
    """Ordered output columns of a fit table for 2D or 3D fits (+ group columns if ``crowded``)."""
    values = value_columns(ndim)
    return (["frame"] + values + [f"{v}_err" for v in values] + list(_QUALITY)
            + (list(_GROUP) if crowded else []))


def empty(ndim: int = 2, crowded: bool = False, light: bool = False):
    """A fit table with no rows and the full schema (plus group columns if ``crowded``);
    ``light``: a :class:`spotfit.lighttable.LightTable` (no pandas)."""
    if light:
        from spotfit.lighttable import LightTable

        return LightTable({c: np.empty(0, dtype=object if column(c).dtype == "str" else column(c).dtype)
                           for c in columns(ndim, crowded)})
    return _empty(int(ndim), bool(crowded)).copy()


@functools.lru_cache(maxsize=None)
def _empty(ndim: int, crowded: bool):
    """:func:`empty`'s table, built once (two dozen Series took ~10 ms per call)."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=column(c).dtype) for c in columns(ndim, crowded)})


def build(frame, values: dict, errors: dict, chi2_red, iterations, status_names, unit: str, ndim: int,
          light: bool = False):
    """Assemble a fit table from per-spot arrays.

    Parameters
    ----------
    frame : (n,) int ndarray
    values, errors : dict of str -> (n,) ndarray
        Fitted values and standard errors by output column name
        (:func:`value_columns`; :func:`spotfit.results.measure` gives them).
    chi2_red : (n,) ndarray
    iterations : (n,) int ndarray
    status_names : (n,) ndarray of str
    unit : {"photon", "ADU"}
    ndim : {2, 3}
    light : bool
        Return a :class:`spotfit.lighttable.LightTable` (no pandas; the same
        DataFrame after :func:`spotfit.lighttable.as_frame`).

    Returns
    -------
    pandas.DataFrame or LightTable
        Columns :func:`columns` ``(ndim)`` with the schema's dtypes.
    """
    n = len(frame)
    data = {"frame": np.asarray(frame, dtype=np.int64)}
    for c in value_columns(ndim):
        data[c] = np.asarray(values[c], dtype=float)
    for c in value_columns(ndim):
        data[f"{c}_err"] = np.asarray(errors[c], dtype=float)
    data["chi2_red"] = np.asarray(chi2_red, dtype=float)
    data["iterations"] = np.asarray(iterations, dtype=np.int32)
    if light:
        from spotfit.lighttable import LightTable

        # copies, as the DataFrame constructor makes (the inputs may be the caller's arrays)
        data = {k: v.copy() for k, v in data.items()}
        data["status"] = np.array(status_names, dtype=object)
        data["unit"] = np.full(n, unit, dtype=object)
        return LightTable(data)
    import pandas as pd

    data["status"] = pd.Series(np.asarray(status_names, dtype=object), dtype="str")
    data["unit"] = pd.Series(np.full(n, unit, dtype=object), dtype="str")
    return pd.DataFrame(data, columns=columns(ndim))


def physical_columns(table_columns, pixel_size, z_step=None) -> list:
    """Names of the µm columns :func:`add_physical_units` appends to a table.

    Parameters
    ----------
    table_columns : sequence of str
        Columns of the table in pixels (e.g. ``columns(2)``, or the
        ``frame, x, y, score`` of a detection table).
    pixel_size, z_step : float or None
        Pixel size in x and y and distance between planes, in µm.
    """
    if pixel_size is None:
        return []
    axes = ["x", "y"] + (["z"] if z_step is not None and "z" in table_columns else [])
    names = [f"{a}_um" for a in axes]
    names += [f"{a}_um_err" for a in axes if f"{a}_err" in table_columns]
    return names


def add_physical_units(table, pixel_size, z_step=None):
    """Append positions (and their errors) in µm to a table in pixels.

    Pixel coordinates stay the primary result; the µm columns are
    ``x_um = x * pixel_size``, ``y_um = y * pixel_size`` and, for z-stacks
    with a known z step, ``z_um = z * z_step`` -- so, like the pixel
    coordinates, they are measured from the centre of the first pixel
    (plane).  Standard errors ``x_err``, ``y_err``, ``z_err`` present in the
    table are scaled the same way into ``x_um_err``, ``y_um_err``,
    ``z_um_err``.  Columns are appended after the existing ones, in the order
    of :func:`physical_columns`.

    Parameters
    ----------
    table : pandas.DataFrame
        A fit or detection table with ``x``, ``y`` (and ``z``) in pixels.
    pixel_size : float or None
        Pixel size in x and y, µm per pixel (``--pixel-size``, or the file's
        metadata).  None: the table is returned unchanged.
    z_step : float or None
        Distance between z planes in µm; without it no ``z_um`` columns.

    Returns
    -------
    pandas.DataFrame
        A new table (the input is not modified).
    """
    from spotfit.errors import SpotfitInputError

    for name, value in (("pixel_size", pixel_size), ("z_step", z_step)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise SpotfitInputError(f"{name} must be a positive number of µm, got {value!r}",
                                    parameter=name)
    names = physical_columns(list(table.columns), pixel_size, z_step)
    if not names:
        return table
    out = table.copy()
    for name in names:
        axis = name[0]
        scale = float(z_step if axis == "z" else pixel_size)
        source = f"{axis}_err" if name.endswith("_err") else axis
        out[name] = out[source].astype(float) * scale
    return out


def to_csv_bytes(table) -> bytes:
    """The CSV text spotfit writes: header + one line per row, floats with 8
    significant digits (``%.8g``: 1e-4 px resolution below 10,000 px), NaN as
    an empty field; identical to pandas' ``to_csv(index=False,
    float_format="%.8g")``, rendered by a compiled kernel (:mod:`spotfit._csv`)."""
    from spotfit._csv import to_csv_bytes as render

    return render(table)


def write_table(table, path) -> None:
    """Write a table as CSV atomically (temporary file, then rename).

    Parameters
    ----------
    table : pandas.DataFrame
    path : str or os.PathLike
        Destination; its directory must exist.  Nothing is left at ``path``
        (or beside it) if writing fails.  Format: :func:`to_csv_bytes`.
    """
    from spotfit._atomic import atomic_path

    data = to_csv_bytes(table)
    with atomic_path(os.fspath(path)) as tmp:
        write_csv_bytes(tmp, data)


def write_csv_bytes(path, data: bytes) -> None:
    """Write rendered CSV bytes (:func:`to_csv_bytes`) to `path`, a temporary file of
    :func:`spotfit._atomic.atomic_path` or ``atomic_group``."""
    with open(path, "wb") as fh:
        fh.write(data)