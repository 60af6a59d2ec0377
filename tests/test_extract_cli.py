"""`nccli extract` and `nccli info` through CliRunner and real subprocesses.

The SIGKILL test extracts with a model that sleeps in every forward pass
(:mod:`slow_model`), so the kill reliably lands mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import slow_model
import torch
from helpers import Evil, assert_stats_close, runner, save_state_dict, write_cluster_npz

from nccli import zoo
from nccli.cli import app
from nccli.io.cache import Cache

K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_cluster_npz(tmp_path / "data.npz", N, D, K, seed=1, scale=1.5)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_state_dict(tmp_path / "run_ep005.pt", ARCH)


def extract_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        str(ckpt),
        "--data",
        str(data),
        "--arch",
        ARCH,
        "-o",
        str(out),
        "--device",
        "cpu",
        "-b",
        "10",
        *extra,
    ]


def test_extract_then_measure(tmp_path, data, ckpt):
    out = tmp_path / "out"
    res = runner.invoke(app, extract_args(ckpt, data, out))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(out / "run_ep005.h5")]
    path = out / "run_ep005.h5"
    with Cache(path) as c:
        y = c.labels()
        logits = c.h5["logits"][()]
        feats = {n: np.concatenate([h for h, _ in c.iter_features(n)]) for n in c.layers}
        means = {n: c.stats(n).means for n in c.layers}
    res = runner.invoke(app, ["measure", str(path), "-f", "json", "-m", "nc4,acc,ncc_acc"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    got = {(r["layer"], r["metric"]): r["value"] for r in rows}
    assert {r["epoch"] for r in rows} == {5}
    pred = logits.argmax(1)
    for layer in ("head.0", "classifier"):
        h = feats[layer].astype(np.float64)
        dist = (h**2).sum(1)[:, None] - 2 * h @ means[layer].T + (means[layer] ** 2).sum(1)
        ncc = dist.argmin(1)
        assert got[(layer, "acc")] == pytest.approx(np.mean(pred == y), abs=1e-12)
        assert got[(layer, "nc4")] == pytest.approx(np.mean(pred != ncc), abs=1e-12)
        assert got[(layer, "ncc_acc")] == pytest.approx(np.mean(ncc == y), abs=1e-12)


def test_info_cache_and_checkpoint(tmp_path, data, ckpt):
    out = tmp_path / "out"
    assert runner.invoke(app, extract_args(ckpt, data, out, "--dtype", "float16")).exit_code == 0
    res = runner.invoke(app, ["info", str(out / "run_ep005.h5"), "--json"])
    assert res.exit_code == 0, res.output
    desc = json.loads(res.stdout)
    assert desc["attrs"]["classifier"] == "classifier" and desc["complete"]
    assert [(r["name"], r["depth"], r["role"], r["dim"], r["dtype"], r["stats"]) for r in
            desc["layers"]] == [
        ("head.0", 0, "penultimate", 10, "float16", True),
        ("classifier", 1, "classifier", 10, "float16", True),
    ]  # fmt: skip
    res = runner.invoke(app, ["info", str(out / "run_ep005.h5")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "penultimate" in res.stdout and "[train]" in res.stdout
    # a checkpoint: what --layers auto would pick, probe shape from the MLP's first layer
    res = runner.invoke(app, ["info", str(ckpt), "--arch", ARCH, "--json"])
    assert res.exit_code == 0, res.output
    desc = json.loads(res.stdout)
    assert desc["input_shape"] == [D] and desc["head_depth"] == 1 and desc["epoch"] == 5
    assert [r["name"] for r in desc["layers"]] == ["head.0", "classifier"]
    # a zoo conv net records its CIFAR-sized input; --data overrides it
    conv = tmp_path / "conv.pt"
    arch = "resnet18:num_classes=3,width=2,in_channels=1"
    torch.save(zoo.build(arch).state_dict(), conv)
    res = runner.invoke(app, ["info", str(conv), "--arch", arch, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input_shape"] == [1, 32, 32]
    img = tmp_path / "img.npz"
    np.savez(img, x=np.zeros((6, 8, 8), np.uint8), y=np.arange(6) % 3)
    probe = ["--data", str(img), "--normalize", "none"]  # uint8: explicit --normalize
    res = runner.invoke(app, ["info", str(conv), "--arch", arch, *probe, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input_shape"] == [1, 8, 8]


def test_usage_and_data_errors(tmp_path, data, ckpt):
    res = runner.invoke(app, ["extract", str(ckpt), "--arch", ARCH, "-o", str(tmp_path)])
    assert res.exit_code == 2 and "--data" in res.output
    res = runner.invoke(app, extract_args(ckpt, data, tmp_path / "o", "--amp", "fp16"))
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "nccli: error: --amp fp16 needs a CUDA device (this run uses cpu); use --amp off or "
        "--device cuda"
    ]
    model = zoo.build(ARCH)
    with torch.no_grad():
        model.classifier.bias.fill_(float("inf"))
    bad = tmp_path / "bad.pt"
    torch.save(model.state_dict(), bad)
    res = runner.invoke(app, extract_args(bad, data, tmp_path / "o"))
    assert res.exit_code == 1
    [line] = res.stderr.strip().splitlines()
    assert "bad.pt: layer logits has NaN or infinite values" in line
    assert not list((tmp_path / "o").glob("*"))


def test_malicious_pickle_is_refused(tmp_path, data):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil(marker)}, evil)
    res = runner.invoke(app, extract_args(evil, data, tmp_path / "out"))
    assert res.exit_code == 1
    assert "--trust-checkpoint" in res.stderr and "Traceback" not in res.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, data, ckpt):
    out = tmp_path / "out"
    # the same network, sleeping 0.3 s in every forward (the run's directory holds it)
    slow = slow_model.write(tmp_path, ARCH, 0.3)
    args = extract_args(ckpt, data, out, "--dtype", "float16")
    i = args.index("--arch")
    args[i : i + 2] = ["--model", slow]
    cmd = [sys.executable, "-m", "nccli", "-q", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    part = out / "run_ep005.h5.partial"
    try:
        deadline = time.monotonic() + 60
        while not part.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert part.exists(), proc.communicate()
        time.sleep(1.0)  # a few batches in, far from the end (9 batches x 0.3 s)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run_ep005.h5").exists()
    with h5py.File(part, "r") as f:
        done = int(f.attrs["rows_done"])
    assert 0 < done < N
    res = runner.invoke(app, ["info", str(part)])
    assert res.exit_code == 0 and "unfinished" in res.stdout
    res = runner.invoke(app, ["measure", str(part)])
    assert res.exit_code == 1 and "--resume" in res.stderr

    res = runner.invoke(app, extract_args(ckpt, data, out, "--dtype", "float16", "--resume"))
    assert res.exit_code == 0, res.output
    assert f"resuming at row {done}" in res.stderr
    full = tmp_path / "full"
    assert runner.invoke(app, extract_args(ckpt, data, full, "--dtype", "float16")).exit_code == 0
    with Cache(out / "run_ep005.h5") as a, Cache(full / "run_ep005.h5") as b:
        for name in a.layers:
            np.testing.assert_array_equal(a.h5[f"layers/{name}/features"][()],
                                          b.h5[f"layers/{name}/features"][()])  # fmt: skip
            assert_stats_close(a.stats(name), b.stats(name), name)
