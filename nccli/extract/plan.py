"""The memory plan of an extraction, made from the probe before any pass (``--max-memory``).

Per layer of ``d`` features (after pooling), ``K`` classes, ``N`` samples, batches of
``B`` rows (bytes):

- features on disk: ``N·d·item`` (item 4 for float32, 2 for float16 storage);
- statistics, held for the whole pass: ``8·(d² + K·d + 2K)`` (the float64 d×d scatter,
  the class means, counts and sums of squares, :class:`~nccli.stats.ClassStats`);
- one update's temporaries: ``8·(d² + 4·B·d + 6·K_b·d)`` with ``K_b = min(B, K)`` the
  classes a batch can hold (the batch's float64 copy and its centred rows, the d×d Gram
  matrix of :func:`nccli.stats._gram` before it is added, the present classes' means and
  their deltas), plus ``16·K`` when ``K ≤ 4B`` (the labels are counted, not sorted); one
  layer is updated at a time, and writing the
  statistics makes one symmetrised d×d copy, which is smaller;
- rows in flight to the writer thread: ``(WRITE_QUEUE + 2)·B·d·item``.

A language model (:mod:`nccli.extract.language`) is planned the same way with ``K`` the
vocabulary (50,257 for GPT-2: 0.3 GB of float64 means at d = 768; an update touches only
the tokens it holds; nothing is K×K) and ``B`` the rows of one statistics update (the token
positions of several forwards, pooled: :func:`nccli.extract.batching.update_rows`); without
``--store-features`` it writes no features, so both the disk and the queue terms are 0.

The planned peak is all statistics + the largest update's temporaries + the rows in
flight; it counts what nccli allocates, not the model or its activations.  Over the limit
— by default half of the memory available where the statistics live (``MemAvailable`` of
``/proc/meminfo`` on Linux, else the physical memory; the GPU's free memory when they
accumulate on CUDA), else ``--max-memory SIZE`` (``none``: no limit) — ``extract``
refuses in one line naming the layer, its d and the pooled alternative, before any
allocation or file.  (Free disk space for the features is checked by the cache writer,
:meth:`nccli.io.cache.CacheWriter._check_space`, before a row is written.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from nccli.errors import DataError
from nccli.extract.pipeline import WRITE_QUEUE
from nccli.extract.pooling import shape_text
from nccli.sizes import format_bytes, meminfo_available, parse_size

__all__ = [
    "DEFAULT_FRACTION",
    "LayerCost",
    "Plan",
    "check_plan",
    "format_bytes",
    "make_plan",
    "memory_limit",
    "parse_size",
]

#: the share of the available memory the plan may use unless ``--max-memory`` is given
DEFAULT_FRACTION = 0.5


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs: ``shape`` is its module's per-sample output before pooling."""

    name: str
    shape: tuple[int, ...]
    pool: str
    dim: int
    feature_bytes: int
    stats_bytes: int
    update_bytes: int
    queue_bytes: int

    def row(self) -> dict[str, Any]:
        """The plan columns of ``nccli info``'s layer rows."""
        return {
            "shape": list(self.shape),
            "feature_bytes": self.feature_bytes or None,
            "stats_bytes": self.stats_bytes,
        }


@dataclass(frozen=True)
class Plan:
    layers: list[LayerCost]
    num_samples: int | None
    num_classes: int

    @property
    def feature_bytes(self) -> int:
        return sum(c.feature_bytes for c in self.layers)

    @property
    def stats_bytes(self) -> int:
        return sum(c.stats_bytes for c in self.layers)

    @property
    def peak_bytes(self) -> int:
        """All statistics, the largest update's temporaries and the rows in flight."""
        update = max((c.update_bytes for c in self.layers), default=0)
        return self.stats_bytes + update + sum(c.queue_bytes for c in self.layers)


def make_plan(
    disc: Any,
    num_samples: int | None,
    batch_size: int,
    feature_dtype: str = "float32",
    store_features: bool = True,
) -> Plan:
    """The costs of ``disc``'s layers (a :class:`~nccli.extract.discovery.Discovery`, or
    anything with ``layers``, ``num_logits`` and ``shapes``) for ``num_samples`` rows
    (``None``: unknown, no feature bytes) in updates of ``batch_size`` rows.
    ``store_features=False`` (a language model's statistics-only cache): no feature bytes
    on disk and no rows queued for the writer."""
    K, B = int(disc.num_logits), int(batch_size)
    item = (2 if feature_dtype == "float16" else 4) if store_features else 0
    costs = []
    for layer in disc.layers:
        d = int(layer.dim)
        costs.append(
            LayerCost(
                name=layer.name,
                shape=tuple(disc.shapes.get(layer.name, (d,))),
                pool=layer.pool,
                dim=d,
                feature_bytes=(num_samples or 0) * d * item,
                stats_bytes=8 * (d * d + K * d + 2 * K),
                update_bytes=8 * (d * d + 4 * B * d + 6 * min(B, K) * d) + 16 * K * (K <= 4 * B),
                queue_bytes=(WRITE_QUEUE + 2) * B * d * item,
            )
        )
    return Plan(costs, num_samples, K)


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """Bytes available where the statistics live, and what was measured."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    avail = meminfo_available()
    if avail is not None:
        return avail, "available"
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "of memory"
    except (ValueError, OSError, AttributeError):
        return 32 << 30, "assumed"


def memory_limit(max_memory: str | int | float | None, device: Any = "cpu") -> tuple[float, str]:
    """``(limit in bytes, how it was set)``: ``--max-memory`` as given (``inf`` for
    ``none``), else :data:`DEFAULT_FRACTION` of :func:`available_memory`."""
    given = parse_size(max_memory)
    if given is not None:
        return given, "--max-memory"
    avail, what = available_memory(device)
    return avail * DEFAULT_FRACTION, (
        f"half the {format_bytes(avail)} {what}; --max-memory SIZE to change"
    )


def _fix(c: LayerCost) -> str:
    if c.pool == "flatten" and len(c.shape) >= 3:
        return f"use --pool avg ({c.shape[0]} features) or raise --max-memory"
    return "select another layer with --layers or raise --max-memory"


def _how(c: LayerCost) -> str:
    if c.pool == "none" or len(c.shape) < 2:
        return ""
    verb = "flattened" if c.pool == "flatten" else f"{c.pool}-pooled from"
    return f" ({verb} {shape_text(c.shape)})"


def check_plan(plan: Plan, limit: float, how: str, source: str) -> None:
    """A DataError (one line) when ``plan``'s peak is over ``limit`` bytes: the layer that
    alone goes over, else all of them together."""
    if plan.peak_bytes <= limit:
        return
    where = f"over the {format_bytes(limit)} limit ({how})"
    worst = max(plan.layers, key=lambda c: c.stats_bytes + c.update_bytes + c.queue_bytes)
    alone = worst.stats_bytes + worst.update_bytes + worst.queue_bytes
    if alone > limit:
        raise DataError(
            f"{source}: layer {worst.name} gives {worst.dim} features per sample{_how(worst)}: "
            f"its statistics need {format_bytes(alone)} at peak (a {format_bytes(8 * worst.dim**2)} "
            f"d×d scatter and its per-batch update), {where}; {_fix(worst)}"
        )
    raise DataError(
        f"{source}: the {len(plan.layers)} layers' statistics need "
        f"{format_bytes(plan.peak_bytes)} at peak together (largest: {worst.name}, "
        f"{worst.dim} features{_how(worst)}, {format_bytes(alone)}), {where}; select fewer "
        "layers with --layers or raise --max-memory"
    )
