"""Held-out data: a test split measured against its training split (docs/metrics.md,
"Held-out splits").

A cache records the ``split`` its features came from.  A source whose split is not
``train`` is *held out*; its training source is the cache of the same checkpoint
(``checkpoint_sha256``) with split ``train`` among the inputs, else the cache its
``reference_cache`` attribute names (``extract --eval-data`` writes ``../<stem>.h5``: the
held-out caches live in a folder under the training ones).  With one, the generalisation metrics use the *training* class means:

- ``nc4``, ``ncc_acc``: the nearest class mean is the nearest training mean;
- ``nc1_train_means``, ``cdnv_train_means``: NC1 and CDNV of the held-out features about the
  training means, from :func:`around_reference` (no second pass).

The held-out split's own-mean metrics (``nc1``, ``cdnv``, ``nc2_*``, ...) are unchanged.
Its measured classes are those it has samples of that the training split also has
(a training mean of nothing is undefined); one note names any left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from nccli.classes import ClassSelection
from nccli.io.sources import open_sources
from nccli.stats import ClassStats

__all__ = [
    "TRAIN",
    "around_reference",
    "held_out_pairs",
    "is_held_out",
    "joint_selection",
    "split_of",
]

TRAIN = "train"


def split_of(source: Any) -> str | None:
    """The split a source's features came from (None for a plain features file)."""
    value = getattr(source, "attrs", {}).get("split")
    return None if value is None else str(value)


def is_held_out(source: Any) -> bool:
    split = split_of(source)
    return split is not None and split != TRAIN


@contextmanager
def held_out_pairs(sources: Sequence[Any], notes: list[str]) -> Iterator[dict[int, Any]]:
    """``{id(held-out source): its training source}``; training caches opened from a
    ``reference_cache`` attribute are closed on exit.  A held-out source without one gets a
    note and is measured on its own class means."""
    by_sha = {
        (s.attrs.get("checkpoint_sha256"), s.num_classes): s
        for s in sources
        if split_of(s) == TRAIN and s.attrs.get("checkpoint_sha256")
    }
    pairs: dict[int, Any] = {}
    opened: list[Any] = []
    try:
        for s in sources:
            if not is_held_out(s):
                continue
            ref = by_sha.get((s.attrs.get("checkpoint_sha256"), s.num_classes))
            if ref is None and s.attrs.get("reference_cache"):
                ref = _open_reference(s, notes)
                if ref is not None:
                    opened.append(ref)
            if ref is None:
                notes.append(
                    f"{s.label}: split {split_of(s)!r} has no training cache of the same "
                    "checkpoint among the inputs: nc4 and ncc_acc use its own class means; "
                    "pass the training cache too"
                )
                continue
            pairs[id(s)] = ref
        yield pairs
    finally:
        for r in opened:
            r.close()


def _open_reference(source: Any, notes: list[str]) -> Any | None:
    """The training cache a held-out cache names, if it is there and of the same checkpoint.

    The attribute is a file name in the same folder or in the folder above (``../ep5.h5``,
    what ``extract --eval-data`` writes); any other path is not followed."""
    named = str(source.attrs["reference_cache"])
    up = named.startswith("../")
    name = named[3:] if up else named
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        notes.append(f"{source.label}: ignores its reference_cache {named!r} (not a file name)")
        return None
    here = Path(source.path).parent
    path = (here.parent if up else here) / name
    if not path.is_file():
        notes.append(f"{source.label}: its training cache {named} is not there")
        return None
    ref = open_sources([path])[0]
    same = ref.attrs.get("checkpoint_sha256") == source.attrs.get("checkpoint_sha256")
    if not same or split_of(ref) != TRAIN or ref.num_classes != source.num_classes:
        notes.append(
            f"{source.label}: {named} is not the training cache of the same checkpoint; "
            "nc4 and ncc_acc use its own class means"
        )
        ref.close()
        return None
    notes.append(
        f"{source.label}: split {split_of(source)!r} measured against the training class "
        f"means of {named}"
    )
    return ref


def joint_selection(counts: Any, train_counts: Any, min_count: int) -> ClassSelection:
    """The held-out split's measured classes: at least ``min_count`` held-out samples and
    at least one training sample."""
    n = np.asarray(counts, dtype=np.int64).reshape(-1)
    t = np.asarray(train_counts, dtype=np.int64).reshape(-1)
    enough = n >= max(int(min_count), 1)
    kept = np.flatnonzero(enough & (t > 0))
    unseen = int(np.count_nonzero(enough & (t == 0)))
    return ClassSelection(kept, n, int(min_count), unseen_in_training=unseen)


def around_reference(held: ClassStats, train: ClassStats, kept: np.ndarray) -> ClassStats:
    """The held-out statistics about the training class means ``μ_k^tr`` of ``kept``.

    With ``δ_k = μ_k − μ_k^tr`` (``μ_k`` the held-out class mean), each class's scatter
    about ``μ_k^tr`` is its scatter about ``μ_k`` plus ``n_k δ_k δ_kᵀ`` (the parallel-axis
    rule), so ``S_W^tr = S_W + Σ_k n_k δ_k δ_kᵀ`` and ``SS_k^tr = SS_k + n_k ||δ_k||²``;
    the means are the training means and the counts the held-out ones.  ``held`` is
    already restricted to ``kept`` (labels ``0..K'-1``), ``train`` is not."""
    mu_tr = np.asarray(train.means, dtype=np.float64)[kept]
    n = np.asarray(held.counts, dtype=np.float64)
    delta = np.asarray(held.means, dtype=np.float64) - mu_tr
    scaled = delta * np.sqrt(n)[:, None]
    arrays = {
        "counts": np.asarray(held.counts, dtype=np.int64),
        "means": mu_tr,
        "scatter": np.asarray(held.scatter) + scaled.T @ scaled,
        "class_ss": np.asarray(held.class_ss) + n * np.sum(delta * delta, axis=1),
    }
    return ClassStats.from_state_dict(
        arrays, held.num_classes, held.dim, source=f"{held.source} (about the training means)"
    )
