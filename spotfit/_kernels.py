"""Compiled kernels: the Gaussian models, the batched solver and its covariance.

Models and solver live in one module on purpose: numba's on-disk cache
(``cache=True``) tracks only the file that defines a function, so a solver
compiled in another file could be loaded together with stale model code
after the models change.  Python-side, models (:mod:`spotfit.models`),
estimators (:mod:`spotfit.estimators`) and the solver driver
(:mod:`spotfit.solver`) stay separate, and the codes below are named here
once and imported from here.

Inputs are bundled in named tuples (:data:`KernelModel`, :data:`Cost`,
:data:`Box`, :data:`FitState`, :data:`NoiseModel`, :data:`CovarianceOut`),
built by :mod:`spotfit.solver` and :meth:`spotfit.models.Model.kernel`.

Models
------

This is the only place the model maths lives.  Each model function fills,
for one window, ``mu[p]`` and ``J[j, p]`` (derivative of ``mu[p]`` with
respect to parameter ``j``) for every pixel ``p`` of a ``(nz, ny, nx)``
window flattened in C order (x fastest); 2D windows have ``nz = 1``.
Coordinates are window-relative pixel centres (0 is the centre of the first
pixel).  Parameter layouts (the model classes declare the same ones, and
``tests/test_models.py`` checks that they agree):

* ``SEPARABLE``: ``K`` axis-aligned Gaussians (``KernelModel.emitters``),
  each ``[N, x, y(, z)]`` in turn, then the widths (their indices along x,
  y, z are ``wx, wy, wz``; equal indices share one width), then the offset
  at ``KernelModel.offset``.  Symmetric and elliptical 2D/3D models are
  ``K = 1``; crowded-field groups ``K >= 1`` with shared widths.
* ``ROTATED``: ``[N, x, y, var_xx, var_yy, cov_xy, offset]`` (a 2D Gaussian
  in covariance form).

``integ`` selects the form: 0 point-sampled; otherwise pixel-integrated,
with exact ``erf`` integrals for ``SEPARABLE`` and ``integ x integ``
Gauss-Legendre nodes per pixel (2 or 3) for ``ROTATED``.  The 2-node rule is
within 5e-4 of the exact integral (relative to the peak) for sigma >= 1.2 px,
the 3-node rule within 5e-5 for sigma >= 0.7 px.

Adding a model: a function filling ``mu`` and ``J`` for one window, a family
code below, one branch in :func:`model_window` (and in :func:`constrain` if
its domain is not a box); then a class in :mod:`spotfit.models`.

Joint fits (``SEPARABLE`` models of several emitters) and the crowded-field
engine's other fits (``solve(boxed=True)``) use :data:`MODEL_BOXED` instead
(:func:`model_for`): the same values and Jacobian bit for bit, from a faster
loop, evaluated only over the box of each window's unmasked pixels
(``KernelModel.boxed``: :func:`levenberg_marquardt` and :func:`covariance` set the
box per window; a joint window is ~45% masked pixels), and the cost, normal
equations and covariance of such fits are summed over the box's pixels alone, in
the box's own order (:func:`_compact`): a group's fit is then the same bit for bit
in any window around its box.  It is compiled on the first joint fit only
(~2.5-3.5 s of CPU), never on a single-spot run.

Compiled with numba through :func:`spotfit._jit.njit` (cached: compiled once
per installation, then loaded from the cache in about 0.1 s).  The batched
kernels take a range of windows ``start .. stop`` and release the GIL;
:func:`spotfit._jit.over_windows` spreads the ranges over threads.

Solver
------
One loop over windows (ranges of windows on threads); each window runs
its own damped Gauss-Newton iterations and stops as soon as it converges.
Per pixel, the model kernel (:func:`model_window`) gives value and
Jacobian, and the cost turns them into the cost value and the normal
equations ``H delta = g`` without ever storing the Jacobian of more than one
window.  The normal equations are built only after a step is taken and only
if another step follows: a rejected step (larger cost) and the step that
converges need the cost alone.

Costs (``Cost.kind``):

* ``LSQ``: weighted least squares, ``cost = sum w (d - mu)^2``;
  ``w`` is the pixel mask (unweighted) or ``mask / var`` (weighted).
* ``MLE``: Poisson deviance of shifted counts,
  ``cost = 2 s sum w [(m - d) + d log(d / m)]`` with ``d = data + shift``,
  ``m = mu + shift`` and ``s`` the excess-noise scale (see
  :mod:`spotfit.estimators`).  ``Cost.data`` is already ``d``.

Damping follows Nielsen (1999): the damping factor is scaled by the ratio of
actual to predicted cost reduction.  Fits from rough starts (``Box.rough``) shrink an
intensity by at most :data:`INTENSITY_SHRINK` per step.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from spotfit._jit import first_class, njit

# ---------------------------------------------------------------- codes
#: fit status codes; their names in output tables are spotfit.results.STATUS_NAMES
CONVERGED, MAX_ITERATIONS, SINGULAR, LEFT_WINDOW, LOW_SIGNAL, SATURATED, NOT_SPOT = range(7)
#: model kernel families
SEPARABLE, ROTATED = 0, 1
#: cost functions
LSQ, MLE = 0, 1
#: pixel variance of the covariance kernel: the camera's ``excess * mu +
#: read_var``; accumulate the sums of a regression ``r^2 ~ alpha + beta mu``;
#: that regression's ``max(alpha + beta mu, floor)``
CAMERA_VARIANCE, MEASURE_VARIANCE, MEASURED_VARIANCE = range(3)
#: the covariance kernel's other job: the score statistic (see :func:`covariance`)
SCORE_STATISTIC = 3
#: smallest pixel variance (photons^2, or where a measured noise model gives
#: none) and smallest Poisson mean (photons) the kernels use
VAR_FLOOR = 1e-6
MU_FLOOR = 1e-6

# --------------------------------------------------------------- bundles
#: a model's kernel and layout, and the window shape: all ints.  ``intensity``
#: is the index of the (first) intensity; ``linear`` is 1 when ``mu`` is
#: ``N * g(other parameters) + offset`` with that one intensity.  ``boxed``: 1 when
#: :func:`levenberg_marquardt` evaluates each window's model only over the box of its
#: unmasked pixels (first pixel ``z0, y0, x0``, size ``cz, cy, cx``, which it sets per
#: window; :data:`MODEL_BOXED`); otherwise the box is the whole window.
KernelModel = namedtuple(
    "KernelModel", ["family", "integ", "emitters", "wx", "wy", "wz", "intensity", "offset", "linear",
                    "nz", "ny", "nx", "boxed", "z0", "y0", "x0", "cz", "cy", "cx"])
#: the cost: ``kind`` (LSQ/MLE), per-pixel ``data``, ``weight`` (0 = masked) and
#: MLE ``shift`` (each (n, P) float64), MLE excess-noise ``scale`` and whether
#: convergence is measured in units of the residual variance (``normalise``)
Cost = namedtuple("Cost", ["kind", "data", "weight", "shift", "scale", "normalise"])
#: box constraints (n, k), the parameters that are fitted (k,) bool, and whether a
#: parameter at a bound that the step would push out is held for that step
#: (``active``: 1 for a projected, active-set step, as joint fits take, whose
#: many-parameter normal equations are then built by :func:`_joint_normal_equations`;
#: 0 to clip the full step), and whether the fits start from rough places (``rough``: 1
#: for the crowded-field engine's joint fits, whose steps then shrink an intensity to no
#: less than :data:`INTENSITY_SHRINK` of its value)
Box = namedtuple("Box", ["lower", "upper", "free", "active", "rough"])
#: fitted values (n, k) in and out; iterations, status, final cost (n,) out
FitState = namedtuple("FitState", ["theta", "iterations", "status", "cost"])
#: pixel variance for the covariance: ``mode`` (see above; or ``SCORE_STATISTIC``), camera ``excess``,
#: ``read_var`` (n, P), regression ``alpha``, ``beta``, ``floor`` (n,)
NoiseModel = namedtuple("NoiseModel", ["mode", "excess", "read_var", "alpha", "beta", "floor"])
#: outputs of the covariance kernel: ``cov`` (n, k, k), ``chi2`` (n,),
#: regression ``sums`` (n, 5), MLE ``bias`` (n, k) or (0, k) to skip it
CovarianceOut = namedtuple("CovarianceOut", ["cov", "chi2", "sums", "bias"])

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_TWO_PI = 1.0 / (2.0 * math.pi)
# Gauss-Legendre nodes/weights on [-1/2, 1/2]; row q - 2 holds the q-node rule
_GL_NODES = np.zeros((2, 3))
_GL_WEIGHTS = np.zeros((2, 3))
for _q in (2, 3):
    _x, _w = np.polynomial.legendre.leggauss(_q)
    _GL_NODES[_q - 2, :_q] = _x / 2.0
    _GL_WEIGHTS[_q - 2, :_q] = _w / 2.0


@njit(error_model="numpy", inner=True)
def _axis_factors(c0, s, integ, n, f, df, ds):
    """1D Gaussian factor over ``n`` pixels: value, d/dcentre, d/dsigma."""
    inv_s = 1.0 / s
    for i in range(n):
        if integ > 0:
            a = (i - 0.5 - c0) * inv_s
            b = (i + 0.5 - c0) * inv_s
            f[i] = 0.5 * (math.erf(b / _SQRT2) - math.erf(a / _SQRT2))
            pa = math.exp(-0.5 * a * a) * _INV_SQRT2PI
            pb = math.exp(-0.5 * b * b) * _INV_SQRT2PI
            df[i] = (pa - pb) * inv_s
            ds[i] = (a * pa - b * pb) * inv_s
        else:
            t = (i - c0) * inv_s
            v = math.exp(-0.5 * t * t) * _INV_SQRT2PI * inv_s
            f[i] = v
            df[i] = v * t * inv_s
            ds[i] = v * (t * t - 1.0) * inv_s


@njit(error_model="numpy", inline="always")
def _gaussians(km, th, mu, J, scratch):
    """Sum of ``km.emitters`` axis-aligned Gaussians (``SEPARABLE`` layout).

    Per emitter ``[N, x, y(, z)]``; widths at ``km.wx, km.wy, km.wz`` (equal
    indices: a shared width, whose derivative sums over the axes); offset
    at ``km.offset``.
    """
    k = th.shape[0]
    nz, ny, nx = km.nz, km.ny, km.nx
    three_d = km.wz >= 0
    per = 4 if three_d else 3
    wx, wy, wz = km.wx, km.wy, km.wz
    off = km.offset
    for p in range(mu.shape[0]):
        mu[p] = th[off]
    for j in range(k):
        for p in range(mu.shape[0]):
            J[j, p] = 0.0
    for e in range(km.emitters):
        b = e * per
        N = th[b]
        _axis_factors(th[b + 1], th[wx], km.integ, nx, scratch[0], scratch[1], scratch[2])
        _axis_factors(th[b + 2], th[wy], km.integ, ny, scratch[3], scratch[4], scratch[5])
        if three_d:
            _axis_factors(th[b + 3], th[wz], km.integ, nz, scratch[6], scratch[7], scratch[8])
        p = 0
        for z in range(nz):
            fz, dz, sz = 1.0, 0.0, 0.0
            if three_d:
                fz, dz, sz = scratch[6, z], scratch[7, z], scratch[8, z]
            for y in range(ny):
                fy, dy, sy = scratch[3, y], scratch[4, y], scratch[5, y]
                fyz = fy * fz
                for x in range(nx):
                    fx, dx, sx = scratch[0, x], scratch[1, x], scratch[2, x]
                    shape = fx * fyz
                    mu[p] += N * shape
                    J[b, p] = shape
                    J[b + 1, p] = N * dx * fyz
                    J[b + 2, p] = N * fx * dy * fz
                    J[wx, p] += N * sx * fyz
                    J[wy, p] += N * fx * sy * fz
                    if three_d:
                        J[b + 3, p] = N * fx * fy * dz
                        J[wz, p] += N * fx * fy * sz
                    p += 1
    for p in range(mu.shape[0]):
        J[off, p] = 1.0


@njit(error_model="numpy", inner=True)
def _covariance_gaussian(th, inv_det, norm, x, y, out):
    """Unit-intensity Gaussian with covariance [[vxx, cxy], [cxy, vyy]] at (x, y).

    ``inv_det = 1 / det(Sigma)`` and ``norm = sqrt(inv_det) / (2 pi)`` are
    per-window constants.  Writes d/d(x0, y0, vxx, vyy, cxy) into out[0:5];
    returns the value.
    """
    vxx, vyy, cxy = th[3], th[4], th[5]
    a = x - th[1]
    b = y - th[2]
    pa = (vyy * a - cxy * b) * inv_det  # (Sigma^-1 d)_x
    pb = (vxx * b - cxy * a) * inv_det  # (Sigma^-1 d)_y
    g = math.exp(-0.5 * (a * pa + b * pb)) * norm
    out[0] = g * pa
    out[1] = g * pb
    # d log g / d Sigma = (Sigma^-1 d d^T Sigma^-1 - Sigma^-1) / 2, cxy counted twice
    half_g = 0.5 * g
    out[2] = half_g * (pa * pa - inv_det * vyy)
    out[3] = half_g * (pb * pb - inv_det * vxx)
    out[4] = g * (pa * pb + inv_det * cxy)
    return g


@njit(error_model="numpy", inline="always")
def _rotated(integ, th, ny, nx, mu, J, scratch):
    """``ROTATED`` layout ``[N, x, y, var_xx, var_yy, cov_xy, offset]``; ``scratch`` as
    :func:`model_window`'s."""
    _rotated_pixels(integ, th, ny, nx, 0, 0, ny, nx, mu, J, scratch)


@njit(error_model="numpy", inner=True)
def _rotated_axis_sums(c0, v, integ, first, n, s0, s1, s2):
    """Per pixel ``first .. first + n`` of one axis, the quadrature sums of the axis'
    Gaussian factor ``e = exp(-d^2 / (2 v))`` (``d`` = node - ``c0``): ``s0 = sum w e``,
    ``s1 = sum w e d / v``, ``s2 = sum w e (d / v)^2`` (``integ`` Gauss-Legendre nodes
    per pixel, or the pixel centre with weight 1 for ``integ = 0``)."""
    inv_v = 1.0 / v
    r = integ - 2
    for j in range(n):
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        if integ:
            for q in range(integ):
                d = first + j + _GL_NODES[r, q] - c0
                u = d * inv_v
                e = _GL_WEIGHTS[r, q] * math.exp(-0.5 * d * u)
                t0 += e
                t1 += e * u
                t2 += e * u * u
        else:
            d = first + j - c0
            u = d * inv_v
            e = math.exp(-0.5 * d * u)
            t0 = e
            t1 = e * u
            t2 = e * u * u
        s0[j] = t0
        s1[j] = t1
        s2[j] = t2


#: largest exponent (in magnitude) of the node factors :func:`_rotated_factored` multiplies
#: (four per node, so their product stays far from overflow); forms more extreme than
#: that (a pixel-thin ellipse far from its centre) take the per-node exponentials
FACTORED_EXPONENT = 150.0


@njit(error_model="numpy", inline="always")
def _rotated_factored(integ, th, ny, nx, y0, x0, cy, cx, mu, J, scratch):
    """The rotated model's pixel quadrature with one exponential per pixel: the
    Gaussian at node ``(u, v)`` of pixel ``(x, y)`` (offsets ``d0 = (a0, b0)`` from the
    centre) is its value at the pixel centre times ``exp(-(u, v) Sigma^-1 d0)`` times
    ``exp(-(u, v) Sigma^-1 (u, v) / 2)``; the first splits into four factors, each of
    one node coordinate and one pixel coordinate (per column or row of the box), the
    second is a constant per node.  The values of the per-node exponentials up to
    rounding (1e-13 of the peak, ``tests/test_models.py``).  False (nothing written)
    where a factor's exponent could exceed :data:`FACTORED_EXPONENT` in the window
    (``ny x nx``) of the box."""
    N = th[0]
    offset = th[6]
    vxx, vyy, cxy = th[3], th[4], th[5]
    inv_det = 1.0 / (vxx * vyy - cxy * cxy)
    ivv = vyy * inv_det  # Sigma^-1 = [[ivv, -ic], [-ic, iuu]]
    iuu = vxx * inv_det
    ic = cxy * inv_det
    r = integ - 2
    umax = abs(_GL_NODES[r, 0])
    # (over the whole window, not the box: a window and a box of it take the same path,
    # so a pixel's values do not depend on which pixels around it are fitted)
    amax = max(abs(th[1]), abs(nx - 1 - th[1]))
    bmax = max(abs(th[2]), abs(ny - 1 - th[2]))
    if umax * max(ivv * amax, abs(ic) * amax, abs(ic) * bmax, iuu * bmax) > FACTORED_EXPONENT:
        return False
    norm = math.sqrt(inv_det) * _INV_TWO_PI
    const = scratch[0]  # per node (q, s): weight * exp(-Q(u, v) / 2)
    for q in range(integ):
        u = _GL_NODES[r, q]
        for t in range(integ):
            v = _GL_NODES[r, t]
            const[q * integ + t] = _GL_WEIGHTS[r, q] * _GL_WEIGHTS[r, t] * \
                math.exp(-0.5 * (ivv * u * u - 2.0 * ic * u * v + iuu * v * v))
    # per column: X1[q] = exp(-u_q ivv a0), X2[t] = exp(v_t ic a0) (rows 1-3 and 4-6)
    for j in range(cx):
        a0 = x0 + j - th[1]
        for q in range(integ):
            u = _GL_NODES[r, q]
            scratch[1 + q, j] = math.exp(-u * ivv * a0)
            scratch[4 + q, j] = math.exp(u * ic * a0)
    y1 = scratch[7]  # per row: Y1[q] = exp(u_q ic b0), Y2[t] = exp(-v_t iuu b0)
    y2 = scratch[8]
    for i in range(cy):
        b0 = y0 + i - th[2]
        for q in range(integ):
            u = _GL_NODES[r, q]
            y1[q] = math.exp(u * ic * b0)
            y2[q] = math.exp(-u * iuu * b0)
        p = (y0 + i) * nx + x0
        for j in range(cx):
            a0 = x0 + j - th[1]
            pa0 = ivv * a0 - ic * b0
            pb0 = iuu * b0 - ic * a0
            s0 = 0.0
            sa = 0.0
            sb = 0.0
            saa = 0.0
            sbb = 0.0
            sab = 0.0
            for q in range(integ):
                u = _GL_NODES[r, q]
                fq = scratch[1 + q, j] * y1[q]
                for t in range(integ):
                    v = _GL_NODES[r, t]
                    gq = const[q * integ + t] * fq * scratch[4 + t, j] * y2[t]
                    pa = pa0 + (ivv * u - ic * v)
                    pb = pb0 + (iuu * v - ic * u)
                    ga = gq * pa
                    gb = gq * pb
                    s0 += gq
                    sa += ga
                    sb += gb
                    saa += ga * pa
                    sbb += gb * pb
                    sab += ga * pb
            e0 = norm * math.exp(-0.5 * (a0 * pa0 + b0 * pb0))
            g = e0 * s0
            ne = N * e0
            mu[p] = N * g + offset
            J[0, p] = g
            J[1, p] = ne * sa
            J[2, p] = ne * sb
            J[3, p] = 0.5 * ne * (saa - ivv * s0)
            J[4, p] = 0.5 * ne * (sbb - iuu * s0)
            J[5, p] = ne * (sab + ic * s0)
            J[6, p] = 1.0
            p += 1
    return True


@njit(error_model="numpy", inline="always")
def _rotated_pixels(integ, th, ny, nx, y0, x0, cy, cx, mu, J, scratch):
    """:func:`_rotated`'s values and Jacobian at the pixels of the box ``[y0, y0 + cy) x
    [x0, x0 + cx)`` of a window ``nx`` px wide (the whole window, or a joint fit's box,
    :func:`_rotated_box`); the other pixels are left as they were.

    A round or axis-aligned form (``cov_xy = 0``: the symmetric fit's point where the
    model choice's score test evaluates this model, and most fits' start) is separable:
    the quadrature over each pixel is the product of the two axes' sums
    (:func:`_rotated_axis_sums`, ``integ`` exponentials per pixel of each axis instead
    of ``integ^2`` per pixel of the window), the same values up to rounding (1e-15
    relative; ``tests/test_models.py``)."""
    N = th[0]
    offset = th[6]
    if th[5] == 0.0:
        vxx, vyy = th[3], th[4]
        norm = _INV_TWO_PI / math.sqrt(vxx * vyy)
        sx0, sx1, sx2 = scratch[1], scratch[2], scratch[3]
        sy0, sy1, sy2 = scratch[4], scratch[5], scratch[6]
        _rotated_axis_sums(th[1], vxx, integ, x0, cx, sx0, sx1, sx2)
        _rotated_axis_sums(th[2], vyy, integ, y0, cy, sy0, sy1, sy2)
        hx = 0.5 / vxx
        hy = 0.5 / vyy
        for y in range(cy):
            p = (y0 + y) * nx + x0
            ny0 = N * norm * sy0[y]
            ny1 = N * norm * sy1[y]
            ny2 = N * norm * sy2[y]
            gy = norm * sy0[y]
            for x in range(cx):
                g = gy * sx0[x]
                mu[p] = N * g + offset
                J[0, p] = g
                J[1, p] = ny0 * sx1[x]
                J[2, p] = ny1 * sx0[x]
                J[3, p] = ny0 * (0.5 * sx2[x] - hx * sx0[x])
                J[4, p] = (0.5 * ny2 - hy * ny0) * sx0[x]
                J[5, p] = ny1 * sx1[x]
                J[6, p] = 1.0
                p += 1
        return
    if integ and _rotated_factored(integ, th, ny, nx, y0, x0, cy, cx, mu, J, scratch):
        return
    _rotated_direct(integ, th, nx, y0, x0, cy, cx, mu, J, scratch[0])


@njit(error_model="numpy", inline="always")
def _rotated_direct(integ, th, nx, y0, x0, cy, cx, mu, J, tmp):
    """:func:`_rotated_pixels` with an exponential per quadrature node (or per pixel
    centre, ``integ = 0``): any form."""
    N = th[0]
    offset = th[6]
    inv_det = 1.0 / (th[3] * th[4] - th[5] * th[5])
    norm = math.sqrt(inv_det) * _INV_TWO_PI
    for y in range(y0, y0 + cy):
        p = y * nx + x0
        for x in range(x0, x0 + cx):
            if integ:
                g = 0.0
                for j in range(5):
                    tmp[5 + j] = 0.0
                r = integ - 2
                for qy in range(integ):
                    for qx in range(integ):
                        w = _GL_WEIGHTS[r, qx] * _GL_WEIGHTS[r, qy]
                        g += w * _covariance_gaussian(th, inv_det, norm, x + _GL_NODES[r, qx],
                                                      y + _GL_NODES[r, qy], tmp)
                        for j in range(5):
                            tmp[5 + j] += w * tmp[j]
                for j in range(5):
                    J[1 + j, p] = N * tmp[5 + j]
            else:
                g = _covariance_gaussian(th, inv_det, norm, float(x), float(y), tmp)
                for j in range(5):
                    J[1 + j, p] = N * tmp[j]
            mu[p] = N * g + offset
            J[0, p] = g
            J[6, p] = 1.0
            p += 1


@njit(error_model="numpy", no_cpython_wrapper=True)
def model_window(km, th, mu, J, scratch):
    """Fill ``mu (P,)`` and ``J (k, P)`` for one window of model ``km``.

    ``scratch`` is a ``(9, max(nz, ny, nx, 10))`` work array.  The kernels call it
    through :data:`MODEL` (passed to them as ``model_fn``), not by name.
    """
    if km.family == ROTATED:
        _rotated(km.integ, th, km.ny, km.nx, mu, J, scratch)
    else:
        _gaussians(km, th, mu, J, scratch)


def _model_window_signature():
    from numba.core import types

    vector, matrix = types.float64[::1], types.float64[:, ::1]
    km = types.NamedUniTuple(types.int64, len(KernelModel._fields), KernelModel)
    return types.void(km, vector, vector, matrix, matrix)


#: :func:`model_window` compiled once, as a first-class function: the kernels that
#: evaluate the model take it as their first argument (``model_fn``) and call it through
#: its address, so that its code is not linked into each of them and optimised and
#: compiled to machine code again (~0.4 s per kernel on a first run)
MODEL = first_class(model_window, _model_window_signature)


@njit(error_model="numpy", inner=True)
def constrain(km, th):
    """Project parameters into the model's domain (ROTATED: positive definite)."""
    if km.family == ROTATED:
        limit = 0.95 * math.sqrt(max(th[3] * th[4], 0.0))
        th[5] = min(max(th[5], -limit), limit)


#: a step of a fit from a rough start (``Box.rough``: the crowded-field engine's joint fits)
#: may shrink an intensity to no less than this fraction of its value (single-spot fits
#: start from their window's moments, and keep their steps): an emitter
#: whose intensity a step took to its lower bound (~0) no longer moves the fit with its
#: position, which then wanders to a corner of the window, and the fit stops there with
#: the spot lost (a fit started 3 px from its spot over a dark background, an overshoot
#: of its first steps: 3.5 % of windows, none since; ``tests/test_solver.py``).  One run's
#: 7,812 joint fits of SMLM 60 per frame replayed: a lower deviance in 98, higher in 23
#: (by more than 1; 0.1: 55 / 19; 0.5: 110 / 40), the same number of iterations
INTENSITY_SHRINK = 0.3


@njit(error_model="numpy", inline="always")
def _limit_intensities(km, th, trial):
    """Keep each positive intensity of a step's ``trial`` parameters at least
    :data:`INTENSITY_SHRINK` of its value in ``th`` (the step's start): a ``ROTATED``
    model's at ``km.intensity``, each emitter's of a ``SEPARABLE`` one.  A spurious
    emitter still fades to its bound, in a few more steps."""
    if km.family == ROTATED:
        i = km.intensity
        if th[i] > 0.0:
            trial[i] = max(trial[i], INTENSITY_SHRINK * th[i])
        return
    per = 4 if km.wz >= 0 else 3
    for e in range(km.emitters):
        i = e * per
        if th[i] > 0.0:
            trial[i] = max(trial[i], INTENSITY_SHRINK * th[i])


@njit(error_model="numpy", inline="always")
def _erf_edge(u):
    """``math.erf(u)``, without calling it where it is exactly +-1 in double precision
    (``|u| >= 6``: ``1 - erf(6)`` is ~2e-17, below half an ulp of 1; ``tests/test_models.py``
    checks the library's ``erf`` agrees): the far pixels of a joint fit's window."""
    if u >= 6.0:
        return 1.0
    if u <= -6.0:
        return -1.0
    return math.erf(u)


@njit(error_model="numpy", inner=True)
def _axis_factors_chained(c0, s, integ, first, n, f, df, ds):
    """:func:`_axis_factors` of pixels ``first .. first + n`` (into ``f[0:n]`` ...) with
    each pixel edge's ``erf`` and ``exp`` evaluated once: pixel ``i``'s right edge is
    pixel ``i + 1``'s left edge (``(i + 1) - 0.5`` and ``i + 0.5`` are the same float),
    so the values are bit for bit those of :func:`_axis_factors`, with half its
    transcendental calls."""
    inv_s = 1.0 / s
    if integ > 0:
        a = (first - 0.5 - c0) * inv_s
        ea = _erf_edge(a / _SQRT2)
        pa = math.exp(-0.5 * a * a) * _INV_SQRT2PI
        for j in range(n):
            b = (first + j + 0.5 - c0) * inv_s
            eb = _erf_edge(b / _SQRT2)
            pb = math.exp(-0.5 * b * b) * _INV_SQRT2PI
            f[j] = 0.5 * (eb - ea)
            df[j] = (pa - pb) * inv_s
            ds[j] = (a * pa - b * pb) * inv_s
            a, ea, pa = b, eb, pb
    else:
        for j in range(n):
            t = (first + j - c0) * inv_s
            v = math.exp(-0.5 * t * t) * _INV_SQRT2PI * inv_s
            f[j] = v
            df[j] = v * t * inv_s
            ds[j] = v * (t * t - 1.0) * inv_s


@njit(error_model="numpy", inline="always")
def _joint_gaussians(km, th, mu, J, scratch, z0, y0, x0, cz, cy, cx):
    """:func:`_gaussians` over the box ``[z0, z0 + cz) x [y0, y0 + cy) x [x0, x0 + cx)``
    of the window: there the same values and Jacobian, bit for bit (the same products,
    in the same order per pixel), computed faster; outside it ``J`` is 0 and ``mu``
    is left as it was.

    Per emitter, the axis factors are computed over the box only, with half the
    ``erf`` and ``exp`` calls (:func:`_axis_factors_chained`), the ``N``-scaled x
    factors once, and each row of pixels is filled through row views of ``J`` and
    ``mu`` (no index arithmetic per pixel).  Only the rows that accumulate (``mu``,
    the widths) and the offset's row are initialised first; the emitters' rows are
    overwritten.
    """
    nz, ny, nx = km.nz, km.ny, km.nx
    three_d = km.wz >= 0
    per = 4 if three_d else 3
    wx, wy, wz = km.wx, km.wy, km.wz
    off = km.offset
    k = J.shape[0]
    P = mu.shape[0]
    whole = cz == nz and cy == ny and cx == nx
    if not whole:  # outside the box J = 0: a finite value, which masked pixels' zero weights keep out of the sums
        for j in range(k):  # (whole rows: long loops, faster than the parts outside the box)
            Jj = J[j]
            for p in range(P):
                Jj[p] = 0.0
    o = th[off]
    Jwx = J[wx]
    Jwy = J[wy]
    Jwz = J[wz] if three_d else J[wx]
    Joff = J[off]
    for z in range(z0, z0 + cz):
        for y in range(y0, y0 + cy):
            p0 = (z * ny + y) * nx + x0
            q = p0 + cx
            mr, jwx, jwy, jwz, jo = mu[p0:q], Jwx[p0:q], Jwy[p0:q], Jwz[p0:q], Joff[p0:q]
            for x in range(cx):
                mr[x] = o
                jwx[x] = 0.0
                jwy[x] = 0.0
                jwz[x] = 0.0
                jo[x] = 1.0
    fx, dx, sx = scratch[0], scratch[1], scratch[2]
    fy, dy, sy = scratch[3], scratch[4], scratch[5]
    fzs, dzs, szs = scratch[6], scratch[7], scratch[8]
    ndx = np.empty(cx)
    nsx = np.empty(cx)
    nfx = np.empty(cx)
    for e in range(km.emitters):
        b = e * per
        N = th[b]
        _axis_factors_chained(th[b + 1], th[wx], km.integ, x0, cx, fx, dx, sx)
        _axis_factors_chained(th[b + 2], th[wy], km.integ, y0, cy, fy, dy, sy)
        if three_d:
            _axis_factors_chained(th[b + 3], th[wz], km.integ, z0, cz, fzs, dzs, szs)
        for x in range(cx):
            ndx[x] = N * dx[x]
            nsx[x] = N * sx[x]
            nfx[x] = N * fx[x]
        Jn, Jx, Jy = J[b], J[b + 1], J[b + 2]
        Jz = J[b + 3] if three_d else J[b]
        for z in range(cz):
            fz, dz, sz = 1.0, 0.0, 0.0
            if three_d:
                fz, dz, sz = fzs[z], dzs[z], szs[z]
            for y in range(cy):
                p0 = ((z0 + z) * ny + y0 + y) * nx + x0
                q = p0 + cx
                fyz = fy[y] * fz
                dyy, syy, fyy = dy[y], sy[y], fy[y]
                jn, mr, jx, jy, jwx, jwy = Jn[p0:q], mu[p0:q], Jx[p0:q], Jy[p0:q], Jwx[p0:q], Jwy[p0:q]
                # the products of _gaussians, in its order: shape = fx * fyz,
                # mu += N * shape, J[b + 1] = (N dx) fyz, J[b + 2] = ((N fx) dy) fz,
                # J[wx] += (N sx) fyz, J[wy] += ((N fx) sy) fz
                for x in range(cx):
                    shape = fx[x] * fyz
                    jn[x] = shape
                    mr[x] += N * shape
                    jx[x] = ndx[x] * fyz
                    jy[x] = nfx[x] * dyy * fz
                    jwx[x] += nsx[x] * fyz
                    jwy[x] += nfx[x] * syy * fz
                if three_d:
                    jz, jwz = Jz[p0:q], Jwz[p0:q]
                    for x in range(cx):
                        jz[x] = nfx[x] * fyy * dz
                    for x in range(cx):
                        jwz[x] += nfx[x] * fyy * sz


@njit(error_model="numpy", inline="always")
def _unmasked_box(km, weight):
    """``km`` with the box of the unmasked pixels (``weight != 0``) of a window (the
    whole window if none is unmasked)."""
    nz, ny, nx = km.nz, km.ny, km.nx
    z0, z1, y0, y1, x0, x1 = nz, -1, ny, -1, nx, -1
    p = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if weight[p] != 0.0:  # (comparisons, not min/max: no new signatures of those to compile)
                    if z < z0:
                        z0 = z
                    if z > z1:
                        z1 = z
                    if y < y0:
                        y0 = y
                    if y > y1:
                        y1 = y
                    if x < x0:
                        x0 = x
                    if x > x1:
                        x1 = x
                p += 1
    if z1 < 0:
        z0, z1, y0, y1, x0, x1 = 0, nz - 1, 0, ny - 1, 0, nx - 1
    return KernelModel(km.family, km.integ, km.emitters, km.wx, km.wy, km.wz, km.intensity, km.offset,
                       km.linear, nz, ny, nx, km.boxed, z0, y0, x0, z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)


@njit(error_model="numpy", inline="always")
def _box_pixels(km, P):
    """Pixels of ``km``'s box (:func:`_unmasked_box`) when it is a boxed model's and smaller
    than its window of ``P`` pixels, else 0 (the window's layout is the box's)."""
    if not km.boxed:
        return 0
    n = km.cz * km.cy * km.cx
    return n if n < P else 0


@njit(error_model="numpy", inner=True)
def _compact(km, J, e, W, Jbuf, ebuf, Wbuf, n):
    """The rows of ``J (k, P)`` and ``e, W (P,)`` at the ``n`` pixels of ``km``'s box, in
    the box's own raster order, into the first ``k * n`` and ``n`` places of the work
    arrays: ``(k, n)``, ``(n,)`` and ``(n,)`` contiguous views.  The normal equations'
    sums over them do not depend on the window around the box (a joint fit's window is
    its bucket's largest box; its sums run in lanes that depend on the row length), so a
    group's fit is the same bit for bit in any bucket, and the padding is not summed."""
    k = J.shape[0]
    Jc = Jbuf[: k * n].reshape((k, n))
    for i in range(k):
        _compact_vector(km, J[i], Jc[i], n)
    return Jc, _compact_vector(km, e, ebuf, n), _compact_vector(km, W, Wbuf, n)


@njit(error_model="numpy", inner=True)
def _compact_vector(km, v, buf, n):
    """:func:`_compact` of one ``(P,)`` array: its ``n`` box pixels, a ``(n,)`` view of ``buf``."""
    out = buf[:n]
    ny, nx = km.ny, km.nx
    q = 0
    for z in range(km.z0, km.z0 + km.cz):
        for y in range(km.y0, km.y0 + km.cy):
            p0 = (z * ny + y) * nx + km.x0
            for x in range(km.cx):
                out[q + x] = v[p0 + x]
            q += km.cx
    return out


@njit(error_model="numpy", inline="always")
def _rotated_box(integ, th, ny, nx, y0, x0, cy, cx, mu, J, scratch):
    """:func:`_rotated` over the box ``[y0, y0 + cy) x [x0, x0 + cx)`` of the window
    (:func:`_rotated_pixels`: there bit for bit its values); ``J = 0`` outside, ``mu``
    left as it was."""
    if cy != ny or cx != nx:
        for j in range(J.shape[0]):
            Jj = J[j]
            for p in range(mu.shape[0]):
                Jj[p] = 0.0
    _rotated_pixels(integ, th, ny, nx, y0, x0, cy, cx, mu, J, scratch)


@njit(error_model="numpy", no_cpython_wrapper=True)
def boxed_window(km, th, mu, J, scratch):
    """:func:`model_window` over the box ``z0, y0, x0, cz, cy, cx`` of ``km`` only: there
    ``mu`` and ``J`` bit for bit :func:`model_window`'s, outside ``J = 0`` and ``mu``
    untouched (masked pixels, which the cost and the normal equations weigh by 0).
    ``SEPARABLE`` models of any number of emitters through :func:`_joint_gaussians`
    (faster than :func:`_gaussians` for several emitters), ``ROTATED`` through
    :func:`_rotated_box`.

    Compiled (or loaded from the cache) on the first joint fit only: a single-spot
    run never compiles it (:data:`MODEL_BOXED`).
    """
    if km.family == ROTATED:
        _rotated_box(km.integ, th, km.ny, km.nx, km.y0, km.x0, km.cy, km.cx, mu, J, scratch)
    else:
        _joint_gaussians(km, th, mu, J, scratch, km.z0, km.y0, km.x0, km.cz, km.cy, km.cx)


#: :func:`boxed_window` as a first-class function of :func:`model_window`'s signature:
#: the kernels take it in place of :data:`MODEL` (:func:`model_for`) for models of
#: several emitters and boxed fits, without being compiled again; it is compiled (or
#: loaded from the cache) when the first joint fit calls it
MODEL_BOXED = first_class(boxed_window, _model_window_signature)


def model_for(km):
    """The model function for kernel model ``km``: :data:`MODEL_BOXED` for boxed fits and
    ``SEPARABLE`` models of several emitters (joint fits), else :data:`MODEL`."""
    if km.boxed or (km.family == SEPARABLE and km.emitters > 1):
        return MODEL_BOXED
    return MODEL


@njit(error_model="numpy", nogil=True)
def evaluate(model_fn, km, theta, mu, J, start, stop):
    """Batched :func:`model_window`: ``theta (n, k)`` -> ``mu (n, P)``, ``J (n, k, P)``,
    windows ``start .. stop`` (see :func:`spotfit._jit.over_windows`)."""
    scratch = np.empty((9, max(km.nz, km.ny, km.nx, 10)))
    for i in range(start, stop):
        model_fn(km, theta[i], mu[i], J[i], scratch)


@njit(error_model="numpy", nogil=True)
def values(model_fn, km, theta, mu, start, stop):
    """Batched model values only: ``theta (n, k)`` -> ``mu (n, P)``, windows
    ``start .. stop``; the Jacobian goes to one window's work array, not to an
    ``(n, k, P)`` array (a joint fit's is ``k`` times the size of its values)."""
    scratch = np.empty((9, max(km.nz, km.ny, km.nx, 10)))
    J = np.empty((theta.shape[1], mu.shape[1]))
    for i in range(start, stop):
        model_fn(km, theta[i], mu[i], J, scratch)


# ----------------------------------------------------------------------------
# Solver: Levenberg-Marquardt and covariance over all windows
# ----------------------------------------------------------------------------
@njit(error_model="numpy", inner=True)
def _pixel_terms(kind, dp, mu, wp, shift, scale):
    """Cost term, weighted residual ``e`` and weight ``W`` of one pixel.

    The Gauss-Newton step of the cost is ``(J W J^T) delta = J e``.
    """
    if kind == LSQ:
        r = dp - mu
        return wp * r * r, wp * r, wp
    m = mu + shift
    if m < MU_FLOOR:
        m = MU_FLOOR
    ws = wp * scale
    dev = m - dp
    if dp > 0.0:
        dev += dp * math.log(dp / m)
    return 2.0 * ws * dev, ws * (dp / m - 1.0), ws / m


@njit(error_model="numpy", fastmath={"reassoc", "contract"}, inner=True)
def _pixel_costs(model_fn, km, cost, s, th, mu, J, scratch, e, W):
    """Cost of window ``s`` at ``th``; fills ``mu``, ``J`` and the pixel terms
    ``e`` (weighted residual) and ``W`` (weight), ``(P,)`` work arrays, from which
    :func:`_normal_equations` builds the step's equations (only for a step that is
    taken: a rejected or converging step needs the cost alone)."""
    d, w, shift = cost.data[s], cost.weight[s], cost.shift[s]
    model_fn(km, th, mu, J, scratch)
    total = 0.0
    if km.boxed:
        # a boxed fit's cost over its box's rows (its unmasked pixels are all there; the
        # pixels beyond are masked, and only the box's terms are read: _compact), in an
        # order that does not depend on the window around the box (a loop of its own: as
        # part of a flat loop's helper, it was vectorised in lanes that do)
        for z in range(km.z0, km.z0 + km.cz):
            for y in range(km.y0, km.y0 + km.cy):
                p0 = (z * km.ny + y) * km.nx + km.x0
                for p in range(p0, p0 + km.cx):
                    if w[p] == 0.0:
                        e[p] = 0.0
                        W[p] = 0.0
                        continue
                    c, e[p], W[p] = _pixel_terms(cost.kind, d[p], mu[p], w[p], shift[p], cost.scale)
                    total += c
        return total
    for p in range(mu.shape[0]):
        if w[p] == 0.0:
            e[p] = 0.0
            W[p] = 0.0
            continue
        c, e[p], W[p] = _pixel_terms(cost.kind, d[p], mu[p], w[p], shift[p], cost.scale)
        total += c
    return total


@njit(error_model="numpy", fastmath={"reassoc", "contract"}, inner=True)
def _normal_equations(J, e, W, H, g):
    """``H = J W J^T`` and ``g = J e`` from :func:`_pixel_costs`' work arrays.

    The sums run over contiguous rows of ``J`` so that they vectorise.
    """
    k, P = J.shape
    for i in range(k):
        Ji = J[i]
        acc = 0.0
        for p in range(P):
            acc += Ji[p] * e[p]
        g[i] = acc
        for j in range(i + 1):
            Jj = J[j]
            acc = 0.0
            for p in range(P):
                acc += Ji[p] * W[p] * Jj[p]
            H[i, j] = acc
            H[j, i] = acc


#: from this many parameters on, :func:`_joint_normal_equations` sums ``H`` in
#: 2 x 2 blocks (a K = 4 joint fit has 14)
BLOCKED_PARAMS = 10


@njit(error_model="numpy", fastmath={"reassoc", "contract"}, inner=True)
def _joint_normal_equations(J, e, W, WJ, H, g):
    """:func:`_normal_equations` for many-parameter (joint) fits: ``W J`` is formed
    once (``WJ``, ``(k, P)`` work array), so that each of the ``k (k + 1) / 2`` sums
    of ``H`` reads two rows instead of three, and from :data:`BLOCKED_PARAMS`
    parameters on the sums run in 2 x 2 blocks of ``H`` (four sums per pass over
    the pixels: each row is read once per pair of rows it meets, ~2x faster at
    20 parameters).  The same sums, rounded differently."""
    k, P = J.shape
    for i in range(k):
        Ji = J[i]
        WJi = WJ[i]
        acc = 0.0
        for p in range(P):
            acc += Ji[p] * e[p]
            WJi[p] = W[p] * Ji[p]
        g[i] = acc
    i = 0
    if k >= BLOCKED_PARAMS:
        while i + 1 < k:  # rows i, i + 1 against columns j, j + 1 <= i + 1
            A0, A1 = J[i], J[i + 1]
            for j in range(0, i, 2):
                B0, B1 = WJ[j], WJ[j + 1]
                a00 = 0.0
                a01 = 0.0
                a10 = 0.0
                a11 = 0.0
                for p in range(P):
                    a00 += A0[p] * B0[p]
                    a01 += A0[p] * B1[p]
                    a10 += A1[p] * B0[p]
                    a11 += A1[p] * B1[p]
                H[i, j] = H[j, i] = a00
                H[i, j + 1] = H[j + 1, i] = a01
                H[i + 1, j] = H[j, i + 1] = a10
                H[i + 1, j + 1] = H[j + 1, i + 1] = a11
            B0, B1 = WJ[i], WJ[i + 1]  # the diagonal block
            a00 = 0.0
            a10 = 0.0
            a11 = 0.0
            for p in range(P):
                a00 += A0[p] * B0[p]
                a10 += A1[p] * B0[p]
                a11 += A1[p] * B1[p]
            H[i, i] = a00
            H[i + 1, i] = H[i, i + 1] = a10
            H[i + 1, i + 1] = a11
            i += 2
    for r in range(i, k):  # the rows left (all of them below BLOCKED_PARAMS)
        Jr = J[r]
        for j in range(r + 1):
            WJj = WJ[j]
            acc = 0.0
            for p in range(P):
                acc += Jr[p] * WJj[p]
            H[r, j] = acc
            H[j, r] = acc


@njit(error_model="numpy", inner=True)
def _scaled_cholesky(A, L, y, min_pivot):
    """``D A D = L L^T`` with ``D = diag(y)`` scaling ``A`` to unit diagonal.

    Fills ``y`` (the scales) and the lower triangle of ``L``; ``A`` is left
    unchanged.  Returns False when a diagonal is not positive or a pivot is
    below ``min_pivot`` (singular to working precision).
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
        if not s > min_pivot:
            return False
        L[j, j] = math.sqrt(s)
        for i in range(j + 1, m):
            t = A[i, j] * y[i] * y[j]
            for q in range(j):
                t -= L[i, q] * L[j, q]
            L[i, j] = t / L[j, j]
    return True


@njit(error_model="numpy", inline="always")
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
    if not _scaled_cholesky(A, L, y, 1e-14):
        return False
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


@njit(error_model="numpy", inline="always")
def _step_equations(wkm, nb, active, J, e, W, WJbuf, H, g, Jbuf, ebuf, Wbuf):
    """A step's normal equations from :func:`_pixel_costs`' work arrays: over the box's
    ``nb`` pixels (:func:`_compact`) for a boxed fit whose box is smaller than its window,
    :func:`_joint_normal_equations` for active-set fits, else :func:`_normal_equations`."""
    k, P = J.shape
    if nb:
        Jc, ec, Wc = _compact(wkm, J, e, W, Jbuf, ebuf, Wbuf, nb)
        if active:
            _joint_normal_equations(Jc, ec, Wc, WJbuf[: k * nb].reshape((k, nb)), H, g)
        else:
            _normal_equations(Jc, ec, Wc, H, g)
    elif active:
        _joint_normal_equations(J, e, W, WJbuf[: k * P].reshape((k, P)), H, g)
    else:
        _normal_equations(J, e, W, H, g)


#: the Levenberg-Marquardt damping a fit starts with (relative to the curvature's
#: diagonal): single-spot fits start from their window's moments, near the optimum ...
DAMPING = 1e-3
#: ... fits of several emitters at once (joint fits) from rougher places (residual peaks,
#: split spots, neighbours' earlier fits): from there the first nearly undamped
#: Gauss-Newton steps overshot into other optima of the group (SMLM 60 per frame, one run's
#: 7,811 joint fits replayed from their starts: the final cost lower in 361 groups, higher
#: in 153 with 0.1; ``benchmarks/dense.py``: F1 0.805 -> 0.821)
JOINT_DAMPING = 0.1


@njit(error_model="numpy", nogil=True)
def levenberg_marquardt(model_fn, km, cost, box, state, max_iter, tol, start, stop):
    """Fit windows ``start .. stop``; updates ``state`` in place.

    Parameters
    ----------
    km : KernelModel
    cost : Cost
    box : Box
        Bounds ``(n, k)`` and the fitted parameters ``(k,)``.
    state : FitState
        ``theta (n, k)``: starting values in, fitted values out;
        ``iterations``, ``status``, ``cost`` ``(n,)`` out.
    max_iter : int
    tol : float
        Convergence threshold on the cost decrease, chi-square units (in
        units of ``cost / dof`` with ``cost.normalise``).
    start, stop : int
        The windows to fit (:func:`spotfit._jit.over_windows` runs ranges of
        windows on threads); the work arrays are allocated once per call.
    """
    theta, iterations, status, cost_out = state.theta, state.iterations, state.status, state.cost
    free = box.free
    k = theta.shape[1]
    P = cost.data.shape[1]
    size = max(km.nz, km.ny, km.nx, 10)
    n_free = 0
    for i in range(k):
        if free[i]:
            n_free += 1
    # one range of windows: work arrays allocated once
    mu = np.empty(P)
    J = np.empty((k, P))
    scratch = np.empty((9, size))
    H = np.empty((k, k))
    g = np.empty(k)
    WJbuf = np.empty((k if box.active else 0) * P)  # active-set fits' W J (_joint_normal_equations)
    A = np.empty((k, k))
    L = np.zeros((k, k))
    y = np.empty(k)
    delta = np.empty(k)
    e = np.empty(P)
    W = np.empty(P)
    th = np.empty(k)
    trial = np.empty(k)
    act = np.empty(k, np.bool_)
    Jbuf = np.empty(k * P if km.boxed else 0)  # boxed fits' sums over the box alone (_compact)
    ebuf = np.empty(P if km.boxed else 0)
    Wbuf = np.empty(P if km.boxed else 0)
    for s in range(start, stop):
        lo = box.lower[s]
        hi = box.upper[s]
        for i in range(k):
            th[i] = min(max(theta[s, i], lo[i]), hi[i])
        constrain(km, th)
        n_valid = 0
        for p in range(P):
            if cost.weight[s, p] != 0.0:
                n_valid += 1
        dof = max(n_valid - n_free, 1)
        wkm = _unmasked_box(km, cost.weight[s]) if km.boxed else km  # (boxed: MODEL_BOXED's box)

        nb = _box_pixels(wkm, P)
        value = _pixel_costs(model_fn, wkm, cost, s, th, mu, J, scratch, e, W)
        _step_equations(wkm, nb, box.active, J, e, W, WJbuf, H, g, Jbuf, ebuf, Wbuf)
        st = MAX_ITERATIONS  # unless something else happens
        if not math.isfinite(value):
            st = SINGULAR
        lam = JOINT_DAMPING if km.emitters > 1 else DAMPING
        nu = 2.0
        it = 0
        while st == MAX_ITERATIONS and it < max_iter:
            for i in range(k):
                act[i] = free[i]
                if box.active and free[i]:  # at a bound, pushed outwards: held this step
                    if (th[i] <= lo[i] and g[i] < 0.0) or (th[i] >= hi[i] and g[i] > 0.0):
                        act[i] = False
            if not _damped_solve(H, g, lam, act, A, L, y, delta):
                st = SINGULAR
                break
            for i in range(k):
                trial[i] = min(max(th[i] + delta[i], lo[i]), hi[i])
            if box.rough:
                _limit_intensities(km, th, trial)
            constrain(km, trial)
            predicted = 0.0  # cost decrease the quadratic model expects
            for i in range(k):
                predicted += 2.0 * delta[i] * g[i]
                for j in range(k):
                    predicted -= delta[i] * H[i, j] * delta[j]
            it += 1
            if lam < 1.0 and 0.0 <= predicted <= tol * (value / dof if cost.normalise else 1.0):
                # converged by the quadratic model: take the step without evaluating it
                for i in range(k):
                    th[i] = trial[i]
                st = CONVERGED
                break
            value_new = _pixel_costs(model_fn, wkm, cost, s, trial, mu, J, scratch, e, W)
            if math.isfinite(value_new) and value_new <= value:
                gain = value - value_new
                rho = gain / predicted if predicted > 0.0 else 0.0
                lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-9)
                nu = 2.0
                for i in range(k):
                    th[i] = trial[i]
                value = value_new
                unit = value / dof if cost.normalise else 1.0
                if gain <= tol * unit:
                    st = CONVERGED
                else:  # the next step's equations (a rejected or final step needs none)
                    _step_equations(wkm, nb, box.active, J, e, W, WJbuf, H, g, Jbuf, ebuf, Wbuf)
            else:
                lam *= nu
                nu *= 2.0
                if lam > 1e7:  # no downhill step left: at the minimum
                    st = CONVERGED
        for i in range(k):
            theta[s, i] = th[i]
        iterations[s] = it
        status[s] = st
        cost_out[s] = value


@njit(error_model="numpy", fastmath={"reassoc", "contract"}, inner=True)
def _weighted_gram(J, idx, m, weight, out):
    """``out[a, b] = sum_p J[idx[a], p] * weight[p] * J[idx[b], p]`` (symmetric, m x m).

    Row-wise sums over contiguous rows of ``J``, so they vectorise.
    """
    for a in range(m):
        Ja = J[idx[a]]
        for b in range(a + 1):
            Jb = J[idx[b]]
            acc = 0.0
            for p in range(Ja.shape[0]):
                acc += Ja[p] * weight[p] * Jb[p]
            out[a, b] = acc
            out[b, a] = acc


@njit(error_model="numpy", fastmath={"reassoc", "contract"}, inner=True)
def _weighted_sums(J, idx, m, e, out):
    """``out[a] = sum_p J[idx[a], p] * e[p]`` (m,): the gradient ``J e`` (as :func:`_normal_equations`)."""
    for a in range(m):
        Ja = J[idx[a]]
        acc = 0.0
        for p in range(Ja.shape[0]):
            acc += Ja[p] * e[p]
        out[a] = acc


@njit(error_model="numpy", inner=True)
def _cholesky_inverse(A, out, L, y):
    """Inverse of a symmetric positive definite ``A`` (m x m); False if singular.

    Scaled to unit diagonal first; singular means a pivot below 1e-10.
    """
    m = A.shape[0]
    if not _scaled_cholesky(A, L, y, 1e-10):
        return False
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


@njit(error_model="numpy", nogil=True)
def covariance(model_fn, km, cost, data, theta, free, noise, out, bias_snr, embed, start, stop):
    """Per-window covariance ``A^-1 B A^-1``, reduced chi-square and MLE bias.

    ``A = J W J^T`` (the cost's curvature), ``B = J W V W J^T`` with the
    pixel variance ``V`` given by ``noise`` (:data:`NoiseModel`):

    * ``CAMERA_VARIANCE``: ``V = excess * mu + read_var`` (calibrated camera);
    * ``MEASURE_VARIANCE``: no covariance; accumulate, per window, the sums
      for the regression ``r^2 / (1 - h) ~ alpha + beta * mu`` into
      ``out.sums (n, 5)`` (count, sum mu, sum r2, sum mu^2, sum mu r2),
      ``h`` the leverage;
    * ``MEASURED_VARIANCE``: ``V = max(alpha + beta * mu, floor)`` from that
      regression (per window).

    Where ``W V W = W`` at every pixel of a window (the Poisson MLE of a
    camera without excess noise: ``W = 1 / (mu + read_var) = 1 / V``),
    ``B = A`` and the covariance is ``A^-1``, the inverse Fisher information;
    ``B`` and the products are then skipped.

    ``data`` are the window pixels ``(n, P)`` (unshifted).  Rows and columns
    of fixed parameters are 0; singular windows get NaN.

    With ``cost.kind == MLE`` and ``out.bias`` of shape ``(n, k)`` (pass
    ``(0, k)`` to skip), ``out.bias`` receives the first-order bias of the
    Poisson maximum likelihood estimate (:func:`_mle_bias`) of each window
    whose intensity ``km.intensity`` has a signal-to-noise ratio below
    ``bias_snr``; other windows and fixed parameters get 0.

    ``noise.mode == SCORE_STATISTIC``: no covariance; ``out.chi2`` receives each
    window's score statistic of the richer model ``km`` at ``theta`` (see
    :func:`spotfit.solver.score_test`), ``g^T H^-1 g - v^T (D^T H D)^-1 v`` with the
    cost's gradient ``g = J e`` and curvature ``H = A`` over all parameters (``free``
    all True), ``D = embed (n, k, r)`` the Jacobian of the simpler model's embedding
    and ``v = D^T g``; NaN where a curvature is singular.  (One kernel for both: each
    kernel compiles the model code again, ~2 s on a first run.)  ``embed`` is
    ``(0, 0, 0)`` in the other modes.

    Windows ``start .. stop`` (see :func:`spotfit._jit.over_windows`).
    """
    n, k = theta.shape
    P = data.shape[1]
    size = max(km.nz, km.ny, km.nx, 10)
    idx = np.empty(k, dtype=np.int64)
    # not ``m = 0``: a literal 0 makes numba compile _weighted_gram and _mle_bias twice
    # (once for Literal[int](0) while typing the loop, once for int64)
    m = np.int64(0)
    at_intensity = -1  # position of the intensity among the free parameters
    for i in range(k):
        if free[i]:
            if i == km.intensity:
                at_intensity = m
            idx[m] = i
            m += 1
    want_bias = cost.kind == MLE and out.bias.shape[0] == n and at_intensity >= 0
    cov, chi2, sums, bias = out.cov, out.chi2, out.sums, out.bias
    # one range of windows: work arrays allocated once
    mu = np.empty(P)
    J = np.empty((k, P))
    scratch = np.empty((9, size))
    # (zeros without np.zeros: the second process of a first run, which compiles this
    # kernel, then compiles four numba library functions fewer)
    A = np.empty((m, m))
    A_work = np.empty((m, m))
    Ainv = np.empty((m, m))
    B = np.empty((m, m))
    L = np.empty((m, m))
    for a in range(m):
        for b in range(m):
            A[a, b] = 0.0
            B[a, b] = 0.0
            L[a, b] = 0.0
    y = np.empty(m)
    Wp = np.empty(P)
    E = np.empty(P)
    Q = np.empty(P)
    T = np.empty((m, m))
    score = noise.mode == SCORE_STATISTIC
    r = embed.shape[2]
    g = np.empty(m)
    M = np.empty((r, r))  # D^T H D
    M_work = np.empty((r, r))
    Minv = np.empty((r, r))
    Lr = np.empty((r, r))
    for a in range(r):
        for b in range(r):
            Lr[a, b] = 0.0
    yr = np.empty(r)
    v = np.empty(r)  # D^T g
    HD = np.empty((m, r))
    Jbuf = np.empty(k * P if km.boxed else 0)  # boxed fits' sums over the box alone (_compact)
    ebuf = np.empty(P if km.boxed else 0)
    Wbuf = np.empty(P if km.boxed else 0)
    Qbuf = np.empty(P if km.boxed else 0)
    for s in range(start, stop):
        th = theta[s]
        w = cost.weight[s]
        wkm = _unmasked_box(km, w) if km.boxed else km  # (the same values in the box, J = 0 beyond)
        nb = _box_pixels(wkm, P)
        model_fn(wkm, th, mu, J, scratch)
        n_valid = 0
        for p in range(P):
            if w[p] == 0.0:
                Wp[p] = 0.0
                E[p] = 0.0
                continue
            n_valid += 1
            _, E[p], Wp[p] = _pixel_terms(cost.kind, cost.data[s, p], mu[p], w[p], cost.shift[s, p],
                                          cost.scale)
        if nb:
            Jc, Ec, Wc = _compact(wkm, J, E, Wp, Jbuf, ebuf, Wbuf, nb)
            _weighted_gram(Jc, idx, m, Wc, A)
        else:
            _weighted_gram(J, idx, m, Wp, A)
        for a in range(m):  # a copy (an array assignment compiles numba's shape-error
            for b in range(m):  # message formatting: ~4 s on a first run)
                A_work[a, b] = A[a, b]
        ok = _cholesky_inverse(A_work, Ainv, L, y)
        if score:
            chi2[s] = _score(embed[s], A, Ainv, ok, J, idx, m, E, g, HD, M, M_work, Minv, Lr, yr, v)
            continue
        dof = max(n_valid - m, 1)
        if noise.mode == MEASURE_VARIANCE:
            for p in range(P):
                if w[p] == 0.0:
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
        fisher = True  # W V W = W at every pixel: B = A, the covariance is A^-1
        for p in range(P):
            if w[p] == 0.0:
                Q[p] = 0.0
                continue
            if noise.mode == CAMERA_VARIANCE:  # photons: an absolute floor
                V = max(noise.excess * max(mu[p], 0.0) + noise.read_var[s, p], VAR_FLOOR)
            else:  # any unit: the measured floor (relative), VAR_FLOOR for noise-free data
                V = max(noise.alpha[s] + noise.beta[s] * mu[p], noise.floor[s])
                if not V > 0.0:
                    V = VAR_FLOOR
            r = data[s, p] - mu[p]
            x2 += r * r / V
            Q[p] = Wp[p] * Wp[p] * V
            if abs(Q[p] - Wp[p]) > 1e-12 * Wp[p]:
                fisher = False
        if not fisher and nb:  # (Poisson MLE of a camera without excess noise: B = A)
            _weighted_gram(Jbuf[: k * nb].reshape((k, nb)), idx, m, _compact_vector(wkm, Q, Qbuf, nb), B)
        elif not fisher:
            _weighted_gram(J, idx, m, Q, B)
        chi2[s] = x2 / dof
        for i in range(k):
            for j in range(k):
                cov[s, i, j] = 0.0
        if not ok:
            for a in range(m):
                for b in range(m):
                    cov[s, idx[a], idx[b]] = np.nan
            continue
        if want_bias:
            a0 = at_intensity
            N = th[km.intensity]
            if N * N < bias_snr * bias_snr * Ainv[a0, a0]:  # N / err_N < bias_snr
                _mle_bias(model_fn, wkm, th, mu, J, scratch, idx, m, Ainv, Wp, bias[s])
        if fisher:
            for a in range(m):
                for b in range(m):
                    cov[s, idx[a], idx[b]] = Ainv[a, b]
            continue
        T[:, :] = 0.0  # Ainv @ B, then @ Ainv
        for a in range(m):
            for c in range(m):
                if Ainv[a, c] != 0.0:
                    for e in range(m):
                        T[a, e] += Ainv[a, c] * B[c, e]
        for a in range(m):
            for b in range(m):
                t = 0.0
                for e in range(m):
                    t += T[a, e] * Ainv[e, b]
                cov[s, idx[a], idx[b]] = t


@njit(error_model="numpy", inline="always")
def _score(D, H, Hinv, ok, J, idx, m, e, g, HD, M, M_work, Minv, Lr, yr, v):
    """The score statistic of one window (see :func:`covariance`); ``Hinv`` is
    ``H^-1`` if ``ok``; the other arrays are work arrays."""
    if not ok:
        return np.nan
    r = D.shape[1]
    _weighted_sums(J, idx, m, e, g)
    for a in range(r):
        t = 0.0
        for i in range(m):
            t += D[i, a] * g[i]
        v[a] = t
    for i in range(m):
        for a in range(r):
            t = 0.0
            for j in range(m):
                t += H[i, j] * D[j, a]
            HD[i, a] = t
    for a in range(r):
        for b in range(r):
            t = 0.0
            for i in range(m):
                t += D[i, a] * HD[i, b]
            M[a, b] = t
            M_work[a, b] = t
    if not _cholesky_inverse(M_work, Minv, Lr, yr):
        return np.nan
    t = 0.0
    for i in range(m):
        for j in range(m):
            t += g[i] * Hinv[i, j] * g[j]
    for a in range(r):
        for b in range(r):
            t -= v[a] * Minv[a, b] * v[b]
    return max(t, 0.0)


@njit(error_model="numpy", inner=True)
def _one_emitter_difference(model_fn, km, th, jb, h, scratch, idx, m, C, b, d):
    """:func:`_mle_bias`' forward difference along parameter ``jb`` when it is one
    emitter's of a several-emitter ``SEPARABLE`` model: ``d += sum_a C[a, b] (J_a(th
    + h e_jb) - J_a(th)) / h`` from that emitter's model alone (the other emitters'
    rows of the Jacobian do not change; the shared widths' change by that emitter's
    part), two one-emitter windows instead of one of all emitters.  False (nothing
    done) for other parameters and models."""
    if km.family != SEPARABLE or km.emitters < 2 or km.wx != km.wy:
        return False
    three_d = km.wz >= 0
    per = 4 if three_d else 3
    e = jb // per
    if jb >= km.emitters * per:
        return False  # a width (all emitters) or the offset
    P = km.nz * km.ny * km.nx
    k1 = per + (2 if three_d else 1) + 1  # [N, x, y(, z)], widths, offset
    wz = np.int64(per + 1) if three_d else np.int64(-1)
    one = KernelModel(np.int64(SEPARABLE), km.integ, np.int64(1), np.int64(per), np.int64(per), wz,
                      np.int64(0), np.int64(k1 - 1), np.int64(1), km.nz, km.ny, km.nx, np.int64(0),
                      np.int64(0), np.int64(0), np.int64(0), km.nz, km.ny, km.nx)
    t1 = np.zeros(k1)
    for j in range(per):
        t1[j] = th[e * per + j]
    t1[per] = th[km.wx]
    if three_d:
        t1[per + 1] = th[km.wz]
    mu1 = np.empty(P)
    J1 = np.empty((k1, P))
    J1h = np.empty((k1, P))
    model_fn(one, t1, mu1, J1, scratch)
    t1[jb - e * per] += h
    model_fn(one, t1, mu1, J1h, scratch)
    for a in range(m):
        ja = idx[a]
        if e * per <= ja < (e + 1) * per:
            r = ja - e * per
        elif ja == km.wx:
            r = per
        elif three_d and ja == km.wz:
            r = per + 1
        else:
            continue  # another emitter's, or the offset: unchanged
        c = C[a, b] / h
        for p in range(P):
            d[p] += c * (J1h[r, p] - J1[r, p])
    return True


@njit(error_model="numpy", inline="always")
def _mle_bias(model_fn, km, th, mu, J, scratch, idx, m, C, W, out):
    """First-order bias of a Poisson maximum-likelihood fit (Cox & Snell, 1968).

    For independent counts with means ``mu_p(theta)`` the O(1/N) bias of the
    MLE is ``b = -1/2 C sum_p J_p W_p tr(C H_p)``, with ``C`` the inverse
    Fisher information (over the free parameters), ``W_p = 1 / var_p`` and
    ``H_p`` the Hessian of ``mu_p``; subtracting ``b`` leaves an O(1/N^2)
    bias.  ``mu``, ``J`` hold the model at ``th``; ``C (m, m)`` and ``W (P,)``
    come from the covariance kernel.  Every model is linear in its offset
    (``km.offset``), whose second derivatives are therefore 0, and a model
    with ``km.linear`` is ``N g + offset`` in its intensity ``km.intensity``,
    whose mixed second derivatives are ``J / N``; the others are forward
    differences of the Jacobian with steps of 1e-4 (relative; 1e-4 px for
    small values), accurate to about 1e-4 of the correction.
    """
    k = th.shape[0]
    P = mu.shape[0]
    d = np.empty(P)  # tr(C H_p)
    for p in range(P):
        d[p] = 0.0
    Jh = np.empty((k, P))
    muh = np.empty(P)
    thh = np.empty(k)
    for b in range(m):
        jb = idx[b]
        if jb == km.offset:
            continue  # the Jacobian does not depend on it
        if km.linear == 1 and jb == km.intensity:
            # mu = N g + offset: dJ_a / dN = J_a / N except for N and offset
            inv_n = 1.0 / th[jb] if th[jb] != 0.0 else 0.0
            for a in range(m):
                ja = idx[a]
                if ja == km.intensity or ja == km.offset:
                    continue
                c = C[a, b] * inv_n
                for p in range(P):
                    d[p] += c * J[ja, p]
            continue
        h = 1e-4 * max(abs(th[jb]), 1.0)
        if _one_emitter_difference(model_fn, km, th, jb, h, scratch, idx, m, C, b, d):
            continue
        for j in range(k):
            thh[j] = th[j]
        thh[jb] += h
        model_fn(km, thh, muh, Jh, scratch)
        for a in range(m):
            ja = idx[a]
            c = C[a, b] / h
            for p in range(P):
                d[p] += c * (Jh[ja, p] - J[ja, p])
    for p in range(P):
        d[p] *= W[p]
    g = np.empty(m)  # sum_p J_p W_p tr(C H_p)
    for c in range(m):
        Jc = J[idx[c]]
        acc = 0.0
        for p in range(P):
            acc += Jc[p] * d[p]
        g[c] = acc
    for j in range(k):
        out[j] = 0.0
    for a in range(m):
        acc = 0.0
        for c in range(m):
            acc += C[a, c] * g[c]
        out[idx[a]] = -0.5 * acc


# ----------------------------------------------------------------------------
# Model choice: the quadrupole score of symmetric fits (spotfit.single's gate)
# ----------------------------------------------------------------------------
@njit(error_model="numpy", nogil=True)
def quadrupole_score(model_fn, km, theta, data, mask, x, y, ix, iy, ioff, weighted, excess, read_var, out,
                     start, stop):
    """``g^T I^-1 g`` over the two quadrupole patterns ``dx^2 - dy^2`` and ``dx dy`` of
    2D fits ``theta`` (one emitter; centre at ``ix, iy``, offset at ``ioff``), windows
    ``start .. stop``, into ``out`` (``inf`` where ``I`` is singular): the statistic of
    :func:`spotfit.single._quadrupole_score`, in one pass over each window's pixels.

    ``g`` projects the weighted residual, ``I`` the weighted light squared on the
    patterns (light: the model minus its offset); the weight is 1 (``weighted`` 0),
    else the light over the pixel variance ``excess * max(mu, 0) + read_var``
    (``read_var`` ``(1, 1)`` or ``(n, P)``), floored at 1e-12.  Pixels outside
    ``mask`` are left out.
    """
    P = data.shape[1]
    mu = np.empty(P)
    J = np.empty((theta.shape[1], P))
    scratch = np.empty((9, max(km.nz, km.ny, km.nx, 10)))
    per_pixel = read_var.shape[0] > 1 or read_var.shape[1] > 1
    for i in range(start, stop):
        model_fn(km, theta[i], mu, J, scratch)
        cx, cy, off = theta[i, ix], theta[i, iy], theta[i, ioff]
        gc = gs = icc = iss = ics = 0.0
        for p in range(P):
            if not mask[i, p]:
                continue
            light = mu[p] - off
            w = light
            if weighted:
                var = excess * max(mu[p], 0.0) + (read_var[i, p] if per_pixel else read_var[0, 0])
                w = light / max(var, 1e-12)
            a = w * (data[i, p] - mu[p])
            b = w * light
            dx = x[p] - cx
            dy = y[p] - cy
            u = dx * dx - dy * dy
            v = dx * dy
            gc += u * a
            gs += v * a
            icc += u * u * b
            iss += v * v * b
            ics += u * v * b
        det = icc * iss - ics * ics
        if det > 0:
            out[i] = (iss * gc * gc - 2.0 * ics * gc * gs + icc * gs * gs) / det
        else:
            out[i] = np.inf


# ----------------------------------------------------------------------------
# Kriging: the systems of a window's far pixels (spotfit.single's texture refinement)
# ----------------------------------------------------------------------------
@njit(error_model="numpy", nogil=True)  # no fastmath: the same bits wherever its buffers lie
def far_solve(R, F, s2, noise, far, rhs, out, start, stop):
    """Solve ``(s2[i] R + F + diag(noise[i])) z = rhs[i]`` on the ``far[i]`` pixels of
    windows ``i`` in ``start .. stop`` (each right-hand side column); ``out[i]`` is
    ``z`` there and 0 on the other pixels (whose noise is taken as unbounded).

    ``R, F (P, P)`` symmetric, ``s2 (n,)``, ``noise (n, P)``, ``far (n, P)`` bool,
    ``rhs, out (n, P, m)``.  Cholesky of the far pixels' block (``m_far^3 / 3``
    multiply-adds instead of an LU of all ``P``); a block that is not positive
    definite to working precision gives NaN.
    """
    P = R.shape[0]
    columns = rhs.shape[2]
    idx = np.empty(P, np.int64)
    L = np.empty((P, P))
    z = np.empty(P)
    for i in range(start, stop):
        m = 0
        for p in range(P):
            if far[i, p]:
                idx[m] = p
                m += 1
        for a in range(m):  # the lower triangle of the far block
            pa = idx[a]
            for b in range(a + 1):
                L[a, b] = s2[i] * R[pa, idx[b]] + F[pa, idx[b]]
            L[a, a] += noise[i, pa]
        ok = True
        for j in range(m):  # Cholesky in place, row by row
            for a in range(j):
                s = L[j, a]
                for q in range(a):
                    s -= L[j, q] * L[a, q]
                L[j, a] = s / L[a, a]
            s = L[j, j]
            for q in range(j):
                s -= L[j, q] * L[j, q]
            if not s > 0.0:
                ok = False
                break
            L[j, j] = math.sqrt(s)
        for c in range(columns):
            for p in range(P):
                out[i, p, c] = 0.0 if ok else np.nan
            if not ok:
                continue
            for a in range(m):  # L y = rhs
                s = rhs[i, idx[a], c]
                for q in range(a):
                    s -= L[a, q] * z[q]
                z[a] = s / L[a, a]
            for a in range(m - 1, -1, -1):  # L^T z = y
                s = z[a]
                for q in range(a + 1, m):
                    s -= L[q, a] * z[q]
                z[a] = s / L[a, a]
            for a in range(m):
                out[i, idx[a], c] = z[a]
