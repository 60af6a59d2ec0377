"""Language models: next-token Neural Collapse over a vocabulary (Wu & Papyan 2024).

``nccli extract --model hf runs/checkpoint-500 runs/checkpoint-1000 -d tokens.npy -o
cache`` runs each Hugging Face causal-LM folder (loaded by
:mod:`nccli.io.checkpoints.hf`) over token sequences (:mod:`nccli.io.datasets.tokens`).
Every position ``t < T-1`` of a sequence is a sample, its label the token at ``t+1``,
the classes the vocabulary (``K`` = the LM head's rows).  Layers (``--layers``):

- ``auto`` — the input of the LM head (``get_output_embeddings()``): the base model's
  ``last_hidden_state``, after the final norm (GPT-2: ``transformer.ln_f``'s output,
  which is also ``hidden_states[-1]``).  A probe checks, before any pass, that the head
  really reads that tensor (a model that changes it in between is refused).  The layer
  is named after the head module (``lm_head``), role ``penultimate``, with the head's
  weight (GPT-2's is tied to ``wte``) and bias (None for GPT-2) as its classifier;
- ``hidden.N`` — the input of transformer block N (``0 <= N < L``; ``hidden.0`` is the
  embedding output, ``hidden.N`` the output of block N-1: ``hidden_states[N]`` of
  ``output_hidden_states=True``), hooked on the block itself; role ``other``;
- ``blocks`` — ``hidden.0`` … ``hidden.{L-1}`` and ``auto``.

A pad id (``pad_token_id`` of ``config.json``) masks attention, and positions whose own
token or label is the pad are left out (a note counts them).  ``--max-tokens N`` keeps
the first N samples in sequence order.  Statistics stream (float64
:class:`~nccli.stats.ClassStats` of the features as cast to ``--dtype``); features are
written only with ``--store-features``.  Caches are written like every cache
(``.partial``, lock, rename); ``--resume`` does not apply (an interrupted run starts
over), a finished cache of the same folder and tokens is skipped.

``--model hf:CONFIG_DIR FILE...`` (``LMOptions.config``): the positionals are weight files
of the run whose ``config.json`` is in ``CONFIG_DIR`` — state dicts, checkpoint dicts
(``--state-key``), safetensors, or (``--trust-checkpoint``) TorchScript/export programs
used for their weights — loaded strictly into the architecture built once from the
configuration (:mod:`nccli.io.checkpoints.hf_weights`); the tokenizer is ``CONFIG_DIR``'s
and each file's cache is named as a vision checkpoint's (``<stem>.h5``).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from nccli.errors import DataError, UsageError
from nccli.extract.batching import MAX_UPDATE_ROWS, Batched, update_rows
from nccli.extract.devices import AMP_DTYPES, FEATURE_DTYPES, device_label, stats_device
from nccli.extract.naming import cache_path
from nccli.extract.pipeline import BackgroundWriter, Rows, to_host
from nccli.extract.plan import check_plan, make_plan, memory_limit
from nccli.io.cache import Cache, CacheWriter, existing_matches
from nccli.io.cache.writer import claim_output
from nccli.io.checkpoints.hf import LoadedLM, is_hf_spec, load_causal_lm, load_tokenizer
from nccli.io.checkpoints.hf_weights import LMArchitecture, build_causal_lm, load_lm_weights
from nccli.io.datasets.tokens import Tokens, TokenScan, open_tokens, scan
from nccli.layers import Layer
from nccli.stats import ClassStats

__all__ = [
    "MAX_UPDATE_ROWS",
    "LMOptions",
    "describe_lm",
    "extract_lm",
    "is_hf_spec",
    "lm_cache_path",
    "lm_folders",
    "lm_layers",
    "update_rows",
]

#: tokens of the probe that checks what the LM head reads
_PROBE_TOKENS = 16


@dataclass
class LMOptions:
    """What only a language-model extraction takes."""

    store_features: bool = False
    max_tokens: int | None = None
    seq_len: int | None = None
    #: the folder of ``config.json`` when the checkpoints are weight files
    config: str | None = None
    #: the dotted entry of a checkpoint dict holding the weights (weight files only)
    state_key: str | None = None


def lm_folders(checkpoints: list[Path], model: str) -> list[Path]:
    """The model folders: ``--model hf:PATH`` alone, or ``--model hf`` + positionals."""
    inline = model.strip()[3:].strip() if model.strip().startswith("hf:") else ""
    if inline and checkpoints:
        raise UsageError(
            f"--model {model}: names a model folder and {len(checkpoints)} more are given; "
            "pass model='hf' and the folders (one trajectory), or for weight files of the "
            "config in that folder model='hf', lm={'config': FOLDER} (what the CLI's "
            "--model hf:CONFIG_DIR FILE... does)"
        )
    paths = [Path(inline)] if inline else list(checkpoints)
    if not paths:
        raise UsageError("--model hf: no model folder given; pass the folders as arguments")
    return paths


def lm_cache_path(out: Path, folder: Path, others: list[Path]) -> Path:
    """``<out>/<folder name>.h5`` (``<parent>_<name>.h5`` when folders of one name in
    different places are extracted together); only the two names are used."""
    name = folder.resolve().name
    clash = any(o.resolve().name == name and o.resolve() != folder.resolve() for o in others)
    if clash:
        name = f"{folder.resolve().parent.name}_{name}"
    if not name or name in (".", "..") or "/" in name:
        raise UsageError(f"{folder}: cannot name a cache after this folder; rename it")
    return out / f"{name}.h5"


# ----------------------------------------------------------------------- layers
def _blocks(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer blocks: the first ModuleList of ``num_hidden_layers`` modules."""
    L = getattr(module.config, "num_hidden_layers", None)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and L is not None and len(sub) == L:
            return name, sub
    return None


def lm_layers(spec: Any, n_blocks: int | None, head_name: str) -> list[int | None]:
    """``--layers`` for a language model: block indices (``hidden.N``), None for ``auto``
    (the LM head's input), in the order given (``blocks``: every block, then auto)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    out: list[int | None] = []
    for p in parts or ["auto"]:
        if p == "auto":
            picked: list[int | None] = [None]
        elif p == "blocks" and n_blocks:
            picked = [*range(n_blocks), None]
        elif p.startswith("hidden.") and p[7:].isdigit() and n_blocks is not None:
            n = int(p[7:])
            if n >= n_blocks:
                raise UsageError(
                    f"--layers {p}: the model has {n_blocks} blocks (hidden.0 to "
                    f"hidden.{n_blocks - 1}); the final normed state is 'auto' ({head_name}'s "
                    "input)"
                )
            picked = [n]
        else:
            raise UsageError(
                f"--layers {p!r}: a language model takes 'auto' (the input of {head_name}, "
                "after the final norm), 'hidden.N' (the input of transformer block N; "
                "hidden.0 = the embeddings), 'blocks' (all of them and auto), comma-separated"
                + ("" if n_blocks else "; this model's blocks were not found")
            )
        out += [i for i in picked if i not in out]
    return out


def _head(module: nn.Module, src: str) -> tuple[str, nn.Module]:
    head = module.get_output_embeddings()
    w = getattr(head, "weight", None)
    if head is None or not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise DataError(f"{src}: the model has no linear LM head (get_output_embeddings())")
    name = next((n for n, m in module.named_modules() if m is head), "lm_head")
    return name, head


def _ordered(m: _LM) -> list[int | None]:
    """The picked layers in forward order (blocks by index, the head's input last)."""
    return sorted(m.picked, key=lambda i: m.n_blocks if i is None else i)


def _records(m: _LM) -> list[Layer]:
    """The cache layer records, in forward order (blocks first, the head's input last)."""
    W = m.head.weight.detach().float().cpu().numpy()
    b = getattr(m.head, "bias", None)
    b = None if b is None else b.detach().float().cpu().numpy()
    recs = []
    for order, i in enumerate(_ordered(m)):
        if i is None:
            recs.append(
                Layer(m.head_name, W.shape[1], m.head_name, 0, "penultimate", "input", "none",
                      order, W, b)
            )  # fmt: skip
        else:
            mod = f"{m.blocks_name}.{i}"
            recs.append(Layer(f"hidden.{i}", W.shape[1], mod, -1, "other", "input", "none", order))
    return recs


# ------------------------------------------------------------------------ model
@dataclass
class _LM:
    loaded: LoadedLM
    base: nn.Module
    head_name: str
    head: nn.Module
    blocks_name: str
    blocks: nn.ModuleList | None
    n_blocks: int
    picked: list[int | None]
    vocab: int
    pad_id: int | None
    max_positions: int | None


def _open_model(loaded: LoadedLM, src: str, layers: Any, dev: torch.device) -> _LM:
    module = loaded.module.to(dev)
    base = getattr(module, "base_model", None)
    if base is None or base is module:
        raise DataError(f"{src}: the model has no base model under its LM head")
    head_name, head = _head(module, src)
    found = _blocks(module)
    blocks_name, blocks = found if found is not None else ("", None)
    n_blocks = len(blocks) if blocks is not None else 0
    picked = lm_layers(layers, n_blocks if blocks is not None else None, head_name)
    vocab = int(head.weight.shape[0])
    pad = getattr(module.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab else None
    maxpos = getattr(module.config, "max_position_embeddings", None)
    maxpos = maxpos if isinstance(maxpos, int) and maxpos > 0 else None
    return _LM(
        loaded, base, head_name, head, blocks_name, blocks, n_blocks, picked, vocab, pad, maxpos
    )


def _check_head_input(m: _LM, ids: np.ndarray, dev: torch.device, src: str) -> None:
    """The LM head must read the base model's ``last_hidden_state`` (probe forward)."""
    x = torch.as_tensor(np.array(ids[:1, :_PROBE_TOKENS], dtype=np.int64), device=dev)
    seen: dict[str, torch.Tensor] = {}
    hook = m.head.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.inference_mode():
            m.loaded.module(input_ids=x)
            last = m.base(input_ids=x)[0]
    finally:
        hook.remove()
    got = seen.get("x")
    if got is None or got.shape != last.shape or not torch.allclose(got, last, atol=1e-5):
        raise DataError(
            f"{src}: its LM head {m.head_name} does not read the base model's last hidden "
            "state (the model transforms it in between), so nccli cannot tell which "
            "features the head classifies; this architecture is not supported"
        )


def describe_lm(folder: Path, layers: Any, trust: bool) -> tuple[dict[str, Any], list[Layer]]:
    """``nccli info FOLDER --model hf``: what the folder is and the layers ``extract``
    would cache (loaded on the CPU; nothing is run)."""
    if Path(folder).is_file():
        raise UsageError(
            f"{folder}: info --model hf describes a model folder; for a weight file run "
            "extract --model hf:CONFIG_DIR on it"
        )
    loaded = load_causal_lm(folder, trust_checkpoint=trust)
    m = _open_model(loaded, str(folder), layers, torch.device("cpu"))
    lo = m.loaded
    head = {
        "path": str(folder),
        "format": "huggingface",
        "arch": lo.arch,
        "epoch": lo.epoch,
        "step": lo.step,
        "sha256": lo.sha256,
        "num_logits": m.vocab,
        "classifier": m.head_name if None in m.picked else None,
        "head_depth": 0 if None in m.picked else None,
        "blocks": f"{m.blocks_name} ({m.n_blocks})" if m.blocks is not None else None,
        "max_positions": m.max_positions,
        "pad_token_id": m.pad_id,
    }
    return head, _records(m)


# ----------------------------------------------------------------------- tokens
def _tokens(data: str, opts: LMOptions, first: Path, trust: bool, maxpos: int | None) -> Tokens:
    def tokenize(text: str) -> list[int]:
        tok = load_tokenizer(first, trust_checkpoint=trust)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    toks = open_tokens(data, seq_len=opts.seq_len, tokenize=tokenize, max_len=maxpos)
    if maxpos is not None and toks.shape[1] > maxpos:
        raise DataError(
            f"{data}: sequences of {toks.shape[1]} tokens are longer than the model's "
            f"{maxpos} positions; cut them shorter (--seq-len for a text file or 1-D stream)"
        )
    return toks


def _take(sc: TokenScan, max_tokens: int | None) -> tuple[int, int, int]:
    """``(sequences used, samples, samples of the last sequence used)``."""
    total = int(sc.kept.sum())
    if max_tokens is None or max_tokens >= total:
        S = len(sc.kept)
        return S, total, int(sc.kept[-1]) if S else 0
    cum = np.cumsum(sc.kept)
    S = int(np.searchsorted(cum, max_tokens)) + 1
    before = int(cum[S - 2]) if S > 1 else 0
    return S, max_tokens, max_tokens - before


def _digest(sc: TokenScan, toks: Tokens, used: tuple[int, int, int], pad: int | None) -> str:
    h = hashlib.sha256(b"nccli-lm-data-1")
    h.update(f"|{sc.sha256}|{toks.kind}|{toks.seq_len}|{used}|{pad}|".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------- run
@dataclass
class _Job:
    """One folder's pass: the model, the tokens, the samples taken."""

    m: _LM
    toks: Tokens
    sc: TokenScan
    used: tuple[int, int, int]
    digest: str
    src: str
    tokenizer: Path
    progress: Any = None


def _architecture(opts: LMOptions, trust: bool) -> LMArchitecture | None:
    """The model built from ``--model hf:CONFIG_DIR`` (weight files), None for folders."""
    if opts.config is None:
        if opts.state_key is not None:
            raise UsageError(
                f"--state-key {opts.state_key}: picks the weights in a checkpoint dict; a "
                "model folder has none (for weight files pass --model hf:CONFIG_DIR FILE...)"
            )
        return None
    return build_causal_lm(opts.config, trust_checkpoint=trust)


def _load(p: Path, arch: LMArchitecture | None, cfg: Any, opts: LMOptions, note: Any) -> LoadedLM:
    """Model folder ``p``, or weight file ``p`` loaded into ``arch`` (its notes printed)."""
    if arch is None:
        return load_causal_lm(p, trust_checkpoint=cfg.trust_checkpoint)
    loaded, notes = load_lm_weights(
        arch, p, trust_checkpoint=cfg.trust_checkpoint, state_key=opts.state_key
    )
    for line in notes:
        note(line)
    return loaded


def extract_lm(
    paths: list[Path],
    data: str,
    split: str,
    cfg: Any,
    out: Path,
    opts: LMOptions,
    note: Any,
    progress: Any = None,
) -> list[Path]:
    """Every model folder over the token data; the cache paths (module docstring).
    ``cfg`` is the :class:`~nccli.extract.runner.Settings` of the call, ``note`` prints
    one note, ``progress`` (a rich Progress, or None) shows the samples done."""
    if cfg.resume:
        note("--resume: a language-model extraction starts over (it keeps no partial rows)")
    written: list[Path] = []
    toks: Tokens | None = None
    scans: dict[tuple[int, int | None], TokenScan] = {}
    arch = _architecture(opts, cfg.trust_checkpoint)
    for folder in paths:
        src = str(folder)
        m = _open_model(_load(folder, arch, cfg, opts, note), src, cfg.layers, cfg.device)
        tok_dir = folder if arch is None else arch.config_dir
        if toks is None:
            toks = _tokens(data, opts, tok_dir, cfg.trust_checkpoint, m.max_positions)
            if toks.cut_tokens:
                note(f"{data}: the last {toks.cut_tokens} tokens make no whole sequence of "
                     f"--seq-len {toks.seq_len}; left out")  # fmt: skip
        key = (m.vocab, m.pad_id)
        if key not in scans:
            scans[key] = scan(toks, m.vocab, m.pad_id, data)
        sc = scans[key]
        used = _take(sc, opts.max_tokens)
        if used[1] < 1:
            raise DataError(f"{data}: no position has a label that is not the pad id")
        if m.pad_id is not None and sc.pad_left_out:
            note(f"{src}: left out {sc.pad_left_out} positions whose token or next token is "
                 f"the pad id {m.pad_id} (pad_token_id in config.json)")  # fmt: skip
        job = _Job(m, toks, sc, used, _digest(sc, toks, used, m.pad_id), src, tok_dir, progress)
        out_path = (
            lm_cache_path(out, folder, paths) if arch is None else cache_path(out, folder, paths)
        )
        written.append(_one(job, cfg, opts, out_path, data, split, note))
    return written


def _attrs(
    job: _Job, cfg: Any, opts: LMOptions, data: str, folder: Path, split: str
) -> dict[str, Any]:
    m, T = job.m, job.toks.shape[1]
    lo = m.loaded
    return {
        "checkpoint": str(folder.resolve()),
        "checkpoint_sha256": lo.sha256,
        "checkpoint_format": lo.format,
        "config": None if lo.format == "huggingface" else str(job.tokenizer.resolve()),
        "state_key": lo.state_key,
        "dataset": data,
        "dataset_digest": job.digest,
        "dataset_description": job.toks.describe(),
        "split": split,
        "arch": lo.arch,
        "epoch": lo.epoch,
        "step": lo.step,
        "epoch_from": lo.epoch_from,
        "step_from": lo.step_from,
        "torch_version": str(torch.__version__),
        "device": device_label(cfg.device),
        "amp": cfg.amp,
        "pool": "none",
        "command": cfg.command,
        "classifier": m.head_name if None in m.picked else None,
        "head_depth": 0 if None in m.picked else None,
        "batch_size": cfg.batch_size,
        "row_start": 0,
        "task": "next-token",
        "sequences": job.used[0],
        "sequence_length": T,
        "token_sha256": job.sc.sha256,
        "seq_len": job.toks.seq_len,
        "tokenizer": str(job.tokenizer.resolve()) if job.toks.kind == "text" else None,
        "pad_token_id": m.pad_id,
        "pad_left_out": job.sc.pad_left_out if m.pad_id is not None else None,
        "max_tokens": opts.max_tokens,
        "features_stored": bool(opts.store_features),
        "stats_precision": getattr(cfg, "precision", "exact"),
    }


def _one(
    job: _Job, cfg: Any, opts: LMOptions, out_path: Path, data: str, split: str, note: Any
) -> Path:
    m, src = job.m, job.src
    want = {
        "checkpoint_sha256": m.loaded.sha256,
        "dataset_digest": job.digest,
        "feature_dtype": cfg.feature_dtype,
        "features_stored": bool(opts.store_features),
        "split": split,
        "stats_precision": getattr(cfg, "precision", "exact"),
    }
    layers = _records(m)
    if out_path.exists() and not cfg.overwrite and existing_matches(out_path, want) is not None:
        with Cache(out_path) as c:
            have = list(c.layers)
        if sorted(have) != sorted(c.name for c in layers):
            raise UsageError(
                f"{out_path}: exists with the layers {', '.join(have)}, not the ones asked "
                "for; pass --overwrite to replace it, or another -o"
            )
        note(f"{out_path}: already extracted, skipped (pass --overwrite to redo it)")
        return out_path
    _check_head_input(m, job.toks.ids, cfg.device, src)
    T = job.toks.shape[1]
    rows = update_rows(m.vocab, cfg.batch_size, T)  # the statistics' update, pooled
    disc = SimpleNamespace(layers=layers, num_logits=m.vocab, shapes={})
    limit, how = memory_limit(cfg.max_memory, stats_device(cfg.device))
    plan = make_plan(disc, job.used[1], rows, cfg.feature_dtype, opts.store_features)
    check_plan(plan, limit, how, src)
    with claim_output(out_path):
        writer = CacheWriter(
            out_path, layers, job.used[1], m.vocab,
            attrs=_attrs(job, cfg, opts, data, Path(src), split),
            feature_dtype=cfg.feature_dtype,
            logits=False, features=opts.store_features,
        )  # fmt: skip
        try:
            stats = _stream(job, cfg, layers, writer)
            return writer.finalize(stats)
        except BaseException:
            writer.abort()
            raise


def _batches(job: _Job, seqs: int) -> Any:
    """``(ids (B, T) int64, keep (B, T-1) bool, first sequence)`` in order."""
    S, n_last = job.used[0], job.used[2]
    ids, pad = job.toks.ids, job.m.pad_id
    for s0 in range(0, S, seqs):
        a = np.array(ids[s0 : min(S, s0 + seqs)], dtype=np.int64)
        keep = np.ones((a.shape[0], a.shape[1] - 1), dtype=bool)
        if pad is not None:
            keep = (a[:, :-1] != pad) & (a[:, 1:] != pad)
        if s0 + a.shape[0] == S:  # --max-tokens: the first n_last samples of the last one
            last = keep[-1]
            last[np.flatnonzero(last)[n_last:]] = False
        yield a, keep, s0


def _stream(job: _Job, cfg: Any, layers: list[Layer], writer: CacheWriter) -> dict[str, ClassStats]:
    """The pass: statistics of every layer; labels, positions (and, when stored, the
    features) of every sample to ``writer``."""
    m, dev = job.m, cfg.device
    sdev = stats_device(dev)
    store = FEATURE_DTYPES[cfg.feature_dtype]
    amp = AMP_DTYPES[cfg.amp]
    prec = getattr(cfg, "precision", "exact")  # --precision: the scatter's product
    stats = Batched({c.name: ClassStats(m.vocab, c.dim, device=sdev, precision=prec,
                                        source=f"{job.src}:{c.name}") for c in layers},
                    update_rows(m.vocab, cfg.batch_size, job.toks.shape[1]))  # fmt: skip
    seen: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Any:
        def hook(_mod: Any, args: Any, kwargs: Any) -> None:
            seen[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    hooks = [m.blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True)
             for i in _ordered(m) if i is not None]  # fmt: skip
    T = job.toks.shape[1]
    bg, row, cuda = BackgroundWriter(writer), 0, dev.type == "cuda"
    bar = job.progress
    task = None if bar is None else bar.add_task(escape(Path(job.src).name), total=job.used[1])
    autocast = (torch.autocast(device_type="cuda", dtype=amp)
                if cuda and amp is not None else contextlib.nullcontext())  # fmt: skip
    try:
        for a, keep, s0 in _batches(job, max(1, cfg.batch_size // (T - 1))):
            x = torch.as_tensor(a, device=dev)
            mask = None if m.pad_id is None else (x != m.pad_id).long()
            with torch.inference_mode(), autocast:
                last = m.base(input_ids=x, attention_mask=mask)[0]
                kd = torch.as_tensor(keep, device=dev)
                y = x[:, 1:][kd].to(sdev)
                feats = {}
                for c, i in zip(layers, _ordered(m), strict=True):
                    h = last if i is None else seen[i]
                    if tuple(h.shape[:2]) != tuple(x.shape):
                        raise DataError(f"{job.src}: layer {c.name} has shape {tuple(h.shape)}")
                    feats[c.name] = h[:, :-1][kd].to(store)
                stats.add({k: v.to(sdev) for k, v in feats.items()}, y)
            pos = (np.arange(s0, s0 + a.shape[0])[:, None] * T + np.arange(T - 1))[keep]
            host, _, ready = to_host(feats if writer.features else {}, torch.empty(0), cuda)
            bg.submit(Rows(row, y.cpu().numpy(), pos, host, torch.empty(0), ready))
            row += int(keep.sum())
            seen.clear()
            if task is not None:
                bar.update(task, advance=int(keep.sum()))
    finally:
        for h in hooks:
            h.remove()
        bg.close()
        if task is not None:
            bar.update(task, visible=False)
    return stats.finish()
