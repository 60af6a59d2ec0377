"""TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``) zip archives.

Both hold a whole program.  A ``.pt2`` is screened before ``torch.export.load``, which
would otherwise fall back to full unpickling on its own: every pickled payload inside it
must pass the weights-only unpickler, and opaque pickled objects are refused outright,
unless ``trust_checkpoint`` is set.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nccli.errors import UnsafeCheckpointError
from nccli.io._util import one_line
from nccli.io.checkpoints.base import Contents, Probe, corrupt
from nccli.io.checkpoints.pickled import unsafe_globals

__all__ = ["is_export", "is_torchscript", "read_export", "read_torchscript"]


def is_export(probe: Probe) -> bool:
    rel = probe.members
    if rel is None:
        return False
    return probe.archive_format == b"pt2" or (
        any(r.startswith("models/") and r.endswith(".json") for r in rel)
        or "serialized_exported_program.json" in rel
    )


def is_torchscript(probe: Probe) -> bool:
    rel = probe.members
    return rel is not None and ("constants.pkl" in rel or any(r.startswith("code/") for r in rel))


def read_torchscript(p: Path, trust: bool, map_location: Any) -> Contents:
    return Contents("torchscript", whole=_read_torchscript(p, map_location))


def read_export(p: Path, trust: bool, map_location: Any) -> Contents:
    return Contents("export", whole=_read_export(p, trust))


def _read_torchscript(p: Path, map_location: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but files still exist
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location=map_location)
    except Exception as exc:
        raise corrupt(p, "TorchScript archive", exc) from exc


def _read_export(p: Path, trust: bool) -> nn.Module:
    if not trust:
        reason = _export_needs_trust(p)
        if reason is not None:
            raise UnsafeCheckpointError(
                f"{p}: this torch.export archive needs arbitrary unpickling ({reason}), which "
                "can execute code; pass --trust-checkpoint only if you trust the source"
            )
    try:
        return torch.export.load(str(p)).module()
    except Exception as exc:
        raise corrupt(p, "torch.export archive", exc) from exc


def _export_needs_trust(p: Path) -> str | None:
    """Check every pickled payload in a ``.pt2`` with the weights-only unpickler."""
    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
        pickled: list[str] = [n for n in names if n.endswith(".pt")]
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("opaque_obj_"):
                return f"{name} is a plain pickle"
            if not name.endswith("_config.json") or "/data/" not in f"/{name}":
                continue
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError):
                continue
            folder = name.rsplit("/", 1)[0]
            for entry in config.values() if isinstance(config, dict) else []:
                if isinstance(entry, dict) and entry.get("use_pickle"):
                    path_name = str(entry.get("path_name", ""))
                    if path_name.startswith("opaque_obj_"):
                        return f"{path_name} is a plain pickle"
                    if not path_name.startswith("custom_obj_"):
                        pickled.append(f"{folder}/{path_name}")
        for name in pickled:
            if name not in names:
                continue
            buf = io.BytesIO(zf.read(name))
            try:
                torch.load(buf, weights_only=True)
            except Exception as exc:
                buf.seek(0)
                return f"{name}: {unsafe_globals(buf, exc) or one_line(exc, 80)}"
    return None
