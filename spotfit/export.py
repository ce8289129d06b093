"""Write spotfit tables for the tools used next: ThunderSTORM, Picasso, Parquet.

One function per target (:func:`write_thunderstorm`, :func:`write_picasso`,
:func:`write_parquet`, :func:`write_csv`), one dispatcher (:func:`export`,
what ``spotfit export`` runs), and :func:`read_table` for spotfit's own CSV
or Parquet tables.  Every file is written atomically
(:func:`spotfit._atomic.atomic_path`).

Coordinate conventions (spotfit: 0-based pixel centres, ``x`` = column)
------------------------------------------------------------------------
* **ThunderSTORM** measures from the *corner* of the first pixel: its fitter
  adds ``+ 0.5`` to the integer pixel of each fitted window
  (``MultipleLocationsImageFitting``), so the centre of the first pixel is
  at 0.5 px.  ``x [nm] = (x + 0.5) * pixel_size_nm``, likewise ``y``;
  frames are 1-based.
* **Picasso** measures from the *centre* of the first pixel, as spotfit
  does: its fitters place box pixel ``i`` at coordinate ``i`` and add the
  box's corner (``localize.locs_from_fits_gauss``: ``x = theta_x +
  identification_x - box // 2``).  ``x`` and ``y`` stay in pixels,
  unchanged; frames are 0-based, like spotfit's.

Rows: ThunderSTORM and Picasso have no notion of a failed fit, so by default
only ``status == "converged"`` rows are written (``rows="all"`` keeps every
row; Picasso itself drops rows with NaN or negative values when it loads a
file).  Parquet and CSV keep every row and column.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from spotfit._atomic import atomic_group, atomic_path
from spotfit.errors import SpotfitInputError

__all__ = [
    "FORMATS", "SUFFIXES", "read_table", "export", "default_output", "pixel_size_of",
    "image_info", "sidecar_info",
    "thunderstorm_table", "picasso_locs", "picasso_info",
    "write_thunderstorm", "write_picasso", "write_parquet", "write_csv",
]

#: Output formats of :func:`export` (``spotfit export --format``).
FORMATS = ("csv", "thunderstorm", "picasso", "parquet")

#: Default file ending per format (appended to the table's stem).
SUFFIXES = {
    "csv": ".csv", "thunderstorm": "_thunderstorm.csv", "picasso": "_locs.hdf5",
    "parquet": ".parquet",
}

#: Columns a fit table must have to be exported.
REQUIRED = ("frame", "x", "y", "intensity", "sigma_x", "sigma_y", "offset",
            "x_err", "y_err", "status", "unit")

# ThunderSTORM parses every field with Java's Double.parseDouble: NaN must be
# written as "NaN" (an empty field fails), numbers without digit grouping.


# ----------------------------------------------------------------------------
# Reading spotfit tables; pixel size
# ----------------------------------------------------------------------------


def read_table(path):
    """Read a spotfit table (CSV, or Parquet written by :func:`write_parquet`).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    SpotfitInputError
        When the file is missing or unreadable (naming it).
    """
    import pandas as pd

    where = os.fspath(path)
    if not os.path.isfile(where):
        raise SpotfitInputError(f"{where}: no such file")
    try:
        if where.lower().endswith((".parquet", ".pq")):
            _require("pyarrow", "Parquet", "export")
            return pd.read_parquet(where)
        return pd.read_csv(where, keep_default_na=True)
    except SpotfitInputError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:160]
        raise SpotfitInputError(f"{where}: cannot read the table ({detail})") from exc


def pixel_size_of(table, pixel_size=None, where: str = "table") -> float:
    """Pixel size in µm: the given one, else the one the table's ``x_um`` column used.

    Raises
    ------
    SpotfitInputError
        When neither is known, or the option is not a positive number.
    """
    if pixel_size is not None:
        if not (isinstance(pixel_size, (int, float)) and math.isfinite(pixel_size)
                and pixel_size > 0):
            raise SpotfitInputError(f"pixel_size must be a positive number of µm, got {pixel_size!r}",
                                    parameter="pixel_size")
        return float(pixel_size)
    if "x_um" in table.columns and len(table):
        x = table["x"].to_numpy(float)
        x_um = table["x_um"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(x_um) & (np.abs(x) > 1e-3)
        if ok.any():
            return float(np.median(x_um[ok] / x[ok]))
    raise SpotfitInputError(
        f"{where}: the pixel size is unknown (the table has no x_um column); give "
        "`pixel_size` in µm (e.g. `pixel_size=0.16` for 160 nm pixels)", parameter="pixel_size"
    )


def _z_step_of(table, z_step=None, where: str = "table") -> float:
    """z step in µm: the given one, else from ``z_um / z`` (3D tables)."""
    if z_step is not None:
        return float(z_step)
    if "z_um" in table.columns and len(table):
        z = table["z"].to_numpy(float)
        z_um = table["z_um"].to_numpy(float)
        ok = np.isfinite(z) & np.isfinite(z_um) & (np.abs(z) > 1e-3)
        if ok.any():
            return float(np.median(z_um[ok] / z[ok]))
    raise SpotfitInputError(
        f"{where}: a z-stack table needs the z step for z in nm; give `z_step` in µm",
        parameter="z_step"
    )


def _check_fit_table(table, where: str) -> None:
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        kind = " (a detection table: export needs fitted spots)" if "score" in table.columns else ""
        raise SpotfitInputError(
            f"{where}: not a spotfit fit table{kind}; missing column(s) {', '.join(missing)}"
        )


def _select(table, rows: str, channel, where: str):
    """Rows to write (converged or all) of one channel."""
    if rows not in ("converged", "all"):
        raise SpotfitInputError(f"rows must be 'converged' or 'all', not {rows!r}", parameter="rows")
    if "channel" in table.columns:
        channels = sorted(int(c) for c in table["channel"].dropna().unique())
        if channel is None and len(channels) > 1:
            raise SpotfitInputError(
                f"{where} holds channels {channels}; export one at a time with `channel=N`",
                parameter="channel"
            )
        if channel is not None:
            if channel not in channels:
                raise SpotfitInputError(f"{where} has no channel {channel} (it has {channels})",
                                        parameter="channel")
            table = table[table["channel"] == channel]
    elif channel is not None:
        raise SpotfitInputError(f"channel {channel} given but {where} has no channel column",
                                parameter="channel")
    if rows == "converged":
        table = table[table["status"] == "converged"]
    return table


def _unit(table, where: str) -> str:
    units = set(table["unit"].dropna().astype(str))
    if len(units) > 1:
        raise SpotfitInputError(f"{where}: mixed units {sorted(units)} in one table")
    return units.pop() if units else "photon"


# ----------------------------------------------------------------------------
# ThunderSTORM
# ----------------------------------------------------------------------------


def thunderstorm_table(table, pixel_size=None, z_step=None, rows="converged", channel=None,
                       where="table"):
    """The table in ThunderSTORM's CSV columns and conventions.

    Columns (ThunderSTORM's labels, ``name [unit]``): ``id`` (1-based row
    number), ``frame`` (1-based), ``x [nm]``, ``y [nm]`` (from the corner of
    the first pixel: ``(x + 0.5) * pixel_size``), ``z [nm]`` (z-stacks:
    ``z * z_step``, from the centre of the first plane), ``sigma [nm]``
    (``sqrt(sigma_x * sigma_y)``: the width ThunderSTORM's uncertainty
    formula uses for elliptical spots), ``sigma1 [nm]``, ``sigma2 [nm]``
    (only when some spot is not round), ``intensity [U]``, ``offset [U]``,
    ``bkgstd [U]`` (the Poisson noise of the fitted background,
    ``sqrt(offset)``, for photon tables; NaN for ADU tables), with ``U`` =
    ``photon`` or ``ADU`` (the table's ``unit``),
    ``uncertainty_xy [nm]`` (``sqrt((x_err^2 + y_err^2) / 2)``, the RMS of
    the two standard errors) and, for z-stacks, ``uncertainty_z [nm]``.

    Parameters
    ----------
    table : pandas.DataFrame
        A spotfit fit table.
    pixel_size : float, optional
        µm per pixel (default: from the table's ``x_um``).
    z_step : float, optional
        µm between planes, for z-stack tables (default: from ``z_um``).
    rows : {"converged", "all"}
    channel : int, optional
        Channel to export from a ``--channel all`` table.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    _check_fit_table(table, where)
    px_nm = 1000.0 * pixel_size_of(table, pixel_size, where)
    is_3d = "z" in table.columns
    dz_nm = 1000.0 * _z_step_of(table, z_step, where) if is_3d else None
    t = _select(table, rows, channel, where)
    unit = _unit(t, where)
    sx, sy = t["sigma_x"].to_numpy(float), t["sigma_y"].to_numpy(float)
    out = {
        "id": np.arange(1, len(t) + 1, dtype=np.int64),
        "frame": t["frame"].to_numpy(np.int64) + 1,
        "x [nm]": (t["x"].to_numpy(float) + 0.5) * px_nm,
        "y [nm]": (t["y"].to_numpy(float) + 0.5) * px_nm,
    }
    if is_3d:
        out["z [nm]"] = t["z"].to_numpy(float) * dz_nm
    out["sigma [nm]"] = np.sqrt(sx * sy) * px_nm
    if not np.allclose(sx, sy, equal_nan=True):
        out["sigma1 [nm]"] = sx * px_nm
        out["sigma2 [nm]"] = sy * px_nm
    offset = t["offset"].to_numpy(float)
    out[f"intensity [{unit}]"] = t["intensity"].to_numpy(float)
    out[f"offset [{unit}]"] = offset
    with np.errstate(invalid="ignore"):
        bkgstd = np.sqrt(np.maximum(offset, 0.0)) if unit == "photon" else np.full(len(t), np.nan)
    out[f"bkgstd [{unit}]"] = bkgstd
    ex, ey = t["x_err"].to_numpy(float), t["y_err"].to_numpy(float)
    out["uncertainty_xy [nm]"] = np.sqrt((ex ** 2 + ey ** 2) / 2.0) * px_nm
    if is_3d and "z_err" in t.columns:
        out["uncertainty_z [nm]"] = t["z_err"].to_numpy(float) * dz_nm
    frame = pd.DataFrame(out)
    return frame.replace([np.inf, -np.inf], np.nan)


def write_thunderstorm(table, path, pixel_size=None, z_step=None, rows="converged",
                       channel=None, where="table") -> list:
    """Write a ThunderSTORM CSV (see :func:`thunderstorm_table`); return ``[path]``.

    The layout is ThunderSTORM's own export: header labels in double quotes,
    comma separated, numbers unquoted with a point as decimal separator (8
    significant digits: 0.001 nm below 100 µm), NaN written ``NaN``.  Open it in ThunderSTORM with *Import results*
    (file format CSV).
    """
    import re

    from spotfit.table import to_csv_bytes

    ts = thunderstorm_table(table, pixel_size, z_step, rows, channel, where)
    header = (",".join(f'"{c}"' for c in ts.columns) + "\n").encode("utf-8")
    # spotfit's compiled renderer (8 significant digits, which Double.parseDouble
    # reads), without its header; its empty NaN fields become "NaN" (the first
    # column, id, is never empty)
    body = to_csv_bytes(ts).split(b"\n", 1)[1]
    body = re.sub(rb"(?<=,)(?=,|\n)", b"NaN", body)
    out = os.fspath(path)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header + body)
    return [out]


# ----------------------------------------------------------------------------
# Picasso
# ----------------------------------------------------------------------------


def picasso_locs(table, z_step=None, rows="converged", channel=None,
                 where="table") -> np.ndarray:
    """The table as Picasso's ``locs`` structured array (its field names and dtypes).

    Fields: ``frame`` (uint32, 0-based), ``x``, ``y`` (float32 px, 0-based
    pixel centres as in spotfit), ``photons`` (intensity), ``sx``, ``sy``
    (px), ``bg`` (offset per pixel), ``lpx``, ``lpy`` (``x_err``, ``y_err``
    in px), ``ellipticity`` (``(max - min) / max`` of sx, sy),
    ``net_gradient`` (Picasso's detection score; here the intensity's
    signal-to-noise ``intensity / intensity_err``), for z-stacks ``z`` (nm,
    ``z * z_step``), for the rotated model ``angle`` (degrees, the sx axis
    from +x towards +y, the convention of Picasso's rotated Gaussian), then
    ``photons_unc``, ``bg_unc``, ``sx_unc``, ``sy_unc`` (standard errors,
    Picasso's names for them) and ``iterations`` (int32).  All float32, as
    Picasso writes them.
    """
    _check_fit_table(table, where)
    t = _select(table, rows, channel, where)
    t = t.sort_values("frame", kind="stable")
    is_3d = "z" in t.columns
    rotated = ("angle" in t.columns and "angle_err" in t.columns
               and np.isfinite(t["angle_err"].to_numpy(float)).any())
    sx, sy = t["sigma_x"].to_numpy(float), t["sigma_y"].to_numpy(float)
    snr = np.full(len(t), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ellipticity = (np.maximum(sx, sy) - np.minimum(sx, sy)) / np.maximum(sx, sy)
        if "intensity_err" in t.columns:
            snr = t["intensity"].to_numpy(float) / t["intensity_err"].to_numpy(float)
    fields = [
        ("frame", "u4", t["frame"].to_numpy(np.int64)),
        ("x", "f4", t["x"]), ("y", "f4", t["y"]),
        ("photons", "f4", t["intensity"]),
        ("sx", "f4", sx), ("sy", "f4", sy),
        ("bg", "f4", t["offset"]),
        ("lpx", "f4", t["x_err"]), ("lpy", "f4", t["y_err"]),
        ("ellipticity", "f4", ellipticity),
        ("net_gradient", "f4", snr),
    ]
    if is_3d:
        dz_nm = 1000.0 * _z_step_of(table, z_step, where)
        fields.append(("z", "f4", t["z"].to_numpy(float) * dz_nm))
    if rotated:
        fields.append(("angle", "f4", np.rad2deg(t["angle"].to_numpy(float))))
    for name, column in (("photons_unc", "intensity_err"), ("bg_unc", "offset_err"),
                         ("sx_unc", "sigma_x_err"), ("sy_unc", "sigma_y_err")):
        if column in t.columns:
            fields.append((name, "f4", t[column]))
    if "iterations" in t.columns:
        fields.append(("iterations", "i4", t["iterations"]))
    locs = np.empty(len(t), dtype=[(name, dtype) for name, dtype, _ in fields])
    for name, dtype, values in fields:
        if dtype == "u4":
            locs[name] = np.asarray(values, dtype=np.uint32)
        else:
            locs[name] = np.asarray(values, dtype=float).astype(dtype)
    return locs


def picasso_info(width: int, height: int, frames: int, pixel_size: float, unit: str,
                 source: str | None = None, dtype: str | None = None,
                 rows: str = "converged") -> list:
    """The metadata documents of Picasso's ``.yaml`` sidecar (a list of dicts).

    The first describes the movie (``Width``, ``Height``, ``Frames`` -- which
    Picasso requires -- ``Byte Order``, ``Data Type``, ``File``), the second
    the localization step (``Pixelsize`` in nm, which Picasso Render uses,
    and how spotfit made the file).
    """
    movie = {
        "Byte Order": "<",
        "Data Type": str(dtype or "uint16"),
        "File": str(source) if source else "",
        "Frames": int(frames),
        "Height": int(height),
        "Width": int(width),
    }
    from spotfit import __version__

    localize = {
        "Generated by": f"spotfit {__version__} (spotfit export --format picasso)",
        "Pixelsize": float(pixel_size) * 1000.0,
        "spotfit rows": rows,
        "spotfit intensity unit": unit,
        "spotfit note": "x, y: 0-based pixel centres (Picasso's convention); "
        "lpx, lpy: standard errors; net_gradient: intensity / intensity_err",
    }
    return [movie, localize]


def write_picasso(table, path, width: int | None = None, height: int | None = None,
                  frames: int | None = None, pixel_size=None, z_step=None, rows="converged",
                  channel=None, source=None, dtype=None, where="table") -> list:
    """Write Picasso's HDF5 ``locs`` file and its YAML sidecar; return both paths.

    The HDF5 file holds the dataset ``locs`` (:func:`picasso_locs`) and,
    like Picasso >= 0.11 writes it, the metadata as JSON in ``metadata``;
    ``<stem>.yaml`` beside it holds the same metadata for Picasso Render
    and older Picassos (:func:`picasso_info`).  Both files are written
    as one (:func:`spotfit._atomic.atomic_group`): both replaced, or neither.

    Parameters
    ----------
    width, height : int
        Image size in pixels (x, y): Picasso requires them.
    frames : int
        Number of frames of the movie.
    """
    out = os.fspath(path)
    if not out.lower().endswith((".hdf5", ".h5")):
        raise SpotfitInputError(f"{out}: a Picasso file must end in .hdf5")
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if value is None:
            raise SpotfitInputError(
                f"{where}: Picasso needs the image size: give the `image` the table was "
                "fitted from, or `width`, `height` and `frames`", parameter=name
            )
        if int(value) < 1:
            raise SpotfitInputError(f"{name} must be >= 1, got {value!r}", parameter=name)
    px = pixel_size_of(table, pixel_size, where)
    locs = picasso_locs(table, z_step, rows, channel, where)
    h5py = _require("h5py", "Picasso", "export")  # after the checks: they need no extra
    yaml = _require("yaml", "Picasso", "export")
    unit = _unit(table, where) if len(table) else "photon"
    info = picasso_info(width, height, frames, px, unit, source, dtype, rows)
    yaml_path = os.path.splitext(out)[0] + ".yaml"
    # one group, the YAML (what Picasso Render opens) last: never a new HDF5
    # file beside an old YAML or the reverse
    with atomic_group([out, yaml_path]) as (tmp_h5, tmp_yaml):
        with h5py.File(tmp_h5, "w") as fh:
            fh.create_dataset("locs", data=locs)
            fh.create_dataset("metadata", data=json.dumps(info))
        with open(tmp_yaml, "w", encoding="utf-8") as fh:
            yaml.safe_dump_all(info, fh, default_flow_style=False)
    return [out, yaml_path]


# ----------------------------------------------------------------------------
# Parquet and CSV
# ----------------------------------------------------------------------------


def write_parquet(table, path, metadata: dict | None = None) -> list:
    """Write the whole table (every row and column) as Parquet; return ``[path]``.

    `metadata` (JSON-serialisable) is stored in the file's key-value
    metadata under ``spotfit``; pandas and pyarrow read the table back
    unchanged (``pandas.read_parquet``).
    """
    pa = _require("pyarrow", "Parquet", "export")
    import pyarrow.parquet as pq

    out = os.fspath(path)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if metadata:
        merged = dict(arrow.schema.metadata or {})
        merged[b"spotfit"] = json.dumps(metadata).encode()
        arrow = arrow.replace_schema_metadata(merged)
    with atomic_path(out) as tmp:
        pq.write_table(arrow, tmp)
    return [out]


def write_csv(table, path) -> list:
    """Write the table as spotfit's CSV (:func:`spotfit.table.write_table`); return ``[path]``."""
    from spotfit.table import write_table

    write_table(table, path)
    return [os.fspath(path)]


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def default_output(table_path, fmt: str) -> str:
    """``<dir>/<stem><suffix>`` for a table path and a format (see :data:`SUFFIXES`)."""
    stem = os.path.splitext(os.fspath(table_path))[0]
    return stem + SUFFIXES[fmt]


def export(table, path, fmt: str, *, pixel_size=None, z_step=None, rows=None, channel=None,
           width=None, height=None, frames=None, source=None, dtype=None,
           where="table", image=None, axes=None) -> list:
    """Write `table` to `path` in format `fmt`; return the paths written.

    Parameters
    ----------
    table : pandas.DataFrame
        A spotfit fit table (:func:`spotfit.fit`, or :func:`read_table`).
    path : str or os.PathLike
    fmt : {"csv", "thunderstorm", "picasso", "parquet"}
    pixel_size, z_step : float, optional
        µm per pixel and between planes (ThunderSTORM, Picasso); default:
        from the table's ``x_um`` (``z_um``) columns.
    rows : {"converged", "all"}, optional
        Default ``"converged"`` for ThunderSTORM and Picasso; CSV and
        Parquet always keep every row.
    channel : int, optional
        One channel of a ``--channel all`` table (ThunderSTORM, Picasso).
    width, height, frames : int, optional
        Image size, needed by Picasso.
    source, dtype : str, optional
        Image file and pixel type, recorded in Picasso's metadata.
    image : str or os.PathLike, optional
        The image the table was fitted from (`axes` as for
        :func:`spotfit.read_image`): its header gives `width`, `height`,
        `frames`, `source`, `dtype` and, for a table without ``x_um``,
        `pixel_size`, where they are not given (:func:`image_info`).

    Raises
    ------
    SpotfitInputError
        Unknown format, missing pixel size or image size, missing optional
        package (naming the extra), unwritable path.
    """
    if fmt not in FORMATS:
        raise SpotfitInputError(f"fmt {fmt!r} is unknown; choose one of {', '.join(FORMATS)}",
                                parameter="fmt")
    if image is not None:
        info = image_info(image, axes)
        width, height, frames = (v if v is not None else info[k] for k, v in (
            ("width", width), ("height", height), ("frames", frames)))
        source, dtype = source or info["source"], dtype or info["dtype"]
        if pixel_size is None and "x_um" not in table.columns:
            pixel_size = info["pixel_size"]
    if fmt in ("csv", "parquet"):
        if rows not in (None, "all") or channel is not None:
            raise SpotfitInputError(
                f"fmt {fmt} keeps every row and channel (filter with pandas instead)",
                parameter="fmt"
            )
        if fmt == "csv":
            return write_csv(table, path)
        meta = {"pixel_size_um": pixel_size, "source": source}
        return write_parquet(table, path, {k: v for k, v in meta.items() if v is not None})
    rows = rows or "converged"
    if fmt == "thunderstorm":
        return write_thunderstorm(table, path, pixel_size, z_step, rows, channel, where)
    return write_picasso(table, path, width, height, frames, pixel_size, z_step, rows, channel,
                         source, dtype, where)


def image_info(path, axes: str | None = None) -> dict:
    """Size of the image a table was fitted from: ``width``, ``height``, ``frames``, ...

    Reads the file's header (:func:`spotfit.io.read_image`; for a file with
    several channels, channel 0: the size is the same for all).

    Returns
    -------
    dict
        ``width``, ``height`` (px), ``frames``, ``dtype``, ``source`` (the
        path) and ``pixel_size`` (µm, or None).
    """
    from spotfit.io import read_image

    where = os.fspath(path)
    try:
        img = read_image(where, axes=axes)
    except SpotfitInputError as exc:
        if "channel" not in str(exc):
            raise
        img = read_image(where, axes=axes, channel=0)
    with img:
        shape = tuple(int(n) for n in img.data.shape)
        return {"width": shape[-1], "height": shape[-2], "frames": shape[0],
                "dtype": str(img.dtype), "source": os.path.abspath(where),
                "pixel_size": img.pixel_size}


def sidecar_info(table_path) -> dict:
    """What the JSON sidecar beside a table (``<stem>.json``) says about its image.

    Returns
    -------
    dict
        Like :func:`image_info` (``pixel_size`` from the sidecar's
        ``pixel_size_um``); empty when there is no readable sidecar.
    """
    where = os.path.splitext(os.fspath(table_path))[0] + ".json"
    try:
        with open(where, encoding="utf-8") as fh:
            doc = json.load(fh)
        shape = [int(n) for n in doc["input"]["shape"]]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"width": shape[-1], "height": shape[-2], "frames": shape[0],
            "dtype": doc["input"].get("dtype"), "source": doc["input"].get("path"),
            "pixel_size": doc.get("pixel_size_um")}


def _require(module: str, what: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = {"yaml": "pyyaml"}.get(module, module)
        raise SpotfitInputError(
            f"writing {what} files needs the optional package {package!r}: "
            f"pip install 'spotfit[{extra}]'"
        ) from exc
