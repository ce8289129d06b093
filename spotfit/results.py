"""Results: from fitted parameters to output columns and statuses, for single and crowded fits alike.

Everything that turns a solver's answer into a row of the table lives here,
once, and both paths (:mod:`spotfit.single`, :mod:`spotfit.group`) call it
with a one-emitter model and that emitter's parameters and covariance:

* :func:`measure` -- parameters -> output columns (the model's public
  parametrisation, positions in image coordinates, widths along x/y/z,
  angle) with standard errors, and the ``amplitude`` with its error
  propagated from the full covariance (intensity *and* widths);
* :func:`judge` -- the status of each fit, in this order: the solver's
  (``converged``, ``max_iterations``, ``singular``, ``low_signal`` for an
  unstable bias correction), then ``left_window``, ``low_signal``
  (:func:`low_signal`), ``not_spot`` (:func:`not_spot`), ``saturated``;
* :func:`not_spot` -- fits that are no diffraction-limited spot: far wider
  than the PSF, or a width stuck at its bound;
* :func:`expected_snr` -- the signal-to-noise ratio a faint fit's
  ``low_signal`` decision is taken on.

Status codes are those of :mod:`spotfit._kernels`; :data:`STATUS_NAMES`
are their names in tables.
"""

from __future__ import annotations

import numpy as np

from spotfit import solver
from spotfit._kernels import (
    CONVERGED, LEFT_WINDOW, LOW_SIGNAL, MAX_ITERATIONS, NOT_SPOT, SATURATED, SINGULAR,
)
from spotfit.estimators import Noise

#: status names by code (index = code of :mod:`spotfit._kernels`)
STATUS_NAMES = tuple(name for _, name in sorted({
    CONVERGED: "converged", MAX_ITERATIONS: "max_iterations", SINGULAR: "singular",
    LEFT_WINDOW: "left_window", LOW_SIGNAL: "low_signal", SATURATED: "saturated", NOT_SPOT: "not_spot",
}.items()))

#: a fit wider than this many times the configured PSF sigma (on any axis) is not a spot
MAX_WIDTH = 2.0

#: fits with ``intensity / intensity_err`` below this many times ``min_snr``
#: are judged by their expected signal-to-noise (:func:`expected_snr`)
SNR_RECHECK = 4.0
#: fits rechecked at a time (memory: a few (rows, k, P) arrays)
_RECHECK_ROWS = 4096

_AXES = ("x", "y", "z")
_WIDTH_COLUMNS = ("sigma_x", "sigma_y", "sigma_z")


def measure(model, theta, cov, origin):
    """Output columns of one-emitter fits, with their standard errors.

    Parameters
    ----------
    model : spotfit.models.Model
        A one-emitter model (for a crowded group: ``MultiGaussian.emitter_model``).
    theta : (n, k) ndarray
        Fitted parameters, window-relative.
    cov : (n, k, k) ndarray
        Their covariance.
    origin : (n, ndim) ndarray
        Image coordinates ``(x, y[, z])`` of each window's first pixel.

    Returns
    -------
    values, errors : dict of str -> (n,) ndarray
        By output column (``x``, ``y``, [``z``], ``intensity``,
        ``amplitude``, ``sigma_x``, ``sigma_y``, [``sigma_z``],
        [``angle``], ``offset``).  A 2D model without an angle reports
        ``angle`` 0 with error NaN (not a fitted parameter).
    """
    nd = model.ndim
    names, pub, pcov = model.public(theta, cov)
    perr = np.sqrt(np.clip(np.diagonal(pcov, axis1=1, axis2=2), 0.0, None))
    values, errors = {}, {}

    def take(column, name):
        j = names.index(name)
        values[column], errors[column] = pub[:, j], perr[:, j]

    absolute = theta[:, list(model.center_index)] + origin
    for j, axis in enumerate(_AXES[:nd]):
        take(axis, axis)
        values[axis] = absolute[:, j]
    take("intensity", "intensity")
    for column, name in zip(_WIDTH_COLUMNS, model.axis_widths):
        take(column, name)
    if nd == 2:
        if model.angle_name is not None:
            take("angle", model.angle_name)
        else:
            values["angle"], errors["angle"] = np.zeros(len(pub)), np.full(len(pub), np.nan)
    take("offset", "offset")
    amp, grad = model.peak(names, pub)
    var = np.einsum("nk,nkl,nl->n", grad, pcov, grad)
    values["amplitude"], errors["amplitude"] = amp, np.sqrt(np.clip(var, 0.0, None))
    return values, errors


def low_signal(intensity, intensity_err, min_snr, expected=None):
    """Fits whose intensity is not significant at ``min_snr``.

    The fit's own ``intensity / intensity_err`` scatters a lot for faint
    spots, and both parts move together with a free fitted width, so a
    threshold on it keeps a biased subset (narrow, dim fits).  Given
    ``expected``, wherever that ratio is below ``SNR_RECHECK x min_snr`` the
    decision is taken on the *expected* signal-to-noise instead
    (:func:`expected_snr`): the intensity measured with the configured PSF
    width (far less noisy), over the intensity error that a free-width fit
    of such a spot has.  Without it (widths held or tightly bounded) the
    fit's own ratio is used.

    Parameters
    ----------
    intensity, intensity_err : (n,) ndarray
    min_snr : float
    expected : callable, optional
        ``expected(rows) -> (m,) ndarray``, the expected ratio of fits ``rows``.

    Returns
    -------
    (n,) bool ndarray
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = intensity / intensity_err
    low = ~(snr >= min_snr)
    if expected is not None:
        rows = np.flatnonzero(np.isfinite(snr) & (snr < SNR_RECHECK * min_snr))
        for start in range(0, len(rows), _RECHECK_ROWS):  # bounded (rows, k, P) Jacobians
            part = rows[start:start + _RECHECK_ROWS]
            low[part] = ~(expected(part) >= min_snr)
    return low


def not_spot(values, widths, lower, upper):
    """Fits that describe no diffraction-limited spot.

    A fit wider than ``MAX_WIDTH`` times the configured PSF sigma along any
    axis (nuclear texture, a cell's edge, an aggregate, out-of-focus light),
    or with a width stuck at its bound (the lower one: a single hot pixel;
    the upper one, half the window: a blob the window cannot hold).

    Parameters
    ----------
    values : dict of str -> (n,) ndarray
        Output columns (:func:`measure`): ``sigma_x``, ``sigma_y``[, ``sigma_z``].
    widths : tuple of float
        Configured PSF sigma along ``x, y[, z]``.
    lower, upper : tuple of float
        The widths' bounds along ``x, y[, z]`` (px, planes).

    Returns
    -------
    (n,) bool ndarray
    """
    out = collapsed(values, lower)
    for column, expected, hi in zip(("sigma_x", "sigma_y", "sigma_z"), widths, upper):
        w = values[column]
        out |= (w > MAX_WIDTH * expected) | (w >= hi * (1 - 1e-3))
    return out


def collapsed(values, lower):
    """Fits with a width at its lower bound along some axis (a single bright pixel: a hot
    pixel, a cosmic ray), whatever the solver said.

    Parameters
    ----------
    values : dict of str -> (n,) ndarray
        Output columns (:func:`measure`): ``sigma_x``, ``sigma_y``[, ``sigma_z``].
    lower : tuple of float
        The widths' lower bounds along ``x, y[, z]`` (px, planes).

    Returns
    -------
    (n,) bool ndarray
    """
    out = np.zeros(len(values["sigma_x"]), bool)
    for column, lo in zip(("sigma_x", "sigma_y", "sigma_z"), lower):
        out |= values[column] <= lo * (1 + 1e-3)
    return out


def judge(status, outside, low, saturated=None, wide=None, collapsed=None):
    """Final status codes.

    Parameters
    ----------
    status : (n,) int ndarray
        The solver's codes.
    outside : (n,) bool ndarray
        The centre ended outside its window or on a pixel outside the image
        (``roi.Windows.inside``): ``left_window`` unless ``singular``.
    low : (n,) bool ndarray
        :func:`low_signal`: a ``converged`` fit becomes ``low_signal``.
    saturated : (n,) bool ndarray, optional
        The fit used pixels clipped at the input's maximum value: a
        ``converged``, ``low_signal`` or ``not_spot`` fit becomes
        ``saturated``.
    wide : (n,) bool ndarray, optional
        :func:`not_spot`: a ``converged`` fit (significant: not
        ``low_signal``) becomes ``not_spot``; ``saturated`` still takes
        precedence.
    collapsed : (n,) bool ndarray, optional
        :func:`collapsed`: a ``max_iterations`` fit becomes ``not_spot`` too
        (the position of a one-pixel object does not settle: least squares
        on a hot pixel ran out of iterations 30 times in 30).

    Returns
    -------
    (n,) int8 ndarray
    """
    out = np.array(status, dtype=np.int8, copy=True)
    out[outside & (out != SINGULAR)] = LEFT_WINDOW
    out[(out == CONVERGED) & low] = LOW_SIGNAL
    if wide is not None:  # a shape is judged only on a significant fit
        out[wide & (out == CONVERGED)] = NOT_SPOT
    if collapsed is not None:
        out[collapsed & (out == MAX_ITERATIONS)] = NOT_SPOT
    if saturated is not None:  # the clipped pixel explains an odd fit best
        out[saturated & ((out == CONVERGED) | (out == LOW_SIGNAL) | (out == NOT_SPOT))] = SATURATED
    return out


def status_names(codes) -> np.ndarray:
    """Names (:data:`STATUS_NAMES`) of status codes, as an object array."""
    return np.asarray(STATUS_NAMES, dtype=object)[np.asarray(codes, dtype=np.int64)]


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
        Calibrated: the camera's; otherwise a constant pixel variance (the
        frame's, as ``Noise(excess=0, read_var=...)``).

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
        var = noise.variance(mu)
        if noise.calibrated:  # photons^2: an absolute floor
            floor = 1e-6
        else:  # any unit: relative to the window's largest variance (1e-6 for none at all)
            top = np.max(np.where(mask, var, 0.0), axis=1, keepdims=True)
            floor = np.where(top > 0, 1e-12 * top, 1e-6)
        weight = mask / np.maximum(var, floor)
    from spotfit.start import intensity_floor

    theta = model.from_moments(centres, w, np.maximum(np.nan_to_num(intensity, nan=0.0),
                                                      intensity_floor(data, mask)), offset)
    mask_arg = None if mask.all() else mask
    bound = solver.crlb(model, theta, grid, noise, mask=mask_arg)[:, model.intensity_index]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(intensity) & (intensity > 0), intensity / bound, 0.0)
