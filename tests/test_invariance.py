"""Results must not depend on batch size, order, sharding, rotation or global scale
(docs/metrics.md: the merge is associative; tests check this to 1e-10 relative)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import draw_merge_tree, fold_and_merge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    assert_array_close,
    engine_metrics,
    engine_stats,
    reference_metrics,
    reference_stats,
)

K, D = 5, 12
REL = 1e-10


def make_data(seed=0, n=240):
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n - 3 * K, np.arange(1, K + 1) / (K * (K + 1) / 2)) + 3
    mus = 3.0 * rng.standard_normal((K, D)) + 4.0
    H = np.concatenate([mus[k] + rng.standard_normal((counts[k], D)) for k in range(K)])
    y = np.concatenate([np.full(counts[k], k) for k in range(K)])
    perm = rng.permutation(len(y))
    W = mus - mus.mean(axis=0) + 1.5 * rng.standard_normal((K, D))
    b = rng.standard_normal(K)
    return H[perm], y[perm], W, b


H0, Y0, W0, B0 = make_data()


def metrics_of(stats, H=None, y=None, W=W0, b=B0, chunk=None):
    return engine_metrics(stats, H, y, W, b, chunk=chunk)


def assert_stats_equal(a, b, rel=REL):
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.n == b.n
    for name in ("means", "scatter", "class_ss"):
        assert_array_close(name, getattr(a, name), getattr(b, name), rel=rel)


def assert_metrics_equal(a, b, names=None, rel=REL):
    names = list(a) if names is None else names
    for name in names:
        assert math.isfinite(a[name]), (name, a[name], a.reasons.get(name))
        assert math.isclose(a[name], b[name], rel_tol=rel, abs_tol=1e-13), (name, a[name], b[name])


@pytest.fixture(scope="module")
def whole():
    st = engine_stats(H0, Y0, K)
    return st, metrics_of(st, H0, Y0)


def test_whole_matches_reference(whole):
    """Anchor: the one-shot result is the reference (so invariance is not vacuous)."""
    st, ms = whole
    ref = reference_stats(H0, Y0, K)
    for name in ("means", "scatter", "class_ss"):
        assert_array_close(name, getattr(st, name), ref[name], rel=1e-12)
    rm = reference_metrics(H0, Y0, K, W0, B0)
    for name, value in rm.items():
        assert math.isclose(ms[name], value, rel_tol=1e-9, abs_tol=1e-12), name


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_batch_size(whole, batch_size):
    st = engine_stats(H0, Y0, K, batch_size=batch_size)
    assert_stats_equal(st, whole[0])
    # the second pass is chunked independently of the first
    ms = metrics_of(st, H0, Y0, chunk=batch_size or 1)
    assert_metrics_equal(ms, whole[1])


def test_update_one_sample_at_a_time(whole):
    from nccli.stats import ClassStats

    st = ClassStats(K, D)
    for i in range(len(Y0)):
        assert st.update(H0[i : i + 1], Y0[i : i + 1]) is st
    assert_stats_equal(st, whole[0])


def test_shuffled_order(whole):
    perm = np.random.default_rng(5).permutation(len(Y0))
    st = engine_stats(H0[perm], Y0[perm], K, batch_size=11)
    assert_stats_equal(st, whole[0])
    assert_metrics_equal(metrics_of(st, H0[perm], Y0[perm], chunk=11), whole[1])


def test_sorted_by_label(whole):
    """Each batch holds one or two classes only: most classes are absent from most
    batches."""
    order = np.argsort(Y0, kind="stable")
    st = engine_stats(H0[order], Y0[order], K, batch_size=16)
    assert_stats_equal(st, whole[0])


@pytest.mark.parametrize("order", ["left", "right", "tree", "reversed"])
def test_four_shards_merged(whole, order):
    parts = np.array_split(np.arange(len(Y0)), 4)
    shards = [engine_stats(H0[p], Y0[p], K, batch_size=9) for p in parts]
    a, b, c, d = shards
    if order == "left":
        merged = a.merge(b).merge(c).merge(d)
    elif order == "right":
        merged = a.merge(b.merge(c.merge(d)))
    elif order == "tree":
        merged = a.merge(b).merge(c.merge(d))
    else:
        merged = d.merge(c).merge(b).merge(a)
    assert_stats_equal(merged, whole[0])
    assert_metrics_equal(metrics_of(merged, H0, Y0, chunk=50), whole[1])


def test_merge_returns_self_and_keeps_other():
    parts = np.array_split(np.arange(len(Y0)), 2)
    a = engine_stats(H0[parts[0]], Y0[parts[0]], K)
    b = engine_stats(H0[parts[1]], Y0[parts[1]], K)
    b_means, b_counts = b.means.copy(), b.counts.copy()
    assert a.merge(b) is a
    np.testing.assert_array_equal(b.means, b_means)
    np.testing.assert_array_equal(b.counts, b_counts)


def test_merge_with_empty_is_identity(whole):
    from nccli.stats import ClassStats

    st = engine_stats(H0, Y0, K)
    st.merge(ClassStats(K, D))
    assert_stats_equal(st, whole[0], rel=1e-15)
    empty = ClassStats(K, D).merge(engine_stats(H0, Y0, K))
    assert_stats_equal(empty, whole[0], rel=1e-15)


def test_shards_with_disjoint_classes(whole):
    """Shard A has classes 0,1 only, shard B the others: merge of non-overlapping classes."""
    mask = Y0 < 2
    a = engine_stats(H0[mask], Y0[mask], K)
    b = engine_stats(H0[~mask], Y0[~mask], K)
    assert_stats_equal(a.merge(b), whole[0])


def test_orthogonal_rotation(whole):
    """h -> Qᵀh (rows: H Q), W -> W Q: every metric is unchanged; means rotate, the scatter
    is conjugated, class_ss is unchanged."""
    Q = np.linalg.qr(np.random.default_rng(9).standard_normal((D, D)))[0]
    HR, WR = H0 @ Q, W0 @ Q
    st = engine_stats(HR, Y0, K, batch_size=7)
    base = whole[0]
    np.testing.assert_array_equal(st.counts, base.counts)
    assert_array_close("means", st.means, base.means @ Q, rel=REL)
    assert_array_close("scatter", st.scatter, Q.T @ base.scatter @ Q, rel=REL)
    assert_array_close("class_ss", st.class_ss, base.class_ss, rel=REL)
    ms = metrics_of(st, HR, Y0, W=WR, b=B0, chunk=7)
    assert_metrics_equal(ms, whole[1])


@pytest.mark.parametrize("alpha", [1e-3, 7.5, 1e4])
def test_global_scaling(whole, alpha):
    """h -> αh: statistics scale (means α, scatter and class_ss α²); every scale-free
    metric is unchanged.  With b = 0 the classifier decisions are unchanged too."""
    st = engine_stats(alpha * H0, Y0, K, batch_size=7)
    base = whole[0]
    np.testing.assert_array_equal(st.counts, base.counts)
    assert_array_close("means", st.means, alpha * base.means, rel=REL)
    assert_array_close("scatter", st.scatter, alpha**2 * base.scatter, rel=REL)
    assert_array_close("class_ss", st.class_ss, alpha**2 * base.class_ss, rel=REL)
    ms = metrics_of(st, alpha * H0, Y0, W=W0, b=np.zeros(K), chunk=7)
    ref = metrics_of(base, H0, Y0, W=W0, b=np.zeros(K))
    # margin_min (a margin over ||W||_F) scales with the features, as a margin does
    margin = ref.pop("margin_min")
    assert ms.pop("margin_min") == pytest.approx(alpha * margin, rel=REL)
    assert_metrics_equal(ms, ref)
    # and the classifier itself may be scaled freely
    ms_w = metrics_of(st, alpha * H0, Y0, W=3.0 * W0, b=np.zeros(K))
    assert ms_w.pop("margin_min") == pytest.approx(alpha * margin, rel=REL)
    assert_metrics_equal(ms_w, ref)


# ------------------------------------------------------------------- property test
HP, YP, _, _ = make_data(seed=1, n=90)
WHOLE_P = None


def _whole_p():
    global WHOLE_P
    if WHOLE_P is None:
        WHOLE_P = engine_stats(HP, YP, K)
    return WHOLE_P


@st.composite
def split_and_merge_plan(draw):
    n = len(YP)
    cuts = draw(st.lists(st.integers(1, n - 1), min_size=0, max_size=12, unique=True))
    bounds = [0, *sorted(cuts), n]
    batches = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    # group consecutive batches into shards (each shard folds its batches with update)
    nb = len(batches)
    shard_cuts = draw(st.lists(st.integers(1, max(nb - 1, 1)), max_size=4, unique=True))
    sb = [0, *sorted(c for c in shard_cuts if c < nb), nb]
    shards = [batches[sb[i] : sb[i + 1]] for i in range(len(sb) - 1)]
    shards = draw(st.permutations(shards))
    # a random binary merge tree: repeatedly merge item j into item i
    return shards, draw_merge_tree(draw, len(shards))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_and_merge_plan())
def test_any_split_any_merge_order(plan):
    shards, steps = plan
    merged = fold_and_merge(shards, steps, HP, YP, K)
    whole = _whole_p()
    assert_stats_equal(merged, whole)
    a = metrics_of(merged)
    b = metrics_of(whole)
    assert_metrics_equal(a, b)
