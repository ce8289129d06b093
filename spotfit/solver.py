"""Batched Levenberg-Marquardt: every window of an image in one vectorised solve.

The solver knows nothing about Gaussians or noise: it takes a model
(:mod:`spotfit.models`) and an estimator (:mod:`spotfit.estimators`) and
iterates all fits at once as ``(n, k)`` arrays.  Converged fits leave the
active set, so the cost of an iteration falls as fits finish.  No fit ever
raises: each gets a status code (:data:`STATUS_NAMES`).
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
    """

    theta: np.ndarray
    cov: np.ndarray
    cost: np.ndarray
    chi2_red: np.ndarray
    iterations: np.ndarray
    status: np.ndarray

    @property
    def err(self) -> np.ndarray:
        """Standard errors, ``sqrt(diag(cov))``, shape ``(n, k)``."""
        return np.sqrt(np.clip(np.diagonal(self.cov, axis1=1, axis2=2), 0.0, None))


def _normal_equations(jac, e, W):
    """``H = J W J^T`` ``(n, k, k)`` and ``g = J e`` ``(n, k)``."""
    H = np.matmul(jac * W[:, None, :], jac.transpose(0, 2, 1))
    g = np.einsum("nkp,np->nk", jac, e)
    return H, g


def _damped_step(H, g, lam, free):
    """Solve ``(H + lam * diag(H)) delta = g`` for every fit.

    Fixed parameters (``free == False``) get ``delta = 0``.  Returns
    ``delta (n, k)`` and a boolean ``(n,)`` that is False where the system
    was singular.
    """
    k = H.shape[1]
    diag = np.diagonal(H, axis1=1, axis2=2)
    floor = 1e-12 * np.max(np.abs(diag), axis=1, keepdims=True) + 1e-300
    d = np.maximum(diag, floor)
    A = H.copy()
    idx = np.arange(k)
    A[:, idx, idx] = diag + lam[:, None] * d
    if not np.all(free):
        fixed = ~free
        A[:, fixed, :] = 0.0
        A[:, :, fixed] = 0.0
        A[:, fixed, fixed] = 1.0
        g = g.copy()
        g[:, fixed] = 0.0
    # Scale to unit diagonal: keeps the solve well conditioned when parameters
    # differ by orders of magnitude (photons vs pixels).
    s = 1.0 / np.sqrt(np.diagonal(A, axis1=1, axis2=2))
    As = A * s[:, :, None] * s[:, None, :]
    try:
        delta = np.linalg.solve(As, (g * s)[:, :, None])[:, :, 0] * s
    except np.linalg.LinAlgError:
        delta = np.einsum("nkl,nl->nk", np.linalg.pinv(As), g * s) * s
    ok = np.all(np.isfinite(delta), axis=1)
    delta[~ok] = 0.0
    return delta, ok


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

    Returns
    -------
    Solution
    """
    n, k = theta0.shape
    free = np.ones(k, bool) if free is None else np.asarray(free, bool)
    lower = np.full(k, -np.inf) if lower is None else np.asarray(lower, float)
    upper = np.full(k, np.inf) if upper is None else np.asarray(upper, float)
    lower = np.broadcast_to(lower, (n, k))
    upper = np.broadcast_to(upper, (n, k))
    dof = np.maximum(mask.sum(axis=1) - free.sum(), 1)

    theta = model.constrain(np.clip(np.asarray(theta0, float), lower, upper))
    state = estimator.prepare(data, mask, noise)
    iterations = np.zeros(n, dtype=np.int32)
    status = np.full(n, MAX_ITERATIONS, dtype=np.int8)
    lam = np.full(n, 1e-3)
    nu = np.full(n, 2.0)

    if n:
        mu, jac = model.evaluate(theta, grid)
        cost, e, W = estimator.terms(state, mu)
        H, g = _normal_equations(jac, e, W)
    else:
        cost = np.zeros(0)
        H = np.zeros((0, k, k))
        g = np.zeros((0, k))
    bad = ~np.isfinite(cost)
    status[bad] = SINGULAR
    active = np.flatnonzero(~bad)

    for _ in range(max_iter):
        if active.size == 0:
            break
        delta, ok = _damped_step(H[active], g[active], lam[active], free)
        status[active[~ok]] = SINGULAR
        active, delta = active[ok], delta[ok]
        if active.size == 0:
            break
        trial = model.constrain(np.clip(theta[active] + delta, lower[active], upper[active]))
        mu_t, jac_t = model.evaluate(trial, grid)
        cost_t, e_t, W_t = estimator.terms(Estimator.take(state, active), mu_t)
        iterations[active] += 1

        better = np.isfinite(cost_t) & (cost_t <= cost[active])
        acc = active[better]
        gain = cost[acc] - cost_t[better]
        # Nielsen's damping update from the ratio of actual to predicted gain,
        # the latter from the quadratic model of the cost: 2 delta.g - delta.H.delta.
        d_acc = delta[better]
        H_old = H[acc]
        predicted = 2.0 * np.einsum("nk,nk->n", d_acc, g[acc]) - np.einsum("nk,nkl,nl->n", d_acc, H_old, d_acc)
        rho = gain / np.where(predicted > 0, predicted, np.inf)
        lam[acc] = np.maximum(lam[acc] * np.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-9)
        nu[acc] = 2.0
        theta[acc] = trial[better]
        cost[acc] = cost_t[better]
        H_acc, g_acc = _normal_equations(jac_t[better], e_t[better], W_t[better])
        H[acc] = H_acc
        g[acc] = g_acc
        rej = active[~better]
        lam[rej] *= nu[rej]
        nu[rej] *= 2.0

        unit = cost[acc] / dof[acc] if estimator.name == "lsq" else 1.0
        done_acc = acc[gain <= tol * unit]
        done_rej = rej[lam[rej] > 1e7]  # no downhill step left: at the minimum
        status[done_acc] = CONVERGED
        status[done_rej] = CONVERGED
        still = np.ones(n, bool)
        still[done_acc] = False
        still[done_rej] = False
        active = active[still[active]]

    cov, chi2_red = covariance(model, estimator, state, data, theta, grid, mask, noise, free, dof)
    singular = ~np.all(np.isfinite(np.diagonal(cov, axis1=1, axis2=2))[:, free], axis=1)
    status[singular & (status == CONVERGED)] = SINGULAR
    return Solution(theta, cov, cost, chi2_red, iterations, status)


def covariance(model, estimator, state, data, theta, grid, mask, noise, free, dof):
    """Covariance of the estimates under the noise model, and reduced chi2.

    With a calibrated camera this is the sandwich covariance
    ``A^-1 B A^-1`` with ``A = J W J^T`` (the estimator's curvature) and
    ``B = J W V W J^T``, ``V`` the pixel variance ``excess * mu + read_var``
    of the fitted model.  For Poisson MLE it reduces to the inverse Fisher
    information, i.e. the Cramer-Rao lower bound evaluated at the fit.
    Without a calibrated camera the variance is modelled as a camera's,
    ``V = alpha + beta * mu`` (read noise plus shot noise at an unknown gain
    and baseline), with ``alpha, beta`` fitted to the squared residuals of
    all windows of the batch (a photon-transfer curve from the data itself);
    the covariance then follows as above, and the reduced chi-square is
    measured against that model.
    """
    n, k = theta.shape
    if n == 0:
        return np.zeros((0, k, k)), np.zeros(0)
    mu, jac = model.evaluate(theta, grid)
    _, _, W = estimator.terms(state, mu)
    jac = jac[:, free]
    r2 = np.where(mask, (data - mu) ** 2, 0.0)
    A = np.matmul(jac * W[:, None, :], jac.transpose(0, 2, 1))
    Ainv = _inverse(A)
    if noise.calibrated:
        V = noise.variance(mu)
    else:
        # Leverage h_p = W_p J_p^T A^-1 J_p: a fit absorbs part of the noise of
        # the pixels it depends on most, so E[r_p^2] = (1 - h_p) V_p.
        lev = np.einsum("nkp,nkl,nlp->np", jac, np.nan_to_num(Ainv), jac) * W
        r2_unbiased = r2 / np.clip(1.0 - lev, 0.05, None)
        V = _variance_model(mu, r2_unbiased, mask)
    chi2_red = np.sum(r2 / np.maximum(V, _VAR_FLOOR), axis=1) / dof
    WVW = W * W * V * mask
    B = np.matmul(jac * WVW[:, None, :], jac.transpose(0, 2, 1))
    cov_free = np.matmul(np.matmul(Ainv, B), Ainv)
    cov = np.zeros((n, k, k))
    fi = np.flatnonzero(free)
    cov[:, fi[:, None], fi[None, :]] = cov_free
    return cov, chi2_red


_VAR_FLOOR = 1e-6


def _variance_model(mu, r2, mask):
    """Fit ``r2 ~ alpha + beta * mu`` over all valid pixels; return ``V (n, P)``.

    Falls back to a constant variance if the fitted slope is not positive.
    """
    m = mu[mask]
    r = r2[mask]
    if m.size < 3:
        return np.full_like(mu, max(float(r.mean()) if r.size else 1.0, _VAR_FLOOR))
    mm, rm = m.mean(), r.mean()
    var_m = np.mean((m - mm) ** 2)
    beta = np.mean((m - mm) * (r - rm)) / var_m if var_m > 0 else 0.0
    if not np.isfinite(beta) or beta <= 0:
        return np.full_like(mu, max(rm, _VAR_FLOOR))
    alpha = rm - beta * mm
    floor = max(0.05 * rm, _VAR_FLOOR)
    return np.maximum(alpha + beta * mu, floor)


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
