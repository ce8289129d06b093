"""Whole experiments: many image files in one run, one CSV and one JSON sidecar each.

:func:`run_batch` is what ``spotfit fit IMAGE... --out-dir DIR`` and
``spotfit detect IMAGE... --out-dir DIR`` run: it finds the inputs, names
the outputs, skips what is up to date, and runs each file through
:func:`spotfit.api.process_file` (the same step as a single-file run, so one
file gives the same table either way), in this process or in worker
processes (:mod:`spotfit.pool`), with a progress bar on a terminal
(:mod:`spotfit.progress`).  Each table is written with its sidecar
(:mod:`spotfit.provenance`).

* Inputs are files, folders (their ``*.tif`` / ``*.tiff`` files and the
  other image files of :data:`IMAGE_SUFFIXES`, not recursive, sorted by
  name, hidden files skipped) and glob patterns the shell did not expand
  (``"data/*.tif"``).  Each input ``<stem>.tif`` gives ``<out_dir>/<stem>.csv``
  and the sidecar ``<out_dir>/<stem>.json``; two inputs with the same stem
  are refused before any work.
* ``workers`` is the number of cores to use in total: files are processed
  by ``min(workers, files)`` processes, which share the cores as solver
  threads (``workers // processes`` each).  With one process everything
  runs in this process.  Tables do not depend on the number of workers.
* A problem with one file (a :class:`~spotfit.errors.SpotfitInputError` or
  ``OSError``: corrupt, empty, unsupported pixel type, ...) is recorded and
  the other files still run; unexpected errors are recorded too, as such.
  A worker process that dies fails only the file it was processing.
  Warnings of a file are returned with its result.
* Interruption (Ctrl-C, or SIGTERM where the caller turns it into
  :class:`spotfit.errors.Terminated`, as the command line does) stops the
  workers: they remove their temporary files and exit; finished outputs
  stay, no partial output is left.
* ``skip_existing`` skips inputs whose CSV and sidecar exist and whose
  sidecar records the same input size, modification time and parameters.

This module imports only the standard library at import time (worker
processes set their thread limits before numpy is loaded).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
import warnings
from dataclasses import dataclass, field

from spotfit.errors import SpotfitInputError, SpotfitWarning

__all__ = [
    "BatchSummary", "FileResult", "TASKS", "available_cores", "expand_inputs", "run_batch",
    "share_cores",
]

#: What a batch can do to each file (those of :func:`spotfit.api.process_file`).
TASKS = ("fit", "detect")

#: File name endings (any case) taken from folders: TIFF and the formats of
#: :mod:`spotfit.readers` (PNG, JPEG, ..., ND2, CZI, LIF).
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm",
    ".nd2", ".czi", ".lif",
)


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
    notes : tuple of str
        Where reading its axes was a guess (:attr:`spotfit.io.Image.notes`).
    """

    input: str
    output: str
    status: str
    message: str = ""
    n_spots: int = 0
    seconds: float = 0.0
    warnings: tuple = ()
    notes: tuple = ()


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
def _is_zarr(path: str) -> bool:
    from spotfit.readers import is_zarr

    return is_zarr(path)


def _is_pattern(path: str) -> bool:
    return not os.path.exists(path) and any(c in path for c in "*?[")


def _folder_tiffs(folder: str) -> list:
    from spotfit.readers import is_zarr

    names = sorted(
        name for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_SUFFIXES + (".zarr",)) and not name.startswith(".")
    )
    paths = [os.path.join(folder, n) for n in names]
    return [p for p in paths if os.path.isfile(p) or is_zarr(p)]


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
        if os.path.isdir(path) and not _is_zarr(path):
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
            "process them into different `out_dir` folders, or rename them"
        )
    from spotfit.provenance import sidecar_path

    paths = []
    inputs = {os.path.realpath(f): f for f in files}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        csv = os.path.join(out_dir, stem + ".csv")
        pair = (csv, sidecar_path(csv))
        for out in pair:
            if os.path.realpath(out) in inputs:
                raise SpotfitInputError(
                    f"{out}: output would overwrite the input file "
                    f"{inputs[os.path.realpath(out)]}; choose another `out_dir`"
                )
        paths.append(pair)
    return paths



# ---------------------------------------------------------------------------
# Cores
# ---------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def share_cores(workers, n_files: int) -> tuple:
    """``(processes, threads)`` for `n_files` files on `workers` cores in total.

    `workers` (default: all available cores, and never more) cores are
    shared by ``min(workers, n_files)`` processes of ``workers // processes``
    solver threads each: one file gets every core as threads, many files
    one process per core.
    """
    cores = min(workers or available_cores(), available_cores())
    processes = max(1, min(cores, n_files))
    return processes, max(1, cores // processes)


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


def _run_job(job: _Job, report=None) -> FileResult:
    """Process one file and write its CSV and sidecar; never raises for a bad file.

    ``report(index, frames_done, frames_total, spots_found)`` is called as
    frames are done (optional).  Warnings raised while processing the file
    are collected into ``FileResult.warnings``.  An interruption
    (KeyboardInterrupt, :class:`~spotfit.errors.Terminated`) propagates,
    after the temporary files are removed.
    """
    start = time.perf_counter()
    progress = None if report is None else (lambda *done: report(job.index, *done))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning,
                         ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            result = _process_and_write(job, start, progress)
        except Exception as exc:  # a bad file (or a bug) is recorded; the batch goes on
            result = FileResult(job.path, job.csv, "failed", _message(exc, job.path),
                                seconds=time.perf_counter() - start)
    lines = warning_lines(caught)
    return dataclasses.replace(result, warnings=lines) if lines else result


def _process_and_write(job: _Job, start: float, progress) -> FileResult:
    from spotfit import api, provenance

    st = provenance.input_stat(job.path)  # before reading: the sidecar describes what was read
    table, info = api.process_file(
        job.path, job.task, config=job.config, camera=job.camera, axes=job.axes,
        channel=job.channel, pixel_size=job.pixel_size, z_step=job.z_step,
        invert=job.invert, series=job.series, progress=progress, light=True,
    )
    t = time.perf_counter()
    picture = None
    if job.qc:
        from spotfit.lighttable import as_frame
        from spotfit.overlay import write_qc

        picture = (job.qc, lambda tmp: write_qc(
            tmp, job.path, as_frame(table), axes=job.axes, series=job.series,
            channel=0 if job.channel == "all" else job.channel))

    def describe(csv_bytes):
        timings = dict(info["timings_s"], write=time.perf_counter() - t,
                       total=time.perf_counter() - start)
        return provenance.document(job.task, job.path, st, table, info, job.parameters, job.csv,
                                   csv_bytes, timings, job.run)

    provenance.write_with_sidecar(table, job.csv, job.sidecar, describe, picture)
    return FileResult(job.path, job.csv, "ok", n_spots=len(table),
                      seconds=time.perf_counter() - start, notes=tuple(info["notes"]))


def warning_lines(records) -> tuple:
    """Distinct warning messages of `records` (``warnings.WarningMessage``), one line each."""
    lines = []
    for record in records:
        line = " ".join(str(record.message).split())
        if line and line not in lines:
            lines.append(line)
    return tuple(lines)


def _remove_stale_temporaries(job: _Job) -> None:
    """Remove temporary files a killed run left beside `job`'s outputs (not a live run's)."""
    from spotfit._atomic import remove_stale_temporaries

    for path in (job.csv, job.sidecar) + ((job.qc,) if job.qc else ()):
        remove_stale_temporaries(path)


def _died(job: _Job, why: str) -> FileResult:
    """The result of a job whose worker process died (:class:`spotfit.pool.Pool`)."""
    _remove_stale_temporaries(job)  # its locks died with it
    return FileResult(
        job.path, job.csv, "failed",
        f"the worker process processing this file died: {why}; "
        "no output was written (the other files were processed)",
    )


# ---------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------
def run_batch(inputs, out_dir, task="fit", config=None, camera=None, axes=None, channel=None,
              pixel_size=None, z_step=None, workers=None, skip_existing=False,
              progress=None, invert=False, qc=False, report=False, series=None,
              scheduler=None) -> BatchSummary:
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
    camera : Camera or mapping, optional
    axes, channel, pixel_size, z_step, invert, series : optional
        As in :func:`spotfit.api.process_file`; the same for every file.
    workers : int, optional
        Cores to use in total (default: all; never more than available):
        ``min(workers, files)`` processes sharing them as solver threads
        (:func:`share_cores`); with one process, files are processed in
        this process.  Tables do not depend on `workers`.
    skip_existing : bool
        Skip files whose CSV and sidecar exist and whose sidecar records the
        same input size and modification time and the same parameters
        (``workers`` aside); other files are (re)done.
    progress : bool, optional
        Draw a progress bar on stderr; default: when stderr is a terminal.
    qc : bool
        Also write ``<out_dir>/<stem>_qc.png``, the image with its fits
        (:func:`spotfit.overlay.write_qc`), with the CSV and sidecar.
    report : bool
        At the end, write ``<out_dir>/report.html`` over all files
        (:func:`spotfit.report.write_report`).
    scheduler : optional
        A Dask cluster (:func:`spotfit.blockwise.engine`: a
        ``distributed.Client``, a scheduler address or ``"local:N"``): one
        task per file, run and written by the cluster's workers (the input
        and output folders must be visible to them), with the same
        reliability as the local pool: a bad file is recorded and the others
        go on; a worker that dies is replaced and its file recomputed by
        Dask (a file that keeps killing workers is recorded as failed).
        `workers` is then the solver threads per task (default 1).

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
        an output folder that cannot be created, bad `workers`.  Problems
        with single files (including a worker process that died) are
        recorded in the summary instead.
    KeyboardInterrupt
        Ctrl-C, or :class:`~spotfit.errors.Terminated` (SIGTERM, when the
        caller installs :func:`spotfit.errors.raise_terminated`): the worker
        processes are stopped first; finished files keep their outputs, the
        others are left without any.
    """
    from spotfit import provenance
    from spotfit.camera import as_camera
    from spotfit.config import FitConfig
    from spotfit.overlay import qc_path
    from spotfit.pool import Pool
    from spotfit.progress import ProgressBar, wanted

    start = time.perf_counter()
    if task not in TASKS:
        raise SpotfitInputError(f"task must be one of {', '.join(TASKS)}, not {task!r}",
                                parameter="task")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise SpotfitInputError(f"workers must be a whole number >= 1, got {workers!r}",
                                parameter="workers")
    config = config or FitConfig()
    camera = as_camera(camera)
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
    params = provenance.parameters(task, config, camera, axes, channel, pixel_size, z_step,
                                   workers, invert, series=series)
    jobs, results = [], {}
    for i, (f, (csv, sidecar)) in enumerate(zip(files, paths)):
        job = _Job(i, f, csv, sidecar, task, config, camera, axes, channel, pixel_size,
                   z_step, params, {}, invert=bool(invert), qc=qc_path(csv) if qc else None,
                   series=series)
        n_spots = provenance.up_to_date(sidecar, f, csv, params) if skip_existing else None
        if job.qc and not os.path.isfile(job.qc):
            n_spots = None  # its picture is missing: redo the file
        if n_spots is not None:
            results[i] = FileResult(f, csv, "skipped", n_spots=n_spots)
        else:
            jobs.append(job)
            _remove_stale_temporaries(job)  # left by a killed run (never a live run's)

    processes, threads = share_cores(workers, len(jobs))
    if scheduler is not None:
        processes, threads = 0, workers or 1
    run = {"workers": workers, "processes": processes, "solver_threads": threads}
    jobs = [
        dataclasses.replace(j, config=dataclasses.replace(config, workers=threads), run=run)
        for j in jobs
    ]
    bar = None
    if jobs and (wanted() if progress is None else bool(progress)):
        bar = ProgressBar(f"spotfit {task}", {j.index: _size(j.path) for j in jobs})
        bar.draw(force=True)
    try:
        if scheduler is not None:
            results.update(_run_on_cluster(jobs, scheduler, bar))
        elif processes <= 1:
            for job in jobs:
                result = _run_job(job, bar.update if bar else None)
                results[job.index] = result
                if bar:
                    bar.file_done(job.index, result.n_spots)
        else:
            done = None if bar is None else (lambda job, result: bar.file_done(job.index,
                                                                                result.n_spots))
            pool = Pool(processes, _run_job, threads=threads,
                        on_progress=bar.update if bar else None, on_result=done, on_death=_died)
            results.update(pool.run(jobs))
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


def _run_on_cluster(jobs, scheduler, bar) -> dict:
    """Each job a task of a Dask cluster; results by job index."""
    from spotfit.blockwise import engine

    eng = engine(scheduler)
    try:
        from distributed import as_completed

        futures = {eng.client.submit(_run_job, job, pure=False, key=f"spotfit-file-{job.index}-"
                                     f"{os.getpid()}-{time.time_ns()}"): job for job in jobs}
        results = {}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # KilledWorker: the file kept killing workers
                result = _died(job, "Dask gave up on it after its workers died ("
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            results[job.index] = result
            if bar:
                bar.file_done(job.index, result.n_spots)
        return results
    finally:
        eng.close()


def _size(path) -> int:
    try:
        return max(1, os.path.getsize(path))
    except OSError:
        return 1
