"""Provenance: the JSON sidecar that says how a table was made, written with it, read back as --config.

Every table ``spotfit fit``/``detect`` writes to a file (``--out FILE.csv``,
or ``<out-dir>/<stem>.csv`` in a batch) gets a sidecar ``<stem>.json``
beside it (:func:`sidecar_path`):

* :func:`parameters`: every parameter that determines the table, as the
  user gave it (None: the default) -- what ``--config`` reads back
  (:func:`load_config`) and what ``--skip-existing`` compares
  (:func:`up_to_date`);
* :func:`document`: the whole sidecar: the input file (size, modification
  time, axes, notes), the output, the parameters, the values actually used
  (``resolved``, no None for a default), counts, timings, the run;
* :func:`write_with_sidecar`: the CSV (and its QC picture) and the sidecar
  as one group (:func:`spotfit._atomic.atomic_group`): both are replaced or
  neither, and a sidecar never stands beside a table it does not describe.

Standard library only at import time (with :mod:`spotfit.config`, which is
too): batch worker processes import this before numpy.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone

from spotfit.config import option_metadata
from spotfit.errors import SpotfitInputError

__all__ = [
    "CONFIG_KEYS", "SIDECAR_VERSION", "document", "input_stat", "load_config", "parameters",
    "sidecar_path", "up_to_date", "write_with_sidecar",
]

#: Format version of the JSON sidecar.
SIDECAR_VERSION = 1

#: Type of each parameter a ``--config`` file may set, by command-line option
#: name with ``_``: how to read the image, every FitConfig field (from its
#: metadata), the camera.  Keys of FitConfig and Camera are accepted inside
#: the sidecar's ``config`` and ``camera`` sections.
_KINDS = {"axes": "str", "channel": "channel", "invert": "flag", "series": "whole",
          "pixel_size": "real", "z_step": "real"}
_KINDS.update({name: "str" if meta["kind"] == "choice" else meta["kind"]
               for name, meta in option_metadata().items()})
_KINDS.update({"baseline": "real", "gain": "real", "em_gain": "real", "read_noise": "real"})

#: Parameter names a ``--config`` file may set.
CONFIG_KEYS = tuple(_KINDS)

#: Keys of the sidecar's ``parameters`` sections that spotfit writes but
#: that are not options (accepted and ignored in a ``--config`` file).
_WRITTEN_ONLY = {"camera": ("unit",), "parameters": ("task", "command")}


def sidecar_path(table_path) -> str:
    """``<stem>.json`` beside a table ``<stem>.csv`` (any suffix is replaced)."""
    return os.path.splitext(os.fspath(table_path))[0] + ".json"


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------
def parameters(task, config, camera, axes=None, channel=None, pixel_size=None, z_step=None,
               workers=None, invert=False, series=None) -> dict:
    """Every parameter that determines a table, as the user gave it (None: the default).

    ``config`` holds every :class:`~spotfit.config.FitConfig` field
    (``workers``: the ``--workers`` value), ``camera``
    :meth:`~spotfit.camera.Camera.as_dict`; ``axes``, ``channel``,
    ``pixel_size`` and ``z_step`` are the user's overrides (None: from the
    file), ``series`` the image series (only recorded when given).  This is
    also the format :func:`load_config` reads; the values actually used are
    the sidecar's ``resolved`` section (:func:`document`).
    """
    config_dict = dict(config.as_dict())
    config_dict["workers"] = workers
    params = {
        "task": task,
        "axes": axes,
        "channel": channel,
        "invert": bool(invert),
        "pixel_size": pixel_size,
        "z_step": z_step,
        "config": config_dict,
        "camera": camera.as_dict(),
    }
    if series is not None:
        params["series"] = series
    return params


def comparable(params) -> str:
    """Parameters as canonical JSON, without settings that do not change results."""
    p = json.loads(json.dumps(params))
    if isinstance(p.get("config"), dict):
        p["config"].pop("workers", None)
    return json.dumps(p, sort_keys=True)


def load_config(path, allowed=None) -> dict:
    """Parameters of a sidecar or plain JSON file, by command-line option name.

    Parameters
    ----------
    path : str or os.PathLike
        A sidecar written by ``spotfit fit``/``detect`` (its ``parameters``
        section is used), or a JSON object with the same keys (``config``,
        ``camera``, ``axes``, ...) or flat option names (``{"sigma": 1.5,
        "gain": 2, "estimator": "mle"}``; ``-`` or ``_``, leading ``--``
        allowed).
    allowed : collection of str, optional
        Option names of the command that will use them: other known
        parameters (e.g. fit options for ``detect``) are left out.

    Returns
    -------
    dict
        Option name -> value; parameters recorded as None (the default)
        are left out.

    Raises
    ------
    SpotfitInputError
        For an unreadable or invalid file, unknown parameter names, or
        per-pixel camera maps (not expressible as options).
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise SpotfitInputError(f"{where}: no such file (`config`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotfitInputError(f"{where}: cannot read `config` file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SpotfitInputError(f"{where}: `config` file is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise SpotfitInputError(f"{where}: `config` file must hold a JSON object")
    params = doc.get("parameters", doc)
    if not isinstance(params, dict):
        raise SpotfitInputError(f"{where}: 'parameters' must be a JSON object")

    flat, unknown, bad = {}, [], []

    def take(key, value, section):
        name = str(key).lstrip("-").replace("-", "_")
        if name in CONFIG_KEYS:
            if isinstance(value, str) and value.startswith("map("):
                raise SpotfitInputError(
                    f"{where}: {name} is a per-pixel map ({value}); a `config` file can "
                    "only give single values"
                )
            problem = _type_problem(name, value)
            if problem:
                bad.append(f"{key}: {problem}, not {json.dumps(value)}")
            flat[name] = value
        elif str(key) not in _WRITTEN_ONLY.get(section, ()):
            unknown.append(str(key) if section == "parameters" else f"{section}.{key}")

    for key, value in params.items():
        if key in ("config", "camera"):
            if not isinstance(value, dict):
                raise SpotfitInputError(f"{where}: '{key}' in `config` must be a JSON object")
            for k, v in value.items():
                take(k, v, key)
        else:
            take(key, value, "parameters")
    if unknown:
        raise SpotfitInputError(
            f"{where}: unknown parameter(s) {', '.join(sorted(unknown))} in `config` "
            f"(known: {', '.join(CONFIG_KEYS)})"
        )
    if bad:
        raise SpotfitInputError(f"{where}: invalid value(s) in `config`: {'; '.join(bad)}")
    return {
        k: v for k, v in flat.items()
        if v is not None and (allowed is None or k in allowed)
    }


def _type_problem(name: str, value) -> str:
    """Why `value` cannot be parameter `name` ('' if it can); JSON types, no coercion."""
    if value is None:
        return ""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    kind = _KINDS[name]
    if kind == "channel":
        return "" if is_int or value == "all" else "must be a whole number or \"all\""
    if kind == "whole":
        return "" if is_int else "must be a whole number"
    if kind == "flag":
        return "" if isinstance(value, bool) else "must be true or false"
    if kind == "str":
        return "" if isinstance(value, str) else "must be a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    return ""


# ---------------------------------------------------------------------------
# The sidecar
# ---------------------------------------------------------------------------
def input_stat(path: str) -> os.stat_result:
    """The input's ``stat``, taken before it is read (the sidecar describes what was read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpotfitInputError(f"{path}: no such file") from None
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m))
                                       for m in (".zgroup", ".zarray", "zarr.json")):
        raise SpotfitInputError(f"{path}: is a directory, not an image file")
    return st  # a Zarr folder: the folder's own stat (its metadata file changes with it)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _json_text(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=True) + "\n"


def document(task, path, st, table, info: dict, params: dict, table_path, table_bytes: int,
             timings: dict, run: dict) -> dict:
    """The sidecar of one table.

    Parameters
    ----------
    task : {"fit", "detect"}
    path : str
        The input image.
    st : os.stat_result
        Its :func:`input_stat`, taken before reading it.
    table : pandas.DataFrame or spotfit.lighttable.LightTable
    info : dict
        What :func:`spotfit.api.process_file` says about the image.
    params : dict
        :func:`parameters`.
    table_path : str
        Where the table is written; ``table_bytes`` its size.
    timings : dict
        Seconds per step (``read``, ``fit``/``detect``, ``write``, ``total``).
    run : dict
        How it was run (``workers``, ``processes``, ``solver_threads``).
    """
    import numpy as np

    from spotfit import __version__

    if "status" in table.columns:  # (a DataFrame or a LightTable: no pandas needed)
        names, n = np.unique(table["status"].to_numpy().astype(str), return_counts=True)
        counts = {str(k): int(v) for k, v in zip(names, n)}
    else:
        counts = None
    return {
        "spotfit_version": __version__,
        "sidecar_version": SIDECAR_VERSION,
        "command": task,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "path": os.path.abspath(path),
            "size_bytes": st.st_size,
            "mtime": _iso(st.st_mtime),
            "mtime_ns": st.st_mtime_ns,
            "shape": info["shape"],
            "axes": info["axes"],
            "source_axes": info["source_axes"],
            "dtype": info["dtype"],
            "frames": info["frames"],
            "channels": info["channels"],
            "notes": info["notes"],
        },
        "output": {
            "path": os.path.abspath(table_path),
            "rows": int(len(table)),
            "size_bytes": int(table_bytes),
        },
        "parameters": params,
        "resolved": info["resolved"],
        "pixel_size_um": info["pixel_size_um"],
        "pixel_size_from": info["pixel_size_from"],
        "z_step_um": info["z_step_um"],
        "z_step_from": info["z_step_from"],
        "n_spots": int(len(table)),
        "status_counts": counts,
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
        "run": dict(run, python=platform.python_version(), platform=sys.platform),
    }


def write_with_sidecar(table, table_path, sidecar, describe, picture=None) -> int:
    """Write `table` as CSV, its picture and its sidecar as one group; the CSV's size.

    Parameters
    ----------
    table : pandas.DataFrame or spotfit.lighttable.LightTable
    table_path, sidecar : str
        The CSV and the sidecar (written last: see :func:`spotfit._atomic.atomic_group`).
    describe : callable
        ``describe(table_bytes)`` -> the sidecar document (:func:`document`),
        called once the CSV is rendered (so its size and timings are known).
    picture : (str, callable), optional
        A QC picture's path and ``draw(path)`` writing it, replaced with the
        others.

    Raises
    ------
    SpotfitInputError
        When an output cannot be written; none of them was changed.
    """
    from spotfit._atomic import atomic_group
    from spotfit.table import to_csv_bytes, write_csv_bytes

    data = to_csv_bytes(table)
    outputs = [table_path] + ([picture[0]] if picture else []) + [sidecar]
    with atomic_group(outputs) as temporaries:
        write_csv_bytes(temporaries[0], data)
        if picture:
            picture[1](temporaries[1])
        doc = describe(len(data))
        with open(temporaries[-1], "w", encoding="utf-8") as fh:
            fh.write(_json_text(doc))
    return len(data)


def up_to_date(sidecar, path, table_path, params):
    """The sidecar's spot count if its table is complete and current, else None.

    Current: the sidecar records the input's present size and modification
    time and the same parameters (``workers`` aside), and the table still
    has the size the sidecar records.
    """
    try:
        with open(sidecar, encoding="utf-8") as fh:
            doc = json.load(fh)
        st = os.stat(path)
        size = os.path.getsize(table_path)
        same = (
            doc["input"]["size_bytes"] == st.st_size
            and doc["input"]["mtime_ns"] == st.st_mtime_ns
            and doc["output"]["size_bytes"] == size
            and comparable(doc["parameters"]) == comparable(params)
        )
        return int(doc.get("n_spots", 0)) if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
