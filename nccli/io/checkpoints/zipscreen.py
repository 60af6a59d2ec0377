"""Screening a zip archive so that every reader sees the same members.

PyTorch reads its zip checkpoints (``torch.save``, TorchScript, ``.pt2``) with miniz;
nccli decides what a file is, and screens ``.pt2`` payloads, with Python's ``zipfile``.
The two disagree on ambiguous archives: with two members of the same name ``zipfile``
returns the last and miniz may return the first, so a screen could pass one copy while
torch loads the other; bytes before the archive shift ``zipfile``'s offsets but not
miniz's; members may overlap or hide data between them.  :func:`screen_zip` therefore
accepts only an archive whose layout is unambiguous -- the end record is the last 22
bytes, the central directory ends where the end record starts, every member's local
header matches its directory entry and the members tile the bytes before the directory
without gaps or overlaps (a data descriptor of 12 to 24 bytes may follow a member that
declares one) -- and no two members share a name, so whatever nccli inspects is exactly
what torch reads.  Every zip that ``torch.save``, ``torch.jit.save``,
``torch.export.save`` or Python's ``zipfile`` writes passes.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

from nccli.errors import CheckpointError

__all__ = ["screen_zip"]

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory record, 22 bytes
_LOC64 = struct.Struct("<4sIQI")  # zip64 end-of-central-directory locator, 20 bytes
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory record, 56 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_DESCRIPTOR_SIZES = (12, 16, 20, 24)  # crc + sizes, with or without signature, zip64 or not


def _refuse(p: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{p}: ambiguous zip archive ({what}); different zip readers could see different "
        "contents, so it is refused; re-save the checkpoint with torch.save, torch.jit.save "
        "or torch.export.save"
    )


def _directory(p: Path, f: BinaryIO, size: int) -> tuple[int, int, int]:
    """``(offset, size, entries)`` of the central directory, checked to end exactly
    where the (zip64) end record starts and that record to end the file."""
    if size < _EOCD.size:
        raise zipfile.BadZipFile("too short for a zip archive")
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, _, entries, cd_size, cd_offset, comment = _EOCD.unpack(f.read(22))
    if sig != b"PK\x05\x06" or comment != 0:
        f.seek(max(0, size - _EOCD.size - 0xFFFF))
        if b"PK\x05\x06" not in f.read():
            raise zipfile.BadZipFile("no end-of-archive record: the file is cut short")
        raise _refuse(p, "bytes after the end record, or a comment")
    end = size - _EOCD.size
    locator = b""
    if end >= _LOC64.size + _EOCD64.size:
        f.seek(end - _LOC64.size)
        locator = f.read(_LOC64.size)
    if locator[:4] == b"PK\x06\x07":  # zip64 (torch.save always writes it): its record rules
        _, disk64, rec64, _ = _LOC64.unpack(locator)
        end = end - _LOC64.size - _EOCD64.size
        f.seek(end)
        fields = _EOCD64.unpack(f.read(_EOCD64.size))
        if disk64 != 0 or rec64 != end or fields[0] != b"PK\x06\x06":
            raise _refuse(p, "the zip64 end record is not where its locator points")
        disk, cd_disk, entries, cd_size, cd_offset = fields[4], fields[5], *fields[7:10]
    elif entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        raise _refuse(p, "a zip64 marker without its zip64 record")
    if disk != 0 or cd_disk != 0:
        raise _refuse(p, "a multi-disk archive")
    if cd_offset + cd_size != end:
        raise _refuse(
            p,
            f"the central directory declares bytes {cd_offset}-{cd_offset + cd_size} but the "
            f"end record starts at {end} (data before or inside the archive)",
        )
    return cd_offset, cd_size, entries


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The member name as stored: UTF-8 when flagged, else cp437 (as ``zipfile`` decoded it)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def screen_zip(p: Path) -> list[zipfile.ZipInfo]:
    """The archive's members in file order, or a ``CheckpointError`` naming what makes
    the archive ambiguous (see the module docstring)."""
    size = p.stat().st_size
    try:
        with p.open("rb") as f:
            cd_offset, _, entries = _directory(p, f, size)
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
            if len(infos) != entries:
                raise _refuse(
                    p, f"the end record counts {entries} members, the directory lists {len(infos)}"
                )
            _check_names(p, infos)
            members = sorted(infos, key=lambda i: i.header_offset)
            pos, descriptor = 0, False
            for info in members:
                _check_gap(p, pos, info.header_offset, descriptor, repr(info.orig_filename))
                pos = _check_member(p, f, info, cd_offset)
                descriptor = bool(info.flag_bits & 0x08)
            _check_gap(p, pos, cd_offset, descriptor, "the central directory")
    except (zipfile.BadZipFile, struct.error, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{p}: zip archive is truncated or corrupt ({exc}); re-save or re-copy the checkpoint"
        ) from exc
    return members


def _check_names(p: Path, infos: list[zipfile.ZipInfo]) -> None:
    """No two members with the same name, nor the same name below the archive's top
    folder (torch looks members up relative to it)."""
    seen: set[str] = set()
    below: set[str] = set()
    for info in infos:
        name = info.orig_filename
        rel = name.split("/", 1)[1] if "/" in name else name
        if name in seen or rel in below:
            raise _refuse(p, f"two members named {rel!r}")
        seen.add(name)
        below.add(rel)


def _check_gap(p: Path, pos: int, start: int, descriptor: bool, what: str) -> None:
    """``what`` starts right where the previous member ended (after its data descriptor,
    if it declared one)."""
    if start < pos:
        raise _refuse(p, f"{what} overlaps the member before it (bytes {start}-{pos})")
    if start - pos not in ((0, *_DESCRIPTOR_SIZES) if descriptor and pos else (0,)):
        raise _refuse(p, f"bytes {pos}-{start} before {what} belong to no member")


def _check_member(p: Path, f: BinaryIO, info: zipfile.ZipInfo, cd_offset: int) -> int:
    """Check one member's local header against its directory entry; return where its
    data ends."""
    name = repr(info.orig_filename)
    f.seek(info.header_offset)
    head = f.read(_LOCAL.size)
    if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise _refuse(p, f"member {name} has no local header where the directory says")
    n_name, n_extra = _LOCAL.unpack(head)[9:11]
    if f.read(n_name) != _raw_name(info):
        raise _refuse(p, f"member {name} has another name in its local header")
    end = info.header_offset + _LOCAL.size + n_name + n_extra + info.compress_size
    if end > cd_offset:
        raise _refuse(p, f"member {name} runs into the central directory")
    return end
