"""Epoch and step numbers in file names: one grammar for checkpoints, caches and run names.

A number counts when a keyword that is not part of a longer word precedes it, optionally
joined by ``_``, ``=`` or ``-``: ``ep010.pt``, ``epoch=9-step=1000.ckpt``,
``run1_e5.h5``, ``model_e5.pt``, ``ckpt_5.pth``, ``ckpt5``, ``checkpoint-500``,
``step1000``.  Epoch keywords: ``epoch``, ``ep``, ``e``, ``ckpt`` (a ``ckpt_<n>`` file is
taken to be saved once per epoch; not after a dot: TensorFlow's ``model.ckpt-1000``);
step keywords: ``global_step``, ``step``, ``iteration``, ``iter``, ``it``, ``checkpoint``
(the Hugging Face Trainer's ``checkpoint-<step>/`` folders).  :func:`epoch_step_from_path` falls back to the parent
folder's name when the file's own name has neither (``ep5/ckpt.pth``,
``checkpoint-500/pytorch_model.bin``).
A number stored inside the checkpoint or cache always wins over its name.  A number
outside int64 (``ep99999999999999999999.pt``) is ignored: the epoch or step is then
unknown, as if the name had none (it would not fit the cache's integer attributes).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "MAX_NUMBER",
    "epoch_step_from_name",
    "epoch_step_from_path",
    "fill_from_name",
    "strip_epoch_step",
]

EPOCH_WORDS = ("epoch", "ckpt", "ep", "e")
STEP_WORDS = ("global_step", "step", "iteration", "iter", "it", "checkpoint")
#: the largest epoch or step a name may give (int64, what HDF5 attributes store)
MAX_NUMBER = 2**63 - 1


def _alt(words: tuple[str, ...]) -> str:
    """Keywords longest first ('epoch' before 'e'); ``ckpt`` not after a dot (TensorFlow's
    ``model.ckpt-1000`` counts steps, not epochs)."""
    return "|".join(sorted(words, key=len, reverse=True)).replace("ckpt", r"(?<!\.)ckpt")


def _number(words: tuple[str, ...]) -> re.Pattern[str]:
    alt = _alt(words)
    return re.compile(rf"(?<![a-z])(?:{alt})[_=\-]?(\d+)", re.IGNORECASE)


_EPOCH = _number(EPOCH_WORDS)
_STEP = _number(STEP_WORDS)
#: an epoch/step part with its leading separators, as removed from a run name
_PART = re.compile(
    r"(?<![a-z])[_\-.=]*(?:" + _alt(EPOCH_WORDS + STEP_WORDS) + r")[_=\-]?\d+(?=$|[^0-9a-z])",
    re.IGNORECASE,
)


def epoch_step_from_name(name: str) -> tuple[int | None, int | None]:
    """``(epoch, step)`` parsed from the last component of ``name`` (``None`` when absent)."""
    stem = Path(name).name
    return _value(_EPOCH.search(stem)), _value(_STEP.search(stem))


def epoch_step_from_path(path: str | Path) -> tuple[int | None, int | None]:
    """``(epoch, step)`` from the file name, else (when it has neither) from the name of the
    folder holding it: ``run/ep5/ckpt.pth`` → ``(5, None)``."""
    p = Path(path)
    epoch, step = epoch_step_from_name(p.name)
    if epoch is None and step is None and p.parent.name:
        epoch, step = epoch_step_from_name(p.parent.name)
    return epoch, step


def fill_from_name(
    epoch: int | None, step: int | None, name_epoch: int | None, name_step: int | None
) -> tuple[int | None, int | None]:
    """The stored ``(epoch, step)`` completed from the name's: a stored number always wins,
    and a name's epoch that is the very number stored as the step (``ckpt_0300.pt`` holding
    ``step=300``: the name counts steps) is not also taken as an epoch."""
    if epoch is None and name_step is None and step is not None and name_epoch == step:
        name_epoch = None
    return (name_epoch if epoch is None else epoch), (name_step if step is None else step)


def _value(match: re.Match[str] | None) -> int | None:
    """The matched number, or ``None`` when there is none or it exceeds int64."""
    if match is None:
        return None
    digits = match.group(1).lstrip("0") or "0"
    if len(digits) > len(str(MAX_NUMBER)):  # also keeps int() off a 5000-digit string
        return None
    number = int(digits)
    return number if number <= MAX_NUMBER else None


def strip_epoch_step(stem: str) -> str | None:
    """``run1_ep050`` → ``run1``; ``None`` when the stem has no epoch/step part or nothing
    else (the run name then comes from elsewhere)."""
    if not _PART.search(stem):
        return None
    rest = _PART.sub("", stem).strip("_-.= ")
    return rest or None
