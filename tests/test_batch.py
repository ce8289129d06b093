"""Whole experiments: several files / folders per run (spotfit.batch, --out-dir).

Every input is simulated in ``tmp_path`` (64 x 80 px, never square); the
CLI runs in-process with click's CliRunner, except where a worker process
or a killed run is the point of the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.api
import spotfit.batch as batch
import spotfit.io as sio
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.config import FitConfig
from spotfit.io import PagedStack, read_image, write_tiff
from spotfit.simulation import simulate
from spotfit.table import add_physical_units, columns

NY, NX = 64, 80  # rows, columns: never square
CAMERA = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]
SUMMARY = re.compile(
    r"^(\d+) files: (\d+) ok, (\d+) failed, (\d+) skipped; (\d+) spots in [0-9.]+ s$"
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def run(*args):
    """Invoke the CLI in-process; a bug (uncaught exception) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"uncaught {type(result.exception).__name__}: {result.exception}\n"
            f"stderr: {result.stderr}"
        ) from result.exception
    return result


def summary_of(result) -> tuple:
    """(files, ok, failed, skipped, spots) from the last stderr line."""
    match = SUMMARY.match(result.stderr.strip().splitlines()[-1])
    assert match, result.stderr
    return tuple(int(g) for g in match.groups())


def make_image(path: Path, seed: int, frames: int = 1, n_spots: int = 6, **tiff_options):
    """A simulated uint16 image (YX, or TYX with `frames` > 1), written with write_tiff."""
    shape = (frames, NY, NX) if frames > 1 else (NY, NX)
    image, truth = simulate(shape, n_spots=n_spots, photons=2000, background=10, sigma=1.3,
                            camera=CAMERA, min_separation=8, border=4, seed=seed)
    write_tiff(path, image, "TYX" if frames > 1 else "YX", **tiff_options)
    return truth


def make_bad(folder: Path) -> dict:
    """Corrupt, empty and wrong-pixel-type files -> the words their error must contain."""
    make_image(folder / "corrupt.tif", 99, frames=3)
    data = (folder / "corrupt.tif").read_bytes()
    (folder / "corrupt.tif").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "empty.tif").write_bytes(b"")
    tifffile.imwrite(folder / "complex.tif", np.ones((NY, NX), np.complex64))
    tifffile.imwrite(folder / "bool.tif", np.ones((NY, NX), bool))
    return {
        "bool.tif": "unsupported pixel type bool",
        "complex.tif": "unsupported pixel type complex64",
        "corrupt.tif": "corrupt or truncated",
        "empty.tif": "empty file",
    }


@pytest.fixture
def good(tmp_path) -> Path:
    """A folder with three good images (one of them a 2-frame movie)."""
    folder = tmp_path / "in"
    folder.mkdir()
    make_image(folder / "a.tif", 1)
    make_image(folder / "b.tif", 2)
    make_image(folder / "c.tif", 3, frames=2)
    return folder


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def outputs(stems, report=False) -> list:
    """CSV and sidecar per stem (and report.html: written by `spotfit fit --out-dir`)."""
    names = [f"{s}.{ext}" for s in stems for ext in ("csv", "json")]
    return sorted(names + (["report.html"] if report else []))


# ---------------------------------------------------------------------------
# good and bad files
# ---------------------------------------------------------------------------
def test_folder_with_good_and_bad_files(good, tmp_path):
    bad = make_bad(good)
    out = tmp_path / "out"
    result = run("fit", good, "--out-dir", out, *CAMERA_ARGS, "--workers", "1")
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    # one Error line per bad file, in input (name) order, then the summary
    assert len(lines) == len(bad) + 1
    for line, (name, words) in zip(lines, sorted(bad.items())):
        assert line.startswith(f"Error: {good / name}: "), line
        assert words in line, (words, line)
        assert line.count(str(good / name)) == 1  # the path is not repeated
    files, ok, failed, skipped, spots = summary_of(result)
    assert (files, ok, failed, skipped) == (7, 3, 4, 0)
    assert "Traceback" not in result.stderr
    # good files: a CSV and a sidecar each; nothing else (no temporary files)
    assert listing(out) == outputs("abc", report=True)
    assert spots == sum(len(pd.read_csv(out / f"{s}.csv")) for s in "abc")
    # the same table as the single-file command writes
    single = tmp_path / "single.csv"
    assert run("fit", good / "c.tif", *CAMERA_ARGS, "--workers", "1", "--out", single).exit_code == 0
    assert (out / "c.csv").read_bytes() == single.read_bytes()


def test_all_files_bad_and_all_good_exit_codes(good, tmp_path):
    assert run("detect", good, "--out-dir", tmp_path / "o1", "--workers", "1").exit_code == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    make_bad(bad)
    result = run("detect", bad, "--out-dir", tmp_path / "o2", "--workers", "1")
    assert result.exit_code == 1
    assert summary_of(result)[:4] == (4, 0, 4, 0)
    assert list((tmp_path / "o2").iterdir()) == []


def test_workers_1_and_2_give_identical_tables(good, tmp_path):
    make_bad(good)
    make_image(good / "d.tif", 4, frames=3)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run("fit", good, "--out-dir", one, *CAMERA_ARGS, "--workers", "1")
    r2 = run("fit", good, "--out-dir", two, *CAMERA_ARGS, "--workers", "2")
    assert r1.exit_code == r2.exit_code == 1  # the bad files fail in worker processes too
    assert summary_of(r1)[:5] == summary_of(r2)[:5]
    assert [l for l in r1.stderr.splitlines() if l.startswith("Error:")] == [
        l for l in r2.stderr.splitlines() if l.startswith("Error:")
    ]
    assert listing(one) == listing(two) == outputs("abcd", report=True)
    for stem in "abcd":
        assert (one / f"{stem}.csv").read_bytes() == (two / f"{stem}.csv").read_bytes(), stem
    run2 = json.loads((two / "a.json").read_text())["run"]
    assert (run2["processes"], run2["solver_threads"]) == (2, 1)


def test_unexpected_error_in_one_file_is_recorded(good, tmp_path, monkeypatch):
    real = spotfit.api.process_file

    def flaky(path, *args, **kwargs):
        if str(path).endswith("b.tif"):
            raise RuntimeError("boom")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(spotfit.api, "process_file", flaky)
    summary = batch.run_batch([good], tmp_path / "out", camera=CAMERA, workers=1)
    assert [r.status for r in summary.results] == ["ok", "failed", "ok"]
    assert "unexpected error" in summary.failed[0].message
    assert "RuntimeError: boom" in summary.failed[0].message
    assert listing(tmp_path / "out") == outputs("ac")


# ---------------------------------------------------------------------------
# interrupted runs and --skip-existing
# ---------------------------------------------------------------------------
_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import spotfit.batch as b
    import spotfit.provenance as p
    from spotfit.camera import Camera

    calls = [0]
    real = p._json_text

    def dying(doc):
        calls[0] += 1
        if calls[0] == 3:  # third file: its CSV is in a temporary, its sidecar not yet
            os.kill(os.getpid(), signal.SIGKILL)
        return real(doc)

    p._json_text = dying
    b.run_batch([sys.argv[1]], sys.argv[2], camera=Camera(baseline=100, gain=2, read_noise=1.5),
                workers=1, progress=False)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_batch_resumes_with_skip_existing(good, tmp_path):
    make_image(good / "d.tif", 4)
    out, clean = tmp_path / "out", tmp_path / "clean"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(good), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # a, b complete; c has nothing but hidden temporaries (CSV and sidecar are a
    # pair: both or neither); d nothing
    visible = [n for n in listing(out) if not n.startswith(".")]
    assert visible == ["a.csv", "a.json", "b.csv", "b.json"]
    assert any(n.startswith(".c.csv.") for n in listing(out))
    before = {n: (out / n).stat().st_mtime_ns for n in visible}

    result = run("fit", good, "--out-dir", out, *CAMERA_ARGS, "--skip-existing", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert summary_of(result)[:4] == (4, 2, 0, 2)
    assert listing(out) == outputs("abcd", report=True)  # the stale temporary files are gone
    for name in ("a.csv", "a.json", "b.csv", "b.json"):  # skipped: not rewritten
        assert (out / name).stat().st_mtime_ns == before[name], name

    assert run("fit", good, "--out-dir", clean, *CAMERA_ARGS, "--workers", "1").exit_code == 0
    for stem in "abcd":
        assert (out / f"{stem}.csv").read_bytes() == (clean / f"{stem}.csv").read_bytes(), stem


def test_skip_existing_redoes_what_changed(good, tmp_path):
    out = tmp_path / "out"
    args = ("fit", good, "--out-dir", out, *CAMERA_ARGS, "--workers", "1")
    assert summary_of(run(*args))[:4] == (3, 3, 0, 0)
    assert summary_of(run(*args, "--skip-existing"))[:4] == (3, 0, 0, 3)
    # --workers does not change results: still skipped
    assert summary_of(run(*args, "--skip-existing", "--workers", "2"))[:4] == (3, 0, 0, 3)
    # other parameters: everything is redone
    assert summary_of(run(*args, "--skip-existing", "--sigma", "1.4"))[:4] == (3, 3, 0, 0)
    assert summary_of(run(*args, "--skip-existing"))[:4] == (3, 3, 0, 0)  # back to 1.3
    # a modified input, a missing or broken sidecar, a replaced CSV: that file is redone
    st = (good / "a.tif").stat()
    os.utime(good / "a.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (out / "b.json").unlink()
    (out / "c.csv").write_text("frame,x\n")
    assert summary_of(run(*args, "--skip-existing"))[:4] == (3, 3, 0, 0)
    (out / "a.json").write_text("{not json")
    assert summary_of(run(*args, "--skip-existing"))[:4] == (3, 1, 0, 2)
    # without --skip-existing everything is redone
    assert summary_of(run(*args))[:4] == (3, 3, 0, 0)


# ---------------------------------------------------------------------------
# sidecar and --config
# ---------------------------------------------------------------------------
def test_sidecar_contents(good, tmp_path):
    out = tmp_path / "out"
    assert run("fit", good / "c.tif", "--out-dir", out, *CAMERA_ARGS, "--sigma", "1.4",
               "--model", "elliptical", "--pixel-size", "0.1", "--workers", "1").exit_code == 0
    doc = json.loads((out / "c.json").read_text())
    table = pd.read_csv(out / "c.csv")
    src = good / "c.tif"
    assert doc["spotfit_version"] == spotfit.__version__
    assert doc["command"] == "fit"
    datetime.fromisoformat(doc["date"])
    assert doc["input"]["path"] == str(src.resolve())
    assert doc["input"]["size_bytes"] == src.stat().st_size
    assert doc["input"]["mtime_ns"] == src.stat().st_mtime_ns
    datetime.fromisoformat(doc["input"]["mtime"])
    assert doc["input"]["shape"] == [2, NY, NX]
    assert (doc["input"]["axes"], doc["input"]["dtype"], doc["input"]["frames"]) == (
        "TYX", "uint16", 2)
    assert doc["output"]["path"] == str((out / "c.csv").resolve())
    assert doc["output"]["rows"] == doc["n_spots"] == len(table) > 0
    assert sum(doc["status_counts"].values()) == len(table)
    assert doc["status_counts"]["converged"] == int((table["status"] == "converged").sum())
    params = doc["parameters"]
    expected = dict(FitConfig(sigma=1.4, model="elliptical", workers=1).as_dict())
    assert params["config"] == expected  # every FitConfig field
    assert params["camera"] == CAMERA.as_dict()
    assert (params["task"], params["axes"], params["channel"]) == ("fit", None, None)
    assert (params["pixel_size"], params["z_step"]) == (0.1, None)
    assert (doc["pixel_size_um"], doc["pixel_size_from"]) == (0.1, "option")
    assert doc["z_step_um"] is None
    assert set(doc["timings_s"]) == {"read", "fit", "write", "total"}
    assert all(v >= 0 for v in doc["timings_s"].values())
    assert doc["run"]["workers"] == 1


def test_config_round_trip_reproduces_the_csv(good, tmp_path):
    first, again, single = tmp_path / "first", tmp_path / "again", tmp_path / "single.csv"
    assert run("fit", good / "a.tif", "--out-dir", first, *CAMERA_ARGS, "--sigma", "1.4",
               "--threshold", "6", "--model", "elliptical", "--window", "4", "--min-snr", "2",
               "--estimator", "wlsq", "--point-sampled", "--max-iter", "30",
               "--pixel-size", "0.107").exit_code == 0
    sidecar = first / "a.json"
    assert run("fit", good / "a.tif", "--out-dir", again, "--config", sidecar).exit_code == 0
    assert (again / "a.csv").read_bytes() == (first / "a.csv").read_bytes()
    p1 = json.loads(sidecar.read_text())["parameters"]
    assert json.loads((again / "a.json").read_text())["parameters"] == p1
    assert "x_um" in pd.read_csv(again / "a.csv").columns  # --pixel-size came back too
    # single-file mode takes --config too
    assert run("fit", good / "a.tif", "--config", sidecar, "--out", single).exit_code == 0
    assert single.read_bytes() == (first / "a.csv").read_bytes()
    # options given on the command line win over the file
    over = tmp_path / "over"
    assert run("fit", good / "a.tif", "--out-dir", over, "--config", sidecar,
               "--sigma", "1.3").exit_code == 0
    p3 = json.loads((over / "a.json").read_text())["parameters"]
    assert p3["config"]["sigma"] == 1.3
    assert {k: v for k, v in p3["config"].items() if k != "sigma"} == {
        k: v for k, v in p1["config"].items() if k != "sigma"}
    assert p3["camera"] == p1["camera"]


def test_config_plain_json_and_detect(good, tmp_path):
    plain = tmp_path / "params.json"
    plain.write_text(json.dumps({"sigma": 1.4, "--read-noise": 1.5, "gain": 2,
                                 "baseline": 100, "model": "elliptical"}))
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run("fit", good / "a.tif", "--config", plain, "--out", a).exit_code == 0
    assert run("fit", good / "a.tif", "--sigma", "1.4", *CAMERA_ARGS, "--model", "elliptical",
               "--out", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    # detect accepts a fit sidecar: its fit-only parameters are left out
    out = tmp_path / "out"
    assert run("fit", good / "a.tif", "--out-dir", out, "--sigma", "1.4",
               "--window", "4").exit_code == 0
    c, d = tmp_path / "c.csv", tmp_path / "d.csv"
    assert run("detect", good / "a.tif", "--config", out / "a.json", "--out", c).exit_code == 0
    assert run("detect", good / "a.tif", "--sigma", "1.4", "--out", d).exit_code == 0
    assert c.read_bytes() == d.read_bytes()


@pytest.mark.parametrize(
    "content, code, words",
    [
        ('{"sigma": 1.4, "bogus": 1}', 1, ["unknown parameter", "bogus"]),
        ("{not json", 1, ["not valid JSON"]),
        ("[1, 2]", 1, ["JSON object"]),
        ('{"sigma": -1}', 2, ["--sigma"]),
        ('{"camera": {"gain": "map((64, 80))"}}', 1, ["per-pixel map"]),
    ],
)
def test_config_errors(good, tmp_path, content, code, words):
    config = tmp_path / "bad.json"
    config.write_text(content)
    result = run("fit", good / "a.tif", "--config", config, "--out", tmp_path / "x.csv")
    assert result.exit_code == code, result.stderr
    error = [l for l in result.stderr.splitlines() if l.startswith("Error:")]
    assert len(error) == 1 and all(w in error[0] for w in words), result.stderr
    assert not (tmp_path / "x.csv").exists()


def test_config_missing_file(good, tmp_path):
    result = run("fit", good / "a.tif", "--config", tmp_path / "nope.json")
    assert result.exit_code == 1
    assert "nope.json: no such file" in result.stderr


# ---------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------
def test_name_clash_is_refused_before_any_work(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        make_image(tmp_path / sub / "cell.tif", 1)
    out = tmp_path / "out"
    result = run("fit", tmp_path / "x", tmp_path / "y", "--out-dir", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(tmp_path / "x" / "cell.tif") in lines[0]
    assert str(tmp_path / "y" / "cell.tif") in lines[0]
    assert str(out / "cell.csv") in lines[0]
    assert not out.exists()


def test_inputs_files_folders_and_patterns(good, tmp_path):
    (good / "notes.txt").write_text("not an image")
    (good / ".hidden.tif").write_bytes(b"")
    sub = good / "sub"
    sub.mkdir()
    make_image(sub / "deep.tif", 5)  # folders are not searched recursively
    make_image(tmp_path / "extra.TIFF", 6)
    assert batch.expand_inputs([good]) == [str(good / n) for n in ("a.tif", "b.tif", "c.tif")]
    files = batch.expand_inputs([str(good / "*.tif"), good / "a.tif", tmp_path / "extra.TIFF"])
    assert files == [str(good / n) for n in ("a.tif", "b.tif", "c.tif")] + [
        str(tmp_path / "extra.TIFF")]  # a.tif only once
    out = tmp_path / "out"
    result = run("detect", str(good / "[ab].tif"), tmp_path / "extra.TIFF", "--out-dir", out)
    assert result.exit_code == 0, result.stderr
    assert listing(out) == outputs(["a", "b", "extra"])


def test_missing_file_in_batch_is_a_failure(good, tmp_path):
    result = run("detect", good / "a.tif", good / "nope.tif", "--out-dir", tmp_path / "out")
    assert result.exit_code == 1
    assert f"Error: {good / 'nope.tif'}: no such file" in result.stderr
    assert summary_of(result)[:4] == (2, 1, 1, 0)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("fit", tmp_path / "empty", "--out-dir", tmp_path / "out")
    assert result.exit_code == 1
    assert "no image files" in result.stderr


def test_run_batch_api(good, tmp_path):
    summary = batch.run_batch([good], tmp_path / "out", task="detect", workers=1,
                              progress=False)
    assert [Path(r.input).name for r in summary.results] == ["a.tif", "b.tif", "c.tif"]
    assert [r.status for r in summary.results] == ["ok"] * 3
    assert summary.n_spots == sum(r.n_spots for r in summary.results)
    assert summary.line().startswith("3 files: 3 ok, 0 failed, 0 skipped; ")
    table = pd.read_csv(summary.results[0].output)
    assert list(table.columns) == ["frame", "x", "y", "score"]


def test_progress_bar_only_when_asked_or_on_a_terminal(good, tmp_path, capsys):
    batch.run_batch([good], tmp_path / "o1", task="detect", workers=1, progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "3/3 files" in err and "ETA" in err
    assert err.endswith("\r")  # the bar is cleared at the end
    batch.run_batch([good], tmp_path / "o2", task="detect", workers=1)  # not a terminal
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# --channel all, physical units
# ---------------------------------------------------------------------------
def test_channel_all_adds_a_channel_column(tmp_path):
    a, _ = simulate((NY, NX), n_spots=5, photons=3000, camera=CAMERA, min_separation=8,
                    border=4, seed=1)
    b, _ = simulate((NY, NX), n_spots=7, photons=3000, camera=CAMERA, min_separation=8,
                    border=4, seed=2)
    tif = tmp_path / "two.tif"
    tifffile.imwrite(tif, np.stack([a, b]), imagej=True, metadata={"axes": "CYX"},
                     compression="zlib")
    out = tmp_path / "all.csv"
    assert run("fit", tif, "--channel", "all", *CAMERA_ARGS, "--out", out).exit_code == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["frame", "channel"] + columns(2)[1:]
    assert sorted(table["channel"].unique()) == [0, 1]
    for c in (0, 1):
        one = tmp_path / f"c{c}.csv"
        assert run("fit", tif, "--channel", c, *CAMERA_ARGS, "--out", one).exit_code == 0
        expected = pd.read_csv(one)
        got = table[table["channel"] == c].drop(columns="channel").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    # a file without channels: channel 0
    make_image(tmp_path / "plain.tif", 3)
    plain = pd.read_csv(pd.io.common.StringIO(
        run("detect", tmp_path / "plain.tif", "--channel", "all").stdout))
    assert (plain["channel"] == 0).all() and len(plain) > 0


def test_physical_units_from_metadata_and_option(tmp_path):
    make_image(tmp_path / "cal.tif", 1, pixel_size=0.1)
    make_image(tmp_path / "raw.tif", 1)
    table = pd.read_csv(pd.io.common.StringIO(run("fit", tmp_path / "cal.tif", *CAMERA_ARGS).stdout))
    assert list(table.columns) == columns(2) + ["x_um", "y_um", "x_um_err", "y_um_err"]
    np.testing.assert_allclose(table["x_um"], table["x"] * 0.1, rtol=1e-6)
    np.testing.assert_allclose(table["y_um_err"], table["y_err"] * 0.1, rtol=1e-6)
    # --pixel-size wins over the metadata; no pixel size, no µm columns
    over = pd.read_csv(pd.io.common.StringIO(
        run("fit", tmp_path / "cal.tif", *CAMERA_ARGS, "--pixel-size", "0.2").stdout))
    np.testing.assert_allclose(over["x_um"], over["x"] * 0.2, rtol=1e-6)
    raw = pd.read_csv(pd.io.common.StringIO(run("fit", tmp_path / "raw.tif", *CAMERA_ARGS).stdout))
    assert list(raw.columns) == columns(2)
    det = pd.read_csv(pd.io.common.StringIO(run("detect", tmp_path / "cal.tif").stdout))
    assert list(det.columns) == ["frame", "x", "y", "score", "x_um", "y_um"]


def test_physical_units_3d():
    image, _ = simulate((9, NY, NX), n_spots=4, photons=5000, background=5, z_stack=True,
                        sigma_z=1.5, min_separation=10, border=5, seed=8)
    img = sio.Image.from_array(image, "ZYX", pixel_size=0.1, z_step=0.3)
    with_units = spotfit.detect(img, sigma=1.3, sigma_z=1.5)  # from the image's metadata, as fit
    found = spotfit.detect(sio.Image.from_array(image, "ZYX"), sigma=1.3, sigma_z=1.5)
    both = add_physical_units(found, 0.1, 0.3)
    pd.testing.assert_frame_equal(with_units, both)
    assert list(both.columns) == ["frame", "x", "y", "z", "score", "x_um", "y_um", "z_um"]
    np.testing.assert_allclose(both["z_um"], found["z"] * 0.3)
    lateral = add_physical_units(found, 0.1, None)
    assert "z_um" not in lateral.columns and "x_um" in lateral.columns
    assert add_physical_units(found, None, 0.3) is found
    fake = pd.DataFrame({"x": [1.0], "y": [2.0], "z": [3.0], "x_err": [0.1], "y_err": [0.2],
                         "z_err": [0.5]})
    got = add_physical_units(fake, 0.1, 0.3)
    assert got.loc[0, "z_um_err"] == pytest.approx(0.15)
    with pytest.raises(spotfit.SpotfitInputError, match="pixel_size must be a positive") as err:
        add_physical_units(fake, -1, None)
    assert err.value.parameter == "pixel_size"


def test_z_step_from_option_for_zstacks(tmp_path):
    image, _ = simulate((9, NY, NX), n_spots=4, photons=5000, background=5, z_stack=True,
                        sigma_z=1.5, min_separation=10, border=5, seed=8)
    tif = tmp_path / "stack.tif"
    write_tiff(tif, image, "ZYX", pixel_size=0.1)
    out = tmp_path / "out"
    assert run("detect", tif, "--sigma-z", "1.5", "--z-step", "0.25", "--out-dir", out).exit_code == 0
    table = pd.read_csv(out / "stack.csv")
    np.testing.assert_allclose(table["z_um"], table["z"] * 0.25)
    np.testing.assert_allclose(table["x_um"], table["x"] * 0.1, rtol=1e-6)
    doc = json.loads((out / "stack.json").read_text())
    assert (doc["pixel_size_from"], doc["z_step_from"]) == ("metadata", "option")
    assert doc["status_counts"] is None  # detection has no status


# ---------------------------------------------------------------------------
# large stacks: frame by frame
# ---------------------------------------------------------------------------
def _compressed_stack(path: Path, n_frames: int, dtype="uint16", shape=(NY, NX)):
    data = np.random.default_rng(0).integers(0, 1000, size=(n_frames, *shape)).astype(dtype)
    tifffile.imwrite(path, data, compression="zlib", imagej=True, metadata={"axes": "TYX"})
    return data


def test_compressed_stack_is_read_page_by_page(tmp_path, monkeypatch):
    data = _compressed_stack(tmp_path / "z.tif", 6)
    keys = []
    real = tifffile.TiffFile.asarray

    def spy(self, key=None, **kwargs):
        keys.append(key)
        return real(self, key=key, **kwargs)

    def whole(self, *args, **kwargs):
        raise AssertionError("the whole series was loaded")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", spy)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole)
    img = read_image(tmp_path / "z.tif")
    assert isinstance(img.data, PagedStack)
    assert keys == []  # nothing decoded yet
    for t, frame in img.frames():
        np.testing.assert_array_equal(frame, data[t])
        assert keys[-1] == [t]  # only the page of this frame
    assert len(keys) == 6
    # the fit reads it the same way (one page per frame)
    keys.clear()
    spotfit.fit(img, camera=Camera(baseline=0))
    assert keys == [[t] for t in range(6)]


def test_compressed_stack_memory_is_one_frame(tmp_path):
    n_frames, shape = 40, (256, 320)
    data = _compressed_stack(tmp_path / "big.tif", n_frames, shape=shape)
    frame_bytes = data[0].nbytes
    del data
    tracemalloc.start()
    try:
        img = read_image(tmp_path / "big.tif")
        total = 0
        for _, frame in img.frames():
            total += int(frame[0, 0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * frame_bytes, (peak, frame_bytes)  # the stack is 40 frames


def test_nan_check_of_compressed_float_stack_is_blockwise(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "_SCAN_BYTES", 1)  # one frame per block
    n_frames, shape = 30, (256, 320)
    data = _compressed_stack(tmp_path / "f.tif", n_frames, dtype="float32", shape=shape)
    frame_bytes = data[0].nbytes
    tifffile.imwrite(tmp_path / "nan.tif", np.where(np.arange(n_frames)[:, None, None] == 29,
                                                    np.nan, data).astype("float32"),
                     compression="zlib", imagej=True, metadata={"axes": "TYX"})
    del data
    tracemalloc.start()
    try:
        read_image(tmp_path / "f.tif")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * frame_bytes, (peak, frame_bytes)  # the stack is 30 frames
    with pytest.raises(spotfit.SpotfitInputError, match="NaN"):
        read_image(tmp_path / "nan.tif")


def test_memory_mapped_frames_are_read_through_the_file_not_the_map(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 1000, size=(5, NY, NX)).astype("uint16")
    path = tmp_path / "mm.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX"})
    img = read_image(path)
    assert isinstance(img.data, np.memmap)
    reads = []
    real = img.reader.read
    monkeypatch.setattr(img.reader, "read", lambda view: (reads.append(view.shape), real(view))[1])
    for t, frame in img.frames():
        assert type(frame) is np.ndarray and frame.flags.c_contiguous and frame.flags.writeable
        assert not np.shares_memory(frame, img.data)
        np.testing.assert_array_equal(frame, data[t])
    assert reads == [(NY, NX)] * 5
    img.close()


def test_paged_stack_hyperstack_channel_and_axes(tmp_path):
    data = np.random.default_rng(2).integers(0, 1000, size=(3, 4, 2, NY, NX)).astype("uint16")
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, data, imagej=True, compression="zlib", metadata={"axes": "TZCYX"})
    img = read_image(path, channel=1)
    assert isinstance(img.data, PagedStack) and img.axes == "TZYX"
    assert img.data.shape == (3, 4, NY, NX)
    for t, frame in img.frames():
        np.testing.assert_array_equal(frame, data[t, :, 1])
    np.testing.assert_array_equal(np.asarray(img.data), data[:, :, 1])
    np.testing.assert_array_equal(img.data[1:3, 2], data[1:3, 2, 1])
    assert sio.count_channels(path) == 2
    img.data.close()


def test_truncated_compressed_stack_is_reported_at_read(tmp_path):
    _compressed_stack(tmp_path / "z.tif", 6)
    raw = (tmp_path / "z.tif").read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(raw[:-200])
    with pytest.raises(spotfit.SpotfitInputError, match="corrupt or truncated"):
        read_image(bad)
