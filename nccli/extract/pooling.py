"""How a layer's output becomes one feature vector per sample (``--pool``).

==============  ==============================  ==========================================
output shape    pool                            features
==============  ==============================  ==========================================
``(B, d)``      ``none`` (always)               the output as it is
``(B,)``        ``none``                        one feature
``(B, X, Y)``   ``flatten`` only (else refused) the ``X·Y`` values: a ``(B, T, C)`` sequence
                                                needs a token choice nccli does not guess
``(B, C, *S)``  ``avg`` (default), ``max``,     global average / maximum over the ``S``
with ≥2 dims    ``flatten``                     (spatial) dims, or all ``C·∏S`` values
in ``S``
==============  ==============================  ==========================================

The reduction runs on the device inside the capture hook, before the NaN/Inf check and
the cast to the storage dtype; ``avg`` sums in float64 (float32 on MPS), so a feature map
computed in float32, or in fp16/bf16 under ``--amp``, is averaged without rounding
beyond the storage dtype's.  What was applied is the layer's
``pool`` (:class:`nccli.layers.Layer`), stored in the cache.
"""

from __future__ import annotations

import math

import torch

from nccli.choices import Pool
from nccli.errors import DataError, UsageError

__all__ = ["POOL_CHOICES", "Pool", "check_pool", "pool_features", "pooled", "shape_text"]


POOL_CHOICES = tuple(p.value for p in Pool)


def check_pool(pool: str | None) -> str:
    """The ``--pool`` value (``None``: the default, ``avg``), or a UsageError."""
    name = "avg" if pool is None else str(getattr(pool, "value", pool)).lower()
    if name not in POOL_CHOICES:
        raise UsageError(f"--pool {pool!r}: choose one of {', '.join(POOL_CHOICES)}")
    return name


def pooled(shape: tuple[int, ...], pool: str, where: str) -> tuple[str, int]:
    """``(pool applied, d)`` for an output of per-sample ``shape`` under ``--pool pool``;
    a DataError (one line naming ``where``, the shape and the choices) when the shape is
    ambiguous or empty."""
    if math.prod(shape) == 0:
        raise DataError(
            f"{where} returns an empty feature of shape (batch, {', '.join(map(str, shape))}); "
            "select another module with --layers"
        )
    if len(shape) <= 1:
        return "none", int(shape[0]) if shape else 1
    if len(shape) == 2:
        if pool == "flatten":
            return "flatten", int(math.prod(shape))
        raise DataError(
            f"{where} returns (batch, {shape[0]}, {shape[1]}): a (batch, tokens, channels) "
            "sequence or a (batch, channels, length) map, which nccli does not guess (a "
            "sequence needs a token choice, e.g. [CLS] or a mean over tokens, made in the "
            f"model); pass --pool flatten to cache all {math.prod(shape)} values, or select "
            "another module with --layers"
        )
    if pool == "flatten":
        return "flatten", int(math.prod(shape))
    return pool, int(shape[0])


def pool_features(t: torch.Tensor, pool: str) -> torch.Tensor:
    """``t`` (batch first) reduced to ``(B, d)`` by ``pool`` (see :func:`pooled`), on its
    device; ``avg`` sums in float64 (float32 on MPS, which has no float64), so the mean of
    a float32 or fp16/bf16 (``--amp``) map is correctly rounded when it is stored.  (A
    tensor with fewer dims than ``pool`` expects is only flattened: the caller's shape
    check names it.)"""
    if pool == "avg" and t.ndim >= 3:
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        return t.flatten(2).mean(-1, dtype=wide)
    if pool == "max" and t.ndim >= 3:
        return t.flatten(2).amax(-1)
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def shape_text(shape: tuple[int, ...]) -> str:
    """``64×32×32`` for a per-sample shape (messages and ``nccli info``)."""
    return "×".join(str(s) for s in shape)
