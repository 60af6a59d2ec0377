"""Keeping a layer's features between the two passes of ``measure`` (``--max-memory``).

The statistics pass streams a layer's features once; the NC4 pass (``nc4``, ``acc``,
``ncc_acc``) needs them again.  When the layer's features fit the source's
``keep_bytes``, the chunks of the first pass are kept (one layer's at a time) and the
second pass reads them from memory; otherwise the file is read twice.  The decision is
made before the first chunk when the number of rows is known (a cache, a features file),
so a layer over the budget never holds more than one chunk: peak memory is flat in N
beyond the budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from nccli.stats import ClassStats

__all__ = ["kept_batches", "stream_stats"]


def _rows(source: Any) -> int | None:
    """The source's number of feature rows, when it says (None: unknown)."""
    labels = getattr(source, "_labels", None)  # a features file: its labels are read
    if labels is not None:
        return int(labels.shape[0])
    caches = getattr(source, "caches", None)  # a cache or a shard set
    if caches:
        return sum(int(c.num_samples) for c in caches)
    return None


def stream_stats(view: Any, st: ClassStats, chunk_rows: int) -> ClassStats:
    """Fold every chunk of ``view`` into ``st``, keeping the chunks on the source for
    :func:`kept_batches` while they fit ``source.keep_bytes``."""
    src = view.source
    if src._kept is not None and src._kept[0] != view.name:
        src._kept = None  # another layer's chunks: their pass is over
    budget = float(getattr(src, "keep_bytes", 0) or 0)
    rows = _rows(src)
    kept: list[tuple[np.ndarray, np.ndarray]] | None = [] if budget > 0 else None
    size = 0
    for h, y in view.batches(chunk_rows):
        if kept is not None and not kept and rows is not None and h.ndim == 2:
            if rows * (h.shape[1] * h.itemsize + y.itemsize) > budget:
                kept = None  # known not to fit: never hold more than one chunk
        st.update(h, y)
        size += h.nbytes + y.nbytes
        if kept is not None and size <= budget:
            kept.append((h, y))
        else:
            kept = None
    if kept is not None:
        src._kept = (view.name, chunk_rows, kept)
    return st


def kept_batches(view: Any, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
    """The chunks the last pass over ``view`` kept (same ``chunk_rows``), else None."""
    kept = view.source._kept
    if kept is not None and kept[:2] == (view.name, chunk_rows):
        return iter(kept[2])
    return None
