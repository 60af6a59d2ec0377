"""The dataset every format opens into: checks once at open, then batches in a fixed order.

:class:`ArrayDataset` wraps a :class:`Source` (raw samples, read by sorted indices) and its
labels.  Labels are checked once at open (integer, >= 0, one per input); inputs are
checked for NaN/inf batch by batch.  ``limit`` keeps evenly spaced samples; the layout
and normalisation come from :mod:`nccli.io.datasets.preprocess`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from nccli.errors import DataError, UsageError
from nccli.io.datasets.preprocess import Layout, channel_stats, normalization, parse_normalize

__all__ = ["ArrayDataset", "ArraySource", "Source", "validate_labels"]


class Source(Protocol):
    """Raw samples: ``shape`` is ``(N, ...)``; ``read`` takes sorted unique indices."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, idx: np.ndarray) -> np.ndarray: ...


class ArraySource:
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
        source: Source,
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

        y_all = _paired_labels(source, labels, where)
        self.num_classes = _class_count(y_all, num_classes, self.class_names, where)
        self.indices = _spread(len(y_all), limit)
        self.labels = np.ascontiguousarray(y_all[self.indices])
        if len(self.indices) < self.num_classes:
            raise DataError(
                f"{where}: {len(self.indices)} samples for {self.num_classes} classes; need at "
                "least one sample per class (raise --limit or check the labels)"
            )

        self._layout = Layout.of(source.shape[1:], source.dtype)
        self.input_shape: tuple[int, ...] = self._layout.input_shape
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
        x = self._layout.to_float(raw)
        if self._check_finite:
            ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not ok.all():
                bad = int(idx[int(np.argmin(ok))])
                raise DataError(
                    f"{self.where}: sample {bad} has NaN or infinite values; clean the inputs"
                )
        return x

    def _set_normalization(self, normalize: str) -> None:
        if normalize.strip().lower() == "auto":
            batches = (x for x, _, _ in self._raw_batches(1024))
            mean, std = channel_stats(batches, self.input_shape[0])
        else:
            mean, std = parse_normalize(normalize)
        self._mean, self._std, self.normalization = normalization(
            mean, std, self.input_shape, self.where
        )


# --------------------------------------------------------------------------- open-time checks


def _paired_labels(source: Source, labels: Any, where: str) -> np.ndarray:
    """Check the inputs' shape and dtype and return the labels, one per input."""
    n = source.shape[0] if source.shape else 0
    if len(source.shape) < 2:
        raise DataError(
            f"{where}: inputs have shape {source.shape}; expected (N, features...) with one "
            "row per sample"
        )
    if source.dtype.kind not in "biuf":
        raise DataError(f"{where}: inputs have dtype {source.dtype}; expected numbers")
    y_all = validate_labels(labels, where)
    if len(y_all) != n:
        raise DataError(
            f"{where}: {n} inputs but {len(y_all)} labels; they must pair up one to one"
        )
    if n == 0:
        raise DataError(f"{where}: the dataset is empty")
    return y_all


def _class_count(
    y_all: np.ndarray, num_classes: int | None, class_names: list[str] | None, where: str
) -> int:
    """The class count: given, else the format's class names, else ``max(label) + 1``."""
    top = int(y_all.max()) + 1
    if num_classes is None:
        num_classes = len(class_names) if class_names else top
    if top > num_classes:
        raise DataError(
            f"{where}: label {top - 1} is out of range for {num_classes} classes; "
            "fix the labels or the class count"
        )
    return int(num_classes)


def _spread(n: int, limit: int | None) -> np.ndarray:
    """All ``n`` positions, or ``limit`` of them evenly spaced."""
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be a positive integer, got {limit}")
        limit = min(limit, n)
    # Evenly spaced picks keep class-sorted sources (image folders) balanced.
    return (
        np.arange(n, dtype=np.int64)
        if limit is None
        else (np.arange(limit, dtype=np.int64) * n) // limit
    )


def validate_labels(labels: Any, where: str) -> np.ndarray:
    """Labels as int64 class indices: 1-d (or ``(N, 1)``), whole, non-negative."""
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
