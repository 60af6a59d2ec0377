"""``torch.save`` files (zip with ``data.pkl``, or a legacy pickle), read weights-only.

``torch.load(weights_only=True)`` first; a file that needs more raises
:class:`~nccli.errors.UnsafeCheckpointError` naming the globals it would import, unless
``trust_checkpoint`` is set.  A loaded dict is searched for the state dict (possibly
nested under :data:`WRAPPER_KEYS`, at most :data:`MAX_NESTING` levels deep: a file can
nest dicts thousands deep, or in a cycle, which an unbounded search would answer with a
RecursionError); its scalar entries become metadata, minus integers no metadata field
can hold (``str()`` of a 5,000-digit int raises).
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nccli.errors import CheckpointError, UnsafeCheckpointError
from nccli.io.checkpoints.base import MAX_COUNT, Contents, Probe, as_int, corrupt, names

__all__ = [
    "MAX_NESTING",
    "WRAPPER_KEYS",
    "find_state_dict",
    "is_torch",
    "read_torch",
    "unsafe_globals",
]

#: Keys under which training scripts nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
#: how deep :func:`find_state_dict` looks (training scripts nest two or three levels)
MAX_NESTING = 32
_SCALARS = (str, int, float, bool)


def is_torch(probe: Probe) -> bool:
    if probe.members is not None:
        return "data.pkl" in probe.members
    return probe.head[:1] == b"\x80"  # pickle PROTO opcode: legacy torch.save format


def read_torch(p: Path, trust: bool, map_location: Any) -> Contents:
    obj = _torch_load(p, trust, map_location)
    if isinstance(obj, nn.Module):
        return Contents("pickle", whole=obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{p}: holds a {type(obj).__name__}, not a state dict or a model; save "
            "model.state_dict() or the model itself"
        )
    meta = _metadata(obj)
    epoch = as_int(obj.get("epoch"))
    step = as_int(obj.get("step", obj.get("global_step")))
    found = find_state_dict(obj, p)
    if found is None:
        keys = names(str(k) for k in obj)
        raise CheckpointError(
            f"{p}: no state dict found (top-level keys: {keys}); expected tensors or "
            f"an entry named one of {', '.join(WRAPPER_KEYS)}"
        )
    if isinstance(found, nn.Module):
        return Contents("pickle", whole=found, meta=meta, epoch=epoch, step=step)
    return Contents("state_dict", state=found, meta=meta, epoch=epoch, step=step)


def _torch_load(p: Path, trust: bool, map_location: Any) -> Any:
    """``torch.load`` with the weights-only unpickler; full unpickling only if trusted."""
    try:
        return torch.load(p, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        if not trust:
            unsafe = unsafe_globals(p, exc)
            if unsafe is None:
                raise corrupt(p, "pickle", exc) from exc
            raise UnsafeCheckpointError(
                f"{p}: loading needs arbitrary unpickling ({unsafe}), which can execute code; "
                "pass --trust-checkpoint only if you trust the source, or re-save it as "
                "model.state_dict() or safetensors"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise corrupt(p, "checkpoint", exc) from exc
    try:
        return torch.load(p, weights_only=False, map_location=map_location)
    except Exception as exc:
        raise corrupt(p, "checkpoint", exc) from exc


def unsafe_globals(p: Path | io.BytesIO, exc: BaseException) -> str | None:
    """Describe the globals the weights-only unpickler refused; ``None`` if it was corruption."""
    found: list[str] = []
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:
        found = []
    if isinstance(p, io.BytesIO):
        p.seek(0)
    msg = str(exc)
    found += [m for m in re.findall(r"GLOBAL ([\w.]+)", msg) if m not in found]
    if found:
        return f"it references {names(sorted(found), 3)}"
    if "Unsupported" in msg or "unsupported" in msg:
        return "it uses pickle operations the weights-only loader refuses"
    return None


def _metadata(obj: Mapping[Any, Any]) -> dict[str, str]:
    """The top-level str/int/float/bool entries under str keys, as strings; an int
    beyond int64 is left out (it is no epoch or count, and ``str()`` of a huge one raises)."""
    return {
        k: str(v)
        for k, v in obj.items()
        if isinstance(k, str)
        and isinstance(v, _SCALARS)
        and not (isinstance(v, int) and not -MAX_COUNT <= v <= MAX_COUNT)
    }


def find_state_dict(
    obj: Mapping[str, Any], p: Path | str = "checkpoint", trail: tuple[str, ...] = ()
) -> Mapping[str, Any] | nn.Module | None:
    """The state dict (or whole module) inside a checkpoint dict, searched recursively
    through :data:`WRAPPER_KEYS` to :data:`MAX_NESTING` levels (``trail``: the keys
    followed so far); deeper, or a dict that contains itself, is refused with a
    ``CheckpointError`` naming ``p``."""
    if len(trail) >= MAX_NESTING:
        raise CheckpointError(
            f"{p}: the state dict is nested more than {MAX_NESTING} dicts deep "
            f"({'/'.join(trail[:3])}/...) or in a dict that contains itself, which no "
            "training script writes; re-save model.state_dict()"
        )
    for key in WRAPPER_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            return value
        if isinstance(value, Mapping) and value:
            found = find_state_dict(value, p, (*trail, key))
            if found is not None:
                return found
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    return None
