"""The model contract and the window grid every model is evaluated on.

A model maps per-window parameters ``theta`` of shape ``(n, k)`` to expected
pixel values ``mu`` of shape ``(n, P)`` and their Jacobian ``jac`` of shape
``(n, k, P)`` (parameter-major, so that each row ``jac[:, j]`` is contiguous),
where ``P`` is the number of pixels of one window.  Coordinates in ``theta``
are *window-relative*: 0 is the centre of the window's first pixel along that
axis.  :mod:`spotfit.roi` owns the conversion to image coordinates.

The contract (what the rest of spotfit relies on, and nothing else)
-------------------------------------------------------------------
A model class declares

* ``param_names``: the fitted parameters, in the order of its compiled
  kernel (:mod:`spotfit._kernels`, ``family``);
* its **roles**, by parameter name: the intensity (integrated signal above
  the offset, ``"intensity"``), the centre (``"x"``, ``"y"`` [, ``"z"``]),
  the widths (``width_names``: bounded to ``[0.3 px, window / 2]`` and held
  by ``fix_sigma``), the offset (background per pixel, ``"offset"``);
  a model of several emitters (:attr:`Model.n_emitters`) has one intensity
  and centre per emitter (:meth:`Model.emitter_index`);
* what it **reports** (:meth:`Model.public`): ``public_names``, and among
  them ``axis_widths``, the Gaussian sigma along x, y [, z] (the
  ``sigma_x, sigma_y, sigma_z`` output columns) and ``angle_name``;
* its **normalisation**: the model integrates to its intensity, and
  :meth:`Model.peak` gives the peak density (the ``amplitude`` column) and
  its gradient with respect to the public parameters;
* how to **start**: :meth:`Model.from_moments` (centre, widths, intensity,
  offset from window moments).

``tests/test_models.py`` checks every registered model against its kernel:
the Jacobian against numerical derivatives, and the declared roles
(intensity linear, offset constant, centre a shift, axis widths the second
moments, ``peak`` the density at the centre).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_AXES = ("x", "y", "z")


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
    """Base class of the model contract (see the module docstring).

    Subclasses set the class attributes; a model whose reported
    parametrisation differs from the fitted one overrides :meth:`public`, a
    model with other widths :meth:`_set_widths`.
    """

    #: short name used by ``model=`` / ``--model``
    name: str = ""
    #: kernel family code (:mod:`spotfit._kernels`)
    family: int = -1
    #: spatial dimensions (2 or 3)
    ndim: int = 2
    #: fitted parameter names, in kernel order
    param_names: tuple = ()
    #: names of the fitted width parameters (bounds and ``fix_sigma``)
    width_names: tuple = ()
    #: reported parameter names (:meth:`public`); None: ``param_names``
    public_names: tuple | None = None
    #: public names of the Gaussian sigma along x, y [, z]
    axis_widths: tuple = ()
    #: public name of the rotation angle (radians), if the model has one
    angle_name: str | None = None
    #: emitters in one window (crowded-field groups have several)
    n_emitters: int = 1

    def __init__(self, integrated: bool = False, quadrature: int = 3):
        self.integrated = bool(integrated)
        self.quadrature = int(quadrature)
        if self.public_names is None:
            self.public_names = self.param_names

    def __repr__(self):
        kind = "integrated" if self.integrated else "point-sampled"
        return f"<{type(self).__name__} {self.name!r} {kind}>"

    # ---------------------------------------------------------------- roles
    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def index(self, name: str) -> int:
        return self.param_names.index(name)

    def emitter_index(self, i: int, role: str) -> int:
        """Index of ``role`` (``"intensity"``, ``"x"``, ``"y"``, ``"z"``) of emitter ``i``."""
        if i != 0:
            raise IndexError(f"{self!r} has one emitter")
        return self.index(role)

    @property
    def intensity_index(self) -> int:
        """Index of the (first emitter's) intensity."""
        return self.emitter_index(0, "intensity")

    @property
    def center_index(self) -> tuple:
        """Indices of the (first emitter's) ``x``, ``y`` (and ``z``)."""
        return tuple(self.emitter_index(0, a) for a in _AXES[: self.ndim])

    @property
    def offset_index(self) -> int:
        return self.index("offset")

    @property
    def width_mask(self) -> np.ndarray:
        """``(k,)`` bool, True for the width parameters."""
        return np.isin(self.param_names, self.width_names)

    @property
    def linear(self) -> bool:
        """``mu = N g(others) + offset`` in its one intensity ``N`` (one emitter)."""
        return self.n_emitters == 1

    @property
    def kernel_integ(self) -> int:
        """The kernels' ``integ`` code: 0 point-sampled, else quadrature order."""
        return self.quadrature if self.integrated else 0

    def kernel(self, grid: Grid):
        """The compiled kernel's description of this model on ``grid``.

        Returns
        -------
        spotfit._kernels.KernelModel
        """
        from spotfit import _kernels as K

        wx = wy = wz = -1
        if self.family == K.SEPARABLE:  # width index along x, y[, z] (shared if equal)
            w = [self.index(n) for n in self.axis_widths]
            wx, wy = w[0], w[1]
            wz = w[2] if self.ndim == 3 else -1
        nz, ny, nx = grid.zyx
        return K.KernelModel(int(self.family), int(self.kernel_integ), int(self.n_emitters), wx, wy, wz,
                             int(self.intensity_index), int(self.offset_index), int(self.linear), nz, ny, nx,
                             0, 0, 0, 0, nz, ny, nx)

    # ------------------------------------------------------------- values
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
        from spotfit._jit import over_windows

        theta = np.ascontiguousarray(theta, dtype=float)
        n, k = theta.shape
        mu = np.empty((n, grid.size))
        jac = np.empty((n, k, grid.size))
        km = self.kernel(grid)
        over_windows(_kernels.evaluate, n, _kernels.model_for(km), km, theta, mu, jac)
        return mu, jac

    def value(self, theta: np.ndarray, grid: Grid) -> np.ndarray:
        """Expected values only, ``(n, P)`` (as :meth:`evaluate`, without storing the Jacobian)."""
        from spotfit import _kernels
        from spotfit._jit import over_windows

        theta = np.ascontiguousarray(theta, dtype=float)
        mu = np.empty((theta.shape[0], grid.size))
        km = self.kernel(grid)
        over_windows(_kernels.values, theta.shape[0], _kernels.model_for(km), km, theta, mu)
        return mu

    # ------------------------------------------------------------ reporting
    def public(self, theta: np.ndarray, cov: np.ndarray):
        """Reported parameters and their covariance.

        Models fitted in an internal parametrisation convert here.

        Returns
        -------
        names : tuple of str
        values : (n, k) ndarray
        cov : (n, k, k) ndarray
        """
        return self.public_names, theta, cov

    def peak(self, names, values: np.ndarray):
        """Peak density of each spot and its gradient.

        A Gaussian normalised to integrate to ``N``:
        ``N / ((2 pi)^(d/2) prod_axes sigma_axis)`` (per pixel in 2D, per
        voxel in 3D), with the sigma along each axis from ``axis_widths``.

        Parameters
        ----------
        names : tuple of str
            Public parameter names (from :meth:`public`).
        values : (n, k) ndarray
            Public parameter values.

        Returns
        -------
        amplitude : (n,) ndarray
        gradient : (n, k) ndarray
            ``d amplitude / d values``.
        """
        n = len(values)
        norm = np.full(n, (2.0 * np.pi) ** (self.ndim / 2.0))
        powers = {}
        for name in self.axis_widths:
            j = names.index(name)
            powers[j] = powers.get(j, 0.0) + 1.0
        for j, power in powers.items():
            norm = norm * values[:, j] ** power
        i = names.index("intensity")
        with np.errstate(divide="ignore", invalid="ignore"):
            amp = values[:, i] / norm
            grad = np.zeros_like(values)
            grad[:, i] = 1.0 / norm
            for j, power in powers.items():
                grad[:, j] = -power * amp / values[:, j]
        return amp, grad

    def bounds(self, grid: Grid):
        """Box constraints ``(lower, upper)``, each ``(k,)``.

        Centres may move at most one pixel beyond the window (a fit that ends
        outside its window is flagged ``left_window``), widths stay within
        ``[0.3 px, half the window size]``, intensities stay positive, the
        offset is free.
        """
        k = self.n_params
        lower = np.full(k, -np.inf)
        upper = np.full(k, np.inf)
        shape_xyz = grid.shape[::-1]
        for i in range(self.n_emitters):
            lower[self.emitter_index(i, "intensity")] = 1e-3
            for j, axis in enumerate(_AXES[: self.ndim]):
                lower[self.emitter_index(i, axis)] = -1.0
                upper[self.emitter_index(i, axis)] = shape_xyz[j]
        for name in self.width_names:
            lower[self.index(name)] = 0.3
            upper[self.index(name)] = float(max(grid.shape)) / 2.0
        return lower, upper

    # ---------------------------------------------------------------- start
    def from_moments(self, center, widths, intensity, offset):
        """Assemble ``theta`` from moment estimates (one emitter per window).

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
        theta[:, self.intensity_index] = intensity
        for j, index in enumerate(self.center_index):
            theta[:, index] = center[:, j]
        self._set_widths(theta, widths)
        theta[:, self.offset_index] = offset
        return theta

    def _set_widths(self, theta, widths):
        """Fill the width parameters from sigma along ``x, y[, z]`` ``(n, ndim)``.

        Default: each fitted width is the sigma of the axis it stands for in
        ``axis_widths``, or the geometric mean of the two it is shared by.
        """
        for name in self.width_names:
            axes = [j for j, w in enumerate(self.axis_widths) if w == name]
            if len(axes) == 1:
                theta[:, self.index(name)] = widths[:, axes[0]]
            else:
                theta[:, self.index(name)] = np.sqrt(widths[:, axes[0]] * widths[:, axes[1]])
