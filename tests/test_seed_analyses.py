"""Seed-paper analyses: geometry, deep linear heads, MSE decomposition, theory report.

The unconstrained-feature models (UFMs) are trained to their optimum inside the tests
(torch, float64, L-BFGS), and the measured geometry is compared with what the papers
prove: a simplex ETF for CE + weight decay (Zhu et al.), an orthogonal frame with the
closed-form per-class lengths for bias-free imbalanced MSE (Dang et al.), NC and balanced
layers through a deep linear head, and the exact MSE decomposition (Han et al.).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import runner

from nccli import ClassStats, measure
from nccli.analyses import cosine_rows, layer_metrics
from nccli.cli import app
from nccli.io.cache import CacheWriter, LayerSpec
from nccli.measure import MeasureOptions
from nccli.metrics import METRICS, compute_metrics, select_metrics
from nccli.metrics.deep_linear import balancedness, cond, erank, head_chain
from nccli.metrics.geometry import (
    minority_classes,
    minority_collapse,
    of_maxcos,
    predict_lengths,
    predict_t,
)
from nccli.metrics.mse import ls_classifier, mse_decomposition, mse_loss
from nccli.metrics.nc import Undefined
from nccli.theory import COLUMNS, theory_report

K, D = 4, 8


# ------------------------------------------------------------------ UFM training
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one thread avoids oversubscription overhead on shared machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lbfgs(params, loss_fn, steps=30, gtol=1e-10):
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=100,
        tolerance_grad=1e-13,
        tolerance_change=1e-18,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        if max(float(p.grad.abs().max()) for p in params) < gtol:
            break
    return [p.detach().numpy().copy() for p in params]


def _labels(counts):
    return np.concatenate([np.full(c, k) for k, c in enumerate(counts)])


_CACHE: dict = {}


def ufm_ce(lam=1e-2):
    """Balanced CE + weight decay UFM (K=4, d=8, 5 samples per class) with a bias."""
    if "ce" not in _CACHE:
        g = torch.Generator().manual_seed(0)
        y = torch.as_tensor(_labels([5] * K))
        N = len(y)
        H = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
        W = torch.randn(K, D, generator=g, dtype=torch.float64).requires_grad_()
        b = torch.zeros(K, dtype=torch.float64).requires_grad_()

        def loss():
            ce = torch.nn.functional.cross_entropy(H @ W.T + b, y)
            return ce + lam / 2 * ((W**2).sum() + (H**2).sum() / N + (b**2).sum())

        _CACHE["ce"] = (*_lbfgs([H, W, b], loss, gtol=1e-9), y.numpy())
    return _CACHE["ce"]


def ufm_mse(counts, depth, lam_h, lam_w, seed=1):
    """Bias-free MSE UFM ``(1/2N)||H W_1ᵀ⋯W_Mᵀ - Y||² + λ_W/2 Σ||W_m||² + λ_H/2 ||H||²``."""
    key = ("mse", tuple(counts), depth, lam_h, lam_w)
    if key not in _CACHE:
        g = torch.Generator().manual_seed(seed)
        y = torch.as_tensor(_labels(counts))
        N = len(y)
        Y = torch.nn.functional.one_hot(y, K).to(torch.float64)
        scale = 0.1 if depth == 1 else 0.3
        H = (scale * torch.randn(N, D, generator=g, dtype=torch.float64)).requires_grad_()
        shapes = [(D, D)] * (depth - 1) + [(K, D)]
        Ws = [
            (scale * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()
            for s in shapes
        ]

        def loss():
            out = H
            for Wm in Ws:
                out = out @ Wm.T
            fit = ((out - Y) ** 2).sum() / (2 * N)
            return fit + lam_w / 2 * sum((Wm**2).sum() for Wm in Ws) + lam_h / 2 * (H**2).sum()

        params = _lbfgs([H, *Ws], loss, steps=40)
        _CACHE[key] = (params[0], params[1:], y.numpy())
    return _CACHE[key]


def _write_chain_cache(path, feats, weights, y, biases=None):
    """A cache whose layers h0..h_{M-1} are the inputs of the M linear modules."""
    M = len(weights)
    roles = ["penultimate"] + ["linear"] * (M - 2) + ["classifier"] if M > 1 else ["penultimate"]
    names = [f"h{i}" for i in range(M)]
    specs = [
        LayerSpec(
            names[i],
            feats[i].shape[1],
            module=names[i],
            depth=i,
            role=roles[i],
            weight=weights[i],
            bias=None if biases is None else biases[i],
        )
        for i in range(M)
    ]
    N = len(y)
    w = CacheWriter(path, specs, N, K, attrs={"classifier": names[-1], "epoch": 3})
    w.write_rows(
        0,
        y,
        np.arange(N),
        {n: f.astype(np.float32) for n, f in zip(names, feats, strict=True)},
    )
    w.finalize({n: ClassStats.from_arrays(f, y, K) for n, f in zip(names, feats, strict=True)})
    return names


# ------------------------------------------------------------- CE: simplex ETF
def test_ce_ufm_is_a_simplex_etf():
    H, W, b, y = ufm_ce()
    st = ClassStats.from_arrays(H, y, K)
    ms = compute_metrics(st, W, b)
    for name in ("nc1", "nc2_etf_dist_means", "nc2_etf_dist_classifier", "nc3"):
        assert ms[name] < 1e-3, (name, ms[name])
    # centred cosines are -1/(K-1) off the diagonal in the --geometry rows
    view = type("V", (), {"classifier_weight": W})()
    rows = pd.DataFrame(cosine_rows(view, st, MeasureOptions()))
    cm = rows[rows.metric == "cos_means"].pivot(index="class", columns="class2", values="value")
    off = cm.to_numpy()[~np.eye(K, dtype=bool)]
    np.testing.assert_allclose(off, -1 / (K - 1), atol=1e-6)
    np.testing.assert_allclose(np.diag(cm.to_numpy()), 1.0, atol=1e-12)
    # balanced classes: no minority classes
    assert minority_classes(st.counts).size == 0
    with pytest.raises(Undefined, match="minority"):
        minority_collapse(W, st.counts)


# ------------------------------------------------- bias-free imbalanced MSE (M = 1)
COUNTS = [40, 20, 10, 5]
LAM_H, LAM_W = 5e-3, 5e-3


def test_bias_free_imbalanced_mse_is_an_orthogonal_frame_with_closed_form_lengths():
    H, (W,), y = ufm_mse(COUNTS, 1, LAM_H, LAM_W)
    st = ClassStats.from_arrays(H, y, K)
    assert of_maxcos(st.means) < 1e-3
    assert of_maxcos(W) < 1e-3
    w_pred, mu_pred = predict_lengths(COUNTS, LAM_H, LAM_W, 1)
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), w_pred, rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(st.means, axis=1), mu_pred, rtol=1e-3)
    # larger classes: longer classifier rows, shorter class means
    assert np.all(np.diff(w_pred) < 0) and np.all(np.diff(mu_pred) > 0)
    # explicit M = 1 formulas of docs/metrics.md
    n, N = np.array(COUNTS, float), sum(COUNTS)
    np.testing.assert_allclose(w_pred**2, np.sqrt(n * LAM_H / LAM_W) - N * LAM_H, rtol=1e-12)
    np.testing.assert_allclose(mu_pred**2, np.sqrt(LAM_W / (n * LAM_H)) - N * LAM_W / n, rtol=1e-10)


def test_per_class_predictions_through_the_cli(tmp_path):
    H, (W,), y = ufm_mse(COUNTS, 1, LAM_H, LAM_W)
    path = tmp_path / "bf_ep040.npz"
    np.savez(path, features=H, labels=y, weight=W)
    args = ["measure", str(path), "--per-class", "-m", "of_maxcos_means", "-f", "csv"]
    setup = ["--loss", "mse", "--wd-features", str(LAM_H), "--wd-classifier", str(LAM_W)]
    res = runner.invoke(app, [*args, *setup])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    per = df[df["class"].notna()].pivot(index="class", columns="metric", values="value")
    cols = list(dict.fromkeys(df.loc[df["class"].notna(), "metric"]))
    assert cols.index("w_norm_pred") == cols.index("w_norm") + 1
    assert cols.index("mu_norm_pred") == cols.index("mu_norm") + 1
    np.testing.assert_allclose(per["w_norm"], per["w_norm_pred"], rtol=1e-3)
    np.testing.assert_allclose(per["mu_norm"], per["mu_norm_pred"], rtol=1e-3)
    assert df.loc[df.metric == "of_maxcos_means", "value"].iloc[0] < 1e-3
    # no loss/wd given: no prediction columns
    res = runner.invoke(app, [*args])
    assert "w_norm_pred" not in res.stdout
    # a table shows them too
    res = runner.invoke(app, [*args[:-2], "-f", "table", *setup], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "w_norm_pred" in res.stdout


def test_predict_lengths_roots_and_minority_collapse():
    counts = np.array([400, 50, 9, 2])
    N = counts.sum()
    lam = 5e-3
    # M = 1: classes with n_k ≤ N²λ_Hλ_W (≈ 5.3 here) collapse to zero
    w1, mu1 = predict_lengths(counts, lam, lam, 1)
    dead = counts <= N**2 * lam * lam
    assert dead.any() and not dead.all()
    assert np.all(w1[dead] == 0) and np.all(mu1[dead] == 0) and np.all(w1[~dead] > 0)
    for M in (2, 3, 4):
        t = predict_t(counts, lam, lam, M)
        c = N * lam
        grid = np.concatenate([[0.0], np.geomspace(1e-8, 1e4, 400001)])
        for k, nk in enumerate(counts):
            g = lam * nk / (2 * (grid**M + c)) + M * lam * grid / 2
            g_t = lam * nk / (2 * (t[k] ** M + c)) + M * lam * t[k] / 2
            assert g_t <= g.min() + 1e-12  # the global minimum over t ≥ 0
            if t[k] > 0:  # a positive root of n_k λ_H t^{M-1} = λ_W (t^M + Nλ_H)²
                lhs, rhs = nk * lam * t[k] ** (M - 1), lam * (t[k] ** M + c) ** 2
                assert math.isclose(lhs, rhs, rel_tol=1e-10)
    with pytest.raises(Undefined, match="positive weight decays"):
        predict_lengths(counts, 0.0, lam, 2)


# ------------------------------------------------------------- deep linear head
DEEP_COUNTS = [20, 10, 5, 5]
DEEP_LAM = 1e-3


def test_deep_linear_head_collapses_at_every_layer(tmp_path):
    H, Ws, y = ufm_mse(DEEP_COUNTS, 3, DEEP_LAM, DEEP_LAM)
    feats = [H, H @ Ws[0].T, H @ Ws[0].T @ Ws[1].T]
    path = tmp_path / "deep_ep003.h5"
    names = _write_chain_cache(path, feats, Ws, y)
    df = measure(
        path, metrics="nc1,deep,geometry", loss="mse", wd_features=DEEP_LAM, wd_classifier=DEEP_LAM
    )
    v = df.set_index(["layer", "metric"])["value"]
    for name in names:
        assert v[(name, "nc1")] < 1e-3, name
        assert v[(name, "of_maxcos_means")] < 1e-3, name  # bias-free: orthogonal frame
        assert v[(name, "of_maxcos_classifier")] < 1e-3, name
        assert v[(name, "cond_l")] == pytest.approx(
            cond(ClassStats.from_arrays(feats[names.index(name)], y, K), bias_free=True)
        )
    assert math.isnan(v[("h0", "balancedness_l")])  # no W_0 below the head input
    assert v[("h1", "balancedness_l")] < 1e-3
    assert v[("h2", "balancedness_l")] < 1e-3
    # default selection: balancedness only where it is defined
    dflt = measure(path)
    assert set(dflt.loc[dflt.metric == "balancedness_l", "layer"]) == {"h1", "h2"}
    # per-class lengths at every layer follow the depth-3 closed form
    per = measure(
        path,
        metrics="nc1",
        per_class=True,
        loss="mse",
        wd_features=DEEP_LAM,
        wd_classifier=DEEP_LAM,
    )
    per = per[per["class"].notna()]
    for name in names:
        p = per[per.layer == name].pivot(index="class", columns="metric", values="value")
        np.testing.assert_allclose(p["w_norm"], p["w_norm_pred"], rtol=1e-3)
        np.testing.assert_allclose(p["mu_norm"], p["mu_norm_pred"], rtol=1e-3)
        assert (p["cos_w_mu"] > 1 - 1e-6).all()
    # the theory report agrees with Dang et al. on this head
    rep = theory_report(path, loss="mse", wd_features=DEEP_LAM, wd_classifier=DEEP_LAM)
    dang = rep[rep.paper.str.startswith("Dang")].set_index("claim")["verdict"]
    assert dang["overall"] == "consistent", rep.to_string()
    assert dang["predicts: per-class lengths ||w_k||, ||μ_k|| follow the closed form"] == "agrees"
    jacot = rep[rep.paper.str.startswith("Jacot")].set_index("claim")["verdict"]
    assert jacot["hypothesis: the linear layers are balanced"] == "holds"


def test_balancedness_and_chain(tmp_path):
    rng = np.random.default_rng(4)
    W1, W2 = rng.normal(size=(5, 6)), rng.normal(size=(K, 5))
    direct = np.linalg.norm(W2.T @ W2 - W1 @ W1.T) / np.linalg.norm(W1 @ W1.T)
    assert balancedness(W1, W2) == pytest.approx(direct, rel=1e-14)
    # a balanced pair from one SVD: W1 = U S V1ᵀ, W2 = V2 S Uᵀ
    U, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    S = np.diag([3.0, 2.0, 1.5, 1.0, 0.5])
    V1, _ = np.linalg.qr(rng.normal(size=(6, 5)))
    V2, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert balancedness(U @ S @ V1.T, V2 @ S @ U.T) < 1e-12
    y = np.arange(60) % K
    h0 = rng.normal(size=(60, 6))
    names = _write_chain_cache(tmp_path / "c.h5", [h0, h0 @ W1.T], [W1, W2], y)
    from nccli.io.sources import open_sources

    (src,) = open_sources([tmp_path / "c.h5"])
    try:
        chain = head_chain(list(src.layers.values()))
        assert [v.name for v in chain] == names
        ms = layer_metrics(
            src.layers["h1"], src.layers["h1"].stats(), MeasureOptions(), list(src.layers.values())
        )
        assert ms["balancedness_l"] == pytest.approx(direct, rel=1e-6)  # float32 in the cache
    finally:
        src.close()


# ------------------------------------------------------------- MSE decomposition
def _direct_loss(H, Y, W, b, lam):
    out = H @ W.T + (0 if b is None else b)
    return float(((out - Y) ** 2).sum() / (2 * len(H)) + lam / 2 * (W**2).sum())


def _ridge_ls(H, Y, lam, bias):
    """Independent LS classifier from the raw data (augmented ridge system)."""
    N, d = H.shape
    X = np.hstack([H, np.ones((N, 1))]) if bias else H
    R = np.diag([lam * N] * d + ([0.0] if bias else []))
    sol = np.linalg.solve(X.T @ X + R, X.T @ Y).T
    return (sol[:, :d], sol[:, d]) if bias else (sol, None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_mse_decomposition_is_exact(bias, lam):
    rng = np.random.default_rng(7)
    counts = [30, 12, 5, 20]
    y = rng.permutation(_labels(counts))
    H = rng.normal(size=(len(y), 6)) + 2.0 * np.eye(K, 6)[y] + 0.7
    Y = np.eye(K)[y]
    st = ClassStats.from_arrays(H, y, K, batch_size=13)
    W = rng.normal(size=(K, 6))
    b = rng.normal(size=K) if bias else None
    dec = mse_decomposition(st, W, b, lam, bias=bias)
    direct = _direct_loss(H, Y, W, b, lam)
    assert dec.mse_ls + dec.mse_dev == pytest.approx(direct, rel=1e-10, abs=1e-12)
    assert mse_loss(st, W, b, lam) == pytest.approx(direct, rel=1e-10)
    assert 0 < dec.mse_dev_frac < 1
    W_ls, b_ls = _ridge_ls(H, Y, lam, bias)
    np.testing.assert_allclose(dec.w_ls, W_ls, rtol=1e-9, atol=1e-11)
    assert dec.mse_ls == pytest.approx(_direct_loss(H, Y, W_ls, b_ls, lam), rel=1e-10)
    at_ls = mse_decomposition(st, W_ls, b_ls, lam, bias=bias)
    assert at_ls.mse_dev <= 1e-12
    assert at_ls.mse_ls == pytest.approx(dec.mse_ls, rel=1e-12)


def test_mse_decomposition_rank_deficient_without_ridge():
    """λ = 0 with features in a 3-d subspace of R^6: pseudo-inverse semantics."""
    rng = np.random.default_rng(8)
    y = np.arange(40) % K
    Z = rng.normal(size=(40, 3)) + np.eye(K, 3)[y]
    H = Z @ rng.normal(size=(3, 6))
    Y = np.eye(K)[y]
    st = ClassStats.from_arrays(H, y, K)
    X = np.hstack([H, np.ones((40, 1))])
    sol = np.linalg.lstsq(X, Y, rcond=None)[0].T
    W_ls, b_ls = sol[:, :6], sol[:, 6]
    dec = mse_decomposition(st, W_ls, b_ls, 0.0)
    assert dec.mse_dev <= 1e-12
    assert dec.mse_ls == pytest.approx(_direct_loss(H, Y, W_ls, b_ls, 0.0), rel=1e-9)
    W2, b2 = ls_classifier(st, 0.0)
    assert _direct_loss(H, Y, W2, b2, 0.0) == pytest.approx(dec.mse_ls, rel=1e-9)


# ------------------------------------------------------------- cond / erank
def test_cond_and_erank_match_numpy():
    rng = np.random.default_rng(9)
    counts = [50, 30, 20, 10]
    y = _labels(counts)
    H = rng.normal(size=(len(y), 7)) @ np.diag([3, 2, 1, 1, 0.5, 0.2, 0.1]) + 2 * np.eye(K, 7)[y]
    st = ClassStats.from_arrays(H, y, K, batch_size=17)
    mu = np.stack([H[y == k].mean(0) for k in range(K)])
    s = np.linalg.svd(mu - H.mean(0), compute_uv=False)
    assert cond(st) == pytest.approx(s[0] / s[K - 2], rel=1e-10)
    s = np.linalg.svd(mu, compute_uv=False)
    assert cond(st, bias_free=True) == pytest.approx(s[0] / s[K - 1], rel=1e-10)
    lam = np.linalg.eigvalsh(np.cov(H.T, bias=True))
    p = lam / lam.sum()
    assert erank(st) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    # the means of K classes on a line span one dimension: cond is nan with the reason
    st_line = ClassStats.from_arrays(np.outer(y.astype(float), np.ones(7)), y, K)
    with pytest.raises(Undefined, match="span only"):
        cond(st_line)


# ------------------------------------------------------------- minority collapse
def test_minority_collapse_definition():
    counts = np.array([500, 500, 500, 50, 50, 50])
    assert list(minority_classes(counts)) == [3, 4, 5]
    assert list(minority_classes([40, 20, 10, 5])) == [2, 3]
    rng = np.random.default_rng(3)
    W = rng.normal(size=(6, 5))
    W[3:] = W[3] * np.array([[1.0], [2.0], [0.5]])  # minority rows on one ray
    assert minority_collapse(W, counts) == pytest.approx(1.0)
    W[4] = -W[3]
    assert minority_collapse(W, counts) == pytest.approx((-1 + 1 - 1) / 3)


# ------------------------------------------------------------- selection & CLI
@pytest.fixture()
def ce_npz(tmp_path):
    H, W, b, y = ufm_ce()
    path = tmp_path / "ce_ep100.npz"
    np.savez(path, features=H, labels=y, weight=W, bias=b)
    return path


def test_registry_and_default_selection(ce_npz):
    for fam, names in {
        "geometry": {"of_maxcos_means", "of_maxcos_classifier", "minority_collapse"},
        "deep": {"balancedness_l", "cond_l", "erank_l"},
        "mse": {"mse_ls", "mse_dev", "mse_dev_frac"},
    }.items():
        assert set(select_metrics(fam)) == names
        assert all(METRICS[n].family == fam for n in names)
    df = measure(ce_npz)
    shown = set(df.metric)
    assert {"of_maxcos_means", "of_maxcos_classifier", "cond_l"} <= shown
    # erank_l is O(d³) per layer: computed on request only
    assert not shown & {"mse_ls", "minority_collapse", "balancedness_l", "erank_l"}
    assert "erank_l" in set(measure(ce_npz, metrics="erank_l").metric)
    mse = measure(ce_npz, loss="mse").set_index("metric")["value"]
    assert {"mse_ls", "mse_dev", "mse_dev_frac"} <= set(mse.index)
    # explicit selection: every name, nan with a reason where it does not apply
    ex = measure(ce_npz, metrics="geometry,deep")
    assert list(ex.metric) == [n for n in METRICS if METRICS[n].family in ("geometry", "deep")]
    notes = " ".join(ex.attrs["notes"])
    assert "minority_collapse is nan: fewer than two minority classes" in notes
    assert "balancedness_l is nan: no linear layer below" in notes


def test_cli_geometry_csv_and_heatmap(ce_npz):
    res = runner.invoke(app, ["measure", str(ce_npz), "--geometry", "-m", "nc1", "-f", "csv"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df.columns) == ["source", "epoch", "layer", "class", "class2", "metric", "value"]
    cos = df[df.metric == "cos_classifier"].pivot(index="class", columns="class2", values="value")
    _, W, _, _ = ufm_ce()
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    np.testing.assert_allclose(cos.to_numpy(), Wn @ Wn.T, atol=1e-12)
    assert (df.metric == "cos_means").sum() == K * K
    res = runner.invoke(
        app,
        ["measure", str(ce_npz), "--geometry", "-m", "nc1", "-f", "table"],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "cosines of centred class means" in res.stdout
    assert "cosines of classifier rows" in res.stdout and "-0.33" in res.stdout
    res = runner.invoke(app, ["measure", str(ce_npz), "--geometry", "-m", "nc1", "-f", "json"])
    rows = json.loads(res.stdout)
    assert {r["metric"] for r in rows} == {"nc1", "cos_means", "cos_classifier"}


def test_cli_theory_report(ce_npz):
    setup = ["--loss", "ce", "--wd-features", "0.01", "--wd-classifier", "0.01"]
    res = runner.invoke(app, ["measure", str(ce_npz), "--report", "theory", "-f", "csv", *setup])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout), keep_default_na=False)
    assert list(df.columns) == COLUMNS
    overall = df[df.claim == "overall"].set_index("paper")["verdict"]
    assert overall[overall.index.str.startswith("Zhu")].iloc[0] == "consistent"
    assert overall[overall.index.str.startswith("Han")].iloc[0] == "not applicable"
    zhu = df[df.paper.str.startswith("Zhu")].set_index("claim")
    assert zhu.loc["hypothesis: classes balanced", "verdict"] == "holds"
    assert zhu.loc["predicts: NC1 within-class collapse (classifier input)", "verdict"] == "agrees"
    res = runner.invoke(app, ["measure", str(ce_npz), "--report", "theory", "-f", "table"])
    assert res.exit_code == 0, res.output
    assert "Zhu et al. 2021" in res.stdout and "undetermined" in res.stdout
    res = runner.invoke(app, ["measure", str(ce_npz), "--report", "theory", "-f", "json", *setup])
    rows = json.loads(res.stdout)
    assert set(rows[0]) == set(COLUMNS)
    res = runner.invoke(app, ["measure", str(ce_npz), "--report", "nope"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["measure", str(ce_npz), "--loss", "hinge"])
    assert res.exit_code == 2
