"""Classes that are absent or rare are left out of every metric (docs/metrics.md, "Which
classes are measured"), and role ``classifier`` names the classifier's input in every
model (issue 13, points 5 and 8) — as a user meets them, through the real CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import runner
from reference import reference_metrics
from torch import nn

from nccli.cli import app

K, N, D = 4, 160, 8


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features round K class means, labels 0..K-1, a classifier ``(W, b)``."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), N // K)
    mu = rng.normal(size=(K, D)) * 3
    h = mu[y] + rng.normal(size=(N, D))
    W = mu + 0.5 * rng.normal(size=(K, D))
    b = 0.1 * rng.normal(size=K)
    return h, y, W, b


def _save(path: Path, h, y, W=None, b=None) -> str:
    arrays = {"features": h, "labels": y}
    if W is not None:
        arrays["weight"] = W
    if b is not None:
        arrays["bias"] = b
    np.savez(path, **arrays)
    return str(path)


def _measure(*args: str) -> tuple[pd.Series, str]:
    res = runner.invoke(app, ["measure", *args, "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    layer_rows = df[df["class"].isna()] if "class" in df.columns else df
    return layer_rows.set_index("metric")["value"], res.stderr


def _assert_same(got: pd.Series, want: pd.Series) -> None:
    assert list(got.index) == list(want.index)
    for m in want.index:
        a, b = float(got[m]), float(want[m])
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-14), m


def test_absent_classes_with_their_classifier_rows_are_left_out(tmp_path):
    """1-based labels under a classifier with a row per label (plus an unused last class):
    every metric equals the measurement of the same data numbered 0..K-1 under the rows of
    the classes present — the empty classes and their classifier rows are gone."""
    h, y, W, b = _data()
    good = _save(tmp_path / "good.npz", h, y, W, b)
    rng = np.random.default_rng(5)
    W_wide = np.vstack([rng.normal(size=(1, D)) * 9, W, rng.normal(size=(1, D)) * 9])
    b_wide = np.concatenate([[3.0], b, [-2.0]])
    wide = _save(tmp_path / "wide.npz", h, y + 1, W_wide, b_wide)
    want, _ = _measure(good, "-m", "all")
    got, err = _measure(wide, "-m", "all")
    _assert_same(got, want)
    assert got["classes"] == K
    # a float64 reference over the classes present agrees
    ref = reference_metrics(h, y, K, W, b)
    for m in ("nc1", "nc1_trace", "cdnv", "nc3", "nc4", "acc", "ncc_acc"):
        assert got[m] == pytest.approx(ref[m], rel=1e-9, abs=1e-12), m
    note = (
        f"note: wide.npz: 2 of {K + 2} classes left out, classes 0, {K + 1} (2 without "
        f"samples); every metric uses the other {K} classes"
    )
    assert err.splitlines().count(note) == 1, err
    # --num-classes with 1-based labels and no classifier: the same for the mean metrics
    plain = _save(tmp_path / "plain.npz", h, y + 1)
    got, err = _measure(plain, "-k", str(K + 1), "-m", "nc1,cdnv,nc2,classes")
    want, _ = _measure(good, "-m", "nc1,cdnv,nc2,classes")
    _assert_same(
        got[~got.index.str.endswith("classifier")], want[~want.index.str.endswith("classifier")]
    )
    assert "1 of 5 classes left out, class 0 (1 without samples)" in err


def test_min_class_count_drops_rare_classes_and_their_samples(tmp_path):
    """A class with 3 samples under --min-class-count 5: every metric, the second pass
    included, equals the measurement of the file without those samples; per-class rows
    keep the source's labels."""
    h, y, W, b = _data(1)
    rng = np.random.default_rng(7)
    extra = rng.normal(size=(3, D)) * 5 + 20  # far away: it would dominate Σ_B and μ_G
    h_all = np.vstack([h[:40], extra, h[40:]])
    y_all = np.concatenate([y[:40], [K, K, K], y[40:]])
    W_all = np.vstack([W, rng.normal(size=(1, D))])
    b_all = np.concatenate([b, [0.0]])
    rare = _save(tmp_path / "rare.npz", h_all, y_all, W_all, b_all)
    good = _save(tmp_path / "good.npz", h, y, W, b)
    want, _ = _measure(good, "-m", "all")
    got, err = _measure(rare, "-m", "all", "--min-class-count", "5")
    _assert_same(got, want)
    assert "1 of 5 classes left out, class 4 (1 with fewer than --min-class-count=5" in err
    kept, _ = _measure(rare, "-m", "nc1,classes")  # the default keeps every class with samples
    assert kept["classes"] == K + 1 and kept["nc1"] != pytest.approx(want["nc1"])
    # per-class rows: the measured classes, under their own labels
    res = runner.invoke(
        app, ["measure", rare, "--per-class", "--min-class-count", "5", "-f", "csv"]
    )
    df = pd.read_csv(io.StringIO(res.stdout))
    assert sorted(df["class"].dropna().astype(int).unique()) == list(range(K))
    # 1-based labels: per-class rows say 1..K, as the data does
    shifted = _save(tmp_path / "shifted.npz", h, y + 1, np.vstack([W[:1], W]), np.r_[0.0, b])
    res = runner.invoke(app, ["measure", shifted, "--per-class", "-f", "csv"])
    df = pd.read_csv(io.StringIO(res.stdout))
    n_k = df[df["metric"] == "n_k"].set_index("class")["value"]
    assert list(n_k.index.astype(int)) == [1, 2, 3, 4] and list(n_k) == [N // K] * K


def test_min_class_count_that_leaves_nothing_is_refused(tmp_path):
    h, y, W, b = _data()
    path = _save(tmp_path / "f.npz", h, y, W, b)
    res = runner.invoke(app, ["measure", path, "--min-class-count", "1000", "-f", "csv"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f"nccli: error: {path}: no class has 1000 or more samples; lower --min-class-count"
    ]
    res = runner.invoke(app, ["measure", path, "--min-class-count", "0"])
    assert res.exit_code == 2 and "--min-class-count" in res.stderr


def test_compare_and_the_theory_report_leave_the_same_classes_out(tmp_path):
    h, y, W, b = _data()
    rng = np.random.default_rng(5)
    W_wide = np.vstack([W, rng.normal(size=(2, D))])
    paths = [
        _save(tmp_path / f"run_ep{e}.npz", h + 0.1 * e, y, W_wide, np.r_[b, 0.0, 0.0])
        for e in (1, 2)
    ]
    res = runner.invoke(app, ["compare", *paths, "-m", "nc1,classes", "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df[df["metric"] == "classes"]["value"]) == [K, K]
    assert "classes left out" in res.stderr
    res = runner.invoke(app, ["measure", paths[0], "--report", "theory", "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    assert "2 of 6 classes left out" in res.stderr


# ------------------------------------------------------------------ role `classifier`
class Backbone(nn.Module):
    """The most common research model: a body and one linear layer named ``fc``."""

    def __init__(self, num_classes: int = K) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_role_classifier_selects_the_classifier_input_in_every_model(tmp_path):
    """A backbone + fc cache and a deep-linear-head cache: ``--layer classifier`` gives
    the input of the final linear layer in both, and ``info`` says that fc's input is the
    penultimate and the classifier layer at once."""
    rng = np.random.default_rng(0)
    y = np.arange(N) % K
    x = (rng.normal(size=(K, D)) * 2)[y] + rng.normal(size=(N, D))
    data = tmp_path / "data.npz"
    np.savez(data, x=x.astype(np.float32), y=y)
    torch.manual_seed(0)
    model = Backbone()
    torch.save(model, tmp_path / "fc_ep1.pt")
    from nccli import zoo

    torch.manual_seed(0)
    deep = zoo.build(f"mlp:in_dim={D},widths=16-,num_classes={K},head_depth=2")
    torch.save(deep.state_dict(), tmp_path / "deep_ep1.pt")
    out = tmp_path / "caches"
    common = ["-d", str(data), "-o", str(out), "-q"]
    res = runner.invoke(
        app, ["extract", str(tmp_path / "fc_ep1.pt"), "--trust-checkpoint", *common]
    )
    assert res.exit_code == 0, res.stderr
    arch = f"mlp:in_dim={D},widths=16-,num_classes={K},head_depth=2"
    res = runner.invoke(app, ["extract", str(tmp_path / "deep_ep1.pt"), "--arch", arch, *common])
    assert res.exit_code == 0, res.stderr
    fc, deep_cache = str(out / "fc_ep1.h5"), str(out / "deep_ep1.h5")
    res = runner.invoke(
        app, ["measure", fc, deep_cache, "--layer", "classifier", "-m", "nc1", "-f", "csv"]
    )
    assert res.exit_code == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(zip(df["source"], df["layer"], strict=True)) == [
        ("fc_ep1.h5", "fc"),
        ("deep_ep1.h5", "classifier"),
    ]
    # compare lines the two models up by the role, and says which layer each gave
    res = runner.invoke(
        app, ["compare", fc, deep_cache, "--across", "runs", "-l", "classifier", "-f", "csv"]
    )
    assert res.exit_code == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert set(df["layer"]) == {"classifier"} and len(set(df["source"])) == 2
    assert (
        "--layer classifier is fc (" in res.stderr and "rows are labelled classifier" in res.stderr
    )
    # the fc layer is also the penultimate one; the deep head's penultimate is its input
    res = runner.invoke(
        app, ["measure", fc, deep_cache, "-l", "penultimate", "-m", "nc1", "-f", "csv"]
    )
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df["layer"]) == ["fc", "head.0"]
    res = runner.invoke(app, ["info", fc, "--json"])
    assert res.exit_code == 0, res.stderr
    import json

    layers = json.loads(res.stdout)["layers"]
    assert [(r["name"], r["role"]) for r in layers] == [("fc", "penultimate, classifier")]
    # a features file with a classifier: its features are the classifier input
    h, yy, W, b = _data()
    feats = _save(tmp_path / "f.npz", h, yy, W, b)
    got, _ = _measure(feats, "-l", "classifier", "-m", "nc1")
    assert math.isfinite(got["nc1"])
    bare = _save(tmp_path / "bare.npz", h, yy)
    res = runner.invoke(app, ["measure", bare, "-l", "classifier"])
    assert res.exit_code != 0
    assert "no layer matches 'classifier'" in res.stderr and "none feeds a classifier" in res.stderr


def test_extract_notes_classes_the_data_do_not_have(tmp_path):
    """A classifier wider than the labels (a class held out on purpose): extract says so
    once, and measure leaves that class out with the count in the `classes` row."""
    from nccli import zoo

    rng = np.random.default_rng(0)
    y = np.arange(N) % (K - 1)  # the last class has no sample
    x = (rng.normal(size=(K, D)) * 2)[y] + rng.normal(size=(N, D))
    np.savez(tmp_path / "data.npz", x=x.astype(np.float32), y=y)
    arch = f"mlp:in_dim={D},widths=16-,num_classes={K}"
    torch.manual_seed(0)
    torch.save(zoo.build(arch).state_dict(), tmp_path / "ep1.pt")
    out = tmp_path / "c"
    res = runner.invoke(
        app,
        ["extract", str(tmp_path / "ep1.pt"), "-d", str(tmp_path / "data.npz"), "--arch", arch,
         "-o", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    note = (
        f"note: {tmp_path / 'data.npz'}: the model has {K} classes and the data have no "
        f"sample of 1 of them ({K - 1}); measure leaves them out and uses the other {K - 1}"
    )
    assert res.stderr.count(note) == 1, res.stderr
    got, err = _measure(str(out / "ep1.h5"), "-m", "classes,nc1")
    assert got["classes"] == K - 1 and math.isfinite(got["nc1"])
