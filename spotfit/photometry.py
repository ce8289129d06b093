"""Intensities at known positions: traces over frames, other channels, aperture sums.

:func:`measure` is what ``spotfit measure`` runs.  Given spot positions (a
``fit`` table of another frame or channel, or any table with ``x, y[, z]``),
it measures every spot in every selected frame with its position and widths
*held*, two ways:

* **Model fit.**  With positions and widths fixed the model is linear in the
  intensities and the background (``mu = sum_k N_k g_k + b``, ``g_k`` the
  unit-intensity profile from :mod:`spotfit.models`, pixel-integrated or not
  as in ``fit``), so each (frame, window) is a small linear problem solved in
  closed form (``lsq``, ``wlsq``) or by a few reweighted steps (``mle``), all
  windows of all frames in one compiled call
  (:mod:`spotfit._photometry_kernels`), with the estimators, camera model and
  sandwich covariance of ``fit``.  Neighbours whose light reaches into a
  window are fitted jointly with the window's own spot (their profiles are
  extra columns), so overlapping spots do not inflate each other.
* **Aperture sum.**  The model-free alternative: the sum over the pixels
  within a radius ``R`` of the position, minus ``R``'s pixel count times the
  mean of a background annulus ``R + 1 < r <= 2 R + 1`` (pixels near other
  spots left out).

Neither constrains the sign of the intensity: a spot that has bleached
measures around 0, negative as often as positive, so averages over frames
stay unbiased.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import numpy as np

from spotfit import results, roi, solver
from spotfit.camera import Camera, as_camera
from spotfit.config import make_config
from spotfit.errors import SpotfitInputError
from spotfit.estimators import Noise, get_estimator
from spotfit.models import get_model

#: neighbours whose profile puts at least this fraction of their light into a
#: window are fitted jointly with the window's spot
NEIGHBOUR_LIGHT = 1e-3
#: most neighbours fitted jointly in one window (the ones with most light in it)
MAX_NEIGHBOURS = 8
#: MLE converged when no parameter moves by more than this many standard errors
MLE_TOL = 0.01
#: default aperture radius, in PSF sigmas (98.9% of a 2D Gaussian's light)
APERTURE_SIGMAS = 3.0
#: fewest annulus pixels for an aperture background
MIN_ANNULUS = 5
#: frame values gathered for one compiled call (bounds the memory of a block)
BLOCK_VALUES = 1 << 23
#: frame values from which a block of frames in memory is cast by several threads
PARALLEL_CAST = 1 << 20
#: windows used to fit the noise model of an uncalibrated camera
REGRESSION_WINDOWS = 2000
#: spots whose aperture pixels are found at once (bounds the memory of the layout)
APERTURE_CHUNK = 4096

APERTURE_STATUS = ("ok", "crowded", "truncated", "no_background")


@dataclass
class Spots:
    """Positions and widths of the spots to measure (one row per spot).

    Attributes
    ----------
    ids : (n,) int64 ndarray
        ``spot_id`` of each spot: the table's ``spot_id`` column, else its
        0-based row number.
    xyz : (n, ndim) float ndarray
        Centres ``x, y[, z]`` in px (planes for z), image coordinates.
    widths : (n, ndim) float ndarray
        ``sigma_x, sigma_y[, sigma_z]``, px (planes).
    angle : (n,) float ndarray
        Rotation of the ``sigma_x`` axis from +x towards +y, rad (0 in 3D).
    frame : (n,) int64 ndarray or None
        The ``frame`` of each row, when the table has one.
    """

    ids: np.ndarray
    xyz: np.ndarray
    widths: np.ndarray
    angle: np.ndarray
    frame: np.ndarray | None = None

    def __len__(self):
        return len(self.ids)

    def take(self, rows) -> "Spots":
        return Spots(self.ids[rows], self.xyz[rows], self.widths[rows], self.angle[rows],
                     None if self.frame is None else self.frame[rows])


# --------------------------------------------------------------------- API
def measure(image, positions, config=None, camera: Camera | None = None, *,
            frames=None, axes: str | None = None, channel=None, refine: bool = False,
            aperture: float | None = None, at_frame: int | None = None,
            match_frames: bool = False, pixel_size: float | None = None,
            z_step: float | None = None, **options):
    """Measure intensity and background at fixed positions in every selected frame.

    Parameters
    ----------
    image : str, os.PathLike, spotfit.io.Image or ndarray
        A TIFF path, an image from :func:`spotfit.read_image`, or an array
        (``(ny, nx)``, ``(T, ny, nx)`` or ``(T, nz, ny, nx)`` without ``axes``).
    positions : pandas.DataFrame, str/os.PathLike (CSV or Parquet) or (n, ndim) array_like
        Columns ``x, y`` (px) and, for z-stacks, ``z`` (planes); optionally
        ``sigma_x, sigma_y`` (px), ``angle`` (rad), ``sigma_z`` (planes) --
        e.g. a ``spotfit fit`` table -- and ``spot_id``, ``frame``.  An array
        has columns ``x, y[, z]``.  ``z`` is ignored for 2D images.
    config : spotfit.FitConfig, optional
        ``estimator``, ``integrated``, ``window``, ``max_iter``, ``min_snr``,
        ``workers`` as in ``fit``.  Widths: the table's ``sigma_*`` columns
        when present, else ``sigma`` (and ``sigma_z``); ``fix_sigma=True``
        uses ``sigma`` even when the table has widths.
    camera : Camera or mapping, optional
        A calibrated camera gives photons and allows ``wlsq`` and ``mle``
        (the default then); without, values are ADU above the baseline,
        ``lsq``, with errors from a noise model measured on the data.
    frames : None, int, str or iterable of int
        Frames to measure (0-based): all by default; a string such as
        ``"0-99,200,300-"`` (ranges inclusive, ``300-`` to the last frame).
    axes, channel : optional
        As in :func:`spotfit.read_image`; ``channel="all"`` measures every
        channel in turn.
    refine : bool
        Before measuring, fit the spots once (position, and widths unless
        ``fix_sigma``) on the sum of the selected frames
        (:func:`spotfit.fit_spots`) and hold the result: drift-free traces
        from positions more precise than any single frame's.  Spots whose fit
        does not converge keep their given position (``refined`` False).
    aperture : float, optional
        Aperture radius, px (default ``3 x`` the median lateral width); the
        background annulus spans ``R + 1 < r <= 2 R + 1``.
    at_frame : int, optional
        Use only the rows of ``positions`` whose ``frame`` is this.
    match_frames : bool
        Measure each row only in the frame given by its ``frame`` column
        (e.g. spots fitted in channel 0 of a movie, measured in channel 1 of
        the same frames).
    pixel_size, z_step : float, optional
        µm per pixel and between planes, overriding the image's metadata;
        when known, ``x_um, y_um[, z_um]`` columns are appended.
    **options
        Override fields of ``config`` (e.g. ``estimator="lsq"``).

    Returns
    -------
    pandas.DataFrame
        One row per spot and frame, sorted by ``spot_id``, ``channel``,
        ``frame``; columns in :func:`columns` (units in the README).
    """
    import pandas as pd

    from spotfit.api import as_image
    from spotfit.table import add_physical_units

    config = make_config(config, options)
    camera = as_camera(camera)
    if at_frame is not None and match_frames:
        raise SpotfitInputError("at_frame and `match_frames` cannot be combined: `at_frame` "
                                "measures the spots of one frame in every frame",
                                parameter="at_frame")
    if refine and match_frames:
        raise SpotfitInputError("refine and `match_frames` cannot be combined: refining sums "
                                "all frames, matching measures each position in one frame only",
                                parameter="refine")
    if aperture is not None and not (np.isfinite(aperture) and aperture > 0):
        raise SpotfitInputError(f"aperture must be a positive radius in px, got {aperture!r}",
                                parameter="aperture")
    if isinstance(image, np.ma.MaskedArray) and np.ma.getmaskarray(image).any():
        # the windows' pixels are chosen once for every frame: masked pixels
        # would be measured as zeros; refuse rather than bias the traces
        raise SpotfitInputError(
            "image: measure does not take masked pixels (they would be read as zeros); "
            "pass the array without a mask, or fit it with spotfit.fit, which leaves masked "
            "pixels out", parameter="image")
    if isinstance(positions, (str, os.PathLike)):  # a fit table, or any CSV / Parquet table
        from spotfit.export import read_table

        source, table = os.fspath(positions), read_table(positions)
    else:
        source, table = "positions", positions
    parts = []
    for ch in _channels(image, axes, channel):
        img = as_image(image, axes, ch)
        opened = isinstance(image, (str, os.PathLike))
        try:
            part = _measure_image(img, table, source, config, camera, frames, refine, aperture,
                                  at_frame, match_frames, 0 if ch is None else ch)
            parts.append(add_physical_units(
                part, pixel_size if pixel_size is not None else img.pixel_size,
                (z_step if z_step is not None else img.z_step) if img.is_3d else None))
        finally:
            if opened:
                img.close()
    result = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        result = result.sort_values(["spot_id", "channel", "frame"], kind="stable", ignore_index=True)
    return result


def columns(ndim: int = 2, refined: bool = False) -> list:
    """Ordered columns of a :func:`measure` table (2D or 3D)."""
    place = ["x", "y", "sigma_x", "sigma_y", "angle"] if ndim == 2 else \
        ["x", "y", "z", "sigma_x", "sigma_y", "sigma_z"]
    return (["spot_id", "frame", "channel"] + place
            + ["intensity", "intensity_err", "background", "background_err",
               "aperture_intensity", "aperture_intensity_err", "aperture_background",
               "aperture_status", "chi2_red", "iterations", "neighbours", "status", "unit"]
            + (["refined"] if refined else []))


def wide(table, value: str = "intensity"):
    """One row per spot (and channel), one column ``<value>_<frame>`` per frame.

    Parameters
    ----------
    table : pandas.DataFrame
        A :func:`measure` table.
    value : str
        The column spread over frames (e.g. ``"intensity"``,
        ``"aperture_intensity"``).

    Returns
    -------
    pandas.DataFrame
        ``spot_id, channel, x, y[, z], unit`` then ``<value>_<frame>`` in
        frame order (NaN where a spot was not measured in a frame).
    """
    import pandas as pd

    if value not in table.columns:
        raise SpotfitInputError(f"no column {value!r} to spread over frames")
    keys = ["spot_id", "channel"]
    place = [c for c in ("x", "y", "z") if c in table.columns]
    first = table.drop_duplicates(keys)[keys + place + ["unit"]].set_index(keys)
    spread = table.pivot(index=keys, columns="frame", values=value)
    spread = spread.reindex(columns=sorted(spread.columns))
    spread.columns = [f"{value}_{int(t)}" for t in spread.columns]
    out = first.join(spread).reset_index()
    if len(out) == 0:
        out = pd.DataFrame(columns=keys + place + ["unit"])
    return out


# ------------------------------------------------------------ one channel
def _channels(image, axes, channel):
    if channel != "all":
        return [channel]
    if isinstance(image, (str, os.PathLike)):
        from spotfit.io import count_channels

        n = count_channels(image, axes)
    elif axes is not None and hasattr(image, "shape"):
        letters = axes.upper()
        sizes = [s for a, s in zip(letters, np.shape(image)) if a in "CS" and s > 1]
        n = sizes[0] if sizes else 1
    else:
        n = 1
    return list(range(n)) if n > 1 else [None]


def _measure_image(img, table, source, config, camera, frames, refine, aperture, at_frame,
                   match_frames, channel):
    """:func:`measure` on one open image (one channel)."""
    ndim = 3 if img.is_3d else 2
    camera.check_shape(img.frame_shape, source=str(img.path or "image"))
    frame_ids = frame_list(frames, img.n_frames)
    spots = spots_from_table(table, ndim, img.frame_shape, config, source, at_frame, match_frames)
    ctx = _Context(config, camera, ndim)
    refined = None
    if refine and len(spots):
        spots, refined = _refine(img, frame_ids, spots, config, camera)
    if match_frames:
        if np.any((spots.frame < 0) | (spots.frame >= img.n_frames)):
            bad = int(spots.frame[(spots.frame < 0) | (spots.frame >= img.n_frames)][0])
            raise SpotfitInputError(f"{source}: frame {bad} does not exist in the image "
                                    f"({img.n_frames} frames)")
        chosen = np.isin(spots.frame, frame_ids)
        spots = spots.take(np.flatnonzero(chosen))
        groups = [(int(t), np.flatnonzero(spots.frame == t)) for t in frame_ids]
        groups = [(t, rows) for t, rows in groups if len(rows)]
    else:
        groups = [(None, np.arange(len(spots)))]
    radius = aperture if aperture is not None else APERTURE_SIGMAS * _median_width(spots, config)
    parts = []
    for t, rows in groups:
        sub = spots.take(rows)
        ids = frame_ids if t is None else [t]
        layout = _Layout(sub, img.frame_shape, ctx, radius)
        out = ctx.run(img, ids, layout)
        _finish(out, layout, ctx)
        out["neighbours"] = layout.neighbours
        out["aperture_status"] = layout.ap_status
        parts.append((rows, ids, out))
    return _table(spots, parts, ctx, channel, refined)


def frame_list(spec, n_frames: int) -> list:
    """Frames selected by ``spec`` (see :func:`measure`), sorted, validated."""
    if spec is None:
        return list(range(n_frames))
    if isinstance(spec, (int, np.integer)):
        items = [int(spec)]
    elif isinstance(spec, str):
        items = []
        for part in spec.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            try:
                a = int(lo)
                b = (int(hi) if hi else n_frames - 1) if dash else a
            except ValueError:
                raise SpotfitInputError(
                    f"frames {spec!r}: expected frame numbers and ranges such as 0-99,200,300-",
                    parameter="frames"
                ) from None
            if b < a:
                raise SpotfitInputError(f"frames {spec!r}: range {part} is empty",
                                        parameter="frames")
            items.extend(range(a, b + 1))
    else:
        items = [int(v) for v in spec]
    bad = [t for t in items if not 0 <= t < n_frames]
    if bad:
        raise SpotfitInputError(f"frames: frame {bad[0]} does not exist; the image has "
                                f"{n_frames} frame(s), 0-{n_frames - 1}", parameter="frames")
    if not items:
        raise SpotfitInputError("frames selects no frame", parameter="frames")
    return sorted(set(items))


def spots_from_table(table, ndim, frame_shape, config, source="positions", at_frame=None,
                     match_frames=False) -> Spots:
    """Validated :class:`Spots` from a positions table or array.

    Raises :class:`SpotfitInputError` for missing columns, NaN or
    non-numeric positions and widths, and positions outside the image
    (farther than half a pixel beyond the outermost pixel centres).
    """
    import pandas as pd

    axes = ("x", "y", "z")[:ndim]
    if not isinstance(table, pd.DataFrame):
        arr = np.asarray(table, dtype=float)
        if arr.ndim != 2 or arr.shape[1] not in (2, 3) or (ndim == 3 and arr.shape[1] != 3):
            raise SpotfitInputError(f"{source}: positions must be an (n, {ndim}) array of "
                                    f"{', '.join(axes)}, got shape {arr.shape}")
        table = pd.DataFrame(arr[:, :ndim], columns=list(axes))
    row_number = np.arange(len(table))
    missing = [a for a in axes if a not in table.columns]
    if missing:
        raise SpotfitInputError(
            f"{source}: no column {', '.join(missing)}; positions need columns "
            f"{', '.join(axes)} (found: {', '.join(map(str, table.columns)) or 'none'})")
    frame = None
    if at_frame is not None or match_frames:
        what = "--at-frame" if at_frame is not None else "--match-frames"
        if "frame" not in table.columns:
            raise SpotfitInputError(f"{source}: {what} needs a 'frame' column")
        frame = _numeric(table, "frame", source)
        if np.any(~np.isfinite(frame)) or np.any(frame != np.round(frame)):
            raise SpotfitInputError(f"{source}: column 'frame' must hold whole frame numbers")
        frame = frame.astype(np.int64)
        if at_frame is not None:
            keep = frame == int(at_frame)
            if not keep.any():
                raise SpotfitInputError(f"{source}: no rows with frame {at_frame}")
            table, row_number, frame = table[keep], row_number[keep], None
    xyz = np.column_stack([_numeric(table, a, source) for a in axes]) if len(table) else \
        np.zeros((0, ndim))
    _check_finite(xyz, row_number, source, "position", axes)
    shape_xyz = np.array(frame_shape[::-1], float)
    outside = np.any((xyz < -0.5) | (xyz > shape_xyz - 0.5), axis=1)
    if outside.any():
        k = int(np.argmax(outside))
        where = ", ".join(f"{a}={v:g}" for a, v in zip(axes, xyz[k]))
        size = " x ".join(str(s) for s in frame_shape[::-1])
        raise SpotfitInputError(
            f"{source}: row {row_number[k]} ({where}) is outside the image ({size} px, x by y"
            f"{' by z' if ndim == 3 else ''}); {int(outside.sum())} position(s) outside")
    widths = np.empty((len(xyz), ndim))
    angle = np.zeros(len(xyz))
    lateral = ("sigma_x", "sigma_y")
    from_table = not config.fix_sigma and all(c in table.columns for c in lateral)
    if from_table:
        widths[:, :2] = np.column_stack([_numeric(table, c, source) for c in lateral])
        if ndim == 2 and "angle" in table.columns:
            angle = _numeric(table, "angle", source)
    else:
        widths[:, :2] = config.sigma
    if ndim == 3:
        widths[:, 2] = _numeric(table, "sigma_z", source) if from_table and "sigma_z" in table.columns \
            else config.axial_sigma()
    names = ("sigma_x", "sigma_y", "sigma_z")[:ndim]
    _check_finite(widths, row_number, source, "width", names, hint="; or give `sigma`")
    if np.any(widths <= 0):
        k = int(np.argmax(np.any(widths <= 0, axis=1)))
        raise SpotfitInputError(f"{source}: row {row_number[k]} has a width <= 0; give `sigma`")
    _check_finite(angle[:, None], row_number, source, "angle", ("angle",))
    if "spot_id" in table.columns:
        ids = _numeric(table, "spot_id", source)
        if np.any(~np.isfinite(ids)) or np.any(ids != np.round(ids)):
            raise SpotfitInputError(f"{source}: column 'spot_id' must hold whole numbers")
        ids = ids.astype(np.int64)
    else:
        ids = row_number.astype(np.int64)
    return Spots(ids, xyz, widths, angle, frame)


def _numeric(table, column, source):
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(values) & table[column].notna().to_numpy()
    if bad.any():
        k = int(np.argmax(bad))
        raise SpotfitInputError(f"{source}: column {column!r} is not numeric "
                                f"(row {k}: {table[column].iloc[k]!r})")
    return values


def _check_finite(values, row_number, source, what, names, hint=""):
    bad = ~np.all(np.isfinite(values), axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        col = names[int(np.argmax(~np.isfinite(values[k])))]
        raise SpotfitInputError(f"{source}: row {row_number[k]} has no {what} ({col} is missing "
                                f"or not finite); {int(bad.sum())} such row(s){hint}")


def _median_width(spots, config):
    return float(np.median(spots.widths[:, :2])) if len(spots) else config.sigma


# -------------------------------------------------------------- refining
def _refine(img, frame_ids, spots, config, camera):
    """Fit the spots once on the sum of the frames; hold the converged fits."""
    total = None
    for t in frame_ids:
        photons = camera.to_photons(img.frame(t), dtype=np.float64)
        total = photons if total is None else total + photons
    n = len(frame_ids)
    # the sum is in photons (or ADU above baseline): a camera that converts nothing
    if camera.calibrated:
        summed = Camera(baseline=0.0, gain=camera.em_gain, em_gain=camera.em_gain,
                        read_noise=np.sqrt(n) * np.asarray(camera.read_noise, dtype=float))
    else:
        summed = Camera()
    widths = np.median(spots.widths, axis=0)
    cfg = replace(config, sigma=float(np.mean(widths[:2])),
                  sigma_z=float(widths[2]) if img.is_3d else None)
    from spotfit.api import fit_spots

    fitted = fit_spots(total, spots.xyz, config=cfg, camera=summed)
    ok = (fitted["status"] == "converged").to_numpy()
    out = spots.take(np.arange(len(spots)))
    axes = ("x", "y", "z")[: spots.xyz.shape[1]]
    out.xyz[ok] = fitted.loc[ok, list(axes)].to_numpy()
    if not config.fix_sigma:
        names = ["sigma_x", "sigma_y"] + (["sigma_z"] if img.is_3d else [])
        out.widths[ok] = fitted.loc[ok, names].to_numpy()
        if not img.is_3d:
            out.angle[ok] = fitted.loc[ok, "angle"].to_numpy()
    return out, ok


# ------------------------------------------------------------------ layout
class _Context:
    """Resolved estimator, model choice, noise model and threads of one run."""

    def __init__(self, config, camera, ndim):
        self.config = config
        self.camera = camera
        self.ndim = ndim
        est_name, self.integrated = config.choose(camera)
        self.estimator = get_estimator(est_name)
        # wlsq and mle need photons: the same error as fit's, before any work
        self.estimator.check(Noise(camera.calibrated))
        from spotfit import _photometry_kernels as kernels

        self.est_id = {"lsq": kernels.LSQ, "wlsq": kernels.WLSQ, "mle": kernels.MLE}[est_name]
        self.noise_model = None  # (alpha, beta, floor) of an uncalibrated camera, from the data
        self.workers = config.workers or os.cpu_count() or 1

    def read_var(self, frame_shape):
        """Read-noise variance (photons^2): flat per-pixel map or a 1-element array."""
        cam = self.camera
        if not cam.calibrated:
            return np.zeros(1)
        rv = np.asarray(cam.read_variance(), dtype=float)
        if rv.ndim:
            return np.ascontiguousarray(np.broadcast_to(rv, frame_shape).ravel())
        return np.array([float(rv)])

    def conversion(self, frame_shape):
        """Camera conversion ``photons = a + b * raw``: ``(a, b)``, flat maps or 1-element arrays.

        Taken from :meth:`Camera.to_photons` itself (its values at 0 and 1),
        which stays the one place the conversion is defined.
        """
        cam = self.camera
        shape = tuple(frame_shape[-2:]) if cam.is_map else (1,)
        a = cam.to_photons(np.zeros(shape), dtype=np.float64)
        b = cam.to_photons(np.ones(shape), dtype=np.float64) - a
        if not cam.is_map:
            return a.ravel(), b.ravel()
        return tuple(np.ascontiguousarray(np.broadcast_to(v, frame_shape).ravel()) for v in (a, b))

    def run(self, img, frame_ids, layout):
        """Model fits and aperture sums of ``layout`` in the frames ``frame_ids``."""
        import numba

        from spotfit import _photometry_kernels as kernels

        numba.set_num_threads(max(1, min(self.workers, numba.config.NUMBA_NUM_THREADS)))
        n = len(layout)
        n_frames = len(frame_ids)
        size = int(np.prod(img.frame_shape))
        # (spot, frame): one row per spot, the order of the output table
        out = {k: np.empty((n, n_frames)) for k in ("n", "n_var", "b", "b_var", "chi2", "ap", "bg")}
        out["iter"] = np.empty((n, n_frames), np.int32)
        out["status"] = np.empty((n, n_frames), np.int8)
        out["sat"] = np.empty((n, n_frames), np.int8)
        if n == 0 or n_frames == 0:
            return out
        rv = self.read_var(img.frame_shape)
        cam_a, cam_b = self.conversion(img.frame_shape)
        # raw values at the top of an integer pixel type are clipped: such fits are "saturated"
        # (and at a camera's ceiling in a wider type: per block of frames, below)
        clip = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else np.inf
        # frames of an image in memory whose pixel type the kernel reads are passed as they
        # are (a view: no copy, no cast, all frames in one call); others are gathered into
        # blocks of that type (uint16 as it is, any other type cast to float32)
        in_memory = _in_memory(img)
        kind = np.dtype(np.uint16) if img.dtype == np.uint16 else np.dtype(np.float32)
        direct = in_memory and img.data.dtype == kind  # native byte order too
        per_block = n_frames if direct else max(1, min(n_frames, BLOCK_VALUES // max(size, 1)))
        cfg = self.config
        block = None
        for first in range(0, n_frames, per_block):
            ids = frame_ids[first:first + per_block]
            if direct:
                block = _frame_rows(img.data, ids, size)
            else:
                if block is None or len(block) != len(ids):
                    block = np.empty((len(ids), size), dtype=kind)
                _read_frames(img, ids, block, numba.get_num_threads(), in_memory)
            if not self.camera.calibrated and self.noise_model is None:
                self.noise_model = self._fit_noise_model(block, cam_a, cam_b, layout, rv)
            ceiling = _ceiling(block, len(ids), img.frame_shape, clip)
            alpha, beta, floor = self.noise_model or (0.0, 0.0, 0.0)
            # many small chunks, handed out one at a time: a thread that the
            # machine's other work slows down does not hold the others up (on one
            # thread that only cost time: 2-15 ms a call, measured under load)
            threads = numba.get_num_threads()
            chunks = max(1, min(len(ids) * n, 64 * threads))
            with numba.parallel_chunksize(1) if threads > 1 else contextlib.nullcontext():
                kernels.measure_windows(
                    block, cam_a, cam_b, layout.pix, layout.n_valid, layout.col_ptr, layout.profiles, rv,
                    layout.box_code, layout.box_origin, layout.box_geom,
                    self.est_id, self.camera.calibrated, float(self.camera.excess_noise), alpha, beta,
                    floor, int(cfg.max_iter), MLE_TOL, ceiling, chunks, False, first,
                    *(out[k] for k in ("n", "n_var", "b", "b_var", "chi2", "iter", "status", "sat", "ap",
                                       "bg")),
                    np.zeros((0, 0, 5)))
        return out

    def _fit_noise_model(self, block, cam_a, cam_b, layout, rv):
        """``V = alpha + beta * mu`` of an uncalibrated camera, from least-squares residuals."""
        import numba

        from spotfit import _photometry_kernels as kernels

        n = len(layout)
        frames = block[: max(1, min(len(block), -(-REGRESSION_WINDOWS // n)))]
        shape = (n, len(frames))
        scratch = [np.empty(shape) for _ in range(7)]
        sums = np.zeros(shape + (5,))
        kernels.measure_windows(
            frames, cam_a, cam_b, layout.pix, layout.n_valid, layout.col_ptr, layout.profiles, rv,
            np.zeros((n, 0), np.uint8), layout.box_origin, layout.box_geom, kernels.LSQ, False, 1.0, 1.0, 0.0, 1.0, 1, MLE_TOL, np.inf,
            max(1, min(shape[0] * n, 8 * numba.get_num_threads())), True, 0, *scratch[:5],
            np.empty(shape, np.int32), np.empty(shape, np.int8), np.empty(shape, np.int8), *scratch[5:],
            sums)
        alpha, beta, floor = solver.variance_model(sums.reshape(-1, 5).sum(axis=0))[0]
        return float(alpha), float(beta), float(floor)


def _ceiling(block, n_frames, frame_shape, clip):
    """The raw value at and above which the pixels of ``block`` (rows of ``n_frames``
    frames) are clipped: a camera's ceiling in a wider integer type when one of its
    frames shows it (:func:`spotfit.camera.clipped_pixels`: 4095 for a 12-bit camera in a
    16-bit file), else ``clip`` (the pixel type's maximum, or inf)."""
    from spotfit.camera import clipped_pixels

    if block.dtype.kind not in "ui" or not np.isfinite(clip):
        return clip
    clipped = clipped_pixels(block.reshape((n_frames,) + tuple(frame_shape)))
    return clip if clipped is None else float(block.max())


def _in_memory(img):
    """Whether ``img`` is a numpy array in memory (any byte order)."""
    data = img.data
    return type(data) is np.ndarray and img.reader is None and data.dtype.newbyteorder("=") == img.dtype


def _frame_rows(data, ids, size):
    """The frames ``ids`` of an in-memory image as ``(len(ids), size)`` rows: a view for
    consecutive frames of a C-contiguous array, else a copy (same pixel type)."""
    if ids[-1] - ids[0] == len(ids) - 1:
        part = data[ids[0]:ids[-1] + 1]
    else:
        part = data[np.asarray(ids)]
    return np.ascontiguousarray(part).reshape(len(ids), size)


def _read_frames(img, ids, block, workers=1, in_memory=False):
    """Raw values of the frames ``ids`` into the rows of ``block`` (its pixel type), converted
    by the kernel where it reads them.  The frames of an image in memory are cast at once,
    by ``workers`` threads (numpy's cast does not hold the GIL)."""
    if in_memory:
        data = img.data
        if ids[-1] - ids[0] == len(ids) - 1:  # consecutive frames: a view, no copy
            part = data[ids[0]:ids[-1] + 1]
        else:
            part = data[np.asarray(ids)]
        dest = block.reshape(part.shape)
        parts = min(workers, len(ids)) if block.size >= PARALLEL_CAST else 1
        if parts <= 1:
            np.copyto(dest, part, casting="unsafe")
            return
        import threading

        edges = np.linspace(0, len(ids), parts + 1).astype(int)
        threads = [threading.Thread(target=np.copyto, args=(dest[a:b], part[a:b]),
                                    kwargs={"casting": "unsafe"})
                   for a, b in zip(edges[1:-1], edges[2:])]
        for th in threads:
            th.start()
        np.copyto(dest[:edges[1]], part[:edges[1]], casting="unsafe")
        for th in threads:
            th.join()
        return
    for k, t in enumerate(ids):
        block[k].reshape(img.frame_shape)[...] = img.frame(t)


class _Layout:
    """Windows, profiles and aperture pixels of a set of spots in one frame geometry.

    Attributes
    ----------
    pix : (n, P) int64 ndarray
        Flat frame index of each window pixel, those inside the frame first.
    n_valid : (n,) int64 ndarray
        Pixels of each window inside the frame.
    col_ptr : (n + 1,) int64 ndarray
    profiles : (C, P) float64 ndarray
        Unit profiles, pixels in the order of ``pix``: window ``i``'s own spot
        first, then its neighbours.
    neighbours : (n,) int64 ndarray
    box_code : (n, B) uint8 ndarray
        A box around each spot (the annulus' bounding box), its pixels coded
        1 in the aperture, 2 in the annulus, 0 else (and outside the frame).
    box_origin : (n, 3) int64 ndarray
        First pixel ``(x, y, z)`` of each box (``z = 0`` in 2D).
    box_geom : (9,) int64 ndarray
        Box shape, frame shape and window shape, ``(planes, rows, columns)``
        each.
    n_ap, n_bg : (n,) ndarrays
    rv_ap, rv_bg : (n,) ndarrays
        Summed read-noise variance over each spot's aperture and annulus.
    ap_status : (n,) int ndarray
        Index into :data:`APERTURE_STATUS`.
    """

    def __init__(self, spots, frame_shape, ctx, radius):
        self.spots = spots
        self.frame_shape = tuple(frame_shape)
        self.radius = float(radius)
        ndim = ctx.ndim
        widths = np.median(spots.widths, axis=0) if len(spots) else \
            np.array([ctx.config.sigma] * 2 + [ctx.config.axial_sigma()])[:ndim]
        cfg = ctx.config
        sized = replace(cfg, sigma=float(np.mean(widths[:2])),
                        sigma_z=float(widths[2]) if ndim == 3 else None)
        self.half = sized.half_size(ndim)
        # windows are cut from an image of flat indices: they give each pixel's index
        self.index = np.arange(int(np.prod(frame_shape)), dtype=np.int64).reshape(frame_shape)
        centres = np.rint(spots.xyz[:, ::-1]).astype(np.int64)
        w = roi.cut(self.index, centres, self.half, dtype=np.int64)
        self.pix, self.valid, self.origin, self.grid = w.data, w.mask, w.origin, w.grid
        self._profiles(spots, ctx)
        self._apertures(spots, ctx, widths)
        del self.index
        # the pixels inside the frame first, in every window and its profiles: the
        # compiled loops then run over the first n_valid pixels, without a test
        order = np.argsort(~self.valid, axis=1, kind="stable")
        self.pix = np.ascontiguousarray(np.take_along_axis(self.pix, order, axis=1))
        owner = np.repeat(np.arange(len(spots)), np.diff(self.col_ptr))
        self.profiles = np.ascontiguousarray(np.take_along_axis(self.profiles, order[owner], axis=1))
        self.n_valid = self.valid.sum(axis=1).astype(np.int64)

    def __len__(self):
        return len(self.spots)

    # ------------------------------------------------------------ profiles
    def _profiles(self, spots, ctx):
        """Own and neighbours' unit profiles on every window (one model call per model kind)."""
        from scipy.spatial import cKDTree

        n = len(spots)
        if n == 0:
            self.col_ptr = np.zeros(1, np.int64)
            self.profiles = np.zeros((0, self.grid.size))
            self.neighbours = np.zeros(0, np.int64)
            return
        half_xyz = np.array(self.half[::-1], float)
        centre = self.origin + half_xyz  # integer window centres (x, y[, z])
        pairs = cKDTree(centre / half_xyz).query_pairs(2.0 + 1e-9, p=np.inf, output_type="ndarray")
        own = np.concatenate([np.arange(n), pairs[:, 0], pairs[:, 1]]).astype(np.int64)
        other = np.concatenate([np.arange(n), pairs[:, 1], pairs[:, 0]]).astype(np.int64)
        g = self._evaluate(spots, own, other, ctx)
        light = np.einsum("cp,cp->c", g, self.valid[own].astype(float))
        is_self = own == other
        keep = is_self | (light >= NEIGHBOUR_LIGHT)
        own, other, g, light, is_self = own[keep], other[keep], g[keep], light[keep], is_self[keep]
        # per window: its own spot first, then neighbours by light in the window
        order = np.lexsort((-light, ~is_self, own))
        own, other, g = own[order], other[order], g[order]
        rank = np.arange(len(own)) - np.searchsorted(own, own)
        keep = rank <= MAX_NEIGHBOURS
        own, g = own[keep], g[keep]
        counts = np.bincount(own, minlength=n)
        self.col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.profiles = np.ascontiguousarray(g, dtype=float)
        self.neighbours = counts - 1

    def _evaluate(self, spots, own, other, ctx):
        """Profile of spot ``other[c]`` on window ``own[c]``'s pixels, ``(C, P)``."""
        ndim = ctx.ndim
        rel = spots.xyz[other] - self.origin[own]
        widths = spots.widths[other]
        angle = spots.angle[other]
        out = np.empty((len(own), self.grid.size))
        rotated = (angle != 0) if ndim == 2 else np.zeros(len(own), bool)
        for kind, rows in (("elliptical", np.flatnonzero(~rotated)), ("rotated", np.flatnonzero(rotated))):
            if len(rows) == 0:
                continue
            sigma = float(np.min(widths[rows, :2]))
            model = get_model(kind, ndim, ctx.integrated, sigma=sigma)
            theta = model.from_moments(rel[rows], widths[rows], np.ones(len(rows)), np.zeros(len(rows)))
            if kind == "rotated":
                c, s = np.cos(angle[rows]), np.sin(angle[rows])
                sx2, sy2 = widths[rows, 0] ** 2, widths[rows, 1] ** 2
                theta[:, model.index("var_xx")] = sx2 * c * c + sy2 * s * s
                theta[:, model.index("var_yy")] = sx2 * s * s + sy2 * c * c
                theta[:, model.index("cov_xy")] = (sx2 - sy2) * s * c
            out[rows] = model.value(theta, self.grid)
        return out

    # ----------------------------------------------------------- apertures
    def _apertures(self, spots, ctx, widths):
        """Aperture (r <= R) and annulus (R + 1 < r <= 2 R + 1) pixels of every spot.

        In 3D, distances along z are scaled by ``sigma / sigma_z`` (an
        ellipsoidal aperture shaped like the PSF).  Annulus pixels within
        ``R + 1`` of another spot are left out of its background.
        """
        from scipy.spatial import cKDTree

        n, ndim = len(spots), ctx.ndim
        R = self.radius
        outer = 2.0 * R + 1.0
        zscale = float(widths[2] / np.mean(widths[:2])) if ndim == 3 else 1.0
        reach = np.array([outer, outer, outer * zscale][:ndim])  # (x, y[, z]) in px/planes
        half = np.ceil(reach).astype(np.int64)
        shape = tuple(int(2 * h + 1) for h in half[::-1])
        centres = np.rint(spots.xyz).astype(np.int64)
        scale = np.array([1.0, 1.0, 1.0 / zscale][:ndim])
        scaled = spots.xyz * scale
        pairs = np.zeros((0, 2), np.int64)
        if n > 1:
            pairs = cKDTree(scaled).query_pairs(outer + R + 1.0, output_type="ndarray")
        a = np.concatenate([pairs[:, 0], pairs[:, 1]])
        b = np.concatenate([pairs[:, 1], pairs[:, 0]])
        gap = np.sqrt(np.sum((scaled[a] - scaled[b]) ** 2, axis=1))
        crowded = np.zeros(n, bool)
        crowded[a[gap < 2.0 * R]] = True
        order = np.argsort(a, kind="stable")
        a, b = a[order], b[order]
        rv = ctx.read_var(self.frame_shape)
        self.n_ap, self.n_bg = np.zeros(n), np.zeros(n)
        self.rv_ap, self.rv_bg = np.zeros(n), np.zeros(n)
        self.box_code = np.zeros((n, int(np.prod(shape))), np.uint8)
        self.box_origin = np.zeros((n, 3), np.int64)
        shapes = [(1,) * (3 - ndim) + tuple(shape), (1,) * (3 - ndim) + tuple(self.frame_shape)]
        shapes.append((1,) * (3 - ndim) + tuple(int(2 * h + 1) for h in self.half))
        self.box_geom = np.array(shapes[0] + shapes[1] + shapes[2], np.int64)
        from spotfit import _photometry_kernels as kernels

        origin = centres - half  # (x, y[, z])
        self.box_origin[:, :ndim] = origin
        # spot i's neighbours b[ptr[i]:ptr[i + 1]] (a is sorted): their pixels are not background
        ptr = np.searchsorted(a, np.arange(n + 1)).astype(np.int64)
        truncated = np.zeros(n, bool)
        kernels.code_boxes(origin, self.box_geom[:6], np.ascontiguousarray(spots.xyz, float), scale,
                           R * R, (R + 1.0) ** 2, outer * outer, ptr, b.astype(np.int64),
                           self.box_code, truncated)
        in_ap, in_bg = self.box_code == 1, self.box_code == 2
        self.n_ap[:], self.n_bg[:] = in_ap.sum(axis=1), in_bg.sum(axis=1)
        if len(rv) > 1:
            for first in range(0, n, APERTURE_CHUNK):  # bounded memory: (chunk, box pixels) arrays
                rows = slice(first, min(n, first + APERTURE_CHUNK))
                box = roi.cut(self.index, centres[rows, ::-1], half[::-1], dtype=np.int64)
                self.rv_ap[rows] = np.where(in_ap[rows], rv[box.data], 0.0).sum(axis=1)
                self.rv_bg[rows] = np.where(in_bg[rows], rv[box.data], 0.0).sum(axis=1)
        else:
            self.rv_ap[:], self.rv_bg[:] = self.n_ap * rv[0], self.n_bg * rv[0]
        status = np.zeros(n, np.int64)
        status[crowded] = APERTURE_STATUS.index("crowded")
        status[truncated] = APERTURE_STATUS.index("truncated")
        status[self.n_bg < MIN_ANNULUS] = APERTURE_STATUS.index("no_background")
        self.ap_status = status


def _finish(out, layout, ctx):
    """The table's values from the compiled results ``out``, in place where it can (one pass).

    Standard errors ``n_err``, ``b_err`` from the variances; ``low``: the
    intensity is not ``min_snr`` standard errors; the aperture intensity,
    its error and the annulus background, ``(n, F)`` each:
    ``I = S_ap - n_ap * S_bg / n_bg`` (sums ``S`` of pixel values over the
    ``n_ap`` aperture and ``n_bg`` annulus pixels); its variance is
    ``sum_ap v + (n_ap / n_bg)^2 sum_bg v`` with the pixel variance ``v``
    estimated from each pixel's own value: ``excess * d + read_var`` with a
    calibrated camera, ``alpha + beta * d`` (the noise model measured on the
    data) otherwise.  NaN where the spot has no background
    (``no_background``).
    """
    from spotfit import _photometry_kernels as kernels

    cam = ctx.camera
    if cam.calibrated:
        slope, base_ap, base_bg = float(cam.excess_noise), layout.rv_ap, layout.rv_bg
    else:
        alpha, beta, _ = ctx.noise_model or (0.0, 0.0, 0.0)
        slope, base_ap, base_bg = float(beta), layout.n_ap * alpha, layout.n_bg * alpha
    none = layout.ap_status == APERTURE_STATUS.index("no_background")
    ap_err = np.empty_like(out["ap"])
    low = np.empty(out["n"].shape, bool)
    kernels.finish(out["n"], out["n_var"], out["b_var"], out["ap"], out["bg"],
                   np.asarray(layout.n_ap, float), np.asarray(layout.n_bg, float),
                   np.asarray(base_ap, float), np.asarray(base_bg, float), slope, none,
                   float(ctx.config.min_snr), ap_err, low)
    out["n_err"], out["b_err"] = out.pop("n_var"), out.pop("b_var")
    out["aperture_intensity"], out["aperture_background"] = out.pop("ap"), out.pop("bg")
    out["aperture_intensity_err"], out["low"] = ap_err, low


def _repeat(a, F):
    """Each value of ``a`` ``F`` times in turn (``np.repeat``, by a broadcast copy: faster)."""
    a = np.asarray(a)
    out = np.empty((len(a), F), a.dtype)
    out[...] = a[:, None]
    return out.reshape(-1)


# ------------------------------------------------------------------- table
def _labels(codes, names):
    """A categorical column of ``names[codes]`` (cheap for millions of rows)."""
    import pandas as pd

    return pd.Categorical.from_codes(codes, categories=list(names))


def _table(spots, parts, ctx, channel, refined):
    """Long table from the per-(frame, spot) results of each group of spots."""
    import pandas as pd

    ndim = ctx.ndim
    cam = ctx.camera
    cols = columns(ndim, refined is not None)
    pieces = []
    for rows, frame_ids, out in parts:
        layout_spots = spots.take(rows)
        n, F = len(rows), len(frame_ids)
        if n == 0 or F == 0:
            continue
        flat = lambda a: np.asarray(a).ravel()  # (n, F) -> spot-major rows  # noqa: E731
        rep = lambda a: _repeat(a, F)  # noqa: E731
        data = {"spot_id": rep(layout_spots.ids), "frame": np.tile(np.asarray(frame_ids, np.int64), n),
                "channel": np.full(n * F, channel, np.int64)}
        for j, a in enumerate(("x", "y", "z")[:ndim]):
            data[a] = rep(layout_spots.xyz[:, j])
        data["sigma_x"], data["sigma_y"] = rep(layout_spots.widths[:, 0]), rep(layout_spots.widths[:, 1])
        if ndim == 2:
            data["angle"] = rep(layout_spots.angle)
        else:
            data["sigma_z"] = rep(layout_spots.widths[:, 2])
        data["intensity"], data["intensity_err"] = flat(out["n"]), flat(out["n_err"])
        data["background"], data["background_err"] = flat(out["b"]), flat(out["b_err"])
        for k in ("aperture_intensity", "aperture_intensity_err", "aperture_background"):
            data[k] = flat(out[k])
        data["aperture_status"] = _labels(rep(out["aperture_status"].astype(np.int8)), APERTURE_STATUS)
        data["chi2_red"] = flat(out["chi2"])
        data["iterations"] = flat(out["iter"])
        data["neighbours"] = rep(np.asarray(out["neighbours"], np.int64))
        status = results.judge(flat(out["status"]), np.zeros(n * F, bool), flat(out["low"]),
                               flat(out["sat"]) > 0)
        data["status"] = _labels(status, results.STATUS_NAMES)
        data["unit"] = _labels(np.zeros(n * F, np.int8), (cam.unit,))
        if refined is not None:
            data["refined"] = rep(refined[rows])
        pieces.append(pd.DataFrame(data, columns=cols, copy=False))
    if not pieces:
        empty = {c: pd.Series(dtype="float64") for c in cols}
        for c in ("spot_id", "frame", "channel", "neighbours"):
            empty[c] = pd.Series(dtype="int64")
        empty["iterations"] = pd.Series(dtype="int32")
        for c, names in (("aperture_status", APERTURE_STATUS), ("status", results.STATUS_NAMES),
                         ("unit", (cam.unit,))):
            empty[c] = _labels(np.zeros(0, np.int8), names)
        if refined is not None:
            empty["refined"] = pd.Series(dtype="bool")
        result = pd.DataFrame(empty, columns=cols)
    else:
        result = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0]
        if len(pieces) > 1:
            result = result.sort_values(["spot_id", "frame"], kind="stable", ignore_index=True)
    return result
