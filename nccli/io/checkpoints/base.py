"""The contract between :func:`~nccli.io.checkpoints.load_model` and the format readers.

A :class:`CheckpointFormat` pairs a detector, which looks only at a :class:`Probe` of the
file's first bytes and zip member names, with a reader, which returns the file's
:class:`Contents` (the weights, the whole module, or both, with what else it stored).
Also the error and text helpers every reader shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nccli.errors import CheckpointError
from nccli.io._util import one_line

__all__ = ["MAX_COUNT", "CheckpointFormat", "Contents", "Probe", "as_int", "corrupt", "names"]


@dataclass(frozen=True)
class Probe:
    """What detection may look at: ``head`` is the first 9 bytes; ``members`` the zip
    member names below the archive's top folder (``None`` when the file is not a zip) and
    ``archive_format`` the stripped bytes of its ``archive_format`` member, if any."""

    path: Path
    size: int
    head: bytes
    members: frozenset[str] | None
    archive_format: bytes | None


@dataclass
class Contents:
    """What a reader found: ``format`` as reported in the result, the weights (``state``)
    and/or the whole module, and any epoch/step/metadata stored inside the file.

    A checkpoint dict also keeps the whole dict (``tree``) and the dotted keys of the
    state dicts found in it (``candidates``; ``""`` is the dict itself), for
    :func:`~nccli.io.checkpoints.pickled.select_state` (``--state-key``)."""

    format: str
    state: Mapping[str, Any] | None = None
    whole: nn.Module | None = None
    meta: dict[str, str] = field(default_factory=dict)
    epoch: int | None = None
    step: int | None = None
    tree: Mapping[Any, Any] | None = None
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format: ``detect(probe)`` says whether the file is one (it may raise
    a ``CheckpointError`` for a file that is one but is damaged); ``read(path,
    trust_checkpoint, map_location)`` loads it, never unpickling untrusted code."""

    name: str
    detect: Callable[[Probe], bool]
    read: Callable[[Path, bool, Any], Contents]


def corrupt(p: Path, what: str, exc: BaseException | str) -> CheckpointError:
    return CheckpointError(
        f"{p}: {what} is truncated or corrupt ({one_line(exc)}); re-save or re-copy the checkpoint"
    )


def names(items: Iterable[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 7 more``."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


#: the largest epoch/step a cache can record (an HDF5 int64 attribute)
MAX_COUNT = 2**63 - 1


def as_int(value: Any) -> int | None:
    """An epoch/step number from an int, whole float, 0-d tensor or ASCII digit string;
    ``None`` for anything that cannot be one: negative, beyond int64 (``1e300``, a
    100-digit string), a non-ASCII digit (``"²"``), a bool or a non-number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if not (value.is_integer() and 0 <= value <= MAX_COUNT):
            return None
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            return None
        value = int(text)
    if isinstance(value, int) and 0 <= value <= MAX_COUNT:
        return value
    return None
