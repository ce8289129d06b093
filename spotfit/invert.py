"""Dark-on-light images (``--invert``): present them bright-on-dark for detection and fitting.

spotfit finds *bright* spots.  Images whose objects are darker than their
surroundings (bright-field colloids, absorbing particles) are inverted first:

* integer pixels: ``inverted = dtype_max + dtype_min - value`` — for unsigned
  types ``dtype_max - value`` (uint8: ``255 - value``), for signed types
  ``-1 - value``.  Exact, in the same pixel type, the same for every frame of
  a movie and independent of the image's content (bitwise NOT);
* floating-point pixels: ``inverted = max + min - value`` with the minimum and
  maximum of the whole image or stack, so the values keep their range.

Why not ``max + min - value`` of each frame for integers too: a per-frame
constant would make the background level jump between frames of a movie; the
dtype's constant shifts every frame alike.  Either constant only shifts the
``offset`` column: intensities, widths and positions are differences and do
not depend on it.

The noise model.  Without a camera calibration spotfit measures the noise
from the image itself (variance ``alpha + beta * signal``, fitted to the
residuals), and an inverted image is just another image to it: the values
are ADU of the inverted image (``unit`` ``ADU``), ``offset`` is its
background level and the ``_err`` columns come from the measured noise.  A
camera calibration (``--gain``) cannot be combined with ``--invert``:
converting inverted counts to photons would claim that the dark spots emit
light, with a Poisson noise model that describes the bright background
upside down.  :func:`check_camera` refuses the combination.
"""

from __future__ import annotations

import numpy as np

from spotfit.errors import SpotfitInputError
from spotfit.io import FrameStack

__all__ = ["invert_image", "check_camera", "InvertedStack", "contrast_hint"]


def check_camera(camera) -> None:
    """Refuse a calibrated camera together with inversion (see the module docstring).

    Raises
    ------
    SpotfitInputError
        When ``camera.calibrated`` (a gain was given).
    """
    if camera is not None and getattr(camera, "calibrated", False):
        raise SpotfitInputError(
            "invert cannot be combined with a camera calibration (`gain`): inverted "
            "counts are not photons, and the photon noise model would be upside down. "
            "Fit inverted images without `gain` (results in ADU of the inverted image)",
            parameter="invert",
        )


#: :func:`contrast_hint` looks at a frame whose darkest pixels lie further below its
#: median than its brightest above it (these quantiles, of up to ~16,000 pixels: a
#: few ms; bright spots, cells and Poisson noise all make the upper tail the longer) ...
HINT_TAILS = (0.001, 0.999)
#: ... in a central crop of at most this many pixels per side (a bounded cost,
#: ~20 ms; a 2048 x 2048 frame's second detection took ~0.2 s) ...
HINT_CROP = 256
#: ... (and of at most this many planes of a z-stack) ...
HINT_CROP_PLANES = 32
#: ... counting the spot-like objects at least this many times the detection
#: threshold above (bright) or below (dark) their background: objects that stand
#: out, not the faint bright rims the local background leaves around dark objects ...
HINT_CLEAR = 2.0
#: ... and names them when the crop holds at least this many clear dark ones ...
HINT_MIN_DARK = 10
#: ... and at least this many times as many as clear bright ones.  Measured at the
#: default options (sigma 1.3 px), clear dark / bright in the crop: trackpy's
#: colloids 159 / 0, dark simulated spots on light 36 / 1; the fluorescence images
#: of ``../shared/data`` (smFISH, HybISS, Terra, the time-lapse, Picasso's and
#: Spotiflow's simulations) 0 / 0-331
HINT_RATIO = 3


def contrast_hint(photons, sigma, options, found, score, inverted=False, valid=None, where=""):
    """A warning's text when a frame's clear spot-like objects are dark, not bright.

    spotfit finds bright spots; a dark-on-light image (bright-field colloids)
    read without ``invert`` gives an empty or nearly empty table, or rows on
    the bright rims the local background leaves around dark objects, and no
    clue why.  A frame whose darkest pixels lie further below its median than
    its brightest above it (:data:`HINT_TAILS`) is detected again upside down:
    the mirror ``max + min - photons`` of its central :data:`HINT_CROP` pixels
    square (:data:`HINT_CROP_PLANES` planes of a z-stack), with the noise
    measured on it and the same detection options.  When that holds at least
    :data:`HINT_MIN_DARK` objects scoring :data:`HINT_CLEAR` times the threshold
    and :data:`HINT_RATIO` times as many as the frame has there, the objects
    are darker than their background.
    For a frame that was already inverted (``inverted``) the same finding
    means the user's objects were bright: the text then says to leave
    ``invert`` out.

    Parameters
    ----------
    photons : (ny, nx) or (nz, ny, nx) ndarray
        The frame as detection saw it (photons or ADU above the baseline); not
        modified.
    sigma : float or tuple of float
        Detection sigma, px (per axis in array order for a z-stack).
    options : dict
        The other detection options (``threshold``, ``min_distance``).
    found : (n, ndim) ndarray of int
        The candidates detection found in the frame (array order).
    score : (n,) ndarray
        Their scores (signal-to-noise ratio).
    inverted : bool
        The frame is the inverse of the user's image (``invert``).
    valid : ndarray of bool, optional
        Pixels that count (a masked image's unmasked ones).
    where : str
        What the text starts with (e.g. ``"frame 0: "``).

    Returns
    -------
    str or None
    """
    from spotfit.background import estimate_noise
    from spotfit.detection import DEFAULT_THRESHOLD, find_peaks

    frame = np.asarray(photons)
    pixels = frame if valid is None else frame[valid]
    if pixels.size == 0:
        return None
    sample = pixels.ravel()[:: max(1, pixels.size // 16384)].astype(np.float32)
    low, median, high = np.quantile(sample, (HINT_TAILS[0], 0.5, HINT_TAILS[1]))
    if not median - low > high - median:
        return None
    sides = (HINT_CROP_PLANES,) * (frame.ndim - 2) + (HINT_CROP, HINT_CROP)
    crop = tuple(slice((n - min(n, m)) // 2, (n - min(n, m)) // 2 + min(n, m))
                 for n, m in zip(frame.shape, sides))
    part = frame[crop]
    mirror = np.float32(float(np.min(part)) + float(np.max(part))) - part.astype(np.float32)
    inside_valid = None if valid is None else valid[crop]
    noise = estimate_noise(mirror, sigma, inside_valid)
    coords, dark_score = find_peaks(mirror, sigma, noise=noise, **options)
    if valid is not None and len(coords):
        dark_score = dark_score[inside_valid[tuple(coords.T)]]
    clear = HINT_CLEAR * (options.get("threshold") or DEFAULT_THRESHOLD)
    start = np.array([c.start for c in crop])
    inside = np.all((found >= start) & (found < start + np.array(part.shape)), axis=1)
    bright = int(np.count_nonzero(np.asarray(score)[inside] >= clear)) if len(found) else 0
    dark = int(np.count_nonzero(dark_score >= clear))
    if dark < HINT_MIN_DARK or dark < HINT_RATIO * bright:
        return None
    size = " x ".join(str(n) for n in part.shape[-2:]) + " px" + (
        f" of {part.shape[0]} planes" if part.ndim == 3 else "")
    counts = (f"{dark} spot-like objects clearly darker than the background and {bright} "
              f"clearly brighter (at {HINT_CLEAR:g}x the detection threshold, in the central {size})")
    if inverted:
        return (f"{where}the inverted image holds {counts}: the objects look bright on a dark "
                "background in the image as stored; if they are, leave out `invert`")
    return (f"{where}{counts}: spotfit finds bright spots; if yours are dark on a light "
            "background, use `invert=True`")


def invert_image(img):
    """The same image with dark objects made bright (``dtype_max + dtype_min - value``).

    Parameters
    ----------
    img : spotfit.io.Image
        Any image (memory-mapped, read page by page, or in memory); it is not
        modified, and is read one frame at a time.

    Returns
    -------
    spotfit.io.Image
        Same axes, shape, pixel type, path, physical sizes and notes;
        ``data`` is an :class:`InvertedStack` over `img`.
    """
    import dataclasses

    return dataclasses.replace(img, data=InvertedStack(img), reader=None)


class InvertedStack(FrameStack):
    """Array-like ``(T, ...)`` view of an image with inverted pixels, read frame by frame.

    ``stack[t]`` reads frame `t` of the underlying image (through
    :meth:`spotfit.io.Image.frame`, so a memory map's pages are released
    again) and returns its inverse as a new array.  Float images need one
    pass over all frames, when the stack is made, for their minimum and
    maximum.

    Attributes
    ----------
    shape : tuple of int
    ndim : int
    dtype : numpy.dtype
    constant : int or float
        ``inverted = constant - value`` (float images); integer images use
        the exact bitwise form ``~value``, equal to
        ``dtype_max + dtype_min - value``.
    """

    def __init__(self, img):
        self._img = img
        self.shape = tuple(int(n) for n in img.data.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(img.dtype)
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            self.constant = int(info.max) + int(info.min)
        else:
            low, high = np.inf, -np.inf
            for _, frame in img.frames():
                low, high = min(low, float(frame.min())), max(high, float(frame.max()))
            self.constant = self.dtype.type(low + high)

    def _frame(self, t: int) -> np.ndarray:
        frame = self._img.frame(t)
        if self.dtype.kind in "ui":
            return np.invert(frame)
        return (self.constant - frame).astype(self.dtype, copy=False)

    def close(self) -> None:
        """Close the underlying image."""
        self._img.close()

    def __repr__(self) -> str:
        return f"InvertedStack(shape={self.shape}, dtype={self.dtype}, constant={self.constant})"
