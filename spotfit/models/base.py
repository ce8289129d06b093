"""The model interface and the window grid every model is evaluated on.

A model maps per-window parameters ``theta`` of shape ``(n, k)`` to expected
pixel values ``mu`` of shape ``(n, P)`` and their Jacobian ``jac`` of shape
``(n, k, P)`` (parameter-major, so that each row ``jac[:, j]`` is contiguous),
where ``P`` is the number of pixels of one window.  Coordinates in ``theta``
are *window-relative*: 0 is the centre of the window's first pixel along that
axis.  :mod:`spotfit.roi` owns the conversion to image coordinates.

Parameter order, for every model: ``intensity`` (integrated, above offset),
the centre (``x``, ``y`` [, ``z``]), the widths (sigma, px), ``angle``
(radians, rotated model only), ``offset`` (background per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates of a window, shared by all windows.

    Parameters
    ----------
    shape : tuple of int
        Window shape in array order, ``(ny, nx)`` or ``(nz, ny, nx)``.
    """

    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def zyx(self) -> tuple:
        """Window shape as ``(nz, ny, nx)`` (``nz = 1`` for 2D)."""
        return tuple(int(s) for s in ((1,) + tuple(self.shape))[-3:])

    @property
    def axes(self) -> tuple:
        """Per-axis coordinate vectors in array order (``..., y, x``)."""
        return tuple(np.arange(s, dtype=float) for s in self.shape)

    def flat(self) -> tuple:
        """Flattened coordinates ``(x, y[, z])`` of every pixel, each ``(P,)``."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return tuple(m.ravel() for m in reversed(mesh))


class Model:
    """Base class: subclasses set the class attributes and ``evaluate``."""

    #: short name used by ``--model``
    name: str = ""
    #: kernel family id (see :mod:`spotfit._kernels`)
    family: int = -1
    #: parameter names in order
    param_names: tuple = ()
    #: spatial dimensions (2 or 3)
    ndim: int = 2
    #: names of the width parameters (for bounds and ``--fix-sigma``)
    width_names: tuple = ()

    def __init__(self, integrated: bool = False, quadrature: int = 3):
        self.integrated = bool(integrated)
        self.quadrature = int(quadrature)

    @property
    def kernel_integ(self) -> int:
        """The kernels' ``integ`` code: 0 point-sampled, else quadrature order."""
        return self.quadrature if self.integrated else 0

    def __repr__(self):
        kind = "integrated" if self.integrated else "point-sampled"
        return f"<{type(self).__name__} {self.name!r} {kind}>"

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def index(self, name: str) -> int:
        return self.param_names.index(name)

    @property
    def center_index(self) -> tuple:
        """Indices of ``x``, ``y`` (and ``z``) in ``param_names``."""
        names = ("x", "y", "z")[: self.ndim]
        return tuple(self.param_names.index(n) for n in names)

    def evaluate(self, theta: np.ndarray, grid: Grid):
        """Expected values and Jacobian.

        Parameters
        ----------
        theta : (n, k) ndarray
            Parameters, window-relative coordinates.
        grid : Grid

        Returns
        -------
        mu : (n, P) ndarray
        jac : (n, k, P) ndarray
            ``jac[i, j, p] = d mu[i, p] / d theta[i, j]``.
        """
        from spotfit import _kernels

        theta = np.ascontiguousarray(theta, dtype=float)
        n, k = theta.shape
        nz, ny, nx = grid.zyx
        mu = np.empty((n, grid.size))
        jac = np.empty((n, k, grid.size))
        _kernels.evaluate(self.family, self.kernel_integ, theta, nz, ny, nx, mu, jac)
        return mu, jac

    def value(self, theta: np.ndarray, grid: Grid) -> np.ndarray:
        """Expected values only, ``(n, P)``."""
        return self.evaluate(theta, grid)[0]

    @property
    def public_names(self) -> tuple:
        """Names of the reported parameters (same as fitted by default)."""
        return self.param_names

    def public(self, theta: np.ndarray, cov: np.ndarray):
        """Reported parameters and their covariance.

        Models fitted in an internal parametrisation convert here.

        Returns
        -------
        names : tuple of str
        values : (n, k) ndarray
        cov : (n, k, k) ndarray
        """
        return self.param_names, theta, cov

    def bounds(self, grid: Grid):
        """Box constraints ``(lower, upper)``, each ``(k,)``.

        Centres may move at most one pixel beyond the window (a fit that ends
        outside its window is flagged ``left_window``), widths stay within
        ``[0.3 px, half the window size]``, intensity stays positive, the
        offset is free.
        """
        k = self.n_params
        lower = np.full(k, -np.inf)
        upper = np.full(k, np.inf)
        lower[0] = 1e-3
        shape_xyz = grid.shape[::-1]
        for j, axis in enumerate(("x", "y", "z")[: self.ndim]):
            lower[self.index(axis)] = -1.0
            upper[self.index(axis)] = shape_xyz[j]
        for name in self.width_names:
            lower[self.index(name)] = 0.3
            upper[self.index(name)] = float(max(grid.shape)) / 2.0
        return lower, upper

    # ---------------------------------------------------------------- start
    def from_moments(self, center, widths, intensity, offset):
        """Assemble ``theta`` from moment estimates.

        Parameters
        ----------
        center : (n, ndim) ndarray
            Window-relative ``x, y[, z]``.
        widths : (n, ndim) ndarray
            Sigma along ``x, y[, z]``.
        intensity, offset : (n,) ndarray
        """
        n = center.shape[0]
        theta = np.zeros((n, self.n_params))
        theta[:, 0] = intensity
        for j, axis in enumerate(("x", "y", "z")[: self.ndim]):
            theta[:, self.index(axis)] = center[:, j]
        self._set_widths(theta, widths)
        theta[:, -1] = offset
        return theta

    def _set_widths(self, theta, widths):
        raise NotImplementedError



