"""What the tracker needs around a live model: loader items, devices, the model's state.

Loader items (:func:`split_batch`): a tuple or list ``(x, y, ...)`` (the first item is the
model's input, the second the labels, anything after is ignored), or a mapping with the
labels under ``labels``, ``label``, ``y``, ``target`` or ``targets`` and the input under
``x``, ``input``, ``inputs``, ``image``, ``images`` or ``pixel_values`` (called as
``model(x)``).  Anything else is refused; ``Tracker(unpack=fn)`` takes
``fn(item) -> (x, y)`` for other layouts.  The input is one tensor, batch first.

:func:`preserved` records every module's ``training`` flag, every parameter's
``requires_grad`` and the grad mode, and puts them back however the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from nccli.errors import DataError, UsageError

__all__ = ["LABEL_KEYS", "INPUT_KEYS", "model_device", "preserved", "split_batch", "to_device"]

LABEL_KEYS = ("labels", "label", "y", "target", "targets")
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")


def split_batch(item: Any, unpack: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """``(x, y)`` of one loader item (the contract is in the module docstring)."""
    if unpack is not None:
        got = unpack(item)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise UsageError(f"unpack must return (inputs, labels), got {type(got).__name__}")
        return got[0], got[1]
    if isinstance(item, Mapping):
        keys = [k for k in LABEL_KEYS if k in item]
        if len(keys) != 1:
            raise DataError(
                f"a loader item is a mapping with keys {sorted(map(str, item))}; the tracker "
                f"needs exactly one label entry ({', '.join(LABEL_KEYS)}); pass "
                "Tracker(unpack=fn) with fn(item) -> (inputs, labels)"
            )
        inputs = [k for k in INPUT_KEYS if k in item]
        if len(inputs) > 1:
            raise DataError(
                f"a loader item has several inputs ({', '.join(inputs)}); pass Tracker(unpack=fn)"
            )
        if not inputs:
            raise DataError(
                f"a loader item is a mapping with keys {sorted(map(str, item))} but no input "
                f"entry ({', '.join(INPUT_KEYS)}); pass Tracker(unpack=fn) with "
                "fn(item) -> (inputs, labels)"
            )
        return item[inputs[0]], item[keys[0]]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise DataError(
        f"a loader item is a {type(item).__name__}; the tracker reads (inputs, labels) tuples "
        "or lists, or dicts with a 'labels'/'label'/'y'/'target' entry; pass "
        "Tracker(unpack=fn) with fn(item) -> (inputs, labels)"
    )


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors inside ``x`` (nested tuples, lists, dicts) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def batch_size(x: Any) -> int | None:
    """The leading dimension of the first tensor in ``x``."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim else None
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        n = batch_size(v)
        if n is not None:
            return n
    return None


def head_rows(x: Any, n: int) -> Any:
    """The first ``n`` samples of ``x`` (the probe batch)."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, Mapping):
        return {k: head_rows(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(head_rows(v, n) for v in x)
    return x


def labels_tensor(y: Any, n: int | None, device: torch.device) -> torch.Tensor:
    """Labels as an int64 vector on ``device``; refused unless integers, one per sample."""
    t = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if t.dtype.is_floating_point:
        if not bool(torch.all(t == torch.round(t))):
            raise DataError("labels are fractional floats; class labels must be integers")
    elif t.dtype == torch.bool or t.dtype.is_complex:
        raise DataError(f"labels have dtype {t.dtype}; class labels must be integers")
    t = t.reshape(-1) if t.ndim == 2 and t.shape[1] == 1 else t
    if t.ndim != 1 or (n is not None and t.shape[0] != n):
        raise DataError(
            f"labels have shape {tuple(t.shape)}, expected ({n},): one class index per sample "
            "(one-hot or soft labels are not class labels)"
        )
    return t.to(device=device, dtype=torch.int64)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; CPU for a model without any."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (hooks and names
    are those of the wrapped model; an extra forward of the wrapper would run its
    collectives)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Put back every module's ``training``, every parameter's ``requires_grad`` and the
    grad mode when the block ends, however it ends."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    grad_mode = torch.is_grad_enabled()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, req in grads:
            if p.requires_grad != req:
                p.requires_grad_(req)
        torch.set_grad_enabled(grad_mode)


def eval_mode(model: nn.Module) -> None:
    """``model.eval()`` (graphs from ``torch.export`` refuse switching: left as they are)."""
    with contextlib.suppress(NotImplementedError):
        model.eval()
