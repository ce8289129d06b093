"""Make the pictures of the README and the overlays of the real images in ../shared/data.

Run from anywhere with spotfit installed (e.g. the dev environment):

    python docs/make_figures.py                 # everything (~1-2 min)
    python docs/make_figures.py --only overlays # the real images only
    python docs/make_figures.py --only readme   # the simulated examples only

Every picture is made by the spotfit command line (``python -m spotfit ...``),
as a user would make it; only the input images of the README examples are
simulated here (seeded, so reruns give the same images).  Each PNG is then
re-encoded with an adaptive 64-colour palette (Pillow) to stay below 200 KB.
The overlays record what spotfit currently finds on real images: rerun this
script after detection or fitting changes and look at them.  The report's
picture is a headless-Chromium screenshot (skipped without Chromium).

Outputs: ``docs/img/{show,render,render_time,report}.png`` and
``docs/overlays/<name>.png``; a summary of each fit is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
IMG = DOCS / "img"
OVERLAYS = DOCS / "overlays"
MAX_BYTES = 200_000

#: Real images: name, file under the data folder, fit options, show options.
#: Fit options are those of tests/test_real_data.py (chosen after looking at
#: each image); "terra_default" shows the Terra frame at the default threshold.
REAL = [
    ("terra", "spotiflow-samples/img_terra_2d.tif", ["--threshold", "20"],
     ["--crop", "300:812,100:612", "--zoom", "1.5"]),
    ("terra_default", "spotiflow-samples/img_terra_2d.tif", [],
     ["--crop", "300:812,100:612", "--zoom", "1.5"]),
    ("hybiss", "spotiflow-samples/img_hybiss_2d.tif", ["--threshold", "7"], ["--zoom", "1.5"]),
    ("smfish", "airlocalize-examples/2DsmFISH_humCells.tif",
     ["--sigma", "1", "--threshold", "10"], ["--zoom", "2"]),
    ("movie", "airlocalize-examples/movie.tif",
     ["--axes", "TYX", "--sigma", "1.1", "--threshold", "12"], ["--zoom", "7", "--color", "frame"]),
    ("synth_3d", "spotiflow-samples/img_synth_3d.tif", ["--axes", "ZYX"], ["--zoom", "5"]),
]


def spotfit(*args, quiet=False):
    """Run ``python -m spotfit ARGS`` (this interpreter), echo it, fail loudly."""
    command = [sys.executable, "-m", "spotfit", *map(str, args)]
    print("$ spotfit " + " ".join(map(str, args)), file=sys.stderr)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr}")
    if not quiet and proc.stderr.strip():
        print("  " + proc.stderr.strip().replace("\n", "\n  "), file=sys.stderr)
    return proc


def shrink(path: Path) -> None:
    """Re-encode a PNG with a 64-colour palette; refuse to keep one over MAX_BYTES."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=64, method=Image.Quantize.FASTOCTREE,
                 dither=Image.Dither.NONE).save(path, optimize=True)
    size = path.stat().st_size
    print(f"  {path.relative_to(REPO)}: {rgb.size[0]}x{rgb.size[1]} px, {size / 1000:.0f} KB",
          file=sys.stderr)
    if size > MAX_BYTES:
        sys.exit(f"{path} is {size} bytes (> {MAX_BYTES}): crop or zoom out")


def summary(csv: Path) -> str:
    table = pd.read_csv(csv)
    if len(table) == 0:
        return "no spots"
    counts = table["status"].value_counts().to_dict()
    conv = table[table["status"] == "converged"]
    width = np.sqrt(conv["sigma_x"] * conv["sigma_y"])
    return (f"{len(table)} spots; " + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; converged widths (px) median {width.median():.2f}, 10-90% "
            f"{width.quantile(0.1):.2f}-{width.quantile(0.9):.2f}; median intensity "
            f"{conv['intensity'].median():.0f} {table['unit'].iloc[0]}")


# ---------------------------------------------------------------------------
# README examples (simulated)
# ---------------------------------------------------------------------------
def blinking_movie(path: Path, truth: Path, drift=(0.0, 0.0)) -> None:
    """A DNA-PAINT-like movie of filaments and rings, ~8 emitters on per frame.

    The sample moves linearly by `drift` (x, y) px over the movie.
    """
    import spotfit
    from spotfit.simulation import write_simulation

    rng = np.random.default_rng(7)
    ny, nx, frames = 40, 56, 900
    sites = []
    t = np.linspace(0, 1, 400)
    for a, b, c in ((6, 28, 0.9), (30, 10, -1.4), (14, 34, 0.4)):  # three filaments
        x = 3 + t * (nx - 7)
        y = a + b * t ** 2 * (1 - t) * 4 * c + 6 * np.sin(3 * t + a)
        sites.append(np.column_stack([x, np.clip(y, 3, ny - 4)]))
    for cx, cy in rng.uniform((8, 8), (nx - 8, ny - 8), size=(6, 2)):  # rings, 100 nm radius
        phi = np.arange(8) * np.pi / 4
        sites.append(np.column_stack([cx + 0.62 * np.cos(phi), cy + 0.62 * np.sin(phi)]))
    sites = np.vstack(sites)
    rows = []
    for f in range(frames):
        on = rng.choice(len(sites), size=rng.poisson(8), replace=False)
        rows.append(pd.DataFrame({"frame": f, "x": sites[on, 0] + drift[0] * f / frames,
                                  "y": sites[on, 1] + drift[1] * f / frames,
                                  "intensity": rng.uniform(800, 4000, on.size)}))
    positions = pd.concat(rows, ignore_index=True)
    image, table = spotfit.simulate((frames, ny, nx), positions=positions, background=15,
                                    sigma=1.0, seed=8)
    write_simulation(path, truth, image, table, axes="TYX")


def readme_figures(work: Path, browser) -> None:
    IMG.mkdir(exist_ok=True)
    # spotfit show: a dense field, bright and faint spots (close pairs merge into one fit)
    spotfit("simulate", work / "cells.tif", "--shape", "96x160", "--n-spots", "110",
            "--photons", "200,4000", "--background", "40", "--seed", "4",
            "--truth", work / "cells_truth.csv")
    spotfit("show", work / "cells.tif", "--out", IMG / "show.png", "--zoom", "4",
            "--baseline", "100", "--gain", "1")
    shrink(IMG / "show.png")

    # spotfit render: a blinking movie, fitted, rendered at 10 nm
    blinking_movie(work / "blink.tif", work / "blink_truth.csv")
    spotfit("fit", work / "blink.tif", "--baseline", "100", "--gain", "1", "--sigma", "1.0",
            "--pixel-size", "0.16", "--out", work / "blink.csv")
    print("  blink.csv: " + summary(work / "blink.csv"), file=sys.stderr)
    spotfit("render", work / "blink.csv", "--out", IMG / "render.png", "--pixel-size", "10")
    shrink(IMG / "render.png")
    # the same sample drifting by (1.5, 0.75) px = (240, 120) nm: colouring by time shows it
    blinking_movie(work / "drift.tif", work / "drift_truth.csv", drift=(1.5, 0.75))
    spotfit("fit", work / "drift.tif", "--baseline", "100", "--gain", "1", "--sigma", "1.0",
            "--pixel-size", "0.16", "--out", work / "drift.csv")
    spotfit("render", work / "drift.csv", "--out", IMG / "render_time.png", "--pixel-size", "10",
            "--color", "time")
    shrink(IMG / "render_time.png")

    # report.html of a small batch (one corrupt file), as a browser shows it
    batch = work / "batch"
    batch.mkdir()
    for i, (shape, n) in enumerate((("80x120", 30), ("3x64x96", 15), ("100x100", 60))):
        spotfit("simulate", batch / f"cell{i + 1}.tif", "--shape", shape, "--n-spots", n,
                "--photons", "150,3000", "--seed", 20 + i, "--truth", work / f"t{i}.csv",
                quiet=True)
    (batch / "cell4.tif").write_bytes(b"this is not a TIFF")
    proc = subprocess.run([sys.executable, "-m", "spotfit", "fit", "batch", "--out-dir",
                           "results", "--baseline", "100", "--gain", "1"],
                          capture_output=True, text=True, cwd=work)  # relative paths in it
    print("  " + proc.stderr.strip().replace("\n", "\n  "), file=sys.stderr)
    if browser is None:
        print("  no chromium: docs/img/report.png not remade", file=sys.stderr)
        return
    shot = work / "report_full.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={work / 'profile'}",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1000,1250",
                    (work / "results" / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    shutil.copy(shot, IMG / "report.png")
    shrink(IMG / "report.png")


# ---------------------------------------------------------------------------
# Real images
# ---------------------------------------------------------------------------
def overlays(work: Path, data: Path) -> None:
    OVERLAYS.mkdir(exist_ok=True)
    for name, relative, fit_args, show_args in REAL:
        image = data / relative
        if not image.is_file():
            print(f"  {image}: missing, {name} skipped", file=sys.stderr)
            continue
        csv = work / f"{name}.csv"
        spotfit("fit", image, *fit_args, "--out", csv)
        print(f"  {name}: " + summary(csv), file=sys.stderr)
        axes = fit_args[fit_args.index("--axes"):][:2] if "--axes" in fit_args else []
        out = OVERLAYS / f"{name}.png"
        spotfit("show", image, csv, "--out", out, *axes, *show_args)
        shrink(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--only", choices=("readme", "overlays"))
    args = parser.parse_args()
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "readme"):
            readme_figures(work, browser)
        if args.only in (None, "overlays"):
            overlays(work, args.data)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
