"""MSE decomposition around the least-squares classifier (Han, Papyan & Donoho 2022).

docs/metrics.md, "MSE decomposition".  For features ``H`` (N × d), one-hot
targets ``Y`` and a classifier ``(W, b)``,

    L(W, b) = (1/2N) ||H Wᵀ + 1bᵀ - Y||_F² + (λ/2) ||W||_F²

is a quadratic in ``(W, b)``.  Its minimiser for the given features is the ridge
least-squares classifier ``(W_LS, b_LS)`` and, exactly,

    L(W, b) = L(W_LS, b_LS) + (1/2) Σ_k Δ_kᵀ A Δ_k,   Δ_k = [w_k - w_LS,k ; b_k - b_LS,k].

``mse_ls`` is the first term (A), ``mse_dev`` the second (B), ``mse_dev_frac = B/(A+B)``.

Everything comes from the sufficient statistics: ``HᵀH = S_W + Σ_k n_k μ_k μ_kᵀ``,
column k of ``HᵀY`` is ``n_k μ_k``, ``Hᵀ1 = N μ_G``, ``Yᵀ1 = n``, ``||Y||² = N``.  With a
bias the system is the centred one: ``Σ_T = H_cᵀH_c/N = (S_W + Σ_k n_k δ_k δ_kᵀ)/N`` with
``δ_k = μ_k - μ_G`` (sample-weighted ``μ_G`` always: this is least-squares algebra, not a
choice of centring), ``C = H_cᵀY/N`` with columns ``(n_k/N) δ_k``, and

    W_LS = Cᵀ (Σ_T + λI)⁺,  b_LS = ȳ - W_LS μ_G,  A = (1/2)(1 - ||ȳ||² - Tr(Cᵀ(Σ_T + λI)⁺C)),
    B = (1/2) Σ_k [ Δw_kᵀ(Σ_T + λI)Δw_k + (Δb_k + Δw_k·μ_G)² ],

with ``ȳ_k = n_k/N``.  Bias-free: uncentred ``G = HᵀH/N`` and ``C`` with columns
``(n_k/N) μ_k``, ``W_LS = Cᵀ(G + λI)⁺``, ``A = (1/2)(1 - Tr(Cᵀ(G+λI)⁺C))``,
``B = (1/2) Σ_k Δw_kᵀ(G + λI)Δw_k``.  ``B`` is a sum of non-negative terms (no
cancellation when the classifier is close to ``W_LS``).

The d × d system is diagonalised once with ``eigh``; eigenvalues at or below
``d·ε·λ_max`` are treated as zero (pseudo-inverse semantics, needed when ``λ = 0`` and the
features span fewer than d dimensions).  No explicit inverse is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nccli.metrics.nc import Undefined
from nccli.stats import ClassStats

__all__ = ["MSEDecomposition", "ls_classifier", "mse_decomposition", "mse_loss"]


@dataclass
class MSEDecomposition:
    """``mse_ls`` (A), ``mse_dev`` (B), their sum and ``mse_dev_frac``, and the LS classifier."""

    mse_ls: float
    mse_dev: float
    w_ls: np.ndarray
    b_ls: np.ndarray | None

    @property
    def mse_total(self) -> float:
        return self.mse_ls + self.mse_dev

    @property
    def mse_dev_frac(self) -> float:
        total = self.mse_total
        if total <= 0:
            raise Undefined("the MSE loss is zero")
        return self.mse_dev / total


def _system(stats: ClassStats, bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(S, C, μ_G, N)``: the d × d second-moment matrix (centred with a bias), the d × K
    cross moment ``C`` and the sample-weighted mean."""
    N = stats.n
    if N <= 0:
        raise Undefined("no samples")
    counts = stats.counts.astype(np.float64)
    mu_g = stats.global_mean("global")
    V = stats.means - mu_g if bias else stats.means
    D = V * np.sqrt(counts)[:, None]
    S = (stats.scatter + D.T @ D) / N
    S = 0.5 * (S + S.T)
    C = (V * (counts / N)[:, None]).T  # d × K
    return S, C, mu_g, float(N)


def _eig(S: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of ``S + λI`` and the mask of eigenvalues kept."""
    e, V = np.linalg.eigh(S + lam * np.eye(S.shape[0]))
    emax = float(e.max()) if e.size else 0.0
    keep = e > max(emax, 0.0) * S.shape[0] * np.finfo(np.float64).eps
    if emax <= 0:
        keep = np.zeros_like(e, dtype=bool)
    return e, V, keep


def _check_lambda(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise Undefined(f"the weight decay must be a finite number ≥ 0, got {lam}")
    return lam


def ls_classifier(
    stats: ClassStats, lam: float = 0.0, *, bias: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """The ridge least-squares classifier ``(W_LS, b_LS)`` (``b_LS`` None when bias-free)."""
    lam = _check_lambda(lam)
    S, C, mu_g, N = _system(stats, bias)
    e, V, keep = _eig(S, lam)
    P = V[:, keep]
    W = ((C.T @ P) / e[keep]) @ P.T  # Cᵀ (S + λI)⁺
    if not bias:
        return W, None
    ybar = stats.counts.astype(np.float64) / N
    return W, ybar - W @ mu_g


def mse_decomposition(
    stats: ClassStats,
    weight: np.ndarray,
    bias_vec: np.ndarray | None = None,
    lam: float = 0.0,
    *,
    bias: bool = True,
) -> MSEDecomposition:
    """Terms A (``mse_ls``) and B (``mse_dev``) of the MSE loss of ``(W, b)`` on these features.

    ``bias=False`` uses the bias-free variant (``bias_vec`` must then be None or zero: a
    bias-free classifier has none).  ``lam`` is the weight decay λ on ``W``.
    """
    lam = _check_lambda(lam)
    W = np.asarray(weight, dtype=np.float64)
    K, d = stats.num_classes, stats.dim
    if W.shape != (K, d):
        raise Undefined(f"classifier has shape {W.shape}, expected ({K}, {d})")
    S, C, mu_g, N = _system(stats, bias)
    e, V, keep = _eig(S, lam)
    P = V[:, keep]
    CP = C.T @ P  # K × r: coordinates of C in the kept eigenbasis
    W_ls = (CP / e[keep]) @ P.T
    ybar = stats.counts.astype(np.float64) / N
    quad = float(np.sum(CP * CP / e[keep]))  # Tr(Cᵀ (S + λI)⁺ C)
    base = 1.0 - float(ybar @ ybar) if bias else 1.0
    mse_ls = 0.5 * max(base - quad, 0.0)
    dW = W - W_ls
    # Δwᵀ(S + λI)Δw through the eigenbasis: a sum of squares, so it never cancels
    Z = dW @ V
    dev = float(np.sum(Z * Z * np.clip(e, 0.0, None)))
    b_ls = None
    if bias:
        b = np.zeros(K) if bias_vec is None else np.asarray(bias_vec, dtype=np.float64).reshape(K)
        b_ls = ybar - W_ls @ mu_g
        r = (b - b_ls) + dW @ mu_g
        dev += float(r @ r)
    elif bias_vec is not None and np.any(np.asarray(bias_vec) != 0):
        raise Undefined("the bias-free decomposition was asked for a classifier with a bias")
    return MSEDecomposition(mse_ls=mse_ls, mse_dev=0.5 * dev, w_ls=W_ls, b_ls=b_ls)


def mse_loss(
    stats: ClassStats, weight: np.ndarray, bias_vec: np.ndarray | None = None, lam: float = 0.0
) -> float:
    """``L(W, b)`` evaluated from the statistics by expanding the square (a reference: it
    cancels when the loss is tiny, :func:`mse_decomposition` does not)."""
    lam = _check_lambda(lam)
    W = np.asarray(weight, dtype=np.float64)
    N = stats.n
    if N <= 0:
        raise Undefined("no samples")
    counts = stats.counts.astype(np.float64)
    mu = stats.means
    D = mu * np.sqrt(counts)[:, None]
    G = (stats.scatter + D.T @ D) / N  # HᵀH/N
    C = (mu * (counts / N)[:, None]).T  # HᵀY/N
    mu_g = stats.global_mean("global")
    ybar = counts / N
    b = np.zeros(W.shape[0]) if bias_vec is None else np.asarray(bias_vec, dtype=np.float64)
    fit = (
        np.sum((W @ G) * W)
        + 2.0 * b @ (W @ mu_g)
        + b @ b
        - 2.0 * np.sum(W * C.T)
        - 2.0 * b @ ybar
        + 1.0
    )
    return float(0.5 * fit + 0.5 * lam * np.sum(W * W))
