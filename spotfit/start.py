"""Starting values and noise estimates: what is known about a window or frame before fitting it.

* :func:`initial_guess` -- moment estimates of each window's spot (centre,
  widths, intensity, offset), in any model's parametrisation;
* :func:`image_noise` -- the pixel-noise variance of a frame, robustly
  (for uncalibrated data, where no camera model gives it);
* :func:`faint` -- which windows promise so little signal that the solver
  should first hold their widths.
"""

from __future__ import annotations

import numpy as np

#: moment-estimate signal-to-noise below which a fit starts with its widths held
FAINT_SNR = 25.0


#: smallest intensity a fit may take, relative to the window's data scale
#: (the sum of its pixels' magnitudes): photons and ADU of any gain alike
INTENSITY_FLOOR = 1e-6


def intensity_floor(data, mask) -> np.ndarray:
    """Smallest intensity of each window's fit, ``(n,)``: :data:`INTENSITY_FLOOR`
    times the sum of the magnitudes of its fitted pixels (a positive minimum
    for an all-zero window).  About 1e-3 photons for a typical photon window,
    and the same fraction of the data in ADU or in any other unit."""
    scale = np.einsum("np,np->n", np.abs(np.asarray(data, float)), np.asarray(mask, float))
    return np.maximum(INTENSITY_FLOOR * scale, np.finfo(float).tiny / INTENSITY_FLOOR)


def initial_guess(model, data, mask, grid, config, floor=None):
    """Starting values from moments of each window.

    Offset: mean of the valid pixels on the window's outer ring (their
    minimum if the ring is fully masked).  Intensity: sum of the positive
    excess over the offset.  Centre: centroid of that excess (the window
    centre if there is none).  Widths: second moments, clipped to
    ``[0.7, 1.5] x`` the configured sigma (the configured sigma itself with
    ``fix_sigma``).

    Parameters
    ----------
    model : spotfit.models.Model
        One emitter per window.
    data, mask : (n, P) ndarray
    grid : spotfit.models.Grid
    config : spotfit.config.FitConfig
    floor : (n,) ndarray, optional
        :func:`intensity_floor` of the windows, when the caller has it already.

    Returns
    -------
    (n, k) ndarray
        ``model``'s parameters (:meth:`~spotfit.models.Model.from_moments`).
    """
    n, P = data.shape
    coords = grid.flat()  # x, y[, z] each (P,)
    ring = np.zeros(grid.shape, bool)
    for a in range(grid.ndim):
        sl = [slice(None)] * grid.ndim
        sl[a] = 0
        ring[tuple(sl)] = True
        sl[a] = -1
        ring[tuple(sl)] = True
    ring = ring.ravel()[None, :] & mask
    n_ring = ring.sum(axis=1)
    offset = np.where(
        n_ring > 0,
        np.sum(np.where(ring, data, 0.0), axis=1) / np.maximum(n_ring, 1),
        np.min(np.where(mask, data, np.inf), axis=1),
    )
    excess = np.where(mask, np.clip(data - offset[:, None], 0.0, None), 0.0)
    total = excess.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    centre_window = (np.array(grid.shape[::-1], float) - 1) / 2
    center = np.empty((n, grid.ndim))
    widths = np.empty((n, grid.ndim))
    expected = config.widths(grid.ndim)
    for j, c in enumerate(coords):
        # einsum, not `@`: a BLAS call would leave OpenBLAS threads spinning on
        # the cores the compiled solver is about to use (measured: 2x slower solve)
        mean = np.einsum("np,p->n", excess, c) / safe
        var = np.einsum("np,p->n", excess, c * c) / safe - mean**2
        center[:, j] = np.where(total > 0, mean, centre_window[j])
        s = np.sqrt(np.clip(var, 0.0, None))
        widths[:, j] = expected[j] if config.fix_sigma else np.clip(s, 0.7 * expected[j], 1.5 * expected[j])
    intensity = np.maximum(total, intensity_floor(data, mask) if floor is None else floor)
    return model.from_moments(center, widths, intensity, offset)


def image_noise(frame, valid=None) -> float:
    """Robust pixel-noise variance of a frame (MAD of neighbour differences).

    Parameters
    ----------
    frame : (ny, nx) or (nz, ny, nx) array_like
        Photons, or ADU above baseline.
    valid : bool array_like of the frame's shape, optional
        False for pixels left out (a masked image's): only differences of two
        valid pixels count.

    Returns
    -------
    float
        Variance in the frame's units squared, from ~64 rows.
    """
    a = np.asarray(frame, dtype=np.float32)
    a = a.reshape(-1, a.shape[-1])
    step = max(1, a.shape[0] // 64)  # ~64 rows (10^4-10^5 differences) are plenty for a median
    d = np.diff(a[::step], axis=-1)
    if valid is not None:
        v = np.asarray(valid, bool).reshape(a.shape)[::step]
        d = d[v[:, 1:] & v[:, :-1]]
        if d.size == 0:
            return 0.0
    mad = float(np.median(np.abs(d - np.median(d))))
    return (1.4826 * mad) ** 2 / 2.0


def faint(model, theta0, sigma, calibrated, image_var):
    """Windows whose moment estimates promise a signal-to-noise ratio below :data:`FAINT_SNR`.

    Only these need the solver's first pass with the widths held (bright
    spots cannot collapse onto a single noisy pixel).

    Parameters
    ----------
    model : spotfit.models.Model
    theta0 : (n, k) ndarray
        Starting values.
    sigma : float
        Configured lateral PSF sigma, px.
    calibrated : bool
        Data in photons: the background variance is the offset itself.
    image_var : (n,) ndarray or float
        Otherwise: the pixel-noise variance of each window's frame
        (:func:`image_noise`).

    Returns
    -------
    (n,) bool ndarray
    """
    area = 4.0 * np.pi * sigma * sigma  # effective pixels of a spot
    if calibrated:
        var_bg = np.maximum(theta0[:, model.offset_index], 1.0)
    else:
        var_bg = np.maximum(image_var, 1e-12)
    snr = theta0[:, model.intensity_index] / np.sqrt(area * var_bg)
    return snr < FAINT_SNR
