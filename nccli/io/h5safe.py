"""Opening the container files of arrays (HDF5, zip ``.npz``) without trusting them.

Every HDF5 input nccli reads — caches, plain features files, datasets for ``extract`` —
is opened by :func:`open_input`: a regular file only (a FIFO would hang the open),
read-only, and walked once (metadata only) so that nothing in it makes a later read leave
the file: external links, soft links to nowhere, datasets whose raw data lives in other
files (external storage) and virtual datasets (a deleted source reads as zeros) are
refused with one line naming the file and the element.

Before an array is read, :func:`check_size` compares what it declares with what the file
stores, so a few-KB file cannot make nccli allocate gigabytes:

- an uncompressed array must store at least what it declares, within the file's size;
- arrays nccli never compresses (``compressed="refuse"``: a cache's statistics,
  parameters, labels) are refused when compressed — such a file can only be forged;
- a compressed array must store every chunk it declares, in chunks HDF5 can decompress in
  :data:`MAX_CHUNK_BYTES`; one read whole (``"whole"``: labels, parameters) may expand
  to at most :func:`inflate_bound` bytes, one streamed in parts (``"stream"``: features,
  dataset inputs) is only ever read a bounded slice at a time.

:func:`npz_member` applies the same rules to the members of an ``.npz``; and
:func:`check_stats_size` bounds the statistics a (K classes, d dimensions) input asks for.
"""

from __future__ import annotations

import errno
import math
import os
import posixpath
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from nccli.errors import DataError
from nccli.io._util import check_input_file

__all__ = [
    "LABEL_ROWS",
    "MAX_CHUNK_BYTES",
    "check_size",
    "check_stats_size",
    "inflate_bound",
    "iter_rows",
    "npz_member",
    "open_input",
    "open_failure",
]

#: HDF5 decompresses a chunk whole, whatever slice of it is read
MAX_CHUNK_BYTES = 256 << 20
#: a compressed array read whole may expand to this much ...
WHOLE_FLOOR = 256 << 20
#: ... or to this many times the size of its file, when that is more
INFLATE = 8
#: rows per read when labels (or another index array) are read and checked in parts
LABEL_ROWS = 1 << 20

ErrorType = type[DataError]


# ----------------------------------------------------------------------------- open
def open_failure(
    exc: OSError, path: str | os.PathLike[str], what: str, error: ErrorType = DataError
) -> DataError | None:
    """The error for an ``OSError`` that says nothing about the file (the process or the
    system ran out of file descriptors), or None when the file itself is to blame."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return error(
            f"{path}: cannot open the {what}: too many open files (the process or the system "
            "ran out of file descriptors); close other programs or raise the limit "
            "(ulimit -n) and retry"
        )
    return None


def open_input(
    path: str | os.PathLike[str],
    what: str,
    *,
    error: ErrorType = DataError,
    contents: bool = True,
) -> h5py.File:
    """``path`` opened read-only as HDF5, after checking it is a regular file and that
    nothing inside it points outside it (:func:`check_contents`; ``contents=False`` skips
    that walk for a caller that reads root attributes only and hands the file on to a
    reader that walks it).

    An ``OSError`` of a file that is not readable HDF5 (a failed open, a structure that
    cannot be walked) is left to the caller, whose message says what the file should be;
    running out of file descriptors is not the file's fault and becomes ``error`` saying
    so."""
    check_input_file(path, what)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        fail = open_failure(exc, path, what, error)
        if fail is not None:
            raise fail from None
        raise
    try:
        if contents:
            check_contents(f, str(path), error)
    except BaseException:
        f.close()
        raise
    return f


def check_contents(f: h5py.File, where: str, error: ErrorType = DataError) -> None:
    """Refuse links and datasets that read outside the file (metadata only, no data).

    The visitors return what is wrong (which stops the walk) instead of raising: h5py's
    callback machinery mangles an exception raised inside it."""
    soft: list[tuple[str, str]] = []

    def link(name: str, lnk: Any) -> str | None:
        if isinstance(lnk, h5py.ExternalLink):
            return (
                f"/{name} is an external link to {lnk.filename}:{lnk.path}; nccli reads only "
                "what is inside the input file (copy the data in, e.g. with h5repack)"
            )
        if isinstance(lnk, h5py.SoftLink):
            soft.append((name, lnk.path))
        elif not isinstance(lnk, h5py.HardLink):
            return f"/{name} is a user-defined link, which nccli does not follow"
        return None

    def obj(name: str, o: Any) -> str | None:
        if not isinstance(o, h5py.Dataset):
            return None
        if o.is_virtual:
            return (
                f"/{name} is a virtual dataset (its data lives in other files); nccli reads "
                "only data stored in the input file"
            )
        if o.id.get_create_plist().get_external_count() > 0:
            return (
                f"/{name} keeps its raw data in external files; nccli reads only data stored "
                "in the input file"
            )
        return None

    try:
        problem = f.visititems_links(link)
        for name, target in [] if problem else soft:
            if target not in f[posixpath.dirname(f"/{name}")]:
                problem = f"/{name} is a soft link to {target}, which is not in the file"
                break
        problem = problem or f.visititems(obj)
    except Exception as exc:  # noqa: BLE001 - h5py on a damaged file: any exception
        # unreadable HDF5, like a failed open: the caller's message says what to do
        raise OSError(f"cannot read the file's structure: {_short(exc)}") from None
    if problem:
        raise error(f"{where}: {problem}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------- sizes
def _file_size(ds: h5py.Dataset) -> int:
    try:
        return os.path.getsize(ds.file.filename)
    except OSError:
        return int(ds.file.id.get_filesize())


def inflate_bound(size: int) -> int:
    """The most bytes a compressed array of an input of ``size`` bytes may expand to when
    it is read whole: :data:`WHOLE_FLOOR`, or :data:`INFLATE` times the input."""
    return max(WHOLE_FLOOR, INFLATE * int(size))


def check_size(
    ds: Any,
    where: str,
    what: str,
    *,
    compressed: str,
    error: ErrorType = DataError,
    hint: str = "",
    every_chunk: bool = True,
) -> None:
    """Refuse ``ds`` before any of it is read when its declared size is not backed by what
    the file stores (see the module docstring).  ``compressed`` is ``"refuse"``,
    ``"whole"`` or ``"stream"``; ``what`` names the array in the message, ``hint`` (``"re-extract
    it"``) ends the messages of a forged or truncated file.  ``every_chunk``: every declared
    chunk must be stored — true of what nccli writes; a dataset written in part by someone
    else legitimately leaves chunks unwritten (they read as the fill value, costing no
    hidden memory), so inputs pass ``False``."""
    forged = f"the file is truncated or forged{f', {hint}' if hint else ''}"
    if not isinstance(ds, h5py.Dataset):
        raise error(f"{where}: {what} is a group, not an array")
    if ds.shape is None:
        raise error(f"{where}: {what} is an empty (null) dataset with no values")
    itemsize = ds.dtype.itemsize
    declared = int(np.prod(ds.shape, dtype=object)) * itemsize
    stored, size = int(ds.id.get_storage_size()), _file_size(ds)
    if stored > size:
        raise error(f"{where}: {what} claims {stored} stored bytes in a file of {size}; {forged}")
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    if filtered and compressed == "refuse":
        raise error(
            f"{where}: {what} is compressed, which nccli never does to it; "
            f"the file is forged{f', {hint}' if hint else ''}"
        )
    chunk = int(np.prod(ds.chunks, dtype=object)) * itemsize if ds.chunks else 0
    if filtered and chunk > MAX_CHUNK_BYTES:
        raise error(
            f"{where}: {what} is compressed in chunks of {chunk} bytes, more than nccli "
            f"decompresses at once ({MAX_CHUNK_BYTES}); re-chunk it (h5repack -l CHUNK=...)"
        )
    if ds.chunks is not None and every_chunk:
        want = math.prod(-(-s // c) for s, c in zip(ds.shape, ds.chunks, strict=True))
        have = int(ds.id.get_num_chunks()) if want else 0
        if have < want:
            raise error(
                f"{where}: {what} declares {declared} bytes in {want} chunks but the file "
                f"stores {have} of them; {forged}"
            )
    if not filtered:
        if stored < declared and (every_chunk or ds.chunks is None):
            raise error(
                f"{where}: {what} declares {declared} bytes but the file stores {stored}; {forged}"
            )
        return
    bound = inflate_bound(size)
    if compressed == "whole" and ds.size * max(itemsize, 8) > bound:
        raise error(
            f"{where}: {what} declares {declared} bytes, compressed; nccli reads such an "
            f"array whole and refuses more than {bound} bytes from a {size}-byte file"
        )


def iter_rows(ds: Any, rows: int = LABEL_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, ds[start:start + rows])`` over the first axis: a bounded read each."""
    n = int(ds.shape[0]) if ds.shape else 0
    for start in range(0, n, rows):
        yield start, np.asarray(ds[start : min(n, start + rows)])


def check_stats_size(num_classes: int, dim: int, where: str, error: ErrorType = DataError) -> None:
    """Refuse an input whose statistics (K means, the d×d scatter) would take more than
    half of this machine's memory: the file's shape is what asks for them."""
    need = 8 * (int(num_classes) * (int(dim) + 2) + int(dim) ** 2)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 32 << 30
    if need > ram // 2:
        raise error(
            f"{where}: {num_classes} classes of {dim}-dimensional features need "
            f"{need / 1e9:.1f} GB of statistics (the d×d scatter), more than half of this "
            f"machine's memory ({ram / 1e9:.0f} GB); reduce the feature dimension"
        )


# ----------------------------------------------------------------------------- npz
_NPZ_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _npy_header(fp: Any, where: str, name: str, error: ErrorType) -> tuple[tuple, bool, Any]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise error(
        f"{where}: member {name!r} is .npy format version {version}, which nccli does not read"
    )


def _data_end_limit(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where the next member (or the central directory) starts: a stored member's bytes
    must end before it."""
    starts = [i.header_offset for i in zf.infolist() if i.header_offset > info.header_offset]
    return min([*starts, zf.start_dir])


def npz_member(
    path: str | os.PathLike[str],
    zf: zipfile.ZipFile,
    key: str,
    *,
    budget: list[int] | None = None,
    error: ErrorType = DataError,
) -> np.ndarray:
    """Member ``<key>.npy`` of an open ``.npz``, its header checked before any data is read.

    A stored member is memory-mapped, a deflated one decompressed; bzip2/lzma/encrypted
    members, object arrays and a header that declares more data than the member holds are
    refused.  ``budget`` (a one-item list, shared by the members of one file) is what the
    deflated members read so far may still expand to (:func:`inflate_bound`)."""
    where, name = str(path), f"{key}.npy"
    info = zf.getinfo(name)
    if info.compress_type not in _NPZ_METHODS or info.flag_bits & 0x1:
        method = zipfile.compressor_names.get(info.compress_type, str(info.compress_type))
        raise error(
            f"{where}: member {name!r} is {'encrypted' if info.flag_bits & 0x1 else method}; "
            "nccli reads only stored or deflated members (np.savez, np.savez_compressed)"
        )
    with zf.open(info) as member:
        shape, fortran, dtype = _npy_header(member, where, name, error)
        head = member.tell()
        if dtype.hasobject:
            raise error(
                f"{where}: array {key!r} holds Python objects, which nccli never unpickles; "
                "save it as a numeric array"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size < head + nbytes:
            raise error(
                f"{where}: member {name!r} declares shape {shape} {dtype} ({nbytes} bytes) but "
                f"holds {max(0, info.file_size - head)}; the file is truncated or forged"
            )
        if info.compress_type == zipfile.ZIP_DEFLATED:
            budget = budget if budget is not None else [inflate_bound(os.path.getsize(path))]
            if nbytes > budget[0]:
                raise error(
                    f"{where}: member {name!r} declares {nbytes} bytes, compressed; nccli "
                    f"decompresses at most {budget[0]} more bytes of this file"
                )
            budget[0] -= nbytes
            member.seek(0)
            return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if local[:4] != b"PK\x03\x04" or info.compress_size != info.file_size:
        raise error(f"{where}: member {name!r} has a damaged zip header; re-create the file")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + head
    if offset + nbytes > _data_end_limit(zf, info) or offset + nbytes > os.path.getsize(path):
        raise error(
            f"{where}: member {name!r} declares {nbytes} bytes that run past its end; the "
            "file is truncated or forged"
        )
    if nbytes == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )
