"""The extraction pipeline around the forward pass: prefetching batches, copying results
to the host, and writing them from a background thread.

Batches are loaded (and pinned, on CUDA) ``depth`` ahead in a thread (:func:`prefetch`);
features go to pinned host buffers by non-blocking copies (:func:`to_host`); a writer
thread appends them to the cache in order (:class:`BackgroundWriter`, bounded queue), so
HDF5 writes overlap the next forward while memory stays flat.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nccli.errors import CacheError, DataError
from nccli.io._util import one_line
from nccli.io.cache import CacheWriter

__all__ = ["WRITE_QUEUE", "BackgroundWriter", "Rows", "iter_rows", "prefetch", "to_host"]

#: batches the writer thread may lag behind the forward pass
WRITE_QUEUE = 3


@dataclass
class Rows:
    start: int
    labels: np.ndarray
    indices: np.ndarray
    features: dict[str, torch.Tensor]
    logits: torch.Tensor
    ready: torch.cuda.Event | None = None
    rows_read: int | None = None  # dataset rows consumed (--skip-nonfinite drops some)
    skipped: np.ndarray | None = None  # samples dropped per class so far
    inputs: tuple[int, int, np.ndarray] | None = None  # digests of the inputs read so far


class BackgroundWriter:
    """Writes batches into a :class:`CacheWriter` from a thread, in order, flushing each.

    ``submit`` blocks while ``WRITE_QUEUE`` batches are pending (flat memory) and
    re-raises an error the thread hit; ``close`` drains the queue and joins.
    """

    def __init__(self, writer: CacheWriter) -> None:
        self.writer = writer
        self.error: BaseException | None = None
        self._q: queue.Queue[Rows | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._thread = threading.Thread(target=self._run, name="nccli-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            try:
                if item.ready is not None:
                    item.ready.synchronize()
                feats = {k: np.ascontiguousarray(v.numpy()) for k, v in item.features.items()}
                self.writer.write_rows(  # flushes; a failed write raises one DataError
                    item.start,
                    item.labels,
                    item.indices,
                    feats,
                    item.logits.numpy(),
                    rows_read=item.rows_read,
                    skipped=item.skipped,
                    inputs=item.inputs,
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, OSError):
                raise DataError(
                    f"{self.writer.tmp}: writing the cache failed ({one_line(err)}); check the "
                    "disk space and that the output directory is writable"
                ) from err
            raise err

    def submit(self, item: Rows) -> None:
        while True:
            self._raise()
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise CacheError(f"{self.writer.tmp}: the writer thread stopped") from None

    def close(self) -> None:
        """Write what is queued, stop the thread, re-raise its error."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()


def iter_rows(
    ds: Any, start: int, stop: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Batches of dataset positions ``start:stop`` (rows before ``start`` are not read)."""
    if start >= stop:
        return
    yield from ds.iter_batches(batch_size, start, stop)


def prefetch(it: Iterator[Any], depth: int, prepare: Callable[[Any], Any]) -> Iterator[Any]:
    """Run ``it`` (and ``prepare`` on each item) in a thread, ``depth`` items ahead."""
    if depth <= 0:
        for item in it:
            yield prepare(item)
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(("item", prepare(item)))
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(("error", exc))

    t = threading.Thread(target=run, name="nccli-loader", daemon=True)
    t.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def to_host(
    feats: dict[str, torch.Tensor], logits: torch.Tensor, cuda: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.cuda.Event | None]:
    """Host copies for the writer thread; on CUDA pinned buffers filled with
    non-blocking copies and an event the writer waits on (the pinned blocks are
    recycled by torch's caching host allocator)."""
    if not cuda:
        return {k: v.cpu() for k, v in feats.items()}, logits.cpu(), None

    def pinned(v: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        buf.copy_(v, non_blocking=True)
        return buf

    host = {k: pinned(v) for k, v in feats.items()}
    host_logits = pinned(logits)
    ready = torch.cuda.Event()
    ready.record()
    return host, host_logits, ready
