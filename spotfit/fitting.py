"""The fitting pipeline: image -> candidates -> windows -> one batched solve -> table.

:func:`fit` is what ``spotfit fit`` runs; :func:`fit_spots` fits given
positions (e.g. from your own detection).  Both take a :class:`FitConfig`,
the one set of options shared by the command line and the library.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from spotfit.camera import Camera
from spotfit.errors import SpotfitInputError
from spotfit.estimators import ESTIMATOR_NAMES, Noise, get_estimator
from spotfit.models import MODEL_NAMES, get_model
from spotfit import roi, solver, table

#: windows collected (over frames) before one batched solve; bounds memory
#: to a few (CHUNK, P) float64 arrays.
CHUNK = 32768

#: moment-estimate signal-to-noise below which a fit starts with its widths held
FAINT_SNR = 25.0

#: pixels within this many sigma of another candidate (and nearer to it than to
#: the window's own spot) are left out of a single-spot fit
NEIGHBOUR_REACH = 2.5

#: fits with ``intensity / intensity_err`` below this many times ``min_snr``
#: are judged by their expected signal-to-noise (:func:`expected_snr`)
SNR_RECHECK = 4.0


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
    max_iter : int
        Solver iteration limit per spot.
    min_snr : float
        Fits with ``intensity / intensity_err`` below this are flagged
        ``low_signal``.
    workers : int or None
        Threads of the compiled solver (None: all cores).
    crowded : bool
        Fit overlapping spots jointly and search the residual for hidden
        emitters (:mod:`spotfit.group`).  Adds ``group_id`` and
        ``group_size`` columns; every spot is then a symmetric Gaussian
        (width shared within its group).
    group_radius : float
        Spots closer than ``group_radius * sigma`` are fitted together.
    max_group : int
        Largest group fitted jointly; bigger clusters are split.
    """

    sigma: float = 1.3
    sigma_z: float | None = None
    threshold: float | None = None
    min_distance: int | None = None
    window: int | None = None
    model: str = "rotated"
    estimator: str | None = None
    integrated: bool | None = None
    fix_sigma: bool = False
    max_iter: int = 50
    min_snr: float = 3.0
    workers: int | None = None
    crowded: bool = False
    group_radius: float = 3.0
    max_group: int = 8

    def __post_init__(self):
        _positive("--sigma", self.sigma)
        if self.sigma_z is not None:
            _positive("--sigma-z", self.sigma_z)
        if self.threshold is not None:
            _positive("--threshold", self.threshold)
        if self.min_distance is not None and self.min_distance < 1:
            raise SpotfitInputError(f"--min-distance must be >= 1 px, got {self.min_distance}")
        if self.window is not None and self.window < 1:
            raise SpotfitInputError(f"--window must be >= 1 px, got {self.window}")
        if self.model not in MODEL_NAMES:
            raise SpotfitInputError(
                f"--model {self.model!r} is unknown; choose one of {', '.join(MODEL_NAMES)}"
            )
        if self.estimator is not None and self.estimator not in ESTIMATOR_NAMES:
            raise SpotfitInputError(
                f"--estimator {self.estimator!r} is unknown; choose one of {', '.join(ESTIMATOR_NAMES)}"
            )
        if self.max_iter < 1:
            raise SpotfitInputError(f"--max-iter must be >= 1, got {self.max_iter}")
        if self.min_snr < 0:
            raise SpotfitInputError(f"--min-snr must be >= 0, got {self.min_snr}")
        if self.workers is not None and self.workers < 1:
            raise SpotfitInputError(f"--workers must be >= 1, got {self.workers}")
        _positive("--group-radius", self.group_radius)
        if self.max_group < 1:
            raise SpotfitInputError(f"--max-group must be >= 1, got {self.max_group}")

    def as_dict(self) -> dict:
        return asdict(self)

    # -------------------------------------------------------------- resolved
    def half_size(self, ndim: int) -> tuple:
        """Window half-size per array axis."""
        h = self.window if self.window is not None else max(2, math.ceil(2.5 * self.sigma))
        if ndim == 2:
            return (h, h)
        hz = max(1, math.ceil(2.5 * self.axial_sigma()))
        if self.window is not None:
            hz = max(1, round(self.window * self.axial_sigma() / self.sigma))
        return (hz, h, h)

    def axial_sigma(self) -> float:
        return self.sigma_z if self.sigma_z is not None else 2.0 * self.sigma

    def choose(self, camera: Camera) -> tuple:
        """Estimator name and ``integrated`` flag after applying defaults."""
        est = self.estimator or ("mle" if camera.calibrated else "lsq")
        integ = self.integrated if self.integrated is not None else camera.calibrated
        return est, integ


def _positive(option, value):
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise SpotfitInputError(f"{option} must be a positive number, got {value!r}")


def _config(config, overrides) -> FitConfig:
    config = config or FitConfig()
    if overrides:
        names = {f.name for f in fields(FitConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown fit option(s): {', '.join(sorted(unknown))}")
        config = replace(config, **overrides)
    return config


def _as_image(image, axes=None, channel=None):
    """Accept a path, an :class:`~spotfit.io.Image` or an array.

    Arrays without ``axes`` are read as ``YX`` (2D), ``TYX`` (3D) or
    ``TZYX`` (4D); see :meth:`spotfit.io.Image.from_array`.
    """
    from spotfit.io import Image, read_image

    if isinstance(image, Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, axes=axes, channel=channel)
    return Image.from_array(image, axes, channel=channel)


# --------------------------------------------------------------------- API
def fit(image, config: FitConfig | None = None, camera: Camera | None = None,
        axes: str | None = None, channel: int | None = None, invert: bool = False,
        **options):
    """Detect and fit every spot of an image or stack.

    Parameters
    ----------
    image : str, os.PathLike, spotfit.io.Image or ndarray
        A TIFF path, an image from :func:`spotfit.read_image`, or an array:
        ``(ny, nx)``, ``(T, ny, nx)``, or ``(T, nz, ny, nx)``.
    config : FitConfig, optional
    camera : Camera, optional
        Without a calibrated camera, values are in ADU above baseline and the
        least-squares estimator is used by default.
    axes, channel : optional
        Passed to :func:`spotfit.read_image` when ``image`` is a path, or
        to :meth:`spotfit.io.Image.from_array` for an array (an array that
        may be a colour image, e.g. of shape (424, 640, 3), needs `axes`).
    invert : bool
        Dark objects on a light background (e.g. bright-field colloids):
        fit the inverted image (:mod:`spotfit.invert`).  Not with a
        calibrated camera.
    **options
        Override fields of ``config`` (e.g. ``sigma=1.5, estimator="mle"``).

    Returns
    -------
    pandas.DataFrame
        One row per detected spot, columns as in :func:`spotfit.table.columns`
        (documented in the README), plus ``x_um``... when the image knows its
        pixel size (:func:`spotfit.table.add_physical_units`) and the group
        columns with ``crowded``.  Failed fits are kept and flagged in
        ``status``.
    """
    config = _config(config, options)
    camera = camera or Camera()
    if invert:
        from spotfit.invert import check_camera

        check_camera(camera)
    img = _as_image(image, axes=axes, channel=channel)
    if invert:
        from spotfit.invert import invert_image

        img = invert_image(img)
    if isinstance(image, (str, os.PathLike)):  # opened here: closed here
        with img:
            return _fit_image(img, config, camera)
    return _fit_image(img, config, camera)


def _fit_image(img, config, camera):
    """:func:`fit` on an open :class:`~spotfit.io.Image`."""
    from spotfit.detection import find_peaks

    ndim = 3 if img.is_3d else 2
    camera.check_shape(img.frame_shape, source=str(img.path or "image"))
    sigma_det = (config.axial_sigma(), config.sigma, config.sigma) if ndim == 3 else config.sigma
    det_kwargs = {"min_distance": config.min_distance}
    if config.threshold is not None:
        det_kwargs["threshold"] = config.threshold

    pending, pending_frames, parts = [], [], []
    n_pending = 0
    fitter = _Fitter(config, camera, ndim)
    read_var = fitter.read_var_map()
    if config.crowded:
        return _fit_crowded(img, fitter, find_peaks, sigma_det, det_kwargs, read_var)
    for t, frame in img.frames():
        photons = camera.to_photons(frame)
        coords, _score = find_peaks(photons, sigma_det, **det_kwargs)
        if len(coords) == 0:
            continue
        coords = coords[np.lexsort(coords.T[::-1])]  # rows in raster order (z, y, x)
        w = roi.cut(photons, coords, config.half_size(ndim), read_var=read_var)
        roi.mask_neighbours(w, coords, NEIGHBOUR_REACH * config.sigma)
        pending.append(w)
        pending_frames.append(np.full(len(w), t, dtype=np.int64))
        n_pending += len(w)
        if fitter.noise_var is None:
            fitter.noise_var = _noise_variance(photons)
        if n_pending >= CHUNK:
            parts.append(fitter.run(roi.concatenate(pending), np.concatenate(pending_frames)))
            pending, pending_frames, n_pending = [], [], 0
    if pending:
        parts.append(fitter.run(roi.concatenate(pending), np.concatenate(pending_frames)))
    if not parts:
        result = table.empty(ndim)
    else:
        import pandas as pd

        result = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return table.add_physical_units(result, img.pixel_size, img.z_step if img.is_3d else None)


def _fit_crowded(img, fitter, find_peaks, sigma_det, det_kwargs, read_var):
    """Frame by frame: detection, then grouped joint fits (:mod:`spotfit.group`)."""
    import pandas as pd

    from spotfit.group import CrowdedFitter, n_groups

    fitter.use_threads()
    crowd = CrowdedFitter(fitter)
    parts, groups_so_far = [], 0
    for t, frame in img.frames():
        photons = np.ascontiguousarray(fitter.camera.to_photons(frame), dtype=float)
        coords, _score = find_peaks(photons, sigma_det, **det_kwargs)
        if len(coords) == 0:
            continue
        if fitter.noise_var is None:
            fitter.noise_var = _noise_variance(photons)
        result = crowd.fit_frame(photons, coords, read_var)
        parts.append(crowd.table(result, t, groups_so_far))
        groups_so_far += n_groups(result)
    result = pd.concat(parts, ignore_index=True) if parts else table.empty(fitter.ndim, crowded=True)
    return table.add_physical_units(result, img.pixel_size, img.z_step if img.is_3d else None)


def fit_spots(image, positions, config: FitConfig | None = None, camera: Camera | None = None,
              frame: int = 0, **options):
    """Fit spots at given positions in one 2D image or 3D stack.

    Parameters
    ----------
    image : (ny, nx) or (nz, ny, nx) ndarray
        Raw camera values of one frame.
    positions : (n, 2) or (n, 3) array_like
        Approximate centres as ``(x, y)`` or ``(x, y, z)`` in px; windows are
        centred on the nearest pixel.
    config, camera, **options
        As in :func:`fit`.
    frame : int
        Value of the ``frame`` column.

    Returns
    -------
    pandas.DataFrame
    """
    config = _config(config, options)
    camera = camera or Camera()
    image = np.asarray(image)
    ndim = image.ndim
    if ndim not in (2, 3):
        raise SpotfitInputError(f"fit_spots needs a 2D or 3D image, got shape {image.shape}")
    pos = np.asarray(positions, dtype=float).reshape(-1, ndim)
    camera.check_shape(image.shape)
    photons = camera.to_photons(image)
    centers = np.rint(pos[:, ::-1]).astype(np.int64)  # (x, y[, z]) -> array order
    if len(centers) == 0:
        return table.empty(ndim)
    fitter = _Fitter(config, camera, ndim)
    fitter.noise_var = _noise_variance(photons)
    w = roi.cut(photons, centers, config.half_size(ndim), read_var=fitter.read_var_map())
    roi.mask_neighbours(w, centers, NEIGHBOUR_REACH * config.sigma)
    return fitter.run(w, np.full(len(w), frame, dtype=np.int64))


# --------------------------------------------------------------- internals
def _noise_variance(photons) -> float:
    """Robust pixel-noise variance of an image (MAD of neighbour differences)."""
    a = np.asarray(photons, dtype=np.float32)
    a = a.reshape(-1, a.shape[-1])
    step = max(1, a.shape[0] // 64)  # ~64 rows (10^4-10^5 differences) are plenty for a median
    d = np.diff(a[::step], axis=-1)
    mad = float(np.median(np.abs(d - np.median(d))))
    return (1.4826 * mad) ** 2 / 2.0


class _Fitter:
    """Holds the resolved model/estimator/bounds and fits batches of windows."""

    def __init__(self, config: FitConfig, camera: Camera, ndim: int):
        self.config = config
        self.camera = camera
        self.ndim = ndim
        model_name = config.model
        if ndim == 3 and model_name == "rotated":
            model_name = "elliptical"
        est_name, integrated = config.choose(camera)
        self.model = get_model(model_name, ndim, integrated, sigma=config.sigma)
        self.estimator = get_estimator(est_name)
        self.noise_var = None
        if est_name in ("mle", "wlsq"):  # fail early, before reading any frame
            self.estimator.prepare(np.zeros((0, 1)), np.zeros((0, 1), bool), Noise(camera.calibrated))
        self.workers = config.workers or os.cpu_count() or 1

    def read_var_map(self):
        """Read-noise variance map (photons^2) for sCMOS cameras, else None."""
        if self.camera.calibrated and np.ndim(self.camera.read_noise) > 0:
            return self.camera.read_variance()
        return None

    def noise(self, window_read_var=None) -> Noise:
        """Noise model; ``window_read_var`` (m, P) overrides the scalar read noise."""
        cam = self.camera
        if cam.calibrated:
            rv = cam.read_variance() if window_read_var is None else window_read_var
            return Noise(calibrated=True, excess=cam.excess_noise, read_var=rv)
        return Noise(calibrated=False, excess=1.0, read_var=self.noise_var or 0.0)

    def use_threads(self):
        """Give the compiled solver ``workers`` threads (at most numba's maximum)."""
        import numba

        numba.set_num_threads(max(1, min(self.workers, numba.config.NUMBA_NUM_THREADS)))

    def run(self, windows: roi.Windows, frames: np.ndarray):
        """Fit a batch of windows in one compiled, parallel solve; return its table."""
        self.use_threads()
        theta, sol = self._solve(windows, 0, len(windows))
        return self._table(windows, frames, sol)

    def _solve(self, windows, start, stop):
        m, cfg = self.model, self.config
        data = windows.data[start:stop]
        mask = windows.mask[start:stop]
        grid = windows.grid
        theta0 = initial_guess(m, data, mask, grid, cfg)
        lower, upper = m.bounds(grid)
        if self.estimator.name == "mle":
            # Poisson likelihood: the background is a photon rate and cannot be
            # negative (a negative offset would make the model <= 0 in dark pixels).
            lower[-1] = 0.0
        # Border-truncated windows: the centre stays within half a pixel of
        # the image, where the data can still constrain it.
        first, last = windows.valid_extent(start, stop)
        lower = np.repeat(lower[None], len(data), axis=0)
        upper = np.repeat(upper[None], len(data), axis=0)
        for j, index in enumerate(m.center_index):
            lower[:, index] = np.maximum(lower[:, index], first[:, j] - 0.5)
            upper[:, index] = np.minimum(upper[:, index], last[:, j] + 0.5)
        widths = np.zeros(m.n_params, bool)
        for name in m.width_names:
            widths[m.index(name)] = True
        free = ~widths if cfg.fix_sigma else np.ones(m.n_params, bool)
        rv = None if windows.read_var is None else windows.read_var[start:stop]
        sol = solver.solve(m, self.estimator, data, mask, grid, theta0, noise=self.noise(rv),
                           lower=lower, upper=upper, free=free, max_iter=cfg.max_iter,
                           hold_first=None if cfg.fix_sigma else widths,
                           hold_rows=self._faint(theta0))
        return sol.theta, sol

    def _faint(self, theta0):
        """Windows whose moment estimates promise a signal-to-noise ratio below
        ``FAINT_SNR``: only these need the solver's first pass with the widths
        held (bright spots cannot collapse onto a single noisy pixel)."""
        sigma = self.config.sigma
        area = 4.0 * np.pi * sigma * sigma  # effective pixels of a spot
        if self.camera.calibrated:
            var_bg = np.maximum(theta0[:, -1], 1.0)
        else:
            var_bg = max(self.noise_var or 0.0, 1e-12)
        snr = theta0[:, 0] / np.sqrt(area * var_bg)
        return snr < FAINT_SNR

    def _table(self, windows, frames, sol):
        m, ndim = self.model, self.ndim
        names, pub, pcov = m.public(sol.theta, sol.cov)
        perr = np.sqrt(np.clip(np.diagonal(pcov, axis1=1, axis2=2), 0.0, None))
        rel = sol.theta[:, list(m.center_index)]
        absolute = windows.to_image(rel)
        values, errors = {}, {}
        for j, name in enumerate(names):
            columns = ("sigma_x", "sigma_y") if name == "sigma" else (name,)
            for col in columns:
                values[col], errors[col] = pub[:, j], perr[:, j]
        for j, axis in enumerate(("x", "y", "z")[:ndim]):
            values[axis] = absolute[:, j]
        if ndim == 2 and "angle" not in names:
            errors["angle"] = np.full(len(pub), np.nan)  # not a fitted parameter
        values["amplitude"], errors["amplitude"] = _amplitude(names, pub, pcov, ndim)

        status = sol.status.copy()
        outside = ~windows.inside(rel)
        status[outside & (status != solver.SINGULAR)] = solver.LEFT_WINDOW
        status[(status == solver.CONVERGED) & self._low_signal(windows, sol, pub[:, 0], perr[:, 0])] = \
            solver.LOW_SIGNAL
        status_names = np.asarray(solver.STATUS_NAMES, dtype=object)[status]
        return table.build(frames, values, errors, sol.chi2_red, sol.iterations, status_names,
                           self.camera.unit, ndim)

    def _low_signal(self, windows, sol, intensity, intensity_err):
        """Fits whose intensity is not significant at ``min_snr``.

        The fit's own ``intensity / intensity_err`` scatters a lot for faint
        spots, and both parts move together with the fitted width, so a
        threshold on it keeps a biased subset (narrow, dim fits).  Wherever it
        is below ``SNR_RECHECK x min_snr`` the decision is taken on the
        *expected* signal-to-noise instead, :func:`expected_snr`: the
        intensity measured with the configured PSF width (far less noisy),
        over the intensity error that a free-width fit of such a spot has.
        With ``fix_sigma`` the fit's own ratio is already that.
        """
        cfg = self.config
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = intensity / intensity_err
        low = ~(snr >= cfg.min_snr)
        if cfg.fix_sigma:
            return low
        rows = np.flatnonzero(np.isfinite(snr) & (snr < SNR_RECHECK * cfg.min_snr))
        if len(rows):
            rv = None if windows.read_var is None else windows.read_var[rows]
            noise = self.noise(rv)
            if not noise.calibrated:  # constant pixel variance (ADU^2) of the image
                noise = Noise(calibrated=False, excess=0.0, read_var=max(self.noise_var or 0.0, 1e-12))
            centres = sol.theta[rows][:, list(self.model.center_index)]
            low[rows] = ~(expected_snr(self.model, windows.data[rows], windows.mask[rows], windows.grid,
                                       centres, self.widths(), noise) >= cfg.min_snr)
        return low

    def widths(self) -> tuple:
        """Configured PSF sigma along ``x, y[, z]`` (px, planes)."""
        cfg = self.config
        return (cfg.sigma, cfg.sigma, cfg.axial_sigma())[: self.ndim]


def expected_snr(model, data, mask, grid, centres, widths, noise: Noise):
    """Signal-to-noise ratio of each spot's intensity at the configured width.

    The intensity ``N`` and offset ``b`` are measured by linear weighted
    least squares of ``data ~ N g + b``, with ``g`` the model at unit
    intensity, the given centre and the configured widths (weights from the
    noise model at that fit); the ratio is ``N`` over the Cramer-Rao bound
    of ``N`` for a fit with all parameters free (:func:`spotfit.solver.crlb`)
    at ``(N, centre, widths, b)``.

    Parameters
    ----------
    model : spotfit.models.Model
    data : (n, P) ndarray
        Window pixels (photons or ADU).
    mask : (n, P) bool ndarray
    grid : spotfit.models.Grid
    centres : (n, ndim) ndarray
        Window-relative ``x, y[, z]`` of the spots (px).
    widths : tuple of float
        PSF sigma along ``x, y[, z]`` (px).
    noise : Noise

    Returns
    -------
    (n,) ndarray
        ``N / crlb(N)``; 0 where the intensity is not positive or not finite.
    """
    n = len(centres)
    w = np.broadcast_to(np.asarray(widths, float), (n, len(widths)))
    unit = model.from_moments(centres, w, np.ones(n), np.zeros(n))
    g = model.value(unit, grid)
    weight = mask.astype(float)  # first pass unweighted, second weighted by its fit
    for _ in range(2):
        sgg = np.einsum("np,np,np->n", weight, g, g)
        sg = np.einsum("np,np->n", weight, g)
        s1 = weight.sum(axis=1)
        sgd = np.einsum("np,np,np->n", weight, g, data)
        sd = np.einsum("np,np->n", weight, data)
        det = sgg * s1 - sg * sg
        with np.errstate(divide="ignore", invalid="ignore"):
            intensity = (s1 * sgd - sg * sd) / det
            offset = (sgg * sd - sg * sgd) / det
        mu = np.clip(intensity[:, None], 0.0, None) * g + offset[:, None]
        weight = mask / np.maximum(noise.variance(mu), 1e-6)
    theta = model.from_moments(centres, w, np.clip(intensity, 1e-3, None), offset)
    mask_arg = None if mask.all() else mask
    bound = solver.crlb(model, theta, grid, noise, mask=mask_arg)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(intensity) & (intensity > 0), intensity / bound, 0.0)


def _amplitude(names, values, cov, ndim):
    """Peak density ``N / ((2 pi)^(d/2) prod sigma)`` and its propagated error.

    ``names``/``values``/``cov`` are a model's public parameters.
    """
    n = len(values)
    norm = np.full(n, (2.0 * np.pi) ** (ndim / 2.0))
    powers = {}
    for name, power in (("sigma", 2.0), ("sigma_x", 1.0), ("sigma_y", 1.0), ("sigma_z", 1.0)):
        if name in names:
            norm = norm * values[:, names.index(name)] ** power
            powers[names.index(name)] = power
    amp = values[:, 0] / norm
    grad = np.zeros_like(values)
    grad[:, 0] = 1.0 / norm
    for j, power in powers.items():
        grad[:, j] = -power * amp / values[:, j]
    var = np.einsum("nk,nkl,nl->n", grad, cov, grad)
    return amp, np.sqrt(np.clip(var, 0.0, None))


def initial_guess(model, data, mask, grid, config: FitConfig):
    """Starting values from moments of each window.

    Offset: mean of the valid pixels on the window's outer ring (their
    minimum if the ring is fully masked).  Intensity: sum of the positive
    excess over the offset.  Centre: centroid of that excess (the window
    centre if there is none).  Widths: second moments, clipped to
    ``[0.7, 1.5] x`` the configured sigma (the configured sigma itself with
    ``fix_sigma``).
    """
    n, P = data.shape
    coords = grid.flat()  # x, y[, z] each (P,)
    ring = np.zeros(grid.shape, bool)
    for a in range(grid.ndim):
        sl = [slice(None)] * grid.ndim
        sl[a] = 0
        ring[tuple(sl)] = True
        sl[a] = -1
        ring[tuple(sl)] = True
    ring = ring.ravel()[None, :] & mask
    n_ring = ring.sum(axis=1)
    offset = np.where(
        n_ring > 0,
        np.sum(np.where(ring, data, 0.0), axis=1) / np.maximum(n_ring, 1),
        np.min(np.where(mask, data, np.inf), axis=1),
    )
    excess = np.where(mask, np.clip(data - offset[:, None], 0.0, None), 0.0)
    total = excess.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    centre_window = (np.array(grid.shape[::-1], float) - 1) / 2
    center = np.empty((n, grid.ndim))
    widths = np.empty((n, grid.ndim))
    expected = [config.sigma, config.sigma, config.axial_sigma()][: grid.ndim]
    for j, c in enumerate(coords):
        # einsum, not `@`: a BLAS call would leave OpenBLAS threads spinning on
        # the cores the compiled solver is about to use (measured: 2x slower solve)
        mean = np.einsum("np,p->n", excess, c) / safe
        var = np.einsum("np,p->n", excess, c * c) / safe - mean**2
        center[:, j] = np.where(total > 0, mean, centre_window[j])
        s = np.sqrt(np.clip(var, 0.0, None))
        widths[:, j] = expected[j] if config.fix_sigma else np.clip(s, 0.7 * expected[j], 1.5 * expected[j])
    intensity = np.maximum(total, 1e-3)
    return model.from_moments(center, widths, intensity, offset)
