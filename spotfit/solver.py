"""Batched Levenberg-Marquardt: every window of an image in one vectorised solve.

The solver knows nothing about Gaussians or noise: it takes a model
(:mod:`spotfit.models`) and an estimator (:mod:`spotfit.estimators`), runs
the compiled kernel :func:`spotfit._kernels.levenberg_marquardt` over all windows
in one call (each window stops when it converges), then computes every
window's covariance.  No fit ever raises: each gets a status code
(:data:`STATUS_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spotfit.estimators import Estimator, Noise
from spotfit.models import Grid, Model

#: fit status codes and their names in output tables
CONVERGED, MAX_ITERATIONS, SINGULAR, LEFT_WINDOW, LOW_SIGNAL = range(5)
STATUS_NAMES = ("converged", "max_iterations", "singular", "left_window", "low_signal")


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
        One of the codes in :data:`STATUS_NAMES`.
    bias : (n, k) ndarray
        First-order bias already subtracted from ``theta`` (Poisson MLE with
        ``bias_correct``; zeros otherwise), see :func:`covariance`.
    """

    theta: np.ndarray
    cov: np.ndarray
    cost: np.ndarray
    chi2_red: np.ndarray
    iterations: np.ndarray
    status: np.ndarray
    bias: np.ndarray

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
) -> Solution:
    """Fit ``model`` to every window at once.

    Parameters
    ----------
    model : Model
    estimator : Estimator
    data : (n, P) ndarray
        Window pixels, flattened in C order (x fastest), in photons or ADU.
    mask : (n, P) bool ndarray
        False for pixels outside the image (border-truncated windows).
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
        in chi-square units (the cost of unweighted least squares is first
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
        For the Poisson MLE, subtract each fit's first-order bias (Cox &
        Snell, 1968; see :func:`covariance`) from ``theta``, clipped into the
        bounds.  At low signal the MLE of intensity and width is biased high
        by a few percent (e.g. +3% at 500 photons over 100 photons/px); the
        correction removes that to O(1/N^2) and leaves the variance unchanged
        to first order.  Fits with an intensity signal-to-noise ratio of
        :data:`BIAS_SNR` or more, where it is negligible, are not corrected.
        A fit whose correction exceeds the standard error of any of its
        parameters is left uncorrected and gets status ``low_signal``.
        Other estimators are not corrected.

    Returns
    -------
    Solution
    """
    import numba

    from spotfit._kernels import levenberg_marquardt

    n, k = theta0.shape
    free = np.ones(k, bool) if free is None else np.asarray(free, bool)
    lower = np.full(k, -np.inf) if lower is None else np.asarray(lower, float)
    upper = np.full(k, np.inf) if upper is None else np.asarray(upper, float)
    lower = np.ascontiguousarray(np.broadcast_to(lower, (n, k)), dtype=float)
    upper = np.ascontiguousarray(np.broadcast_to(upper, (n, k)), dtype=float)
    data = np.ascontiguousarray(data, dtype=float)

    d_k, w_k, shift, scale = estimator.prepare(data, mask, noise)
    theta = np.array(theta0, dtype=float, order="C", copy=True)
    iterations = np.zeros(n, dtype=np.int32)
    status = np.zeros(n, dtype=np.int8)
    cost = np.zeros(n)
    if n:
        nz, ny, nx = grid.zyx
        args = (model.family, model.kernel_integ, estimator.kernel_id)
        chunks = 8 * numba.get_num_threads()  # a few chunks of windows per thread
        if hold_first is not None:  # a short, coarse first pass is enough to find the spot
            rows = np.arange(n) if hold_rows is None else np.flatnonzero(hold_rows)
            if len(rows):
                sub_theta, sub_iter = theta[rows], np.zeros(len(rows), dtype=np.int32)
                sub_status, sub_cost = np.zeros(len(rows), dtype=np.int8), np.zeros(len(rows))
                levenberg_marquardt(*args, d_k[rows], w_k[rows], shift[rows], float(scale),
                                    estimator.name == "lsq", nz, ny, nx, sub_theta, lower[rows],
                                    upper[rows], free & ~np.asarray(hold_first, bool),
                                    int(min(max_iter, 3)), float(10 * tol), sub_iter, sub_status,
                                    sub_cost, chunks)
                theta[rows] = sub_theta
                iterations[rows] = sub_iter
        done = iterations.copy()
        levenberg_marquardt(*args, d_k, w_k, shift, float(scale), estimator.name == "lsq", nz, ny, nx,
                            theta, lower, upper, free, int(max_iter), float(tol), iterations, status,
                            cost, chunks)
        iterations += done
    want_bias = bias_correct and estimator.name == "mle"
    cov, chi2_red, bias = covariance(model, estimator, (d_k, w_k, shift, scale), data, theta, grid,
                                     noise, free, want_bias)
    singular = ~np.all(np.isfinite(np.diagonal(cov, axis1=1, axis2=2))[:, free], axis=1)
    status[singular & (status == CONVERGED)] = SINGULAR
    if want_bias:
        # A correction as large as the parameter's own standard error means
        # the fit is far from the asymptotic regime that both the correction
        # and the CRLB errors rely on: such fits keep the plain MLE and are
        # flagged low_signal.
        err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
        with np.errstate(invalid="ignore"):
            unstable = np.any(np.abs(bias) > err, axis=1) | ~np.all(np.isfinite(bias), axis=1)
        bias[unstable] = 0.0
        status[unstable & (status == CONVERGED)] = LOW_SIGNAL
        corrected = np.clip(theta - bias, lower, upper)
        bias = theta - corrected
        theta = corrected
    return Solution(theta, cov, cost, chi2_red, iterations, status, bias)


def covariance(model, estimator, prepared, data, theta, grid, noise, free, bias=False):
    """Covariance of the estimates under the noise model, reduced chi2, MLE bias.

    With a calibrated camera this is the sandwich covariance
    ``A^-1 B A^-1`` with ``A = J W J^T`` (the estimator's curvature) and
    ``B = J W V W J^T``, ``V`` the pixel variance ``excess * mu + read_var``
    of the fitted model.  For Poisson MLE it reduces to the inverse Fisher
    information, i.e. the Cramer-Rao lower bound evaluated at the fit.
    Without a calibrated camera the variance is modelled as a camera's,
    ``V = alpha + beta * mu`` (read noise plus shot noise at an unknown gain
    and baseline), with ``alpha, beta`` fitted to the squared residuals of
    all windows of the batch, each corrected for its leverage (a
    photon-transfer curve from the data itself); the covariance then follows
    as above, and the reduced chi-square is measured against that model.

    With ``bias`` (Poisson MLE only) the first-order bias of each fit is
    returned too: ``b = -1/2 C sum_p J_p tr(C H_p) / var_p`` (Cox & Snell,
    J. R. Stat. Soc. B 30:248, 1968), ``C`` the inverse Fisher information,
    ``H_p`` the Hessian of pixel ``p``'s expected value; zeros for other
    estimators and for fits whose intensity has a signal-to-noise ratio of
    :data:`BIAS_SNR` or more.

    Returns
    -------
    cov : (n, k, k) ndarray
    chi2_red : (n,) ndarray
    bias : (n, k) ndarray
    """
    from spotfit._kernels import covariance as kernel

    n, k = theta.shape
    cov = np.zeros((n, k, k))
    chi2 = np.zeros(n)
    out_bias = np.zeros((n, k))
    if n == 0:
        return cov, chi2, out_bias
    no_bias = np.zeros((0, k))
    d_k, w_k, shift, scale = prepared
    nz, ny, nx = grid.zyx
    read_var = np.ascontiguousarray(np.broadcast_to(noise.read_var, data.shape), dtype=float)
    sums = np.zeros((n, 5))
    args = (model.family, model.kernel_integ, estimator.kernel_id, d_k, w_k, shift, float(scale), data,
            nz, ny, nx, theta, free)
    if noise.calibrated:
        kernel(*args, 0, float(noise.excess), read_var, 0.0, 0.0, 0.0, cov, chi2, sums,
               out_bias if bias else no_bias, BIAS_SNR)
    else:
        # The camera's (alpha, beta) are global: REGRESSION_WINDOWS evenly
        # spread windows measure them as well as all of them would.
        sub = np.unique(np.linspace(0, n - 1, min(n, REGRESSION_WINDOWS)).astype(np.int64))
        sub_sums = np.zeros((len(sub), 5))
        kernel(model.family, model.kernel_integ, estimator.kernel_id, d_k[sub], w_k[sub], shift[sub],
               float(scale), data[sub], nz, ny, nx, theta[sub], free, 1, 1.0, read_var[sub],
               0.0, 0.0, 0.0, np.zeros((len(sub), k, k)), np.zeros(len(sub)), sub_sums, no_bias, 0.0)
        alpha, beta, v_floor = _variance_model(sub_sums.sum(axis=0))
        kernel(*args, 2, 1.0, read_var, alpha, beta, v_floor, cov, chi2, sums, no_bias, 0.0)
    return cov, chi2, out_bias


_VAR_FLOOR = 1e-6
#: MLE fits are bias-corrected when their intensity's signal-to-noise ratio
#: ``N / err_N`` is below this.  The relative bias of N falls as
#: ``c / SNR^2`` with c = 0.4-1.3 (symmetric to rotated model, sigma 1-2 px):
#: above 20 it is < 0.35% of N and < 7% of err_N, too small to pay for the
#: correction (up to 5 extra model evaluations per fit: +70% MLE fit time).
BIAS_SNR = 20.0
#: windows used to fit the noise model of an uncalibrated camera
REGRESSION_WINDOWS = 2000


def _variance_model(sums):
    """Least-squares line ``r2 ~ alpha + beta * mu`` from summed statistics.

    ``sums`` = (count, sum mu, sum r2, sum mu^2, sum mu r2) over all valid
    pixels; ``alpha`` may be negative (an unknown camera baseline).  Falls
    back to a constant variance if the slope is not positive.  Returns
    ``(alpha, beta, floor)`` with ``floor`` = 5% of the mean squared residual,
    the lowest variance the model may give a pixel.
    """
    count, s_m, s_r, s_mm, s_mr = sums
    if count < 3:
        rm = max(s_r / max(count, 1.0), _VAR_FLOOR)
        return rm, 0.0, rm
    mm, rm = s_m / count, s_r / count
    var_m = s_mm / count - mm * mm
    beta = (s_mr / count - mm * rm) / var_m if var_m > 0 else 0.0
    floor = max(0.05 * rm, _VAR_FLOOR)
    if not np.isfinite(beta) or beta <= 0:
        return max(rm, _VAR_FLOOR), 0.0, floor
    return rm - beta * mm, beta, floor


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
    inv_var = 1.0 / np.maximum(noise.variance(mu), _VAR_FLOOR)
    if mask is not None:
        inv_var = inv_var * mask
    fisher = np.matmul(jac * inv_var[:, None, :], jac.transpose(0, 2, 1))
    return np.sqrt(np.clip(np.diagonal(_inverse(fisher), axis1=1, axis2=2), 0.0, None))
