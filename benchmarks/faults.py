"""Replay faults against real ``spotfit`` runs and print what is on disk afterwards.

Not a timing benchmark: each case starts a real ``spotfit fit`` process on
simulated files, injects one fault at a moment when work is in progress,
and reports the exit status, the ``Error:`` lines, and the state of the
output folder -- complete CSV + sidecar pairs, CSVs without a sidecar,
sidecars without a CSV, hidden temporary files, whether every sidecar
agrees with its CSV, and worker processes still alive -- then, where the
run did not finish, what a rerun with ``--skip-existing`` does.

Cases (a batch of 6 files, ``--workers 2``, unless said otherwise):

1. SIGTERM to the main process (``kill PID``, ``docker stop``, schedulers)
2. SIGINT to the whole process group (Ctrl-C)
3. SIGKILL to the main process
4. SIGTERM / 5. SIGINT / 6. SIGKILL to one worker process
7. disk full while the sidecar is written (a small tmpfs: needs root and
   ``mount``; otherwise the ENOSPC is injected into the sidecar write, and
   the output says so)
8. an input file truncated while it is being read (a memory-mapped movie
   of 3000 frames, single-file ``--out``, truncated to half after 8 s)

    python benchmarks/faults.py            # ~1-2 min
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spotfit.camera import Camera
from spotfit.io import write_tiff
from spotfit.simulation import simulate

CAMERA = Camera(baseline=100, gain=1, read_noise=1.5)
CAMERA_ARGS = ["--baseline", "100", "--gain", "1", "--read-noise", "1.5"]
SHAPE = (12, 128, 160)  # frames, rows, columns per batch input
N_FILES = 6


def spotfit_command() -> list:
    return [sys.executable, "-m", "spotfit"]


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_FILES):
        image, _ = simulate(SHAPE, n_spots=60, photons=2000, background=10, camera=CAMERA,
                            min_separation=6, seed=i + 1)
        write_tiff(folder / f"f{i}.tif", image, "TYX")


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
def children(pid: int) -> list:
    """Worker processes of `pid` (Linux /proc), without multiprocessing's resource tracker."""
    try:
        pids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    workers = []
    for c in pids:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "resource_tracker" not in cmd:
            workers.append(c)
    return workers


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(spotfit_command() + [str(a) for a in args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


#: Seconds a faulted run may take to end before it is reported as hanging.
HANG = 120.0


def finish(proc: subprocess.Popen) -> str:
    """Wait for `proc` (and whatever holds its output); its stderr.  A run that does not
    end within HANG seconds is reported and killed with its whole process group."""
    try:
        _, stderr = proc.communicate(timeout=HANG)
        return stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its (orphaned) workers
        _, stderr = proc.communicate()
        return stderr + f"\nHANG: still running (or its output still held open) after {HANG:.0f} s"


def wait_for(condition, timeout=120.0, step=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


# ---------------------------------------------------------------------------
# what is on disk
# ---------------------------------------------------------------------------
def disk_state(out: Path) -> str:
    if not out.is_dir():
        return "no output folder"
    names = sorted(p.name for p in out.iterdir())
    hidden = [n for n in names if n.startswith(".")]
    csvs = {n[:-4] for n in names if n.endswith(".csv") and not n.startswith(".")}
    jsons = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
    pairs = sorted(csvs & jsons)
    agree = all(
        json.loads((out / f"{s}.json").read_text())["output"]["size_bytes"]
        == (out / f"{s}.csv").stat().st_size
        for s in pairs
    )
    return (
        f"{len(pairs)} complete CSV+sidecar pairs ({', '.join(pairs) or '-'}); "
        f"{len(csvs - jsons)} CSV without sidecar; {len(jsons - csvs)} sidecar without CSV; "
        f"{len(hidden)} hidden temporary files{' ' + str(hidden) if hidden else ''}; "
        f"every sidecar agrees with its CSV: {'yes' if agree else 'NO'}"
    )


def errors_of(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith(("Error:", "Warning:"))]


def report(title: str, proc: subprocess.Popen, stderr: str, out: Path, workers: list) -> None:
    print(f"\n== {title} ==")
    print(f"exit status: {proc.returncode}")
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    for line in errors_of(stderr) or tail:
        print(f"  stderr: {line}")
    if "HANG" in stderr:
        print(f"  {stderr.strip().splitlines()[-1]}")
    if "Traceback" in stderr or "leaked" in stderr:
        print("  stderr holds a TRACEBACK or a leaked-resource warning")
    print(f"on disk: {disk_state(out)}")
    left = [pid for pid in workers if alive(pid)]
    print(f"worker processes still running: {len(left)}")


def rerun(inputs: Path, out: Path, cwd: Path) -> None:
    proc = start(["fit", inputs, "--out-dir", out, "--workers", "2", "--skip-existing",
                  *CAMERA_ARGS], cwd)
    stderr = finish(proc)
    summary = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    print(f"rerun with --skip-existing: exit {proc.returncode}, {summary!r}")
    print(f"  then on disk: {disk_state(out)}")


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
def batch_case(title, work: Path, inputs: Path, fault) -> None:
    out = work / ("out_" + "".join(c if c.isalnum() else "_" for c in title.lower()))
    proc = start(["fit", inputs, "--out-dir", out, "--workers", "2", *CAMERA_ARGS], work)
    workers: list = []

    def working():
        workers[:] = sorted(set(workers) | set(children(proc.pid)))
        return out.is_dir() and any(n.endswith(".json") for n in os.listdir(out))

    if not wait_for(working):
        print(f"\n== {title} ==\n(no output appeared; case skipped)")
        proc.kill()
        return
    workers[:] = sorted(set(workers) | set(children(proc.pid)))
    fault(proc, workers)
    stderr = finish(proc)
    time.sleep(0.5)  # workers that die with their parent need a moment
    report(title, proc, stderr, out, workers)
    if proc.returncode != 0 or any(n.startswith(".") for n in os.listdir(out)):
        rerun(inputs, out, work)


def to_main(sig):
    def fault(proc, workers):
        os.kill(proc.pid, sig)
    return fault


def to_group(sig):
    def fault(proc, workers):
        os.killpg(proc.pid, sig)  # what a terminal does on Ctrl-C
    return fault


def to_worker(sig):
    def fault(proc, workers):
        live = [w for w in workers if alive(w)]
        if live:
            os.kill(live[0], sig)
    return fault


def disk_full_case(work: Path, inputs: Path) -> None:
    title = "disk full while the sidecar is written"
    mnt = work / "small_disk"
    mnt.mkdir()
    one = work / "one"
    one.mkdir()
    (one / "f0.tif").write_bytes((inputs / "f0.tif").read_bytes())
    # the new run's CSV (window 3), measured on a normal disk
    probe = subprocess.run(spotfit_command() + ["fit", str(one / "f0.tif"), "--window", "3",
                                                "--out", str(work / "probe.csv"), *CAMERA_ARGS],
                           capture_output=True, text=True)
    new_csv = (work / "probe.csv").stat().st_size
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                             capture_output=True, text=True).returncode == 0
    out = mnt / "out" if mounted else work / "out_disk_full"
    try:
        # an old pair from an earlier run (default window)
        first = subprocess.run(spotfit_command() + ["fit", str(one), "--out-dir", str(out),
                                                    "--workers", "1", *CAMERA_ARGS],
                               capture_output=True, text=True)
        assert first.returncode == 0, first.stderr + probe.stderr
        pair = ("f0.csv", "f0.json")
        old = {name: (out / name).read_bytes() for name in pair}
        env = dict(os.environ)
        if mounted:
            # leave room for the new CSV's pages, not one page more: the
            # sidecar's first page does not fit
            st = os.statvfs(mnt)
            page = st.f_frsize
            free = st.f_bavail * page
            fill = free - -(-new_csv // page) * page
            with open(mnt / "filler", "wb") as fh:
                fh.write(b"\0" * fill)
            how = f"a tmpfs of 8 MiB filled to leave {-(-new_csv // page)} pages for the new CSV"
        else:
            hook = work / "hook"
            hook.mkdir()
            (hook / "sitecustomize.py").write_text(
                "import spotfit.provenance as p\n"
                "def _full(doc):\n"
                "    raise OSError(28, 'No space left on device')\n"
                "p._json_text = _full\n"
            )
            env["PYTHONPATH"] = str(hook)
            how = "ENOSPC injected into the sidecar write (no tmpfs mount here)"
        proc = subprocess.Popen(
            spotfit_command() + ["fit", str(one), "--out-dir", str(out), "--workers", "1",
                                 "--window", "3", *CAMERA_ARGS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _, stderr = proc.communicate(timeout=600)
        report(f"{title} ({how})", proc, stderr, out, [])
        now = {name: (out / name).read_bytes() for name in pair if (out / name).exists()}
        print(f"old CSV and sidecar unchanged: {'yes' if now == old else 'NO'}")
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def truncated_case(work: Path) -> None:
    title = "input truncated while it is read (memory-mapped movie, --out)"
    movie = work / "movie.tif"
    frames, _ = simulate((30, 128, 160), n_spots=40, photons=2000, background=10,
                         camera=CAMERA, seed=9)
    write_tiff(movie, np.tile(frames, (100, 1, 1)), "TYX")  # 3000 frames, 123 MB
    out = work / "movie_spots.csv"
    proc = start(["fit", movie, "--out", out, "--workers", "1", *CAMERA_ARGS], work)
    time.sleep(8.0)  # start-up (~3 s), then some hundred frames of 3000
    still_running = proc.poll() is None
    os.truncate(movie, movie.stat().st_size // 2)
    stderr = finish(proc)
    print(f"\n== {title} ==")
    print(f"truncated to half its size while the run was {'running' if still_running else 'DONE'}")
    print(f"exit status: {proc.returncode}" + (" (SIGBUS)" if proc.returncode == -7 else ""))
    for line in errors_of(stderr):
        print(f"  stderr: {line}")
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".movie_spots"))
    print(f"on disk: {out.name} {'exists' if out.exists() else 'absent'}; "
          f"{len(leftovers)} hidden temporary files")


def main() -> None:
    print(f"spotfit from {Path(__import__('spotfit').__file__).parent}; "
          f"load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="spotfit-faults-") as tmp:
        work = Path(tmp)
        inputs = work / "in"
        make_inputs(inputs)
        print(f"inputs: {N_FILES} files of {'x'.join(map(str, SHAPE))} px; "
              "batch: spotfit fit in/ --out-dir out --workers 2")
        batch_case("SIGTERM to the main process", work, inputs, to_main(signal.SIGTERM))
        batch_case("SIGINT to the process group (Ctrl-C)", work, inputs,
                   to_group(signal.SIGINT))
        batch_case("SIGKILL to the main process", work, inputs, to_main(signal.SIGKILL))
        batch_case("SIGTERM to one worker", work, inputs, to_worker(signal.SIGTERM))
        batch_case("SIGINT to one worker", work, inputs, to_worker(signal.SIGINT))
        batch_case("SIGKILL to one worker", work, inputs, to_worker(signal.SIGKILL))
        disk_full_case(work, inputs)
        truncated_case(work)


if __name__ == "__main__":
    main()
