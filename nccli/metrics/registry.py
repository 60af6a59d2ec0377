"""The metrics registry: every metric nccli reports, declared once (docs/metrics.md).

A :class:`Metric` declaration says everything about a metric:

- ``name``, ``family`` (what ``--metrics`` accepts besides names), ``higher_is_better``
  and ``formula`` (the text ``nccli metrics`` shows);
- ``default``: part of the default selection (off for metrics that cost O(d³) per layer);
- ``needs``: what it needs besides the statistics, checked in order — :data:`PASS` (a
  second pass over the features), :data:`CLASSIFIER`, :data:`CHAIN` (the layer is in the
  linear head); each unmet need gives its reason;
- ``requires(ctx) -> reason | None``: any further condition for a value;
- ``shown_by_default(ctx) -> bool``: whether the row appears for this layer when the
  metrics were not named with ``--metrics``;
- ``kernel(ctx) -> float``: the value for one :class:`~nccli.metrics.context.LayerContext`,
  or :class:`~nccli.metrics.nc.Undefined` with the reason.

One rule (:func:`evaluate`) turns the declarations into a layer's rows, for every metric
alike: without ``--metrics`` a metric whose ``shown_by_default`` is false is left out;
otherwise the first unmet need or ``requires`` reason makes it ``nan`` with that reason;
otherwise the kernel gives the value (or ``nan`` with the reason it raised).

Kernels that share an expensive computation go through one compute group, memoised on
the context (:meth:`LayerContext.shared`): :func:`feature_pass` (``nc4``, ``acc``,
``ncc_acc``: one chunked pass, :func:`~nccli.metrics.nc.nc4_pass`), :func:`mse_terms`
(``mse_*``: one :func:`~nccli.metrics.mse.mse_decomposition`), :func:`classifier_rows`
(one tiled pair pass over ``W`` for the four ``nc2_*_classifier`` and ``of_maxcos_classifier``)
and :func:`mean_vectors` (the centred means' pair pass, shared with ``cdnv``).

Adding a metric: write its pure function in the family module (``nc.py``,
``geometry.py``, ``deep_linear.py``, ``mse.py``), declare it with one
``_d(M(name, family, formula, kernel, ...))`` (``METRICS.declare(Metric(...))``) at the end
of this module (its place is its display order), describe it in docs/metrics.md, and
test it.  ``measure``, ``--metrics``, ``nccli metrics``, ``compute_metrics`` (families
nc1–nc3) and the table arrows all read this registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from nccli.metrics import deep_linear as deep
from nccli.metrics import geometry as geo
from nccli.metrics import mse as mse_mod
from nccli.metrics import nc
from nccli.metrics import variants as var
from nccli.metrics.context import LayerContext, MetricSet
from nccli.metrics.decisions import nc4_pass
from nccli.metrics.nc import Undefined

__all__ = [
    "CHAIN",
    "CLASSIFIER",
    "CORE_FAMILIES",
    "METRICS",
    "MINORITY_IMBALANCE",
    "NO_CLASSIFIER",
    "PASS",
    "Metric",
    "Need",
    "Registry",
    "classifier_rows",
    "evaluate",
    "feature_pass",
    "mean_vectors",
    "mse_terms",
]

Kernel = Callable[[LayerContext], float]
Predicate = Callable[[LayerContext], bool]

NO_CLASSIFIER = "no classifier weight for this layer"
#: without ``--loss``, ``minority_collapse`` is shown by default from this ``max/min n_k`` on
MINORITY_IMBALANCE = 2.0
#: families :func:`~nccli.metrics.compute_metrics` evaluates from the statistics alone
CORE_FAMILIES = ("nc1", "nc2", "nc3", "nc4")


# ------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Need:
    """Something a metric needs besides the statistics; ``check`` gives the reason it is
    missing for a layer, or None."""

    name: str
    check: Callable[[LayerContext], str | None]


def _always(ctx: LayerContext) -> bool:
    return True


@dataclass(frozen=True)
class Metric:
    """One metric: what it is, what it needs, when it is shown, and how it is computed."""

    name: str
    family: str
    formula: str
    kernel: Kernel
    higher_is_better: bool = False
    #: part of the default selection; off for metrics that cost O(d³) per layer
    default: bool = True
    needs: tuple[Need, ...] = ()
    requires: Callable[[LayerContext], str | None] | None = None
    shown_by_default: Predicate = _always
    #: the value is a count (``classes``): no better direction, shown as an integer
    count: bool = False

    @property
    def better(self) -> str:
        """``higher``, ``lower`` or ``-`` (a count), as ``nccli metrics`` shows it."""
        return "-" if self.count else "higher" if self.higher_is_better else "lower"

    @property
    def arrow(self) -> str:
        """The table's direction marker: ``↑``, ``↓``, or nothing for a count."""
        return "" if self.count else "↑" if self.higher_is_better else "↓"

    @property
    def needs_classifier(self) -> bool:
        return CLASSIFIER in self.needs

    @property
    def needs_pass(self) -> bool:
        return PASS in self.needs

    @property
    def needs_chain(self) -> bool:
        return CHAIN in self.needs

    def unmet(self, ctx: LayerContext) -> str | None:
        """The reason this metric has no value for ``ctx`` before its kernel runs, or None."""
        for need in self.needs:
            reason = need.check(ctx)
            if reason is not None:
                return reason
        return self.requires(ctx) if self.requires is not None else None


class Registry(dict[str, Metric]):
    """``{name: Metric}`` in display order."""

    def declare(self, metric: Metric) -> Metric:
        if metric.name in self:
            raise ValueError(f"metric {metric.name!r} is declared twice")
        self[metric.name] = metric
        return metric

    @property
    def families(self) -> tuple[str, ...]:
        """Family names in order of first appearance."""
        return tuple(dict.fromkeys(m.family for m in self.values()))

    @contextlib.contextmanager
    def declared(self, *metrics: Metric) -> Iterator[Registry]:
        """Declare ``metrics`` for the duration of a ``with`` block (tests, plug-ins)."""
        for m in metrics:
            self.declare(m)
        try:
            yield self
        finally:
            for m in metrics:
                self.pop(m.name, None)


def evaluate(
    ctx: LayerContext, names: Iterable[str], registry: Registry | None = None
) -> MetricSet:
    """The rows of one layer for the metrics ``names``, in that order (unknown names are
    skipped): left out, ``nan`` with a reason, or a value — the rule in the module docstring."""
    reg = METRICS if registry is None else registry
    out = MetricSet()
    for name in names:
        metric = reg.get(name)
        if metric is None:
            continue
        if not ctx.explicit and not metric.shown_by_default(ctx):
            continue
        reason = metric.unmet(ctx)
        if reason is not None:
            out.undefined(name, reason)
        else:
            out.put(name, lambda m=metric: m.kernel(ctx))
    return out


# ------------------------------------------------------------------ compute groups
def feature_pass(ctx: LayerContext) -> dict[str, float]:
    """``nc4``, ``acc``, ``ncc_acc`` from one chunked pass over the layer's features.

    Without a classifier the pass runs with a zero one: ``ncc_acc`` needs none."""

    def run() -> dict[str, float]:
        if ctx.batches is None:
            raise Undefined(
                "the source holds statistics only, no features for a second pass (a Tracker "
                "keeps them with store_features=True, an LM extraction with --store-features)"
            )
        # a held-out split's nearest class mean is the nearest *training* mean
        st = ctx.stats if ctx.reference is None else ctx.reference
        if ctx.weight is None:
            return nc4_pass(ctx.batches(), st, np.zeros((st.num_classes, st.dim)))
        return nc4_pass(ctx.batches(), st, ctx.weight, ctx.bias)

    return ctx.shared("nc4_pass", run)


def mse_terms(ctx: LayerContext) -> mse_mod.MSEDecomposition:
    """One MSE decomposition of the layer's classifier (``λ`` = ``--wd-classifier`` or 0);
    the bias-free variant when the classifier has no bias."""
    bias_free = bool(ctx.bias_free)
    return ctx.shared(
        "mse_decomposition",
        lambda: mse_mod.mse_decomposition(
            ctx.stats,
            ctx.weight,
            None if bias_free else ctx.bias,
            ctx.wd_classifier or 0.0,
            bias=not bias_free,
        ),
    )


def mean_vectors(ctx: LayerContext) -> nc.Vectors:
    """The centred class means with their one tiled pair pass (shared with ``cdnv``)."""
    return ctx.shared("mean_vectors", lambda: nc.mean_vectors(ctx.stats, ctx.center))


def classifier_rows(ctx: LayerContext) -> nc.Vectors:
    """The classifier rows ``w_k``: one tiled pair pass for the classifier NC2 metrics and
    ``of_maxcos_classifier``."""
    return ctx.shared("classifier_rows", lambda: nc.Vectors(_W(ctx), "classifier row"))


def _W(ctx: LayerContext) -> np.ndarray:
    checked = ctx.classifier()
    assert checked is not None  # guarded by CLASSIFIER
    return checked[0]


def _means(ctx: LayerContext) -> np.ndarray:
    return nc.centred_means(ctx.stats, ctx.center)


# ------------------------------------------------------------------ needs and display rules
CLASSIFIER = Need("a classifier", lambda c: None if c.has_classifier else NO_CLASSIFIER)
CHAIN = Need(
    "the linear head chain",
    lambda c: None if c.position is not None else "the layer is not part of a linear head",
)


def _pass_reason(ctx: LayerContext) -> str | None:
    try:
        feature_pass(ctx)
    except Undefined as exc:
        return str(exc)
    return None


PASS = Need("a second pass over the features", _pass_reason)
REFERENCE = Need(
    "a training split",
    lambda c: (
        None if c.reference is not None else "not a held-out split measured with its training split"
    ),
)


OOD = Need(
    "out-of-distribution features",
    lambda c: None if c.ood_mean is not None else "no out-of-distribution features (--ood)",
)


def _ood_given(ctx: LayerContext) -> bool:
    """``nc5`` by default: when ``--ood`` gave out-of-distribution features."""
    return ctx.ood_mean is not None


def _no_etf(ctx: LayerContext) -> bool:
    """``gnc2_*`` by default: K > d + 1, where no simplex ETF exists."""
    return ctx.stats.num_classes > ctx.stats.dim + 1


def _gnc2(ctx: LayerContext) -> tuple[float, float]:
    return ctx.shared("gnc2", lambda: var.gnc2(_means(ctx)))


def _bias_collapse(ctx: LayerContext) -> float:
    checked = ctx.classifier()
    assert checked is not None  # guarded by CLASSIFIER
    return var.bias_collapse(checked[0], checked[1], ctx.stats.global_mean("global"))


def _margin(ctx: LayerContext) -> float:
    got = feature_pass(ctx)
    if "margin_min" not in got:
        raise Undefined("needs two classes and a nonzero classifier")
    return got["margin_min"]


def _never(ctx: LayerContext) -> bool:
    return False


def _held_out(ctx: LayerContext) -> bool:
    """``*_train_means`` by default: held-out layers measured with their training split."""
    return ctx.reference is not None


def _has_layer_below(ctx: LayerContext) -> str | None:
    if ctx.position == 0:
        return "no linear layer below this one (balancedness compares W_l and W_(l+1) around it)"
    return None


def _above_chain_bottom(ctx: LayerContext) -> bool:
    """``balancedness_l`` by default: layers of the linear head with one below (l ≥ 1)."""
    return ctx.position is not None and ctx.position >= 1


def _minority_shown(ctx: LayerContext) -> bool:
    """``minority_collapse`` by default: with a classifier, not for MSE, at least two
    minority classes and, unless ``--loss ce`` was given, clearly imbalanced data
    (``max/min n_k ≥`` :data:`MINORITY_IMBALANCE`, or an empty class)."""
    counts = ctx.stats.counts
    if not ctx.has_classifier or ctx.loss == "mse" or geo.minority_classes(counts).size < 2:
        return False
    if ctx.loss == "ce":
        return True
    c = np.asarray(counts, dtype=np.float64)
    return bool(c.min() > 0 and c.max() / c.min() >= MINORITY_IMBALANCE) or bool(c.min() == 0)


def _rank_deficient(ctx: LayerContext) -> bool:
    """``nc1_rank`` by default: when ``Σ_B⁺`` keeps fewer than K-1 directions (K > d+1, or
    means on a lower-dimensional subspace)."""
    try:
        return nc.nc1_rank(ctx.stats, ctx.center, ctx.rtol) < ctx.stats.num_classes - 1
    except Undefined:
        return False


def _mse_loss_given(ctx: LayerContext) -> bool:
    """``mse_*`` by default: layers with a classifier when ``--loss mse`` is given."""
    return ctx.has_classifier and ctx.loss == "mse"


#: every metric nccli reports, in display order (the sections of docs/metrics.md)
METRICS = Registry()
_d, M = METRICS.declare, Metric

# fmt: off
# K: the classes measured (nccli.classes: those with samples, at least --min-class-count)
_d(M("classes", "classes", "K: classes with at least max(1, --min-class-count) samples",
     lambda c: float(c.stats.num_classes), count=True))
# NC1: within-class variability
_d(M("nc1", "nc1", "(1/K) Tr(Σ_W Σ_B⁺)", lambda c: nc.nc1(c.stats, c.center, c.rtol)))
_d(M("nc1_rank", "nc1", "rank of Σ_B used by nc1: singular values of M above rtol·s_1",
     lambda c: float(nc.nc1_rank(c.stats, c.center, c.rtol)), count=True,
     shown_by_default=_rank_deficient))
_d(M("nc1_trace", "nc1", "Tr(Σ_W) / Tr(Σ_B)", lambda c: nc.nc1_trace(c.stats, c.center)))
_d(M("cdnv", "nc1", "mean_{k<l} (σ_k²+σ_l²) / (2||μ_k-μ_l||²)", lambda c: nc.cdnv(c.stats)))
# held-out splits: the same about the training class means (nccli.heldout)
_d(M("nc1_train_means", "heldout", "nc1 of held-out features about the training means μ_k^tr",
     lambda c: nc.nc1(c.reference, c.center, c.rtol), needs=(REFERENCE,),
     shown_by_default=_held_out))
_d(M("cdnv_train_means", "heldout", "cdnv with σ_k² about μ_k^tr, distances ||μ_k^tr-μ_l^tr||",
     lambda c: nc.cdnv(c.reference), needs=(REFERENCE,), shown_by_default=_held_out))
# NC2: simplex ETF of the centred means (mean_vectors), of the classifier rows (classifier_rows)
_d(M("nc2_equinorm_means", "nc2", "std ||μ_k-μ_G|| / mean ||μ_k-μ_G||",
     lambda c: nc.equinorm(mean_vectors(c))))
_d(M("nc2_equiangular_means", "nc2", "std_{k≠l} cos(μ_k-μ_G, μ_l-μ_G)",
     lambda c: nc.equiangular(mean_vectors(c))))
_d(M("nc2_maxangle_means", "nc2", "mean_{k≠l} |cos + 1/(K-1)|",
     lambda c: nc.maxangle(mean_vectors(c))))
_d(M("nc2_etf_dist_means", "nc2", "||G/||G|| - E/||E||||_F (centred means)",
     lambda c: nc.etf_dist(mean_vectors(c))))
_d(M("nc2_equinorm_classifier", "nc2", "std ||w_k|| / mean ||w_k||",
     lambda c: nc.equinorm(classifier_rows(c)), needs=(CLASSIFIER,)))
_d(M("nc2_equiangular_classifier", "nc2", "std_{k≠l} cos(w_k, w_l)",
     lambda c: nc.equiangular(classifier_rows(c)), needs=(CLASSIFIER,)))
_d(M("nc2_maxangle_classifier", "nc2", "mean_{k≠l} |cos + 1/(K-1)|",
     lambda c: nc.maxangle(classifier_rows(c)), needs=(CLASSIFIER,)))
_d(M("nc2_etf_dist_classifier", "nc2", "||G/||G|| - E/||E||||_F (W rows)",
     lambda c: nc.etf_dist(classifier_rows(c)), needs=(CLASSIFIER,)))
# NC3: self-duality
_d(M("nc3", "nc3", "||Wᵀ/||W|| - M/||M||||_F²",
     lambda c: nc.nc3(_W(c), _means(c)), needs=(CLASSIFIER,)))
_d(M("nc3_cos", "nc3", "mean_k cos(w_k, μ_k-μ_G)",
     lambda c: nc.nc3_cos(_W(c), _means(c)), higher_is_better=True, needs=(CLASSIFIER,)))
# NC4: the three come from one second pass over the features (feature_pass); the pass runs
# without a classifier too (for ncc_acc), so its failure is the reason before "no classifier"
_d(M("nc4", "nc4", "P[argmax(Wh+b) ≠ argmin_k ||h-μ_k||]",
     lambda c: feature_pass(c)["nc4"], needs=(PASS, CLASSIFIER)))
_d(M("acc", "nc4", "P[argmax(Wh+b) = y]",
     lambda c: feature_pass(c)["acc"], higher_is_better=True, needs=(PASS, CLASSIFIER)))
_d(M("ncc_acc", "nc4", "P[argmin_k ||h-μ_k|| = y]",
     lambda c: feature_pass(c)["ncc_acc"], higher_is_better=True, needs=(PASS,)))
# orthogonal frame and minority collapse
_d(M("of_maxcos_means", "geometry", "max_{k≠l} |cos(μ_k, μ_l)| (uncentred means)",
     lambda c: geo.of_maxcos_means(c.stats)))
_d(M("of_maxcos_classifier", "geometry", "max_{k≠l} |cos(w_k, w_l)|",
     lambda c: geo.of_maxcos_classifier(classifier_rows(c)), needs=(CLASSIFIER,)))
_d(M("minority_collapse", "geometry", "mean_{k<l minority} cos(w_k, w_l)",
     lambda c: geo.minority_collapse(c.weight, c.stats.counts), needs=(CLASSIFIER,),
     shown_by_default=_minority_shown))
# deep linear heads
_d(M("balancedness_l", "deep", "||W_{l+1}ᵀW_{l+1} - W_l W_lᵀ||_F / ||W_l W_lᵀ||_F",
     lambda c: deep.balancedness(c.chain[c.position - 1].weight, c.layer_weight),
     needs=(CHAIN,), requires=_has_layer_below, shown_by_default=_above_chain_bottom))
_d(M("cond_l", "deep", "s_1/s_{K-1} of centred means (s_1/s_K uncentred, bias-free)",
     lambda c: deep.cond(c.stats, c.center, bool(c.bias_free), c.rtol)))
_d(M("erank_l", "deep", "exp(entropy of eig(Σ_T)/Tr Σ_T) (Roy & Vetterli)",
     lambda c: deep.erank(c.stats), default=False))
# MSE decomposition: the three come from one mse_decomposition (mse_terms)
_d(M("mse_ls", "mse", "L(W_LS, b_LS): MSE of the ridge LS classifier",
     lambda c: mse_terms(c).mse_ls, needs=(CLASSIFIER,), shown_by_default=_mse_loss_given))
_d(M("mse_dev", "mse", "L(W,b) - L(W_LS,b_LS) = ½ΣΔ_kᵀAΔ_k",
     lambda c: mse_terms(c).mse_dev, needs=(CLASSIFIER,), shown_by_default=_mse_loss_given))
_d(M("mse_dev_frac", "mse", "mse_dev / (mse_ls + mse_dev)",
     lambda c: mse_terms(c).mse_dev_frac, needs=(CLASSIFIER,), shown_by_default=_mse_loss_given))
# later papers' variants (nccli.metrics.variants): on request, or where they apply
_d(M("gnc2_log_energy", "variants", "mean_{k<l} log(1/||u_k-u_l||), u_k = (μ_k-μ_G)/||μ_k-μ_G||",
     lambda c: _gnc2(c)[0], shown_by_default=_no_etf))
_d(M("gnc2_dist_var", "variants", "var_{k<l} ||u_k-u_l||", lambda c: _gnc2(c)[1],
     shown_by_default=_no_etf))
_d(M("unc3", "variants", "var_k cos(w_k, μ_k-μ_G)", lambda c: var.unc3(_W(c), _means(c)),
     needs=(CLASSIFIER,), shown_by_default=_never))
_d(M("unc3_dot", "variants", "std_k s_k / |mean_k s_k|, s_k = w_k·(μ_k-μ_G)",
     lambda c: var.unc3_dot(_W(c), _means(c)), needs=(CLASSIFIER,), shown_by_default=_never))
_d(M("nc3_dual", "variants", "|| W Mᵀ/||W Mᵀ||_F - (I-11ᵀ/K)/sqrt(K-1) ||_F",
     lambda c: var.nc3_dual(_W(c), _means(c)), needs=(CLASSIFIER,), shown_by_default=_never))
_d(M("bias_collapse", "variants", "||W μ_G + b||_2", _bias_collapse, needs=(CLASSIFIER,),
     shown_by_default=_never))
_d(M("margin_min", "variants", "min_i (z_y - max_{k≠y} z_k) / ||W||_F, z = Wh_i+b",
     lambda c: _margin(c), higher_is_better=True,
     needs=(PASS, CLASSIFIER), shown_by_default=_never))
_d(M("nc5", "ood", "mean_k |cos(μ_k, μ_G^ood)|",
     lambda c: var.nc5(c.stats.means[nc._present(c.stats)], c.ood_mean), needs=(OOD,),
     shown_by_default=_ood_given))
# fmt: on
del _d, M
