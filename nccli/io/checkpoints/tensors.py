"""safetensors files: 8-byte little-endian header length, a JSON header, then raw tensors.

The header and every tensor's data offsets are bounds-checked before the ``safetensors``
package allocates anything, so a truncated or hostile file fails with its name: the
offsets must be integers inside the data section that tile it exactly, and no JSON key
may repeat (Python's ``json`` keeps the last copy, another reader might keep the first).  The
header's ``__metadata__`` may carry ``epoch``/``step``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from nccli.errors import CheckpointError
from nccli.io.checkpoints.base import Contents, Probe, corrupt

__all__ = ["is_safetensors", "read_safetensors"]

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def is_safetensors(probe: Probe) -> bool:
    """A JSON header of plausible length; one longer than the file is reported as truncated."""
    head, size = probe.head, probe.size
    if probe.members is not None or len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and n <= _MAX_SAFETENSORS_HEADER:
        if n > size - 8:
            raise corrupt(
                probe.path, "safetensors file", f"header declares {n} bytes, file has {size - 8}"
            )
        return True
    return False


def read_safetensors(p: Path, trust: bool, map_location: Any) -> Contents:
    _validate_safetensors_header(p)
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise CheckpointError(
            f"{p}: is a safetensors file but the 'safetensors' package is not installed; "
            "pip install nccli[safetensors]"
        ) from exc
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(p), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise corrupt(p, "safetensors file", exc) from exc
    return Contents("safetensors", state=state, meta=meta)


def _validate_safetensors_header(p: Path) -> None:
    """Bounds-check the header and the data offsets before anything is allocated: a JSON
    object without repeated keys, and per tensor two non-negative integer offsets that,
    sorted, tile the data section exactly (no gap, no overlap, nothing past the end)."""
    size = p.stat().st_size
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        what = "it nests too deeply" if isinstance(exc, RecursionError) else exc
        raise corrupt(p, "safetensors header", what) from None
    if not isinstance(header, dict):
        raise corrupt(p, "safetensors header", "the header is not a JSON object")
    available = size - 8 - n
    ranges = sorted(
        (_offsets(p, key, info, available), key)
        for key, info in header.items()
        if key != "__metadata__"
    )
    end = 0
    for (begin, stop), key in ranges:
        if begin != end:
            raise corrupt(
                p,
                "safetensors file",
                f"tensor {key[:80]!r} starts at byte {begin} of the data, expected {end}",
            )
        end = stop
    if end != available:
        raise corrupt(
            p,
            "safetensors file",
            f"header indexes {end} bytes of tensor data, the file holds {available}",
        )


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (readers differ on which one wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key[:80]!r} appears twice")
        out[key] = value
    return out


def _offsets(p: Path, key: str, info: Any, available: int) -> tuple[int, int]:
    """A tensor's ``data_offsets``: two ints with ``0 <= begin <= end <= available``."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2):
        raise corrupt(p, "safetensors header", f"tensor {key[:80]!r} has no data_offsets")
    begin, end = offsets
    if not all(type(v) is int for v in offsets) or not 0 <= begin <= end <= available:
        raise corrupt(
            p,
            "safetensors header",
            f"tensor {key[:80]!r} has data_offsets {str(offsets)[:60]}; expected two integers "
            f"0 <= begin <= end <= {available}",
        )
    return begin, end
