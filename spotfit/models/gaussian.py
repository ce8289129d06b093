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
per pixel for the rotated model (error < 5e-5 of the peak for sigma >= 0.7 px).
The maths itself is compiled, in :mod:`spotfit._kernels`; the classes
here describe parameters, bounds, starting values and reporting.

Canonical rotated form: ``angle`` in ``[-pi/4, pi/4)``, measured from the +x
axis towards +y; ``sigma_x`` is the width along that direction and
``sigma_y`` perpendicular to it.  ``(sx, sy, a)`` and ``(sy, sx, a + pi/2)``
describe the same spot; only the first, canonical form is reported.  The
rotated model is *fitted* in covariance form (``var_xx, var_yy, cov_xy``),
which has no singularity for round spots, and converted for reporting.
"""

from __future__ import annotations

import numpy as np

from spotfit import _kernels as K
from spotfit.models.base import Grid, Model


class Symmetric2D(Model):
    name = "symmetric"
    family = K.SYM2
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma", "offset")
    width_names = ("sigma",)

    def _set_widths(self, theta, widths):
        theta[:, 3] = np.sqrt(widths[:, 0] * widths[:, 1])


class Elliptical2D(Model):
    name = "elliptical"
    family = K.ELL2
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma_x", "sigma_y", "offset")
    width_names = ("sigma_x", "sigma_y")

    def _set_widths(self, theta, widths):
        theta[:, 3] = widths[:, 0]
        theta[:, 4] = widths[:, 1]


class Symmetric3D(Model):
    name = "symmetric"
    family = K.SYM3
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma", "sigma_z", "offset")
    width_names = ("sigma", "sigma_z")

    def _set_widths(self, theta, widths):
        theta[:, 4] = np.sqrt(widths[:, 0] * widths[:, 1])
        theta[:, 5] = widths[:, 2]


class Elliptical3D(Model):
    name = "elliptical"
    family = K.ELL3
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma_x", "sigma_y", "sigma_z", "offset")
    width_names = ("sigma_x", "sigma_y", "sigma_z")

    def _set_widths(self, theta, widths):
        theta[:, 4:7] = widths


class Rotated2D(Model):
    """Elliptical Gaussian of any orientation (see module docstring).

    Fitted internally in the covariance form ``(N, x, y, var_xx, var_yy,
    cov_xy, offset)``, which is smooth everywhere (the angle of a round spot
    is undefined and would stall the solver); reported by :meth:`public` as
    ``(N, x, y, sigma_x, sigma_y, angle, offset)`` in canonical form, with
    errors propagated through the conversion.
    """

    name = "rotated"
    family = K.ROT2
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
        lower[5], upper[5] = -size2, size2  # kept positive definite by the kernel
        return lower, upper

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
        # (sigma_x, sigma_y, angle) with respect to (var_xx, var_yy, cov_xy),
        # all six perturbations evaluated in one call.
        n = theta.shape[0]
        h = 1e-6 * np.maximum(np.abs(theta[:, 3:5]).max(axis=1), 1e-6)
        steps = np.zeros((6, n, theta.shape[1]))
        for j in range(3):
            steps[2 * j, :, 3 + j] = h
            steps[2 * j + 1, :, 3 + j] = -h
        moved = self._sigmas((theta[None] + steps).reshape(6 * n, -1)).reshape(6, n, 3)
        G = np.empty((n, 3, 3))  # d(sigma_x, sigma_y, angle) / d(var_xx, var_yy, cov_xy)
        for j in range(3):
            d = moved[2 * j] - moved[2 * j + 1]
            d[:, 2] = (d[:, 2] + np.pi / 4) % (np.pi / 2) - np.pi / 4  # angle modulo pi/2
            G[:, :, j] = d / (2 * h[:, None])
        # Only rows/columns 3:6 change: cov' = M cov M^T with M = identity but G there.
        cov_pub = cov.copy()
        cov_pub[:, 3:6, :] = np.matmul(G, cov[:, 3:6, :])
        cov_pub[:, :, 3:6] = np.matmul(cov_pub[:, :, 3:6], G.transpose(0, 2, 1))
        return self.public_names, out, cov_pub


class MultiGaussian(Model):
    """K Gaussians fitted jointly, sharing their width(s) and one offset.

    Used for crowded fields (:mod:`spotfit.group`).  Parameters, in order:
    ``intensity_i, x_i, y_i[, z_i]`` for each emitter ``i = 0 .. K-1``, then
    ``sigma`` (lateral) [, ``sigma_z``], then ``offset``.  Each emitter is a
    symmetric Gaussian (lateral), point-sampled or pixel-integrated.
    """

    name = "multi"
    width_names = ()

    def __init__(self, n_emitters: int, ndim: int = 2, integrated: bool = False):
        super().__init__(integrated)
        self.n_emitters = int(n_emitters)
        self.ndim = int(ndim)
        self.family = K.MULTI3 if ndim == 3 else K.MULTI2
        axes = ("x", "y", "z")[:ndim]
        names = []
        for i in range(self.n_emitters):
            names += [f"intensity_{i}"] + [f"{a}_{i}" for a in axes]
        self.width_names = ("sigma", "sigma_z") if ndim == 3 else ("sigma",)
        self.param_names = tuple(names) + self.width_names + ("offset",)

    @property
    def per_emitter(self) -> int:
        return 1 + self.ndim

    def emitter_index(self, i: int, what: str) -> int:
        """Index of ``what`` (``"intensity"``, ``"x"``, ``"y"``, ``"z"``) of emitter ``i``."""
        return i * self.per_emitter + ("intensity", "x", "y", "z").index(what)

    @property
    def center_index(self) -> tuple:
        return tuple(self.emitter_index(0, a) for a in ("x", "y", "z")[: self.ndim])

    def bounds(self, grid):
        k = self.n_params
        lower = np.full(k, -np.inf)
        upper = np.full(k, np.inf)
        shape_xyz = grid.shape[::-1]
        for i in range(self.n_emitters):
            lower[self.emitter_index(i, "intensity")] = 1e-3
            for j, a in enumerate(("x", "y", "z")[: self.ndim]):
                lower[self.emitter_index(i, a)] = -1.0
                upper[self.emitter_index(i, a)] = shape_xyz[j]
        for name in self.width_names:
            lower[self.index(name)] = 0.3
            upper[self.index(name)] = float(max(grid.shape)) / 2.0
        return lower, upper
