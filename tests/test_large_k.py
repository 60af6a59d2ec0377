"""Many classes (issue 15): the pairwise metrics stream tiles of classes, the NC4 pass tiles
classes and rows, nc1 works in the d×d space when K > d, and nothing K×K is allocated.

The tiled engine is checked against the direct K×K implementations it replaced
(``tests/reference.py``, "direct K×K pairwise metrics") to 1e-12, and against the float64
pinv reference for nc1 with K > d.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from reference import (
    closed_form_etf_dist,
    direct_cdnv,
    direct_equiangular,
    direct_etf_dist,
    direct_maxangle,
    direct_minority_collapse,
    direct_nc4,
    direct_of_maxcos,
    reference_metrics,
)

from nccli import ClassStats, measure
from nccli.errors import UsageError
from nccli.metrics import decisions, nc, pairwise
from nccli.metrics import geometry as geo
from nccli.metrics.nc import Undefined

#: (K, d): d > K (the tiled ||G||_F), d < K (the d×d ||VᵀV||_F) and K > d for nc1
SHAPES = {3: 5, 100: 130, 1000: 24}


def _close(got: float, want: float, rel: float = 1e-12) -> None:
    assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-300), (got, want, abs(got - want) / want)


def _data(K: int, seed: int = 0) -> tuple[ClassStats, np.ndarray]:
    """Random classes (2..6 samples each, unequal) in d = SHAPES[K] and a classifier."""
    d = SHAPES[K]
    rng = np.random.default_rng(seed + K)
    counts = rng.integers(2, 7, K)
    y = np.repeat(np.arange(K), counts)
    H = rng.normal(size=(K, d))[y] + 0.5 * rng.normal(size=(y.size, d)) + 2.0
    W = rng.normal(size=(K, d))
    return ClassStats.from_arrays(H, y, K), W


def _tile_cases() -> list:
    cases = []
    for K in SHAPES:
        for t in sorted({1, 7, K}):
            marks = [pytest.mark.slow] if K * K / (2 * t * t) > 20_000 else []
            cases.append(pytest.param(K, t, marks=marks, id=f"K{K}-tile{t}"))
    return cases


@pytest.mark.parametrize(("K", "tile"), _tile_cases())
def test_tiled_pairwise_metrics_equal_the_direct_kxk_ones(K, tile):
    st, W = _data(K)
    M = nc.centred_means(st)
    var = st.class_ss / st.counts
    vec = nc.Vectors(M, "centred class mean", var=var, tile=tile)
    _close(nc.equiangular(vec), direct_equiangular(M))
    _close(nc.maxangle(vec), direct_maxangle(M))
    _close(nc.etf_dist(vec), direct_etf_dist(M))
    _close(geo.of_maxcos(vec), direct_of_maxcos(M))
    _close(vec.summary.cdnv_sum / vec.summary.pairs, direct_cdnv(st.means, var))
    # the classifier rows, through the functions the registry calls
    rows = nc.Vectors(W, "classifier row", tile=tile)
    _close(nc.equiangular(rows), direct_equiangular(W))
    _close(nc.maxangle(rows), direct_maxangle(W))
    _close(nc.etf_dist(rows), direct_etf_dist(W))
    _close(geo.of_maxcos_classifier(rows), direct_of_maxcos(W))
    _close(geo.of_maxcos_means(st, tile=tile), direct_of_maxcos(st.means))
    # the ETF distance against the closed form (exact algebra; fine away from collapse)
    assert nc.etf_dist(rows) == pytest.approx(closed_form_etf_dist(W), rel=1e-9)


@pytest.mark.parametrize(("K", "tile"), [(3, 1), (100, 7), (1000, 1000)])
def test_cdnv_and_minority_collapse_tiled(K, tile):
    st, W = _data(K, seed=5)
    var = st.class_ss / st.counts
    _close(nc.cdnv(st, tile=tile), direct_cdnv(st.means, var))
    _close(nc.cdnv(st), direct_cdnv(st.means, var))  # the shared pass of the means
    counts = np.arange(K) % 5 + 1  # a long tail: the lower half is the minority
    if geo.minority_classes(counts).size >= 2:
        _close(geo.minority_collapse(W, counts, tile=tile), direct_minority_collapse(W, counts))


def test_cdnv_recomputes_close_pairs_from_differences():
    """Two classes 1e-6 apart, far from the rest and from the origin: the Gram form
    ``||μ_k||²+||μ_l||²-2G_kl`` would keep ~4 digits of their distance; the direct
    difference keeps them all."""
    rng = np.random.default_rng(3)
    K, d = 40, 8
    means = rng.normal(size=(K, d)) + 1e4
    means[1] = means[0] + 1e-6 * rng.normal(size=d)
    y = np.repeat(np.arange(K), 4)
    H = means[y] + 1e-3 * rng.normal(size=(y.size, d))
    st = ClassStats.from_arrays(H, y, K)
    var = st.class_ss / st.counts
    for tile in (1, 7, K):
        assert nc.cdnv(st, tile=tile) == pytest.approx(direct_cdnv(st.means, var), rel=1e-9)


def test_etf_dist_near_collapse_keeps_its_digits():
    """A simplex ETF plus 1e-9 noise: the tile sum is accurate where the closed form cancels."""
    rng = np.random.default_rng(4)
    K, d = 50, 60
    E = np.linalg.qr(rng.normal(size=(d, K)))[0].T  # orthonormal rows
    V = E - E.mean(axis=0)
    V = V / np.linalg.norm(V, axis=1, keepdims=True) + 1e-9 * rng.normal(size=(K, d))
    want = direct_etf_dist(V)
    assert want < 1e-7
    for tile in (1, 7, K):
        assert nc.etf_dist(V, tile=tile) == pytest.approx(want, rel=1e-6)


def test_zero_norm_and_coinciding_means_are_undefined():
    V = np.eye(4)
    V[2] = 0.0
    with pytest.raises(Undefined, match="zero norm"):
        nc.equiangular(V, tile=1)
    assert nc.etf_dist(V, tile=1) == pytest.approx(direct_etf_dist(V), rel=1e-12)
    y = np.repeat(np.arange(3), 2)
    H = np.array([[0, 1.0], [0, -1], [0, 1], [0, -1], [5, 0], [7, 0]])
    with pytest.raises(Undefined, match="coincide"):
        nc.cdnv(ClassStats.from_arrays(H, y, 3), tile=1)


def test_tile_size_follows_the_budget():
    assert pairwise.tile_classes(10**6, budget=8 * 8 * 100) == 10
    assert pairwise.tile_classes(5) == 5
    assert pairwise.tile_classes(10**6) ** 2 * 8 * 8 <= pairwise.TILE_BYTES
    covered = {(k, l) for a, b, c, e in pairwise.tiles(10, 3) for k in range(a, b)
               for l in range(c, e) if k < l}  # fmt: skip
    assert covered == {(k, l) for k in range(10) for l in range(k + 1, 10)}


# ---------------------------------------------------------------- NC4 tiles
def _batches(H, y, size):
    for s in range(0, len(y), size):
        yield H[s : s + size], y[s : s + size]


@pytest.mark.parametrize("budget", [1, 8 * 4 * 256 * 100, pairwise.TILE_BYTES])
def test_nc4_tiled_equals_the_single_gemm_pass(budget):
    rng = np.random.default_rng(7)
    K, d = 1000, 16
    y = rng.integers(0, K, 4000)
    y[:K] = np.arange(K)
    H = rng.normal(size=(K, d))[y] + rng.normal(size=(y.size, d))
    W = rng.normal(size=(K, d))
    b = rng.normal(size=K)
    st = ClassStats.from_arrays(H, y, K)
    got = decisions.nc4_pass(_batches(H, y, 1500), st, W, b, budget=budget)
    got.pop("margin_min")  # tested in test_variants.py
    assert got == direct_nc4(H, y, st.means, st.counts, W, b)


def _tied_problem():
    """Integer features, means and weights with μ_G = 0: every product is exact, and many
    rows tie between classes in different tiles (duplicated weight rows and class means)."""
    rng = np.random.default_rng(11)
    K, d, half = 600, 3, 300
    base = rng.integers(-2, 3, size=(half // 2, d)).astype(np.float64)
    m = np.concatenate([base, -base, base, -base])  # classes k and k+300 share a mean; Σ = 0
    y = np.repeat(np.arange(K), 2)
    eye = np.eye(d)[rng.integers(0, d, K)]
    H = m[y] + np.where((np.arange(y.size) % 2)[:, None] == 0, 1.0, -1.0) * eye[y]
    W = rng.integers(-1, 2, size=(K, d)).astype(np.float64)
    W[half:] = W[:half]
    return H, y, W, K


@pytest.mark.parametrize("budget", [1, 8 * 4 * 256 * 64])
def test_nc4_ties_resolve_to_the_first_index(budget):
    H, y, W, K = _tied_problem()
    st = ClassStats.from_arrays(H, y, K)
    assert np.all(st.global_mean() == 0)
    got = decisions.nc4_pass(_batches(H, y, 500), st, W, None, budget=budget)
    got.pop("margin_min")  # tested in test_variants.py
    want = direct_nc4(H, y, st.means, st.counts, W)
    assert got == want
    # the ties are real: the second half of the classes never wins
    hc = H - st.global_mean()
    blocks = decisions._nc4_blocks(W, st.means, np.zeros(K), np.sum(st.means**2, 1), 256)
    pred, ncc = decisions._nc4_rows(hc, blocks, np)
    assert pred.max() < K // 2 and ncc.max() < K // 2
    np.testing.assert_array_equal(pred, np.argmax(hc @ W.T, axis=1))


def test_nc4_running_argmax_in_torch_matches_numpy():
    """The device branch (torch tensors) folds tiles the same way, ties included."""
    H, y, W, K = _tied_problem()
    st = ClassStats.from_arrays(H, y, K)
    blocks = decisions._nc4_blocks(W, st.means, np.zeros(K), np.sum(st.means**2, 1), 256)
    t_blocks = [(k0, *(torch.as_tensor(a) for a in r)) for k0, *r in blocks]
    pred, ncc = decisions._nc4_rows(H, blocks, np)
    tp, tn = decisions._nc4_rows(torch.as_tensor(H), t_blocks, torch)
    np.testing.assert_array_equal(pred, tp.numpy())
    np.testing.assert_array_equal(ncc, tn.numpy())


# ---------------------------------------------------------------- nc1 with K > d
def test_nc1_with_more_classes_than_dimensions(monkeypatch):
    rng = np.random.default_rng(2)
    K, d = 300, 20
    y = np.repeat(np.arange(K), rng.integers(2, 6, K))
    H = rng.normal(size=(K, d))[y] + 0.3 * rng.normal(size=(y.size, d))
    st = ClassStats.from_arrays(H, y, K)

    def no_kxk(*args, **kwargs):
        raise AssertionError("a K×K matrix was formed")

    monkeypatch.setattr(nc, "centred_gram", no_kxk)
    monkeypatch.setattr(nc, "reduced_gram", no_kxk)
    ref = reference_metrics(H, y, K)
    assert nc.nc1(st) == pytest.approx(ref["nc1"], rel=1e-9)
    assert nc.nc1_trace(st) == pytest.approx(ref["nc1_trace"], rel=1e-12)
    assert nc.nc1_rank(st) == d
    for center in ("global", "classmean"):
        assert nc.nc1(st, center) == pytest.approx(nc.nc1(st, center, method="svd"), rel=1e-12)


def test_nc1_rank_is_shown_by_default_only_when_deficient(tmp_path):
    rng = np.random.default_rng(8)

    def write(K, d):
        y = np.repeat(np.arange(K), 3)
        H = rng.normal(size=(K, d))[y] + 0.1 * rng.normal(size=(y.size, d))
        path = tmp_path / f"f{K}_{d}.npz"
        np.savez(path, features=H, labels=y)
        return path

    low = measure(write(40, 8))
    rank = low[low.metric == "nc1_rank"].value.tolist()
    assert rank == [8.0]
    full = measure(write(10, 20))
    assert "nc1_rank" not in set(full.metric)
    explicit = measure(write(10, 20), metrics="nc1_rank")
    assert explicit.value.tolist() == [9.0]


# ---------------------------------------------------------------- --geometry limit
def test_geometry_refuses_cosine_matrices_above_the_limit(tmp_path):
    K = geo.COSINE_MATRIX_MAX_CLASSES + 1
    y = np.repeat(np.arange(K), 2)
    rng = np.random.default_rng(0)
    H = rng.normal(size=(y.size, 4))
    path = tmp_path / "many.npz"
    np.savez(path, features=H, labels=y)
    with pytest.raises(UsageError, match=f"limit of {geo.COSINE_MATRIX_MAX_CLASSES}"):
        measure(path, metrics="classes", geometry=True)
    with pytest.raises(ValueError, match="above the limit"):
        geo.cosine_matrix(np.ones((K, 2)))


# ---------------------------------------------------------------- 20k classes in 2 GB
_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from nccli import measure
    df = measure(sys.argv[1])
    vals = dict(zip(df.metric, df.value))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps([vals, peak]))
    """
)

#: address-space limit of the 20k-class run: importing torch and nccli reserves ~0.7 GB of
#: virtual memory (measured: VmPeak 700 MB), one K×K float64 matrix would need 3.2 GB
AS_LIMIT = 2 * 2**30


@pytest.mark.slow
def test_twenty_thousand_classes_under_a_2gb_address_space(tmp_path):
    rng = np.random.default_rng(20)
    K, d = 20_000, 16
    y = np.repeat(np.arange(K), 2)
    means = rng.normal(size=(K, d))
    H = (means[y] + 0.1 * rng.normal(size=(y.size, d))).astype(np.float16)
    W = (means + 0.1 * rng.normal(size=(K, d))).astype(np.float32)
    path = tmp_path / "vocab.npz"
    np.savez(path, features=H, labels=y, weight=W, bias=np.zeros(K, np.float32))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(path)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    vals, peak_kb = json.loads(out.stdout.strip().splitlines()[-1])
    assert vals["classes"] == K
    assert vals["nc1_rank"] == d
    for name in ("nc1", "cdnv", "nc2_equiangular_means", "nc2_etf_dist_classifier", "nc4"):
        assert math.isfinite(vals[name]), name
    assert vals["ncc_acc"] > 0.9
    assert peak_kb * 1024 < AS_LIMIT
