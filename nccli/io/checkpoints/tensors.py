"""safetensors files: 8-byte little-endian header length, a JSON header, then raw tensors.

The header and every tensor's data offsets are bounds-checked before the ``safetensors``
package allocates anything, so a truncated or hostile file fails with its name.  The
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
    """Bounds-check the header and the data offsets before anything is allocated."""
    size = p.stat().st_size
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise corrupt(p, "safetensors header", exc) from exc
    if not isinstance(header, dict):
        raise corrupt(p, "safetensors header", "the header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise corrupt(p, "safetensors header", f"tensor {key!r} has no data_offsets")
        end = max(end, int(offsets[1]))
    available = size - 8 - n
    if end != available:
        raise corrupt(
            p,
            "safetensors file",
            f"header indexes {end} bytes of tensor data, the file holds {available}",
        )
