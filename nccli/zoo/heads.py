"""Classifier heads shared by every zoo architecture.

A zoo model ends in ``head`` (a deep *linear* head: ``head_depth`` Linear layers with no
nonlinearity between them, an empty ``nn.Sequential`` when ``head_depth == 0``) followed by
``classifier`` (one ``nn.Linear``).  With ``etf_classifier=True`` the classifier weight is
a fixed simplex equiangular tight frame, as in Papyan et al. and Zhu et al.: it stays an
``nn.Parameter`` (so it is saved in the state dict and found by layer discovery) but has
``requires_grad=False`` and no bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nccli.errors import UsageError

__all__ = ["make_classifier", "make_head", "simplex_etf"]


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Return a ``(num_classes, dim)`` simplex ETF with unit-norm rows.

    Every pair of rows has cosine ``-1 / (num_classes - 1)``; the rows sum to zero.  The
    frame spans a random ``num_classes - 1`` dimensional subspace of ``R^dim`` drawn from
    ``seed``, so the same arguments always give the same tensor.  Needs
    ``dim >= num_classes - 1`` and ``num_classes >= 2``.
    """
    if num_classes < 2:
        raise UsageError(f"simplex_etf: num_classes must be at least 2, got {num_classes}")
    if dim < num_classes - 1:
        raise UsageError(
            f"simplex_etf: a {num_classes}-class simplex ETF needs dim >= {num_classes - 1}, "
            f"got dim={dim}; widen the layer before the classifier"
        )
    k = num_classes
    gen = torch.Generator().manual_seed(seed)
    # Orthonormal basis of the subspace orthogonal to the all-ones vector (K x (K-1)).
    centred = torch.eye(k, dtype=torch.float64) - 1.0 / k
    basis, _ = torch.linalg.qr(centred[:, : k - 1])
    # Random orthonormal embedding of R^(K-1) into R^dim (dim x (K-1)).
    embed, _ = torch.linalg.qr(torch.randn(dim, k - 1, generator=gen, dtype=torch.float64))
    frame = basis @ embed.T * math.sqrt(k / (k - 1))
    return frame.to(torch.float32)


def make_head(
    in_dim: int, head_depth: int, head_width: int | None, head_bias: bool
) -> nn.Sequential:
    """Build the deep linear head: ``head_depth`` Linear layers, no nonlinearity.

    Each layer maps to ``head_width`` (default: ``in_dim``).  Returns an empty
    ``nn.Sequential`` (the identity) when ``head_depth == 0``.
    """
    if head_depth < 0:
        raise UsageError(f"head_depth must be >= 0, got {head_depth}")
    if head_width is not None and head_width < 1:
        raise UsageError(f"head_width must be a positive integer, got {head_width}")
    width = in_dim if head_width is None else head_width
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(head_depth):
        layers.append(nn.Linear(d, width, bias=head_bias))
        d = width
    return nn.Sequential(*layers)


def head_out_dim(in_dim: int, head_depth: int, head_width: int | None) -> int:
    """Width of the feature that reaches the classifier."""
    if head_depth == 0 or head_width is None:
        return in_dim
    return head_width


def make_classifier(
    in_dim: int, num_classes: int, *, etf_classifier: bool, classifier_bias: bool
) -> nn.Linear:
    """Build the final ``nn.Linear``; a frozen simplex ETF without bias if asked."""
    if num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes}")
    if not etf_classifier:
        return nn.Linear(in_dim, num_classes, bias=classifier_bias)
    layer = nn.Linear(in_dim, num_classes, bias=False)
    with torch.no_grad():
        layer.weight.copy_(simplex_etf(num_classes, in_dim))
    layer.weight.requires_grad_(False)
    return layer


def attach_head(
    model: nn.Module,
    in_dim: int,
    num_classes: int,
    *,
    head_depth: int,
    head_width: int | None,
    head_bias: bool,
    etf_classifier: bool,
    classifier_bias: bool,
) -> None:
    """Give ``model`` its ``head`` (deep linear head on ``in_dim`` features) and
    ``classifier`` modules — the same tail for every zoo architecture."""
    model.head = make_head(in_dim, head_depth, head_width, head_bias)
    model.classifier = make_classifier(
        head_out_dim(in_dim, head_depth, head_width),
        num_classes,
        etf_classifier=etf_classifier,
        classifier_bias=classifier_bias,
    )
