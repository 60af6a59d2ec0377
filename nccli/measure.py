"""``measure``: sources → tidy rows ``source, epoch, layer, metric, value``.

The Python API behind ``nccli measure``.  For every source and selected layer it takes
the statistics (stored in the cache, or streamed once) and evaluates the selected metrics
of the registry (:mod:`nccli.metrics.registry`) on them; only when NC4-family metrics are
wanted are the features streamed once more, in chunks with one GEMM per chunk — unless the
statistics were streamed and the features fit ``max_memory`` (default
:data:`KEEP_FRACTION` of the memory, at most :data:`KEEP_MAX`): then the chunks of the first
pass are kept for the second.  Memory is one chunk (or the kept chunks, within the budget)
plus ``O(d² + K·d)``; nothing is N×N or K×d×d.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nccli import analyses
from nccli.classes import MeasuredView, class_labels, select_classes
from nccli.errors import DataError, UsageError
from nccli.heldout import around_reference, held_out_pairs, is_held_out, joint_selection, split_of
from nccli.io.sources import Source, open_sources
from nccli.layers import head_chain
from nccli.metrics import LayerContext, MetricSet, evaluate, select_metrics
from nccli.metrics.context import noise_floor, weak_directions
from nccli.sizes import parse_size, physical_memory
from nccli.stats import PRECISIONS
from nccli.table import Rows

if TYPE_CHECKING:  # pragma: no cover - the DataFrame is built only for Python callers
    import pandas as pd

TIDY_COLUMNS = ["source", "epoch", "layer", "metric", "value"]
#: the default budget for keeping a layer's features between the two passes
KEEP_FRACTION = 1 / 16
KEEP_MAX = 1 << 30
PER_CLASS_METRICS = ["n_k", "sigma2_k", "mu_norm", "mu_c_norm", "w_norm", "cos_w_mu", "cos_w_mu_c"]


@dataclass
class MeasureOptions:
    """Everything that changes the numbers (the CLI maps its flags onto this)."""

    layers: Sequence[str] | None = None
    metrics: Sequence[str] | str | None = None
    per_class: bool = False
    center: str = "global"
    rtol: float = 1e-8
    recompute: bool = False
    chunk_rows: int = 8192
    #: the scatter's arithmetic when statistics are streamed ("exact" | "fast")
    precision: str = "exact"
    #: features up to this size are kept between the passes (parse_size; None: default)
    max_memory: str | int | float | None = None
    num_classes: int | None = None
    #: classes with fewer samples are left out of every metric (nccli.classes)
    min_class_count: int = 1
    notes: list[str] = field(default_factory=list)
    # seed-paper analyses (nccli.analyses): training setup of the run, --geometry rows
    loss: str | None = None  # "ce" | "mse" | None (unknown)
    wd_features: float | None = None  # λ_H of the unconstrained-feature loss
    wd_classifier: float | None = None  # λ_W (also the ridge λ of the MSE decomposition)
    head_depth: int | None = None  # M; None: the number of linear layers in the cached chain
    geometry: bool = False
    #: a cache (or features file) of out-of-distribution inputs: nc5 (nccli.metrics.variants)
    ood: str | os.PathLike[str] | None = None


def select_layers(
    source: Source, patterns: Sequence[str] | None, views: Sequence[Any] | None = None
) -> list[Any]:
    """Layers of ``source`` matching names / globs / roles (all when ``patterns`` is empty).

    ``views`` are the source's views to choose from (default: its own, in depth order).
    Role ``classifier`` is the input of the final linear classifier in every model: the
    top of the linear head, which is also the ``penultimate`` layer of a model whose
    head is one linear layer."""
    views = list(source.layers.values()) if views is None else list(views)
    if not patterns or list(patterns) == ["all"]:
        return views
    chain = head_chain(views)
    top = chain[-1] if chain else None
    out: list[Any] = []
    for pat in patterns:
        hit = [
            v
            for v in views
            if fnmatch.fnmatchcase(v.name, pat)
            or v.role == pat
            or (pat == "classifier" and v is top)
            or (pat == "head" and v.role != "other")
        ]
        if not hit:
            raise UsageError(
                f"{source.path}: no layer matches {pat!r}; layers are {', '.join(source.layers)}"
                + ("" if top is not None or pat != "classifier" else " (none feeds a classifier)")
            )
        out.extend(v for v in hit if v not in out)
    return out


def measured_views(
    source: Source, opts: MeasureOptions, reference: Source | None = None
) -> list[Any]:
    """The source's layer views restricted to the measured classes (nccli.classes): the
    views themselves when every class is measured, else :class:`MeasuredView` s; the note
    saying what was left out goes to ``opts.notes`` once.  For a held-out split,
    ``reference`` is its training split: classes it has no sample of are left out too."""
    views = list(source.layers.values())
    if not views:
        return views
    counts = views[0].stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows).counts
    if reference is not None and reference.layers:
        first = next(iter(reference.layers.values()))
        train = first.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows).counts
        sel = joint_selection(counts, train, opts.min_class_count)
    else:
        sel = select_classes(counts, opts.min_class_count)
    if sel.complete:
        return views
    if sel.kept.size == 0:
        raise DataError(
            f"{source.path}: no class has {opts.min_class_count} or more samples; lower "
            "--min-class-count"
        )
    note = sel.note(source.label)
    if note is not None and note not in opts.notes:
        opts.notes.append(note)
    return [MeasuredView(v, sel) for v in views]


def per_class_table(view: Any, stats: Any, center: str = "global") -> dict[str, np.ndarray]:
    """Per class: ``n_k``, ``σ_k²``, ``||μ_k||``, ``||μ_k-μ_G||``, ``||w_k||``, ``cos(w_k, μ_k)``
    and ``cos(w_k, μ_k-μ_G)`` (classifier columns are nan without a classifier)."""
    counts = stats.counts
    K = stats.num_classes
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma2 = np.where(counts > 0, stats.class_ss / np.maximum(counts, 1), np.nan)
        mu = stats.means
        muc = mu - stats.global_mean(center)
        mu_norm = np.linalg.norm(mu, axis=1)
        muc_norm = np.linalg.norm(muc, axis=1)
        W = view.classifier_weight
        if W is None:
            w_norm = cos = cos_c = np.full(K, np.nan)
        else:
            w_norm = np.linalg.norm(W, axis=1)
            cos = np.sum(W * mu, axis=1) / (w_norm * mu_norm)
            cos_c = np.sum(W * muc, axis=1) / (w_norm * muc_norm)
        empty = counts == 0
        for arr in (mu_norm, muc_norm):
            arr[empty] = np.nan
    return {
        "n_k": counts.astype(float),
        "sigma2_k": sigma2,
        "mu_norm": mu_norm,
        "mu_c_norm": muc_norm,
        "w_norm": w_norm,
        "cos_w_mu": np.where(empty, np.nan, cos),
        "cos_w_mu_c": np.where(empty, np.nan, cos_c),
    }


def measure_layer(
    view: Any,
    opts: MeasureOptions,
    names: list[str],
    all_views: Sequence[Any],
    reference: Any | None = None,
    ood_mean: np.ndarray | None = None,
) -> MetricSet:
    """Every selected metric of one layer, in the order of ``names``: the registry's rule
    (:func:`nccli.metrics.registry.evaluate`) decides which rows appear and why one is ``nan``.

    ``reference`` is the same layer of the training split when ``view`` is held out
    (:mod:`nccli.heldout`): the generalisation metrics use its class means."""
    stats = view.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows)
    ctx = LayerContext.for_view(view, stats, all_views, opts)
    ctx.ood_mean = ood_mean
    if reference is not None:
        train = reference.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows)
        ctx.reference = around_reference(stats, train, class_labels(view, stats.num_classes))
    ctx.classifier()  # a classifier of the wrong shape or with NaN is a DataError
    ms = evaluate(ctx, names)
    _note_weak_directions(view, ctx, ms, opts)
    return ms


def _note_weak_directions(
    view: Any, ctx: LayerContext, ms: MetricSet, opts: MeasureOptions
) -> None:
    """Say when nc1 inverts directions finer than the stored features resolve (a final
    LayerNorm's hyperplane in float32 features looks like a 1e-7·s_max direction)."""
    if not np.isfinite(ms.get("nc1", np.nan)):
        return
    dtype = getattr(view, "feature_dtype", None)
    weak = weak_directions(ctx.stats, ctx.center, ctx.rtol, dtype)
    if weak:
        note = (
            f"{view.source.label} {view.name}: nc1 inverts {weak} direction(s) of the class "
            f"means below {noise_floor(dtype):.0e}·s_max, finer than {dtype} features resolve "
            "(round-off, e.g. a LayerNorm's hyperplane, may dominate them; nc1_rank counts "
            "what was kept)"
        )
        if note not in opts.notes:
            opts.notes.append(note)


def measure_sources(
    sources: Iterable[Source],
    opts: MeasureOptions,
    progress: Callable[[str], None] | None = None,
    references: dict[int, Source] | None = None,
) -> pd.DataFrame:
    """Tidy rows for already opened sources (see :func:`measure`), as a DataFrame.

    A held-out split with its training split among the inputs (:mod:`nccli.heldout`) is
    measured against the training class means; a ``split`` column then says which rows
    are which (it appears whenever the inputs hold more than one split).  ``references``
    pairs each held-out source with its training source when the caller already did
    (``compare`` measures one checkpoint at a time); by default they are paired here."""
    return measure_rows(sources, opts, progress, references).to_frame()


def measure_rows(
    sources: Iterable[Source],
    opts: MeasureOptions,
    progress: Callable[[str], None] | None = None,
    references: dict[int, Source] | None = None,
) -> Rows:
    """:func:`measure_sources` without pandas: the same rows as a :class:`~nccli.table.Rows`
    (``epoch``, ``class``, ``class2`` are ``Int64`` columns; ``attrs`` has the notes)."""
    sources = list(sources)
    names = select_metrics(opts.metrics)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        refs = references
        if refs is None:
            refs = stack.enter_context(held_out_pairs(sources, opts.notes))
        ood = _ood_means(opts, stack)
        for src in sources:
            rows.extend(_source_rows(src, refs.get(id(src)), opts, names, progress, ood))
            opts.notes.extend(n for n in src.notes if n not in opts.notes)  # e.g. dropped rows
    splits = {split_of(s) for s in sources}
    several = len(splits) > 1 or any(map(is_held_out, sources)) or references is not None
    lead = ["source", "split"] if several else ["source"]
    extra = ["class"] if opts.per_class or opts.geometry else []
    extra += ["class2"] if opts.geometry else []
    cols = [*lead, *TIDY_COLUMNS[1:3], *extra, *TIDY_COLUMNS[3:]]
    out = Rows.from_records(rows, cols, dict.fromkeys(["epoch", *extra], "int"))
    out.attrs["notes"] = list(opts.notes)
    out.attrs["center"] = opts.center
    return out


def _source_rows(
    src: Source,
    ref: Source | None,
    opts: MeasureOptions,
    names: list[str],
    progress: Callable[[str], None] | None,
    ood: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one source (``ref``: its training split, for a held-out one; ``ood``:
    the out-of-distribution global mean of each layer, ``--ood``)."""
    all_views = measured_views(src, opts, ref)
    ref_views = {} if ref is None else {v.name: v for v in ref.layers.values()}
    key = {"source": src.label, "split": split_of(src), "epoch": src.epoch}
    rows: list[dict[str, Any]] = []
    for view in select_layers(src, opts.layers, all_views):
        if progress:
            progress(f"{src.label}: {view.name}")
        ms = measure_layer(
            view, opts, names, all_views, ref_views.get(view.name), (ood or {}).get(view.name)
        )
        for metric, value in ms.items():
            rows.append({**key, "layer": view.name, "metric": metric, "value": value})
            if metric in ms.reasons:
                note = f"{src.label} {view.name}: {metric} is nan: {ms.reasons[metric]}"
                if note not in opts.notes:
                    opts.notes.append(note)
        if opts.per_class or opts.geometry:
            rows.extend(
                {**key, "layer": view.name, **r} for r in _class_rows(view, opts, all_views)
            )
    return rows


def _ood_means(opts: MeasureOptions, stack: contextlib.ExitStack) -> dict[str, np.ndarray]:
    """``--ood``: the global mean of each layer of the out-of-distribution source."""
    if opts.ood is None:
        return {}
    (ood,) = open_sources([opts.ood], num_classes=opts.num_classes)
    stack.callback(ood.close)
    kw = {"recompute": opts.recompute, "chunk_rows": opts.chunk_rows}
    return {name: v.stats(**kw).global_mean("global") for name, v in ood.layers.items()}


def _class_rows(view: Any, opts: MeasureOptions, all_views: Sequence[Any]) -> list[dict[str, Any]]:
    """``--per-class`` and ``--geometry`` rows of one layer, under the source's labels."""
    stats = view.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows)
    labels = class_labels(view, stats.num_classes)
    rows: list[dict[str, Any]] = []
    if opts.per_class:
        table = per_class_table(view, stats, opts.center)
        table = analyses.per_class_predictions(view, stats, opts, all_views, table)
        for metric in table:
            for k, v in enumerate(table[metric]):
                rows.append({"class": int(labels[k]), "metric": metric, "value": float(v)})
    if opts.geometry:
        for row in analyses.cosine_rows(view, stats, opts):
            row["class"], row["class2"] = int(labels[row["class"]]), int(labels[row["class2"]])
            rows.append(row)
    return rows


def measure(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    layers: Sequence[str] | str | None = None,
    metrics: Sequence[str] | str | None = None,
    per_class: bool = False,
    center: str = "global",
    recompute: bool = False,
    num_classes: int | None = None,
    chunk_rows: int = 8192,
    loss: str | None = None,
    wd_features: float | None = None,
    wd_classifier: float | None = None,
    head_depth: int | None = None,
    geometry: bool = False,
    skip_nonfinite: bool = False,
    min_class_count: int = 1,
    precision: str = "exact",
    max_memory: str | int | float | None = None,
    ood: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Measure NC metrics of caches / feature files; one tidy row per (source, layer, metric).

    >>> df = measure("cache/ep200.h5", metrics="nc1,nc4")        # doctest: +SKIP
    >>> df.pivot_table(index="layer", columns="metric", values="value")  # doctest: +SKIP

    ``df.attrs["notes"]`` lists why any value is ``nan``.  ``loss`` (``"ce"``/``"mse"``),
    ``wd_features``, ``wd_classifier`` and ``head_depth`` describe the training run for the
    seed-paper analyses (:mod:`nccli.analyses`); ``geometry`` adds the cosine-matrix rows
    (``class``, ``class2``, metric ``cos_means`` / ``cos_classifier``).  ``skip_nonfinite``
    drops the NaN/Inf rows of feature files (a note counts them per class) instead of
    refusing the file.  Classes with no samples, or fewer than ``min_class_count``, are
    left out of every metric (:mod:`nccli.classes`; a note counts them and the
    ``classes`` row is the number measured).  ``precision`` is the scatter's arithmetic
    when statistics are streamed (``"exact"``: float64; ``"fast"``: float32 blocks,
    docs/metrics.md); features up to ``max_memory`` (``"2GiB"``, bytes, ``"none"``; default
    1/16 of the memory, at most 1 GiB) are kept in memory between the two passes.
    ``ood`` is a cache or features file of out-of-distribution inputs through the same
    model: its per-layer global mean gives ``nc5``.
    """
    return measure_table(
        paths,
        layers=layers,
        metrics=metrics,
        per_class=per_class,
        center=center,
        recompute=recompute,
        chunk_rows=chunk_rows,
        num_classes=num_classes,
        loss=loss,
        wd_features=wd_features,
        wd_classifier=wd_classifier,
        head_depth=head_depth,
        geometry=geometry,
        min_class_count=min_class_count,
        precision=precision,
        max_memory=max_memory,
        ood=ood,
        skip_nonfinite=skip_nonfinite,
    ).to_frame()


def measure_table(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    skip_nonfinite: bool = False,
    **options: Any,
) -> Rows:
    """:func:`measure`'s rows without pandas (what ``nccli measure`` writes): the same
    keywords (the fields of :class:`MeasureOptions`), a :class:`~nccli.table.Rows` back."""
    layers = options.get("layers")
    if isinstance(layers, str):
        options["layers"] = [s.strip() for s in layers.split(",") if s.strip()]
    opts = MeasureOptions(**options)
    with opened_sources(paths, opts, skip_nonfinite=skip_nonfinite) as sources:
        return measure_rows(sources, opts)


@contextlib.contextmanager
def opened_sources(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    opts: MeasureOptions,
    *,
    skip_nonfinite: bool = False,
) -> Iterator[list[Source]]:
    """Check ``opts`` and open every input; the sources are closed on exit."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if opts.center not in ("global", "classmean"):
        raise UsageError(f"--center must be 'global' or 'classmean', got {opts.center!r}")
    analyses.validate_options(opts)
    opts.precision = str(getattr(opts.precision, "value", opts.precision))
    if opts.precision not in PRECISIONS:
        raise UsageError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}"
        )
    keep = parse_size(opts.max_memory)
    keep = min(physical_memory() * KEEP_FRACTION, KEEP_MAX) if keep is None else keep
    sources = open_sources(list(paths), num_classes=opts.num_classes, skip_nonfinite=skip_nonfinite)
    for s in sources:
        s.precision, s.keep_bytes = opts.precision, keep
    try:
        yield sources
    finally:
        for s in sources:
            s.close()
