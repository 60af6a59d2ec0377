"""Property tests (hypothesis) on generated data, beside the fixed-data ones in
``test_invariance.py``:

- ``ClassStats`` equals the float64 two-pass reference for any row order, any split into
  batches (empty ones included), any grouping into shards and any merge tree (1e-10);
- the metrics are invariant to relabelling the classes (labels and classifier rows
  permuted together), to rotating the feature space (features and classifier rows
  rotated together) and to scaling features (bias-free classifier) and classifier.
"""

from __future__ import annotations

import math

import numpy as np
from helpers import draw_merge_tree, fold_and_merge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_array_close, engine_metrics, reference_stats

from nccli.stats import ClassStats

REL = 1e-10
METRIC_REL = 1e-8
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def raw_data(draw, balanced: bool = False):
    """``(H, y, K)``: class clusters with a random offset and scale.  ``balanced``: every
    class has 2..8 samples and d >= K (every metric defined); else classes may be empty."""
    K = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if balanced:
        d = draw(st.integers(K, K + 3))
        counts = rng.integers(2, 9, size=K)
        y = rng.permutation(np.repeat(np.arange(K), counts))
    else:
        d = draw(st.integers(1, 6))
        n = draw(st.integers(1, 60))
        y = rng.integers(0, K, size=n)
    scale = 10.0 ** draw(st.integers(-3, 3))
    offset = draw(st.floats(-20.0, 20.0))
    mus = 3.0 * rng.standard_normal((K, d))
    H = (mus[y] + rng.standard_normal((len(y), d)) + offset) * scale
    return H, y, K


@st.composite
def plans(draw):
    """Data, a row order, batch cuts, a grouping of batches into shards (plus empty
    shards) and a random binary merge tree over the shards."""
    H, y, K = draw(raw_data())
    n = len(y)
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(n)
    cuts = draw(st.lists(st.integers(0, n), max_size=10))  # repeats give empty batches
    bounds = [0, *sorted(cuts), n]
    batches = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    groups = draw(st.lists(st.integers(0, len(batches)), max_size=4))
    gb = [0, *sorted(groups), len(batches)]
    shards = [batches[gb[i] : gb[i + 1]] for i in range(len(gb) - 1)]
    shards += [[] for _ in range(draw(st.integers(0, 2)))]  # empty shards merge too
    shards = draw(st.permutations(shards))
    steps = draw_merge_tree(draw, len(shards))
    return H[order], y[order], K, shards, steps


@SETTINGS
@given(plans())
def test_stats_do_not_depend_on_order_batches_shards_or_merge_tree(plan):
    H, y, K, shards, steps = plan
    got = fold_and_merge(shards, steps, H, y, K)
    want = reference_stats(H, y, K)
    np.testing.assert_array_equal(got.counts, want["counts"])
    present = want["counts"] > 0
    assert_array_close("means", got.means[present], want["means"][present], rel=REL)
    assert not got.means[~present].any(), "an empty class has a nonzero mean"
    assert_array_close("scatter", got.scatter, want["scatter"], rel=REL)
    assert_array_close("class_ss", got.class_ss, want["class_ss"], rel=REL)


# --------------------------------------------------------------------------- metrics


def _metrics(H, y, K, W, b):
    stats = ClassStats.from_arrays(H, y, num_classes=K, batch_size=7)
    return engine_metrics(stats, H, y, W, b, chunk=11)


def assert_same_metrics(a, b) -> None:
    assert set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), (name, x, y)
            continue
        assert math.isclose(x, y, rel_tol=METRIC_REL, abs_tol=1e-10), (name, x, y)


@st.composite
def classified(draw):
    """Balanced data and a classifier roughly aligned with the class means."""
    H, y, K = draw(raw_data(balanced=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    means = np.stack([H[y == k].mean(axis=0) for k in range(K)])
    W = means - means.mean(axis=0) + 0.3 * np.abs(means).max() * rng.standard_normal(means.shape)
    b = rng.standard_normal(K) * np.abs(H).max()
    return H, y, K, W, b, rng


@SETTINGS
@given(classified())
def test_metrics_invariant_to_relabelling(case):
    H, y, K, W, b, rng = case
    pi = rng.permutation(K)  # class k is called pi[k] from now on
    Wp, bp = np.empty_like(W), np.empty_like(b)
    Wp[pi], bp[pi] = W, b
    assert_same_metrics(_metrics(H, pi[y], K, Wp, bp), _metrics(H, y, K, W, b))


@SETTINGS
@given(classified())
def test_metrics_invariant_to_rotation(case):
    H, y, K, W, b, rng = case
    Q = np.linalg.qr(rng.standard_normal((H.shape[1], H.shape[1])))[0]
    assert_same_metrics(_metrics(H @ Q, y, K, W @ Q, b), _metrics(H, y, K, W, b))


@SETTINGS
@given(classified(), st.integers(-3, 3), st.floats(0.1, 10.0), st.floats(0.1, 10.0))
def test_metrics_invariant_to_scaling(case, exponent, mantissa, beta):
    H, y, K, W, _, _ = case
    alpha = mantissa * 10.0**exponent
    b = np.zeros(K)  # with a bias, scaling the features would move the decision boundaries
    got, want = _metrics(alpha * H, y, K, beta * W, b), _metrics(H, y, K, W, b)
    # margin_min (a margin over ||W||_F) scales with the features, as a margin does
    m_got, m_want = got.pop("margin_min", None), want.pop("margin_min", None)
    if m_want is not None:  # a difference of logits: rounding relative to the features' size
        tol = 1e-9 * alpha * max(1.0, float(np.abs(H).max()))
        assert math.isclose(m_got, alpha * m_want, rel_tol=1e-6, abs_tol=tol)
    assert_same_metrics(got, want)
