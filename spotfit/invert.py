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

__all__ = ["invert_image", "check_camera", "InvertedStack"]


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
