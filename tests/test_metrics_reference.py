"""Engine vs the slow float64 reference (tests/reference.py) on random data.

Every metric the reference defines must agree to 1e-9 relative (1e-12 absolute near
zero); the sufficient statistics to 1e-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    CLASSIFIER_METRICS,
    STATS_METRICS,
    assert_array_close,
    assert_metric_close,
    engine_metrics,
    engine_stats,
    reference_metrics,
    reference_stats,
)

# (K, d): d > K, d = K, d = K-1 and (where K allows) d < K-1
SHAPES = [(2, 1), (2, 2), (2, 7), (3, 2), (3, 3), (3, 9), (10, 9), (10, 10), (10, 25)]
SMALL_D = [(3, 1), (10, 3), (10, 6)]  # d < K-1


def make_data(K, d, balanced, seed, n_per=25, spread=0.7, offset=3.0):
    """Gaussian classes around random means, a shared offset, and a classifier aligned
    with the centred means plus noise (so acc and nc4 are neither 0 nor 1)."""
    rng = np.random.default_rng(seed)
    if balanced:
        counts = np.full(K, n_per)
    else:
        counts = rng.integers(3, 3 * n_per, size=K)
        counts[0] = 2  # a tiny class
    mus = 2.0 * rng.standard_normal((K, d)) + offset * rng.standard_normal(d)
    H = np.concatenate([mus[k] + spread * rng.standard_normal((counts[k], d)) for k in range(K)])
    y = np.concatenate([np.full(counts[k], k) for k in range(K)])
    perm = rng.permutation(len(y))
    H, y = H[perm], y[perm]
    W = (mus - mus.mean(axis=0)) + 0.8 * rng.standard_normal((K, d))
    b = 0.5 * rng.standard_normal(K)
    return H, y, W, b


def check_against_reference(H, y, K, W, b, center, small_d=False):
    stats = engine_stats(H, y, K)
    ms = engine_metrics(stats, H, y, W, b, center=center, chunk=13)
    ref = reference_metrics(np.asarray(H, dtype=np.float64), y, K, W, b, center=center)
    for name, want in ref.items():
        assert name in ms, f"engine does not report {name}"
        got = ms[name]
        if small_d and math.isnan(got):
            assert ms.reasons.get(name), f"{name} is nan without a reason"
            continue
        assert_metric_close(name, got, want)
    return stats, ms, ref


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize(
    "balanced,center", [(True, "global"), (False, "global"), (False, "classmean")]
)
@pytest.mark.parametrize("K,d", SHAPES)
def test_metrics_match_reference(K, d, balanced, center, with_w):
    seed = 1000 * K + 10 * d + 2 * balanced + with_w
    H, y, W, b = make_data(K, d, balanced, seed)
    if not with_w:
        W = b = None
    _, ms, ref = check_against_reference(H, y, K, W, b, center)
    if not with_w:
        # classifier metrics are absent or nan with a reason; NCC accuracy needs no W
        for name in CLASSIFIER_METRICS:
            if name in ms and name != "ncc_acc":
                assert math.isnan(ms[name]), f"{name} = {ms[name]} without a classifier"
                assert ms.reasons.get(name), f"{name} is nan without a reason"
    # every defined stats metric is really defined here
    for name in STATS_METRICS:
        assert math.isfinite(ms[name]), (name, ms[name], ms.reasons.get(name))
    assert set(ref) <= set(ms)


def test_metrics_values_are_not_trivial():
    """Guard against a vacuous comparison: the random data gives non-degenerate values."""
    H, y, W, b = make_data(10, 25, False, 7)
    ref = reference_metrics(H, y, 10, W, b)
    assert 0.01 < ref["nc1"] < 100
    assert 0.0 < ref["nc4"] < 1.0
    assert 0.0 < ref["acc"] < 1.0
    for name in ref:
        if name not in ("nc4",):
            assert ref[name] != 0.0, name


def test_global_and_classmean_centring_differ_for_imbalanced_data():
    H, y, W, b = make_data(3, 9, False, 11)
    stats = engine_stats(H, y, 3)
    g = engine_metrics(stats, W=W, center="global")
    c = engine_metrics(stats, W=W, center="classmean")
    assert not math.isclose(g["nc1"], c["nc1"], rel_tol=1e-6)
    assert not math.isclose(g["nc2_etf_dist_means"], c["nc2_etf_dist_means"], rel_tol=1e-6)


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize("K,d", SMALL_D)
def test_small_dimension_no_crash(K, d, with_w):
    """d < K-1: Σ_B has rank d.  Every metric is finite or nan with a reason, and a
    finite value agrees with the reference."""
    H, y, W, b = make_data(K, d, False, 99 + K + d)
    if not with_w:
        W = b = None
    _, ms, _ = check_against_reference(H, y, K, W, b, "global", small_d=True)
    for name, value in ms.items():
        assert isinstance(value, float)
        assert math.isfinite(value) or ms.reasons.get(name), name


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("K,d", [(2, 7), (3, 3), (10, 4), (10, 25)])
def test_stats_match_reference(K, d, balanced):
    H, y, _, _ = make_data(K, d, balanced, 5 * K + d)
    ref = reference_stats(H, y, K)
    for batch_size in (None, 17):
        st = engine_stats(H, y, K, batch_size=batch_size)
        assert st.n == len(y)
        assert st.counts.dtype == np.int64
        np.testing.assert_array_equal(st.counts, ref["counts"])
        for name in ("means", "scatter", "class_ss"):
            got = getattr(st, name)
            assert got.dtype == np.float64, name
            assert_array_close(name, got, ref[name], rel=1e-10)
        # S_W is symmetric PSD; Tr(S_W) = Σ_k SS_k
        np.testing.assert_array_equal(st.scatter, st.scatter.T)
        assert math.isclose(np.trace(st.scatter), st.class_ss.sum(), rel_tol=1e-12)


@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float64", "torch.float32", "torch.bfloat16"]
)
def test_any_float_dtype_is_accumulated_in_float64(dtype):
    """Features in any float dtype: the statistics equal the float64 reference of the same
    (cast) values, i.e. nothing is accumulated in the low precision."""
    import torch

    K, d = 4, 6
    H, y, W, b = make_data(K, d, False, 3, spread=0.3, offset=50.0)
    if dtype.startswith("torch."):
        t = torch.as_tensor(H).to(getattr(torch, dtype.split(".")[1]))
        feats, labels = t, torch.as_tensor(y)
        H64 = t.to(torch.float64).numpy()
    else:
        feats = H.astype(dtype)
        labels = y
        H64 = feats.astype(np.float64)
    ref = reference_metrics(H64, y, K, W, b)
    rst = reference_stats(H64, y, K)
    st = engine_stats(feats, labels, K, batch_size=9)
    for name in ("means", "scatter", "class_ss"):
        assert_array_close(name, getattr(st, name), rst[name], rel=1e-10)
    ms = engine_metrics(st, W=W, b=b)
    for name in ref:
        if name in ms and name not in ("nc4", "acc", "ncc_acc"):
            assert_metric_close(name, ms[name], ref[name])


def test_classifier_as_torch_tensor():
    import torch

    H, y, W, b = make_data(3, 5, True, 21)
    st = engine_stats(H, y, 3)
    a = engine_metrics(st, H, y, W, b)
    t = engine_metrics(
        st, torch.as_tensor(H), torch.as_tensor(y), torch.as_tensor(W), torch.as_tensor(b)
    )
    for name in a:
        assert math.isclose(a[name], t[name], rel_tol=1e-12, abs_tol=1e-15), name
