"""The layer record: one type from layer discovery to the cache and back.

A :class:`Layer` says which module's features are cached, from which side of it, where it
sits in the deep linear head and, for a linear module, its parameters.  ``extract``'s
discovery makes them, the cache writer stores them (one ``/layers/<name>`` group each),
the cache reader returns them, and ``measure`` wraps each in a layer view.

Roles and depths (docs/metrics.md, "Deep linear heads"):

==================  ===========  ===============  ==================================
layer               features     depth            role
==================  ===========  ===============  ==================================
first head module   its input    0                ``penultimate``
next head modules   their input  1 … L-1          ``linear``
classifier          its input    L                ``classifier`` (``penultimate`` if L=0)
``--layers`` extra  its output   -1               ``other`` (no weight)
==================  ===========  ===============  ==================================

``pool`` says how the module's output became one vector per sample: ``none`` (it was one
already: head layers always), ``avg`` / ``max`` (global average / maximum over the spatial
dims of a feature map) or ``flatten`` (all values; :mod:`nccli.extract.pooling`).  A layer
named ``<module>#N`` holds the N-th call of a module that runs several times per forward
(:attr:`Layer.call`).  ``order`` is the layer's place in the forward pass among the
cached layers (0 runs first; -1 in caches written before it was recorded): readers list
layers in that order, so a depth study sees the stem before ``layer1``.

:func:`head_chain` finds the trailing chain of linear layers among records (or views
with the same attributes) and :func:`compose_classifiers` the affine map from each layer
of that chain to the logits.  This module imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CHAIN_ROLES",
    "POOLS",
    "ROLES",
    "SIDES",
    "Layer",
    "compose_classifiers",
    "head_chain",
    "show_classifier_input",
]

#: what a layer is in the network
ROLES = ("penultimate", "linear", "classifier", "other")
#: roles that can belong to the linear head
CHAIN_ROLES = ("penultimate", "linear", "classifier")
#: which side of the module was hooked
SIDES = ("input", "output")
#: how a module's output became the layer's features (``none``: used as it is)
POOLS = ("none", "avg", "max", "flatten")


@dataclass
class Layer:
    """One cached layer.

    ``name`` is the cache group name (the module path, ``model`` for the root module);
    ``weight``/``bias`` are the parameters of the layer's own module when it is linear
    (so the head layer at depth l holds ``W_{l+1}``, the module that reads its features).
    ``stored`` lists the datasets a cache holds for the layer (``features``, ``weight``,
    ``bias``, ``stats``); the reader fills it, the writer ignores it.
    """

    name: str
    dim: int
    module: str = ""
    depth: int = 0
    role: str = "other"
    io: str = "input"
    pool: str = "none"
    order: int = -1
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    stored: tuple[str, ...] = ()

    def problem(self) -> str | None:
        """Why this record cannot be written as a cache layer (``None`` when it can)."""
        if not self.name or "/" in self.name:
            return f"layer name {self.name!r} is not usable as an HDF5 group name"
        if self.role not in ROLES:
            return f"layer {self.name!r}: unknown role {self.role!r}"
        if self.io not in SIDES:
            return f"layer {self.name!r}: unknown side {self.io!r}"
        if self.pool not in POOLS:
            return f"layer {self.name!r}: unknown pool {self.pool!r}"
        return None

    @property
    def call(self) -> int:
        """``N`` for a layer named ``<module>#N`` (the module's N-th call in a forward pass),
        0 for a module that runs once."""
        head, sep, tail = self.name.rpartition("#")
        return int(tail) if sep and head == self.module and tail.isdigit() else 0

    @property
    def has_weight(self) -> bool:
        """A linear module's weight is (or will be) stored with the layer."""
        return self.weight is not None or "weight" in self.stored

    @property
    def has_stats(self) -> bool:
        """The cache holds this layer's statistics."""
        return "stats" in self.stored

    def row(self) -> dict[str, Any]:
        """The layout as plain values (``nccli info``)."""
        shape = None if self.weight is None else list(np.shape(self.weight))
        return {
            "name": self.name,
            "module": self.module,
            "io": self.io,
            "depth": self.depth,
            "role": self.role,
            "pool": self.pool,
            "order": self.order,
            "dim": self.dim,
            "weight": shape,
            "bias": self.bias is not None,
        }


def show_classifier_input(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``nccli info``'s layer rows with the input of the final classifier marked: a model
    whose head is one linear layer stores that layer as ``penultimate``, and it is the
    ``classifier`` input too (``--layer classifier`` selects it), so its role reads
    ``penultimate, classifier``."""
    if any(r.get("role") == "classifier" for r in rows):
        return rows
    top = [r for r in rows if r.get("role") == "penultimate" and r.get("weight") is not None]
    if top:
        top[-1]["role"] = "penultimate, classifier"
    return rows


def head_chain(views: Sequence[Any]) -> list[Any]:
    """The records of the trailing linear chain, bottom (head input) to top (classifier input).

    Records (or views with ``role``, ``dim`` and ``weight``) are taken in depth order among
    those with a head role and a linear ``weight``; walking down from the last one, the
    chain stops where the output size of the module below does not match the features of
    the record above.
    """
    cand = [v for v in views if v.role in CHAIN_ROLES and v.weight is not None]
    if not cand:
        return []
    chain = [cand[-1]]
    for v in reversed(cand[:-1]):
        upper = chain[0]
        if v.weight.shape[0] != upper.dim or upper.weight.shape[1] != upper.dim:
            break
        chain.insert(0, v)
    return chain


def compose_classifiers(
    chain: Sequence[Any],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The affine map from each layer of ``chain`` to the logits, bottom first.

    ``C_l = W_{L+1} ⋯ W_{l+1}`` and ``c_l = W_{L+1}⋯W_{l+2} b_{l+1} + … + b_{L+1}``
    (a module without a bias adds zeros), in float64.
    """
    maps: list[tuple[np.ndarray, np.ndarray]] = []
    C: np.ndarray | None = None
    c: np.ndarray | None = None
    for v in reversed(chain):
        W = np.asarray(v.weight, dtype=np.float64)
        b = np.zeros(W.shape[0]) if v.bias is None else np.asarray(v.bias, dtype=np.float64)
        C, c = (W, b) if C is None else (C @ W, C @ b + c)
        maps.append((C, c))
    return maps[::-1]
