"""The ``compare`` tables: a row per checkpoint (or layer, or run), a column per metric,
log-scale sparkline trends and first→last under each metric; ``--by run`` puts runs side by
side with their deltas.  Values that crossed a ``--fail-if`` threshold are bold red.

Also the stderr lines that name those crossings (:func:`violation_lines`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from nccli.compare import DELTA_PREFIX, Across, By, CompareResult
from nccli.metrics import METRICS
from nccli.report.data import fmt_value, sparkline
from nccli.table import Rows, is_missing

_SPARK_MAX = 32
#: crossings named on stderr before "… and N more rows"
MAX_VIOLATION_LINES = 20


def _trend(values: Sequence[float]) -> tuple[str, str]:
    """Sparkline (log scale, at most ``_SPARK_MAX`` points) and ``first→last``."""
    vals = [float(v) for v in values]
    if len(vals) > _SPARK_MAX:
        idx = np.linspace(0, len(vals) - 1, _SPARK_MAX).round().astype(int)
        vals_s = [vals[i] for i in idx]
    else:
        vals_s = vals
    finite = [v for v in vals if math.isfinite(v)]
    ends = f"{fmt_value(finite[0])} → {fmt_value(finite[-1])}" if finite else "nan"
    return sparkline(vals_s, log=True), ends


def _header(metric: str) -> str:
    base = metric.removeprefix(DELTA_PREFIX)
    info = METRICS.get(base)
    if metric.startswith(DELTA_PREFIX):
        return f"Δ{base}"
    if info is None:
        return metric
    return f"{metric} {info.arrow}".rstrip()


def _crossed(result: CompareResult) -> set[tuple]:
    """(source, run, epoch, layer, metric) of every row that crossed a threshold."""
    return {
        (v.source, v.run if result.has_runs else "", v.epoch, v.layer, v.threshold.metric)
        for v in result.violations
    }


def render_compare(result: CompareResult, console: Console) -> None:
    """Rich tables for a comparison (trend sparklines and first→last under each metric)."""
    df = result.rows
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    crossed = _crossed(result)
    if result.by is By.run:
        _render_by_run(result, console, crossed)
        return
    df = df.with_column("_run", df["run"] if "run" in df else [""] * len(df))
    fits = df.where([lay == "" for lay in df["layer"]])  # --fit depth rows: drawn under
    df = df.where([lay != "" for lay in df["layer"]])  # each checkpoint's layers
    metrics = list(dict.fromkeys(df["metric"]))
    if result.across is Across.layers:
        groups = df.groupby(["_run", "source"])
        row_key, first_cols = ["layer"], ["layer"]
    elif result.across is Across.runs:
        groups = df.groupby(["layer"])
        row_key, first_cols = ["_run", "source"], ["run", "source", "epoch"]
    else:
        groups = df.groupby(["_run", "layer"])
        row_key, first_cols = ["source"], ["source", "epoch"]
    if "step" in df and result.across is not Across.layers:
        first_cols.append("step")
    for key, part in groups:
        table = Table(title=_title(result, key, part), title_justify="left", header_style="bold")
        for c in first_cols:
            table.add_column(
                c,
                style="cyan" if c in ("source", "layer", "run") else None,
                justify="left" if c in ("source", "layer", "run") else "right",
            )
        for m in metrics:
            table.add_column(_header(m), justify="right")
        columns = _add_rows(table, part, row_key, first_cols, metrics, crossed)
        if result.across is not Across.runs and len(_row_groups(part, row_key)) > 1:
            _trend_rows(
                table,
                len(first_cols),
                [columns[m] for m in metrics],
                "depth" if result.across is Across.layers else "trend",
            )
        if not fits.empty:
            mine = fits.where([s == part["source"][0] for s in fits["source"]])
            _fit_rows(table, len(first_cols), mine, metrics)
        console.print(table)


def _fit_rows(table: Table, lead: int, fits: Rows, metrics: list[str]) -> None:
    """``--fit depth``: the factor per layer (e^slope) and R² of each metric's fit."""
    got = dict(zip(fits["metric"], fits["value"], strict=True))
    pad = [""] * (lead - 1)
    cells = []
    for m in metrics:
        ratio, r2 = got.get(m + "_depth_ratio", math.nan), got.get(m + "_depth_r2", math.nan)
        cells.append("nan" if not math.isfinite(ratio) else f"×{ratio:.3f}/layer R² {r2:.2f}")
    table.add_row("[dim]fit[/dim]", *pad, *cells)


def _title(result: CompareResult, key: tuple, part: Rows) -> str:
    """Title of one table: the checkpoint (across layers), the layer (across runs), or the
    layer and run (across epochs)."""
    if result.across is Across.layers:
        run, source = key
        epoch = part["epoch"][0]
        title = f"{source}" + ("" if is_missing(epoch) else f"  (epoch {epoch})")
        return title + (f"  · run {run}" if result.has_runs else "")
    if result.across is Across.runs:
        return f"layer {key[0]}  · last checkpoint of each run"
    run, layer = key
    return f"layer {layer}" + (f"  · run {run}" if result.has_runs else "")


def _add_rows(
    table: Table,
    part: Rows,
    row_key: list[str],
    first_cols: list[str],
    metrics: list[str],
    crossed: set[tuple],
) -> dict[str, list[float]]:
    """A row per ``row_key`` group of ``part``; returns each metric's column of values."""
    columns: dict[str, list[float]] = {m: [] for m in metrics}
    for rows in _row_groups(part, row_key):
        first = rows.take([0]).records()[0]
        by_metric = dict(zip(rows["metric"], rows["value"], strict=True))
        cells = []
        for m in metrics:
            v = float(by_metric.get(m, float("nan")))
            columns[m].append(v)
            ep = None if is_missing(first["epoch"]) else int(first["epoch"])
            hot = (first["source"], first["_run"], ep, first["layer"], m)
            txt = fmt_value(v)
            cells.append(f"[bold red]{txt}[/bold red]" if hot in crossed else txt)
        lead = ["" if is_missing(first[c]) else str(first[c]) for c in first_cols]
        table.add_row(*lead, *cells)
    return columns


def _row_groups(part: Rows, row_key: list[str]) -> list[Rows]:
    """The rows of each table row, in order: a run of consecutive rows with the same
    ``row_key`` (and epoch, step) and no metric twice.  Grouping on the key alone would merge
    checkpoints that share a label (``ep0/ckpt.h5``, ``ep1/ckpt.h5`` are both ``ckpt.h5``)
    into one row showing the last one's values."""
    keys = [c for c in dict.fromkeys([*row_key, "epoch", "step"]) if c in part]
    blocks: list[list[int]] = []
    last, seen = None, set()
    for i, (key, metric) in enumerate(zip(part.tuples(keys), part["metric"], strict=True)):
        key = tuple(None if is_missing(v) else v for v in key)
        if key != last or metric in seen or not blocks:
            blocks.append([])
            last, seen = key, set()
        seen.add(metric)
        blocks[-1].append(i)
    return [part.take(block) for block in blocks]


def _trend_rows(table: Table, lead: int, columns: list[list[float]], label: str) -> None:
    trends = [_trend(col) for col in columns]
    table.add_section()
    pad = [""] * (lead - 1)
    table.add_row(f"[dim]{label}[/dim]", *pad, *[f"[magenta]{s}[/magenta]" for s, _ in trends])
    table.add_row("[dim]first→last[/dim]", *pad, *[e for _, e in trends])


def _render_by_run(result: CompareResult, console: Console, crossed: set) -> None:
    """One table per metric: a row per (layer, epoch), a column per run, then the deltas."""
    df = result.rows
    base_metrics = [m for m in dict.fromkeys(df["metric"]) if not m.startswith(DELTA_PREFIX)]
    runs = result.runs
    others = [r for r in runs if r != result.baseline]
    lookup = {
        (layer, e, r, m): (v, src)
        for src, r, e, layer, m, v in df.tuples(
            ["source", "run", "epoch", "layer", "metric", "value"]
        )
    }
    layers = list(dict.fromkeys(df["layer"]))
    for m in base_metrics:
        table = Table(
            title=f"{_header(m)}  · {result.grouping}s by epoch "
            f"(Δ = {result.grouping} − {result.baseline})",
            title_justify="left",
            header_style="bold",
        )
        table.add_column("layer", style="cyan")
        table.add_column("epoch", justify="right", style="cyan")
        cols = [(m, r) for r in runs] + [(DELTA_PREFIX + m, r) for r in others]
        for r in runs:
            table.add_column(r, justify="right")
        for r in others:
            table.add_column(f"Δ {r}−{result.baseline}", justify="right", style="yellow")
        for li, layer in enumerate(layers):
            part = df.where([(la, me) == (layer, m) for la, me in df.tuples(["layer", "metric"])])
            epochs = list(dict.fromkeys(part["epoch"]))
            if li:
                table.add_section()
            columns: list[list[float]] = [[] for _ in cols]
            for k, e in enumerate(epochs):
                cells = []
                for j, (metric, r) in enumerate(cols):
                    v, src = lookup.get((layer, e, r, metric), (float("nan"), None))
                    columns[j].append(float(v))
                    txt = fmt_value(float(v))
                    hot = (src, r, None if is_missing(e) else int(e), layer, metric) in crossed
                    cells.append(f"[bold red]{txt}[/bold red]" if hot else txt)
                table.add_row(layer if k == 0 else "", "" if is_missing(e) else str(e), *cells)
            if len(epochs) > 1:
                _trend_rows(table, 2, columns, "trend")
        console.print(table)


def violation_lines(result: CompareResult, limit: int = MAX_VIOLATION_LINES) -> list[str]:
    """``nccli: fail-if: …`` stderr lines naming the first ``limit`` crossings (then a count
    of the rest), then each threshold that checked nothing."""
    shown = result.violations[:limit]
    lines = [f"nccli: fail-if: {v.describe(result.has_runs)}" for v in shown]
    if len(result.violations) > len(shown):
        lines.append(f"nccli: fail-if: … and {len(result.violations) - len(shown)} more rows")
    lines += [f"nccli: fail-if: {u.describe()}" for u in result.unchecked]
    return lines
