"""Estimators: how data and model are compared, apart from any model.

An estimator prepares, from data ``d``, a pixel mask and the noise model,
the per-pixel inputs of the compiled solver (:mod:`spotfit._kernels`), which
evaluates the cost on a chi-square scale (sum of squared weighted residuals,
or the Poisson deviance ``-2 log(L / L_saturated)``) and its Gauss-Newton
normal equations; for MLE their matrix ``J W J^T`` is the Fisher
information.

The noise model is described by :class:`Noise` in the data's units: photons
when the camera is calibrated, ADU otherwise.

* ``lsq``: unweighted least squares.  Needs no noise model.
* ``wlsq``: least squares weighted by ``1 / var`` with the variance taken
  from the data (``excess * max(d, 1) + read_var``), fixed during the fit.
  Requires data in photons.
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

from spotfit.errors import SpotfitInputError

ESTIMATOR_NAMES = ("lsq", "wlsq", "mle")
_MU_FLOOR = 1e-6


@dataclass(frozen=True)
class Noise:
    """Pixel noise model ``var = excess * mu + read_var``.

    Parameters
    ----------
    calibrated : bool
        True when data are in photons (Poisson statistics apply).
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



class Estimator:
    """Base class: prepares the compiled solver's per-pixel inputs."""

    name = ""
    #: estimator id of the compiled solver (:mod:`spotfit._kernels`)
    kernel_id = 0

    def prepare(self, data, mask, noise: Noise):
        """Per-pixel inputs of the compiled solver.

        Parameters
        ----------
        data : (n, P) ndarray
            Window pixels (photons, or ADU without a calibrated camera).
        mask : (n, P) bool ndarray
        noise : Noise

        Returns
        -------
        d, w, shift : (n, P) float64 ndarrays
            Data as the cost sees it, pixel weights (0 = masked) and the
            MLE count shift.
        scale : float
            MLE excess-noise scale.
        """
        raise NotImplementedError

    def _need_photons(self, noise):
        if not noise.calibrated:
            raise SpotfitInputError(
                f"--estimator {self.name} needs photon counts: give the camera --gain "
                "(and --baseline, --em-gain), or use --estimator lsq"
            )


def _c(a):
    return np.ascontiguousarray(a, dtype=float)


class LeastSquares(Estimator):
    name = "lsq"

    def prepare(self, data, mask, noise):
        return _c(data), _c(mask), np.zeros(data.shape), 1.0


class WeightedLeastSquares(Estimator):
    name = "wlsq"

    def prepare(self, data, mask, noise):
        self._need_photons(noise)
        var = noise.excess * np.maximum(data, 1.0) + noise.read_var
        return _c(data), _c(mask / var), np.zeros(data.shape), 1.0


class PoissonMLE(Estimator):
    name = "mle"
    kernel_id = 1

    def prepare(self, data, mask, noise):
        self._need_photons(noise)
        shift = np.broadcast_to(np.asarray(noise.read_var, dtype=float), data.shape)
        d = np.maximum(data + shift, 0.0)
        return _c(d), _c(mask), _c(shift), 1.0 / noise.excess


_ESTIMATORS = {cls.name: cls for cls in (LeastSquares, WeightedLeastSquares, PoissonMLE)}


def get_estimator(name: str) -> Estimator:
    """Build an estimator by name (``lsq``, ``wlsq`` or ``mle``)."""
    try:
        return _ESTIMATORS[name]()
    except KeyError:
        raise SpotfitInputError(
            f"--estimator {name!r} is unknown; choose one of {', '.join(ESTIMATOR_NAMES)}"
        ) from None
