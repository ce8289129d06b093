"""One vocabulary: the command line's options are FitConfig's fields, library errors name
Python parameters and the command line names its options, the README's option tables are
the commands' options, and ``--workers`` means cores in total.

Images are made in ``tmp_path``, never square (41 x 57) so x/y mix-ups show.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.batch as batch
from spotfit.camera import Camera
from spotfit.cli import _as_options, main
from spotfit.config import FitConfig, option_metadata
from spotfit.errors import SpotfitInputError
from spotfit.io import write_tiff
from spotfit.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]
NY, NX = 41, 57
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}: {result.stderr}") from result.exception
    return result


def errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def make_image(path, frames=1, seed=1):
    shape = (frames, NY, NX) if frames > 1 else (NY, NX)
    image, _ = simulate(shape, n_spots=4, photons=2000, background=10, sigma=1.3,
                        camera=Camera(baseline=100, gain=2), min_separation=9, border=5,
                        seed=seed)
    write_tiff(path, image, "TYX" if frames > 1 else "YX")
    return image


def param(command, name):
    return next(p for p in main.commands[command].params if p.name == name)


# ---------------------------------------------------------------------------
# options made from FitConfig's metadata
# ---------------------------------------------------------------------------
GROUPS = {"fit": ("detection", "fit", "run"), "show": ("detection", "fit", "run"),
          "detect": ("detection", "run")}


@pytest.mark.parametrize("command", sorted(GROUPS))
def test_options_are_made_from_the_fields_metadata(command):
    """Name, default, choices, bounds and help of every option come from the field."""
    names = {p.name for p in main.commands[command].params}
    for name, meta in option_metadata().items():
        if meta["group"] not in GROUPS[command]:
            assert name not in names, (command, name)
            continue
        p = param(command, name)
        assert p.opts[0] == meta["cli"].split("/")[0], name
        assert p.help == meta["help"], name
        if meta["auto"]:  # --estimator auto means None
            assert p.default == meta["auto"] and p.type.choices[0] == meta["auto"]
            assert p.process_value(click.Context(main.commands[command]), "auto") is None
        else:
            assert p.default == meta["default"], name
        if meta["kind"] == "choice":
            assert tuple(p.type.choices[1 if meta["auto"] else 0:]) == meta["choices"], name
        elif meta["kind"] in ("real", "whole"):
            assert p.type.min == meta["low"], name
            assert bool(getattr(p.type, "min_open", False)) == (
                meta["kind"] == "real" and not meta["inclusive"]), name
        elif meta["kind"] == "flag":
            assert p.is_flag or p.secondary_opts, name


def test_validation_follows_the_same_metadata():
    """A value at a bound is refused exactly when the option refuses it too."""
    for name, meta in option_metadata().items():
        if meta["kind"] not in ("real", "whole"):
            continue
        at_low = meta["low"]
        allowed = meta["kind"] == "whole" or meta["inclusive"]
        if allowed:
            FitConfig(**{name: at_low})
        else:
            with pytest.raises(SpotfitInputError) as err:
                FitConfig(**{name: at_low})
            assert err.value.parameter == name and str(err.value).startswith(name)
        result = run("fit", "x.tif", meta["cli"], str(at_low))
        assert (result.exit_code == 2) != allowed, (name, result.stderr)  # usage error: refused


def test_estimator_auto_and_integrated_default_are_none():
    with main.commands["fit"].make_context("fit", ["x.tif"]) as ctx:
        assert ctx.params["estimator"] is None and ctx.params["integrated"] is None
    with main.commands["fit"].make_context("fit", ["x.tif", "--estimator", "mle",
                                                   "--point-sampled"]) as ctx:
        assert ctx.params["estimator"] == "mle" and ctx.params["integrated"] is False


# ---------------------------------------------------------------------------
# library messages name parameters; the command line names options
# ---------------------------------------------------------------------------
_OPTION = re.compile(r"(?<![\w-])--[a-z]")


def _option_names_in_messages(source: str) -> list:
    """String pieces naming a ``--option`` in SpotfitInputError(...) or warnings.warn(...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name not in ("SpotfitInputError", "warn"):
            continue
        for arg in node.args[:1]:
            for piece in ast.walk(arg):
                if isinstance(piece, ast.Constant) and isinstance(piece.value, str) \
                        and _OPTION.search(piece.value):
                    found.append(piece.value)
    return found


def test_the_scanner_finds_an_option_in_a_message():
    assert _option_names_in_messages('raise SpotfitInputError(f"{x}: give --axes TYX")')
    assert _option_names_in_messages('warnings.warn("use --gain", SpotfitWarning)')
    assert not _option_names_in_messages('raise SpotfitInputError("give `axes`")')


def test_library_messages_name_parameters_not_options():
    """Only the command line (and the batch's own usage notes) speaks in options."""
    offenders = {}
    for path in sorted((ROOT / "spotfit").rglob("*.py")):
        if path.name == "cli.py":
            continue
        found = _option_names_in_messages(path.read_text(encoding="utf-8"))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_as_options_maps_parameters_to_this_commands_options():
    with main.commands["fit"].make_context("fit", ["x.tif"]):
        assert _as_options("sigma must be > 0", "sigma") == "--sigma must be > 0"
        assert _as_options("sigma_z must be > 0", "sigma_z") == "--sigma-z must be > 0"
        assert _as_options("sigmas are wrong", "sigma") == "sigmas are wrong"
        assert _as_options("give `axes='TZYX'` or `channel`") == "give --axes TZYX or --channel"
        assert _as_options("choose one with `series=N`") == "choose one with --series N"
        assert _as_options("give `width` and `height`") == "give width and height"
        assert _as_options("`pixel_size` is in µm") == "--pixel-size is in µm"
    with main.commands["render"].make_context("render", ["s.csv", "-o", "x.tif",
                                                         "--pixel-size", "10"]):
        assert _as_options("give it with `camera_pixel_size`") == \
            "give it with --camera-pixel-size"


def test_errors_about_axes_channel_series_and_camera_name_the_options(tmp_path):
    qq = tmp_path / "qq.tif"
    tifffile.imwrite(qq, np.zeros((3, 2, NY, NX), np.uint16))  # stored as QQYX
    result = run("detect", qq)
    assert errors(result) == [
        f"Error: {qq}: cannot tell what axis 'Q' (size 3) is (axes 'QQYX', shape "
        f"(3, 2, {NY}, {NX})); give all axes with --axes, e.g. --axes TZYX"]
    assert "--axes 'TYX' does not fit" in errors(run("detect", qq, "--axes", "TYX"))[0]
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((NY, NX, 3), np.uint8), photometric="rgb")
    assert errors(run("detect", rgb)) == [
        f"Error: {rgb} has 3 channels (axis S; samples per pixel, e.g. RGB); choose one with "
        "--channel (0 to 2), or give --axes if axis S is not channels"]
    assert errors(run("detect", rgb, "--channel", "3"))[0].startswith(
        f"Error: --channel 3 is out of range for {rgb}")
    cell = tmp_path / "cell.tif"
    make_image(cell)
    assert errors(run("fit", cell, "--invert", "--gain", "2"))[0].startswith(
        "Error: --invert cannot be combined with a camera calibration (--gain)")


def test_errors_of_show_render_and_export_name_their_options(tmp_path):
    cell = tmp_path / "cell.tif"
    make_image(cell)
    spots = tmp_path / "spots.csv"
    assert run("fit", cell, "--out", spots).exit_code == 0
    result = run("show", cell, spots, "-o", tmp_path / "q.png", "--crop", "0:1000,0:5")
    assert errors(result)[0].startswith("Error: --crop 0:1000,0:5 is not inside the image")
    result = run("render", spots, "-o", tmp_path / "r.tif", "--pixel-size", "10")
    assert "give it in nm with --camera-pixel-size" in errors(result)[0]
    result = run("export", spots, "--format", "thunderstorm")
    assert "give --pixel-size in µm (e.g. --pixel-size 0.16 for 160 nm pixels)" in \
        errors(result)[0]


def test_api_errors_carry_the_parameter(tmp_path):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((NY, NX, 3), np.uint8), photometric="rgb")
    with pytest.raises(SpotfitInputError, match="choose one with `channel`") as err:
        spotfit.read_image(rgb)
    assert err.value.parameter == "channel"
    with pytest.raises(SpotfitInputError) as err:
        spotfit.read_image(rgb, axes="YX")
    assert err.value.parameter == "axes" and str(err.value).startswith("axes 'YX' does not fit")
    with pytest.raises(SpotfitInputError) as err:
        Camera(gain=-1)
    assert err.value.parameter == "gain"


# ---------------------------------------------------------------------------
# the README's option tables are the commands' options
# ---------------------------------------------------------------------------
def _readme_table(command: str) -> list:
    """Rows (cells) of the first table after the heading of ``spotfit <command>``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"### `spotfit {command}`")
    rows, inside = [], False
    for line in text[start:].splitlines()[1:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("| option |"):  # the header of the options table
            inside = True
        elif inside and line.startswith("|"):
            if not set(cells[0]) <= set("-"):
                rows.append(cells)
        elif inside:
            break
    return rows


def _readme_options(rows) -> dict:
    """Long option name -> (default cell, starred) for each row naming options."""
    out = {}
    for cells in rows:
        first = cells[0].replace("\\|", "|")
        for name in re.findall(r"`(--[a-z][a-z-]*)", first):
            out[name] = (cells[1].replace("`", ""), first.rstrip().endswith("*"))
    return out


def _cli_options(command: str) -> set:
    names = set()
    for p in main.commands[command].params:
        if isinstance(p, click.Option):
            names |= {o for o in p.opts + p.secondary_opts if o.startswith("--")}
    return names - {"--help"}


@pytest.mark.parametrize("command", ["fit", "simulate", "export", "render"])
def test_readme_option_table_lists_exactly_the_commands_options(command):
    listed = set(_readme_options(_readme_table(command)))
    assert listed == _cli_options(command)


def test_readme_fit_table_marks_the_detect_options_and_gives_the_defaults():
    listed = _readme_options(_readme_table("fit"))
    starred = {name for name, (_, star) in listed.items() if star}
    assert starred == _cli_options("detect")
    for name, meta in option_metadata().items():
        default, _ = listed[meta["cli"].split("/")[0]]
        if meta["default"] is None:  # a computed default: the words of the option's help
            words = re.search(r"\[default: ([^\]]*)\]", meta["help"])
            expected = meta["auto"] or (words.group(1) if words else None)
            assert expected is not None, name
            assert default.replace("--", "") in expected.replace("--", ""), (name, default)
        elif isinstance(meta["default"], bool):
            assert default == ("on" if meta["default"] else "off"), name
        elif isinstance(meta["default"], str):
            assert default == meta["default"], name
        else:
            assert float(default) == meta["default"], name


def test_readme_show_table_lists_its_own_options():
    listed = set(_readme_options(_readme_table("show")))
    own = _cli_options("show") - _cli_options("fit")
    assert listed == own | {"--out"}


# ---------------------------------------------------------------------------
# --workers: cores in total
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("cores", "workers", "files", "expected"), [
    (4, None, 1, (1, 4)),   # one file: every core as solver threads
    (4, None, 2, (2, 2)),   # two files: two processes of two threads
    (4, None, 3, (3, 1)),
    (4, None, 9, (4, 1)),   # many files: one process per core
    (4, 2, 9, (2, 1)),
    (4, 3, 1, (1, 3)),
    (2, 8, 5, (2, 1)),      # never more than the cores
    (1, None, 5, (1, 1)),
])
def test_workers_are_cores_shared_by_processes_and_threads(monkeypatch, cores, workers, files,
                                                           expected):
    monkeypatch.setattr(batch, "available_cores", lambda: cores)
    processes, threads = batch.share_cores(workers, files)
    assert (processes, threads) == expected
    assert processes * threads <= min(workers or cores, cores)


def test_workers_means_threads_for_one_file_and_processes_for_a_batch(tmp_path):
    cell = tmp_path / "in" / "cell.tif"
    cell.parent.mkdir()
    make_image(cell)
    cores = batch.available_cores()
    assert run("fit", cell, "--workers", "1", "--out", tmp_path / "one.csv").exit_code == 0
    doc = json.loads((tmp_path / "one.json").read_text())
    assert doc["run"]["solver_threads"] == 1 and doc["parameters"]["config"]["workers"] == 1
    assert run("fit", cell, "--out", tmp_path / "all.csv").exit_code == 0
    assert json.loads((tmp_path / "all.json").read_text())["run"]["solver_threads"] == cores
    # one file with --out-dir: the same cores, as threads of one process
    assert run("fit", cell.parent, "--out-dir", tmp_path / "o").exit_code == 0
    run_info = json.loads((tmp_path / "o" / "cell.json").read_text())["run"]
    assert (run_info["processes"], run_info["solver_threads"]) == (1, cores)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "o" / "cell.csv").read_bytes()


def test_fitconfig_workers_is_documented_as_cores():
    meta = option_metadata()["workers"]
    assert meta["group"] == "run" and "Cores to use in total" in meta["help"]
    assert dataclasses.replace(FitConfig(), workers=3).workers == 3
