"""The batch report: one self-contained ``report.html`` for a folder of results.

:func:`write_report` turns the outcome of :func:`spotfit.batch.run_batch`
(its :class:`~spotfit.batch.BatchSummary`, the CSVs and JSON sidecars it
wrote) into one HTML file that works offline: CSS inline, pictures as
base64 ``data:`` URIs, no scripts, fonts or links to anything outside the
file.  It holds a row per input file (thumbnail of the image with its fits,
spots, status counts, frames, time), histograms of intensity, width,
localisation precision and offset over all files (converged and flagged
fits apart), the failures with their messages, and the parameters used.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from datetime import datetime, timezone

import numpy as np

__all__ = ["REPORT_NAME", "write_report"]

#: File name of the report in the output folder.
REPORT_NAME = "report.html"

#: Long side of the thumbnails, screen pixels.
THUMBNAIL_PX = 200

#: At most this many spots (a random sample over all files) go into the histograms.
MAX_HISTOGRAM_SPOTS = 2_000_000

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; vertical-align: middle; text-align: left; }
th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td { background: #fff1f0; }
tr.skipped td { color: #666; }
td.thumb img { display: block; image-rendering: auto; }
span.badge { display: inline-block; border-radius: 0.6em; padding: 0 0.5em; margin: 0.1em;
             font-size: 0.85em; border: 1px solid #ccc; white-space: nowrap; }
span.dot { display: inline-block; width: 0.7em; height: 0.7em; border-radius: 50%;
           margin-right: 0.3em; vertical-align: -0.05em; border: 1px solid #888; }
code { font-size: 0.95em; }
.path { color: #666; font-size: 0.85em; word-break: break-all; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _png_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sidecar(csv_path):
    try:
        with open(os.path.splitext(csv_path)[0] + ".json", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _thumbnail(result, axes, channel):
    """A data URI of the image with its fits, or an error text."""
    from spotfit.io import read_image
    from spotfit.overlay import read_spots, show

    try:
        table = read_spots(result.output)
        with read_image(result.input, axes=axes, channel=0 if channel == "all" else channel) as img:
            ny, nx = img.frame_shape[-2:]
            zoom = min(THUMBNAIL_PX / max(ny, nx), 4.0)
            fig = show(img, table, zoom=zoom, legend=False, title=False, linewidth=0.5)
        return _png_uri(fig), None
    except Exception as exc:  # a thumbnail must never break the report
        return None, f"no thumbnail ({type(exc).__name__}: {exc})"


def _status_badges(counts) -> str:
    from spotfit.overlay import STATUS_COLOURS, _status_order

    if not counts:
        return ""
    parts = []
    for name in _status_order(set(counts)):
        colour = STATUS_COLOURS.get(name, "#ffffff")
        parts.append(
            f'<span class="badge"><span class="dot" style="background:{colour}"></span>'
            f"{_esc(name)} {counts[name]}</span>"
        )
    return "".join(parts)


def _collect(results, total):
    """Columns for the histograms from every table: dict name -> (values, converged)."""
    import pandas as pd

    wanted = ("intensity", "sigma_x", "sigma_y", "x_err", "y_err", "offset", "status", "unit")
    rng = np.random.default_rng(0)
    fraction = min(1.0, MAX_HISTOGRAM_SPOTS / max(total, 1))
    parts, units = [], set()
    for r in results:
        try:
            t = pd.read_csv(r.output, usecols=lambda c: c in wanted)
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if "x_err" not in t.columns or len(t) == 0:  # a detect table, or no spots
            continue
        if fraction < 1:
            t = t.iloc[rng.random(len(t)) < fraction]
        if "unit" in t.columns:
            units.update(str(u) for u in t["unit"].dropna().unique())
        parts.append(t)
    if not parts:
        return None, units, 0
    table = pd.concat(parts, ignore_index=True)
    converged = (np.asarray(table["status"]) == "converged") if "status" in table else (
        np.ones(len(table), dtype=bool))

    def col(name):
        return np.asarray(table[name], dtype=float) if name in table else np.full(len(table), np.nan)

    sx, sy = col("sigma_x"), col("sigma_y")
    ex, ey = col("x_err"), col("y_err")
    data = {
        "intensity": col("intensity"),
        "width": np.sqrt(sx * sy),
        "precision": np.sqrt((ex ** 2 + ey ** 2) / 2),
        "offset": col("offset"),
    }
    return (data, converged), units, len(table)


def _histograms(data, converged, unit):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from spotfit.overlay import STATUS_COLOURS

    panels = [
        ("intensity", f"intensity ({unit})"),
        ("width", "width, sqrt(sigma_x sigma_y) (px)"),
        ("precision", "localisation precision, sqrt((x_err² + y_err²) / 2) (px)"),
        ("offset", f"offset ({unit}/px)"),
    ]
    fig = Figure(figsize=(10, 6.4), dpi=80)
    FigureCanvasAgg(fig)
    axs = fig.subplots(2, 2)
    for ax, (key, label) in zip(axs.ravel(), panels):
        values = data[key]
        ok = np.isfinite(values)
        if not ok.any():
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label, fontsize=9)
            continue
        lo, hi = np.percentile(values[ok], [0.5, 99.5])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 61)
        outside = int(np.sum(ok & ((values < lo) | (values > hi))))
        for mask, name, colour in ((ok & converged, "converged", STATUS_COLOURS["converged"]),
                                   (ok & ~converged, "flagged", "#888888")):
            if mask.any():
                ax.hist(np.clip(values[mask], lo, hi), bins=bins, histtype="stepfilled",
                        alpha=0.55, color=colour, edgecolor="black", linewidth=0.4,
                        label=f"{name} ({int(mask.sum())})")
        ax.set_title(label, fontsize=9)
        if outside:
            ax.text(0.01, 0.98, f"{outside} beyond the 0.5-99.5% range, in the end bins",
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.35")
        ax.set_ylabel("spots", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png_uri(fig)


def _flatten(prefix, value, rows):
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, value))


def _fmt_seconds(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def write_report(path, summary, parameters=None, *, axes=None, channel=None,
                 title="spotfit report") -> None:
    """Write the HTML report of a batch (atomically).

    Parameters
    ----------
    path : str or os.PathLike
        Output file, e.g. ``<out_dir>/report.html``.
    summary : spotfit.batch.BatchSummary
        Per-file results of :func:`spotfit.batch.run_batch`; the CSVs (and
        sidecars) of ``ok`` and ``skipped`` files are read back.
    parameters : dict, optional
        The parameters of the run (:func:`spotfit.provenance.parameters`);
        default: those recorded in the first sidecar found.
    axes, channel : optional
        How the inputs were read (``--axes``, ``--channel``), for the thumbnails.
    title : str
        Heading of the page.

    Notes
    -----
    The page references nothing outside itself (no scripts, fonts, style
    sheets or links): it renders the same offline.  Thumbnails re-read each
    input image (its maximum projection); a thumbnail that cannot be made
    is replaced by its reason, never failing the report.
    """
    from spotfit import __version__
    from spotfit._atomic import atomic_path

    results = list(summary.results)
    done = [r for r in results if r.status in ("ok", "skipped")]
    sidecars = {r.output: _sidecar(r.output) for r in done}
    if parameters is None:
        parameters = next((d.get("parameters") for d in sidecars.values() if d), None)

    rows = []
    status_total: dict = {}
    for i, r in enumerate(results):
        doc = sidecars.get(r.output) or {}
        counts = doc.get("status_counts") or {}
        for k, v in counts.items():
            status_total[k] = status_total.get(k, 0) + int(v)
        name = os.path.basename(r.input)
        cells = [f'<td class="num">{i + 1}</td>']
        if r.status == "failed":
            cells.append('<td class="thumb">—</td>')
        else:
            uri, why = _thumbnail(r, axes, channel)
            cells.append(
                f'<td class="thumb"><img src="{uri}" alt="{_esc(name)} with its fits"></td>'
                if uri else f'<td class="thumb">{_esc(why)}</td>'
            )
        inp = doc.get("input", {})
        shape = "×".join(str(s) for s in inp.get("shape", [])) if inp else ""
        seconds = r.seconds if r.status == "ok" else doc.get("timings_s", {}).get("total")
        cells += [
            f'<td><span class="name">{_esc(name)}</span>'
            + (f'<br><span class="path">{_esc(r.input)}</span>' if r.input != name else "")
            + "</td>",
            f"<td>{_esc(r.status)}" + (f"<br>{_esc(r.message)}" if r.message else "") + "</td>",
            f"<td>{_esc(shape)} {_esc(inp.get('axes', ''))}</td>",
            f'<td class="num">{r.n_spots if r.status != "failed" else ""}</td>',
            f"<td>{_status_badges(counts)}</td>",
            f'<td class="num">{_fmt_seconds(seconds)}</td>',
        ]
        rows.append(f'<tr id="file-{i + 1}" class="{_esc(r.status)}">' + "".join(cells) + "</tr>")

    total_spots = sum(r.n_spots for r in done)
    collected, units, n_hist = _collect(done, total_spots)
    if collected is not None:
        unit = "/".join(sorted(units)) or "signal"
        sample = (f" (a random sample of {n_hist} of {total_spots} spots)"
                  if n_hist < total_spots else "")
        hist_html = (f"<p>All fitted spots of all files{_esc(sample)}; converged and "
                     f"flagged fits apart.</p>"
                     f'<img src="{_histograms(*collected, unit)}" alt="histograms">')
    else:
        hist_html = "<p>No fitted spots.</p>"

    failed = [r for r in results if r.status == "failed"]
    if failed:
        fail_html = ("<table><tr><th>file</th><th>message</th></tr>"
                     + "".join(f"<tr><td>{_esc(r.input)}</td><td>{_esc(r.message)}</td></tr>"
                               for r in failed) + "</table>")
    else:
        fail_html = "<p>None.</p>"

    param_rows: list = []
    if parameters:
        _flatten("", parameters, param_rows)
    param_html = ("<table><tr><th>parameter</th><th>value</th></tr>"
                  + "".join(f"<tr><td><code>{_esc(k)}</code></td><td><code>"
                            f"{_esc(json.dumps(v))}</code></td></tr>" for k, v in param_rows)
                  + "</table>") if param_rows else "<p>Not recorded.</p>"

    counts_line = ", ".join(f"{v} {_esc(k)}" for k, v in sorted(status_total.items()))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="spotfit {_esc(__version__)}">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p class="meta">{_esc(summary.line())}{'; ' + counts_line if counts_line else ''}.<br>
spotfit {_esc(__version__)}, written {_esc(now)}.</p>
<h2 id="files">Files</h2>
<table class="files">
<tr><th>#</th><th>image and fits</th><th>file</th><th>result</th><th>shape, axes</th>
<th>spots</th><th>status</th><th>time</th></tr>
{chr(10).join(rows)}
</table>
<h2 id="distributions">Distributions</h2>
{hist_html}
<h2 id="failures">Failures</h2>
{fail_html}
<h2 id="parameters">Parameters</h2>
{param_html}
</body>
</html>
"""
    with atomic_path(os.fspath(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(doc)
