"""Estimators: how data and model are compared, apart from any model.

An estimator turns data ``d``, a pixel mask and the noise model into the
compiled solver's :data:`~spotfit._kernels.Cost` (:meth:`Estimator.cost`):
per-pixel inputs of one of the kernel's cost functions, which evaluate the
cost on a chi-square scale (sum of squared weighted residuals, or the Poisson
deviance ``-2 log(L / L_saturated)``) and its Gauss-Newton normal equations;
for MLE their matrix ``J W J^T`` is the Fisher information.

Each estimator *declares* what it is (class attributes), and the rest of
spotfit asks these properties, never the name:

=====================  =====  ======  =====
property               lsq    wlsq    mle
=====================  =====  ======  =====
``needs_photons``      no     yes     yes
``weighted``           no     yes     no
``poisson``            no     no      yes
``normalised_cost``    yes    no      no
``nonnegative_offset`` no     no      yes
``bias_correctable``   no     no      yes
=====================  =====  ======  =====

The noise model is described by :class:`Noise` in the data's units: photons
when the camera is calibrated, ADU otherwise.

* ``lsq``: unweighted least squares.  Needs no noise model.
* ``wlsq``: least squares weighted by ``1 / var`` with the variance taken
  from the data, fixed during the fit: Mighell's chi-square-gamma (counts
  ``n = d / excess``; the data ``d + excess * min(n, 1)`` fitted with variance
  ``excess^2 (n + 1) + read_var``), which, unlike weights ``1 / max(d, 1)``,
  does not bias low counts low.  Requires data in photons.
* ``mle``: Poisson maximum likelihood.  Read noise enters through the
  usual shifted-Poisson approximation (``d + read_var`` is Poisson with mean
  ``mu + read_var``; Huang et al., Nat. Methods 10:653, 2013), EMCCD excess
  noise by scaling counts by ``1 / excess`` (Chao et al., 2013).  Requires
  data in photons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from spotfit import _kernels as K
from spotfit.errors import SpotfitInputError

ESTIMATOR_NAMES = ("lsq", "wlsq", "mle")


@dataclass(frozen=True)
class Noise:
    """Pixel noise model ``var = excess * mu + read_var``.

    Parameters
    ----------
    calibrated : bool
        True when data are in photons (Poisson statistics apply).  Without
        a calibration the variance is measured from the fits instead
        (:func:`spotfit.solver.covariance`).
    excess : float
        Excess-noise factor (2 for EMCCD, 1 otherwise).
    read_var : float or (n, P) ndarray
        Read-noise variance, in data units squared; per window pixel for
        sCMOS maps.
    """

    calibrated: bool = False
    excess: float = 1.0
    read_var: Union[float, np.ndarray] = 0.0

    def variance(self, mu: np.ndarray) -> np.ndarray:
        """Expected pixel variance for expected values ``mu`` (photons)."""
        return self.excess * np.maximum(mu, 0.0) + self.read_var


def _c(a):
    """C-contiguous, writeable float64 (a read-only array, e.g. a broadcast ``read_var``,
    is another type to numba: every kernel taking the cost would compile again)."""
    a = np.ascontiguousarray(a, dtype=float)
    return a if a.flags.writeable else a.copy()


class Estimator:
    """Base class: declares the estimator's properties and builds its cost."""

    name = ""
    #: the compiled cost function (:data:`spotfit._kernels.LSQ` or ``MLE``)
    kernel_cost = K.LSQ
    #: needs data in photons (a calibrated camera)
    needs_photons = False
    #: pixel weights from the data's variance
    weighted = False
    #: Poisson likelihood (its curvature is the Fisher information)
    poisson = False
    #: the cost is on the data's scale, not chi-square: convergence is measured
    #: in units of its residual variance ``cost / dof``
    normalised_cost = False
    #: the offset is a photon rate and cannot be negative (the model must stay > 0)
    nonnegative_offset = False
    #: a first-order bias correction exists (:func:`spotfit.solver.solve`)
    bias_correctable = False

    def check(self, noise: Noise) -> None:
        """Raise :class:`SpotfitInputError` if ``noise`` cannot be used."""
        if self.needs_photons and not noise.calibrated:
            raise SpotfitInputError(
                f"estimator {self.name} needs photon counts: give the camera `gain` "
                "(and `baseline`, `em_gain`), or use estimator lsq",
                parameter="estimator",
            )

    def cost(self, data, mask, noise: Noise):
        """The compiled solver's cost for these windows.

        Parameters
        ----------
        data : (n, P) ndarray
            Window pixels (photons, or ADU without a calibrated camera).
        mask : (n, P) bool ndarray
        noise : Noise

        Returns
        -------
        spotfit._kernels.Cost
            Data as the cost sees it, pixel weights (0 = masked), the MLE
            count shift and excess-noise scale.
        """
        self.check(noise)
        d, w, shift, scale = self._inputs(np.asarray(data, dtype=float), mask, noise)
        return K.Cost(int(self.kernel_cost), _c(d), _c(w), _c(shift), float(scale),
                      bool(self.normalised_cost))

    def _inputs(self, data, mask, noise):
        return data, mask, np.zeros(data.shape), 1.0


class LeastSquares(Estimator):
    name = "lsq"
    normalised_cost = True


class WeightedLeastSquares(Estimator):
    name = "wlsq"
    needs_photons = True
    weighted = True

    def _inputs(self, data, mask, noise):
        # Mighell's chi-square-gamma (ApJ 518:380, 1999): in counts n, fit n + min(n, 1)
        # with variance n + 1.  Plain data weights 1 / max(n, 1) are larger where the
        # data fall low by chance, which biases the fit low (-12% at 200 photons over
        # 1 photon/px); the shifted data and variance cancel that to within ~1% from
        # 500 photons up.  For EMCCD data the counts are d / excess.
        counts = np.maximum(data, 0.0) / noise.excess
        var = noise.excess ** 2 * (counts + 1.0) + noise.read_var
        return data + noise.excess * np.minimum(counts, 1.0), mask / var, np.zeros(data.shape), 1.0


class PoissonMLE(Estimator):
    name = "mle"
    kernel_cost = K.MLE
    needs_photons = True
    poisson = True
    nonnegative_offset = True
    bias_correctable = True

    def _inputs(self, data, mask, noise):
        shift = np.broadcast_to(np.asarray(noise.read_var, dtype=float), data.shape)
        return np.maximum(data + shift, 0.0), mask, shift, 1.0 / noise.excess


_ESTIMATORS = {cls.name: cls for cls in (LeastSquares, WeightedLeastSquares, PoissonMLE)}
assert tuple(_ESTIMATORS) == ESTIMATOR_NAMES


def get_estimator(name: str) -> Estimator:
    """Build an estimator by name (``lsq``, ``wlsq`` or ``mle``)."""
    try:
        return _ESTIMATORS[name]()
    except KeyError:
        raise SpotfitInputError(
            f"estimator {name!r} is unknown; choose one of {', '.join(ESTIMATOR_NAMES)}",
            parameter="estimator",
        ) from None
