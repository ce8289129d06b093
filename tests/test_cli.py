"""Tests for the command line (spotfit.cli), run in-process with click's CliRunner.

Every input file is made in ``tmp_path`` (with ``spotfit simulate`` itself or
tifffile); images are never square (61 x 83) so that x/y mix-ups show.
Inputs live in ``tmp_path / "in"`` and outputs go to ``tmp_path / "out"``, so
"nothing was left behind" is simply "the output folder is empty".
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
from spotfit import cli
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.config import FitConfig
from spotfit.match import match_spots
from spotfit.simulation import simulate
import spotfit.table
from spotfit.table import columns, write_table

NY, NX = 61, 83  # rows, columns: never square
N_SPOTS = 12
# Camera of the simulated test images, and the same as CLI options.
CAMERA = dict(baseline=100.0, gain=2.0, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]
# Bright, well separated spots away from the edges: every one must be found.
SIM_ARGS = [
    "--n-spots", str(N_SPOTS), "--photons", "2000", "--background", "10",
    "--sigma", "1.3", "--min-separation", "9", "--border", "4", *CAMERA_ARGS,
]
MATCH_RADIUS = 1.5  # px: detections are integer pixels, fits are much closer
FIT_TOLERANCE = 0.3  # px: 2000-photon spots are localised to ~0.05 px RMS
HEAVY = ("numpy", "scipy", "pandas", "skimage", "tifffile")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def run(*args):
    """Invoke the CLI in-process; the result must come from a clean exit.

    CliRunner reports an *uncaught* exception as exit code 1 too, so a bug
    could pass for a handled error: insist on SystemExit (or no exception).
    """
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"uncaught {type(result.exception).__name__}: {result.exception}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        ) from result.exception
    return result


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return result


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def assert_input_error(result, *names):
    """Exit 1, exactly one line on stderr, ``Error: ...`` naming `names`."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in result.output + result.stderr
    assert result.stdout == ""


def assert_usage_error(result, *names):
    """click's usage error: exit 2, one ``Error:`` line naming `names`."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in result.output + result.stderr
    assert result.stdout == ""


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def xy(table):
    return table[["x", "y"]].to_numpy()


@pytest.fixture
def dirs(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    return inp, out


@pytest.fixture
def sim2d(dirs):
    """A 61 x 83 simulated image (written by `spotfit simulate`) and its truth."""
    inp, _ = dirs
    tif = inp / "sim.tif"
    ok("simulate", tif, "--shape", f"{NY}x{NX}", *SIM_ARGS, "--seed", 3)
    return tif, pd.read_csv(inp / "sim_truth.csv")


@pytest.fixture
def sim_tyx(dirs):
    """A 3-frame TYX stack of 61 x 83 frames and its truth."""
    inp, _ = dirs
    tif = inp / "movie.tif"
    truth = inp / "movie_gt.csv"
    ok("simulate", tif, "--shape", f"3x{NY}x{NX}", *SIM_ARGS, "--seed", 4, "--truth", truth)
    return tif, pd.read_csv(truth)


# ---------------------------------------------------------------------------
# simulate -> detect -> fit
# ---------------------------------------------------------------------------
def test_simulate_writes_image_and_truth(sim2d):
    tif, truth = sim2d
    image = tifffile.imread(tif)
    assert image.shape == (NY, NX) and image.dtype == np.uint16
    assert len(truth) == N_SPOTS
    assert list(truth.columns[:3]) == ["frame", "x", "y"]
    assert (truth["frame"] == 0).all()
    assert truth["x"].between(4, NX - 5).all() and truth["y"].between(4, NY - 5).all()
    assert sorted(p.name for p in tif.parent.iterdir()) == ["sim.tif", "sim_truth.csv"]


def test_simulate_same_seed_same_files(dirs):
    inp, out = dirs
    ok("simulate", inp / "a.tif", "--shape", "20x31", "--seed", 7, "--photons", "500,900")
    ok("simulate", out / "b.tif", "--shape", "20x31", "--seed", 7, "--photons", "500,900")
    assert np.array_equal(tifffile.imread(inp / "a.tif"), tifffile.imread(out / "b.tif"))
    a, b = pd.read_csv(inp / "a_truth.csv"), pd.read_csv(out / "b_truth.csv")
    pd.testing.assert_frame_equal(a, b)
    assert a["intensity"].between(500, 900).all() and a["intensity"].nunique() > 1


def test_detect_2d_finds_every_spot(sim2d):
    tif, truth = sim2d
    result = ok("detect", tif, "--sigma", "1.3")
    found = pd.read_csv(io.StringIO(result.stdout))
    assert list(found.columns) == ["frame", "x", "y", "score"]
    i_found, _ = match_spots(xy(found), xy(truth), MATCH_RADIUS)
    assert len(i_found) == N_SPOTS
    assert len(found) <= N_SPOTS + 1  # at most one noise candidate
    assert f"{tif} (YX, 1 frame, pixel size unknown): {len(found)} candidates -> stdout" \
        in result.stderr


def test_fit_2d_out_file(sim2d, dirs):
    tif, truth = sim2d
    out = dirs[1] / "spots.csv"
    result = ok("fit", tif, *CAMERA_ARGS, "--out", out)
    assert result.stdout == ""  # the table went to the file
    table = pd.read_csv(out)
    assert list(table.columns) == columns(2)
    assert len(table) == N_SPOTS
    i_found, i_truth = match_spots(xy(table), xy(truth), MATCH_RADIUS)
    assert len(i_found) == N_SPOTS
    d = xy(table)[i_found] - xy(truth)[i_truth]
    assert np.abs(d).max() < FIT_TOLERANCE
    assert (table["status"] == "converged").all()
    assert (table["unit"] == "photon").all()
    assert (table["frame"] == 0).all()
    converged = int((table["status"] == "converged").sum())
    assert result.stderr.strip() == (
        f"{tif} (YX, 1 frame, pixel size unknown, photons): {N_SPOTS} spots ({converged} "
        f"converged, {N_SPOTS - converged} flagged) -> {out} + {dirs[1] / 'spots.json'}"
    )
    assert sorted(p.name for p in dirs[1].iterdir()) == ["spots.csv", "spots.json"]


def test_fit_stdout_is_clean_csv(sim2d):
    tif, truth = sim2d
    result = ok("fit", tif, *CAMERA_ARGS)
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns) == columns(2)
    assert len(table) == N_SPOTS
    assert "-> stdout" in result.stderr and "spots" not in result.stdout.splitlines()[0]


def test_fit_tyx_stack_frames(sim_tyx, dirs):
    tif, truth = sim_tyx
    assert tifffile.imread(tif).shape == (3, NY, NX)
    assert sorted(truth["frame"].unique()) == [0, 1, 2]
    out = dirs[1] / "movie.csv"
    ok("fit", tif, *CAMERA_ARGS, "-o", out)
    table = pd.read_csv(out)
    assert list(table.columns) == columns(2)
    assert sorted(table["frame"].unique()) == [0, 1, 2]
    for t in range(3):
        f, g = table[table["frame"] == t], truth[truth["frame"] == t]
        assert len(f) == len(g) == N_SPOTS
        i_found, i_truth = match_spots(xy(f), xy(g), MATCH_RADIUS)
        assert len(i_found) == N_SPOTS
        assert np.abs(xy(f)[i_found] - xy(g)[i_truth]).max() < FIT_TOLERANCE


def test_detect_tyx_stack_frames(sim_tyx):
    tif, truth = sim_tyx
    found = pd.read_csv(io.StringIO(ok("detect", tif).stdout))
    assert sorted(found["frame"].unique()) == [0, 1, 2]
    for t in range(3):
        f, g = found[found["frame"] == t], truth[truth["frame"] == t]
        assert len(match_spots(xy(f), xy(g), MATCH_RADIUS)[0]) == N_SPOTS


def test_cli_output_equals_library_output(sim2d, dirs):
    """The CLI is a thin layer: same options -> byte-identical table."""
    tif, _ = sim2d
    out = dirs[1] / "cli.csv"
    ok("fit", tif, *CAMERA_ARGS, "--model", "elliptical", "--estimator", "wlsq",
       "--point-sampled", "--window", "4", "--max-iter", "30", "--min-snr", "5",
       "--workers", "1", "--out", out)
    config = FitConfig(sigma=1.3, model="elliptical", estimator="wlsq", integrated=False,
                       window=4, max_iter=30, min_snr=5.0, workers=1)
    table = spotfit.fit(spotfit.read_image(tif), config=config, camera=Camera(**CAMERA))
    lib = dirs[1] / "lib.csv"
    write_table(table, lib)
    assert out.read_bytes() == lib.read_bytes()
    assert np.isnan(table["angle_err"]).all()  # elliptical: angle is fixed at 0


def test_fit_without_camera_reports_adu(sim2d):
    tif, _ = sim2d
    table = pd.read_csv(io.StringIO(ok("fit", tif, "--baseline", "100").stdout))
    assert len(table) == N_SPOTS and (table["unit"] == "ADU").all()


def test_fix_sigma(sim2d):
    tif, _ = sim2d
    table = pd.read_csv(io.StringIO(ok("fit", tif, *CAMERA_ARGS, "--fix-sigma",
                                       "--sigma", "1.5").stdout))
    assert np.allclose(table[["sigma_x", "sigma_y"]], 1.5)


def test_rgb_with_channel(dirs):
    inp, _ = dirs
    rgb = np.zeros((NY, NX, 3), np.uint8)
    rgb[20, 30, 1] = 200  # one bright pixel in the green channel
    tif = inp / "rgb.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb")
    found = pd.read_csv(io.StringIO(ok("detect", tif, "--channel", "1").stdout))
    assert found[["x", "y"]].values.tolist() == [[30.0, 20.0]]
    assert len(pd.read_csv(io.StringIO(ok("detect", tif, "--channel", "0").stdout))) == 0


def test_axes_override_reads_zstack_label_as_time(dirs):
    """An ImageJ movie mislabelled as Z: --axes TYX gives one frame per plane."""
    inp, _ = dirs
    image, _ = simulate((2, NY, NX), n_spots=5, photons=3000, min_separation=8,
                        border=4, seed=5)
    tif = inp / "labelled_z.tif"
    tifffile.imwrite(tif, image, imagej=True, metadata={"axes": "ZYX"})
    found = pd.read_csv(io.StringIO(ok("detect", tif, "--axes", "TYX").stdout))
    assert sorted(found["frame"].unique()) == [0, 1]


# ---------------------------------------------------------------------------
# empty results, inputs untouched
# ---------------------------------------------------------------------------
def test_image_without_spots_gives_header_only_csv(dirs):
    inp, out = dirs
    tif = inp / "flat.tif"
    tifffile.imwrite(tif, np.full((NY, NX), 100, np.uint16))
    for command in ("fit", "detect"):
        result = ok(command, tif, "--out", out / f"{command}.csv")
        text = (out / f"{command}.csv").read_text()
        assert text.count("\n") == 1, text  # the header line only
        assert f"{tif} (YX, 1 frame, pixel size unknown" in result.stderr
        assert "): 0 " in result.stderr
    assert (out / "fit.csv").read_text().strip().split(",") == columns(2)
    result = ok("fit", tif)
    assert result.stdout.strip().split(",") == columns(2)
    assert "0 spots (0 converged, 0 flagged)" in result.stderr


def test_noise_only_image_gives_few_or_no_spots(dirs):
    inp, _ = dirs
    ok("simulate", inp / "noise.tif", "--shape", f"{NY}x{NX}", "--n-spots", "0", "--seed", 1)
    assert len(pd.read_csv(inp / "noise_truth.csv")) == 0
    table = pd.read_csv(io.StringIO(ok("fit", inp / "noise.tif", "--gain", "1",
                                       "--baseline", "100").stdout))
    assert len(table) <= 2  # threshold 5 sigma: false detections are rare


def test_inputs_unchanged(sim2d, dirs):
    tif, _ = sim2d
    truth_csv = tif.parent / "sim_truth.csv"
    before = {p: digest(p) for p in (tif, truth_csv)}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    ok("fit", tif, *CAMERA_ARGS, "--out", dirs[1] / "a.csv")
    ok("detect", tif, "--out", dirs[1] / "b.csv")
    ok("fit", tif, "--axes", "YX")
    assert {p: digest(p) for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    assert sorted(p.name for p in tif.parent.iterdir()) == ["sim.tif", "sim_truth.csv"]


def test_out_over_input_is_refused(sim2d):
    tif, _ = sim2d
    before = digest(tif)
    for command in ("fit", "detect"):
        assert_input_error(run(command, tif, "--out", tif), tif, "input")
    assert digest(tif) == before


def test_failed_run_keeps_existing_output(dirs):
    inp, out = dirs
    bad = inp / "nan.tif"
    image = np.ones((NY, NX), np.float32)
    image[3, 5] = np.nan
    tifffile.imwrite(bad, image)
    old = out / "spots.csv"
    old.write_text("old results\n")
    assert_input_error(run("fit", bad, "--out", old), bad)
    assert old.read_text() == "old results\n"
    assert [p.name for p in out.iterdir()] == ["spots.csv"]


# ---------------------------------------------------------------------------
# bad input: one line, exit status, nothing left behind
# ---------------------------------------------------------------------------
def _bad_file(kind, inp: Path) -> Path:
    if kind == "missing":
        return inp / "missing.tif"
    path = inp / f"{kind}.tif"
    if kind == "not_tiff":
        path.write_text("frame,x,y\n0,1,2\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "rgb":
        tifffile.imwrite(path, np.zeros((NY, NX, 3), np.uint8), photometric="rgb")
    elif kind == "nan":
        image = np.ones((NY, NX), np.float32)
        image[10, 20] = np.nan
        tifffile.imwrite(path, image)
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("command", ["fit", "detect"])
@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["no such file"]),
        ("not_tiff", ["not a TIFF"]),
        ("empty", ["empty"]),
        ("rgb", ["--channel", "3 channels"]),
        ("nan", ["NaN"]),
        ("directory", ["directory"]),
    ],
)
def test_bad_input_file(dirs, command, kind, words):
    inp, out = dirs
    path = _bad_file(kind, inp)
    before = digest(path) if path.is_file() else None
    result = run(command, path, "--out", out / "spots.csv")
    assert_input_error(result, path, *words)
    assert list(out.iterdir()) == []  # no output, no temporary file
    if before is not None:
        assert digest(path) == before


@pytest.mark.parametrize("command", ["fit", "detect"])
def test_bad_input_to_stdout_writes_nothing(dirs, command):
    path = _bad_file("nan", dirs[0])
    assert_input_error(run(command, path), path)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--sigma", "-1"], "--sigma"),
        (["--sigma", "0"], "--sigma"),
        (["--sigma", "nan"], "--sigma"),
        (["--threshold", "0"], "--threshold"),
        (["--min-distance", "0"], "--min-distance"),
        (["--gain", "0"], "--gain"),
        (["--gain", "-2"], "--gain"),
        (["--em-gain", "0.5"], "--em-gain"),
        (["--read-noise", "-1"], "--read-noise"),
        (["--baseline", "inf"], "--baseline"),
        (["--channel", "-1"], "--channel"),
        (["--window", "0"], "--window"),
        (["--max-iter", "0"], "--max-iter"),
        (["--min-snr", "-1"], "--min-snr"),
        (["--workers", "0"], "--workers"),
        (["--model", "moffat"], "--model"),
        (["--estimator", "chi2"], "--estimator"),
        (["--sigma", "abc"], "--sigma"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_fit_bad_option(sim2d, dirs, args, option):
    tif, _ = sim2d
    out = dirs[1]
    result = run("fit", tif, *args, "--out", out / "spots.csv")
    assert_usage_error(result, option)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args, option", [(["--sigma", "-1"], "--sigma"),
                                          (["--threshold", "0"], "--threshold"),
                                          (["--channel", "-1"], "--channel"),
                                          (["--window", "3"], "--window")])
def test_detect_bad_option(sim2d, dirs, args, option):
    tif, _ = sim2d
    result = run("detect", tif, *args, "--out", dirs[1] / "c.csv")
    assert_usage_error(result, option)  # --window is a fit option only
    assert list(dirs[1].iterdir()) == []


def test_axes_not_fitting_the_file(sim2d, dirs):
    tif, _ = sim2d
    result = run("fit", tif, "--axes", "TYX", "--out", dirs[1] / "s.csv")
    assert_input_error(result, "--axes", tif)
    assert list(dirs[1].iterdir()) == []


def test_channel_on_file_without_channels(sim2d, dirs):
    tif, _ = sim2d
    assert_input_error(run("fit", tif, "--channel", "1", "--out", dirs[1] / "s.csv"),
                       "--channel", tif)
    assert list(dirs[1].iterdir()) == []


def test_missing_output_directory(sim2d, tmp_path):
    tif, _ = sim2d
    out = tmp_path / "nowhere" / "spots.csv"
    assert_input_error(run("fit", tif, *CAMERA_ARGS, "--out", out), out)
    assert not out.parent.exists()


def test_missing_image_argument():
    result = run("fit")
    assert_usage_error(result, "IMAGE")


@pytest.mark.parametrize(
    "args, option",
    [
        (["--shape", "61"], "--shape"),
        (["--shape", "0x83"], "--shape"),
        (["--shape", "2x3x4x5"], "--shape"),
        (["--photons", "-5"], "--photons"),
        (["--photons", "900,500"], "--photons"),
        (["--photons", "a,b"], "--photons"),
        (["--n-spots", "-1"], "--n-spots"),
        (["--background", "-1"], "--background"),
        (["--sigma", "0"], "--sigma"),
        (["--gain", "0"], "--gain"),
        (["--em-gain", "0.5"], "--em-gain"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_simulate_bad_option(dirs, args, option):
    out = dirs[1]
    assert_usage_error(run("simulate", out / "s.tif", *args), option)
    assert list(out.iterdir()) == []


def test_simulate_impossible_placement_leaves_nothing(dirs):
    out = dirs[1]
    result = run("simulate", out / "s.tif", "--shape", "20x31", "--n-spots", "500",
                 "--min-separation", "5")
    assert_input_error(result, "--n-spots")
    assert list(out.iterdir()) == []


def test_simulate_truth_directory_missing_leaves_nothing(dirs, tmp_path):
    out = dirs[1]
    truth = tmp_path / "nowhere" / "t.csv"
    assert_input_error(run("simulate", out / "s.tif", "--shape", "20x31", "--truth", truth), truth)
    assert list(out.iterdir()) == []


def test_simulate_truth_equal_to_image_is_refused(dirs):
    out = dirs[1]
    assert_input_error(run("simulate", out / "s.tif", "--truth", out / "s.tif"), "--truth")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------
# the CLI and the library agree on names and defaults
# ---------------------------------------------------------------------------
def _param(command, name):
    return next(p for p in main.commands[command].params if p.name == name)


def _defaults(command, *args):
    """The values a command receives for options the user did not give."""
    with main.commands[command].make_context(command, list(args) or ["x.tif"]) as ctx:
        return dict(ctx.params)


def test_choices_match_library():
    from spotfit.estimators import ESTIMATOR_NAMES
    from spotfit.models import MODEL_NAMES

    assert tuple(_param("fit", "model").type.choices) == tuple(MODEL_NAMES)
    assert tuple(_param("fit", "estimator").type.choices) == ("auto",) + tuple(ESTIMATOR_NAMES)


def test_fit_defaults_match_fitconfig():
    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    given = _defaults("fit")
    for name in ("sigma", "sigma_z", "threshold", "min_distance", "window", "model",
                 "integrated", "fix_sigma", "max_iter", "min_snr", "workers"):
        assert given[name] == defaults[name], name
    assert given["estimator"] is None and defaults["estimator"] is None  # shown as "auto"
    assert given["out"] == "-" and given["axes"] is None and given["channel"] is None
    assert _defaults("detect")["sigma"] == defaults["sigma"]
    camera = Camera()
    for command in ("fit", "detect"):
        for name in ("baseline", "gain", "em_gain", "read_noise"):
            assert _defaults(command)[name] == getattr(camera, name), (command, name)


def test_detector_default_threshold_in_help():
    from spotfit.detection import DEFAULT_THRESHOLD, default_min_distance

    assert f"the detector's, {DEFAULT_THRESHOLD:g}]" in _param("fit", "threshold").help
    assert default_min_distance(1.3) == round(1.5 * 1.3)


def test_simulate_defaults_match_library():
    from spotfit.simulation import DEFAULT_CAMERA

    sig = inspect.signature(simulate).parameters
    given = _defaults("simulate")
    for name in ("shape", "photons", "background", "sigma", "border", "min_separation", "seed"):
        assert given[name] == sig[name].default, name
    assert given["n_spots"] == 50  # simulate's documented default for n_spots=None
    assert given["truth"] is None  # OUT with _truth.csv
    for name in ("baseline", "gain", "em_gain", "read_noise"):
        assert given[name] == getattr(DEFAULT_CAMERA, name), name


def test_stdout_and_file_outputs_identical(sim2d, dirs):
    tif, _ = sim2d
    out = dirs[1] / "s.csv"
    to_file = ok("fit", tif, *CAMERA_ARGS, "--workers", "1", "--out", out)
    to_stdout = ok("fit", tif, *CAMERA_ARGS, "--workers", "1")
    assert to_file.stdout == ""
    assert to_stdout.stdout == out.read_text()


# ---------------------------------------------------------------------------
# --help, --version, lazy imports, real subprocesses
# ---------------------------------------------------------------------------
def test_help_lists_commands_and_options():
    text = ok("--help").stdout
    for command in ("detect", "fit", "simulate"):
        assert command in text
    fit_help = ok("fit", "--help").stdout
    for option in ("--axes", "--channel", "--sigma", "--threshold", "--min-distance",
                   "--baseline", "--gain", "--em-gain", "--read-noise", "--out", "--workers",
                   "--window", "--model", "--estimator", "--integrated", "--point-sampled",
                   "--fix-sigma", "--max-iter", "--min-snr"):
        assert option in fit_help, option
    sim_help = ok("simulate", "--help").stdout
    for option in ("--shape", "--n-spots", "--photons", "--background", "--sigma",
                   "--min-separation", "--border", "--seed", "--truth", "--gain"):
        assert option in sim_help, option


def test_version():
    assert ok("--version").stdout.strip() == f"spotfit {spotfit.__version__}"


_LAZY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from spotfit.cli import main

    runner = CliRunner()
    codes = {}
    for args in json.loads(sys.argv[1]):
        result = runner.invoke(main, args)  # standalone_mode: exits are caught
        codes[" ".join(args)] = [result.exit_code, type(result.exception).__name__]
    heavy = %r
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    print(json.dumps({"codes": codes, "loaded": loaded}))
    """
    % (HEAVY,)
)


def _run_lazy_script(argv_lists, cwd):
    proc = subprocess.run(
        [sys.executable, "-c", _LAZY_SCRIPT, json.dumps(argv_lists)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_do_not_import_the_scientific_stack(tmp_path):
    """--help, --version and usage errors import none of numpy/scipy/pandas/...

    Runs in a fresh interpreter (this test process has long imported numpy).
    Each invocation's exit code is checked too, so the test cannot pass by
    never reaching the command; a control run shows that a real command does
    import numpy, i.e. that the check can fail.
    """
    cheap = [
        ["--help"], ["--version"], ["fit", "--help"], ["detect", "--help"],
        ["simulate", "--help"], ["fit"], ["fit", "img.tif", "--sigma", "-1"],
        ["fit", "img.tif", "--model", "moffat"], ["detect", "img.tif", "--channel", "-1"],
        ["simulate", "s.tif", "--shape", "61"], ["nosuchcommand"],
    ]
    report = _run_lazy_script(cheap, tmp_path)
    codes = {k: v[0] for k, v in report["codes"].items()}
    assert codes == {
        "--help": 0, "--version": 0, "fit --help": 0, "detect --help": 0,
        "simulate --help": 0, "fit": 2, "fit img.tif --sigma -1": 2,
        "fit img.tif --model moffat": 2, "detect img.tif --channel -1": 2,
        "simulate s.tif --shape 61": 2, "nosuchcommand": 2,
    }
    assert report["loaded"] == []

    control = _run_lazy_script([["fit", "missing.tif"]], tmp_path)
    assert control["codes"]["fit missing.tif"] == [1, "SystemExit"]
    assert "numpy" in control["loaded"]


def _console_commands():
    script = Path(sys.executable).with_name("spotfit")
    return [
        pytest.param([str(script)], id="console-script",
                     marks=pytest.mark.skipif(not script.exists(),
                                              reason="console script not installed here")),
        pytest.param([sys.executable, "-m", "spotfit"], id="python-m"),
    ]


@pytest.mark.parametrize("command", _console_commands())
def test_real_subprocess(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(command + ["--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: spotfit ")
    assert "fit" in proc.stdout and proc.stderr == ""

    proc = subprocess.run(command + ["fit", "missing.tif"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "Error: missing.tif: no such file\n"
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# more options and data shapes
# ---------------------------------------------------------------------------
def test_mle_needs_a_gain(sim2d, dirs):
    tif, _ = sim2d
    result = run("fit", tif, "--estimator", "mle", "--out", dirs[1] / "s.csv")
    assert_input_error(result, "--estimator mle", "--gain")
    assert list(dirs[1].iterdir()) == []


def test_zstack_fitted_in_3d(dirs):
    """A z-stack stored without metadata (axes Q, Y, X) fitted with --axes ZYX."""
    inp, out = dirs
    image, truth = simulate((9, NY, NX), n_spots=6, photons=5000, background=5,
                            sigma=1.3, z_stack=True, sigma_z=1.5, min_separation=10,
                            border=5, seed=8)
    truth = truth[truth["z"].between(2, 6)]  # spots well inside the stack
    tif = inp / "stack.tif"
    tifffile.imwrite(tif, image)
    ok("fit", tif, "--axes", "ZYX", "--sigma-z", "1.5", "--gain", "1", "--baseline", "100",
       "--out", out / "stack.csv")
    table = pd.read_csv(out / "stack.csv")
    assert list(table.columns) == columns(3)
    assert (table["frame"] == 0).all()
    pos = ["x", "y", "z"]
    i_found, i_truth = match_spots(table[pos].to_numpy(), truth[pos].to_numpy(), MATCH_RADIUS)
    assert len(i_found) == len(truth)
    # without --axes the leading unknown axis is time: one 2D frame per plane
    found = pd.read_csv(io.StringIO(ok("detect", tif).stdout))
    assert "z" not in found.columns and found["frame"].max() > 0


# ---------------------------------------------------------------------------
# README and CI
# ---------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _readme_commands():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not available (installed package)")
    text = readme.read_text(encoding="utf-8")
    blocks = re.findall(r"^```\n(.*?)\n```", text, re.S | re.M)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_test_command_is_what_ci_runs():
    _, tests = _readme_commands()
    assert tests == (
        "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest -q"
    )
    ci = REPO / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run not available")
    lines = [line for line in ci.read_text().splitlines() if line and not line.startswith("#")]
    readme_pytest = tests.split("&&")[-1].strip().replace(".venv/bin/python", "PY")
    assert lines[-1].replace('"$venv/bin/python"', "PY") == readme_pytest


def test_readme_first_command_fits_the_sample(tmp_path):
    """The README's first command: its `spotfit fit ...` part, run in-process."""
    setup, _ = _readme_commands()
    fit_command = setup.split("&&")[-1].strip()
    argv = shlex.split(fit_command)
    assert argv[0] == ".venv/bin/spotfit" and argv[1] == "fit"
    image = REPO / argv[2]
    if not image.is_file():
        pytest.skip("sample_data not available")
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / argv[out])
    argv[2] = str(image)
    result = ok(*argv[1:])
    table = pd.read_csv(argv[out])
    truth = pd.read_csv(image.with_name("spots_truth.csv"))
    assert len(table) == len(truth) == 40
    assert (table["status"] == "converged").all() and (table["unit"] == "photon").all()
    i_found, i_truth = match_spots(xy(table), xy(truth), 0.5)
    assert len(i_found) == 40
    d = xy(table)[i_found] - xy(truth)[i_truth]
    assert np.sqrt(np.mean(d**2)) < 0.1  # px; measured 0.043, reported x_err ~0.04
    assert "40 spots (40 converged, 0 flagged)" in result.stderr


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs (in order, in one namespace)."""
    readme = REPO / "README.md"
    sample = REPO / "sample_data" / "spots.tif"
    if not readme.is_file() or not sample.is_file():
        pytest.skip("README.md or sample_data not available")
    (tmp_path / "sample_data").mkdir()
    (tmp_path / "sample_data" / "spots.tif").write_bytes(sample.read_bytes())
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```python\n(.*?)^```", readme.read_text(encoding="utf-8"),
                        re.S | re.M)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert len(pd.read_csv(tmp_path / "spots.csv")) == 40
    assert (tmp_path / "sim.tif").is_file() and (tmp_path / "sim_truth.csv").is_file()


def test_os_error_while_writing_is_one_line(sim2d, dirs, monkeypatch):
    """An OSError during writing (e.g. disk full) names --out, leaves nothing."""
    tif, _ = sim2d
    out = dirs[1] / "spots.csv"

    def disk_full(path, data):
        Path(path).write_text("partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(spotfit.table, "write_csv_bytes", disk_full)
    result = run("fit", tif, *CAMERA_ARGS, "--out", out)
    assert_input_error(result, out, "No space left on device")
    assert list(dirs[1].iterdir()) == []


# ---------------------------------------------------------------------------
# several inputs, --out-dir (whole experiments; more in test_batch.py)
# ---------------------------------------------------------------------------
def test_help_lists_batch_options():
    for command in ("fit", "detect"):
        text = ok(command, "--help").stdout
        for option in ("IMAGE...", "--out-dir", "--workers", "--skip-existing", "--config",
                       "--pixel-size", "--z-step", "--channel"):
            assert option in text, (command, option)


def test_one_input_with_out_dir_writes_csv_and_sidecar(sim2d, dirs):
    tif, _ = sim2d
    out = dirs[1] / "results"
    result = ok("fit", tif, *CAMERA_ARGS, "--workers", "1", "--out-dir", out)
    assert result.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "sim.csv", "sim.json"]
    assert result.stderr.strip() == f"1 files: 1 ok, 0 failed, 0 skipped; {N_SPOTS} spots in " \
        + result.stderr.strip().rsplit(" in ", 1)[1]
    single = ok("fit", tif, *CAMERA_ARGS, "--workers", "1").stdout
    assert (out / "sim.csv").read_text() == single
    sidecar = json.loads((out / "sim.json").read_text())
    assert sidecar["n_spots"] == N_SPOTS and sidecar["input"]["path"] == str(tif.resolve())


@pytest.mark.parametrize("command", ["fit", "detect"])
def test_several_inputs_need_out_dir(sim2d, dirs, command):
    tif, _ = sim2d
    out = dirs[1]
    assert_usage_error(run(command, tif, tif), "--out-dir")
    assert_usage_error(run(command, tif, tif, "--out", out / "x.csv"), "--out-dir")
    assert_usage_error(run(command, tif, "--out", out / "x.csv", "--out-dir", out), "--out")
    assert_usage_error(run(command, tif, "--skip-existing"), "--skip-existing", "--out-dir")
    assert list(out.iterdir()) == []


def test_folder_without_out_dir(dirs):
    inp, _ = dirs
    result = run("fit", inp)
    assert_input_error(result, inp, "directory", "--out-dir")


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "al"])
def test_bad_channel_value(sim2d, value):
    tif, _ = sim2d
    assert_usage_error(run("fit", tif, "--channel", value), "--channel")


def test_batch_usage_errors_do_not_import_the_scientific_stack(tmp_path):
    (tmp_path / "folder").mkdir()
    report = _run_lazy_script(
        [["fit", "a.tif", "b.tif"], ["detect", "a.tif", "--out", "x.csv", "--out-dir", "o"],
         ["fit", "a.tif", "--skip-existing"], ["fit", "a.tif", "--channel", "x"],
         ["fit", "folder"], ["fit", "a.tif", "--config", "missing.json"]],
        tmp_path,
    )
    codes = {k: v[0] for k, v in report["codes"].items()}
    assert codes == {
        "fit a.tif b.tif": 2, "detect a.tif --out x.csv --out-dir o": 2,
        "fit a.tif --skip-existing": 2, "fit a.tif --channel x": 2, "fit folder": 1,
        "fit a.tif --config missing.json": 1,
    }
    assert report["loaded"] == []


def test_fit_crowded_adds_group_columns(sim2d, dirs):
    """--crowded: same spots as the library's crowded fit, with group_id and group_size."""
    tif, _ = sim2d
    out = dirs[1] / "crowded.csv"
    result = run("fit", tif, *CAMERA_ARGS, "--crowded", "--group-radius", "2.5", "--out", out)
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == columns(2) + ["group_id", "group_size"]
    assert (table.group_size >= 1).all()
    result = run("fit", tif, *CAMERA_ARGS, "--max-group", "0")
    assert result.exit_code == 2 and "--max-group" in result.stderr
