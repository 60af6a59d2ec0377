"""``--fail-if`` thresholds: parsing ``METRIC OP NUMBER`` and finding the rows that cross.

``fail_if=["nc1>0.05"]`` (operators ``> >= < <= ==``; the metric is any name of
``nccli metrics`` or ``delta_<name>`` with ``by="run"``) is checked against *every* row of
that metric, or only each run's last checkpoint.  ``nan`` values never cross a threshold;
a note says how many were skipped.  A threshold whose metric has no finite value among the
rows it checks checked nothing: it is an :class:`Unchecked`, and fails the gate like a
crossing (a gate that checks nothing must not pass).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from nccli.errors import UsageError
from nccli.metrics import METRICS
from nccli.table import Rows, is_missing

#: prefix of the ``by="run"`` difference rows (``delta_nc1`` = run − baseline)
DELTA_PREFIX = "delta_"

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


@dataclass(frozen=True)
class Unchecked:
    """A threshold that checked nothing: its metric has no finite value in the rows."""

    threshold: Threshold
    reason: str

    def describe(self) -> str:
        """``nc3>0.01 checked nothing: nc3 has no finite value (no classifier weight …)``."""
        t = self.threshold
        return f"{t} checked nothing: {t.metric} has no finite value ({self.reason})"


def find_violations(
    data: Rows, thresholds: list[Threshold], last_only: bool, notes: list[str]
) -> tuple[list[Violation], int, list[Unchecked]]:
    """Rows crossing any threshold (all rows, or each run's last checkpoint), the number of
    finite rows checked, and the thresholds that found no finite value to check."""
    if not thresholds:
        return [], 0, []
    rows = data
    if last_only:
        last: dict[object, int] = {}
        for run, ck in data.tuples(["_run", "_ck"]):
            last[run] = max(last.get(run, ck), ck)
        rows = data.where([ck == last[run] for run, ck in data.tuples(["_run", "_ck"])])
    out: list[Violation] = []
    unchecked: list[Unchecked] = []
    checked = 0
    labels = set(data["source"]) if "source" in data else set()
    for t in thresholds:
        sub = rows.where([m == t.metric for m in rows["metric"]])
        nan = 0
        for rec in sub.records():
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
                        None if is_missing(rec["epoch"]) else int(rec["epoch"]),
                        None if is_missing(rec["step"]) else int(rec["step"]),
                        rec["layer"],
                        v,
                    )
                )
        if nan == len(sub):  # nothing finite: the gate checked nothing
            unchecked.append(Unchecked(t, _why_nan(t.metric, len(sub), notes, labels)))
        elif nan:
            notes.append(f"--fail-if {t}: {nan} row(s) are nan and were not checked")
    return out, checked, unchecked


def _why_nan(metric: str, rows: int, notes: list[str], labels: set[str]) -> str:
    """Why ``metric`` has no finite value: the measure notes' reasons, else the row count."""
    if rows == 0:
        return f"no rows of {metric}"
    tag = f": {metric} is nan: "
    reasons: dict[str, None] = {}
    for note in notes:
        if tag not in note:
            continue
        why = note.split(tag, 1)[1]
        if not any(note.startswith(lab + " ") for lab in labels):  # "… (src, src)" merged
            why = why.rsplit(" (", 1)[0]
        reasons[why] = None
    if not reasons:
        return f"all {rows} row(s) are nan"
    return "; ".join(reasons)
