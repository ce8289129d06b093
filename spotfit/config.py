"""Configuration: the user's options (:class:`FitConfig`) and the setup resolved from them (:class:`Setup`).

:class:`FitConfig` is the one set of options shared by the command line and
the library: frozen, validated on construction (errors name the Python
parameter, :class:`~spotfit.errors.SpotfitInputError` ``.parameter``), and
each field carries metadata (:func:`option_metadata`: help text, command-line
name, choices) from which command-line options can be generated.

:class:`Setup` is what a fit actually runs with, resolved once from a
config, a camera and the data's dimensions: the model, the estimator, the
window, the detection parameters, the solver threads.  It is frozen;
everything that varies per frame (the image's noise, saturated pixels) is
passed alongside it, never stored in it.

No numpy at import time: the command line imports this module for its
option metadata.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace

from spotfit.errors import SpotfitInputError

#: names of the models and estimators (the registries check they agree)
MODEL_CHOICES = ("rotated", "elliptical", "symmetric")
ESTIMATOR_CHOICES = ("lsq", "wlsq", "mle")


#: What a field is for: ``detection`` fields are used by :func:`spotfit.detect`
#: and :func:`spotfit.fit`, ``fit`` fields by fits only, ``run`` fields say how
#: to run (not what is computed).
GROUPS = ("detection", "fit", "run")


def _meta(help, kind, group, unit=None, low=None, inclusive=False, choices=None, cli=None,
          auto=None, metavar=None):
    """Field metadata, the one description of an option (validation and command line).

    Parameters
    ----------
    help : str
        Help text (the command line's; ``[default: ...]`` for defaults that
        are computed).
    kind : {"real", "whole", "flag", "choice"}
        A finite real number, a whole number, True/False, or one of `choices`.
    group : one of :data:`GROUPS`
    unit : str, optional
        Unit of a number, for messages.
    low, inclusive : optional
        Numbers must be ``> low`` (``>= low`` when `inclusive`).
    choices : tuple of str, optional
    cli : str, optional
        Command-line option (default ``--`` + the name with dashes); a flag
        with a default of None is ``--on/--off``.
    auto : str, optional
        The command line's word for None (``--estimator auto``).
    metavar : str, optional
        The command line's name for the value.
    """
    return {"help": help, "kind": kind, "group": group, "unit": unit, "low": low,
            "inclusive": inclusive, "choices": choices, "cli": cli, "auto": auto,
            "metavar": metavar}


@dataclass(frozen=True)
class FitConfig:
    """Options for detection and fitting (shared by CLI and Python API).

    Parameters
    ----------
    sigma : float
        Expected PSF sigma in pixels (lateral).  Sets the detection filter,
        the default window and the starting width; with ``fix_sigma`` the
        width is held at this value.
    sigma_z : float or None
        Expected axial sigma in planes for z-stacks (default ``2 * sigma``).
    threshold : float or None
        Detection threshold in signal-to-noise units (None: the detector's
        default).
    min_distance : int or None
        Minimum distance between detected maxima, px (None: from sigma).
    window : int or None
        Half-size of the fitting window in px; the window is
        ``2 * window + 1`` px wide.  Default ``max(2, ceil(2.5 * sigma))``.
    model : {"rotated", "elliptical", "symmetric"}
        PSF model (see :mod:`spotfit.models.gaussian`).  3D data support
        "elliptical" and "symmetric"; "rotated" falls back to "elliptical".
    estimator : {"lsq", "wlsq", "mle"} or None
        None: "mle" with a calibrated camera, else "lsq".
    integrated : bool or None
        Pixel-integrated model.  None: True with a calibrated camera, else
        False (point-sampled).
    fix_sigma : bool
        Hold the widths at ``sigma`` (and ``sigma_z``).
    select_model : bool
        With a ``model`` richer than ``symmetric``, fit each spot with the
        symmetric model first and with ``model`` only where the data support
        its extra widths (a score test at the BIC level,
        :func:`spotfit.single.fit_batch`); False fits ``model`` to every spot.
    max_iter : int
        Solver iteration limit per fit; a joint fit of several overlapping spots gets
        :data:`spotfit.group.JOINT_ITERATIONS` times this.
    min_snr : float
        Fits with ``intensity / intensity_err`` below this are flagged
        ``low_signal``.
    workers : int or None
        Cores to use: threads of the compiled solver (None: all cores).
    crowded : bool
        Fit overlapping spots jointly and search the residual for hidden
        emitters (:mod:`spotfit.group`) in every frame, and add the
        ``group_id`` and ``group_size`` columns.  Without it, frames that are
        dense fields (:data:`spotfit.group.DENSE_COVERAGE`) are fitted so
        anyway, without those columns; sparse frames get single-spot fits.
    group_radius : float
        Spots closer than ``group_radius * sigma`` are fitted together.
    max_group : int
        Largest group fitted jointly; bigger clusters are split.

    Notes
    -----
    Numbers may be any real type (``numpy.float32(1.3)`` works) and are
    stored as Python ``int``/``float``; booleans are not numbers here
    (``sigma=True`` is refused).  Each field's ``metadata`` describes it once
    (kind, bounds, unit, choices, help text, command-line option): validation
    here and the command line's options are both made from it
    (:func:`option_metadata`).
    """

    sigma: float = field(default=1.3, metadata=_meta(
        "Expected PSF sigma in pixels (Gaussian sigma, not FWHM); on the command line also "
        "auto: measured on the bright isolated spots of the one IMAGE (printed; recorded in "
        "the sidecar).",
        "real", "detection", unit="pixels", low=0.0, metavar="PX|auto"))
    sigma_z: float | None = field(default=None, metadata=_meta(
        "Expected axial PSF sigma in planes, for z-stacks.  [default: 2 x sigma]",
        "real", "detection", unit="planes", low=0.0, metavar="PLANES"))
    threshold: float | None = field(default=None, metadata=_meta(
        "Detection threshold in signal-to-noise units of the filtered image.  "
        "[default: the detector's, 5]",
        "real", "detection", unit="signal-to-noise units", low=0.0, metavar="SNR"))
    min_distance: int | None = field(default=None, metadata=_meta(
        "Minimum distance between detected spots in pixels.  [default: round(1.5 x sigma)]",
        "whole", "detection", unit="pixels", low=1, metavar="PX"))
    window: int | None = field(default=None, metadata=_meta(
        "Half-size of the fitting window in pixels (the window is 2 x WINDOW + 1 wide).  "
        "[default: max(2, ceil(2.5 x sigma))]",
        "whole", "fit", unit="pixels", low=1, metavar="PX"))
    model: str = field(default="rotated", metadata=_meta(
        "PSF model: rotated (sigma_x, sigma_y, angle), elliptical (sigma_x, sigma_y) "
        "or symmetric (one sigma).  z-stacks use elliptical for rotated.",
        "choice", "fit", choices=MODEL_CHOICES))
    estimator: str | None = field(default=None, metadata=_meta(
        "lsq (least squares), wlsq (weighted by the camera noise model) or mle "
        "(Poisson maximum likelihood).  auto: mle with --gain, else lsq.",
        "choice", "fit", choices=ESTIMATOR_CHOICES, auto="auto"))
    integrated: bool | None = field(default=None, metadata=_meta(
        "Integrate the Gaussian over each pixel, or sample it at pixel centres.  "
        "[default: integrated with --gain, else point-sampled]",
        "flag", "fit", cli="--integrated/--point-sampled"))
    fix_sigma: bool = field(default=False, metadata=_meta(
        "Hold the widths at --sigma (and --sigma-z) instead of fitting them.", "flag", "fit"))
    select_model: bool = field(default=True, metadata=_meta(
        "Fit --model only to spots whose data support its extra widths (a score test at the BIC "
        "level), the symmetric model to the others; --no-select-model: --model for every spot.",
        "flag", "fit", cli="--select-model/--no-select-model"))
    max_iter: int = field(default=50, metadata=_meta(
        "Solver iteration limit per fit (a joint fit of several overlapping spots: twice "
        "this).", "whole", "fit", unit="iterations", low=1))
    min_snr: float = field(default=3.0, metadata=_meta(
        "Converged fits whose intensity signal-to-noise is below this get status low_signal "
        "(faint fits: judged at the --sigma width; see the README's status values).",
        "real", "fit", unit="signal-to-noise units", low=0.0, inclusive=True))
    workers: int | None = field(default=None, metadata=_meta(
        "Cores to use in total: for one IMAGE, threads of the compiled solver; with "
        "--out-dir, files processed in parallel (processes) sharing them.  [default: all cores]",
        "whole", "run", unit="cores", low=1, metavar="N"))
    crowded: bool = field(default=False, metadata=_meta(
        "Joint fits in every frame (K Gaussians sharing width and offset; residual search for "
        "hidden spots), with group_id and group_size columns.  Without it, dense frames are "
        "fitted so anyway (without those columns), sparse ones spot by spot.",
        "flag", "fit"))
    group_radius: float = field(default=3.0, metadata=_meta(
        "Joint fits: spots closer than this many --sigma are fitted together.",
        "real", "fit", unit="sigmas", low=0.0))
    max_group: int = field(default=8, metadata=_meta(
        "Joint fits: largest group fitted jointly; bigger clusters are split.",
        "whole", "fit", unit="spots", low=1))

    def __post_init__(self):
        for f in fields(self):
            _check(self, f.name, f.metadata, optional=f.default is None)

    def as_dict(self) -> dict:
        return asdict(self)

    def axial_sigma(self) -> float:
        """Axial sigma in planes (``sigma_z``, default ``2 * sigma``)."""
        return self.sigma_z if self.sigma_z is not None else 2.0 * self.sigma

    def half_size(self, ndim: int) -> tuple:
        """Window half-size per array axis (``(h, h)`` or ``(hz, h, h)``)."""
        h = self.window if self.window is not None else max(2, math.ceil(2.5 * self.sigma))
        if ndim == 2:
            return (h, h)
        hz = max(1, math.ceil(2.5 * self.axial_sigma()))
        if self.window is not None:
            hz = max(1, round(self.window * self.axial_sigma() / self.sigma))
        return (hz, h, h)

    def widths(self, ndim: int) -> tuple:
        """Configured PSF sigma along ``x, y[, z]`` (px, planes)."""
        return (self.sigma, self.sigma, self.axial_sigma())[:ndim]

    def detection_sigma(self, ndim: int):
        """Sigma of the detection filter: a scalar in 2D, ``(sigma_z, sigma, sigma)`` in 3D."""
        return (self.axial_sigma(), self.sigma, self.sigma) if ndim == 3 else self.sigma

    def detection_options(self) -> dict:
        """Keyword arguments of :func:`spotfit.detection.find_peaks` besides sigma."""
        out = {"min_distance": self.min_distance}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def choose(self, camera) -> tuple:
        """Estimator name and ``integrated`` flag after applying defaults."""
        est = self.estimator or ("mle" if camera.calibrated else "lsq")
        integ = self.integrated if self.integrated is not None else camera.calibrated
        return est, integ

    def check_frame(self, frame_shape, window: bool = True) -> None:
        """Refuse a window or sigma out of proportion to frames of ``frame_shape``.

        A window half-size larger than the frame (it would cover the whole
        frame from any centre), a lateral sigma above a quarter of the
        frame's larger side, or an axial sigma above half the planes of a
        z-stack describe no spot the frame can hold, and would only cost
        memory (windows and filter padding grow with them).

        Parameters
        ----------
        frame_shape : tuple of int
            ``(ny, nx)`` or ``(nz, ny, nx)``.
        window : bool
            Check the window too (fits; detection has none).
        """
        lateral = max(frame_shape[-2:])
        size = " x ".join(str(int(s)) for s in frame_shape)
        if self.sigma > lateral / 4:
            raise SpotfitInputError(
                f"sigma must be at most a quarter of the image's larger side ({lateral / 4:g} px "
                f"for {size} px frames), got {self.sigma:g}", parameter="sigma")
        if len(frame_shape) == 3 and self.axial_sigma() > frame_shape[0] / 2:
            raise SpotfitInputError(
                f"sigma_z must be at most half the number of planes ({frame_shape[0] / 2:g} for "
                f"{frame_shape[0]} planes), got {self.axial_sigma():g}"
                + ("" if self.sigma_z is not None else " (2 x sigma; give sigma_z)"),
                parameter="sigma_z")
        if window and self.window is not None and self.window > lateral:
            raise SpotfitInputError(
                f"window must be at most the image's larger side ({lateral} px for {size} px "
                f"frames), got {self.window}", parameter="window")


def option_metadata() -> dict:
    """Per field of :class:`FitConfig`, in order: its metadata (see :func:`_meta`) and ``default``.

    The command line makes its options from these (``cli`` filled in:
    ``--`` + the field name with dashes unless the field says otherwise,
    e.g. ``integrated``: ``--integrated/--point-sampled``).
    """
    out = {}
    for f in fields(FitConfig):
        meta = dict(f.metadata)
        meta["cli"] = meta["cli"] or "--" + f.name.replace("_", "-")
        meta["default"] = f.default
        out[f.name] = meta
    return out


def resolved_values(config: FitConfig, camera, ndim: int, task: str = "fit") -> dict:
    """The values a detection (``task="detect"``) or fit actually runs with, defaults resolved.

    What the JSON sidecar records under ``resolved``: no None for a default,
    per-axis values spelled out (``window`` lateral, ``window_z`` axial, in
    px and planes; ``min_distance`` and ``min_distance_z`` likewise).

    Parameters
    ----------
    config : FitConfig
    camera : spotfit.camera.Camera
    ndim : {2, 3}
        Spatial dimensions of the frames.
    task : {"fit", "detect"}

    Returns
    -------
    dict
        ``sigma``, ``sigma_z`` (3D only), ``threshold``, ``min_distance``
        (``min_distance_z``), and for fits ``model``, ``estimator``,
        ``integrated``, ``window`` (``window_z``) and ``unit``.
    """
    from spotfit.detection import DEFAULT_THRESHOLD, default_min_distance

    out = {"sigma": config.sigma}
    if ndim == 3:
        out["sigma_z"] = config.axial_sigma()
    out["threshold"] = config.threshold if config.threshold is not None else DEFAULT_THRESHOLD
    distance = config.min_distance
    if distance is None:
        distance = default_min_distance(config.detection_sigma(ndim))
    distance = (distance,) * ndim if isinstance(distance, int) else tuple(distance)
    out["min_distance"] = int(distance[-1])
    if ndim == 3:
        out["min_distance_z"] = int(distance[0])
    if task == "fit":
        estimator, integrated = config.choose(camera)
        half = config.half_size(ndim)
        out.update(model="elliptical" if ndim == 3 and config.model == "rotated" else config.model,
                   estimator=estimator, integrated=bool(integrated), window=int(half[-1]))
        if ndim == 3:
            out["window_z"] = int(half[0])
        out["unit"] = camera.unit
    return out


def make_config(config: FitConfig | None, overrides: dict) -> FitConfig:
    """``config`` (default :class:`FitConfig()`) with keyword ``overrides`` applied."""
    if config is not None and not isinstance(config, FitConfig):
        raise SpotfitInputError(f"config must be a FitConfig, got {type(config).__name__}",
                                parameter="config")
    config = config or FitConfig()
    if overrides:
        names = {f.name for f in fields(FitConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown fit option(s): {', '.join(sorted(unknown))}")
        config = replace(config, **overrides)
    return config


# ------------------------------------------------------------ validation
def _set(config, name, value):
    object.__setattr__(config, name, value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _check(config, name, meta, optional=False):
    """Validate and normalise field `name` of `config` as its metadata says."""
    value = getattr(config, name)
    if value is None and optional:
        return
    kind = meta["kind"]
    if kind == "choice":
        if value not in meta["choices"]:
            raise SpotfitInputError(
                f"{name} {value!r} is unknown; choose one of {', '.join(meta['choices'])}",
                parameter=name)
        return
    if kind == "flag":
        if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
            raise SpotfitInputError(f"{name} must be True or False, got {value!r}", parameter=name)
        _set(config, name, bool(value))
        return
    low, inclusive, unit = meta["low"], meta["inclusive"], meta["unit"]
    ok = _is_real(value) and math.isfinite(float(value))
    if kind == "whole":
        ok = ok and float(value) == int(value) and int(value) >= low
        if not ok:
            raise SpotfitInputError(f"{name} must be a whole number >= {low} ({unit}), got {value!r}",
                                    parameter=name)
        _set(config, name, int(value))
        return
    ok = ok and (float(value) >= low if inclusive else float(value) > low)
    if not ok:
        relation = ">=" if inclusive else ">"
        raise SpotfitInputError(f"{name} must be a number {relation} {low:g} ({unit}), got {value!r}",
                                parameter=name)
    _set(config, name, float(value))


# ------------------------------------------------------------------ setup
@dataclass(frozen=True)
class Setup:
    """Everything a fit runs with, resolved once (frozen).

    Build with :meth:`resolve`.  Per-frame quantities (the image noise of an
    uncalibrated frame, saturated pixels) are not part of it: they are
    passed to the fitting functions with each batch.

    Attributes
    ----------
    config : FitConfig
    camera : spotfit.camera.Camera
    ndim : {2, 3}
        Spatial dimensions of a frame.
    model : spotfit.models.Model
        Resolved model (``rotated`` becomes ``elliptical`` in 3D).
    estimator : spotfit.estimators.Estimator
    half : tuple of int
        Window half-size per array axis.
    workers : int
        Solver threads.
    """

    config: FitConfig
    camera: object
    ndim: int
    model: object
    estimator: object
    half: tuple
    workers: int

    @classmethod
    def resolve(cls, config: FitConfig, camera, ndim: int) -> "Setup":
        """Resolve ``config`` for ``camera`` and ``ndim``-dimensional frames.

        Raises :class:`SpotfitInputError` early (before any frame is read)
        for an estimator that needs photons without a calibrated camera.
        """
        from spotfit.estimators import get_estimator
        from spotfit.models import get_model

        name = "elliptical" if (ndim == 3 and config.model == "rotated") else config.model
        est_name, integrated = config.choose(camera)
        estimator = get_estimator(est_name)
        setup = cls(config=config, camera=camera, ndim=ndim,
                    model=get_model(name, ndim, integrated, sigma=config.sigma), estimator=estimator,
                    half=config.half_size(ndim), workers=config.workers or os.cpu_count() or 1)
        estimator.check(setup.noise())
        return setup

    @property
    def widths(self) -> tuple:
        """Configured PSF sigma along ``x, y[, z]``."""
        return self.config.widths(self.ndim)

    def read_var_map(self):
        """Read-noise variance map (photons^2) for sCMOS cameras, else None."""
        import numpy as np

        if self.camera.calibrated and np.ndim(self.camera.read_noise) > 0:
            return self.camera.read_variance()
        return None

    def noise(self, window_read_var=None):
        """The camera's noise model (:class:`spotfit.estimators.Noise`).

        ``window_read_var`` ``(n, P)`` (sCMOS maps cut into windows)
        overrides the scalar read noise.  Without a calibration the noise
        model is measured from the fits (:func:`spotfit.solver.covariance`).
        """
        from spotfit.estimators import Noise

        cam = self.camera
        if not cam.calibrated:
            return Noise(calibrated=False)
        rv = cam.read_variance() if window_read_var is None else window_read_var
        return Noise(calibrated=True, excess=cam.excess_noise, read_var=rv)

    def use_threads(self) -> None:
        """Give the compiled solver ``workers`` threads (at most numba's maximum;
        :func:`spotfit._jit.set_kernel_threads`)."""
        from spotfit._jit import set_kernel_threads

        set_kernel_threads(self.workers)
