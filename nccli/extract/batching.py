"""Pooled statistics updates for a language model's pass (:mod:`nccli.extract.language`).

An update of :class:`~nccli.stats.ClassStats` costs ``B·d²`` for its rows plus ``K_b·d²``
for the cross term of the ``K_b`` classes (tokens) it holds.  Tokens repeat across
forwards (a vocabulary is Zipf-distributed), so pooling the rows of several forwards into
one update merges each repeated token once instead of once per forward.
"""

from __future__ import annotations

import torch

from nccli.stats import ClassStats

__all__ = ["MAX_UPDATE_ROWS", "Batched", "update_rows"]

#: the most rows pooled into one statistics update (:func:`update_rows`)
MAX_UPDATE_ROWS = 16384


def update_rows(vocab: int, batch_size: int, T: int) -> int:
    """Rows per statistics update: the rows of several forwards are pooled (module
    docstring) — up to K/2, at most :data:`MAX_UPDATE_ROWS`, at least one forward's."""
    forward = max(1, batch_size // (T - 1)) * (T - 1)
    return max(forward, min(vocab // 2, MAX_UPDATE_ROWS))


class Batched:
    """Per-layer statistics updated once per :func:`update_rows` rows (the same float64
    statistics as one update per forward, up to rounding: both are exact merges)."""

    def __init__(self, stats: dict[str, ClassStats], rows: int) -> None:
        self.stats, self.rows = stats, rows
        self._h: dict[str, list[torch.Tensor]] = {k: [] for k in stats}
        self._y: list[torch.Tensor] = []
        self._n = 0

    def add(self, feats: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        for k, v in feats.items():
            self._h[k].append(v)
        self._y.append(y)
        self._n += int(y.shape[0])
        if self._n >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if self._n:
            y = torch.cat(self._y)
            for k, parts in self._h.items():
                self.stats[k].update(torch.cat(parts), y)
                parts.clear()
        self._y.clear()
        self._n = 0

    def finish(self) -> dict[str, ClassStats]:
        self._flush()
        return self.stats
