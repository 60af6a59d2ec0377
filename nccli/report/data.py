"""Data writers: tidy rows → CSV / TSV / JSON, and the cell formats tables share.

Data goes to stdout; the caller sends notes and progress to stderr.  CSV/TSV/JSON are the
tidy rows (``source,epoch,layer,metric,value``) unless ``wide`` pivots one column per
metric.  Numbers are written with full precision (``repr`` of the float) so a pipeline
reads back exactly what was computed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import IO

import pandas as pd

from nccli.choices import OutputFormat

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
