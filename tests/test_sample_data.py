"""The committed sample runs (``sample_data/``) show what ``sample_data/README.md`` claims.

Everything is measured here from the committed files alone — a forward pass of each
checkpoint (built with ``nccli.zoo``) on the committed training data, statistics and
metrics from ``nccli.stats`` / ``nccli.metrics`` — with no training.  The last test runs
``scripts/make_sample_data.py --quick`` end to end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nccli import zoo
from nccli.io.checkpoints import load_model
from nccli.metrics import geometry, nc
from nccli.stats import ClassStats

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sample_data"
EPOCHS = [0, 5, 20, 50, 100, 200, 400]
RUNS = ["run1_ce", "run2_mse", "run3_mse_imb", "run4_ce_etf"]
K = 10

pytestmark = pytest.mark.skipif(
    not (DATA / "runs.json").is_file(), reason="sample_data/ not present"
)


def head_inputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The input of every head layer and of the classifier (as ``nccli extract`` caches
    them, keyed by module name), and the logits."""
    feats: dict[str, torch.Tensor] = {}
    modules = [(f"head.{i}", m) for i, m in enumerate(model.head)]
    modules.append(("classifier", model.classifier))
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, name=name: feats.__setitem__(name, args[0].double())
        )
        for name, m in modules
    ]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return feats, logits


@pytest.fixture(scope="module")
def measured(sample_manifest: dict) -> dict[str, list[dict]]:
    """Per run, per checkpoint: epoch, training accuracy, nc1 of every head layer's input,
    and at the classifier input the statistics and weight."""
    out: dict[str, list[dict]] = {}
    for name in RUNS:
        run = sample_manifest["runs"][name]
        data = np.load(DATA / run["data"])
        x, y = torch.from_numpy(data["x"]), data["y"]
        rows = []
        for ckpt in run["checkpoints"]:
            obj = torch.load(DATA / ckpt, weights_only=True)
            model = zoo.build(run["arch"])
            model.load_state_dict(obj["state_dict"])
            feats, logits = head_inputs(model, x)
            stats = {k: ClassStats.from_arrays(h, y, num_classes=K) for k, h in feats.items()}
            rows.append(
                {
                    "epoch": obj["epoch"],
                    "file": ckpt,
                    "acc": float((logits.argmax(1).numpy() == y).mean()),
                    "nc1": {k: nc.nc1(s) for k, s in stats.items()},
                    "stats": stats["classifier"],
                    "weight": model.classifier.weight.detach().double().numpy(),
                }
            )
        out[name] = rows
    return out


# ------------------------------------------------------------------------ files and manifest
def test_files_and_manifest(sample_manifest: dict) -> None:
    assert sorted(sample_manifest["runs"]) == RUNS
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"sample_data/ is {total / 2**20:.1f} MB"
    for name, run in sample_manifest["runs"].items():
        assert run["epochs"] == EPOCHS
        assert [Path(c).name for c in run["checkpoints"]] == [f"ep{e:04d}.pt" for e in EPOCHS]
        assert run["loss"] in ("ce", "mse") and run["wd"] > 0 and run["lr"] > 0
        assert (DATA / run["data"]).is_file()
        zoo.build(run["arch"])  # the spec is one `nccli extract --arch` accepts
        assert [h["epoch"] for h in run["history"]] == EPOCHS, name


def test_checkpoints_record_their_epoch(sample_manifest: dict) -> None:
    for run in sample_manifest["runs"].values():
        for ckpt, epoch in zip(run["checkpoints"], EPOCHS, strict=True):
            obj = torch.load(DATA / ckpt, weights_only=True)
            assert obj["epoch"] == epoch
            assert int(re.search(r"ep(\d+)", ckpt).group(1)) == epoch
            assert obj["arch"] == run["arch"]


def test_datasets(sample_manifest: dict) -> None:
    train, test = np.load(DATA / "digits_train.npz"), np.load(DATA / "digits_test.npz")
    imb = np.load(DATA / "digits_train_imbalanced.npz")
    assert train["x"].shape == (1437, 64) and test["x"].shape == (360, 64)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int64
    assert 0.0 <= train["x"].min() and train["x"].max() <= 1.0  # pixels / 16
    # stratified split: every class about 80 / 20
    ratio = np.bincount(test["y"], minlength=K) / np.bincount(train["y"], minlength=K)
    assert np.all(np.abs(ratio - 0.25) < 0.02)
    # the imbalanced set is a subset of the train split with sizes falling ~10:1
    counts = np.bincount(imb["y"], minlength=K)
    assert np.all(np.diff(counts) < 0) and 9 <= counts[0] / counts[-1] <= 11
    rows = {r.tobytes() + bytes([c]) for r, c in zip(train["x"], train["y"], strict=True)}
    assert all(r.tobytes() + bytes([c]) in rows for r, c in zip(imb["x"], imb["y"], strict=True))
    assert sample_manifest["class_counts"]["digits_train_imbalanced.npz"] == counts.tolist()


# ------------------------------------------------------------------------ collapse claims
@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_fits_training_data(measured: dict, sample_manifest: dict, name: str) -> None:
    last = measured[name][-1]
    assert last["acc"] == 1.0
    assert sample_manifest["runs"][name]["history"][-1]["train_acc"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_nc1_at_classifier_input_falls_tenfold_along_the_run(measured: dict, name: str) -> None:
    traj = [r["nc1"]["classifier"] for r in measured[name]]
    assert traj[-1] <= traj[0] / 10, traj
    # falls at every checkpoint (the committed runs have no upward wiggle)
    assert all(b < a for a, b in zip(traj, traj[1:], strict=False)), traj


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_nc1_falls_at_every_head_layer(measured: dict, name: str) -> None:
    first, last = measured[name][0]["nc1"], measured[name][-1]["nc1"]
    assert set(first) == ({"head.0", "classifier"} if name == "run4_ce_etf" else
                          {"head.0", "head.1", "classifier"})  # fmt: skip
    for layer in first:
        assert last[layer] <= first[layer] / 10, (layer, first[layer], last[layer])


@pytest.mark.slow
def test_run3_class_means_approach_an_orthogonal_frame(
    measured: dict, sample_manifest: dict
) -> None:
    traj = [geometry.of_maxcos_means(r["stats"]) for r in measured["run3_mse_imb"]]
    assert traj[0] > 0.9, traj
    assert traj[-1] < 0.25 and traj[-1] < traj[0] / 4, traj
    # the classifier of run 3 has no bias: the zoo spec says so and the state dict agrees
    spec = zoo.parse_arch(sample_manifest["runs"]["run3_mse_imb"]["arch"])[1]
    assert spec["head_bias"] is False and spec["classifier_bias"] is False


@pytest.mark.slow
def test_run4_classifier_is_a_fixed_simplex_etf(measured: dict) -> None:
    rows = measured["run4_ce_etf"]
    w0 = rows[0]["weight"]
    assert w0.shape == (K, K)  # feature dimension = number of classes
    for r in rows:
        np.testing.assert_array_equal(r["weight"], w0)  # never trained
    gram = w0 @ w0.T
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-6)
    np.testing.assert_allclose(gram[~np.eye(K, dtype=bool)], -1 / (K - 1), atol=1e-6)


# ------------------------------------------------------------------------ generator
@pytest.mark.slow
def test_quick_generation_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sd"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_sample_data.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    man = json.loads((out / "runs.json").read_text())
    assert sorted(man["runs"]) == RUNS
    for name in ("digits_train.npz", "digits_test.npz", "digits_train_imbalanced.npz"):
        assert (out / name).is_file()
    for run in man["runs"].values():
        assert run["checkpoints"]
        for ckpt, epoch in zip(run["checkpoints"], run["epochs"], strict=True):
            loaded = load_model(out / ckpt, arch=run["arch"])
            assert loaded.epoch == epoch and loaded.format == "state_dict"
            x = torch.from_numpy(np.load(out / run["data"])["x"][:5])
            assert loaded.module(x).shape == (5, K)
