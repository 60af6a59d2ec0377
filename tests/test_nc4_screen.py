"""The NC4 pass's float32 screen (nccli/metrics/decisions.py) gives float64's decisions.

The screen scores every row in float32 and rescores in float64 the rows whose top two
scores are within twice the error bound, and the rows whose margin could be the smallest.
These tests compare it with the float64 pass (``screen=False``) on data where the screen
decides almost everything, on near-ties it cannot decide, on exact ties, on empty
classes, on inputs too large for float32, and check the error bound itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import direct_nc4

from nccli import ClassStats
from nccli.metrics import decisions


def _batches(H, y, size=700):
    for s in range(0, len(y), size):
        yield H[s : s + size], y[s : s + size]


def _both(H, y, st, W, b=None, **kw):
    fast = decisions.nc4_pass(_batches(H, y), st, W, b, **kw)
    slow = decisions.nc4_pass(_batches(H, y), st, W, b, screen=False, **kw)
    return fast, slow


def _same(fast, slow):
    assert fast.keys() == slow.keys()
    for k in ("nc4", "acc", "ncc_acc"):
        assert fast[k] == slow[k], k
    if "margin_min" in fast:  # float64 values of the same row, maybe from another GEMM shape
        assert fast["margin_min"] == pytest.approx(slow["margin_min"], rel=1e-12, abs=1e-300)


@pytest.fixture
def rescored(monkeypatch):
    """Rows the float64 rescoring sees (the screen's misses and margin candidates)."""
    seen = [0]
    real = decisions._nc4_rows

    def counting(hc, *a, **kw):
        seen[0] += hc.shape[0]
        return real(hc, *a, **kw)

    monkeypatch.setattr(decisions, "_nc4_rows", counting)
    return seen


def _collapsed(rng, N, d, K, noise=1.0):
    means = 3 * rng.normal(size=(K, d))
    y = rng.integers(0, K, N)
    y[:K] = np.arange(K)
    H = means[y] + noise * rng.normal(size=(N, d))
    return H, y, means + 0.3 * rng.normal(size=(K, d))


def test_near_collapsed_features_are_decided_by_the_screen(rescored):
    rng = np.random.default_rng(0)
    H, y, W = _collapsed(rng, 4000, 48, 800)
    b = rng.normal(size=800)
    st = ClassStats.from_arrays(H, y, 800)
    slow = decisions.nc4_pass(_batches(H, y), st, W, b, screen=False)
    rescored[0] = 0
    fast = decisions.nc4_pass(_batches(H, y), st, W, b)
    _same(fast, slow)
    assert fast == {k: v for k, v in direct_nc4(H, y, st.means, st.counts, W, b).items()} | {
        "margin_min": fast["margin_min"]
    }
    assert rescored[0] <= 0.01 * len(y)  # only the margin candidates


def test_features_that_have_not_collapsed(rescored):
    """Random features and classifier: decisions disagree often, the screen still decides
    nearly all of them and gives float64's counts."""
    rng = np.random.default_rng(1)
    K, d, N = 3000, 32, 6000
    y = rng.integers(0, K, N)
    H = rng.normal(size=(N, d)) + 5.0  # an offset the centring removes
    W, b = rng.normal(size=(K, d)), rng.normal(size=K)
    st = ClassStats.from_arrays(H, y, K)
    slow = decisions.nc4_pass(_batches(H, y), st, W, b, screen=False)
    rescored[0] = 0
    fast = decisions.nc4_pass(_batches(H, y), st, W, b)
    _same(fast, slow)
    assert fast["nc4"] > 0.9  # a random classifier and the class means disagree
    assert fast == direct_nc4(H, y, st.means, st.counts, W, b) | {"margin_min": fast["margin_min"]}
    assert rescored[0] < 0.05 * N


def test_near_ties_below_float32_resolution_are_rescored():
    """Class pairs whose weights and means differ by ~1e-10 relative (in different tiles):
    float32 cannot order them, float64 can, and the pass must agree with float64."""
    rng = np.random.default_rng(2)
    K, d, N = 600, 16, 3000
    base = rng.normal(size=(K // 2, d))
    W = np.concatenate([base, base * (1 + 1e-10)])  # class k+300 wins by 1e-10 for z > 0
    means = np.concatenate([base, base + 1e-9])
    y = rng.integers(0, K, N)
    y[:K] = np.arange(K)
    H = 2 * means[y] + 1e-3 * rng.normal(size=(N, d))
    st = ClassStats.from_arrays(H, y, K)
    fast, slow = _both(H, y, st, W, budget=8 * 4 * 256 * 64)  # tiles of 256: pairs split
    _same(fast, slow)
    want = direct_nc4(H, y, st.means, st.counts, W)
    assert {k: fast[k] for k in want} == want
    hc = H - st.global_mean()
    pred = np.argmax(hc @ W.T, axis=1)
    assert np.mean(pred >= K // 2) > 0.3  # the 1e-10 really decides many rows


def test_exact_ties_go_to_the_first_index():
    rng = np.random.default_rng(3)
    K, d = 512, 4
    W = rng.integers(-2, 3, size=(K // 2, d)).astype(float)
    W = np.concatenate([W, W])  # every class has a twin 256 later
    means = rng.integers(-3, 4, size=(K, d)).astype(float)
    y = np.repeat(np.arange(K), 2)
    H = means[y]
    st = ClassStats.from_arrays(H, y, K)
    fast, slow = _both(H, y, st, W, budget=8 * 4 * 256 * 8)
    _same(fast, slow)
    assert fast == direct_nc4(H, y, st.means, st.counts, W) | {"margin_min": fast["margin_min"]}
    assert fast["margin_min"] <= 0.0  # a twin ties the true class at best


def test_classes_without_samples_are_never_the_nearest_mean():
    rng = np.random.default_rng(4)
    K, d, N = 2000, 8, 1500  # most classes empty: their mean is 0, the centre of the data
    y = rng.integers(0, K, N)
    H = rng.normal(size=(N, d)) * 3
    W = rng.normal(size=(K, d))
    st = ClassStats.from_arrays(H, y, K)
    fast, slow = _both(H, y, st, W)
    _same(fast, slow)
    hc = H - st.global_mean()
    mu = st.means - st.global_mean()
    dist = ((hc[:, None, :] - mu[None]) ** 2).sum(-1)
    dist[:, st.counts == 0] = np.inf
    assert fast["ncc_acc"] == np.mean(np.argmin(dist, axis=1) == y)


def test_inputs_too_large_for_float32_take_the_float64_pass(rescored):
    rng = np.random.default_rng(5)
    H, y, W = _collapsed(rng, 1000, 8, 300)
    H *= 2.0**45
    st = ClassStats.from_arrays(H, y, 300)
    fast, slow = _both(H, y, st, W)
    _same(fast, slow)
    assert rescored[0] == 2 * len(y)  # every row, in both calls: no screen


def test_smallest_margin_among_near_equal_candidates():
    """Many rows whose margins differ by less than the float32 error: margin_min is still
    float64's smallest one."""
    rng = np.random.default_rng(6)
    K, d, N = 300, 12, 3000
    W = rng.normal(size=(K, d))
    y = rng.integers(0, K, N)
    y[:K] = np.arange(K)
    base = W[y] / np.linalg.norm(W[y], axis=1, keepdims=True)
    H = base * 10 + 1e-7 * rng.normal(size=(N, d))
    st = ClassStats.from_arrays(H, y, K)
    fast, slow = _both(H, y, st, W)
    _same(fast, slow)
    hc = H - st.global_mean()
    z = hc @ W.T + W @ st.global_mean()
    own = z[np.arange(N), y]
    z[np.arange(N), y] = -np.inf
    assert fast["margin_min"] == pytest.approx(
        np.min(own - z.max(axis=1)) / np.linalg.norm(W), rel=1e-9
    )


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e9])
def test_the_error_bound_holds(scale):
    """|float32 score − exact score| ≤ E on adversarial magnitudes: mixed exponents, a row
    norm dominated by one entry, d = 1000."""
    rng = np.random.default_rng(7)
    K, d, n = 50, 1000, 64
    W = rng.normal(size=(K, d)) * np.exp(rng.uniform(-20, 5, size=(K, d))) * scale
    mu = rng.normal(size=(K, d)) * scale
    b = rng.normal(size=K) * scale
    hc = rng.normal(size=(n, d)) * np.exp(rng.uniform(-20, 5, size=(n, d)))
    hc[:, 0] = 1e4
    mu_sq = np.einsum("ij,ij->i", mu, mu)
    scr = decisions._Screen(W, mu, b, mu_sq)
    assert scr.ok
    ((k0, A, M),) = scr.tiles(K)
    x = np.zeros((n, scr.n), dtype=np.float32)
    x[:, :d], x[:, d] = hc, 1.0
    got = np.concatenate([x @ A.T, x @ M.T], axis=1).astype(np.float64)
    exact_logit = hc @ W.T + b
    exact_dist = 2 * hc @ mu.T - mu_sq
    e_logit, e_dist = scr.errors(hc)
    assert np.all(np.abs(got[:, :K] - exact_logit) <= e_logit[:, None])
    assert np.all(np.abs(got[:, K:] - exact_dist) <= e_dist[:, None])
