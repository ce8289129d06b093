"""Exceptions and warnings spotfit raises for its users (bad files, bad options, doubtful data).

* :class:`SpotfitInputError`: a user mistake (bad file, bad option).  The
  command line turns it into one line ``Error: <message>`` and a non-zero
  exit status, without a traceback; when the error names a Python parameter
  (``parameter``), the command line names its option instead (``sigma`` ->
  ``--sigma``).  Anything else is a bug.
* :class:`SpotfitWarning`: a result that is computed but doubtful, or an
  input that was adjusted (e.g. clipped pixels).  The command line prints
  each distinct warning once as one line ``Warning: <message>``.
* :class:`Terminated`: raised in the main thread by the SIGTERM handler the
  command line (and a batch's worker processes) install, so that a
  terminated run unwinds like an interrupted one (Ctrl-C): temporary files
  are removed, worker processes are stopped, no partial output is left.
"""

import signal as _signal
import sys as _sys


class SpotfitInputError(ValueError):
    """A user-facing input problem; the message names the file or parameter.

    Parameters
    ----------
    message : str
        One line.  When it is about a parameter of the Python API, it
        starts with that parameter's name (``"sigma must be > 0 ..."``);
        other parameters it names are quoted with backticks (```gain```),
        which the command line replaces by their options.
    parameter : str, optional
        The Python parameter the message is about (e.g. ``"sigma"``), so
        that the command line can name its option instead.
    """

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter

    def __reduce__(self):  # keep ``parameter`` across processes (batch workers)
        return type(self), (str(self), self.parameter)


class SpotfitWarning(UserWarning):
    """Results were computed, but the input makes them doubtful, or an input was
    adjusted (e.g. clipped pixels); one line each, saying which and why."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (``kill PID``, ``docker stop``, a job scheduler).

    A :class:`KeyboardInterrupt` subclass: code that cleans up after Ctrl-C
    (``except BaseException``/``finally`` blocks, :func:`spotfit._atomic.atomic_path`)
    cleans up after SIGTERM the same way, and ``except Exception`` does not
    swallow it.
    """

    signum = _signal.SIGTERM


def raise_terminated(signum, frame):
    """A signal handler that raises :class:`Terminated` (install for SIGTERM)."""
    raise Terminated()


def redeliver_interrupts_from_finalizers() -> None:
    """Make the signals whose handlers raise (SIGTERM: :class:`Terminated`; SIGINT:
    :class:`KeyboardInterrupt`) stop the process even when they arrive while Python runs
    a finalizer (``__del__``, a weak reference's callback; numba's compiler runs many):
    an exception cannot leave a finalizer, so Python printed it with a traceback
    ("Exception ignored in ...") and carried on.  This :data:`sys.unraisablehook` prints
    nothing for them and sends the signal to the process again 10 ms later, from a timer
    thread (sent at once, its handler would raise inside the hook, which swallows it
    too); the handler then raises it in whatever code runs at that moment.  Other
    unraisable exceptions go to the previous hook.  For the command line and a batch's
    worker processes, which install such handlers; idempotent.
    """
    previous = _sys.unraisablehook
    if getattr(previous, "_redelivers_interrupts", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt):
            import os
            import threading

            signum = getattr(exc, "signum", _signal.SIGINT)
            again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    hook._redelivers_interrupts = True
    _sys.unraisablehook = hook
