"""``extract``: the library call behind ``nccli extract`` — check the options, open the
dataset once, and run every checkpoint (one process, or one shard per ``torchrun`` rank).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError, UsageError
from nccli.extract import distributed as dist_mod
from nccli.extract.devices import AMP_DTYPES, FEATURE_DTYPES, resolve_device
from nccli.extract.language import LMOptions, extract_lm, is_hf_spec, lm_folders
from nccli.extract.naming import cache_path
from nccli.extract.plan import parse_size
from nccli.extract.pooling import check_pool
from nccli.extract.runner import Runner, Settings
from nccli.report.console import print_notes, progress_bar

__all__ = ["cache_path", "extract"]


def _check_options(
    checkpoints: Sequence[str | os.PathLike[str]],
    amp: str,
    batch_size: int,
    feature_dtype: str,
    limit: int | None,
    num_workers: int,
    arch: str | None,
    model: str | None,
    pool: str | None = None,
    max_memory: Any = None,
) -> list[Path]:
    check_pool(pool)  # None: avg, the default (noted)
    parse_size(max_memory)
    if amp not in AMP_DTYPES:
        raise UsageError(f"--amp {amp!r}: choose one of {', '.join(AMP_DTYPES)}")
    if feature_dtype not in FEATURE_DTYPES:
        raise UsageError(f"--dtype {feature_dtype!r}: choose float32 or float16")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {limit}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    if arch is not None and model is not None:
        raise UsageError("pass either --arch or --model, not both")
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise UsageError("no checkpoint given; pass one or more checkpoint files")
    seen: dict[str, Path] = {}
    for p in paths:
        name = cache_path(Path(), p, paths).name
        other = seen.setdefault(name, p)
        if other != p:
            raise UsageError(
                f"{p}: would be cached as {name} like {other} (same file and folder name); "
                "extract them into different -o directories"
            )
    return paths


def _check_out_dir(out: Path) -> None:
    """Refuse an ``-o`` that cannot become a writable directory, before any work is done
    (the nearest existing ancestor decides; nothing is created here)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == out else f"is under {probe}, which is a file"
        raise UsageError(f"-o {out}: {what}; pass a directory for the caches")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: {probe} is not writable; choose another -o directory")


def extract(
    checkpoints: Sequence[str | os.PathLike[str]],
    data: str,
    *,
    arch: str | None = None,
    model: str | None = None,
    out_dir: str | os.PathLike[str],
    layers: str | Sequence[str] = "auto",
    device: str = "auto",
    amp: str = "off",
    batch_size: int = 256,
    feature_dtype: str = "float32",
    split: str = "train",
    limit: int | None = None,
    normalize: str | None = None,
    trust_checkpoint: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    command: str | None = None,
    distributed: bool | None = None,
    dist_backend: str = "auto",
    dist_timeout: float = 30.0,
    skip_nonfinite: bool = False,
    state_key: str | None = None,
    pool: str | None = None,
    max_memory: str | int | float | None = None,
    precision: str = "exact",
    eval_data: Sequence[str] | Mapping[str, str] | None = None,
    lm: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Extract features and statistics of every checkpoint into ``out_dir/<stem>.h5``.

    ``data`` is a dataset spec (:func:`nccli.io.datasets.open_dataset`), opened once.
    ``arch`` (zoo spec) or ``model`` (``pkg.module:factory`` or ``file.py:factory``, then
    optionally ``:key=value,...``; see :func:`~nccli.io.checkpoints.load_model`, also for
    ``state_key``) builds the network a state dict is loaded into.  ``layers``: ``"auto"``,
    ``"blocks"`` or names/globs/``name#N`` (:func:`discover_layers`), feature maps pooled
    by ``pool`` (``avg``: the default when None; ``max``, ``flatten``).  ``max_memory``
    (``"8G"``, ``"none"``; None: half the available memory) caps the planned statistics
    (:mod:`nccli.extract.plan`).  ``amp`` (``bf16``/``fp16``) needs CUDA.  ``feature_dtype``
    is how features are stored; statistics are float64 of the stored values (``precision``
    ``"fast"``: the scatter's products in float32 blocks, docs/metrics.md).  A finished
    cache of the same checkpoint and data is skipped unless ``overwrite``; ``resume``
    continues a ``.partial``.  ``num_workers > 0`` loads (and pins) batches in a thread,
    ``2·num_workers`` ahead; ``progress=False`` silences stderr.  ``skip_nonfinite`` drops
    samples with NaN/Inf features or logits in any layer from every layer (counted per
    class) instead of failing.  ``eval_data`` (``{"test": "test.npz"}`` or
    ``["test=test.npz"]``) adds held-out splits: each checkpoint is run over each of them
    too, into ``out_dir/<name>/<stem>.h5`` with split ``<name>`` and a ``reference_cache``
    attribute naming its training cache (:mod:`nccli.heldout`).  Returns the cache paths.

    Under ``torchrun`` with ``WORLD_SIZE > 1`` (``distributed=None`` detects it) each rank
    extracts a disjoint shard ``<stem>.rank<r>.h5``; rank 0 merges and checks the ranks'
    statistics (:mod:`nccli.extract.distributed`; ``dist_backend`` auto/gloo/nccl,
    ``dist_timeout`` minutes).  Returns this rank's shard paths then.  ``model="hf"``: language models, ``lm`` their options (:func:`_lm_options`).
    """
    checkpoints, model, lmo = _lm_options(checkpoints, model, lm)
    opts = (amp, batch_size, feature_dtype, limit, num_workers, arch, model, pool, max_memory)
    paths = _check_options(checkpoints, *opts)
    evals = parse_eval_data(eval_data, split)
    dev = resolve_device(device)
    group = _join_group(dev, distributed, dist_backend, dist_timeout)
    dev = group.device if group is not None else dev
    try:
        _check_run(amp, dev, paths, out := Path(out_dir))
        cfg = Settings(
            dev, amp, batch_size, feature_dtype, layers, arch, model, trust_checkpoint,
            resume, overwrite, command if command is not None else shlex.join(sys.argv),
            notes=progress, rank=group.rank if group is not None else 0,
            world_size=group.world_size if group is not None else 1,
            skip_nonfinite=skip_nonfinite, state_key=state_key, pool=pool, max_memory=max_memory,
            precision=str(getattr(precision, "value", precision)),
        )  # fmt: skip
        splits = [(split, str(data), None), *evals]
        return _run_splits(splits, cfg, paths, out, group, num_workers, limit, normalize, lmo)
    finally:
        if group is not None:
            group.close()


def _lm_options(
    checkpoints: Sequence[Any], model: str | None, lm: Mapping[str, Any] | None
) -> tuple[Sequence[Any], str | None, LMOptions | None]:
    """``model="hf"`` (or ``"hf:FOLDER"``): the checkpoints are Hugging Face causal-LM
    folders and the data token ids or text (:mod:`nccli.extract.language`); ``lm`` takes
    ``store_features`` (keep the features; by default only statistics), ``max_tokens``
    (bound the samples) and ``seq_len`` (cut text or a 1-D stream).  Returns the folders,
    no model spec and the options; for other models the checkpoints, the spec and None
    (the LM-only options refused)."""
    given = {k: v for k, v in (lm or {}).items() if v not in (None, False)}
    unknown = sorted(set(given) - set(LMOptions.__dataclass_fields__))
    if unknown:
        raise UsageError(f"lm: unknown options {', '.join(unknown)}")
    if not is_hf_spec(model):
        if given:
            used = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            raise UsageError(f"{used}: only for a language model (--model hf)")
        return checkpoints, model, None
    opts = LMOptions(**given)
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer, got {opts.max_tokens}")
    if opts.seq_len is not None and opts.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {opts.seq_len}")
    folders = lm_folders([Path(p) for p in checkpoints], str(model))
    return [str(p) for p in folders], None, opts


def _run_lm(
    splits: list[tuple[str, str, str | None]],
    cfg: Settings,
    paths: list[Path],
    out: Path,
    group: dist_mod.Group | None,
    limit: int | None,
    normalize: str | None,
    opts: LMOptions,
) -> list[Path]:
    """Language-model folders over token data (one process); the options that only
    image models take are refused."""
    given = {"--arch": cfg.arch, "--state-key": cfg.state_key, "--pool": cfg.pool,
             "--eval-data": splits[1:] or None, "--limit": limit, "--normalize": normalize,
             "--skip-nonfinite": cfg.skip_nonfinite or None}  # fmt: skip
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise UsageError(
            f"{', '.join(bad)}: not used for a language model (--model hf); leave "
            f"{'it' if len(bad) == 1 else 'them'} out"
        )
    if group is not None:
        raise UsageError("--model hf: language models are extracted in one process, not torchrun")
    split, data, _ = splits[0]
    with progress_bar(cfg.notes) as bar:

        def note(text: str) -> None:
            print_notes([text], quiet=not cfg.notes, console=bar.console, escape_text=True)

        return extract_lm(paths, data, split, cfg, out, opts, note, bar)


def _run_splits(
    splits: list[tuple[str, str, str | None]],
    cfg: Settings,
    paths: list[Path],
    out: Path,
    group: dist_mod.Group | None,
    num_workers: int,
    limit: int | None,
    normalize: str | None,
    lm: LMOptions | None = None,
) -> list[Path]:
    """Every checkpoint over the training data, then over each held-out split (its caches
    in the folder ``out/<name>``); each dataset is opened once.  ``lm``: language-model
    folders over token data instead (:func:`_run_lm`)."""
    from nccli.io.datasets import open_dataset

    if lm is not None:
        return _run_lm(splits, cfg, paths, out, group, limit, normalize, lm)

    written: list[Path] = []
    for name, spec, sub_out in splits:
        ds = open_dataset(spec, split=name, limit=limit, normalize=normalize)
        try:
            # image data need an explicit --normalize; what 'auto' chose is a note
            print_notes(ds.require_normalize(), quiet=not cfg.notes or cfg.rank != 0)
            target = out if sub_out is None else out / sub_out
            written += _run_all(
                ds, spec, name, cfg, paths, target, group, num_workers, sub_out is not None
            )
        finally:
            if getattr(ds, "close", None) is not None:
                ds.close()
    return written


#: a held-out split's name: it names a folder under -o and the caches' split attribute
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def parse_eval_data(
    eval_data: Sequence[str] | Mapping[str, str] | None, train_split: str
) -> list[tuple[str, str, str]]:
    """``--eval-data NAME=FILE`` values → ``(split name, dataset spec, folder under -o)``."""
    if not eval_data:
        return []
    if isinstance(eval_data, Mapping):
        items = list(eval_data.items())
    else:
        items = [str(value).partition("=")[::2] for value in eval_data]
        for value, (_, spec) in zip(eval_data, items, strict=True):
            if "=" not in str(value) or not spec:
                raise UsageError(
                    f"--eval-data {value!r}: write NAME=FILE, e.g. --eval-data test=test.npz"
                )
    out: list[tuple[str, str, str]] = []
    for name, spec in items:
        if not _SPLIT_NAME.match(name) or name == train_split:
            raise UsageError(
                f"--eval-data {name}={spec}: the name must be letters, digits, '-' or '_' and "
                f"differ from the training split {train_split!r} (e.g. test, val)"
            )
        if any(name == o[0] for o in out):
            raise UsageError(f"--eval-data: the split {name!r} is given twice")
        out.append((name, str(spec), name))
    return out


def _check_run(amp: str, dev: Any, paths: list[Path], out: Path) -> None:
    """Refuse, before any work, what cannot run here: AMP off CUDA, a missing checkpoint,
    an ``-o`` that cannot become a writable directory."""
    if amp != "off" and dev.type != "cuda":
        raise UsageError(
            f"--amp {amp} needs a CUDA device (this run uses {dev}); use --amp off or --device cuda"
        )
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such checkpoint file; check the path")
    _check_out_dir(out)


def _join_group(
    dev: Any, distributed: bool | None, backend: str, timeout: float
) -> dist_mod.Group | None:
    """The torchrun process group this process belongs to (``None`` for one process)."""
    launch = dist_mod.detect() if distributed is not False else None
    if distributed and launch is None:
        raise UsageError(
            "distributed=True but this process was not started by torchrun with WORLD_SIZE > 1"
        )
    return None if launch is None else dist_mod.setup(launch, dev, backend, timeout)


def _run_all(
    ds: Any,
    data: str,
    split: str,
    cfg: Settings,
    paths: list[Path],
    out: Path,
    group: dist_mod.Group | None,
    num_workers: int,
    held_out: bool = False,
) -> list[Path]:
    """Every checkpoint over the open dataset, in order; the cache (or shard) paths.
    ``held_out``: the caches are an ``--eval-data`` split in a folder under ``-o``, each
    naming its training cache (``reference_cache`` = ``../<stem>.h5``)."""
    if group is not None and len(ds) < group.world_size:
        raise UsageError(
            f"{data}: {len(ds)} samples cannot be split over {group.world_size} ranks; "
            "start fewer processes"
        )
    written: list[Path] = []
    # one progress bar (rank 0's shard) under torchrun; every rank prints its notes
    with progress_bar(cfg.notes and cfg.rank == 0) as bar:
        run = Runner(ds, data, split, cfg, bar, prefetch=2 * num_workers)
        if held_out:
            run.reference = lambda p: "../" + cache_path(Path(), p, paths).name
        for p in paths:
            if group is None:
                written.append(run.one(p, cache_path(out, p, paths)))
                continue
            written.append(
                dist_mod.run_checkpoint(
                    group,
                    lambda shard, p=p: run.one(p, shard),
                    p,
                    cache_path(out, p, paths),
                    np.asarray(ds.labels),
                    run.note if cfg.notes else lambda _: None,
                )
            )
    return written
