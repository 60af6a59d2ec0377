"""Deep linear heads: the chain of linear layers, balancedness, conditioning, effective rank.

docs/metrics.md, "Deep linear heads" (Dang et al. 2023; Jacot et al. 2024).

Index convention.  A head ``h⁽ˡ⁾ = W_l h⁽ˡ⁻¹⁾ (+ b_l)``, l = 1..M, ends in the classifier
``W_M``; ``h⁽⁰⁾`` is the head's input (the penultimate feature, after the last
nonlinearity).  nccli caches the *input* of each linear module, so the layer view at chain
position l holds the features ``h⁽ˡ⁾`` and its own ``weight`` is ``W_{l+1}`` — the module
that *reads* those features.  The chain (:func:`head_chain`) is the trailing run of layer
views with a linear module whose dimensions connect, so a head of depth M caches M views
(positions 0..M-1) and the last one's weight is the classifier.

- ``balancedness_l = ||W_{l+1}ᵀW_{l+1} - W_l W_lᵀ||_F / ||W_l W_lᵀ||_F``: both Gram matrices
  act on the space of ``h⁽ˡ⁾``, so the row is attached to the view at position l ≥ 1 (its
  own weight is ``W_{l+1}``, the view below holds ``W_l``).  Position 0 has no ``W_0``.
- ``cond_l``: ``s_1 / s_r`` of the layer's class means: centred means ``M`` with
  ``r = K-1``, or for a bias-free head the uncentred means ``U`` with ``r = K``.
- ``erank_l``: entropy effective rank (Roy & Vetterli 2007) ``exp(-Σ_i p_i log p_i)`` with
  ``p_i = λ_i / Σ_j λ_j`` the normalised eigenvalues of the total covariance
  ``Σ_T = (S_W + Σ_k n_k (μ_k-μ_G)(μ_k-μ_G)ᵀ)/N`` (sample-weighted ``μ_G``), read from the
  statistics without another pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nccli.layers import CHAIN_ROLES, head_chain  # the one definition of the chain
from nccli.metrics.nc import Undefined, _present, means_singular_values
from nccli.stats import ClassStats

__all__ = [
    "CHAIN_ROLES",
    "balancedness",
    "bias_free",
    "chain_position",
    "cond",
    "erank",
    "head_chain",
    "head_is_bias_free",
    "total_covariance",
]


def chain_position(view: Any, chain: Sequence[Any]) -> int | None:
    """Position l of ``view`` in ``chain`` (0 = head input), or None."""
    for i, v in enumerate(chain):
        if v is view:
            return i
    return None


def bias_free(weight: Any | None, bias: Any | None) -> bool | None:
    """Whether the classifier ``(weight, bias)`` has no bias: True when the bias is absent
    or exactly zero, False when it has a non-zero entry, None without a classifier."""
    if weight is None:
        return None
    return bias is None or not np.any(np.asarray(bias) != 0)


def head_is_bias_free(view: Any) -> bool | None:
    """Whether the (composite) classifier acting on ``view`` has no bias.

    True when the composite bias is absent or exactly zero (a cached module without a bias
    composes to zeros), False when it has a non-zero entry, None without a classifier.
    """
    return bias_free(view.classifier_weight, view.classifier_bias)


def balancedness(w_lower: np.ndarray, w_upper: np.ndarray) -> float:
    """``||W_{l+1}ᵀW_{l+1} - W_l W_lᵀ||_F / ||W_l W_lᵀ||_F`` for ``w_lower = W_l`` (d_l × d_{l-1})
    and ``w_upper = W_{l+1}`` (d_{l+1} × d_l)."""
    A = np.asarray(w_lower, dtype=np.float64)
    B = np.asarray(w_upper, dtype=np.float64)
    if A.shape[0] != B.shape[1]:
        raise Undefined(
            f"layers do not connect: W_l has {A.shape[0]} outputs, W_(l+1) takes {B.shape[1]} inputs"
        )
    lower = A @ A.T
    denom = np.linalg.norm(lower)
    if denom <= 0:
        raise Undefined("the weight below this layer is zero")
    return float(np.linalg.norm(B.T @ B - lower) / denom)


def cond(
    stats: ClassStats, center: str = "global", bias_free: bool = False, rtol: float = 1e-8
) -> float:
    """Condition number ``s_1/s_r`` of the class means on their top r singular values.

    With a bias: centred means ``μ_k - μ_G`` and ``r = K-1`` (their rank is at most K-1).
    Bias-free head: uncentred means and ``r = K``.  ``nan`` (Undefined) when ``d < r`` or
    ``s_r ≤ rtol·s_1`` — the means span fewer than r dimensions, the condition number is
    infinite.
    """
    present = _present(stats)
    mu = stats.means[present]
    K = mu.shape[0]
    if bias_free:
        r, what = K, "uncentred class means"
    else:
        r, what = K - 1, "centred class means"
    if stats.dim < r:
        raise Undefined(f"the layer has d={stats.dim} < {r} dimensions, the {what} cannot span {r}")
    if bias_free:
        # singular values from the K×K Gram (K ≤ d here): cheaper than a K×d SVD, and
        # accurate to ~eps·cond² relative, ample for a condition number
        lam = np.linalg.eigvalsh(mu @ mu.T)[::-1]
        s = np.sqrt(np.clip(lam, 0.0, None))
    else:
        s = means_singular_values(stats, center)  # shared with nc1
    if s.size < r or s[0] <= 0:
        raise Undefined(f"the {what} are all zero")
    if s[r - 1] <= rtol * s[0]:
        rank = int(np.sum(s > rtol * s[0]))
        raise Undefined(f"the {what} span only {rank} < {r} dimensions (infinite condition number)")
    return float(s[0] / s[r - 1])


def total_covariance(stats: ClassStats) -> np.ndarray:
    """``Σ_T = (S_W + Σ_k n_k (μ_k-μ_G)(μ_k-μ_G)ᵀ)/N`` with the sample-weighted ``μ_G``."""
    N = stats.n
    if N <= 0:
        raise Undefined("no samples")
    counts = stats.counts.astype(np.float64)
    D = (stats.means - stats.global_mean("global")) * np.sqrt(counts)[:, None]
    S = stats.scatter + D.T @ D
    return 0.5 * (S + S.T) / N


def erank(stats: ClassStats) -> float:
    """Entropy effective rank of the eigenvalues of ``Σ_T`` (Roy & Vetterli 2007)."""
    lam = np.linalg.eigvalsh(total_covariance(stats))
    lam = np.clip(lam, 0.0, None)
    total = lam.sum()
    if total <= 0:
        raise Undefined("the features are constant (zero total covariance)")
    p = lam[lam > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
