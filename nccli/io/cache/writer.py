"""Writing a cache: ``<path>.partial`` row by row, renamed into place when complete.

:class:`CacheWriter` lays the file out through the element writers
(:mod:`nccli.io.cache.elements`), appends rows in order and flushes after each batch, so a
killed run leaves a consistent partial file: ``rows_done`` (and ``rows_read`` when
``--skip-nonfinite`` dropped rows) on the root say where ``--resume`` continues.
:meth:`CacheWriter.finalize` stores the statistics, marks the root ``complete`` and
renames the file; a file that looks finished is finished.  A failed write (disk full)
becomes one :class:`~nccli.errors.DataError`, never a half-finished cache (nor a crash at
exit: see :func:`_fapl`).

The partial is written the way :mod:`nccli.io.safe` writes every output: the lock on
``<path>.lock`` is taken before the partial is opened (a second nccli on the same cache
refuses), the partial is created exclusively (``O_EXCL``, never through a link), and only
a partial this writer created — or resumed, under its lock — is ever removed.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nccli._version import __version__
from nccli.errors import CacheError, DataError
from nccli.io._util import one_line
from nccli.io.cache.elements import FORMAT_VERSION, ROOT, write_stats
from nccli.io.cache.encoding import IOSpec, get_spec, read_attr, write_elem
from nccli.io.cache.state import record_inputs
from nccli.io.safe import (
    DISK_FULL,
    FileId,
    OutputLock,
    clear_stale,
    file_id,
    partial_path,
    refuse_link,
    remove_created,
    same_file,
)
from nccli.layers import Layer
from nccli.stats import ClassStats

__all__ = ["CacheWriter", "claim_output", "partial_path"]


def _fapl() -> Any:
    """How a cache being written is opened: raw data goes straight to the file.

    By default HDF5 keeps raw data per dataset (the chunk cache; the sieve buffer of a
    contiguous dataset) and writes it when the dataset is flushed or closed.  h5py closes
    a dataset when its Python object is freed; on a full disk that close fails *after*
    HDF5 has freed the dataset, the id stays registered, h5py can only print "Exception
    ignored in ObjectID.__dealloc__", and at exit ``H5_term_library`` closes the dangling
    id again: a use-after-free, SIGSEGV.  Without those buffers a failed write fails in
    the write call itself (one OSError, turned into one line) and closing a dataset never
    writes.  Rows are written in whole batches, so the buffers saved little.
    """
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)  # h5py's default
    mdc, slots, _nbytes, w0 = fapl.get_cache()
    fapl.set_cache(mdc, slots, 0, w0)  # no raw-data chunk cache
    fapl.set_sieve_buf_size(0)
    return fapl


def _fcpl() -> Any:
    """h5py's default file creation: no object timestamps, order as h5py is configured."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    if h5py.get_config().track_order:
        order = h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED
        fcpl.set_link_creation_order(order)
        fcpl.set_attr_creation_order(order)
    return fcpl


def _open_h5(tmp: Path, *, create: bool) -> tuple[h5py.File, FileId]:
    """Open (or exclusively create: ``O_CREAT|O_EXCL``, never through a link) ``tmp``; the
    file and the identity of the file HDF5 actually opened."""
    name = os.fsencode(tmp)
    if create:
        fid = h5py.h5f.create(name, h5py.h5f.ACC_EXCL, fapl=_fapl(), fcpl=_fcpl())
    else:
        before = os.lstat(tmp)
        if not stat.S_ISREG(before.st_mode) or before.st_nlink != 1:
            raise DataError(
                f"{tmp}: is not a plain file of its own (a link, or it has other names); "
                "nccli does not write through links, remove it or choose another -o"
            )
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=_fapl())
    f = h5py.File(fid)
    ident = file_id(os.fstat(f.id.get_vfd_handle()))
    if not same_file(tmp, ident) or (not create and ident != file_id(before)):
        f.close()
        raise DataError(
            f"{tmp}: was replaced while nccli opened it (another program writes in the "
            "output directory); choose another -o"
        )
    return f, ident


def _errno_of(exc: BaseException) -> int | None:
    """The OS error behind ``exc`` (HDF5 puts it in its message: ``errno = 28``)."""
    code = re.search(r"errno = (\d+)", str(exc))
    return int(code.group(1)) if code else getattr(exc, "errno", None)


def claim_output(path: str | os.PathLike[str]) -> OutputLock:
    """Claim cache ``path`` for this process before anything looks at its partial.

    Refuses (one :class:`~nccli.errors.DataError`) a link at the cache or the partial name
    and a second nccli writing the same cache; returns the held lock (a context manager,
    re-entrant: the :class:`CacheWriter` opened inside takes it again)."""
    path = Path(path)
    refuse_link(path)
    lock = OutputLock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        refuse_link(partial_path(path))
    except OSError as exc:
        lock.release()
        raise DataError(
            f"{partial_path(path)}: cannot write the cache ({exc.strerror or exc}); "
            "check the output directory is writable"
        ) from exc
    except BaseException:
        lock.release()
        raise
    return lock


def _write_failed(where: Path, exc: BaseException) -> DataError:
    """One line for a failed write: what the OS said, and what to do."""
    text = str(exc)
    said = re.search(r"error message = '([^']*)'", text)
    num = _errno_of(exc)
    reason = said.group(1) if said else (os.strerror(num) if num else one_line(text, 120))
    if num in DISK_FULL:
        hint = "the disk (or a file-size limit) is full: free disk space or choose another -o"
    else:
        hint = "check the disk space and that the output directory is writable"
    return DataError(f"{where}: writing the cache failed ({reason}); {hint}")


@dataclass
class CacheWriter:
    """Writes one cache to ``<path>.partial``; :meth:`finalize` renames it into place.

    Rows are appended in order (``write_rows``); statistics are accumulated by the caller
    (from the features *as stored*, so they equal a recomputation from the cache) and
    handed to :meth:`finalize`.
    """

    path: Path
    layers: list[Layer]
    num_samples: int
    num_classes: int
    attrs: dict[str, Any] = field(default_factory=dict)
    feature_dtype: str = "float32"
    logits: bool = True
    compression: str | None = None
    chunk_rows: int = 1024
    resume: bool = False
    #: False: no ``features`` dataset per layer (statistics and parameters only)
    features: bool = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.tmp = partial_path(self.path)
        if self.feature_dtype not in ("float16", "float32"):
            raise DataError(f"feature dtype must be float16 or float32, got {self.feature_dtype!r}")
        for layer in self.layers:
            problem = layer.problem()
            if problem is not None:
                raise DataError(problem)
        self.h5: h5py.File | None = None
        self._ident: FileId | None = None  # the partial this writer opened or created
        self._created = False
        refuse_link(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the lock comes first: a second nccli on this cache refuses before it looks at
            # (or removes, or truncates) the first one's partial
            self._lock = OutputLock(self.path).acquire()
        except OSError as exc:
            raise self._cannot_write(exc) from exc
        try:
            refuse_link(self.tmp)
            self._check_space()
            self._open()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (OSError, RuntimeError)) and _errno_of(exc) in DISK_FULL:
                raise _write_failed(self.tmp, exc) from exc
            if isinstance(exc, OSError):
                raise self._cannot_write(exc) from exc
            raise

    def _cannot_write(self, exc: OSError) -> DataError:
        if _errno_of(exc) in DISK_FULL:
            return _write_failed(self.tmp, exc)
        return DataError(
            f"{self.tmp}: cannot write the cache ({exc.strerror or exc}); "
            "check the output directory is writable"
        )

    def _open(self) -> None:
        """Open the partial to resume it, or create it afresh (holding the lock)."""
        if self.resume and os.path.lexists(self.tmp):
            self.h5, self._ident = _open_h5(self.tmp, create=False)
            self._check_resumable()
            return
        clear_stale(self.tmp)  # an earlier run's leftover: ours to replace, under the lock
        self.h5, self._ident = _open_h5(self.tmp, create=True)
        self._created = True
        self._create()

    def _discard(self) -> None:
        """Set-up failed: close, remove the partial only if this writer created it, unlock."""
        if self._created:
            self.abort()
        else:
            self.close()

    def estimated_bytes(self) -> int:
        """About how large the finished cache will be (uncompressed)."""
        N, K = self.num_samples, self.num_classes
        item = 2 if self.feature_dtype == "float16" else 4
        dims = sum(s.dim for s in self.layers) if self.features else 0
        per_row = 16 + (4 * K if self.logits else 0) + dims * item
        fixed = sum(8 * (s.dim * s.dim + K * s.dim + 2 * K) for s in self.layers)
        fixed += sum(
            np.asarray(v).size * 8 for s in self.layers for v in (s.weight, s.bias) if v is not None
        )
        return N * per_row + fixed + (1 << 16)

    def _check_space(self) -> None:
        """Refuse up front when the disk cannot hold the cache (before any row is written)."""
        if self.compression is not None:
            return
        need = self.estimated_bytes()
        if self.resume and self.tmp.exists():
            need -= self.tmp.stat().st_size
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            mb = 1 << 20
            raise DataError(
                f"{self.tmp}: the cache needs about {need / mb:.1f} MB but only "
                f"{free / mb:.1f} MB are free on that disk; free disk space or choose another -o"
            )

    @property
    def rows_done(self) -> int:
        """Rows already written to the cache."""
        return int(self.h5.attrs["rows_done"])

    @property
    def rows_read(self) -> int:
        """Dataset rows consumed so far (what ``--resume`` continues from); more than
        :attr:`rows_done` when samples were dropped (``--skip-nonfinite``)."""
        return int(self.h5.attrs.get("rows_read", self.rows_done))

    @property
    def skipped_nonfinite(self) -> np.ndarray | None:
        """Samples dropped per class so far, or ``None`` when nothing is being dropped."""
        v = self.h5.attrs.get("skipped_nonfinite")
        return None if v is None else np.asarray(v, dtype=np.int64)

    def _create(self) -> None:
        base = {
            "nccli_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "complete": False,
            "rows_done": 0,
            "feature_dtype": self.feature_dtype,
        }
        write_elem(
            self.h5,
            ROOT,
            self.layers,
            {**base, **self.attrs},
            num_samples=self.num_samples,
            num_classes=self.num_classes,
            dtype=self.feature_dtype,
            logits=self.logits,
            chunk_rows=self.chunk_rows,
            compression=self.compression,
            features=self.features,
        )

    def _check_resumable(self) -> None:
        f = self.h5
        if get_spec(f) != IOSpec(ROOT, FORMAT_VERSION):
            raise CacheError(
                f"{self.tmp}: the partial cache was written by another nccli version "
                f"({get_spec(f)}); delete it or run without --resume"
            )
        if (
            read_attr(f, "num_samples") != self.num_samples
            or read_attr(f, "num_classes") != self.num_classes
        ):
            raise CacheError(
                f"{self.tmp}: the partial cache was made for a different dataset "
                "(sample or class count differs); delete it or run without --resume"
            )
        for spec in self.layers:
            key = f"layers/{spec.name}/features"
            if key not in f or f[key].shape != (self.num_samples, spec.dim):
                raise CacheError(
                    f"{self.tmp}: the partial cache has no matching layer {spec.name!r}; "
                    "delete it or run without --resume"
                )

    def write_rows(
        self,
        start: int,
        labels: np.ndarray,
        indices: np.ndarray,
        features: dict[str, np.ndarray],
        logits: np.ndarray | None = None,
        *,
        rows_read: int | None = None,
        skipped: np.ndarray | None = None,
        inputs: tuple[int, int, np.ndarray] | None = None,
    ) -> None:
        """Write rows ``start:start+B``, advance ``rows_done`` and flush.

        ``inputs`` — ``(block_rows, hashed_rows, block digests)`` of the dataset inputs read
        so far — is recorded in the same flush, so the partial's record always covers
        exactly its rows (:func:`nccli.io.cache.state.record_inputs`).

        ``rows_read`` (dataset rows consumed, when some were dropped) and ``skipped``
        (samples dropped per class so far) are recorded for ``--resume`` and finalize.
        A failed write (disk full) raises one :class:`~nccli.errors.DataError`.
        """
        f = self.h5
        stop = start + len(labels)
        try:
            f["labels"][start:stop] = labels
            f["indices"][start:stop] = indices
            if self.logits and logits is not None:
                f["logits"][start:stop] = logits
            for name, arr in features.items():
                f[f"layers/{name}/features"][start:stop] = arr
            f.attrs["rows_done"] = stop
            if rows_read is not None:
                f.attrs["rows_read"] = int(rows_read)
            if skipped is not None:
                f.attrs["skipped_nonfinite"] = np.asarray(skipped, dtype=np.int64)
            if inputs is not None:
                record_inputs(f, *inputs)
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise _write_failed(self.tmp, exc) from exc

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and per-layer features of rows already written (``--resume`` folds them
        into fresh statistics)."""
        f = self.h5
        labels = np.asarray(f["labels"][start:stop])
        feats = {
            s.name: np.asarray(f[f"layers/{s.name}/features"][start:stop]) for s in self.layers
        }
        return labels, feats

    def _drop_unwritten(self, n: int) -> None:
        """Cut every per-row dataset to its first ``n`` rows (rows were dropped)."""
        f = self.h5
        if n == 0:
            raise DataError(
                f"{self.tmp}: every sample was dropped for NaN/Inf features; nothing is left "
                "to measure, check the checkpoint and the inputs"
            )
        for key in ("labels", "indices", "logits"):
            if key in f:
                f[key].resize(n, axis=0)
        for spec in self.layers:
            if f"layers/{spec.name}/features" in f:
                f[f"layers/{spec.name}/features"].resize(n, axis=0)
        f.attrs["num_samples"] = n
        self.num_samples = n

    def finalize(
        self,
        stats: dict[str, ClassStats],
        extra_attrs: dict[str, Any] | None = None,
        *,
        publish: bool = True,
    ) -> Path:
        """Store statistics, mark complete, close and rename ``.partial`` into place.

        ``publish=False`` leaves the finished file named ``.partial`` and returns that
        path (a distributed shard is renamed only once every rank has finished)."""
        f = self.h5
        if self.rows_read != self.num_samples:
            raise CacheError(
                f"{self.tmp}: only {self.rows_read} of {self.num_samples} rows were written"
            )
        skipped = self.skipped_nonfinite
        try:
            if self.rows_done < self.num_samples:
                self._drop_unwritten(self.rows_done)
            for spec in self.layers:
                g = f[f"layers/{spec.name}"]
                write_stats(g, stats[spec.name])
                if skipped is not None:
                    g.attrs["skipped_nonfinite"] = skipped
            for k, v in (extra_attrs or {}).items():
                if v is not None:
                    f.attrs[k] = v
            f.attrs["complete"] = True
            f.flush()
            f.close()
        except (OSError, RuntimeError) as exc:
            raise _write_failed(self.tmp, exc) from exc
        try:
            if publish:
                self._publish()
        finally:
            self._unlock()
        return self.path if publish else self.tmp

    def _publish(self) -> None:
        """Rename the finished partial onto the cache name (it must still be this file)."""
        refuse_link(self.path)
        if not same_file(self.tmp, self._ident):
            raise DataError(
                f"{self.tmp}: was replaced while nccli wrote it (another program writes in "
                "the output directory); choose another -o"
            )
        os.replace(self.tmp, self.path)

    def _close_h5(self) -> None:
        try:
            if self.h5 is not None:
                self.h5.close()
        except Exception:  # noqa: BLE001 - closing an already broken file
            pass

    def _unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def close(self) -> None:
        """Close without finishing (the ``.partial`` stays for ``--resume``)."""
        self._close_h5()
        self._unlock()

    def abort(self) -> None:
        """Close and delete the partial file (the one this writer opened, nothing else)."""
        self._close_h5()
        try:
            remove_created(self.tmp, self._ident)
        finally:
            self._unlock()
