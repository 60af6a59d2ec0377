"""The tracker under ``torch.distributed``: each rank's shard, merged statistics.

When a process group is initialised, every rank runs the same observation over its own
shard of the data; :func:`merge` all-gathers each layer's
:meth:`~nccli.stats.ClassStats.flatten` (on the GPU for nccl, on the CPU for gloo) and
folds the parts in rank order with the pairwise update, so every rank holds the same
merged statistics.  Rank 0 writes the run file and :func:`agree` tells the other ranks
whether it could.  A ``DistributedSampler`` that pads its shards with repeated samples
(``drop_last=False`` and a dataset size not divisible by the world size) would count
those samples twice: :func:`check_sampler` refuses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nccli.errors import DataError
from nccli.io._util import one_line
from nccli.stats import ClassStats

__all__ = ["agree", "check_sampler", "gather_rows", "merge", "world"]


def world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialised process group of more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def check_sampler(loader: Any) -> None:
    """Refuse a loader whose ``DistributedSampler`` repeats samples to even the shards."""
    from torch.utils.data.distributed import DistributedSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    for s in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(s, DistributedSampler) and not s.drop_last:
            n = len(s.dataset)  # type: ignore[arg-type]
            if s.total_size != n:
                raise DataError(
                    f"the loader's DistributedSampler pads {n} samples to {s.total_size} by "
                    "repeating some, which would count them twice in the statistics; use "
                    "drop_last=True, a dataset size divisible by the world size, or a sampler "
                    "with disjoint shards"
                )


def _collective(what: str, fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses
        raise DataError(
            f"tracker: {what} with the other ranks failed ({one_line(exc, 200)}); another "
            "rank probably died or raised; see its error"
        ) from exc


def merge(stats: dict[str, ClassStats]) -> dict[str, ClassStats]:
    """Every rank's statistics of each layer, merged in rank order (on every rank)."""
    import torch.distributed as dist

    layout = [(name, st.num_classes, st.dim) for name, st in stats.items()]
    layouts: list[Any] = [None] * dist.get_world_size()
    _collective("comparing layers", lambda: dist.all_gather_object(layouts, layout))
    for r, other in enumerate(layouts):
        if other != layout:
            raise DataError(
                f"tracker: rank {r} tracks layers {other}, rank {dist.get_rank()} {layout}; "
                "every rank must track the same model"
            )
    out: dict[str, ClassStats] = {}
    for name, st in stats.items():
        on = st.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flat = st.flatten().to(on)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        _collective("gathering statistics", lambda f=flat, p=parts: dist.all_gather(p, f))
        got = [
            ClassStats.unflatten(t, st.num_classes, st.dim, source=f"rank {r}: {st.source}")
            for r, t in enumerate(parts)
        ]
        acc = got[0]
        for part in got[1:]:
            acc.merge(part)
        out[name] = acc.to(st.device)
    return out


def gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Rank 0: every rank's rows concatenated in rank order (None on the others)."""
    import torch.distributed as dist

    got: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    _collective(
        "gathering features",
        lambda: dist.gather_object(arrays, got if dist.get_rank() == 0 else None, dst=0),
    )
    if dist.get_rank() != 0:
        return None
    return {k: np.concatenate([g[k] for g in got]) for k in arrays}


def agree(ok: bool, what: str) -> None:
    """Every rank learns whether rank 0 succeeded at ``what``; the others raise if not."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    _collective("agreeing", lambda: dist.broadcast(flag, src=0))
    if not int(flag.item()) and dist.get_rank() != 0:
        raise DataError(f"tracker: rank 0 failed {what}; see its error")
