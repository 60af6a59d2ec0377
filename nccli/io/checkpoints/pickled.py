"""``torch.save`` files (zip with ``data.pkl``, or a legacy pickle), read weights-only.

``torch.load(weights_only=True)`` first; a file that needs more raises
:class:`~nccli.errors.UnsafeCheckpointError` naming the globals it would import, unless
``trust_checkpoint`` is set.  A loaded dict is searched for the state dict (possibly
nested under :data:`WRAPPER_KEYS` or an EMA/SWA key, at most :data:`MAX_NESTING` levels
deep: a file can nest dicts thousands deep, or in a cycle, which an unbounded search
would answer with a RecursionError); :func:`select_state` then takes the one candidate,
or the entry ``--state-key`` names, and refuses to guess between several.  The dict's
scalar entries become metadata, minus integers no metadata field can hold (``str()`` of
a 5,000-digit int raises).
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

from nccli.errors import CheckpointError, UnsafeCheckpointError, UsageError
from nccli.io.checkpoints.base import MAX_COUNT, Contents, Probe, as_int, corrupt, names

__all__ = [
    "AVERAGE_KEY",
    "MAX_NESTING",
    "WRAPPER_KEYS",
    "find_state_dict",
    "is_tensor_dict",
    "is_torch",
    "read_torch",
    "select_state",
    "state_dict_candidates",
    "unsafe_globals",
]

#: Keys under which training scripts nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
#: keys naming an average of the weights (EMA, SWA), searched too: a file holding a model
#: and its average holds two candidates, and nccli does not guess between them
AVERAGE_KEY = re.compile(r"(?:^|_)(?:ema|swa)(?:_|$)", re.IGNORECASE)
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
    found = state_dict_candidates(obj, p)
    got = Contents("state_dict", meta=meta, epoch=epoch, step=step, tree=obj)
    got.candidates = tuple(key for key, _ in found)
    if len(found) == 1:  # none, or more than one, is for select_state to answer
        _use(got, found[0][1])
    return got


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
    obj: Mapping[str, Any], p: Path | str = "checkpoint"
) -> Mapping[str, Any] | nn.Module | None:
    """The first state dict (or whole module) :func:`state_dict_candidates` finds."""
    found = state_dict_candidates(obj, p)
    return found[0][1] if found else None


def state_dict_candidates(
    obj: Mapping[Any, Any], p: Path | str = "checkpoint", trail: tuple[str, ...] = ()
) -> list[tuple[str, Mapping[str, Any] | nn.Module]]:
    """Every state dict (or whole module) in a checkpoint dict, as ``(dotted key, value)``:
    ``obj`` itself when it maps names to tensors, else what is found by following
    :data:`WRAPPER_KEYS`, then keys naming an average of the weights (:data:`AVERAGE_KEY`:
    ``ema``, ``model_ema``, ``state_dict_ema``...), recursively to :data:`MAX_NESTING`
    levels (``trail``: the keys followed so far); deeper, or a dict that contains itself,
    is refused with a ``CheckpointError`` naming ``p``.  The same object under two keys
    counts once.  An optimizer's or scheduler's state is never one (no such key is
    followed, and neither maps names to tensors)."""
    if len(trail) >= MAX_NESTING:
        raise CheckpointError(
            f"{p}: the state dict is nested more than {MAX_NESTING} dicts deep "
            f"({'/'.join(trail[:3])}/...) or in a dict that contains itself, which no "
            "training script writes; re-save model.state_dict()"
        )
    if is_tensor_dict(obj):
        return [(".".join(trail), obj)]
    keys = [k for k in WRAPPER_KEYS if k in obj]
    keys += [k for k in obj if isinstance(k, str) and k not in keys and AVERAGE_KEY.search(k)]
    found: list[tuple[str, Mapping[str, Any] | nn.Module]] = []
    for key in keys:
        value = obj[key]
        if isinstance(value, nn.Module):
            found.append((".".join((*trail, key)), value))
        elif isinstance(value, Mapping) and value:
            found += state_dict_candidates(value, p, (*trail, key))
    unique: dict[int, tuple[str, Any]] = {}
    for key, value in found:
        unique.setdefault(id(value), (key, value))
    return list(unique.values())


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty mapping of str names to tensors (a state dict)."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _use(got: Contents, value: Mapping[str, Any] | nn.Module) -> None:
    if isinstance(value, nn.Module):
        got.format, got.whole, got.state = "pickle", value, None
    else:
        got.format, got.state, got.whole = "state_dict", value, None


def select_state(p: Path, got: Contents, state_key: str | None) -> str | None:
    """Settle which weights of ``got`` are used; the dotted key they are under (``None``:
    the file's top level, or not a dict).

    With ``state_key`` that entry is used (``ema.model``: key ``model`` of entry ``ema``; a
    dotted name may also be one key, or the prefix shared by a flat dict's names).  Without
    it the automatic search must have found exactly one candidate: several (a model and
    its EMA) are refused, since which one is measured changes every number."""
    if state_key is not None:
        tree = got.tree if got.tree is not None else got.state
        if tree is None:
            raise UsageError(
                f"{p}: --state-key {state_key!r} picks an entry of a checkpoint dict, but this "
                f"{got.format} file holds a whole model; leave --state-key out"
            )
        _use(got, _follow(p, tree, state_key.strip()))
        return state_key.strip()
    if got.tree is None:
        return None
    if len(got.candidates) > 1:
        raise UsageError(
            f"{p}: holds {len(got.candidates)} sets of weights "
            f"({', '.join(repr(c) for c in got.candidates)}) and which one is measured "
            "changes every number; choose with --state-key, e.g. --state-key "
            f"{got.candidates[-1]}"
        )
    if not got.candidates:
        keys = names(str(k) for k in got.tree)
        raise CheckpointError(
            f"{p}: no state dict found (top-level keys: {keys}); expected tensors or "
            f"an entry named one of {', '.join(WRAPPER_KEYS)}, or pick one with --state-key"
        )
    return got.candidates[0] or None


def _follow(p: Path, tree: Mapping[Any, Any], key: str) -> Mapping[str, Any] | nn.Module:
    """The entry at the dotted ``key`` of ``tree`` (a ``UsageError`` listing the keys where
    it is not found)."""
    parts = key.split(".") if key else []
    if not parts or not all(parts):
        raise UsageError(f"{p}: --state-key {key!r}: write a dotted key such as 'ema.model'")
    cur: Any = tree
    i = 0
    while i < len(parts):
        where = f"entry {'.'.join(parts[:i])!r}" if i else "the checkpoint"
        if not isinstance(cur, Mapping):
            raise UsageError(
                f"{p}: --state-key {key!r}: {where} holds a value of type "
                f"{type(cur).__name__}, not a dict"
            )
        j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in cur), None)
        if j is None:
            rest = ".".join(parts[i:]) + "."
            sub = {k[len(rest) :]: v for k, v in cur.items() if str(k).startswith(rest)}
            if is_tensor_dict(sub):  # a flat dict's names under a shared prefix
                return sub
            keys = names([str(k) for k in cur], 8)
            raise UsageError(
                f"{p}: --state-key {key!r}: no key {parts[i]!r} in {where} (keys there: "
                f"{keys or 'none'})"
            )
        cur, i = cur[".".join(parts[i:j])], j
    if isinstance(cur, nn.Module) or is_tensor_dict(cur):
        return cur
    if isinstance(cur, Mapping):
        raise UsageError(
            f"{p}: --state-key {key!r} is a dict but not a state dict (keys there: "
            f"{names([str(k) for k in cur], 8) or 'none'}); point it at the tensors, e.g. "
            f"--state-key {key}.{next((str(k) for k in cur), 'model')}"
        )
    raise UsageError(
        f"{p}: --state-key {key!r} holds a value of type {type(cur).__name__}, not a state dict"
    )
