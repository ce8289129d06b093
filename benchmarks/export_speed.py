"""Export speed: seconds per million rows for each ``spotfit export`` format.

Builds a fit table of N rows (the columns of a 2D ``spotfit fit`` table,
random values, a few NaN) and times writing it as spotfit's own CSV (the
reference, measured in the same run), ThunderSTORM CSV, Picasso HDF5 + YAML
and Parquet.  Prints seconds, rows/s and the time relative to spotfit's CSV.
Picasso and Parquet need ``pip install 'spotfit[export]'`` (skipped without).

    python benchmarks/export_speed.py             # 10^6 rows, ~1 min
    python benchmarks/export_speed.py --rows 200000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spotfit import export
from spotfit.table import columns, write_table


def make_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = {}
    for name in columns(2):
        if name == "frame":
            table[name] = np.sort(rng.integers(0, 10_000, n))
        elif name == "iterations":
            table[name] = rng.integers(2, 20, n).astype(np.int32)
        elif name == "status":
            table[name] = np.where(rng.random(n) < 0.95, "converged", "low_signal")
        elif name == "unit":
            table[name] = np.full(n, "photon")
        else:
            table[name] = rng.uniform(0.01, 500.0, n)
    frame = pd.DataFrame(table)
    frame.loc[rng.choice(n, n // 1000, replace=False), "x_err"] = np.nan
    return frame


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = make_table(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        jobs = {
            "spotfit csv (reference)": lambda: write_table(table, out / "a.csv"),
            "thunderstorm": lambda: export.write_thunderstorm(table, out / "b.csv",
                                                              pixel_size=0.1, rows="all"),
            "picasso": lambda: export.write_picasso(table, out / "c.hdf5", 2048, 2048, 10_000,
                                                    pixel_size=0.1, rows="all"),
            "parquet": lambda: export.write_parquet(table, out / "d.parquet"),
        }
        write_table(table, out / "warm.csv")  # load the compiled CSV renderer first
        print(f"{args.rows} rows, best of {args.repeats}")
        print(f"{'format':<26}{'s':>8}{'rows/s':>12}{'vs csv':>9}")
        reference = None
        for name, job in jobs.items():
            try:
                seconds = best_of(args.repeats, job)
            except Exception as exc:  # an extra not installed
                print(f"{name:<26}  skipped ({exc})")
                continue
            reference = reference or seconds
            print(f"{name:<26}{seconds:8.2f}{args.rows / seconds:12.0f}{seconds / reference:9.2f}")


if __name__ == "__main__":
    main()
