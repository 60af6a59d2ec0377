"""Issue 13: preprocessing is never a silent guess.

Image data (``uint8``, or other inputs whose first samples all lie in [0, 255] above 10)
need an explicit ``--normalize`` for ``extract`` and ``info CKPT --data``: without one the
command stops with one line listing the presets and their values.  What was applied is
recorded in the cache's ``normalization`` attribute, and ``compare`` notes caches that mix
preprocessing.  Float data in a normal range need no flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import runner, save_state_dict, seeded_model, write_cluster_npz

from nccli.cli import app
from nccli.compare import compare
from nccli.io.datasets import NORMALIZE_PRESETS

ARCH = "resnet18:num_classes=3,width=4,head_depth=1"
N = 12


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_state_dict(tmp_path / "rn_ep001.pt", ARCH)


def _images(tmp_path: Path, hwc: bool = False) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    shape = (N, 8, 8, 3) if hwc else (N, 3, 8, 8)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / ("hwc.npz" if hwc else "chw.npz")
    np.savez(path, x=x, y=np.arange(N) % 3)
    return path, x


def _extract(ckpt: Path, data: Path, out: Path, *extra: str):
    args = ["extract", str(ckpt), "--data", str(data), "--arch", ARCH, "-o", str(out)]
    return runner.invoke(app, [*args, "--device", "cpu", "--batch-size", str(N), *extra])


def _assert_asks_for_normalize(res, what: str = "uint8") -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"image data ({what}) need an explicit --normalize" in line
    assert "none (x/255 only)" in line and "mean=...;std=..." in line
    for name in ("cifar10", "cifar10-0.2023", "cifar100", "mnist", "imagenet"):
        assert f"{name} (mean " in line
    assert "std 0.2023,0.1994,0.201)" in line and "std 0.247,0.2435,0.2616)" in line


@pytest.mark.parametrize("hwc", [False, True])
def test_uint8_images_need_an_explicit_normalize(tmp_path: Path, ckpt: Path, hwc: bool) -> None:
    data, _ = _images(tmp_path, hwc)
    _assert_asks_for_normalize(_extract(ckpt, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # info CKPT --data runs a probe batch: the same rule
    probe = ["info", str(ckpt), "--arch", ARCH, "--data", str(data)]
    _assert_asks_for_normalize(runner.invoke(app, probe))
    res = runner.invoke(app, [*probe, "--normalize", "cifar10-0.2023", "--json"])
    assert res.exit_code == 0, res.output
    assert '"normalization": "uint8/255 then mean=0.4914,0.4822,0.4465;' in res.stdout


def test_an_image_folder_needs_it_too(tmp_path: Path, ckpt: Path) -> None:
    rng = np.random.default_rng(4)
    for k in range(3):
        (tmp_path / "folder" / f"c{k}").mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            np.save(tmp_path / "folder" / f"c{k}" / f"{i}.npy", img)
    _assert_asks_for_normalize(_extract(ckpt, tmp_path / "folder", tmp_path / "out"))
    res = _extract(ckpt, tmp_path / "folder", tmp_path / "out", "--normalize", "none")
    assert res.exit_code == 0, res.output


def test_float_pixels_in_0_255_need_it_and_refuse_presets(tmp_path: Path, ckpt: Path) -> None:
    data, x = _images(tmp_path)
    np.savez(data, x=x.astype(np.float32), y=np.arange(N) % 3)
    res = _extract(ckpt, data, tmp_path / "out")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "image data (float32 in 0..255) need an explicit --normalize: none" in res.stderr
    res = _extract(ckpt, data, tmp_path / "out", "--normalize", "cifar10")
    assert res.exit_code == 2 and "are for pixels scaled to [0, 1]" in res.stderr
    res = _extract(ckpt, data, tmp_path / "out", "--normalize", "none")
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "out" / "rn_ep001.h5", "r") as f:
        assert f.attrs["normalization"] == "none"


def _penultimate(net: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The classifier head's input and the logits of one direct forward."""
    seen: list[torch.Tensor] = []
    head = dict(net.named_modules())["head.0"]
    hook = head.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        logits = net(x)
    hook.remove()
    return seen[0].flatten(1).numpy(), logits.numpy()


@pytest.mark.parametrize("hwc", [False, True])
def test_a_preset_is_recorded_and_applied_exactly(tmp_path: Path, ckpt: Path, hwc: bool) -> None:
    data, x = _images(tmp_path, hwc)
    res = _extract(ckpt, data, tmp_path / "out", "--normalize", "cifar10-0.2023")
    assert res.exit_code == 0, res.output
    mean, std = NORMALIZE_PRESETS["cifar10-0.2023"]
    assert std == (0.2023, 0.1994, 0.2010)
    with h5py.File(tmp_path / "out" / "rn_ep001.h5", "r") as f:
        assert f.attrs["normalization"] == (
            "uint8/255 then mean=0.4914,0.4822,0.4465;std=0.2023,0.1994,0.201"
        )
        feats = f["layers/head.0/features"][()]
        logits = f["logits"][()]
    chw = x.transpose(0, 3, 1, 2) if hwc else x
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    inputs = torch.from_numpy(((chw.astype(np.float32) / 255.0 - m) / s).astype(np.float32))
    want_feats, want_logits = _penultimate(seeded_model(ARCH), inputs)
    np.testing.assert_allclose(feats, want_feats, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(logits, want_logits, atol=1e-6, rtol=1e-6)
    # info on the cache shows what was applied
    res = runner.invoke(app, ["info", str(tmp_path / "out" / "rn_ep001.h5"), "--json"])
    assert res.exit_code == 0, res.output
    want = "uint8/255 then mean=0.4914,0.4822,0.4465;std=0.2023,0.1994,0.201"
    assert json.loads(res.stdout)["attrs"]["normalization"] == want


def test_none_is_x_over_255_only(tmp_path: Path, ckpt: Path) -> None:
    data, x = _images(tmp_path)
    res = _extract(ckpt, data, tmp_path / "out", "--normalize", "none")
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "out" / "rn_ep001.h5", "r") as f:
        assert f.attrs["normalization"] == "uint8/255"
        logits = f["logits"][()]
    _, want = _penultimate(seeded_model(ARCH), torch.from_numpy(x.astype(np.float32) / 255.0))
    np.testing.assert_allclose(logits, want, atol=1e-6, rtol=1e-6)


def test_auto_says_what_it_chose(tmp_path: Path, ckpt: Path) -> None:
    data, _ = _images(tmp_path)
    res = _extract(ckpt, data, tmp_path / "out", "--normalize", "auto")
    assert res.exit_code == 0, res.output
    assert "note: --normalize auto: uint8/255 then mean=" in res.stderr
    assert "not necessarily what the model was trained with" in res.stderr


def test_compare_notes_mixed_preprocessing(tmp_path: Path) -> None:
    data, _ = _images(tmp_path)
    caches = []
    for ep, norm in ((1, "cifar10"), (2, "cifar10-0.2023")):
        ckpt = save_state_dict(tmp_path / f"rn_ep00{ep}.pt", ARCH, seed=ep)
        res = _extract(ckpt, data, tmp_path / f"out{ep}", "--normalize", norm)
        assert res.exit_code == 0, res.output
        caches.append(tmp_path / f"out{ep}" / f"rn_ep00{ep}.h5")
    notes = compare(caches).notes
    mixed = [n for n in notes if "mix input preprocessing" in n]
    assert len(mixed) == 1, notes
    assert "std=0.247,0.2435,0.2616" in mixed[0] and "std=0.2023,0.1994,0.201" in mixed[0]
    res = runner.invoke(app, ["compare", *map(str, caches)])
    assert res.exit_code == 0, res.output
    assert sum("note: sources mix input preprocessing" in ln for ln in res.stderr.splitlines()) == 1
    # the same preprocessing twice: no note
    same = [caches[0], caches[0].with_name("copy_ep003.h5")]
    same[1].write_bytes(caches[0].read_bytes())
    assert not [n for n in compare(same).notes if "mix input preprocessing" in n]


def test_float_features_need_no_flag(tmp_path: Path) -> None:
    data = write_cluster_npz(tmp_path / "f.npz", 30, 6, 3, seed=1, scale=1.5)
    arch = "mlp:in_dim=6,widths=8,num_classes=3"
    ckpt = save_state_dict(tmp_path / "m.pt", arch)
    args = ["extract", str(ckpt), "--data", str(data), "--arch", arch, "-o", str(tmp_path / "o")]
    res = runner.invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "o" / "m.h5", "r") as f:
        assert f.attrs["normalization"] == "none"
    res = runner.invoke(app, ["info", str(ckpt), "--arch", arch, "--data", str(data)])
    assert res.exit_code == 0, res.output
