"""Reliability: never touch what is not ours, never lose a result, never die with a traceback.

One regression test (or a few) per case of issue #11, each checking one of
the promises of the README's "What spotfit promises" section.  Images are
simulated in ``tmp_path`` (never square: 40 x 56 px).  Killed processes,
signals and closed streams need real subprocesses; everything else runs
in-process with click's CliRunner.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import spotfit
import spotfit.api
import spotfit.batch as batch
import spotfit.provenance as provenance
import spotfit._atomic as atomic
import spotfit.errors as errors
from spotfit.camera import Camera
from spotfit.cli import main
from spotfit.errors import SpotfitInputError
from spotfit.io import read_image, write_tiff
from spotfit.simulation import simulate

NY, NX = 40, 56  # rows, columns: never square
CAMERA = Camera(baseline=100.0, gain=2.0, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "2", "--read-noise", "1.5"]
POSIX = os.name == "posix"
ROOT = POSIX and os.geteuid() == 0

# A 16 x 12 uint16 TIFF compressed with LZW (made by tifffile + imagecodecs).
LZW_TIFF = base64.b64decode(
    "SUkqAAgAAAAOAAABBAABAAAAEAAAAAEBBAABAAAADAAAAAIBAwABAAAAEAAAAAMBAwABAAAABQAAAAYBAwAB"
    "AAAAAQAAAA4BAgAUAAAAtgAAABEBBAABAAAAAAEAABUBAwABAAAAAQAAABYBBAABAAAADAAAABcBBAABAAAA"
    "AwEAABoBBQABAAAA2gAAABsBBQABAAAA4gAAACgBAwABAAAAAQAAADEBAgAMAAAA6gAAAAAAAAB7InNoYXBl"
    "IjogWzEyLCAxNl19AAAAAAAAAAAAAAAAAAAAAAABAAAAAQAAAAEAAAABAAAAdGlmZmZpbGUucHkAAAAAAAAA"
    "AAAAAIAZAAZQAZgAZwAaAAaQAagAawAbAAbQAbgAbwAcAAcQAcgAcwAdAAdQAdgAdwAeAAeQAegAewAfAAfQ"
    "AfgAfwAgAAgQAggAgwAhAAhQAhgAhwAiAAiQAigAiwAjAAjQAjgAjwAkAAkQAkgAkwAlAAlQBAoJBoRCoZDo"
    "hEopFoxGo5HpBIpJJpRKpZLphMppNpxOp5PqBQqJRqRSqZTqhUqpVqxWq5XrBYrJZoLB4TC4bD4jE4rF4zG4"
    "7H5DI5LJ5TK5bL5jM5rN5zO57P6DQ6LR6TS6bT6jU6rV6zW67X7DY7LA8zac5bM/b9FctLddReNXe9dftjgd"
    "phNvh91it7jeBAQ="
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def run(*args):
    """The CLI in-process; any uncaught exception (a traceback) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.stderr}") from (
            result.exception
        )
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr, result.stderr
    return result


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def spotfit_process(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m spotfit ARGS` in a subprocess."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("timeout", 120)
    return subprocess.run([sys.executable, "-m", "spotfit", *map(str, args)],
                          stderr=subprocess.PIPE, text=True, **kwargs)


def _with_hook(tmp_path: Path, code: str) -> dict:
    """An environment whose Python processes (and spawned workers) run `code` at start-up."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(code)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook)] + paths))


def make_image(path: Path, seed: int = 1, frames: int = 1, n_spots: int = 5) -> np.ndarray:
    shape = (frames, NY, NX) if frames > 1 else (NY, NX)
    image, _ = simulate(shape, n_spots=n_spots, photons=2000, background=10, sigma=1.3,
                        camera=CAMERA, min_separation=8, border=4, seed=seed)
    write_tiff(path, image, "TYX" if frames > 1 else "YX")
    return image


def snapshot(folder: Path) -> dict:
    """name -> bytes of every file in `folder` (hidden ones too)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cell.tif"
    make_image(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four good images a-d."""
    d = tmp_path / "in"
    d.mkdir()
    for i, stem in enumerate("abcd"):
        make_image(d / f"{stem}.tif", seed=i + 1)
    return d


def _device(path: Path, minor: int) -> Path:
    """A character device node like /dev/null (minor 3) or /dev/full (minor 7)."""
    if not ROOT:
        pytest.skip("making a device node needs root")
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here ({exc})")
    return path


# ---------------------------------------------------------------------------
# 1. outputs: devices and FIFOs in place, symbolic links followed, modes kept
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["fit", "detect"])
def test_out_to_a_null_device_writes_in_place(image, tmp_path, command):
    null = _device(tmp_path / "null", 3)
    result = run(command, image, "--out", null, *CAMERA_ARGS)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode)  # still the device, not a regular file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.tif", "null"]


def test_simulate_into_a_null_device_writes_in_place(tmp_path):
    null = _device(tmp_path / "null", 3)
    result = run("simulate", null, "--truth", null, "--shape", "20x30", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_out_to_a_full_device_is_one_error_and_the_device_stays(image, tmp_path):
    full = _device(tmp_path / "full", 7)
    result = run("fit", image, "--out", full, *CAMERA_ARGS)
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [f"Error: {full}: cannot write (No space left on device)"]
    assert stat.S_ISCHR(os.lstat(full).st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_out_to_a_fifo_writes_into_it(image, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = run("detect", image, "--out", fifo, *CAMERA_ARGS)
    reader.join(30)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received and received[0].startswith(b"frame,x,y,score\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.tif", "pipe"]


@pytest.mark.skipif(not Path("/proc/self/fd/1").exists(), reason="needs /proc/self/fd")
def test_out_to_a_link_to_standard_output_writes_to_the_pipe(image, tmp_path):
    """Like ``--out /dev/stdout`` (a link to /proc/self/fd/1, a pipe here), on a private
    link, so that a regression replaces that link and not the machine's /dev/stdout."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    proc = spotfit_process("detect", image, "--out", link)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("frame,x,y,score\n")
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"


def test_out_through_a_symlink_replaces_its_target_and_keeps_the_link(image, tmp_path):
    target = tmp_path / "results" / "spots.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    result = run("fit", image, "--out", link, *CAMERA_ARGS)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("frame,x,y,")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["spots.csv"]


def test_a_replaced_output_keeps_its_permission_bits(image, tmp_path):
    out = tmp_path / "spots.csv"
    out.write_text("old\n")
    out.chmod(0o604)
    assert run("fit", image, "--out", out, *CAMERA_ARGS).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o604
    assert out.read_text().startswith("frame,")


def test_a_live_temporary_is_never_removed_as_stale(tmp_path):
    """Two runs sharing an output folder: one's cleanup must not delete the other's file."""
    out = tmp_path / "a.csv"
    with atomic.atomic_path(out) as tmp:
        tmp.write_text("being written by a live run\n")
        assert atomic.remove_stale_temporaries(out) == []
        assert tmp.exists()
    assert out.read_text() == "being written by a live run\n"
    # a temporary whose writer is gone (nobody holds its lock) is removed
    stale = tmp_path / ".a.csv.0123abcd.tmp.csv"
    stale.write_text("left by a killed run")
    assert atomic.remove_stale_temporaries(out) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_atomic_group_keeps_the_old_pair_when_the_second_file_fails(tmp_path):
    first, second = tmp_path / "x.csv", tmp_path / "x.json"
    first.write_text("old csv")
    second.write_text("old json")
    with pytest.raises(OSError):
        with atomic.atomic_group([first, second]) as (t1, t2):
            t1.write_text("new csv")
            raise OSError(28, "No space left on device")
    assert snapshot(tmp_path) == {"x.csv": b"old csv", "x.json": b"old json"}


def test_atomic_group_rolls_back_when_a_rename_fails(tmp_path, monkeypatch):
    first, second = tmp_path / "x.csv", tmp_path / "x.json"
    first.write_text("old csv")
    second.write_text("old json")
    real = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append(dst)
        if str(dst) == str(second) and len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(SpotfitInputError, match="x.json: cannot write"):
        with atomic.atomic_group([first, second]) as (t1, t2):
            t1.write_text("new csv")
            t2.write_text("new json")
    monkeypatch.setattr(os, "replace", real)
    assert snapshot(tmp_path) == {"x.csv": b"old csv", "x.json": b"old json"}



@pytest.mark.parametrize("where", ["open", "_lock", "link", "unlink"])
def test_an_interrupted_temporary_creation_leaves_no_file(tmp_path, monkeypatch, where):
    # SIGTERM (Terminated raised by the handler) at each step of making a
    # temporary: inside a system call (before it acts: EINTR, then the Python
    # handler raises) or in the Python function after it (locking the new
    # file).  Neither its locked ".new" name nor its ".tmp" name may remain
    # (found by benchmarks/faults.py: SIGTERM left both beside a sidecar).
    out = tmp_path / "x.csv"
    out.write_text("old")
    owner = atomic if where == "_lock" else atomic.os
    real = getattr(owner, where)

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if where == "_lock":
            real(*args, **kwargs)
        elif len(calls) > 1:  # the clean-up's own calls go through
            return real(*args, **kwargs)
        raise errors.Terminated()

    monkeypatch.setattr(owner, where, interrupted)
    with pytest.raises(errors.Terminated):
        with atomic.atomic_group([out, tmp_path / "x.json"]) as (t1, t2):
            t1.write_text("new")
    monkeypatch.setattr(owner, where, real)
    assert snapshot(tmp_path) == {"x.csv": b"old"}


# ---------------------------------------------------------------------------
# 2. the caller's arrays and memory maps are never modified
# ---------------------------------------------------------------------------
def test_fit_and_detect_do_not_modify_the_callers_float_array(tmp_path):
    image = make_image(tmp_path / "x.tif").astype(np.float32)
    before = image.copy()
    first = spotfit.fit(image, camera=CAMERA)
    np.testing.assert_array_equal(image, before)
    second = spotfit.fit(image, camera=CAMERA)  # the same answer twice
    np.testing.assert_array_equal(first.to_numpy(dtype=str), second.to_numpy(dtype=str))
    spotfit.detect(image, sigma=1.3, camera=CAMERA)
    spotfit.fit_spots(image, first[["x", "y"]].to_numpy(), camera=CAMERA)
    np.testing.assert_array_equal(image, before)


def test_read_only_and_big_endian_arrays_are_accepted_unchanged(tmp_path):
    image = make_image(tmp_path / "x.tif").astype(np.float32)
    expected = spotfit.fit(image, camera=CAMERA)
    frozen = image.copy()
    frozen.flags.writeable = False
    big = image.astype(">f4")
    for array in (frozen, big):
        out = spotfit.fit(array, camera=CAMERA)
        np.testing.assert_array_equal(out.to_numpy(dtype=str), expected.to_numpy(dtype=str))
    np.testing.assert_array_equal(big, image)


def test_a_writable_memory_map_of_a_tiff_is_not_written_to(tmp_path):
    path = tmp_path / "f32.tif"
    tifffile.imwrite(path, make_image(tmp_path / "x.tif").astype(np.float32))
    before = path.read_bytes()
    mapped = tifffile.memmap(path)  # mode r+
    spotfit.fit(mapped, camera=CAMERA)
    spotfit.detect(mapped, sigma=1.3, camera=CAMERA)
    del mapped
    assert path.read_bytes() == before


def test_camera_to_photons_always_returns_a_new_array():
    for adu in (np.full((3, 4), 200, np.float32), np.full((3, 4), 200, ">f4"),
                np.full((3, 4), 200, np.uint16), np.full((3, 4), 200.0)):
        out = CAMERA.to_photons(adu)
        assert not np.shares_memory(out, adu) and out.flags.writeable
        np.testing.assert_allclose(out, (200 - 100) * 2)


# ---------------------------------------------------------------------------
# 3. SIGTERM to a batch: workers stopped, nothing partial, exit 143
# ---------------------------------------------------------------------------
def _children(pid: int) -> set:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a dead parent's init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_a_batch_stops_its_workers_and_leaves_no_partial_output(tmp_path, sig, code):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        make_image(src / f"m{i}.tif", seed=i + 1, frames=12, n_spots=12)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotfit", "fit", str(src), "--out-dir", str(out),
         "--workers", "2", *CAMERA_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    workers = set()
    while time.monotonic() < deadline:  # until the workers are working
        workers |= {c for c in _children(proc.pid)}
        if out.is_dir() and any(out.iterdir()):
            break
        time.sleep(0.05)
    workers |= _children(proc.pid)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert len(error_lines(stderr)) == 1, stderr
    time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)]
    names = sorted(p.name for p in out.iterdir() if p.name != "report.html")
    assert not [n for n in names if n.startswith(".")], names  # no temporaries
    assert len(names) < 16, "the batch finished before the signal: nothing was tested"
    stems = {n.rsplit(".", 1)[0] for n in names}
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("csv", "json"))  # pairs only
    for s in stems:
        doc = json.loads((out / f"{s}.json").read_text())
        assert doc["output"]["size_bytes"] == (out / f"{s}.csv").stat().st_size


# ---------------------------------------------------------------------------
# 4. CSV and sidecar are a pair
# ---------------------------------------------------------------------------
def test_disk_full_while_writing_the_sidecar_keeps_the_old_pair(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run("fit", folder, "--out-dir", out, *CAMERA_ARGS, "--workers", "1").exit_code == 0
    old = snapshot(out)
    real = provenance._json_text

    def full(doc):
        if doc["input"]["path"].endswith("b.tif"):
            raise OSError(28, "No space left on device")
        return real(doc)

    monkeypatch.setattr(provenance, "_json_text", full)
    result = run("fit", folder, "--out-dir", out, *CAMERA_ARGS, "--window", "3", "--workers", "1")
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [f"Error: {folder / 'b.tif'}: No space left on device"]
    new = snapshot(out)
    assert sorted(new) == sorted(old)  # no temporaries, no orphans
    assert new["b.csv"] == old["b.csv"] and new["b.json"] == old["b.json"]  # the old pair
    assert new["a.csv"] != old["a.csv"]  # the others were redone (window 3)
    assert json.loads(new["a.json"])["parameters"]["config"]["window"] == 3


def test_disk_full_without_an_old_pair_leaves_neither_file(folder, tmp_path, monkeypatch):
    real = provenance._json_text
    monkeypatch.setattr(provenance, "_json_text", lambda doc: (_ for _ in ()).throw(
        OSError(28, "No space left on device")) if "c.tif" in doc["input"]["path"] else real(doc))
    out = tmp_path / "out"
    result = run("fit", folder, "--out-dir", out, *CAMERA_ARGS, "--workers", "1")
    assert result.exit_code == 1
    assert sorted(snapshot(out)) == [
        "a.csv", "a.json", "b.csv", "b.json", "d.csv", "d.json", "report.html"]


# ---------------------------------------------------------------------------
# 5. a crashed worker fails only its file; a truncated map is an error, not SIGBUS
# ---------------------------------------------------------------------------
_CRASH_HOOK = """
import os, signal
import spotfit.api as _a
_real = _a.process_file
def _crashing(path, *args, **kwargs):
    if str(path).endswith("b.tif"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(path, *args, **kwargs)
_a.process_file = _crashing
"""


@pytest.mark.skipif(not POSIX, reason="needs SIGKILL")
def test_a_crashed_worker_fails_only_its_file(folder, tmp_path):
    env = _with_hook(tmp_path, _CRASH_HOOK)  # loaded by every worker process
    out = tmp_path / "out"
    proc = spotfit_process("fit", folder, "--out-dir", out, "--workers", "2", *CAMERA_ARGS,
                           env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenProcessPool" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"Error: {folder / 'b.tif'}: ")
    assert "killed by SIGKILL" in errors[0]
    assert proc.stderr.strip().splitlines()[-1].startswith("4 files: 3 ok, 1 failed, 0 skipped")
    assert sorted(snapshot(out)) == [
        "a.csv", "a.json", "c.csv", "c.json", "d.csv", "d.json", "report.html"]


_TRUNCATE_SCRIPT = """
import os, sys
from spotfit.api import process_file
from spotfit.errors import SpotfitInputError
path = sys.argv[1]
def cut(*progress):
    os.truncate(path, 1000)  # another program truncates the file while it is read
try:
    process_file(path, "detect", progress=cut)
except SpotfitInputError as exc:
    print(exc)
"""


def test_a_file_truncated_while_memory_mapped_is_an_error_not_sigbus(tmp_path):
    path = tmp_path / "movie.tif"
    make_image(path, frames=4)
    assert isinstance(read_image(path).data, np.memmap)
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)  # -7 would be SIGBUS
    assert "truncated while being read" in proc.stdout


_TRUNCATE_HOOK = """
import os
import spotfit.io as _io
_real = _io.read_image
def _truncating(path, *args, **kwargs):
    image = _real(path, *args, **kwargs)  # opened (memory-mapped), not yet read
    if str(path).endswith("c.tif"):
        os.truncate(path, 1000)  # another program truncates it while it is read
    return image
_io.read_image = _truncating
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_truncated_in_a_batch_fails_alone(folder, tmp_path, workers):
    proc = spotfit_process("detect", folder, "--out-dir", tmp_path / "out", "--workers", workers,
                           env=_with_hook(tmp_path, _TRUNCATE_HOOK))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # not -7 (SIGBUS)
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"Error: {folder / 'c.tif'}: ")
    assert "truncated while being read" in line
    assert sorted(snapshot(tmp_path / "out")) == [
        "a.csv", "a.json", "b.csv", "b.json", "d.csv", "d.json"]


# ---------------------------------------------------------------------------
# 6. several series / pages of different shapes: --series, never silently the first
# ---------------------------------------------------------------------------
def _two_series(path: Path, ome: bool) -> tuple:
    a = make_image(path.with_name("a.tif"))
    b = np.ascontiguousarray(make_image(path.with_name("b.tif"), seed=2)[:, : NX - 9])
    with tifffile.TiffWriter(path, ome=ome) as tw:
        tw.write(a, metadata={"axes": "YX"} if ome else None)
        tw.write(b, metadata={"axes": "YX"} if ome else None)
    return a, b


@pytest.mark.parametrize("ome", [False, True])
def test_a_file_with_several_series_needs_series(tmp_path, ome):
    path = tmp_path / ("multi.ome.tif" if ome else "multi.tif")
    a, b = _two_series(path, ome)
    result = run("fit", path, *CAMERA_ARGS)
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"Error: {path} holds 2 image series (0: {NY}x{NX} YX, 1: {NY}x{NX - 9} YX); spotfit "
        "reads one at a time: choose one with --series N (0 to 1)"]
    assert result.stdout == ""
    for index, expected in ((0, a), (1, b)):
        np.testing.assert_array_equal(read_image(path, series=index).frame(0), expected)
    one = run("detect", path, "--series", "1", "--out", tmp_path / "b.csv")
    assert one.exit_code == 0, one.stderr
    bad = run("detect", path, "--series", "2")
    assert error_lines(bad.stderr) == [
        f"Error: --series 2 is out of range for {path}: it holds 2 image series (valid: 0 to 1)"]


def test_series_is_recorded_and_used_by_a_batch(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _two_series(src / "multi.tif", ome=False)
    (src / "a.tif").unlink()
    (src / "b.tif").unlink()
    result = run("detect", src, "--out-dir", tmp_path / "out", "--series", "1", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "out" / "multi.json").read_text())
    assert doc["parameters"]["series"] == 1 and doc["input"]["shape"] == [1, NY, NX - 9]


# ---------------------------------------------------------------------------
# 7-8. memory, closed or full standard output: one line, no traceback
# ---------------------------------------------------------------------------
def test_simulate_an_image_larger_than_memory_is_one_error(tmp_path):
    result = run("simulate", tmp_path / "big.tif", "--shape", "100000x100000")
    assert result.exit_code == 1
    assert error_lines(result.stderr)[0].startswith("Error: --shape 100000x100000 needs about")
    assert not list(tmp_path.iterdir())


def test_memory_error_is_one_line(image, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(spotfit.api, "process_file", exhausted)
    result = run("fit", image, "--window", "1000")
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"Error: {image}: not enough memory to process it with these options (try smaller "
        "--window or --sigma values, or fewer --workers)"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_device_is_one_error(image):
    with open("/dev/full", "w") as full:
        proc = spotfit_process("detect", image, stdout=full)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: cannot write the table to standard output (No space left on device); "
        "give --out FILE"]


@pytest.mark.skipif(not POSIX, reason="needs POSIX file descriptors")
def test_closed_stdout_is_one_error(image):
    """`spotfit detect x.tif >&-`: the program starts without a standard output."""
    proc = spotfit_process("detect", image, stdout=subprocess.DEVNULL,
                           preexec_fn=lambda: os.close(1))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: standard output is closed: cannot write the table; give --out FILE"]


# ---------------------------------------------------------------------------
# 9. --config: typos in nested sections and wrong types are errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("doc, words", [
    ({"config": {"sigmaa": 5}, "camera": {"gian": 2}},
     "unknown parameter(s) camera.gian, config.sigmaa"),
    ({"parameters": {"config": {"windw": 3}}}, "unknown parameter(s) config.windw"),
    ({"max_iter": True}, "max_iter: must be a whole number, not true"),
    ({"window": 2.5}, "window: must be a whole number, not 2.5"),
    ({"config": {"max_group": 2.7}}, "max_group: must be a whole number, not 2.7"),
    ({"crowded": 1}, "crowded: must be true or false, not 1"),
    ({"sigma": "1.3"}, 'sigma: must be a number, not "1.3"'),
    ({"camera": [1, 2]}, "'camera' in --config must be a JSON object"),
])
def test_config_typos_and_wrong_types_are_errors(image, tmp_path, doc, words):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(doc))
    result = run("fit", image, "--config", config)
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = error_lines(result.stderr)
    assert words in line, line


def test_config_accepts_what_spotfit_writes(folder, tmp_path):
    out = tmp_path / "out"
    assert run("fit", folder / "a.tif", "--out-dir", out, *CAMERA_ARGS, "--series", "0",
               "--workers", "1").exit_code == 0
    again = run("fit", folder / "a.tif", "--config", out / "a.json", "--out", tmp_path / "a.csv")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "a.csv").read_bytes() == (out / "a.csv").read_bytes()


# ---------------------------------------------------------------------------
# 10. messages that say what is wrong
# ---------------------------------------------------------------------------
def test_lzw_without_imagecodecs_says_how_to_get_it(tmp_path):
    path = tmp_path / "lzw.tif"
    path.write_bytes(LZW_TIFF)
    script = ("import sys; sys.modules['imagecodecs'] = None\n"
              "from spotfit.cli import main\n"
              f"main(['detect', {str(path)!r}])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: {path}: compressed with LZW, which needs the imagecodecs package to "
        "decode: pip install imagecodecs"]


def test_lzw_with_imagecodecs_is_read(tmp_path):
    pytest.importorskip("imagecodecs")
    path = tmp_path / "lzw.tif"
    path.write_bytes(LZW_TIFF)
    assert read_image(path).frame(0).shape == (12, 16)


def test_overflowing_gain_names_the_file_and_the_options(image):
    result = run("fit", image, "--gain", "1e300", "--baseline", "100")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"Error: {image}: the camera conversion")
    assert "--gain (1e+300)" in line
    assert "Warning" not in result.stderr


@pytest.mark.parametrize("name", ["cell[1].tif", "cell*.tif", "what?.tif"])
def test_a_missing_file_with_pattern_characters_is_missing(tmp_path, name):
    result = run("fit", tmp_path / name)
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [f"Error: {tmp_path / name}: no such file"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_pipe_as_input_is_refused_clearly(tmp_path):
    """A subprocess with a time limit: reading a FIFO without a writer used to block forever."""
    fifo = tmp_path / "in.tif"
    os.mkfifo(fifo)
    proc = spotfit_process("detect", fifo, timeout=60)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "is a pipe (FIFO), not an image file" in line and "corrupt" not in line
    dash = run("detect", "-")
    assert error_lines(dash.stderr) == [
        "Error: -: spotfit cannot read an image from standard input; save it to a file and "
        "give its path"]


def test_an_unreadable_file_fails_alone_in_a_batch(folder, tmp_path, monkeypatch):
    """click used to reject it as a usage error (exit 2) before any file was processed."""
    real_access, real_open = os.access, os.open
    secret = str(folder / "b.tif")
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
        False if str(p) == secret else real_access(p, mode, *a, **k)))

    def no_read(path, *args, **kwargs):
        if str(path) == secret:
            raise PermissionError(13, "Permission denied", secret)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_read)
    monkeypatch.setattr("builtins.open", _denying_open(secret))
    result = run("detect", folder / "a.tif", secret, folder / "c.tif", "--out-dir",
                 tmp_path / "out", "--workers", "1")
    assert result.exit_code == 1, result.stderr
    assert error_lines(result.stderr) == [f"Error: {secret}: cannot open (Permission denied)"]
    assert result.stderr.strip().splitlines()[-1].startswith("3 files: 2 ok, 1 failed")


def _denying_open(secret):
    import builtins

    real = builtins.open

    def opener(file, *args, **kwargs):
        if str(file) == secret:
            raise PermissionError(13, "Permission denied", secret)
        return real(file, *args, **kwargs)

    return opener


# ---------------------------------------------------------------------------
# 11. simulate: clipping is an error (background) or a warning (spots)
# ---------------------------------------------------------------------------
def test_simulate_background_beyond_uint16_is_refused(tmp_path):
    result = run("simulate", tmp_path / "x.tif", "--background", "1e9")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert "outside the uint16 range (0 to 65535)" in line
    assert not list(tmp_path.iterdir())


def test_simulate_clipped_spots_are_one_warning_line(tmp_path):
    result = run("simulate", tmp_path / "x.tif", "--shape", "30x40", "--n-spots", "3",
                 "--photons", "1e7", "--background", "0", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings_) == 1 and "clipped" in warnings_[0]
    assert len(result.stderr.strip().splitlines()) == 2  # the warning and the summary


# ---------------------------------------------------------------------------
# 12. workers, warnings
# ---------------------------------------------------------------------------
def test_workers_are_capped_at_the_cores_with_a_note(folder, tmp_path):
    cores = batch.available_cores()
    result = run("detect", folder, "--out-dir", tmp_path / "out", "--workers", "1000")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"Note: --workers 1000 is more than the {cores} available cores; using {cores}")
    run_info = json.loads((tmp_path / "out" / "a.json").read_text())["run"]
    assert run_info["processes"] <= min(cores, 4)


def test_warnings_are_single_lines_once_each(image, monkeypatch):
    real = spotfit.api.process_file

    def noisy(*args, **kwargs):
        for _ in range(3):
            warnings.warn("overflow encountered in cast", RuntimeWarning)
            warnings.warn("a doubtful\n  result", errors.SpotfitWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(spotfit.api, "process_file", noisy)
    result = run("detect", image)
    assert result.exit_code == 0
    lines = result.stderr.strip().splitlines()
    assert lines[:2] == ["Warning: overflow encountered in cast", "Warning: a doubtful result"]
    assert len(lines) == 3


def test_warnings_of_batch_workers_are_one_line_naming_the_file(folder, tmp_path):
    env = _with_hook(tmp_path, textwrap.dedent("""
        import warnings
        import spotfit.api as _a
        _real = _a.process_file
        def _warning(*args, **kwargs):
            warnings.warn("overflow encountered in multiply", RuntimeWarning)
            return _real(*args, **kwargs)
        _a.process_file = _warning
    """))
    proc = spotfit_process("detect", folder, "--out-dir", tmp_path / "out", "--workers", "2",
                           env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sorted(lines[:-1]) == [
        f"Warning: {folder / s}.tif: overflow encountered in multiply" for s in "abcd"]
    assert "leaked" not in proc.stderr and "Traceback" not in proc.stderr


_NUMBA_AT_STARTUP = """
import numba
numba.get_num_threads()  # launches numba's threads with its default count
"""

_NUMBA_JOB = """
import collections


def work(job, report):
    import numba

    @numba.njit(cache=False)  # a compilation re-reads numba's environment variables
    def plus_one(x):
        return x + 1

    return plus_one(job.index)


Job = collections.namedtuple("Job", "index")
"""

_POOL_SCRIPT = """
from numba_job import Job, work
from spotfit.pool import Pool

results = Pool(2, work, threads=1, on_death=lambda job, why: why).run([Job(i) for i in range(3)])
print(sorted(results.items()))
"""


def test_workers_compile_when_numba_was_imported_at_startup(tmp_path):
    """A sitecustomize that imports numba (and launches its threads) before a worker
    sets its thread variables must not break the worker's first compilation
    ("Cannot set NUMBA_NUM_THREADS ... once the threads have been launched")."""
    env = _with_hook(tmp_path, _NUMBA_AT_STARTUP)
    (tmp_path / "hook" / "numba_job.py").write_text(_NUMBA_JOB)
    env.pop("NUMBA_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[(0, 1), (1, 2), (2, 3)]"


@pytest.mark.parametrize("name", ["Terminated", "KeyboardInterrupt"])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_run_without_a_traceback(name):
    """SIGTERM (or SIGINT) arriving while Python runs a finalizer (numba's compiler runs
    many: seen in a batch's worker during a first run's compile) raised its exception
    inside ``__del__``, where it cannot propagate: Python printed "Exception ignored in"
    with a traceback and the run went on.  The command line and the workers install
    :func:`spotfit.errors.redeliver_interrupts_from_finalizers`: nothing is printed, the
    signal is delivered again and stops the code that runs next.  (In a fresh
    interpreter: the hook and the handlers are process-wide.)"""
    code = textwrap.dedent(f"""
        import signal, sys, time
        from spotfit.errors import Terminated, raise_terminated, redeliver_interrupts_from_finalizers
        signal.signal(signal.SIGTERM, raise_terminated)
        if sys.argv[1] == "hook":
            redeliver_interrupts_from_finalizers()

        class Finalized:
            def __del__(self):
                raise {name}()  # as the signal's handler raises it inside a finalizer

        try:
            Finalized()
            for _ in range(1000):
                time.sleep(0.001)
            print("ran on")
        except {name}:
            print("stopped")
        """)
    for mode, out, quiet in (("hook", "stopped", True), ("none", "ran on", False)):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == out, (mode, done.stdout, done.stderr)
        assert ("Traceback" not in done.stderr) == quiet, (mode, done.stderr)
