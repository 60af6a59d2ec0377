"""Configurations whose metrics are known in closed form (docs/metrics.md definitions).

Simplex ETF: ``E = (K/(K-1)) (I - 11ᵀ/K)``, unit norms, cosines ``-1/(K-1)``, and
``||E||_F² = K·1 + K(K-1)·1/(K-1)² = K²/(K-1)``, i.e. ``||E||_F = K/√(K-1)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    assert_metric_close,
    engine_metrics,
    engine_stats,
    nc2_metrics,
    simplex_etf,
)

TINY = 1e-10


def collapsed(means, n_per):
    """Every sample equal to its class mean, ``n_per`` samples per class, shuffled."""
    K = means.shape[0]
    counts = np.full(K, n_per) if np.isscalar(n_per) else np.asarray(n_per)
    y = np.concatenate([np.full(counts[k], k) for k in range(K)])
    perm = np.random.default_rng(0).permutation(len(y))
    y = y[perm]
    return means[y].copy(), y


def all_metrics(H, y, K, W, b=None, center="global", batch_size=None):
    st = engine_stats(H, y, K, batch_size=batch_size)
    return engine_metrics(st, H, y, W, b, center=center, chunk=5)


# ----------------------------------------------------------------------- simplex ETF
@pytest.mark.parametrize("scale", [1.0, 3.7])
@pytest.mark.parametrize("K,d", [(2, 2), (2, 6), (3, 3), (5, 9), (10, 10), (10, 16)])
def test_exact_simplex_etf_is_fully_collapsed(K, d, scale):
    rng = np.random.default_rng(K * 100 + d)
    V = simplex_etf(K, d, rng)  # K × d, unit rows, Gram = E
    np.testing.assert_allclose(V @ V.T, (K / (K - 1)) * (np.eye(K) - 1.0 / K), atol=1e-12)
    H, y = collapsed(scale * V, 4)
    ms = all_metrics(H, y, K, W=V, b=np.zeros(K), batch_size=3)
    for name in (
        "nc1",
        "nc1_trace",
        "cdnv",
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_dist_means",
        "nc2_equinorm_classifier",
        "nc2_equiangular_classifier",
        "nc2_maxangle_classifier",
        "nc2_etf_dist_classifier",
        "nc3",
        "nc4",
    ):
        assert math.isfinite(ms[name]), (name, ms.reasons.get(name))
        assert 0.0 <= ms[name] <= TINY, (name, ms[name])
    assert math.isclose(ms["nc3_cos"], 1.0, abs_tol=TINY)
    assert ms["acc"] == 1.0
    assert ms["ncc_acc"] == 1.0


@pytest.mark.parametrize("K,d", [(3, 5), (10, 12)])
def test_simplex_etf_with_global_offset_and_compensating_bias(K, d):
    """A shared offset ``c`` changes nothing once centred; ``b = -Wc`` keeps the decisions."""
    rng = np.random.default_rng(3)
    V = simplex_etf(K, d, rng)
    c = 25.0 * rng.standard_normal(d)
    H, y = collapsed(2.0 * V + c, 3)
    W = 5.0 * V  # nc3 and the classifier's NC2 are scale-free
    ms = all_metrics(H, y, K, W=W, b=-W @ c)
    for name in ("nc1", "nc2_etf_dist_means", "nc2_etf_dist_classifier", "nc3", "nc4"):
        assert 0.0 <= ms[name] <= TINY, (name, ms[name])
    assert ms["acc"] == 1.0


@pytest.mark.parametrize("K,d,alpha,s", [(2, 2, 1.0, 0.1), (3, 3, 2.0, 0.3), (10, 14, 5.0, 0.2)])
def test_simplex_etf_with_known_spread(K, d, alpha, s):
    """Samples ``α v_k ± s e_j`` (j = 1..d, 2d per class): class means are exactly ``α v_k``,
    ``μ_G = 0`` and ``Σ_W = (s²/d) I``.  With ``V Vᵀ = E`` (eigenvalue K/(K-1) on a
    (K-1)-dim subspace P), ``Σ_B = (1/K) α² Vᵀ V = α²/(K-1) P``, ``Σ_B⁺ = (K-1)/α² P``:

      nc1       = (1/K) Tr(Σ_W Σ_B⁺) = (1/K)(s²/d)(K-1)/α² (K-1) = s²(K-1)² / (K d α²)
      nc1_trace = Tr(Σ_W)/Tr(Σ_B)    = s² / α²
      cdnv      = (s² + s²) / (2 ||α v_k - α v_l||²),  ||α v_k - α v_l||² = α² (2 + 2/(K-1))
                = s² (K-1) / (2 K α²)           (σ_k² = s² for every class)
    """
    rng = np.random.default_rng(K + d)
    V = simplex_etf(K, d, rng)
    steps = np.concatenate([s * np.eye(d), -s * np.eye(d)])  # 2d × d
    H = np.concatenate([alpha * V[k] + steps for k in range(K)])
    y = np.repeat(np.arange(K), 2 * d)
    perm = rng.permutation(len(y))
    H, y = H[perm], y[perm]
    ms = all_metrics(H, y, K, W=V, batch_size=7)
    assert_metric_close("nc1", ms["nc1"], s**2 * (K - 1) ** 2 / (K * d * alpha**2))
    assert_metric_close("nc1_trace", ms["nc1_trace"], s**2 / alpha**2)
    assert_metric_close("cdnv", ms["cdnv"], s**2 * (K - 1) / (2 * K * alpha**2))
    assert ms["nc2_etf_dist_means"] <= TINY
    assert ms["nc3"] <= TINY
    # the spread is far below the half-distance between means: every decision is right
    assert ms["nc4"] == 0.0 and ms["acc"] == 1.0 and ms["ncc_acc"] == 1.0


@pytest.mark.parametrize("rtol,keep_small", [(1e-8, True), (1e-4, False)])
def test_pseudo_inverse_threshold(rtol, keep_small):
    """K=3, d=2, equal counts: means (a, ε), (-a, ε), (0, -2ε) so μ_G = 0 and
    Σ_B = (1/3) Σ μμᵀ = diag(2a²/3, 2ε²); M (d×K) has singular values √(K·eig):
    a√2 and ε√6, ratio ε√3/a ≈ 1.7e-6 for a=1, ε=1e-6.  Samples μ_k ± s e_j give
    Σ_W = (s²/2) I.  nc1 = (1/3)(s²/2)(3/(2a²) + 1/(2ε²)) when the small direction is
    kept (rtol=1e-8), and (1/3)(s²/2)(3/(2a²)) = s²/(4a²) when dropped (rtol=1e-4)."""
    from nccli.metrics import compute_metrics

    a, eps, s = 1.0, 1e-6, 0.25
    means = np.array([[a, eps], [-a, eps], [0.0, -2 * eps]])
    steps = np.array([[s, 0.0], [-s, 0.0], [0.0, s], [0.0, -s]])
    H = np.concatenate([means[k] + steps for k in range(3)])
    y = np.repeat(np.arange(3), 4)
    st = engine_stats(H, y, 3)
    got = compute_metrics(st, rtol=rtol)["nc1"]
    if keep_small:
        want = (s**2 / 6) * (3 / (2 * a**2) + 1 / (2 * eps**2))
        rel = 1e-6  # the ε-direction is resolved from means of O(1) numbers
    else:
        want = s**2 / (4 * a**2)
        rel = 1e-9
    assert_metric_close("nc1", got, want, rel=rel)


def test_two_classes_on_a_line():
    """K=2, d=1: classes at ±a, samples ±s around them.  Σ_W = s², Σ_B = a²:
    nc1 = (1/2) s²/a², nc1_trace = s²/a², cdnv = 2s²/(2·4a²) = s²/(4a²)."""
    a, s = 3.0, 0.5
    H = np.array([[-a - s], [-a + s], [a - s], [a + s]] * 3)
    y = np.array([0, 0, 1, 1] * 3)
    ms = all_metrics(H, y, 2, W=np.array([[-1.0], [1.0]]))
    assert_metric_close("nc1", ms["nc1"], 0.5 * s**2 / a**2)
    assert_metric_close("nc1_trace", ms["nc1_trace"], s**2 / a**2)
    assert_metric_close("cdnv", ms["cdnv"], s**2 / (4 * a**2))
    assert ms["nc2_etf_dist_means"] <= TINY  # two opposite vectors are a 2-ETF
    assert ms["nc3"] <= TINY


# ------------------------------------------------------------------ orthogonal frame
def orthogonal_frame_etf_dist(K):
    """etf_dist of an orthogonal frame, by hand.

    Uncentred means ``u_k = c e_k`` have Gram ``G = c² I``, so ``G/||G||_F = I/√K``
    (the same for the classifier ``W = I``, whose Gram is ``I``).  With
    ``||E||_F = K/√(K-1)`` and ``<I, E>_F = Tr E = K``:

      || I/√K - E/||E||_F ||_F² = 1 + 1 - 2 <I, E> / (√K · K/√(K-1))
                                = 2 - 2 √((K-1)/K)

    so ``etf_dist = sqrt(2 (1 - sqrt((K-1)/K)))``  (K=2: 0.7654, K=10: 0.2291).
    """
    return math.sqrt(2.0 * (1.0 - math.sqrt((K - 1) / K)))


@pytest.mark.parametrize("K", [2, 3, 10])
def test_orthogonal_frame_closed_form_self_check(K):
    """The hand derivation agrees with the reference on the uncentred Gram."""
    U = 2.5 * np.eye(K)
    assert math.isclose(nc2_metrics(U)["etf_dist"], orthogonal_frame_etf_dist(K), rel_tol=1e-12)


@pytest.mark.parametrize("c", [1.0, 4.0])
@pytest.mark.parametrize("K,d", [(2, 2), (3, 3), (3, 7), (10, 10), (10, 13)])
def test_orthogonal_frame(K, d, c):
    """Means ``c e_k`` with equal counts and classifier ``W = [I_K | 0]``.

    Centred by the global mean, ``μ_k - μ_G = c (e_k - 1/K)`` whose Gram is
    ``c² (I - 11ᵀ/K) ∝ E``: the centred means ARE a simplex ETF (etf_dist_means = 0).
    The classifier rows are orthonormal: equinorm = equiangular = 0, every cosine is 0 so
    maxangle = 1/(K-1), and etf_dist_classifier is the closed form above.
    NC3: ``||W||_F = √K``, ``||M||_F² = K c² (K-1)/K = c²(K-1)``, ``<W, M> = K c (1-1/K)``:
    nc3 = 2 - 2 c(K-1)/(√K c √(K-1)) = 2 (1 - √((K-1)/K)) = etf_dist²;
    nc3_cos = mean_k (1-1/K) / √((K-1)/K) = √((K-1)/K).
    """
    means = np.zeros((K, d))
    means[:, :K] = c * np.eye(K)
    W = np.eye(d)[:K]
    H, y = collapsed(means, 5)
    ms = all_metrics(H, y, K, W=W, b=np.zeros(K), batch_size=4)
    for name in (
        "nc1",
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_dist_means",
        "nc2_equinorm_classifier",
        "nc2_equiangular_classifier",
        "nc4",
    ):
        assert 0.0 <= ms[name] <= TINY, (name, ms[name])
    closed = orthogonal_frame_etf_dist(K)
    assert_metric_close("nc2_etf_dist_classifier", ms["nc2_etf_dist_classifier"], closed)
    assert_metric_close("nc2_maxangle_classifier", ms["nc2_maxangle_classifier"], 1 / (K - 1))
    assert_metric_close("nc3", ms["nc3"], closed**2)
    assert_metric_close("nc3_cos", ms["nc3_cos"], math.sqrt((K - 1) / K))
    assert ms["acc"] == 1.0 and ms["ncc_acc"] == 1.0


@pytest.mark.parametrize("K", [3, 10])
def test_imbalanced_orthogonal_frame_centring(K):
    """With unequal counts the sample-weighted centring breaks the ETF, while
    ``center="classmean"`` subtracts (c/K)·1 exactly and recovers it."""
    means = 3.0 * np.eye(K)
    counts = np.arange(1, K + 1) * 3
    H, y = collapsed(means, counts)
    W = np.eye(K)
    g = all_metrics(H, y, K, W=W, center="global")
    cm = all_metrics(H, y, K, W=W, center="classmean")
    assert cm["nc2_etf_dist_means"] <= TINY
    assert cm["nc2_equinorm_means"] <= TINY
    assert_metric_close("nc3 (classmean)", cm["nc3"], orthogonal_frame_etf_dist(K) ** 2)
    assert g["nc2_etf_dist_means"] > 1e-3
    assert g["nc2_equinorm_means"] > 1e-3
    # nc1 is 0 either way (no within-class spread); the classifier metrics ignore centring
    assert g["nc1"] <= TINY and cm["nc1"] <= TINY
    assert g["nc2_etf_dist_classifier"] == cm["nc2_etf_dist_classifier"]
