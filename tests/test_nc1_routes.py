"""The two exact routes to nc1 (d×K SVD; K×K Gram + Cholesky) give the same number."""

from __future__ import annotations

import numpy as np
import pytest

from nccli import ClassStats
from nccli.metrics import compute_metrics, nc
from nccli.metrics.deep_linear import cond


def _stats(K: int, d: int, seed: int, spread: float = 1.0) -> ClassStats:
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 40, K)
    y = np.repeat(np.arange(K), counts)
    H = 3 * rng.normal(size=(K, d))[y] + spread * rng.normal(size=(y.size, d))
    return ClassStats.from_arrays(H, y, K, batch_size=997)


@pytest.mark.parametrize(("K", "d"), [(70, 80), (100, 300), (128, 128)])
@pytest.mark.parametrize("center", ["global", "classmean"])
def test_gram_route_equals_svd_route(K, d, center):
    st = _stats(K, d, seed=K + d)
    svd = nc.nc1(st, center, method="svd")
    gram = nc.nc1(st, center, method="gram")
    assert gram == pytest.approx(svd, rel=1e-10)
    # the default picks the Gram route here and must agree too
    assert compute_metrics(st, center=center, names=["nc1"])["nc1"] == pytest.approx(svd, rel=1e-10)


def test_gram_route_falls_back_when_degenerate():
    """d < K-1: the Gram matrix is singular, the SVD route (with its rtol cut-off) answers."""
    st = _stats(80, 20, seed=1)
    with pytest.raises(nc.Undefined):
        nc.nc1(st, method="gram")
    assert nc.nc1(st, method="auto") == pytest.approx(nc.nc1(st, method="svd"), rel=1e-12)


def test_cond_from_gram_matches_svd():
    st = _stats(90, 120, seed=3)
    via_gram = cond(st)  # many classes: singular values from the reduced Gram
    s = np.linalg.svd(nc.centred_means(st), compute_uv=False)
    assert via_gram == pytest.approx(s[0] / s[len(s) - 2], rel=1e-8)


def test_gram_route_respects_rtol():
    """A singular value between rtol·s_max and the Gram route's margin sends nc1 to the SVD,
    so both routes drop the same directions (docs/metrics.md: cut-off rtol·s_max)."""
    rng = np.random.default_rng(1)
    K, d = 64, 100
    U, _ = np.linalg.qr(rng.normal(size=(d, K - 1)))
    # P: K×(K-1) orthonormal columns orthogonal to 1, so P diag(s) Uᵀ are centred means
    # (balanced classes) whose singular values are exactly s
    P, _ = np.linalg.qr(np.eye(K)[:, 1:] - 1.0 / K)
    s = np.ones(K - 1)
    s[5] = 5e-3  # one direction of the class means 200× shorter than the others
    y = np.repeat(np.arange(K), 5)
    H = (P * s @ U.T)[y] + 1e-4 * rng.normal(size=(y.size, d))
    st = ClassStats.from_arrays(H, y, K)
    for rtol in (1e-2, 1e-8):
        assert nc.nc1(st, rtol=rtol) == pytest.approx(nc.nc1(st, rtol=rtol, method="svd"), rel=1e-9)
    assert nc.nc1(st, rtol=1e-2) < 0.5 * nc.nc1(st, rtol=1e-8)  # the cut-off matters here
