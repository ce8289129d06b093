"""Batched Levenberg-Marquardt: every window of an image in one vectorised solve.

The solver knows nothing about Gaussians or noise: it takes a model
(:mod:`spotfit.models`) and an estimator (:mod:`spotfit.estimators`) and
asks them only what they declare (the model's kernel and roles, the
estimator's cost and properties).  It runs the compiled kernel
:func:`spotfit._kernels.levenberg_marquardt` over all windows in one call
(each window stops when it converges), then computes every window's
covariance.  No fit ever raises: each gets a status code
(:mod:`spotfit._kernels`; their names are :data:`spotfit.results.STATUS_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spotfit._jit import join_alongside, over_windows
from spotfit._kernels import (
    CAMERA_VARIANCE, CONVERGED, LOW_SIGNAL, MEASURE_VARIANCE, MEASURED_VARIANCE, SCORE_STATISTIC, SINGULAR,
    MODEL, VAR_FLOOR, model_for, Box, CovarianceOut, FitState, NoiseModel,
)
from spotfit.estimators import Estimator, Noise
from spotfit.models import Grid, Model

#: MLE fits are bias-corrected when their intensity's signal-to-noise ratio
#: ``N / err_N`` is below this.  The relative bias of N falls as
#: ``c / SNR^2`` with c = 0.4-1.3 (symmetric to rotated model, sigma 1-2 px):
#: above 20 it is < 0.35% of N and < 7% of err_N, too small to pay for the
#: correction (up to 5 extra model evaluations per fit: +70% MLE fit time).
BIAS_SNR = 20.0
#: windows (per group, e.g. per frame) used to measure the noise model of an
#: uncalibrated camera, evenly spread over the group's windows
REGRESSION_WINDOWS = 2000


@dataclass
class Solution:
    """Result of :func:`solve` for ``n`` windows with ``k`` parameters.

    Attributes
    ----------
    theta : (n, k) ndarray
        Fitted parameters in the model's fitted parametrisation
        (window-relative coordinates); see ``Model.public`` for reporting.
    cov : (n, k, k) ndarray
        Covariance of the estimate under the noise model (see
        :func:`covariance`); NaN for singular fits.
    cost : (n,) ndarray
        Final objective (chi-square scale).
    chi2_red : (n,) ndarray
        Reduced chi-square: Pearson ``sum (d - mu)^2 / var / dof`` when the
        noise model is known, else ``cost / dof``.
    iterations : (n,) int ndarray
    status : (n,) int ndarray
        A status code of :mod:`spotfit._kernels` (names: :data:`spotfit.results.STATUS_NAMES`).
    bias : (n, k) ndarray
        First-order bias already subtracted from ``theta`` (estimators with
        ``bias_correctable`` and ``bias_correct``; zeros otherwise), see
        :func:`covariance`.
    variance : (n, 3) ndarray
        Uncalibrated noise model ``(alpha, beta, floor)`` each window's
        covariance used (:func:`covariance`); NaN with a calibrated camera.
    unstable : (n, k) bool ndarray or None
        The parameters whose bias correction made a window ``low_signal``
        (a correction larger than the parameter's error, or a bound that the
        correction changed by more than :data:`COVARIANCE_CHANGE`); a joint
        fit of several emitters judges each emitter on its own parameters.
    """

    theta: np.ndarray
    cov: np.ndarray
    cost: np.ndarray
    chi2_red: np.ndarray
    iterations: np.ndarray
    status: np.ndarray
    bias: np.ndarray
    variance: np.ndarray
    unstable: np.ndarray | None = None

    @property
    def err(self) -> np.ndarray:
        """Standard errors, ``sqrt(diag(cov))``, shape ``(n, k)``."""
        return np.sqrt(np.clip(np.diagonal(self.cov, axis1=1, axis2=2), 0.0, None))


def solve(
    model: Model,
    estimator: Estimator,
    data: np.ndarray,
    mask: np.ndarray,
    grid: Grid,
    theta0: np.ndarray,
    noise: Noise = Noise(),
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    free: np.ndarray | None = None,
    max_iter: int = 50,
    tol: float = 1e-3,
    hold_first: np.ndarray | None = None,
    hold_rows: np.ndarray | None = None,
    bias_correct: bool = True,
    groups: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    active_set: bool = False,
    boxed: bool = False,
    rough_start: bool = False,
) -> Solution:
    """Fit ``model`` to every window at once.

    Parameters
    ----------
    model : Model
    estimator : Estimator
    data : (n, P) ndarray
        Window pixels, flattened in C order (x fastest), in photons or ADU.
    mask : (n, P) bool ndarray
        False for pixels left out (outside the image, a neighbour's).
    grid : Grid
        Window shape shared by all windows.
    theta0 : (n, k) ndarray
        Starting values (window-relative coordinates).
    noise : Noise
        Noise model, used by weighted estimators and for the covariance.
    lower, upper : (n, k) or (k,) ndarray, optional
        Box constraints; trial points are clipped into them.
    free : (k,) bool ndarray, optional
        False for parameters held fixed at ``theta0``.
    max_iter : int
        Iteration limit per fit.
    tol : float
        Converged when an accepted step lowers the cost by less than ``tol``
        in chi-square units (an estimator with ``normalised_cost`` is first
        divided by its residual variance ``cost / dof``).  A change of 1e-3
        in chi-square moves parameters by about 3% of their standard error.
    hold_first : (k,) bool ndarray, optional
        Parameters held at ``theta0`` in a first pass, then freed for a
        second pass from its result.  Holding the widths first keeps faint
        fits from collapsing onto a single noisy pixel (a spurious minimum
        with sigma near 0) before the centre has found the spot.
    hold_rows : (n,) bool ndarray, optional
        Windows that get that first pass (default: all).  Bright spots do
        not need it.
    bias_correct : bool
        For an estimator with ``bias_correctable`` (the Poisson MLE),
        subtract each fit's first-order bias (Cox & Snell, 1968; see
        :func:`covariance`) from ``theta``, clipped into the bounds.  At low
        signal the MLE of intensity and width is biased high by a few percent
        (e.g. +3% at 500 photons over 100 photons/px); the correction removes
        that to O(1/N^2) and leaves the variance unchanged to first order;
        the covariance is then evaluated at the corrected estimate.
        Fits with an intensity signal-to-noise ratio of :data:`BIAS_SNR` or
        more, where it is negligible, are not corrected.  A fit whose
        correction exceeds the standard error of any of its parameters is
        left uncorrected and gets status ``low_signal``.
    groups : (n,) int ndarray, optional
        Without a calibrated camera: windows sharing a noise model (e.g. one
        label per frame); default all one group.  See :func:`covariance`.
    variance : (n, 3) ndarray, optional
        Without a calibrated camera: the noise model ``(alpha, beta,
        floor)`` of each window, measured beforehand (by an earlier
        :func:`solve`'s ``Solution.variance``), instead of measuring it here.
    active_set : bool
        Hold a parameter that sits at a bound for a step whose gradient
        pushes it outwards (a projected step: the other parameters move as
        if it were fixed), instead of clipping the full step.  A fit whose
        optimum lies on a bound then converges in a few steps instead of
        creeping along the bound and stopping short of it: joint fits with a
        width at its bound; single-spot fits whose offset sits at 0 (no
        background: a single-molecule frame's read noise only), about twice
        as many steps clipped.  spotfit's fits all use it; False clips.
    boxed : bool
        Evaluate each window's model, and sum its cost, normal equations and
        covariance, only over the box of its unmasked pixels (``KernelModel.boxed``,
        :data:`spotfit._kernels.MODEL_BOXED`): the same fits up to rounding, and bit
        for bit the same whatever window surrounds the box (a bucket of joint fits
        pads its groups' windows to its largest box: a frame's fits then do not
        depend on the other frames fitted with it).  For windows with many masked
        pixels, as the crowded-field engine's are.  Always for models of several
        emitters.  Its kernels are compiled on first use, so single-spot runs leave
        it False.
    rough_start : bool
        The fits start from rough places (the crowded-field engine's joint fits:
        residual peaks, split spots, neighbours' earlier fits): a step shrinks an
        intensity to no less than :data:`spotfit._kernels.INTENSITY_SHRINK` of its
        value, so that an overshooting first step does not take an emitter's
        intensity to its bound, where its position no longer moves the fit (and the
        spot is lost).  A spurious emitter still fades to its bound, in a few steps.

    Returns
    -------
    Solution
    """
    fit = minimise(model, estimator, data, mask, grid, theta0, noise=noise, lower=lower, upper=upper,
                   free=free, max_iter=max_iter, tol=tol, hold_first=hold_first, hold_rows=hold_rows,
                   active_set=active_set, boxed=boxed, rough_start=rough_start)
    return finish(fit, bias_correct=bias_correct, groups=groups, variance=variance)


@dataclass
class Minimised:
    """The Levenberg-Marquardt part of :func:`solve`: its inputs, as :func:`solve`
    prepared them, and the fits' state (:data:`spotfit._kernels.FitState`) before
    the covariance (:func:`finish`)."""

    model: Model
    estimator: Estimator
    data: np.ndarray
    grid: Grid
    noise: Noise
    lower: np.ndarray
    upper: np.ndarray
    free: np.ndarray
    cost: object
    state: object
    boxed: bool = False  # each window's model over the box of its unmasked pixels (as solve's)

    def __len__(self):
        return len(self.data)


def minimise(model, estimator, data, mask, grid, theta0, noise=Noise(), lower=None, upper=None, free=None,
             max_iter=50, tol=1e-3, hold_first=None, hold_rows=None, active_set=False,
             boxed=False, rough_start=False) -> Minimised:
    """The fits of :func:`solve` (same parameters) without their covariance: then
    :func:`finish`.  Each window's fit depends on that window only."""
    from spotfit._kernels import levenberg_marquardt

    n, k = theta0.shape
    free = np.ones(k, bool) if free is None else np.asarray(free, bool)
    lower = np.full(k, -np.inf) if lower is None else np.asarray(lower, float)
    upper = np.full(k, np.inf) if upper is None else np.asarray(upper, float)
    lower = np.ascontiguousarray(np.broadcast_to(lower, (n, k)), dtype=float)
    upper = np.ascontiguousarray(np.broadcast_to(upper, (n, k)), dtype=float)
    data = np.ascontiguousarray(data, dtype=float)

    cost = estimator.cost(data, mask, noise)
    km = model.kernel(grid)
    if boxed or model_for(km) is not MODEL:  # joint fits: each window's model over the box of its unmasked pixels
        km = km._replace(boxed=1)
    fn = model_for(km)
    state = FitState(np.array(theta0, dtype=float, order="C", copy=True), np.zeros(n, dtype=np.int32),
                     np.zeros(n, dtype=np.int8), np.zeros(n))
    if n:
        if hold_first is not None:  # a short, coarse first pass is enough to find the spot
            rows = np.arange(n) if hold_rows is None else np.flatnonzero(hold_rows)
            if len(rows):
                first = FitState(state.theta[rows], np.zeros(len(rows), dtype=np.int32),
                                 np.zeros(len(rows), dtype=np.int8), np.zeros(len(rows)))
                over_windows(levenberg_marquardt, len(rows), fn, km, _rows(cost, rows),
                             Box(lower[rows], upper[rows], free & ~np.asarray(hold_first, bool), int(active_set),
                                 int(rough_start)),
                             first, int(min(max_iter, 3)), float(10 * tol),
                             threaded=_threaded(len(rows), data.shape[1], k))
                state.theta[rows] = first.theta
                state.iterations[rows] = first.iterations
        done = state.iterations.copy()
        over_windows(levenberg_marquardt, n, fn, km, cost, Box(lower, upper, free, int(active_set), int(rough_start)),
                     state, int(max_iter), float(tol), threaded=_threaded(n, data.shape[1], k))
        state.iterations[:] += done
    return Minimised(model, estimator, data, grid, noise, lower, upper, free, cost, state, bool(km.boxed))


def noise_sums(fit: Minimised, rows) -> np.ndarray:
    """The statistics ``(n, 5)`` of windows ``rows`` of ``fit`` that measure an
    uncalibrated noise model (:func:`noise_model`; per window, so those of
    several fits of some windows each are those of one fit of all)."""
    join_alongside()  # a first run may compile this kernel in a second process
    return _regression_sums(fit.model.kernel(fit.grid), fit.cost, fit.data, fit.state.theta, fit.free,
                            np.asarray(rows, np.int64))


def _regression_sums(km, cost, data, theta, free, rows) -> np.ndarray:
    """The noise model's statistics ``(len(rows), 5)`` of windows ``rows``."""
    from spotfit._kernels import covariance as kernel

    k = theta.shape[1]
    sums = np.zeros((len(rows), 5))
    none = np.zeros(0)
    over_windows(kernel, len(rows), model_for(km), km, _rows(cost, rows), data[rows], theta[rows], free,
                 NoiseModel(MEASURE_VARIANCE, 1.0, np.zeros((0, 0)), none, none, none),
                 CovarianceOut(np.zeros((len(rows), k, k)), np.zeros(len(rows)), sums, np.zeros((0, k))),
                 0.0, _NO_EMBED)
    return sums


def noise_model(groups, sums) -> np.ndarray:
    """Per window ``(alpha, beta, floor)`` of its group's noise model, from the
    statistics ``sums`` (:func:`noise_sums`) of the group's regression windows
    (:func:`regression_rows` of ``groups``, in their order)."""
    groups = np.asarray(groups)
    labels, inverse = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(labels), 5))
    np.add.at(per_group, inverse[regression_rows(groups)], sums)
    return variance_model(per_group)[inverse]


def finish(fit: Minimised, bias_correct: bool = True, groups=None, variance=None) -> Solution:
    """:func:`solve` after :func:`minimise`: the covariance, statuses and bias
    correction of the fits ``fit`` (``bias_correct``, ``groups``, ``variance``
    as in :func:`solve`)."""
    model, estimator, data, grid, noise = fit.model, fit.estimator, fit.data, fit.grid, fit.noise
    lower, upper, free, cost, state = fit.lower, fit.upper, fit.free, fit.cost, fit.state
    theta, status = state.theta, state.status
    want_bias = bias_correct and estimator.bias_correctable
    shaky = np.zeros(theta.shape, bool)
    cov, chi2_red, bias, used = covariance(model, cost, data, theta, grid, noise, free, want_bias,
                                           groups=groups, variance=variance, boxed=fit.boxed)
    singular = ~np.all(np.isfinite(np.diagonal(cov, axis1=1, axis2=2))[:, free], axis=1)
    status[singular & (status == CONVERGED)] = SINGULAR
    if want_bias:
        # A correction as large as the parameter's own standard error means
        # the fit is far from the asymptotic regime that both the correction
        # and the CRLB errors rely on: such fits keep the plain MLE and are
        # flagged low_signal.
        err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
        with np.errstate(invalid="ignore"):
            shaky = (np.abs(bias) > err) | ~np.isfinite(bias)
        unstable = np.any(shaky, axis=1)
        bias[unstable] = 0.0
        status[unstable & (status == CONVERGED)] = LOW_SIGNAL
        corrected = np.clip(theta - bias, lower, upper)
        cov = _at_corrected(model, cost, data, theta, corrected, cov, grid, noise, free, status, shaky,
                            boxed=fit.boxed)
        bias = theta - corrected
        theta = corrected
    return Solution(theta, cov, state.cost, chi2_red, state.iterations, status, bias, used, shaky)


#: the covariance at a bias-corrected estimate is used when no variance of a free
#: parameter differs from the plain estimate's by more than this factor
COVARIANCE_CHANGE = 4.0


def _at_corrected(model, cost, data, theta, corrected, cov, grid, noise, free, status, shaky=None, boxed=False):
    """The covariance at the bias-corrected estimates (Poisson MLE, calibrated).

    The errors reported are the Cramer-Rao bound at the parameters reported:
    at the plain MLE, whose intensity and width are biased high at low
    signal, they came out ~2-4% small exactly where they matter (e.g. 500
    photons over 100 photons/px).  A correction smaller than one standard
    error (the rule of :func:`solve`) changes the bound by a few percent; a
    bound that changes by more than :data:`COVARIANCE_CHANGE` in variance (or
    is not finite), e.g. a rotated Gaussian corrected to a nearly degenerate
    ellipse, means the corrected point is not a trustworthy model: such
    fits keep the plain MLE, its covariance, and status ``low_signal``.
    ``corrected`` and ``status`` (and ``shaky``, ``(n, k)``: the parameters
    whose bound changed too much) are updated in place; returns the covariance.
    """
    rows = np.flatnonzero(np.any(corrected != theta, axis=1))
    if len(rows) == 0:
        return cov
    read_var = noise.read_var if np.ndim(noise.read_var) == 0 else np.asarray(noise.read_var)[rows]
    moved, _, _, _ = covariance(model, _rows(cost, rows), data[rows], corrected[rows], grid,
                                Noise(noise.calibrated, noise.excess, read_var), free, boxed=boxed)
    before = np.diagonal(cov[rows], axis1=1, axis2=2)[:, free]
    after = np.diagonal(moved, axis1=1, axis2=2)[:, free]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = after / before
    fine = np.isfinite(after) & (ratio <= COVARIANCE_CHANGE) & (ratio >= 1.0 / COVARIANCE_CHANGE)
    good = np.all(fine, axis=1)
    if shaky is not None:
        shaky[np.ix_(rows[~good], np.flatnonzero(free))] |= ~fine[~good]
    out = cov.copy()
    out[rows[good]] = moved[good]
    bad = rows[~good]
    corrected[bad] = theta[bad]
    status[bad[status[bad] == CONVERGED]] = LOW_SIGNAL
    return out


def score_test(model, estimator, data, mask, grid, theta, embed, noise=Noise(), residual_var=None):
    """Score (Lagrange multiplier) statistic of a richer model at a simpler model's fit.

    For each window, the gradient ``g`` and curvature ``H`` of the richer
    model's cost at ``theta`` (the simpler fit, embedded in the richer
    model's parameters), projected off the directions the simpler model
    spans:

        T = g^T [H^-1 - D (D^T H D)^-1 D^T] g

    with ``D`` the Jacobian of the embedding.  For the Poisson likelihood
    (and weighted least squares) ``T`` is asymptotically chi-square with as
    many degrees of freedom as the richer model has extra parameters when
    the simpler model is right: the deviance the richer fit would gain,
    predicted without fitting it.

    Parameters
    ----------
    model : Model
        The richer model.
    estimator : Estimator
    data, mask : (n, P) ndarrays
    grid : Grid
    theta : (n, k_r) ndarray
        The simpler model's fitted parameters (its plain estimate: a bias
        correction would leave a gradient along the simpler model too).
    embed : callable
        ``embed(theta) -> (n, k)`` parameters of the richer model.
    noise : Noise
    residual_var : (n,) ndarray, optional
        Divides ``T``: the residual variance of an unweighted least-squares
        fit (its cost is a sum of squares, not a chi-square).

    Returns
    -------
    (n,) ndarray
        ``T``; NaN where a curvature is singular.
    """
    from spotfit._kernels import covariance as kernel

    n = len(theta)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    kr = theta.shape[1]
    D = np.empty((n, model.n_params, kr))
    for j in range(kr):  # the embedding's Jacobian, by central differences
        h = 1e-6 * np.maximum(np.abs(theta[:, j]), 1.0)
        up, down = theta.copy(), theta.copy()
        up[:, j] += h
        down[:, j] -= h
        D[:, :, j] = (embed(up) - embed(down)) / (2.0 * h[:, None])
    data = np.ascontiguousarray(data, dtype=float)
    cost = estimator.cost(data, mask, noise)
    k = model.n_params
    none = np.zeros(0)
    join_alongside()  # a first run may compile this kernel in a second process
    # the covariance kernel's other mode (one kernel compiles faster than two)
    over_windows(kernel, n, MODEL, model.kernel(grid), cost, data, np.ascontiguousarray(embed(theta), dtype=float),
                 np.ones(k, bool), NoiseModel(SCORE_STATISTIC, 1.0, np.zeros((0, 0)), none, none, none),
                 CovarianceOut(np.zeros((0, k, k)), out, np.zeros((0, 5)), np.zeros((0, k))), 0.0,
                 np.ascontiguousarray(D))
    if residual_var is not None:
        out = out / np.maximum(residual_var, VAR_FLOOR)
    return out


#: windows x pixels x parameters^2 from which a solve runs on threads even with
#: fewer than :data:`spotfit._jit.MIN_THREADED_WINDOWS` windows (a few large
#: joint fits are worth waking the threads for; a few small fits are not)
THREADED_WORK = 200_000


def _threaded(n, pixels, k) -> bool:
    """Whether ``n`` windows of ``pixels`` pixels and ``k`` parameters are worth threads."""
    from spotfit._jit import MIN_THREADED_WINDOWS

    return n >= 2 and (n >= MIN_THREADED_WINDOWS or n * pixels * k * k >= THREADED_WORK)


def _rows(cost, rows):
    """The cost of windows ``rows`` only."""
    return cost._replace(data=cost.data[rows], weight=cost.weight[rows], shift=cost.shift[rows])


#: the covariance kernel's ``embed`` argument outside its score-statistic mode
_NO_EMBED = np.zeros((0, 0, 0))


def covariance(model, cost, data, theta, grid, noise, free, bias=False, groups=None, variance=None,
               boxed=False):
    """Covariance of the estimates under the noise model, reduced chi2, MLE bias.

    With a calibrated camera this is the sandwich covariance
    ``A^-1 B A^-1`` with ``A = J W J^T`` (the estimator's curvature) and
    ``B = J W V W J^T``, ``V`` the pixel variance ``excess * mu + read_var``
    of the fitted model.  For Poisson MLE it reduces to the inverse Fisher
    information, i.e. the Cramer-Rao lower bound evaluated at the fit.
    Without a calibrated camera the variance is modelled as a camera's,
    ``V = alpha + beta * mu`` (read noise plus shot noise at an unknown gain
    and baseline), with ``alpha, beta`` fitted per group of windows
    (``groups``, e.g. per frame) to the squared residuals of up to
    :data:`REGRESSION_WINDOWS` windows of the group, evenly spread over it,
    each corrected for its leverage (a photon-transfer curve from the data
    itself); the covariance then follows as above, and the reduced
    chi-square is measured against that model.  A group's model depends on
    that group's windows only, not on what else is in the batch.

    With ``bias`` (Poisson MLE only) the first-order bias of each fit is
    returned too: ``b = -1/2 C sum_p J_p tr(C H_p) / var_p`` (Cox & Snell,
    J. R. Stat. Soc. B 30:248, 1968), ``C`` the inverse Fisher information,
    ``H_p`` the Hessian of pixel ``p``'s expected value; zeros for other
    estimators and for fits whose intensity has a signal-to-noise ratio of
    :data:`BIAS_SNR` or more.

    Parameters
    ----------
    model : Model
    cost : spotfit._kernels.Cost
        From :meth:`Estimator.cost`.
    data : (n, P) ndarray
        Window pixels.
    theta : (n, k) ndarray
    grid : Grid
    noise : Noise
    free : (k,) bool ndarray
    bias : bool
    groups : (n,) int ndarray, optional
    variance : (n, 3) ndarray, optional
        Uncalibrated: ``(alpha, beta, floor)`` per window, instead of
        measuring them.
    boxed : bool
        Each window's model and sums over the box of its unmasked pixels (as
        :func:`solve`'s ``boxed``; always for models of several emitters): a
        window's covariance then does not depend on the window around the box.

    Returns
    -------
    cov : (n, k, k) ndarray
    chi2_red : (n,) ndarray
    bias : (n, k) ndarray
    variance : (n, 3) ndarray
        The uncalibrated noise model used per window (NaN if calibrated).
    """
    from spotfit._kernels import covariance as kernel

    n, k = theta.shape
    out = CovarianceOut(np.zeros((n, k, k)), np.zeros(n), np.zeros((n, 5)),
                        np.zeros((n, k)) if bias else np.zeros((0, k)))
    used = np.full((n, 3), np.nan)
    if n == 0:
        return out.cov, out.chi2, np.zeros((n, k)), used
    km = model.kernel(grid)
    if boxed or model_for(km) is not MODEL:  # as minimise: sums over each window's box alone
        km = km._replace(boxed=1)
    data = np.ascontiguousarray(data, dtype=float)
    free = np.asarray(free, bool)
    join_alongside()  # a first run may compile this kernel in a second process
    if noise.calibrated:
        read_var = np.ascontiguousarray(np.broadcast_to(noise.read_var, data.shape), dtype=float)
        if not read_var.flags.writeable:  # (read-only: another type, compiled again)
            read_var = read_var.copy()
        none = np.zeros(0)
        over_windows(kernel, n, model_for(km), km, cost, data, theta, free,
                     NoiseModel(CAMERA_VARIANCE, float(noise.excess), read_var, none, none, none), out,
                     BIAS_SNR, _NO_EMBED, threaded=_threaded(n, data.shape[1], k))
    else:
        if variance is None:
            variance = _measure_variance(km, cost, data, theta, free, groups)
        used = np.ascontiguousarray(variance, dtype=float)
        over_windows(kernel, n, model_for(km), km, cost, data, theta, free,
                     NoiseModel(MEASURED_VARIANCE, 1.0, np.zeros((0, 0)), used[:, 0].copy(),
                                used[:, 1].copy(), used[:, 2].copy()), out, 0.0, _NO_EMBED,
                     threaded=_threaded(n, data.shape[1], k))
    return out.cov, out.chi2, out.bias if bias else np.zeros((n, k)), used


def regression_rows(groups) -> np.ndarray:
    """The windows that measure each group's noise model (sorted indices).

    Up to :data:`REGRESSION_WINDOWS` per group, evenly spread over the
    group's windows (in their order): the noise model of a group's camera
    is global, and this many windows measure it as well as all would.
    """
    groups = np.asarray(groups)
    labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.max() <= REGRESSION_WINDOWS:
        return np.arange(len(groups))
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = []
    for g, c in enumerate(counts):
        pick = np.unique(np.linspace(0, c - 1, min(c, REGRESSION_WINDOWS)).astype(np.int64))
        rows.append(order[starts[g] + pick])
    return np.sort(np.concatenate(rows))


def _measure_variance(km, cost, data, theta, free, groups):
    """Per-window ``(alpha, beta, floor)`` of its group's measured noise model."""
    groups = np.zeros(len(theta), np.int64) if groups is None else np.asarray(groups)
    return noise_model(groups, _regression_sums(km, cost, data, theta, free, regression_rows(groups)))


def variance_model(sums):
    """Least-squares lines ``r2 ~ alpha + beta * mu`` from summed statistics.

    Parameters
    ----------
    sums : (g, 5) ndarray
        Per group: (count, sum mu, sum r2, sum mu^2, sum mu r2) over all
        valid pixels of its regression windows.

    Returns
    -------
    (g, 3) ndarray
        ``(alpha, beta, floor)`` per group; ``alpha`` may be negative (an
        unknown camera baseline); ``floor`` = 5% of the mean squared
        residual is the lowest variance the model may give a pixel.  A group
        whose slope is not positive (or with fewer than 3 pixels) gets a
        constant variance.
    """
    sums = np.atleast_2d(np.asarray(sums, dtype=float))
    count, s_m, s_r, s_mm, s_mr = sums.T
    out = np.empty((len(sums), 3))
    few = count < 3
    with np.errstate(divide="ignore", invalid="ignore"):
        mm, rm = s_m / count, s_r / count
        var_m = s_mm / count - mm * mm
        beta = np.where(var_m > 0, (s_mr / count - mm * rm) / var_m, 0.0)
    # floors relative to the data (any unit); VAR_FLOOR only for noise-free data
    rm_few = _positive(s_r / np.maximum(count, 1.0))
    flat = ~np.isfinite(beta) | (beta <= 0)
    out[:, 0] = np.where(few, rm_few, np.where(flat, _positive(rm), rm - beta * mm))
    out[:, 1] = np.where(few | flat, 0.0, beta)
    out[:, 2] = np.where(few, rm_few, _positive(0.05 * rm))
    return out


def _positive(v):
    """``v`` where positive, else :data:`VAR_FLOOR` (a residual-free fit)."""
    v = np.asarray(v, dtype=float)
    return np.where(v > 0, v, VAR_FLOOR)


def _inverse(A):
    """Batched inverse of symmetric matrices; NaN where singular."""
    s = 1.0 / np.sqrt(np.clip(np.diagonal(A, axis1=1, axis2=2), 1e-300, None))
    As = A * s[:, :, None] * s[:, None, :]
    out = np.full_like(A, np.nan)
    cond_ok = np.all(np.isfinite(As), axis=(1, 2))
    if cond_ok.any():
        w, v = np.linalg.eigh(As[cond_ok])
        good = w.min(axis=1) > 1e-10 * w.max(axis=1)
        inv = np.matmul(v / np.where(w > 0, w, np.inf)[:, None, :], v.transpose(0, 2, 1))
        inv[~good] = np.nan
        out[cond_ok] = inv
    return out * s[:, :, None] * s[:, None, :]


def crlb(model: Model, theta: np.ndarray, grid: Grid, noise: Noise, mask=None) -> np.ndarray:
    """Cramer-Rao lower bound of every parameter at ``theta``.

    Parameters
    ----------
    model : Model
    theta : (n, k) ndarray
        Parameters (e.g. the ground truth of a simulation), window-relative.
    grid : Grid
    noise : Noise
        Calibrated noise model: Fisher information ``J V^-1 J^T`` with
        ``V = excess * mu + read_var``.
    mask : (n, P) bool ndarray, optional

    Returns
    -------
    (n, k) ndarray
        Square roots of the diagonal of the inverse Fisher information, in
        the units of each parameter (px for positions).
    """
    mu, jac = model.evaluate(np.asarray(theta, float), grid)
    var = noise.variance(mu)
    # photons: an absolute floor; other units: positive only (any unit alike)
    inv_var = 1.0 / (np.maximum(var, VAR_FLOOR) if noise.calibrated else _positive(var))
    if mask is not None:
        inv_var = inv_var * mask
    fisher = np.matmul(jac * inv_var[:, None, :], jac.transpose(0, 2, 1))
    return np.sqrt(np.clip(np.diagonal(_inverse(fisher), axis1=1, axis2=2), 0.0, None))


def compile_kernels() -> None:
    """Compile (or load from the cache) the covariance kernel, which also computes the
    score statistic (:func:`score_test`), on a tiny problem with the types every fit
    passes it."""
    compile_covariance_kernel()


def compile_covariance_kernel() -> None:
    """Compile (or load from the cache) the covariance kernel (see :func:`compile_kernels`).

    Run in a second process on a first run (:func:`spotfit._jit.compile_alongside`)
    while the first compiles detection and the Levenberg-Marquardt kernel.
    """
    MODEL.compile()  # first: the other process needs the model code too, and loads it from the cache
    model, estimator, data, mask, grid, theta, noise = _tiny_problem()
    cost = estimator.cost(data, mask, noise)
    covariance(model, cost, data, theta, grid, noise, np.ones(model.n_params, bool), bias=True)


def _tiny_problem():
    """Two windows of 5 x 5 px: the arguments of :func:`compile_kernels`."""
    from spotfit.estimators import Noise, get_estimator
    from spotfit.models import Grid, get_model

    grid = Grid((5, 5))
    model = get_model("rotated", integrated=True)
    theta = np.array([[100.0, 2.0, 2.0, 1.7, 1.7, 0.0, 1.0]] * 2)
    data = np.full((2, grid.size), 5.0)
    mask = np.ones(data.shape, bool)
    noise = Noise(calibrated=True, excess=1.0, read_var=1.0)
    return model, get_estimator("mle"), data, mask, grid, theta, noise
