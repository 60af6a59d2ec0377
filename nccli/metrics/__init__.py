"""NC metrics: a registry of names (METRICS.md) and the functions that compute them.

Every metric is a pure function of :class:`~nccli.stats.ClassStats` (and, for the
classifier metrics, of the classifier ``W``, ``b``).  :func:`compute_metrics` evaluates a
selection of them and records, for each metric that has no value, ``nan`` and the reason.
``nc4``/``acc``/``ncc_acc`` need a second pass over the features: :func:`nc4_pass`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nccli.errors import UsageError
from nccli.metrics import nc
from nccli.metrics.nc import Undefined, nc4_pass
from nccli.stats import ClassStats

__all__ = [
    "METRICS",
    "MetricInfo",
    "MetricSet",
    "Undefined",
    "compute_metrics",
    "nc4_pass",
    "select_metrics",
]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: its family, whether higher is better, what it needs, its formula."""

    name: str
    family: str
    formula: str
    higher_is_better: bool = False
    needs_classifier: bool = False
    needs_pass: bool = False
    #: part of the default selection; off for metrics that cost O(d³) per layer
    default: bool = True


def _info(name: str, family: str, formula: str, **kw: bool) -> tuple[str, MetricInfo]:
    return name, MetricInfo(name, family, formula, **kw)


#: every metric nccli reports, in display order
METRICS: dict[str, MetricInfo] = dict(
    [
        _info("nc1", "nc1", "(1/K) Tr(Σ_W Σ_B⁺)"),
        _info("nc1_trace", "nc1", "Tr(Σ_W) / Tr(Σ_B)"),
        _info("cdnv", "nc1", "mean_{k<l} (σ_k²+σ_l²) / (2||μ_k-μ_l||²)"),
        _info("nc2_equinorm_means", "nc2", "std ||μ_k-μ_G|| / mean ||μ_k-μ_G||"),
        _info("nc2_equiangular_means", "nc2", "std_{k≠l} cos(μ_k-μ_G, μ_l-μ_G)"),
        _info("nc2_maxangle_means", "nc2", "mean_{k≠l} |cos + 1/(K-1)|"),
        _info("nc2_etf_dist_means", "nc2", "||G/||G|| - E/||E||||_F (centred means)"),
        _info("nc2_equinorm_classifier", "nc2", "std ||w_k|| / mean ||w_k||", needs_classifier=True),
        _info("nc2_equiangular_classifier", "nc2", "std_{k≠l} cos(w_k, w_l)", needs_classifier=True),
        _info("nc2_maxangle_classifier", "nc2", "mean_{k≠l} |cos + 1/(K-1)|", needs_classifier=True),
        _info("nc2_etf_dist_classifier", "nc2", "||G/||G|| - E/||E||||_F (W rows)", needs_classifier=True),
        _info("nc3", "nc3", "||Wᵀ/||W|| - M/||M||||_F²", needs_classifier=True),
        _info("nc3_cos", "nc3", "mean_k cos(w_k, μ_k-μ_G)", higher_is_better=True, needs_classifier=True),
        _info("nc4", "nc4", "P[argmax(Wh+b) ≠ argmin_k ||h-μ_k||]", needs_classifier=True, needs_pass=True),
        _info("acc", "nc4", "P[argmax(Wh+b) = y]", higher_is_better=True, needs_classifier=True, needs_pass=True),
        _info("ncc_acc", "nc4", "P[argmin_k ||h-μ_k|| = y]", higher_is_better=True, needs_pass=True),
        # seed-paper analyses (nccli.analyses): computed by a measure.LAYER_PROVIDERS entry
        _info("of_maxcos_means", "geometry", "max_{k≠l} |cos(μ_k, μ_l)| (uncentred means)"),
        _info("of_maxcos_classifier", "geometry", "max_{k≠l} |cos(w_k, w_l)|", needs_classifier=True),
        _info("minority_collapse", "geometry", "mean_{k<l minority} cos(w_k, w_l)", needs_classifier=True),
        _info("balancedness_l", "deep", "||W_{l+1}ᵀW_{l+1} - W_l W_lᵀ||_F / ||W_l W_lᵀ||_F"),
        _info("cond_l", "deep", "s_1/s_{K-1} of centred means (s_1/s_K uncentred, bias-free)"),
        _info("erank_l", "deep", "exp(entropy of eig(Σ_T)/Tr Σ_T) (Roy & Vetterli)", default=False),
        _info("mse_ls", "mse", "L(W_LS, b_LS): MSE of the ridge LS classifier", needs_classifier=True),
        _info("mse_dev", "mse", "L(W,b) - L(W_LS,b_LS) = ½ΣΔ_kᵀAΔ_k", needs_classifier=True),
        _info("mse_dev_frac", "mse", "mse_dev / (mse_ls + mse_dev)", needs_classifier=True),
    ]
)  # fmt: skip

#: families computed by :func:`compute_metrics` itself (the others come from providers)
CORE_FAMILIES = ("nc1", "nc2", "nc3", "nc4")
#: names accepted by ``--metrics`` besides metric names
FAMILIES = (*CORE_FAMILIES, "geometry", "deep", "mse")


class MetricSet(dict):
    """``{name: value}`` in METRICS order; ``reasons[name]`` explains each ``nan``."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: dict[str, str] = {}

    def put(self, name: str, fn: Callable[[], float]) -> None:
        """Evaluate ``fn`` and store its value, or ``nan`` with the reason it is undefined."""
        try:
            value = float(fn())
        except Undefined as exc:
            self.undefined(name, str(exc))
            return
        self[name] = value

    def undefined(self, name: str, reason: str) -> None:
        """Record ``name`` as ``nan`` because of ``reason``."""
        self[name] = float("nan")
        self.reasons[name] = reason


def select_metrics(spec: str | Iterable[str] | None) -> list[str]:
    """Expand ``--metrics`` (comma-separated names or families, ``all`` = every metric).

    ``None`` is the default selection: every metric except those marked ``default=False``
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
                f"unknown metric {item!r}; choose from {', '.join(FAMILIES)} or a name in "
                f"`nccli metrics` ({', '.join(list(METRICS)[:4])}, …)"
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

    ``names`` restricts the output (default: every metric that needs no second pass).
    Classifier metrics without a classifier are ``nan`` with the reason.
    """
    wanted = [
        n
        for n in (names or METRICS)
        if not METRICS[n].needs_pass and METRICS[n].family in CORE_FAMILIES
    ]
    out = MetricSet()
    W = None
    if weight is not None:
        W, _ = nc.check_classifier(weight, bias, stats.num_classes, stats.dim, stats.source)

    def means() -> np.ndarray:
        return nc.centred_means(stats, center)

    def mean_vectors() -> nc.Vectors:
        return stats.memo(
            ("vectors", center),
            lambda: nc.Vectors(means(), "centred class mean", nc.centred_gram(stats, center)),
        )

    calc: dict[str, Callable[[], float]] = {
        "nc1": lambda: nc.nc1(stats, center, rtol),
        "nc1_trace": lambda: nc.nc1_trace(stats, center),
        "cdnv": lambda: nc.cdnv(stats),
        "nc2_equinorm_means": lambda: nc.equinorm(mean_vectors()),
        "nc2_equiangular_means": lambda: nc.equiangular(mean_vectors()),
        "nc2_maxangle_means": lambda: nc.maxangle(mean_vectors()),
        "nc2_etf_dist_means": lambda: nc.etf_dist(mean_vectors()),
    }
    if W is not None:
        rows = nc.Vectors(W, "classifier row")  # one Gram for the four classifier metrics
        calc.update(
            {
                "nc2_equinorm_classifier": lambda: nc.equinorm(rows),
                "nc2_equiangular_classifier": lambda: nc.equiangular(rows),
                "nc2_maxangle_classifier": lambda: nc.maxangle(rows),
                "nc2_etf_dist_classifier": lambda: nc.etf_dist(rows),
                "nc3": lambda: nc.nc3(W, means()),
                "nc3_cos": lambda: nc.nc3_cos(W, means()),
            }
        )
    for name in wanted:
        if name in calc:
            out.put(name, calc[name])
        elif METRICS[name].needs_classifier:
            out.undefined(name, "no classifier weight for this layer")
    return out
