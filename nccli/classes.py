"""Which classes a measurement uses (docs/metrics.md, "Classes that are absent or rare").

``K`` in every formula is the number of classes *measured*: those with at least
``max(1, --min-class-count)`` samples.  A source's classes are fixed by its classifier or
``--num-classes``, so a vocabulary, a subset of ImageNet or a deliberately held-out class
leaves classes without samples; a class mean of nothing is undefined, and keeping it
would make every class-based metric ``nan``.  The classes outside the measured set are
left out of every metric — their statistics, their classifier rows, and their samples in
the second pass (NC4, accuracy) — and one note says how many.

:func:`select_classes` decides the set from the counts; :class:`MeasuredView` is a layer
view restricted to it, relabelled ``0..K'-1`` in label order (``classes`` maps back to
the source's labels for per-class output).  Leaving out classes with no samples is exact
on stored statistics (``S_W``, ``N`` and ``μ_G`` do not change); leaving out classes
that have samples (``--min-class-count``) removes their samples from ``S_W``, ``N`` and
``μ_G`` too, which takes one streaming pass over the layer's features.

Weight-only metrics (balancedness, conditioning of the head's matrices) describe the
network, not the classes, and use the whole classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from nccli.errors import DataError, UsageError
from nccli.stats import ClassStats

__all__ = ["ClassSelection", "MeasuredView", "class_labels", "select_classes"]

_SHOWN = 5  # class labels a note lists before "..."


@dataclass(frozen=True)
class ClassSelection:
    """The measured classes of a source: ``kept`` (labels, increasing) out of ``total``,
    chosen from the per-class ``counts`` with at least ``min_count`` samples each."""

    kept: np.ndarray
    counts: np.ndarray
    min_count: int
    #: held-out splits (nccli.heldout): classes left out because the training split has
    #: no sample of them, though this split does
    unseen_in_training: int = 0

    @property
    def total(self) -> int:
        return int(self.counts.size)

    @property
    def complete(self) -> bool:
        """Every class is measured (nothing to restrict)."""
        return int(self.kept.size) == self.total

    @property
    def left_out(self) -> np.ndarray:
        mask = np.ones(self.total, dtype=bool)
        mask[self.kept] = False
        return np.flatnonzero(mask)

    @property
    def empty(self) -> int:
        """Classes left out because they have no samples."""
        return int(np.count_nonzero(self.counts[self.left_out] == 0))

    @property
    def rare(self) -> int:
        """Classes left out because they have fewer than ``min_count`` samples."""
        return int(self.left_out.size) - self.empty - self.unseen_in_training

    @property
    def drops_samples(self) -> bool:
        """Some class left out has samples (the statistics must be rebuilt without them)."""
        return self.rare + self.unseen_in_training > 0

    def lookup(self) -> np.ndarray:
        """New label of every source label (``-1`` for a class left out)."""
        lut = np.full(self.total, -1, dtype=np.int64)
        lut[self.kept] = np.arange(self.kept.size, dtype=np.int64)
        return lut

    def note(self, label: str) -> str | None:
        """The one note that says what was left out (None when every class is measured)."""
        if self.complete:
            return None
        gone = self.left_out
        shown = ", ".join(str(int(k)) for k in gone[:_SHOWN]) + (
            ", ..." if gone.size > _SHOWN else ""
        )
        why = []
        if self.empty:
            why.append(f"{self.empty} without samples")
        if self.rare:
            why.append(f"{self.rare} with fewer than --min-class-count={self.min_count} samples")
        if self.unseen_in_training:
            why.append(f"{self.unseen_in_training} without samples in the training split")
        which = "class" if gone.size == 1 else "classes"
        return (
            f"{label}: {gone.size} of {self.total} classes left out, {which} {shown} "
            f"({' and '.join(why)}); every metric uses the other {self.kept.size} classes"
        )


def select_classes(counts: Any, min_count: int = 1) -> ClassSelection:
    """The classes with at least ``max(1, min_count)`` samples."""
    if int(min_count) < 1:
        raise UsageError(f"--min-class-count must be at least 1, got {min_count}")
    n = np.asarray(counts, dtype=np.int64).reshape(-1)
    return ClassSelection(np.flatnonzero(n >= int(min_count)), n, int(min_count))


def class_labels(view: Any, num_classes: int) -> np.ndarray:
    """The source labels of a view's classes ``0..K-1`` (the identity when unrestricted)."""
    classes = getattr(view, "classes", None)
    return np.arange(num_classes) if classes is None else np.asarray(classes)


class MeasuredView:
    """A layer view (``nccli.io.sources.LayerView``) restricted to the measured classes.

    Statistics, the classifier acting on the layer and the feature batches cover only the
    ``selection.kept`` classes, relabelled ``0..K'-1``; everything else (name, depth, the
    layer's own module weight, the source) is the wrapped view's.
    """

    def __init__(self, view: Any, selection: ClassSelection) -> None:
        self._view = view
        self.selection = selection
        self._stats: dict[bool, ClassStats] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)

    @property
    def classes(self) -> np.ndarray:
        return self.selection.kept

    @property
    def classifier_weight(self) -> np.ndarray | None:
        W = self._view.classifier_weight
        return None if W is None else np.asarray(W)[self.selection.kept]

    @property
    def classifier_bias(self) -> np.ndarray | None:
        b = self._view.classifier_bias
        return None if b is None else np.asarray(b).reshape(-1)[self.selection.kept]

    def stats(self, recompute: bool = False, chunk_rows: int = 8192) -> ClassStats:
        """The statistics of the measured classes (made once per ``recompute`` setting)."""
        if recompute not in self._stats:
            full = self._view.stats(recompute=recompute, chunk_rows=chunk_rows)
            if self.selection.drops_samples:
                self._stats[recompute] = self._stream(full, chunk_rows)
            else:
                self._stats[recompute] = _without_empty(full, self.selection)
        return self._stats[recompute]

    def _stream(self, full: ClassStats, chunk_rows: int) -> ClassStats:
        st = ClassStats(int(self.selection.kept.size), full.dim, source=full.source)
        try:
            for h, y in self.batches(chunk_rows):
                st.update(h, y)
        except (DataError, OSError, KeyError, ValueError) as exc:
            raise DataError(
                f"{full.source}: leaving out classes that have samples needs the layer's "
                f"features ({exc}); measure a cache that stores features, or lower "
                "--min-class-count"
            ) from None
        return st

    def batches(self, chunk_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The wrapped view's ``(features, labels)`` chunks, rows of left-out classes
        dropped and labels renumbered."""
        lut = self.selection.lookup()
        for h, y in self._view.batches(chunk_rows):
            y = np.asarray(y).reshape(-1).astype(np.int64, copy=False)
            if y.size and (y.min() < 0 or y.max() >= lut.size):
                raise DataError(
                    f"{self._view.source.path}:{self._view.name}: labels must lie in "
                    f"0..{lut.size - 1}, found {int(y.min())}..{int(y.max())}"
                )
            new = lut[y]
            keep = new >= 0
            if keep.all():
                yield h, new
            elif keep.any():
                yield np.asarray(h)[keep], new[keep]


def _without_empty(full: ClassStats, sel: ClassSelection) -> ClassStats:
    """``full`` without its empty classes: exact, since they add nothing to ``S_W``, ``N``
    or ``μ_G``."""
    arrays = full.state_dict()
    k = sel.kept
    sub = {
        "counts": arrays["counts"][k],
        "means": arrays["means"][k],
        "scatter": arrays["scatter"],
        "class_ss": arrays["class_ss"][k],
    }
    return ClassStats.from_state_dict(sub, int(k.size), full.dim, source=full.source)
