"""Putting a checkpoint's weights into the architecture named by ``--arch`` or ``--model``.

The target is built from the zoo or a user factory; wrapper prefixes (DataParallel/DDP,
Lightning, ``torch.compile``) are stripped when that fits the model better, and any
missing, unexpected or mis-shaped key is reported by name before loading strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

import nccli.zoo as zoo
from nccli.errors import CheckpointError, UsageError
from nccli.io._util import import_object, one_line
from nccli.io.checkpoints.base import names

__all__ = ["STRIP_PREFIXES", "build_target", "load_into", "strip_prefixes"]

#: Prefixes added by DataParallel/DDP, Lightning-style wrappers and ``torch.compile``.
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


def strip_prefixes(state: Mapping[str, Any], expected: set[str]) -> Mapping[str, Any]:
    """Strip ``module.``/``model.``/``_orig_mod.`` while every key has one; keep the best fit.

    Each stripping step yields a candidate; the one sharing most keys with the model wins
    (ties go to the least stripped), so a model whose own attribute is ``model`` still loads.
    """
    candidates = [state]
    current = state
    while current:
        prefix = next(
            (pre for pre in STRIP_PREFIXES if all(k.startswith(pre) for k in current)), None
        )
        if prefix is None:
            break
        current = {k[len(prefix) :]: v for k, v in current.items()}
        candidates.append(current)
    return max(candidates, key=lambda c: len(expected.intersection(c)))


def load_into(target: nn.Module, state: Mapping[str, Any], p: Path, label: str) -> None:
    expected = target.state_dict()
    state = strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (checkpoint vs model): {names(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{p}: weights do not fit {label}: {'; '.join(problems)}; check that --arch/--model "
            "matches the training run"
        )
    try:
        target.load_state_dict(dict(state), strict=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: weights do not fit {label}: {one_line(exc)}") from exc


def build_target(p: Path, arch: str | None, model: str | None) -> tuple[nn.Module, str]:
    if arch is not None:
        module = zoo.build(arch)
        return module, str(getattr(module, "nccli_arch", arch))
    assert model is not None
    factory = import_object(model, flag="--model")
    if isinstance(factory, nn.Module):
        return factory, model
    if not callable(factory):
        raise UsageError(f"--model {model!r}: is not callable; point it at a factory function")
    try:
        module = factory()
    except Exception as exc:
        raise UsageError(
            f"--model {model!r}: calling the factory failed with {type(exc).__name__}: "
            f"{one_line(exc)}; run with --debug for the traceback"
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"--model {model!r}: the factory returned a {type(module).__name__}, not an nn.Module"
        )
    return module, model
