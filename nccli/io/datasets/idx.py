"""MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-*`` for test).

The files may sit in the directory itself, in ``raw/`` or in ``*/raw/`` (the torchvision
layout).  Plain files are memory-mapped; every file's declared size is checked against
its bytes so a truncated download fails with its name instead of a reshape error.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.io._util import one_line
from nccli.io.datasets.base import ArrayDataset, ArraySource
from nccli.io.datasets.request import DataRequest

__all__ = ["find_idx", "open_idx", "read_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find_idx(req: DataRequest) -> Path | None:
    """The folder holding the IDX files, or ``None``."""
    if not req.is_dir:
        return None
    assert req.path is not None
    root = req.path
    for sub in (root, root / "raw", *sorted(root.glob("*/raw"))):
        if sub.is_dir() and any(sub.glob("*-idx[13]-ubyte*")):
            return sub
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (memory-mapped unless gzipped), checking the declared size."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic {head.hex()})")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            count = math.prod(dims)
            offset = 4 + 4 * ndim
            if opener is open:
                size = path.stat().st_size - offset
                if size != count * dtype.itemsize:
                    raise DataError(
                        f"{path}: IDX header declares {count * dtype.itemsize} bytes of data, "
                        f"file has {size}; the file is truncated or corrupt"
                    )
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dims)
            data = f.read(count * dtype.itemsize + 1)
    except DataError:
        raise
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({one_line(exc)})") from exc
    if len(data) != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header declares {count * dtype.itemsize} bytes of data, file has "
            f"{len(data)}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def open_idx(req: DataRequest, root: Path) -> ArrayDataset:
    split, common = req.split, req.common
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"{root}: MNIST IDX files have splits train and test, not {split!r}")

    def find(kind: str) -> Path:
        for sep in ("-", "."):
            for ext in ("", ".gz"):
                p = root / f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte{ext}"
                if p.is_file():
                    return p
        raise DataError(f"{root}: no {prefix}-{kind}-idx*-ubyte[.gz] file for split {split!r}")

    images, labels = find("images"), find("labels")
    return ArrayDataset(
        spec=req.spec,
        kind="mnist-idx",
        where=str(images),
        source=ArraySource(read_idx(images)),
        labels=np.asarray(read_idx(labels)),
        split=split,
        **{**common, "num_classes": common["num_classes"] or 10},
    )
