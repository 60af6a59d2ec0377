"""An update touches only the classes its batch holds (issue #15, many classes).

``ClassStats.update`` reduces a batch over its ``K_b`` present classes and merges only those
rows, so a 512-row batch costs the same at K = 50,000 as at K = 500.  The statistics are
the same pairwise (Chan) update as before: sparse batches give what one update of all the
data and the slow float64 reference give, on numpy and torch inputs and on both backends.
"""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest
import torch
from reference import reference_stats

import nccli.stats as stats_mod
from nccli import ClassStats
from nccli.errors import DataError

K_SPARSE = 5000
STATE_NAMES = ("counts", "means", "scatter", "class_ss")


def _sparse_data(seed: int = 0, n: int = 2400, d: int = 6, K: int = K_SPARSE):
    """Rows in runs of few classes (as a language model's tokens are): each block of 48
    rows draws from 5 of the K classes; most classes stay empty."""
    rng = np.random.default_rng(seed)
    y = np.concatenate(
        [rng.choice(rng.choice(K, 5, replace=False), 48) for _ in range(n // 48)]
    ).astype(np.int64)
    centres = 10.0 * rng.normal(size=(K, d))
    H = centres[y] + rng.normal(size=(len(y), d))
    return H, y, K


def _torch_states(K: int, d: int, **kwargs) -> ClassStats:
    """Torch-tensor states on the CPU: the path a CUDA device takes, without a GPU."""
    st = ClassStats(K, d, **kwargs)
    st._device = torch.device("cpu")
    return st.reset()


def _fold(st: ClassStats, H, y, size: int, kind: str = "numpy") -> ClassStats:
    for s in range(0, len(y), size):
        h, lab = H[s : s + size], y[s : s + size]
        if kind == "torch":
            h, lab = torch.from_numpy(np.ascontiguousarray(h)), torch.from_numpy(lab)
        st.update(h, lab)
    return st


def _assert_same(a: ClassStats, b: ClassStats, rtol: float = 1e-12) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    for name in STATE_NAMES[1:]:
        x, z = getattr(a, name), getattr(b, name)
        np.testing.assert_allclose(x, z, rtol=rtol, atol=rtol * np.abs(z).max(), err_msg=name)


def _assert_matches_reference(st: ClassStats, H, y, K: int, rtol: float = 1e-12) -> None:
    ref = reference_stats(H, y, K)
    np.testing.assert_array_equal(st.counts, ref["counts"])
    present = ref["counts"] > 0
    np.testing.assert_allclose(st.means[present], ref["means"][present], rtol=rtol)
    np.testing.assert_array_equal(st.means[~present], 0.0)  # empty classes stay 0
    scale = np.abs(ref["scatter"]).max()
    np.testing.assert_allclose(st.scatter, ref["scatter"], rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(st.class_ss, ref["class_ss"], rtol=rtol)


@pytest.mark.parametrize("path", ["numpy", "torch_input", "torch_reduction", "torch_states"])
def test_sparse_batches_equal_one_update_and_the_reference(monkeypatch, path):
    """K = 5000, batches of 48 rows holding 5 classes each: the same counts, means,
    scatter and class_ss as one update of the whole data, and as the slow reference."""
    H, y, K = _sparse_data()
    if path == "torch_reduction":
        monkeypatch.setattr(stats_mod, "_FORCE_TORCH_PATH", True)
    kind = "numpy" if path in ("numpy", "torch_reduction") else "torch"
    make = _torch_states if path == "torch_states" else ClassStats
    sparse = _fold(make(K, H.shape[1]), H, y, 48, kind)
    whole = _fold(make(K, H.shape[1]), H, y, len(y), kind)  # K ≤ 4B: labels counted
    assert (sparse.counts > 0).sum() < K // 2  # most classes never appear
    _assert_same(sparse, whole)
    _assert_matches_reference(sparse, H, y, K)
    _assert_matches_reference(whole, H, y, K)


def test_float32_sparse_batches_match_the_reference():
    H, y, K = _sparse_data(1)
    H = H.astype(np.float32)
    st = _fold(ClassStats(K, H.shape[1]), H, y, 96)
    _assert_matches_reference(st, H, y, K)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batch_order_and_size_do_not_matter(kind):
    H, y, K = _sparse_data(2)
    make = ClassStats if kind == "numpy" else lambda K, d: _torch_states(K, d)
    ref = _fold(make(K, H.shape[1]), H, y, len(y), kind)
    for size in (1, 7, 48, 333):
        _assert_same(_fold(make(K, H.shape[1]), H, y, size, kind), ref)
    rng = np.random.default_rng(3)
    blocks = np.arange(len(y)).reshape(-1, 48)[rng.permutation(len(y) // 48)]
    order = blocks.reshape(-1)  # the runs of classes in another order
    _assert_same(_fold(make(K, H.shape[1]), H[order], y[order], 48, kind), ref)
    order = rng.permutation(len(y))  # every row anywhere: dense batches
    _assert_same(_fold(make(K, H.shape[1]), H[order], y[order], 100, kind), ref)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_merge_of_sparse_partitions(kind):
    """Partitions (ranks, files) with disjoint and shared classes merge either way, an
    object into itself included."""
    H, y, K = _sparse_data(4)
    make = ClassStats if kind == "numpy" else lambda K, d: _torch_states(K, d)
    whole = _fold(make(K, H.shape[1]), H, y, 48, kind)
    half = len(y) // 2
    a = _fold(make(K, H.shape[1]), H[:half], y[:half], 48, kind)
    b = _fold(ClassStats(K, H.shape[1]), H[half:], y[half:], 48)
    _assert_same(a.copy().merge(b), whole)
    _assert_same(b.copy().merge(a), whole)
    twice = _fold(make(K, H.shape[1]), np.concatenate([H, H]), np.concatenate([y, y]), 48, kind)
    _assert_same(whole.copy().merge(whole), twice)
    _assert_same(whole.copy().merge(ClassStats(K, H.shape[1])), whole)  # empty partition


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_compacted_labels(kind):
    """Both ways of compacting (a sort for K ≫ B, a count otherwise) give the present
    classes ascending and the labels renumbered into them."""
    y = np.array([7, 3, 3, 9, 0, 7, 9, 9], dtype=np.int64)
    for K in (10, 1000):  # counted, sorted
        yy = torch.from_numpy(y) if kind == "torch" else y
        present, inv = stats_mod._compact_labels(yy, K)
        present, inv = np.asarray(present), np.asarray(inv)
        np.testing.assert_array_equal(present, [0, 3, 7, 9])
        np.testing.assert_array_equal(present[inv], y)
        assert inv.dtype == np.int64


# ------------------------------------------------------------ checks and empty batches
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [K_SPARSE, -1])
def test_labels_out_of_range_are_refused_and_change_nothing(kind, bad):
    H, y, K = _sparse_data(5)
    make = ClassStats if kind == "numpy" else lambda K, d: _torch_states(K, d)
    st = _fold(make(K, H.shape[1]), H, y, 48, kind)
    before = {name: np.array(getattr(st, name)) for name in STATE_NAMES}
    y2 = y[:48].copy()
    y2[5] = bad
    h2 = H[:48]
    if kind == "torch":
        h2, y2 = torch.from_numpy(h2), torch.from_numpy(y2)
    found = f"{y[:48].min()}..{bad}" if bad > 0 else f"-1..{y[:48].max()}"
    with pytest.raises(DataError) as err:
        st.update(h2, y2)
    assert str(err.value) == (
        f"features: labels must lie in 0..{K - 1}, found {found}; pass the right number of classes"
    )
    for name in STATE_NAMES:
        np.testing.assert_array_equal(getattr(st, name), before[name])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_empty_batches_change_nothing(kind):
    H, y, K = _sparse_data(6)
    make = ClassStats if kind == "numpy" else lambda K, d: _torch_states(K, d)
    st = _fold(make(K, H.shape[1]), H, y, 48, kind)
    before = {name: np.array(getattr(st, name)) for name in STATE_NAMES}
    empty = (np.zeros((0, H.shape[1])), np.zeros(0, dtype=np.int64))
    for h, lab in (empty, tuple(torch.from_numpy(a) for a in empty)):
        assert st.update(h, lab) is st
    for name in STATE_NAMES:
        np.testing.assert_array_equal(getattr(st, name), before[name])
    fresh = make(K, H.shape[1]).update(*empty)
    assert fresh.n == 0 and not fresh.means.any() and not fresh.scatter.any()


def test_views_read_before_an_update_stay_as_they_were():
    """The states are updated in place (only the present rows): the memoised read-only
    views handed out before stay unchanged and the next read shows the new state."""
    H, y, K = _sparse_data(7)
    st = _fold(ClassStats(K, H.shape[1]), H[:480], y[:480], 48)
    seen = {name: getattr(st, name) for name in STATE_NAMES}
    copies = {name: np.array(v) for name, v in seen.items()}
    mu_g = st.global_mean()
    copied = st.copy()
    _fold(st, H[480:], y[480:], 48)
    for name in STATE_NAMES:
        np.testing.assert_array_equal(seen[name], copies[name])  # old views untouched
        np.testing.assert_array_equal(getattr(copied, name), copies[name])  # copy too
    _assert_matches_reference(st, H, y, K)
    np.testing.assert_allclose(st.global_mean(), H.mean(axis=0), rtol=1e-12, atol=1e-12)
    assert not np.allclose(st.global_mean(), mu_g)


# ------------------------------------------------------------------ the work is sparse
def _record_rows(monkeypatch) -> list[int]:
    """How many class rows each merge receives (and each batch reduction works on)."""
    rows: list[int] = []
    merge, reduce_np, reduce_t = (
        ClassStats._merge_rows,
        stats_mod._reduce_batch_numpy,
        stats_mod._reduce_batch_torch,
    )

    def merge_rows(self, present, cnt_b, means_b, ss_b, scatter_b):
        assert cnt_b.shape[0] == means_b.shape[0] == ss_b.shape[0] == present.shape[0]
        rows.append(int(present.shape[0]))
        return merge(self, present, cnt_b, means_b, ss_b, scatter_b)

    def checked(fn):
        def reduce(h, y, K):
            rows.append(-int(K))  # classes the reduction allocates for
            return fn(h, y, K)

        return reduce

    monkeypatch.setattr(ClassStats, "_merge_rows", merge_rows)
    monkeypatch.setattr(stats_mod, "_reduce_batch_numpy", checked(reduce_np))
    monkeypatch.setattr(stats_mod, "_reduce_batch_torch", checked(reduce_t))
    return rows


@pytest.mark.parametrize("path", ["numpy", "torch_reduction", "torch_states"])
def test_merge_touches_only_the_present_classes(monkeypatch, path):
    H, y, K = _sparse_data(8)
    if path == "torch_reduction":
        monkeypatch.setattr(stats_mod, "_FORCE_TORCH_PATH", True)
    st = _torch_states(K, H.shape[1]) if path == "torch_states" else ClassStats(K, H.shape[1])
    rows = _record_rows(monkeypatch)
    _fold(st, H, y, 48, "torch" if path == "torch_states" else "numpy")
    want = [len(np.unique(y[s : s + 48])) for s in range(0, len(y), 48)]
    assert rows[0::2] == [-k for k in want] and rows[1::2] == want
    assert max(want) <= 5


@pytest.mark.parametrize("torch_loaded", [True, False])
def test_update_at_two_million_classes_allocates_no_k_sized_array(monkeypatch, torch_loaded):
    """K = 2,000,000, d = 4: a 512-row update of 50 classes allocates some 100 kB, never a
    K-sized temporary (a K-vector of int64 alone would be 16 MB).  Without torch loaded
    the class sums are numpy's (whose allocations tracemalloc sees)."""
    if not torch_loaded:
        monkeypatch.setitem(sys.modules, "torch", None)  # what sys.modules.get sees
    K, d = 2_000_000, 4
    st = ClassStats(K, d)
    rng = np.random.default_rng(9)
    classes = rng.choice(K, 50, replace=False)
    batches = [
        (rng.normal(size=(512, d)).astype(np.float32), rng.choice(classes, 512)) for _ in range(3)
    ]
    st.update(*batches[0])  # warm: first-call allocations (imports, caches) excluded
    tracemalloc.start()
    try:
        for h, lab in batches[1:]:
            st.update(h, lab)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < K * 8 // 16, f"update allocated {peak} bytes at K={K}"
    assert st.n == 3 * 512 and int((st._counts > 0).sum()) == 50
