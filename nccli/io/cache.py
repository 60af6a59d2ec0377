"""The nccli HDF5 cache: schema version 1 — writer, validating reader, version registry.

Layout (every group carries ``encoding-type`` / ``encoding-version`` attributes, as in
anndata's on-disk format, and readers dispatch on them)::

    /                      encoding-type="nccli-cache", encoding-version="1",
                           format="nccli-cache", schema_version=1, complete=True|False,
                           nccli_version, created, checkpoint, checkpoint_sha256, dataset,
                           dataset_digest, split, arch, epoch, step, num_classes,
                           num_samples, torch_version, device, amp, command, classifier
    /labels                (N,) int64
    /indices               (N,) int64  (row of each sample in the dataset)
    /logits                (N, K) float, optional
    /layers/<name>         encoding-type="nccli-layer"; attrs module, depth, role
                           (penultimate | linear | classifier | other), dim, io
                           (input | output: which side of the module was hooked)
    /layers/<name>/features (N, d) float16|float32, chunked
    /layers/<name>/weight, /bias   parameters of that layer's module, when linear
    /layers/<name>/stats/  counts, means, scatter, class_ss (float64) — ClassStats

A cache is written to ``<path>.partial`` and renamed only when complete, so a file that
looks finished is finished.  ``rows_done`` on the root counts the rows written so far,
which is what ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno as _errno
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nccli._version import __version__
from nccli.errors import CacheError, DataError, NCError
from nccli.io._util import one_line
from nccli.stats import ClassStats

FORMAT = "nccli-cache"
SCHEMA_VERSION = 1
ROOT_ENCODING = ("nccli-cache", "1")
LAYER_ENCODING = ("nccli-layer", "1")
ROLES = ("penultimate", "linear", "classifier", "other")


@contextlib.contextmanager
def _reading(where: str, what: str) -> Iterator[None]:
    """One CacheError for a damaged file: h5py reports damage with whatever its C layer hit
    (OSError, RuntimeError, KeyError, ValueError, even AttributeError on a dangling link)."""
    try:
        yield
    except NCError:
        raise
    except Exception as exc:  # noqa: BLE001 - any h5py failure on a damaged file
        raise CacheError(
            f"{where}: cannot read {what} ({one_line(exc, 120)}); the cache is corrupt, "
            "re-extract it"
        ) from None


def _attr(obj: Any, key: str, default: Any = None) -> Any:
    v = obj.attrs.get(key, default)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def stamp(obj: Any, encoding: tuple[str, str]) -> None:
    """Write the ``encoding-type`` / ``encoding-version`` pair on an HDF5 object."""
    obj.attrs["encoding-type"] = encoding[0]
    obj.attrs["encoding-version"] = encoding[1]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where an unfinished cache for ``path`` lives."""
    p = Path(path)
    return p.with_name(p.name + ".partial")


# ---------------------------------------------------------------------- writer
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
class LayerSpec:
    """One layer to be cached: its features are ``dim`` wide."""

    name: str
    dim: int
    module: str = ""
    depth: int = 0
    role: str = "other"
    io: str = "input"
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass
class CacheWriter:
    """Writes one cache to ``<path>.partial``; :meth:`finalize` renames it into place.

    Rows are appended in order (``write_rows``); statistics are accumulated by the caller
    (from the features *as stored*, so they equal a recomputation from the cache) and
    handed to :meth:`finalize`.
    """

    path: Path
    layers: list[LayerSpec]
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
        for spec in self.layers:
            if "/" in spec.name or not spec.name:
                raise DataError(f"layer name {spec.name!r} is not usable as an HDF5 group name")
            if spec.role not in ROLES:
                raise DataError(f"layer {spec.name!r}: unknown role {spec.role!r}")
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
        f = self.h5
        stamp(f, ROOT_ENCODING)
        base = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "nccli_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "complete": False,
            "rows_done": 0,
            "feature_dtype": self.feature_dtype,
        }
        for k, v in {**base, **self.attrs}.items():
            if v is None:
                continue
            f.attrs[k] = str(v) if isinstance(v, str) else v  # str subclasses (torch version)
        N, K = self.num_samples, self.num_classes
        rows = max(1, min(self.chunk_rows, N))
        # chunked, so rows dropped by --skip-nonfinite can be cut off at finalize
        f.create_dataset("labels", shape=(N,), dtype="int64", chunks=(max(1, min(N, 1 << 16)),))
        f.create_dataset("indices", shape=(N,), dtype="int64", chunks=(max(1, min(N, 1 << 16)),))
        if self.logits:
            f.create_dataset("logits", shape=(N, K), dtype="float32", chunks=(rows, K))
        grp = f.create_group("layers")
        for spec in self.layers:
            g = grp.create_group(spec.name)
            stamp(g, LAYER_ENCODING)
            for key in ("module", "depth", "role", "dim", "io"):
                g.attrs[key] = getattr(spec, key)
            # chunks of ~1 MB rows-first: measure streams whole rows in order
            crow = max(1, min(N, max(64, (1 << 20) // (spec.dim * 4))))
            g.create_dataset(
                "features",
                shape=(N, spec.dim),
                dtype=self.feature_dtype,
                chunks=(crow, spec.dim),
                compression=self.compression,
            )
            # parameters keep their precision (float64 stays float64; halves are widened)
            for key in ("weight", "bias"):
                value = getattr(spec, key)
                if value is not None:
                    arr = np.asarray(value)
                    arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
                    g.create_dataset(key, data=arr)

    def _check_resumable(self) -> None:
        f = self.h5
        if (
            _attr(f, "num_samples") != self.num_samples
            or _attr(f, "num_classes") != self.num_classes
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
                if "stats" in g:
                    del g["stats"]
                stats[spec.name].to_h5(g.create_group("stats"))
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


# ---------------------------------------------------------------------- reader
@dataclass
class LayerInfo:
    """A layer of an opened cache (metadata; arrays are read on demand)."""

    name: str
    module: str
    depth: int
    role: str
    dim: int
    io: str
    has_weight: bool
    has_stats: bool


_READERS: dict[tuple[str, str], Callable[[h5py.File, str], dict[str, LayerInfo]]] = {}


def register_reader(encoding: tuple[str, str]) -> Callable[[Callable], Callable]:
    """Register a layout reader for one (encoding-type, encoding-version)."""

    def deco(fn: Callable) -> Callable:
        if encoding in _READERS:
            raise TypeError(f"a reader for {encoding} is already registered")
        _READERS[encoding] = fn
        return fn

    return deco


@register_reader(ROOT_ENCODING)
def _read_v1(f: h5py.File, where: str) -> dict[str, LayerInfo]:
    N = _attr(f, "num_samples")
    K = _attr(f, "num_classes")
    for key in ("num_samples", "num_classes"):
        if not isinstance(_attr(f, key), int) or _attr(f, key) < 1:
            raise CacheError(f"{where}: root attribute {key!r} is missing or invalid; re-extract")
    for name in ("labels", "indices", "layers"):
        if name not in f:
            raise CacheError(
                f"{where}: dataset /{name} is missing; the cache is incomplete, re-extract"
            )
    if f["labels"].shape != (N,):
        raise CacheError(f"{where}: /labels has shape {f['labels'].shape}, expected ({N},)")
    if "logits" in f and f["logits"].shape != (N, K):
        raise CacheError(f"{where}: /logits has shape {f['logits'].shape}, expected ({N}, {K})")
    layers: dict[str, LayerInfo] = {}
    for name, g in f["layers"].items():
        enc = (_attr(g, "encoding-type"), _attr(g, "encoding-version"))
        if enc != LAYER_ENCODING:
            raise CacheError(
                f"{where}: /layers/{name} has encoding {enc[0]!r} version {enc[1]!r}, which this "
                f"nccli cannot read (expects {LAYER_ENCODING[0]!r} {LAYER_ENCODING[1]!r}); "
                "upgrade nccli"
            )
        if "features" not in g and "stats" not in g:
            raise CacheError(f"{where}: /layers/{name} has neither features nor stats; re-extract")
        dim = int(_attr(g, "dim", -1))
        if "features" in g and g["features"].shape != (N, dim):
            raise CacheError(
                f"{where}: /layers/{name}/features has shape {g['features'].shape}, "
                f"expected ({N}, {dim}); the cache is corrupt, re-extract it"
            )
        if "weight" in g and g["weight"].ndim != 2:
            raise CacheError(f"{where}: /layers/{name}/weight is not a matrix")
        if "weight" in g and g["weight"].shape[1] != dim:
            raise CacheError(
                f"{where}: /layers/{name}/weight has shape {g['weight'].shape}, "
                f"which does not take {dim}-dimensional inputs"
            )
        layers[name] = LayerInfo(
            name=name,
            module=str(_attr(g, "module", name)),
            depth=int(_attr(g, "depth", 0)),
            role=str(_attr(g, "role", "other")),
            dim=dim,
            io=str(_attr(g, "io", "input")),
            has_weight="weight" in g,
            has_stats="stats" in g,
        )
    return dict(sorted(layers.items(), key=lambda kv: (kv[1].depth, kv[0])))


class Cache:
    """A validated, read-only nccli cache (one file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        if self.path.name.endswith(".partial"):
            raise CacheError(
                f"{where}: this is an unfinished cache (extraction was interrupted); "
                "finish it with `nccli extract --resume` or delete it"
            )
        if not self.path.exists():
            raise DataError(f"{where}: no such file")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(
                f"{where}: not a readable HDF5 file ({exc}); it may be truncated or corrupt, "
                "re-extract it"
            ) from None
        try:
            self._validate(where)
        except Exception:
            self.h5.close()
            raise

    def _validate(self, where: str) -> None:
        f = self.h5
        if _attr(f, "format") != FORMAT:
            raise CacheError(f"{where}: not an nccli cache (root attribute format is missing)")
        version = _attr(f, "schema_version")
        enc = (_attr(f, "encoding-type"), _attr(f, "encoding-version"))
        reader = _READERS.get(enc)
        if reader is None or version != SCHEMA_VERSION:
            raise CacheError(
                f"{where}: cache schema_version {version!r} (encoding {enc[0]!r} {enc[1]!r}) is "
                f"not supported by this nccli, which reads schema_version {SCHEMA_VERSION}; "
                "upgrade nccli or re-extract"
            )
        if not _attr(f, "complete", False):
            raise CacheError(
                f"{where}: the cache is marked incomplete; re-run `nccli extract --resume`"
            )
        with _reading(where, "the layer layout"):
            self.layers = reader(f, where)
        if not self.layers:
            raise CacheError(f"{where}: the cache holds no layers; re-extract")

    # -- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as plain Python values."""
        return {k: _attr(self.h5, k) for k in self.h5.attrs}

    @property
    def num_samples(self) -> int:
        return int(_attr(self.h5, "num_samples"))

    @property
    def num_classes(self) -> int:
        return int(_attr(self.h5, "num_classes"))

    def labels(self) -> np.ndarray:
        """All labels (N,), validated against ``num_classes``."""
        y = self._read("labels", ())
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise CacheError(
                f"{self.path}: /labels contains values outside 0..{self.num_classes - 1}; "
                "the cache is corrupt, re-extract it"
            )
        return y.astype(np.int64)

    def _read(self, key: str, sl: Any) -> np.ndarray:
        with _reading(str(self.path), f"/{key}"):
            return np.asarray(self.h5[key][sl])

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(W, b)`` of the layer's module (float64), or None if it is not linear."""
        g = f"layers/{layer}"
        with _reading(str(self.path), f"/{g}"):
            if "weight" not in self.h5[g]:
                return None
            has_bias = "bias" in self.h5[g]
            for key in ("weight", "bias") if has_bias else ("weight",):
                ds = self.h5[f"{g}/{key}"]
                declared, stored = ds.size * ds.dtype.itemsize, ds.id.get_storage_size()
                if ds.compression is None and stored < declared:
                    raise CacheError(
                        f"{self.path}: /{g}/{key} declares {declared} bytes but the file stores "
                        f"{stored}; the cache is truncated or forged, re-extract it"
                    )
        W = self._read(f"{g}/weight", ()).astype(np.float64)
        b = self._read(f"{g}/bias", ()).astype(np.float64) if has_bias else None
        if not np.isfinite(W).all() or (b is not None and not np.isfinite(b).all()):
            raise CacheError(f"{self.path}: /{g}/weight or bias contains NaN/Inf")
        if b is not None and b.shape != (W.shape[0],):
            raise CacheError(
                f"{self.path}: /{g}/bias has shape {b.shape}, expected ({W.shape[0]},)"
            )
        return W, b

    def stats(self, layer: str) -> ClassStats:
        """The statistics stored at extraction time."""
        with _reading(str(self.path), f"the statistics of layer {layer!r}"):
            g = self.h5[f"layers/{layer}"]
            if "stats" not in g:
                raise CacheError(
                    f"{self.path}: layer {layer!r} has no stored statistics; use --recompute"
                )
            st = ClassStats.from_h5(
                g["stats"],
                source=f"{self.path}:/layers/{layer}/stats",
                num_classes=self.num_classes,
                dim=self.layers[layer].dim,
            )
        if st.dim != self.layers[layer].dim or st.num_classes != self.num_classes:
            raise CacheError(f"{self.path}: statistics of {layer!r} do not match the layer shape")
        if st.n != self.num_samples:
            raise CacheError(
                f"{self.path}: statistics of {layer!r} count {st.n} samples, the cache holds "
                f"{self.num_samples}; the cache is corrupt, re-extract it"
            )
        return st

    def iter_features(
        self, layer: str, chunk_rows: int = 8192
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(features, labels)`` chunks in row order; memory is one chunk."""
        key = f"layers/{layer}/features"
        with _reading(str(self.path), f"/{key}"):
            present = key in self.h5
        if not present:
            raise CacheError(f"{self.path}: layer {layer!r} was cached without features")
        N = self.num_samples
        for start in range(0, N, chunk_rows):
            sl = slice(start, min(N, start + chunk_rows))
            yield self._read(key, sl), self._read("labels", sl)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a-b|`` relative to the larger magnitude of the two arrays (0 when equal)."""
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = max(float(np.abs(a).max()), float(np.abs(b).max())) if a.size else 0.0
    return 0.0 if diff == 0.0 else diff / scale


def verify_cache(
    path: str | os.PathLike[str], *, deep: bool = False, chunk_rows: int = 8192, rtol: float = 1e-8
) -> list[str]:
    """Check a finished cache end to end; one line per layer, a CacheError at the first fault.

    Checks the schema and every dataset's shape (:class:`Cache`), the label range, each
    layer's parameters (finite, fitting shapes) and statistics (the stored ``sha256``,
    shapes, finiteness), and that each layer's class counts equal the histogram of
    ``/labels``.  ``deep`` also recomputes every layer's statistics from its cached
    features and compares them with the stored ones (relative ``rtol``).  The error names
    the file and the layer.
    """
    lines: list[str] = []
    where = str(path)
    try:
        with Cache(path) as c:
            labels = c.labels()
            K = c.num_classes
            hist = np.bincount(labels, minlength=K)
            for name, info in c.layers.items():
                at = f"{where}: layer {name!r}"
                c.weight(name)
                done: list[str] = []
                if not info.has_stats:
                    lines.append(f"{name}: no stored statistics (measure uses --recompute)")
                    continue
                st = c.stats(name)
                signed = "sha256" in c.h5[f"layers/{name}/stats"].attrs
                done.append("checksum" if signed else "no checksum (written by an older nccli)")
                if not np.array_equal(st.counts, hist):
                    raise CacheError(
                        f"{at}: the statistics count {st.counts.tolist()} samples per class but "
                        f"/labels holds {hist.tolist()}; the cache is corrupt, re-extract it"
                    )
                done.append("class counts")
                if deep and "features" in c.h5[f"layers/{name}"]:
                    fresh = ClassStats(K, info.dim, source=f"{where}:/layers/{name}/features")
                    try:
                        for h, y in c.iter_features(name, chunk_rows):
                            fresh.update(h, y)
                    except DataError as exc:
                        if isinstance(exc, CacheError):
                            raise
                        raise CacheError(
                            f"{at}: the cached features are unusable ({one_line(exc, 120)}); "
                            "the cache is corrupt, re-extract it"
                        ) from None
                    for state in ClassStats.states:
                        a, b = getattr(fresh, state), getattr(st, state)
                        rel = _max_rel_diff(a.astype(np.float64), b.astype(np.float64))
                        if rel > rtol:
                            raise CacheError(
                                f"{at}: the stored statistics ({state}) differ from the cached "
                                f"features by {rel:.2g} (relative); the cache is corrupt, "
                                "re-extract it"
                            )
                    done.append("recomputed from features")
                elif deep:
                    done.append("no features to recompute")
                lines.append(f"{name}: ok ({', '.join(done)})")
    except NCError:
        raise
    except Exception as exc:  # noqa: BLE001 - any h5py failure on a damaged file
        raise CacheError(
            f"{where}: cannot read the cache ({one_line(exc, 120)}); it is corrupt, re-extract it"
        ) from None
    return lines


def is_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an HDF5 file that claims to be (or is laid out as) a cache.

    A cache whose root attributes were damaged still counts, so that the reader explains
    what is wrong instead of treating it as a plain features file.
    """
    try:
        f = h5py.File(path, "r")
    except Exception:  # noqa: BLE001 - not HDF5, unreadable, truncated
        return False
    with f:
        try:
            return (
                _attr(f, "format") == FORMAT
                or _attr(f, "encoding-type") == ROOT_ENCODING[0]
                or ("layers" in f and "features" not in f)
            )
        except Exception:  # noqa: BLE001 - a damaged root: let Cache explain what is wrong
            return True
