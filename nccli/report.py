"""Rendering: tidy rows → rich table / CSV / TSV / JSON, sparklines.

Data goes to stdout; the caller sends notes and progress to stderr.  CSV/TSV/JSON are the
tidy rows (``source,epoch,layer,metric,value``) unless ``wide`` pivots one column per
metric.  Numbers are written with full precision (``repr`` of the float) so a pipeline
reads back exactly what was computed.
"""

from __future__ import annotations

import enum
import io
import json
import math
from collections.abc import Sequence
from typing import IO

import pandas as pd
from rich.console import Console
from rich.table import Table

from nccli.metrics import METRICS


class OutputFormat(str, enum.Enum):
    """``--format`` choices."""

    table = "table"
    csv = "csv"
    tsv = "tsv"
    json = "json"


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
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
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


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, epoch, layer[, class]), one column per metric, metric order kept."""
    index = [c for c in ("source", "epoch", "layer", "class", "class2") if c in df.columns]
    order = list(dict.fromkeys(df["metric"]))
    out = df.pivot_table(index=index, columns="metric", values="value", dropna=False, sort=False)
    out = out.reindex(columns=order).reset_index()
    out.columns.name = None
    return out


def write_data(
    df: pd.DataFrame, fmt: OutputFormat, stream: IO[str], *, as_wide: bool = False
) -> None:
    """Write ``df`` as CSV / TSV / JSON (tidy unless ``as_wide``)."""
    data = wide(df) if as_wide and not df.empty else df
    if fmt in (OutputFormat.csv, OutputFormat.tsv):
        sep = "," if fmt is OutputFormat.csv else "\t"
        buf = io.StringIO()
        data = data.copy()
        for col in data.columns:
            if data[col].dtype.kind == "f":  # full precision, nan spelled out
                data[col] = [repr(float(v)) if not math.isnan(v) else "nan" for v in data[col]]
        data.to_csv(buf, sep=sep, index=False, na_rep="")
        stream.write(buf.getvalue())
    elif fmt is OutputFormat.json:
        records = []
        for rec in data.to_dict(orient="records"):
            clean = {}
            for k, v in rec.items():
                if v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                    v = None
                elif hasattr(v, "item"):
                    v = v.item()
                clean[k] = v
            records.append(clean)
        stream.write(json.dumps(records, indent=1, allow_nan=False) + "\n")
    else:  # pragma: no cover - tables go through render_measure_table
        raise ValueError(fmt)


def _arrow(metric: str) -> str:
    info = METRICS.get(metric)
    if info is None:
        return ""
    return "↑" if info.higher_is_better else "↓"


def render_measure_table(df: pd.DataFrame, console: Console) -> None:
    """One rich table per source: a row per metric, a column per layer."""
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    layer_rows = df[df["class"].isna()] if "class" in df.columns else df
    for (source, epoch), part in layer_rows.groupby(["source", "epoch"], sort=False, dropna=False):
        title = f"{source}" + ("" if epoch is pd.NA or pd.isna(epoch) else f"  (epoch {epoch})")
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
                *[fmt_value(sub.get(layer, float("nan"))) for layer in layers],
            )
        console.print(table)
    if "class" in df.columns:
        per = df[df["class"].notna()]
        if "class2" in df.columns:  # cosine-matrix rows are drawn as heatmaps below
            per = per[per["class2"].isna()]
        for (source, layer), part in per.groupby(["source", "layer"], sort=False):
            w = part.pivot_table(index="class", columns="metric", values="value", sort=False)
            table = Table(title=f"{source} · {layer} · per class", title_justify="left")
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
    for (source, layer, metric), part in df.groupby(["source", "layer", "metric"], sort=False):
        mat = part.pivot(index="class", columns="class2", values="value").sort_index()
        console.print(f"[bold]{source} · {layer} · {titles.get(metric, metric)}[/bold]")
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
