"""Hugging Face causal language models from a local folder (``--model hf``), loaded safely.

A model folder (``config.json`` and the weights, as ``save_pretrained`` or the Trainer's
``checkpoint-<step>/`` write them) is hostile until checked:

- ``config.json`` (and ``tokenizer_config.json`` when the tokenizer is used) is read as
  JSON data, at most :data:`JSON_LIMIT` bytes; a folder whose configuration asks for code
  of its own (``auto_map``, or a ``model_type`` this ``transformers`` does not know) is
  refused, naming what asked, unless ``trust_checkpoint``;
- ``transformers`` is imported only here, on first use (an optional extra: one line
  saying how to install it when missing), and always with ``local_files_only=True``,
  ``trust_remote_code=trust_checkpoint`` and ``weights_only=True`` (``pytorch_model.bin``
  files go through ``torch.load``'s weights-only unpickler), with ``HF_HUB_OFFLINE=1`` set
  for the call: nothing is downloaded;
- the weights are loaded in float32 (a bf16/fp16 checkpoint is widened exactly);
- the step comes from ``trainer_state.json``'s ``global_step`` (read as data, a
  non-negative integer below 2**63), else from the folder name (``checkpoint-500``,
  ``step1000``: :mod:`nccli.io.names`); the epoch from the folder name, else from
  ``trainer_state.json``'s ``epoch`` when it is a whole number.

The LM head is ``model.get_output_embeddings()``: an ``nn.Linear`` of ``(vocab, d)``
(GPT-2's is tied to the token embedding ``wte``; its bias is None).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nccli.errors import CheckpointError, DataError, UnsafeCheckpointError, UsageError
from nccli.io._util import file_sha256, one_line
from nccli.io.names import MAX_NUMBER, epoch_step_from_name

__all__ = [
    "JSON_LIMIT",
    "LoadedLM",
    "import_transformers",
    "is_hf_spec",
    "load_causal_lm",
    "load_tokenizer",
    "read_json",
]

#: the largest JSON file of a model folder nccli reads (trainer_state.json grows with
#: its log history)
JSON_LIMIT = 64 << 20
#: files whose bytes make the model: hashed into ``checkpoint_sha256``
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def is_hf_spec(model: str | None) -> bool:
    """``--model hf`` / ``hf:`` / ``hf:PATH``: a Hugging Face causal LM."""
    return model is not None and (model.strip() == "hf" or model.strip().startswith("hf:"))


def import_transformers() -> Any:
    """The ``transformers`` module, or one line saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(
            "--model hf needs the optional dependency transformers "
            "(pip install 'nccli[transformers]'); it is not installed: "
            f"{one_line(exc, 80)}"
        ) from None
    return transformers


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a model folder, read as data (size-bounded, no code)."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise DataError(f"{path}: the {what} is not a regular file")
        if size > JSON_LIMIT:
            raise DataError(f"{path}: the {what} is {size} bytes; nccli reads at most {JSON_LIMIT}")
        with open(path, "rb") as f:
            obj = json.loads(f.read(JSON_LIMIT + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{path}: the {what} is not readable JSON ({one_line(exc, 100)}); "
            "check the model folder"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: the {what} is not a JSON object; check the model folder")
    return obj


def _remote_code(cfg: dict[str, Any], known: Any) -> str | None:
    """What in a configuration asks for the folder's own code (None: nothing)."""
    if "auto_map" in cfg:
        return f"auto_map {one_line(json.dumps(cfg['auto_map']), 100)}"
    mtype = cfg.get("model_type")
    if known is not None and (not isinstance(mtype, str) or mtype not in known):
        return f"model_type {mtype!r}, which this transformers does not know"
    return None


def check_folder(path: Path, trust: bool, *, tokenizer: bool = False) -> dict[str, Any]:
    """``config.json`` of model folder ``path``, refused when it asks for remote code."""
    if not path.is_dir():
        raise DataError(
            f"{path}: --model hf takes a model folder (config.json and the weights, as "
            "save_pretrained writes them); this is not a directory. For weight files (a "
            "state dict, safetensors, or a TorchScript program with --trust-checkpoint) pass "
            "--model hf:CONFIG_DIR, the folder of the run's config.json"
        )
    if not (path / "config.json").exists():
        raise DataError(f"{path}: no config.json; is this a Hugging Face model folder?")
    cfg = read_json(path / "config.json", "model configuration")
    tf = import_transformers()
    known = getattr(getattr(tf, "CONFIG_MAPPING", None), "keys", lambda: None)()
    asks = [(path / "config.json", _remote_code(cfg, known))]
    tok = path / "tokenizer_config.json"
    if tokenizer and tok.exists():
        tcfg = read_json(tok, "tokenizer configuration")
        asks.append((tok, f"auto_map {tcfg['auto_map']}" if "auto_map" in tcfg else None))
    for where, what in asks:
        if what is not None and not trust:
            raise UnsafeCheckpointError(
                f"{where}: asks for code stored with the model ({what}); loading it would "
                "run that code. Pass --trust-checkpoint only if you trust this folder"
            )
    return cfg


@contextlib.contextmanager
def _offline(tf: Any) -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` (and ``TRANSFORMERS_OFFLINE=1``) for the call: no network;
    transformers' own log lines and progress bars silenced (errors still raise)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    log = tf.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def folder_sha256(path: Path) -> str:
    """sha256 over ``config.json`` and the weight files of a folder (names and digests)."""
    h = hashlib.sha256(b"nccli-hf-folder-1")
    for p in sorted(path.iterdir()):
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES)):
            h.update(f"|{p.name}|{file_sha256(p)}".encode())
    return h.hexdigest()


def _number(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMBER
    return value if ok else None


def epoch_step(path: Path) -> tuple[int | None, int | None, str | None, str | None]:
    """``(epoch, step, epoch_from, step_from)`` of a model folder (module docstring)."""
    epoch, step = epoch_step_from_name(path.resolve().name)
    epoch_from = "name" if epoch is not None else None
    step_from = "name" if step is not None else None
    state = path / "trainer_state.json"
    if state.is_file():
        st = read_json(state, "trainer state")
        if _number(st.get("global_step")) is not None:
            step, step_from = st["global_step"], "checkpoint"
        ep = st.get("epoch")
        if epoch is None and isinstance(ep, (int, float)) and not isinstance(ep, bool):
            if float(ep).is_integer() and _number(int(ep)) is not None:
                epoch, epoch_from = int(ep), "checkpoint"
    return epoch, step, epoch_from, step_from


@dataclass
class LoadedLM:
    """A causal LM loaded from a folder, with what the cache records about it."""

    module: Any
    config: dict[str, Any]
    sha256: str
    arch: str
    epoch: int | None
    step: int | None
    epoch_from: str | None
    step_from: str | None
    #: ``huggingface`` (a folder), else the weight file's format (``state_dict``,
    #: ``safetensors``, ...: :mod:`nccli.io.checkpoints.hf_weights`)
    format: str = "huggingface"
    #: the dotted key of a checkpoint dict the weights came from (``--state-key``)
    state_key: str | None = None


def load_causal_lm(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> LoadedLM:
    """The model in folder ``path`` (``AutoModelForCausalLM``, local files only), in eval
    mode, float32, on the CPU."""
    import torch

    path = Path(path)
    cfg = check_folder(path, trust_checkpoint)
    tf = import_transformers()
    try:
        with _offline(tf):
            module = tf.AutoModelForCausalLM.from_pretrained(
                str(path),
                local_files_only=True,
                trust_remote_code=trust_checkpoint,
                weights_only=True,
                dtype=torch.float32,
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise CheckpointError(
            f"{path}: transformers could not load this model folder ({one_line(exc, 160)}); "
            "check that it holds config.json and the weights save_pretrained wrote"
        ) from None
    module.eval()
    epoch, step, epoch_from, step_from = epoch_step(path)
    arch = "hf:" + (type(module).__name__ or "model")
    return LoadedLM(module, cfg, folder_sha256(path), arch, epoch, step, epoch_from, step_from)


def load_tokenizer(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> Any:
    """The tokenizer saved in model folder ``path`` (local files only)."""
    path = Path(path)
    check_folder(path, trust_checkpoint, tokenizer=True)
    tf = import_transformers()
    try:
        with _offline(tf):
            return tf.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_checkpoint
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise DataError(
            f"{path}: no usable tokenizer in this model folder ({one_line(exc, 160)}); a "
            "text file needs the model's own tokenizer files, or pass token ids (.npy)"
        ) from None
