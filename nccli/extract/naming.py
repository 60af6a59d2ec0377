"""Cache names of checkpoint files: ``<-o>/<stem>.h5``, one rule for vision checkpoints
(:mod:`nccli.extract.api`) and language-model weight files (:mod:`nccli.extract.language`).
Only the file's own name and its folder's name are used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nccli.errors import UsageError
from nccli.io.names import epoch_step_from_name

__all__ = ["GENERIC_NAMES", "cache_path"]


#: file names that say nothing about the checkpoint (Hugging Face Trainer folders): the
#: cache is always named after the folder too, ``checkpoint-500_pytorch_model.h5``
GENERIC_NAMES = frozenset({"pytorch_model.bin", "model.safetensors"})


def _stem(p: Path) -> str:
    return p.name[: -len(p.suffix)] if p.suffix else p.name


def cache_path(out: Path, ckpt: Path, others: Sequence[Path] = ()) -> Path:
    """``<out>/<checkpoint stem>.h5``, or ``<out>/<folder>_<stem>.h5`` when the folder's name
    carries the epoch or step and the file's does not (``ep20/ckpt.pth`` → ``ep20_ckpt.h5``,
    whether or not its siblings are extracted with it), when another of ``others`` (the
    checkpoints extracted together) has the same stem in another folder, or when the file
    name is a generic one (:data:`GENERIC_NAMES`).  Only the file's own name and its folder's name
    are used (never a path or a name stored inside the checkpoint or the dataset), so a cache
    cannot land outside ``out``."""
    stem = _stem(ckpt)
    if not stem or "/" in stem or os.sep in stem:  # a file name never is, but be explicit
        raise UsageError(f"{ckpt}: cannot name a cache after this file; rename the checkpoint")
    folder_says = epoch_step_from_name(ckpt.name) == (None, None) and epoch_step_from_name(
        ckpt.resolve().parent.name
    ) != (None, None)
    clash = (
        folder_says
        or ckpt.name in GENERIC_NAMES
        or any(_stem(o) == stem and o.parent.resolve() != ckpt.parent.resolve() for o in others)
    )
    folder = ckpt.resolve().parent.name if clash else ""
    if folder and folder not in (".", "..") and "/" not in folder and os.sep not in folder:
        stem = f"{folder}_{stem}"
    return out / f"{stem}.h5"  # '..pt' gives the file '..h5', still inside out
