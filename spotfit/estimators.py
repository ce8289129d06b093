"""Estimators: how data and model are compared, apart from any model.

An estimator turns data ``d``, model values ``mu`` and a pixel mask into

* ``cost`` ``(n,)``: the objective, on a chi-square scale (sum of squared
  weighted residuals, or the Poisson deviance ``-2 log(L / L_saturated)``),
* ``e`` ``(n, P)`` and ``W`` ``(n, P)`` such that the Gauss-Newton step of
  the cost is ``(J W J^T) delta = J e`` for a Jacobian ``J`` of shape
  ``(n, k, P)``; ``J W J^T`` is the Fisher information for MLE.

The noise model is described by :class:`Noise` in the data's units: photons
when the camera is calibrated, ADU otherwise.

* ``lsq``: unweighted least squares.  Needs no noise model.
* ``wlsq``: least squares weighted by ``1 / var`` with the variance taken
  from the data (``excess * max(d, 1) + read_var``), fixed during the fit.
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
from scipy.special import xlogy

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
    """Base class; subclasses implement :meth:`prepare` and :meth:`terms`."""

    name = ""
    #: estimator id of the compiled solver (:mod:`spotfit._lm`)
    kernel_id = 0

    def kernel_inputs(self, state):
        """``(data, weights, shift, scale)`` arrays for the compiled solver."""
        d, w = state[0], state[1]
        return np.ascontiguousarray(d, float), np.ascontiguousarray(w, float), np.zeros_like(d, float), 1.0

    def prepare(self, data, mask, noise: Noise):
        """Precompute per-fit constants; returns an opaque state."""
        raise NotImplementedError

    def terms(self, state, mu):
        """Return ``cost (n,)``, ``e (n, P)``, ``W (n, P)`` at ``mu``."""
        raise NotImplementedError



class LeastSquares(Estimator):
    name = "lsq"

    def prepare(self, data, mask, noise):
        return (data, mask.astype(data.dtype))

    def terms(self, state, mu):
        d, w = state
        e = w * (d - mu)
        cost = np.einsum("np,np->n", e, d - mu)
        return cost, e, np.broadcast_to(w, mu.shape)


class WeightedLeastSquares(LeastSquares):
    name = "wlsq"

    def prepare(self, data, mask, noise):
        var = noise.excess * np.maximum(data, 1.0) + noise.read_var
        return (data, mask / var)


class PoissonMLE(Estimator):
    name = "mle"
    kernel_id = 1

    def kernel_inputs(self, state):
        dt, w, shift, scale = state
        shift = np.ascontiguousarray(np.broadcast_to(shift, dt.shape), float)
        return np.ascontiguousarray(dt, float), np.ascontiguousarray(w, float), shift, scale

    def prepare(self, data, mask, noise):
        if not noise.calibrated:
            raise SpotfitInputError(
                "--estimator mle needs photon counts: give the camera --gain "
                "(and --baseline, --em-gain), or use --estimator lsq"
            )
        shift = noise.read_var
        dt = np.maximum(data + shift, 0.0)
        scale = 1.0 / noise.excess
        return (dt, mask.astype(float), shift, scale)

    def terms(self, state, mu):
        dt, w, shift, scale = state
        mt = np.maximum(mu + shift, _MU_FLOOR)
        ratio = dt / mt
        e = (w * scale) * (ratio - 1.0)
        W = (w * scale) / mt
        dev = (mt - dt) + xlogy(dt, ratio)
        cost = 2.0 * scale * np.einsum("np,np->n", w, dev)
        return cost, e, W


_ESTIMATORS = {cls.name: cls for cls in (LeastSquares, WeightedLeastSquares, PoissonMLE)}


def get_estimator(name: str) -> Estimator:
    """Build an estimator by name (``lsq``, ``wlsq`` or ``mle``)."""
    try:
        return _ESTIMATORS[name]()
    except KeyError:
        raise SpotfitInputError(
            f"--estimator {name!r} is unknown; choose one of {', '.join(ESTIMATOR_NAMES)}"
        ) from None
