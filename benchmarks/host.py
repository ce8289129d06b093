"""How fast this machine's CPU is right now: a fixed workload timed in a fresh process.

The 2-core machine the issues' targets are set on is a shared virtual host whose speed per
core drifts by up to 2x within minutes (a pure-Python loop of 2 * 10^7 additions took
1.6 s at one moment and 3.4 s a few minutes later, on an otherwise idle machine).  The
load average does not show it.  Every timing scales with it, compile times and CPU
seconds included; only counts (compilations, passes, rows) and ratios to a reference
measured in the same run, interleaved, do not.  So the benchmarks whose targets are
absolute seconds or spots per second print this reference beside their numbers (before
and after), and a reader can tell a slow machine from a slow program.

    python benchmarks/host.py          # prints the reference seconds of this moment
"""

from __future__ import annotations

import subprocess
import sys

#: the workload: a pure-Python loop (numba's compiler is Python, so a first run's compile
#: time follows it), timed as the CPU seconds of a fresh interpreter
_LOOP = ("import time\n"
         "t = time.process_time()\n"
         "s = 0\n"
         "for i in range(20_000_000):\n"
         "    s += i\n"
         "print(time.process_time() - t)\n")
#: the reference's range seen on this machine (2026-12-03/04), for the printed note
SEEN = (1.6, 3.5)


def reference_seconds() -> float:
    """CPU seconds of the fixed workload in a fresh process (lower: a faster machine now)."""
    done = subprocess.run([sys.executable, "-c", _LOOP], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def describe(seconds) -> str:
    """One line for a benchmark's footer: the reference seconds measured (one or more)."""
    values = " / ".join(f"{s:.2f}" for s in seconds)
    return (f"host speed reference: {values} s (a fixed Python loop, benchmarks/host.py; lower is "
            f"faster; {SEEN[0]:.1f}-{SEEN[1]:.1f} s seen on this machine, and every time here "
            f"scales with it)")


if __name__ == "__main__":
    print(describe([reference_seconds()]))
