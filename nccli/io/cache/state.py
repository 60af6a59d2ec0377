"""What is already on disk for an extraction: finished caches, resumable partials, shards.

``extract`` asks this module before it writes: does a finished cache of the same
checkpoint and data exist (skip it), may an unfinished ``.partial`` be resumed, and, for
a ``torchrun`` extraction, which shard files belong together.  ``measure`` asks it
whether a set of ``<name>.rank<r>.h5`` files forms one complete extraction.  ``want``
arguments are root attributes the file must carry (``checkpoint_sha256``,
``dataset_digest``, ``feature_dtype``, the shard attributes …).  The digest of the
inputs' values (``dataset_content_sha256``, and the per-block record a partial keeps so
that ``--resume`` can check the rows it holds) is compared by the caller, which hashes
the data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import CacheError, UsageError
from nccli.io._util import one_line
from nccli.io.cache.elements import layer_record, read_stats
from nccli.io.cache.encoding import read_attr
from nccli.io.cache.reader import Cache, is_cache
from nccli.io.h5safe import open_input
from nccli.layers import show_classifier_input
from nccli.stats import ClassStats

__all__ = [
    "INPUT_ATTRS",
    "SHARD",
    "SHARD_ATTRS",
    "check_shard_files",
    "check_shard_set",
    "describe",
    "existing_matches",
    "inputs_record",
    "partial_resumable",
    "read_shard",
    "record_inputs",
    "shard_path",
    "stale_shards",
]

#: ``<base>.rank<r>.h5``: one rank's shard of a distributed extraction
SHARD = re.compile(r"^(?P<base>.+)\.rank(?P<rank>\d+)\.h5$")
#: the root attributes every shard carries
SHARD_ATTRS = ("rank", "world_size", "row_start", "row_stop", "total_samples")
#: the root attributes recording the digests of the inputs read so far (blocks of
#: ``dataset_block_rows`` rows; the first ``dataset_hashed_rows`` rows are covered)
INPUT_ATTRS = ("dataset_block_rows", "dataset_hashed_rows", "dataset_block_sha256")


def _differs(attrs: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    return [k for k, v in want.items() if attrs.get(k) != v]


def existing_matches(path: Path, want: Mapping[str, Any]) -> dict[str, Any] | None:
    """The root attributes of ``path`` when it is a finished cache made from ``want`` (a
    candidate for skipping: the caller still compares ``dataset_content_sha256``); None
    when there is no file; a UsageError when it is something else or was made
    differently."""
    if not path.exists():
        return None
    if not is_cache(path):
        raise UsageError(
            f"{path}: exists and is not an nccli cache; remove it, choose another -o, or pass "
            "--overwrite"
        )
    try:
        with Cache(path) as c:
            attrs = c.attrs
    except CacheError as exc:
        raise UsageError(f"{exc}; or pass --overwrite to replace it") from None
    diff = _differs(attrs, want)
    if diff:
        raise UsageError(
            f"{path}: exists but was made from a different {', '.join(diff)}; pass --overwrite "
            "to replace it"
        )
    return attrs


def partial_resumable(
    tmp: Path, want: Mapping[str, Any], layers: Sequence[str]
) -> dict[str, Any] | None:
    """The root attributes of the unfinished ``tmp`` when it can be resumed; None when it
    is unreadable (killed mid-flush: start over), a CacheError when it belongs to another
    run.  Whether its rows still match the inputs is checked by the caller
    (:func:`inputs_record`)."""
    try:
        f = open_input(tmp, "partial cache", error=CacheError)
    except OSError:
        return None
    try:
        attrs = {k: read_attr(f, k) for k in f.attrs}
        have = sorted(f["layers"]) if "layers" in f else []
    except (OSError, KeyError, ValueError):
        return None
    finally:
        f.close()
    diff = _differs(attrs, want)
    if have != sorted(layers):
        diff.append("layers")
    if diff:
        raise CacheError(
            f"{tmp}: cannot resume: the partial cache was made with a different "
            f"{', '.join(diff)}; delete it or run without --resume"
        )
    return attrs


def record_inputs(h5: Any, block_rows: int, hashed_rows: int, blocks: np.ndarray) -> None:
    """Record in an open partial the digests of its first ``hashed_rows`` inputs, in
    blocks of ``block_rows`` (call it before the rows are written: their write flushes
    both)."""
    h5.attrs["dataset_block_rows"] = int(block_rows)
    h5.attrs["dataset_hashed_rows"] = int(hashed_rows)
    h5.attrs["dataset_block_sha256"] = np.ascontiguousarray(blocks, dtype=np.uint8)


def inputs_record(attrs: Mapping[str, Any]) -> tuple[int, int, np.ndarray] | None:
    """``(block_rows, hashed_rows, blocks)`` recorded in a partial's attributes, or None
    when it has no (usable) record (written by an older nccli, or damaged)."""
    block, rows, blocks = (attrs.get(k) for k in INPUT_ATTRS)
    if not isinstance(block, int) or not isinstance(rows, int) or block < 1 or rows < 0:
        return None
    blocks = np.asarray(blocks) if blocks is not None else None
    if blocks is None or blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != 32:
        return None
    if -(-rows // block) > blocks.shape[0]:
        return None
    return block, rows, blocks


# --------------------------------------------------------------------- shards
def shard_path(path: str | os.PathLike[str], rank: int) -> Path:
    """``out/ep10.h5`` → ``out/ep10.rank<rank>.h5``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def stale_shards(out_path: Path, world_size: int) -> list[Path]:
    """Shard files of ``out_path`` from a run with more ranks than this one."""
    pat = f"{out_path.stem}.rank*{out_path.suffix}"
    stale = []
    for p in sorted(out_path.parent.glob(pat)):
        tail = p.name[len(out_path.stem) + len(".rank") : -len(out_path.suffix) or None]
        if tail.isdigit() and int(tail) >= world_size:
            stale.append(p)
    return stale


def read_shard(path: Path) -> tuple[dict[str, Any], dict[str, ClassStats]]:
    """Root attributes and per-layer statistics of a finished shard (published or not)."""
    with open_input(path, "cache shard", error=CacheError) as f:
        attrs = {k: read_attr(f, k) for k in f.attrs}
        K = int(attrs.get("num_classes", -1))
        groups = sorted(
            f["layers"].items(),
            key=lambda kv: (
                int(read_attr(kv[1], "depth", 0)) < 0,
                int(read_attr(kv[1], "depth", 0)),
            ),
        )
        stats = {
            name: read_stats(g, str(path), K, int(read_attr(g, "dim", -1))) for name, g in groups
        }
    return attrs, stats


def _names(caches: Sequence[Cache]) -> str:
    return ", ".join(str(c.path) for c in caches)


def check_shard_files(paths: Sequence[Path]) -> None:
    """Refuse files named ``<name>.rank<r>.h5`` that are not the shards of one run (their
    attributes decide, not their names): each must carry the shard attributes, its rank
    must be the one in its name, and the set must pass :func:`check_shard_set`.
    ``paths`` are in the rank order of their names."""
    caches: list[Cache] = []
    try:
        for p in paths:
            caches.append(Cache(p))
        plain = [c for c in caches if not all(k in c.attrs for k in SHARD_ATTRS)]
        if plain:
            raise CacheError(
                f"{_names(caches)}: named as the shards of one distributed extraction, but "
                f"{_names(plain)} {'has' if len(plain) == 1 else 'have'} no shard attributes "
                "(rank, world_size, ...): written by single-process runs, maybe of other "
                "checkpoints; refusing to merge them: rename the files to measure each alone"
            )
        for p, c in zip(paths, caches, strict=True):
            m = SHARD.match(Path(p).name)
            if m is not None and int(m.group("rank")) != c.attrs.get("rank"):
                raise CacheError(
                    f"{_names(caches)}: {c.path} is named rank {int(m.group('rank'))} but is "
                    f"rank {c.attrs.get('rank')} of its run; the files were renamed: restore "
                    "their names or re-extract"
                )
        first = Path(paths[0])
        check_shard_set(caches, str(first.with_name(SHARD.sub(r"\g<base>.h5", first.name))))
    finally:
        for c in caches:
            c.close()


def check_shard_set(caches: Sequence[Cache], name: str) -> None:
    """The shards of one distributed extraction, all of them, covering every row once.

    Each shard records ``rank``, ``world_size``, ``row_start``, ``row_stop`` and
    ``total_samples``; ``caches`` are in rank order.  Every refusal names the files.
    """
    first = caches[0].attrs
    W = first.get("world_size")
    ranks = [c.attrs.get("rank") for c in caches]
    if not isinstance(W, int) or ranks != list(range(W)):
        missing = sorted(set(range(W)) - set(ranks)) if isinstance(W, int) else []
        what = (
            f"rank(s) {', '.join(map(str, missing))} of {W} missing"
            if missing and all(isinstance(r, int) and r < W for r in ranks)
            else f"ranks {ranks} do not form 0..{W - 1 if isinstance(W, int) else '?'}"
        )
        raise CacheError(
            f"{name} ({_names(caches)}): incomplete shard set ({what}); pass every "
            "<name>.rank<r>.h5 of one "
            "run, finish an interrupted run with `nccli extract --resume` under the same "
            "torchrun command, or delete shards left by a run with another world size"
        )
    expect = 0
    for c in caches:
        a = c.attrs
        for key in (
            "world_size",
            "total_samples",
            "checkpoint_sha256",
            "dataset_digest",
            "feature_dtype",
        ):
            if a.get(key) != first.get(key):
                raise CacheError(
                    f"{c.path}: shard has a different {key} than {caches[0].path}; the files "
                    "come from different extractions, refusing to merge them"
                )
        # rows read: more than the samples kept when --skip-nonfinite dropped some
        read = a.get("rows_read", c.num_samples)
        if a.get("row_start") != expect or a.get("row_stop", -1) - expect != read:
            raise CacheError(
                f"{c.path}: shard covers rows {a.get('row_start')}..{a.get('row_stop')} "
                f"with {read} rows read, expected to start at row {expect}"
            )
        expect = int(a["row_stop"])
    if expect != first.get("total_samples"):
        raise CacheError(
            f"{name}: the shards cover {expect} of {first.get('total_samples')} rows; re-extract"
        )


# ------------------------------------------------------------------- describe
def _layer_row(g: Any) -> dict[str, Any]:
    """``nccli info``'s row of a layer group: its record, the stored dtype and shapes."""
    row = layer_record(g).row()
    row["dtype"] = str(g["features"].dtype) if "features" in g else None
    row["weight"] = list(g["weight"].shape) if "weight" in g else None
    row["bias"] = "bias" in g
    row["stats"] = "stats" in g
    return row


def _shown(attrs: dict[str, Any]) -> dict[str, Any]:
    """Root attributes for ``nccli info``: the table of block digests as one short line."""
    blocks = attrs.get("dataset_block_sha256")
    if blocks is not None:
        n = int(np.asarray(blocks).shape[0]) if np.ndim(blocks) else 0
        attrs["dataset_block_sha256"] = f"<SHA-256 of {n} input block{'s' * (n != 1)}>"
    return attrs


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes and layer layout of a cache (or of an unfinished ``.partial``)."""
    p = Path(path)
    if p.name.endswith(".partial"):
        try:
            f = open_input(p, "partial cache", error=CacheError)
        except OSError as exc:
            raise CacheError(f"{p}: not a readable HDF5 file ({one_line(exc)})") from None
        with f:
            attrs = {k: read_attr(f, k) for k in f.attrs}
            layers = show_classifier_input(
                [_layer_row(g) for g in (f["layers"].values() if "layers" in f else [])]
            )
        return {"path": str(p), "complete": False, "attrs": _shown(attrs), "layers": layers}
    with Cache(p) as c:
        rows = show_classifier_input([_layer_row(c.h5[f"layers/{name}"]) for name in c.layers])
        return {"path": str(p), "complete": True, "attrs": _shown(c.attrs), "layers": rows}
