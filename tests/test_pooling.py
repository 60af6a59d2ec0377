"""Layers that are not vectors: ``--pool``, the memory plan, ``--layers blocks``/globs/``#N``.

A small CNN (stem conv → two stages with (B, C, H, W) outputs, the first a residual block
whose ReLU runs twice → adaptive average pool → flatten → linear) is written to a file and
extracted through the real CLI (``--model file.py:build``); every cached layer and its NC1
are checked against a float64 reference made here with plain forward hooks.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import runner
from reference import reference_metrics
from torch import nn

from nccli.cli import app
from nccli.errors import DataError, UsageError
from nccli.extract import discover_layers
from nccli.extract.plan import check_plan, format_bytes, make_plan, memory_limit, parse_size
from nccli.extract.pooling import pool_features, pooled
from nccli.io.cache import Cache

K, N, C_IN, S = 3, 60, 3, 8

MODEL_SOURCE = '''
import torch
from torch import nn


class Residual(nn.Module):
    """Two convs and one ReLU module used twice (the BasicBlock pattern)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class SmallCNN(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.stage1 = Residual(4)
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.act(self.conv(x))))
        return self.fc(self.flatten(self.pool(x)))


class Tokens(nn.Module):
    """(B, T, C) inputs: a per-token projection, then the mean over tokens."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.proj(x).mean(1))


def build():
    torch.manual_seed(0)
    return SmallCNN()


def tokens():
    torch.manual_seed(0)
    return Tokens()
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pooling")
    src = d / "smallcnn.py"
    src.write_text(MODEL_SOURCE)
    spec = importlib.util.spec_from_file_location("nccli_test_smallcnn", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build().eval()
    torch.save(model.state_dict(), d / "cnn.pt")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), N // K)
    x = (rng.standard_normal((N, C_IN, S, S)) + y[:, None, None, None] * 0.5).astype(np.float32)
    np.savez(d / "images.npz", x=x, y=y)
    tok = mod.tokens().eval()
    torch.save(tok.state_dict(), d / "tok.pt")
    np.savez(d / "tokens.npz", x=rng.standard_normal((N, 5, 4)).astype(np.float32), y=y)
    return {"dir": d, "src": src, "model": model, "x": x, "y": y}


def reference(model: nn.Module, x: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
    """Each module's output (its last call) on all of ``x``, in float64, by forward hooks
    (in batches of 16 as extracted: a convolution's last bit can depend on the batch)."""
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: got[n].append(o.double())) for n in names
    ]
    with torch.no_grad():
        for lo in range(0, len(x), 16):
            model(torch.from_numpy(x[lo : lo + 16]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(ts) for n, ts in got.items()}


def extract(work: dict, out: Path, *extra: str, data: str = "images.npz", ckpt: str = "cnn.pt"):
    d = work["dir"]
    model = f"{work['src']}:{'build' if ckpt == 'cnn.pt' else 'tokens'}"
    args = ["extract", str(d / ckpt), "-d", str(d / data), "--model", model, "-o", str(out)]
    return runner.invoke(app, [*args, "--device", "cpu", "-b", "16", *extra])


def cached(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str]]:
    with Cache(path) as c:
        feats = {n: np.concatenate([h for h, _ in c.iter_features(n)]) for n in c.layers}
        return feats, c.labels(), {n: c.layers[n].pool for n in c.layers}


def nc1_rows(path: Path) -> dict[str, float]:
    res = runner.invoke(app, ["measure", str(path), "-m", "nc1", "-f", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "source,epoch,layer,metric,value"
    return {ln.split(",")[2]: float(ln.split(",")[4]) for ln in lines[1:]}


def close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    w = want.numpy()
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6 * np.abs(w).max(), err_msg=what)


def test_blocks_are_average_pooled_and_match_a_float64_reference(work, tmp_path):
    res = extract(work, tmp_path / "out", "--layers", "blocks")
    assert res.exit_code == 0, res.output
    # the default pool is said once, on stderr
    assert "--pool avg, the default" in res.stderr
    path = tmp_path / "out" / "cnn.h5"
    feats, y, pools = cached(path)
    # stem (its last module), the stages in executed order, then the head; the average
    # pool (same values as the classifier input) and the flatten (a pass-through) are not
    assert list(feats) == ["act", "stage1", "stage2", "fc"]
    assert pools == {"act": "avg", "stage1": "avg", "stage2": "avg", "fc": "none"}
    assert np.array_equal(y, work["y"])
    ref = reference(work["model"], work["x"], ["act", "stage1", "stage2", "flatten"])
    want = {n: ref[n].mean(dim=(2, 3)) for n in ("act", "stage1", "stage2")}
    want["fc"] = ref["flatten"]
    nc1 = nc1_rows(path)
    for name, w in want.items():
        assert feats[name].shape == tuple(w.shape)
        close(feats[name], w, name)
        # statistics are of the stored (float32) values: NC1 of the reference as stored
        expect = reference_metrics(w.float().double().numpy(), work["y"], K)["nc1"]
        assert nc1[name] == pytest.approx(expect, rel=1e-6), name
    # the pool is stored per layer and shown by info
    res = runner.invoke(app, ["info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["layers"]
    assert [(r["name"], r["pool"], r["dim"]) for r in rows] == [
        ("act", "avg", 4),
        ("stage1", "avg", 4),
        ("stage2", "avg", 6),
        ("fc", "none", 6),
    ]
    with h5py.File(path, "r") as f:
        assert f["layers/stage1"].attrs["pool"] == "avg"
        assert f.attrs["pool"] == "avg"


@pytest.mark.parametrize("pool", ["flatten", "max"])
def test_flatten_and_max_match_their_references(work, tmp_path, pool):
    res = extract(work, tmp_path / "out", "--layers", "act,stage2", "--pool", pool)
    assert res.exit_code == 0, res.output
    assert "the default" not in res.stderr  # asked for: no note
    path = tmp_path / "out" / "cnn.h5"
    feats, _, pools = cached(path)
    assert pools == {"act": pool, "stage2": pool}
    ref = reference(work["model"], work["x"], ["act", "stage2"])
    nc1 = nc1_rows(path)
    for name, t in ref.items():
        w = t.reshape(N, -1) if pool == "flatten" else t.amax(dim=(2, 3))
        assert feats[name].shape == tuple(w.shape)
        close(feats[name], w, f"{pool} {name}")
        expect = reference_metrics(w.float().double().numpy(), work["y"], K)["nc1"]
        assert nc1[name] == pytest.approx(expect, rel=1e-6), name


def test_a_cache_of_another_pool_is_not_reused(work, tmp_path):
    out = tmp_path / "out"
    assert extract(work, out, "--layers", "stage2", "-q").exit_code == 0
    res = extract(work, out, "--layers", "stage2", "--pool", "max")
    assert res.exit_code == 2
    assert "different pool" in res.stderr and "--overwrite" in res.stderr


def test_a_token_sequence_is_refused_in_one_line(work, tmp_path):
    res = extract(work, tmp_path / "out", "--layers", "proj", data="tokens.npz", ckpt="tok.pt")
    assert res.exit_code == 1, res.output
    [line] = res.stderr.strip().splitlines()
    assert "module proj returns (batch, 5, 6)" in line
    assert "(batch, tokens, channels)" in line and "--pool flatten" in line
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    res = extract(
        work, tmp_path / "out", "--layers", "proj", "--pool", "flatten", data="tokens.npz",
        ckpt="tok.pt",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    feats, _, pools = cached(tmp_path / "out" / "tok.h5")
    assert pools == {"proj": "flatten"} and feats["proj"].shape == (N, 30)


def test_a_layer_over_the_memory_limit_is_refused_before_anything_is_written(work, tmp_path):
    out = tmp_path / "out"
    # stage1 flattened: 4×8×8 = 256 features, a 524 kB scatter and as much again per batch
    res = extract(work, out, "--layers", "stage1", "--pool", "flatten", "--max-memory", "1M")
    assert res.exit_code == 1, res.output
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("nccli: error: ") and "Traceback" not in res.output
    for needle in (
        "layer stage1 gives 256 features per sample (flattened 4×8×8)",
        "over the 1.0 MB limit (--max-memory)",
        "use --pool avg (4 features)",
    ):
        assert needle in line, line
    assert not out.exists() or not list(out.iterdir())
    # pooled, it fits; 'none' lifts the limit
    assert extract(work, out, "--layers", "stage1", "--max-memory", "1M", "-q").exit_code == 0
    res = extract(work, tmp_path / "o2", "--layers", "stage1", "--pool", "flatten")
    assert res.exit_code == 0, res.output
    res = extract(work, tmp_path / "o3", "--layers", "stage1", "--max-memory", "lots")
    assert res.exit_code == 2 and "--max-memory 'lots'" in res.stderr


def test_a_module_run_twice_needs_its_call_index(work, tmp_path):
    res = extract(work, tmp_path / "out", "--layers", "stage1.relu")
    assert res.exit_code == 1, res.output
    [line] = res.stderr.strip().splitlines()
    assert "module stage1.relu runs 2 times per forward pass" in line
    assert "'stage1.relu#1' … 'stage1.relu#2'" in line
    res = extract(work, tmp_path / "out", "--layers", "stage1.relu#2,stage1", "-q")
    assert res.exit_code == 0, res.output
    feats, _, pools = cached(tmp_path / "out" / "cnn.h5")
    assert list(feats) == ["stage1.relu#2", "stage1"]
    # the relu's second call is the block's output
    np.testing.assert_array_equal(feats["stage1.relu#2"], feats["stage1"])
    res = extract(work, tmp_path / "o2", "--layers", "stage1.relu#3")
    assert res.exit_code == 2 and "has no call #3" in res.stderr


def test_globs_match_one_level_unless_double_star(work):
    model = work["model"]
    probe = torch.from_numpy(work["x"][:4])
    one = discover_layers(model, probe, "stage*")
    assert [c.name for c in one.layers] == ["stage1", "stage2"]
    deep = discover_layers(model, probe, "stage2**")
    # executed order: a container's output comes after its children's
    assert [c.name for c in deep.layers] == ["stage2.0", "stage2.1", "stage2"]
    convs = discover_layers(model, probe, "**.conv*", pool="max")
    assert [c.name for c in convs.layers] == ["conv", "stage1.conv1", "stage1.conv2"]
    with pytest.raises(UsageError, match=r"'\*' stays within one level, '\*\*' crosses levels"):
        discover_layers(model, probe, "stage1*conv1")
    with pytest.raises(DataError, match=r"stage1\.relu runs 2 times.*#N|stage1\.relu#1"):
        discover_layers(model, probe, "stage1**")


def test_many_matches_are_noted():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(10)])
    model.append(nn.Linear(3, 2))
    disc = discover_layers(model, torch.randn(4, 3), "*.*")
    assert len(disc.layers) == 20
    assert any("matches 20 modules" in n for n in disc.notes)


def test_pooling_rules_and_precision():
    assert pooled((7,), "avg", "m") == ("none", 7)
    assert pooled((), "avg", "m") == ("none", 1)
    assert pooled((4, 8, 8), "avg", "m") == ("avg", 4)
    assert pooled((4, 2, 8, 8), "max", "m") == ("max", 4)
    assert pooled((4, 8, 8), "flatten", "m") == ("flatten", 256)
    assert pooled((5, 6), "flatten", "m") == ("flatten", 30)
    for pool in ("avg", "max"):
        with pytest.raises(DataError, match=r"m returns \(batch, 5, 6\)"):
            pooled((5, 6), pool, "m")
    with pytest.raises(DataError, match="empty feature"):
        pooled((4, 0, 8), "avg", "m")
    # an fp16 map (as under --amp) is averaged in float64: no overflow, no fp16 rounding
    t = torch.full((2, 3, 64, 64), 60000.0, dtype=torch.float16)
    got = pool_features(t, "avg")
    assert got.dtype == torch.float64 and torch.all(got == 60000.0)
    assert pool_features(t, "max").dtype == torch.float16
    # a float32 map's mean is the correctly rounded one once stored (float32 sums are not)
    x = torch.tensor([1.0] + [1e-8] * 4095, dtype=torch.float32).reshape(1, 1, 64, 64)
    want = np.float32(np.mean(x.double().numpy()))
    assert pool_features(x, "avg").float().item() == want


def test_sizes_and_the_plan_of_a_resnet18_layer1():
    assert parse_size("8G") == 8e9 and parse_size("512M") == 512e6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    assert parse_size("none") == float("inf") and parse_size(None) is None
    for bad in ("", "-1G", "0", "8X", "G"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_size(bad)
    from nccli import zoo

    model = zoo.build("resnet18", num_classes=10, width=64).eval()
    probe = torch.randn(2, 3, 32, 32)
    flat = discover_layers(model, probe, "layer1", pool="flatten")
    plan = make_plan(flat, 50_000, 256)
    [cost] = [c for c in plan.layers if c.name == "layer1"]
    assert (cost.dim, cost.shape) == (65536, (64, 32, 32))
    assert cost.stats_bytes == 8 * (65536**2 + 10 * 65536 + 20)
    assert format_bytes(cost.stats_bytes) == "34.4 GB"
    assert cost.feature_bytes == 50_000 * 65536 * 4
    with pytest.raises(DataError, match=r"layer1 gives 65536 features .*use --pool avg \(64"):
        check_plan(plan, *memory_limit("8G"), "ck.pt")
    avg = make_plan(discover_layers(model, probe, "layer1"), 50_000, 256)
    assert [c.dim for c in avg.layers if c.name == "layer1"] == [64]
    check_plan(avg, *memory_limit("8G"), "ck.pt")  # 64 features fit


def test_old_layer_records_read_as_unpooled(tmp_path):
    # caches written before 'pool'/'order' existed still read: pool 'none', order -1
    from nccli.io.cache import CacheWriter
    from nccli.layers import Layer
    from nccli.stats import ClassStats

    H = np.random.default_rng(0).standard_normal((6, 2))
    y = np.array([0, 1, 0, 1, 0, 1])
    w = CacheWriter(tmp_path / "c.h5", [Layer("b", 2), Layer("a", 2)], 6, 2)
    w.write_rows(0, y, np.arange(6), {"b": H, "a": H}, None)
    w.finalize({n: ClassStats.from_arrays(H, y, 2) for n in ("a", "b")})
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        for g in f["layers"].values():
            del g.attrs["pool"], g.attrs["order"]
    with Cache(tmp_path / "c.h5") as c:
        assert [(n, v.pool, v.order) for n, v in c.layers.items()] == [
            ("a", "none", -1),
            ("b", "none", -1),
        ]


def test_info_on_a_checkpoint_shows_the_plan(work):
    d = work["dir"]
    args = ["info", str(d / "cnn.pt"), "--model", f"{work['src']}:build", "-d"]
    res = runner.invoke(app, [*args, str(d / "images.npz"), "--layers", "blocks", "--json"])
    assert res.exit_code == 0, res.output
    desc = json.loads(res.stdout)
    rows = {r["name"]: r for r in desc["layers"]}
    assert list(rows) == ["act", "stage1", "stage2", "fc"]
    assert rows["stage2"]["shape"] == [6, 4, 4] and rows["stage2"]["dim"] == 6
    assert rows["stage2"]["pool"] == "avg"
    assert rows["stage2"]["feature_bytes"] == N * 6 * 4
    assert rows["stage2"]["stats_bytes"] == 8 * (6 * 6 + K * 6 + 2 * K)
    plan = desc["plan"]
    assert plan["num_samples"] == N and plan["refused"] is None
    assert plan["stats_bytes"] == sum(r["stats_bytes"] for r in desc["layers"])
    assert "within the limit" in desc["memory_plan"]
    res = runner.invoke(
        app, [*args, str(d / "images.npz"), "--layers", "stage1", "--pool", "flatten",
              "--max-memory", "1M", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    desc = json.loads(res.stdout)
    assert "layer stage1 gives 256 features" in desc["plan"]["refused"]
    assert "extract would refuse" in desc["memory_plan"]


def test_blocks_of_the_zoo_resnet18_and_their_notes():
    from nccli import zoo

    m = zoo.build("resnet18:num_classes=5,width=4,head_depth=1").eval()
    disc = discover_layers(m, torch.randn(2, 3, 16, 16), "blocks")
    got = [(c.name, c.pool, c.dim, c.order) for c in sorted(disc.layers, key=lambda c: c.order)]
    assert got == [
        ("relu", "avg", 4, 0),  # the stem: conv1 bn1 relu, by its last module
        ("layer1", "avg", 4, 1),
        ("layer2", "avg", 8, 2),
        ("layer3", "avg", 16, 3),
        ("layer4", "avg", 32, 4),
        ("head.0", "none", 32, 5),  # avgpool/flatten give the penultimate feature: once
        ("classifier", "none", 32, 6),
    ]
    assert disc.shapes["layer1"] == (4, 16, 16)

    class Shared(nn.Module):
        """A top-level activation used twice, and a child called 'blocks'."""

        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(3, 4))
            self.act = nn.Tanh()
            self.mid = nn.Sequential(nn.Linear(4, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.mid(self.act(self.blocks(x)))))

    disc = discover_layers(Shared(), torch.randn(3, 3), "blocks")
    assert [c.name for c in disc.layers] == ["fc", "blocks", "mid"]
    assert any("act runs 2 times" in n and "'act#N'" in n for n in disc.notes)
    assert any("--layers 'block[s]'" in n for n in disc.notes)
    only = discover_layers(Shared(), torch.randn(3, 3), "block[s]")
    assert [c.name for c in only.layers] == ["blocks"]
