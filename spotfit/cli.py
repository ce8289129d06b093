"""Command line: ``spotfit detect``, ``spotfit fit`` and ``spotfit simulate``.

The command line does no computation of its own: each command parses its
options into a :class:`spotfit.fitting.FitConfig` and a
:class:`spotfit.camera.Camera` and calls the functions a Python user calls
(:func:`spotfit.read_image`, :func:`spotfit.detection.detect`,
:func:`spotfit.fitting.fit`, :func:`spotfit.simulation.simulate`,
:func:`spotfit.simulation.write_simulation`, :func:`spotfit.table.write_table`).

Only ``click``, ``os`` and ``sys`` are imported at module level: ``spotfit
--help`` and usage errors never import numpy, scipy, pandas, scikit-image or
tifffile.  The scientific stack is imported inside the command bodies.

Errors: a :class:`spotfit.errors.SpotfitInputError` (bad file, bad option
value) or an ``OSError`` on an input or output path is printed as one line
``Error: <message>`` on stderr with exit status 1; usage errors (unknown
option, value out of range for its type) are click's, exit status 2.  All
output files are written atomically, so a failed command leaves no output
file behind, and input files are only ever opened for reading.
"""

import os
import sys

import click

#: Choices of ``--model`` and ``--estimator``.  Spelled out here (not imported
#: from spotfit.models / spotfit.estimators) so that ``--help`` stays free of
#: numpy; tests check they equal the library's ``MODEL_NAMES`` and
#: ``ESTIMATOR_NAMES``.
MODEL_CHOICES = ("rotated", "elliptical", "symmetric")
ESTIMATOR_CHOICES = ("lsq", "wlsq", "mle")

#: Float format of CSV written to stdout; the same as
#: :func:`spotfit.table.write_table` uses for files (checked by a test).
CSV_FLOAT_FORMAT = "%.8g"

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


FINITE = FiniteFloat()
POSITIVE = FiniteFloatRange(min=0, min_open=True)
NON_NEGATIVE = FiniteFloatRange(min=0)


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
            raise click.ClickException(_one_line(exc)) from exc
        if issubclass(exc_type, OSError) and not issubclass(exc_type, BrokenPipeError):
            where = self.what if self.what is not None else exc.filename
            reason = exc.strerror or exc
            message = f"{where}: {reason}" if where is not None else str(reason)
            raise click.ClickException(_one_line(message)) from exc
        return False


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


_IMAGE_OPTIONS = [
    click.argument("image", type=click.Path(dir_okay=True), metavar="IMAGE"),
    click.option(
        "--axes", metavar="AXES",
        help="Axes of the TIFF, one letter per dimension from T, Z, C, Y, X, S "
        "(e.g. TYX for a movie stored as a z-stack, ZYX for a z-stack); "
        "overrides the file's metadata.",
    ),
    click.option(
        "--channel", type=click.IntRange(min=0),
        help="Channel to use (0-based) when the file has several (C or S axis, e.g. RGB).",
    ),
    click.option(
        "--sigma", type=POSITIVE, default=1.3, show_default=True,
        help="Expected PSF sigma in pixels (Gaussian sigma, not FWHM).",
    ),
    click.option(
        "--sigma-z", type=POSITIVE,
        help="Expected axial PSF sigma in planes, for z-stacks.  [default: 2 x sigma]",
    ),
    click.option(
        "--threshold", type=POSITIVE,
        help="Detection threshold in signal-to-noise units of the filtered image.  "
        "[default: the detector's, 5]",
    ),
    click.option(
        "--min-distance", type=click.IntRange(min=1),
        help="Minimum distance between detected spots in pixels.  "
        "[default: round(1.5 x sigma)]",
    ),
]


def _out_option(what):
    return click.option(
        "--out", "-o", type=click.Path(dir_okay=False), default=STDOUT, metavar="FILE",
        help=f"Output CSV file for the {what} (written atomically).  "
        "[default: CSV on standard output]",
    )


def _camera(baseline, gain, em_gain, read_noise):
    from spotfit.camera import Camera

    return Camera(baseline=baseline, gain=gain, em_gain=em_gain, read_noise=read_noise)


def _write_csv(table, out) -> str:
    """Write `table` to `out` (atomically) or to stdout; return where it went."""
    if out == STDOUT:
        # Render first so that a failure cannot leave half a table on stdout.
        text = table.to_csv(index=False, float_format=CSV_FLOAT_FORMAT)
        try:
            click.echo(text, nl=False)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `spotfit fit img.tif | head`
            _silence_stdout()
            sys.exit(1)
        return "stdout"
    from spotfit.table import write_table

    with _UserErrors(what=out):
        write_table(table, out)
    return out


def _silence_stdout():
    """After a broken pipe, point stdout at /dev/null so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _read(image, axes, channel):
    from spotfit.io import read_image

    with _UserErrors(what=image):
        return read_image(image, axes=axes, channel=channel)


def _fit_config(**options):
    """FitConfig from the options the user gave (None: the library's default)."""
    from spotfit.fitting import FitConfig

    return FitConfig(**{k: v for k, v in options.items() if v is not None})


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True,
    callback=_version_callback, help="Show the version and exit.",
)
def main():
    """Detect fluorescent spots in microscopy TIFFs and fit Gaussian PSF models.

    Coordinates are 0-based pixel centres: x = column, y = row, z = plane.
    Widths are Gaussian sigma in pixels, angles in radians.  Intensities are
    in photons when --gain is given, otherwise in ADU above --baseline.

    Examples:

    \b
      spotfit simulate sim.tif --shape 128x160 --n-spots 40 --seed 1
      spotfit detect sim.tif --baseline 100 --gain 1 --out candidates.csv
      spotfit fit sim.tif --baseline 100 --gain 1 --out spots.csv
    """


@main.command(context_settings=CONTEXT_SETTINGS)
@_apply(_IMAGE_OPTIONS)
@_apply(_camera_options(note="  Does not change detection."))
@_out_option("candidates")
def detect(image, axes, channel, sigma, sigma_z, threshold, min_distance,
           baseline, gain, em_gain, read_noise, out):
    """Find spot candidates in IMAGE (a TIFF) without fitting them.

    Writes one row per candidate: frame, x, y (z for z-stacks; integer pixel
    positions of the local maxima of the filtered image) and score (their
    signal-to-noise ratio).
    """
    _check_not_input(out, [image])
    with _UserErrors():
        config = _fit_config(sigma=sigma, sigma_z=sigma_z, threshold=threshold,
                             min_distance=min_distance)
        camera = _camera(baseline, gain, em_gain, read_noise)
    img = _read(image, axes, channel)
    table = _detect_one(img, config, camera)
    where = _write_csv(table, out)
    click.echo(f"{image}: {len(table)} candidates -> {where}", err=True)


def _detect_one(img, config, camera):
    from spotfit.detection import detect as detect_spots

    # per-axis sigma in array order, as spotfit.fitting.fit uses for z-stacks
    sigma = (config.axial_sigma(), config.sigma, config.sigma) if img.is_3d else config.sigma
    kwargs = {"min_distance": config.min_distance, "camera": camera}
    if config.threshold is not None:
        kwargs["threshold"] = config.threshold
    with _UserErrors(what=img.path):
        return detect_spots(img, sigma, **kwargs)


@main.command(context_settings=CONTEXT_SETTINGS)
@_apply(_IMAGE_OPTIONS)
@_apply(_camera_options(
    note="  With it, results are in photons and the default estimator is mle; "
    "without it, in ADU above the baseline with lsq."
))
@click.option(
    "--window", type=click.IntRange(min=1),
    help="Half-size of the fitting window in pixels (the window is 2 x WINDOW + 1 wide).  "
    "[default: max(2, ceil(2.5 x sigma))]",
)
@click.option(
    "--model", type=click.Choice(MODEL_CHOICES), default="rotated", show_default=True,
    help="PSF model: rotated (sigma_x, sigma_y, angle), elliptical (sigma_x, sigma_y) "
    "or symmetric (one sigma).  z-stacks use elliptical for rotated.",
)
@click.option(
    "--estimator", type=click.Choice(("auto",) + ESTIMATOR_CHOICES), default="auto",
    show_default=True,
    help="lsq (least squares), wlsq (weighted by the camera noise model) or mle "
    "(Poisson maximum likelihood).  auto: mle with --gain, else lsq.",
)
@click.option(
    "--integrated/--point-sampled", default=None,
    help="Integrate the Gaussian over each pixel, or sample it at pixel centres.  "
    "[default: integrated with --gain, else point-sampled]",
)
@click.option(
    "--fix-sigma", is_flag=True,
    help="Hold the widths at --sigma (and --sigma-z) instead of fitting them.",
)
@click.option(
    "--max-iter", type=click.IntRange(min=1), default=50, show_default=True,
    help="Solver iteration limit per spot.",
)
@click.option(
    "--min-snr", type=NON_NEGATIVE, default=3.0, show_default=True,
    help="Converged fits with intensity / intensity_err below this get status low_signal.",
)
@click.option(
    "--workers", type=click.IntRange(min=1),
    help="Threads for fitting.  [default: all cores]",
)
@_out_option("fitted spots")
def fit(image, axes, channel, sigma, sigma_z, threshold, min_distance,
        baseline, gain, em_gain, read_noise, window, model, estimator, integrated,
        fix_sigma, max_iter, min_snr, workers, out):
    """Detect and fit every spot of IMAGE (a TIFF): position, intensity, widths.

    Writes one row per spot (columns and units: see the README), then a
    one-line summary on stderr.  Fits that did not converge are kept, with
    their reason in the status column.
    """
    _check_not_input(out, [image])
    with _UserErrors():
        config = _fit_config(
            sigma=sigma, sigma_z=sigma_z, threshold=threshold, min_distance=min_distance,
            window=window, model=model, estimator=None if estimator == "auto" else estimator,
            integrated=integrated, fix_sigma=fix_sigma, max_iter=max_iter, min_snr=min_snr,
            workers=workers,
        )
        camera = _camera(baseline, gain, em_gain, read_noise)
    img = _read(image, axes, channel)
    table = _fit_one(img, config, camera)
    where = _write_csv(table, out)
    n = len(table)
    converged = int((table["status"] == "converged").sum())
    click.echo(
        f"{image}: {n} spots ({converged} converged, {n - converged} flagged) -> {where}",
        err=True,
    )


def _fit_one(img, config, camera):
    from spotfit.fitting import fit as fit_image

    with _UserErrors(what=img.path):
        return fit_image(img, config=config, camera=camera)


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
    help="Ground-truth CSV (frame, x, y, photons, sigma_x, sigma_y, angle, background).  "
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
    if os.path.abspath(truth) == os.path.abspath(out):
        raise click.ClickException(f"{truth}: --truth must differ from the image path")
    with _UserErrors():
        from spotfit.simulation import simulate as simulate_image, write_simulation

        camera = _camera(baseline, gain, em_gain, read_noise)
        image, table = simulate_image(
            shape, n_spots=n_spots, photons=photons, background=background, sigma=sigma,
            camera=camera, min_separation=min_separation, border=border, seed=seed,
        )
    axes = "TYX" if len(shape) == 3 else "YX"
    # Both files are written atomically, the image first: if the truth
    # cannot be written, a new image is removed again (an older file of the
    # same name would already have been replaced).
    for path in (out, truth):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise click.ClickException(f"{path}: cannot write, directory {folder!r} does not exist")
    existed = os.path.exists(out)
    try:
        with _UserErrors(what=out):
            write_simulation(out, truth, image, table, axes)
    except BaseException:
        if not existed and os.path.exists(out):
            os.unlink(out)
        raise
    n_frames = shape[0] if len(shape) == 3 else 1
    click.echo(
        f"{out}: {len(table)} spots in {n_frames} frame(s) of {shape[-2]}x{shape[-1]} px; "
        f"truth -> {truth}",
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
