"""Result tables: column schema, assembly from fits, and atomic CSV writing.

One row per spot.  Column meanings and units are listed in
:data:`COLUMNS` (and in the README); pixel coordinates follow the
convention stated in :mod:`spotfit`.
"""

from __future__ import annotations

import os

import numpy as np

#: column -> (unit, meaning).  "signal" is photons with a calibrated camera,
#: ADU above baseline otherwise (see the ``unit`` column).
COLUMNS = {
    "frame": ("-", "time index of the frame (0-based)"),
    "channel": ("-", "channel index (0-based); only with --channel all"),
    "x": ("px", "fitted centre, column (0-based pixel centres)"),
    "y": ("px", "fitted centre, row"),
    "z": ("px", "fitted centre, plane (3D fits only)"),
    "intensity": ("signal", "integrated signal of the spot above the offset"),
    "amplitude": ("signal/px", "peak of the fitted Gaussian density, intensity / (2 pi sigma_x sigma_y)"),
    "sigma_x": ("px", "Gaussian sigma along the spot's first axis (x for angle = 0)"),
    "sigma_y": ("px", "Gaussian sigma perpendicular to it"),
    "sigma_z": ("px (planes)", "Gaussian sigma along z (3D fits only)"),
    "angle": ("rad", "rotation of the sigma_x axis from +x towards +y, in [-pi/4, pi/4)"),
    "offset": ("signal/px", "local background per pixel"),
    "chi2_red": ("-", "reduced chi-square of the fit"),
    "iterations": ("-", "solver iterations"),
    "status": ("-", "converged, max_iterations, singular, left_window or low_signal"),
    "unit": ("-", "unit of signal: photon or ADU"),
    # physical units, appended when the pixel size is known (add_physical_units)
    "x_um": ("µm", "x * pixel_size"),
    "y_um": ("µm", "y * pixel_size"),
    "z_um": ("µm", "z * z_step (3D, when the z step is known)"),
    "x_um_err": ("µm", "x_err * pixel_size"),
    "y_um_err": ("µm", "y_err * pixel_size"),
    "z_um_err": ("µm", "z_err * z_step"),
}

_ERR_OF = ("x", "y", "z", "intensity", "amplitude", "sigma_x", "sigma_y", "sigma_z", "angle", "offset")


def columns(ndim: int = 2) -> list:
    """Ordered output columns for 2D or 3D fits."""
    if ndim == 2:
        values = ["x", "y", "intensity", "amplitude", "sigma_x", "sigma_y", "angle", "offset"]
    else:
        values = ["x", "y", "z", "intensity", "amplitude", "sigma_x", "sigma_y", "sigma_z", "offset"]
    return (
        ["frame"]
        + values
        + [f"{v}_err" for v in values]
        + ["chi2_red", "iterations", "status", "unit"]
    )


def empty(ndim: int = 2, crowded: bool = False):
    """A table with no rows and the full schema (plus group columns if ``crowded``)."""
    import pandas as pd

    cols = columns(ndim) + (["group_id", "group_size"] if crowded else [])
    dtypes = {c: "float64" for c in cols}
    dtypes.update(frame="int64", iterations="int32", status="object", unit="object",
                  group_id="int64", group_size="int64")
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in cols})


def build(frame, values: dict, errors: dict, chi2_red, iterations, status_names, unit: str, ndim: int):
    """Assemble a table from per-spot arrays.

    Parameters
    ----------
    frame : (n,) int ndarray
    values, errors : dict of str -> (n,) ndarray
        Fitted values and standard errors by output column name (missing
        entries are filled with NaN; ``angle`` defaults to 0).
    chi2_red : (n,) ndarray
    iterations : (n,) int ndarray
    status_names : (n,) ndarray of str
    unit : {"photon", "ADU"}
    ndim : {2, 3}
    """
    import pandas as pd

    n = len(frame)
    cols = columns(ndim)
    data = {"frame": np.asarray(frame, dtype=np.int64)}
    for c in cols:
        if c in ("frame", "chi2_red", "iterations", "status", "unit"):
            continue
        src = errors if c.endswith("_err") else values
        key = c[:-4] if c.endswith("_err") else c
        default = 0.0 if c == "angle" else np.nan
        data[c] = np.asarray(src.get(key, np.full(n, default)), dtype=float)
    data["chi2_red"] = np.asarray(chi2_red, dtype=float)
    data["iterations"] = np.asarray(iterations, dtype=np.int32)
    data["status"] = np.asarray(status_names, dtype=object)
    data["unit"] = np.full(n, unit, dtype=object)
    return pd.DataFrame(data, columns=cols)


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

    for name, value in (("pixel size", pixel_size), ("z step", z_step)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise SpotfitInputError(f"{name} must be a positive number of µm, got {value!r}")
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
        _write_bytes(tmp, data)


def _write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)