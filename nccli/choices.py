"""The command line's enum choices, importable without torch or pandas.

``nccli --version``, ``measure``, ``compare``, ``info`` and ``metrics`` build their options
from these, so the CLI starts without the extraction machinery (docs/performance.md,
"Start-up").  Each is re-exported where it is used: ``Device``, ``Amp``, ``FeatureDtype``
and ``DistBackend`` by :mod:`nccli.extract.devices`, ``Pool`` by
:mod:`nccli.extract.pooling`, ``Loss`` and ``ReportKind`` by :mod:`nccli.analyses`, ``Fit``
by :mod:`nccli.compare.depth`, ``Across``, ``By`` and ``RunFrom`` by :mod:`nccli.compare`,
``OutputFormat`` by :mod:`nccli.report`; ``Precision`` is the scatter's arithmetic
(:class:`nccli.stats.ClassStats`).
"""

from __future__ import annotations

import enum

__all__ = [
    "Across",
    "By",
    "OutputFormat",
    "RunFrom",
    "Amp",
    "Device",
    "DistBackend",
    "FeatureDtype",
    "Fit",
    "Loss",
    "Pool",
    "Precision",
    "ReportKind",
]


class Device(str, enum.Enum):
    """``--device``: where ``extract`` runs the forward pass (auto = cuda, then mps, then cpu)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Amp(str, enum.Enum):
    """``--amp``: mixed precision for the forward pass (CUDA only)."""

    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class FeatureDtype(str, enum.Enum):
    """``--dtype``: storage dtype of cached features (statistics are always float64)."""

    float32 = "float32"
    float16 = "float16"


class DistBackend(str, enum.Enum):
    """``--dist-backend``: process-group backend of a torchrun extraction
    (auto = nccl on CUDA, gloo otherwise)."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Pool(str, enum.Enum):
    """``--pool``: how a feature map ``(B, C, H, W, ...)`` becomes one vector per sample."""

    avg = "avg"
    max = "max"
    flatten = "flatten"


class Loss(str, enum.Enum):
    """``--loss``: the training loss of the run."""

    ce = "ce"
    mse = "mse"


class ReportKind(str, enum.Enum):
    """``measure --report``: an analysis shown instead of the metric table."""

    theory = "theory"


class Fit(str, enum.Enum):
    """``--fit`` choices."""

    depth = "depth"


class Precision(str, enum.Enum):
    """``--precision``: the arithmetic of the within-class scatter's matrix product.

    ``exact``: float64 products and sums (the default).  ``fast``: the rows, centred in
    float64, are rounded to float32 and multiplied in float32 blocks, the blocks summed in
    float64 (docs/metrics.md, "Precision of the scatter")."""

    exact = "exact"
    fast = "fast"


class Across(str, enum.Enum):
    """``--across`` choices."""

    epochs = "epochs"
    layers = "layers"
    runs = "runs"


class By(str, enum.Enum):
    """``--by`` choices: ``run`` side by side, or ``split`` (train beside held-out splits:
    the generalisation gap, ``delta_<m>`` = held-out − train)."""

    run = "run"
    split = "split"


class RunFrom(str, enum.Enum):
    """``--run-from`` choices: how a checkpoint's run name is found."""

    auto = "auto"
    dir = "dir"
    stem = "stem"


class OutputFormat(str, enum.Enum):
    """``--format`` choices."""

    table = "table"
    csv = "csv"
    tsv = "tsv"
    json = "json"
