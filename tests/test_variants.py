"""The variants of later papers (nccli.metrics.variants, issue 17) against slow float64
references that form the K×K matrices, closed forms, and the CLI (--ood)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from helpers import runner
from reference import simplex_etf

from nccli.cli import app
from nccli.metrics import METRICS
from nccli.metrics import variants as var
from nccli.metrics.nc import Undefined

RNG = np.random.default_rng(11)


def _ref_gnc2(M: np.ndarray) -> tuple[float, float]:
    U = M / np.linalg.norm(M, axis=1, keepdims=True)
    K = len(U)
    d = np.array([np.linalg.norm(U[k] - U[l]) for k in range(K) for l in range(k + 1, K)])
    return float(np.mean(np.log(1 / d))), float(np.var(d))


def _ref_nc3_dual(W: np.ndarray, M: np.ndarray) -> float:
    K = len(W)
    G = W @ M.T
    E = (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)
    return float(np.linalg.norm(G / np.linalg.norm(G) - E))


@pytest.mark.parametrize("K,d", [(3, 5), (20, 8), (150, 16)])
@pytest.mark.parametrize("tile", [1, 7, None])
def test_tiled_against_the_k_by_k_reference(K, d, tile):
    M = RNG.normal(size=(K, d))
    M -= M.mean(0)
    W = M + 0.3 * RNG.normal(size=(K, d))
    e, v = var.gnc2(M, tile=tile)
    re, rv = _ref_gnc2(M)
    assert e == pytest.approx(re, rel=1e-9) and v == pytest.approx(rv, rel=1e-9)
    assert var.nc3_dual(W, M, tile=tile) == pytest.approx(_ref_nc3_dual(W, M), rel=1e-9)
    cos = np.sum(W * M, 1) / (np.linalg.norm(W, axis=1) * np.linalg.norm(M, axis=1))
    assert var.unc3(W, M) == pytest.approx(np.var(cos), rel=1e-9)
    s = np.sum(W * M, 1)
    assert var.unc3_dot(W, M) == pytest.approx(np.std(s) / abs(np.mean(s)), rel=1e-9)


def test_closed_forms():
    K, d = 6, 9
    M = simplex_etf(K, d, rng=np.random.default_rng(0), scale=2.5)
    # W = M up to scale: self-dual, and uniformly so
    assert var.nc3_dual(3.0 * M, M) == pytest.approx(0.0, abs=1e-12)
    assert var.unc3(3.0 * M, M) == pytest.approx(0.0, abs=1e-12)
    assert var.unc3_dot(3.0 * M, M) == pytest.approx(0.0, abs=1e-12)
    # an ETF's unit vectors are equidistant: no variance, energy log(1/sqrt(2K/(K-1)))
    e, v = var.gnc2(M)
    assert v == pytest.approx(0.0, abs=1e-12)
    assert e == pytest.approx(-0.5 * math.log(2 * K / (K - 1)), rel=1e-12)
    # b = -W μ_G: the classifier outputs zero at the global mean
    W, mu = RNG.normal(size=(K, d)), RNG.normal(size=d)
    assert var.bias_collapse(W, -W @ mu, mu) == pytest.approx(0.0, abs=1e-12)
    assert var.bias_collapse(W, None, mu) == pytest.approx(np.linalg.norm(W @ mu))
    # orthogonal ID means and OOD mean: nc5 = 0
    means = np.eye(d)[:K] * 4
    ood = np.eye(d)[K]
    assert var.nc5(means, ood) == pytest.approx(0.0, abs=1e-15)
    assert var.nc5(means, means[0] + means[1]) == pytest.approx(2 / K / math.sqrt(2))


def test_near_coinciding_directions_keep_their_digits():
    """Two means 1e-9 apart in angle: 2 − 2cos would be rounding noise."""
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([1.0, 1e-9, 0.0])
    c = np.array([-1.0, 0.5, 0.3])
    e, v = var.gnc2(np.stack([a, b, c]))
    re, rv = _ref_gnc2(np.stack([a, b, c]))
    assert e == pytest.approx(re, rel=1e-9) and v == pytest.approx(rv, rel=1e-9)
    with pytest.raises(Undefined, match="same way"):
        var.gnc2(np.stack([a, 2 * a, c]))


def test_cli_ood_and_the_variants(tmp_path):
    K, d, n = 4, 6, 200
    rng = np.random.default_rng(3)
    y = np.arange(n) % K
    mu = rng.normal(size=(K, d)) * 3
    h = mu[y] + rng.normal(size=(n, d))
    W = mu + 0.2 * rng.normal(size=(K, d))
    b = 0.1 * rng.normal(size=K)
    np.savez(tmp_path / "id.npz", features=h, labels=y, weight=W, bias=b)
    ood = rng.normal(size=(50, d)) + 5.0
    np.savez(tmp_path / "ood.npz", features=ood, labels=np.zeros(50, dtype=int))
    res = runner.invoke(
        app,
        ["measure", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"), "-f", "csv"],
    )
    assert res.exit_code == 0, res.stderr
    got = pd.read_csv(io.StringIO(res.stdout)).set_index("metric")["value"]
    means = np.stack([h[y == k].mean(0) for k in range(K)])
    g_ood = ood.mean(0)
    want = np.mean(np.abs(means @ g_ood) / (np.linalg.norm(means, axis=1) * np.linalg.norm(g_ood)))
    assert got["nc5"] == pytest.approx(want, rel=1e-9)  # shown by default with --ood
    assert "unc3" not in got.index  # the others on request
    res = runner.invoke(app, ["measure", str(tmp_path / "id.npz"), "-m", "variants", "-f", "csv"])
    got = pd.read_csv(io.StringIO(res.stdout)).set_index("metric")["value"]
    mu_g = h.mean(0)
    Mc = means - mu_g
    assert got["nc3_dual"] == pytest.approx(_ref_nc3_dual(W, Mc), rel=1e-9)
    assert got["bias_collapse"] == pytest.approx(np.linalg.norm(W @ mu_g + b), rel=1e-9)
    assert got["gnc2_dist_var"] == pytest.approx(_ref_gnc2(Mc)[1], rel=1e-9)
    res = runner.invoke(app, ["measure", str(tmp_path / "id.npz"), "-m", "nc5", "-f", "csv"])
    assert "nc5 is nan: no out-of-distribution features (--ood)" in res.stderr
    assert {m.family for m in METRICS.values()} >= {"variants", "ood"}


def test_margin_min_from_the_nc4_pass():
    """The smallest one-vs-rest margin, against a direct float64 computation, tiles of
    classes and chunks of rows included."""
    from nccli.metrics.decisions import nc4_pass
    from nccli.stats import ClassStats

    K, d, n = 12, 5, 300
    rng = np.random.default_rng(4)
    y = rng.integers(0, K, size=n)
    h = rng.normal(size=(K, d))[y] * 2 + rng.normal(size=(n, d))
    W, b = rng.normal(size=(K, d)), rng.normal(size=K)
    st = ClassStats.from_arrays(h, y, K)
    z = h @ W.T + b
    others = np.where(np.eye(K, dtype=bool)[y], -np.inf, z)
    want = np.min(z[np.arange(n), y] - others.max(axis=1)) / np.linalg.norm(W)
    for budget in (8 * 1024, 2**26):  # small tiles and one tile
        chunks = [(h[s : s + 37], y[s : s + 37]) for s in range(0, n, 37)]
        got = nc4_pass(chunks, st, W, b, budget=budget)["margin_min"]
        assert got == pytest.approx(want, rel=1e-12)
