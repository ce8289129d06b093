"""Write output files safely: all of the new file, or nothing; never touch what is not ours.

Every writer in spotfit (CSV tables, JSON sidecars, TIFF) writes through
:func:`atomic_path` (one file) or :func:`atomic_group` (a CSV and its
sidecar, which must never disagree).  What happens depends on what the
output path is:

* **a regular file, or a new path**: the data go to a hidden temporary
  file beside it, which is flushed to disk and renamed over the target
  (atomic on one file system).  An interrupted or failed run leaves the
  old file untouched; a replaced file keeps its permission bits (and owner,
  when we may set it).
* **a symbolic link**: followed.  The file it points to is replaced as
  above; the link itself stays.
* **anything else** (a character device such as ``/dev/null`` or
  ``/dev/stdout``, a FIFO): written in place -- opened for writing, never
  replaced, renamed or unlinked.  The data are rendered to a private
  temporary file first and copied in afterwards, so a failure while
  rendering writes nothing; a failure while copying (e.g. ``/dev/full``)
  is reported.
* a directory: refused.

Temporary files are named ``.<name>.<8 hex digits>.tmp<suffix>`` and are
locked while in use (an open-file-description lock on Linux, ``F_OFD_SETLK``:
it does not conflict with the ``flock`` a writer such as HDF5 takes on the
same file, and closing another descriptor of the file does not drop it;
``flock`` elsewhere).  A killed run can leave one behind;
:func:`remove_stale_temporaries` removes those of an output, but never one
that another live run is writing (it is locked) or that was just created.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from spotfit.errors import SpotfitInputError

try:  # POSIX; elsewhere temporaries are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_path", "atomic_group", "remove_stale_temporaries"]

# Keep temporary names well below the usual 255-byte file-name limit.
_MAX_NAME = 120
_MAX_SUFFIX = 30
_MAX_ATTEMPTS = 100


def _cannot_write(target, exc: OSError) -> SpotfitInputError:
    return SpotfitInputError(f"{target}: cannot write ({exc.strerror or exc})")


class _Output:
    """One output being written: the user's path, where it really goes, a temporary."""

    def __init__(self, path):
        self.path = Path(os.fspath(path))  # as the user named it (for messages)
        try:
            st = os.stat(self.path)  # symbolic links followed
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _cannot_write(self.path, exc) from exc
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise SpotfitInputError(f"{self.path}: is a directory, cannot write a file there")
        self.old = st if st is not None and stat.S_ISREG(st.st_mode) else None
        self.special = st is not None and not stat.S_ISREG(st.st_mode)
        # A device or FIFO is opened by the name given (``/dev/stdout`` is a link
        # to a pipe with no name of its own); a file is replaced where it really is.
        self.target = self.path if self.special else Path(os.path.realpath(self.path))
        if not self.special and not self.target.parent.is_dir():
            raise SpotfitInputError(
                f"{self.path}: cannot write, directory {str(self.path.parent)!r} does not exist"
            )
        self.tmp, self._fd = self._create()

    # ------------------------------------------------------------ temporary
    def _create(self) -> tuple[Path, int]:
        """An empty temporary file, locked: beside the target, or private for a device."""
        if self.special:
            fd, name = tempfile.mkstemp(prefix=".spotfit-", suffix=self.target.suffix[:_MAX_SUFFIX])
            return Path(name), fd
        return _create_beside(self.target, self.path)

    def discard(self) -> None:
        """Remove the temporary file (the target is untouched)."""
        _remove_quietly(self.tmp)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------- commit
    def prepare(self) -> None:
        """Flush the temporary to disk and give it the old file's permissions."""
        if self.special:
            return
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        if self.old is not None:
            with contextlib.suppress(OSError):
                os.fchmod(self._fd, stat.S_IMODE(self.old.st_mode))
            if hasattr(os, "fchown") and (self.old.st_uid, self.old.st_gid) != _ids(self._fd):
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.fchown(self._fd, self.old.st_uid, self.old.st_gid)

    def commit(self) -> None:
        """Move the temporary into place (or copy it into a device / FIFO)."""
        try:
            if self.special:
                _copy_into(self.tmp, self.target)
                _remove_quietly(self.tmp)
            else:
                os.replace(self.tmp, self.target)
        except OSError as exc:
            self.discard()
            raise _cannot_write(self.path, exc) from exc
        self.close()


def _lock(fd: int) -> bool:
    """Take an exclusive lock on the open file `fd` without waiting; True if taken."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    ofd = getattr(fcntl, "F_OFD_SETLK", None)
    try:
        if ofd is not None:
            # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
            fcntl.fcntl(fd, ofd, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        else:  # pragma: no cover - not Linux
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _ids(fd) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_uid, st.st_gid


def temporary_name(path: str | os.PathLike, token: str, kind: str = "tmp") -> str:
    """The file name of a temporary for output `path`: ``.<name>.<token>.<kind><suffix>``.

    The one place temporary names are made (:func:`_create_beside`,
    :func:`_backup`) and recognised (:func:`temporary_pattern`): `token` is
    8 hex digits, `kind` ``tmp`` (a temporary or a backup, removed when
    stale) or ``new`` (being created and locked, never removed).
    """
    name = os.path.basename(os.fspath(path))
    suffix = os.path.splitext(name)[1]
    return f".{name[:_MAX_NAME]}.{token}.{kind}{suffix[:_MAX_SUFFIX]}"


def _create_beside(target: Path, shown: Path) -> tuple[Path, int]:
    """Create, open and lock an empty hidden temporary file beside `target`.

    The file is created and locked under a name that
    :func:`remove_stale_temporaries` does not touch (``.new`` for ``.tmp``)
    and only then linked to its temporary name: a file with a temporary's
    name is locked for as long as its writer lives.  Whatever interrupts the
    creation (an error, Ctrl-C, :class:`spotfit.errors.Terminated` raised by
    a SIGTERM handler), no file of it is left behind.
    """
    for _ in range(_MAX_ATTEMPTS):
        token = secrets.token_hex(4)
        fresh = target.with_name(temporary_name(target, token, "new"))
        tmp = target.with_name(temporary_name(target, token))
        made: list[Path] = []  # names of ours that exist, to remove if interrupted
        fd = None
        try:
            try:
                # 0o666 filtered by the umask: the same permissions as a plain open().
                fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            made.append(fresh)
            _lock(fd)
            try:
                os.link(fresh, tmp)  # fails if the name is taken: never clobbers
                made.append(tmp)
            except FileExistsError:
                _release(made, fd)
                continue
            except OSError:  # no hard links on this file system
                os.rename(fresh, tmp)
                made = [tmp]
            else:
                os.unlink(fresh)
                made.remove(fresh)
        except BaseException as exc:
            _release(made, fd)
            if isinstance(exc, OSError):
                raise _cannot_write(shown, exc) from exc
            raise
        return tmp, fd
    raise SpotfitInputError(f"{shown}: cannot create a temporary file beside it")


def _release(made: list[Path], fd: int | None) -> None:
    """Remove the files `made` and close `fd` (an abandoned temporary)."""
    for path in made:
        _remove_quietly(path)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _copy_into(source: Path, target: Path) -> None:
    """Copy a finished temporary into an existing non-regular file (device, FIFO)."""
    fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOCTTY", 0))
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# ----------------------------------------------------------------------------
# Public writers
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; put it in place at `path` on success.

    The temporary file exists (empty) when the block starts.  For a regular
    file or a new path it lies in the same directory as the target (so the
    final rename is atomic), is hidden and keeps the suffix of `path`
    (writers that infer a format from the suffix behave the same), e.g.
    ``out.csv`` is written as ``.out.csv.1f2e3d4c.tmp.csv``.  See the module
    docstring for symbolic links and devices.

    Parameters
    ----------
    path : str or os.PathLike
        Final output path.  Its parent directory must exist.

    Yields
    ------
    pathlib.Path
        Temporary path to write the whole output to.

    Raises
    ------
    SpotfitInputError
        If the parent directory of `path` does not exist, `path` is a
        directory, or the file cannot be created, moved into place or (for
        a device) written.  The message names `path`.

    Notes
    -----
    If the body of the ``with`` block raises (including
    ``KeyboardInterrupt`` and :class:`spotfit.errors.Terminated`), the
    temporary file is removed and the exception propagates; `path` is left
    untouched (a pre-existing file keeps its old content).

    Examples
    --------
    >>> with atomic_path("spots.csv") as tmp:            # doctest: +SKIP
    ...     table.to_csv(tmp, index=False)
    """
    with atomic_group([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_group(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, ...]]:
    """Write several files as one: all of them are replaced, or none.

    Used for a batch's CSV and its JSON sidecar: the sidecar describes the
    CSV, so a new CSV must never stand beside an old sidecar (or the
    reverse).  Yields one temporary path per output (as :func:`atomic_path`);
    when the block succeeds they are moved into place with the **last path
    last**: its old version is removed first, so whatever happens from then
    on (even SIGKILL), the last file exists only beside the versions of the
    others it was written with.  If moving fails, the old files are put back.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Output paths, the "seal" (e.g. the sidecar) last.

    Yields
    ------
    tuple of pathlib.Path
        Temporary paths, in the order of `paths`.

    Raises
    ------
    SpotfitInputError
        As :func:`atomic_path`; nothing was changed at any of `paths`.
    """
    outputs: list[_Output] = []
    try:
        for p in paths:
            outputs.append(_Output(p))
    except BaseException:
        for out in outputs:
            out.discard()
        raise
    try:
        yield tuple(out.tmp for out in outputs)
        for out in outputs:
            out.prepare()
    except BaseException:
        for out in outputs:
            out.discard()
        raise
    if len(outputs) == 1 or any(out.special for out in outputs):
        for out in outputs:
            out.commit()
        return
    _commit_group(outputs)


def _commit_group(outputs: list[_Output]) -> None:
    """Rename every temporary into place, the last one last; roll back on failure."""
    backups: dict[int, Path] = {}
    done: list[int] = []
    current = outputs[0]
    try:
        for i, out in enumerate(outputs):  # hard links keep the old files reachable
            current = out
            backup = _backup(out) if out.old is not None else None
            if backup is not None:
                backups[i] = backup
        current = seal = outputs[-1]
        if seal.old is not None:
            os.unlink(seal.target)  # from here on no old seal beside new files
        for i, out in enumerate(outputs):
            current = out
            os.replace(out.tmp, out.target)
            done.append(i)
    except BaseException as exc:
        for i, out in enumerate(outputs):
            if i in backups:
                with contextlib.suppress(OSError):
                    os.replace(backups.pop(i), out.target)
            elif i in done:
                _remove_quietly(out.target)
            out.discard()
        if isinstance(exc, OSError):
            raise _cannot_write(current.path, exc) from exc
        raise
    for out in outputs:
        out.close()
    for path in backups.values():
        _remove_quietly(path)


def _backup(out: _Output) -> Path | None:
    """A hard link to the old target, named like a temporary (so stale ones get cleaned).

    None where the file system has no hard links: the group is then still
    committed seal-last, but a failed rename cannot bring the old files back.
    """
    backup = out.target.with_name(temporary_name(out.target, secrets.token_hex(4)))
    try:
        os.link(out.target, backup)
    except OSError:
        return None
    return backup


# ----------------------------------------------------------------------------
# Temporaries left by killed runs
# ----------------------------------------------------------------------------


def temporary_pattern(path: str | os.PathLike) -> re.Pattern:
    """The names of the temporary files made for output `path` (see :func:`atomic_path`)."""
    head, tail = temporary_name(path, "\0").split("\0")
    return re.compile(re.escape(head) + "[0-9a-f]{8}" + re.escape(tail))


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove temporary files a killed run left beside output `path`.

    Only names of the form ``.<name>.<8 hex digits>.tmp<suffix>`` made for
    this very output are considered, and of those only files that no live
    process is writing: a writer locks its temporary before giving it its
    name (:func:`_create_beside`) and holds the lock until it is done, so
    two runs sharing an output folder never delete each other's files.

    Returns
    -------
    list of str
        The files removed.
    """
    target = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(target)
    pattern = temporary_pattern(target)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not pattern.fullmatch(entry):
            continue
        full = os.path.join(folder, entry)
        try:  # read-write: an exclusive fcntl lock needs a descriptor open for writing
            fd = os.open(full, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue  # a live run is writing it
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            os.unlink(full)
            removed.append(full)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
