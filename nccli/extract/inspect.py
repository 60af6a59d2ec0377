"""``nccli info``: what a cache holds, or what ``extract --layers`` would pick in a
checkpoint (without extracting anything)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nccli.errors import UsageError
from nccli.extract.devices import input_dtype, resolve_device
from nccli.extract.discovery import discover_layers
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
) -> dict[str, Any]:
    """What ``extract --layers <layers>`` would cache for this checkpoint.

    The probe is the first samples of ``data`` when given, else seeded noise shaped like
    the model's recorded input (``input_shape`` on the module, or an MLP's first linear
    layer); a convolutional model without one needs ``data``.  Image data need an
    explicit ``normalize`` (as for ``extract``); ``"normalization"`` in the result is
    what the probe applied (left out for the noise probe).  ``state_key`` picks the
    weights in a checkpoint dict (as for ``extract``); what was inferred from them
    (``num_classes``) is a note on stderr.
    """
    from nccli.io.checkpoints import load_model

    if arch is not None and model is not None:
        raise UsageError("pass either --arch or --model, not both")
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
    if data is not None:
        from nccli.io.datasets import open_dataset

        with open_dataset(data, split=split, normalize=normalize) as ds:
            print_notes(ds.require_normalize())  # image data need an explicit --normalize
            probe = next(iter(ds.iter_batches(PROBE_SAMPLES)))[0]
            preprocessing = ds.normalization
    else:
        shape = _probe_shape(module)
        if shape is None:
            raise UsageError(
                f"{path}: cannot tell the model's input shape; pass --data SPEC so nccli can "
                "run a probe batch"
            )
        # seeded noise rather than zeros: the head check compares values, and a hidden
        # relu between two linear layers is invisible on an all-zero probe
        probe = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
        preprocessing = None
    disc = discover_layers(module, probe.to(dev, input_dtype(module)), layers, source=str(path))
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
        "layers": disc.rows(),
    }
