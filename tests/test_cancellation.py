"""Near collapse the within-class spread is tiny beside the means: the statistics must be
accumulated in float64 with centred (two-pass / Chan) updates, never from raw moments
``Σ hhᵀ - N μμᵀ`` (docs/metrics.md, "How the numbers are computed")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import assert_array_close, engine_metrics, engine_stats, reference_metrics

K, D, N_PER = 4, 16, 150


def two_pass_nc1(H64, y, K):
    """Textbook two-pass float64 NC1: class means, then centred scatter; Σ_B⁺ by pinv."""
    N, d = H64.shape
    means = np.stack([H64[y == k].mean(axis=0) for k in range(K)])
    centred = H64 - means[y]
    sigma_w = centred.T @ centred / N
    M = means - H64.mean(axis=0)
    sigma_b = M.T @ M / K
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / K)


@pytest.fixture(scope="module")
def data():
    """float32 features = 1e4·(per-class offset + shared big offset) + 1e-3·noise.

    Around 3e4 a float32 ulp is ~2e-3, so the within-class spread is a few ulps while
    the mean is ~3e4: a raw-moment or float32 accumulation loses every digit of Σ_W.
    """
    rng = np.random.default_rng(2024)
    shared = 3.0 + 0.1 * rng.standard_normal(D)
    offsets = rng.standard_normal((K, D))
    y = np.repeat(np.arange(K), N_PER)
    rng.shuffle(y)
    noise = rng.standard_normal((len(y), D))
    H32 = (1e4 * (offsets[y] + shared) + 1e-3 * noise).astype(np.float32)
    H64 = H32.astype(np.float64)
    # the data really is in the cancellation regime, and not degenerate
    within = H64 - np.stack([H64[y == k].mean(axis=0) for k in range(K)])[y]
    assert 1e-5 < np.std(within) < 1e-2
    assert np.mean(np.abs(H64)) > 1e4
    return H32, H64, y


@pytest.mark.parametrize("batch_size", [None, 64, 7])
def test_nc1_survives_cancellation(data, batch_size):
    H32, H64, y = data
    want = two_pass_nc1(H64, y, K)
    assert 1e-16 < want < 1e-6  # tiny but far from zero
    st = engine_stats(H32, y, K, batch_size=batch_size)
    got = engine_metrics(st)["nc1"]
    assert math.isclose(got, want, rel_tol=1e-6), (got, want, abs(got - want) / want)
    # the slow per-class reference agrees with the two-pass one
    assert math.isclose(reference_metrics(H64, y, K)["nc1"], want, rel_tol=1e-9)


def test_scatter_survives_cancellation(data):
    H32, H64, y = data
    means = np.stack([H64[y == k].mean(axis=0) for k in range(K)])
    centred = H64 - means[y]
    st = engine_stats(H32, y, K, batch_size=50)
    assert_array_close("scatter", st.scatter, centred.T @ centred, rel=1e-6)
    ss = np.array([np.sum(centred[y == k] ** 2) for k in range(K)])
    assert_array_close("class_ss", st.class_ss, ss, rel=1e-6)
    m = engine_metrics(st)
    ref = reference_metrics(H64, y, K)
    for name in ("nc1_trace", "cdnv"):
        assert math.isclose(m[name], ref[name], rel_tol=1e-6), (name, m[name], ref[name])


def test_sharded_torch_input_survives_cancellation(data):
    """Four shards of torch float32 batches merged: same answer."""
    import torch

    H32, H64, y = data
    want = two_pass_nc1(H64, y, K)
    parts = np.array_split(np.arange(len(y)), 4)
    shards = [
        engine_stats(torch.from_numpy(H32[p]), torch.from_numpy(y[p]), K, batch_size=32)
        for p in parts
    ]
    merged = shards[0].merge(shards[1]).merge(shards[2].merge(shards[3]))
    got = engine_metrics(merged)["nc1"]
    assert math.isclose(got, want, rel_tol=1e-6), (got, want)


@pytest.mark.parametrize("batch_size", [None, 64, 7])
def test_default_precision_pins_nc1_to_1e_7(data, batch_size):
    """The default precision (issue 16) keeps nc1 within 1e-7 of the float64 two-pass value
    on the cancellation data (offset 1e4, spread 1e-3)."""
    from nccli.stats import ClassStats

    H32, H64, y = data
    want = two_pass_nc1(H64, y, K)
    st = ClassStats.from_arrays(H32, y, K, batch_size=batch_size)
    assert st.precision == "exact"
    got = engine_metrics(st)["nc1"]
    assert abs(got - want) / want <= 1e-7, (got, want, abs(got - want) / want)


@pytest.mark.parametrize("batch_size", [None, 64])
def test_fast_precision_errs_on_the_spread_not_the_offset(data, batch_size):
    """``precision="fast"`` rounds the rows *after* centring them in float64, so its error
    is a few float32 roundings of the spread (docs/metrics.md, "Precision of the
    scatter"), not of the 1e4 offset: a float32 product of the raw rows loses every digit."""
    from nccli.stats import ClassStats

    H32, H64, y = data
    want = two_pass_nc1(H64, y, K)
    st = ClassStats.from_arrays(H32, y, K, batch_size=batch_size, precision="fast")
    got = engine_metrics(st)["nc1"]
    assert abs(got - want) / want <= 5e-6, (got, want, abs(got - want) / want)
    with pytest.raises(Exception, match="precision"):
        ClassStats(K, D, precision="half")
