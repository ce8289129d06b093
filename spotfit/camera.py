"""Camera model: ADU <-> photoelectrons, and the per-pixel noise model.

A camera turns ``n`` photoelectrons into ``adu = baseline + n * em_gain / gain``
(``gain`` in photoelectrons per ADU, i.e. the inverse of the conversion gain
in ADU/e-).  spotfit calls photoelectrons "photons" as the field does (the
quantum efficiency is not modelled).

Noise model, in photons, for a pixel of expected photon count ``mu``::

    var = excess * mu + read_var

with ``excess`` = 2 for an EMCCD (``em_gain > 1``; the high-gain limit of the
EM register) and 1 otherwise, and ``read_var`` the read-noise variance in
photons squared (``(read_noise / em_gain) ** 2``).  For sCMOS cameras
``baseline``, ``gain`` and ``read_noise`` may be per-pixel maps of the frame's
shape.

Without ``gain`` the camera is *uncalibrated*: values are reported in ADU
above ``baseline`` and no photon statistics can be used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np

from spotfit.errors import SpotfitInputError

ArrayOrFloat = Union[float, np.ndarray]


#: frames of at least this many pixels are converted to photons in :data:`STRIPS` strips
#: of rows side by side (:meth:`Camera.to_photons`)
STRIP_PIXELS = 1 << 20
STRIPS = 8


@dataclass(frozen=True, eq=False)
class Camera:
    """Camera calibration.

    Parameters
    ----------
    baseline : float or (ny, nx) ndarray
        Offset added by the camera, in ADU.  Default 0.
    gain : float or (ny, nx) ndarray or None
        Photoelectrons per ADU (before EM gain).  ``None`` means unknown:
        results stay in ADU.
    em_gain : float
        Electron-multiplying gain (1 for sCMOS/CCD cameras).
    read_noise : float or (ny, nx) ndarray
        Read noise, in photoelectrons RMS (before EM gain).  Default 0.
    """

    baseline: ArrayOrFloat = 0.0
    gain: ArrayOrFloat | None = None
    em_gain: float = 1.0
    read_noise: ArrayOrFloat = 0.0

    def __post_init__(self):
        for name in ("baseline", "gain", "read_noise"):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=float)
            if not np.all(np.isfinite(arr)):
                raise SpotfitInputError(f"camera `{name}` must be finite", parameter=name)
        if self.gain is not None and np.any(np.asarray(self.gain, dtype=float) <= 0):
            raise SpotfitInputError("camera `gain` must be > 0 (photoelectrons per ADU)",
                                    parameter="gain")
        if not np.isfinite(self.em_gain) or self.em_gain < 1:
            raise SpotfitInputError("camera `em_gain` must be >= 1", parameter="em_gain")
        if np.any(np.asarray(self.read_noise, dtype=float) < 0):
            raise SpotfitInputError("camera `read_noise` must be >= 0", parameter="read_noise")

    # ------------------------------------------------------------------ info
    @property
    def calibrated(self) -> bool:
        """True when ``gain`` is known, so values can be given in photons."""
        return self.gain is not None

    @property
    def unit(self) -> str:
        """Unit of intensities and backgrounds: ``"photon"`` or ``"ADU"``."""
        return "photon" if self.calibrated else "ADU"

    @property
    def excess_noise(self) -> float:
        """Variance multiplier of the signal: 2 for an EMCCD, else 1."""
        return 2.0 if self.em_gain > 1 else 1.0

    @property
    def is_map(self) -> bool:
        """True if any calibration value is a per-pixel map (sCMOS)."""
        return any(
            np.ndim(v) > 0 for v in (self.baseline, self.gain, self.read_noise) if v is not None
        )

    def read_variance(self) -> ArrayOrFloat:
        """Read-noise variance in output units squared (photons^2 or ADU^2)."""
        rn = np.asarray(self.read_noise, dtype=float)
        if self.calibrated:
            var = (rn / self.em_gain) ** 2
        else:
            var = rn**2  # uncalibrated: read_noise is taken as ADU RMS
        return var if var.ndim else float(var)

    def as_dict(self) -> dict:
        """Scalar parameters for provenance records (maps are summarised)."""

        def summary(v):
            if v is None or np.ndim(v) == 0:
                return None if v is None else float(v)
            return f"map{tuple(np.shape(v))}"

        return {
            "baseline": summary(self.baseline),
            "gain": summary(self.gain),
            "em_gain": float(self.em_gain),
            "read_noise": summary(self.read_noise),
            "unit": self.unit,
        }

    # ------------------------------------------------------------ conversion
    def _convert(self, out, dtype) -> None:
        """``out`` (a copy of raw values, ``dtype``) minus the baseline, times the gain over
        the EM gain if calibrated, in place."""
        with np.errstate(over="ignore", invalid="ignore"):
            baseline = np.asarray(self.baseline, dtype=dtype)
            if baseline.ndim or baseline != 0:
                out -= baseline
            if self.calibrated:
                scale = np.asarray(self.gain, dtype=dtype) / dtype.type(self.em_gain)
                out *= scale

    def _to_photons_in_strips(self, adu, dtype):
        """:meth:`to_photons`' copy and conversion of a large C-ordered array with scalar
        camera values, in strips of rows on the kernel threads (elementwise: the same
        numbers), and whether all of it is finite (or not floating point); ``(None,
        None)`` for other input."""
        if type(adu) not in (np.ndarray, np.memmap) or adu.ndim < 2 or adu.size < STRIP_PIXELS \
                or not adu.flags.c_contiguous or np.ndim(self.baseline) or np.ndim(self.gain):
            return None, None
        from spotfit._jit import over_windows

        out = np.empty(adu.shape, dtype.newbyteorder("="))
        rows_in, rows_out = adu.reshape(-1, adu.shape[-1]), out.reshape(-1, adu.shape[-1])
        n = len(rows_in)
        strips = min(STRIPS, n)
        finite = np.ones(strips, bool)

        def run(first, last):
            for k in range(first, last):
                a, b = k * n // strips, (k + 1) * n // strips
                rows_out[a:b] = rows_in[a:b]
                self._convert(rows_out[a:b], dtype)
                finite[k] = out.dtype.kind != "f" or np.isfinite(rows_out[a:b]).all()

        over_windows(run, strips, threaded=True)
        return out, bool(finite.all())

    def check_shape(self, frame_shape: tuple[int, ...], source: str = "image") -> None:
        """Raise if a per-pixel map does not match ``frame_shape`` (ny, nx)."""
        for name in ("baseline", "gain", "read_noise"):
            v = getattr(self, name)
            if v is not None and np.ndim(v) > 0 and np.shape(v) != tuple(frame_shape[-2:]):
                raise SpotfitInputError(
                    f"camera `{name}` map has shape {np.shape(v)} but {source} frames are "
                    f"{tuple(frame_shape[-2:])}", parameter=name
                )

    def to_photons(self, adu: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Convert raw camera values to photons (or ADU above baseline).

        Always returns a new array: `adu` (the caller's array, a read-only
        array, or a memory map of a file) is never modified.

        Parameters
        ----------
        adu : (..., ny, nx) array_like
            Raw pixel values.
        dtype : numpy dtype
            Output float type.

        Returns
        -------
        (..., ny, nx) ndarray of ``dtype``
            ``(adu - baseline) * gain / em_gain`` if calibrated, else
            ``adu - baseline``; a new, writable array in native byte order.

        Raises
        ------
        SpotfitInputError
            If the conversion overflows `dtype` (e.g. ``gain=1e300``): the
            message names the camera values to check.
        """
        dtype = np.dtype(dtype)
        out, finite = self._to_photons_in_strips(adu, dtype)
        if out is None:
            # np.array copies (subok=False: a plain ndarray, never a view of a map)
            out = np.array(adu, dtype=dtype.newbyteorder("="), copy=True)
            self._convert(out, dtype)
            finite = out.dtype.kind != "f" or bool(np.isfinite(out).all())
        if not finite:
            if np.isfinite(np.asarray(adu, dtype=float)).all():
                raise SpotfitInputError(
                    f"the camera conversion (adu - baseline) * gain / em_gain leaves the "
                    f"{dtype.name} range ({np.finfo(dtype).max:.3g}) for some pixels: check "
                    f"`baseline` ({self.as_dict()['baseline']}), `gain` "
                    f"({self.as_dict()['gain']}) and `em_gain` ({self.em_gain:g})"
                )
        return out

    def to_adu(self, photons: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_photons` (float ADU, not rounded)."""
        out = np.asarray(photons, dtype=float)
        if self.calibrated:
            out = out * self.em_gain / np.asarray(self.gain, dtype=float)
        return out + np.asarray(self.baseline, dtype=float)


def as_camera(camera) -> Camera:
    """The :class:`Camera` that the ``camera`` argument of the API's functions means.

    Parameters
    ----------
    camera : Camera, mapping or None
        A :class:`Camera`; a mapping of its fields (``{"gain": 2, "baseline": 100}``);
        or ``None``: an uncalibrated camera (results in ADU).

    Raises
    ------
    SpotfitInputError
        For anything else, or a mapping with a name that is not a field.
    """
    if camera is None:
        return Camera()
    if isinstance(camera, Camera):
        return camera
    if isinstance(camera, Mapping):
        fields = ("baseline", "gain", "em_gain", "read_noise")
        unknown = sorted(str(name) for name in camera if name not in fields)
        if unknown:
            raise SpotfitInputError(f"camera has no field {', '.join(map(repr, unknown))} "
                                    f"(its fields: {', '.join(fields)})", parameter="camera")
        return Camera(**camera)
    raise SpotfitInputError("camera must be a spotfit.Camera or a mapping of its fields "
                            f"(baseline, gain, em_gain, read_noise), got {type(camera).__name__}",
                            parameter="camera")


#: bit depths of cameras whose images come in a wider integer type (a 12-bit camera's
#: in a 16-bit file): a frame whose largest value is ``2**n - 1`` for one of these, held
#: by two pixels side by side, is clipped there (a ceiling, not a coincidence)
CAMERA_BITS = (8, 10, 11, 12, 14, 15)


def clipped_pixels(raw):
    """Pixels a camera clipped: at the maximum of an integer pixel type, or at a camera's
    ceiling in a wider type (:data:`CAMERA_BITS`: 4095 for a 12-bit camera in a 16-bit
    file).

    Parameters
    ----------
    raw : array_like
        A frame (or a block of one) as read; float frames have no clipped pixels.

    Returns
    -------
    ndarray of bool of the frame's shape, or None if there are none
    """
    raw = np.asarray(raw)
    if raw.dtype.kind not in "ui" or raw.size == 0:
        return None
    top = int(raw.max())
    clipped = None
    if top == np.iinfo(raw.dtype).max:
        clipped = raw == top
    elif top + 1 in {2**n for n in CAMERA_BITS}:
        clipped = raw == top
        side_by_side = (clipped[..., 1:] & clipped[..., :-1]).any() or \
            (raw.ndim > 1 and (clipped[..., 1:, :] & clipped[..., :-1, :]).any())
        if not side_by_side:
            return None
    return clipped
