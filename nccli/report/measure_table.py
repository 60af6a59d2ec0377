"""The ``measure`` table: a rich table per source (a row per metric, a column per layer),
per-class tables, and the cosine matrices as colour heatmaps."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table

from nccli.metrics import METRICS
from nccli.metrics.geometry import COSINE_MATRIX_MAX_CLASSES
from nccli.report.data import fmt_value


def _arrow(metric: str) -> str:
    info = METRICS.get(metric)
    if info is None:
        return ""
    return info.arrow


def _count(metric: str) -> bool:
    info = METRICS.get(metric)
    return info is not None and info.count


def render_measure_table(df: pd.DataFrame, console: Console) -> None:
    """One rich table per source: a row per metric, a column per layer."""
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    layer_rows = df[df["class"].isna()] if "class" in df.columns else df
    keys = ["source", "split", "epoch"] if "split" in df.columns else ["source", "epoch"]
    for key, part in layer_rows.groupby(keys, sort=False, dropna=False):
        source, epoch = key[0], key[-1]
        title = f"{source}" + ("" if epoch is pd.NA or pd.isna(epoch) else f"  (epoch {epoch})")
        if len(key) == 3 and not pd.isna(key[1]):
            title += f"  · split {key[1]}"
        table = Table(title=title, title_justify="left", header_style="bold")
        table.add_column("metric", style="cyan", no_wrap=True)
        table.add_column("", justify="center")
        layers = list(dict.fromkeys(part["layer"]))
        for layer in layers:
            table.add_column(layer, justify="right")
        for metric in dict.fromkeys(part["metric"]):
            sub = part[part["metric"] == metric].set_index("layer")["value"]
            table.add_row(
                metric,
                _arrow(metric),
                *[
                    fmt_value(sub.get(layer, float("nan")), integer=_count(metric))
                    for layer in layers
                ],
            )
        console.print(table)
    if "class" in df.columns:
        per = df[df["class"].notna()]
        if "class2" in df.columns:  # cosine-matrix rows are drawn as heatmaps below
            per = per[per["class2"].isna()]
        # one table per checkpoint and layer: same-named files of different folders or
        # splits must not be pooled (pivot_table would average them)
        for key, part in per.groupby([*keys, "layer"], sort=False, dropna=False):
            source, layer = key[0], key[-1]
            w = part.pivot_table(index="class", columns="metric", values="value", sort=False)
            what = [str(source)]
            if not pd.isna(key[-2]):
                what.append(f"epoch {key[-2]}")
            if len(key) == 4 and not pd.isna(key[1]):
                what.append(f"split {key[1]}")
            table = Table(title=f"{' · '.join(what)} · {layer} · per class", title_justify="left")
            table.add_column("class", justify="right")
            for col in w.columns:
                table.add_column(col, justify="right")
            for k, row in w.iterrows():
                table.add_row(
                    str(k), *[fmt_value(float(row[c]), integer=c == "n_k") for c in w.columns]
                )
            console.print(table)
    if "class2" in df.columns:
        render_cosine_heatmaps(df[df["class2"].notna()], console)


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


def render_cosine_heatmaps(df: pd.DataFrame, console: Console) -> None:
    """Cosine matrices (rows ``class``, ``class2``, metric ``cos_means``/``cos_classifier``)
    as colour heatmaps: blue = -1, white = 0, red = +1; a simplex ETF shows a uniform pale
    blue off-diagonal (``-1/(K-1)``), an orthogonal frame a white one."""
    titles = {
        "cos_means": "cosines of centred class means",
        "cos_classifier": "cosines of classifier rows",
    }
    keys = [c for c in ("source", "split", "epoch", "layer", "metric") if c in df.columns]
    for key, part in df.groupby(keys, sort=False, dropna=False):
        source, layer, metric = key[0], key[-2], key[-1]
        if part["class"].nunique() > COSINE_MATRIX_MAX_CLASSES:  # rows from elsewhere
            console.print(
                f"[dim]{key[0]} · {layer} · {metric}: not drawn, above the heatmap limit of "
                f"{COSINE_MATRIX_MAX_CLASSES} classes[/dim]"
            )
            continue
        mat = part.pivot(index="class", columns="class2", values="value").sort_index()
        what = [
            str(source),
            *(f"{c} {v}" for c, v in zip(keys[1:-2], key[1:-2], strict=True) if not pd.isna(v)),
        ]
        console.print(f"[bold]{' · '.join(what)} · {layer} · {titles.get(metric, metric)}[/bold]")
        table = Table(header_style="bold")
        table.add_column("class", justify="right")
        for col in mat.columns:
            table.add_column(str(col), justify="right")
        for k, row in mat.iterrows():
            cells = []
            for col in mat.columns:
                v = float(row[col])
                text = "nan" if not math.isfinite(v) else f"{v:+.2f}"
                cells.append(f"[{_cos_style(v)}]{text}[/]")
            table.add_row(str(k), *cells)
        console.print(table)
