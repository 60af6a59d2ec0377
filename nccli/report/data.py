"""Data writers: tidy rows → CSV / TSV / JSON, and the cell formats tables share.

Data goes to stdout; the caller sends notes and progress to stderr.  CSV/TSV/JSON are the
tidy rows (``source,epoch,layer,metric,value``) unless ``wide`` pivots one column per
metric.  Numbers are written with full precision (``repr`` of the float) so a pipeline
reads back exactly what was computed.

The writers take a :class:`~nccli.table.Rows` (what the commands build) or a DataFrame
(what the Python API returns) and write the same bytes for both, without pandas: a float
column's cells are ``repr`` or ``nan``, an ``Int64`` column's gaps and any other missing
cell are empty (CSV) or ``null`` (JSON), as pandas' ``to_csv`` / ``to_dict`` gave them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from typing import IO, Any

from nccli.choices import OutputFormat
from nccli.table import Rows, is_missing, key_of, mean_of

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], log: bool = True) -> str:
    """Unicode sparkline of ``values`` (log scale when all are positive; nan → space)."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return " " * len(vals)
    use_log = log and all(v > 0 for v in finite)
    tr = [math.log10(v) if use_log and math.isfinite(v) else v for v in vals]
    ft = [v for v in tr if math.isfinite(v)]
    lo, hi = min(ft), max(ft)
    out = []
    for v in tr:
        if not math.isfinite(v):
            out.append(" ")
        elif hi == lo:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(
                SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * (len(SPARK) - 1) + 0.5))]
            )
    return "".join(out)


def fmt_value(v: object, *, integer: bool = False) -> str:
    """Compact human formatting for a table cell (``integer``: a count such as ``n_k``)."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType":
        return "nan"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if integer and v.is_integer():
            return str(int(v))
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _as_rows(df: Any) -> Rows:
    return df if isinstance(df, Rows) else Rows.from_frame(df)


def wide(df: Any) -> Any:
    """One row per (source, epoch, layer[, class]), one column per metric, metric order kept.

    As pandas' ``pivot_table(dropna=False, sort=False)`` did: a row for every combination
    of the index columns' values (each in order of first appearance), repeated rows
    averaged, ``nan`` where a combination has no row.  A DataFrame gives a DataFrame."""
    rows = _as_rows(df)
    index = [c for c in ("source", "epoch", "layer", "class", "class2") if c in rows]
    order = list(dict.fromkeys(rows["metric"]))
    cells: dict[tuple, dict[str, list[float]]] = {}
    levels: list[dict[Any, None]] = [{} for _ in index]
    for key, metric, value in zip(rows.tuples(index), rows["metric"], rows["value"], strict=True):
        key = tuple(map(key_of, key))
        for level, v in zip(levels, key, strict=True):
            level.setdefault(v, None)
        cells.setdefault(key, {}).setdefault(metric, []).append(value)
    keys = list(itertools.product(*levels)) if len(index) > 1 else list(cells)
    data: dict[str, list[Any]] = {c: [k[i] for k in keys] for i, c in enumerate(index)}
    for m in order:
        data[m] = [mean_of(cells.get(k, {}).get(m, ())) for k in keys]
    kinds = {**{c: rows.kinds[c] for c in index}, **dict.fromkeys(order, "float")}
    out = Rows([*index, *order], data, kinds)
    return out if isinstance(df, Rows) else out.to_frame()


def _csv_cells(rows: Rows, column: str) -> list[str]:
    """A column's CSV cells: floats in full precision (``nan`` spelled out), integers as
    integers, every other missing cell empty."""
    kind, values = rows.kind(column), rows[column]
    if kind == "float":
        return ["nan" if is_missing(v) else repr(float(v)) for v in values]
    if kind in ("int", "int64"):
        return ["" if is_missing(v) else str(int(v)) for v in values]
    if kind == "bool":
        return [str(bool(v)) for v in values]
    return ["" if is_missing(v) else str(v) for v in values]


def _json_cells(rows: Rows, column: str) -> list[Any]:
    """A column's JSON values: missing cells ``None``, numbers as Python numbers."""
    kind, values = rows.kind(column), rows[column]
    if kind == "float":
        return [None if is_missing(v) else float(v) for v in values]
    if kind in ("int", "int64"):
        return [None if is_missing(v) else int(v) for v in values]
    if kind == "bool":
        return [bool(v) for v in values]
    return [None if is_missing(v) else v.item() if hasattr(v, "item") else v for v in values]


def write_data(df: Any, fmt: OutputFormat, stream: IO[str], *, as_wide: bool = False) -> None:
    """Write ``df`` (:class:`~nccli.table.Rows` or a DataFrame) as CSV / TSV / JSON (tidy
    unless ``as_wide``)."""
    data = _as_rows(df)
    if as_wide and not data.empty:
        data = wide(data)
    if fmt in (OutputFormat.csv, OutputFormat.tsv):
        sep = "," if fmt is OutputFormat.csv else "\t"
        writer = csv.writer(stream, delimiter=sep, lineterminator="\n")
        writer.writerow([str(c) for c in data.columns])
        writer.writerows(zip(*(_csv_cells(data, c) for c in data.columns), strict=True))
    elif fmt is OutputFormat.json:
        cols = [_json_cells(data, c) for c in data.columns]
        records = [dict(zip(data.columns, r, strict=True)) for r in zip(*cols, strict=True)]
        stream.write(json.dumps(records, indent=1, allow_nan=False) + "\n")
    else:  # pragma: no cover - tables go through render_measure_table
        raise ValueError(fmt)
