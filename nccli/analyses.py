"""Seed-paper analyses wired into ``measure``: training-setup options, the per-class
predicted lengths and the ``--geometry`` rows.

The metric families of the seed papers — ``geometry`` (``of_maxcos_means``,
``of_maxcos_classifier``, ``minority_collapse``), ``deep`` (``balancedness_l``,
``cond_l``, ``erank_l``) and ``mse`` (``mse_ls``, ``mse_dev``, ``mse_dev_frac``) — are
declared in :mod:`nccli.metrics.registry` like every other metric, with the rules for when
they are shown; :func:`layer_metrics` evaluates just those families for one layer.

When they are shown.  With an explicit ``--metrics`` every selected metric gets a value or
``nan`` with the reason.  In the default selection a metric that does not apply to a layer
is left out instead of printed as ``nan`` (each metric's ``shown_by_default``):

- ``of_maxcos_means``, ``cond_l``, ``erank_l``: every layer;
- ``of_maxcos_classifier``: every layer (``nan`` without a classifier, like the other
  classifier metrics);
- ``balancedness_l``: layers of the linear head with a linear layer below them (l ≥ 1);
- ``minority_collapse``: layers with a classifier, unless ``--loss mse``, when at least two
  classes are below the median count and either ``--loss ce`` is given or the data are
  clearly imbalanced (``max/min n_k ≥ 2``, :data:`MINORITY_IMBALANCE`);
- ``mse_*``: layers with a classifier when ``--loss mse`` is given (the decomposition is
  about the MSE training loss; ``λ`` is ``--wd-classifier``, 0 if not given).

:func:`per_class_predictions` adds ``mu_norm_pred`` / ``w_norm_pred`` beside ``mu_norm`` /
``w_norm`` in the ``--per-class`` table, and :func:`cosine_rows` the ``--geometry`` rows.
This module does not import :mod:`nccli.measure` (``measure`` imports it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np

from nccli.choices import Loss, ReportKind
from nccli.errors import UsageError
from nccli.metrics import METRICS, LayerContext, MetricSet, evaluate, select_metrics
from nccli.metrics import deep_linear as deep
from nccli.metrics import geometry as geo
from nccli.metrics.nc import Undefined
from nccli.metrics.registry import MINORITY_IMBALANCE

__all__ = [
    "GEOMETRY_METRICS",
    "LOSSES",
    "MINORITY_IMBALANCE",
    "Loss",
    "ReportKind",
    "cosine_rows",
    "head_depth",
    "layer_metrics",
    "per_class_predictions",
    "validate_options",
]

LOSSES = ("ce", "mse")


#: metric names of the cosine-matrix rows written by ``--geometry``
GEOMETRY_METRICS = ("cos_means", "cos_classifier")
#: the metric families of the seed-paper analyses
ANALYSIS_FAMILIES = ("geometry", "deep", "mse")


def validate_options(opts: Any) -> None:
    """Check the analysis options of a :class:`~nccli.measure.MeasureOptions`."""
    loss = getattr(opts, "loss", None)
    if isinstance(loss, enum.Enum):
        loss = opts.loss = loss.value
    if loss is not None and loss not in LOSSES:
        raise UsageError(f"--loss must be 'ce' or 'mse', got {loss!r}")
    for flag, attr in (("--wd-features", "wd_features"), ("--wd-classifier", "wd_classifier")):
        v = getattr(opts, attr, None)
        if v is not None and (not np.isfinite(v) or v < 0):
            raise UsageError(f"{flag} must be a finite number ≥ 0, got {v}")
    depth = getattr(opts, "head_depth", None)
    if depth is not None and int(depth) < 1:
        raise UsageError(f"--head-depth must be at least 1, got {depth}")


def head_depth(opts: Any, chain: Sequence[Any]) -> int | None:
    """M: ``--head-depth`` when given, else the number of linear modules in the cached chain."""
    given = getattr(opts, "head_depth", None)
    if given is not None:
        return int(given)
    return len(chain) or None


def layer_metrics(view: Any, stats: Any, opts: Any, all_views: list[Any]) -> MetricSet:
    """The ``geometry`` / ``deep`` / ``mse`` metrics of one layer, in registry order: those
    selected by ``opts.metrics``, and the ``mse`` family whenever ``opts.loss`` is ``"mse"``."""
    wanted = set(select_metrics(getattr(opts, "metrics", None)))
    mse_loss = getattr(opts, "loss", None) == "mse"
    names = [
        n
        for n, m in METRICS.items()
        if m.family in ANALYSIS_FAMILIES and (n in wanted or (mse_loss and m.family == "mse"))
    ]
    return evaluate(LayerContext.for_view(view, stats, all_views, opts), names)


# ---------------------------------------------------------------- per-class table
def _insert_after(table: dict[str, np.ndarray], after: str, name: str, values: np.ndarray) -> dict:
    out: dict[str, np.ndarray] = {}
    for key, val in table.items():
        out[key] = val
        if key == after:
            out[name] = values
    if name not in out:
        out[name] = values
    return out


def predictions_wanted(opts: Any) -> bool:
    """Predicted lengths are shown when ``--loss mse`` and both weight decays are given."""
    return (
        getattr(opts, "loss", None) == "mse"
        and getattr(opts, "wd_features", None) is not None
        and getattr(opts, "wd_classifier", None) is not None
    )


def layer_predictions(
    view: Any, stats: Any, opts: Any, all_views: list[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``(||w_k||, ||μ_k||)`` for this layer of the bias-free optimal head
    (raises :class:`Undefined` with the reason when the closed form does not apply)."""
    if not predictions_wanted(opts):
        raise Undefined("predicted lengths need --loss mse, --wd-features and --wd-classifier")
    if deep.head_is_bias_free(view) is False:
        raise Undefined("the closed-form lengths are for a bias-free head; this one has a bias")
    chain = deep.head_chain(all_views)
    pos = deep.chain_position(view, chain)
    if pos is None:
        raise Undefined("the layer is not part of the linear head")
    M = head_depth(opts, chain)
    layer = M - (len(chain) - pos)
    if layer < 0:
        raise Undefined(
            f"--head-depth {M} is smaller than the cached chain: this layer is below the head"
        )
    return geo.predict_layer_lengths(stats.counts, opts.wd_features, opts.wd_classifier, M, layer)


def per_class_predictions(
    view: Any, stats: Any, opts: Any, all_views: list[Any], table: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``table`` with ``mu_norm_pred`` after ``mu_norm`` and ``w_norm_pred`` after ``w_norm``
    (when :func:`predictions_wanted`); a note in ``opts.notes`` explains a ``nan`` column."""
    if not predictions_wanted(opts):
        return table
    K = stats.num_classes
    try:
        w_pred, mu_pred = layer_predictions(view, stats, opts, all_views)
    except Undefined as exc:
        w_pred = mu_pred = np.full(K, np.nan)
        notes = getattr(opts, "notes", None)
        note = f"{view.source.label} {view.name}: predicted lengths are nan: {exc}"
        if notes is not None and note not in notes:
            notes.append(note)
    table = _insert_after(table, "mu_norm", "mu_norm_pred", np.asarray(mu_pred, dtype=float))
    return _insert_after(table, "w_norm", "w_norm_pred", np.asarray(w_pred, dtype=float))


# ------------------------------------------------------------------ --geometry
def cosine_rows(view: Any, stats: Any, opts: Any) -> list[dict[str, Any]]:
    """Long rows ``class, class2, metric, value`` of the K × K cosine matrices of the centred
    class means (``cos_means``) and of the classifier rows (``cos_classifier``).

    Every ordered pair including the diagonal is written, so the matrix pivots back with
    ``df.pivot(index="class", columns="class2", values="value")``; a class without samples
    (or a zero vector) gives ``nan`` in its row and column.  Refused (one line naming the
    limit) above :data:`~nccli.metrics.geometry.COSINE_MATRIX_MAX_CLASSES` classes.
    """
    center = getattr(opts, "center", "global")
    K = stats.num_classes
    if K > geo.COSINE_MATRIX_MAX_CLASSES:
        raise UsageError(
            f"{view.source.label} {view.name}: --geometry writes K×K cosine matrices and "
            f"{K} classes is above its limit of {geo.COSINE_MATRIX_MAX_CLASSES}; "
            "drop --geometry (the pairwise metrics need no matrix)"
        )
    present = stats.counts > 0
    C = geo.cosine_matrix(stats.means - stats.global_mean(center))
    C[~present, :] = np.nan
    C[:, ~present] = np.nan
    mats: list[tuple[str, np.ndarray]] = []
    mats.append(("cos_means", C))
    if view.classifier_weight is not None:
        mats.append(("cos_classifier", geo.cosine_matrix(view.classifier_weight)))
    rows: list[dict[str, Any]] = []
    for metric, mat in mats:
        for k in range(K):
            for l in range(K):
                rows.append({"class": k, "class2": l, "metric": metric, "value": float(mat[k, l])})
    return rows
