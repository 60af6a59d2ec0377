"""NC metrics: the registry of every metric (docs/metrics.md) and the functions behind it.

Every metric is declared once in :mod:`nccli.metrics.registry` (:data:`METRICS`): name,
family, direction, formula, what it needs, when it is shown, and its kernel.  The kernels
call pure functions of :class:`~nccli.stats.ClassStats` (and of the classifier ``W``,
``b``) in the family modules :mod:`~nccli.metrics.nc`, :mod:`~nccli.metrics.geometry`,
:mod:`~nccli.metrics.deep_linear` and :mod:`~nccli.metrics.mse`.
:func:`compute_metrics` evaluates the NC1–NC3 families from the statistics and records, for
each metric that has no value, ``nan`` and the reason; ``nc4``/``acc``/``ncc_acc`` need a
second pass over the features (:func:`nc4_pass`), which ``nccli.measure`` runs through
:func:`~nccli.metrics.registry.evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nccli.errors import UsageError
from nccli.metrics.context import LayerContext, MetricSet
from nccli.metrics.decisions import nc4_pass
from nccli.metrics.nc import Undefined
from nccli.metrics.registry import CORE_FAMILIES, METRICS, Metric, Registry, evaluate
from nccli.stats import ClassStats

__all__ = [
    "CORE_FAMILIES",
    "FAMILIES",
    "METRICS",
    "LayerContext",
    "Metric",
    "MetricInfo",
    "MetricSet",
    "Registry",
    "Undefined",
    "compute_metrics",
    "evaluate",
    "nc4_pass",
    "select_metrics",
]

#: the declaration of a metric (the name this class had before the registry)
MetricInfo = Metric
#: names accepted by ``--metrics`` besides metric names
FAMILIES = METRICS.families


def select_metrics(spec: str | Iterable[str] | None) -> list[str]:
    """Expand ``--metrics`` (comma-separated names or families, ``all`` = every metric).

    ``None`` is the default selection: every metric except those declared ``default=False``
    (``erank_l``, an O(d³) eigenvalue problem per layer), which are computed on request.
    """
    if spec is None:
        return [n for n, info in METRICS.items() if info.default]
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    if not items or items == ["all"]:
        return list(METRICS)
    out: list[str] = []
    for item in items:
        if item == "all":
            names = list(METRICS)
        elif item in METRICS:
            names = [item]
        else:
            names = [m for m, info in METRICS.items() if info.family == item]
        if not names:
            raise UsageError(
                f"unknown metric {item!r}; choose from {', '.join(METRICS.families)} or a name "
                f"in `nccli metrics` ({', '.join(list(METRICS)[:4])}, …)"
            )
        out.extend(n for n in names if n not in out)
    return out


def compute_metrics(
    stats: ClassStats,
    weight: Any | None = None,
    bias: Any | None = None,
    *,
    center: str = "global",
    rtol: float = 1e-8,
    names: Iterable[str] | None = None,
) -> MetricSet:
    """NC1–NC3 from the statistics (and classifier, when given).

    ``names`` restricts the output (default: every metric that needs no second pass), in
    the order given.  Classifier metrics without a classifier are ``nan`` with the reason.
    """
    wanted = [
        n
        for n in (names or METRICS)
        if not METRICS[n].needs_pass and METRICS[n].family in CORE_FAMILIES
    ]
    ctx = LayerContext(stats, weight, bias, center=center, rtol=rtol)
    ctx.classifier()  # a classifier of the wrong shape or with NaN is a DataError
    return evaluate(ctx, wanted)
