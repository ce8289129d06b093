"""The compiled CSV renderer writes exactly what pandas writes with float_format="%.8g"."""

import numpy as np
import pandas as pd
import pytest

from spotfit._csv import to_csv_bytes


def _reference(df):
    return df.to_csv(index=False, float_format="%.8g").encode()


def test_floats_over_many_decades_match_pandas():
    rng = np.random.default_rng(0)
    n = 20000
    values = rng.normal(0, 1, n) * 10.0 ** rng.integers(-15, 15, n)
    edge = [0.0, -0.0, 1.0, 10.0, 1e8, 1e7, 99999999.5, 9.99999995, 1e-4, 1e-5, 123456789.0, 1.5, -2.25,
            np.nan, np.inf, -np.inf, 2047.123456789, 0.1, 0.3, 1 / 3, 5e-324, 1.7976931348623157e308]
    v = np.concatenate([values, edge])
    df = pd.DataFrame({"v": v, "w": v[::-1]})
    assert to_csv_bytes(df, compiled=True) == _reference(df)


def test_mixed_columns_match_pandas():
    n = 50
    df = pd.DataFrame({
        "frame": np.arange(n, dtype=np.int64) - 3,
        "x": np.linspace(-1.5, 2047.5, n),
        "iterations": np.arange(n, dtype=np.int32),
        "status": np.where(np.arange(n) % 3 == 0, "converged", "low_signal"),
        "flag": np.arange(n) % 2 == 0,
        "note": [None if i % 7 == 0 else 'a, "b"' for i in range(n)],
    })
    assert to_csv_bytes(df, compiled=True) == _reference(df)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_row(n):
    df = pd.DataFrame({"frame": np.zeros(n, np.int64), "x": np.full(n, 0.25), "status": ["converged"] * n})
    assert to_csv_bytes(df, compiled=True) == _reference(df)
