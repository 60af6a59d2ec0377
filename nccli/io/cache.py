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

import datetime as _dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nccli.errors import CacheError, DataError
from nccli.stats import ClassStats

FORMAT = "nccli-cache"
SCHEMA_VERSION = 1
ROOT_ENCODING = ("nccli-cache", "1")
LAYER_ENCODING = ("nccli-layer", "1")
ROLES = ("penultimate", "linear", "classifier", "other")


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
            raise DataError(
                f"{self.tmp}: cannot write the cache ({exc.strerror or exc}); "
                "check the output directory is writable"
            ) from exc

    @property
    def rows_done(self) -> int:
        """Rows already written (what ``--resume`` continues from)."""
        return int(self.h5.attrs["rows_done"])

    def _create(self) -> None:
        f = self.h5
        stamp(f, ROOT_ENCODING)
        from nccli import __version__

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
        f.create_dataset("labels", shape=(N,), dtype="int64")
        f.create_dataset("indices", shape=(N,), dtype="int64")
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
    ) -> None:
        """Write rows ``start:start+B``, then advance ``rows_done``."""
        f = self.h5
        stop = start + len(labels)
        f["labels"][start:stop] = labels
        f["indices"][start:stop] = indices
        if self.logits and logits is not None:
            f["logits"][start:stop] = logits
        for name, arr in features.items():
            f[f"layers/{name}/features"][start:stop] = arr
        f.attrs["rows_done"] = stop

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
        if self.rows_done != self.num_samples:
            raise CacheError(
                f"{self.tmp}: only {self.rows_done} of {self.num_samples} rows were written"
            )
        for spec in self.layers:
            g = f[f"layers/{spec.name}"]
            if "stats" in g:
                del g["stats"]
            stats[spec.name].to_h5(g.create_group("stats"))
        for k, v in (extra_attrs or {}).items():
            if v is not None:
                f.attrs[k] = v
        f.attrs["complete"] = True
        f.flush()
        f.close()
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
        try:
            self.layers = reader(f, where)
        except CacheError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise CacheError(f"{where}: the cache is corrupt ({exc}); re-extract it") from None
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
        try:
            return np.asarray(self.h5[key][sl])
        except (OSError, KeyError, ValueError) as exc:
            raise CacheError(
                f"{self.path}: cannot read /{key} ({exc}); the cache is corrupt, re-extract it"
            ) from None

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(W, b)`` of the layer's module (float64), or None if it is not linear."""
        g = f"layers/{layer}"
        if "weight" not in self.h5[g]:
            return None
        W = self._read(f"{g}/weight", ()).astype(np.float64)
        b = self._read(f"{g}/bias", ()).astype(np.float64) if "bias" in self.h5[g] else None
        if not np.isfinite(W).all() or (b is not None and not np.isfinite(b).all()):
            raise CacheError(f"{self.path}: /{g}/weight or bias contains NaN/Inf")
        if b is not None and b.shape != (W.shape[0],):
            raise CacheError(
                f"{self.path}: /{g}/bias has shape {b.shape}, expected ({W.shape[0]},)"
            )
        return W, b

    def stats(self, layer: str) -> ClassStats:
        """The statistics stored at extraction time."""
        g = self.h5[f"layers/{layer}"]
        if "stats" not in g:
            raise CacheError(
                f"{self.path}: layer {layer!r} has no stored statistics; use --recompute"
            )
        try:
            st = ClassStats.from_h5(g["stats"], source=f"{self.path}:/layers/{layer}/stats")
        except (OSError, KeyError, ValueError) as exc:
            raise CacheError(f"{self.path}: cannot read statistics of {layer!r} ({exc})") from None
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
        if key not in self.h5:
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


def is_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an HDF5 file that claims to be (or is laid out as) a cache.

    A cache whose root attributes were damaged still counts, so that the reader explains
    what is wrong instead of treating it as a plain features file.
    """
    try:
        with h5py.File(path, "r") as f:
            return (
                _attr(f, "format") == FORMAT
                or _attr(f, "encoding-type") == ROOT_ENCODING[0]
                or ("layers" in f and "features" not in f)
            )
    except OSError:
        return False
