"""Quality-control pictures: an image with its fitted spots drawn on it.

:func:`show` makes a matplotlib :class:`~matplotlib.figure.Figure` (no
pyplot, no display needed: Agg) of one frame, or the maximum projection over
time and z, contrast-stretched by percentiles, with one ellipse per fit at
its position and size (semi-axes ``ELLIPSE_SIGMAS`` x ``sigma_x`` and
``sigma_y``, rotated by ``angle``), coloured by status (:data:`STATUS_COLOURS`)
with a legend of counts, or by z / frame with a colour bar.  :func:`save`
writes a figure atomically; :func:`write_qc` does both (``spotfit fit --qc``
and ``spotfit show``).

Pixel-exact: the image is drawn with ``extent`` so that pixel centres lie at
integer data coordinates, x = column, y = row, 0-based (the package's
convention), with row 0 at the top; an ellipse is centred at ``(x, y)`` of
its fit.  ``angle`` (radians, from +x towards +y) is applied in these data
coordinates, so it appears clockwise on screen, as in the README.  With an
integer ``zoom`` every image pixel is ``zoom x zoom`` pixels of the PNG.

matplotlib is imported inside the functions, never at module import.
"""

from __future__ import annotations

import math
import os

import numpy as np

from spotfit.errors import SpotfitInputError

__all__ = ["ELLIPSE_SIGMAS", "STATUS_COLOURS", "parse_crop", "save", "show", "write_qc"]

#: Ellipse semi-axes in units of the fitted sigmas (2 sigma: the ellipse
#: surrounds the spot instead of hiding its core).
ELLIPSE_SIGMAS = 2.0

#: Edge colour of each status; spots of a table without ``status`` (e.g.
#: ``spotfit detect`` candidates) are drawn in ``"spot"``'s colour.
STATUS_COLOURS = {
    "converged": "#2bff2b",
    "low_signal": "#ffd21a",
    "left_window": "#29b6ff",
    "max_iterations": "#ff4df5",
    "singular": "#ff3b30",
    "not_spot": "#8c5aff",
    "spot": "#ff9f1a",
}
_OTHER_COLOUR = "#ffffff"

#: Colormap for colouring by z or frame (bright at both ends: visible on grey).
VALUE_CMAP = "cool"

_DPI = 100
_TITLE_PX = 26
_LEGEND_PX = 180
_MIN_HEIGHT_PX = 170  # room for the legend beside small images


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def parse_crop(crop):
    """``"X0:X1,Y0:Y1"`` (or a 4-tuple) -> ``(x0, x1, y0, y1)``, half-open pixel ranges.

    Empty bounds mean the image edge (``":100,50:"``).  Checked against the
    image in :func:`show`.
    """
    if crop is None:
        return None
    if isinstance(crop, str):
        parts = crop.replace(" ", "").split(",")
        bounds = []
        try:
            if len(parts) != 2:
                raise ValueError
            for part in parts:
                lo, hi = part.split(":")
                bounds += [int(lo) if lo else None, int(hi) if hi else None]
        except ValueError:
            raise SpotfitInputError(
                f"crop {crop!r} is not X0:X1,Y0:Y1 (columns X0 to X1-1, rows Y0 to Y1-1, "
                "e.g. 100:300,50:200)", parameter="crop"
            ) from None
        return tuple(bounds)
    bounds = tuple(crop)
    if len(bounds) != 4:
        raise SpotfitInputError(f"crop must be (x0, x1, y0, y1), got {crop!r}", parameter="crop")
    return tuple(None if b is None else int(b) for b in bounds)


def _crop_box(crop, ny, nx):
    if crop is None:
        return 0, nx, 0, ny
    x0, x1, y0, y1 = parse_crop(crop)
    x0 = 0 if x0 is None else x0
    y0 = 0 if y0 is None else y0
    x1 = nx if x1 is None else x1
    y1 = ny if y1 is None else y1
    if not (0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny):
        raise SpotfitInputError(
            f"crop {x0}:{x1},{y0}:{y1} is not inside the image of {nx} columns and {ny} "
            "rows (need 0 <= X0 < X1 <= columns, 0 <= Y0 < Y1 <= rows)", parameter="crop"
        )
    return x0, x1, y0, y1


def read_spots(spots):
    """A table (DataFrame, returned as is) or a CSV path -> DataFrame with x and y."""
    import pandas as pd

    if isinstance(spots, pd.DataFrame):
        table, where = spots, "table"
    else:
        where = os.fspath(spots)
        if not os.path.isfile(where):
            raise SpotfitInputError(
                f"{where}: no such file" if not os.path.exists(where) else f"{where}: not a file"
            )
        try:
            table = pd.read_csv(where)
        except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise SpotfitInputError(f"{where}: cannot read as a CSV table ({exc})") from exc
    missing = [c for c in ("x", "y") if c not in table.columns]
    if missing:
        raise SpotfitInputError(f"{where}: the table has no {' or '.join(missing)} column")
    return table


def _projection(img, frames):
    """Maximum over `frames` (and over z for stacks), as float32 (ny, nx)."""
    out = None
    for t in frames:
        f = img.frame(t)
        f = f.max(axis=0) if f.ndim == 3 else f
        out = f.astype(np.float32) if out is None else np.maximum(out, f, out=out)
    return out


def _default_zoom(ny, nx):
    return float(max(1, math.ceil(768 / max(ny, nx))))


# ---------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------
def show(image, spots=None, *, frame=None, crop=None, zoom=None, percentiles=(0.5, 99.8),
         color="auto", legend=True, title=None, linewidth=1.0, config=None, camera=None,
         axes=None, channel=None, series=None, **options):
    """Draw an image with its fitted spots; return the matplotlib Figure.

    Parameters
    ----------
    image : str, os.PathLike, spotfit.io.Image or ndarray
        As for :func:`spotfit.fit` (``(ny, nx)``, ``(T, ny, nx)`` or
        ``(T, nz, ny, nx)`` arrays; `axes` for others).
    spots : pandas.DataFrame or str or os.PathLike, optional
        A spotfit table (or its CSV): columns ``x``, ``y`` (px), optional
        ``frame``, ``z``, ``sigma_x``, ``sigma_y``, ``angle``, ``status``,
        ``channel``.  None: the image is fitted first with
        :func:`spotfit.fit` and `config`, `camera` and `options` -- the
        same call (and table) as ``spotfit fit``.
    frame : int, optional
        Time point to show (0-based), with its spots; default: the maximum
        projection over all time points, with all spots.  Stacks are always
        shown as their maximum projection over z.
    crop : str or (x0, x1, y0, y1), optional
        Region to show: columns ``x0 .. x1-1`` and rows ``y0 .. y1-1``
        (``"X0:X1,Y0:Y1"`` as on the command line).
    zoom : float, optional
        Screen pixels per image pixel (default: an integer making the long
        side >= 768 px, at least 1).  Integers keep pixels crisp.
    percentiles : (float, float)
        Percentiles of the shown pixels mapped to black and white.
    color : {"auto", "status", "z", "frame"}
        Ellipse colours: by status (legend with counts), or by z (planes)
        or frame with a colour bar (flagged fits dashed).  ``auto``: z for
        z-stacks, status otherwise.
    legend : bool
        Draw the legend (and colour bar) to the right of the image.
    title : str or False, optional
        Title above the image (default: file name and what is shown; False:
        none).
    linewidth : float
        Ellipse line width in points (1 point = 1.39 px at 100 dpi).
    config, camera, options
        Fit settings, used only when `spots` is None.
    axes, channel, series : optional
        How to read `image` (see :func:`spotfit.read_image`).  With a
        table that has a ``channel`` column, only that channel's spots
        (default 0) are drawn.

    Returns
    -------
    matplotlib.figure.Figure
        With an Agg canvas; ``fig.savefig("qc.png")`` or :func:`save`.
        ``fig.axes[0]`` holds the image and one
        :class:`~matplotlib.collections.EllipseCollection` per status (per
        solid / dashed group when coloured by value), with the positions
        as offsets in data (pixel) coordinates.
    """
    from spotfit.api import as_image

    if spots is not None and options:
        raise TypeError(f"fit options ({', '.join(sorted(options))}) are used only without spots")
    if color not in ("auto", "status", "z", "frame"):
        raise SpotfitInputError(f"color must be auto, status, z or frame, not {color!r}",
                                parameter="color")
    if channel == "all":
        raise SpotfitInputError("channel 'all': show one channel at a time (`channel=N`)",
                                parameter="channel")
    lo_p, hi_p = (float(p) for p in percentiles)
    if not (0 <= lo_p < hi_p <= 100):
        raise SpotfitInputError(f"percentiles must be 0 <= low < high <= 100, got {percentiles!r}",
                                parameter="percentiles")
    if zoom is not None and not (math.isfinite(zoom) and zoom > 0):
        raise SpotfitInputError(f"zoom must be a positive number, got {zoom!r}", parameter="zoom")

    opened = isinstance(image, (str, os.PathLike))
    img = as_image(image, axes=axes, channel=channel, series=series)
    try:
        if spots is None:
            from spotfit.api import fit

            table = fit(img, config=config, camera=camera, **options)
        else:
            table = read_spots(spots)
        n_frames = img.n_frames
        if frame is not None:
            if not (isinstance(frame, (int, np.integer)) and 0 <= frame < n_frames):
                raise SpotfitInputError(
                    f"frame {frame} is out of range: the image has {n_frames} frame(s) "
                    f"(0 to {n_frames - 1})", parameter="frame"
                )
            frames = [int(frame)]
        else:
            frames = range(n_frames)
        picture = _projection(img, frames)
        is_3d, nz = img.is_3d, (img.frame_shape[0] if img.is_3d else 1)
        name = os.path.basename(img.path) if img.path else "image"
    finally:
        if opened:
            img.close()

    ny, nx = picture.shape
    x0, x1, y0, y1 = _crop_box(crop, ny, nx)
    picture = picture[y0:y1, x0:x1]
    spots_in = _select(table, frame, channel, x0, x1, y0, y1)
    if color == "auto":
        color = "z" if is_3d and "z" in spots_in.columns else "status"
    if color in ("z", "frame") and color not in spots_in.columns:
        raise SpotfitInputError(f"color {color}: the table has no {color} column", parameter="color")
    if zoom is None:
        zoom = _default_zoom(*picture.shape)
    if title is None:
        what = f"frame {frame}" if frame is not None else (
            f"max over {n_frames} frames" if n_frames > 1 else "")
        if is_3d:
            what = (what + ", " if what else "") + f"max over {nz} planes"
        if crop is not None:
            what += f"{', ' if what else ''}x {x0}:{x1}, y {y0}:{y1}"
        title = f"{name}: {what}" if what else name
    limits = (0.0, float(nz - 1) if color == "z" else float(max(n_frames - 1, 1)))
    return _figure(picture, (x0, x1, y0, y1), spots_in, float(zoom), (lo_p, hi_p), color,
                   limits, legend, title, linewidth)


def _select(table, frame, channel, x0, x1, y0, y1):
    """Rows of `table` in the frame, channel and crop shown."""
    keep = np.ones(len(table), dtype=bool)
    if frame is not None and "frame" in table.columns:
        keep &= np.asarray(table["frame"]) == frame
    if "channel" in table.columns:
        keep &= np.asarray(table["channel"]) == (channel or 0)
    x = np.asarray(table["x"], dtype=float)
    y = np.asarray(table["y"], dtype=float)
    keep &= (x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5)
    return table[keep]


def _sizes(table, name, fallback):
    if name not in table.columns:
        return np.full(len(table), fallback)
    values = np.asarray(table[name], dtype=float)
    return np.where(np.isfinite(values) & (values > 0), values, fallback)


def _status_order(statuses):
    known = [s for s in STATUS_COLOURS if s in statuses]
    return known + sorted(s for s in statuses if s not in STATUS_COLOURS)


def _figure(picture, box, table, zoom, percentiles, color, limits, legend, title, linewidth):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import EllipseCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    x0, x1, y0, y1 = box
    ny, nx = picture.shape
    width_px = max(1, int(round(nx * zoom)))
    height_px = max(1, int(round(ny * zoom)))
    top = _TITLE_PX if title else 0
    right = _LEGEND_PX if legend else 0
    fig_w = width_px + right
    fig_h = max(height_px + top, _MIN_HEIGHT_PX if legend else 0)
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, (fig_h - top - height_px) / fig_h, width_px / fig_w, height_px / fig_h))
    ax.set_axis_off()

    finite = picture[np.isfinite(picture)]
    lo, hi = np.percentile(finite, percentiles) if finite.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    ax.imshow(picture, cmap="gray", vmin=lo, vmax=hi, origin="upper",
              extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5),
              interpolation="nearest" if zoom >= 1 else "antialiased")
    ax.set_xlim(x0 - 0.5, x1 - 0.5)
    ax.set_ylim(y1 - 0.5, y0 - 0.5)

    n = len(table)
    xy = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])
    sx = _sizes(table, "sigma_x", 1.5)
    sy = _sizes(table, "sigma_y", 1.5) if "sigma_y" in table.columns else sx
    angle = np.degrees(np.nan_to_num(np.asarray(table["angle"], float))) if (
        "angle" in table.columns) else np.zeros(n)
    status = (np.asarray(table["status"], dtype=object) if "status" in table.columns
              else np.full(n, "spot", dtype=object))
    names = _status_order(set(status))
    counts = {s: int(np.sum(status == s)) for s in names}

    def ellipses(rows, **style):
        coll = EllipseCollection(
            widths=2 * ELLIPSE_SIGMAS * sx[rows], heights=2 * ELLIPSE_SIGMAS * sy[rows],
            angles=angle[rows], units="xy", offsets=xy[rows], offset_transform=ax.transData,
            facecolors="none", linewidths=linewidth, **style,
        )
        ax.add_collection(coll, autolim=False)
        return coll

    handles = []
    if color == "status":
        for s in names:
            rows = status == s
            colour = STATUS_COLOURS.get(s, _OTHER_COLOUR)
            coll = ellipses(rows, edgecolors=colour)
            coll.set_label(s)
            handles.append(Line2D([], [], ls="none", marker="o", mfc="none", mec=colour,
                                  mew=1.5, ms=9, label=f"{s}: {counts[s]}"))
    else:
        from matplotlib.colors import Normalize

        values = np.asarray(table[color], dtype=float)
        norm = Normalize(*limits) if limits[1] > limits[0] else Normalize(0, 1)
        good = status == ("converged" if "status" in table.columns else "spot")
        mappable = None
        for rows, ls in ((good, "solid"), (~good, "dashed")):
            coll = ellipses(rows, cmap=VALUE_CMAP, norm=norm, linestyles=ls)
            coll.set_array(values[rows])
            coll.set_facecolors("none")
            coll.set_label(ls)
            mappable = mappable or coll
        for s in names:
            handles.append(Line2D([], [], color="0.35", lw=1.5,
                                  ls="solid" if s in ("converged", "spot") else "dashed",
                                  label=f"{s}: {counts[s]}"))

    if title:
        fig.text(4 / fig_w, 1 - 5 / fig_h, title, ha="left", va="top", fontsize=9)
    if legend:
        left = (width_px + 8) / fig_w
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(left, 1 - top / fig_h),
                   frameon=False, fontsize=8, title=f"{n} spots", title_fontsize=9,
                   alignment="left", borderaxespad=0, handlelength=1.6)
        if color != "status":
            cax = fig.add_axes((left + 4 / fig_w, 12 / fig_h, 12 / fig_w,
                                min(0.4, 120 / fig_h)))
            bar = fig.colorbar(mappable, cax=cax)
            bar.set_label("z (planes)" if color == "z" else "frame", fontsize=8)
            bar.ax.tick_params(labelsize=7)
    return fig


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def save(fig, path) -> None:
    """Write `fig` to `path` atomically (format from the suffix: png, pdf, svg...).

    The figure keeps its size in pixels (no tight bounding box), so the
    pixel mapping of :func:`show` holds in the PNG.
    """
    from spotfit._atomic import atomic_path

    where = os.fspath(path)
    suffix = os.path.splitext(where)[1].lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if suffix not in supported:
        raise SpotfitInputError(
            f"{where}: cannot write a picture of type {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(supported))}"
        )
    with atomic_path(where) as tmp:
        fig.savefig(tmp, dpi=_DPI, format=suffix)


def write_qc(path, image, spots, **options) -> None:
    """Draw `image` with `spots` (:func:`show`) and write the picture to `path` atomically."""
    save(show(image, spots, **options), path)


def qc_path(table_path) -> str:
    """``<stem>_qc.png`` beside a table ``<stem>.csv``."""
    return os.path.splitext(os.fspath(table_path))[0] + "_qc.png"
