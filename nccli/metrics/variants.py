"""Metrics later papers report beside NC1–NC4 (docs/metrics.md, "Variants"), each from the
statistics and the classifier, tiled over classes like :mod:`~nccli.metrics.pairwise`:
no K×K matrix is formed.

- ``gnc2_log_energy = mean_{k<l} log(1/||u_k − u_l||)`` and ``gnc2_dist_var = var_{k<l}
  ||u_k − u_l||`` with ``u_k = (μ_k − μ_G)/||μ_k − μ_G||`` (generalised NC2: hyperspherical
  energy, Liu et al. 2023; meaningful for K > d + 1, where no simplex ETF exists);
- ``unc3 = var_k cos(w_k, μ_k − μ_G)`` and ``unc3_dot = std_k s_k / |mean_k s_k|`` with
  ``s_k = w_k·(μ_k − μ_G)`` (uniform duality, Wu & Papyan 2024: the cosine form, and the
  dot-product form as a coefficient of variation so that it is scale-free);
- ``nc3_dual = || W Mᵀ/||W Mᵀ||_F − (I_K − 11ᵀ/K)/√(K−1) ||_F`` (``M`` the centred means as
  rows: the W·M form of self-duality, Zhu et al. 2021; the target has unit norm);
- ``bias_collapse = ||W μ_G + b||_2`` (the classifier's output at the global mean);
- ``nc5 = mean_k |cos(μ_k, μ_G^ood)|`` (ID/OOD orthogonality, Ammar et al. 2024; the class
  means uncentred, the global mean of out-of-distribution features).

Population statistics throughout (``var`` and ``std`` divide by the count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from nccli.metrics.nc import Undefined
from nccli.metrics.pairwise import TILE_BYTES, Moments, tile_classes, tiles

__all__ = [
    "bias_collapse",
    "gnc2",
    "nc3_dual",
    "nc5",
    "unc3",
    "unc3_dot",
    "unit_rows",
]

#: pairs whose unit vectors are closer than this (squared distance) are recomputed from
#: the difference: ``2 − 2cos`` loses every digit as cos → 1
_DIRECT = 1e-2


def unit_rows(V: np.ndarray, what: str) -> np.ndarray:
    """Rows scaled to unit norm; :class:`Undefined` for a zero row."""
    V = np.asarray(V, dtype=np.float64)
    norms = np.linalg.norm(V, axis=1)
    if norms.size == 0 or float(norms.min()) <= 0:
        raise Undefined(f"a {what} has zero norm")
    return V / norms[:, None]


def _pair_distances(U: np.ndarray, tile: int | None) -> Iterator[np.ndarray]:
    """``||u_k − u_l||`` of every pair ``k < l`` of unit rows, one tile at a time."""
    K, d = U.shape
    t = max(1, min(K, int(tile))) if tile else tile_classes(K, TILE_BYTES, 4)
    upper: dict[int, np.ndarray] = {}
    for a, b, c, e in tiles(K, t):
        D2 = 2.0 - 2.0 * (U[a:b] @ U[c:e].T)
        close = np.argwhere(D2 < _DIRECT)
        if close.size:  # near-coinciding directions: from the difference itself
            diff = U[a + close[:, 0]] - U[c + close[:, 1]]
            D2[close[:, 0], close[:, 1]] = np.einsum("ij,ij->i", diff, diff)
        if a == c:
            n = b - a
            mask = upper.get(n)
            if mask is None:
                mask = upper[n] = np.triu(np.ones((n, n), dtype=bool), 1)
            D2 = D2[mask]
        yield np.sqrt(np.maximum(D2.ravel(), 0.0))


def gnc2(means_centred: np.ndarray, *, tile: int | None = None) -> tuple[float, float]:
    """``(gnc2_log_energy, gnc2_dist_var)`` of the centred class means (see the module)."""
    U = unit_rows(means_centred, "centred class mean")
    if U.shape[0] < 2:
        raise Undefined("fewer than two classes")
    energy = 0.0
    moments = Moments()
    for dist in _pair_distances(U, tile):
        if dist.size and float(dist.min()) <= 0:
            raise Undefined("two centred class means point the same way (zero distance)")
        energy -= float(np.sum(np.log(dist)))
        moments.add(dist)
    return energy / moments.n, moments.m2 / moments.n


def _duality_terms(weight: np.ndarray, means_centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    W = np.asarray(weight, dtype=np.float64)
    M = np.asarray(means_centred, dtype=np.float64)
    if W.shape != M.shape:
        raise Undefined(f"classifier {W.shape} and class means {M.shape} differ in shape")
    return W, M


def unc3(weight: np.ndarray, means_centred: np.ndarray) -> float:
    """``var_k cos(w_k, μ_k − μ_G)``."""
    W, M = _duality_terms(weight, means_centred)
    cos = np.sum(unit_rows(W, "classifier row") * unit_rows(M, "centred class mean"), axis=1)
    return float(np.var(cos))


def unc3_dot(weight: np.ndarray, means_centred: np.ndarray) -> float:
    """``std_k s_k / |mean_k s_k|`` with ``s_k = w_k·(μ_k − μ_G)``."""
    W, M = _duality_terms(weight, means_centred)
    s = np.sum(W * M, axis=1)
    mean = float(np.mean(s))
    if mean == 0:
        raise Undefined("the classifier rows and centred means have zero mean similarity")
    return float(np.std(s) / abs(mean))


def nc3_dual(weight: np.ndarray, means_centred: np.ndarray, *, tile: int | None = None) -> float:
    """``|| G/||G||_F − E ||_F`` with ``G = W Mᵀ`` (K×K, never formed) and the unit-norm
    target ``E = (I − 11ᵀ/K)/√(K−1)``.

    ``||G||_F² = Σ (W (MᵀM)) ∘ W`` is a d×d product; then the sum of squares of
    ``G/||G|| − E`` is accumulated over row × column tiles (G is not symmetric)."""
    W, M = _duality_terms(weight, means_centred)
    K = W.shape[0]
    if K < 2:
        raise Undefined("fewer than two classes")
    g2 = float(np.sum((W @ (M.T @ M)) * W))
    if g2 <= 0:
        raise Undefined("W·Mᵀ is zero")
    g = math.sqrt(g2)
    off = -1.0 / (K * math.sqrt(K - 1))  # E_kl, k ≠ l
    diag = (1.0 - 1.0 / K) / math.sqrt(K - 1)
    t = max(1, min(K, int(tile))) if tile else tile_classes(K, TILE_BYTES, 2)
    total = 0.0
    for a in range(0, K, t):
        b = min(K, a + t)
        for c in range(0, K, t):
            e = min(K, c + t)
            R = (W[a:b] @ M[c:e].T) / g - off
            if a == c:
                R[np.diag_indices(b - a)] -= diag - off
            total += float(np.sum(R * R))
    return math.sqrt(total)


def bias_collapse(weight: np.ndarray, bias: np.ndarray | None, global_mean: np.ndarray) -> float:
    """``||W μ_G + b||_2`` (``b = 0`` without a bias)."""
    out = np.asarray(weight, dtype=np.float64) @ np.asarray(global_mean, dtype=np.float64)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64).reshape(-1)
    return float(np.linalg.norm(out))


def nc5(means: np.ndarray, ood_global_mean: np.ndarray) -> float:
    """``mean_k |cos(μ_k, μ_G^ood)|`` (uncentred ID class means)."""
    g = np.asarray(ood_global_mean, dtype=np.float64).reshape(-1)
    gn = float(np.linalg.norm(g))
    if gn <= 0:
        raise Undefined("the out-of-distribution global mean is zero")
    U = unit_rows(means, "class mean")
    return float(np.mean(np.abs(U @ (g / gn))))
