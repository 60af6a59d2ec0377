"""``compare --plot``: NC metrics against epoch (or depth), one panel per metric.

matplotlib is optional (``pip install 'nccli[plot]'``) and used through the Agg canvas
only, never pyplot, so plotting works headless and leaves the global backend alone.

Scales.  Epochs span orders of magnitude, so x is logarithmic — ``symlog`` (linear below 1)
when epoch 0 is present.  y is logarithmic when every value is positive and they span more
than a factor of :data:`LOG_SPAN` (3: an accuracy between 0.97 and 1 reads better on a
linear axis than on ticks like 9.95×10⁻¹); when a panel has zeros (``nc4`` reaches exactly
0) or negative values (``nc3_cos``, deltas) it is ``symlog`` with the linear range set just
below the smallest non-zero magnitude, so zero sits at the bottom of the axis instead of
being dropped.  ``nan`` points are left out.

The figure is written to ``<file>.partial`` and renamed (:func:`nccli.io.safe.atomic_output`),
so a failed write never leaves a half image under the requested name and a link planted at
either name is never followed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nccli.compare import DEFAULT_METRICS, DELTA_PREFIX, Across, CompareResult
from nccli.errors import UsageError
from nccli.io.safe import atomic_output

PLOT_HINT = "pip install 'nccli[plot]'"


def require_matplotlib() -> Any:
    """Import matplotlib or raise a one-line :class:`UsageError` saying how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None
    return matplotlib


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """Fail early (before measuring) on a missing matplotlib, format or directory."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    p = Path(path)
    fmt = p.suffix.lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(
            f"--plot {p}: unknown image type {p.suffix or '(none)'!r}; "
            f"use one of {', '.join('.' + k for k in sorted(supported))}"
        )
    if not p.parent.is_dir():
        raise UsageError(f"--plot {p}: directory {p.parent} does not exist")
    return p


def _colors() -> list[str]:
    import matplotlib as mpl

    cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    more = [mpl.colors.to_hex(c) for c in mpl.colormaps["tab20"].colors]
    return list(dict.fromkeys([*cycle, *more]))


def _x_values(part: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Epoch if every row has one, else step, else the checkpoint's position."""
    for col in ("epoch", "step"):
        if col in part.columns and part[col].notna().all():
            return part[col].to_numpy(dtype=float), col
    return np.arange(len(part), dtype=float), "checkpoint"


#: a panel of positive values gets a logarithmic y axis only when they span more than this
LOG_SPAN = 3.0


def _set_yscale(ax: Any, values: Sequence[float]) -> None:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return
    if (finite > 0).all():
        if finite.max() > LOG_SPAN * finite.min():
            ax.set_yscale("log")
        return
    nonzero = np.abs(finite[finite != 0])
    if nonzero.size == 0:
        return  # all zero: a linear axis shows that best
    linthresh = 10.0 ** math.floor(math.log10(nonzero.min()))
    ax.set_yscale("symlog", linthresh=linthresh)


def _set_xscale(ax: Any, xs: Sequence[float], kind: str) -> None:
    x = np.asarray([v for v in xs if math.isfinite(v)], dtype=float)
    if kind not in ("epoch", "step") or x.size < 2 or np.unique(x).size < 2:
        return
    if (x > 0).all():
        ax.set_xscale("log")
    elif (x >= 0).all():
        ax.set_xscale("symlog", linthresh=1.0)


class _Lines:
    """Draws lines on the panels: one colour and one legend entry per label, across panels."""

    def __init__(self) -> None:
        self.colors = _colors()
        self.handles: dict[str, Any] = {}

    def draw(self, ax: Any, label: str, x: np.ndarray, y: np.ndarray, **kw: Any) -> None:
        if not np.isfinite(y).any():
            return  # a metric undefined on this line (e.g. nc3 without a classifier)
        handles = self.handles
        k = list(handles).index(label) if label in handles else len(handles)
        color = self.colors[k % len(self.colors)]
        (line,) = ax.plot(x, y, color=color, label=label, **{"marker": "o", "ms": 3, **kw})
        handles.setdefault(label, line)


def _metrics_to_plot(
    result: CompareResult, df: pd.DataFrame, metrics: Sequence[str] | None, p: Path
) -> list[str]:
    if metrics is None:
        metrics = [m for m in result.metrics if not m.startswith(DELTA_PREFIX)]
    metrics = [m for m in (metrics or DEFAULT_METRICS) if m in set(df["metric"])]
    if not metrics:
        raise UsageError(f"--plot {p}: none of the metrics to plot were measured")
    return metrics


def _figure(n: int) -> tuple[Any, np.ndarray]:
    """A figure with ``n`` panels on a grid of up to 4 columns (and its Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _panel_layers(ax: Any, df: pd.DataFrame, part: pd.DataFrame, lines: _Lines) -> list[float]:
    """Against depth: a line per checkpoint."""
    several_runs = df["_run"].nunique() > 1
    values: list[float] = []
    order = list(dict.fromkeys(df["layer"]))
    for (run, source), line in part.groupby(["_run", "source"], sort=False):
        x = line["layer"].map({name: i for i, name in enumerate(order)}).to_numpy(float)
        y = line["value"].to_numpy(float)
        ep = line["epoch"].iloc[0]
        label = f"{run} · {source}" if several_runs else str(source)
        label += "" if pd.isna(ep) else f" (ep {ep})"
        lines.draw(ax, label, x, y)
        values.extend(y)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("layer (depth order)")
    return values


def _panel_runs(ax: Any, df: pd.DataFrame, part: pd.DataFrame, lines: _Lines) -> list[float]:
    """The runs on x (their last checkpoints): points per layer."""
    values: list[float] = []
    order = list(dict.fromkeys(df["_run"]))
    for layer, line in part.groupby("layer", sort=False):
        x = line["_run"].map({r: i for i, r in enumerate(order)}).to_numpy(float)
        y = line["value"].to_numpy(float)
        lines.draw(ax, str(layer), x, y, linestyle="none", ms=6)
        values.extend(y)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel("run (last checkpoint)")
    return values


def _panel_epochs(ax: Any, df: pd.DataFrame, part: pd.DataFrame, lines: _Lines) -> list[float]:
    """Against epoch (or step, or position): a line per layer, per run, or run · layer."""
    several_runs = df["_run"].nunique() > 1
    several_layers = df["layer"].nunique() > 1
    values: list[float] = []
    kind = "checkpoint"
    xs: list[float] = []
    for (run, layer), line in part.groupby(["_run", "layer"], sort=False):
        x, kind = _x_values(line)
        y = line["value"].to_numpy(float)
        if several_runs and several_layers:
            label = f"{run} · {layer}"
        else:
            label = str(run) if several_runs else str(layer)
        lines.draw(ax, label, x, y)
        values.extend(y)
        xs.extend(x)
    _set_xscale(ax, xs, kind)
    ax.set_xlabel(kind)
    return values


def _save(fig: Any, p: Path, dpi: int) -> None:
    """Write through ``<file>.partial`` (:func:`nccli.io.safe.atomic_output`) so a failed
    write leaves no half image, no link is followed and one nccli writes ``p`` at a time."""
    try:
        with atomic_output(p, "wb", flag="--plot") as fh:
            fig.savefig(fh, format=p.suffix.lstrip(".").lower(), dpi=dpi)
    except OSError as exc:
        raise UsageError(f"--plot {p}: cannot write ({exc.strerror or exc})") from None


def plot_compare(
    result: CompareResult,
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw ``result`` to ``path`` (format from the suffix) and return the path.

    One panel per metric (default: the compared metrics, ``delta_`` rows excluded; else
    :data:`~nccli.compare.DEFAULT_METRICS`), one line per layer — per run, or run · layer,
    when there are several runs.  ``across="layers"`` plots against depth instead, one line
    per checkpoint; ``across="runs"`` puts the runs on x.
    """
    require_matplotlib()
    p = check_plot_path(path)
    df = result.data
    df = df[df["layer"] != ""]  # --fit depth rows are numbers about a line, not points
    metrics = _metrics_to_plot(result, df, metrics, p)
    run_col = df["run"] if "run" in df.columns else pd.Series("", index=df.index)
    df = df.assign(_run=run_col)
    fig, axes = _figure(len(metrics))
    lines = _Lines()
    panel = {Across.layers: _panel_layers, Across.runs: _panel_runs}.get(
        result.across, _panel_epochs
    )
    for ax, metric in zip(axes, metrics, strict=False):
        values = panel(ax, df, df[df["metric"] == metric], lines)
        _set_yscale(ax, values)
        ax.set_title(metric)
        ax.grid(True, which="both", alpha=0.25)
    if lines.handles:
        fig.legend(
            list(lines.handles.values()),
            list(lines.handles),
            loc="outside right upper",
            fontsize=8,
            frameon=False,
        )
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    _save(fig, p, dpi)
    return p
