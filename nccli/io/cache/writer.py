"""Writing a cache: ``<path>.partial`` row by row, renamed into place when complete.

:class:`CacheWriter` lays the file out through the element writers
(:mod:`nccli.io.cache.elements`), appends rows in order and flushes after each batch, so a
killed run leaves a consistent partial file: ``rows_done`` (and ``rows_read`` when
``--skip-nonfinite`` dropped rows) on the root say where ``--resume`` continues.
:meth:`CacheWriter.finalize` stores the statistics, marks the root ``complete`` and
renames the file; a file that looks finished is finished.  A failed write (disk full)
becomes one :class:`~nccli.errors.DataError`, never a half-finished cache.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import os
import re
import shutil
import sys
import threading
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
from nccli.layers import Layer
from nccli.stats import ClassStats

__all__ = ["CacheWriter", "partial_path"]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where an unfinished cache for ``path`` lives."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


class _QuietH5:
    """Keeps h5py's echoes of a failed write off stderr while caches are being written.

    When a write fails (disk full, a file-size limit), HDF5 keeps the dirty data and fails
    again each time h5py frees a handle; h5py reports those as "Exception ignored in
    ObjectID.__dealloc__" through ``sys.excepthook`` and ``sys.unraisablehook``.  While a
    :class:`CacheWriter` is open those echoes are recorded here instead (the writer turns
    them into one :class:`~nccli.errors.DataError`); anything else goes to the usual hooks.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.errors: list[str] = []
        self.saved: tuple[Any, Any] | None = None

    @staticmethod
    def _echo(exc: BaseException | None) -> bool:
        return isinstance(exc, (RuntimeError, OSError)) and "id ref count" in str(exc)

    def _unraisable(self, u: Any) -> None:
        if self._echo(u.exc_value):
            self.errors.append(str(u.exc_value))
        elif self.saved is not None:
            self.saved[1](u)

    def _excepthook(self, etype: Any, value: BaseException, tb: Any) -> None:
        if self._echo(value):
            self.errors.append(str(value))
        elif self.saved is not None:
            self.saved[0](etype, value, tb)

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = (sys.excepthook, sys.unraisablehook)
                sys.excepthook, sys.unraisablehook = self._excepthook, self._unraisable
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.saved is not None:
                sys.excepthook, sys.unraisablehook = self.saved
                self.saved = None
                self.errors.clear()

    def take(self) -> str | None:
        """The first echo recorded since the last call (``None`` when all writes went
        through)."""
        if not self.errors:
            return None
        first = self.errors[0]
        self.errors.clear()
        return first


_QUIET = _QuietH5()
_FULL = {_errno.ENOSPC, _errno.EFBIG, getattr(_errno, "EDQUOT", _errno.ENOSPC)}


def _write_failed(where: Path, exc: BaseException | str) -> DataError:
    """One line for a failed write: what the OS said, and what to do."""
    text = str(exc)
    said = re.search(r"error message = '([^']*)'", text)
    code = re.search(r"errno = (\d+)", text)
    num = int(code.group(1)) if code else getattr(exc, "errno", None)
    reason = said.group(1) if said else (os.strerror(num) if num else one_line(text, 120))
    if num in _FULL:
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

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.tmp = partial_path(self.path)
        if self.feature_dtype not in ("float16", "float32"):
            raise DataError(f"feature dtype must be float16 or float32, got {self.feature_dtype!r}")
        for layer in self.layers:
            problem = layer.problem()
            if problem is not None:
                raise DataError(problem)
        if self.tmp.is_symlink():
            raise DataError(
                f"{self.tmp}: is a symbolic link; nccli does not write through links in the "
                "output directory, remove it or choose another -o"
            )
        self._quiet = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_space()
            _QUIET.enter()
            self._quiet = True
            if self.resume and self.tmp.exists():
                self.h5 = h5py.File(self.tmp, "r+")
                self._check_resumable()
            else:
                self.h5 = h5py.File(self.tmp, "w")
                try:
                    self._create()
                except BaseException:
                    self.abort()  # never leave a half-created file behind
                    raise
        except OSError as exc:
            self._unquiet()
            raise DataError(
                f"{self.tmp}: cannot write the cache ({exc.strerror or exc}); "
                "check the output directory is writable"
            ) from exc
        except BaseException:
            self._unquiet()
            raise

    def _unquiet(self) -> None:
        if getattr(self, "_quiet", False):
            self._quiet = False
            _QUIET.exit()

    def estimated_bytes(self) -> int:
        """About how large the finished cache will be (uncompressed)."""
        N, K = self.num_samples, self.num_classes
        item = 2 if self.feature_dtype == "float16" else 4
        per_row = 16 + (4 * K if self.logits else 0) + sum(s.dim for s in self.layers) * item
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
    ) -> None:
        """Write rows ``start:start+B``, advance ``rows_done`` and flush.

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
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise _write_failed(self.tmp, _QUIET.take() or exc) from exc
        echo = _QUIET.take()
        if echo is not None:
            raise _write_failed(self.tmp, echo)

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
            raise _write_failed(self.tmp, _QUIET.take() or exc) from exc
        echo = _QUIET.take()
        if echo is not None:
            raise _write_failed(self.tmp, echo)
        self._unquiet()
        if not publish:
            return self.tmp
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the ``.partial`` stays for ``--resume``)."""
        try:
            self.h5.close()
        except Exception:  # noqa: BLE001 - closing an already broken file
            pass
        finally:
            self._unquiet()

    def abort(self) -> None:
        """Close and delete the partial file."""
        self.close()
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass
