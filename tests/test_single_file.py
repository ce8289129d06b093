"""One file on the command line: what was read (summary line, notes, warnings), progress on a
terminal, the JSON sidecar beside ``--out`` and ``--config`` reading it back, ``--qc`` with
``--series``.  Also the per-file step :func:`spotfit.api.process_file` (progress, µm columns
added once) and empty tables' dtypes.

Images are made in ``tmp_path`` (never square: 41 x 57); the real files of
``../shared/data`` are used when present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.provenance as provenance
import spotfit.table
from spotfit.api import process_file
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.errors import SpotfitWarning
from spotfit.io import read_image, write_tiff
from spotfit.simulation import simulate

NY, NX = 41, 57
CAMERA = Camera(baseline=100, gain=2, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {result.stderr}") from result.exception
    return result


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return result


def spots_image(shape, seed=1, **kwargs):
    image, truth = simulate(shape, n_spots=4, photons=3000, background=10, sigma=1.3,
                            camera=CAMERA, min_separation=9, border=5, seed=seed, **kwargs)
    return image, truth


@pytest.fixture
def cell(tmp_path):
    path = tmp_path / "cell.tif"
    write_tiff(path, spots_image((NY, NX))[0], "YX")
    return path


@pytest.fixture
def movie(tmp_path):
    """3 frames, 0.107 µm/px in the ImageJ metadata."""
    path = tmp_path / "movie.tif"
    write_tiff(path, spots_image((3, NY, NX), seed=2)[0], "TYX", pixel_size=0.107)
    return path


def zstack(path, spacing=True):
    image, _ = spots_image((9, NY, NX), seed=3, z_stack=True, sigma_z=1.5)
    write_tiff(path, image, "ZYX", pixel_size=0.1, z_step=0.3 if spacing else None)
    return path


# ---------------------------------------------------------------------------
# the summary line says what was read
# ---------------------------------------------------------------------------
def test_summary_names_axes_frames_pixel_size_and_unit(cell, movie, tmp_path):
    result = ok("fit", cell, *CAMERA_ARGS)
    n = len(pd.read_csv(__import__("io").StringIO(result.stdout)))
    assert result.stderr == (f"{cell} (YX, 1 frame, pixel size unknown, photons): {n} spots "
                             f"({n} converged, 0 flagged) -> stdout\n")
    result = ok("fit", movie, "--out", tmp_path / "m.csv")
    assert result.stderr.startswith(f"{movie} (TYX, 3 frames, 0.107 µm/px, ADU): ")
    assert result.stderr.endswith(f" -> {tmp_path / 'm.csv'} + {tmp_path / 'm.json'}\n")
    result = ok("detect", movie, "--pixel-size", "0.2")
    assert result.stderr.startswith(f"{movie} (TYX, 3 frames, 0.2 µm/px): ")
    stack = zstack(tmp_path / "stack.tif")
    result = ok("fit", stack, "--sigma-z", "1.5")
    assert result.stderr.startswith(f"{stack} (ZYX, 9 planes, 0.1 µm/px, 0.3 µm/plane, ADU): ")


def test_summary_names_the_channel(tmp_path):
    two = tmp_path / "two.tif"
    image = np.stack([spots_image((NY, NX), seed=s)[0] for s in (4, 5)])
    tifffile.imwrite(two, image, imagej=True, metadata={"axes": "CYX"})
    assert ok("detect", two, "--channel", "1").stderr.startswith(
        f"{two} (YX, 1 frame, channel 1, pixel size unknown): ")
    assert ok("detect", two, "--channel", "all").stderr.startswith(
        f"{two} (YX, 1 frame, 2 channels, pixel size unknown): ")


# ---------------------------------------------------------------------------
# notes where the axes were a guess
# ---------------------------------------------------------------------------
def test_unlabelled_stack_is_read_as_time_with_a_note(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, spots_image((5, NY, NX))[0])  # stored as QYX: no axis labels
    img = read_image(path)
    assert img.source_axes == "QYX" and img.axes == "TYX"
    assert img.notes == ("its 5 images are not labelled as time or z (axes 'QYX'); read as 5 "
                         "time frames. If they are z planes, give `axes='ZYX'`",)
    result = ok("detect", path)
    lines = result.stderr.splitlines()
    assert lines[0] == (f"Note: {path}: its 5 images are not labelled as time or z (axes 'QYX'); "
                        "read as 5 time frames. If they are z planes, give --axes ZYX")
    assert lines[1].startswith(f"{path} (TYX, 5 frames, ")
    assert read_image(path, axes="ZYX").notes == ()
    assert "Note:" not in ok("detect", path, "--axes", "TYX").stderr


def test_z_planes_without_a_z_step_are_a_guess(tmp_path):
    guess = zstack(tmp_path / "slices.tif", spacing=False)
    assert read_image(guess).notes == (
        "its 9 images are labelled as z planes but no z step is recorded: read as one z-stack "
        "of 9 planes (3D). If they are time points, give `axes='TYX'`",)
    assert read_image(zstack(tmp_path / "stack.tif")).notes == ()  # spacing recorded
    hyper = tmp_path / "tzyx.tif"
    tifffile.imwrite(hyper, np.zeros((2, 4, NY, NX), np.uint16), imagej=True,
                     metadata={"axes": "TZYX"})
    assert read_image(hyper).notes == ()  # a time axis too: surely planes


def test_inverted_image_keeps_its_notes(tmp_path):
    from spotfit.invert import invert_image

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, spots_image((5, NY, NX))[0])
    assert invert_image(read_image(path)).notes == read_image(path).notes != ()


@pytest.mark.skipif(not (DATA / "airlocalize-examples" / "movie.tif").exists(),
                    reason="shared data absent")
def test_real_movie_labelled_z_gets_a_note_and_axes_tyx_reads_it_as_time(tmp_path):
    movie = DATA / "airlocalize-examples" / "movie.tif"
    result = ok("detect", movie, "--sigma", "1.1", "--threshold", "12", "--out",
                tmp_path / "z.csv")
    note, summary = result.stderr.splitlines()
    assert note == (f"Note: {movie}: its 120 images are labelled as z planes but no z step is "
                    "recorded: read as one z-stack of 120 planes (3D). If they are time points, "
                    "give --axes TYX")
    assert summary.startswith(f"{movie} (ZYX, 120 planes, pixel size unknown): ")
    result = ok("detect", movie, "--axes", "TYX", "--sigma", "1.1", "--threshold", "12")
    assert result.stderr.startswith(f"{movie} (TYX, 120 frames, pixel size unknown): ")
    doc = json.loads((tmp_path / "z.json").read_text())
    assert doc["input"]["notes"] == [
        "its 120 images are labelled as z planes but no z step is recorded: read as one z-stack "
        "of 120 planes (3D). If they are time points, give `axes='TYX'`"]


@pytest.mark.skipif(not (DATA / "spotiflow-samples" / "img_synth_3d.tif").exists(),
                    reason="shared data absent")
def test_real_qyx_stack_gets_a_note_and_axes_zyx_reads_it_as_a_stack():
    path = DATA / "spotiflow-samples" / "img_synth_3d.tif"
    result = ok("detect", path)
    note, summary = result.stderr.splitlines()
    assert note == (f"Note: {path}: its 32 images are not labelled as time or z (axes 'QYX'); "
                    "read as 32 time frames. If they are z planes, give --axes ZYX")
    assert summary.startswith(f"{path} (TYX, 32 frames, pixel size unknown): ")
    result = ok("detect", path, "--axes", "ZYX")
    assert result.stderr.startswith(f"{path} (ZYX, 32 planes, pixel size unknown): ")


# ---------------------------------------------------------------------------
# implausible physical sizes
# ---------------------------------------------------------------------------
def test_pixel_size_in_nm_given_as_um_is_warned_about(cell):
    result = ok("detect", cell, "--pixel-size", "160")
    assert result.stderr.splitlines()[0] == (
        "Warning: 160 µm per pixel (--pixel-size) is implausible, above 10 µm: did you give nm? "
        "It is in µm: 0.16 for 160 nm")
    assert "Warning" not in ok("detect", cell, "--pixel-size", "0.16").stderr
    with pytest.warns(SpotfitWarning, match=r"`pixel_size`\) is implausible"):
        process_file(cell, "detect", pixel_size=160)


def test_implausible_metadata_and_z_step_are_warned_about(tmp_path):
    path = tmp_path / "big.tif"
    write_tiff(path, spots_image((NY, NX))[0], "YX", pixel_size=25.0)
    with pytest.warns(SpotfitWarning, match="the file's metadata give 25 µm per pixel"):
        process_file(path, "detect")
    stack = zstack(tmp_path / "stack.tif")
    with pytest.warns(SpotfitWarning, match=r"300 µm between planes \(`z_step`\)"):
        process_file(stack, "detect", z_step=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        process_file(stack, "detect", z_step=0.3)


# ---------------------------------------------------------------------------
# progress: a bar on a terminal, nothing elsewhere
# ---------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_only(movie, tmp_path):
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "spotfit", "fit", str(movie), "--out",
                             str(tmp_path / "m.csv")], stderr=slave, stdout=subprocess.DEVNULL,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(master)
    text = b"".join(chunks).decode().replace("\r\n", "\n")  # the terminal's newlines
    assert "\rspotfit fit [............] 0/? frames, 0 spots | 0:00, ETA ?" in text
    drawn = [part for part in text.split("\r") if part.startswith("spotfit fit [")]
    assert any(" 3/3 frames, " in part for part in drawn), drawn  # the last frame is shown
    summary = text.split("\r")[-1].strip()  # after the bar was wiped
    assert summary.startswith(f"{movie} (TYX, 3 frames, 0.107 µm/px, ADU): ")
    # not a terminal: the summary alone (CliRunner's stderr is a buffer)
    result = ok("fit", movie, "--out", tmp_path / "n.csv")
    assert "\r" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_progress_bar_text_for_one_file_and_for_a_batch():
    import io

    from spotfit.progress import ProgressBar

    one = ProgressBar("spotfit fit", {0: 100}, io.StringIO())
    one.update(0, 30, 120, 97)
    assert one.line(one.start + 6) == "spotfit fit [###.........] 30/120 frames, 97 spots | 0:06, ETA 0:18"
    many = ProgressBar("spotfit detect", {0: 100, 1: 300}, io.StringIO())
    many.update(1, 1, 2, 40)
    many.file_done(0, 12)
    # done: 100 bytes of file 0, half of file 1's 300: 250 of 400 bytes
    assert many.line(many.start + 10) == (
        "spotfit detect [#######.....] 1/2 files, 1 frames, 52 spots | 0:10, ETA 0:06")


def test_process_file_reports_frames_and_spots(movie):
    calls = []
    table, _ = process_file(movie, "detect", progress=lambda *done: calls.append(done))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert calls[-1][2] == len(table) and [c[2] for c in calls] == sorted(c[2] for c in calls)


# ---------------------------------------------------------------------------
# the sidecar of one file, and --config reading it back
# ---------------------------------------------------------------------------
def test_out_file_gets_a_sidecar_with_resolved_values(movie, tmp_path):
    out = tmp_path / "spots.csv"
    ok("fit", movie, *CAMERA_ARGS, "--out", out, "--workers", "1")
    doc = json.loads((tmp_path / "spots.json").read_text())
    table = pd.read_csv(out)
    assert doc["command"] == "fit" and doc["n_spots"] == len(table)
    assert doc["output"] == {"path": str(out), "rows": len(table),
                             "size_bytes": out.stat().st_size}
    assert doc["input"]["path"] == str(movie) and doc["input"]["frames"] == 3
    assert doc["parameters"]["config"]["estimator"] is None  # as asked: the default
    assert doc["resolved"] == {"sigma": 1.3, "threshold": 5.0, "min_distance": 2,
                               "model": "rotated", "estimator": "mle", "integrated": True,
                               "window": 4, "unit": "photon"}
    assert doc["pixel_size_um"] == 0.107 and doc["pixel_size_from"] == "metadata"
    assert doc["run"]["solver_threads"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie.tif", "spots.csv", "spots.json"]


def test_sidecar_resolved_values_of_a_z_stack(tmp_path):
    stack = zstack(tmp_path / "stack.tif")
    ok("fit", stack, "--sigma-z", "1.5", "--out", tmp_path / "s.csv")
    resolved = json.loads((tmp_path / "s.json").read_text())["resolved"]
    assert resolved == {"sigma": 1.3, "sigma_z": 1.5, "threshold": 5.0, "min_distance": 2,
                        "min_distance_z": 2, "model": "elliptical", "estimator": "lsq",
                        "integrated": False, "window": 4, "window_z": 4, "unit": "ADU"}


@pytest.mark.parametrize("extra", [[], ["--window", "3", "--threshold", "6", "--model",
                                        "symmetric", "--pixel-size", "0.2"]])
def test_config_reads_the_sidecar_back_and_reproduces_the_table(tmp_path, extra):
    stack = zstack(tmp_path / "stack.tif")
    first = tmp_path / "first.csv"
    ok("fit", stack, "--sigma-z", "1.6", *CAMERA_ARGS, *extra, "--out", first)
    again = tmp_path / "again.csv"
    ok("fit", stack, "--config", tmp_path / "first.json", "--out", again)
    assert again.read_bytes() == first.read_bytes()
    resolved = [json.loads((tmp_path / f"{n}.json").read_text())["resolved"]
                for n in ("first", "again")]
    assert resolved[0] == resolved[1]
    detect = tmp_path / "detect.csv"  # detect takes the detection parameters of a fit's sidecar
    ok("detect", stack, "--config", tmp_path / "first.json", "--out", detect)
    assert json.loads((tmp_path / "detect.json").read_text())["resolved"]["sigma_z"] == 1.6


def test_no_sidecar_for_standard_output_devices_and_other_formats(cell, tmp_path):
    ok("fit", cell, "--out", "-")
    if Path("/dev/null").exists():
        ok("fit", cell, "--out", "/dev/null")
    ok("fit", cell, "--format", "thunderstorm", "--pixel-size", "0.1", "--out", tmp_path / "ts.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.tif", "ts.csv"]
    result = run("fit", cell, "--out", tmp_path / "t.json")
    assert result.exit_code == 2 and "its JSON sidecar would have the same name" in result.stderr


def test_table_and_sidecar_are_replaced_as_a_pair(cell, tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    ok("fit", cell, "--out", out)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(doc):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provenance, "_json_text", full)
    result = run("fit", cell, "--window", "3", "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: {out}: No space left on device"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # old pair, no leftovers


def test_sidecar_may_not_overwrite_the_input(tmp_path):
    image = tmp_path / "x.json"  # an image file with an odd name
    write_tiff(tmp_path / "x.tif", spots_image((NY, NX))[0], "YX")
    os.rename(tmp_path / "x.tif", image)
    result = run("detect", image, "--out", tmp_path / "x.csv")
    assert result.exit_code == 1 and "overwrite the input" in result.stderr
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------
# --qc with --series; µm columns once; empty tables
# ---------------------------------------------------------------------------
def _two_series(path):
    a = spots_image((NY, NX), seed=6)[0]
    b = np.ascontiguousarray(spots_image((NY, NX), seed=7)[0][:, : NX - 9])
    with tifffile.TiffWriter(path) as tw:
        tw.write(a)
        tw.write(b)
    return a, b


def test_qc_picture_of_a_series(tmp_path):
    path = tmp_path / "in" / "multi.tif"
    path.parent.mkdir()
    _two_series(path)
    ok("fit", path, "--series", "1", "--qc", "--out", tmp_path / "one.csv")
    assert (tmp_path / "one_qc.png").stat().st_size > 0
    assert json.loads((tmp_path / "one.json").read_text())["input"]["shape"] == [1, NY, NX - 9]
    ok("fit", path.parent, "--series", "1", "--qc", "--out-dir", tmp_path / "o", "--workers", "1")
    assert (tmp_path / "o" / "multi_qc.png").stat().st_size > 0
    ok("show", path, "--series", "1", "-o", tmp_path / "show.png")
    assert spotfit.fit(path, series=1).shape[0] == spotfit.detect(path, series=1).shape[0] > 0


def test_physical_units_are_added_once_with_the_given_pixel_size(movie, monkeypatch):
    calls = []
    real = spotfit.table.add_physical_units

    def counted(table, pixel_size, z_step=None):
        calls.append(pixel_size)
        return real(table, pixel_size, z_step)

    monkeypatch.setattr(spotfit.table, "add_physical_units", counted)
    table, info = process_file(movie, "fit", pixel_size=0.2)  # the file says 0.107
    assert calls == [0.2]
    assert list(table.columns).count("x_um") == 1
    np.testing.assert_allclose(table["x_um"], table["x"] * 0.2)
    np.testing.assert_allclose(table["y_um_err"], table["y_err"] * 0.2)
    assert (info["pixel_size_um"], info["pixel_size_from"]) == (0.2, "option")
    calls.clear()
    table, info = process_file(movie, "fit")
    assert calls == [0.107] and info["pixel_size_from"] == "metadata"
    np.testing.assert_allclose(table["x_um"], table["x"] * 0.107)


@pytest.mark.parametrize("crowded", [False, True])
@pytest.mark.parametrize("shape", [(NY, NX), (7, NY, NX)])
def test_empty_tables_have_the_dtypes_of_full_ones(shape, crowded):
    three_d = len(shape) == 3
    image, _ = spots_image(shape, z_stack=three_d, **({"sigma_z": 1.5} if three_d else {}))
    axes = "ZYX" if three_d else "YX"
    opts = dict(camera=CAMERA, axes=axes, crowded=crowded, model="symmetric")
    if three_d:
        opts["sigma_z"] = 1.5
    full = spotfit.fit(image, **opts)
    empty = spotfit.fit(np.full(shape, 100, np.uint16), **opts)
    assert len(full) > 0 and len(empty) == 0
    assert list(empty.columns) == list(full.columns)
    assert empty.dtypes.to_dict() == full.dtypes.to_dict()
    detected = spotfit.detect(image, axes=axes)
    nothing = spotfit.detect(np.full(shape, 100, np.uint16), axes=axes)
    assert nothing.dtypes.to_dict() == detected.dtypes.to_dict()
