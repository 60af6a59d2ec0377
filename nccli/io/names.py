"""Epoch and step numbers in file names: one grammar for checkpoints, caches and run names.

A number counts when a keyword that is not part of a longer word precedes it, optionally
joined by ``_``, ``=`` or ``-``: ``ep010.pt``, ``epoch=9-step=1000.ckpt``,
``run1_e5.h5``, ``checkpoint-500``.  Epoch keywords: ``epoch``, ``ep``, ``e``; step
keywords: ``global_step``, ``step``, ``iteration``, ``iter``, ``it``, ``checkpoint``.
A number stored inside the checkpoint or cache always wins over its name.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["epoch_step_from_name", "strip_epoch_step"]

EPOCH_WORDS = ("epoch", "ep", "e")
STEP_WORDS = ("global_step", "step", "iteration", "iter", "it", "checkpoint")


def _number(words: tuple[str, ...]) -> re.Pattern[str]:
    alt = "|".join(sorted(words, key=len, reverse=True))  # longest first: 'epoch' before 'e'
    return re.compile(rf"(?<![a-z])(?:{alt})[_=\-]?(\d+)", re.IGNORECASE)


_EPOCH = _number(EPOCH_WORDS)
_STEP = _number(STEP_WORDS)
#: an epoch/step part with its leading separators, as removed from a run name
_PART = re.compile(
    r"(?<![a-z])[_\-.=]*(?:"
    + "|".join(sorted(EPOCH_WORDS + STEP_WORDS, key=len, reverse=True))
    + r")[_=\-]?\d+(?=$|[^0-9a-z])",
    re.IGNORECASE,
)


def epoch_step_from_name(name: str) -> tuple[int | None, int | None]:
    """``(epoch, step)`` parsed from the last component of ``name`` (``None`` when absent)."""
    stem = Path(name).name
    e = _EPOCH.search(stem)
    s = _STEP.search(stem)
    return (int(e.group(1)) if e else None, int(s.group(1)) if s else None)


def strip_epoch_step(stem: str) -> str | None:
    """``run1_ep050`` → ``run1``; ``None`` when the stem has no epoch/step part or nothing
    else (the run name then comes from elsewhere)."""
    if not _PART.search(stem):
        return None
    rest = _PART.sub("", stem).strip("_-.= ")
    return rest or None
