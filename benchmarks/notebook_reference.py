"""The straightforward way paper notebooks compute NC metrics, kept as a timing baseline.

Σ_W is accumulated from one outer product per sample, Σ_B⁺ comes from a d×d
pseudo-inverse, and NC4 loops over samples computing distances to every class mean.
This mirrors the structure of the published analysis notebooks (not their code); it is
correct, just slow, and the benchmarks time nccli against it on the same features.
"""

from __future__ import annotations

import numpy as np


def notebook_metrics(
    H: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, K: int
) -> dict[str, float]:
    """nc1 and nc4 the notebook way (float64, per-sample loops)."""
    H = np.asarray(H, dtype=np.float64)
    d = H.shape[1]
    means = np.stack([H[y == k].mean(axis=0) for k in range(K)])
    mu_g = H.mean(axis=0)
    sigma_w = np.zeros((d, d))
    for i in range(H.shape[0]):  # one outer product per sample, as in the notebooks
        v = H[i] - means[y[i]]
        sigma_w += np.outer(v, v)
    sigma_w /= H.shape[0]
    M = means - mu_g
    sigma_b = M.T @ M / K
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-8, hermitian=True)) / K)
    mismatch = 0
    for i in range(H.shape[0]):  # per-sample nearest-class-centre decision
        pred = int(np.argmax(W @ H[i] + b))
        ncc = int(np.argmin(np.linalg.norm(means - H[i], axis=1)))
        mismatch += pred != ncc
    return {"nc1": nc1, "nc4": mismatch / H.shape[0]}
