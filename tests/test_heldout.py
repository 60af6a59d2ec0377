"""Held-out splits measured against the training split (issue 14; docs/metrics.md,
"Held-out splits"), through the real CLI on caches made by ``extract``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import runner

from nccli import zoo
from nccli.cli import app
from nccli.io.cache import Cache

K, D = 4, 8
ARCH = f"mlp:in_dim={D},widths=16-,num_classes={K},head_depth=1"


def _data(path: Path, n: int, seed: int, noise: float) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    mu = np.random.default_rng(0).normal(size=(K, D)) * 2  # the same classes in both splits
    np.savez(path, x=(mu[y] + noise * rng.normal(size=(n, D))).astype(np.float32), y=y)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("heldout")
    train = _data(tmp / "train.npz", 160, 1, 1.0)
    test = _data(tmp / "test.npz", 120, 2, 1.6)
    torch.manual_seed(0)
    torch.save(zoo.build(ARCH).state_dict(), tmp / "ep3.pt")
    for split, data in (("train", train), ("test", test)):
        res = runner.invoke(
            app,
            [
                "extract",
                str(tmp / "ep3.pt"),
                "-d",
                str(data),
                "--arch",
                ARCH,
                "--split",
                split,
                "-o",
                str(tmp / split),
                "-q",
            ],
        )
        assert res.exit_code == 0, res.stderr
    return {"train": tmp / "train" / "ep3.h5", "test": tmp / "test" / "ep3.h5"}


def _features(path: Path, layer: str) -> tuple[np.ndarray, np.ndarray]:
    with Cache(path) as c:
        parts = list(c.iter_features(layer, 10_000))
    h = np.concatenate([p[0] for p in parts]).astype(np.float64)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return h, y


def _classifier(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Cache(path) as c:
        W, b = c.weight("classifier")
    return np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)


def _measure(*args: str) -> pd.DataFrame:
    res = runner.invoke(app, ["measure", *args, "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    return pd.read_csv(io.StringIO(res.stdout))


def test_test_split_uses_the_training_means(caches):
    df = _measure(str(caches["train"]), str(caches["test"]), "-l", "classifier", "-m", "all")
    assert list(df.columns[:2]) == ["source", "split"]
    got = df[df["split"] == "test"].set_index("metric")["value"]
    h_tr, y_tr = _features(caches["train"], "classifier")
    h, y = _features(caches["test"], "classifier")
    mu_tr = np.stack([h_tr[y_tr == k].mean(0) for k in range(K)])
    nearest = np.argmin(((h[:, None, :] - mu_tr[None]) ** 2).sum(-1), axis=1)
    # the classifier acting on its own input is the model's last linear layer
    W, b = _classifier(caches["test"])
    pred = np.argmax(h @ W.T + b, axis=1)
    assert got["ncc_acc"] == np.mean(nearest == y)  # exact: a fraction of the samples
    assert got["nc4"] == np.mean(nearest != pred)
    assert got["acc"] == np.mean(pred == y)
    # NC1 / CDNV of the test features about the training means (float64 reference)
    N = len(y)
    n = np.bincount(y, minlength=K).astype(float)
    R = h - mu_tr[y]
    Sw = R.T @ R / N
    mu_g = (n[:, None] * mu_tr).sum(0) / N
    M = mu_tr - mu_g
    Sb = M.T @ M / K
    assert got["nc1_train_means"] == pytest.approx(np.trace(Sw @ np.linalg.pinv(Sb)) / K, rel=1e-9)
    var = np.array([(R[y == k] ** 2).sum() / n[k] for k in range(K)])
    pairs = [
        (var[k] + var[j]) / (2 * ((mu_tr[k] - mu_tr[j]) ** 2).sum())
        for k in range(K)
        for j in range(k + 1, K)
    ]
    assert got["cdnv_train_means"] == pytest.approx(np.mean(pairs), rel=1e-9)
    # the test split's own-mean NC1 is unchanged, and differs from the one about train means
    alone = _measure(str(caches["test"]), "-l", "classifier", "-m", "nc1,ncc_acc")
    alone = alone.set_index("metric")["value"]
    assert got["nc1"] == pytest.approx(alone["nc1"], rel=1e-12)
    assert got["nc1_train_means"] != pytest.approx(got["nc1"], rel=1e-3)
    mu_te = np.stack([h[y == k].mean(0) for k in range(K)])
    own = np.argmin(((h[:, None, :] - mu_te[None]) ** 2).sum(-1), axis=1)
    assert alone["ncc_acc"] == np.mean(own == y)
    # the train split is measured as before
    train = df[df["split"] == "train"].set_index("metric")["value"]
    assert np.isnan(train["nc1_train_means"])


def test_alone_a_test_split_says_which_means_it_used(caches):
    res = runner.invoke(app, ["measure", str(caches["test"]), "-m", "ncc_acc", "-f", "json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert {r["split"] for r in rows} == {"test"}
    assert (
        "split 'test' has no training cache of the same checkpoint among the inputs: nc4 and "
        "ncc_acc use its own class means; pass the training cache too" in res.stderr
    )


def test_compare_by_split_is_the_generalisation_gap(caches):
    paths = [str(caches["train"]), str(caches["test"])]
    res = runner.invoke(app, ["compare", *paths, "--by", "split", "-m", "nc1,ncc_acc", "-f", "csv"])
    assert res.exit_code == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert "split" in df.columns
    for _layer, part in df.groupby("layer"):
        v = part.set_index(["run", "metric"])["value"]
        for m in ("nc1", "ncc_acc"):
            assert v[("test", f"delta_{m}")] == pytest.approx(v[("test", m)] - v[("train", m)])
    # ncc_acc of the test split in compare is the one about the training means, as in measure
    got = df[(df["run"] == "test") & (df["metric"] == "ncc_acc") & (df["layer"] == "classifier")]
    m = _measure(*paths, "-l", "classifier", "-m", "ncc_acc")
    assert got["value"].iloc[0] == m[m["split"] == "test"]["value"].iloc[0]
    tab = runner.invoke(app, ["compare", *paths, "--by", "split", "-m", "nc1", "-f", "table"])
    assert "splits by epoch (Δ = split − train)" in tab.stdout
    one = runner.invoke(app, ["compare", paths[0], "--by", "split"])
    assert one.exit_code == 2 and "--by split needs a held-out split beside train" in one.stderr


def test_extract_eval_data_writes_the_held_out_split_beside_the_training_one(tmp_path, caches):
    """--eval-data test=FILE: <out>/test/<stem>.h5 with split 'test', which measure pairs
    with ../<stem>.h5 on its own and compare --by split lines up."""
    tmp = caches["train"].parent.parent
    out = tmp_path / "cache"
    res = runner.invoke(
        app,
        [
            "extract",
            str(tmp / "ep3.pt"),
            "-d",
            str(tmp / "train.npz"),
            "--eval-data",
            f"test={tmp / 'test.npz'}",
            "--arch",
            ARCH,
            "-o",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split() == [str(out / "ep3.h5"), str(out / "test" / "ep3.h5")]
    with Cache(out / "test" / "ep3.h5") as c:
        assert c.attrs["split"] == "test" and c.attrs["reference_cache"] == "../ep3.h5"
    # alone, the test cache finds its training cache and says so
    res = runner.invoke(
        app, ["measure", str(out / "test" / "ep3.h5"), "-m", "ncc_acc", "-f", "csv"]
    )
    assert res.exit_code == 0, res.stderr
    assert "split 'test' measured against the training class means of ../ep3.h5" in res.stderr
    both = _measure(str(caches["train"]), str(caches["test"]), "-m", "ncc_acc")
    alone = pd.read_csv(io.StringIO(res.stdout))
    want = both[both["split"] == "test"].set_index("layer")["value"]
    assert alone.set_index("layer")["value"].to_dict() == want.to_dict()
    # bad values are one line each
    for value, msg in (
        ("test.npz", "write NAME=FILE"),
        ("train=x.npz", "differ from the training split 'train'"),
        ("a/b=x.npz", "letters, digits"),
    ):
        bad = runner.invoke(
            app,
            ["extract", str(tmp / "ep3.pt"), "-d", str(tmp / "train.npz"), "--arch", ARCH,
             "-o", str(tmp_path / "x"), "--eval-data", value],
        )  # fmt: skip
        assert bad.exit_code == 2 and msg in bad.stderr, (value, bad.stderr)
        assert not (tmp_path / "x").exists()
