"""``nccli.Tracker`` and its run file: the same numbers as extract + measure on checkpoints
saved at the same epochs, the model left as it was, hostile run files refused."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_stats_close, runner, write_cluster_npz
from torch import nn

import nccli
from nccli import zoo
from nccli.cli import app
from nccli.errors import DataError, UsageError
from nccli.io.cache.run import RunFile
from nccli.stats import ClassStats

K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"
EPOCHS = 3


def _loader(data: Path, batch_size: int = 16, shuffle: bool = False):
    z = np.load(data)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def _state(model: nn.Module) -> tuple:
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        torch.is_grad_enabled(),
        {p.device for p in model.parameters()},
    )


def _train_epoch(model, loader, opt) -> None:
    model.train()
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _csv(res) -> pd.DataFrame:
    assert res.exit_code == 0, res.output
    return pd.read_csv(io.StringIO(res.stdout))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_cluster_npz(tmp_path / "data.npz", N, D, K, seed=1, scale=1.5)


@pytest.fixture
def trained(tmp_path: Path, data: Path):
    """A run: Tracker.observe every epoch and a checkpoint at the same epochs."""
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    model.body[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    run = tmp_path / "runs" / "exp1" / "nc.h5"
    tracker = nccli.Tracker(model, path=run, store_features=True)
    ckpts = tmp_path / "ckpt"
    ckpts.mkdir()
    train = _loader(data, shuffle=True)
    for epoch in range(EPOCHS):
        _train_epoch(model, train, opt)
        model.head[0].train(False)  # a mixed mode, restored module by module
        before = _state(model)
        assert tracker.observe(_loader(data, batch_size=10), epoch=epoch) == epoch  # as -b 10
        assert _state(model) == before
        torch.save(model.state_dict(), ckpts / f"run_ep{epoch:03d}.pt")
    return tracker, run, ckpts


def test_run_file_equals_extract_and_measure(tmp_path, data, trained):
    tracker, run, ckpts = trained
    out = tmp_path / "cache"
    args = ["extract", *map(str, sorted(ckpts.glob("*.pt"))), "--data", str(data)]
    res = runner.invoke(app, [*args, "--arch", ARCH, "-o", str(out), "--device", "cpu", "-b", "10"])
    assert res.exit_code == 0, res.output
    caches = sorted(map(str, out.glob("*.h5")))
    assert len(caches) == EPOCHS
    mine = _csv(runner.invoke(app, ["compare", str(run), "-f", "csv", "-m", "all"]))
    ref = _csv(runner.invoke(app, ["compare", *caches, "-f", "csv", "-m", "all"]))
    key = ["epoch", "layer", "metric"]
    both = mine.merge(ref, on=key, suffixes=("", "_ref"))
    assert len(both) == len(ref) == len(mine) and len(mine) > 50
    assert sorted(set(mine["epoch"])) == list(range(EPOCHS))
    a, b = both["value"].to_numpy(float), both["value_ref"].to_numpy(float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.all(np.abs(a[ok] - b[ok]) <= 1e-10 * np.maximum(1.0, np.abs(b[ok]))), both[~ok]
    assert set(mine["source"]) == {f"nc.h5@ep{e}" for e in range(EPOCHS)}
    # Tracker.frame() is what compare gives, row for row
    frame = tracker.frame(metrics="all")
    assert list(frame["metric"]) == list(mine["metric"])
    assert np.allclose(frame["value"].to_numpy(float), mine["value"], rtol=1e-12, equal_nan=True)
    # measure reads every observation; Tracker.measure() the last
    rows = nccli.measure(run, metrics="nc1")
    assert set(rows["epoch"]) == set(range(EPOCHS)) and len(rows) == EPOCHS * 2
    last = tracker.measure(metrics="nc1")
    assert set(last["epoch"]) == {EPOCHS - 1} and set(last["metric"]) == {"nc1"}
    # the classifier stored is the one at each observation (it changes between epochs)
    with RunFile(run) as rf:
        W = [rf.observation(i).weight("classifier")[0] for i in range(EPOCHS)]
    assert not np.allclose(W[0], W[-1])


def test_fail_if_and_plot(tmp_path, trained):
    _, run, _ = trained
    res = runner.invoke(app, ["compare", str(run), "--fail-if", "nc1>0"])
    assert res.exit_code == 1 and "nc1" in res.output
    assert runner.invoke(app, ["compare", str(run), "--fail-if", "nc1>1e9"]).exit_code == 0
    png = tmp_path / "nc.png"
    res = runner.invoke(app, ["compare", str(run), "-f", "csv", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_restored_after_an_error(tmp_path, data):
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    model.train()
    tracker = nccli.Tracker(model, path=tmp_path / "nc.h5")

    def broken():
        loader = iter(_loader(data))
        yield next(loader)
        raise RuntimeError("disk gone")

    before = _state(model)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="disk gone"):
        tracker.observe(broken(), epoch=0)
    assert _state(model) == before
    assert not (tmp_path / "nc.h5").exists()
    real = model.head[0].forward
    model.head[0].forward = lambda x: (_ for _ in ()).throw(ValueError("nan in the head"))
    with pytest.raises(ValueError, match="nan in the head"):  # inside the model's forward
        tracker.observe(_loader(data), epoch=0)
    model.head[0].forward = real
    assert _state(model) == before
    bad = [(torch.zeros(4, D), torch.tensor([0, 1, 2, 7]))]  # a label out of range
    with pytest.raises(DataError):
        tracker.observe(bad, epoch=0)
    assert _state(model) == before
    with pytest.raises(RuntimeError), tracker.collect(epoch=1):
        model(torch.zeros(2, D))
        raise RuntimeError("in the training loop")
    assert _state(model) == before
    assert not (tmp_path / "nc.h5").exists()


def test_collect_equals_detached_features(tmp_path, data):
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = nccli.Tracker(model, path=tmp_path / "nc.h5")
    tracker.observe(_loader(data), epoch=0)  # discovery
    manual = {c.name: ClassStats(K, c.dim) for c in tracker.discovery.layers}
    assert sorted(manual) == ["classifier", "head.0"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        dict(model.named_modules())[name].register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, a[0].detach())
        )
        for name in manual
    ]
    model.train()
    with tracker.collect(epoch=1) as c:
        for x, y in _loader(data, shuffle=True):
            out = model(x)
            c.labels(y)
            for name, st in manual.items():
                st.update(seen[name], y)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for h in hooks:
        h.remove()
    assert model.training
    with RunFile(tmp_path / "nc.h5") as rf:
        obs = rf.observation(1)
        assert obs.mode == "train" and obs.epoch == 1 and not obs.has_features
        for name, st in manual.items():
            assert_stats_close(obs.stats(name), st, name, rel=1e-12)
    # pairing mistakes are refused, naming the fix
    with pytest.raises(DataError, match="exactly once"), tracker.collect(epoch=2) as c:
        model(torch.zeros(2, D))
        model(torch.zeros(2, D))
        c.labels([0, 1])
    with pytest.raises(DataError, match="exactly once"), tracker.collect(epoch=2) as c:
        c.labels([0, 1])
    with pytest.raises(DataError, match=r"expected \(3,\)"), tracker.collect(epoch=2) as c:
        model(torch.zeros(3, D))
        c.labels([0, 1])
    with pytest.raises(DataError, match="no labels"), tracker.collect(epoch=2):
        model(torch.zeros(3, D))
    assert all(not m._forward_hooks for m in model.modules())


def test_stats_only_run_and_refusals(tmp_path, data):
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    run = tmp_path / "nc.h5"
    tracker = nccli.Tracker(model, path=run)
    items = [{"x": x, "label": y} for x, y in _loader(data)]  # dict items
    tracker.observe(items, epoch=0)
    tracker.observe(_loader(data), epoch=1)
    with pytest.raises(DataError, match="already holds an observation at epoch 1"):
        tracker.observe(_loader(data), epoch=1)
    with pytest.raises(UsageError, match="epoch"):
        tracker.observe(_loader(data))
    with pytest.raises(DataError, match="label entry"):
        tracker.observe([{"x": torch.zeros(2, D)}], epoch=5)
    res = _csv(runner.invoke(app, ["compare", str(run), "-f", "csv", "-m", "nc1,nc3"]))
    assert len(res) == 2 * 2 * 2
    # nc4 needs the features: nan with the reason, not a failure (the default metrics)
    res = runner.invoke(app, ["compare", str(run), "-f", "csv"])
    assert res.exit_code == 0, res.output
    nc4 = _csv(res).query("metric == 'nc4'")["value"]
    assert len(nc4) and nc4.isna().all()
    assert "no features for a second pass" in res.stderr
    assert "store_features=True" in res.stderr
    other = nccli.Tracker(zoo.build(f"mlp:in_dim={D},widths=5,num_classes={K}"), path=run)
    with pytest.raises(DataError, match="other layers or classes"):
        other.observe(_loader(data), epoch=9)
    with RunFile(run) as rf:
        assert len(rf) == 2 and rf.keys() == [(0, None), (1, None)]


def _one_line_refusal(path: Path, needle: str) -> None:
    with pytest.raises(DataError) as err:
        nccli.measure(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    res = runner.invoke(app, ["compare", str(path)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output


def test_corrupt_run_files_are_refused(tmp_path, data):
    torch.manual_seed(0)
    run = tmp_path / "nc.h5"
    tracker = nccli.Tracker(zoo.build(ARCH), path=run)
    for e in range(2):
        tracker.observe(_loader(data), epoch=e)
    good = run.read_bytes()

    def fresh(name: str) -> Path:
        p = tmp_path / name
        p.write_bytes(good)
        return p

    cut = tmp_path / "cut.h5"
    cut.write_bytes(good[: len(good) // 2])
    _one_line_refusal(cut, "cut.h5")
    with h5py.File(p := fresh("shape.h5"), "r+") as f:
        g = f["observations/1/layers/classifier/stats"]
        del g["means"]
        g["means"] = np.zeros((K + 1, 8))
    _one_line_refusal(p, "shape")
    with h5py.File(p := fresh("flip.h5"), "r+") as f:
        f["observations/0/layers/head.0/stats/scatter"][0, 0] += 1.0
    _one_line_refusal(p, "checksum")
    with h5py.File(p := fresh("count.h5"), "r+") as f:
        f.attrs["num_observations"] = 3
    _one_line_refusal(p, "num_observations")
    with h5py.File(p := fresh("layers.h5"), "r+") as f:
        del f["observations/1/layers/head.0"]
    _one_line_refusal(p, "layers")
    with h5py.File(p := fresh("version.h5"), "r+") as f:
        f.attrs["encoding-version"] = "9"
    _one_line_refusal(p, "cannot read")
    # a failed append leaves the previous run file as it was
    tracker.observe(_loader(data), epoch=2)
    before = run.read_bytes()
    with pytest.raises(DataError):
        tracker.observe([(torch.zeros(2, D), torch.tensor([0, 5]))], epoch=3)
    assert run.read_bytes() == before and not (tmp_path / "nc.h5.partial").exists()
    (tmp_path / "nc.h5.partial").write_bytes(good)  # what a killed append leaves
    res = runner.invoke(app, ["compare", str(tmp_path / "nc.h5.partial")])
    assert res.exit_code == 1 and "unfinished append" in res.output
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not an nccli run file"):
        nccli.Tracker(zoo.build(ARCH), path=junk).observe(_loader(data), epoch=0)
    assert junk.read_bytes() == b"not hdf5"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_on_the_device(tmp_path, data):
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    ref = nccli.Tracker(model, path=tmp_path / "cpu.h5")
    ref.observe(_loader(data), epoch=0)
    model.cuda()
    t = nccli.Tracker(model, path=tmp_path / "gpu.h5")
    t.observe(_loader(data), epoch=0)
    assert all(st.device.type == "cuda" for st in t.last_stats.values())
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    for name in ref.last_stats:
        assert_stats_close(t.last_stats[name].copy().to("cpu"), ref.last_stats[name], name, 1e-6)


def _ddp_rank(rank: int, world: int, port: int, data: str, run: str, errors: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(zoo.build(ARCH))
        z = np.load(data)
        ds = torch.utils.data.TensorDataset(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]))
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=10, sampler=sampler)
        tracker = nccli.Tracker(model, path=run)
        tracker.observe(loader, epoch=0)
        kept = nccli.Tracker(model, path=run.replace(".h5", "_features.h5"), store_features=True)
        kept.observe(loader, epoch=0)
        padded = torch.utils.data.Subset(ds, range(N - 1))  # odd: the sampler repeats one
        bad = torch.utils.data.DataLoader(
            padded, batch_size=10, sampler=torch.utils.data.DistributedSampler(padded)
        )
        try:
            tracker.observe(bad, epoch=1)
        except DataError as exc:
            Path(f"{errors}.{rank}").write_text(str(exc))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch: ~20 s
def test_ddp_statistics_are_merged_across_ranks(tmp_path, data):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp.h5"
    args = (2, port, str(data), str(run), str(tmp_path / "err"))
    mp.spawn(_ddp_rank, args=args, nprocs=2, join=True)
    torch.manual_seed(0)
    ref = nccli.Tracker(zoo.build(ARCH), path=tmp_path / "one.h5")
    ref.observe(_loader(data, batch_size=10), epoch=0)
    with RunFile(run) as rf:
        assert len(rf) == 1
        obs = rf.observation(0)
        assert obs.attrs["world_size"] == 2
        for name, st in ref.last_stats.items():
            got = obs.stats(name)
            assert np.array_equal(got.counts, st.counts)
            # other batches (the sampler interleaves the ranks): float32 features to rounding
            assert_stats_close(got, st, name, rel=1e-6)
    for rank in (0, 1):
        assert "repeating some" in (tmp_path / f"err.{rank}").read_text()
    # with store_features, rank 0 writes every rank's rows (rank order)
    with RunFile(tmp_path / "ddp_features.h5") as rf:
        obs = rf.observation(0)
        assert obs.has_features and len(obs.labels()) == N
        for name in ref.last_stats:
            rows = np.concatenate([h for h, _ in obs.iter_features(name)])
            again = ClassStats.from_arrays(rows, obs.labels(), K)
            assert_stats_close(again, obs.stats(name), name, rel=1e-10)
