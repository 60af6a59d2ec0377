"""Degenerate and bad inputs: the engine answers with a one-line ``DataError`` or with
``nan`` metrics whose reason is recorded — never with another exception type, never with
an unexplained ``nan`` or an ``inf`` (docs/metrics.md, "Conventions").

Each case pins the one answer the engine gives today — the exception type and its exact
message, or exactly which metrics are ``nan`` and the reason recorded for each — so a
change from "raises" to "returns nan" (or the other way round) fails here."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

RNG = np.random.default_rng(17)


def blobs(K, d, n_per=6, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = list(range(K)) if labels is None else labels
    mus = 3.0 * rng.standard_normal((K, d))
    y = np.repeat(np.asarray(labels), n_per)
    H = mus[y] + 0.5 * rng.standard_normal((len(y), d))
    W = mus + 0.3 * rng.standard_normal((K, d))
    return H, y, W


def outcome(fn):
    """Run ``fn``; return its result or the DataError it raised (checked to be one
    non-empty line).  Any other exception fails the test, naming its type."""
    from nccli.errors import DataError

    try:
        return fn()
    except DataError as exc:
        msg = str(exc)
        assert msg.strip(), f"empty {type(exc).__name__} message"
        assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
        return exc
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"raised {type(exc).__name__} instead of DataError / nan: {exc}")


def expect_raises(fn, exc_type, message):
    """``fn()`` raises exactly ``exc_type`` (not a subclass) with exactly ``message``."""
    with pytest.raises(exc_type, match=re.escape(message)) as info:
        fn()
    assert type(info.value) is exc_type, f"raised {type(info.value).__name__}: {info.value}"
    assert str(info.value) == message
    return info.value


def second_pass(batches, st, W, b=None):
    """``nc4_pass`` called directly (a test's second pass over ``batches``)."""
    from nccli.metrics import nc4_pass

    return nc4_pass(batches, st, W, b)


def expect_data_error(fn):
    from nccli.errors import DataError

    res = outcome(fn)
    assert isinstance(res, DataError), f"expected DataError, got {res!r}"
    return res


def pipeline(H, y, K, W=None, b=None, batch_size=None):
    """Statistics, then every metric (with the second pass when W is given)."""
    from nccli.metrics import Undefined, compute_metrics, nc4_pass
    from nccli.stats import ClassStats

    st = ClassStats.from_arrays(H, y, num_classes=K, batch_size=batch_size)
    ms = compute_metrics(st, W, b)
    if W is not None:
        try:
            ms.update(nc4_pass([(H, y)], st, W, b))
        except Undefined as exc:  # the engine's way to say "no value, because ..."
            for key in ("nc4", "acc", "ncc_acc"):
                ms.undefined(key, str(exc))
    return ms


def assert_explained(ms, must_be_nan=()):
    """Every value is a finite float or nan with a recorded one-line reason; the names in
    ``must_be_nan`` are nan."""
    assert isinstance(ms, dict), f"expected a MetricSet, got {ms!r}"
    reasons = ms.reasons
    for name, value in ms.items():
        assert isinstance(value, float), (name, type(value))
        assert not math.isinf(value), f"{name} is {value}"
        if math.isnan(value):
            why = reasons.get(name)
            assert isinstance(why, str) and why.strip(), f"{name} is nan without a reason"
            assert "\n" not in why, (name, why)
    for name in must_be_nan:
        assert name in ms, f"{name} missing"
        assert math.isnan(ms[name]), f"{name} = {ms[name]} but should be undefined"


def assert_nan_because(ms, reasons):
    """Exactly the metrics named in ``reasons`` are nan, each with exactly that reason."""
    nan = {name for name, value in ms.items() if math.isnan(value)}
    assert nan == set(reasons), (sorted(nan - set(reasons)), sorted(set(reasons) - nan))
    for name, why in reasons.items():
        assert ms.reasons.get(name) == why, (name, ms.reasons.get(name), why)


NC2_MEANS = [
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_dist_means",
]
PAIRWISE = [
    "nc1",
    "nc1_rank",
    "nc1_trace",
    "cdnv",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_dist_means",
]
#: every metric built on the class means
ON_MEANS = PAIRWISE + ["nc2_equinorm_means", "nc3", "nc3_cos"]
FEWER_THAN_TWO = "fewer than two classes have samples"
NONFINITE_ROWS = (
    "features: 1 feature rows contain NaN or Inf; fix the model/inputs or drop those "
    "samples (--skip-nonfinite)"
)


# ------------------------------------------------------------------ too few classes
def test_one_class():
    H, y, W = blobs(1, 4)
    res = pipeline(H, y, 1, W)
    assert_explained(
        res,
        must_be_nan=PAIRWISE + ["nc2_equiangular_classifier", "nc2_etf_dist_classifier"],
    )
    assert_nan_because(
        res,
        {
            **dict.fromkeys(ON_MEANS, FEWER_THAN_TWO),
            **dict.fromkeys(
                [
                    "nc2_equiangular_classifier",
                    "nc2_maxangle_classifier",
                    "nc2_etf_dist_classifier",
                ],
                "fewer than two vectors",
            ),
        },
    )


def test_only_one_class_has_samples():
    H, y, W = blobs(3, 4, labels=[0])
    res = pipeline(H, y, 3, W)
    assert_explained(res, must_be_nan=PAIRWISE)
    assert_nan_because(res, dict.fromkeys(ON_MEANS, FEWER_THAN_TWO))


def test_no_samples_at_all():
    from nccli.metrics import compute_metrics
    from nccli.stats import ClassStats

    st = ClassStats(3, 4)
    res = compute_metrics(st, np.ones((3, 4)) + np.eye(3, 4))
    assert_explained(res, must_be_nan=PAIRWISE + ["nc3", "nc3_cos"])
    assert_nan_because(res, dict.fromkeys(ON_MEANS, FEWER_THAN_TWO))


def test_second_pass_without_batches():
    from nccli.metrics import Undefined

    H, y, W = blobs(3, 4)
    st = _stats(H, y, 3)
    expect_raises(lambda: second_pass([], st, W), Undefined, "no samples")


def _stats(H, y, K):
    from nccli.stats import ClassStats

    return ClassStats.from_arrays(H, y, num_classes=K)


# ------------------------------------------------------------------ empty class
@pytest.mark.parametrize("K", [3, 10])
def test_class_without_samples(K):
    """Labels use 0..K-2 only with num_classes=K: every metric built on the class means
    is undefined; the statistics still say count 0 for the missing class."""
    H, y, W = blobs(K, 12, labels=list(range(K - 1)))
    st = _stats(H, y, K)
    assert st.counts[K - 1] == 0 and st.counts[: K - 1].min() > 0
    assert st.n == len(y)
    res = pipeline(H, y, K, W)
    assert_explained(res, must_be_nan=PAIRWISE + ["nc2_equinorm_means", "nc3", "nc3_cos"])
    assert_nan_because(res, dict.fromkeys(ON_MEANS, f"class {K - 1} has no samples"))
    # the empty class has no mean and can never be the nearest one
    assert math.isfinite(res["ncc_acc"])
    assert res["ncc_acc"] > 0.5


# ------------------------------------------------------------------ small dimension
@pytest.mark.parametrize("K,d", [(3, 1), (10, 2), (10, 8)])
def test_dimension_below_k_minus_one(K, d):
    H, y, W = blobs(K, d, seed=K + d)
    res = outcome(lambda: pipeline(H, y, K, W, RNG.standard_normal(K)))
    assert not isinstance(res, Exception), f"d < K-1 is valid data: {res}"
    assert_explained(res)
    assert_nan_because(res, {})  # every metric is defined


# ------------------------------------------------------------------ coinciding / zero vectors
def test_all_class_means_coincide():
    """Σ_B = 0: NC1 and the centred-mean geometry are undefined."""
    H, y, W = blobs(3, 4)
    H = np.tile(np.array([[1.0, -2.0, 0.5, 4.0]]), (len(y), 1))
    res = pipeline(H, y, 3, W)
    assert_explained(res, must_be_nan=["nc1", "nc1_trace", "cdnv", "nc3"] + NC2_MEANS[1:])
    assert_nan_because(
        res,
        {
            "nc1": "all class means coincide (Σ_B = 0)",
            "nc1_trace": "all class means coincide (Tr Σ_B = 0)",
            "cdnv": "two class means coincide (zero distance)",
            "nc2_equinorm_means": "every vector has zero norm",
            "nc2_equiangular_means": "a centred class mean vector has zero norm",
            "nc2_maxangle_means": "a centred class mean vector has zero norm",
            "nc2_etf_dist_means": "every vector has zero norm",
            "nc3": "all class means coincide",
            "nc3_cos": "a classifier row or centred class mean has zero norm",
        },
    )


def test_zero_norm_centred_mean():
    """Means -1, 0, +1 on a line (equal counts): the middle centred mean is exactly 0,
    so its cosines are undefined, but NC1 (rank 1) is defined."""
    base = np.array([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    jitter = np.array([[0.0, 0.25], [0.0, -0.25], [0.25, 0.0], [-0.25, 0.0]])
    H = np.concatenate([base[k] + jitter for k in range(3)])
    y = np.repeat(np.arange(3), 4)
    W = np.array([[-1.0, 0.1], [0.2, 1.0], [1.0, 0.0]])
    res = outcome(lambda: pipeline(H, y, 3, W))
    assert not isinstance(res, Exception), res
    assert_explained(res, must_be_nan=["nc2_equiangular_means", "nc2_maxangle_means", "nc3_cos"])
    assert_nan_because(
        res,
        {
            "nc2_equiangular_means": "a centred class mean vector has zero norm",
            "nc2_maxangle_means": "a centred class mean vector has zero norm",
            "nc3_cos": "a classifier row or centred class mean has zero norm",
        },
    )
    assert math.isfinite(res["nc1"]) and res["nc1"] > 0
    assert math.isfinite(res["nc2_etf_dist_means"])


def test_zero_classifier_row():
    H, y, W = blobs(4, 5)
    W[2] = 0.0
    res = outcome(lambda: pipeline(H, y, 4, W))
    assert not isinstance(res, Exception), res
    assert_explained(
        res,
        must_be_nan=["nc2_equiangular_classifier", "nc2_maxangle_classifier", "nc3_cos"],
    )
    assert_nan_because(
        res,
        {
            "nc2_equiangular_classifier": "a classifier row vector has zero norm",
            "nc2_maxangle_classifier": "a classifier row vector has zero norm",
            "nc3_cos": "a classifier row or centred class mean has zero norm",
        },
    )
    assert math.isfinite(res["nc2_equinorm_classifier"])
    assert math.isfinite(res["nc3"])


def test_zero_classifier():
    H, y, W = blobs(4, 5)
    res = pipeline(H, y, 4, np.zeros_like(W))
    assert_explained(res, must_be_nan=["nc2_etf_dist_classifier", "nc3"])
    assert_nan_because(
        res,
        {
            "nc2_equinorm_classifier": "every vector has zero norm",
            "nc2_equiangular_classifier": "a classifier row vector has zero norm",
            "nc2_maxangle_classifier": "a classifier row vector has zero norm",
            "nc2_etf_dist_classifier": "every vector has zero norm",
            "nc3": "the classifier weight is zero",
            "nc3_cos": "a classifier row or centred class mean has zero norm",
        },
    )


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_non_finite_features(bad, dtype):
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    H = H.astype(dtype)
    H[5, 2] = bad
    expect_raises(lambda: pipeline(H, y, 3, W), DataError, NONFINITE_ROWS)


def test_float16_overflow_is_not_silent():
    """A value beyond float16 range arrives as inf: refused, not averaged."""
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    H = H.astype(np.float16)
    with np.errstate(over="ignore"):
        H[0, 0] = np.float16(70000.0)  # overflows to inf
    assert np.isinf(H[0, 0])
    expect_raises(lambda: pipeline(H, y, 3, W), DataError, NONFINITE_ROWS)


def test_failed_update_leaves_stats_unchanged():
    import torch

    H, y, _ = blobs(3, 4)
    st = _stats(H, y, 3)
    before = (st.counts.copy(), st.means.copy(), st.scatter.copy(), st.class_ss.copy())
    bad = H[:4].copy()
    bad[1, 1] = np.nan
    expect_data_error(lambda: st.update(bad, y[:4]))
    expect_data_error(lambda: st.update(torch.from_numpy(bad), torch.from_numpy(y[:4])))
    expect_data_error(lambda: st.update(H[:4], np.array([0, 1, 3, 0])))
    after = (st.counts, st.means, st.scatter, st.class_ss)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_classifier(bad):
    """A broken classifier gives a DataError, not a silent nan."""
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    W[1, 2] = bad
    expect_raises(
        lambda: pipeline(H, y, 3, W),
        DataError,
        "features: classifier weight contains NaN or Inf; check the checkpoint",
    )


def test_non_finite_bias():
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    expect_raises(
        lambda: pipeline(H, y, 3, W, np.array([0.0, np.nan, 0.0])),
        DataError,
        "features: classifier bias contains NaN or Inf; check the checkpoint",
    )


# ------------------------------------------------------------------ bad labels
@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 3],  # == K
        [0, 1, 7],  # > K
        [0, -1, 2],  # negative
        [0.0, 1.5, 2.0],  # fractional
    ],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_bad_labels(labels, kind):
    import torch

    H, y, W = blobs(3, 4, n_per=1)
    y = np.asarray(labels)
    if kind == "torch":
        H, y = torch.from_numpy(H), torch.from_numpy(y)
    expect_data_error(lambda: pipeline(H, y, 3, W))
    expect_data_error(lambda: pipeline(H, y, 3, W, batch_size=1))


@pytest.mark.parametrize("bad", [3, -1])
def test_bad_labels_in_second_pass(bad):
    """The second pass gets its own batches: a label outside 0..K-1 there is refused
    (it would otherwise silently count as a misclassification in acc)."""
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    st = _stats(H, y, 3)
    y2 = y.copy()
    y2[0] = bad
    found = "0..3" if bad == 3 else "-1..2"
    expect_raises(
        lambda: second_pass([(H, y2)], st, W),
        DataError,
        f"features: labels must lie in 0..2, found {found}; pass the right number of classes",
    )


# ------------------------------------------------------------------ mismatched shapes
def test_fewer_labels_than_rows():
    H, y, W = blobs(3, 4)
    expect_data_error(lambda: pipeline(H, y[:-1], 3, W))
    expect_data_error(lambda: pipeline(H, y[:-1], 3, W, batch_size=4))


def test_more_labels_than_rows():
    H, y, W = blobs(3, 4)
    expect_data_error(lambda: pipeline(H[:-2], y, 3, W))


def test_update_with_mismatched_batch():
    from nccli.stats import ClassStats

    H, y, _ = blobs(3, 4)
    st = ClassStats(3, 4)
    expect_data_error(lambda: st.update(H[:5], y[:4]))
    expect_data_error(lambda: st.update(H[:5, :3], y[:5]))  # wrong feature dimension


def test_mismatched_lengths_in_second_pass():
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    st = _stats(H, y, 3)
    expect_raises(
        lambda: second_pass([(H, y[:-1])], st, W),
        DataError,
        "features: 18 feature rows but 17 labels; they must match",
    )


def test_wrong_dimension_in_second_pass():
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    st = _stats(H, y, 3)
    expect_raises(
        lambda: second_pass([(H[:, :3], y)], st, W),
        DataError,
        "features: features have dimension 3 but the statistics expect 4",
    )


def test_non_finite_features_in_second_pass():
    from nccli.errors import DataError

    H, y, W = blobs(3, 4)
    st = _stats(H, y, 3)
    H2 = H.copy()
    H2[3, 0] = np.nan
    expect_raises(lambda: second_pass([(H2, y)], st, W), DataError, NONFINITE_ROWS)


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (4,)])
def test_classifier_of_wrong_shape(shape):
    H, y, _ = blobs(3, 4)
    expect_data_error(lambda: pipeline(H, y, 3, np.ones(shape)))


def test_bias_of_wrong_length():
    H, y, W = blobs(3, 4)
    expect_data_error(lambda: pipeline(H, y, 3, W, np.zeros(2)))
