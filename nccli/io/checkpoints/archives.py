"""TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``) zip archives.

Both hold a whole program, and loading one runs part of it: ``torch.jit.load`` calls
the archive's own ``__setstate__`` methods, which may call operators such as
``aten::from_file(shared=True)`` that map and overwrite any file; ``torch.export.load``
falls back to full unpickling by itself for payloads it cannot load weights-only.  So
both are treated as code: without ``trust_checkpoint`` they are refused before
``torch.jit.load``/``torch.export.load`` runs, whatever the file is called (the format
is read from the bytes).  A ``.pt2``'s pickled payloads are still checked with the
weights-only unpickler so the refusal can name what a payload asks for.  Re-saving the
weights as a state dict or safetensors avoids the flag.
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
from nccli.io.checkpoints.base import Contents, Probe, corrupt
from nccli.io.checkpoints.pickled import unsafe_globals

__all__ = ["is_export", "is_torchscript", "read_export", "read_torchscript"]

_MAX_SCANNED = 64 * 1024 * 1024  # bytes of one .pt2 member read for the refusal's message


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
    if not trust:
        raise _needs_trust(p, "TorchScript", "its methods can call operators that write files")
    return Contents("torchscript", whole=_read_torchscript(p, map_location))


def read_export(p: Path, trust: bool, map_location: Any) -> Contents:
    if not trust:
        detail = _export_needs_trust(p) or "torch.export may unpickle arbitrary objects"
        raise _needs_trust(p, "torch.export (.pt2)", detail)
    return Contents("export", whole=_read_export(p))


def _needs_trust(p: Path, kind: str, detail: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{p}: is a {kind} program, and loading one runs code stored in it ({detail}); pass "
        "--trust-checkpoint only if you trust the source, or load its weights from a state "
        "dict or safetensors file with --arch/--model"
    )


def _read_torchscript(p: Path, map_location: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but files still exist
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location=map_location)
    except Exception as exc:
        raise corrupt(p, "TorchScript archive", exc) from exc


def _read_export(p: Path) -> nn.Module:
    try:
        with p.open("rb") as f:  # a file object: torch warns about a path not ending in .pt2
            return torch.export.load(f).module()
    except Exception as exc:
        raise corrupt(p, "torch.export archive", exc) from exc


def _export_needs_trust(p: Path) -> str | None:
    """What in a ``.pt2`` needs full unpickling (checked with the weights-only unpickler),
    for the refusal's message; ``None`` when nothing does or the check cannot tell (the
    archive is refused either way).  Members over 64 MB are not read."""
    try:
        with zipfile.ZipFile(p) as zf:
            return _unsafe_payload(zf)
    except Exception:  # advisory only: a file this cannot parse is still refused
        return None


def _read_small(zf: zipfile.ZipFile, name: str) -> bytes | None:
    info = zf.getinfo(name)
    return None if info.file_size > _MAX_SCANNED else zf.read(info)


def _unsafe_payload(zf: zipfile.ZipFile) -> str | None:
    names = zf.namelist()
    pickled: list[str] = [n for n in names if n.endswith(".pt")]
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith("opaque_obj_"):
            return f"{name} is a plain pickle"
        if not name.endswith("_config.json") or "/data/" not in f"/{name}":
            continue
        raw = _read_small(zf, name)
        try:
            config = json.loads(raw or b"{}").get("config", {})
        except (ValueError, AttributeError, RecursionError):
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
        raw = _read_small(zf, name) if name in names else None
        if raw is None:
            continue
        buf = io.BytesIO(raw)
        try:
            torch.load(buf, weights_only=True)
        except Exception as exc:
            buf.seek(0)
            found = unsafe_globals(buf, exc) or "it cannot be loaded weights-only"
            return f"{name}: {found}"
    return None
