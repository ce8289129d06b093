"""Progress on a terminal: one line redrawn in place -- files, frames, spots, time, time left.

:class:`ProgressBar` is the bar of ``spotfit fit``/``detect``, the same for
one file and for a batch::

    spotfit fit [#####.......] 50/120 frames, 412 spots | 0:03, ETA 0:04
    spotfit fit [#####.......] 2/7 files, 310 frames, 1840 spots | 0:41, ETA 0:57

It is drawn only when standard error is a terminal (:func:`wanted`);
:func:`clear` wipes the line of the bar being drawn, so that a warning
printed meanwhile starts on a clean line (the bar is redrawn at its next
update).  Standard library only.
"""

from __future__ import annotations

import shutil
import sys
import time

__all__ = ["ProgressBar", "clear", "clock", "wanted"]

#: Seconds between two redraws (an update in between only records the numbers).
REDRAW_INTERVAL = 0.1

_active: "ProgressBar | None" = None


def wanted(stream=None) -> bool:
    """True when `stream` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def clear() -> None:
    """Wipe the line of the bar being drawn, if any (before printing something else)."""
    if _active is not None:
        _active.wipe()


def clock(seconds) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """One line on a terminal, redrawn with ``\\r``: files, frames, spots, time, time left.

    The fraction done is counted in input bytes (a file in progress counts
    by its share of frames done), so one huge file and many small ones both
    give a sensible time left.

    Parameters
    ----------
    label : str
        Text before the bar (``spotfit fit``).
    sizes : dict
        Input size (bytes, at least 1) of every file, by its index.
    stream : file, optional
        Where to draw (default: standard error).
    """

    def __init__(self, label: str, sizes: dict, stream=None):
        self.label, self.sizes = label, dict(sizes)
        self.stream = sys.stderr if stream is None else stream
        self.total = sum(self.sizes.values()) or 1
        self.frames_total: dict = {}
        self.frames_done: dict = {}
        self.found: dict = {}  # spots found so far in files not finished
        self.finished: set = set()
        self.spots = 0  # spots of finished files
        self.start = time.monotonic()
        self.last = 0.0
        self.width = 0

    def update(self, index, frames_done: int, frames_total: int, found: int = 0) -> None:
        """File `index` has done `frames_done` of `frames_total` frames, found `found` spots."""
        self.frames_done[index] = frames_done
        self.frames_total[index] = frames_total
        self.found[index] = found
        self.draw(force=frames_done >= frames_total)  # the last frame is always shown

    def file_done(self, index, n_spots: int) -> None:
        """File `index` is finished (or failed: ``n_spots`` 0) with `n_spots` rows."""
        self.finished.add(index)
        if index in self.frames_total:
            self.frames_done[index] = self.frames_total[index]
        self.found.pop(index, None)
        self.spots += n_spots
        self.draw(force=True)

    def line(self, now: float) -> str:
        """The text of the bar at time `now` (``time.monotonic``)."""
        done = sum(self.sizes[i] for i in self.finished)
        for i, n in self.frames_done.items():
            total = self.frames_total.get(i, 0)
            if i not in self.finished and total:
                done += self.sizes[i] * min(1.0, n / total)
        fraction = min(1.0, done / self.total)
        elapsed = now - self.start
        eta = clock(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
        frames = sum(self.frames_done.values())
        if len(self.sizes) > 1:
            count = f"{len(self.finished)}/{len(self.sizes)} files, {frames} frames"
        else:
            count = f"{frames}/{sum(self.frames_total.values()) or '?'} frames"
        spots = self.spots + sum(self.found.values())
        bar = "#" * int(12 * fraction)
        return f"{self.label} [{bar:.<12}] {count}, {spots} spots | {clock(elapsed)}, ETA {eta}"

    def draw(self, force: bool = False) -> None:
        """Redraw (at most every :data:`REDRAW_INTERVAL` s unless `force`)."""
        global _active
        now = time.monotonic()
        if not force and now - self.last < REDRAW_INTERVAL:
            return
        self.last = now
        line = self.line(now)
        line = line[: max(10, shutil.get_terminal_size((80, 24)).columns - 1)]
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width = len(line)
        _active = self

    def wipe(self) -> None:
        """Blank the line (the next update draws it again)."""
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
            self.last = 0.0

    def close(self) -> None:
        """Blank the line for good."""
        global _active
        self.wipe()
        if _active is self:
            _active = None

    def __enter__(self) -> "ProgressBar":
        self.draw(force=True)
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False
