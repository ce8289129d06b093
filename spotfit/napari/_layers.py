"""spotfit tables as napari points layers (layer data only: napari is not imported).

A points layer's coordinates are in array order of the image it belongs to:
``(t, y, x)`` for 2D fits and ``(t, z, y, x)`` for z-stacks, with ``t`` the
table's ``frame`` (0-based), ``z``, ``y``, ``x`` in pixels (0-based pixel
centres: napari puts pixel ``i`` of an image at coordinate ``i`` too, so the
points sit on the spots of the image opened beside them).  Every column of
the table becomes a point property (``features``); the face colour shows the
``status`` (:data:`STATUS_COLOURS`), the point size is four widths
(``4 * sqrt(sigma_x * sigma_y)``, the spot's ~2-sigma disc).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["STATUS_COLOURS", "table_to_points", "get_reader", "read_tables", "fit_to_points"]

#: status -> RGBA face colour of its points (alpha 0.6).
STATUS_COLOURS = {
    "converged": (0.10, 0.85, 0.25, 0.6),
    "low_signal": (1.00, 0.85, 0.10, 0.6),
    "left_window": (1.00, 0.50, 0.00, 0.6),
    "max_iterations": (0.85, 0.20, 0.85, 0.6),
    "singular": (1.00, 0.10, 0.10, 0.6),
    "not_spot": (0.55, 0.35, 1.00, 0.6),
}
#: Colour of a status not listed above (and of detection tables without status).
OTHER_COLOUR = (0.30, 0.70, 1.00, 0.6)

# Columns that identify a spotfit table (fit or detection).
_NEEDED = ("frame", "x", "y")


def table_to_points(table, name: str = "spots", channel: int | None = None) -> tuple:
    """A napari ``LayerDataTuple`` ``(data, kwargs, "points")`` for a spotfit table.

    Parameters
    ----------
    table : pandas.DataFrame
        A spotfit fit or detection table (``frame``, ``x``, ``y``, optional
        ``z``, ``sigma_x``, ``sigma_y``, ``status``, ...).
    name : str
        Layer name.
    channel : int, optional
        Keep only this channel of a ``--channel all`` table.

    Returns
    -------
    tuple
        ``data``: (N, 3) ``(t, y, x)`` or (N, 4) ``(t, z, y, x)`` float
        array; ``kwargs``: ``name``, ``features`` (every column, as a
        DataFrame), ``face_color`` (N, 4) RGBA, ``size`` (N,), ``ndim``;
        ``"points"``.
    """
    if channel is not None and "channel" in table.columns:
        table = table[table["channel"] == channel]
    table = table.reset_index(drop=True)
    axes = ["frame"] + (["z"] if "z" in table.columns else []) + ["y", "x"]
    data = table[axes].to_numpy(dtype=float).reshape(len(table), len(axes))
    if "status" in table.columns:
        colours = np.array([STATUS_COLOURS.get(str(s), OTHER_COLOUR) for s in table["status"]],
                           dtype=float).reshape(len(table), 4)
    else:
        colours = np.tile(np.array(OTHER_COLOUR), (len(table), 1))
    if {"sigma_x", "sigma_y"} <= set(table.columns):
        with np.errstate(invalid="ignore"):
            size = 4.0 * np.sqrt(table["sigma_x"].to_numpy(float) * table["sigma_y"].to_numpy(float))
        size = np.where(np.isfinite(size) & (size > 0), size, 5.0)
    else:
        size = np.full(len(table), 5.0)
    kwargs = {
        "name": name,
        "features": table,
        "face_color": colours,
        "size": size,
        "ndim": len(axes),
    }
    return data, kwargs, "points"


def _is_spotfit_table(path: str) -> bool:
    """True when the file's columns are those of a spotfit table."""
    try:
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
        else:
            with open(path, encoding="utf-8") as fh:
                names = fh.readline().strip().split(",")
    except Exception:  # not ours: another reader may take it
        return False
    return all(c in names for c in _NEEDED) and (
        "status" in names or "score" in names
    )


def get_reader(path):
    """npe2 reader hook: a reader function for spotfit tables, else None.

    Parameters
    ----------
    path : str or list of str
        What napari asks about (one file or several).

    Returns
    -------
    callable or None
        :func:`read_tables` when every path is a spotfit CSV or Parquet
        table, so napari tries other readers for any other CSV.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    paths = [os.fspath(p) for p in paths]
    if not paths or not all(os.path.isfile(p) and _is_spotfit_table(p) for p in paths):
        return None
    return read_tables


def read_tables(path) -> list:
    """Read spotfit tables into points layers (one per file; per channel for ``--channel all``)."""
    from spotfit.export import read_table

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        table = read_table(p)
        stem = os.path.splitext(os.path.basename(os.fspath(p)))[0]
        if "channel" in table.columns and table["channel"].nunique() > 1:
            for c in sorted(int(c) for c in table["channel"].unique()):
                layers.append(table_to_points(table, f"{stem} channel {c}", channel=c))
        else:
            layers.append(table_to_points(table, stem))
    return layers


def fit_to_points(data, *, axes: str | None = None, channel: int | None = None,
                  sigma: float = 1.3, threshold: float | None = None,
                  baseline: float = 0.0, gain: float | None = None, em_gain: float = 1.0,
                  read_noise: float = 0.0, invert: bool = False, model: str = "rotated",
                  name: str = "image", rgb: bool = False) -> tuple:
    """Fit an image layer's data with :func:`spotfit.fit`; return a points ``LayerDataTuple``.

    What the widget runs (it only collects the options and the layer).

    Parameters
    ----------
    data : array_like
        The image layer's data, e.g. (Y, X), (T, Y, X), (T, Z, Y, X), or
        (Y, X, 3) for an RGB layer.
    axes : str, optional
        Axes of `data` (as ``--axes``); default: ``YX``, ``TYX``, ``TZYX``
        by dimension, ``YXS`` / ``TYXS`` for an RGB layer.  A 3D layer of
        a z-stack needs ``axes="ZYX"``.
    channel : int, optional
        Channel (colour sample of an RGB layer) to fit.
    sigma, threshold, baseline, gain, em_gain, read_noise, invert, model
        As the command-line options of ``spotfit fit``; ``gain`` None (or
        0) means no camera calibration (values in ADU).
    name : str
        Name of the image layer (the points layer is ``"<name> spots"``).
    rgb : bool
        The layer is an RGB(A) image (napari's ``layer.rgb``).

    Returns
    -------
    tuple
        As :func:`table_to_points`; with a single (non-time) image the
        points are still ``(t, y, x)`` with ``t = 0``.
    """
    import spotfit
    from spotfit.camera import Camera

    array = np.asarray(data)
    if axes is None and rgb:
        axes = "YXS" if array.ndim == 3 else "TYXS"
        if channel is None:
            channel = 0
    camera = Camera(baseline=baseline, gain=gain or None, em_gain=em_gain,
                    read_noise=read_noise)
    options = {"sigma": sigma, "model": model}
    if threshold is not None:
        options["threshold"] = threshold
    table = spotfit.fit(array, camera=camera, axes=axes, channel=channel, invert=invert,
                        **options)
    points = table_to_points(table, f"{name} spots")
    stored = axes.upper() if axes is not None else {2: "YX", 3: "TYX", 4: "TZYX"}[array.ndim]
    if "T" not in stored:  # one image or one z-stack: points without the frame coordinate
        data, kwargs, kind = points
        points = (data[:, 1:], {**kwargs, "ndim": kwargs["ndim"] - 1}, kind)
    return points
