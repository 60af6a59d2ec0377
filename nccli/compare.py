"""``compare``: many checkpoints → one trajectory of Neural Collapse metrics.

The Python API behind ``nccli compare``.  Every input is measured with
:func:`nccli.measure.measure_sources` and the rows are arranged for comparison:

``across="epochs"`` (default)
    every checkpoint, ordered by epoch (then step, then file name) within each run;
    rendered as one table per (run, layer) with a row per checkpoint.
``across="layers"``
    every layer of each checkpoint in depth order (NC through the network).
``across="runs"``
    the *last* checkpoint (highest epoch, then step) of each run, a row per run.
``by="run"``
    runs side by side, aligned on epoch, with delta rows: metric ``delta_<m>`` of run R at
    epoch e is ``m(R, e) − m(baseline, e)`` (the baseline is the first run named on the
    command line unless ``baseline=`` says otherwise).  Deltas only exist where the
    baseline has the same epoch and layer.

The result (:class:`CompareResult`) holds the tidy rows — columns ``source, epoch, layer,
metric, value`` as for ``measure``, plus ``run`` when runs matter (several runs, ``by="run"``
or ``across="runs"``) and ``step`` when any checkpoint records one — and the rows that
crossed a ``fail_if`` threshold.

Runs.  A checkpoint's run name is, by default (``run_of="auto"``): the cache's ``run``
attribute; else, when the inputs lie in more than one directory, the parent directory's
name; else the file stem with its epoch/step part removed (``run1_ep050.h5`` → ``run1``);
else the parent directory's name.  ``run_of="dir"`` / ``"stem"`` force one rule, and any
callable ``Source -> str`` may be given.

Thresholds.  ``fail_if=["nc1>0.05"]`` (operators ``> >= < <= ==``; the metric is any name
of ``nccli metrics`` or ``delta_<name>`` with ``by="run"``) is checked against *every* row
of that metric — every checkpoint and every selected layer — or only each run's last
checkpoint with ``fail_if_last=True``.  ``nan`` values never cross a threshold; a note says
how many were skipped.  Metrics named in thresholds are measured even if not in
``metrics``.
"""

from __future__ import annotations

import enum
import math
import operator
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from nccli.errors import DataError, ThresholdExceeded, UsageError
from nccli.io.names import strip_epoch_step
from nccli.io.sources import Source, open_sources
from nccli.measure import MeasureOptions, measure_sources
from nccli.metrics import METRICS, select_metrics
from nccli.report import fmt_value, sparkline

#: metrics compared (and plotted) when ``metrics`` is not given: one headline per family
DEFAULT_METRICS = ("nc1", "nc2_etf_dist_means", "nc3", "nc4")
DELTA_PREFIX = "delta_"
INDEX_COLUMNS = ("source", "run", "epoch", "step", "layer")


class Across(str, enum.Enum):
    """``--across`` choices."""

    epochs = "epochs"
    layers = "layers"
    runs = "runs"


class By(str, enum.Enum):
    """``--by`` choices."""

    run = "run"


class RunFrom(str, enum.Enum):
    """``--run-from`` choices: how a checkpoint's run name is found."""

    auto = "auto"
    dir = "dir"
    stem = "stem"


# ------------------------------------------------------------------ thresholds
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}
_THRESHOLD = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Threshold:
    """One ``--fail-if`` condition: ``metric op value``."""

    metric: str
    op: str
    value: float

    def crossed(self, v: float) -> bool:
        """True when ``v`` meets the condition (``nan`` never does)."""
        return math.isfinite(v) and _OPS[self.op](v, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_threshold(spec: str) -> Threshold:
    """Parse ``"nc1>0.05"``; a malformed spec or an unknown metric is a :class:`UsageError`."""
    m = _THRESHOLD.match(spec)
    if m is None:
        raise UsageError(
            f"--fail-if {spec!r}: expected METRIC OP NUMBER such as 'nc1>0.05' "
            "(OP is one of > >= < <= ==)"
        )
    metric = m.group("metric")
    base = metric[len(DELTA_PREFIX) :] if metric.startswith(DELTA_PREFIX) else metric
    if base not in METRICS:
        raise UsageError(
            f"--fail-if {spec!r}: unknown metric {metric!r}; use a name from `nccli metrics` "
            f"({', '.join(list(METRICS)[:4])}, …) or delta_<name> with --by run"
        )
    return Threshold(metric, m.group("op"), float(m.group("num")))


@dataclass(frozen=True)
class Violation:
    """A row that crossed a threshold."""

    threshold: Threshold
    source: str
    run: str
    epoch: int | None
    step: int | None
    layer: str
    value: float

    def describe(self, with_run: bool = True) -> str:
        """``ep010.h5 (run a) layer fc epoch 10: nc1 = 0.3123 crosses nc1>0.05``."""
        where = self.source + (f" (run {self.run})" if with_run else "")
        when = "" if self.epoch is None else f" epoch {self.epoch}"
        when += "" if self.step is None else f" step {self.step}"
        return (
            f"{where} layer {self.layer}{when}: {self.threshold.metric} = "
            f"{self.value:.6g} crosses {self.threshold}"
        )


# ------------------------------------------------------------------------ runs
def _file_stem(source: Source) -> str:
    name = Path(source.path).name
    for suffix in (".h5", ".hdf5", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _parent(source: Source) -> Path:
    return Path(source.path).resolve().parent


def _dir_names(parents: Sequence[Path]) -> dict[Path, str]:
    """Shortest trailing path of each directory that tells them apart."""
    uniq = list(dict.fromkeys(parents))
    for depth in range(1, 1 + max((len(p.parts) for p in uniq), default=1)):
        names = {p: "/".join(p.parts[-depth:]) for p in uniq}
        if len(set(names.values())) == len(uniq):
            return names
    return {p: str(p) for p in uniq}


def run_names(
    sources: Sequence[Source], run_of: str | RunFrom | Callable[[Source], str] = "auto"
) -> list[str]:
    """The run name of each source (see the module docstring for the rules)."""
    if callable(run_of) and not isinstance(run_of, str):
        return [str(run_of(s)) for s in sources]
    how = RunFrom(run_of)
    parents = [_parent(s) for s in sources]
    dirnames = _dir_names(parents)
    out: list[str] = []
    no_attr = [p for s, p in zip(sources, parents, strict=True) if not _run_attr(s)]
    multi_dir = len(set(no_attr)) > 1
    for s, parent in zip(sources, parents, strict=True):
        attr = _run_attr(s)
        dname = dirnames[parent] or _file_stem(s)
        stem = strip_epoch_step(_file_stem(s))
        if how is RunFrom.dir:
            out.append(dname)
        elif how is RunFrom.stem:
            out.append(stem or _file_stem(s))
        elif attr:
            out.append(attr)
        elif multi_dir:
            out.append(dname)
        else:
            out.append(stem or dname)
    return out


def _run_attr(source: Source) -> str | None:
    v = source.attrs.get("run") if source.attrs else None
    if v is None:
        return None
    v = str(v).strip()
    return v or None


# ---------------------------------------------------------------------- result
@dataclass
class CompareResult:
    """Tidy rows of a comparison, the thresholds and the rows that crossed them."""

    data: pd.DataFrame
    violations: list[Violation]
    across: Across
    by: By | None
    metrics: list[str]
    runs: list[str]
    baseline: str | None = None
    thresholds: list[Threshold] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No threshold was crossed."""
        return not self.violations

    @property
    def has_runs(self) -> bool:
        """Whether the ``run`` column is present."""
        return "run" in self.data.columns

    def wide(self) -> pd.DataFrame:
        """One row per (source, run, epoch, step, layer), one column per metric."""
        return to_wide(self.data)

    def check(self, name_first: bool = True) -> None:
        """Raise :class:`~nccli.errors.ThresholdExceeded` when any row crossed a threshold
        (the message names the first such row unless ``name_first`` is false)."""
        if self.violations:
            crossed = ", ".join(dict.fromkeys(str(v.threshold) for v in self.violations))
            msg = (
                f"{len(self.violations)} of {self.checked} checked rows crossed --fail-if "
                f"({crossed})"
            )
            if name_first:
                msg += f"; first: {self.violations[0].describe(self.has_runs)}"
            raise ThresholdExceeded(msg)


def to_wide(df: pd.DataFrame) -> pd.DataFrame:
    """Pivot tidy compare rows: index columns kept in order, a column per metric."""
    idx = [c for c in INDEX_COLUMNS if c in df.columns]
    metrics = list(dict.fromkeys(df["metric"]))
    records: dict[tuple, dict[str, Any]] = {}
    for row in df[[*idx, "metric", "value"]].itertuples(index=False, name=None):
        key = tuple(None if pd.isna(v) else v for v in row[: len(idx)])
        rec = records.setdefault(key, dict(zip(idx, key, strict=True)))
        rec[row[len(idx)]] = row[len(idx) + 1]
    out = pd.DataFrame(list(records.values()), columns=[*idx, *metrics])
    for c in ("epoch", "step"):
        if c in out.columns:
            out[c] = out[c].astype("Int64")
    for m in metrics:
        out[m] = out[m].astype(float)
    return out


# --------------------------------------------------------------------- compare
@dataclass
class _Ckpt:
    source: Source
    run: str
    arg: int  # position among the inputs

    @property
    def label(self) -> str:
        return self.source.label

    def sort_key(self) -> tuple:
        e, s = self.source.epoch, self.source.step
        return (e is None, e or 0, s is None, s or 0, self.label, self.arg)


def _as_list(x: str | Sequence[str] | None) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [p.strip() for p in x.split(",") if p.strip()]
    return [p.strip() for item in x for p in str(item).split(",") if p.strip()]


def compare(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    across: str | Across = "epochs",
    by: str | By | None = None,
    layers: Sequence[str] | str | None = None,
    metrics: Sequence[str] | str | None = None,
    run_of: str | RunFrom | Callable[[Source], str] = "auto",
    baseline: str | None = None,
    fail_if: Iterable[str | Threshold] = (),
    fail_if_last: bool = False,
    center: str = "global",
    num_classes: int | None = None,
    recompute: bool = False,
    chunk_rows: int = 8192,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Measure several checkpoints and arrange the rows for comparison.

    >>> res = compare(["runs/a", "runs/b"], by="run", fail_if=["nc1>0.05"])  # doctest: +SKIP
    >>> res.wide()                                                            # doctest: +SKIP
    >>> res.check()    # raises ThresholdExceeded naming the first offending row

    ``metrics`` defaults to :data:`DEFAULT_METRICS` (``nc1, nc2_etf_dist_means, nc3, nc4``);
    ``"all"`` or families (``nc2``) work as in :func:`nccli.measure.measure`.
    """
    try:
        across = Across(across)
    except ValueError:
        raise UsageError(f"--across must be epochs, layers or runs, got {across!r}") from None
    try:
        by = None if by is None else By(by)
    except ValueError:
        raise UsageError(f"--by must be 'run', got {by!r}") from None
    if by is not None and across is not Across.epochs:
        raise UsageError(
            f"--by run lines runs up on epochs; it cannot go with --across {across.value}"
        )
    if baseline is not None and by is None:
        raise UsageError("--baseline names the reference run of --by run; add --by run")
    if center not in ("global", "classmean"):
        raise UsageError(f"--center must be 'global' or 'classmean', got {center!r}")
    thresholds = [t if isinstance(t, Threshold) else parse_threshold(t) for t in fail_if]
    for t in thresholds:
        if t.metric.startswith(DELTA_PREFIX) and by is None:
            raise UsageError(f"--fail-if {t}: delta_ metrics exist only with --by run")
    names = select_metrics(list(DEFAULT_METRICS) if metrics is None else metrics)
    for t in thresholds:
        base = t.metric.removeprefix(DELTA_PREFIX)
        if base not in names:
            names.append(base)
    layer_list = _as_list(layers) or None
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("compare needs at least one cache, features file or directory")

    sources = open_sources(list(paths), num_classes=num_classes)
    try:
        runs_of = run_names(sources, run_of)
        ckpts = [_Ckpt(s, r, i) for i, (s, r) in enumerate(zip(sources, runs_of, strict=True))]
        runs = list(dict.fromkeys(runs_of))
        notes: list[str] = []
        if by is By.run:
            baseline = _check_runs(ckpts, runs, baseline)
            runs.remove(baseline)
            runs.insert(0, baseline)
        run_rank = {r: i for i, r in enumerate(runs)}
        ckpts.sort(key=lambda c: (run_rank[c.run], *c.sort_key()))
        if across is Across.runs:
            last: dict[str, _Ckpt] = {}
            for c in ckpts:
                last[c.run] = c
            ckpts = list(last.values())
        opts = MeasureOptions(
            layers=layer_list,
            metrics=names,
            center=center,
            recompute=recompute,
            chunk_rows=chunk_rows,
            num_classes=num_classes,
        )
        frames = []
        for rank, c in enumerate(ckpts):
            df = measure_sources([c.source], opts, progress)
            layer_rank = {name: i for i, name in enumerate(c.source.layers)}
            df.insert(1, "run", c.run)
            df.insert(3, "step", c.source.step)
            df["_ck"] = rank
            df["_run"] = run_rank[c.run]
            df["_lr"] = df["layer"].map(layer_rank)
            frames.append(df)
        notes.extend(_collapse_notes(opts.notes, [c.label for c in ckpts]))
    finally:
        for s in sources:
            s.close()

    data = pd.concat(frames, ignore_index=True)
    data["step"] = data["step"].astype("Int64")
    data["epoch"] = data["epoch"].astype("Int64")
    metric_rank = {m: i for i, m in enumerate(names)}
    metric_rank.update({DELTA_PREFIX + m: len(names) + i for i, m in enumerate(names)})
    if by is By.run:
        deltas = _deltas(data, baseline, names, notes)
        if not deltas.empty:
            data = pd.concat([data, deltas], ignore_index=True)
        order = ["epoch", "step", "_run", "_lr", "_mr"]
    else:
        order = ["_run", "_ck", "_lr", "_mr"]
    data["_mr"] = data["metric"].map(metric_rank)
    data = data.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)

    violations, checked = _check(data, thresholds, fail_if_last, notes)
    keep_run = by is not None or across is Across.runs or len(runs) > 1
    keep_step = bool(data["step"].notna().any())
    cols = [
        c
        for c in ("source", "run", "epoch", "step", "layer", "metric", "value")
        if (c != "run" or keep_run) and (c != "step" or keep_step)
    ]
    out = data[cols].copy()
    out.attrs["notes"] = list(notes)
    out.attrs["center"] = center
    return CompareResult(
        data=out,
        violations=violations,
        across=across,
        by=by,
        metrics=names,
        runs=runs,
        baseline=baseline,
        thresholds=thresholds,
        checked=checked,
        notes=notes,
    )


def _collapse_notes(notes: list[str], labels: list[str]) -> list[str]:
    """Merge ``"<source> <layer>: <why>"`` notes that repeat for many checkpoints."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        src = next((lab for lab in labels if note.startswith(lab + " ")), None)
        key = note if src is None else note[len(src) + 1 :]
        groups.setdefault(key, []).append(src or "")
    out = []
    for key, srcs in groups.items():
        if len(srcs) == 1:
            out.append(f"{srcs[0]} {key}".strip())
        else:
            more = f", … {len(srcs) - 3} more" if len(srcs) > 3 else ""
            out.append(f"{key} ({', '.join(srcs[:3])}{more})")
    return out


def _check_runs(ckpts: list[_Ckpt], runs: list[str], baseline: str | None) -> str:
    """Validate the runs for ``by="run"`` and return the baseline run."""
    if len(runs) < 2:
        raise UsageError(
            f"--by run needs at least two runs, found one ({runs[0]!r}); a run is named by the "
            "cache's 'run' attribute, else its directory, else the file name without the "
            "epoch (see --run-from)"
        )
    if baseline is not None and baseline not in runs:
        raise UsageError(f"--baseline {baseline!r} is not a run; runs are {', '.join(runs)}")
    seen: dict[tuple[str, int], str] = {}
    for c in ckpts:
        if c.source.epoch is None:
            raise DataError(
                f"{c.source.path}: no epoch (no 'epoch' attribute and none in the file name), "
                "so --by run cannot line it up with the other runs"
            )
        key = (c.run, c.source.epoch)
        if key in seen:
            raise DataError(
                f"run {c.run!r} has two checkpoints at epoch {c.source.epoch} "
                f"({seen[key]} and {c.source.path}); pass one of them, or compare without --by run"
            )
        seen[key] = c.source.path
    return baseline or runs[0]


def _deltas(data: pd.DataFrame, baseline: str, names: list[str], notes: list[str]) -> pd.DataFrame:
    """``delta_<m>`` rows: each non-baseline run minus the baseline at the same epoch, layer."""
    base = data[data["run"] == baseline]
    ref = {
        (e, layer, m): v
        for e, layer, m, v in base[["epoch", "layer", "metric", "value"]].itertuples(
            index=False, name=None
        )
    }
    rows = []
    unmatched: dict[str, set] = {}
    for rec in data[data["run"] != baseline].to_dict("records"):
        key = (rec["epoch"], rec["layer"], rec["metric"])
        if rec["metric"] not in names:
            continue
        if key not in ref:
            unmatched.setdefault(rec["run"], set()).add(
                f"epoch {rec['epoch']} layer {rec['layer']}"
            )
            continue
        rows.append(
            {**rec, "metric": DELTA_PREFIX + rec["metric"], "value": rec["value"] - ref[key]}
        )
    for run, where in unmatched.items():
        shown = sorted(where)
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        notes.append(
            f"run {run}: no delta where baseline {baseline} has no matching checkpoint/layer "
            f"({'; '.join(shown[:5])}{more})"
        )
    return pd.DataFrame(rows, columns=data.columns)


def _check(
    data: pd.DataFrame, thresholds: list[Threshold], last_only: bool, notes: list[str]
) -> tuple[list[Violation], int]:
    """Rows crossing any threshold (all rows, or each run's last checkpoint)."""
    if not thresholds:
        return [], 0
    rows = data
    if last_only:
        last = data.groupby("_run")["_ck"].transform("max")
        rows = data[data["_ck"] == last]
    out: list[Violation] = []
    checked = 0
    for t in thresholds:
        sub = rows[rows["metric"] == t.metric]
        nan = 0
        for rec in sub.to_dict("records"):
            v = float(rec["value"])
            if math.isnan(v):
                nan += 1
                continue
            checked += 1
            if t.crossed(v):
                out.append(
                    Violation(
                        t,
                        rec["source"],
                        rec["run"],
                        None if pd.isna(rec["epoch"]) else int(rec["epoch"]),
                        None if pd.isna(rec["step"]) else int(rec["step"]),
                        rec["layer"],
                        v,
                    )
                )
        if nan:
            notes.append(f"--fail-if {t}: {nan} row(s) are nan and were not checked")
        if sub.empty:
            notes.append(f"--fail-if {t}: no rows of {t.metric} to check")
    return out, checked


# ----------------------------------------------------------------------- table
_SPARK_MAX = 32


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
    return f"{metric} {'↑' if info.higher_is_better else '↓'}"


def render_table(result: CompareResult, console: Console) -> None:
    """Rich tables for a comparison (trend sparklines and first→last under each metric)."""
    df = result.data
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    crossed = {
        (v.source, v.run if result.has_runs else "", v.epoch, v.layer, v.threshold.metric)
        for v in result.violations
    }
    if result.by is By.run:
        _render_by_run(result, console, crossed)
        return
    runs = df["run"] if "run" in df.columns else pd.Series([""] * len(df), index=df.index)
    df = df.assign(_run=runs)
    metrics = list(dict.fromkeys(df["metric"]))
    if result.across is Across.layers:
        groups = df.groupby(["_run", "source"], sort=False)
        row_key, first_cols = ["layer"], ["layer"]
    elif result.across is Across.runs:
        groups = df.groupby(["layer"], sort=False)
        row_key, first_cols = ["_run", "source"], ["run", "source", "epoch"]
    else:
        groups = df.groupby(["_run", "layer"], sort=False)
        row_key, first_cols = ["source"], ["source", "epoch"]
    if "step" in df.columns and result.across is not Across.layers:
        first_cols.append("step")
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        if result.across is Across.layers:
            run, source = key
            epoch = part["epoch"].iloc[0]
            title = f"{source}" + ("" if pd.isna(epoch) else f"  (epoch {epoch})")
            title += f"  · run {run}" if result.has_runs else ""
        elif result.across is Across.runs:
            title = f"layer {key[0]}  · last checkpoint of each run"
        else:
            run, layer = key
            title = f"layer {layer}" + (f"  · run {run}" if result.has_runs else "")
        table = Table(title=title, title_justify="left", header_style="bold")
        for c in first_cols:
            table.add_column(
                c,
                style="cyan" if c in ("source", "layer", "run") else None,
                justify="left" if c in ("source", "layer", "run") else "right",
            )
        for m in metrics:
            table.add_column(_header(m), justify="right")
        columns: dict[str, list[float]] = {m: [] for m in metrics}
        for _, rows in part.groupby(row_key, sort=False):
            first = rows.iloc[0]
            by_metric = dict(zip(rows["metric"], rows["value"], strict=True))
            cells = []
            for m in metrics:
                v = float(by_metric.get(m, float("nan")))
                columns[m].append(v)
                ep = None if pd.isna(first["epoch"]) else int(first["epoch"])
                hot = (first["source"], first["_run"], ep, first["layer"], m)
                txt = fmt_value(v)
                cells.append(f"[bold red]{txt}[/bold red]" if hot in crossed else txt)
            lead = ["" if pd.isna(first[c]) else str(first[c]) for c in first_cols]
            table.add_row(*lead, *cells)
        if result.across is not Across.runs and len(part.groupby(row_key, sort=False)) > 1:
            _trend_rows(
                table,
                len(first_cols),
                [columns[m] for m in metrics],
                "depth" if result.across is Across.layers else "trend",
            )
        console.print(table)


def _trend_rows(table: Table, lead: int, columns: list[list[float]], label: str) -> None:
    trends = [_trend(col) for col in columns]
    table.add_section()
    pad = [""] * (lead - 1)
    table.add_row(f"[dim]{label}[/dim]", *pad, *[f"[magenta]{s}[/magenta]" for s, _ in trends])
    table.add_row("[dim]first→last[/dim]", *pad, *[e for _, e in trends])


def _render_by_run(result: CompareResult, console: Console, crossed: set) -> None:
    """One table per metric: a row per (layer, epoch), a column per run, then the deltas."""
    df = result.data
    base_metrics = [m for m in dict.fromkeys(df["metric"]) if not m.startswith(DELTA_PREFIX)]
    runs = result.runs
    others = [r for r in runs if r != result.baseline]
    lookup = {
        (layer, e, r, m): (v, src)
        for src, r, e, layer, m, v in df[
            ["source", "run", "epoch", "layer", "metric", "value"]
        ].itertuples(index=False, name=None)
    }
    layers = list(dict.fromkeys(df["layer"]))
    for m in base_metrics:
        table = Table(
            title=f"{_header(m)}  · runs by epoch (Δ = run − {result.baseline})",
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
            part = df[(df["layer"] == layer) & (df["metric"] == m)]
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
                    hot = (src, r, None if pd.isna(e) else int(e), layer, metric) in crossed
                    cells.append(f"[bold red]{txt}[/bold red]" if hot else txt)
                table.add_row(layer if k == 0 else "", "" if pd.isna(e) else str(e), *cells)
            if len(epochs) > 1:
                _trend_rows(table, 2, columns, "trend")
        console.print(table)
