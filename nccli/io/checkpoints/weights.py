"""Putting a checkpoint's weights into the architecture named by ``--arch`` or ``--model``.

The target is built from the zoo or a user callable (``pkg.module:callable`` or
``path/to/file.py:callable``, optionally ``:key=value,...`` arguments read like
``--arch`` values); a required ``num_classes`` or input size the spec leaves out is read
from the checkpoint's weights (:func:`infer_args`, one note each).  Wrapper prefixes
(DataParallel/DDP, Lightning, ``torch.compile``) are stripped when that fits the model
better, a model's ``nccli_adapt_state`` renames keys to its layout, and any missing,
unexpected or mis-shaped key is reported by name before loading strictly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

import nccli.zoo as zoo
from nccli.errors import CheckpointError, UsageError
from nccli.io._util import import_object, one_line, split_model_spec
from nccli.io.checkpoints.base import names

__all__ = [
    "INPUT_PARAMS",
    "STRIP_PREFIXES",
    "build_target",
    "infer_args",
    "load_into",
    "parse_model_args",
    "strip_prefixes",
]

#: Prefixes added by DataParallel/DDP, Lightning-style wrappers and ``torch.compile``.
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")
#: parameter names taken for the input size (channels or features), inferred from the
#: first weight of the checkpoint when a callable requires one
INPUT_PARAMS = ("in_channels", "in_dim", "input_dim", "in_features", "num_channels")


def _stripped(state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``state``, then each step of stripping a prefix every key has."""
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
    return candidates


def strip_prefixes(state: Mapping[str, Any], expected: set[str]) -> Mapping[str, Any]:
    """Strip ``module.``/``model.``/``_orig_mod.`` while every key has one; keep the best fit.

    Each stripping step yields a candidate; the one sharing most keys with the model wins
    (ties go to the least stripped), so a model whose own attribute is ``model`` still loads.
    """
    return max(_stripped(state), key=lambda c: len(expected.intersection(c)))


def load_into(target: nn.Module, state: Mapping[str, Any], p: Path, label: str) -> None:
    expected = target.state_dict()
    state = strip_prefixes(state, set(expected))
    adapt = getattr(target, "nccli_adapt_state", None)
    if callable(adapt):  # a zoo model renames a known checkpoint layout's keys to its own
        try:
            state = adapt(state)
        except Exception as exc:
            raise CheckpointError(
                f"{p}: {label} could not adapt the checkpoint's keys ({type(exc).__name__}: "
                f"{one_line(exc)})"
            ) from exc

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


def build_target(
    p: Path, arch: str | None, model: str | None, state: Mapping[str, Any] | None = None
) -> tuple[nn.Module, str, list[str]]:
    """The module ``arch`` or ``model`` names, its label (the spec to replay, with any
    inferred argument) and the notes saying what was inferred from ``state``."""
    if arch is not None:
        name, kwargs = zoo.parse_arch(arch)
        factory = getattr(zoo, "_REGISTRY", {}).get(name)  # the zoo's factory, for inference
        kwargs, notes = infer_args(factory, kwargs, state, p) if factory else (kwargs, [])
        module = zoo.build(name, **kwargs)
        return module, str(getattr(module, "nccli_arch", arch)), notes
    assert model is not None
    target, attr, args_text = split_model_spec(model, flag="--model")
    kwargs = parse_model_args(model, args_text)
    factory = import_object(f"{target}:{attr}", flag="--model", shown=model)
    if isinstance(factory, nn.Module):
        if kwargs:
            raise UsageError(
                f"--model {model!r}: {attr} is a module, not a callable taking arguments"
            )
        return factory, f"{target}:{attr}", []
    if not callable(factory):
        raise UsageError(
            f"--model {model!r}: {attr} is not callable; point it at a class or function"
        )
    kwargs, notes = infer_args(factory, kwargs, state, p)
    module = _call(model, attr, factory, kwargs)
    return module, _label(target, attr, kwargs, args_text), notes


def _call(model: str, attr: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    """``factory(**kwargs)``, each way it can fail one line naming ``model``."""
    sig = _signature(factory)
    accepted = (
        f"{attr} takes {', '.join(map(str, sig.parameters.values())) or 'no arguments'}"
        if sig is not None
        else ""
    )
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            raise UsageError(
                f"--model {model!r}: {one_line(exc)}; {accepted} (give them as "
                f"{attr}:key=value,...)"
            ) from None
    try:
        module = factory(**kwargs)
    except Exception as exc:
        hint = f"; {accepted}" if isinstance(exc, TypeError) and accepted else ""
        raise UsageError(
            f"--model {model!r}: calling {attr} failed with {type(exc).__name__}: "
            f"{one_line(exc)}{hint}; run with --debug for the traceback"
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"--model {model!r}: {attr} returned a {type(module).__name__}, not an nn.Module"
        )
    return module


def parse_model_args(model: str, text: str | None) -> dict[str, Any]:
    """``key=value,...`` after a ``--model`` callable, values read as ``--arch`` reads them
    (:func:`nccli.zoo.parse_arch`: ints, floats, bools, ``none``, ``-``-separated lists)."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(f"--model {model!r}: cannot read {item!r}; write key=value,...")
        if key in kwargs:
            raise UsageError(f"--model {model!r}: {key!r} is given twice")
        try:
            kwargs[key] = zoo.parse_arch(f"m:{key}={value}")[1][key]
        except UsageError as exc:
            raise UsageError(f"--model {model!r}: {str(exc).removeprefix('zoo: ')}") from None
    return kwargs


def _label(target: str, attr: str, kwargs: dict[str, Any], args_text: str | None) -> str:
    """``target:callable[:key=value,...]`` with the arguments as ``--arch`` writes them."""
    try:
        return zoo.format_arch(f"{target}:{attr}", kwargs)
    except UsageError:  # a string value the arch syntax cannot record: keep what was given
        return f"{target}:{attr}:{args_text}" if args_text else f"{target}:{attr}"


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def infer_args(
    factory: Callable[..., Any],
    kwargs: dict[str, Any],
    state: Mapping[str, Any] | None,
    p: Path,
) -> tuple[dict[str, Any], list[str]]:
    """``kwargs`` plus ``num_classes`` and the input size (:data:`INPUT_PARAMS`) when
    ``factory`` requires them (no default) and they are not given, read from ``state``:
    ``num_classes`` is the first dimension of the last weight (a key ending in ``weight``,
    two or more dimensions: the classifier), the input size the second dimension of the
    first one.  One note per inferred value; nothing without such a weight (the call then
    says what is missing)."""
    sig = _signature(factory)
    if sig is None or not state:
        return kwargs, []
    required = [
        n
        for n, prm in sig.parameters.items()
        if prm.default is prm.empty
        and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
        and n not in kwargs
    ]
    weights = [
        (k, tuple(int(s) for s in v.shape))
        for k, v in _stripped(state)[-1].items()
        if k.endswith("weight") and len(getattr(v, "shape", ())) >= 2
    ]
    if not weights or not required:
        return kwargs, []
    out, notes = dict(kwargs), []
    wanted = [("num_classes", weights[-1], 0)] if "num_classes" in required else []
    size = next((n for n in INPUT_PARAMS if n in required), None)
    if size is not None:
        wanted.append((size, weights[0], 1))
    for param, (key, shape), dim in wanted:
        out[param] = shape[dim]
        notes.append(f"{p}: {param}={shape[dim]} inferred from {key} {shape}")
    return out, notes
