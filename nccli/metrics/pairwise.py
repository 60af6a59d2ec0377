"""Pairwise reductions over K vectors in tiles of classes: never a K×K matrix.

Every metric that is a mean, std or max over pairs ``k < l`` (``cdnv``, ``nc2_equiangular_*``,
``nc2_maxangle_*``, ``nc2_etf_dist_*``, ``of_maxcos_*``, ``minority_collapse``) reads one
:class:`PairSummary`: a single streaming pass over tiles ``V[a:b] @ V[c:e]ᵀ`` (row block
against column block, ``c ≥ a``, only ``k < l`` kept on the diagonal tiles) that
accumulates float64 sums, per-tile mean/M2 merged with the pairwise update of Chan et al.
(for the std), maxima and counts.  A tile holds at most :data:`TILE_BYTES` of float64
temporaries, so the memory is ``O(K·d + tile²)`` whatever K is (docs/metrics.md,
"Pairwise metrics at large K").

The ETF distance needs ``||G||_F`` before the pass: ``||V Vᵀ||_F² = ||VᵀV||_F²``, a d×d
product when ``d ≤ K`` (else a first pass over the tiles); then
``Σ_{k,l} (G_kl/||G||_F - E_kl/||E||_F)²`` is summed tile by tile with ``||E||_F = K/√(K-1)``.
The closed form ``2 - 2 tr(GE)/(||G|| ||E||)`` cancels near collapse and is not used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CDNV_DIRECT",
    "TILE_BYTES",
    "Moments",
    "PairSummary",
    "gram_frobenius2",
    "pair_summary",
    "tile_classes",
    "tiles",
]

#: bytes of float64 scratch one tile of class pairs may use (all its temporaries together)
TILE_BYTES = 64 * 2**20
#: float64 tile-sized temporaries alive at once in :func:`pair_summary`
_TEMPS = 8
#: cdnv: pairs with ``||μ_k-μ_l||² < CDNV_DIRECT·(||μ_k||²+||μ_l||²)`` are recomputed from
#: the difference of the (centred) means instead of the Gram form ``||μ_k||²+||μ_l||²-2G_kl``
CDNV_DIRECT = 1e-2


def tile_classes(K: int, budget: int = TILE_BYTES, temps: int = _TEMPS) -> int:
    """Classes per tile so that ``temps`` float64 tile×tile arrays fit in ``budget`` bytes."""
    t = math.isqrt(max(1, int(budget) // (8 * temps)))
    return max(1, min(int(K), t))


def tiles(K: int, t: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks ``(a, b, c, e)`` covering every pair ``k < l`` once: rows ``a:b``, columns
    ``c:e`` with ``c ≥ a`` (on a diagonal block ``a == c`` only its strict upper triangle)."""
    for a in range(0, K, t):
        b = min(K, a + t)
        for c in range(a, K, t):
            yield a, b, c, min(K, c + t)


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, merged block by block (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        nb = int(x.size)
        if nb == 0:
            return
        mb = float(x.mean())
        dev = x - mb
        m2b = float(np.dot(dev, dev))
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else float("nan")


@dataclass
class PairSummary:
    """What one pass over the pairs ``k < l`` of K vectors leaves (see the module docstring).

    ``cos`` / ``dev_sum`` / ``max_abs``: moments of ``cos(v_k, v_l)``, the sum of
    ``|cos + 1/(K-1)|`` and the largest ``|cos|`` (None when a vector has zero norm);
    ``etf_sq``: ``Σ_{k,l} (G_kl/||G||_F - E_kl/||E||_F)²`` over all K² entries (None when not
    asked for or ``G = 0``); ``cdnv_sum`` / ``cdnv_zero``: the sum of
    ``(σ_k²+σ_l²)/(2||v_k-v_l||²)`` and whether two vectors coincide (when variances are given).
    """

    K: int
    gram_norm: float = 0.0
    cos: Moments | None = field(default_factory=Moments)
    dev_sum: float = 0.0
    max_abs: float = 0.0
    etf_sq: float | None = None
    cdnv_sum: float | None = None
    cdnv_zero: bool = False

    @property
    def pairs(self) -> int:
        return self.K * (self.K - 1) // 2


def gram_frobenius2(V: np.ndarray, t: int) -> float:
    """``||V Vᵀ||_F²`` without the K×K matrix: ``||VᵀV||_F²`` (d×d) when ``d ≤ K``, else summed
    over the tiles of ``V Vᵀ`` (each off-diagonal block counts twice)."""
    K, d = V.shape
    if d <= K:
        A = V.T @ V
        return float(np.sum(A * A))
    total = 0.0
    for a, b, c, e in tiles(K, t):
        G = V[a:b] @ V[c:e].T
        total += float(np.sum(G * G)) * (1.0 if a == c else 2.0)
    return total


def _upper(n: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    """Boolean mask of the strict upper triangle of an n×n block (cached per size)."""
    m = cache.get(n)
    if m is None:
        m = cache[n] = np.triu(np.ones((n, n), dtype=bool), 1)
    return m


def _distances(
    G: np.ndarray, sq: np.ndarray, V: np.ndarray, a: int, b: int, c: int, e: int
) -> np.ndarray:
    """``||v_k - v_l||²`` of a tile.

    From the Gram form ``sq_k + sq_l - 2G_kl``: the GEMM error is at most ``γ_d ||v_k|| ||v_l||
    ≤ γ_d (sq_k+sq_l)/2`` (``γ_d ≈ d·eps``), so a distance keeps a relative error below
    ``γ_d (sq_k+sq_l)/D``.  The vectors are *centred* means, so ``sq`` is the spread about
    ``μ_G`` (no common offset) and ``D ≈ sq_k+sq_l`` for all but near-coinciding classes;
    pairs with ``D < CDNV_DIRECT·(sq_k+sq_l)`` (where the bound exceeds ``100·γ_d``) are
    recomputed from the difference ``v_k - v_l`` directly, in blocks within the tile budget.
    """
    s_row, s_col = sq[a:b, None], sq[None, c:e]
    D = s_row + s_col
    scale = D * CDNV_DIRECT
    D -= 2.0 * G
    rows, cols = np.nonzero(D < scale)
    if rows.size:
        step = max(1, TILE_BYTES // (8 * 2 * V.shape[1]))
        for s in range(0, rows.size, step):
            r, q = rows[s : s + step], cols[s : s + step]
            diff = V[a + r] - V[c + q]
            D[r, q] = np.einsum("ij,ij->i", diff, diff)
    return D


def _etf_diagonal(norms: np.ndarray, g: float, inv_e: float) -> float:
    r = norms * norms / g - inv_e  # E_kk = 1
    return float(np.dot(r, r))


def pair_summary(
    V: np.ndarray,
    norms: np.ndarray | None = None,
    *,
    etf: bool = True,
    var: np.ndarray | None = None,
    tile: int | None = None,
) -> PairSummary:
    """One tiled pass over the pairs ``k < l`` of the rows of ``V`` (K, d), float64.

    ``etf``: also the ETF-distance sum (and ``||G||_F``); ``var``: per-row variances
    ``σ_k²`` for the cdnv sum (the rows must then be the class means, any common shift);
    ``tile``: classes per tile (default from :data:`TILE_BYTES`).
    """
    V = np.ascontiguousarray(V, dtype=np.float64)
    K = V.shape[0]
    norms = np.linalg.norm(V, axis=1) if norms is None else norms
    t = max(1, min(K, int(tile))) if tile else tile_classes(K)
    out = PairSummary(K)
    with_cos = bool(norms.size) and bool(norms.min() > 0)
    if not with_cos:
        out.cos = None
    g = inv_e = off_e = 0.0
    if etf:
        g = math.sqrt(gram_frobenius2(V, t))
        out.gram_norm = g
        if g > 0:
            inv_e = math.sqrt(K - 1) / K  # 1/||E||_F
            off_e = -inv_e / (K - 1)  # E_kl/||E||_F off the diagonal
            out.etf_sq = _etf_diagonal(norms, g, inv_e)
    sq = norms * norms
    if var is not None:
        out.cdnv_sum = 0.0
    shift = 1.0 / (K - 1) if K > 1 else 0.0
    masks: dict[int, np.ndarray] = {}
    for a, b, c, e in tiles(K, t):
        G = V[a:b] @ V[c:e].T
        sel = _upper(b - a, masks) if a == c else None

        def pick(X: np.ndarray, sel: np.ndarray | None = sel) -> np.ndarray:
            return X[sel] if sel is not None else X.ravel()

        if with_cos:
            cos = pick(G / np.outer(norms[a:b], norms[c:e]))
            assert out.cos is not None
            out.cos.add(cos)
            if cos.size:
                out.dev_sum += float(np.sum(np.abs(cos + shift)))
                out.max_abs = max(out.max_abs, float(np.max(np.abs(cos))))
        if out.etf_sq is not None:
            r = pick(G) / g - off_e
            out.etf_sq += 2.0 * float(np.dot(r, r))
        if var is not None:
            D = pick(_distances(G, sq, V, a, b, c, e))
            if D.size and float(D.min()) <= 0:
                out.cdnv_zero = True
                continue
            num = pick(var[a:b, None] + var[None, c:e])
            out.cdnv_sum += float(np.sum(num / (2.0 * D)))
    return out
