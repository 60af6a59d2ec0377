"""Causal LMs from a configuration folder and weight files (``--model hf:CONFIG_DIR FILE...``).

Custom training loops save ``torch.save(model.state_dict())`` or ``{'model': sd, 'step':
...}`` every N steps (or safetensors files), not ``save_pretrained`` folders.  Here:

- :func:`build_causal_lm` builds the architecture once from ``CONFIG_DIR/config.json``
  (checked as :func:`~nccli.io.checkpoints.hf.check_folder` checks a model folder: read as
  data, remote code refused unless ``trust_checkpoint``), with ``AutoConfig`` /
  ``AutoModelForCausalLM.from_config``, local files only, offline, float32;
- :func:`load_lm_weights` reads one file through nccli's safe readers (the format from
  the bytes; ``torch.load(weights_only=True)``; a checkpoint dict searched, or the entry
  ``state_key`` names, exactly as for ``--arch``/``--model``), strips the ``module.``/
  ``model.``/``_orig_mod.`` prefixes (DDP, Lightning, ``torch.compile``) with a note, and
  loads it strictly: every missing, unexpected or mis-shaped key is reported in one line
  before anything is loaded.  Parameters the model shares (tied embeddings: GPT-2's
  ``lm_head.weight`` *is* ``transformer.wte.weight``) need one of their names in the file;
  two that differ are refused (the configuration ties what the run did not).  Keys
  transformers itself declares ignorable for the class (``_keys_to_ignore_on_load_
  unexpected``: GPT-2's old ``attn.bias`` masks) are dropped with a note;
- a TorchScript, ``torch.export`` or whole pickled module (only with ``trust_checkpoint``:
  loading one runs code) is used as a container of weights, loaded into the
  configuration's architecture like a state dict, and its own forward must give the
  same logits on a probe, or it is refused: hooks cannot be registered on a
  ScriptModule, and a traced module's submodules have no ``forward`` of their own, so
  the LM head's input cannot be read from the program itself.

The module is built once and every file's weights are loaded into it in turn (the
strict check guarantees each file sets every parameter and persistent buffer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nccli.errors import CheckpointError, DataError, UsageError
from nccli.io._util import file_sha256, one_line
from nccli.io.checkpoints import _check_file, _epoch_step, _from_names
from nccli.io.checkpoints.base import names
from nccli.io.checkpoints.formats import detect_format
from nccli.io.checkpoints.hf import LoadedLM, _offline, check_folder, import_transformers
from nccli.io.checkpoints.pickled import select_state
from nccli.io.checkpoints.weights import strip_prefixes

__all__ = ["LMArchitecture", "build_causal_lm", "load_lm_weights"]

#: tokens of the probe a program's own logits are compared on
_PROBE = 16
#: how close a program's logits must be to the rebuilt model's (float32 round-off)
_ATOL = 1e-4


@dataclass
class LMArchitecture:
    """The model built from ``config_dir/config.json``, reused for every weight file."""

    module: nn.Module
    config: dict[str, Any]
    config_dir: Path
    config_sha256: str
    arch: str
    shapes: dict[str, tuple[int, ...]]
    #: groups of state-dict names of one shared tensor (tied embeddings), in model order
    tied: list[list[str]]
    ignorable: list[str]


def build_causal_lm(config_dir: str | Path, *, trust_checkpoint: bool = False) -> LMArchitecture:
    """The causal LM ``config_dir/config.json`` describes, randomly initialised (every
    weight is overwritten by :func:`load_lm_weights`), float32, eval mode, on the CPU."""
    d = Path(config_dir)
    if not d.is_dir() or not (d / "config.json").is_file():
        what = "is not a directory" if not d.is_dir() else "holds no config.json"
        raise DataError(
            f"{d}: {what}; --model hf:CONFIG_DIR names the folder holding the run's "
            "config.json (model.config.save_pretrained(DIR) writes it) and the positional "
            "arguments are the weight files"
        )
    cfg = check_folder(d, trust_checkpoint)
    tf = import_transformers()
    try:
        with _offline(tf):
            config = tf.AutoConfig.from_pretrained(
                str(d), local_files_only=True, trust_remote_code=trust_checkpoint
            )
            module = tf.AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_checkpoint, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as exc:
        raise CheckpointError(
            f"{d / 'config.json'}: transformers could not build a causal LM from it "
            f"({one_line(exc, 160)}); check that it is the run's config.json"
        ) from None
    module.eval()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:  # fmt: skip
        if name in shapes:
            aliases.setdefault(id(tensor), []).append(name)
    tied = [group for group in aliases.values() if len(group) > 1]
    ignorable = [str(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()]
    arch = "hf:" + (type(module).__name__ or "model")
    sha = file_sha256(d / "config.json")
    return LMArchitecture(module, cfg, d, sha, arch, shapes, tied, ignorable)


def _read(p: Path, trust: bool, state_key: str | None) -> tuple[Any, Mapping[str, Any], str | None]:
    """``(contents, state dict, the dotted key it is under)`` of weight file ``p``."""
    if p.is_dir():
        raise UsageError(
            f"{p}: is a folder; --model hf:CONFIG_DIR takes weight files (state dicts, "
            "safetensors); for save_pretrained folders pass --model hf and the folders"
        )
    _check_file(p)
    got = detect_format(p).read(p, trust, "cpu")
    chosen = select_state(p, got, state_key)
    state = got.state
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if state is None and got.whole is not None:  # a program: its weights (module docstring)
        state = got.whole.state_dict()
    if state is None:
        raise CheckpointError(f"{p}: holds no weights nccli can load")
    return got, state, chosen


def _stripped_note(p: Path, state: Mapping[str, Any], fitted: Mapping[str, Any]) -> str | None:
    if fitted is state or not state:
        return None
    first = next(iter(state))
    prefix = first[: len(first) - len(next(iter(fitted)))]
    return f"{p}: stripped the key prefix {prefix!r} (DDP, Lightning or torch.compile wrapper)"


def _fit(arch: LMArchitecture, state: Mapping[str, Any], p: Path) -> tuple[dict, list[str]]:
    """The state dict to load strictly (tied names filled in) and the notes; every key
    problem in one :class:`~nccli.errors.CheckpointError` line."""
    fitted = strip_prefixes(state, set(arch.shapes))
    notes = [n for n in [_stripped_note(p, state, fitted)] if n]
    out = {k: v for k, v in fitted.items() if isinstance(v, torch.Tensor)}
    dropped = [
        k for k in out if k not in arch.shapes and any(re.search(r, k) for r in arch.ignorable)
    ]
    if dropped:
        notes.append(
            f"{p}: ignored {len(dropped)} keys transformers declares unused by "
            f"{arch.arch[3:]} ({names(dropped, 3)})"
        )
    problems, differ = [], []
    for group in arch.tied:
        present = [k for k in group if k in out]
        if any(not torch.equal(out[present[0]], out[k]) for k in present[1:]):
            differ.append(" and ".join(present))
        for k in group if present else ():
            out[k] = out[present[0]]
    missing = [k for k in arch.shapes if k not in out]
    unexpected = [k for k in out if k not in arch.shapes and k not in dropped]
    shapes = [f"{k} {tuple(out[k].shape)} vs {arch.shapes[k]}" for k in arch.shapes
              if k in out and tuple(out[k].shape) != arch.shapes[k]]  # fmt: skip
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch (file vs config)", shapes)):  # fmt: skip
        if items:
            problems.append(f"{what}: {names(items)}")
    if differ:
        problems.append(
            f"{names(differ, 2)} differ, but the config ties them (tie_word_embeddings): set "
            "it to false in config.json if the run did not tie them"
        )
    if problems:
        raise CheckpointError(
            f"{p}: weights do not fit {arch.arch[3:]} of {arch.config_dir / 'config.json'}: "
            f"{'; '.join(problems)}; pass the run's own config folder, and --state-key when "
            "the file is a dict holding the model's state_dict under another key"
        )
    out = {k: v for k, v in out.items() if k not in dropped}
    return out, notes


def load_lm_weights(
    arch: LMArchitecture,
    path: str | Path,
    *,
    trust_checkpoint: bool = False,
    state_key: str | None = None,
) -> tuple[LoadedLM, list[str]]:
    """``arch``'s module with file ``path``'s weights (module docstring), what the cache
    records about it, and the notes to print."""
    p = Path(path)
    got, state, chosen = _read(p, trust_checkpoint, state_key)
    fitted, notes = _fit(arch, state, p)
    try:
        arch.module.load_state_dict(fitted, strict=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: weights do not fit {arch.arch[3:]}: {one_line(exc)}") from exc
    if got.whole is not None:
        _same_logits(arch, got.whole, p, got.format)
    stored = _epoch_step(p, got)
    epoch, step = _from_names(p, *stored)
    origin = [None if v is None else "checkpoint" if s is not None else "name"
              for v, s in ((epoch, stored[0]), (step, stored[1]))]  # fmt: skip
    digest = _sha256(arch, file_sha256(p), chosen)
    loaded = LoadedLM(arch.module, arch.config, digest, arch.arch, epoch, step, *origin)
    loaded.format, loaded.state_key = got.format, chosen
    return loaded, notes


def _sha256(arch: LMArchitecture, file_digest: str, chosen: str | None) -> str:
    """What the numbers depend on: the configuration, the file and the entry used."""
    import hashlib

    h = hashlib.sha256(b"nccli-hf-weights-1")
    h.update(f"|{arch.config_sha256}|{file_digest}|{chosen}|".encode())
    return h.hexdigest()


def _logits(out: Any) -> Any:
    """The logits of a program's output: a tensor, ``.logits``, ``['logits']`` or the first
    element of a tuple/list."""
    if isinstance(out, Mapping):
        out = out.get("logits")
    elif isinstance(out, (tuple, list)):
        out = out[0] if out else None
    elif not isinstance(out, torch.Tensor):
        out = getattr(out, "logits", None)
    return out


def _same_logits(arch: LMArchitecture, program: nn.Module, p: Path, fmt: str) -> None:
    """A program's own forward must give the rebuilt model's logits on a probe."""
    vocab = int(arch.module.get_output_embeddings().weight.shape[0])
    dev = next(arch.module.parameters()).device
    maxpos = getattr(arch.module.config, "max_position_embeddings", None)
    n = min(_PROBE, maxpos) if isinstance(maxpos, int) and maxpos > 0 else _PROBE
    x = (torch.arange(n, dtype=torch.long).unsqueeze(0) * 7919) % vocab
    why = None
    if fmt != "export":  # an exported graph is traced: no .eval() (as load_model does)
        program.eval()
    with torch.inference_mode():
        want = arch.module(input_ids=x.to(dev)).logits.float().cpu()
        try:
            got = _logits(program(x))
        except Exception as exc:  # the program's own code: any failure is its answer
            got, why = None, f"calling it on token ids failed ({one_line(exc, 80)})"
    if why is None and (not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape)):
        why = "it does not return (batch, tokens, vocabulary) logits for token ids"
    if why is None and not torch.allclose(got.float().cpu(), want, atol=_ATOL, rtol=_ATOL):
        diff = float((got.float().cpu() - want).abs().max())
        why = f"its logits differ from {arch.arch[3:]}'s with its weights by up to {diff:.3g}"
    if why is not None:
        raise CheckpointError(
            f"{p}: a {fmt} program whose own forward cannot be matched to {arch.arch[3:]} of "
            f"{arch.config_dir / 'config.json'}: {why}; nccli reads the LM head's input from "
            "the transformers model, so re-save the run's model.state_dict() (or safetensors) "
            "and pass that"
        )
