"""What a metric kernel sees: one layer's :class:`LayerContext`, and the :class:`MetricSet` result.

A context holds the layer's statistics, its classifier, the run's options that change
which metrics apply (``--loss``, ``--wd-classifier``, whether ``--metrics`` was given),
the layer's place in the linear head chain, and a way to stream its features again.
Expensive pieces that several metrics share (the nc4 feature pass, the MSE
decomposition, one Gram matrix per vector set) are computed once per context through
:meth:`LayerContext.shared`, which also remembers a raised
:class:`~nccli.metrics.nc.Undefined` so a failed computation is not run again.

Views (``nccli.io.sources.LayerView``) and options (``nccli.measure.MeasureOptions``) are
read by duck typing: this package does not import the layers above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nccli.metrics import deep_linear as deep
from nccli.metrics import nc
from nccli.metrics.nc import Undefined, check_classifier
from nccli.stats import ClassStats

__all__ = ["LayerContext", "MetricSet", "noise_floor", "weak_directions"]


class MetricSet(dict):
    """``{name: value}`` in the requested order; ``reasons[name]`` explains each ``nan``."""

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


#: unit round-off of the dtypes features are stored in
_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}


def noise_floor(dtype: str | None) -> float:
    """The smallest singular value of the centred means, relative to the largest, that
    features stored as ``dtype`` resolve: 10 units of round-off (0 for float64).

    The statistics are float64, but of stored values: a class mean of float32 features
    carries round-off of ~1e-7 of its size, so a direction the means do not span (the
    hyperplane a final LayerNorm puts the features on) shows up as a singular value of
    ~1e-7·s_max, above nc1's cutoff ``rtol = 1e-8`` (the contract's, docs/metrics.md), and
    is inverted as if it were signal (nc1 ~5% off on GPT-2-like features): ``measure``
    notes such directions (:func:`weak_directions`) instead of moving the cutoff."""
    return 10.0 * _UNIT_ROUNDOFF.get(str(dtype), 0.0)


def weak_directions(stats: ClassStats, center: str, rtol: float, dtype: str | None) -> int:
    """How many singular values of the centred means ``nc1`` keeps (above ``rtol·s_max``)
    that lie below the resolution of features stored as ``dtype`` (:func:`noise_floor`)."""
    floor = noise_floor(dtype)
    if floor <= rtol:
        return 0
    s = np.asarray(nc.means_singular_values(stats, center))
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero((s > rtol * s[0]) & (s < floor * s[0])))


@dataclass
class LayerContext:
    """One layer, as the metric kernels see it.

    ``weight`` / ``bias`` are the classifier acting on the layer as given (the composite
    map for a layer of a deep head; None without a classifier); :meth:`classifier` is the
    validated float64 copy.  ``explicit`` is whether the metrics were named (``--metrics``):
    then every selected metric is reported, as a value or ``nan`` with the reason.
    ``batches`` streams ``(features, labels)`` chunks for a second pass (None: no pass).
    """

    stats: ClassStats
    weight: Any | None = None
    bias: Any | None = None
    center: str = "global"
    rtol: float = 1e-8
    explicit: bool = True
    loss: str | None = None
    wd_classifier: float | None = None
    #: the linear head chain of the layer's source, bottom to top, and this layer's position
    chain: Sequence[Any] = ()
    position: int | None = None
    #: the layer's own linear weight (``W_{l+1}`` at chain position l)
    layer_weight: Any | None = None
    batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None
    #: a held-out layer's statistics about the training class means (nccli.heldout);
    #: the nearest-mean decisions and the ``*_train_means`` metrics use it
    reference: ClassStats | None = None
    #: the global mean of out-of-distribution features at this layer (``measure --ood``)
    ood_mean: Any | None = None
    _memo: dict[Any, tuple[bool, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_view(
        cls, view: Any, stats: ClassStats, all_views: Sequence[Any], opts: Any
    ) -> LayerContext:
        """The context of layer ``view`` of a source with layers ``all_views``, under the
        measure options ``opts`` (``center``, ``rtol``, ``metrics``, ``loss``,
        ``wd_classifier``, ``chunk_rows``; missing ones take their defaults)."""
        chain = deep.head_chain(all_views)
        chunk_rows = getattr(opts, "chunk_rows", 8192)
        return cls(
            stats=stats,
            weight=view.classifier_weight,
            bias=view.classifier_bias,
            center=getattr(opts, "center", "global"),
            rtol=getattr(opts, "rtol", 1e-8),
            explicit=getattr(opts, "metrics", None) is not None,
            loss=getattr(opts, "loss", None),
            wd_classifier=getattr(opts, "wd_classifier", None),
            chain=chain,
            position=deep.chain_position(view, chain),
            layer_weight=view.weight,
            # a stats-only source (a run file, an LM cache) has no features to stream again:
            # the pass-needing metrics are nan with that reason
            batches=(lambda: view.batches(chunk_rows))
            if getattr(view, "has_features", True)
            else None,
        )

    @property
    def has_classifier(self) -> bool:
        return self.weight is not None

    @property
    def bias_free(self) -> bool | None:
        """Whether the classifier has no bias (absent or exactly zero); None without one."""
        return deep.bias_free(self.weight, self.bias)

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(W, b)`` validated as float64 (DataError on a bad shape or NaN), or None."""
        if self.weight is None:
            return None
        st = self.stats
        return self.shared(
            "classifier",
            lambda: check_classifier(self.weight, self.bias, st.num_classes, st.dim, st.source),
        )

    def shared(self, key: Any, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed once per context under ``key`` (a compute group).

        A raised :class:`Undefined` is remembered too and raised again on every later
        call, so a computation that has no value for this layer is not repeated.
        """
        try:
            ok, value = self._memo[key]
        except KeyError:
            try:
                ok, value = True, fn()
            except Undefined as exc:
                ok, value = False, exc
            self._memo[key] = (ok, value)
        if ok:
            return value
        raise Undefined(str(value))
