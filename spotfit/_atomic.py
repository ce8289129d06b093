"""Write output files atomically: all of the new file, or nothing.

Every writer in spotfit (CSV tables, JSON, TIFF) writes through
:func:`atomic_path`, so an interrupted or failed run never leaves a
half-written file behind and never damages an existing file of the same name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from spotfit.errors import SpotfitInputError

__all__ = ["atomic_path"]

# Keep temporary names well below the usual 255-byte file-name limit.
_MAX_NAME = 120
_MAX_ATTEMPTS = 100


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; move it onto `path` on success.

    The temporary file is created (empty) in the same directory as `path`,
    so the final :func:`os.replace` is atomic on the same file system.  Its
    name is hidden and keeps the suffix of `path` (writers that infer a format
    or compression from the suffix behave the same), e.g. ``out.csv`` is
    written as ``.out.csv.1f2e3d4c.tmp.csv``.

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
        directory, or the file cannot be created or moved into place.  The
        message names `path`.

    Notes
    -----
    If the body of the ``with`` block raises (including
    ``KeyboardInterrupt``), the temporary file is removed and the exception
    propagates; `path` is left untouched (a pre-existing file keeps its old
    content).  On success `path` is replaced, never partially written.

    Examples
    --------
    >>> with atomic_path("spots.csv") as tmp:            # doctest: +SKIP
    ...     table.to_csv(tmp, index=False)
    """
    target = Path(os.fspath(path))
    parent = target.parent
    if not parent.is_dir():
        raise SpotfitInputError(
            f"{target}: cannot write, directory {str(parent)!r} does not exist"
        )
    if target.is_dir():
        raise SpotfitInputError(f"{target}: is a directory, cannot write a file there")

    tmp = _create_temporary(target)
    try:
        yield tmp
    except BaseException:
        _remove_quietly(tmp)
        raise
    # Flush to disk before the rename so a crash cannot leave an empty file.
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        raise SpotfitInputError(
            f"{target}: cannot write ({exc.strerror or exc})"
        ) from exc


def _create_temporary(target: Path) -> Path:
    """Create an empty, hidden temporary file beside `target`; return its path."""
    name = target.name[:_MAX_NAME]
    suffix = target.suffix[:_MAX_NAME // 4]
    for _ in range(_MAX_ATTEMPTS):
        tmp = target.with_name(f".{name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            # 0o666 filtered by the umask: the same permissions as a plain open().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SpotfitInputError(
                f"{target}: cannot write ({exc.strerror or exc})"
            ) from exc
        os.close(fd)
        return tmp
    raise SpotfitInputError(f"{target}: cannot create a temporary file beside it")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
