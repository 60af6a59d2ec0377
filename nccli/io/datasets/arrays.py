"""Array files: ``.npz`` (members memory-mapped when stored), ``x.npy,y.npy`` and HDF5.

Inputs and labels are found by name (:data:`KEY_PAIRS`, ``x_test``/``y_test`` for a
split) unless a selector names them (``file:xkey,ykey``).  Nothing is unpickled: ``.npy``
members are read with ``allow_pickle=False`` and object arrays are refused.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nccli.errors import DataError, UsageError
from nccli.io._util import one_line
from nccli.io.datasets.base import ArrayDataset, ArraySource
from nccli.io.datasets.request import DataRequest

__all__ = [
    "KEY_PAIRS",
    "find_hdf5",
    "find_npy",
    "find_npy_pair",
    "find_npz",
    "open_hdf5",
    "open_npy_pair",
    "open_npz",
    "pick_keys",
    "refuse_single_npy",
]

KEY_PAIRS = (
    ("x", "y"),
    ("X", "y"),
    ("images", "labels"),
    ("data", "targets"),
    ("data", "labels"),
    ("features", "labels"),
)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------- detectors


def find_npz(req: DataRequest) -> Path | None:
    return req.path if req.is_file and req.magic[:2] == b"PK" else None


def find_npy_pair(req: DataRequest) -> tuple[Path, Path] | None:
    return req.pair


def find_npy(req: DataRequest) -> Path | None:
    return req.path if req.is_file and req.magic[:6] == b"\x93NUMPY" else None


def find_hdf5(req: DataRequest) -> Path | None:
    return req.path if req.is_file and req.magic == _HDF5_MAGIC else None


# --------------------------------------------------------------------------- openers


def pick_keys(
    keys: Sequence[str],
    selector: str | None,
    split: str,
    where: Path,
    exists: Callable[[str], bool] | None = None,
) -> tuple[str, str]:
    """Choose the input and label arrays among ``keys`` (or the two named by ``selector``)."""
    if selector:
        names = [s.strip() for s in selector.split(",")]
        if len(names) != 2 or not all(names):
            raise UsageError(f"{where}: selector {selector!r} must name two arrays, 'x,y'")
        exists = exists or (lambda n: n in keys)
        missing = [n for n in names if not exists(n)]
        if missing:
            raise DataError(
                f"{where}: no array named {missing[0]!r} (available: {', '.join(keys)})"
            )
        return names[0], names[1]
    for x, y in KEY_PAIRS:
        if f"{x}_{split}" in keys and f"{y}_{split}" in keys:
            return f"{x}_{split}", f"{y}_{split}"
    splits = sorted(
        {k.rsplit("_", 1)[1] for k in keys for x, _ in KEY_PAIRS if k.startswith(f"{x}_")}
    )
    if splits:
        raise DataError(
            f"{where}: has no {split!r} split (splits found: {', '.join(splits)}); pass one "
            "of those as the split"
        )
    for x, y in KEY_PAIRS:
        if x in keys and y in keys:
            return x, y
    raise DataError(
        f"{where}: cannot tell inputs from labels (arrays: {', '.join(keys) or 'none'}); name "
        "them x and y (or x_train/y_train), or pass 'file:xkey,ykey'"
    )


def open_npz(req: DataRequest, path: Path) -> ArrayDataset:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            xk, yk = pick_keys(keys, req.selector, req.split, path)
            x = _npz_member(path, zf, xk)
            y = _npz_member(path, zf, yk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .npz ({one_line(exc)}); re-create the file") from exc
    where = f"{path}:{xk},{yk}"
    return ArrayDataset(
        spec=req.spec,
        kind="npz",
        where=where,
        source=ArraySource(x),
        labels=y,
        split=req.split,
        **req.common,
    )


def _npz_member(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Memory-map an uncompressed ``.npz`` member; decompress a compressed one."""
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                if version in ((1, 0), (2, 0)):
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(f)
                    if dtype.hasobject:
                        raise DataError(
                            f"{path}: array {key!r} holds Python objects, which nccli never "
                            "unpickles; save it as a numeric array"
                        )
                    return np.memmap(
                        path,
                        dtype=dtype,
                        mode="r",
                        offset=f.tell(),
                        shape=shape,
                        order="F" if fortran else "C",
                    )
    with zf.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def open_npy_pair(req: DataRequest, pair: tuple[Path, Path]) -> ArrayDataset:
    arrays = []
    for p in pair:
        try:
            arrays.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except Exception as exc:
            raise DataError(f"{p}: cannot read .npy ({one_line(exc)})") from exc
    return ArrayDataset(
        spec=req.spec,
        kind="npy",
        where=f"{pair[0]},{pair[1]}",
        source=ArraySource(arrays[0]),
        labels=np.asarray(arrays[1]),
        split=req.split,
        **req.common,
    )


def refuse_single_npy(req: DataRequest, path: Path) -> ArrayDataset:
    raise DataError(f"{path}: a single .npy holds no labels; pass 'inputs.npy,labels.npy'")


def open_hdf5(req: DataRequest, path: Path) -> ArrayDataset:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open HDF5 file ({one_line(exc)})") from exc
    try:
        keys = [k for k in f if isinstance(f[k], h5py.Dataset)]
        xk, yk = pick_keys(
            keys, req.selector, req.split, path, lambda n: isinstance(f.get(n), h5py.Dataset)
        )
        labels = np.asarray(f[yk][()])
        return ArrayDataset(
            spec=req.spec,
            kind="hdf5",
            where=f"{path}:{xk},{yk}",
            source=ArraySource(f[xk]),
            labels=labels,
            split=req.split,
            closers=[f.close],
            **req.common,
        )
    except BaseException:
        f.close()
        raise
