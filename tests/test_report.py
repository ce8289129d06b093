"""Tests for the batch report (spotfit.report, ``report.html`` of ``spotfit fit --out-dir``).

The report must show every file of the batch (failures too) and be
self-contained: nothing outside the file is referenced, so it renders
offline.  The browser test opens it in headless Chromium with the network
pointed at a dead proxy; it skips when no Chromium is installed (``.ci/run``
installs Debian's ``chromium`` when it can).
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

import spotfit
from spotfit import Camera
from spotfit.batch import run_batch

CAMERA = Camera(baseline=100, gain=2, read_noise=1.5)
NAMES = ("a_cells.tif", "c_movie.tif", "b_broken.tif")  # processed in name order: a, b, c


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two good inputs (a 2D image, a 3-frame movie; not square) and a corrupt one."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "in"
    inputs.mkdir()
    for name, shape, seed in ((NAMES[0], (41, 67), 1), (NAMES[1], (3, 37, 53), 2)):
        image, _ = spotfit.simulate(shape, n_spots=6, photons=3000, background=10,
                                    min_separation=8, border=4, camera=CAMERA, seed=seed)
        tifffile.imwrite(inputs / name, image, imagej=True,
                         metadata={"axes": "YX" if image.ndim == 2 else "TYX"})
    (inputs / NAMES[2]).write_bytes(b"not a tiff at all")
    out = root / "out"
    summary = run_batch([inputs], out, camera=CAMERA, workers=1, report=True)
    return summary, out / "report.html"


def attributes(text, name):
    return re.findall(rf"""\b{name}\s*=\s*["']([^"']*)["']""", text, flags=re.IGNORECASE)


def test_report_lists_every_file_with_its_results(batch):
    summary, report = batch
    text = report.read_text(encoding="utf-8")
    assert [r.status for r in summary.results] == ["ok", "failed", "ok"]  # sorted by name
    for i, result in enumerate(summary.results, start=1):
        row = re.search(rf'<tr id="file-{i}" class="(\w+)">(.*?)</tr>', text, flags=re.S)
        assert row, f"no row for file {i}"
        assert row.group(1) == result.status
        assert html.escape(result.input.split("/")[-1]) in row.group(2)
        if result.status == "ok":
            assert f'<td class="num">{result.n_spots}</td>' in row.group(2)
            assert "converged" in row.group(2)
            assert "data:image/png;base64," in row.group(2)  # its thumbnail
        else:
            assert html.escape(result.message) in row.group(2)
    assert summary.failed[0].message in text.split('id="failures"')[1]
    parameters = text.split('id="parameters"')[1]
    assert "config.sigma" in parameters and "camera.gain" in parameters
    assert summary.line().split(" in ")[0] in text  # the summary line


def test_report_is_self_contained(batch):
    _, report = batch
    text = report.read_text(encoding="utf-8")
    references = attributes(text, "src") + attributes(text, "href")
    assert references, "expected images"
    for ref in references:
        assert ref.startswith(("data:", "#")), ref
    without_data = re.sub(r"data:[^\"']*", "", text)  # base64 holds '/' characters
    assert not re.search(r"https?:|//[a-z0-9]", without_data, flags=re.I)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    # every picture is a valid PNG
    images = [PILImage.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
              for src in attributes(text, "src")]
    assert len(images) == 3  # two thumbnails, the histograms
    assert all(im.format == "PNG" and min(im.size) > 20 for im in images)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser, profile, *args):
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", f"--user-data-dir={profile}",
               "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_offline_in_a_headless_browser(batch, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium found (apt-get install chromium)")
    _, report = batch
    url = report.resolve().as_uri()
    proc = _headless(browser, tmp_path / "profile", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    rows = re.findall(r'<tr id="file-(\d)" class="(\w+)">', dom)
    assert rows == [("1", "ok"), ("2", "failed"), ("3", "ok")]
    for name in NAMES:
        assert name in dom

    shot = tmp_path / "shot.png"
    proc = _headless(browser, tmp_path / "profile", f"--screenshot={shot}",
                     "--window-size=1000,700", url)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(PILImage.open(shot).convert("L"))
    # the thumbnails (dark images on the white page) were decoded and drawn
    assert np.count_nonzero(pixels < 60) > 2 * 100 * 50
