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
from spotfit.models.base import Model


class Symmetric2D(Model):
    name = "symmetric"
    family = K.SEPARABLE
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma", "offset")
    width_names = ("sigma",)
    axis_widths = ("sigma", "sigma")


class Elliptical2D(Model):
    name = "elliptical"
    family = K.SEPARABLE
    ndim = 2
    param_names = ("intensity", "x", "y", "sigma_x", "sigma_y", "offset")
    width_names = ("sigma_x", "sigma_y")
    axis_widths = ("sigma_x", "sigma_y")


class Symmetric3D(Model):
    name = "symmetric"
    family = K.SEPARABLE
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma", "sigma_z", "offset")
    width_names = ("sigma", "sigma_z")
    axis_widths = ("sigma", "sigma", "sigma_z")


class Elliptical3D(Model):
    name = "elliptical"
    family = K.SEPARABLE
    ndim = 3
    param_names = ("intensity", "x", "y", "z", "sigma_x", "sigma_y", "sigma_z", "offset")
    width_names = ("sigma_x", "sigma_y", "sigma_z")
    axis_widths = ("sigma_x", "sigma_y", "sigma_z")


class Rotated2D(Model):
    """Elliptical Gaussian of any orientation (see module docstring).

    Fitted internally in the covariance form ``(N, x, y, var_xx, var_yy,
    cov_xy, offset)``, which is smooth everywhere (the angle of a round spot
    is undefined and would stall the solver); reported by :meth:`public` as
    ``(N, x, y, sigma_x, sigma_y, angle, offset)`` in canonical form, with
    errors propagated through the conversion.
    """

    name = "rotated"
    family = K.ROTATED
    ndim = 2
    param_names = ("intensity", "x", "y", "var_xx", "var_yy", "cov_xy", "offset")
    public_names = ("intensity", "x", "y", "sigma_x", "sigma_y", "angle", "offset")
    width_names = ("var_xx", "var_yy", "cov_xy")
    axis_widths = ("sigma_x", "sigma_y")
    angle_name = "angle"

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
    def _sigmas(theta, jacobian=False):
        """Canonical ``(sigma_x, sigma_y, angle)`` from the covariance form, ``(n, 3)``.

        With ``jacobian``, also ``d(sigma_x, sigma_y, angle) / d(var_xx, var_yy,
        cov_xy)``, ``(n, 3, 3)``, from the eigen-decomposition
        ``lambda = (var_xx + var_yy) / 2 +- R``, ``R = sqrt(X^2 + Y^2) / 2``,
        ``angle = atan2(Y, X) / 2`` with ``X = var_xx - var_yy``, ``Y = 2 cov_xy``
        (undefined for an exactly round spot: 0 there).
        """
        vxx, vyy, cxy = theta[:, 3], theta[:, 4], theta[:, 5]
        X, Y = vxx - vyy, 2.0 * cxy
        a = 0.5 * np.arctan2(Y, X)  # direction of the major axis
        R = 0.5 * np.hypot(X, Y)
        mean = 0.5 * (vxx + vyy)
        s1 = np.sqrt(np.clip(mean + R, 0.0, None))  # major
        s2 = np.sqrt(np.clip(mean - R, 0.0, None))  # minor
        # canonical: angle in [-pi/4, pi/4), sigma_x along that angle
        swap = a >= np.pi / 4
        a = np.where(swap, a - np.pi / 2, a)
        swap2 = a < -np.pi / 4
        a = np.where(swap2, a + np.pi / 2, a)
        flip = swap ^ swap2
        values = np.stack([np.where(flip, s2, s1), np.where(flip, s1, s2), a], axis=1)
        if not jacobian:
            return values
        with np.errstate(divide="ignore", invalid="ignore"):
            q = X / (4.0 * R)
            r = Y / (2.0 * R)
            d1 = np.stack([0.5 + q, 0.5 - q, r], axis=1) / (2.0 * s1[:, None])
            d2 = np.stack([0.5 - q, 0.5 + q, -r], axis=1) / (2.0 * s2[:, None])
            r2 = X * X + Y * Y
            da = np.stack([-0.5 * Y / r2, 0.5 * Y / r2, X / r2], axis=1)
        G = np.empty((theta.shape[0], 3, 3))
        G[:, 0] = np.where(flip[:, None], d2, d1)
        G[:, 1] = np.where(flip[:, None], d1, d2)
        G[:, 2] = da
        # an exactly round spot (R = 0: widths held by --fix-sigma) has no angle;
        # its width block of the covariance is 0 then, and so are the errors
        G[~np.isfinite(G)] = 0.0
        return values, G

    def public(self, theta, cov):
        out = theta.copy()
        out[:, 3:6], G = self._sigmas(theta, jacobian=True)
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
    symmetric Gaussian (lateral), point-sampled or pixel-integrated; emitter
    ``i`` alone is the symmetric model :attr:`emitter_model` with the
    parameters :meth:`emitter_params` ``(i)``.
    """

    name = "multi"
    family = K.SEPARABLE

    def __init__(self, n_emitters: int, ndim: int = 2, integrated: bool = False):
        self.n_emitters = int(n_emitters)
        self.ndim = int(ndim)
        names = []
        for i in range(self.n_emitters):
            names += [f"intensity_{i}"] + [f"{a}_{i}" for a in ("x", "y", "z")[:ndim]]
        self.width_names = ("sigma", "sigma_z") if ndim == 3 else ("sigma",)
        self.axis_widths = ("sigma", "sigma", "sigma_z")[:ndim]
        self.param_names = tuple(names) + self.width_names + ("offset",)
        self.public_names = None
        super().__init__(integrated)

    @property
    def per_emitter(self) -> int:
        return 1 + self.ndim

    def emitter_index(self, i: int, role: str) -> int:
        """Index of ``role`` (``"intensity"``, ``"x"``, ``"y"``, ``"z"``) of emitter ``i``."""
        if not 0 <= i < self.n_emitters:
            raise IndexError(f"emitter {i} of {self.n_emitters}")
        return i * self.per_emitter + ("intensity", "x", "y", "z").index(role)

    @property
    def emitter_model(self) -> Model:
        """The one-emitter model each emitter is (symmetric, same form)."""
        return (Symmetric3D if self.ndim == 3 else Symmetric2D)(self.integrated)

    def emitter_params(self, i: int) -> np.ndarray:
        """Indices that take emitter ``i``'s parameters, in :attr:`emitter_model` order.

        ``theta[:, idx]`` and ``cov[:, idx][:, :, idx]`` are emitter ``i``'s
        parameters and their covariance (shared widths and offset included).
        """
        own = [self.emitter_index(i, r) for r in ("intensity", "x", "y", "z")[: 1 + self.ndim]]
        return np.array(own + [self.index(n) for n in self.width_names] + [self.offset_index])
