"""CIFAR-10 / CIFAR-100 python batches, unpickled with an allow-list.

A directory with ``data_batch_*``/``test_batch`` is CIFAR-10; one with ``train``/``test``
and ``meta`` is CIFAR-100 (fine labels).  ``cifar-10-batches-py`` and ``cifar-100-python``
subfolders are found.  The batches are pickles, so they go through
:class:`RestrictedUnpickler`: dicts, lists, bytes, str and plain numeric numpy arrays
only; any other global is refused before it is imported, and an array is built only
once its dtype is numeric and its data length fits its shape (an object array whose
stored items fall short of its shape made numpy read past them and crash).
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.io._util import check_input_file, one_line
from nccli.io.datasets.base import ArrayDataset, ArraySource
from nccli.io.datasets.request import DataRequest

__all__ = ["RestrictedUnpickler", "find_cifar", "open_cifar"]


# --------------------------------------------------------------------------- detection


def _is_cifar10(sub: Path) -> bool:
    return sub.is_dir() and (
        any(p.is_file() for p in sub.glob("data_batch_*")) or (sub / "test_batch").is_file()
    )


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

#: dtype kinds a CIFAR batch may hold: bool, signed and unsigned integers, floats
_KINDS = "biuf"
_MAX_DEPTH = 16  # CIFAR batches are a dict of lists and arrays: two levels


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists, str, bytes and plain numeric numpy arrays; refuse the rest.

    Only the globals numpy's own pickles name are known, and none of them is the real
    numpy callable: a dtype must be a plain numeric type (not object, void, structured or
    a subarray, which could make numpy read or free memory it does not own), and an
    array's data length must match its shape and dtype before the array is built.
    Arrays stand in as :class:`_PendingArray` while unpickling; :meth:`load` returns
    the object with real arrays in their place.
    """

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def refuse(self, what: str) -> DataError:
        return DataError(
            f"{self.where}: refusing to unpickle {what}; CIFAR batches hold only dicts, lists, "
            "strings and numeric numpy arrays, so this file is not one (or was tampered with)"
        )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return lambda *args: _PendingDtype(self, *args)
        if (module, name) == ("_codecs", "encode"):
            return self._encode
        if module in ("__builtin__", "builtins") and name == "bytes":
            return self._empty_bytes
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return lambda cls, *_: self._reconstruct(cls)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return self._frombuffer
        raise self.refuse(f"{module}.{name}")

    def load(self) -> Any:
        obj = super().load()
        return _resolve(obj, self, 0, {})

    def _encode(self, text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
        """``_codecs.encode(str, 'latin1')``: how protocol 2 writes bytes."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self.refuse(
                f"_codecs.encode of a {type(text).__name__} as {str(encoding)[:20]!r}"
            )
        return text.encode("latin1")

    def _empty_bytes(self, *args: Any) -> bytes:
        """``bytes()``: how protocol 2 writes ``b""`` (an empty array's data)."""
        if args:
            raise self.refuse("bytes() with arguments")
        return b""

    def _reconstruct(self, cls: Any) -> _PendingArray:
        if cls is not _NDARRAY:
            raise self.refuse("an array of a class other than numpy.ndarray")
        return _PendingArray(self)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
        """Protocol 5's ``_frombuffer(buffer, dtype, shape, order)``, checked."""
        if order not in ("C", "F"):
            raise self.refuse(f"an array of order {order!r}")
        return _build_array(self, buf, dtype, shape, order == "F")


_NDARRAY = object()  # stands for numpy.ndarray: only ever an argument of _reconstruct


class _PendingDtype:
    """A pickled ``numpy.dtype(spec, align, copy)`` whose state is not set yet."""

    def __init__(self, up: RestrictedUnpickler, spec: Any = None, *_: Any) -> None:
        self.up = up
        text = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if not (isinstance(text, str) and re.fullmatch(r"b1|[iu][1248]|f[248]", text)):
            raise up.refuse(f"numpy dtype {str(spec)[:40]!r} (only numeric dtypes)")
        self.dtype = np.dtype(text)

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5) or state[2:5] != (None,) * 3:
            raise self.up.refuse("a structured or subarray numpy dtype")
        if len(state) >= 8 and state[7] != 0:
            raise self.up.refuse("a numpy dtype with object flags")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise self.up.refuse(f"a numpy dtype of byte order {str(order)[:10]!r}")
        self.dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype


class _PendingArray:
    """``_reconstruct(ndarray, ...)``: the array is built by :meth:`__setstate__`."""

    def __init__(self, up: RestrictedUnpickler) -> None:
        self.up = up
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, data), or the same without the version
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise self.up.refuse("an array with a malformed state")
        _, shape, dtype, fortran, data = state
        self.array = _build_array(self.up, data, dtype, shape, bool(fortran))


def _build_array(
    up: RestrictedUnpickler, data: Any, dtype: Any, shape: Any, fortran: bool
) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` from ``data``, once its length fits exactly."""
    if not isinstance(dtype, _PendingDtype) or dtype.dtype.kind not in _KINDS:
        raise up.refuse("an array whose dtype is not a plain numeric one")
    if not isinstance(data, (bytes, bytearray)):
        raise up.refuse(f"an array whose data is a {type(data).__name__}, not bytes")
    if not (
        isinstance(shape, tuple)
        and len(shape) <= 32
        and all(type(s) is int and s >= 0 for s in shape)
    ):
        raise up.refuse(f"an array of shape {str(shape)[:60]}")
    need = math.prod(shape) * dtype.dtype.itemsize
    if len(data) != need:
        raise up.refuse(
            f"an array of shape {shape} {dtype.dtype} stored in {len(data)} bytes (it needs {need})"
        )
    flat = np.frombuffer(data, dtype=dtype.dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _resolve(obj: Any, up: RestrictedUnpickler, depth: int, done: dict[int, Any]) -> Any:
    """``obj`` with every pending array replaced by its array (and a dtype by its dtype);
    ``done`` maps the id of each container already resolved to its result, so an object
    the pickle shares many times is resolved once."""
    if depth > _MAX_DEPTH:
        raise up.refuse(f"containers nested more than {_MAX_DEPTH} deep (or containing themselves)")
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise up.refuse("an array without its data")
        return obj.array
    if isinstance(obj, _PendingDtype):
        return obj.dtype
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, dict):
        out: Any = {
            _resolve(k, up, depth + 1, done): _resolve(v, up, depth + 1, done)
            for k, v in obj.items()
        }
    else:
        items = [_resolve(v, up, depth + 1, done) for v in obj]
        out = items if isinstance(obj, list) else tuple(items)
    done[id(obj)] = out
    return out


def _unpickle(path: Path) -> dict[str, Any]:
    check_input_file(path, "CIFAR batch")  # a FIFO named like a batch would hang the read
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
        ys.append(_labels(f, labels, label_key))
        if len(ys[-1]) != len(xs[-1]):
            raise DataError(f"{f}: {len(xs[-1])} images but {len(ys[-1])} labels")
    return np.concatenate(xs), np.concatenate(ys)


def _labels(f: Path, labels: Any, label_key: str) -> np.ndarray:
    """The labels as a 1-d int64 array: a list of ints, or an integer array."""
    if isinstance(labels, list) and all(type(v) is int for v in labels):
        if labels and not -(2**63) <= min(labels) <= max(labels) < 2**63:
            raise DataError(f"{f}: CIFAR {label_key!r} holds integers beyond int64")
        return np.asarray(labels, dtype=np.int64)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    raise DataError(
        f"{f}: CIFAR {label_key!r} is not a list of integers ({type(labels).__name__}); "
        "the batch is damaged or not CIFAR"
    )


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
        # a batch that is no regular file (a FIFO, a device) is refused in _unpickle
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
