"""``compare``: many checkpoints → one trajectory of Neural Collapse metrics.

The Python API behind ``nccli compare``.  Every input is measured with
:func:`nccli.measure.measure_rows` and the rows are arranged for comparison:

``across="epochs"`` (default)
    every checkpoint, ordered by epoch (then step) within each run, else by natural sort
    of the paths, else as given (:func:`~nccli.compare.runs.trajectory_order`; a note says
    which rule decided)
    (:mod:`nccli.report.compare_table` draws a table per (run, layer), a row per checkpoint).
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
how many were skipped, and a threshold whose metric has no finite value in those rows checked
nothing and fails (:attr:`CompareResult.unchecked`).  Metrics named in thresholds are
measured even if not in ``metrics``.

Modules: this one (the use case and its result), :mod:`~nccli.compare.runs` (run names),
:mod:`~nccli.compare.arrange` (rows in display order, deltas, fits, notes),
:mod:`~nccli.compare.depth` (`--fit depth`),
:mod:`~nccli.compare.thresholds` (``--fail-if``); :mod:`nccli.report.compare_table` and
:mod:`nccli.report.plot` draw the result.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nccli.choices import Across, By
from nccli.compare.arrange import arrange, collapse_notes, label_by_role, public_columns, with_fits
from nccli.compare.runs import RunFrom, run_names, trajectory_order
from nccli.compare.thresholds import (
    DELTA_PREFIX,
    Threshold,
    Unchecked,
    Violation,
    find_violations,
    parse_threshold,
)
from nccli.errors import DataError, ThresholdExceeded, UsageError
from nccli.heldout import TRAIN, held_out_pairs, split_of
from nccli.io.sources import Source, open_sources
from nccli.measure import MeasureOptions, measure_rows
from nccli.metrics import select_metrics
from nccli.table import Rows, key_of

if TYPE_CHECKING:  # pragma: no cover - DataFrames are built only for Python callers
    import pandas as pd

__all__ = [
    "DEFAULT_METRICS",
    "DELTA_PREFIX",
    "Across",
    "By",
    "CompareResult",
    "RunFrom",
    "Threshold",
    "Unchecked",
    "Violation",
    "compare",
    "parse_threshold",
    "run_names",
    "to_wide",
]

#: metrics compared (and plotted) when ``metrics`` is not given: one headline per family
DEFAULT_METRICS = ("nc1", "nc2_etf_dist_means", "nc3", "nc4")
INDEX_COLUMNS = ("source", "run", "split", "epoch", "step", "layer")


# ---------------------------------------------------------------------- result
@dataclass
class CompareResult:
    """Tidy rows of a comparison, the thresholds and the rows that crossed them.

    ``rows`` are the tidy rows as a :class:`~nccli.table.Rows` (what ``nccli compare``
    writes, without pandas); :attr:`data` is the same rows as a DataFrame."""

    rows: Rows
    violations: list[Violation]
    across: Across
    by: By | None
    metrics: list[str]
    runs: list[str]
    baseline: str | None = None
    thresholds: list[Threshold] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)
    #: thresholds whose metric had no finite value to check (they fail like a crossing)
    unchecked: list[Unchecked] = field(default_factory=list)
    #: ``"depth"``: the rows include each checkpoint's fit of log(metric) against depth
    fit: str | None = None
    #: what a ``run`` of ``by="run"`` is: ``"run"``, or ``"split"`` for ``by="split"``
    grouping: str = "run"

    @property
    def ok(self) -> bool:
        """No threshold was crossed, and every threshold checked something."""
        return not self.violations and not self.unchecked

    @functools.cached_property
    def data(self) -> pd.DataFrame:
        """The tidy rows as a DataFrame (built on first use; ``attrs`` has the notes)."""
        return self.rows.to_frame()

    @property
    def has_runs(self) -> bool:
        """Whether the ``run`` column is present."""
        return "run" in self.rows

    def wide(self) -> pd.DataFrame:
        """One row per (source, run, epoch, step, layer), one column per metric."""
        return to_wide(self.rows).to_frame()

    def wide_rows(self) -> Rows:
        """:meth:`wide` as a :class:`~nccli.table.Rows` (no pandas)."""
        return to_wide(self.rows)

    def check(self, name_first: bool = True) -> None:
        """Raise :class:`~nccli.errors.ThresholdExceeded` when any row crossed a threshold
        or a threshold checked nothing (the message names the first crossing row unless
        ``name_first`` is false)."""
        parts = []
        if self.violations:
            crossed = ", ".join(dict.fromkeys(str(v.threshold) for v in self.violations))
            parts.append(
                f"{len(self.violations)} of {self.checked} checked rows crossed --fail-if "
                f"({crossed})"
            )
            if name_first:
                parts[0] += f"; first: {self.violations[0].describe(self.has_runs)}"
        if self.unchecked:
            empty = ", ".join(str(u.threshold) for u in self.unchecked)
            parts.append(f"--fail-if {empty} checked nothing (no finite value)")
        if parts:
            raise ThresholdExceeded("; ".join(parts))


def to_wide(df: Any) -> Any:
    """Pivot tidy compare rows: index columns kept in order, a column per metric (a
    :class:`~nccli.table.Rows` gives a Rows, a DataFrame a DataFrame)."""
    rows = df if isinstance(df, Rows) else Rows.from_frame(df)
    idx = [c for c in INDEX_COLUMNS if c in rows]
    metrics = list(dict.fromkeys(rows["metric"]))
    records: dict[tuple, dict[str, Any]] = {}
    for row in rows.tuples([*idx, "metric", "value"]):
        key = tuple(map(key_of, row[: len(idx)]))
        rec = records.setdefault(key, dict(zip(idx, key, strict=True)))
        rec[row[len(idx)]] = row[len(idx) + 1]
    kinds = {c: "int" if c in ("epoch", "step") else rows.kinds[c] for c in idx}
    out = Rows.from_records(
        records.values(), [*idx, *metrics], kinds | dict.fromkeys(metrics, "float")
    )
    return out if isinstance(df, Rows) else out.to_frame()


# --------------------------------------------------------------------- compare
@dataclass
class _Ckpt:
    source: Source
    run: str
    arg: int  # position among the inputs

    @property
    def label(self) -> str:
        return self.source.label


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
    min_class_count: int = 1,
    fit: str | None = None,
) -> CompareResult:
    """Measure several checkpoints and arrange the rows for comparison.

    >>> res = compare(["runs/a", "runs/b"], by="run", fail_if=["nc1>0.05"])  # doctest: +SKIP
    >>> res.wide()                                                            # doctest: +SKIP
    >>> res.check()    # raises ThresholdExceeded naming the first offending row

    ``metrics`` defaults to :data:`DEFAULT_METRICS` (``nc1, nc2_etf_dist_means, nc3, nc4``);
    ``"all"`` or families (``nc2``) work as in :func:`nccli.measure.measure`.
    """
    run_of, by, baseline, grouping = _by_split(run_of, by, baseline)
    across, by = _check_modes(across, by, baseline, center, fit)
    thresholds, names = _plan_metrics(metrics, fail_if, by)
    layer_list = _as_list(layers) or None
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("compare needs at least one cache, features file or directory")

    notes: list[str] = []
    sources = open_sources(list(paths), num_classes=num_classes)
    try:
        _check_splits(grouping, sources)
        ckpts, runs, baseline = _order(sources, run_of, by, baseline, across, notes)
        opts = MeasureOptions(
            layers=layer_list,
            metrics=names,
            center=center,
            recompute=recompute,
            chunk_rows=chunk_rows,
            num_classes=num_classes,
            min_class_count=min_class_count,
        )
        frames = _measure_checkpoints(sources, ckpts, runs, opts, progress, notes)
    finally:
        for s in sources:
            s.close()

    data = arrange(frames, names, by is By.run, baseline, notes)
    if fit == "depth":
        data = with_fits(data, names, notes)
    violations, checked, unchecked = find_violations(data, thresholds, fail_if_last, notes)
    out = public_columns(data, keep_run=by is not None or across is Across.runs or len(runs) > 1)
    out.attrs = {"notes": list(notes), "center": center}
    return CompareResult(
        rows=out,
        violations=violations,
        across=across,
        by=by,
        metrics=names,
        runs=runs,
        baseline=baseline,
        thresholds=thresholds,
        checked=checked,
        notes=notes,
        unchecked=unchecked,
        fit=fit,
        grouping=grouping,
    )


def _check_splits(grouping: str, sources: Sequence[Source]) -> None:
    if grouping == "split" and len({_split_name(s) for s in sources}) < 2:
        raise UsageError(
            "--by split needs a held-out split beside train: extract one with "
            "--eval-data NAME=FILE (or --split), and pass both caches"
        )


def _measure_checkpoints(
    sources: Sequence[Source],
    ckpts: Sequence[_Ckpt],
    runs: list[str],
    opts: MeasureOptions,
    progress: Callable[[str], None] | None,
    notes: list[str],
) -> list[Rows]:
    """Each checkpoint's rows (held-out splits paired with their training split), the
    layers labelled by role where models name them differently, and the notes."""
    with held_out_pairs(sources, notes) as refs:
        frames = _measure_all(ckpts, runs, opts, progress, refs)
    label_by_role(frames, list(opts.layers) if opts.layers else None, notes)
    notes.extend(collapse_notes(opts.notes, [c.label for c in ckpts]))
    _note_mixed_preprocessing(sources, notes)
    return frames


def _split_name(source: Source) -> str:
    return split_of(source) or TRAIN


def _by_split(
    run_of: Any, by: str | By | None, baseline: str | None
) -> tuple[Any, str | By | None, str | None, str]:
    """``by="split"`` is ``by="run"`` with each checkpoint's split as its run and train as
    the baseline (the generalisation gap); returns ``run_of, by, baseline`` and what a
    run is (``"run"`` or ``"split"``)."""
    if by is None or by not in (By.split, By.split.value):
        return run_of, by, baseline, "run"
    if run_of != "auto":
        raise UsageError("--by split names each row by its split; drop --run-from")
    return _split_name, By.run, baseline or TRAIN, "split"


def _note_mixed_preprocessing(sources: Sequence[Source], notes: list[str]) -> None:
    """One note when the caches record different input preprocessing."""
    preps: dict[str, str] = {}  # each cache's recorded preprocessing → its first source
    for s in sources:
        if s.attrs.get("normalization") is not None:
            preps.setdefault(str(s.attrs["normalization"]), s.label)
    if len(preps) > 1:
        mixed = "; ".join(f"{v} ({lab})" for v, lab in preps.items())
        notes.append(f"sources mix input preprocessing ({mixed}): NC values are not comparable")


def _check_modes(
    across: str | Across,
    by: str | By | None,
    baseline: str | None,
    center: str,
    fit: str | None = None,
) -> tuple[Across, By | None]:
    """Validate ``across``, ``by``, ``baseline``, ``center`` and ``fit`` together."""
    try:
        across = Across(across)
    except ValueError:
        raise UsageError(f"--across must be epochs, layers or runs, got {across!r}") from None
    try:
        by = None if by is None else By(by)
    except ValueError:
        raise UsageError(f"--by must be 'run' or 'split', got {by!r}") from None
    if by is not None and across is not Across.epochs:
        raise UsageError(
            f"--by run lines runs up on epochs; it cannot go with --across {across.value}"
        )
    if baseline is not None and by is None:
        raise UsageError("--baseline names the reference run of --by run; add --by run")
    if center not in ("global", "classmean"):
        raise UsageError(f"--center must be 'global' or 'classmean', got {center!r}")
    if fit is not None and (fit != "depth" or across is not Across.layers):
        raise UsageError(
            f"--fit {fit}: the only fit is 'depth', of a metric against layer depth; it needs "
            "--across layers"
        )
    return across, by


def _plan_metrics(
    metrics: Sequence[str] | str | None, fail_if: Iterable[str | Threshold], by: By | None
) -> tuple[list[Threshold], list[str]]:
    """The thresholds, and the metrics to measure: those asked for (default
    :data:`DEFAULT_METRICS`) plus every metric a threshold names."""
    thresholds = [t if isinstance(t, Threshold) else parse_threshold(t) for t in fail_if]
    for t in thresholds:
        if t.metric.startswith(DELTA_PREFIX) and by is None:
            raise UsageError(f"--fail-if {t}: delta_ metrics exist only with --by run")
    names = select_metrics(list(DEFAULT_METRICS) if metrics is None else metrics)
    for t in thresholds:
        base = t.metric.removeprefix(DELTA_PREFIX)
        if base not in names:
            names.append(base)
    return thresholds, names


def _order(
    sources: Sequence[Source],
    run_of: str | RunFrom | Callable[[Source], str],
    by: By | None,
    baseline: str | None,
    across: Across,
    notes: list[str],
) -> tuple[list[_Ckpt], list[str], str | None]:
    """The checkpoints to measure in order (by run, then :func:`trajectory_order`), the
    runs in order (the baseline first with ``by="run"``) and the baseline."""
    runs_of = run_names(sources, run_of)
    ckpts = [_Ckpt(s, r, i) for i, (s, r) in enumerate(zip(sources, runs_of, strict=True))]
    runs = list(dict.fromkeys(runs_of))
    if by is By.run:
        baseline = _check_runs(ckpts, runs, baseline)
        runs.remove(baseline)
        runs.insert(0, baseline)
    ckpts = _by_trajectory(ckpts, runs, notes)
    if across is Across.runs:
        last: dict[str, _Ckpt] = {}
        for c in ckpts:
            last[c.run] = c
        ckpts = list(last.values())
    return ckpts, runs, baseline


def _by_trajectory(ckpts: list[_Ckpt], runs: list[str], notes: list[str]) -> list[_Ckpt]:
    """Each run's checkpoints in trajectory order, runs in ``runs`` order; one note per rule
    (``ordered 7 checkpoints by the epoch in their file names``)."""
    out: list[_Ckpt] = []
    rules: dict[str, list[int]] = {}
    for run in runs:
        mine = [c for c in ckpts if c.run == run]
        order, rule = trajectory_order([c.source for c in mine])
        out.extend(mine[i] for i in order)
        if len(mine) > 1:
            rules.setdefault(rule, []).append(len(mine))
    for rule, sizes in rules.items():
        of = f" of {len(sizes)} runs" if len(sizes) > 1 else ""
        notes.append(f"ordered {sum(sizes)} checkpoints{of} {rule}")
    return out


def _measure_all(
    ckpts: Sequence[_Ckpt],
    runs: list[str],
    opts: MeasureOptions,
    progress: Callable[[str], None] | None,
    references: dict[int, Source],
) -> list[Rows]:
    """Measure each checkpoint; its rows carry the run, the step and the sort keys
    ``_ck`` (checkpoint), ``_run`` (run) and ``_lr`` (layer depth)."""
    run_rank = {r: i for i, r in enumerate(runs)}
    frames = []
    for rank, c in enumerate(ckpts):
        rows = measure_rows([c.source], opts, progress, references)
        layer_rank = {name: i for i, name in enumerate(c.source.layers)}
        n = len(rows)
        rows = rows.with_column("run", [c.run] * n, at=1)
        rows = rows.with_column("step", [c.source.step] * n, at=3, kind="int")
        rows = rows.with_column("_ck", [rank] * n)
        rows = rows.with_column("_run", [run_rank[c.run]] * n)
        frames.append(rows.with_column("_lr", rows.map("layer", layer_rank)))
    return frames


def _where(source: Source) -> str:
    """A source's path, with the observation for one of a run file's (``nc.h5@ep5``)."""
    return source.path if source.label in source.path else f"{source.path} ({source.label})"


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
                f"({seen[key]} and {_where(c.source)}); pass one of them, or compare without "
                "--by run"
            )
        seen[key] = _where(c.source)
    return baseline or runs[0]
