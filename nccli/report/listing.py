"""The utility commands' output: ``nccli info`` (a cache's or checkpoint's attributes and
layer layout, as tables or JSON) and ``nccli metrics`` (the metric catalogue)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nccli.table import Rows

#: the columns of the layer table, in order (those no layer has are left out)
INFO_COLUMNS = (
    "name",
    "module",
    "io",
    "depth",
    "role",
    "pool",
    "shape",
    "dim",
    "dtype",
    "weight",
    "bias",
    "stats",
    "feature_bytes",
    "stats_bytes",
)


def _info_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "x".join(map(str, value))
    return escape(str(value))


def info_json(desc: Mapping[str, Any]) -> str:
    """``info --json``: the whole description (non-JSON values as strings)."""
    return json.dumps(desc, indent=2, default=str)


def render_info(
    title: object,
    head: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    console: Console,
) -> None:
    """A key/value table of ``head`` titled ``title``, then a table with a row per layer."""
    attrs = Table(show_header=False, title=_info_cell(title), title_justify="left")
    attrs.add_column(style="bold")
    attrs.add_column(overflow="fold")
    for k, v in head.items():
        attrs.add_row(_info_cell(k), _info_cell(v))
    console.print(attrs)
    cols = [c for c in INFO_COLUMNS if any(c in r for r in layers)]
    table = Table(header_style="bold")
    for c in cols:
        table.add_column(c)
    for row in layers:
        table.add_row(
            *(_size(row.get(c)) if c.endswith("_bytes") else _info_cell(row.get(c)) for c in cols)
        )
    console.print(table)


def _size(n: object) -> str:
    """A byte count for the eye (decimal units, as ``--max-memory`` reads them)."""
    if not isinstance(n, (int, float)):
        return _info_cell(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def render_metrics(metrics: Iterable[Any], console: Console) -> None:
    """One row per metric (the registry's entries: ``name``, ``family``,
    ``higher_is_better``, ``formula``)."""
    table = Table(header_style="bold")
    for col in ("metric", "family", "better", "formula"):
        table.add_column(col)
    for info in metrics:
        table.add_row(
            escape(info.name),
            info.family,
            info.better,
            escape(info.formula),
        )
    console.print(table)


def metrics_frame(metrics: Iterable[Any]) -> Rows:
    """``metrics --format csv|tsv|json``: the table's rows (metric, family, better,
    formula) as a :class:`~nccli.table.Rows` (no pandas: ``nccli metrics`` starts fast)."""
    rows = [(i.name, i.family, i.better, i.formula) for i in metrics]
    columns = ["metric", "family", "better", "formula"]
    return Rows(columns, {c: [r[j] for r in rows] for j, c in enumerate(columns)})
