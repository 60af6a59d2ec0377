"""`nccli.extract.extract`: round trips, statistics as stored, resume, errors, formats."""

from __future__ import annotations

import importlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import assert_stats_close, seeded_model, write_cluster_npz
from torch import nn

from nccli import zoo
from nccli.errors import CacheError, DataError, UsageError
from nccli.extract import extract
from nccli.io.cache import Cache
from nccli.io.sources import CacheSource
from nccli.stats import ClassStats

ex = importlib.import_module("nccli.extract")  # the package re-exports the extract() function
pipeline = importlib.import_module("nccli.extract.pipeline")

K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=2,head_width=8"
HEAD = ["head.0", "head.1", "classifier"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_cluster_npz(tmp_path / "data.npz", N, D, K, seed=0)


@pytest.fixture
def model() -> nn.Module:
    return seeded_model(ARCH)


def save_state(model: nn.Module, path: Path, **extra) -> Path:
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return path


def reference(model: nn.Module, data: Path) -> dict[str, np.ndarray]:
    """Features of the head layers and logits by a plain forward pass, no hooks."""
    x = torch.from_numpy(np.load(data)["x"])
    with torch.no_grad():
        h0 = model.body(model.flatten(x))
        h1 = model.head[0](h0)
        h2 = model.head[1](h1)
        return {
            "head.0": h0.numpy(),
            "head.1": h1.numpy(),
            "classifier": h2.numpy(),
            "logits": model.classifier(h2).numpy(),
        }


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {n: f[f"layers/{n}/features"][()] for n in f["layers"]}
        out["logits"] = f["logits"][()]
        out["labels"] = f["labels"][()]
        out["indices"] = f["indices"][()]
        return out


def assert_stats_match_features(path: Path, atol_rel: float = 1e-10) -> None:
    """Stored statistics == ClassStats recomputed from the stored features."""
    with Cache(path) as c:
        y = c.labels()
        for name in c.layers:
            stored = c.stats(name)
            feats = np.concatenate([h for h, _ in c.iter_features(name, 37)])
            fresh = ClassStats.from_arrays(feats, y, c.num_classes)
            np.testing.assert_array_equal(stored.counts, fresh.counts)
            for attr in ("means", "scatter", "class_ss"):
                a, b = getattr(stored, attr), getattr(fresh, attr)
                scale = max(np.abs(b).max(), 1e-300)
                assert np.abs(a - b).max() <= atol_rel * scale, (name, attr)


def run(ckpts, data, out, **kw):
    kw.setdefault("arch", ARCH)
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 32)
    kw.setdefault("progress", False)
    return extract([str(c) for c in ckpts], str(data), out_dir=out, **kw)


def test_round_trip_state_dict(tmp_path, data, model):
    ckpt = save_state(model, tmp_path / "run_ep007.pt", step=1234)
    [path] = run([ckpt], data, tmp_path / "out")
    assert path == tmp_path / "out" / "run_ep007.h5"
    assert not (tmp_path / "out" / "run_ep007.h5.partial").exists()
    got, ref = read(path), reference(model, data)
    for key in [*HEAD, "logits"]:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got["labels"], np.arange(N) % K)
    np.testing.assert_array_equal(got["indices"], np.arange(N))
    with Cache(path) as c:
        a = c.attrs
        assert a["checkpoint"] == str(ckpt.resolve())
        assert len(a["checkpoint_sha256"]) == 64 and a["checkpoint_format"] == "state_dict"
        assert a["dataset"] == str(data) and len(a["dataset_digest"]) == 64
        assert (a["epoch"], a["step"], a["split"], a["arch"]) == (7, 1234, "train", ARCH)
        assert (a["num_classes"], a["num_samples"], a["classifier"]) == (K, N, "classifier")
        assert a["feature_dtype"] == "float32" and a["amp"] == "off" and a["device"] == "cpu"
        assert a["torch_version"] == str(torch.__version__) and a["command"]
        layers = {n: (i.depth, i.role, i.io, i.dim) for n, i in c.layers.items()}
        assert layers == {
            "head.0": (0, "penultimate", "input", 10),
            "head.1": (1, "linear", "input", 8),
            "classifier": (2, "classifier", "input", 8),
        }
        W, b = c.weight("classifier")
        np.testing.assert_array_equal(W, model.classifier.weight.detach().numpy())
    assert_stats_match_features(path)


def test_composite_classifiers_reproduce_the_logits(tmp_path, data, model):
    """sources.py composes C_l = W_{L+1}⋯W_{l+1} from the groups extract writes."""
    [path] = run([save_state(model, tmp_path / "m.pt")], data, tmp_path / "out")
    src = CacheSource([path])
    try:
        logits = read(path)["logits"]
        for name, view in src.layers.items():
            h = np.concatenate([f for f, _ in view.batches()]).astype(np.float64)
            z = h @ view.classifier_weight.T + view.classifier_bias
            np.testing.assert_allclose(z, logits, atol=1e-5, rtol=1e-5, err_msg=name)
    finally:
        src.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stats_equal_recomputed_from_cache(tmp_path, data, model, dtype):
    [path] = run(
        [save_state(model, tmp_path / "m.pt")], data, tmp_path / dtype, feature_dtype=dtype
    )
    feats = read(path)
    assert feats["head.0"].dtype == np.dtype(dtype)
    assert_stats_match_features(path)
    ref = reference(model, data)
    tol = 1e-6 if dtype == "float32" else 5e-3
    np.testing.assert_allclose(feats["head.1"], ref["head.1"], atol=tol, rtol=tol)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoint_formats_and_prefixes(tmp_path, data, model):
    from safetensors.torch import save_file

    state = model.state_dict()
    ckpts = {
        "ddp.pt": lambda p: torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, p),
        "compiled.safetensors": lambda p: save_file(
            {f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, str(p)
        ),
        "scripted.pt": lambda p: torch.jit.save(torch.jit.script(model), str(p)),
        "exported.pt2": lambda p: torch.export.save(
            torch.export.export(model, (torch.zeros(2, D),)), str(p)
        ),
    }
    paths = []
    for name, save in ckpts.items():
        save(tmp_path / name)
        paths.append(tmp_path / name)
    for program in paths[2:]:  # TorchScript and torch.export are code: refused without the flag
        with pytest.raises(DataError, match="--trust-checkpoint"):
            run([program], data, tmp_path / "refused")
        assert not list((tmp_path / "refused").glob("*.h5"))
    out = run(paths, data, tmp_path / "out", trust_checkpoint=True)
    assert [p.name for p in out] == ["ddp.h5", "compiled.h5", "scripted.h5", "exported.h5"]
    ref = reference(model, data)
    for p in out:
        got = read(p)
        for key in [*HEAD, "logits"]:
            np.testing.assert_allclose(got[key], ref[key], atol=1e-6, rtol=0, err_msg=str(p))
    formats = [Cache(p).attrs["checkpoint_format"] for p in out]
    assert formats == ["state_dict", "safetensors", "torchscript", "export"]


def test_dataset_opened_once_for_many_checkpoints(tmp_path, data, model, monkeypatch):
    import nccli.io.datasets as datasets

    calls = []
    real = datasets.open_dataset

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(datasets, "open_dataset", counting)
    ckpts = [save_state(model, tmp_path / f"ep{e}.pt", epoch=e) for e in (1, 2, 3)]
    out = run(ckpts, data, tmp_path / "out", limit=60)
    assert len(calls) == 1 and len(out) == 3
    assert [Cache(p).attrs["epoch"] for p in out] == [1, 2, 3]
    assert all(Cache(p).num_samples == 60 for p in out)


class _Interrupt(BaseException):
    pass


def interrupt_after(monkeypatch, batches: int, exc: type[BaseException] = KeyboardInterrupt):
    """Raise ``exc`` in the extraction loop once ``batches`` batches were handed to the
    writer thread (as a Ctrl-C between two batches would)."""
    submit = pipeline.BackgroundWriter.submit
    seen = []

    def counting(self, item):
        submit(self, item)
        seen.append(1)
        if len(seen) == batches:
            raise exc()

    monkeypatch.setattr(pipeline.BackgroundWriter, "submit", counting)


def test_interrupt_keeps_partial_and_resume_matches(tmp_path, data, model, monkeypatch):
    ckpt = save_state(model, tmp_path / "m.pt")
    [full] = run([ckpt], data, tmp_path / "full", feature_dtype="float16")
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            run([ckpt], data, out, feature_dtype="float16")
    part = out / "m.h5.partial"
    assert part.exists() and not (out / "m.h5").exists()
    with h5py.File(part, "r") as f:
        assert f.attrs["rows_done"] == 64 and not f.attrs["complete"]
    with pytest.raises(CacheError, match="unfinished cache"):
        Cache(part)
    # without --resume a fresh run would start over; with it, it continues
    [path] = run([ckpt], data, out, feature_dtype="float16", resume=True)
    assert not part.exists()
    a, b = read(path), read(full)
    for key in [*HEAD, "logits", "labels", "indices"]:
        np.testing.assert_array_equal(a[key], b[key])
    with Cache(path) as c1, Cache(full) as c2:
        for name in HEAD:
            assert_stats_close(c1.stats(name), c2.stats(name), name)
    assert_stats_match_features(path)


def test_resume_refuses_partial_of_another_checkpoint(tmp_path, data, model, monkeypatch):
    ckpt = save_state(model, tmp_path / "m.pt")
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 1, _Interrupt)
        with pytest.raises(_Interrupt):
            run([ckpt], data, out)
    part = out / "m.h5.partial"
    before = part.read_bytes()
    torch.manual_seed(1)
    save_state(zoo.build(ARCH), ckpt)  # same name, other weights
    with pytest.raises(CacheError, match="different checkpoint_sha256; delete it or run without"):
        run([ckpt], data, out, resume=True)
    assert part.read_bytes() == before
    # an unreadable partial is not resumable: --resume starts over
    part.write_bytes(b"garbage")
    [path] = run([ckpt], data, out, resume=True)
    assert_stats_match_features(path)


def test_existing_cache_skipped_overwritten_or_refused(tmp_path, data, model):
    ckpt = save_state(model, tmp_path / "m.pt")
    [path] = run([ckpt], data, tmp_path / "out")
    mtime = path.stat().st_mtime_ns
    assert run([ckpt], data, tmp_path / "out") == [path]
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(UsageError, match="different feature_dtype; pass --overwrite"):
        run([ckpt], data, tmp_path / "out", feature_dtype="float16")
    run([ckpt], data, tmp_path / "out", feature_dtype="float16", overwrite=True)
    assert Cache(path).attrs["feature_dtype"] == "float16" and path.stat().st_mtime_ns != mtime
    other = tmp_path / "o2"
    other.mkdir()
    (other / "m.h5").write_text("not a cache")
    with pytest.raises(UsageError, match="exists and is not an nccli cache"):
        run([ckpt], data, other)


def _no_files(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_nonfinite_features_name_checkpoint_and_layer(tmp_path, data, model):
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("nan")
    ckpt = save_state(model, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"bad.pt: layer head.1 has NaN or infinite values"):
        run([ckpt], data, tmp_path / "out")
    _no_files(tmp_path / "out")


def test_float16_overflow_is_explained(tmp_path, data, model):
    with torch.no_grad():
        model.head[0].weight.mul_(1e6)
    ckpt = save_state(model, tmp_path / "big.pt")
    with pytest.raises(
        DataError, match=r"layer head.1: sample \d+ overflows float16.*--dtype float32"
    ):
        run([ckpt], data, tmp_path / "out", feature_dtype="float16")
    _no_files(tmp_path / "out")
    [path] = run([ckpt], data, tmp_path / "out")  # float32 holds it
    assert_stats_match_features(path)


def test_logits_must_cover_the_labels(tmp_path, model):
    y = np.arange(40) % 5
    np.savez(tmp_path / "d5.npz", x=np.zeros((40, D), np.float32), y=y)
    ckpt = save_state(model, tmp_path / "m.pt")
    with pytest.raises(
        DataError,
        match=r"d5.npz: has labels up to 4 but the model .*m.pt outputs 3 logits .*the dataset is the likely culprit",
    ):
        run([ckpt], tmp_path / "d5.npz", tmp_path / "out")
    _no_files(tmp_path / "out")
    # fewer classes present than logits is fine: K comes from the classifier
    np.savez(tmp_path / "d2.npz", x=np.ones((20, D), np.float32), y=np.arange(20) % 2)
    [path] = run([ckpt], tmp_path / "d2.npz", tmp_path / "out")
    assert Cache(path).num_classes == 3


def test_option_errors(tmp_path, data, model):
    ckpt = save_state(model, tmp_path / "m.pt")
    (tmp_path / "b").mkdir()
    save_state(model, tmp_path / "b" / "m.pt")  # same name, another folder: b_m.h5
    (tmp_path / "x" / tmp_path.name).mkdir(parents=True)
    twin = save_state(model, tmp_path / "x" / tmp_path.name / "m.pt")  # same folder name too
    with pytest.raises(UsageError, match="same file and folder name"):
        run([ckpt, tmp_path / "b" / "m.pt", twin], data, tmp_path / "out")
    with pytest.raises(UsageError, match="--amp bf16 needs a CUDA device"):
        run([ckpt], data, tmp_path / "out", amp="bf16")
    with pytest.raises(UsageError, match="--dtype"):
        run([ckpt], data, tmp_path / "out", feature_dtype="int8")
    with pytest.raises(DataError, match="no such checkpoint"):
        run([tmp_path / "missing.pt"], data, tmp_path / "out")
    _no_files(tmp_path / "out")


def test_selected_layers_and_prefetch(tmp_path, data, model):
    ckpt = save_state(model, tmp_path / "m.pt")
    [path] = run([ckpt], data, tmp_path / "out", layers="body.*", num_workers=2, batch_size=7)
    with Cache(path) as c:
        assert {n: (i.io, i.role, i.depth) for n, i in c.layers.items()} == {
            "body.0": ("output", "other", -1),
            "body.1": ("output", "other", -1),
        }
        assert "classifier" not in c.attrs
    x = torch.from_numpy(np.load(data)["x"])
    with torch.no_grad():
        ref = model.body[0](x).numpy()
    np.testing.assert_allclose(read(path)["body.0"], ref, atol=1e-6, rtol=0)
    assert_stats_match_features(path)


def test_resnet_images_with_a_selected_stage(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "img.npz",
        x=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
        y=np.arange(24) % 4,
    )
    arch = "resnet18:num_classes=4,width=2,head_depth=1"
    torch.manual_seed(0)
    net = zoo.build(arch)
    ckpt = save_state(net, tmp_path / "rn.pt")
    # uint8 images need an explicit --normalize; 'none' is x/255 only
    kw = {"arch": arch, "layers": "auto,layer4", "normalize": "none"}
    [path] = run([ckpt], tmp_path / "img.npz", tmp_path / "out", **kw)
    with Cache(path) as c:
        assert {n: (i.role, i.depth, i.dim) for n, i in c.layers.items()} == {
            "layer4": ("other", -1, 16),
            "head.0": ("penultimate", 0, 16),
            "classifier": ("classifier", 1, 16),
        }
    got = read(path)
    # an 8x8 input leaves layer4 at 1x1: its flattened output is the pooled feature
    np.testing.assert_array_equal(got["layer4"], got["head.0"])
    x = torch.from_numpy(np.load(tmp_path / "img.npz")["x"]).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        np.testing.assert_allclose(got["logits"], net(x).numpy(), atol=1e-5, rtol=0)
    assert_stats_match_features(path)


def test_row_ranges_are_disjoint_and_cover():
    for n in (1, 7, 100):
        for world in (1, 2, 3, 8):
            spans = [ex.row_range(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_amp_extraction(tmp_path, data, model, amp):
    ckpt = save_state(model, tmp_path / "m.pt")
    [path] = run([ckpt], data, tmp_path / amp, device="cuda", amp=amp, feature_dtype="float16")
    with Cache(path) as c:
        assert c.attrs["device"].startswith("cuda") and c.attrs["amp"] == amp
    assert_stats_match_features(path, atol_rel=1e-9)
    ref = reference(model, data)
    tol = 2e-3 if amp == "off" else 5e-2
    np.testing.assert_allclose(read(path)["logits"], ref["logits"], atol=tol, rtol=tol)
