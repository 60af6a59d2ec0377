"""Batches as numpy arrays or torch tensors: conversion and validation, torch-free.

torch is imported only when a tensor is converted to one (``as_tensor``) or arrives; a
numpy batch is checked with numpy alone (:func:`check_batch`).  :mod:`nccli.stats`
re-exports these.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from nccli.errors import DataError

ArrayLike = Any  # numpy array or torch tensor

__all__ = ["as_array", "as_tensor", "check_batch", "import_torch", "is_tensor"]


def import_torch() -> Any:
    """torch, imported on first need (a tensor, a device, a collective)."""
    import torch

    return torch


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch when nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_tensor(x: ArrayLike, device: Any = "cpu") -> Any:
    """A tensor view (or copy) of ``x`` on ``device`` (imports torch).  numpy input is made
    contiguous in native byte order first: torch refuses big-endian data (an HDF5 file
    written as ``>f4``) and negative strides (``h[::-1]``)."""
    torch = import_torch()
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    return torch.as_tensor(as_array(x), device=device)


def as_array(x: ArrayLike) -> np.ndarray:
    """A numpy view (or copy) of ``x``: native byte order, contiguous; a torch tensor is
    copied to the host (half precisions widened to float64, which numpy lacks)."""
    if is_tensor(x):
        x = x.detach()
        if x.is_floating_point() and x.dtype not in (
            import_torch().float32,
            import_torch().float64,
        ):
            x = x.double()
        return x.cpu().numpy()
    a = np.asarray(x)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _is_float(a: Any) -> bool:
    return bool(a.dtype.is_floating_point) if is_tensor(a) else a.dtype.kind == "f"


def _all_finite(h: Any) -> bool:
    """``isfinite(h).all()``; through numpy on the CPU, where it is several times faster."""
    if not is_tensor(h):
        return bool(np.isfinite(h).all())
    torch = import_torch()
    if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(h.numpy()).all())
    return bool(torch.isfinite(h).all())


def _bad_rows(h: Any) -> int:
    if is_tensor(h):
        return int((~import_torch().isfinite(h)).any(dim=1).sum().item())
    return int((~np.isfinite(h)).any(axis=1).sum())


def check_batch(
    h: Any, y: Any, num_classes: int, dim: int, src: str = "features"
) -> tuple[Any, Any]:
    """Validate a batch (numpy arrays or torch tensors, both of one kind): 2-D features of
    width ``dim``, integer labels in ``0..K-1`` of the same length, finite values.  Returns
    ``(features, int64 labels)`` of the same kind; raises DataError."""
    if h.ndim == 1 and dim == 1:
        h = h[:, None]
    if h.ndim > 2:
        h = h.reshape(h.shape[0], -1)
    if h.ndim != 2:
        raise DataError(f"{src}: features must be a 2-D array (N, d), got shape {tuple(h.shape)}")
    if h.shape[1] != dim:
        raise DataError(
            f"{src}: features have dimension {h.shape[1]} but the statistics expect {dim}"
        )
    y = y.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise DataError(
            f"{src}: {h.shape[0]} feature rows but {y.shape[0]} labels; they must match"
        )
    tensor = is_tensor(y)
    if _is_float(y) and not bool((y == y.round()).all()):
        raise DataError(f"{src}: labels are fractional floats; class labels must be integers")
    y = y.to(import_torch().int64) if tensor else y.astype(np.int64, copy=False)
    if y.shape[0]:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{src}: labels must lie in 0..{num_classes - 1}, found {lo}..{hi}; "
                "pass the right number of classes"
            )
    if not _is_float(h):
        h = h.to(import_torch().float64) if is_tensor(h) else h.astype(np.float64)
    if h.shape[0] * h.shape[1] and not _all_finite(h):
        raise DataError(
            f"{src}: {_bad_rows(h)} feature rows contain NaN or Inf; fix the model/inputs "
            "or drop those samples (--skip-nonfinite)"
        )
    return h, y
