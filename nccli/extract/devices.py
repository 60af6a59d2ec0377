"""Where the forward pass runs and in which precision: the choices and their checks.

The CLI's ``--device``, ``--amp``, ``--dtype`` and ``--dist-backend`` enums are these
(one definition: the library and the command line cannot drift apart).
"""

from __future__ import annotations

import torch
from torch import nn

from nccli.choices import Amp, Device, DistBackend, FeatureDtype
from nccli.errors import UsageError

__all__ = [
    "AMP_DTYPES",
    "DEVICES",
    "FEATURE_DTYPES",
    "Amp",
    "Device",
    "DistBackend",
    "FeatureDtype",
    "device_label",
    "input_dtype",
    "resolve_device",
    "stats_device",
]


DEVICES = tuple(d.value for d in Device)
AMP_DTYPES: dict[str, torch.dtype | None] = {
    Amp.off.value: None,
    Amp.bf16.value: torch.bfloat16,
    Amp.fp16.value: torch.float16,
}
FEATURE_DTYPES: dict[str, torch.dtype] = {
    FeatureDtype.float32.value: torch.float32,
    FeatureDtype.float16.value: torch.float16,
}
BACKENDS = tuple(b.value for b in DistBackend)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda, then mps, then cpu; an unavailable explicit choice is a UsageError."""
    name = str(getattr(device, "value", device)).lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
            "use --device cpu or auto"
        )
    if name == "mps" and not has_mps:
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(name)


def device_label(dev: torch.device) -> str:
    """The device as recorded in a cache (with the GPU's name on CUDA)."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def stats_device(dev: torch.device) -> torch.device:
    """Where :class:`~nccli.stats.ClassStats` accumulate: on the GPU when the forward runs
    there (batches never leave it), else on the CPU (MPS has no float64)."""
    return dev if dev.type == "cuda" else torch.device("cpu")


def input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (inputs are cast to it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
