"""Command line: the ``spotfit`` commands, each a thin layer over the library.

``detect``, ``fit``, ``measure``, ``show``, ``render``, ``export`` and
``simulate``.  The command line does no computation of its own: each
command parses its options into a :class:`spotfit.config.FitConfig` and a
:class:`spotfit.camera.Camera` and calls the functions a Python user calls
(:func:`spotfit.read_image`, :func:`spotfit.detect`, :func:`spotfit.fit`,
:func:`spotfit.measure`, :func:`spotfit.show`, :func:`spotfit.render`,
:func:`spotfit.export.export`, :func:`spotfit.simulation.simulate`,
:func:`spotfit.table.write_table`).

Only ``click``, ``os``, ``sys`` and :mod:`spotfit.config` (standard library
only) are imported at module level: ``spotfit --help`` and usage errors
never import numpy, scipy, pandas, scikit-image or tifffile.  The
scientific stack is imported inside the command bodies.

One vocabulary: the options of :class:`~spotfit.config.FitConfig` are made
from its field metadata (:func:`spotfit.config.option_metadata`: names,
types, bounds, defaults, choices, help), and errors of the library, which
name Python parameters (``sigma must be ...``, ```axes='TYX'```), are
shown with this command's options instead (``--sigma must be ...``,
``--axes TYX``; :func:`_as_options`).

``fit`` and ``detect`` take one or more IMAGE paths.  One file without
``--out-dir`` runs :func:`spotfit.api.process_file` and writes its table to
stdout, or to ``--out`` with a JSON sidecar beside it
(:mod:`spotfit.provenance`), with a progress bar on a terminal
(:mod:`spotfit.progress`); several files, folders or ``--out-dir`` run
:func:`spotfit.batch.run_batch` (one CSV and one sidecar per input in
``--out-dir``).  ``--workers N`` is the number of cores to use in total
either way: solver threads for one file, processes sharing them for a
batch.

Errors: a :class:`spotfit.errors.SpotfitInputError` (bad file, bad option
value), an ``OSError`` on an input or output path or a ``MemoryError`` is
printed as one line ``Error: <message>`` on stderr with exit status 1;
usage errors (unknown option, value out of range for its type) are
click's, exit status 2.  In a batch, each failed file is one
``Error: <file>: <message>`` line, followed by the summary line, and the
exit status is 1 if any file failed.  Ctrl-C (SIGINT) and SIGTERM stop the
run cleanly (workers stopped, temporary files removed): one ``Error:``
line, exit status 130 and 143.  An unexpected exception (a bug) is one
``Error: internal error ...`` line too (``SPOTFIT_TRACEBACK=1`` shows the
traceback).  Warnings (:class:`spotfit.errors.SpotfitWarning`, numpy's
RuntimeWarnings) are printed once each as ``Warning: <message>``.  All
output files are written through :mod:`spotfit._atomic` (complete or
absent; devices and FIFOs written in place; symbolic links followed), and
input files are only ever opened for reading.
"""

import os
import signal
import sys
import warnings

import click

from spotfit.config import option_metadata

#: ``--format`` choices of ``fit`` and ``export`` (spotfit.export.FORMATS,
#: spelled out for the same reason; a test checks they agree).
EXPORT_FORMATS = ("csv", "thunderstorm", "picasso", "parquet")


#: ``--out`` value (and default) meaning standard output.
STDOUT = "-"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---------------------------------------------------------------------------
# Parameter types (no numpy: click only)
# ---------------------------------------------------------------------------
class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also rejects ``nan`` and ``inf``."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv - rv != 0:  # nan or +-inf
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class FiniteFloat(click.types.FloatParamType):
    """A float that is not ``nan`` or ``inf``."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv - rv != 0:
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class SigmaType(FiniteFloatRange):
    """A PSF sigma in pixels (> 0), or ``auto``: measured on the image (:mod:`spotfit.psf`)."""

    name = "sigma"

    def __init__(self):
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return super().convert(value, param, ctx)


FINITE = FiniteFloat()
POSITIVE = FiniteFloatRange(min=0, min_open=True)
NON_NEGATIVE = FiniteFloatRange(min=0)


class ChannelType(click.ParamType):
    """``--channel``: a 0-based channel number, or ``all``."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "all":
            return "all"
        if isinstance(value, bool):
            value = None
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number < 0 or str(number) != str(value).strip():
            self.fail(f"{value!r} is not a channel number (0, 1, ...) or 'all'.", param, ctx)
        return number


class ShapeType(click.ParamType):
    """``ROWSxCOLS`` or ``FRAMESxROWSxCOLS`` -> tuple of positive ints."""

    name = "SHAPE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().replace(" ", "").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if len(shape) not in (2, 3) or min(shape) < 1:
            self.fail(
                f"{value!r} is not ROWSxCOLS (e.g. 200x300) or FRAMESxROWSxCOLS "
                "(e.g. 10x200x300) with positive whole numbers.",
                param,
                ctx,
            )
        return shape


class PhotonsType(click.ParamType):
    """``N`` or ``LO,HI`` photons per spot -> float or (lo, hi)."""

    name = "N|LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float, tuple)):
            return value
        parts = str(value).split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        ok = len(numbers) in (1, 2) and all(n - n == 0 and n >= 0 for n in numbers)
        if ok and len(numbers) == 2 and numbers[1] < numbers[0]:
            ok = False
        if not ok:
            self.fail(
                f"{value!r} is not a number of photons >= 0 or a range LO,HI with LO <= HI.",
                param,
                ctx,
            )
        return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


# ---------------------------------------------------------------------------
# Error handling
# ---------------------------------------------------------------------------
def _one_line(text) -> str:
    return " ".join(str(text).split())


class _UserErrors:
    """Turn SpotfitInputError / OSError into click's one-line ``Error:`` (exit 1).

    ``what`` is the user's path an ``OSError`` is reported against (rather
    than, e.g., the name of a temporary file); default: the error's own
    file name.
    """

    def __init__(self, what=None):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        from spotfit.errors import SpotfitInputError

        if issubclass(exc_type, SpotfitInputError):
            message = _one_line(_as_option(exc))
            if (self.what is not None and str(self.what) not in message
                    and not message.startswith("--")):
                message = f"{self.what}: {message}"  # name the file (not for option errors)
            raise click.ClickException(message) from exc
        if _is_memory_error(exc) and self.what is not None:
            raise click.ClickException(
                f"{self.what}: not enough memory to process it with these options (try "
                "smaller --window or --sigma values, or fewer --workers)"
            ) from exc
        if issubclass(exc_type, OSError) and not issubclass(exc_type, BrokenPipeError):
            where = self.what if self.what is not None else exc.filename
            reason = exc.strerror or exc
            message = f"{where}: {reason}" if where is not None else str(reason)
            raise click.ClickException(_one_line(message)) from exc
        return False


#: A parameter quoted in a library message: ```name``` or ```name=value```.
_QUOTED = r"`(\w+)(?:=(['\"]?)([^`'\"]*)\2)?`"


def _options() -> dict:
    """Parameter name -> this command's option (its longest name), e.g. ``z_step``: ``--z-step``."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    return {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}


def _flags() -> set:
    """Parameter names of this command's on/off options (``--invert``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set()
    return {p.name for p in ctx.command.params if isinstance(p, click.Option) and p.is_flag}


def _as_options(text: str, parameter: str | None = None) -> str:
    """A library message in this command's options.

    The library names Python parameters (:class:`spotfit.errors.SpotfitInputError`):
    the `parameter` a message starts with, and any parameter quoted as
    ```name``` or ```name=value```, become the option (``sigma must be
    ...`` -> ``--sigma must be ...``; ```axes='TYX'``` -> ``--axes TYX``;
    ```invert=True``` -> ``--invert``).
    Names that are not options of this command lose their quotes.
    """
    import re

    options = _options()
    text = str(text)
    if parameter in options and re.match(rf"{parameter}\b", text):
        text = options[parameter] + text[len(parameter):]

    def option(match):
        name, value = match.group(1), match.group(3)
        if name not in options:
            return match.group(0)[1:-1]
        if value == "True" and name in _flags():  # `invert=True`: --invert
            value = None
        return options[name] + (f" {value}" if value is not None else "")

    return re.sub(_QUOTED, option, text)


def _as_option(exc) -> str:
    """An API error's message in this command's options (:func:`_as_options`)."""
    return _as_options(str(exc), getattr(exc, "parameter", None))


def _is_device(path) -> bool:
    """True for an existing non-regular, non-directory file (a device, a FIFO)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _check_not_input(out, inputs) -> None:
    """Refuse to write an output over an input file (inputs are never touched)."""
    if out is None or out == STDOUT or not os.path.exists(out):
        return
    for path in inputs:
        try:
            same = os.path.samefile(out, path)
        except OSError:
            same = False
        if same:
            raise click.ClickException(
                f"{out}: output would overwrite the input file {path}; choose another --out"
            )


# ---------------------------------------------------------------------------
# Shared options
# ---------------------------------------------------------------------------
def _version_callback(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    from spotfit import __version__

    click.echo(f"spotfit {__version__}")
    ctx.exit()


def _apply(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


def _camera_options(baseline=0.0, gain=None, em_gain=1.0, read_noise=0.0, note=""):
    return [
        click.option(
            "--baseline", type=FINITE, default=baseline, show_default=True,
            help="Camera offset in ADU (subtracted from every pixel).",
        ),
        click.option(
            "--gain", type=POSITIVE, default=gain, show_default=gain is not None,
            help="Photoelectrons per ADU (before EM gain)." + note,
        ),
        click.option(
            "--em-gain", type=FiniteFloatRange(min=1), default=em_gain, show_default=True,
            help="Electron-multiplying gain (1 for sCMOS / CCD cameras).",
        ),
        click.option(
            "--read-noise", type=NON_NEGATIVE, default=read_noise, show_default=True,
            help="Read noise in photoelectrons RMS (before EM gain).",
        ),
    ]


def _config_callback(ctx, param, value):
    """``--config FILE``: its parameters become defaults; given options win."""
    if value is None or ctx.resilient_parsing:
        return value
    from spotfit.errors import SpotfitInputError
    from spotfit.provenance import load_config

    try:
        defaults = load_config(value, {p.name for p in ctx.command.params})
    except SpotfitInputError as exc:
        raise click.ClickException(_one_line(_as_option(exc))) from exc
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


_IMAGE_OPTIONS = [
    click.argument(
        # readable=False: an unreadable file is that file's error, not a usage
        # error aborting a whole batch
        "images", nargs=-1, required=True, type=click.Path(dir_okay=True, readable=False),
        metavar="IMAGE...",
    ),
    click.option(
        "--config", type=click.Path(dir_okay=False), metavar="FILE.json", is_eager=True,
        expose_value=False, callback=_config_callback,
        help="Take parameters from a JSON sidecar of an earlier run (or a JSON object of "
        "option names and values); options given on the command line override them.",
    ),
    click.option(
        "--axes", metavar="AXES",
        help="Axes of the image, one letter per dimension from T, Z, C, Y, X, S "
        "(e.g. TYX for a movie stored as a z-stack, ZYX for a z-stack); "
        "overrides the file's metadata.",
    ),
    click.option(
        "--channel", type=ChannelType(), metavar="N|all",
        help="Channel to use (0-based) when the file has several (C or S axis, e.g. RGB); "
        "'all': every channel, with a channel column.",
    ),
    click.option(
        "--invert", is_flag=True,
        help="Dark objects on a light background (e.g. bright-field colloids): invert the "
        "image first (max - value of its pixel type).  Not with --gain.",
    ),
    click.option(
        "--series", type=click.IntRange(min=0), metavar="N",
        help="Image series to read (0-based), for files that hold several: a multi-position "
        "OME-TIFF, or a multi-page TIFF whose pages differ in shape.",
    ),
    click.option(
        "--pixel-size", type=POSITIVE, metavar="UM",
        help="Pixel size in µm (x and y); adds x_um, y_um columns.  "
        "[default: from the file's metadata, if any]",
    ),
    click.option(
        "--z-step", type=POSITIVE, metavar="UM",
        help="Distance between z planes in µm; adds z_um for z-stacks.  "
        "[default: from the file's metadata, if any]",
    ),
]


def _none_word(word):
    """A callback turning the command line's word for None (``auto``) into None."""
    def callback(ctx, param, value):
        return None if value == word else value

    return callback


def _config_option(name: str, help: str | None = None):
    """The click option of the :class:`~spotfit.config.FitConfig` field `name`, from its
    metadata (name, type, bounds, default, choices, help; another `help` for a command that
    uses the field differently)."""
    meta = option_metadata()[name]
    kind, default, decls = meta["kind"], meta["default"], meta["cli"]
    help = help or meta["help"]
    extra = {"help": help, "show_default": default is not None}
    if meta["metavar"]:
        extra["metavar"] = meta["metavar"]
    if kind == "flag":
        if default is None:  # --on/--off, neither given: None
            return click.option(decls, name, default=None, help=help)
        if "/" in decls:  # --on/--off with a default
            return click.option(decls, name, default=default, show_default=True, help=help)
        return click.option(decls, name, is_flag=True, default=default, help=help)
    if kind == "choice":
        choices = tuple(meta["choices"])
        if meta["auto"]:
            choices, default = (meta["auto"],) + choices, meta["auto"]
            extra.update(show_default=True, callback=_none_word(meta["auto"]))
        return click.option(decls, name, type=click.Choice(choices), default=default, **extra)
    if name == "sigma":  # a number, or "auto": measured on the image (spotfit.psf)
        return click.option(decls, name, type=SigmaType(), default=default, **extra)
    if kind == "whole":
        kind_type = click.IntRange(min=meta["low"])
    else:
        low = meta["low"]
        low = int(low) if float(low).is_integer() else low  # help shows x>0, not x>0.0
        kind_type = FiniteFloatRange(min=low, min_open=not meta["inclusive"])
    return click.option(decls, name, type=kind_type, default=default, **extra)


def _config_options(group: str) -> list:
    """Options of the FitConfig fields of `group` ("detection", "fit" or "run"), in order."""
    return [_config_option(name) for name, meta in option_metadata().items()
            if meta["group"] == group]


def _out_options(what):
    return [
        click.option(
            "--out", "-o", type=click.Path(dir_okay=False), default=STDOUT, metavar="FILE",
            help=f"Output CSV file for the {what} of one IMAGE (written atomically).  "
            "[default: CSV on standard output]",
        ),
        click.option(
            "--out-dir", type=click.Path(file_okay=False), metavar="DIR",
            help="Write <stem>.csv and a <stem>.json sidecar per input into DIR (created if "
            "needed); required for several inputs or a folder.",
        ),
        click.option(
            "--skip-existing", is_flag=True,
            help="With --out-dir: skip inputs whose outputs exist and were made from the same "
            "file with the same parameters (resume an interrupted run).",
        ),
    ]


class BlockSizeType(click.ParamType):
    """``N`` (every axis) or ``ZxYxX`` / ``YxX``: core size of a block, pixels."""

    name = "block_size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(v) for v in str(value).lower().split("x"))
        except ValueError:
            sizes = ()
        if not sizes or any(v < 1 for v in sizes):
            self.fail(f"{value!r} is not a block size (N, YxX or ZxYxX positive integers)",
                      param, ctx)
        return sizes[0] if len(sizes) == 1 else sizes


_BLOCK_OPTIONS = [
    click.option(
        "--block-size", type=BlockSizeType(), default=None, metavar="N|ZxYxX",
        help="Zarr / OME-Zarr input (fitted block by block): core size of a block in pixels "
        "(array order).  [default: from the storage chunks and a memory budget of ~0.5 GB "
        "per block]",
    ),
    click.option(
        "--scheduler", metavar="ADDRESS", default=None, envvar="SPOTFIT_SCHEDULER",
        help="Run on the Dask cluster at ADDRESS (tcp://host:8786), or local:N for N local "
        "worker processes: the blocks of a Zarr / OME-Zarr input, or with --out-dir one task "
        "per file.  [default: this process (and --workers); env SPOTFIT_SCHEDULER]",
    ),
]


def _cap_workers(workers):
    """At most one worker per available core; a note when the user asked for more."""
    if workers is None:
        return None
    from spotfit.batch import available_cores  # standard library only

    cores = available_cores()
    if workers > cores:
        click.echo(
            f"Note: --workers {workers} is more than the {cores} available cores; using {cores}",
            err=True,
        )
        return cores
    return workers


def _camera(baseline, gain, em_gain, read_noise):
    from spotfit.camera import Camera

    return Camera(baseline=baseline, gain=gain, em_gain=em_gain, read_noise=read_noise)


def _write_csv(table, out) -> str:
    """Write `table` to `out` (see :mod:`spotfit._atomic`) or to stdout; return where it went."""
    if out == STDOUT:
        # Render first so that a failure cannot leave half a table on stdout;
        # the same bytes write_table puts in a file.
        from spotfit.table import to_csv_bytes

        data = to_csv_bytes(table)
        stream = getattr(sys.stdout, "buffer", sys.stdout)
        if stream is None:
            raise click.ClickException(
                "standard output is closed: cannot write the table; give --out FILE"
            )
        try:
            stream.write(data)
            stream.flush()
        except OSError as exc:
            _silence_stdout()
            if _is_broken_pipe(exc):  # e.g. `spotfit fit img.tif | head`
                sys.exit(1)
            raise click.ClickException(
                f"cannot write the table to standard output ({exc.strerror or exc}); "
                "give --out FILE"
            ) from exc
        return "stdout"
    from spotfit._atomic import remove_stale_temporaries
    from spotfit.table import write_table

    with _UserErrors(what=out):
        remove_stale_temporaries(out)  # left by a killed run (never a live run's)
        write_table(table, out)
    return out


def _write_format(table, info, image, out, fmt) -> str:
    """``fit --format``: write `table` as ThunderSTORM, Picasso or Parquet (spotfit.export)."""
    from spotfit.export import export
    from spotfit.lighttable import as_frame

    shape = info["shape"]
    with _UserErrors(what=out):
        written = export(
            as_frame(table), out, fmt, pixel_size=info["pixel_size_um"], z_step=info["z_step_um"],
            width=shape[-1], height=shape[-2], frames=info["frames"],
            source=os.path.abspath(image), dtype=info["dtype"], where=image,
        )
    return ", ".join(written)


def _silence_stdout():
    """After a failed write, point stdout at /dev/null so exit does not complain.

    The unwritten data stay in Python's buffer, which is flushed (again) at
    exit: into /dev/null now, instead of a second error message.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _fit_config(params: dict, groups, workers=None):
    """FitConfig from a command's options of the field `groups` (None: the library's default)."""
    from spotfit.config import FitConfig

    names = [n for n, meta in option_metadata().items() if meta["group"] in groups]
    given = {n: params[n] for n in names if params.get(n) is not None}
    return FitConfig(**given, workers=workers)


# ---------------------------------------------------------------------------
# The program: signals, warnings and errors around every command
# ---------------------------------------------------------------------------
#: Exit status after Ctrl-C (SIGINT) and SIGTERM: 128 + the signal number,
#: as a shell reports a process killed by that signal.
EXIT_INTERRUPTED = 128 + 2
EXIT_TERMINATED = 128 + 15


class _Warnings:
    """Show warnings as single ``Warning: <message>`` lines on stderr, each once.

    SpotfitWarning (a UserWarning) and RuntimeWarning (numpy's overflow and
    invalid-value warnings) are shown; deprecation noise from libraries is not.
    """

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        self.seen = set()
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        warnings.showwarning = self.show
        return self

    def show(self, message, category, filename, lineno, file=None, line=None):
        text = _one_line(_as_options(message))
        if text and text not in self.seen:
            self.seen.add(text)
            from spotfit.progress import clear

            clear()  # a progress bar being drawn: the warning starts on a clean line
            click.echo(f"Warning: {text}", err=True)

    def __exit__(self, *exc_info):
        self._catch.__exit__(*exc_info)
        return False


class _Program(click.Group):
    """The ``spotfit`` group: runs a command with spotfit's error and signal policy.

    Whatever happens, the process ends with one ``Error:`` line (or none)
    and an exit status (0 success, 1 error, 2 usage error, 130 SIGINT,
    143 SIGTERM), never with a traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import threading

        previous = None
        if threading.current_thread() is threading.main_thread():
            from spotfit.errors import raise_terminated, redeliver_interrupts_from_finalizers

            previous = signal.signal(signal.SIGTERM, raise_terminated)
            redeliver_interrupts_from_finalizers()
        try:
            with _Warnings():
                code = self._run(args, prog_name, complete_var, **extra)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        _exit_without_collecting()
        sys.exit(code)

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        """Run the command; its exit status (messages already printed)."""
        from spotfit._jit import announce_compilation

        # a line on stderr if kernels compile (first run); SPOTFIT_COMPILE_NOTICE=0: none
        announce_compilation(os.environ.get("SPOTFIT_COMPILE_NOTICE", "1") != "0")
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except (click.Abort, KeyboardInterrupt, EOFError) as exc:
            return _interrupted(exc)
        except (MemoryError, ValueError) as exc:
            if not _is_memory_error(exc):
                return self._bug(exc)
            click.echo("Error: not enough memory for this image with these options "
                       "(try smaller --window or --sigma values, or fewer --workers)", err=True)
            return 1
        except OSError as exc:
            if _is_broken_pipe(exc):
                _silence_stdout()
                return 1
            click.echo(f"Error: {_one_line(_os_message(exc))}", err=True)
            return 1
        except Exception as exc:
            return self._bug(exc)

    @staticmethod
    def _bug(exc) -> int:
        """A bug: one line, a traceback only on request."""
        if os.environ.get("SPOTFIT_TRACEBACK"):
            raise exc
        click.echo(
            f"Error: internal error, please report it with the command line: "
            f"{type(exc).__name__}: {_one_line(exc)} (set SPOTFIT_TRACEBACK=1 to see where)",
            err=True,
        )
        return 1


def _exit_without_collecting() -> None:
    """At interpreter exit, skip the garbage collections over what is left (once).

    After the last ``atexit`` handler, Python collects garbage while it tears its
    modules down, walking every object still alive: after a fit, the ~10^5 that
    numba's types and compiled kernels keep, 0.1-0.4 s of a small image's run.
    ``gc.freeze()`` (registered here, run at exit) leaves them to the operating
    system; everything of spotfit's is written and closed by then (tables and
    sidecars atomically, in ``with`` blocks; stdout and stderr are flushed by the
    interpreter after this), and objects that reference counting frees are still
    finalized as usual.
    """
    if _EXIT_HOOK:
        return
    import atexit
    import gc

    atexit.register(gc.freeze)
    _EXIT_HOOK.append(gc.freeze)


_EXIT_HOOK = []  # the atexit handler, once registered


def _is_memory_error(exc) -> bool:
    """MemoryError, or numpy refusing an array larger than the address space."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, ValueError) and (
        "array is too big" in text or "Maximum allowed size exceeded" in text
    )


def _interrupted(exc) -> int:
    from spotfit.errors import Terminated

    chain, seen = exc, 0
    while chain is not None and seen < 5:  # click wraps KeyboardInterrupt in Abort
        if isinstance(chain, Terminated):
            click.echo("Error: terminated (SIGTERM); no partial output was left", err=True)
            return EXIT_TERMINATED
        chain, seen = chain.__cause__ or chain.__context__, seen + 1
    click.echo("Error: interrupted (SIGINT); no partial output was left", err=True)
    return EXIT_INTERRUPTED


def _is_broken_pipe(exc) -> bool:
    import errno

    return isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE


def _os_message(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------
@click.group(cls=_Program, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True,
    callback=_version_callback, help="Show the version and exit.",
)
def main():
    """Detect fluorescent spots in microscopy images and fit Gaussian PSF models.

    Coordinates are 0-based pixel centres: x = column, y = row, z = plane.
    Widths are Gaussian sigma in pixels, angles in radians.  Intensities are
    in photons when --gain is given, otherwise in ADU above --baseline.

    Examples:

    \b
      spotfit simulate sim.tif --shape 128x160 --n-spots 40 --seed 1
      spotfit detect sim.tif --baseline 100 --gain 1 --out candidates.csv
      spotfit fit sim.tif --baseline 100 --gain 1 --out spots.csv
      spotfit export spots.csv --format thunderstorm --pixel-size 0.1
    """


@main.command(context_settings=CONTEXT_SETTINGS)
@_apply(_IMAGE_OPTIONS)
@_apply(_config_options("detection"))
@_apply(_camera_options(note="  With --gain, the detection threshold uses the camera's noise model."))
@_apply(_out_options("candidates"))
@_apply(_config_options("run"))
@_apply(_BLOCK_OPTIONS)
def detect(**params):
    """Find spot candidates in IMAGE (image files or folders) without fitting them.

    Writes one row per candidate: frame, x, y (z for z-stacks; integer pixel
    positions of the local maxima of the filtered image) and score (their
    signal-to-noise ratio).  Several files or folders need --out-dir.
    """
    _fit_or_detect("detect", params)


def _auto_sigma(sigma, sigma_z, images, batch, camera, axes, channel):
    """``--sigma auto``: the PSF sigma (and axial sigma, unless given) measured on the
    one IMAGE (:func:`spotfit.psf.estimate_sigma`), printed on stderr."""
    if sigma != "auto":
        return sigma, sigma_z
    if batch:
        raise click.UsageError("--sigma auto measures the PSF of one IMAGE; run it on one file "
                               "and pass the value it prints to the batch.")
    from spotfit.psf import estimate_sigma

    est = estimate_sigma(images[0], camera=camera, axes=axes, channel=channel)
    click.echo(f"{images[0]}: {est.describe()}", err=True)
    return est.sigma, sigma_z if sigma_z is not None else est.sigma_z


def _is_batch(images, out_dir) -> bool:
    if out_dir is not None or len(images) > 1:
        return True
    path = images[0]
    if os.path.isdir(path) and not _is_zarr(path):
        return True
    if os.path.exists(path) or not any(c in path for c in "*?["):
        return False
    import glob

    return bool(glob.glob(path))  # a pattern matching nothing is a missing file


def _is_zarr(path) -> bool:
    """A Zarr folder is one image (:func:`spotfit.readers.is_zarr`, without importing it)."""
    return any(os.path.isfile(os.path.join(path, m)) for m in (".zgroup", ".zarray", "zarr.json"))


def _check_outputs(images, out, out_dir, skip_existing) -> bool:
    """Check --out / --out-dir / --skip-existing against the inputs; True for a batch.

    Runs before anything is imported, so these usage errors answer at once.
    """
    if not _is_batch(images, out_dir):
        if skip_existing:
            raise click.UsageError("--skip-existing needs --out-dir.")
        return False
    if out_dir is None:
        if len(images) == 1 and os.path.isdir(images[0]):
            raise click.ClickException(
                f"{images[0]}: is a directory, not a TIFF file; to process the TIFF files "
                "in it, give --out-dir DIR"
            )
        raise click.UsageError(
            "several inputs (or a folder or pattern) need --out-dir DIR: one CSV per input "
            "is written there."
        )
    if out != STDOUT:
        raise click.UsageError(
            "--out names the output of one IMAGE; with several inputs or --out-dir, "
            "outputs are named after the inputs: drop --out."
        )
    return True


#: How to read the inputs: options of fit and detect passed on as they are.
_INPUT_PARAMS = ("axes", "channel", "invert", "series", "pixel_size", "z_step")


def _fit_or_detect(task, params):
    """``spotfit fit``/``detect``: one file to stdout / --out, or a batch into --out-dir."""
    p = params
    fmt, qc = p.get("fmt", "csv"), p.get("qc", False)
    batch = _check_outputs(p["images"], p["out"], p["out_dir"], p["skip_existing"])
    if fmt != "csv" and batch:
        raise click.UsageError(
            f"--format {fmt} writes the table of one IMAGE; with --out-dir, convert the CSVs "
            f"with: spotfit export <out-dir>/<stem>.csv --format {fmt}"
        )
    if fmt != "csv" and p["out"] == STDOUT:
        raise click.UsageError(f"--format {fmt} needs --out FILE.")
    if qc and not batch and p["out"] == STDOUT:
        raise click.UsageError("--qc writes <stem>_qc.png beside the table: give --out FILE.csv "
                               "or --out-dir DIR.")
    if not batch and fmt == "csv" and p["out"].lower().endswith(".json"):
        raise click.UsageError(f"--out {p['out']}: its JSON sidecar would have the same name; "
                               "name the table .csv")
    workers = _cap_workers(p["workers"])
    from spotfit.batch import share_cores  # standard library only

    # --workers: cores in total; for one file, the solver's threads (a batch shares them out)
    threads = workers if batch else share_cores(workers, 1)[1]
    with _UserErrors():
        camera = _camera(p["baseline"], p["gain"], p["em_gain"], p["read_noise"])
        if p.get("sigma") == "auto":
            p = dict(p)
            p["sigma"], p["sigma_z"] = _auto_sigma(p["sigma"], p.get("sigma_z"), p["images"], batch,
                                                   camera, p.get("axes"), p.get("channel"))
        config = _fit_config(p, ("detection", "fit") if task == "fit" else ("detection",),
                             workers=threads)
    inputs = {k: p[k] for k in _INPUT_PARAMS}
    if batch:
        _batch(task, p["images"], p["out_dir"], config, camera, inputs, workers,
               p["skip_existing"], qc, scheduler=p.get("scheduler"))
    else:
        _single(task, p["images"][0], p["out"], config, camera, inputs, workers, fmt, qc,
                blocks={"block_size": p.get("block_size"), "scheduler": p.get("scheduler")})


def _batch(task, images, out_dir, config, camera, inputs, workers, skip_existing, qc,
           scheduler=None):
    """Every file into --out-dir (:func:`spotfit.batch.run_batch`; fit: with report.html)."""
    from spotfit.batch import run_batch

    with _UserErrors():
        summary = run_batch(images, out_dir, task=task, config=config, camera=camera,
                            workers=workers, skip_existing=skip_existing, qc=qc,
                            report=task == "fit", scheduler=scheduler, **inputs)
    for result in summary.results:
        for note in result.notes:
            click.echo(f"Note: {result.input}: {_as_options(note)}", err=True)
    for result in summary.failed:
        click.echo(f"Error: {result.input}: {_as_options(result.message)}", err=True)
    click.echo(summary.line(), err=True)
    if summary.failed:
        sys.exit(1)


def _sidecar_of(out):
    """The JSON sidecar of a table written to `out` (``<stem>.json``), or None.

    None for standard output and for a device or FIFO (written in place:
    there is no folder of ours to put a sidecar in).
    """
    if out == STDOUT or _is_device(out):
        return None
    from spotfit.provenance import sidecar_path

    return sidecar_path(out)


def _single(task, image, out, config, camera, inputs, workers, fmt="csv", qc=False, blocks=None):
    """One file: its table to stdout or --out (with its sidecar), a summary line."""
    import time

    if image != "-" and not os.path.lexists(image):
        # before importing the library (numba: ~0.6 s) for a mistyped path
        raise click.ClickException(f"{image}: no such file")
    from spotfit import api, provenance
    from spotfit.progress import ProgressBar, wanted

    start = time.perf_counter()
    sidecar = _sidecar_of(out) if fmt == "csv" else None
    _check_not_input(out, [image])
    if sidecar is not None:
        _check_not_input(sidecar, [image])
    bar = ProgressBar(f"spotfit {task}", {0: 1}) if wanted() else None
    if bar is not None:
        bar.draw(force=True)
    with _UserErrors(what=image):
        try:
            st = provenance.input_stat(image) if sidecar is not None else None
            table, info = api.process_file(
                image, task, config=config, camera=camera, **inputs, **(blocks or {}),
                progress=None if bar is None else (lambda *done: bar.update(0, *done)),
                light=True)  # pandas only where a step needs it (spotfit.lighttable)
        finally:
            if bar is not None:
                bar.close()
    for note in info["notes"]:
        click.echo(f"Note: {image}: {_as_options(note)}", err=True)
    picture = None
    if qc:
        from spotfit.lighttable import as_frame
        from spotfit.overlay import qc_path, write_qc

        picture = (qc_path(out), lambda path: write_qc(
            path, image, as_frame(table), axes=inputs["axes"], series=inputs["series"],
            channel=0 if inputs["channel"] == "all" else inputs["channel"]))
        _check_not_input(picture[0], [image])
    if sidecar is not None:
        params = provenance.parameters(task, config, camera, workers=workers, **inputs)
        run = {"workers": workers, "processes": 1, "solver_threads": config.workers}
        t = time.perf_counter()

        def describe(csv_bytes):
            timings = dict(info["timings_s"], write=time.perf_counter() - t,
                           total=time.perf_counter() - start)
            return provenance.document(task, image, st, table, info, params, out, csv_bytes,
                                       timings, run)

        with _UserErrors(what=out):
            from spotfit._atomic import remove_stale_temporaries

            for path in (out, sidecar) + ((picture[0],) if picture else ()):
                remove_stale_temporaries(path)  # left by a killed run (never a live run's)
            provenance.write_with_sidecar(table, out, sidecar, describe, picture)
        where = f"{out} + {sidecar}"
    else:
        where = _write_csv(table, out) if fmt == "csv" else _write_format(table, info, image, out,
                                                                          fmt)
        if picture:
            with _UserErrors(what=picture[0]):
                picture[1](picture[0])
    what = f"{image} ({_described(info, task, camera)})"
    if task == "detect":
        click.echo(f"{what}: {len(table)} candidates -> {where}", err=True)
    else:
        n = len(table)
        converged = int((table["status"] == "converged").sum())
        click.echo(f"{what}: {n} spots ({converged} converged, {n - converged} flagged) -> {where}",
                   err=True)
    if picture:
        click.echo(f"{image}: picture of the fits -> {picture[0]}", err=True)


def _described(info: dict, task: str, camera) -> str:
    """How the file was read, for the summary line: axes, frames or planes, channel,
    pixel size (and z step), and for fits the unit (photons or ADU)."""
    frames, shape = info["frames"], info["shape"]
    if info["axes"] == "TZYX":
        parts = ["ZYX", f"{shape[1]} planes"] if frames == 1 else [
            "TZYX", f"{frames} frames of {shape[1]} planes"]
    else:
        parts = ["YX" if frames == 1 else "TYX", f"{frames} frame{'s' if frames != 1 else ''}"]
    if info["channel"] == "all":
        parts.append(f"{info['channels']} channels")
    elif info["channel"] is not None:
        parts.append(f"channel {info['channel']}")
    px, dz = info["pixel_size_um"], info["z_step_um"]
    parts.append(f"{px:g} µm/px" if px is not None else "pixel size unknown")
    if dz is not None:
        parts.append(f"{dz:g} µm/plane")
    if task == "fit":
        parts.append("photons" if camera.calibrated else "ADU")
    return ", ".join(parts)


@main.command(context_settings=CONTEXT_SETTINGS)
@_apply(_IMAGE_OPTIONS)
@_apply(_config_options("detection"))
@_apply(_camera_options(
    note="  With it, results are in photons and the default estimator is mle; "
    "without it, in ADU above the baseline with lsq."
))
@_apply(_config_options("fit"))
@_apply(_out_options("fitted spots"))
@click.option(
    "--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="csv", show_default=True,
    help="Output format of one IMAGE: csv, or thunderstorm / picasso / parquet (need --out; "
    "see spotfit export).",
)
@_apply(_config_options("run"))
@_apply(_BLOCK_OPTIONS)
@click.option(
    "--qc", is_flag=True,
    help="Also write <stem>_qc.png beside each table: the image with its fits (see "
    "spotfit show).",
)
def fit(**params):
    """Detect and fit every spot of IMAGE (image files or folders): position, intensity, widths.

    Writes one row per spot (columns and units: see the README), then a
    one-line summary on stderr.  Fits that did not converge are kept, with
    their reason in the status column.  With --out FILE.csv, a JSON sidecar
    FILE.json records how the table was made.  Several files or folders
    need --out-dir: one CSV and one JSON sidecar per input, and report.html.
    """
    from spotfit._jit import compile_alongside

    if params.get("workers") != 1:
        # on a first run only: the covariance kernel in a second process
        # (before the first cache miss only if the inputs exist: no compiling for a typo)
        # (and the score gate's kernel here while waiting for it, not after)
        compile_alongside("spotfit.solver:compile_covariance_kernel",
                          meanwhile="spotfit.single:compile_quadrupole_kernel",
                          early=all(os.path.exists(str(path)) for path in params.get("images") or ()))
    try:
        _fit_or_detect("fit", params)
    finally:
        compile_alongside(None)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("out", type=click.Path(dir_okay=False), metavar="OUT.tif")
@click.option(
    "--shape", type=ShapeType(), default="256x256", show_default=True,
    help="ROWSxCOLS for one image, or FRAMESxROWSxCOLS for a time series (TYX).",
)
@click.option(
    "--n-spots", type=click.IntRange(min=0), default=50, show_default=True,
    help="Spots per frame.",
)
@click.option(
    "--photons", type=PhotonsType(), default="1000", show_default=True,
    help="Integrated photons per spot: one value, or LO,HI to draw each spot's "
    "uniformly from [LO, HI).",
)
@click.option(
    "--background", type=NON_NEGATIVE, default=10.0, show_default=True,
    help="Background in photons per pixel.",
)
@click.option(
    "--sigma", type=POSITIVE, default=1.3, show_default=True,
    help="PSF sigma in pixels (Gaussian sigma, not FWHM).",
)
@click.option(
    "--min-separation", type=NON_NEGATIVE,
    help="Minimum distance between spot centres of a frame, in pixels.  [default: none]",
)
@click.option(
    "--border", type=NON_NEGATIVE, default=0.0, show_default=True,
    help="Minimum distance of spot centres from the outermost pixel centres, in pixels.",
)
@_apply(_camera_options(baseline=100.0, gain=1.0))
@click.option(
    "--seed", type=click.IntRange(min=0),
    help="Random seed, for a reproducible image.  [default: a fresh random one]",
)
@click.option(
    "--truth", type=click.Path(dir_okay=False), metavar="FILE.csv",
    help="Ground-truth CSV (frame, x, y, intensity, sigma_x, sigma_y, angle, offset: the fit "
    "table's names; photons and photons/px).  "
    "[default: OUT with the suffix replaced by _truth.csv]",
)
def simulate(out, shape, n_spots, photons, background, sigma, min_separation, border,
             baseline, gain, em_gain, read_noise, seed, truth):
    """Write a simulated camera image of Gaussian spots to OUT.tif, with its truth.

    Spots are placed uniformly at random, then photon (shot) noise, EM gain
    noise, read noise and the camera's ADU conversion are applied; the image
    is stored as uint16 ADU in an ImageJ TIFF (axes YX or TYX).
    """
    if truth is None:
        truth = os.path.splitext(out)[0] + "_truth.csv"
    if os.path.realpath(truth) == os.path.realpath(out) and not _is_device(out):
        raise click.ClickException(f"{truth}: --truth must differ from the image path")
    with _UserErrors():
        from spotfit.simulation import simulate as simulate_image, write_simulation

        camera = _camera(baseline, gain, em_gain, read_noise)
        image, table = simulate_image(
            shape, n_spots=n_spots, photons=photons, background=background, sigma=sigma,
            camera=camera, min_separation=min_separation, border=border, seed=seed,
        )
    axes = "TYX" if len(shape) == 3 else "YX"
    # The image and its truth are written as a pair: both, or neither.
    for path in (out, truth):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise click.ClickException(f"{path}: cannot write, directory {folder!r} does not exist")
    with _UserErrors(what=out):
        write_simulation(out, truth, image, table, axes)
    n_frames = shape[0] if len(shape) == 3 else 1
    click.echo(
        f"{out}: {len(table)} spots in {n_frames} frame(s) of {shape[-2]}x{shape[-1]} px; "
        f"truth -> {truth}",
        err=True,
    )


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("table", type=click.Path(dir_okay=False), metavar="SPOTS.csv")
@click.option(
    "--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
    help="thunderstorm: ThunderSTORM CSV (nm, 1-based frames, pixel-corner origin); picasso: "
    "Picasso HDF5 locs + YAML; parquet: the whole table as Parquet; csv: spotfit CSV.",
)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False), metavar="FILE",
    help="Output file (written atomically).  [default: SPOTS with _thunderstorm.csv, "
    "_locs.hdf5 or .parquet]",
)
@click.option(
    "--pixel-size", type=POSITIVE, metavar="UM",
    help="Pixel size in µm, for nm coordinates.  [default: from the table's x_um column, "
    "the image, or the run's sidecar]",
)
@click.option(
    "--z-step", type=POSITIVE, metavar="UM",
    help="Distance between z planes in µm (z-stack tables).  [default: from z_um]",
)
@click.option(
    "--image", type=click.Path(dir_okay=False), metavar="IMAGE",
    help="The image the table was fitted from: Picasso needs its size (read from its "
    "header).  [default: the sidecar <stem>.json beside SPOTS, if any]",
)
@click.option("--axes", metavar="AXES", help="Axes of --image, as for fit.")
@click.option(
    "--rows", type=click.Choice(("converged", "all")), default=None,
    help="Rows for ThunderSTORM and Picasso: converged fits only, or all.  "
    "[default: converged]",
)
@click.option(
    "--channel", type=click.IntRange(min=0), metavar="N",
    help="The channel to export from a table of --channel all.",
)
def export(table, fmt, out, pixel_size, z_step, image, axes, rows, channel):
    """Write a spotfit table (CSV or Parquet) for ThunderSTORM, Picasso or pandas.

    \b
      spotfit export spots.csv --format thunderstorm --pixel-size 0.16
      spotfit export spots.csv --format picasso --image movie.tif
      spotfit export spots.csv --format parquet
    """
    with _UserErrors():
        from spotfit import export as ex

        out = out or ex.default_output(table, fmt)
        _check_not_input(out, [table] + ([image] if image else []))
        frame = ex.read_table(table)
        info = {} if image is not None else ex.sidecar_info(table)
        if pixel_size is None and "x_um" not in frame.columns:
            pixel_size = info.get("pixel_size")
        written = ex.export(
            frame, out, fmt, pixel_size=pixel_size, z_step=z_step, rows=rows, channel=channel,
            width=info.get("width"), height=info.get("height"), frames=info.get("frames"),
            source=info.get("source"), dtype=info.get("dtype"), where=table, image=image,
            axes=axes,
        )
    click.echo(f"{table}: {fmt} -> {', '.join(written)}", err=True)
# ---------------------------------------------------------------------------
# Pictures: spotfit show, spotfit render (and fit --qc)
# ---------------------------------------------------------------------------
class PercentilesType(click.ParamType):
    """``LO,HI`` percentiles, 0 <= LO < HI <= 100 -> (lo, hi)."""

    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            lo, hi = (float(p) for p in str(value).split(","))
        except ValueError:
            lo = hi = float("nan")
        if not (0 <= lo < hi <= 100):
            self.fail(f"{value!r} is not LO,HI with 0 <= LO < HI <= 100 (e.g. 0.5,99.8).",
                      param, ctx)
        return lo, hi


#: Options of ``fit`` that ``show`` takes too (to fit an image given without a table).
_SHOW_FIT_PARAMS = [
    p for p in fit.params
    if p.name not in ("images", "out", "out_dir", "skip_existing", "qc", "fmt", "block_size",
                      "scheduler")
]


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("image", type=click.Path(dir_okay=False), metavar="IMAGE")
@click.argument("spots", required=False, type=click.Path(dir_okay=False), metavar="[SPOTS.csv]")
@click.option(
    "--out", "-o", required=True, type=click.Path(dir_okay=False), metavar="FILE.png",
    help="Picture to write (PNG; .pdf and .svg work too), atomically.",
)
@click.option(
    "--frame", type=click.IntRange(min=0),
    help="Time point to show (0-based) with its spots.  [default: maximum projection over "
    "time, all spots]",
)
@click.option(
    "--crop", metavar="X0:X1,Y0:Y1",
    help="Show columns X0..X1-1 and rows Y0..Y1-1 only (e.g. 100:300,50:200).",
)
@click.option(
    "--zoom", type=POSITIVE,
    help="Screen pixels per image pixel.  [default: an integer making the long side >= 768 px]",
)
@click.option(
    "--percentiles", type=PercentilesType(), default="0.5,99.8", show_default=True,
    help="Percentiles of the shown pixels mapped to black and white.",
)
@click.option(
    "--color", type=click.Choice(("auto", "status", "z", "frame")), default="auto",
    show_default=True,
    help="Colour the fits by status (legend with counts), or by z or frame (colour bar; "
    "flagged fits dashed).  auto: z for z-stacks, else status.",
)
def show(image, spots, out, frame, crop, zoom, percentiles, color, **fit_options):
    """Draw IMAGE with its fitted spots into a picture (quality control).

    Each fit is an ellipse of 2 sigma around its position (rotated by its
    angle), coloured by status, over the image contrast-stretched by
    percentiles; a time series or z-stack is shown as its maximum
    projection unless --frame is given.  Without SPOTS.csv, IMAGE is
    fitted first with the fit options below (the same as spotfit fit);
    with it, they are not used (except --axes, --channel and --series).
    """
    _check_not_input(out, [image] + ([spots] if spots else []))
    axes, channel = fit_options["axes"], fit_options["channel"]
    if channel == "all":
        raise click.UsageError("--channel all: show one channel at a time (--channel N).")
    config = camera = None
    if spots is None:
        with _UserErrors():
            config = _fit_config(fit_options, ("detection", "fit"),
                                 workers=_cap_workers(fit_options["workers"]))
            camera = _camera(fit_options["baseline"], fit_options["gain"],
                             fit_options["em_gain"], fit_options["read_noise"])
    from spotfit.overlay import save, show as draw

    extra = {"invert": True} if spots is None and fit_options.get("invert") else {}
    with _UserErrors(what=image):
        figure = draw(image, spots, frame=frame, crop=crop, zoom=zoom, percentiles=percentiles,
                      color=color, config=config, camera=camera, axes=axes, channel=channel,
                      series=fit_options["series"], **extra)
    with _UserErrors(what=out):
        save(figure, out)
    click.echo(f"{image}: picture of the fits -> {out}", err=True)


show.params.extend(_SHOW_FIT_PARAMS)

_RENDER_SUFFIXES = (".tif", ".tiff", ".png")


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("spots", type=click.Path(dir_okay=False), metavar="SPOTS.csv")
@click.option(
    "--out", "-o", required=True, type=click.Path(dir_okay=False), metavar="FILE.tif|FILE.png",
    help="Output: a float32 TIFF (localisations per pixel, pixel size in the ImageJ "
    "metadata) or an RGB preview PNG.",
)
@click.option("--pixel-size", type=POSITIVE, required=True, metavar="NM",
              help="Pixel size of the rendered image, nm.")
@click.option(
    "--method", type=click.Choice(("gaussian", "histogram")), default="gaussian",
    show_default=True,
    help="gaussian: each localisation a normalised Gaussian of its own precision "
    "(x_err, y_err); histogram: localisations counted per pixel.",
)
@click.option("--sigma", type=POSITIVE, metavar="NM",
              help="gaussian: one fixed width for all localisations, nm.  "
              "[default: each one's precision]")
@click.option("--min-sigma", type=NON_NEGATIVE, metavar="NM",
              help="gaussian: smallest width, nm.  [default: half of --pixel-size]")
@click.option("--z-step", type=POSITIVE, metavar="NM",
              help="Render a 3D stack with slices this thick, nm (needs a z column).")
@click.option("--sigma-z", type=POSITIVE, metavar="NM",
              help="gaussian, 3D: one fixed axial width, nm.  "
              "[default: each one's z_err, at least half of --z-step]")
@click.option("--camera-pixel-size", type=POSITIVE, metavar="NM",
              help="Pixel size of the fitted image, nm.  [default: from the x_um column, or "
              "the table's JSON sidecar]")
@click.option("--camera-z-step", type=POSITIVE, metavar="NM",
              help="Distance between planes of the fitted stack, nm.  [default: from the z_um "
              "column, or the sidecar]")
@click.option("--shape", type=ShapeType(), metavar="ROWSxCOLS",
              help="Size of the fitted image in its pixels (PLANESxROWSxCOLS for stacks): the "
              "rendered field.  [default: from the sidecar, else up to the last localisation]")
@click.option("--status", default="converged", show_default=True, metavar="NAMES|all",
              help="Render rows with these statuses (comma-separated), or all rows.")
@click.option("--min-intensity", type=FINITE, metavar="SIGNAL",
              help="Render rows with at least this intensity (the table's unit).")
@click.option("--max-err", type=POSITIVE, metavar="NM",
              help="Render rows whose precision max(x_err, y_err) is at most this, nm.")
@click.option("--color", type=click.Choice(("time", "z")),
              help="PNG output: colour by frame or by z (hue), brightness by density.")
def render(spots, out, pixel_size, method, sigma, min_sigma, z_step, sigma_z,
           camera_pixel_size, camera_z_step, shape, status, min_intensity, max_err, color):
    """Render the localisations of SPOTS.csv into a super-resolution image.

    Like Picasso Render or ThunderSTORM's visualisation: the field of the
    fitted image is cut into pixels of --pixel-size nm and every
    localisation adds 1, either to the pixel it falls into (histogram) or
    spread as a normalised Gaussian (gaussian).  Only converged rows are
    rendered unless --status says otherwise.
    """
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in _RENDER_SUFFIXES:
        raise click.UsageError(f"--out {out}: name a .tif, .tiff or .png file.")
    if color and suffix != ".png":
        raise click.UsageError("--color makes an RGB preview: give --out FILE.png.")
    _check_not_input(out, [spots])
    from spotfit import rendering as library

    keep = {"time": ("frame",), "z": ("z_nm",)}.get(color, ())
    with _UserErrors(what=spots):
        points = library.prepare(
            spots, pixel_size, method=method, sigma=sigma, min_sigma=min_sigma, z_step=z_step,
            sigma_z=sigma_z, camera_pixel_size=camera_pixel_size,
            camera_z_step=camera_z_step, shape=shape, status=status,
            min_intensity=min_intensity, max_err=max_err, keep=keep,
        )
    note = ""
    with _UserErrors(what=out):
        if suffix == ".png" and color:
            rgb, (lo, hi) = library.colour_preview(points, color)
            unit = "frame" if color == "time" else "z nm"
            note = f"; colour: {unit} {lo:g} (blue) to {hi:g} (red)"
            library.write_png(out, rgb)
        elif suffix == ".png":
            library.write_png(out, library.grey_preview(library.draw(points)))
        else:
            from spotfit.io import write_tiff

            image = library.draw(points)
            write_tiff(out, image, "ZYX" if image.ndim == 3 else "YX",
                       pixel_size=pixel_size / 1000,
                       z_step=z_step / 1000 if z_step is not None else None)
    c = points.counts
    dropped = [f"{c[k]} {label}" for k, label in (
        ("status", "by --status"), ("min_intensity", "by --min-intensity"),
        ("max_err", "by --max-err"), ("not_finite", "without finite values"),
        ("outside", "outside the field")) if c.get(k)]
    size = "x".join(str(n) for n in points.shape)
    click.echo(
        f"{spots}: {points.n} of {c['read']} localisations rendered"
        + (f" (left out: {', '.join(dropped)})" if dropped else "")
        + f" -> {out}, {size} px of {pixel_size:g} nm{note}",
        err=True,
    )


# ---------------------------------------------------------------------------
# measure: intensities at known positions
# ---------------------------------------------------------------------------
@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("image", type=click.Path(dir_okay=False), metavar="IMAGE")
@click.option(
    "--at", "at", required=True, type=click.Path(dir_okay=False), metavar="SPOTS.csv",
    help="Positions to measure: a CSV with columns x, y (and z for z-stacks), e.g. a "
    "'spotfit fit' table; its sigma_x, sigma_y, angle (sigma_z) columns set the widths.",
)
@click.option(
    "--at-frame", type=click.IntRange(min=0), metavar="N",
    help="Use only the rows of SPOTS.csv whose frame column is N (e.g. the spots of frame 0).",
)
@click.option(
    "--match-frames", is_flag=True,
    help="Measure each row of SPOTS.csv only in the frame given by its frame column "
    "(e.g. channel 1 at the spots fitted in channel 0 of the same frame).",
)
@click.option(
    "--frames", metavar="LIST",
    help="Frames to measure (0-based, ranges inclusive), e.g. 0-99,200,300-.  [default: all]",
)
@click.option(
    "--axes", metavar="AXES",
    help="Axes of the TIFF, one letter per dimension from T, Z, C, Y, X, S; overrides the "
    "file's metadata.",
)
@click.option(
    "--channel", type=ChannelType(), metavar="N|all",
    help="Channel to measure (0-based) when the file has several; 'all': every channel.",
)
@click.option("--pixel-size", type=POSITIVE, metavar="UM",
              help="Pixel size in µm; adds x_um, y_um columns.  [default: from the file]")
@click.option("--z-step", type=POSITIVE, metavar="UM",
              help="Distance between z planes in µm; adds z_um.  [default: from the file]")
@click.option(
    "--sigma", type=POSITIVE,
    help="PSF sigma in pixels for every spot, instead of the widths in SPOTS.csv.  "
    "[default: the table's sigma_x, sigma_y (angle), else 1.3]",
)
@click.option("--sigma-z", type=POSITIVE,
              help="Axial PSF sigma in planes with --sigma, for z-stacks.  [default: 2 x sigma]")
@_apply(_camera_options(
    note="  With it, results are in photons and the default estimator is mle; "
    "without it, in ADU above the baseline with lsq."
))
@_apply([_config_option("window"),
         _config_option("estimator", help="lsq, wlsq or mle, as for fit.  auto: mle with --gain, "
                        "else lsq."),
         _config_option("integrated", help="Pixel-integrated or point-sampled PSF.  [default: "
                        "integrated with --gain]"),
         _config_option("max_iter", help="mle iteration limit per measurement."),
         _config_option("min_snr", help="Measurements whose intensity / intensity_err is below "
                        "this get status low_signal (e.g. a spot that is off); their values stay "
                        "unbiased.")])
@click.option(
    "--refine", is_flag=True,
    help="Fit the positions (and widths, without --sigma) once on the sum of the frames and "
    "hold them: drift-free traces.  Adds a refined column.",
)
@click.option(
    "--aperture", type=POSITIVE, metavar="PX",
    help="Radius of the aperture sum in pixels; background from the annulus R+1 .. 2R+1.  "
    "[default: 3 x sigma]",
)
@click.option("--wide", is_flag=True,
              help="One row per spot and one intensity_<frame> column per frame (no errors).")
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False), default=STDOUT, metavar="FILE",
    help="Output CSV file (written atomically).  [default: CSV on standard output]",
)
@_apply([_config_option("workers", help="Cores to use (threads for measuring).  "
                        "[default: all cores]")])
def measure(image, at, at_frame, match_frames, frames, axes, channel, pixel_size, z_step, sigma,
            sigma_z, baseline, gain, em_gain, read_noise, window, estimator, integrated, max_iter,
            min_snr, refine, aperture, wide, out, workers):
    """Measure the intensity of spots at known positions in every frame of IMAGE.

    Positions and widths are held (from SPOTS.csv, or --sigma); intensity and
    background are fitted with the estimators and camera model of fit, with
    standard errors and a status, and measured model-free by an aperture sum
    with a local background annulus.  One row per spot and frame (see the
    README); --wide gives one row per spot.
    """
    _check_not_input(out, [image, at])
    with _UserErrors():
        from spotfit.config import FitConfig

        given = dict(sigma=sigma, sigma_z=sigma_z, window=window, estimator=estimator,
                     integrated=integrated, fix_sigma=sigma is not None, max_iter=max_iter,
                     min_snr=min_snr, workers=_cap_workers(workers))
        config = FitConfig(**{k: v for k, v in given.items() if v is not None})
        camera = _camera(baseline, gain, em_gain, read_noise)
        from spotfit.photometry import measure as measure_spots, wide as to_wide

        table = measure_spots(
            image, at, config=config, camera=camera, frames=frames, axes=axes, channel=channel,
            refine=refine, aperture=aperture, at_frame=at_frame, match_frames=match_frames,
            pixel_size=pixel_size, z_step=z_step,
        )
        result = to_wide(table) if wide else table
    where = _write_csv(result, out)
    n = len(table)
    converged = int((table["status"] == "converged").sum())
    low = int((table["status"] == "low_signal").sum())
    spots = table["spot_id"].nunique()
    click.echo(
        f"{image}: {spots} spots, {n} measurements ({converged} converged, {low} low_signal, "
        f"{n - converged - low} failed) -> {where}",
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
