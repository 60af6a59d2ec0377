"""Every dataset format → batches of ``(x float32, y int64, indices)``, in a fixed order.

:func:`open_dataset` reads a spec string and returns an :class:`ArrayDataset`:

- ``data.npz``: arrays ``x``/``y`` (also ``X``/``y``, ``images``/``labels``,
  ``data``/``targets``, ``data``/``labels``, ``features``/``labels``); ``x_test``/``y_test``
  for a split; ``data.npz:xkey,ykey`` names them.  Uncompressed members are memory-mapped.
- ``x.npy,y.npy``: two arrays, memory-mapped.
- ``file.h5:/x,/y``: two HDF5 datasets, sliced lazily (keys found as for npz when the
  selector is left out).
- a directory with ``data_batch_*``/``test_batch``: CIFAR-10 python batches; with
  ``train``/``test``/``meta`` files: CIFAR-100 (fine labels).  ``cifar-10-batches-py`` and
  ``cifar-100-python`` subfolders are found.
- a directory with ``train-images-idx3-ubyte[.gz]`` etc. (or ``raw/``, ``*/raw/``): MNIST
  or Fashion-MNIST IDX files, ``t10k-*`` for ``test``.
- ``DIR/<class>/*.png|jpg|...|npy`` (or ``DIR/<split>/<class>/...``): an image folder;
  classes are the sorted folder names.  Needs Pillow for anything but ``.npy``.
- ``pkg.module:factory``: a map-style torch Dataset of ``(x, y)``; ``factory`` gets
  ``split=`` when it accepts it (a Dataset class or instance works too).

``DIR:test`` (and ``file.npz:test``) picks the split, overriding ``split``.  CIFAR batches are
unpickled with an allow-list (dicts, lists, bytes, str and numpy arrays only); anything
else is refused.  ``uint8`` inputs are images: they are scaled to [0, 1], ``(H, W)``
becomes ``(1, H, W)`` and ``(H, W, C)`` becomes ``(C, H, W)``.  Other dtypes are cast to
float32 as they are.  Labels are checked once at open (integer, >= 0, one per input);
inputs are checked for NaN/inf batch by batch.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib
import inspect
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nccli.errors import DataError, NCError, UsageError
from nccli.io._util import IMPORT_SPEC, import_object, one_line

__all__ = ["ArrayDataset", "open_dataset", "parse_normalize"]

KEY_PAIRS = (
    ("x", "y"),
    ("X", "y"),
    ("images", "labels"),
    ("data", "targets"),
    ("data", "labels"),
    ("features", "labels"),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SPLITS = ("train", "test", "val", "valid", "validation")


# --------------------------------------------------------------------------- sources


class _Source(Protocol):
    """Raw samples: ``shape`` is ``(N, ...)``; ``read`` takes sorted unique indices."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, idx: np.ndarray) -> np.ndarray: ...


class _ArraySource:
    """A numpy array, memmap or h5py dataset; contiguous runs are read as one slice."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, idx: np.ndarray) -> np.ndarray:
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo == len(idx):
            return np.asarray(self.array[lo:hi])
        if isinstance(self.array, np.ndarray):
            return self.array[idx]
        if hi - lo <= 4 * len(idx):  # one block read beats a point selection in HDF5
            return np.asarray(self.array[lo:hi])[idx - lo]
        return np.asarray(self.array[idx])


class _ImageFiles:
    """Image files decoded per batch (Pillow, or ``np.load`` for ``.npy``)."""

    def __init__(self, files: list[Path], root: Path) -> None:
        self.files = files
        self.root = root
        self.mode: str | None = None
        first = self._load(files[0])
        self.item_shape = first.shape
        self.shape = (len(files), *first.shape)
        self.dtype = first.dtype

    def _load(self, f: Path) -> np.ndarray:
        try:
            if f.suffix.lower() == ".npy":
                arr = np.load(f, allow_pickle=False)
            else:
                with _pil(f).open(f) as image:
                    if self.mode is None:
                        gray = image.mode in ("1", "L", "I", "I;16", "F")
                        self.mode = "L" if gray else "RGB"
                    arr = np.asarray(image.convert(self.mode))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{f}: cannot read image ({one_line(exc)})") from exc
        return arr

    def read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.item_shape), dtype=self.dtype)
        for j, i in enumerate(idx):
            arr = self._load(self.files[int(i)])
            if arr.shape != self.item_shape or arr.dtype != self.dtype:
                raise DataError(
                    f"{self.files[int(i)]}: image is {arr.shape} {arr.dtype} but "
                    f"{self.files[0].name} is {self.item_shape} {self.dtype}; all images in "
                    f"{self.root} must share size and type (resize them first)"
                )
            out[j] = arr
        return out


class _TorchItems:
    """A map-style torch Dataset of ``(x, y)`` items, read item by item."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset = dataset
        self.where = where
        first = self.item(0)[0]
        self.item_shape = first.shape
        self.shape = (len(dataset), *first.shape)
        self.dtype = first.dtype

    def item(self, i: int) -> tuple[np.ndarray, Any]:
        entry = self.dataset[i]
        if not isinstance(entry, (tuple, list)) or len(entry) < 2:
            raise DataError(
                f"{self.where}: item {i} is a {type(entry).__name__}; the dataset must yield "
                "(x, y) pairs"
            )
        x = entry[0]
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.asarray(x), entry[1]

    def labels(self) -> np.ndarray:
        for attr in ("targets", "labels"):
            value = getattr(self.dataset, attr, None)
            if value is not None and len(value) == self.shape[0]:
                if isinstance(value, torch.Tensor):
                    value = value.cpu().numpy()
                return np.asarray(value)
        ys = [self.item(i)[1] for i in range(self.shape[0])]
        return np.asarray([y.item() if isinstance(y, torch.Tensor) else y for y in ys])

    def read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.item_shape), dtype=self.dtype)
        for j, i in enumerate(idx):
            x = self.item(int(i))[0]
            if x.shape != self.item_shape:
                raise DataError(
                    f"{self.where}: item {int(i)} has shape {x.shape}, item 0 has "
                    f"{self.item_shape}; all inputs must share one shape"
                )
            out[j] = x
        return out


# --------------------------------------------------------------------------- the dataset


class ArrayDataset:
    """A validated dataset read in a fixed order.

    ``labels`` (int64) and ``indices`` (positions in the underlying split, ascending) cover
    the selected samples; ``input_shape`` is the per-sample shape *after* conversion
    (``(C, H, W)`` for images).  ``normalization`` is the resolved ``mean=...;std=...``
    string (``"auto"`` replaced by the numbers), or ``None``.  Close HDF5-backed datasets
    with :meth:`close` or a ``with`` block.
    """

    def __init__(
        self,
        *,
        spec: str,
        kind: str,
        where: str,
        source: _Source,
        labels: Any,
        split: str,
        limit: int | None = None,
        normalize: str | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        closers: Sequence[Callable[[], Any]] = (),
    ) -> None:
        self.spec = spec
        self.kind = kind
        self.where = where
        self.split = split
        self.limit = limit
        self.class_names = list(class_names) if class_names is not None else None
        self._source = source
        self._closers = list(closers)

        n = source.shape[0] if source.shape else 0
        if len(source.shape) < 2:
            raise DataError(
                f"{where}: inputs have shape {source.shape}; expected (N, features...) with one "
                "row per sample"
            )
        if source.dtype.kind not in "biuf":
            raise DataError(f"{where}: inputs have dtype {source.dtype}; expected numbers")
        y_all = _validate_labels(labels, where)
        if len(y_all) != n:
            raise DataError(
                f"{where}: {n} inputs but {len(y_all)} labels; they must pair up one to one"
            )
        if n == 0:
            raise DataError(f"{where}: the dataset is empty")
        top = int(y_all.max()) + 1
        if num_classes is None:
            num_classes = len(self.class_names) if self.class_names else top
        if top > num_classes:
            raise DataError(
                f"{where}: label {top - 1} is out of range for {num_classes} classes; "
                "fix the labels or the class count"
            )
        self.num_classes = int(num_classes)

        if limit is not None:
            if limit < 1:
                raise UsageError(f"--limit must be a positive integer, got {limit}")
            limit = min(limit, n)
        # Evenly spaced picks keep class-sorted sources (image folders) balanced.
        self.indices = (
            np.arange(n, dtype=np.int64)
            if limit is None
            else (np.arange(limit, dtype=np.int64) * n) // limit
        )
        self.labels = np.ascontiguousarray(y_all[self.indices])
        if len(self.indices) < self.num_classes:
            raise DataError(
                f"{where}: {len(self.indices)} samples for {self.num_classes} classes; need at "
                "least one sample per class (raise --limit or check the labels)"
            )

        item = source.shape[1:]
        self._images = source.dtype == np.uint8
        self._add_channel = self._images and len(item) == 2
        # (H, W, C) when the last axis looks like colour channels and the first does not
        self._hwc = (
            self._images
            and len(item) == 3
            and item[2] in (1, 3, 4)
            and (item[0] not in (1, 3, 4) or item[2] < item[0])
        )
        if self._add_channel:
            self.input_shape: tuple[int, ...] = (1, *item)
        elif self._hwc:
            self.input_shape = (item[2], item[0], item[1])
        else:
            self.input_shape = tuple(item)
        self._check_finite = source.dtype.kind == "f"
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        self.normalization: str | None = None
        if normalize is not None:
            self._set_normalization(normalize)

    # -- public ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    def __enter__(self) -> ArrayDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release open files (HDF5)."""
        for close in self._closers:
            close()
        self._closers.clear()

    def iter_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield ``(x float32, y int64, indices)`` over selection positions
        ``start:stop`` (all by default), in index order; rows before ``start`` are not read."""
        for x, idx, pos in self._raw_batches(batch_size, start, stop):
            if self._mean is not None and self._std is not None:
                x -= self._mean
                x /= self._std
            y = torch.from_numpy(self.labels[pos : pos + len(idx)].copy())
            yield torch.from_numpy(x), y, idx.copy()

    def describe(self) -> str:
        """One line: format, spec, split, size, classes, input shape, preprocessing."""
        shape = "x".join(str(s) for s in self.input_shape)
        parts = [
            f"{self.kind} {self.spec} [{self.split}]: {len(self)} samples",
            f"{self.num_classes} classes",
            f"input {shape} (stored {self._source.dtype})",
        ]
        if len(self) < self._source.shape[0]:
            parts.append(f"{len(self)} of {self._source.shape[0]} evenly spaced")
        if self.normalization:
            parts.append(f"normalize {self.normalization}")
        return ", ".join(parts)

    def digest(self) -> str:
        """sha256 of spec, split, selection, preprocessing, input shape and labels (cheap)."""
        h = hashlib.sha256()
        head = (
            f"{self.spec}|{self.split}|{len(self)}/{self._source.shape[0]}|"
            f"{self.normalization}|{self.input_shape}|{self.num_classes}"
        )
        h.update(head.encode())
        h.update(self.indices.tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    # -- internals ---------------------------------------------------------------------

    def _raw_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(self.indices)
        stop = n if stop is None else max(0, min(int(stop), n))
        for pos in range(max(0, int(start)), stop, batch_size):
            idx = self.indices[pos : min(pos + batch_size, stop)]
            yield self._convert(self._source.read(idx), idx), idx, pos

    def _convert(self, raw: np.ndarray, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(raw).astype(np.float32)  # always a fresh array: safe to edit in place
        if self._images:
            np.divide(x, 255.0, out=x)
            if self._add_channel:
                x = x[:, None]
            elif self._hwc:
                x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        if self._check_finite:
            ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not ok.all():
                bad = int(idx[int(np.argmin(ok))])
                raise DataError(
                    f"{self.where}: sample {bad} has NaN or infinite values; clean the inputs"
                )
        return x

    def _set_normalization(self, normalize: str) -> None:
        channels = self.input_shape[0]
        if normalize.strip().lower() == "auto":
            mean, std = self._channel_stats()
        else:
            mean, std = parse_normalize(normalize)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise UsageError(
                    f"--normalize: {name} has {len(values)} values but {self.where} has "
                    f"{channels} channels; give 1 or {channels}"
                )
        bshape = (1, channels) + (1,) * (len(self.input_shape) - 1)
        self._mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).reshape(bshape)
        self._std = np.broadcast_to(np.asarray(std, np.float32), (channels,)).reshape(bshape)
        fmt = ",".join
        self.normalization = (
            f"mean={fmt(f'{v:.6g}' for v in mean)};std={fmt(f'{v:.6g}' for v in std)}"
        )

    def _channel_stats(self) -> tuple[list[float], list[float]]:
        channels = self.input_shape[0]
        total = np.zeros(channels)
        total_sq = np.zeros(channels)
        count = 0
        for x, _, _ in self._raw_batches(1024):
            axes = (0, *range(2, x.ndim))
            x64 = x.astype(np.float64)
            total += x64.sum(axis=axes)
            total_sq += np.square(x64).sum(axis=axes)
            count += x.size // channels
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        std[std == 0] = 1.0  # a constant channel is only shifted
        return mean.tolist(), std.tolist()


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    """``"mean=0.5,0.5,0.5;std=0.2,0.2,0.2"`` or a preset name → ``(mean, std)``.

    Presets: ``cifar10``, ``cifar100``, ``mnist``, ``imagenet``.  ``"auto"`` is resolved
    by :class:`ArrayDataset` from the data itself.
    """
    preset = NORMALIZE_PRESETS.get(text.strip().lower())
    if preset is not None:
        return list(preset[0]), list(preset[1])
    values: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, rest = part.partition("=")
        key = key.strip().lower()
        try:
            numbers = [float(v) for v in rest.split(",")]
        except ValueError:
            numbers = []
        if not eq or key not in ("mean", "std") or not numbers:
            raise UsageError(
                f"--normalize {text!r}: expected 'mean=a,b,c;std=d,e,f', 'auto' or one of "
                f"{', '.join(NORMALIZE_PRESETS)}"
            )
        values[key] = numbers
    if set(values) != {"mean", "std"}:
        raise UsageError(f"--normalize {text!r}: give both mean= and std=")
    if any(not math.isfinite(v) for v in values["mean"] + values["std"]) or any(
        v <= 0 for v in values["std"]
    ):
        raise UsageError(f"--normalize {text!r}: values must be finite and std positive")
    return values["mean"], values["std"]


def _validate_labels(labels: Any, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{where}: labels have shape {y.shape}; expected one class index per sample "
            "(take the argmax of one-hot labels)"
        )
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            bad = int(np.argmax(~np.isfinite(y) | (y != np.round(y))))
            raise DataError(
                f"{where}: labels must be whole numbers, found {y[bad].item()!r} at index {bad}"
            )
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have dtype {y.dtype}; expected integer class indices")
    if len(y) and y.min() < 0:
        bad = int(np.argmin(y))
        raise DataError(f"{where}: labels must be >= 0, found {y[bad].item()} at index {bad}")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- entry point


def open_dataset(
    spec: str | Path,
    *,
    split: str = "train",
    limit: int | None = None,
    normalize: str | None = None,
    num_classes: int | None = None,
) -> ArrayDataset:
    """Open the dataset named by ``spec`` (see the module docstring for the formats).

    ``limit`` keeps that many samples, evenly spaced over the split; ``normalize`` is
    ``"mean=...;std=..."``, a preset or ``"auto"`` (per-channel statistics of the selected
    samples, one extra pass).  ``num_classes`` overrides the class count taken from the
    format's metadata or ``max(label) + 1``.  Errors are :class:`~nccli.errors.DataError`
    naming the file, or :class:`~nccli.errors.UsageError` for a malformed spec.
    """
    text = str(spec)
    common = {"limit": limit, "normalize": normalize, "num_classes": num_classes}
    path, selector = _locate(text)
    if path is None:
        return _open_factory(text, split, common)
    if isinstance(path, tuple):
        return _open_npy_pair(text, path, split, common)
    if selector and (path.is_dir() or ("," not in selector and selector in _SPLITS)):
        split, selector = selector, None  # DIR:test, data.npz:test
    if path.is_dir():
        return _open_directory(text, path, split, common)
    with path.open("rb") as f:
        magic = f.read(8)
    if magic == _HDF5_MAGIC:
        return _open_hdf5(text, path, selector, split, common)
    if magic[:2] == b"PK":
        return _open_npz(text, path, selector, split, common)
    if magic[:6] == b"\x93NUMPY":
        raise DataError(f"{path}: a single .npy holds no labels; pass 'inputs.npy,labels.npy'")
    raise DataError(
        f"{path}: unrecognised dataset file; expected .npz, HDF5 ('file.h5:/x,/y'), a pair "
        "'x.npy,y.npy', a CIFAR/MNIST/image-folder directory or 'pkg.module:factory'"
    )


def _locate(text: str) -> tuple[Path | tuple[Path, Path] | None, str | None]:
    """Split a spec into (path or npy pair or None for an import string, selector)."""
    if Path(text).exists():
        return Path(text), None
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().lower().endswith(".npy") for p in parts):
        pair = (Path(parts[0].strip()), Path(parts[1].strip()))
        for p in pair:
            if not p.exists():
                raise DataError(f"{p}: no such file; check the path")
        return pair, None
    if ":" in text:
        head, _, sel = text.rpartition(":")
        if Path(head).exists():
            return Path(head), sel.strip() or None
        if IMPORT_SPEC.match(text):
            return None, None
        raise DataError(f"{head}: no such file or directory; check the path")
    raise DataError(f"{text}: no such file or directory; check the path")


def _pick_keys(
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


# --------------------------------------------------------------------------- arrays


def _open_npz(
    spec: str, path: Path, selector: str | None, split: str, common: dict[str, Any]
) -> ArrayDataset:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            xk, yk = _pick_keys(keys, selector, split, path)
            x = _npz_member(path, zf, xk)
            y = _npz_member(path, zf, yk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .npz ({one_line(exc)}); re-create the file") from exc
    where = f"{path}:{xk},{yk}"
    return ArrayDataset(
        spec=spec, kind="npz", where=where, source=_ArraySource(x), labels=y, split=split, **common
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


def _open_npy_pair(
    spec: str, pair: tuple[Path, Path], split: str, common: dict[str, Any]
) -> ArrayDataset:
    arrays = []
    for p in pair:
        try:
            arrays.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except Exception as exc:
            raise DataError(f"{p}: cannot read .npy ({one_line(exc)})") from exc
    return ArrayDataset(
        spec=spec,
        kind="npy",
        where=f"{pair[0]},{pair[1]}",
        source=_ArraySource(arrays[0]),
        labels=np.asarray(arrays[1]),
        split=split,
        **common,
    )


def _open_hdf5(
    spec: str, path: Path, selector: str | None, split: str, common: dict[str, Any]
) -> ArrayDataset:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open HDF5 file ({one_line(exc)})") from exc
    try:
        keys = [k for k in f if isinstance(f[k], h5py.Dataset)]
        xk, yk = _pick_keys(
            keys, selector, split, path, lambda n: isinstance(f.get(n), h5py.Dataset)
        )
        labels = np.asarray(f[yk][()])
        return ArrayDataset(
            spec=spec,
            kind="hdf5",
            where=f"{path}:{xk},{yk}",
            source=_ArraySource(f[xk]),
            labels=labels,
            split=split,
            closers=[f.close],
            **common,
        )
    except BaseException:
        f.close()
        raise


# --------------------------------------------------------------------------- directories


def _open_directory(spec: str, root: Path, split: str, common: dict[str, Any]) -> ArrayDataset:
    for sub in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if sub.is_dir() and (any(sub.glob("data_batch_*")) or (sub / "test_batch").is_file()):
            return _open_cifar10(spec, sub, split, common)
        if (
            sub.is_dir()
            and (sub / "meta").is_file()
            and ((sub / "train").is_file() or (sub / "test").is_file())
        ):
            return _open_cifar100(spec, sub, split, common)
    for sub in (root, root / "raw", *sorted(root.glob("*/raw"))):
        if sub.is_dir() and any(sub.glob("*-idx[13]-ubyte*")):
            return _open_idx(spec, sub, split, common)
    return _open_image_folder(spec, root, split, common)


class _RestrictedUnpickler(pickle.Unpickler):
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
            obj = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read CIFAR batch ({one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


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


def _open_cifar10(spec: str, root: Path, split: str, common: dict[str, Any]) -> ArrayDataset:
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
        spec=spec,
        kind="cifar10",
        where=str(root),
        source=_ArraySource(x),
        labels=y,
        split=split,
        class_names=names,
        **{**common, "num_classes": common["num_classes"] or (None if names else 10)},
    )


def _open_cifar100(spec: str, root: Path, split: str, common: dict[str, Any]) -> ArrayDataset:
    if split not in ("train", "test"):
        raise DataError(f"{root}: CIFAR-100 has splits train and test, not {split!r}")
    if not (root / split).is_file():
        raise DataError(f"{root}: no CIFAR-100 {split!r} file")
    x, y = _cifar_arrays([root / split], "fine_labels")
    names = _names_from(root / "meta", "fine_label_names")
    return ArrayDataset(
        spec=spec,
        kind="cifar100",
        where=str(root / split),
        source=_ArraySource(x),
        labels=y,
        split=split,
        class_names=names,
        **{**common, "num_classes": common["num_classes"] or (None if names else 100)},
    )


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
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


def _open_idx(spec: str, root: Path, split: str, common: dict[str, Any]) -> ArrayDataset:
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
        spec=spec,
        kind="mnist-idx",
        where=str(images),
        source=_ArraySource(_read_idx(images)),
        labels=np.asarray(_read_idx(labels)),
        split=split,
        **{**common, "num_classes": common["num_classes"] or 10},
    )


def _pil(path: Path) -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            f"{path}: reading {path.suffix} images needs Pillow; pip install pillow (or store "
            "the images as .npy)"
        ) from exc
    return Image


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _open_image_folder(spec: str, root: Path, split: str, common: dict[str, Any]) -> ArrayDataset:
    subdirs = _class_dirs(root)
    split_dirs = [d for d in subdirs if d.name in _SPLITS and _class_dirs(d)]
    if split_dirs:
        chosen = next((d for d in split_dirs if d.name == split), None)
        if chosen is None:
            raise DataError(
                f"{root}: has no {split!r} split (found: {', '.join(d.name for d in split_dirs)})"
            )
        root, subdirs = chosen, _class_dirs(chosen)
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(subdirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(f)
                labels.append(k)
    if not files:
        raise DataError(
            f"{root}: no dataset found (no CIFAR batches, MNIST IDX files or "
            f"<class>/<image> folders with {', '.join(IMAGE_SUFFIXES)})"
        )
    if any(f.suffix.lower() != ".npy" for f in files):
        _pil(next(f for f in files if f.suffix.lower() != ".npy"))
    return ArrayDataset(
        spec=spec,
        kind="image-folder",
        where=str(root),
        source=_ImageFiles(files, root),
        labels=np.asarray(labels, dtype=np.int64),
        split=split,
        class_names=[d.name for d in subdirs],
        **common,
    )


# --------------------------------------------------------------------------- factories


def _open_factory(spec: str, split: str, common: dict[str, Any]) -> ArrayDataset:
    obj = import_object(spec, flag="--data")
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__getitem__")):
        try:
            params = inspect.signature(obj).parameters
            takes_split = "split" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):
            takes_split = False
        try:
            obj = obj(split=split) if takes_split else obj()
        except NCError:
            raise
        except Exception as exc:
            raise DataError(
                f"{spec}: the dataset factory failed with {type(exc).__name__}: "
                f"{one_line(exc)}; run with --debug for the traceback"
            ) from exc
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise DataError(
            f"{spec}: returned a {type(obj).__name__}, not a map-style Dataset with "
            "__len__ and __getitem__"
        )
    if len(obj) == 0:
        raise DataError(f"{spec}: the dataset is empty")
    source = _TorchItems(obj, spec)
    names = getattr(obj, "classes", None)
    return ArrayDataset(
        spec=spec,
        kind="torch",
        where=spec,
        source=source,
        labels=source.labels(),
        split=split,
        class_names=[str(c) for c in names] if isinstance(names, (list, tuple)) else None,
        **common,
    )
