"""Checkpoint loading: every format, nesting and prefix; unsafe and broken files."""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import Evil, seeded_model
from torch import nn

from nccli import zoo
from nccli.errors import CheckpointError, UnsafeCheckpointError, UsageError
from nccli.io.checkpoints import LoadedCheckpoint, load_model

ARCH = "mlp:in_dim=12,widths=16-,num_classes=4,head_depth=2,head_width=8"


@pytest.fixture
def model() -> nn.Module:
    return seeded_model(ARCH)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def same_outputs(loaded: LoadedCheckpoint, model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.allclose(loaded.module(x), model(x), atol=1e-6, rtol=0))


WRAPPERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 1},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "model_state_dict": lambda sd: {"model_state_dict": sd},
    "net": lambda sd: {"net": sd},
    "module": lambda sd: {"module": sd},
    "nested": lambda sd: {"checkpoint_info": "x", "model": {"state_dict": sd}},
}
PREFIXES = ["", "module.", "model.", "_orig_mod.", "module._orig_mod.", "model.module."]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("prefix", PREFIXES)
def test_state_dict_round_trip(
    tmp_path: Path, model: nn.Module, x: torch.Tensor, wrapper: str, prefix: str
) -> None:
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[wrapper](sd), path)
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "state_dict"
    assert loaded.arch == ARCH
    assert not loaded.module.training
    assert same_outputs(loaded, model, x)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ""])
def test_format_detected_from_bytes_not_extension(
    tmp_path: Path, model: nn.Module, x: torch.Tensor, suffix: str
) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(model.state_dict(), path)
    assert same_outputs(load_model(path, arch=ARCH), model, x)


def test_legacy_torch_save_format(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert same_outputs(load_model(path, arch=ARCH), model, x)


def test_cnn_with_batchnorm_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = zoo.build("resnet18", num_classes=3, width=4)
    net.train()
    net(torch.randn(4, 3, 16, 16))  # move the BatchNorm running statistics
    net.eval()
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model(path, arch=net.nccli_arch)
    xb = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.module(xb), net(xb), atol=1e-6)


def test_safetensors_round_trip_with_metadata(
    tmp_path: Path, model: nn.Module, x: torch.Tensor
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    sd = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"epoch": "12", "step": "3400", "note": "hi"})
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "safetensors"
    assert (loaded.epoch, loaded.step) == (12, 3400)
    assert loaded.metadata["note"] == "hi"
    assert same_outputs(loaded, model, x)


def test_safetensors_without_the_package(
    tmp_path: Path, model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(CheckpointError, match=r"pip install nccli\[safetensors\]") as err:
        load_model(path, arch=ARCH)
    assert str(path) in str(err.value)


def test_truncated_safetensors(tmp_path: Path, model: nn.Module) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad, arch=ARCH)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    # a TorchScript archive is a program: refused without the flag, even with --arch
    for kw in ({}, {"arch": ARCH}):
        with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint") as err:
            load_model(path, **kw)
        assert str(path) in str(err.value) and "TorchScript" in str(err.value)
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.format == "torchscript"
    assert loaded.arch is None
    assert same_outputs(loaded, model, x)
    # with --arch the weights go into the zoo model (hookable submodules)
    rebuilt = load_model(path, arch=ARCH, trust_checkpoint=True)
    assert rebuilt.format == "torchscript"
    assert type(rebuilt.module).__name__ == "MLP"
    assert same_outputs(rebuilt, model, x)


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.export.save(torch.export.export(model, (x,)), str(path))


def test_torch_export(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "exported.bin"  # detected by content, not by the .pt2 extension
    _export(model, x, path)
    # an exported program is code: refused without the flag, even with --arch
    for kw in ({}, {"arch": ARCH}):
        with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint") as err:
            load_model(path, **kw)
        assert str(path) in str(err.value) and "torch.export" in str(err.value)
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.format == "export"
    assert same_outputs(loaded, model, x)
    rebuilt = load_model(path, arch=ARCH, trust_checkpoint=True)
    assert type(rebuilt.module).__name__ == "MLP"
    assert same_outputs(rebuilt, model, x)


def test_torch_export_with_unsafe_payload_is_refused(
    tmp_path: Path, model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt2"
    _export(model, x, good)
    evil_bytes = io.BytesIO()
    torch.save({"inputs": Evil(marker, via="system")}, evil_bytes)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = evil_bytes.getvalue()
            dst.writestr(info, data)
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint") as err:
        load_model(bad)
    assert "system" in str(err.value)
    assert not marker.exists()


def test_malicious_pickle_is_refused_without_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Evil(marker, via="system")}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(path, arch=ARCH)
    message = str(err.value)
    assert str(path) in message
    assert "--trust-checkpoint" in message
    assert "execute code" in message
    assert "system" in message
    assert "\n" not in message
    assert not marker.exists()


def test_raw_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(marker, via="system"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_model(path)
    assert not marker.exists()


def test_whole_pickled_module_needs_trust(
    tmp_path: Path, model: nn.Module, x: torch.Tensor
) -> None:
    path = tmp_path / "whole_epoch_3.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError, match=r"nccli\.zoo\.mlp\.MLP"):
        load_model(path)
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.format == "pickle"
    assert loaded.epoch == 3
    assert same_outputs(loaded, model, x)


def test_trusted_module_nested_in_a_dict(tmp_path: Path, model: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "whole.pt"
    torch.save({"model": model, "epoch": 9}, path)
    loaded = load_model(path, trust_checkpoint=True)
    assert (loaded.format, loaded.epoch) == ("pickle", 9)
    assert same_outputs(loaded, model, x)


def test_mismatched_keys_are_named(tmp_path: Path, model: nn.Module) -> None:
    sd = dict(model.state_dict())
    del sd["head.0.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["classifier.weight"] = torch.zeros(9, 8)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch=ARCH)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "missing keys: head.0.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "classifier.weight (9, 8) vs (4, 8)" in message


def test_many_missing_keys_are_summarised(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys: [^;]* and \d+ more"):
        load_model(path, arch="resnet18:num_classes=4,width=4")


def test_model_import_string(
    tmp_path: Path, model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nccli_test_factory.py").write_text(
        textwrap.dedent(
            f"""
            from torch import nn
            from nccli import zoo

            class Wrapper(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.model = zoo.build({ARCH!r})

                def forward(self, x):
                    return self.model(x)

            def make():
                return zoo.build({ARCH!r})

            def make_wrapped():
                return Wrapper()

            def not_a_module():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, model="nccli_test_factory:make")
    assert loaded.arch == "nccli_test_factory:make"
    assert same_outputs(loaded, model, x)
    # a model whose own attribute is called "model" keeps that prefix
    wrapped = {f"module.model.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, path)
    assert same_outputs(load_model(path, model="nccli_test_factory:make_wrapped"), model, x)
    with pytest.raises(UsageError, match="not an nn.Module"):
        load_model(path, model="nccli_test_factory:not_a_module")
    with pytest.raises(UsageError, match="has no attribute"):
        load_model(path, model="nccli_test_factory:missing")
    with pytest.raises(UsageError, match="cannot import"):
        load_model(path, model="no_such_module_xyz:make")


def test_architecture_is_required_for_weights(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UsageError, match="--arch"):
        load_model(path)
    with pytest.raises(UsageError, match="not both"):
        load_model(path, arch=ARCH, model="a:b")


def test_broken_files(tmp_path: Path, model: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pt", arch=ARCH)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty, arch=ARCH)
    with pytest.raises(CheckpointError, match="directory"):
        load_model(tmp_path, arch=ARCH)
    text = tmp_path / "notes.pt"
    text.write_text("definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(text, arch=ARCH)
    npz = tmp_path / "arrays.pt"
    with npz.open("wb") as f:
        import numpy as np

        np.savez(f, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(npz, arch=ARCH)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model(tmp_path / "list.pt", arch=ARCH)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_model(tmp_path / "nostate.pt", arch=ARCH)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_torch_file(tmp_path: Path, model: nn.Module, legacy: bool) -> None:
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_model(bad, arch=ARCH)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "epoch", "step"),
    [
        ("ep010.pt", 10, None),
        ("resnet_epoch_10.pt", 10, None),
        ("epoch=9-step=1000.ckpt", 9, 1000),
        ("model-step1000.pt", None, 1000),
        ("checkpoint-500.bin", None, 500),
        ("EP7_global_step_70.pt", 7, 70),
        ("deep10.pt", None, None),
        ("final.pt", None, None),
    ],
)
def test_epoch_and_step_from_file_name(
    tmp_path: Path, model: nn.Module, name: str, epoch: int | None, step: int | None
) -> None:
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=ARCH)
    assert (loaded.epoch, loaded.step) == (epoch, step)


def test_epoch_and_step_from_checkpoint_dict_win(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "ep001.pt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "epoch": 42,
            "global_step": torch.tensor(4200),
            "run": "abc",
        },
        path,
    )
    loaded = load_model(path, arch=ARCH)
    assert (loaded.epoch, loaded.step) == (42, 4200)
    assert loaded.metadata == {"epoch": "42", "run": "abc"}


def test_sha256_and_path(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(str(path), arch=ARCH)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path
