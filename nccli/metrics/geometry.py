"""Orthogonal-frame geometry, minority collapse and the bias-free imbalanced MSE optimum.

Pure functions of the statistics (and of a classifier ``W``), docs/metrics.md section
"Orthogonal frame and minority collapse" (Dang et al. 2023):

- ``of_maxcos_means``      ``max_{k≠l} |cos(μ_k, μ_l)|`` on the *uncentred* class means
  (0 for an orthogonal frame);
- ``of_maxcos_classifier`` the same on the classifier rows ``w_k``;
- ``minority_collapse``    mean pairwise cosine ``cos(w_k, w_l)`` over the classifier rows
  of the *minority classes*: the classes whose count ``n_k`` is strictly below the median
  of all K counts (at least two such classes are needed; a balanced set has none).  Rows
  that have collapsed onto one direction give 1;
- :func:`predict_lengths` the closed-form per-class lengths ``||w_k||``, ``||μ_k||`` of the
  global minimiser of the bias-free unconstrained-feature MSE loss with weight decay
  (derivation in ``docs/theory.md``).

Functions raise :class:`~nccli.metrics.nc.Undefined` with a reason when a value does not
exist for the data; the caller turns that into ``nan`` plus the reason.
"""

from __future__ import annotations

import numpy as np

from nccli.metrics.nc import Undefined, Vectors, _present
from nccli.metrics.pairwise import pair_summary
from nccli.stats import ClassStats

__all__ = [
    "COSINE_MATRIX_MAX_CLASSES",
    "cosine_matrix",
    "minority_classes",
    "minority_collapse",
    "of_maxcos",
    "of_maxcos_classifier",
    "of_maxcos_means",
    "predict_lengths",
    "predict_t",
]


# ------------------------------------------------------------------ cosines
#: ``--geometry`` writes K×K cosine matrices: refused above this many classes
COSINE_MATRIX_MAX_CLASSES = 1000


def cosine_matrix(V: np.ndarray) -> np.ndarray:
    """``cos(v_k, v_l)`` for the rows of ``V`` (K, d); rows and columns of zero vectors are nan.

    K×K by definition (``--geometry``): refused (:class:`ValueError`) above
    :data:`COSINE_MATRIX_MAX_CLASSES` rows; the pairwise metrics use tiles instead."""
    V = np.asarray(V, dtype=np.float64)
    if V.shape[0] > COSINE_MATRIX_MAX_CLASSES:
        raise ValueError(
            f"a cosine matrix of {V.shape[0]} vectors is above the limit of "
            f"{COSINE_MATRIX_MAX_CLASSES}"
        )
    norms = np.linalg.norm(V, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        U = V / norms[:, None]
    U[norms <= 0] = np.nan
    C = U @ U.T
    return np.clip(C, -1.0, 1.0)


def of_maxcos(V: np.ndarray | Vectors, what: str = "vector", *, tile: int | None = None) -> float:
    """``max_{k≠l} |cos(v_k, v_l)|`` over the rows of ``V``: 0 for an orthogonal frame.

    One tiled pass over the pairs (:class:`~nccli.metrics.nc.Vectors`, shared with the NC2
    metrics of the same vectors); cosines are clipped to [-1, 1] as in :func:`cosine_matrix`."""
    vec = V if isinstance(V, Vectors) else Vectors(V, what, tile=tile)
    if vec.K < 2:
        raise Undefined("fewer than two vectors")
    if np.any(vec.norms <= 0):
        raise Undefined(f"a {what} has zero norm")
    return min(1.0, vec.summary.max_abs)


def of_maxcos_means(stats: ClassStats, *, tile: int | None = None) -> float:
    """``of_maxcos`` of the uncentred class means ``U = [μ_1 … μ_K]`` (every class present)."""
    present = _present(stats)
    vec = stats.memo(
        ("uncentred_vectors", tile),
        lambda: Vectors(
            stats.means if present.all() else stats.means[present],
            "class mean",
            tile=tile,
            etf=False,
        ),
    )
    return of_maxcos(vec, "class mean")


def of_maxcos_classifier(weight: np.ndarray | Vectors, *, tile: int | None = None) -> float:
    """``of_maxcos`` of the classifier rows ``w_k``."""
    return of_maxcos(weight, "classifier row", tile=tile)


# ------------------------------------------------------------ minority collapse
def minority_classes(counts: np.ndarray) -> np.ndarray:
    """Indices of the minority classes: ``n_k`` strictly below the median of all K counts.

    For a step imbalance (``K_maj`` classes of ``n_maj`` samples, ``K_min`` of ``n_min``) with
    ``K_min ≤ K_maj`` this is exactly the minority group; for a long tail it is the lower
    half; for balanced data it is empty.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(counts < np.median(counts))


def minority_collapse(weight: np.ndarray, counts: np.ndarray, *, tile: int | None = None) -> float:
    """Mean ``cos(w_k, w_l)`` over pairs ``k < l`` of minority classes (:func:`minority_classes`).

    Close to 1 when the minority classifier rows have collapsed onto one direction
    (Fang et al. 2021); ``-1/(K-1)`` for a simplex ETF.
    """
    W = np.asarray(weight, dtype=np.float64)
    idx = minority_classes(counts)
    if idx.size < 2:
        raise Undefined("fewer than two minority classes (classes with n_k below the median count)")
    rows = W[idx]
    norms = np.linalg.norm(rows, axis=1)
    if np.any(norms <= 0):
        raise Undefined("a minority classifier row has zero norm")
    summary = pair_summary(rows, norms, etf=False, tile=tile)
    assert summary.cos is not None
    return summary.cos.mean


# ------------------------------------------------- closed-form lengths (MSE, no bias)
def _check_wd(wd_features: float, wd_classifier: float, depth: int) -> tuple[float, float, int]:
    lam_h, lam_w, M = float(wd_features), float(wd_classifier), int(depth)
    if M < 1:
        raise Undefined(f"the head depth must be at least 1, got {depth}")
    if not (np.isfinite(lam_h) and np.isfinite(lam_w)) or lam_h <= 0 or lam_w <= 0:
        raise Undefined(
            "the closed form needs positive weight decays on features and classifier "
            f"(got λ_H={wd_features}, λ_W={wd_classifier}); without them the loss has no minimiser"
        )
    return lam_h, lam_w, M


def _g(t: np.ndarray, n: np.ndarray, lam_h: float, lam_w: float, N: float, M: int) -> np.ndarray:
    """Per-class objective ``g(t) = λ_H n_k / (2(t^M + Nλ_H)) + Mλ_W t / 2``."""
    return lam_h * n / (2.0 * (t**M + N * lam_h)) + M * lam_w * t / 2.0


def predict_t(
    counts: np.ndarray, wd_features: float, wd_classifier: float, depth: int = 1
) -> np.ndarray:
    """Per-class ``t_k ≥ 0`` minimising ``g(t) = λ_H n_k/(2(t^M + Nλ_H)) + Mλ_W t/2``.

    ``t_k`` is the squared singular value that every layer of the balanced optimal head
    assigns to class k's direction (``docs/theory.md``).  M = 1: ``g`` is convex and
    ``t_k = max(0, sqrt(n_k λ_H/λ_W) - Nλ_H)``.  M ≥ 2: the stationarity condition
    ``n_k λ_H t^{M-1} = λ_W (t^M + Nλ_H)²`` reads ``r(t) = λ_W/(n_k λ_H)`` with
    ``r(t) = t^{M-1}/(t^M + c)²``, ``c = Nλ_H``; ``r`` rises from 0 to its peak at
    ``t_p = ((M-1)c/(M+1))^{1/M}`` and then falls to 0, so there are at most two positive
    roots: the smaller is a local maximum of ``g``, the larger (found by bisection on the
    falling branch, in log-space) a local minimum, which is compared with ``g(0)``.
    Ties go to ``t = 0``.
    """
    lam_h, lam_w, M = _check_wd(wd_features, wd_classifier, depth)
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if np.any(n < 0):
        raise Undefined("negative class counts")
    N = float(n.sum())
    if N <= 0:
        raise Undefined("no samples")
    c = N * lam_h
    if M == 1:
        return np.maximum(0.0, np.sqrt(n * lam_h / lam_w) - c)
    t = np.zeros_like(n)
    t_peak = ((M - 1) * c / (M + 1)) ** (1.0 / M)
    log_target = np.log(lam_w)

    def log_lhs(log_t: float, nk: float) -> float:
        # log(n_k λ_H t^{M-1}) - 2 log(t^M + c): strictly decreasing for t > t_peak
        tm = np.exp(M * log_t)
        return np.log(nk * lam_h) + (M - 1) * log_t - 2.0 * np.log(tm + c)

    for k, nk in enumerate(n):
        if nk <= 0:
            continue
        if log_lhs(np.log(t_peak), nk) <= log_target:
            continue  # g is increasing on (0, ∞): the minimum is t = 0
        lo = np.log(t_peak)
        # r(t) ≤ t^{-(M+1)}, so n_k λ_H r(t) < λ_W once t > (n_k λ_H/λ_W)^{1/(M+1)}
        hi = max(lo, np.log(nk * lam_h / lam_w) / (M + 1)) + 1.0
        for _ in range(64):  # guard only: the bound above already brackets the root
            if log_lhs(hi, nk) <= log_target:
                break
            hi += 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if log_lhs(mid, nk) > log_target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-15:
                break
        root = np.exp(0.5 * (lo + hi))
        g_root = _g(np.array(root), nk, lam_h, lam_w, N, M)
        g_zero = _g(np.array(0.0), nk, lam_h, lam_w, N, M)
        if g_root < g_zero:
            t[k] = root
    return t


def predict_lengths(
    counts: np.ndarray, wd_features: float, wd_classifier: float, depth: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``(||w_k||, ||μ_k||)`` at the global minimiser of the bias-free UFM MSE loss

    ``(1/2N)||H W_1ᵀ⋯W_Mᵀ - Y||² + (λ_W/2) Σ_m ||W_m||² + (λ_H/2) ||H||²``

    (``counts`` = ``n_k``, ``wd_features`` = λ_H, ``wd_classifier`` = λ_W, ``depth`` = M).
    ``w_k`` is the row of the end-to-end classifier ``W_M⋯W_1`` and ``μ_k`` the class mean
    of the features ``H``: ``||w_k||² = t_k^M`` and ``||μ_k||² = t_k^M/(t_k^M + Nλ_H)²``
    (:func:`predict_t`).  For M = 1: ``||w_k||² = sqrt(n_k λ_H/λ_W) - Nλ_H`` and
    ``||μ_k||² = sqrt(λ_W/(n_k λ_H)) - Nλ_W/n_k`` while positive; classes with
    ``n_k ≤ N²λ_Hλ_W`` get 0 for both (minority collapse).  Empty classes get 0 and nan.
    """
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    t = predict_t(n, wd_features, wd_classifier, depth)
    M = int(depth)
    c = float(n.sum()) * float(wd_features)
    tm = t**M
    w_norm = np.sqrt(tm)
    mu_norm = np.sqrt(tm) / (tm + c)
    mu_norm = np.where(n > 0, mu_norm, np.nan)
    return w_norm, mu_norm


def predict_layer_lengths(
    counts: np.ndarray, wd_features: float, wd_classifier: float, depth: int, layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``(||C_l row k||, ||μ_k^{(l)}||)`` at layer ``l`` (0 = head input) of a
    depth-M balanced optimal head: each layer scales class k's direction by ``sqrt(t_k)``,
    so the class mean after l layers has norm ``t_k^{l/2}·||μ_k||`` and the composite map of
    the ``M - l`` layers above has row norm ``t_k^{(M-l)/2}``.  ``layer = 0`` is
    :func:`predict_lengths`."""
    if not 0 <= int(layer) < int(depth):
        raise Undefined(f"layer {layer} is outside a head of depth {depth}")
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    t = predict_t(n, wd_features, wd_classifier, depth)
    M, l = int(depth), int(layer)
    c = float(n.sum()) * float(wd_features)
    tm = t**M
    w_norm = np.sqrt(t ** (M - l))
    mu_norm = np.sqrt(t**l) * np.sqrt(tm) / (tm + c)
    return w_norm, np.where(n > 0, mu_norm, np.nan)
