"""Compiled model kernels: expected values and Jacobian of one window.

This is the only place the Gaussian maths lives.  Each function fills, for
one window, ``mu[p]`` and ``J[j, p]`` (derivative of ``mu[p]`` with respect
to parameter ``j``) for every pixel ``p`` of a ``(nz, ny, nx)`` window
flattened in C order (x fastest); 2D windows have ``nz = 1``.  Coordinates
are window-relative pixel centres (0 is the centre of the first pixel).

Families (parameter order in brackets; see :mod:`spotfit.models.gaussian`):

* ``SYM2``  symmetric 2D   [N, x, y, sigma, offset]
* ``ELL2``  elliptical 2D  [N, x, y, sigma_x, sigma_y, offset]
* ``ROT2``  rotated 2D     [N, x, y, var_xx, var_yy, cov_xy, offset]
* ``SYM3``  symmetric 3D   [N, x, y, z, sigma, sigma_z, offset]
* ``ELL3``  elliptical 3D  [N, x, y, z, sigma_x, sigma_y, sigma_z, offset]

``integ`` selects the pixel-integrated form: exact ``erf`` integrals for the
separable families, 3 x 3 Gauss-Legendre quadrature per pixel for ``ROT2``.

Compiled with numba (``cache=True``: compiled once per installation, then
loaded from the cache in about 0.1 s).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

SYM2, ELL2, ROT2, SYM3, ELL3 = range(5)

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_TWO_PI = 1.0 / (2.0 * math.pi)
_GL_NODES = np.polynomial.legendre.leggauss(3)[0] / 2.0
_GL_WEIGHTS = np.polynomial.legendre.leggauss(3)[1] / 2.0

# Parameter indices per family: centre x, y, z; width x, y, z (-1: none).
_LAYOUT = np.array(
    [
        [1, 2, -1, 3, 3, -1],  # SYM2
        [1, 2, -1, 3, 4, -1],  # ELL2
        [1, 2, -1, -1, -1, -1],  # ROT2 (not separable)
        [1, 2, 3, 4, 4, 5],  # SYM3
        [1, 2, 3, 4, 5, 6],  # ELL3
    ],
    dtype=np.int64,
)


@njit(cache=True, error_model="numpy")
def _axis_factors(c0, s, integ, n, f, df, ds):
    """1D Gaussian factor over ``n`` pixels: value, d/dcentre, d/dsigma."""
    inv_s = 1.0 / s
    for i in range(n):
        if integ:
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


@njit(cache=True, error_model="numpy")
def _separable(family, integ, th, nz, ny, nx, mu, J, scratch):
    k = th.shape[0]
    ix, iy, iz = _LAYOUT[family, 0], _LAYOUT[family, 1], _LAYOUT[family, 2]
    wx, wy, wz = _LAYOUT[family, 3], _LAYOUT[family, 4], _LAYOUT[family, 5]
    _axis_factors(th[ix], th[wx], integ, nx, scratch[0], scratch[1], scratch[2])
    _axis_factors(th[iy], th[wy], integ, ny, scratch[3], scratch[4], scratch[5])
    three_d = iz >= 0
    if three_d:
        _axis_factors(th[iz], th[wz], integ, nz, scratch[6], scratch[7], scratch[8])
    N = th[0]
    offset = th[k - 1]
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
                mu[p] = N * shape + offset
                for j in range(k):
                    J[j, p] = 0.0
                J[0, p] = shape
                J[ix, p] = N * dx * fyz
                J[iy, p] = N * fx * dy * fz
                J[wx, p] += N * sx * fyz
                J[wy, p] += N * fx * sy * fz
                if three_d:
                    J[iz, p] = N * fx * fy * dz
                    J[wz, p] += N * fx * fy * sz
                J[k - 1, p] = 1.0
                p += 1


@njit(cache=True, error_model="numpy")
def _covariance_gaussian(th, x, y, out):
    """Unit-intensity Gaussian with covariance [[vxx, cxy], [cxy, vyy]] at (x, y).

    Writes d/d(x0, y0, vxx, vyy, cxy) into out[0:5]; returns the value.
    """
    vxx, vyy, cxy = th[3], th[4], th[5]
    inv_det = 1.0 / (vxx * vyy - cxy * cxy)
    a = x - th[1]
    b = y - th[2]
    pa = (vyy * a - cxy * b) * inv_det  # (Sigma^-1 d)_x
    pb = (vxx * b - cxy * a) * inv_det  # (Sigma^-1 d)_y
    g = math.exp(-0.5 * (a * pa + b * pb)) * math.sqrt(inv_det) * _INV_TWO_PI
    out[0] = g * pa
    out[1] = g * pb
    # d log g / d Sigma = (Sigma^-1 d d^T Sigma^-1 - Sigma^-1) / 2, cxy counted twice
    out[2] = 0.5 * g * (pa * pa - inv_det * vyy)
    out[3] = 0.5 * g * (pb * pb - inv_det * vxx)
    out[4] = g * (pa * pb + inv_det * cxy)
    return g


@njit(cache=True, error_model="numpy")
def _rotated(integ, th, ny, nx, mu, J, tmp):
    N = th[0]
    offset = th[6]
    p = 0
    for y in range(ny):
        for x in range(nx):
            if integ:
                g = 0.0
                for j in range(5):
                    tmp[5 + j] = 0.0
                for qy in range(3):
                    for qx in range(3):
                        w = _GL_WEIGHTS[qx] * _GL_WEIGHTS[qy]
                        g += w * _covariance_gaussian(th, x + _GL_NODES[qx], y + _GL_NODES[qy], tmp)
                        for j in range(5):
                            tmp[5 + j] += w * tmp[j]
                for j in range(5):
                    J[1 + j, p] = N * tmp[5 + j]
            else:
                g = _covariance_gaussian(th, float(x), float(y), tmp)
                for j in range(5):
                    J[1 + j, p] = N * tmp[j]
            mu[p] = N * g + offset
            J[0, p] = g
            J[6, p] = 1.0
            p += 1


@njit(cache=True, error_model="numpy")
def model_window(family, integ, th, nz, ny, nx, mu, J, scratch):
    """Fill ``mu (P,)`` and ``J (k, P)`` for one window.

    ``scratch`` is a ``(9, max(nz, ny, nx, 10))`` work array.
    """
    if family == ROT2:
        _rotated(integ, th, ny, nx, mu, J, scratch[0])
    else:
        _separable(family, integ, th, nz, ny, nx, mu, J, scratch)


@njit(cache=True, error_model="numpy")
def constrain(family, th):
    """Project parameters into the model's domain (ROT2: positive definite)."""
    if family == ROT2:
        limit = 0.95 * math.sqrt(max(th[3] * th[4], 0.0))
        th[5] = min(max(th[5], -limit), limit)


def scratch_size(nz, ny, nx):
    return max(nz, ny, nx, 10)


@njit(cache=True, parallel=True, error_model="numpy")
def evaluate(family, integ, theta, nz, ny, nx, mu, J):
    """Batched :func:`model_window`: ``theta (n, k)`` -> ``mu (n, P)``, ``J (n, k, P)``."""
    n = theta.shape[0]
    size = max(nz, ny, nx, 10)
    for i in prange(n):
        scratch = np.empty((9, size))
        model_window(family, integ, theta[i], nz, ny, nx, mu[i], J[i], scratch)
