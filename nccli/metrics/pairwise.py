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
        """Fold in the values ``x`` (1-D): their own mean and M2 (two passes), merged."""
        if x.size:
            mb = float(x.mean())
            dev = x - mb
            self.merge(int(x.size), mb, float(np.dot(dev, dev)))

    def merge(self, nb: int, mb: float, m2b: float) -> None:
        """Fold in a block of ``nb`` values with mean ``mb`` and M2 ``m2b`` (Chan et al.)."""
        if nb == 0:
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * (self.n * nb / n)
        self.n = n

    def add_shifted(self, x: np.ndarray, work: np.ndarray) -> None:
        """Fold in the 2-D block ``x`` with shifted sums about the running mean (``work``: a
        scratch array of its shape): ``M2_b = Σz² - (Σz)²/n`` with ``z = x - mean``.

        Its rounding error, ``eps·n_b (m_b - mean)²``, is at most ``eps·n/n_a`` of the
        between-block term the merge adds, so the total keeps its digits; the first block
        (no mean yet) takes the exact two-pass form."""
        nb = int(x.size)
        if self.n == 0 or nb == 0:
            self.add(x.ravel())
            return
        np.subtract(x, self.mean, out=work)
        z = work.ravel()
        sz = float(z.sum())
        m2b = max(0.0, float(np.dot(z, z)) - sz * sz / nb)
        self.merge(nb, self.mean + sz / nb, m2b)

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


def _close_pairs(
    D: np.ndarray, S: np.ndarray, V: np.ndarray, a: int, c: int, out: PairSummary
) -> None:
    """Recompute ``D`` in place where ``D < CDNV_DIRECT·S`` from the differences of the rows
    (blocks within the tile budget), and record a zero distance.

    ``D = S - 2G`` with ``S = ||v_k||²+||v_l||²`` is the Gram form: the GEMM error is at most
    ``γ_d ||v_k|| ||v_l|| ≤ γ_d S/2`` (``γ_d ≈ d·eps``), so a distance keeps a relative error
    below ``γ_d S/D``.  The rows are *centred* means, so ``S`` is the spread about ``μ_G`` (no
    common offset) and ``D ≈ S`` for all but near-coinciding classes; below
    ``CDNV_DIRECT·S`` (where that bound exceeds ``100·γ_d``, ~2e-12 at d = 1024) the
    difference ``v_k - v_l`` is formed directly.  Such a pair has ``cos > 1 - CDNV_DIRECT``
    (``S ≥ 2||v_k|| ||v_l||``), which lets tiles without one skip this search.
    """
    rows, cols = np.nonzero(D < CDNV_DIRECT * S)
    step = max(1, TILE_BYTES // (8 * 2 * V.shape[1]))
    for s in range(0, rows.size, step):
        r, q = rows[s : s + step], cols[s : s + step]
        diff = V[a + r] - V[c + q]
        D[r, q] = np.einsum("ij,ij->i", diff, diff)
    if D.size and float(D.min()) <= 0:
        out.cdnv_zero = True


def _etf_diagonal(norms: np.ndarray, g: float, inv_e: float) -> float:
    r = norms * norms / g - inv_e  # E_kk = 1
    return float(np.dot(r, r))


class _Pass:
    """The accumulation of :func:`pair_summary`: tile-sized scratch buffers reused by every
    tile (no allocation per tile), and the sums that become a :class:`PairSummary`."""

    def __init__(
        self,
        V: np.ndarray,
        norms: np.ndarray,
        var: np.ndarray | None,
        t: int,
        out: PairSummary,
        with_cos: bool,
        etf_at: float | None,
    ) -> None:
        self.V, self.var, self.out, self.with_cos = V, var, out, with_cos
        self.norms, self.sq = norms, norms * norms
        with np.errstate(divide="ignore"):
            self.inv_n = 1.0 / norms
        self.shift = 1.0 / (out.K - 1) if out.K > 1 else 0.0
        self.etf_at = etf_at  # E_kl·||G||_F/||E||_F off the diagonal, or None
        self.etf_sum = self.cdnv_sum = 0.0
        self.bufs = [np.empty(t * t) for _ in range(5)]
        self.masks: dict[int, np.ndarray] = {}

    def _buf(self, i: int, n: int, m: int) -> np.ndarray:
        return self.bufs[i][: n * m].reshape(n, m)

    def tile(self, a: int, b: int, c: int, e: int) -> None:
        n, m = b - a, e - c
        G = self._buf(0, n, m)
        np.matmul(self.V[a:b], self.V[c:e].T, out=G)
        if a == c:
            self._diagonal(G, a, b)
            return
        C, Y = self._buf(1, n, m), self._buf(2, n, m)
        cmax = 1.0
        out = self.out
        if self.with_cos:
            np.multiply(G, self.inv_n[a:b, None], out=C)
            C *= self.inv_n[None, c:e]
            cmax = float(C.max())
            out.max_abs = max(out.max_abs, cmax, -float(C.min()))
            assert out.cos is not None
            out.cos.add_shifted(C, Y)
            np.add(C, self.shift, out=Y)
            np.abs(Y, out=Y)
            out.dev_sum += float(Y.sum())
        if self.etf_at is not None:
            np.subtract(G, self.etf_at, out=Y)
            y = Y.ravel()
            self.etf_sum += 2.0 * float(np.dot(y, y))
        if self.var is not None:
            S, D = self._buf(3, n, m), self._buf(4, n, m)
            np.add(self.sq[a:b, None], self.sq[None, c:e], out=S)
            np.multiply(G, -2.0, out=D)
            D += S
            if cmax >= 1.0 - 2.0 * CDNV_DIRECT:  # else no pair is close (see _close_pairs)
                _close_pairs(D, S, self.V, a, c, out)
            np.add(self.var[a:b, None], self.var[None, c:e], out=S)
            np.divide(S, D, out=S)
            self.cdnv_sum += float(S.sum())

    def _diagonal(self, G: np.ndarray, a: int, b: int) -> None:
        """A diagonal tile: its strict upper triangle, picked out (K/t of the tiles)."""
        sel = self.masks.get(b - a)
        if sel is None:
            sel = self.masks[b - a] = np.triu(np.ones((b - a, b - a), dtype=bool), 1)
        out = self.out
        g = G[sel]
        if self.with_cos and g.size:
            cos = (G / np.outer(self.norms[a:b], self.norms[a:b]))[sel]
            assert out.cos is not None
            out.cos.add(cos)
            out.dev_sum += float(np.sum(np.abs(cos + self.shift)))
            out.max_abs = max(out.max_abs, float(np.max(np.abs(cos))))
        if self.etf_at is not None:
            r = g - self.etf_at
            self.etf_sum += 2.0 * float(np.dot(r, r))
        if self.var is not None:
            S = self.sq[a:b, None] + self.sq[None, a:b]
            D = S - 2.0 * G
            D[~sel] = np.inf  # the diagonal and the lower triangle are not pairs k < l
            _close_pairs(D, S, self.V, a, a, out)
            self.cdnv_sum += float(np.sum(((self.var[a:b, None] + self.var[None, a:b]) / D)[sel]))


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
    norms = np.linalg.norm(V, axis=1) if norms is None else np.asarray(norms, dtype=np.float64)
    t = max(1, min(K, int(tile))) if tile else tile_classes(K)
    out = PairSummary(K)
    with_cos = bool(norms.size) and bool(norms.min() > 0)
    if not with_cos:
        out.cos = None
    g = 0.0
    etf_at = None
    if etf:
        g = out.gram_norm = math.sqrt(gram_frobenius2(V, t))
        if g > 0 and K > 1:
            inv_e = math.sqrt(K - 1) / K  # 1/||E||_F
            # Σ (G_kl/g - E_kl/||E||)² off the diagonal = Σ (G_kl - etf_at)² / g²
            etf_at = -inv_e / (K - 1) * g
            out.etf_sq = _etf_diagonal(norms, g, inv_e)
    acc = _Pass(V, norms, var, t, out, with_cos, etf_at)
    with np.errstate(divide="ignore", invalid="ignore"):
        for a, b, c, e in tiles(K, t):
            acc.tile(a, b, c, e)
    if out.etf_sq is not None:
        out.etf_sq += acc.etf_sum / (g * g)
    if var is not None:
        out.cdnv_sum = acc.cdnv_sum / 2.0
    return out
