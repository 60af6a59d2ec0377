"""The dataset every format opens into: checks once at open, then batches in a fixed order.

:class:`ArrayDataset` wraps a :class:`Source` (raw samples, read by sorted indices) and its
labels.  Labels are checked once at open (integer, >= 0, one per input); inputs are
checked for NaN/inf batch by batch.  ``limit`` keeps evenly spaced samples; the layout
and normalisation come from :mod:`nccli.io.datasets.preprocess`.  :class:`InputsHash`
hashes the raw inputs as they are read (the content half of a dataset's identity;
:meth:`ArrayDataset.digest` is the cheap half: spec, selection, labels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from nccli.errors import DataError, UsageError
from nccli.io.datasets.preprocess import (
    NORMALIZE_PRESETS,
    PIXEL_PROBE,
    Layout,
    channel_stats,
    needs_normalize,
    normalization,
    parse_normalize,
    pixel_data,
)

__all__ = ["ArrayDataset", "ArraySource", "InputsHash", "Source", "block_rows", "validate_labels"]

#: rows per block of the inputs' digest, doubled until a range has at most MAX_BLOCKS
BLOCK_ROWS = 4096
MAX_BLOCKS = 512
#: bytes of raw inputs read at once when hashing without the model
_HASH_READ_BYTES = 64 << 20


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


def block_rows(n: int) -> int:
    """Rows per block of the inputs' digest of ``n`` rows: ``BLOCK_ROWS``, doubled until
    there are at most ``MAX_BLOCKS`` blocks (a function of ``n`` only, never of the batch
    size)."""
    b = BLOCK_ROWS
    while -(-n // b) > MAX_BLOCKS:
        b *= 2
    return b


class InputsHash:
    """SHA-256 of the raw inputs of selection positions ``start:stop``, fed in order.

    Rows are hashed in blocks of :func:`block_rows` rows counted from ``start``, each block
    on its own (so a resumed run can check the rows it already has);
    :meth:`hexdigest` is the SHA-256 of a header (dtype with byte order, row shape,
    block size, row count) followed by the block digests.  :meth:`blocks` is the
    ``(n_blocks, 32)`` uint8 table of the digests so far: the last block hashed may be
    partial, blocks not reached are zeros.
    """

    def __init__(self, dtype: Any, row_shape: Sequence[int], start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)
        n = self.stop - self.start
        self.block = block_rows(n)
        self.n_blocks = max(1, -(-n // self.block))
        dt, shape = np.dtype(dtype).str, tuple(int(s) for s in row_shape)
        self._header = f"nccli-inputs-1|{dt}|{shape}|{self.block}|{n}".encode()
        self._done: list[bytes] = []
        self._h = hashlib.sha256()
        self.rows = 0  # rows hashed, from ``start``

    def update(self, pos: int, raw: np.ndarray) -> None:
        """Hash the rows of ``raw``, which hold selection positions ``pos:pos+len(raw)``
        (the next rows, in order)."""
        if pos != self.start + self.rows or pos + len(raw) > self.stop:
            raise ValueError(
                f"inputs hashed out of order: rows from {pos}, expected {self.start + self.rows}"
            )
        flat = np.ascontiguousarray(raw).reshape(len(raw), -1)
        i = 0
        while i < len(flat):
            take = min(self.block - self.rows % self.block, len(flat) - i)
            self._h.update(flat[i : i + take])
            i += take
            self.rows += take
            if self.rows % self.block == 0:
                self._done.append(self._h.digest())
                self._h = hashlib.sha256()

    def blocks(self) -> np.ndarray:
        """The block digests so far, ``(n_blocks, 32)`` uint8 (see the class)."""
        out = np.zeros((self.n_blocks, 32), dtype=np.uint8)
        done = list(self._done)
        if self.rows % self.block:
            done.append(self._h.copy().digest())
        if done:
            out[: len(done)] = np.frombuffer(b"".join(done), dtype=np.uint8).reshape(-1, 32)
        return out

    def hexdigest(self) -> str:
        """The digest of every row of ``start:stop`` (all of them must have been fed)."""
        if self.rows != self.stop - self.start:
            raise ValueError(f"{self.rows} of {self.stop - self.start} rows hashed")
        h = hashlib.sha256(self._header)
        h.update(self.blocks().tobytes())
        return h.hexdigest()


class ArrayDataset:
    """A validated dataset read in a fixed order.

    ``labels`` (int64) and ``indices`` (positions in the underlying split, ascending) cover
    the selected samples; ``input_shape`` is the per-sample shape *after* conversion
    (``(C, H, W)`` for images).  ``normalization`` records what is applied to the stored
    values: ``"none"``, ``"mean=...;std=..."`` (``"auto"`` replaced by the numbers), each
    after ``"uint8/255 then "`` for ``uint8`` inputs (``"uint8/255"`` alone for ``none``).
    :meth:`require_normalize` refuses image data opened without an explicit ``normalize``.
    Close HDF5-backed datasets with :meth:`close` or a ``with`` block.
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
        self._normalize = normalize
        self._values: str | None = None  # the mean=...;std=... text (part of digest())
        if normalize is not None and normalize.strip().lower() != "none":
            self._set_normalization(normalize)
        scaled = "uint8/255" if self._layout.images else None
        self.normalization: str = " then ".join(filter(None, (scaled, self._values))) or "none"

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
        self,
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
        *,
        inputs: InputsHash | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield ``(x float32, y int64, indices)`` over selection positions
        ``start:stop`` (all by default), in index order; rows before ``start`` are not read.
        ``inputs`` hashes the raw rows as they are read (before a batch is yielded)."""
        for x, idx, pos in self._raw_batches(batch_size, start, stop, inputs):
            if self._mean is not None and self._std is not None:
                x -= self._mean
                x /= self._std
            y = torch.from_numpy(self.labels[pos : pos + len(idx)].copy())
            yield torch.from_numpy(x), y, idx.copy()

    def pixel_data(self) -> str | None:
        """Why these inputs are image data (``"uint8"``, ``"float32 in 0..255"``: see
        :func:`~nccli.io.datasets.preprocess.pixel_data`), or ``None``."""
        if self._layout.images:
            return "uint8"
        idx = self.indices[: min(len(self), PIXEL_PROBE)]
        return pixel_data(self._source.dtype, self._source.read(idx))

    def require_normalize(self) -> list[str]:
        """Refuse (``UsageError``, one line) image data opened without ``normalize``, and a
        preset on image data that are not scaled to [0, 1]; the notes to show (what
        ``auto`` chose)."""
        given = self._normalize.strip().lower() if self._normalize is not None else None
        what = self.pixel_data()
        if what is not None and (given is None or (what != "uint8" and given in NORMALIZE_PRESETS)):
            raise UsageError(needs_normalize(what, f"--data {self.spec}"))
        if given != "auto":
            return []
        return [
            f"--normalize auto: {self.normalization} (statistics of these {len(self)} "
            "samples, not necessarily what the model was trained with; pass the training "
            "values or a preset to be sure)"
        ]

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
        parts.append(f"preprocessing {self.normalization}")
        return ", ".join(parts)

    def inputs_hash(self, start: int = 0, stop: int | None = None) -> InputsHash:
        """A fresh :class:`InputsHash` of selection positions ``start:stop``."""
        stop = len(self) if stop is None else int(stop)
        return InputsHash(self._source.dtype, self._source.shape[1:], start, stop)

    def hash_inputs(self, inputs: InputsHash, stop: int) -> InputsHash:
        """Read the raw rows from where ``inputs`` is up to position ``stop`` and hash them
        (no conversion, no model: what the skip and resume checks need)."""
        row_bytes = max(1, self._source.dtype.itemsize * int(np.prod(self._source.shape[1:])))
        chunk = max(1, _HASH_READ_BYTES // row_bytes)
        for pos in range(inputs.start + inputs.rows, int(stop), chunk):
            idx = self.indices[pos : min(pos + chunk, int(stop))]
            inputs.update(pos, self._source.read(idx))
        return inputs

    def digest(self) -> str:
        """sha256 of spec, split, selection, preprocessing, input shape and labels (cheap;
        the inputs' values are hashed by :class:`InputsHash`)."""
        h = hashlib.sha256()
        head = (
            f"{self.spec}|{self.split}|{len(self)}/{self._source.shape[0]}|"
            f"{self._values}|{self.input_shape}|{self.num_classes}"
        )
        h.update(head.encode())
        h.update(self.indices.tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    # -- internals ---------------------------------------------------------------------

    def _raw_batches(
        self,
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
        inputs: InputsHash | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(self.indices)
        stop = n if stop is None else max(0, min(int(stop), n))
        for pos in range(max(0, int(start)), stop, batch_size):
            idx = self.indices[pos : min(pos + batch_size, stop)]
            raw = self._source.read(idx)
            if inputs is not None:
                inputs.update(pos, raw)
            yield self._convert(raw, idx), idx, pos

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
        self._mean, self._std, self._values = normalization(mean, std, self.input_shape, self.where)


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
