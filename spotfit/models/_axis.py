"""One-dimensional Gaussian factors shared by the separable models.

Every separable model is ``N * prod_axis f_axis + offset``.  The per-axis
factor ``f`` is either the Gaussian density sampled at the pixel centre
(point-sampled) or its integral over the pixel (pixel-integrated, exact with
``erf``).  Both are normalised so that ``sum`` over an infinite axis is 1,
hence ``N`` is the integrated intensity.

All functions take pixel-centre coordinates ``c`` of shape ``(S,)`` shared by
every window, and per-window centres ``x0`` and widths ``s`` of shape ``(n,)``;
they return arrays of shape ``(n, S)``: the factor, its derivative with
respect to the centre and its derivative with respect to sigma.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

_SQRT2 = np.sqrt(2.0)
_INV_SQRT2PI = 1.0 / np.sqrt(2.0 * np.pi)


def point_factor(c: np.ndarray, x0: np.ndarray, s: np.ndarray):
    """Gaussian density sampled at pixel centres.

    Returns
    -------
    f, df_dx0, df_ds : (n, S) ndarray
        ``f = exp(-t^2/2) / (sqrt(2 pi) s)`` with ``t = (c - x0) / s``.
    """
    inv_s = 1.0 / s[:, None]
    t = (c[None, :] - x0[:, None]) * inv_s
    f = np.exp(-0.5 * t * t) * (_INV_SQRT2PI * inv_s)
    df_dx0 = f * t * inv_s
    df_ds = f * (t * t - 1.0) * inv_s
    return f, df_dx0, df_ds


def integrated_factor(c: np.ndarray, x0: np.ndarray, s: np.ndarray):
    """Gaussian integrated over each pixel ``[c - 1/2, c + 1/2]``.

    Returns
    -------
    f, df_dx0, df_ds : (n, S) ndarray
        ``f = Phi(b) - Phi(a)`` with ``a = (c - 1/2 - x0)/s``,
        ``b = (c + 1/2 - x0)/s`` and ``Phi`` the standard normal CDF.
    """
    inv_s = 1.0 / s[:, None]
    d = c[None, :] - x0[:, None]
    a = (d - 0.5) * inv_s
    b = (d + 0.5) * inv_s
    f = 0.5 * (erf(b / _SQRT2) - erf(a / _SQRT2))
    pa = np.exp(-0.5 * a * a) * _INV_SQRT2PI
    pb = np.exp(-0.5 * b * b) * _INV_SQRT2PI
    df_dx0 = (pa - pb) * inv_s
    df_ds = (a * pa - b * pb) * inv_s
    return f, df_dx0, df_ds


def factor(integrated: bool):
    """Return :func:`integrated_factor` or :func:`point_factor`."""
    return integrated_factor if integrated else point_factor
