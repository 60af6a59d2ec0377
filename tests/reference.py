"""A slow, obvious float64 reference for every number in docs/metrics.md.

Written straight from the spec with per-class Python loops and an explicit
``numpy.linalg.pinv``; it shares nothing with the engine (``nccli.stats`` /
``nccli.metrics``) on purpose, so the tests compare two independent implementations.

Conventions (docs/metrics.md):

- ``Σ_W = (1/N) Σ_i (h_i-μ_{y_i})(h_i-μ_{y_i})ᵀ`` (divide by N), ``Σ_B = (1/K) Σ_k M_k M_kᵀ``.
- ``nc1 = (1/K) Tr(Σ_W Σ_B⁺)``; ``Σ_B⁺`` keeps only the non-trivial (≤ K-1) directions.
- ``μ_G`` is the sample-weighted global mean (``center="global"``) or the unweighted
  mean of the class means (``center="classmean"``).
- NC2 ``std`` is the population std (ddof=0), over ordered pairs ``k ≠ l`` for cosines.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

NAN = float("nan")

#: metrics that need the classifier ``W``
CLASSIFIER_METRICS = (
    "nc2_equinorm_classifier",
    "nc2_equiangular_classifier",
    "nc2_maxangle_classifier",
    "nc2_etf_dist_classifier",
    "nc3",
    "nc3_cos",
    "nc4",
    "acc",
    "ncc_acc",
)

#: metrics computed from the statistics alone
STATS_METRICS = (
    "nc1",
    "nc1_trace",
    "cdnv",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_dist_means",
)


def reference_stats(H, y, K):
    """``counts`` (K,), ``means`` (K, d), ``scatter`` = N·Σ_W (d, d), ``class_ss`` (K,).

    Two-pass per class: the class mean first, then the centred sums.  Empty classes get
    a zero count, a NaN mean and zero sums.
    """
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    N, d = H.shape
    counts = np.zeros(K, dtype=np.int64)
    means = np.full((K, d), NAN)
    scatter = np.zeros((d, d))
    class_ss = np.zeros(K)
    for k in range(K):
        rows = H[y == k]
        counts[k] = rows.shape[0]
        if counts[k] == 0:
            continue
        mu = rows.sum(axis=0) / counts[k]
        means[k] = mu
        for h in rows:
            dev = h - mu
            scatter += np.outer(dev, dev)
            class_ss[k] += float(dev @ dev)
    return {"counts": counts, "means": means, "scatter": scatter, "class_ss": class_ss}


def global_mean(counts, means, center="global"):
    """``μ_G``: sample-weighted mean of the class means, or their plain mean."""
    K = len(counts)
    if center == "global":
        total = np.zeros(means.shape[1])
        for k in range(K):
            if counts[k] > 0:
                total += counts[k] * means[k]
        return total / counts.sum()
    if center == "classmean":
        return np.mean([means[k] for k in range(K)], axis=0)
    raise ValueError(center)


def etf_gram(K):
    """``E = (K/(K-1)) (I_K - 11ᵀ/K)``."""
    return K / (K - 1) * (np.eye(K) - np.ones((K, K)) / K)


def cosine(a, b):
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


def nc2_metrics(V):
    """equinorm, equiangular, maxangle, etf_dist of the rows ``v_k`` of V (K, d)."""
    V = np.asarray(V, dtype=np.float64)
    K = V.shape[0]
    norms = np.array([math.sqrt(float(v @ v)) for v in V])
    out = {"equinorm": float(np.std(norms) / np.mean(norms))}
    cos = [cosine(V[k], V[l]) for k in range(K) for l in range(K) if k != l]
    out["equiangular"] = float(np.std(cos))
    out["maxangle"] = float(np.mean([abs(c + 1.0 / (K - 1)) for c in cos]))
    G = np.array([[float(V[k] @ V[l]) for l in range(K)] for k in range(K)])
    E = etf_gram(K)
    out["etf_dist"] = float(np.linalg.norm(G / np.linalg.norm(G) - E / np.linalg.norm(E)))
    return out


def reference_metrics(H, y, K, W=None, b=None, center="global", rcond=1e-10):
    """Every metric of docs/metrics.md (NC1–NC4) for features H (N, d), labels y, K classes.

    ``rcond`` is relative to the largest eigenvalue of ``Σ_B`` (= ``s_max²/K``), so the
    default ``1e-10`` drops only round-off directions (the engine's ``rtol=1e-8`` on the
    singular values of ``M`` corresponds to ``1e-16`` here; every test keeps the genuine
    directions far above both thresholds).
    """
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    N, d = H.shape
    st = reference_stats(H, y, K)
    counts, means, scatter, class_ss = (
        st["counts"],
        st["means"],
        st["scatter"],
        st["class_ss"],
    )
    out = {}
    muG = global_mean(counts, means, center)
    M = np.stack([means[k] - muG for k in range(K)])  # K × d (rows are the columns of M)

    # ---- NC1
    sigma_w = scatter / N
    sigma_b = np.zeros((d, d))
    for k in range(K):
        sigma_b += np.outer(M[k], M[k])
    sigma_b /= K
    out["nc1"] = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=rcond, hermitian=True)) / K)
    out["nc1_trace"] = float(np.trace(sigma_w) / np.trace(sigma_b))
    var = [class_ss[k] / counts[k] for k in range(K)]
    terms = []
    for k, l in itertools.combinations(range(K), 2):
        diff = means[k] - means[l]
        terms.append((var[k] + var[l]) / (2.0 * float(diff @ diff)))
    out["cdnv"] = float(np.mean(terms))

    # ---- NC2 on centred means
    for name, value in nc2_metrics(M).items():
        out[f"nc2_{name}_means"] = value

    if W is None:
        return out
    W = np.asarray(W, dtype=np.float64)
    bias = np.zeros(K) if b is None else np.asarray(b, dtype=np.float64)

    # ---- NC2 on classifier rows
    for name, value in nc2_metrics(W).items():
        out[f"nc2_{name}_classifier"] = value

    # ---- NC3
    D = W.T / np.linalg.norm(W) - M.T / np.linalg.norm(M)
    out["nc3"] = float(np.sum(D**2))
    out["nc3_cos"] = float(np.mean([cosine(W[k], M[k]) for k in range(K)]))

    # ---- NC4, accuracy, NCC accuracy: one sample at a time
    mismatch = correct = ncc_correct = 0
    for i in range(N):
        h = H[i]
        logits = [float(W[k] @ h) + bias[k] for k in range(K)]
        pred = int(np.argmax(logits))
        # a class without samples has no mean and is never the nearest one
        dists = [
            float((h - means[k]) @ (h - means[k])) if counts[k] > 0 else math.inf for k in range(K)
        ]
        ncc = int(np.argmin(dists))
        mismatch += pred != ncc
        correct += pred == y[i]
        ncc_correct += ncc == y[i]
    out["nc4"] = mismatch / N
    out["acc"] = correct / N
    out["ncc_acc"] = ncc_correct / N
    return out


def simplex_etf(K, d, rng=None, scale=1.0):
    """K unit vectors in R^d (d ≥ K) forming a simplex ETF: rows of ``sqrt(K/(K-1))
    (I - 11ᵀ/K)`` embedded by a random (or the canonical) orthonormal map."""
    assert d >= K
    base = math.sqrt(K / (K - 1)) * (np.eye(K) - np.ones((K, K)) / K)  # K × K, rows unit
    if rng is None:
        Q = np.eye(d)[:K]
    else:
        Q = np.linalg.qr(rng.standard_normal((d, K)))[0].T  # K × d, orthonormal rows
    return scale * base @ Q


# --------------------------------------------------------------------------------------
# Adapter to the engine under test.  Imports are lazy so that collection works without
# it; this is the only place that knows the engine's call signatures.


def chunks(H, y, size):
    """``(features, labels)`` chunks of ``size`` rows (one chunk when ``size`` is None)."""
    n = len(y)
    size = n if not size else size
    return [(H[i : i + size], y[i : i + size]) for i in range(0, n, max(size, 1))]


def engine_stats(H, y, K, batch_size=None):
    from nccli.stats import ClassStats

    return ClassStats.from_arrays(H, y, num_classes=K, batch_size=batch_size)


def engine_metrics(stats, H=None, y=None, W=None, b=None, center="global", chunk=None):
    """Every engine metric: ``compute_metrics`` plus, with a classifier and the features,
    the second pass ``nc4_pass``.  Returns the engine's MetricSet (a dict with
    ``.reasons``)."""
    from nccli.metrics import compute_metrics, nc4_pass

    ms = compute_metrics(stats, W, b, center=center)
    if W is not None and H is not None:
        ms.update(nc4_pass(chunks(H, y, chunk), stats, W, b))
    return ms


def assert_metric_close(name, got, want, rel=1e-9, abs_tol=1e-12):
    """``got`` equals ``want`` to ``rel`` relative, or ``abs_tol`` absolute near zero."""
    assert isinstance(got, float), f"{name}: engine returned {type(got).__name__}"
    assert math.isfinite(want), f"{name}: reference is not finite ({want})"
    assert math.isfinite(got), f"{name}: engine gave {got}, reference {want!r}"
    assert math.isclose(got, want, rel_tol=rel, abs_tol=abs_tol), (
        f"{name}: engine {got!r} != reference {want!r} "
        f"(rel err {abs(got - want) / max(abs(want), 1e-300):.3e})"
    )


def assert_array_close(name, got, want, rel=1e-10):
    """Arrays equal to ``rel`` relative to the largest entry of ``want`` (entries that are
    structurally zero, e.g. off-diagonal scatter, are judged on that scale)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale, err_msg=name)


# ---------------------------------------------------------------- direct K×K pairwise metrics
# The implementations nccli used before its pairwise metrics were tiled (issue 15): every
# pairwise metric from one K×K float64 matrix, and the NC4 pass from one GEMM against the
# whole of [W; μ].  Slow and memory-hungry on purpose; tests/test_large_k.py checks the tiled
# engine against them.


def direct_cosines(V):
    """``G / (||v_k|| ||v_l||)`` with ``G = V Vᵀ`` (K×K)."""
    V = np.asarray(V, dtype=np.float64)
    norms = np.linalg.norm(V, axis=1)
    return (V @ V.T) / np.outer(norms, norms)


def _offdiag(C):
    return C[~np.eye(C.shape[0], dtype=bool)]


def direct_equiangular(V):
    return float(np.std(_offdiag(direct_cosines(V))))


def direct_maxangle(V):
    K = np.asarray(V).shape[0]
    return float(np.mean(np.abs(_offdiag(direct_cosines(V)) + 1.0 / (K - 1))))


def direct_etf_dist(V):
    V = np.asarray(V, dtype=np.float64)
    G = V @ V.T
    E = etf_gram(V.shape[0])
    return float(np.linalg.norm(G / np.linalg.norm(G) - E / np.linalg.norm(E)))


def closed_form_etf_dist(V):
    """``sqrt(2 - 2 tr(GE)/(||G||_F ||E||_F))`` with ``tr(GE) = (K/(K-1))(tr G - ||V1||²/K)``
    and ``||G||_F = ||VᵀV||_F``: exact algebra, cancels near collapse (a cross-check only)."""
    V = np.asarray(V, dtype=np.float64)
    K = V.shape[0]
    A = V.T @ V
    g = math.sqrt(float(np.sum(A * A)))
    s = V.sum(axis=0)
    tr_ge = K / (K - 1) * (float(np.sum(V * V)) - float(s @ s) / K)
    return math.sqrt(max(0.0, 2.0 - 2.0 * tr_ge / (g * K / math.sqrt(K - 1))))


def direct_of_maxcos(V):
    C = np.abs(np.clip(direct_cosines(V), -1.0, 1.0))
    np.fill_diagonal(C, 0.0)
    return float(C.max())


def direct_minority_collapse(W, counts):
    counts = np.asarray(counts, dtype=np.float64)
    idx = np.flatnonzero(counts < np.median(counts))
    C = direct_cosines(np.asarray(W, dtype=np.float64)[idx])
    k, l = np.triu_indices(idx.size, 1)
    return float(np.mean(C[k, l]))


def direct_cdnv(means, var):
    """``mean_{k<l} (σ_k²+σ_l²)/(2||μ_k-μ_l||²)`` from the K×K matrix of differences."""
    means = np.asarray(means, dtype=np.float64)
    k, l = np.triu_indices(means.shape[0], 1)
    diff = means[k] - means[l]
    d2 = np.sum(diff * diff, axis=1)
    return float(np.mean((var[k] + var[l]) / (2.0 * d2)))


def direct_nc4(H, y, means, counts, W, b=None):
    """``nc4``, ``acc``, ``ncc_acc`` with one GEMM against the whole ``[W; μ]`` (as before
    the class tiles): distances from the sample-weighted global mean, ties to the first index."""
    W = np.asarray(W, dtype=np.float64)
    K = W.shape[0]
    b = np.zeros(K) if b is None else np.asarray(b, dtype=np.float64)
    counts = np.asarray(counts)
    mu_g = (counts.astype(np.float64) @ means) / counts.sum()
    mu = means - mu_g
    mu_sq = np.sum(mu * mu, axis=1)
    mu_sq[counts == 0] = np.inf
    hc = np.asarray(H, dtype=np.float64) - mu_g
    prod = hc @ np.concatenate([W, mu], axis=0).T
    pred = np.argmax(prod[:, :K] + (b + W @ mu_g), axis=1)
    ncc = np.argmin(mu_sq - 2.0 * prod[:, K:], axis=1)
    y = np.asarray(y)
    n = len(y)
    return {
        "nc4": float(np.sum(pred != ncc)) / n,
        "acc": float(np.sum(pred == y)) / n,
        "ncc_acc": float(np.sum(ncc == y)) / n,
    }
