"""Worker processes for a batch: one pipe each, so a worker that dies fails only its own job.

:class:`Pool` runs jobs (objects with an ``index``) through a module-level
function ``work(job, report)`` in ``processes`` worker processes
(``spawn``), each with ``threads`` threads for numeric libraries (set before
numpy loads).  ``report(*message)`` in a worker reaches the caller's
``on_progress(*message)`` (throttled to one message per
:data:`REPORT_INTERVAL`); the value ``work`` returns is the job's result.

Not :class:`concurrent.futures.ProcessPoolExecutor`: when one of its
workers dies, every pending future fails (``BrokenProcessPool``) and it
cannot tell which job killed it.  Here each worker has its own pipe, so
the job a dead worker was processing is known; ``on_death(job, why)``
turns it into that job's result, the worker is replaced, and the other jobs
go on.  No shared queue or lock: a worker killed at any moment cannot block
the others.

Signals: workers ignore SIGINT (Ctrl-C reaches the caller, which stops
them); SIGTERM makes a worker unwind its job (raising
:class:`~spotfit.errors.Terminated`, so temporary files are removed) and
exit; on Linux a worker also gets SIGTERM when the caller dies.

Standard library only at import time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque

from spotfit.errors import Terminated, redeliver_interrupts_from_finalizers

__all__ = ["Pool", "describe_exit"]

#: Environment variables giving numeric libraries their thread counts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")

#: Seconds between two progress messages of one worker.
REPORT_INTERVAL = 0.25

#: Exit status of a worker stopped by SIGTERM (128 + 15, as a shell reports it).
EXIT_TERMINATED = 128 + signal.SIGTERM


class Pool:
    """Worker processes, one pipe each (see the module docstring).

    Parameters
    ----------
    processes : int
        Workers (at least 1).
    work : callable
        ``work(job, report)`` -> result; a module-level function (workers
        are spawned: it is pickled by name).
    threads : int
        Threads per worker for numeric libraries (:data:`THREAD_VARIABLES`).
    on_progress : callable, optional
        Receives each worker's ``report(*message)`` arguments.
    on_result : callable, optional
        ``on_result(job, result)`` when a job is finished (also a dead
        worker's job).
    on_death : callable
        ``on_death(job, why)`` -> the result of a job whose worker died;
        `why` says how (:func:`describe_exit`).
    """

    #: Seconds to wait for stopped workers to exit before killing them.
    STOP_TIMEOUT = 10.0

    def __init__(self, processes: int, work, threads: int = 1, on_progress=None,
                 on_result=None, on_death=None):
        self.processes = max(1, int(processes))
        self.work, self.threads = work, max(1, int(threads))
        self.on_progress, self.on_result, self.on_death = on_progress, on_result, on_death
        self.context = multiprocessing.get_context("spawn")
        self.workers: list = []  # [process, connection]

    def _start(self):
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_worker_main, args=(child, os.getpid(), self.work, self.threads),
            daemon=True, name="spotfit-worker",
        )
        # Workers ignore SIGINT from birth (Ctrl-C goes to the whole process
        # group; this process stops them): the disposition is inherited.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            process.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()
        worker = [process, parent]
        self.workers.append(worker)
        return worker

    def run(self, jobs) -> dict:
        """Process `jobs`; results by job index.  Stops every worker on the way out."""
        from multiprocessing.connection import wait

        queue = deque(jobs)
        running: dict = {}  # id(worker) -> (worker, job)
        idle: list = []
        results: dict = {}
        try:
            for _ in range(min(self.processes, len(queue))):
                idle.append(self._start())
            while queue or running:
                while idle and queue:
                    worker, job = idle.pop(), queue.popleft()
                    try:
                        worker[1].send(job)
                    except (OSError, ValueError):  # it died while idle: the job never started
                        queue.appendleft(job)
                        self._forget(worker)
                        idle.append(self._start())
                        continue
                    running[id(worker)] = (worker, job)
                busy = [w for w, _ in running.values()]
                ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy])
                for worker in busy:
                    process, conn = worker
                    if conn in ready or process.sentinel in ready:
                        if self._receive(worker, running, results):
                            idle.append(worker)
                        elif not process.is_alive() and id(worker) in running:
                            _, job = running.pop(id(worker))
                            self._forget(worker)
                            self._finish(job, self.on_death(job, describe_exit(process.exitcode)),
                                         results)
                            if queue:
                                idle.append(self._start())
        except BaseException:
            self.stop(terminate=True)
            raise
        self.stop(terminate=False)
        return results

    def _finish(self, job, result, results) -> None:
        results[job.index] = result
        if self.on_result is not None:
            self.on_result(job, result)

    def _receive(self, worker, running, results) -> bool:
        """Read the worker's messages; True once it has sent its job's result."""
        process, conn = worker
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "progress":
                    if self.on_progress is not None:
                        self.on_progress(*message[1:])
                elif message[0] == "done":
                    _, job = running.pop(id(worker))
                    self._finish(job, message[1], results)
                    return True
        except (EOFError, OSError):
            process.join(self.STOP_TIMEOUT)
        return False

    def _forget(self, worker) -> None:
        process, conn = worker
        process.join(self.STOP_TIMEOUT)
        conn.close()
        self.workers.remove(worker)

    def stop(self, terminate: bool) -> None:
        """End every worker: politely (no more jobs), or with SIGTERM (interrupted).

        A second Ctrl-C or SIGTERM while the workers are being stopped waits
        until they are (so none is left running).
        """
        previous = {}
        if terminate and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self._stop(terminate)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, terminate: bool) -> None:
        for process, conn in self.workers:
            try:
                if terminate:
                    process.terminate()  # the worker unwinds its job and exits
                else:
                    conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + self.STOP_TIMEOUT
        for process, conn in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self.workers = []


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------
# In the worker process
# ---------------------------------------------------------------------------
_IN_JOB = False


def _worker_sigterm(signum, frame):
    """SIGTERM in a worker: unwind the current job (temporaries removed), then exit."""
    if _IN_JOB:
        raise Terminated()
    os._exit(EXIT_TERMINATED)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM to this worker when the caller's process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # no prctl: workers then end when their pipe closes
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_TERMINATED)


def _worker_main(conn, parent_pid: int, work, threads: int) -> None:
    """A worker process: receive jobs on `conn`, send progress and results back.

    Messages to the caller: ``("progress", *message)`` and ``("done",
    result)``.  ``None`` (or a closed pipe) ends the worker.
    """
    global _IN_JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    redeliver_interrupts_from_finalizers()  # (a SIGTERM during numba's finalizers)
    _die_with_parent(parent_pid)
    for name in THREAD_VARIABLES:  # before numpy and numba load
        if name == "NUMBA_NUM_THREADS" and "numba" in sys.modules:
            # numba was imported at start-up (a sitecustomize, a .pth hook) and has
            # read its thread count: changing the variable now would make its next
            # compilation fail ("Cannot set NUMBA_NUM_THREADS ... once the threads
            # have been launched"); the jobs set their threads with
            # numba.set_num_threads instead (FitConfig.use_threads)
            continue
        os.environ.setdefault(name, str(threads))
    last = [0.0]

    def report(*message):
        now = time.monotonic()
        if now - last[0] >= REPORT_INTERVAL:
            last[0] = now
            conn.send(("progress",) + message)

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        _IN_JOB = True
        try:
            result = work(job, report)
        except KeyboardInterrupt:  # Terminated: temporaries are gone; stop
            os._exit(EXIT_TERMINATED)
        finally:
            _IN_JOB = False
        try:
            conn.send(("done", result))
        except (OSError, ValueError):
            return


def describe_exit(code) -> str:
    """How a worker process ended, from its exit code (negative: killed by a signal)."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (killed, e.g. by the out-of-memory killer or kill -9)",
            "SIGSEGV": " (a crash in compiled code)",
            "SIGBUS": " (a crash reading memory, e.g. a file changed while read)",
        }.get(name, "")
        return f"it was killed by {name}{hint}"
    if code == EXIT_TERMINATED:
        return "it was terminated (SIGTERM)"
    return f"it exited with status {code}"
