"""CIFAR-10 / CIFAR-100 python batches, unpickled with an allow-list.

A directory with ``data_batch_*``/``test_batch`` is CIFAR-10; one with ``train``/``test``
and ``meta`` is CIFAR-100 (fine labels).  ``cifar-10-batches-py`` and ``cifar-100-python``
subfolders are found.  The batches are pickles, so they go through
:class:`RestrictedUnpickler`: dicts, lists, bytes, str and numpy arrays only; any other
global is refused before it is imported.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.io._util import one_line
from nccli.io.datasets.base import ArrayDataset, ArraySource
from nccli.io.datasets.request import DataRequest

__all__ = ["RestrictedUnpickler", "find_cifar", "open_cifar"]


# --------------------------------------------------------------------------- detection


def _is_cifar10(sub: Path) -> bool:
    return sub.is_dir() and (any(sub.glob("data_batch_*")) or (sub / "test_batch").is_file())


def _is_cifar100(sub: Path) -> bool:
    return (
        sub.is_dir()
        and (sub / "meta").is_file()
        and ((sub / "train").is_file() or (sub / "test").is_file())
    )


def find_cifar(req: DataRequest) -> Path | None:
    """The folder holding the batches: the directory itself or a standard subfolder."""
    if not req.is_dir:
        return None
    assert req.path is not None
    root = req.path
    # one folder at a time, CIFAR-10 before CIFAR-100 in each
    for sub in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if _is_cifar10(sub) or _is_cifar100(sub):
            return sub
    return None


def open_cifar(req: DataRequest, root: Path) -> ArrayDataset:
    if _is_cifar10(root):
        return _open_cifar10(req, root)
    return _open_cifar100(req, root)


# --------------------------------------------------------------------------- unpickling


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists, str, bytes and numpy arrays; refuse every other global."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise DataError(
            f"{self.where}: refusing to unpickle {module}.{name}; CIFAR batches hold only "
            "dicts, lists, strings and numpy arrays, so this file is not one (or was tampered with)"
        )


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        table[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read CIFAR batch ({one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- reading


def _cifar_arrays(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        batch = _unpickle(f)
        data, labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or labels is None:
            raise DataError(f"{f}: CIFAR batch lacks 'data' or {label_key!r}")
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(
                f"{f}: CIFAR 'data' is {data.shape} {data.dtype}; expected (N, 3072) uint8"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels))
        if len(ys[-1]) != len(xs[-1]):
            raise DataError(f"{f}: {len(xs[-1])} images but {len(ys[-1])} labels")
    return np.concatenate(xs), np.concatenate(ys)


def _names_from(meta_file: Path, key: str) -> list[str] | None:
    if not meta_file.is_file():
        return None
    names = _unpickle(meta_file).get(key)
    if not isinstance(names, list):
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _open_cifar10(req: DataRequest, root: Path) -> ArrayDataset:
    split, common = req.split, req.common
    if split == "train":
        files = sorted(root.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
    elif split == "test":
        files = [root / "test_batch"] if (root / "test_batch").is_file() else []
    else:
        raise DataError(f"{root}: CIFAR-10 has splits train and test, not {split!r}")
    if not files:
        raise DataError(f"{root}: no CIFAR-10 {split} batches (data_batch_* / test_batch)")
    x, y = _cifar_arrays(files, "labels")
    names = _names_from(root / "batches.meta", "label_names")
    return ArrayDataset(
        spec=req.spec,
        kind="cifar10",
        where=str(root),
        source=ArraySource(x),
        labels=y,
        split=split,
        class_names=names,
        **{**common, "num_classes": common["num_classes"] or (None if names else 10)},
    )


def _open_cifar100(req: DataRequest, root: Path) -> ArrayDataset:
    split, common = req.split, req.common
    if split not in ("train", "test"):
        raise DataError(f"{root}: CIFAR-100 has splits train and test, not {split!r}")
    if not (root / split).is_file():
        raise DataError(f"{root}: no CIFAR-100 {split!r} file")
    x, y = _cifar_arrays([root / split], "fine_labels")
    names = _names_from(root / "meta", "fine_label_names")
    return ArrayDataset(
        spec=req.spec,
        kind="cifar100",
        where=str(root / split),
        source=ArraySource(x),
        labels=y,
        split=split,
        class_names=names,
        **{**common, "num_classes": common["num_classes"] or (None if names else 100)},
    )
