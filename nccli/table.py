"""A light table of rows: what the commands compute and write, without pandas.

``measure``, ``compare`` and ``metrics`` build their rows as a :class:`Rows` (column names
and one list of values per column); the CLI writes it (:mod:`nccli.report.data`) and draws
it (:mod:`nccli.report.measure_table`, :mod:`nccli.report.compare_table`) as it is, and
only the Python API turns it into the DataFrame it returns (:meth:`Rows.to_frame`, the one
place pandas is imported; docs/performance.md).  Importing pandas costs a command-line
call more than the measuring of a small feature file does.

A column's *kind* says what the DataFrame's column is and how a writer spells its cells:
``"int"`` (pandas ``Int64``: ``None`` is ``<NA>``), ``"float"`` (``None`` is ``nan``) or
``"auto"`` (what pandas infers from the values, :func:`infer_kind`: ``int`` and ``bool``
columns without a gap, numbers with ``None`` or a float as ``float``, else ``"object"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Rows", "infer_kind", "is_missing", "key_of", "mean_of"]

KINDS = ("auto", "int", "float")


def is_missing(v: object) -> bool:
    """``None``, a float ``nan`` or pandas' ``NA`` (a cell a writer leaves empty)."""
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    if type(v).__name__ == "NAType":
        return True
    try:
        return bool(v != v)  # numpy floating nan
    except (TypeError, ValueError):
        return False


def key_of(v: object) -> object:
    """A cell as a grouping key: every missing value is ``None`` (pandas' ``dropna=False``)."""
    return None if is_missing(v) else v


def _is_bool(v: object) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool"


def _is_int(v: object) -> bool:
    return not _is_bool(v) and (isinstance(v, int) or type(v).__name__.startswith(("int", "uint")))


def _is_float(v: object) -> bool:
    return isinstance(v, float) or type(v).__name__.startswith("float")


def infer_kind(values: Sequence[Any]) -> str:
    """The dtype pandas gives a column of these Python values: ``"bool"``, ``"int"``
    (``int64``, no gap), ``"float"`` (numbers with a ``None`` or a float among them) or
    ``"object"`` (strings, mixed values, all ``None``)."""
    present = [v for v in values if v is not None]
    if not present:
        return "object"
    if len(present) == len(values) and all(map(_is_bool, present)):
        return "bool"
    if len(present) == len(values) and all(map(_is_int, present)):
        return "int64"
    if all(_is_int(v) or _is_float(v) for v in present):
        return "float"
    return "object"


def mean_of(values: Sequence[float]) -> float:
    """The mean of the non-nan values as pandas' ``groupby().mean()`` sums them
    (compensated), ``nan`` when there is none."""
    total = comp = 0.0
    n = 0
    for v in values:
        v = float(v)
        if math.isnan(v):
            continue
        n += 1
        y = v - comp
        t = total + y
        comp = t - total - y
        if math.isnan(comp):
            comp = 0.0
        total = t
    return total / n if n else math.nan


class Rows:
    """Column names, a list of values per column, each column's kind, and ``attrs``."""

    def __init__(
        self,
        columns: Sequence[str],
        data: Mapping[str, Sequence[Any]] | None = None,
        kinds: Mapping[str, str] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.columns = list(columns)
        data = data or {}
        self.data = {c: list(data.get(c, ())) for c in self.columns}
        n = {len(v) for v in self.data.values()}
        if len(n) > 1:
            raise ValueError(f"columns of different lengths: {sorted(n)}")
        self.kinds = {c: (kinds or {}).get(c, "auto") for c in self.columns}
        unknown = set(self.kinds.values()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown column kinds {sorted(unknown)}; kinds are {KINDS}")
        self.attrs: dict[str, Any] = dict(attrs or {})

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        columns: Sequence[str],
        kinds: Mapping[str, str] | None = None,
    ) -> Rows:
        """Rows of dicts (a missing key is ``None``), columns in ``columns`` order."""
        records = list(records)
        data = {c: [r.get(c) for r in records] for c in columns}
        return cls(columns, data, kinds)

    @classmethod
    def from_frame(cls, df: Any) -> Rows:
        """A DataFrame as rows (``Int64`` columns are ``"int"``, float columns ``"float"``)."""
        kinds = {}
        data = {}
        for c in df.columns:
            col = df[c]
            name = str(col.dtype)
            kinds[c] = "int" if name == "Int64" else "float" if col.dtype.kind == "f" else "auto"
            data[c] = [None if is_missing(v) and kinds[c] != "float" else v for v in col.tolist()]
        return cls(list(df.columns), data, kinds, dict(df.attrs))

    # ---------------------------------------------------------------- reading
    def __repr__(self) -> str:
        return f"Rows({len(self)} rows; columns {', '.join(self.columns)})"

    def __len__(self) -> int:
        return len(self.data[self.columns[0]]) if self.columns else 0

    @property
    def empty(self) -> bool:
        return len(self) == 0

    def __contains__(self, column: object) -> bool:
        return column in self.data

    def __getitem__(self, column: str) -> list[Any]:
        return self.data[column]

    def kind(self, column: str) -> str:
        """What the DataFrame's column is: ``"int"`` (``Int64``), ``"float"``, or the kind
        pandas infers (:func:`infer_kind`)."""
        k = self.kinds[column]
        return infer_kind(self.data[column]) if k == "auto" else k

    def tuples(self, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """Each row's values of ``columns``."""
        return zip(*(self.data[c] for c in columns), strict=True) if columns else iter(())

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, t, strict=True)) for t in self.tuples(self.columns)]

    # ---------------------------------------------------------------- building
    def take(self, index: Iterable[int]) -> Rows:
        """The rows at ``index``, in that order."""
        index = list(index)
        data = {c: [v[i] for i in index] for c, v in self.data.items()}
        return Rows(self.columns, data, self.kinds, self.attrs)

    def where(self, keep: Callable[[dict[str, Any]], bool] | Sequence[bool]) -> Rows:
        """The rows where ``keep`` (a flag per row, or a test of the row's dict) holds."""
        flags = list(keep) if not callable(keep) else [keep(r) for r in self.records()]
        return self.take(i for i, f in enumerate(flags) if f)

    def select(self, columns: Sequence[str]) -> Rows:
        """These columns, in this order."""
        return Rows(columns, self.data, self.kinds, self.attrs)

    def with_column(
        self, name: str, values: Sequence[Any], at: int | None = None, kind: str = "auto"
    ) -> Rows:
        """A copy with column ``name`` set to ``values`` (inserted at ``at`` when new)."""
        cols = list(self.columns)
        if name not in cols:
            cols.insert(len(cols) if at is None else at, name)
        data = {**self.data, name: list(values)}
        return Rows(cols, data, {**self.kinds, name: kind}, self.attrs)

    def groupby(self, keys: Sequence[str]) -> list[tuple[tuple[Any, ...], Rows]]:
        """``(key, rows)`` per distinct key, in order of first appearance; missing values
        form a group of their own (pandas' ``groupby(sort=False, dropna=False)``)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, key in enumerate(self.tuples(keys)):
            groups.setdefault(tuple(map(key_of, key)), []).append(i)
        return [(key, self.take(index)) for key, index in groups.items()]

    def sort(self, keys: Sequence[str]) -> Rows:
        """Rows ordered by ``keys`` (stable; missing values last, as pandas'
        ``sort_values(kind="stable", na_position="last")``)."""
        cols = [self.data[k] for k in keys]

        def rank(i: int) -> tuple[tuple[bool, Any], ...]:
            return tuple((is_missing(c[i]), 0 if is_missing(c[i]) else c[i]) for c in cols)

        return self.take(sorted(range(len(self)), key=rank))

    def map(self, column: str, mapping: Mapping[Any, Any]) -> list[Any]:
        """``column``'s values through ``mapping`` (``None`` where it has none)."""
        return [mapping.get(v) for v in self.data[column]]

    @staticmethod
    def concat(parts: Sequence[Rows], columns: Sequence[str] | None = None) -> Rows:
        """The rows of ``parts`` one after the other (columns of the first unless given)."""
        columns = list(columns if columns is not None else parts[0].columns)
        data = {c: [v for p in parts for v in p.data.get(c, [None] * len(p))] for c in columns}
        kinds = {c: next((p.kinds[c] for p in parts if c in p.kinds), "auto") for c in columns}
        return Rows(columns, data, kinds, parts[0].attrs if parts else {})

    # ---------------------------------------------------------------- pandas
    def to_frame(self) -> Any:
        """The pandas DataFrame of these rows (``attrs`` copied): the Python API's result."""
        import pandas as pd

        df = pd.DataFrame({c: self.data[c] for c in self.columns}, columns=self.columns)
        for c in self.columns:
            if self.kinds[c] == "int":
                df[c] = df[c].astype("Int64")
            elif self.kinds[c] == "float":
                df[c] = df[c].astype(float)
        df.attrs.update(self.attrs)
        return df
