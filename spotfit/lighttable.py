"""A result table without pandas: ordered numpy columns, for the command line's common path.

Importing pandas costs a fresh process 0.3-0.5 s, a quarter of a warm ``spotfit
fit`` of a small image (issue #14: users run it in shell loops over thousands of
files).  The single-spot path (:mod:`spotfit.single`, :func:`spotfit.fields.fit_frames`
where spots stand apart) and detection build their rows as a :class:`LightTable`;
the command line writes it as CSV (:func:`spotfit.table.to_csv_bytes`, the same
bytes as pandas') and never imports pandas.  Everything else gets a
``pandas.DataFrame``: the public functions (:func:`spotfit.fit`, ...) return
:func:`as_frame` of their table, and the paths that need pandas (joint fits of
overlapping spots, ``--qc``, ``--format``) convert it on entry.

:class:`LightTable` has the few ``DataFrame`` members those paths use
(``len``, ``columns``, ``shape``, ``table[name].to_numpy()``, ``==`` on a
column, row selection by mask or ``iloc``, ``insert``, item assignment,
``copy``); nothing more.  String columns are object arrays of ``str``; their
pandas dtype is ``"str"`` (:func:`as_frame`), as :func:`spotfit.table.build` gives.
"""

from __future__ import annotations

import numpy as np


class LightColumn:
    """One column of a :class:`LightTable` (what ``table[name]`` returns)."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray):
        self.values = values

    @property
    def dtype(self):
        return self.values.dtype

    def __len__(self) -> int:
        return len(self.values)

    def to_numpy(self, dtype=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype, copy=False)

    def astype(self, dtype) -> np.ndarray:
        return self.values.astype(dtype)

    def __eq__(self, other):
        return self.values == other

    def __ne__(self, other):
        return self.values != other

    __hash__ = None


class _Rows:
    def __init__(self, table: LightTable):
        self._table = table

    def __getitem__(self, rows) -> LightTable:
        return self._table._take(rows)


class LightTable:
    """Ordered, equal-length numpy columns (see the module docstring).

    Parameters
    ----------
    data : dict of str -> (n,) ndarray
        Columns in table order.  A string column is an object array of ``str``.
    """

    def __init__(self, data: dict):
        self._data = dict(data)
        lengths = {len(v) for v in self._data.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of unequal lengths {sorted(lengths)}")
        self._n = lengths.pop() if lengths else 0

    # ---------------------------------------------------------- DataFrame-like
    def __len__(self) -> int:
        return self._n

    @property
    def columns(self) -> list:
        return list(self._data)

    @property
    def shape(self) -> tuple:
        return (self._n, len(self._data))

    def __contains__(self, name) -> bool:
        return name in self._data

    def __getitem__(self, key):
        if isinstance(key, str):
            return LightColumn(self._data[key])
        if isinstance(key, list) and all(isinstance(k, str) for k in key):
            return LightTable({k: self._data[k] for k in key})
        return self._take(key)  # a boolean mask or row numbers

    def __setitem__(self, name: str, values) -> None:
        values = values.values if isinstance(values, LightColumn) else values
        self._data[name] = np.broadcast_to(np.asarray(values), (self._n,)).copy()

    @property
    def iloc(self) -> _Rows:
        return _Rows(self)

    def insert(self, loc: int, name: str, values) -> None:
        """Insert column ``name`` at position ``loc`` (in place, as ``DataFrame.insert``)."""
        if name in self._data:
            raise ValueError(f"cannot insert {name}, already exists")
        items = list(self._data.items())
        values = np.broadcast_to(np.asarray(values), (self._n,)).copy()
        items.insert(loc, (name, values))
        self._data = dict(items)

    def copy(self) -> LightTable:
        return LightTable({k: v.copy() for k, v in self._data.items()})

    def _take(self, rows) -> LightTable:
        rows = np.asarray(rows)
        if rows.dtype == bool and len(rows) != self._n:
            raise IndexError(f"boolean index of length {len(rows)} for {self._n} rows")
        out = LightTable({k: v[rows] for k, v in self._data.items()})
        if not self._data:
            out._n = int(rows.sum()) if rows.dtype == bool else len(rows)
        return out

    # ---------------------------------------------------------- conversion
    def to_csv_bytes(self, float_format: str = "%.8g") -> bytes:
        """The text of ``as_frame(self).to_csv(index=False, float_format=float_format)``
        (pandas' own steps: each value formatted, NaN and None as an empty field,
        then :mod:`csv` with minimal quoting and ``\\n`` line ends), without pandas.

        For small tables: one Python call per value (:mod:`spotfit._csv` renders
        large ones)."""
        import csv
        import io

        def text(values: np.ndarray) -> list:
            kind = values.dtype.kind
            if kind == "f":
                return ["" if v != v else float_format % v for v in values.tolist()]
            if kind in "iub":
                return [str(v) for v in values.tolist()]
            return ["" if v is None or (isinstance(v, float) and v != v) else str(v)
                    for v in values.tolist()]

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(zip(*(text(v) for v in self._data.values())))
        return out.getvalue().encode()

    def to_pandas(self):
        """The same table as a ``pandas.DataFrame`` (string columns with dtype ``"str"``)."""
        import pandas as pd

        data = {k: (pd.Series(v, dtype="str") if v.dtype == object else v)
                for k, v in self._data.items()}
        return pd.DataFrame(data, columns=list(self._data))


def as_frame(table):
    """``table`` as a ``pandas.DataFrame`` (a DataFrame is returned as it is)."""
    return table.to_pandas() if isinstance(table, LightTable) else table


def concat(parts):
    """Rows of ``parts`` one after the other, renumbered (``pd.concat(parts,
    ignore_index=True)``); a :class:`LightTable` if every part is one (with the same
    columns), else a DataFrame."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, LightTable) for p in parts) and \
            all(p.columns == parts[0].columns for p in parts):
        names = parts[0].columns
        return LightTable({k: np.concatenate([p._data[k] for p in parts]) for k in names})
    import pandas as pd

    return pd.concat([as_frame(p) for p in parts], ignore_index=True)
