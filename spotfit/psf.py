"""The PSF width of the data: ``--sigma auto``.

:func:`estimate_sigma` measures the Gaussian sigma of the point spread
function from the bright, isolated spots of an image, so that a user who
does not know it can still give detection and fitting the right width:

1. Detect candidates with the current guess of sigma (first
   ``DEFAULT_START`` px) and keep the bright, isolated ones: score at least
   ``MIN_SCORE``, no other candidate within ``ISOLATION`` sigmas (nor closer
   than 5 px), the window inside the image laterally; at most
   ``max_spots`` of them, the brightest, gathered over the first frames.
2. Fit each with a round (2D) or axis-aligned (3D) pixel-integrated
   Gaussian, width free, in a window of 3 sigmas.
3. The new guess is the median width of the fits that converged with a
   relative width error below ``MAX_RELATIVE_ERROR``; repeat from 1 until
   the guess changes by less than 2 % (at most ``ROUNDS`` rounds: a guess
   far from the truth changes which spots are detected and how large the
   windows are).

The width is the sigma of the Gaussian PSF itself (pixel integration is
modelled, so it is not widened by the pixel size): the value ``--sigma``
expects.  Spots that are not point-like (aggregates, out-of-focus blobs)
widen the estimate only if they are the majority of the bright isolated
spots: the median ignores the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotfit.errors import SpotfitInputError

__all__ = ["estimate_sigma", "PSFEstimate"]

#: first guess of sigma, px
DEFAULT_START = 1.5
#: candidates with a lower detection score are not used
MIN_SCORE = 10.0
#: no other candidate within this many sigmas of a spot used
ISOLATION = 4.0
#: fits whose width error exceeds this fraction of the width are not used
MAX_RELATIVE_ERROR = 0.1
#: fewest spots needed
MIN_SPOTS = 5
#: rounds of detection and fitting at most
ROUNDS = 5


@dataclass(frozen=True)
class PSFEstimate:
    """Result of :func:`estimate_sigma`.

    Attributes
    ----------
    sigma : float
        Lateral PSF sigma, px (median over the spots used).
    sigma_z : float or None
        Axial PSF sigma, planes (z-stacks only).
    n_spots : int
        Spots whose widths were used.
    spread : float
        Half the interquartile range of their lateral widths, px (how much
        the widths vary from spot to spot; the median's own uncertainty is
        about ``1.9 * spread / sqrt(n_spots)``).
    rounds : int
        Rounds of detection and fitting.
    """

    sigma: float
    sigma_z: float | None
    n_spots: int
    spread: float
    rounds: int

    def describe(self) -> str:
        """One line for a log: the estimate and what it rests on."""
        z = f", sigma_z {self.sigma_z:.3g} planes" if self.sigma_z is not None else ""
        return (f"sigma auto: {self.sigma:.3g} px{z} from {self.n_spots} bright isolated spots "
                f"(widths vary by +-{self.spread:.2g} px)")


def estimate_sigma(image, camera=None, *, axes=None, channel=None, start=None, max_spots=300,
                   max_frames=200) -> PSFEstimate:
    """Estimate the PSF sigma from the bright isolated spots of an image.

    Parameters
    ----------
    image : str, os.PathLike, spotfit.io.Image or array_like
        A TIFF path, an image, or an array (``(ny, nx)``, ``(T, ny, nx)``,
        ``(T, nz, ny, nx)``, or any layout with `axes`).
    camera : Camera or mapping, optional
        The camera calibration (its noise model sets the detection
        threshold; without one the noise is measured on each frame).
    axes, channel : optional
        As for :func:`spotfit.read_image` / :meth:`spotfit.io.Image.from_array`.
    start : float, optional
        First guess of sigma, px (default ``DEFAULT_START``).
    max_spots : int
        Most spots fitted per round (the brightest).
    max_frames : int
        Most frames searched for spots.

    Returns
    -------
    PSFEstimate

    Raises
    ------
    SpotfitInputError
        If fewer than ``MIN_SPOTS`` usable spots are found.
    """
    from spotfit.camera import as_camera

    camera = as_camera(camera)
    img, close = _open(image, axes, channel)
    try:
        ndim = 3 if img.is_3d else 2
        sigma = float(start) if start is not None else DEFAULT_START
        sigma_z = 2.0 * sigma if ndim == 3 else None
        if not (math.isfinite(sigma) and sigma > 0):
            raise SpotfitInputError(f"start must be > 0 px, got {start!r}")
        used = np.zeros(0)
        for rounds in range(1, ROUNDS + 1):
            widths, axial = _round(img, camera, sigma, sigma_z, ndim, max_spots, max_frames)
            for _ in range(2 if rounds == 1 else 0):  # a first guess far too small splits
                if len(widths) >= MIN_SPOTS:          # spots into several close maxima:
                    break                             # try twice, four times as wide
                sigma, sigma_z = 2 * sigma, (2 * sigma_z if sigma_z else None)
                widths, axial = _round(img, camera, sigma, sigma_z, ndim, max_spots, max_frames)
            if len(widths) < MIN_SPOTS:
                raise SpotfitInputError(
                    f"the PSF width could not be measured: {len(widths)} bright isolated spots "
                    f"fit well (needs {MIN_SPOTS}); give `sigma`", parameter="sigma")
            new = float(np.median(widths))
            new_z = float(np.median(axial)) if ndim == 3 else None
            done = abs(new - sigma) < 0.02 * sigma and (ndim == 2 or abs(new_z - sigma_z) < 0.02 * sigma_z)
            sigma, sigma_z, used = new, new_z, widths
            if done:
                break
        q1, q3 = np.percentile(used, [25.0, 75.0])
        return PSFEstimate(sigma=sigma, sigma_z=sigma_z, n_spots=len(used), spread=0.5 * float(q3 - q1),
                           rounds=rounds)
    finally:
        if close:
            img.close()


def _open(image, axes, channel):
    """An open :class:`spotfit.io.Image` and whether this function opened it."""
    import os

    from spotfit.io import Image, read_image

    if isinstance(image, Image):
        return image, False
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, axes=axes, channel=channel), True
    arr = np.asarray(image)
    if axes is None:
        axes = {2: "YX", 3: "TYX", 4: "TZYX"}.get(arr.ndim)
        if axes is None:
            raise SpotfitInputError(f"cannot read an array of shape {arr.shape} without axes")
    return Image.from_array(arr, axes, channel=channel), False


def _round(img, camera, sigma, sigma_z, ndim, max_spots, max_frames):
    """Widths (lateral, axial) of the bright isolated spots found with the current guess."""
    from spotfit.background import NoiseModel
    from spotfit.detection import find_peaks
    from spotfit.api import fit_spots

    noise = NoiseModel.from_camera(camera) if camera.calibrated else None
    det_sigma = (sigma_z, sigma, sigma) if ndim == 3 else sigma
    half = max(2, int(math.ceil(3.0 * sigma)))
    radius = max(ISOLATION * sigma, 5.0)
    found = []  # (score, frame index, position x, y[, z], raw frame)
    n = 0
    for t, frame in img.frames():
        if t >= max_frames:
            break
        photons = camera.to_photons(frame)
        coords, score = find_peaks(photons, det_sigma, noise=noise)
        if len(coords) == 0:
            continue
        ok = score >= MIN_SCORE
        # isolated from every other candidate (also the dim ones)
        if len(coords) > 1:
            from scipy.spatial import cKDTree

            lateral = coords[:, -2:].astype(float)
            d, _ = cKDTree(lateral).query(lateral, k=2)
            ok &= d[:, 1] > radius
        # the whole window inside the frame laterally (a z-stack's windows
        # may be cut by its first and last planes: fits handle that)
        ny, nx = photons.shape[-2:]
        ok &= (coords[:, -2] >= half) & (coords[:, -2] <= ny - 1 - half)
        ok &= (coords[:, -1] >= half) & (coords[:, -1] <= nx - 1 - half)
        for c, s in zip(coords[ok], score[ok]):
            found.append((float(s), t, c[::-1].astype(float)))
        n += int(ok.sum())
        if n >= 4 * max_spots:
            break
    found.sort(key=lambda f: -f[0])
    found = found[:max_spots]
    if not found:
        return np.zeros(0), np.zeros(0)
    widths, axial = [], []
    model = "elliptical" if ndim == 3 else "symmetric"
    by_frame = {}
    for s, t, pos in found:
        by_frame.setdefault(t, []).append(pos)
    for t, positions in sorted(by_frame.items()):
        frame = img.frame(t) if hasattr(img, "frame") else None
        table = fit_spots(frame, np.asarray(positions), camera=camera, sigma=sigma,
                          sigma_z=sigma_z, model=model, integrated=True, window=half)
        good = table["status"].to_numpy() == "converged"
        sx, sy = table["sigma_x"].to_numpy(), table["sigma_y"].to_numpy()
        err = np.hypot(table["sigma_x_err"].to_numpy(), table["sigma_y_err"].to_numpy())
        good &= np.isfinite(err) & (err < MAX_RELATIVE_ERROR * np.sqrt(sx * sy))
        # a width at its bound is not a measurement
        good &= (np.minimum(sx, sy) > 0.31) & (np.maximum(sx, sy) < 0.99 * half)
        widths.append(np.sqrt(sx * sy)[good])
        if ndim == 3:
            axial.append(table["sigma_z"].to_numpy()[good])
    return np.concatenate(widths), (np.concatenate(axial) if ndim == 3 else np.zeros(0))
