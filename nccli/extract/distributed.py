"""Distributed extraction: one ``torchrun`` launch, disjoint shards, merged statistics.

``torchrun --nproc-per-node G -m nccli extract ...`` starts ``G`` processes whose
environment carries ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``.  :func:`detect` reads them; :func:`setup` initialises the process group
(gloo on CPU, nccl on CUDA, ``--dist-backend`` to choose) with a timeout, so that a rank
that dies or hangs makes the others fail after ``--dist-timeout`` minutes instead of
waiting forever, and puts each rank on ``cuda:LOCAL_RANK`` when the run uses CUDA.

Rank ``r`` of ``W`` extracts dataset positions ``_row_range(N, r, W)``: contiguous,
disjoint, covering every row exactly once (no padding duplicates, which would bias the
statistics), into ``<stem>.rank<r>.h5``, a complete cache of its shard with the root
attributes ``rank``, ``world_size``, ``row_start``, ``row_stop`` and ``total_samples``.
Per checkpoint (:func:`run_checkpoint`):

1. every rank writes its shard, finished but still named ``.partial``;
2. the ranks agree that all of them succeeded (one ``all_reduce``); if one failed, the
   others keep their finished ``.partial`` (``--resume`` picks it up) and raise;
3. rank 0 all-gathers every rank's :class:`~nccli.stats.ClassStats` as float64 tensors,
   merges them with the pairwise update and verifies that the shards agree (checkpoint,
   data, layers, contiguous row ranges) and that the merged class counts sum to ``N`` and
   equal the dataset's label counts; it prints the totals;
4. on rank 0's verdict every rank renames its shard into place, and they agree once more.

The shard files are the on-disk truth; ``nccli measure out/ep10.rank*.h5`` (or the
directory) reads the set as one cache and refuses an incomplete one.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nccli.errors import CacheError, DataError, UsageError
from nccli.extract.devices import BACKENDS
from nccli.io._util import one_line
from nccli.io.cache import SHARD_ATTRS, read_shard, shard_path, stale_shards
from nccli.stats import ClassStats

__all__ = [
    "BACKENDS",
    "DEFAULT_TIMEOUT_MIN",
    "Group",
    "Launch",
    "detect",
    "run_checkpoint",
    "setup",
    "shard_path",
    "stale_shards",
]

#: minutes a collective may wait for the other ranks before the run fails
DEFAULT_TIMEOUT_MIN = 30.0


@dataclass(frozen=True)
class Launch:
    """What the launcher (torchrun) told this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None


def _env_int(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key, "")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"environment variable {key}={raw!r} is not an integer; launch with torchrun"
        ) from None


def detect(env: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch this process belongs to, or ``None`` for a single process
    (no ``RANK``/``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank = _env_int(env, "RANK")
    world = _env_int(env, "WORLD_SIZE")
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    return Launch(rank, world, local, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))


def rank_device(device: torch.device, launch: Launch) -> torch.device:
    """``cuda`` (no index) → ``cuda:LOCAL_RANK``; any other device is kept."""
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise UsageError(
            f"rank {launch.rank}: LOCAL_RANK={launch.local_rank} but this node has {count} "
            "CUDA devices; start at most that many processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


class Group:
    """The process group of one distributed extraction and the collectives it needs.

    Every collective runs under the group's timeout; a timeout or a broken peer becomes
    a :class:`~nccli.errors.DataError` naming the rank that gave up.
    """

    def __init__(
        self, launch: Launch, backend: str, device: torch.device, timeout_min: float, owns: bool
    ) -> None:
        self.launch = launch
        self.rank = launch.rank
        self.world_size = launch.world_size
        self.backend = backend
        self.device = device
        self.timeout_min = timeout_min
        self.owns = owns
        # where collective tensors live: nccl needs them on this rank's GPU
        self.comm_device = device if backend == "nccl" else torch.device("cpu")

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses
            raise DataError(
                f"rank {self.rank}: {what} with the other ranks failed ({one_line(exc, 200)}); "
                f"another rank probably died or hung (timeout {self.timeout_min:g} min, "
                "--dist-timeout); see the other ranks' errors"
            ) from exc

    def failed_ranks(self, ok: bool) -> list[int]:
        """All-reduce one flag per rank; the ranks that reported failure."""
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.comm_device)
        flags[self.rank] = 0 if ok else 1
        self._collective("agreeing", lambda: dist.all_reduce(flags))
        return [int(r) for r in torch.nonzero(flags.cpu()).reshape(-1)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective("exchanging shard metadata", lambda: dist.all_gather_object(out, obj))
        return out

    def all_gather_stats(self, st: ClassStats) -> list[ClassStats]:
        """Every rank's statistics of one layer, as float64 tensors (rank order)."""
        import torch.distributed as dist

        flat = st.flatten().to(self.comm_device)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        self._collective("gathering statistics", lambda: dist.all_gather(parts, flat))
        return [
            ClassStats.unflatten(t, st.num_classes, st.dim, source=f"rank {r}: {st.source}")
            for r, t in enumerate(parts)
        ]

    def close(self) -> None:
        """Tear the process group down if :func:`setup` created it."""
        import torch.distributed as dist

        if self.owns and dist.is_initialized():
            dist.destroy_process_group()


def _backend(name: str | None, device: torch.device) -> str:
    import torch.distributed as dist

    choice = (name or "auto").lower()
    if choice not in BACKENDS:
        raise UsageError(f"--dist-backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        choice = "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl":
        if device.type != "cuda":
            raise UsageError(
                f"--dist-backend nccl needs CUDA devices (this run uses {device}); "
                "use --dist-backend gloo"
            )
        if not dist.is_nccl_available():
            raise UsageError("--dist-backend nccl: this torch build has no NCCL; use gloo")
    if choice == "gloo" and not dist.is_gloo_available():
        raise UsageError("--dist-backend gloo: this torch build has no gloo backend")
    return choice


def setup(
    launch: Launch,
    device: torch.device,
    backend: str | None = "auto",
    timeout_min: float = DEFAULT_TIMEOUT_MIN,
) -> Group:
    """Join (or reuse) the process group of ``launch``; this rank's device and backend."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is always built with it on Linux/macOS
        dist = None
    if dist is None or not dist.is_available():
        raise UsageError(
            f"WORLD_SIZE={launch.world_size}: this torch build has no torch.distributed; "
            "run nccli extract as a single process"
        )
    if not timeout_min > 0:
        raise UsageError(f"--dist-timeout must be a positive number of minutes, got {timeout_min}")
    device = rank_device(device, launch)
    name = _backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a caller's own process group: use it as it is
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise UsageError(
                f"the process group is rank {dist.get_rank()} of {dist.get_world_size()} but "
                f"the environment says rank {launch.rank} of {launch.world_size}"
            )
        return Group(launch, str(dist.get_backend()), device, timeout_min, owns=False)
    if not launch.master_addr or not launch.master_port:
        raise UsageError(
            f"rank {launch.rank} of {launch.world_size}: MASTER_ADDR and MASTER_PORT must be "
            "set; launch with torchrun (it sets them) or export them"
        )
    try:
        dist.init_process_group(
            backend=name,
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=_dt.timedelta(minutes=timeout_min),
        )
    except Exception as exc:  # noqa: BLE001 - rendezvous errors come in many types
        raise DataError(
            f"rank {launch.rank}: cannot join the process group at "
            f"{launch.master_addr}:{launch.master_port} ({one_line(exc, 200)}); check that "
            "every node uses the same --master-addr/--master-port and can reach it"
        ) from exc
    return Group(launch, name, device, timeout_min, owns=True)


# --------------------------------------------------------------------------- per checkpoint


def _check_meta(metas: Sequence[dict[str, Any]], total: int) -> str | None:
    """Why the shards do not form one extraction (``None`` when they do)."""
    first = metas[0]
    for key in ("checkpoint_sha256", "dataset_digest", "feature_dtype", "layers"):
        for r, m in enumerate(metas):
            if m.get(key) != first.get(key):
                return (
                    f"rank {r} has a different {key} than rank 0 (the ranks must read the same "
                    "checkpoint and data)"
                )
    expect = 0
    for r, m in enumerate(metas):
        if (m.get("rank"), m.get("world_size")) != (r, len(metas)):
            return f"rank {r}'s shard says rank {m.get('rank')} of {m.get('world_size')}"
        if m.get("row_start") != expect or m.get("total_samples") != total:
            return (
                f"rank {r}'s shard starts at row {m.get('row_start')} of "
                f"{m.get('total_samples')}, expected {expect} of {total}"
            )
        if m.get("row_stop", -1) - m.get("row_start", 0) != m.get("rows_read"):
            return f"rank {r}'s shard read {m.get('rows_read')} rows, not its row range"
        expect = int(m.get("row_stop", -1))
    if expect != total:
        return f"the shards cover rows 0..{expect}, not all {total}"
    return None


def _shard_meta(attrs: dict[str, Any], stats: dict[str, ClassStats]) -> dict[str, Any]:
    """What rank 0 needs to know of a rank's shard to check the set."""
    meta = {k: attrs.get(k) for k in (*SHARD_ATTRS, "num_samples", "checkpoint_sha256")}
    meta["dataset_digest"] = attrs.get("dataset_digest")
    meta["feature_dtype"] = attrs.get("feature_dtype")
    meta["layers"] = [(n, s.num_classes, s.dim) for n, s in stats.items()]
    # --skip-nonfinite: rows read can exceed the samples kept; the dropped ones per class
    meta["rows_read"] = attrs.get("rows_read", attrs.get("num_samples"))
    skipped = attrs.get("skipped_nonfinite")
    meta["skipped"] = None if skipped is None else np.asarray(skipped, dtype=np.int64).tolist()
    return meta


def _merge(group: Group, stats: dict[str, ClassStats]) -> dict[str, ClassStats]:
    """Every rank's statistics, gathered and merged on rank 0 (empty on the others)."""
    merged: dict[str, ClassStats] = {}
    for name, st in stats.items():
        parts = group.all_gather_stats(st)
        if group.rank == 0:
            acc = parts[0].copy()
            for p in parts[1:]:
                acc.merge(p)
            merged[name] = acc
    return merged


def _check_counts(
    merged: dict[str, ClassStats], metas: Sequence[dict[str, Any]], labels: np.ndarray
) -> tuple[str | None, int]:
    """Rank 0: do the merged class counts equal the dataset's labels, less the samples
    dropped as non-finite?  ``(problem or None, dropped)``."""
    total = int(len(labels))
    K = next(iter(merged.values())).num_classes if merged else 0
    want = np.bincount(np.asarray(labels, dtype=np.int64), minlength=K)
    for m in metas:
        if m["skipped"] is not None:
            want = want - np.asarray(m["skipped"], dtype=np.int64)[:K]
    dropped = total - int(want.sum())
    for name, st in merged.items():
        if st.n != total - dropped or not np.array_equal(st.counts, want):
            return (
                f"layer {name}: the merged class counts sum to {st.n} (dataset: {total}"
                f"{f', {dropped} dropped as non-finite' if dropped else ''}) or differ "
                "from the dataset's label counts"
            ), dropped
    return None, dropped


def _merged_line(
    out_path: Path, W: int, merged: dict[str, ClassStats], total: int, dropped: int
) -> str:
    first = next(iter(merged.values()))
    counts = first.counts
    layers = ", ".join(f"{n} (d={s.dim})" for n, s in merged.items())
    rows = f"the dataset's {total} rows" + (
        f" less {dropped} non-finite samples" if dropped else ""
    )
    return (
        f"{shard_path(out_path, 0).name.replace('.rank0', '.rank*')}: merged {W} shards, "
        f"{first.n} samples = {rows}, {first.num_classes} classes "
        f"(counts {int(counts.min())}..{int(counts.max())} per class, as in the labels); "
        f"layers {layers}"
    )


def _publish(group: Group, got: Path, path: Path, ckpt: Path) -> None:
    """Every rank renames its finished shard into place; they agree it worked."""
    error = None
    if got.name.endswith(".partial"):
        try:
            os.replace(got, path)
        except OSError as exc:
            error = exc
    failed = group.failed_ranks(error is None)
    if error is not None:
        raise DataError(f"{got}: cannot rename the finished shard to {path} ({error})")
    if failed:
        raise DataError(
            f"{ckpt}: rank(s) {', '.join(map(str, failed))} could not publish their shard; "
            "run the same command with --resume"
        )


def _write_shard(
    group: Group, one: Callable[[Path], Path], path: Path, ckpt: Path
) -> tuple[Path, dict[str, Any], dict[str, ClassStats]]:
    """This rank writes its shard; every rank learns whether all of them succeeded."""
    error: Exception | None = None
    got = path
    attrs: dict[str, Any] = {}
    stats: dict[str, ClassStats] = {}
    try:
        got = one(path)
        attrs, stats = read_shard(got)
    except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
        error = exc
    failed = group.failed_ranks(error is None)
    if error is not None:
        raise error
    if failed:
        kept = (
            f"; this rank's finished shard is kept as {got}"
            if got.name.endswith(".partial")
            else ""
        )
        raise DataError(
            f"{ckpt}: rank(s) {', '.join(map(str, failed))} of {group.world_size} failed (see "
            f"their errors){kept}; fix the cause and run the same command with --resume"
        )
    return got, attrs, stats


def run_checkpoint(
    group: Group,
    one: Callable[[Path], Path],
    ckpt: Path,
    out_path: Path,
    labels: np.ndarray,
    say: Callable[[str], None],
) -> Path:
    """Extract this rank's shard of ``ckpt``, then agree, merge, verify and publish.

    ``one(path)`` writes the shard and returns the finished ``.partial`` (or the
    published path when a finished shard was already there).  ``labels`` are the
    dataset's labels (rank 0 checks the merged counts against them); ``say`` prints a
    line on rank 0.  Returns this rank's shard path.
    """
    path = shard_path(out_path, group.rank)
    W = group.world_size
    got, attrs, stats = _write_shard(group, one, path, ckpt)
    metas = group.all_gather_object(_shard_meta(attrs, stats))
    total = int(len(labels))
    problem = _check_meta(metas, total)
    merged = _merge(group, stats) if problem is None else {}
    dropped = 0
    if group.rank == 0 and problem is None:
        problem, dropped = _check_counts(merged, metas, labels)
    rejected = group.failed_ranks(problem is None)
    if rejected:
        why = problem or "rank 0 rejected the merged statistics (see its error)"
        raise CacheError(
            f"{ckpt}: the {W} shards do not form one extraction: {why}; new shards stay "
            "unpublished (.partial); delete them and extract again"
        )
    if group.rank == 0:
        say(_merged_line(out_path, W, merged, total, dropped))
    _publish(group, got, path, ckpt)
    stale = stale_shards(out_path, W) if group.rank == 0 else []
    if stale:
        say(
            f"{', '.join(q.name for q in stale)}: left by an earlier run with more ranks; "
            f"delete them (measure refuses a directory that mixes the two runs' shards)"
        )
    return path
