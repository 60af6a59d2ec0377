"""The checkpoint formats, in the order :func:`detect_format` tries them, and the probe.

The format is read from the file's bytes, never its extension.  To add a format, write a
detector and a reader (see :class:`~nccli.io.checkpoints.base.CheckpointFormat`) in a
module of this package and add one row to :data:`FORMATS`.  Order matters where
detectors overlap: export and TorchScript archives may also hold ``data.pkl``, and a
safetensors header length may start with the pickle opcode byte, so both come before the
``torch.save`` row.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from nccli.errors import CheckpointError
from nccli.io.checkpoints.archives import is_export, is_torchscript, read_export, read_torchscript
from nccli.io.checkpoints.base import CheckpointFormat, Probe, corrupt
from nccli.io.checkpoints.pickled import is_torch, read_torch
from nccli.io.checkpoints.tensors import is_safetensors, read_safetensors
from nccli.io.checkpoints.zipscreen import screen_zip

__all__ = ["FORMATS", "detect_format", "probe"]

FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat("export", is_export, read_export),
    CheckpointFormat("torchscript", is_torchscript, read_torchscript),
    CheckpointFormat("safetensors", is_safetensors, read_safetensors),
    CheckpointFormat("torch", is_torch, read_torch),
)


def detect_format(p: Path) -> CheckpointFormat:
    """The first row of :data:`FORMATS` whose detector accepts ``p``; else a
    ``CheckpointError`` saying what the file looks like instead."""
    found = probe(p)
    for fmt in FORMATS:
        if fmt.detect(found):
            return fmt
    if found.members is not None:
        raise CheckpointError(
            f"{p}: is a zip archive but not a PyTorch checkpoint (no data.pkl, TorchScript "
            "code or torch.export model inside); an .npz belongs to --data"
        )
    head = found.head
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        raise CheckpointError(
            f"{p}: is an HDF5 file (an nccli cache or a Keras model?), not a PyTorch checkpoint"
        )
    raise CheckpointError(
        f"{p}: not a checkpoint (starts with bytes {head[:4].hex(' ')}: no zip archive, pickle "
        "or safetensors header); pass a file written by torch.save, torch.jit.save, "
        "torch.export.save or safetensors"
    )


def probe(p: Path) -> Probe:
    """The first bytes and, for a zip, its member names (below the top folder), after
    :func:`~nccli.io.checkpoints.zipscreen.screen_zip` has refused an ambiguous archive."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(9)
    if head[:2] != b"PK":
        return Probe(p, size, head, None, None)
    archive_format: bytes | None = None
    screen_zip(p)  # unambiguous: the members seen here are the ones torch will read
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
            if "archive_format" in rel:
                fmt_name = next(n for n in names if n.split("/", 1)[-1] == "archive_format")
                with zf.open(fmt_name) as member:  # a few bytes, however large it claims to be
                    archive_format = member.read(64).strip()
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        RuntimeError,
        NotImplementedError,
        zlib.error,
    ) as exc:
        raise corrupt(p, "zip archive", exc) from exc
    return Probe(p, size, head, frozenset(rel), archive_format)
