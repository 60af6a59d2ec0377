"""NC1–NC4 and CDNV as pure functions of :class:`~nccli.stats.ClassStats` (docs/metrics.md).

Conventions: ``Σ_W = S_W / N``; ``Σ_B = (1/K) Σ_k (μ_k-μ_G)(μ_k-μ_G)ᵀ``; ``nc1`` is divided
by K; centring uses the sample-weighted global mean unless ``center="classmean"``.
Functions raise :class:`Undefined` with a reason when a metric has no value for the data;
:func:`nccli.metrics.compute_metrics` turns that into ``nan`` plus the reason.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.metrics import pairwise as pw
from nccli.stats import ClassStats


class Undefined(ValueError):
    """A metric has no value for this data; the message is the reason shown to the user."""


def _present(stats: ClassStats) -> np.ndarray:
    """Mask of classes with samples; the metrics need every class present (docs/metrics.md)."""
    counts = stats.counts
    present = counts > 0
    if present.sum() < 2:
        raise Undefined("fewer than two classes have samples")
    if not present.all():
        empty = np.flatnonzero(~present)
        shown = ", ".join(str(k) for k in empty[:5]) + (" …" if empty.size > 5 else "")
        raise Undefined(f"class {shown} has no samples")
    return present


def centred_means(stats: ClassStats, center: str = "global") -> np.ndarray:
    """``M = [μ_k - μ_G]`` as a (K, d) array (read-only; every class must have samples)."""
    _present(stats)  # raises Undefined unless every class has samples

    def compute() -> np.ndarray:
        M = stats.means - stats.global_mean(center)  # every class is present here
        M.flags.writeable = False
        return M

    return stats.memo(("centred_means", center), compute)


def means_svd(stats: ClassStats, center: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD of the d×K centred means, ``M = Q S Vᵀ``: ``(Q, s)``, computed once per state
    and shared by ``nc1`` and ``cond_l``.

    With more classes than dimensions (K > d) the K×d means are first reduced to their d×d
    triangular factor ``R`` (Householder QR, backward stable like the SVD itself):
    ``Mᵀ = Rᵀ Q_rᵀ`` has the singular values and left vectors of ``Rᵀ``, so nothing K×K and
    no K-wide right singular vectors are formed."""
    M = centred_means(stats, center)

    def compute() -> tuple[np.ndarray, np.ndarray]:
        if M.shape[0] > M.shape[1]:
            R = np.linalg.qr(M, mode="r")
            Q, s, _ = np.linalg.svd(R.T)
        else:
            Q, s, _ = np.linalg.svd(M.T, full_matrices=False)
        return Q, s

    return stats.memo(("means_svd", center), compute)


#: from this many classes on, ``nc1`` tries the K×K Gram route before the d×K SVD
GRAM_MIN_CLASSES = 64
#: the Gram route is used only when the reduced Gram matrix is this well conditioned
#: (1-norm condition number): then no singular value but the centring null direction is
#: anywhere near the ``rtol`` cut-off and both routes agree to rounding
GRAM_MAX_COND = 1e6


def _null_direction(stats: ClassStats, center: str) -> np.ndarray:
    """Unit ``c`` with ``cᵀM = 0`` exactly in exact arithmetic: the centring weights."""
    if center == "global":
        c = stats.counts.astype(np.float64)
    else:
        c = np.ones(stats.num_classes)
    return c / np.linalg.norm(c)


def reduced_means(stats: ClassStats, center: str = "global") -> np.ndarray:
    """The K-1 rows ``Pᵀ M`` of the centred means in an orthonormal basis ``P`` of the
    complement of the centring direction (a Householder reflection: O(K·d)).

    ``M`` has rank ≤ K-1 because its rows are centred; removing the known null direction
    leaves a (K-1)×d matrix with the same non-zero singular values.
    """
    M = centred_means(stats, center)

    def compute() -> np.ndarray:
        v = _householder(stats, center)
        HM = np.outer(-2.0 * v, v @ M)
        HM += M
        return HM[:-1]

    return stats.memo(("reduced_means", center), compute)


def _householder(stats: ClassStats, center: str) -> np.ndarray:
    """Unit ``v`` with ``H = I - 2vvᵀ`` mapping the centring direction ``c`` to ∓e_K."""
    c = _null_direction(stats, center)
    v = c.copy()
    v[-1] += np.copysign(1.0, c[-1])
    return v / np.linalg.norm(v)


def centred_gram(stats: ClassStats, center: str = "global") -> np.ndarray:
    """``M Mᵀ`` (K×K) of the centred means, computed once, for the Gram route of ``nc1`` and
    ``cond_l``: used only when K-1 ≤ d, where it is no larger than the d×d scatter (the
    pairwise metrics stream tiles instead, :mod:`nccli.metrics.pairwise`)."""
    M = centred_means(stats, center)

    def compute() -> np.ndarray:
        G = M @ M.T
        G.flags.writeable = False
        return G

    return stats.memo(("centred_gram", center), compute)


def reduced_gram(stats: ClassStats, center: str = "global") -> np.ndarray:
    """``M_r M_rᵀ`` ((K-1) square) from :func:`centred_gram` by the Householder reflection
    on both sides, ``HGH = G - 2v gᵀ - 2g vᵀ + 4(vᵀg) vvᵀ`` with ``g = Gv``: O(K²)."""
    G = centred_gram(stats, center)

    def compute() -> np.ndarray:
        v = _householder(stats, center)
        g = G @ v
        HGH = G - 2.0 * np.outer(v, g) - 2.0 * np.outer(g, v) + 4.0 * float(v @ g) * np.outer(v, v)
        return HGH[:-1, :-1]

    return stats.memo(("reduced_gram", center), compute)


def _nc1_gram(stats: ClassStats, center: str, rtol: float = 1e-8) -> float | None:
    """``nc1`` through the reduced Gram ``G = M_r M_rᵀ`` (K-1 square) and
    ``A = M_r Σ_W M_rᵀ``: ``nc1 = Tr(G⁻¹ A G⁻¹)`` with a Cholesky solve — all BLAS-3, no
    d×K SVD.  Returns None (use the SVD) when ``G`` is not safely positive definite."""
    if stats.dim < stats.num_classes - 1:
        return None
    Mr = reduced_means(stats, center)
    G = reduced_gram(stats, center)
    try:
        L = np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        return None  # not positive definite: d < K-1 or coinciding means
    Li = np.linalg.solve(L, np.eye(G.shape[0]))  # L⁻¹
    Z = Li.T @ Li  # G⁻¹ = L⁻ᵀ L⁻¹ from the factor
    cond1 = np.abs(G).sum(axis=0).max() * np.abs(Z).sum(axis=0).max()
    # κ₂(G) ≤ κ₁(G): below both bounds every singular value of M_r exceeds 10·rtol·s_max,
    # so the SVD route would keep them all too, and G⁻¹ is accurate to ~eps·κ
    if not np.isfinite(cond1) or cond1 > min(GRAM_MAX_COND, 1.0 / (100.0 * rtol * rtol)):
        return None
    sigma_w = stats.scatter / stats.n
    A = Mr @ (sigma_w @ Mr.T)
    # Tr(Σ_W Σ_B⁺)/K = Tr(Σ_W M_rᵀ G⁻² M_r) = Tr(G⁻¹ A G⁻¹) = Σ (Z A) ∘ Zᵀ
    return float(np.sum((Z @ A) * Z.T))


def nc1(
    stats: ClassStats, center: str = "global", rtol: float = 1e-8, method: str = "auto"
) -> float:
    """``nc1 = (1/K) Tr(Σ_W Σ_B⁺)`` (Papyan et al. 2020).

    With the thin SVD ``M = Q S Vᵀ`` of the d×K centred means (singular values below
    ``rtol·s_max`` dropped), ``Σ_B⁺ = K Q S⁻² Qᵀ`` and so
    ``nc1 = Tr(S⁻² Qᵀ Σ_W Q)``: a d×r product, never a d×d inverse.  The number of
    singular values kept is :func:`nc1_rank` (≤ min(K-1, d)).

    For many classes (``method="auto"`` and K ≥ :data:`GRAM_MIN_CLASSES`) the same number is
    computed from (K-1)×(K-1) matrices when K-1 ≤ d and the means are well conditioned (see
    :func:`_nc1_gram`); ``method="svd"`` or ``"gram"`` forces a route.  With K > d+1 only
    the SVD route applies, on the d×d factor of the means (:func:`means_svd`).
    """
    return _nc1(stats, center, rtol, method)[0]


def nc1_rank(stats: ClassStats, center: str = "global", rtol: float = 1e-8) -> int:
    """The rank of ``Σ_B`` that ``nc1`` inverts on: singular values of the centred means above
    ``rtol·s_max`` (K-1 when the Gram route applies; at most ``min(K-1, d)``); 0 when all
    class means coincide."""
    try:
        return _nc1(stats, center, rtol, "auto")[1]
    except Undefined:
        if not np.any(centred_means(stats, center)):  # Σ_B = 0 (missing classes re-raise)
            return 0
        raise


def _nc1(stats: ClassStats, center: str, rtol: float, method: str) -> tuple[float, int]:
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"unknown nc1 method {method!r}")
    centred_means(stats, center)  # raises Undefined for missing classes first
    key = ("nc1", center, rtol, method)
    if key in stats._memo:
        return stats._memo[key]
    K = stats.num_classes
    if method == "gram" or (method == "auto" and K >= GRAM_MIN_CLASSES):
        value = _nc1_gram(stats, center, rtol)
        if value is not None:
            return stats.memo(key, lambda: (value, K - 1))
        if method == "gram":
            raise Undefined("the class means are too ill-conditioned for the Gram route")
    Q, s = means_svd(stats, center)
    if s.size == 0 or s[0] <= 0:
        raise Undefined("all class means coincide (Σ_B = 0)")
    keep = s > rtol * s[0]
    Q, s = Q[:, keep], s[keep]
    sigma_w = stats.scatter / stats.n
    # Tr(Σ_W Σ_B⁺) = K Σ_j (q_jᵀ Σ_W q_j) / s_j²; nc1 divides it by K
    quad = np.sum((sigma_w @ Q) * Q, axis=0)
    return stats.memo(key, lambda: (float(np.sum(quad / s**2)), int(keep.sum())))


def means_singular_values(stats: ClassStats, center: str = "global") -> np.ndarray:
    """Singular values of the centred means, descending: from the SVD when it was computed,
    else (many classes, K-1 ≤ d) from the eigenvalues of the reduced K-1 Gram, padded with
    the centring null direction's 0."""
    key = ("means_svd", center)
    K = stats.num_classes
    if key in stats._memo or K < GRAM_MIN_CLASSES or K - 1 > stats.dim:
        return means_svd(stats, center)[1]

    def compute() -> np.ndarray:
        lam = np.linalg.eigvalsh(reduced_gram(stats, center))[::-1]
        s = np.sqrt(np.clip(lam, 0.0, None))
        return np.concatenate([s, [0.0]])

    return stats.memo(("means_sv", center), compute)


def nc1_trace(stats: ClassStats, center: str = "global") -> float:
    """``Tr(Σ_W) / Tr(Σ_B)``: cheap, scale-free companion of ``nc1``."""
    M = centred_means(stats, center)
    K = M.shape[0]
    tr_b = float(np.sum(M * M)) / K
    if tr_b <= 0:
        raise Undefined("all class means coincide (Tr Σ_B = 0)")
    return float(np.trace(stats.scatter) / stats.n / tr_b)


def cdnv(stats: ClassStats, *, tile: int | None = None) -> float:
    """``mean_{k<l} (σ_k² + σ_l²) / (2 ||μ_k - μ_l||²)`` (Galanti et al. 2022).

    A tiled pass over the centred means (:func:`~nccli.metrics.pairwise.pair_summary`; the
    distances are shift-invariant); with the default centring it is the same pass as the
    NC2 metrics of the means (:func:`mean_vectors`)."""
    if tile is None:
        summary = mean_vectors(stats, "global").summary
    else:
        summary = _cdnv_summary(stats, "global", tile)
    assert summary.cdnv_sum is not None
    if summary.cdnv_zero:
        raise Undefined("two class means coincide (zero distance)")
    return float(summary.cdnv_sum / summary.pairs)


def _cdnv_summary(stats: ClassStats, center: str, tile: int | None) -> pw.PairSummary:
    present = _present(stats)
    var = stats.class_ss[present] / stats.counts[present]
    return pw.pair_summary(centred_means(stats, center), var=var, tile=tile)


class Vectors:
    """K vectors (rows) with their norms and one tiled pass over their pairs
    (:func:`~nccli.metrics.pairwise.pair_summary`), computed once and read by every
    pairwise metric of the set; no K×K matrix is formed.

    The NC2 functions accept either a plain (K, d) array or a ``Vectors``; ``compute_metrics``
    passes one per vector set so the metrics share one pass.  ``var``: per-vector variances
    that add the cdnv sum to the pass (the centred class means); ``tile``: classes per tile;
    ``etf=False`` skips the ETF-distance sum (and its ``||G||_F``).
    """

    def __init__(
        self,
        V: np.ndarray,
        what: str = "vector",
        *,
        var: np.ndarray | None = None,
        tile: int | None = None,
        etf: bool = True,
    ) -> None:
        self.V = np.asarray(V, dtype=np.float64)
        self.what = what
        self.var = var
        self.tile = tile
        self.etf = etf
        self._norms: np.ndarray | None = None
        self._summary: pw.PairSummary | None = None

    @property
    def K(self) -> int:
        return self.V.shape[0]

    @property
    def norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms = np.linalg.norm(self.V, axis=1)
        return self._norms

    @property
    def summary(self) -> pw.PairSummary:
        if self._summary is None:
            self._summary = pw.pair_summary(
                self.V, self.norms, etf=self.etf, var=self.var, tile=self.tile
            )
        return self._summary

    def cosine_summary(self) -> pw.PairSummary:
        """The pass, after checking that every vector has a cosine (non-zero norm)."""
        if self.K < 2:
            raise Undefined("fewer than two vectors")
        if np.any(self.norms <= 0):
            raise Undefined(f"a {self.what} vector has zero norm")
        return self.summary


def mean_vectors(stats: ClassStats, center: str = "global") -> Vectors:
    """The centred class means as :class:`Vectors`, once per state; with the class
    variances, so their pass also gives ``cdnv``."""
    present = _present(stats)

    def compute() -> Vectors:
        var = stats.class_ss[present] / stats.counts[present]
        return Vectors(centred_means(stats, center), "centred class mean", var=var)

    return stats.memo(("vectors", center), compute)


def _vectors(V: np.ndarray | Vectors, what: str, tile: int | None = None) -> Vectors:
    return V if isinstance(V, Vectors) else Vectors(V, what, tile=tile)


def equinorm(V: np.ndarray | Vectors, what: str = "vector") -> float:
    """``std_k ||v_k|| / mean_k ||v_k||`` (population std)."""
    norms = _vectors(V, what).norms
    if norms.mean() <= 0:
        raise Undefined(f"every {what} has zero norm")
    return float(norms.std() / norms.mean())


def equiangular(V: np.ndarray | Vectors, what: str = "vector", *, tile: int | None = None) -> float:
    """``std_{k≠l} cos(v_k, v_l)`` (population std; the ordered pairs ``k≠l`` hold each
    unordered pair twice, so it is the std over ``k < l``)."""
    summary = _vectors(V, what, tile).cosine_summary()
    assert summary.cos is not None
    return summary.cos.std


def maxangle(V: np.ndarray | Vectors, what: str = "vector", *, tile: int | None = None) -> float:
    """``mean_{k≠l} |cos(v_k, v_l) + 1/(K-1)|``."""
    summary = _vectors(V, what, tile).cosine_summary()
    return float(summary.dev_sum / summary.pairs)


def etf_dist(V: np.ndarray | Vectors, what: str = "vector", *, tile: int | None = None) -> float:
    """``|| G/||G||_F - E/||E||_F ||_F`` with ``G = V Vᵀ`` the Gram matrix of the rows, summed
    tile by tile (``||G||_F`` from the d×d ``VᵀV``; ``||E||_F = K/√(K-1)``)."""
    V = _vectors(V, what, tile)
    if V.K < 2:
        raise Undefined("fewer than two vectors")
    summary = V.summary
    if summary.etf_sq is None:
        raise Undefined(f"every {what} has zero norm")
    return math.sqrt(max(summary.etf_sq, 0.0))


def simplex_etf_gram(K: int) -> np.ndarray:
    """``E = (K/(K-1)) (I - 11ᵀ/K)``: unit norms, cosines ``-1/(K-1)`` (K×K: small K only)."""
    return K / (K - 1) * (np.eye(K) - np.ones((K, K)) / K)


def nc3(weight: np.ndarray, M: np.ndarray) -> float:
    """``|| Wᵀ/||W||_F - M/||M||_F ||_F²`` with ``W`` (K, d) and centred means ``M`` (K, d)."""
    nw, nm = np.linalg.norm(weight), np.linalg.norm(M)
    if nw <= 0:
        raise Undefined("the classifier weight is zero")
    if nm <= 0:
        raise Undefined("all class means coincide")
    total = 0.0
    rows = max(1, pw.TILE_BYTES // (16 * max(1, M.shape[1])))  # row blocks: no K×d temporaries
    for s in range(0, M.shape[0], rows):
        D = weight[s : s + rows] / nw
        D -= M[s : s + rows] / nm
        total += float(np.einsum("ij,ij->", D, D))
    return total


def nc3_cos(weight: np.ndarray, M: np.ndarray) -> float:
    """``mean_k cos(w_k, μ_k - μ_G)``."""
    nw = np.linalg.norm(weight, axis=1)
    nm = np.linalg.norm(M, axis=1)
    if np.any(nw <= 0) or np.any(nm <= 0):
        raise Undefined("a classifier row or centred class mean has zero norm")
    return float(np.mean(np.einsum("ij,ij->i", weight, M) / (nw * nm)))


def check_classifier(
    weight: Any, bias: Any | None, num_classes: int, dim: int, source: str = "classifier"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a classifier ``W`` (K, d) and bias (K,): shapes and finiteness (DataError)."""
    W = np.asarray(weight, dtype=np.float64)
    if W.shape != (num_classes, dim):
        raise DataError(
            f"{source}: classifier weight has shape {W.shape} but the features have "
            f"K={num_classes} classes and d={dim}"
        )
    if not np.isfinite(W).all():
        raise DataError(f"{source}: classifier weight contains NaN or Inf; check the checkpoint")
    b = None
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.shape != (num_classes,):
            raise DataError(
                f"{source}: classifier bias has {b.size} entries, expected {num_classes}"
            )
        if not np.isfinite(b).all():
            raise DataError(f"{source}: classifier bias contains NaN or Inf; check the checkpoint")
    return W, b
