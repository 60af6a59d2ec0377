"""The ``measure`` table: a rich table per source (a row per metric, a column per layer),
per-class tables, and the cosine matrices as colour heatmaps."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from nccli.metrics import METRICS
from nccli.metrics.geometry import COSINE_MATRIX_MAX_CLASSES
from nccli.report.data import fmt_value
from nccli.table import Rows, is_missing, mean_of


def _arrow(metric: str) -> str:
    info = METRICS.get(metric)
    if info is None:
        return ""
    return info.arrow


def _count(metric: str) -> bool:
    info = METRICS.get(metric)
    return info is not None and info.count


def _rows(df: Any) -> Rows:
    return df if isinstance(df, Rows) else Rows.from_frame(df)


def _missing(rows: Rows, column: str) -> list[bool]:
    return [is_missing(v) for v in rows[column]]


def render_measure_table(df: Any, console: Console) -> None:
    """One rich table per source: a row per metric, a column per layer (``df``: the
    :class:`~nccli.table.Rows` of ``measure``, or its DataFrame)."""
    rows = _rows(df)
    if rows.empty:
        console.print("[dim]no rows[/dim]")
        return
    layer_rows = rows.where(_missing(rows, "class")) if "class" in rows else rows
    keys = ["source", "split", "epoch"] if "split" in rows else ["source", "epoch"]
    for key, part in layer_rows.groupby(keys):
        source, epoch = key[0], key[-1]
        title = f"{source}" + ("" if epoch is None else f"  (epoch {epoch})")
        if len(key) == 3 and key[1] is not None:
            title += f"  · split {key[1]}"
        for values in _checkpoints(part):
            console.print(_layer_table(title, values))
    if "class" in rows:
        _render_per_class(rows, keys, console)
    if "class2" in rows:
        render_cosine_heatmaps(rows.where([not m for m in _missing(rows, "class2")]), console)


def _checkpoints(part: Rows) -> list[dict[tuple[str, str], Any]]:
    """The value of each (metric, layer) of one title's rows, a dict per checkpoint: files
    of the same name in different folders share a title but are not pooled (a metric of
    a layer seen again starts the next checkpoint)."""
    out: list[dict[tuple[str, str], Any]] = [{}]
    for metric, layer, value in part.tuples(["metric", "layer", "value"]):
        if (metric, layer) in out[-1]:
            out.append({})
        out[-1][metric, layer] = value
    return out


def _layer_table(title: str, values: dict[tuple[str, str], Any]) -> Table:
    """A row per metric, a column per layer."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("metric", style="cyan", no_wrap=True)
    table.add_column("", justify="center")
    layers = list(dict.fromkeys(layer for _, layer in values))
    for layer in layers:
        table.add_column(layer, justify="right")
    for metric in dict.fromkeys(metric for metric, _ in values):
        table.add_row(
            metric,
            _arrow(metric),
            *[
                fmt_value(values.get((metric, layer), math.nan), integer=_count(metric))
                for layer in layers
            ],
        )
    return table


def _render_per_class(rows: Rows, keys: list[str], console: Console) -> None:
    """One table per checkpoint and layer (same-named files of different folders or splits
    are not pooled): a row per class, a column per per-class metric."""
    per = rows.where([not m for m in _missing(rows, "class")])
    if "class2" in rows:  # cosine-matrix rows are drawn as heatmaps below
        per = per.where(_missing(per, "class2"))
    for key, part in per.groupby([*keys, "layer"]):
        source, layer = key[0], key[-1]
        classes, metrics, cells = _pivot(part)
        what = [str(source)]
        if key[-2] is not None:
            what.append(f"epoch {key[-2]}")
        if len(key) == 4 and key[1] is not None:
            what.append(f"split {key[1]}")
        table = Table(title=f"{' · '.join(what)} · {layer} · per class", title_justify="left")
        table.add_column("class", justify="right")
        for col in metrics:
            table.add_column(col, justify="right")
        for k in classes:
            table.add_row(
                str(k),
                *[fmt_value(cells.get((k, c), math.nan), integer=c == "n_k") for c in metrics],
            )
        console.print(table)


def _pivot(part: Rows) -> tuple[list[Any], list[str], dict[tuple[Any, str], float]]:
    """Classes (rows), metrics (columns) and the mean value of each cell, as pandas'
    ``pivot_table(index="class", columns="metric", sort=False)`` gives them: first
    appearance order, cells with no finite value left out, then rows and columns that
    have none."""
    groups: dict[tuple[Any, str], list[float]] = {}
    for k, m, v in part.tuples(["class", "metric", "value"]):
        groups.setdefault((k, m), []).append(float(v))
    means = {key: mean_of(vals) for key, vals in groups.items()}
    cells = {key: v for key, v in means.items() if not math.isnan(v)}
    classes = [k for k in dict.fromkeys(k for k, _ in groups) if any(c[0] == k for c in cells)]
    metrics = [m for m in dict.fromkeys(m for _, m in groups) if any(c[1] == m for c in cells)]
    return classes, metrics, cells


def _cos_style(v: float) -> str:
    """Background for a cosine in [-1, 1]: blue (-1) → white (0) → red (+1)."""
    if not math.isfinite(v):
        return "dim"
    a = max(-1.0, min(1.0, v))
    if a >= 0:
        r, g, b = 255, int(255 * (1 - a)), int(255 * (1 - a))
    else:
        r, g, b = int(255 * (1 + a)), int(255 * (1 + a)), 255
    fg = "white" if abs(a) > 0.6 else "black"
    return f"{fg} on rgb({r},{g},{b})"


def render_cosine_heatmaps(df: Any, console: Console) -> None:
    """Cosine matrices (rows ``class``, ``class2``, metric ``cos_means``/``cos_classifier``)
    as colour heatmaps: blue = -1, white = 0, red = +1; a simplex ETF shows a uniform pale
    blue off-diagonal (``-1/(K-1)``), an orthogonal frame a white one."""
    titles = {
        "cos_means": "cosines of centred class means",
        "cos_classifier": "cosines of classifier rows",
    }
    rows = _rows(df)
    keys = [c for c in ("source", "split", "epoch", "layer", "metric") if c in rows]
    for key, part in rows.groupby(keys):
        source, layer, metric = key[0], key[-2], key[-1]
        present = {k for k in part["class"] if not is_missing(k)}
        if len(present) > COSINE_MATRIX_MAX_CLASSES:  # rows from elsewhere
            console.print(
                f"[dim]{key[0]} · {layer} · {metric}: not drawn, above the heatmap limit of "
                f"{COSINE_MATRIX_MAX_CLASSES} classes[/dim]"
            )
            continue
        mat = {(k, k2): float(v) for k, k2, v in part.tuples(["class", "class2", "value"])}
        what = [
            str(source),
            *(f"{c} {v}" for c, v in zip(keys[1:-2], key[1:-2], strict=True) if v is not None),
        ]
        console.print(f"[bold]{' · '.join(what)} · {layer} · {titles.get(metric, metric)}[/bold]")
        table = Table(header_style="bold")
        table.add_column("class", justify="right")
        columns = sorted({k2 for _, k2 in mat})
        for col in columns:
            table.add_column(str(col), justify="right")
        for k in sorted({k for k, _ in mat}):
            cells = []
            for col in columns:
                v = mat.get((k, col), math.nan)
                text = "nan" if not math.isfinite(v) else f"{v:+.2f}"
                cells.append(f"[{_cos_style(v)}]{text}[/]")
            table.add_row(str(k), *cells)
        console.print(table)
