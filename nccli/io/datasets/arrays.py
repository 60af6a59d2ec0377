"""Array files: ``.npz`` (members memory-mapped when stored), ``x.npy,y.npy`` and HDF5.

Inputs and labels are found by name (:data:`KEY_PAIRS`, ``x_test``/``y_test`` for a
split) unless a selector names them (``file:xkey,ykey``).  Nothing is unpickled: ``.npy``
members are read with ``allow_pickle=False`` and object arrays are refused.  Nothing is
trusted before it is read (:mod:`nccli.io.h5safe`): every file must be a regular file,
each array's declared size is checked against what the file holds, an HDF5 file may not
point outside itself, and compressed data is decoded within a bound.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError, UsageError
from nccli.io._util import check_input_file, one_line
from nccli.io.datasets.base import ArrayDataset, ArraySource
from nccli.io.datasets.request import DataRequest
from nccli.io.h5safe import (
    check_size,
    inflate_bound,
    iter_rows,
    npz_member,
    open_failure,
    open_input,
)

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
    """The two arrays of an ``.npz``, each member checked before it is read
    (:func:`nccli.io.h5safe.npz_member`: stored members memory-mapped, deflated ones
    decompressed within a bound, bzip2/lzma and lying headers refused)."""
    check_input_file(path, "dataset")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            xk, yk = pick_keys(keys, req.selector, req.split, path)
            budget = [inflate_bound(path.stat().st_size)]
            x = npz_member(path, zf, xk, budget=budget)
            y = npz_member(path, zf, yk, budget=budget)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        fail = open_failure(exc, path, "dataset") if isinstance(exc, OSError) else None
        if fail is not None:
            raise fail from None
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


def open_npy_pair(req: DataRequest, pair: tuple[Path, Path]) -> ArrayDataset:
    arrays = []
    for p in pair:
        check_input_file(p, "dataset file")
        try:
            # memory-mapped: numpy checks the header's size against the file's
            arrays.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except Exception as exc:
            fail = open_failure(exc, p, "dataset file") if isinstance(exc, OSError) else None
            if fail is not None:
                raise fail from None
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
    """Two datasets of an HDF5 file (:func:`nccli.io.h5safe.open_input`: nothing read
    from outside the file): the inputs sliced per batch, the labels read and checked a
    bounded chunk at a time, both sizes checked against the file first."""
    import h5py

    try:
        f = open_input(path, "dataset")
    except OSError as exc:
        raise DataError(f"{path}: cannot open HDF5 file ({one_line(exc)})") from exc
    try:
        keys = [k for k in f if isinstance(f[k], h5py.Dataset)]
        xk, yk = pick_keys(
            keys, req.selector, req.split, path, lambda n: isinstance(f.get(n), h5py.Dataset)
        )
        where = f"{path}:{xk},{yk}"
        check_size(f[xk], str(path), f"inputs {xk!r}", compressed="stream", every_chunk=False)
        check_size(f[yk], str(path), f"labels {yk!r}", compressed="whole", every_chunk=False)
        return ArrayDataset(
            spec=req.spec,
            kind="hdf5",
            where=where,
            source=ArraySource(f[xk]),
            labels=_checked_labels(f[yk], where),
            split=req.split,
            closers=[f.close],
            **req.common,
        )
    except BaseException:
        f.close()
        raise


def _checked_labels(ds: Any, where: str) -> np.ndarray:
    """HDF5 labels read :data:`~nccli.io.h5safe.LABEL_ROWS` rows at a time, each part
    checked (whole numbers, >= 0) before the next is read; the dataset's own checks
    (:func:`~nccli.io.datasets.base.validate_labels`) run on the result."""
    shape, kind = ds.shape, ds.dtype.kind
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise DataError(
            f"{where}: labels have shape {shape}; expected one class index per sample "
            "(take the argmax of one-hot labels)"
        )
    if kind not in "biuf":
        raise DataError(f"{where}: labels have dtype {ds.dtype}; expected integer class indices")
    out = np.empty(shape, dtype=ds.dtype)
    for start, y in iter_rows(ds):
        out[start : start + len(y)] = y
        y = y.reshape(-1)
        if kind == "f":
            bad = ~np.isfinite(y) | (y != np.round(y))
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(
                    f"{where}: labels must be whole numbers, found {y[i].item()!r} at index "
                    f"{start + i}"
                )
        if kind in "iuf" and len(y) and y.min() < 0:
            i = int(np.argmin(y))
            raise DataError(
                f"{where}: labels must be >= 0, found {y[i].item()} at index {start + i}"
            )
    return out
