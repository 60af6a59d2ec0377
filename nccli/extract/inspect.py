"""``nccli info``: what a cache holds, or what ``extract --layers`` would pick in a
checkpoint (without extracting anything)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from nccli.errors import DataError, UsageError
from nccli.extract.devices import input_dtype, resolve_device
from nccli.extract.discovery import discover_layers
from nccli.extract.language import describe_lm, is_hf_spec
from nccli.extract.plan import check_plan, format_bytes, make_plan, memory_limit
from nccli.extract.runner import PROBE_SAMPLES, eval_mode
from nccli.io.cache import describe as describe_cache
from nccli.report.console import print_notes

__all__ = ["describe_cache", "describe_checkpoint"]


def _probe_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape a zoo model records, or that its first layer implies."""
    for attr in ("nccli_input_shape", "input_shape"):
        shape = getattr(module, attr, None)
        if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape):
            return tuple(shape)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (int(m.in_features),)
        if any(True for _ in m.parameters(recurse=False)):
            return None
    return None


def _probe_batch(
    module: nn.Module, path: Any, data: str | None, split: str, normalize: str | None
) -> tuple[torch.Tensor, str | None, int | None]:
    """The probe inputs, the preprocessing they had and the dataset's size (``None`` for
    the noise probe)."""
    if data is not None:
        from nccli.io.datasets import open_dataset

        with open_dataset(data, split=split, normalize=normalize) as ds:
            print_notes(ds.require_normalize())  # image data need an explicit --normalize
            probe = next(iter(ds.iter_batches(PROBE_SAMPLES)))[0]
            return probe, ds.normalization, len(ds)
    shape = _probe_shape(module)
    if shape is None:
        raise UsageError(
            f"{path}: cannot tell the model's input shape; pass --data SPEC so nccli can "
            "run a probe batch"
        )
    # seeded noise rather than zeros: the head check compares values, and a hidden
    # relu between two linear layers is invisible on an all-zero probe
    return torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)), None, None


def describe_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    model: str | None = None,
    data: str | None = None,
    split: str = "train",
    normalize: str | None = None,
    layers: str | Sequence[str] = "auto",
    trust_checkpoint: bool = False,
    device: str = "cpu",
    state_key: str | None = None,
    pool: str | None = None,
    max_memory: str | int | float | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """What ``extract --layers <layers>`` would cache for this checkpoint.

    The probe is the first samples of ``data`` when given, else seeded noise shaped like
    the model's recorded input (``input_shape`` on the module, or an MLP's first linear
    layer); a convolutional model without one needs ``data``.  Image data need an
    explicit ``normalize`` (as for ``extract``); ``"normalization"`` in the result is
    what the probe applied (left out for the noise probe).  ``state_key`` picks the
    weights in a checkpoint dict (as for ``extract``); what was inferred from them
    (``num_classes``) is a note on stderr.  ``pool`` is ``extract``'s.

    The memory plan (:mod:`nccli.extract.plan`) comes with it: each layer row has its
    module's per-sample ``shape`` before pooling, its ``pool``, ``dim`` after pooling,
    ``stats_bytes`` and (with ``data``) ``feature_bytes`` for the whole dataset;
    ``"plan"`` has the totals at ``batch_size``, the limit (``max_memory`` as for
    ``extract``) and ``refused``, the line ``extract`` would refuse with (else ``None``);
    ``"memory_plan"`` says the same in one line.
    """
    from nccli.io.checkpoints import load_model

    if arch is not None and model is not None:
        raise UsageError("pass either --arch or --model, not both")
    if is_hf_spec(model):  # a language model folder (nccli.extract.language)
        return _describe_lm(path, layers, trust_checkpoint, max_memory, batch_size)
    dev = resolve_device(device)
    loaded = load_model(
        path,
        arch=arch,
        model=model,
        trust_checkpoint=trust_checkpoint,
        map_location="cpu",
        state_key=state_key,
    )
    print_notes(loaded.notes, escape_text=True)  # what was inferred from the weights
    module = eval_mode(loaded.module.to(dev))
    probe, preprocessing, num_samples = _probe_batch(module, path, data, split, normalize)
    x = probe.to(dev, input_dtype(module))
    disc = discover_layers(module, x, layers, pool=pool, source=str(path))
    print_notes(disc.notes, escape_text=True)
    plan, line, layer_costs = _plan(disc, num_samples, batch_size, max_memory, str(path))
    return {
        "path": str(path),
        "format": loaded.format,
        "arch": loaded.arch,
        **({"state_key": loaded.state_key} if loaded.state_key is not None else {}),
        "epoch": loaded.epoch,
        "step": loaded.step,
        "sha256": loaded.sha256,
        "input_shape": list(disc.input_shape),
        **({"normalization": preprocessing} if preprocessing is not None else {}),
        "num_logits": disc.num_logits,
        "classifier": disc.classifier,
        "head_depth": disc.head_depth,
        "memory_plan": line,
        "plan": plan,
        "layers": [{**r, **layer_costs[r["name"]].row()} for r in disc.rows()],
    }


def _describe_lm(
    path: Any, layers: Any, trust: bool, max_memory: Any, batch_size: int
) -> dict[str, Any]:
    """``describe_checkpoint`` of a Hugging Face causal-LM folder: its layers and their
    statistics plan (K = the vocabulary; ``batch_size`` token positions per update)."""
    head, records = describe_lm(path, layers, trust)
    disc = SimpleNamespace(layers=records, num_logits=head["num_logits"], shapes={})
    plan, line, costs = _plan(disc, None, batch_size, max_memory, str(path))
    rows = [{**r.row(), **costs[r.name].row()} for r in records]
    return {**head, "memory_plan": line, "plan": plan, "layers": rows}


def _plan(
    disc: Any, n: int | None, batch_size: int, max_memory: Any, source: str
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The plan's totals and verdict, the same as one line, and each layer's cost."""
    plan = make_plan(disc, n, batch_size)
    limit, how = memory_limit(max_memory)
    try:
        check_plan(plan, limit, how, source)
        refused = None
    except DataError as exc:
        refused = str(exc)
    line = (
        f"statistics {format_bytes(plan.stats_bytes)}, peak {format_bytes(plan.peak_bytes)} at "
        f"--batch-size {batch_size}"
        + (f", features {format_bytes(plan.feature_bytes)} for {n} samples" if n else "")
        + (f"; extract would refuse: {refused}" if refused else f"; within the limit ({how})")
    )
    info = {
        "batch_size": batch_size,
        "num_samples": n,
        "feature_bytes": plan.feature_bytes if n else None,
        "stats_bytes": plan.stats_bytes,
        "peak_bytes": plan.peak_bytes,
        "limit_bytes": None if limit == float("inf") else int(limit),
        "refused": refused,
    }
    return info, line, {c.name: c for c in plan.layers}
