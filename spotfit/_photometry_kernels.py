"""Compiled kernels of :mod:`spotfit.photometry`: linear intensity fits and aperture sums.

With the positions and widths of the spots held, the expected value of a
window pixel ``p`` is linear in the unknowns::

    mu_p = sum_k N_k g_kp + b

``g_k`` is the unit-intensity profile of spot ``k`` (the window's own spot
first, then the neighbours whose light reaches into the window), computed
once by :mod:`spotfit.models` and stored here as rows of ``profiles``;
``N_k`` are the intensities, ``b`` the background per pixel.  So every
(frame, window) is a small linear problem with ``K + 1`` unknowns, solved by
weighted normal equations ``A theta = r`` with ``A = sum w x x^T``,
``r = sum w x y``, ``x_p = (g_1p, ..., g_Kp, 1)``:

* ``LSQ`` (0): ``w = 1``: closed form, exact, unbiased.
* ``WLSQ`` (1): weights and data of ``fit``'s ``wlsq`` (Mighell's
  chi-square-gamma: counts ``n = d / excess``, data ``d + excess min(n, 1)``,
  ``w = 1 / (excess^2 (n + 1) + read_var)``): closed form.
* ``MLE`` (2): Poisson likelihood of the shifted counts ``d + read_var`` with
  mean ``mu + read_var``, scaled by ``1 / excess`` (:mod:`spotfit.estimators`).
  For a model linear in its parameters the Fisher-scoring step is a weighted
  least-squares solve of ``y = max(d, -read_var)`` with ``w = 1 / (mu + read_var)``
  at the current estimate (iteratively reweighted least squares), started
  from the ``LSQ`` solution; steps are halved while any pixel's expected value
  would not be positive.  Converged when no parameter moves by more than
  ``tol`` standard errors.  The log-likelihood is concave in ``theta``, so its
  maximum is unique.

No estimator constrains the sign of ``N``: a spot that is gone measures
``N`` around 0, negative as often as positive (``MLE`` only needs every
pixel's expected value to stay positive).

Covariance, the same sandwich as the solver's (:func:`spotfit.solver.covariance`):
``C = A^-1 B A^-1`` with ``B = sum w^2 V x x^T`` and ``V`` the pixel variance of
the fitted model: ``excess * max(mu, 0) + read_var`` with a calibrated camera,
``max(alpha + beta * mu, v_floor)`` (a noise model measured on the data)
otherwise.  For ``MLE`` it is the inverse Fisher information.

Aperture photometry only sums pixel values over a box around each spot whose
pixels are coded aperture / annulus / neither, in the same pass (the frame's
pixels are in cache); :func:`finish` turns the sums into the table's values
afterwards, with the standard errors, in one pass.

Matrices are inverted by Cholesky after Jacobi scaling; a pivot below
``1e-10`` of its diagonal marks the window ``SINGULAR`` (e.g. two spots at the
same position, or a window without enough valid pixels).  The Cholesky is this
module's own although :mod:`spotfit._kernels` has one: numba's on-disk cache
tracks only the file that defines a function, so calling into that module
could load stale code after it changes.  Status codes are those of
:mod:`spotfit._kernels`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from spotfit._jit import njit

LSQ, WLSQ, MLE = 0, 1, 2
#: status codes, the same as those of :mod:`spotfit._kernels` (checked by the tests)
CONVERGED, MAX_ITERATIONS, SINGULAR = 0, 1, 2
_MU_FLOOR = 1e-6  # smallest expected value (photons) a weight is computed from
_PIVOT = 1e-10  # relative Cholesky pivot below which a matrix counts as singular
_HALVINGS = 30  # step halvings before an MLE step is given up
#: frames whose windows of one spot are measured in turn (see measure_windows)
FRAME_GROUP = 8


@njit(cache=True, error_model="numpy")
def _invert(A, m, inv, L, scale):
    """Inverse of the symmetric positive definite ``A[:m, :m]`` into ``inv``.

    Jacobi-scaled Cholesky; returns False (``inv`` undefined) when a pivot
    falls below ``_PIVOT`` of its diagonal element.
    """
    for j in range(m):
        if not (A[j, j] > 0.0):
            return False
        scale[j] = 1.0 / math.sqrt(A[j, j])
    for j in range(m):
        s = A[j, j] * scale[j] * scale[j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not (s > _PIVOT):
            return False
        L[j, j] = math.sqrt(s)
        for i in range(j + 1, m):
            s = A[i, j] * scale[i] * scale[j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / L[j, j]
    # L^-1 in place of the strict upper triangle's mirror: use inv as scratch for it
    for i in range(m):
        inv[i, i] = 1.0 / L[i, i]
        for j in range(i):
            s = 0.0
            for k in range(j, i):
                s -= L[i, k] * inv[k, j]
            inv[i, j] = s / L[i, i]
    # (L^-1)^T L^-1, lower triangle of inv holds L^-1; fill the upper first
    for i in range(m):
        for j in range(i, m):
            s = 0.0
            for k in range(j, m):
                s += inv[k, i] * inv[k, j]
            L[i, j] = s  # L is free now: reuse it for the product
    for i in range(m):
        for j in range(i, m):
            v = L[i, j] * scale[i] * scale[j]
            inv[i, j] = v
            inv[j, i] = v
    return True


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _normal(profiles, c0, K, P, w, y, A, r):
    """``A = sum w x x^T`` and ``r = sum w x y`` over the ``P`` valid pixels (``m = K + 1``)."""
    m = K + 1
    for a in range(m):
        r[a] = 0.0
        for b in range(m):
            A[a, b] = 0.0
    for p in range(P):
        wp = w[p]
        wy = wp * y[p]
        for a in range(K):
            ga = profiles[c0 + a, p]
            wga = wp * ga
            r[a] += wga * y[p]
            for b in range(a + 1):
                A[a, b] += wga * profiles[c0 + b, p]
            A[K, a] += wga
        A[K, K] += wp
        r[K] += wy
    for a in range(m):
        for b in range(a + 1, m):
            A[a, b] = A[b, a]


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _expected(profiles, c0, K, P, theta, mu):
    """``mu_p = sum_k theta_k g_kp + theta_K`` for every pixel of the window."""
    for p in range(P):
        v = theta[K]
        for a in range(K):
            v += theta[a] * profiles[c0 + a, p]
        mu[p] = v


@njit(cache=True, error_model="numpy")
def _solve(inv, r, m, theta):
    for a in range(m):
        s = 0.0
        for b in range(m):
            s += inv[a, b] * r[b]
        theta[a] = s


@njit(cache=True, error_model="numpy")
def _min_shifted(mu, rvp, P):
    low = np.inf
    for p in range(P):
        v = mu[p] + rvp[p]
        if v < low:
            low = v
    return low


@njit(cache=True, error_model="numpy")
def _window_constants(pix, n_valid, col_ptr, profiles, rv, rv_map, out):
    """Per window, from its own profile ``g``: ``sum g^2, sum g, count, min g, max g,
    min read_var`` over its valid pixels (``out``, ``(n, 6)``)."""
    n = pix.shape[0]
    for i in range(n):
        c0 = col_ptr[i]
        sgg = 0.0
        sg = 0.0
        s1 = 0.0
        gmin = np.inf
        gmax = -np.inf
        rmin = np.inf
        for p in range(n_valid[i]):
            g = profiles[c0, p]
            sgg += g * g
            sg += g
            s1 += 1.0
            gmin = min(gmin, g)
            gmax = max(gmax, g)
            rmin = min(rmin, rv[pix[i, p]] if rv_map else rv[0])
        out[i, 0] = sgg
        out[i, 1] = sg
        out[i, 2] = s1
        out[i, 3] = gmin
        out[i, 4] = gmax
        out[i, 5] = rmin


@njit(cache=True, error_model="numpy")
def _wlsq_pixel(d, rv, excess):
    """Weight and data of a pixel for ``WLSQ``: Mighell's chi-square-gamma, as
    :class:`spotfit.estimators.WeightedLeastSquares` (counts ``n = d / excess``,
    data ``d + excess min(n, 1)``, variance ``excess^2 (n + 1) + read_var``)."""
    n = max(d, 0.0) / excess
    return 1.0 / (excess * excess * (n + 1.0) + rv), d + excess * min(n, 1.0)


@njit(cache=True, error_model="numpy")
def _variance(mu, rv, calibrated, excess, alpha, beta, v_floor):
    """Pixel variance of the fitted model (see the module docstring)."""
    if calibrated:
        return max(excess * max(mu, 0.0) + rv, _MU_FLOOR)
    return max(alpha + beta * mu, v_floor)


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _fit_single(g, d, rvp, P, cst, est, calibrated, excess, alpha, beta, v_floor, max_iter, tol):
    """One window with one spot (``K = 1``): 2 x 2 normal equations in closed form.

    ``g``, ``d``, ``rvp`` hold the window's ``P`` valid pixels only (profile,
    data, read-noise variance), so that the loops have no branches.

    Returns ``(N, var_N, b, var_b, chi2, iterations, status)``.
    """
    nan = np.nan
    sgg, sg, s1, gmin, gmax, rvmin = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5]
    det = sgg * s1 - sg * sg
    if not (s1 > 2.0 and det > _PIVOT * sgg * s1):
        return nan, nan, nan, nan, nan, 0, SINGULAR
    sgd = 0.0
    sd = 0.0
    count = 0.0
    for p in range(P):
        sgd += g[p] * d[p]
        sd += d[p]
        count += max(d[p] + rvp[p], 0.0)
    N = (s1 * sgd - sg * sd) / det
    b = (sgg * sd - sg * sgd) / det
    iterations = 0
    status = CONVERGED
    # normal matrix A (agg, ag, a1) of the estimate, and B = sum w^2 V x x^T
    agg, ag, a1 = sgg, sg, s1
    if est == WLSQ:
        agg = 0.0
        ag = 0.0
        a1 = 0.0
        rg = 0.0
        r1 = 0.0
        for p in range(P):
            w, yp = _wlsq_pixel(d[p], rvp[p], excess)
            wg = w * g[p]
            agg += wg * g[p]
            ag += wg
            a1 += w
            rg += wg * yp
            r1 += w * yp
        det = agg * a1 - ag * ag
        if not (det > _PIVOT * agg * a1):
            return nan, nan, nan, nan, nan, 0, SINGULAR
        N = (a1 * rg - ag * r1) / det
        b = (agg * r1 - ag * rg) / det
    if est != MLE:
        bgg = 0.0
        bg = 0.0
        b1 = 0.0
        chi2 = 0.0
        for p in range(P):
            mu = N * g[p] + b
            v = _variance(mu, rvp[p], calibrated, excess, alpha, beta, v_floor)
            res = d[p] - mu
            chi2 += res * res / v
            w = 1.0 if est == LSQ else _wlsq_pixel(d[p], rvp[p], excess)[0]
            wv = w * w * v
            bgg += wv * g[p] * g[p]
            bg += wv * g[p]
            b1 += wv
    else:
        # Poisson MLE: reweighted least squares of y = max(d, -read_var) with
        # w = 1 / (mu + read_var); every pixel's mu + read_var must stay > 0
        if not (count > 0.0):
            return nan, nan, nan, nan, nan, 0, SINGULAR
        if not (b + min(N * gmin, N * gmax) + rvmin > 0.0):
            N = 0.0
            b = max(count / s1 - rvmin, _MU_FLOOR - rvmin)
        # With a calibrated camera without excess noise, V = mu + read_var = 1 / w
        # wherever mu >= 0: then B = A and chi2 = sum w res^2, accumulated on the way
        simple = calibrated and excess == 1.0
        status = MAX_ITERATIONS
        negative = True
        for it in range(max_iter):
            agg = 0.0
            ag = 0.0
            a1 = 0.0
            rg = 0.0
            r1 = 0.0
            chi2 = 0.0
            negative = False
            for p in range(P):
                gp = g[p]
                mu = N * gp + b
                w = 1.0 / max(mu + rvp[p], _MU_FLOOR)
                y = max(d[p], -rvp[p])
                wg = w * gp
                agg += wg * gp
                ag += wg
                a1 += w
                rg += wg * y
                r1 += w * y
                res = d[p] - mu
                chi2 += res * res * w
                negative |= mu < 0.0
            det = agg * a1 - ag * ag
            if not (det > _PIVOT * agg * a1):
                return nan, nan, nan, nan, nan, it + 1, SINGULAR
            step_n = (a1 * rg - ag * r1) / det - N
            step_b = (agg * r1 - ag * rg) / det - b
            lam = 1.0
            for h in range(_HALVINGS + 1):
                if h == _HALVINGS:
                    lam = 0.0  # no admissible step
                    break
                n_new = N + lam * step_n
                if b + lam * step_b + min(n_new * gmin, n_new * gmax) + rvmin > 0.0:
                    break
                lam *= 0.5
            iterations = it + 1
            N += lam * step_n
            b += lam * step_b
            if lam == 0.0:
                break
            if (abs(lam * step_n) <= tol * math.sqrt(excess * a1 / det)
                    and abs(lam * step_b) <= tol * math.sqrt(excess * agg / det)):
                status = CONVERGED
                break
        # A (and chi2) of the last pass, one step (< tol standard errors) before the estimate
        bgg, bg, b1 = agg, ag, a1
        if not simple or negative:  # B = sum w^2 V x x^T and chi2 in full, at the estimate
            agg = 0.0
            ag = 0.0
            a1 = 0.0
            bgg = 0.0
            bg = 0.0
            b1 = 0.0
            chi2 = 0.0
            for p in range(P):
                gp = g[p]
                mu = N * gp + b
                w = 1.0 / max(mu + rvp[p], _MU_FLOOR)
                wg = w * gp
                agg += wg * gp
                ag += wg
                a1 += w
                v = _variance(mu, rvp[p], calibrated, excess, alpha, beta, v_floor)
                res = d[p] - mu
                chi2 += res * res / v
                wv = w * w * v
                bgg += wv * gp * gp
                bg += wv * gp
                b1 += wv
            det = agg * a1 - ag * ag
            if not (det > _PIVOT * agg * a1):
                return nan, nan, nan, nan, nan, iterations, SINGULAR
    det2 = det * det
    var_n = (a1 * a1 * bgg - 2.0 * a1 * ag * bg + ag * ag * b1) / det2
    var_b = (ag * ag * bgg - 2.0 * ag * agg * bg + agg * agg * b1) / det2
    dof = s1 - 2.0
    return N, var_n, b, var_b, chi2 / dof if dof > 0 else nan, iterations, status


@njit(cache=True, error_model="numpy")
def _fit_joint(profiles, c0, K, P, d, rvp, est, calibrated, excess, alpha, beta, v_floor,
               max_iter, tol, y, w, mu, A, inv, L, scale, r, theta, step, u):
    """One window with its spot and ``K - 1`` neighbours: ``(K + 1)``-square normal equations.

    The window's ``P`` valid pixels come first in ``profiles``, ``d`` and ``rvp``.

    Returns ``(N, var_N, b, var_b, chi2, iterations, status)`` of the window's own spot.
    """
    nan = np.nan
    m = K + 1
    status = CONVERGED
    iterations = 0
    for p in range(P):
        w[p] = 1.0
        y[p] = d[p]
    if est == WLSQ:
        for p in range(P):
            w[p], y[p] = _wlsq_pixel(d[p], rvp[p], excess)
    _normal(profiles, c0, K, P, w, y, A, r)
    if not _invert(A, m, inv, L, scale):
        return nan, nan, nan, nan, nan, 0, SINGULAR
    _solve(inv, r, m, theta)
    _expected(profiles, c0, K, P, theta, mu)
    if est == MLE:
        count = 0.0
        for p in range(P):
            y[p] = max(d[p], -rvp[p])
            count += y[p] + rvp[p]
        if not (count > 0.0):
            return nan, nan, nan, nan, nan, 0, SINGULAR
        if not (_min_shifted(mu, rvp, P) > 0.0):
            low_rv = np.inf
            for p in range(P):
                low_rv = min(low_rv, rvp[p])
            for a in range(K):
                theta[a] = 0.0
            theta[K] = max(count / P - low_rv, _MU_FLOOR - low_rv)
            _expected(profiles, c0, K, P, theta, mu)
        status = MAX_ITERATIONS
        for it in range(max_iter):
            for p in range(P):
                w[p] = 1.0 / max(mu[p] + rvp[p], _MU_FLOOR)
            _normal(profiles, c0, K, P, w, y, A, r)
            if not _invert(A, m, inv, L, scale):
                return nan, nan, nan, nan, nan, it + 1, SINGULAR
            for a in range(m):
                s = -theta[a]
                for b in range(m):
                    s += inv[a, b] * r[b]
                step[a] = s
            lam = 1.0
            admissible = False
            for h in range(_HALVINGS):
                for a in range(m):
                    u[a] = theta[a] + lam * step[a]
                _expected(profiles, c0, K, P, u, mu)
                if _min_shifted(mu, rvp, P) > 0.0:
                    admissible = True
                    break
                lam *= 0.5
            iterations = it + 1
            if not admissible:
                _expected(profiles, c0, K, P, theta, mu)
                break  # no admissible step: stays at max_iterations
            done = True
            for a in range(m):
                theta[a] = u[a]
                if abs(lam * step[a]) > tol * math.sqrt(excess * inv[a, a]):
                    done = False
            if done:
                status = CONVERGED
                break
        # covariance with the weights of the estimate
        for p in range(P):
            w[p] = 1.0 / max(mu[p] + rvp[p], _MU_FLOOR)
        _normal(profiles, c0, K, P, w, y, A, r)
        if not _invert(A, m, inv, L, scale):
            return nan, nan, nan, nan, nan, iterations, SINGULAR
    # sandwich A^-1 B A^-1, B = sum w^2 V x x^T (in A's storage)
    chi2 = 0.0
    for a in range(m):
        for b in range(m):
            A[a, b] = 0.0
    for p in range(P):
        v = _variance(mu[p], rvp[p], calibrated, excess, alpha, beta, v_floor)
        res = d[p] - mu[p]
        chi2 += res * res / v
        wv = w[p] * w[p] * v
        for a in range(K):
            ga = wv * profiles[c0 + a, p]
            for b in range(a + 1):
                A[a, b] += ga * profiles[c0 + b, p]
            A[K, a] += ga
        A[K, K] += wv
    for a in range(m):
        for b in range(a + 1, m):
            A[a, b] = A[b, a]
    var_n = 0.0
    var_b = 0.0
    for a in range(m):
        for b in range(m):
            var_n += inv[0, a] * A[a, b] * inv[b, 0]
            var_b += inv[K, a] * A[a, b] * inv[b, K]
    dof = P - m
    return theta[0], var_n, theta[K], var_b, chi2 / dof if dof > 0 else nan, iterations, status


@njit(cache=True, error_model="numpy")
def _regression_sums(profiles, c0, K, P, d, w, y, mu, A, inv, L, scale, r, theta, u, out):
    """Noise-regression sums of an unweighted fit (see :func:`measure_windows`)."""
    m = K + 1
    for p in range(P):
        w[p] = 1.0
        y[p] = d[p]
    _normal(profiles, c0, K, P, w, y, A, r)
    if not _invert(A, m, inv, L, scale):
        return
    _solve(inv, r, m, theta)
    _expected(profiles, c0, K, P, theta, mu)
    for p in range(P):
        for a in range(K):
            u[a] = profiles[c0 + a, p]
        u[K] = 1.0
        h = 0.0  # leverage x_p^T (X^T X)^-1 x_p
        for a in range(m):
            for b in range(m):
                h += u[a] * inv[a, b] * u[b]
        if h >= 0.999:
            continue
        res = d[p] - mu[p]
        r2 = res * res / (1.0 - h)
        out[0] += 1.0
        out[1] += mu[p]
        out[2] += r2
        out[3] += mu[p] * mu[p]
        out[4] += mu[p] * r2


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _read_rows(frame, a, b, first, rows, wx, d):
    """The rows of a window inside the frame (one camera conversion ``a + b * raw``, no
    read-noise map) into ``d``; returns the largest raw value.  Its own function, without
    the branches of :func:`_read_window`: the compiled loops are 3-4 times faster."""
    top = -np.inf
    for k in range(rows.shape[0]):
        q0 = first + rows[k]
        row = frame[q0:q0 + wx]
        out = d[k * wx:(k + 1) * wx]
        for c in range(wx):
            v = row[c]
            top = max(top, v)
            out[c] = a + b * v
    return top


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _read_window(frame, cam_a, cam_b, rv, pix, m, rows, wx, clip, d, rvp):
    """The ``m`` valid pixels ``pix`` of a window of ``frame`` in photons (``d``) and their
    read-noise variance (``rvp``, left as it is for a single value); returns 1 when a
    pixel is clipped.  A window inside the frame (``m`` = its ``rows`` of ``wx`` pixels)
    is read row by row (vectorised), else pixel by pixel."""
    cam_map = cam_a.shape[0] > 1
    rv_map = rv.shape[0] > 1
    top = -np.inf
    if wx > 0 and m == rows.shape[0] * wx:
        first = pix[0]
        if not cam_map and not rv_map:
            top = _read_rows(frame, cam_a[0], cam_b[0], first, rows, wx, d)
            return 1 if top >= clip else 0
        for k in range(rows.shape[0]):
            q0 = first + rows[k]
            row = frame[q0:q0 + wx]
            out = d[k * wx:(k + 1) * wx]
            if cam_map:
                row_a = cam_a[q0:q0 + wx]
                row_b = cam_b[q0:q0 + wx]
                for c in range(wx):
                    top = max(top, row[c])
                    out[c] = row_a[c] + row_b[c] * row[c]
            else:
                a = cam_a[0]
                b = cam_b[0]
                for c in range(wx):
                    top = max(top, row[c])
                    out[c] = a + b * row[c]
            if rv_map:
                for c in range(wx):
                    rvp[k * wx + c] = rv[q0 + c]
    else:
        for p in range(m):
            q = pix[p]
            top = max(top, frame[q])
            if cam_map:
                d[p] = cam_a[q] + cam_b[q] * frame[q]
            else:
                d[p] = cam_a[0] + cam_b[0] * frame[q]
            if rv_map:
                rvp[p] = rv[q]
    return 1 if top >= clip else 0


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _box_rows(frame, code, q0, c0, dq, dc, rows, m):
    """Sums of the raw values coded 1 and 2 over ``rows`` rows of ``m`` pixels (frame rows
    ``dq`` apart from ``q0``, code rows ``dc`` apart from ``c0``).  Its own function,
    without branches around the loops, so that they are compiled tight."""
    s1 = 0.0
    s2 = 0.0
    for y in range(rows):
        row = frame[q0 + y * dq:q0 + y * dq + m]
        kind = code[c0 + y * dc:c0 + y * dc + m]
        for c in range(m):
            v = np.float64(row[c])
            s1 += v if kind[c] == 1 else 0.0
            s2 += v if kind[c] == 2 else 0.0
    return s1, s2


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _box_sums(frame, cam_a, cam_b, code, ox, oy, oz, geom):
    """Sums over a spot's box of the frame values coded 1 (aperture) and 2 (annulus).

    The box (``geom[:3]`` planes, rows, columns) starts at frame pixel
    ``(ox, oy, oz)`` (may lie outside the frame: only its pixels inside,
    ``geom[3:]`` the frame's planes, rows, columns, are read).  Values are
    converted by ``a + b * value`` with a per-pixel camera map, else raw
    (the caller converts the sums).  The loops run over whole box rows of a
    fixed length, without branches: faster than lists of pixels or of runs.
    """
    Lz, Ly, Lx, nz, ny, nx = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]
    x_lo, x_hi = max(0, -ox), min(Lx, nx - ox)
    y_lo, y_hi = max(0, -oy), min(Ly, ny - oy)
    z_lo, z_hi = max(0, -oz), min(Lz, nz - oz)
    m = x_hi - x_lo
    s1 = 0.0
    s2 = 0.0
    if cam_a.shape[0] == 1:
        for z in range(z_lo, z_hi):
            q0 = ((oz + z) * ny + oy + y_lo) * nx + ox + x_lo
            c0 = (z * Ly + y_lo) * Lx + x_lo
            t1, t2 = _box_rows(frame, code, q0, c0, nx, Lx, y_hi - y_lo, m)
            s1 += t1
            s2 += t2
        return s1, s2
    for z in range(z_lo, z_hi):
        for y in range(y_lo, y_hi):
            q0 = ((oz + z) * ny + oy + y) * nx + ox + x_lo
            c0 = (z * Ly + y) * Lx + x_lo
            row = frame[q0:q0 + m]
            kind = code[c0:c0 + m]
            row_a = cam_a[q0:q0 + m]
            row_b = cam_b[q0:q0 + m]
            for c in range(m):
                v = row_a[c] + row_b[c] * row[c]
                s1 += v if kind[c] == 1 else 0.0
                s2 += v if kind[c] == 2 else 0.0
    return s1, s2


@njit(cache=True, parallel=True, error_model="numpy")
def measure_windows(frames, cam_a, cam_b, pix, n_valid, col_ptr, profiles, rv,
                    box_code, box_origin, box_geom,
                    est, calibrated, excess, alpha, beta, v_floor, max_iter, tol, clip, n_chunks,
                    regression, t0, out_n, out_n_var, out_b, out_b_var, out_chi2, out_iter, out_status,
                    out_sat, out_ap, out_bg, out_sums):
    """Fit every window of every frame, and sum every aperture; results per (window, frame).

    Parameters
    ----------
    frames : (F, S) uint16 or float32 ndarray
        Raw camera values, each frame flattened in C order (uint16 frames in memory
        are passed as they are: no float copy; other types are cast to float32).
    cam_a, cam_b : (S,) or (1,) float64 ndarrays
        Camera conversion ``photons = a + b * raw`` (``a = -baseline * b``; ADU
        above baseline without a calibration), per pixel or for all pixels.
    pix : (n, P) int64 ndarray
        Flat frame index of each window pixel, those inside the frame first.
    n_valid : (n,) int64 ndarray
        Number of window pixels inside the frame (the first ones of ``pix``).
    col_ptr : (n + 1,) int64 ndarray
        Window ``i``'s profiles are rows ``col_ptr[i]:col_ptr[i + 1]`` of
        ``profiles``, its own spot first.
    profiles : (C, P) float64 ndarray
        Unit-intensity profiles on the window pixels (in the order of ``pix``).
    rv : (S,) or (1,) float64 ndarray
        Read-noise variance (photons^2) per frame pixel or for all pixels.
    box_code : (n, B) uint8 ndarray
        A box of ``B`` pixels around each spot (array order), coded 1 where
        the pixel is in the spot's aperture, 2 in its background annulus, 0
        else (and outside the frame); ``B = 0`` skips the apertures.
    box_origin : (n, 3) int64 ndarray
        First pixel ``(x, y, z)`` of each box (``z = 0`` in 2D); may lie
        outside the frame.
    box_geom : (6,) or (9,) int64 ndarray
        Box shape, frame shape, and window shape, ``(planes, rows, columns)``
        each (1 plane in 2D): windows inside the frame are then read row by
        row (else pixel by pixel).
    est : int
        ``LSQ``, ``WLSQ`` or ``MLE``.
    calibrated : bool
        Pixel variance from the camera (``excess``, ``rv``), else from
        ``alpha + beta * mu`` (floored at ``v_floor``).
    max_iter : int
        MLE iteration limit.
    tol : float
        MLE convergence: largest step, in standard errors.
    clip : float
        Raw value at which a pixel counts as clipped (the top of an integer
        pixel type; ``inf``: none).
    n_chunks : int
        Work is split into this many chunks (spread over the threads).
    regression : bool
        Instead of fitting, accumulate the unknown-camera noise regression
        sums of unweighted fits: ``out_sums[i, f] = (count, sum mu, sum r2,
        sum mu^2, sum mu r2)`` with ``r2 = (d - mu)^2 / (1 - h)``, ``h`` the
        pixel's leverage.
    t0 : int
        Column of the outputs where this block's first frame goes.
    out_n, out_n_var, out_b, out_b_var : (n, >= t0 + F) float64 ndarrays
        Intensity of the window's own spot, background, and their variances
        (window-major: one row per spot, as the output table).
    out_chi2 : (n, >= t0 + F) float64 ndarray
        Pearson ``sum (d - mu)^2 / V`` over ``valid pixels - (K + 1)``.
    out_iter : (n, >= t0 + F) int32 ndarray
    out_status : (n, >= t0 + F) int8 ndarray
    out_sat : (n, >= t0 + F) int8 ndarray
        1 where the window holds a clipped pixel.
    out_ap, out_bg : (n, >= t0 + F) float64 ndarrays
        Sums of the converted pixel values over each aperture and annulus.
    out_sums : (n, >= t0 + F, 5) float64 ndarray
        Written only with ``regression``.
    """
    F = frames.shape[0]
    n, P = pix.shape
    # a window inside the frame is read row by row: offsets of its rows from its first pixel
    wx = box_geom[8] if box_geom.shape[0] > 6 else 0
    rows = np.zeros(P // wx if wx > 0 else 0, np.int64)
    for k in range(rows.shape[0]):
        rows[k] = ((k // box_geom[7]) * box_geom[4] + k % box_geom[7]) * box_geom[5]
    apertures = box_code.shape[1] > 0
    cam_map = cam_a.shape[0] > 1
    rv_map = rv.shape[0] > 1
    kmax = 1
    for i in range(n):
        kmax = max(kmax, col_ptr[i + 1] - col_ptr[i])
    mmax = kmax + 1
    cst = np.zeros((n, 6))
    _window_constants(pix, n_valid, col_ptr, profiles, rv, rv_map, cst)
    count = np.zeros((n, 2))  # aperture and annulus pixels of each spot
    if apertures:
        for i in range(n):
            c1 = 0
            c2 = 0
            for p in range(box_code.shape[1]):
                c1 += box_code[i, p] == 1
                c2 += box_code[i, p] == 2
            count[i, 0] = c1
            count[i, 1] = c2
    # units (frame group, spot), each the spot's windows in the group's frames: a
    # spot's profile and box serve a few frames in turn, while those frames' rows
    # around the spot stay in cache for the next spots (spot by spot over a whole
    # block would reach every row of every frame through a new page)
    G = min(F, FRAME_GROUP)
    units = ((F + G - 1) // G) * n
    for c in prange(n_chunks):
        start = c * units // n_chunks
        stop = (c + 1) * units // n_chunks
        d = np.zeros(P)
        y = np.zeros(P)
        w = np.zeros(P)
        mu = np.zeros(P)
        rvp = np.zeros(P)  # read-noise variance per pixel (read by _read_window with a map)
        for p in range(P):
            rvp[p] = rv[0]
        A = np.zeros((mmax, mmax))
        inv = np.zeros((mmax, mmax))
        L = np.zeros((mmax, mmax))
        scale = np.zeros(mmax)
        r = np.zeros(mmax)
        theta = np.zeros(mmax)
        step = np.zeros(mmax)
        u = np.zeros(mmax)
        for unit in range(start, stop):
            g0 = (unit // n) * G  # first frame of the unit's group
            i = unit - (g0 // G) * n
            m = n_valid[i]
            c0 = col_ptr[i]
            K = col_ptr[i + 1] - c0
            for t in range(g0, min(F, g0 + G)):
                frame = frames[t]
                clipped = _read_window(frame, cam_a, cam_b, rv, pix[i], m, rows, wx, clip, d, rvp)
                if regression:
                    _regression_sums(profiles, c0, K, m, d, w, y, mu, A, inv, L, scale, r, theta, u,
                                     out_sums[i, t0 + t])
                    continue
                if K == 1:
                    res = _fit_single(profiles[c0], d, rvp, m, cst[i], est, calibrated, excess, alpha,
                                      beta, v_floor, max_iter, tol)
                else:
                    res = _fit_joint(profiles, c0, K, m, d, rvp, est, calibrated, excess, alpha, beta,
                                     v_floor, max_iter, tol, y, w, mu, A, inv, L, scale, r, theta, step, u)
                out_n[i, t0 + t] = res[0]
                out_n_var[i, t0 + t] = res[1]
                out_b[i, t0 + t] = res[2]
                out_b_var[i, t0 + t] = res[3]
                out_chi2[i, t0 + t] = res[4]
                out_iter[i, t0 + t] = res[5]
                out_status[i, t0 + t] = res[6]
                out_sat[i, t0 + t] = clipped
                if apertures:
                    s1, s2 = _box_sums(frame, cam_a, cam_b, box_code[i], box_origin[i, 0],
                                       box_origin[i, 1], box_origin[i, 2], box_geom)
                    if not cam_map:
                        s1 = count[i, 0] * cam_a[0] + cam_b[0] * s1
                        s2 = count[i, 1] * cam_a[0] + cam_b[0] * s2
                    out_ap[i, t0 + t] = s1
                    out_bg[i, t0 + t] = s2


@njit(cache=True, error_model="numpy")
def _root(v):
    """``sqrt(max(v, 0))``, NaN staying NaN (as ``np.sqrt(np.maximum(v, 0.0))``)."""
    return math.sqrt(v if v > 0.0 or v != v else 0.0)


@njit(cache=True, error_model="numpy")
def finish(n, n_var, b_var, ap, bg, n_ap, n_bg, base_ap, base_bg, slope, none, min_snr, ap_err, low):
    """The table's values from :func:`measure_windows`' outputs, in one pass, mostly in place.

    ``n_var``, ``b_var`` become standard errors; the aperture sums ``ap``,
    ``bg`` become the aperture intensity ``ap - n_ap * bg / n_bg`` and the
    annulus background ``bg / n_bg``, with the error (into ``ap_err``) from
    the variance ``v_ap + (n_ap / n_bg)^2 v_bg``, each pixel sum's variance
    ``v = slope * sum + base`` (``base_ap``, ``base_bg`` per spot); all NaN
    where ``none`` (no background).  ``low`` is True where the intensity is
    not ``min_snr`` standard errors (``not n / err >= min_snr``).  All
    ``(n, F)`` arrays; the arithmetic is numpy's, operation for operation,
    so that the values are the same to the bit.
    """
    for i in range(n.shape[0]):
        r = n_ap[i] / n_bg[i]
        r2 = r * r
        for t in range(n.shape[1]):
            err = _root(n_var[i, t])
            n_var[i, t] = err
            low[i, t] = not (n[i, t] / err >= min_snr)
            b_var[i, t] = _root(b_var[i, t])
            s_ap = ap[i, t]
            s_bg = bg[i, t]
            if none[i]:
                ap[i, t] = np.nan
                bg[i, t] = np.nan
                ap_err[i, t] = np.nan
                continue
            background = s_bg / n_bg[i]
            bg[i, t] = background
            ap[i, t] = s_ap - n_ap[i] * background
            var = (s_bg * slope + base_bg[i]) * r2
            ap_err[i, t] = _root(var + (s_ap * slope + base_ap[i]))


@njit(cache=True, error_model="numpy")
def _distance2(origin, x, y, z, xyz, scale, ndim):
    """Squared scaled distance of box pixel ``(x, y, z)`` (offsets from ``origin``) to ``xyz``,
    the axes' ``(offset * scale)^2`` summed in the order x, y[, z]."""
    d = 0.0
    for j in range(ndim):
        k = x if j == 0 else (y if j == 1 else z)
        off = (np.float64(origin[j] + k) - xyz[j]) * scale[j]
        d += off * off
    return d


@njit(cache=True, error_model="numpy")
def code_boxes(origin, geom, xyz, scale, r_ap2, r_gap2, r_out2, pair_ptr, other, code, truncated):
    """Code every box pixel 1 (aperture), 2 (background annulus) or 0, one spot at a time.

    Parameters
    ----------
    origin : (n, ndim) int64 ndarray
        First pixel ``(x, y[, z])`` of each box.
    geom : (6,) int64 ndarray
        Box shape and frame shape, ``(planes, rows, columns)`` each.
    xyz : (n, ndim) float64 ndarray
        Spot positions; ``scale`` (ndim,) multiplies each axis' offset.
    r_ap2, r_gap2, r_out2 : float
        Squared radii: aperture ``d2 <= r_ap2``; annulus ``r_gap2 < d2 <= r_out2``,
        without pixels within ``d2 <= r_gap2`` of another spot.
    pair_ptr, other : int64 ndarrays
        The other spots near spot ``i`` are ``other[pair_ptr[i]:pair_ptr[i + 1]]``.
    code : (n, B) uint8 ndarray
        Output; pixels outside the frame are 0.
    truncated : (n,) bool ndarray
        Output: an aperture pixel lies outside the frame.
    """
    n, ndim = origin.shape
    Lz, Ly, Lx, nz, ny, nx = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]
    for i in range(n):
        ox, oy = origin[i, 0], origin[i, 1]
        oz = origin[i, 2] if ndim == 3 else 0
        truncated[i] = False
        p = 0
        for z in range(Lz):
            for y in range(Ly):
                for x in range(Lx):
                    inside = (0 <= ox + x < nx) and (0 <= oy + y < ny) and (0 <= oz + z < nz)
                    d = _distance2(origin[i], x, y, z, xyz[i], scale, ndim)
                    c = 0
                    if d <= r_ap2:
                        if inside:
                            c = 1
                        else:
                            truncated[i] = True
                    elif inside and d > r_gap2 and d <= r_out2:
                        c = 2
                        for k in range(pair_ptr[i], pair_ptr[i + 1]):
                            if _distance2(origin[i], x, y, z, xyz[other[k]], scale, ndim) <= r_gap2:
                                c = 0
                                break
                    code[i, p] = c
                    p += 1
