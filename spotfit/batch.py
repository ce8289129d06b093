"""Whole experiments: many TIFF files in one run, one CSV and one JSON sidecar each.

:func:`run_batch` is what ``spotfit fit IMAGE... --out-dir DIR`` and
``spotfit detect IMAGE... --out-dir DIR`` run; :func:`process_file` is the
per-file step shared with the single-file command line (read, detect or fit,
add µm columns), so one file gives the same table either way.

* Inputs are files, folders (their ``*.tif`` / ``*.tiff`` files and the
  other image files of :data:`IMAGE_SUFFIXES`, not
  recursive, sorted by name, hidden files skipped) and glob patterns the
  shell did not expand (``"data/*.tif"``).  Each input ``<stem>.tif`` gives
  ``<out_dir>/<stem>.csv`` and the provenance sidecar ``<out_dir>/<stem>.json``;
  two inputs with the same stem are refused before any work.
* Files are processed in parallel by ``workers`` processes (``spawn``
  start method, at most one per core and per file), each connected to this
  process by its own pipe; each fits with one solver thread, so cores are
  not oversubscribed.  With one worker (or one file) everything runs in
  this process.  Tables do not depend on the number of workers.
* A problem with one file (a :class:`~spotfit.errors.SpotfitInputError` or
  ``OSError``: corrupt, empty, unsupported pixel type, ...) is recorded and
  the other files still run; unexpected errors are recorded too, as such.
  A worker process that dies (killed, out of memory, a crash in a library)
  fails only the file it was processing: a new worker takes its place and
  the batch goes on.  Warnings of a file are returned with its result.
* Interruption (Ctrl-C, or SIGTERM where the caller turns it into
  :class:`spotfit.errors.Terminated`, as the command line does) stops the
  workers: they remove their temporary files and exit; finished outputs
  stay, no partial output is left.  Workers also stop when this process
  dies (Linux: parent-death signal).
* The CSV and its sidecar are written as a pair
  (:func:`spotfit._atomic.atomic_group`): both are replaced, or neither (a
  failure, e.g. a full disk while writing the sidecar, keeps the old pair),
  and a sidecar never stands beside a CSV it does not describe.
  ``skip_existing`` skips inputs whose CSV and sidecar exist and whose
  sidecar records the same input size, modification time and parameters.

This module imports only the standard library at import time (worker
processes set their thread limits before numpy is loaded).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from spotfit.errors import SpotfitInputError, SpotfitWarning, Terminated

__all__ = [
    "BatchSummary", "FileResult", "TASKS", "expand_inputs", "load_config", "parameters",
    "process_file", "run_batch",
]

#: What a batch can do to each file.
TASKS = ("fit", "detect")

#: File name endings (any case) taken from folders: TIFF and the formats of
#: :mod:`spotfit.readers` (PNG, JPEG, ..., ND2, CZI, LIF).
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm",
    ".nd2", ".czi", ".lif",
)

#: Format version of the JSON sidecar.
SIDECAR_VERSION = 1

#: Parameter names a ``--config`` file may set (command-line option names
#: with ``_``); keys of FitConfig and Camera are accepted inside the
#: sidecar's ``config`` and ``camera`` sections.
CONFIG_KEYS = (
    "axes", "channel", "invert", "series", "pixel_size", "z_step", "workers",
    "sigma", "sigma_z", "threshold", "min_distance", "window", "model", "estimator",
    "integrated", "fix_sigma", "select_model", "max_iter", "min_snr", "crowded", "group_radius",
    "max_group", "baseline", "gain", "em_gain", "read_noise",
)

#: Value types of the ``--config`` parameters (None is always allowed: the default).
_INT_KEYS = ("series", "workers", "min_distance", "window", "max_iter", "max_group")
_BOOL_KEYS = ("invert", "integrated", "fix_sigma", "select_model", "crowded")
_STR_KEYS = ("axes", "model", "estimator")
_NUMBER_KEYS = tuple(
    k for k in CONFIG_KEYS if k not in _INT_KEYS + _BOOL_KEYS + _STR_KEYS + ("channel",)
)

#: Keys of the sidecar's ``parameters`` sections that spotfit writes but
#: that are not options (accepted and ignored in a ``--config`` file).
_WRITTEN_ONLY = {"camera": ("unit",), "parameters": ("task", "command")}

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "NUMBA_NUM_THREADS")
_REPORT_INTERVAL = 0.25  # s between progress messages of one worker


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FileResult:
    """Outcome of one input file.

    Attributes
    ----------
    input : str
        The input path as given (or as found in a folder).
    output : str
        The CSV path.
    status : {"ok", "failed", "skipped"}
    message : str
        Why it failed (empty otherwise); does not repeat `input`.
    n_spots : int
        Rows written (ok), or recorded in the sidecar (skipped).
    seconds : float
        Processing time of this file.
    warnings : tuple of str
        Distinct warnings raised while processing it (one line each).
    """

    input: str
    output: str
    status: str
    message: str = ""
    n_spots: int = 0
    seconds: float = 0.0
    warnings: tuple = ()


@dataclass
class BatchSummary:
    """Per-file results of :func:`run_batch`, in input order, and totals."""

    results: list = field(default_factory=list)
    seconds: float = 0.0

    def _with(self, status):
        return [r for r in self.results if r.status == status]

    @property
    def ok(self) -> list:
        return self._with("ok")

    @property
    def failed(self) -> list:
        return self._with("failed")

    @property
    def skipped(self) -> list:
        return self._with("skipped")

    @property
    def n_spots(self) -> int:
        """Spots written in this run (skipped files not counted)."""
        return sum(r.n_spots for r in self.ok)

    def line(self) -> str:
        """``N files: A ok, B failed, C skipped; S spots in T s``."""
        return (
            f"{len(self.results)} files: {len(self.ok)} ok, {len(self.failed)} failed, "
            f"{len(self.skipped)} skipped; {self.n_spots} spots in {self.seconds:.1f} s"
        )


# ---------------------------------------------------------------------------
# Inputs, outputs, parameters
# ---------------------------------------------------------------------------
def _is_pattern(path: str) -> bool:
    return not os.path.exists(path) and any(c in path for c in "*?[")


def _folder_tiffs(folder: str) -> list:
    names = sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
    )
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def expand_inputs(inputs) -> list:
    """Files to process, in order: files as given, folders and patterns expanded.

    Parameters
    ----------
    inputs : iterable of str or os.PathLike
        Files (kept even if missing or not TIFF: they are reported as
        failures), folders (their ``*.tif``/``*.tiff`` files and other
        images of :data:`IMAGE_SUFFIXES`, ``*.png`` ..., any case, not
        recursive, sorted, hidden files skipped) and glob patterns not
        expanded by the shell (sorted matches; a pattern matching nothing is
        kept, and reported as a missing file).

    Returns
    -------
    list of str
        Without repeats of the same file.

    Raises
    ------
    SpotfitInputError
        When a folder cannot be listed.
    """
    files, seen = [], set()
    for item in inputs:
        path = os.fspath(item)
        if os.path.isdir(path):
            try:
                found = _folder_tiffs(path)
            except OSError as exc:
                raise SpotfitInputError(
                    f"{path}: cannot list folder ({exc.strerror or exc})"
                ) from exc
        elif _is_pattern(path):
            found = sorted(p for p in glob.glob(path) if not os.path.isdir(p)) or [path]
        else:
            found = [path]
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def output_paths(files, out_dir) -> list:
    """``(csv, sidecar)`` paths in `out_dir` for each file; refuse name clashes.

    Raises
    ------
    SpotfitInputError
        If two inputs have the same stem (``a/x.tif`` and ``b/x.tif``, or
        ``x.tif`` and ``x.tiff``): they would write the same output; or if
        an output would overwrite an input.
    """
    out_dir = os.fspath(out_dir)
    by_stem: dict = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        by_stem.setdefault(stem, []).append(f)
    clashes = {s: fs for s, fs in by_stem.items() if len(fs) > 1}
    if clashes:
        stem, fs = next(iter(clashes.items()))
        more = f" (and {len(clashes) - 1} more name clash(es))" if len(clashes) > 1 else ""
        raise SpotfitInputError(
            f"{' and '.join(fs)} would all write {os.path.join(out_dir, stem + '.csv')}{more}; "
            "process them into different --out-dir folders, or rename them"
        )
    paths = []
    inputs = {os.path.realpath(f): f for f in files}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        pair = (os.path.join(out_dir, stem + ".csv"), os.path.join(out_dir, stem + ".json"))
        for out in pair:
            if os.path.realpath(out) in inputs:
                raise SpotfitInputError(
                    f"{out}: output would overwrite the input file "
                    f"{inputs[os.path.realpath(out)]}; choose another --out-dir"
                )
        paths.append(pair)
    return paths


def parameters(task, config, camera, axes=None, channel=None, pixel_size=None, z_step=None,
               workers=None, invert=False, series=None) -> dict:
    """Every parameter that determines a table, as the sidecar records it.

    ``config`` holds every :class:`~spotfit.config.FitConfig` field
    (``workers``: the ``--workers`` value), ``camera``
    :meth:`~spotfit.camera.Camera.as_dict`; ``axes``, ``channel``,
    ``pixel_size`` and ``z_step`` are the user's overrides (None: from the
    file), ``series`` the image series (only recorded when given).  This is
    also the format :func:`load_config` reads.
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


def _comparable(params) -> str:
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
        A sidecar written by :func:`run_batch` (its ``parameters`` section
        is used), or a JSON object with the same keys (``config``,
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
        raise SpotfitInputError(f"{where}: no such file (--config)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotfitInputError(f"{where}: cannot read --config file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SpotfitInputError(f"{where}: --config file is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise SpotfitInputError(f"{where}: --config file must hold a JSON object")
    params = doc.get("parameters", doc)
    if not isinstance(params, dict):
        raise SpotfitInputError(f"{where}: 'parameters' must be a JSON object")

    flat, unknown, bad = {}, [], []

    def take(key, value, section):
        name = str(key).lstrip("-").replace("-", "_")
        if name in CONFIG_KEYS:
            if isinstance(value, str) and value.startswith("map("):
                raise SpotfitInputError(
                    f"{where}: {name} is a per-pixel map ({value}); a --config file can "
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
                raise SpotfitInputError(f"{where}: '{key}' in --config must be a JSON object")
            for k, v in value.items():
                take(k, v, key)
        else:
            take(key, value, "parameters")
    if unknown:
        raise SpotfitInputError(
            f"{where}: unknown parameter(s) {', '.join(sorted(unknown))} in --config "
            f"(known: {', '.join(CONFIG_KEYS)})"
        )
    if bad:
        raise SpotfitInputError(f"{where}: invalid value(s) in --config: {'; '.join(bad)}")
    return {
        k: v for k, v in flat.items()
        if v is not None and (allowed is None or k in allowed)
    }


def _type_problem(name: str, value) -> str:
    """Why `value` cannot be parameter `name` ('' if it can); JSON types, no coercion."""
    if value is None:
        return ""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name == "channel":
        return "" if is_int or value == "all" else "must be a whole number or \"all\""
    if name in _INT_KEYS:
        return "" if is_int else "must be a whole number"
    if name in _BOOL_KEYS:
        return "" if isinstance(value, bool) else "must be true or false"
    if name in _STR_KEYS:
        return "" if isinstance(value, str) else "must be a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    return ""


# ---------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _reporting_image_class():
    from spotfit.io import Image

    class _ReportingImage(Image):
        """An Image whose frames() calls ``self._on_frame()`` after each frame."""

        def frames(self):
            for t, frame in Image.frames(self):
                yield t, frame
                self._on_frame()

    return _ReportingImage


def _reporting(img, on_frame):
    if on_frame is None:
        return img
    cls = _reporting_image_class()
    new = cls(**{f.name: getattr(img, f.name) for f in dataclasses.fields(img)})
    object.__setattr__(new, "_on_frame", on_frame)
    return new




def process_file(path, task="fit", config=None, camera=None, axes=None, channel=None,
                 pixel_size=None, z_step=None, on_frame=None, on_image=None, invert=False,
                 series=None):
    """Read one TIFF, detect or fit every frame; return the table and a description.

    Parameters
    ----------
    path : str or os.PathLike
    task : {"fit", "detect"}
    config : FitConfig, optional
    camera : Camera, optional
    axes : str, optional
        Override of the stored axes (``--axes``).
    channel : int or "all", optional
        One channel, or ``"all"``: every channel in turn, with a ``channel``
        column (0-based) after ``frame`` (0 for a file without channels).
    pixel_size, z_step : float, optional
        µm per pixel and between planes, overriding the file's metadata;
        with a known pixel size the table gets ``x_um``, ``y_um`` (``z_um``)
        columns (:func:`spotfit.table.add_physical_units`).
    on_frame : callable, optional
        Called after each frame is processed.
    on_image : callable, optional
        Called with the number of frames of each image once it is opened.
    invert : bool
        Dark objects on a light background: process the inverted image
        (:mod:`spotfit.invert`); refused with a calibrated camera.
    series : int, optional
        Image series of a file that holds several (``--series``).

    Returns
    -------
    table : pandas.DataFrame
    info : dict
        ``shape``, ``axes``, ``source_axes``, ``dtype``, ``frames``,
        ``channels``, ``pixel_size_um``/``z_step_um`` used (and whether from
        the ``option`` or the file's ``metadata``), and ``timings_s``
        (``read`` and ``fit``/``detect`` seconds).

    Raises
    ------
    SpotfitInputError
        For bad files and options (the message names the file).
    """
    import numpy as np
    import pandas as pd

    from spotfit.camera import Camera
    from spotfit.config import FitConfig
    from spotfit.io import count_channels, read_image
    from spotfit.table import add_physical_units

    if task not in TASKS:
        raise SpotfitInputError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    config = config or FitConfig()
    camera = camera or Camera()
    if invert:
        from spotfit.invert import check_camera

        check_camera(camera)
    where = os.fspath(path)
    timings = {"read": 0.0, task: 0.0}

    if channel == "all":
        start = time.perf_counter()
        n_channels = count_channels(where, axes, series=series)
        timings["read"] += time.perf_counter() - start
        channels = list(range(n_channels)) if n_channels > 1 else [None]
    else:
        channels = [channel]

    tables, info = [], {}
    for c in channels:
        start = time.perf_counter()
        img = read_image(where, axes=axes, channel=c, series=series)
        if invert:
            from spotfit.invert import invert_image

            img = invert_image(img)
        timings["read"] += time.perf_counter() - start
        try:
            if on_image is not None:
                on_image(img.n_frames)
            start = time.perf_counter()
            table = _run_task(task, img, config, camera, on_frame)
            timings[task] += time.perf_counter() - start
            px, px_from = _chosen(pixel_size, img.pixel_size)
            dz, dz_from = _chosen(z_step, img.z_step) if img.is_3d else (None, None)
            table = add_physical_units(table, px, dz)
            if channel == "all":
                table.insert(1, "channel", np.full(len(table), c or 0, dtype=np.int64))
            tables.append(table)
            info = {
                "shape": [int(n) for n in img.data.shape],
                "axes": img.axes,
                "source_axes": img.source_axes,
                "dtype": str(img.dtype),
                "frames": img.n_frames,
                "channels": len(channels) if channel == "all" else 1,
                "pixel_size_um": px,
                "pixel_size_from": px_from,
                "z_step_um": dz,
                "z_step_from": dz_from,
            }
        finally:
            img.close()
    non_empty = [t for t in tables if len(t)] or tables[:1]
    table = pd.concat(non_empty, ignore_index=True) if len(non_empty) > 1 else non_empty[0]
    info["timings_s"] = timings
    return table, info


def _chosen(option, metadata):
    if option is not None:
        return float(option), "option"
    if metadata is not None:
        return float(metadata), "metadata"
    return None, None


def _run_task(task, img, config, camera, on_frame):
    if task == "fit":
        from spotfit.api import fit

        return fit(_reporting(img, on_frame), config=config, camera=camera)
    from spotfit.api import detect

    report = None if on_frame is None else (lambda t, n_frames: on_frame())
    return detect(img, config=config, camera=camera, on_frame=report)


# ---------------------------------------------------------------------------
# One file of a batch: process, write CSV + sidecar
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    index: int
    path: str
    csv: str
    sidecar: str
    task: str
    config: object
    camera: object
    axes: object
    channel: object
    pixel_size: object
    z_step: object
    parameters: dict
    run: dict
    invert: bool = False
    qc: str | None = None  # path of the QC picture to write, if any
    series: object = None


def _message(exc: BaseException, path: str) -> str:
    """One line for a failure of `path`, without repeating the path in front."""
    if isinstance(exc, SpotfitInputError):
        text = str(exc)
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        name = exc.filename
        text = f"{reason}" if name in (None, path) else f"{name}: {reason}"
    else:
        text = f"unexpected error, please report it: {type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    for prefix in (f"{path}: ", f"{path} "):  # "x.tif: not a TIFF", "x.tif has 2 channels"
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpotfitInputError(f"{path}: no such file") from None
    if os.path.isdir(path):
        raise SpotfitInputError(f"{path}: is a directory, not a TIFF file")
    return st


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _json_text(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=True) + "\n"


def _run_job(job: _Job, report=None) -> FileResult:
    """Process one file and write its CSV and sidecar; never raises for a bad file.

    `report(kind, index, value)` receives ``("image", i, n_frames)`` and
    ``("frames", i, n_done)`` progress messages (optional).  Warnings raised
    while processing the file are collected into ``FileResult.warnings``.
    An interruption (KeyboardInterrupt, :class:`~spotfit.errors.Terminated`)
    propagates, after the temporary files are removed.
    """
    start = time.perf_counter()
    done = [0]

    def on_frame():
        done[0] += 1
        if report is not None:
            report("frames", job.index, done[0])

    def on_image(n_frames):
        if report is not None:
            report("image", job.index, n_frames)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning,
                         ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            result = _process_and_write(job, start, on_frame, on_image)
        except Exception as exc:  # a bad file (or a bug) is recorded; the batch goes on
            result = FileResult(job.path, job.csv, "failed", _message(exc, job.path),
                                seconds=time.perf_counter() - start)
    lines = warning_lines(caught)
    return dataclasses.replace(result, warnings=lines) if lines else result


def _process_and_write(job: _Job, start: float, on_frame, on_image) -> FileResult:
    from spotfit._atomic import atomic_group
    from spotfit.table import to_csv_bytes

    st = _stat(job.path)  # before reading: the sidecar describes what was read
    table, info = process_file(
        job.path, job.task, config=job.config, camera=job.camera, axes=job.axes,
        channel=job.channel, pixel_size=job.pixel_size, z_step=job.z_step,
        on_frame=on_frame, on_image=on_image, invert=job.invert, series=job.series,
    )
    t = time.perf_counter()
    data = to_csv_bytes(table)
    # CSV (QC picture) and sidecar as one group: all replaced, or none; the
    # sidecar last (spotfit._atomic).
    outputs = [job.csv] + ([job.qc] if job.qc else []) + [job.sidecar]
    with atomic_group(outputs) as temporaries:
        tmp_csv, tmp_json = temporaries[0], temporaries[-1]
        with open(tmp_csv, "wb") as fh:
            fh.write(data)
        if job.qc:
            from spotfit.overlay import write_qc

            write_qc(temporaries[1], job.path, table, axes=job.axes,
                     channel=0 if job.channel == "all" else job.channel)
        timings = info.pop("timings_s")
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        doc = _sidecar(job, st, table, info, timings, csv_bytes=len(data))
        with open(tmp_json, "w", encoding="utf-8") as fh:
            fh.write(_json_text(doc))
    return FileResult(job.path, job.csv, "ok", n_spots=len(table),
                      seconds=time.perf_counter() - start)


def warning_lines(records) -> tuple:
    """Distinct warning messages of `records` (``warnings.WarningMessage``), one line each."""
    lines = []
    for record in records:
        line = " ".join(str(record.message).split())
        if line and line not in lines:
            lines.append(line)
    return tuple(lines)


def _sidecar(job: _Job, st, table, info: dict, timings: dict, csv_bytes: int) -> dict:
    from spotfit import __version__

    if "status" in table.columns:
        counts = {str(k): int(v) for k, v in table["status"].value_counts().sort_index().items()}
    else:
        counts = None
    return {
        "spotfit_version": __version__,
        "sidecar_version": SIDECAR_VERSION,
        "command": job.task,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "path": os.path.abspath(job.path),
            "size_bytes": st.st_size,
            "mtime": _iso(st.st_mtime),
            "mtime_ns": st.st_mtime_ns,
            "shape": info["shape"],
            "axes": info["axes"],
            "source_axes": info["source_axes"],
            "dtype": info["dtype"],
            "frames": info["frames"],
            "channels": info["channels"],
        },
        "output": {
            "path": os.path.abspath(job.csv),
            "rows": int(len(table)),
            "size_bytes": int(csv_bytes),
        },
        "parameters": job.parameters,
        "pixel_size_um": info["pixel_size_um"],
        "pixel_size_from": info["pixel_size_from"],
        "z_step_um": info["z_step_um"],
        "z_step_from": info["z_step_from"],
        "n_spots": int(len(table)),
        "status_counts": counts,
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
        "run": dict(job.run, python=platform.python_version(), platform=sys.platform),
    }


def _remove_stale_temporaries(job: _Job) -> None:
    """Remove temporary files a killed run left beside `job`'s outputs (not a live run's)."""
    from spotfit._atomic import remove_stale_temporaries

    for path in (job.csv, job.sidecar) + ((job.qc,) if job.qc else ()):
        remove_stale_temporaries(path)


def _up_to_date(job: _Job):
    """The sidecar's spot count if `job`'s outputs are complete and current, else None."""
    try:
        with open(job.sidecar, encoding="utf-8") as fh:
            doc = json.load(fh)
        st = os.stat(job.path)
        csv_size = os.path.getsize(job.csv)
        same = (
            doc["input"]["size_bytes"] == st.st_size
            and doc["input"]["mtime_ns"] == st.st_mtime_ns
            and doc["output"]["size_bytes"] == csv_size
            and _comparable(doc["parameters"]) == _comparable(job.parameters)
        )
        return int(doc.get("n_spots", 0)) if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------
#: Exit status of a worker stopped by SIGTERM (128 + 15, as a shell reports it).
_EXIT_TERMINATED = 128 + signal.SIGTERM
_IN_JOB = False


def _worker_sigterm(signum, frame):
    """SIGTERM in a worker: unwind the current file (temporaries removed), then exit."""
    if _IN_JOB:
        raise Terminated()
    os._exit(_EXIT_TERMINATED)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM to this worker when the batch's main process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # no prctl: workers then end when their pipe closes
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(_EXIT_TERMINATED)


def _worker_main(conn, parent_pid: int) -> None:
    """A worker process: receive jobs on `conn`, send progress and results back.

    Messages to the parent: ``("progress", kind, index, value)`` and
    ``("done", FileResult)``.  ``None`` (or a closed pipe) ends the worker.
    SIGINT is ignored (Ctrl-C reaches the main process, which stops the
    workers); SIGTERM ends the worker after removing its temporary files.
    """
    global _IN_JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    _die_with_parent(parent_pid)
    for name in _THREAD_VARIABLES:  # one thread per numeric library, before numpy loads
        os.environ.setdefault(name, "1")
    last = [0.0]

    def report(kind, index, value):
        now = time.monotonic()
        if kind == "image" or now - last[0] >= _REPORT_INTERVAL:
            last[0] = now
            conn.send(("progress", kind, index, value))

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        _IN_JOB = True
        try:
            result = _run_job(job, report)
        except KeyboardInterrupt:  # Terminated: temporaries are gone; stop
            os._exit(_EXIT_TERMINATED)
        finally:
            _IN_JOB = False
        try:
            conn.send(("done", result))
        except (OSError, ValueError):
            return


def _describe_exit(code) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (killed, e.g. by the out-of-memory killer or kill -9)",
            "SIGSEGV": " (a crash in compiled code)",
            "SIGBUS": " (a crash reading memory, e.g. a file changed while read)",
        }.get(name, "")
        return f"it was killed by {name}{hint}"
    if code == _EXIT_TERMINATED:
        return "it was terminated (SIGTERM)"
    return f"it exited with status {code}"


# ---------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------
def _clock(seconds) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _ProgressBar:
    """One line on a terminal, redrawn with ``\\r``: files, frames, spots, time, ETA.

    The fraction done is counted in input bytes (a file in progress counts
    by its share of frames done), so one huge file and many small ones both
    give a sensible time left.
    """

    def __init__(self, label: str, sizes: dict, stream):
        self.label, self.sizes, self.stream = label, sizes, stream
        self.total = sum(sizes.values()) or 1
        self.frames_total: dict = {}
        self.frames_done: dict = {}
        self.finished: set = set()
        self.spots = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.width = 0

    def update(self, kind, index, value):
        if kind == "image":  # a new image of this file (one per channel with --channel all)
            self.frames_total[index] = self.frames_total.get(index, 0) + value
        elif kind == "frames":
            self.frames_done[index] = value
        self.draw()

    def file_done(self, index, n_spots):
        self.finished.add(index)
        if index in self.frames_total:
            self.frames_done[index] = self.frames_total[index]
        self.spots += n_spots
        self.draw(force=True)

    def draw(self, force=False):
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        done = sum(self.sizes[i] for i in self.finished)
        for i, n in self.frames_done.items():
            total = self.frames_total.get(i, 0)
            if i not in self.finished and total:
                done += self.sizes[i] * min(1.0, n / total)
        fraction = min(1.0, done / self.total)
        elapsed = now - self.start
        eta = _clock(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
        bar = "#" * int(12 * fraction)
        line = (
            f"{self.label} [{bar:.<12}] {len(self.finished)}/{len(self.sizes)} files, "
            f"{sum(self.frames_done.values())} frames, {self.spots} spots | "
            f"{_clock(elapsed)}, ETA {eta}"
        )
        line = line[: max(10, shutil.get_terminal_size((80, 24)).columns - 1)]
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width = len(line)

    def close(self):
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


# ---------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_batch(inputs, out_dir, task="fit", config=None, camera=None, axes=None, channel=None,
              pixel_size=None, z_step=None, workers=None, skip_existing=False,
              progress=None, invert=False, qc=False, report=False, series=None
              ) -> BatchSummary:
    """Detect or fit every input file; write ``<out_dir>/<stem>.csv`` and ``.json`` each.

    Parameters
    ----------
    inputs : iterable of str or os.PathLike
        Files, folders and glob patterns (see :func:`expand_inputs`).
    out_dir : str or os.PathLike
        Output folder; created if missing.
    task : {"fit", "detect"}
    config : FitConfig, optional
        Detection and fit options (its ``workers`` is replaced: see `workers`).
    camera : Camera, optional
    axes, channel, pixel_size, z_step, series : optional
        As in :func:`process_file`; the same for every file.
    workers : int, optional
        Processes working on files in parallel (default: all cores; at most
        one per core and one per file).  Each fits with one solver thread;
        with one worker, or one file, files are processed in this process
        and the solver uses `workers` threads (at most one per core).
        Tables do not depend on `workers`.
    skip_existing : bool
        Skip files whose CSV and sidecar exist and whose sidecar records the
        same input size and modification time and the same parameters
        (``workers`` aside); other files are (re)done.
    progress : bool, optional
        Draw a progress bar on stderr; default: when stderr is a terminal.
    invert : bool
        Process every file inverted (dark objects on a light background).
    qc : bool
        Also write ``<out_dir>/<stem>_qc.png``, the image with its fits
        (:func:`spotfit.overlay.write_qc`), before the sidecar.
    report : bool
        At the end, write ``<out_dir>/report.html`` over all files
        (:func:`spotfit.report.write_report`).

    Returns
    -------
    BatchSummary
        One :class:`FileResult` per input file, in input order.  Warnings of
        a file are in its ``warnings`` and are also re-issued here as
        :class:`~spotfit.errors.SpotfitWarning` ``"<file>: <message>"``.

    Raises
    ------
    SpotfitInputError
        Before any file is processed: no input files, an output name clash,
        or an output folder that cannot be created.  Problems with single
        files (including a worker process that died) are recorded in the
        summary instead.
    KeyboardInterrupt
        Ctrl-C, or :class:`~spotfit.errors.Terminated` (SIGTERM, when the
        caller installs :func:`spotfit.errors.raise_terminated`): the worker
        processes are stopped first; finished files keep their outputs, the
        others are left without any.
    """
    from spotfit.camera import Camera
    from spotfit.config import FitConfig
    from spotfit.overlay import qc_path

    start = time.perf_counter()
    if task not in TASKS:
        raise SpotfitInputError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise SpotfitInputError(f"--workers must be a whole number >= 1, got {workers!r}")
    config = config or FitConfig()
    camera = camera or Camera()
    files = expand_inputs(inputs)
    if not files:
        where = ", ".join(os.fspath(i) for i in inputs) or "(none given)"
        raise SpotfitInputError(f"no image files (*.tif, *.tiff, *.png, ...) found in {where}")
    out_dir = os.fspath(out_dir)
    paths = output_paths(files, out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise SpotfitInputError(
            f"{out_dir}: cannot create the output folder ({exc.strerror or exc})"
        ) from exc

    if invert:
        from spotfit.invert import check_camera

        check_camera(camera)
    params = parameters(task, config, camera, axes, channel, pixel_size, z_step, workers,
                        invert, series=series)
    n_cores = min(workers or available_cores(), available_cores())
    jobs, results = [], {}
    for i, (f, (csv, sidecar)) in enumerate(zip(files, paths)):
        job = _Job(i, f, csv, sidecar, task, config, camera, axes, channel, pixel_size,
                   z_step, params, {}, invert=bool(invert), qc=qc_path(csv) if qc else None,
                   series=series)
        n_spots = _up_to_date(job) if skip_existing else None
        if job.qc and not os.path.isfile(job.qc):
            n_spots = None  # its picture is missing: redo the file
        if n_spots is not None:
            results[i] = FileResult(f, csv, "skipped", n_spots=n_spots)
        else:
            jobs.append(job)
            _remove_stale_temporaries(job)  # left by a killed run (never a live run's)

    processes = min(n_cores, len(jobs))
    threads = 1 if processes > 1 else n_cores
    run = {"workers": workers, "processes": max(processes, 1), "solver_threads": threads}
    jobs = [
        dataclasses.replace(j, config=dataclasses.replace(config, workers=threads), run=run)
        for j in jobs
    ]
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = None
    if show and jobs:
        sizes = {j.index: _size(j.path) for j in jobs}
        bar = _ProgressBar(f"spotfit {task}", sizes, sys.stderr)
        bar.draw(force=True)
    try:
        if processes <= 1:
            for job in jobs:
                result = _run_job(job, bar.update if bar else None)
                results[job.index] = result
                if bar:
                    bar.file_done(job.index, result.n_spots)
        else:
            results.update(_Pool(processes, bar).run(jobs))
    finally:
        if bar:
            bar.close()
    ordered = [results[i] for i in range(len(files))]
    for result in ordered:
        for line in result.warnings:
            warnings.warn(f"{result.input}: {line}", SpotfitWarning, stacklevel=2)
    summary = BatchSummary(ordered, time.perf_counter() - start)
    if report:
        from spotfit.report import REPORT_NAME, write_report

        write_report(os.path.join(out_dir, REPORT_NAME), summary, params, axes=axes,
                     channel=channel)
    return summary


def _size(path) -> int:
    try:
        return max(1, os.path.getsize(path))
    except OSError:
        return 1


class _Pool:
    """Worker processes, one pipe each; a worker that dies fails only its own file.

    Not :class:`concurrent.futures.ProcessPoolExecutor`: when one of its
    workers dies, every pending future fails (``BrokenProcessPool``) and it
    cannot tell which file killed it.  Here each worker has its own pipe,
    so the file a dead worker was processing is known; it is reported as
    failed, the worker is replaced, and the other files go on.  No shared
    queue or lock: a worker killed at any moment cannot block the others.
    """

    #: Seconds to wait for stopped workers to exit before killing them.
    STOP_TIMEOUT = 10.0

    def __init__(self, processes: int, bar=None):
        self.processes = processes
        self.bar = bar
        self.context = multiprocessing.get_context("spawn")
        self.workers: list = []  # [process, connection]

    def _start(self):
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_worker_main, args=(child, os.getpid()), daemon=True,
            name="spotfit-worker",
        )
        # Workers ignore SIGINT from birth (Ctrl-C goes to the whole process
        # group; this process stops them): the disposition is inherited.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            process.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()
        worker = [process, parent]
        self.workers.append(worker)
        return worker

    def run(self, jobs) -> dict:
        """Process `jobs`; results by job index.  Stops every worker on the way out."""
        from multiprocessing.connection import wait

        queue = deque(jobs)
        running: dict = {}  # id(worker) -> (worker, job)
        idle: list = []
        results: dict = {}
        try:
            for _ in range(min(self.processes, len(queue))):
                idle.append(self._start())
            while queue or running:
                while idle and queue:
                    worker, job = idle.pop(), queue.popleft()
                    try:
                        worker[1].send(job)
                    except (OSError, ValueError):  # it died while idle: the job never started
                        queue.appendleft(job)
                        self._forget(worker)
                        idle.append(self._start())
                        continue
                    running[id(worker)] = (worker, job)
                busy = [w for w, _ in running.values()]
                ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy])
                for worker in busy:
                    process, conn = worker
                    if conn in ready or process.sentinel in ready:
                        finished = self._receive(worker, running, results)
                        if finished:
                            idle.append(worker)
                        elif not process.is_alive() and id(worker) in running:
                            _, job = running.pop(id(worker))
                            results[job.index] = self._died(worker, job)
                            if queue:
                                idle.append(self._start())
        except BaseException:
            self.stop(terminate=True)
            raise
        self.stop(terminate=False)
        return results

    def _receive(self, worker, running, results) -> bool:
        """Read the worker's messages; True once it has sent its file's result."""
        process, conn = worker
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "progress":
                    if self.bar:
                        self.bar.update(*message[1:])
                elif message[0] == "done":
                    _, job = running.pop(id(worker))
                    results[job.index] = message[1]
                    if self.bar:
                        self.bar.file_done(job.index, message[1].n_spots)
                    return True
        except (EOFError, OSError):
            process.join(self.STOP_TIMEOUT)
        return False

    def _forget(self, worker) -> None:
        process, conn = worker
        process.join(self.STOP_TIMEOUT)
        conn.close()
        self.workers.remove(worker)

    def _died(self, worker, job) -> FileResult:
        process, _ = worker
        self._forget(worker)
        _remove_stale_temporaries(job)  # its locks died with it
        if self.bar:
            self.bar.file_done(job.index, 0)
        return FileResult(
            job.path, job.csv, "failed",
            f"the worker process processing this file died: {_describe_exit(process.exitcode)}; "
            "no output was written (the other files were processed)",
        )

    def stop(self, terminate: bool) -> None:
        """End every worker: politely (no more jobs), or with SIGTERM (interrupted).

        A second Ctrl-C or SIGTERM while the workers are being stopped waits
        until they are (so none is left running).
        """
        previous = {}
        if terminate and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self._stop(terminate)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, terminate: bool) -> None:
        for process, conn in self.workers:
            try:
                if terminate:
                    process.terminate()  # the worker removes its temporaries and exits
                else:
                    conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + self.STOP_TIMEOUT
        for process, conn in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self.workers = []


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
