"""Gaussian PSF models (2D and 3D), point-sampled or pixel-integrated.

Parametrisations (all coordinates window-relative pixel centres, sigma in
pixels, intensity ``N`` = integrated signal above ``offset``):

* ``symmetric``  2D: ``N, x, y, sigma, offset``
* ``elliptical`` 2D: ``N, x, y, sigma_x, sigma_y, offset``
* ``rotated``    2D: ``N, x, y, sigma_x, sigma_y, angle, offset``
* ``symmetric``  3D: ``N, x, y, z, sigma, sigma_z, offset`` (sigma is lateral)
* ``elliptical`` 3D: ``N, x, y, z, sigma_x, sigma_y, sigma_z, offset``

Point-sampled::

    mu = N * g(x_p, y_p) + offset,   g = exp(-u^2/(2 sx^2) - v^2/(2 sy^2)) / (2 pi sx sy)

with ``u = cos(a) dx + sin(a) dy``, ``v = -sin(a) dx + cos(a) dy``,
``dx = x_p - x``, ``dy = y_p - y`` (``a = 0`` for the axis-aligned models).
Pixel-integrated models replace ``g`` by its integral over the pixel: exact
(``erf``) for the separable models, Gauss-Legendre quadrature with 3x3 nodes
per pixel for the rotated model (relative error < 1e-4 for sigma >= 0.8 px).

Canonical rotated form: ``angle`` in ``[-pi/4, pi/4)``, measured from the +x
axis towards +y; ``sigma_x`` is the width along that direction and
``sigma_y`` perpendicular to it.  ``(sx, sy, a)`` and ``(sy, sx, a + pi/2)``
describe the same spot; only the first, canonical form is reported.  The
rotated model is *fitted* in covariance form (``var_xx, var_yy, cov_xy``),
which has no singularity for round spots, and converted for reporting.
"""

from __future__ import annotations

import numpy as np

from spotfit.models._axis import factor, point_factor
from spotfit.models.base import Grid, Model, outer

_TWO_PI = 2.0 * np.pi


class SeparableGaussian(Model):
    """Axis-aligned Gaussian: product of one-dimensional factors.

    Subclasses set ``axis_params``: for each array axis (``..., y, x``) the
    names of its centre and width parameters.
    """

    axis_params: tuple = ()

    def __init__(self, integrated: bool = False):
        super().__init__(integrated)
        self._centre_idx = [self.index(c) for c, _ in self.axis_params]
        self._width_idx = [self.index(w) for _, w in self.axis_params]

    def evaluate(self, theta, grid: Grid):
        n, k = theta.shape
        fac = factor(self.integrated)
        f, dc, dw = [], [], []
        for coords, ci, wi in zip(grid.axes, self._centre_idx, self._width_idx):
            a, b, c = fac(coords, theta[:, ci], theta[:, wi])
            f.append(a)
            dc.append(b)
            dw.append(c)
        N = theta[:, :1]
        shape = outer(f)
        P = shape.shape[1]
        mu = N * shape + theta[:, -1:]
        jac = np.zeros((n, k, P))
        jac[:, 0] = shape
        for a in range(len(f)):
            replaced = f[:a] + [dc[a]] + f[a + 1 :]
            jac[:, self._centre_idx[a]] = N * outer(replaced)
            replaced = f[:a] + [dw[a]] + f[a + 1 :]
            jac[:, self._width_idx[a]] += N * outer(replaced)
        jac[:, -1] = 1.0
        return mu, jac


class Symmetric2D(SeparableGaussian):
    name = "symmetric"
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma", "offset")
    width_names = ("sigma",)
    axis_params = (("y", "sigma"), ("x", "sigma"))

    def _set_widths(self, theta, widths):
        theta[:, 3] = np.sqrt(widths[:, 0] * widths[:, 1])



class Elliptical2D(SeparableGaussian):
    name = "elliptical"
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma_x", "sigma_y", "offset")
    width_names = ("sigma_x", "sigma_y")
    axis_params = (("y", "sigma_y"), ("x", "sigma_x"))

    def _set_widths(self, theta, widths):
        theta[:, 3] = widths[:, 0]
        theta[:, 4] = widths[:, 1]



class Symmetric3D(SeparableGaussian):
    name = "symmetric"
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma", "sigma_z", "offset")
    width_names = ("sigma", "sigma_z")
    axis_params = (("z", "sigma_z"), ("y", "sigma"), ("x", "sigma"))

    def _set_widths(self, theta, widths):
        theta[:, 4] = np.sqrt(widths[:, 0] * widths[:, 1])
        theta[:, 5] = widths[:, 2]



class Elliptical3D(SeparableGaussian):
    name = "elliptical"
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma_x", "sigma_y", "sigma_z", "offset")
    width_names = ("sigma_x", "sigma_y", "sigma_z")
    axis_params = (("z", "sigma_z"), ("y", "sigma_y"), ("x", "sigma_x"))

    def _set_widths(self, theta, widths):
        theta[:, 4:7] = widths



# Gauss-Legendre nodes and weights on [-1/2, 1/2] for the integrated rotated model.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(3)
_GL_NODES = _GL_NODES / 2.0
_GL_WEIGHTS = _GL_WEIGHTS / 2.0


class Rotated2D(Model):
    """Elliptical Gaussian of any orientation (see module docstring).

    Fitted internally in the covariance form ``(N, x, y, var_xx, var_yy,
    cov_xy, offset)``, which is smooth everywhere (the angle of a round spot
    is undefined and would stall the solver); reported by :meth:`public` as
    ``(N, x, y, sigma_x, sigma_y, angle, offset)`` in canonical form, with
    errors propagated through the conversion.
    """

    name = "rotated"
    ndim = 2
    param_names = ("intensity", "x", "y", "var_xx", "var_yy", "cov_xy", "offset")
    public_names = ("intensity", "x", "y", "sigma_x", "sigma_y", "angle", "offset")
    width_names = ("var_xx", "var_yy", "cov_xy")

    def _set_widths(self, theta, widths):
        theta[:, 3] = widths[:, 0] ** 2
        theta[:, 4] = widths[:, 1] ** 2
        theta[:, 5] = 0.0


    def bounds(self, grid):
        lower, upper = super().bounds(grid)
        size2 = (float(max(grid.shape)) / 2.0) ** 2
        lower[3:5], upper[3:5] = 0.09, size2  # variances: sigma in [0.3 px, window / 2]
        lower[5], upper[5] = -size2, size2
        return lower, upper

    def constrain(self, theta):
        """Keep the covariance positive definite (|corr| <= 0.95)."""
        limit = 0.95 * np.sqrt(np.clip(theta[:, 3] * theta[:, 4], 0.0, None))
        theta[:, 5] = np.clip(theta[:, 5], -limit, limit)
        return theta

    def evaluate(self, theta, grid: Grid):
        n, k = theta.shape
        xs, ys = grid.flat()
        if not self.integrated:
            g, dg = _covariance_terms(theta, xs, ys)
        else:
            g = np.zeros((n, xs.size))
            dg = np.zeros((n, 5, xs.size))
            for ox, wx in zip(_GL_NODES, _GL_WEIGHTS):
                for oy, wy in zip(_GL_NODES, _GL_WEIGHTS):
                    gq, dgq = _covariance_terms(theta, xs + ox, ys + oy)
                    w = wx * wy
                    g += w * gq
                    dg += w * dgq
        N = theta[:, :1]
        mu = N * g + theta[:, 6:7]
        jac = np.empty((n, k, xs.size))
        jac[:, 0] = g
        jac[:, 1:6] = N[:, :, None] * dg
        jac[:, 6] = 1.0
        return mu, jac

    @staticmethod
    def _sigmas(theta):
        """Canonical ``(sigma_x, sigma_y, angle)`` from the covariance form, ``(n, 3)``."""
        vxx, vyy, cxy = theta[:, 3], theta[:, 4], theta[:, 5]
        a = 0.5 * np.arctan2(2.0 * cxy, vxx - vyy)  # direction of the major axis
        c, s = np.cos(a), np.sin(a)
        v1 = vxx * c * c + 2 * cxy * c * s + vyy * s * s
        v2 = vxx * s * s - 2 * cxy * c * s + vyy * c * c
        sx = np.sqrt(np.clip(v1, 0.0, None))
        sy = np.sqrt(np.clip(v2, 0.0, None))
        # canonical: angle in [-pi/4, pi/4), sigma_x along that angle
        swap = a >= np.pi / 4
        a = np.where(swap, a - np.pi / 2, a)
        swap2 = a < -np.pi / 4
        a = np.where(swap2, a + np.pi / 2, a)
        flip = swap ^ swap2
        return np.stack([np.where(flip, sy, sx), np.where(flip, sx, sy), a], axis=1)

    def public(self, theta, cov):
        out = theta.copy()
        out[:, 3:6] = self._sigmas(theta)
        # Error propagation through the conversion: central differences of
        # (sigma_x, sigma_y, angle) with respect to (var_xx, var_yy, cov_xy).
        G = np.zeros((theta.shape[0], 7, 7))
        idx = np.arange(7)
        G[:, idx, idx] = 1.0
        G[:, 3:6, 3:6] = 0.0
        scale = np.maximum(np.abs(theta[:, 3:5]).max(axis=1), 1e-6)
        for j in range(3):
            h = 1e-6 * scale
            up, down = theta.copy(), theta.copy()
            up[:, 3 + j] += h
            down[:, 3 + j] -= h
            d = self._sigmas(up) - self._sigmas(down)
            d[:, 2] = np.angle(np.exp(2j * d[:, 2])) / 2  # angle differences modulo pi/2
            G[:, 3:6, 3 + j] = d / (2 * h[:, None])
        cov_pub = np.matmul(np.matmul(G, cov), G.transpose(0, 2, 1))
        return self.public_names, out, cov_pub


def _covariance_terms(theta, xs, ys):
    """Unit-intensity Gaussian with covariance ``[[vxx, cxy], [cxy, vyy]]``.

    Returns ``g`` of shape ``(n, P)`` and ``dg/d(x, y, vxx, vyy, cxy)`` of
    shape ``(n, 5, P)``.
    """
    vxx, vyy, cxy = theta[:, 3:4], theta[:, 4:5], theta[:, 5:6]
    det = vxx * vyy - cxy * cxy
    inv_det = 1.0 / det
    a = xs[None, :] - theta[:, 1:2]
    b = ys[None, :] - theta[:, 2:3]
    pa = (vyy * a - cxy * b) * inv_det  # (Sigma^-1 d)_x
    pb = (vxx * b - cxy * a) * inv_det  # (Sigma^-1 d)_y
    q = a * pa + b * pb
    g = np.exp(-0.5 * q) * (inv_det ** 0.5 / _TWO_PI)
    dg = np.empty((theta.shape[0], 5, xs.size))
    dg[:, 0] = g * pa
    dg[:, 1] = g * pb
    half_g = 0.5 * g
    # d log g / d Sigma = (Sigma^-1 d d^T Sigma^-1 - Sigma^-1) / 2, cxy counted twice
    dg[:, 2] = half_g * (pa * pa - inv_det * vyy)
    dg[:, 3] = half_g * (pb * pb - inv_det * vxx)
    dg[:, 4] = g * (pa * pb + inv_det * cxy)
    return g, dg


__all__ = [
    "Symmetric2D",
    "Elliptical2D",
    "Rotated2D",
    "Symmetric3D",
    "Elliptical3D",
    "point_factor",
]
