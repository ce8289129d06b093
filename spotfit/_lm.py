"""Compiled Levenberg-Marquardt kernel: every window fitted in one parallel call.

One loop over windows (``prange``: spread over the cores); each window runs
its own damped Gauss-Newton iterations and stops as soon as it converges.
Per pixel, the model kernel (:func:`spotfit.models._kernels.model_window`)
gives value and Jacobian, and the estimator turns them into the cost and the
normal equations ``H delta = g`` without ever storing the Jacobian of more
than one window.

Estimators (``est``):

* ``LSQ`` (0): weighted least squares, ``cost = sum w (d - mu)^2``;
  ``w`` is the pixel mask (unweighted) or ``mask / var`` (weighted).
* ``MLE`` (1): Poisson deviance of shifted counts,
  ``cost = 2 s sum w [(m - d) + d log(d / m)]`` with ``d = data + shift``,
  ``m = mu + shift`` and ``s`` the excess-noise scale (see
  :mod:`spotfit.estimators`).  ``data`` passed in is already ``d``.

Damping follows Nielsen (1999): the damping factor is scaled by the ratio of
actual to predicted cost reduction.  Status codes are those of
:mod:`spotfit.solver`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from spotfit.models._kernels import constrain, model_window

LSQ, MLE = 0, 1
_MU_FLOOR = 1e-6


@njit(cache=True, error_model="numpy")
def _pixel_terms(est, dp, mu, wp, shift, scale):
    """Cost term, weighted residual ``e`` and weight ``W`` of one pixel.

    The Gauss-Newton step of the cost is ``(J W J^T) delta = J e``.
    """
    if est == LSQ:
        r = dp - mu
        return wp * r * r, wp * r, wp
    m = mu + shift
    if m < _MU_FLOOR:
        m = _MU_FLOOR
    ws = wp * scale
    dev = m - dp
    if dp > 0.0:
        dev += dp * math.log(dp / m)
    return 2.0 * ws * dev, ws * (dp / m - 1.0), ws / m


@njit(cache=True, error_model="numpy")
def _accumulate(family, integ, est, th, d, w, shift, scale, nz, ny, nx, mu, J, scratch, e, W, H, g):
    """Cost of one window; fills ``H = J W J^T`` and ``g = J e``.

    ``e`` and ``W`` are ``(P,)`` work arrays.  The sums run over contiguous
    rows of ``J`` so that they vectorise.
    """
    k = th.shape[0]
    model_window(family, integ, th, nz, ny, nx, mu, J, scratch)
    cost = 0.0
    for p in range(mu.shape[0]):
        if w[p] == 0.0:
            e[p] = 0.0
            W[p] = 0.0
            continue
        c, e[p], W[p] = _pixel_terms(est, d[p], mu[p], w[p], shift[p], scale)
        cost += c
    for i in range(k):
        Ji = J[i]
        acc = 0.0
        for p in range(mu.shape[0]):
            acc += Ji[p] * e[p]
        g[i] = acc
        for j in range(i + 1):
            Jj = J[j]
            acc = 0.0
            for p in range(mu.shape[0]):
                acc += Ji[p] * W[p] * Jj[p]
            H[i, j] = acc
            H[j, i] = acc
    return cost


@njit(cache=True, error_model="numpy")
def _damped_solve(H, g, lam, free, A, L, y, delta):
    """Solve ``(H + lam * diag(H)) delta = g`` by scaled Cholesky; False if singular."""
    k = H.shape[0]
    dmax = 0.0
    for i in range(k):
        dmax = max(dmax, abs(H[i, i]))
    floor = 1e-12 * dmax + 1e-300
    for i in range(k):
        for j in range(k):
            A[i, j] = H[i, j] if (free[i] and free[j]) else 0.0
        if free[i]:
            A[i, i] = H[i, i] + lam * max(H[i, i], floor)
        else:
            A[i, i] = 1.0
    # scale to unit diagonal
    for i in range(k):
        if not A[i, i] > 0.0:
            return False
        y[i] = 1.0 / math.sqrt(A[i, i])
    for i in range(k):
        for j in range(k):
            A[i, j] *= y[i] * y[j]
    # Cholesky A = L L^T
    for j in range(k):
        s = A[j, j]
        for m in range(j):
            s -= L[j, m] * L[j, m]
        if not s > 1e-14:
            return False
        L[j, j] = math.sqrt(s)
        for i in range(j + 1, k):
            t = A[i, j]
            for m in range(j):
                t -= L[i, m] * L[j, m]
            L[i, j] = t / L[j, j]
    # forward / back substitution on the scaled right-hand side
    for i in range(k):
        t = g[i] * y[i] if free[i] else 0.0
        for m in range(i):
            t -= L[i, m] * delta[m]
        delta[i] = t / L[i, i]
    for i in range(k - 1, -1, -1):
        t = delta[i]
        for m in range(i + 1, k):
            t -= L[m, i] * delta[m]
        delta[i] = t / L[i, i]
    for i in range(k):
        delta[i] *= y[i]
        if not math.isfinite(delta[i]):
            return False
    return True


@njit(cache=True, parallel=True, error_model="numpy")
def levenberg_marquardt(family, integ, est, data, w, shift, scale, normalise, nz, ny, nx,
                        theta, lower, upper, free, max_iter, tol, iterations, status, cost_out):
    """Fit every window; updates ``theta`` in place.

    Parameters
    ----------
    family, integ : int, bool
        Model kernel (see :mod:`spotfit.models._kernels`).
    est : int
        ``LSQ`` or ``MLE``.
    data, w, shift : (n, P) float64 arrays
        Data (shifted counts for MLE), pixel weights (0 = masked), MLE shift.
    scale : float
        MLE excess-noise scale (1 / excess); unused for LSQ.
    normalise : bool
        Measure convergence in units of the residual variance (unweighted LSQ).
    nz, ny, nx : int
        Window shape.
    theta : (n, k) float64 array
        Starting values in, fitted values out.
    lower, upper : (n, k) float64 arrays
        Box constraints.
    free : (k,) bool array
        False for parameters held fixed.
    max_iter : int
    tol : float
        Convergence threshold on the cost decrease, chi-square units.
    iterations, status : (n,) int arrays, out
    cost_out : (n,) float64 array, out
    """
    n, k = theta.shape
    P = data.shape[1]
    size = max(nz, ny, nx, 10)
    n_free = 0
    for i in range(k):
        if free[i]:
            n_free += 1
    for s in prange(n):
        mu = np.empty(P)
        J = np.empty((k, P))
        scratch = np.empty((9, size))
        H = np.empty((k, k))
        g = np.empty(k)
        H_new = np.empty((k, k))
        g_new = np.empty(k)
        A = np.empty((k, k))
        L = np.zeros((k, k))
        y = np.empty(k)
        delta = np.empty(k)
        e = np.empty(P)
        W = np.empty(P)
        th = theta[s].copy()
        trial = np.empty(k)
        d = data[s]
        ws = w[s]
        sh = shift[s]
        lo = lower[s]
        hi = upper[s]
        for i in range(k):
            th[i] = min(max(th[i], lo[i]), hi[i])
        constrain(family, th)
        n_valid = 0
        for p in range(P):
            if ws[p] != 0.0:
                n_valid += 1
        dof = max(n_valid - n_free, 1)

        cost = _accumulate(family, integ, est, th, d, ws, sh, scale, nz, ny, nx, mu, J, scratch, e, W, H, g)
        st = 1  # max iterations unless something else happens
        if not math.isfinite(cost):
            st = 2
        lam = 1e-3
        nu = 2.0
        it = 0
        while st == 1 and it < max_iter:
            if not _damped_solve(H, g, lam, free, A, L, y, delta):
                st = 2
                break
            for i in range(k):
                trial[i] = min(max(th[i] + delta[i], lo[i]), hi[i])
            constrain(family, trial)
            cost_new = _accumulate(family, integ, est, trial, d, ws, sh, scale, nz, ny, nx, mu, J,
                                   scratch, e, W, H_new, g_new)
            it += 1
            if math.isfinite(cost_new) and cost_new <= cost:
                predicted = 0.0
                for i in range(k):
                    predicted += 2.0 * delta[i] * g[i]
                    for j in range(k):
                        predicted -= delta[i] * H[i, j] * delta[j]
                gain = cost - cost_new
                rho = gain / predicted if predicted > 0.0 else 0.0
                lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-9)
                nu = 2.0
                for i in range(k):
                    th[i] = trial[i]
                    g[i] = g_new[i]
                    for j in range(k):
                        H[i, j] = H_new[i, j]
                cost = cost_new
                unit = cost / dof if normalise else 1.0
                if gain <= tol * unit:
                    st = 0
            else:
                lam *= nu
                nu *= 2.0
                if lam > 1e7:  # no downhill step left: at the minimum
                    st = 0
        for i in range(k):
            theta[s, i] = th[i]
        iterations[s] = it
        status[s] = st
        cost_out[s] = cost


@njit(cache=True, error_model="numpy")
def _cholesky_inverse(A, out, L, y):
    """Inverse of a symmetric positive definite ``A`` (m x m); False if singular.

    Scaled to unit diagonal first; singular means a pivot below 1e-10.
    """
    m = A.shape[0]
    for i in range(m):
        if not A[i, i] > 0.0:
            return False
        y[i] = 1.0 / math.sqrt(A[i, i])
    for j in range(m):
        s = A[j, j] * y[j] * y[j]
        for q in range(j):
            s -= L[j, q] * L[j, q]
        if not s > 1e-10:
            return False
        L[j, j] = math.sqrt(s)
        for i in range(j + 1, m):
            t = A[i, j] * y[i] * y[j]
            for q in range(j):
                t -= L[i, q] * L[j, q]
            L[i, j] = t / L[j, j]
    # invert L (lower triangular) in place into out, then out = L^-T L^-1
    for i in range(m):
        for j in range(m):
            out[i, j] = 0.0
    for c in range(m):  # column c of L^-1
        for i in range(c, m):
            t = 1.0 if i == c else 0.0
            for q in range(c, i):
                t -= L[i, q] * out[q, c]
            out[i, c] = t / L[i, i]
    for i in range(m):
        for j in range(i + 1):
            t = 0.0
            for q in range(i, m):
                t += out[q, i] * out[q, j]
            A[i, j] = t  # reuse A for the product (lower part)
    for i in range(m):
        for j in range(i + 1):
            v = A[i, j] * y[i] * y[j]
            out[i, j] = v
            out[j, i] = v
    return True


@njit(cache=True, parallel=True, error_model="numpy")
def covariance(family, integ, est, d_k, w, shift, scale, data, nz, ny, nx, theta, free,
               mode, excess, read_var, alpha, beta, v_floor, cov, chi2, sums):
    """Per-window covariance ``A^-1 B A^-1`` and reduced chi-square.

    ``A = J W J^T`` (the estimator's curvature), ``B = J W V W J^T`` with the
    pixel variance ``V``:

    * ``mode 0``: ``V = excess * mu + read_var`` (calibrated camera);
    * ``mode 1``: no covariance; accumulate, per window, the sums for the
      regression ``r^2 / (1 - h) ~ alpha + beta * mu`` into ``sums (n, 5)``
      (count, sum mu, sum r2, sum mu^2, sum mu r2), ``h`` the leverage;
    * ``mode 2``: ``V = max(alpha + beta * mu, v_floor)`` from that regression.

    Rows and columns of fixed parameters are 0; singular windows get NaN.
    """
    n, k = theta.shape
    P = data.shape[1]
    size = max(nz, ny, nx, 10)
    idx = np.empty(k, dtype=np.int64)
    m = 0
    for i in range(k):
        if free[i]:
            idx[m] = i
            m += 1
    for s in prange(n):
        mu = np.empty(P)
        J = np.empty((k, P))
        scratch = np.empty((9, size))
        A = np.zeros((m, m))
        Ainv = np.empty((m, m))
        B = np.zeros((m, m))
        L = np.zeros((m, m))
        y = np.empty(m)
        Wp = np.empty(P)
        th = theta[s]
        model_window(family, integ, th, nz, ny, nx, mu, J, scratch)
        n_valid = 0
        for p in range(P):
            if w[s, p] == 0.0:
                Wp[p] = 0.0
                continue
            n_valid += 1
            c, e, W = _pixel_terms(est, d_k[s, p], mu[p], w[s, p], shift[s, p], scale)
            Wp[p] = W
            for a in range(m):
                Ja = J[idx[a], p] * W
                for b in range(a + 1):
                    A[a, b] += Ja * J[idx[b], p]
        for a in range(m):
            for b in range(a):
                A[b, a] = A[a, b]
        ok = _cholesky_inverse(A.copy(), Ainv, L, y)
        dof = max(n_valid - m, 1)
        if mode == 1:
            for p in range(P):
                if w[s, p] == 0.0:
                    continue
                h = 0.0
                if ok:
                    for a in range(m):
                        t = 0.0
                        for b in range(m):
                            t += Ainv[a, b] * J[idx[b], p]
                        h += J[idx[a], p] * t
                    h *= Wp[p]
                r = data[s, p] - mu[p]
                r2 = r * r / max(1.0 - h, 0.05)
                sums[s, 0] += 1.0
                sums[s, 1] += mu[p]
                sums[s, 2] += r2
                sums[s, 3] += mu[p] * mu[p]
                sums[s, 4] += mu[p] * r2
            continue
        x2 = 0.0
        for p in range(P):
            if w[s, p] == 0.0:
                continue
            if mode == 0:
                V = excess * max(mu[p], 0.0) + read_var[s, p]
            else:
                V = max(alpha + beta * mu[p], v_floor)
            V = max(V, _VAR_FLOOR)
            r = data[s, p] - mu[p]
            x2 += r * r / V
            q = Wp[p] * Wp[p] * V
            for a in range(m):
                Ja = J[idx[a], p] * q
                for b in range(a + 1):
                    B[a, b] += Ja * J[idx[b], p]
        chi2[s] = x2 / dof
        for i in range(k):
            for j in range(k):
                cov[s, i, j] = 0.0
        if not ok:
            for a in range(m):
                for b in range(m):
                    cov[s, idx[a], idx[b]] = np.nan
            continue
        for a in range(m):
            for b in range(a):
                B[b, a] = B[a, b]
        for a in range(m):
            for b in range(m):
                t = 0.0
                for c in range(m):
                    for e in range(m):
                        t += Ainv[a, c] * B[c, e] * Ainv[e, b]
                cov[s, idx[a], idx[b]] = t


_VAR_FLOOR = 1e-6
