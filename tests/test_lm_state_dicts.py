"""Language models saved as weight files (`extract --model hf:CONFIG_DIR FILE...`).

A tiny GPT-2 is built from a transformers config (nothing is downloaded); its config is
saved to a folder, its state dict as a plain ``.pt``, a ``{'model': sd, 'step': N}`` dict
with torch.compile's ``_orig_mod.`` prefix, and a safetensors file without the tied
``lm_head.weight``.  Each file's cache must hold the features, labels and LM head of a
direct forward of the same model, and the numbers of the ``save_pretrained`` folder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import runner

from nccli.cli import app
from nccli.io.cache import Cache

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, T, S = 97, 40, 8


def _gpt2(seed: int = 0, **config) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0, **config,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmsd")
    m = _gpt2()
    m.config.save_pretrained(root / "config")
    m.save_pretrained(root / "folder")
    sd = m.state_dict()
    torch.save(sd, root / "plain.pt")
    wrapped = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "step": 700, "lr": 0.1}
    torch.save(wrapped, root / "compiled.pt")
    untied = {k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}
    safetensors_torch.save_file(untied, root / "weights.safetensors")
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(S, T)).astype(np.int64)
    np.save(root / "tokens.npy", ids)
    with torch.no_grad():
        out = m(torch.as_tensor(ids), output_hidden_states=True)
    H = out.hidden_states[-1][:, :-1].reshape(-1, 32).double().numpy()  # after ln_f
    return {"root": root, "model": m, "sd": sd, "ids": ids, "H": H,
            "W": m.lm_head.weight.detach().double().numpy()}  # fmt: skip


def _extract(run: dict, files: list, out: Path, *extra: str, model: str | None = None):
    model = model or f"hf:{run['root'] / 'config'}"
    args = ["extract", "--model", model, *map(str, files), "-d", str(run["root"] / "tokens.npy")]
    return runner.invoke(app, [*args, "-o", str(out), "--store-features", *extra])


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def _cached(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    with Cache(path) as c:
        H = np.concatenate([h for h, _ in c.iter_features("lm_head")])
        W, b = c.weight("lm_head")
        assert b is None
        return H, c.labels(), W, dict(c.attrs)


def test_weight_files_match_a_direct_forward_and_the_folder(run, tmp_path):
    root = run["root"]
    files = [root / "plain.pt", root / "compiled.pt", root / "weights.safetensors"]
    res = _extract(run, files, tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "stripped the key prefix '_orig_mod.'" in res.stderr
    res = _extract(run, [root / "folder"], tmp_path / "f", model="hf")
    assert res.exit_code == 0, res.output
    Hf, yf, Wf, _ = _cached(tmp_path / "f" / "folder.h5")
    y = run["ids"][:, 1:].reshape(-1)
    for name, fmt in (("plain", "state_dict"), ("compiled", "state_dict"),
                      ("weights", "safetensors")):  # fmt: skip
        H, labels, W, attrs = _cached(tmp_path / "c" / f"{name}.h5")
        assert attrs["checkpoint_format"] == fmt and attrs["arch"] == "hf:GPT2LMHeadModel"
        assert attrs["config"] == str((root / "config").resolve())
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_allclose(H, run["H"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(W, run["W"], atol=1e-6, rtol=0)  # tied: = wte
        np.testing.assert_allclose(H, Hf, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(labels, yf)
        np.testing.assert_array_equal(W, Wf)
    _, _, _, attrs = _cached(tmp_path / "c" / "compiled.h5")
    assert (attrs["step"], attrs["step_from"], attrs["state_key"]) == (700, "checkpoint", "model")


def test_untied_head_and_state_key(run, tmp_path):
    m = _gpt2(seed=3, tie_word_embeddings=False)
    assert m.lm_head.weight is not m.transformer.wte.weight
    m.config.save_pretrained(tmp_path / "cfg")
    torch.save({"ema": m.state_dict(), "model": run["sd"]}, tmp_path / "two.pt")
    model = f"hf:{tmp_path / 'cfg'}"
    res = _extract(run, [tmp_path / "two.pt"], tmp_path / "c", model=model)
    assert res.exit_code == 2 and "--state-key" in _one_line(res)  # two candidates
    res = _extract(run, [tmp_path / "two.pt"], tmp_path / "c", "--state-key", "ema", model=model)
    assert res.exit_code == 0, res.output
    _, _, W, attrs = _cached(tmp_path / "c" / "two.h5")
    np.testing.assert_allclose(W, m.lm_head.weight.detach().numpy(), atol=1e-6, rtol=0)
    assert attrs["state_key"] == "ema"
    # the untied config needs lm_head.weight: the safetensors file has none
    res = _extract(run, [run["root"] / "weights.safetensors"], tmp_path / "d", model=model)
    line = _one_line(res)
    assert res.exit_code == 1 and "missing keys: lm_head.weight" in line


def test_key_problems_are_one_line(run, tmp_path):
    sd = run["sd"]
    cases = {
        "missing": ({k: v for k, v in sd.items() if ".h.1." not in k}, "missing keys: transformer.h.1."),
        "unexpected": ({**sd, "extra.weight": torch.zeros(2)}, "unexpected keys: extra.weight"),
        "shape": ({**sd, "transformer.wpe.weight": torch.zeros(32, 32)},
                  "transformer.wpe.weight (32, 32) vs (64, 32)"),
        "untied": ({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, "tie_word_embeddings"),
    }  # fmt: skip
    for name, (state, says) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        res = _extract(run, [tmp_path / f"{name}.pt"], tmp_path / "c")
        line = _one_line(res)
        assert res.exit_code == 1, (name, res.output)
        assert str(tmp_path / f"{name}.pt") in line and says in line, (name, line)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5"))


def test_bad_config_folders_and_options(run, tmp_path):
    (tmp_path / "empty").mkdir()
    plain = run["root"] / "plain.pt"
    res = _extract(run, [plain], tmp_path / "c", model=f"hf:{tmp_path / 'empty'}")
    assert res.exit_code == 1 and "holds no config.json" in _one_line(res)
    cfg = tmp_path / "remote"
    cfg.mkdir()
    text = json.loads((run["root"] / "config" / "config.json").read_text())
    (cfg / "config.json").write_text(json.dumps({**text, "auto_map": {"AutoModel": "x.Y"}}))
    res = _extract(run, [plain], tmp_path / "c", model=f"hf:{cfg}")
    assert res.exit_code == 1 and "--trust-checkpoint" in _one_line(res)
    res = _extract(run, [run["root"] / "folder"], tmp_path / "c")  # a folder as a weight file
    assert res.exit_code == 2 and "--model hf and the folders" in _one_line(res)
    res = _extract(run, [plain], tmp_path / "c", model="hf")  # a weight file without config
    assert res.exit_code == 1 and "--model hf:CONFIG_DIR" in _one_line(res)
    res = _extract(run, [run["root"] / "folder"], tmp_path / "c", "--state-key", "x", model="hf")
    assert res.exit_code == 2 and "--state-key" in _one_line(res)


class _Program(torch.nn.Module):
    """What a training script traces: logits of token ids (scaled, for a forged one)."""

    def __init__(self, model: torch.nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits * self.scale


def _script(model: torch.nn.Module, path: Path, scale: float = 1.0) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.zeros(1, 8, dtype=torch.long)
        traced = torch.jit.trace(_Program(model, scale), (x,), check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def test_torchscript_needs_trust_and_matching_logits(run, tmp_path):
    good = _script(run["model"], tmp_path / "scripted.pt")
    res = _extract(run, [good], tmp_path / "c")
    assert res.exit_code == 1 and "--trust-checkpoint" in _one_line(res)
    res = _extract(run, [good], tmp_path / "c", model="hf")
    assert res.exit_code == 1 and "--model hf:CONFIG_DIR" in _one_line(res)
    res = _extract(run, [good], tmp_path / "c", "--trust-checkpoint")
    assert res.exit_code == 0, res.output
    H, _, W, attrs = _cached(tmp_path / "c" / "scripted.h5")
    assert attrs["checkpoint_format"] == "torchscript"
    np.testing.assert_allclose(H, run["H"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(W, run["W"], atol=1e-6, rtol=0)
    forged = _script(run["model"], tmp_path / "forged.pt", scale=2.0)
    res = _extract(run, [forged], tmp_path / "c", "--trust-checkpoint")
    line = _one_line(res)
    assert res.exit_code == 1 and "logits differ" in line and "state_dict()" in line
    x = torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two = torch.jit.trace(_TwoInputs(run["model"]), (x, x), check_trace=False)
    torch.jit.save(two, str(tmp_path / "two.pt"))
    res = _extract(run, [tmp_path / "two.pt"], tmp_path / "c", "--trust-checkpoint")
    line = _one_line(res)
    assert res.exit_code == 1 and "calling it on token ids failed" in line, line


class _TwoInputs(_Program):
    """A program that does not take token ids alone."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x + y)


def test_weight_file_caches_are_named_as_checkpoint_caches(tmp_path):
    """Weight files get the names vision checkpoints get (one rule, nccli.extract.naming)."""
    from nccli.extract import api, language, naming

    assert api.cache_path is naming.cache_path is language.cache_path
    (tmp_path / "ep20").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "ep20" / "ckpt.pt", tmp_path / "a.pt", tmp_path / "b" / "a.pt",
             tmp_path / "model.safetensors", tmp_path / "step_0500.pt"]  # fmt: skip
    names = [naming.cache_path(tmp_path, p, paths).name for p in paths]
    assert names == ["ep20_ckpt.h5", f"{tmp_path.name}_a.h5", "b_a.h5",
                     f"{tmp_path.name}_model.h5", "step_0500.h5"]  # fmt: skip


def test_bfloat16_weights_are_widened_exactly(run, tmp_path):
    half = {k: v.to(torch.bfloat16) for k, v in run["sd"].items()}
    torch.save(half, tmp_path / "bf16.pt")
    res = _extract(run, [tmp_path / "bf16.pt"], tmp_path / "c")
    assert res.exit_code == 0, res.output
    m = _gpt2()
    m.load_state_dict({k: v.float() for k, v in half.items()})
    with torch.no_grad():
        hs = m(torch.as_tensor(run["ids"]), output_hidden_states=True).hidden_states[-1]
    H, _, W, _ = _cached(tmp_path / "c" / "bf16.h5")
    np.testing.assert_allclose(H, hs[:, :-1].reshape(-1, 32).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(W, half["lm_head.weight"].float().numpy())
