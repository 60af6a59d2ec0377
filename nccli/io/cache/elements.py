"""The cache's elements, one reader per (type, version) and one writer per type.

==================  =======  ==============================================================
element             version  layout
==================  =======  ==============================================================
``nccli-cache``     1        the root: attributes (``format``, ``schema_version`` too),
                             ``/labels``, ``/indices``, ``/logits``, ``/layers``
``nccli-cache``     2        the same without ``format``/``schema_version`` (the encoding
                             pair is the one version marker); every element is version 2
``nccli-layer``     1, 2     ``/layers/<name>``: attributes ``module depth role dim io``
                             and ``pool`` (``none avg max flatten``; read as ``none`` when
                             absent, as in caches written before it) and ``order`` (the
                             place in the forward pass; -1 when absent), ``features`` (N, d),
                             ``weight``/``bias`` of a linear module, ``stats``
``nccli-classstats``  1      ``counts means scatter class_ss``; ``sha256`` optional
``nccli-classstats``  2      the same; ``sha256`` required
==================  =======  ==============================================================

Readers validate shapes, dtypes and declared-vs-stored sizes *before* reading an array
(:func:`nccli.io.h5safe.check_size`), so a small file cannot make nccli allocate a huge one:
nccli compresses nothing but features, so any other compressed dataset is refused as
forged.  nccli writes version 2.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from nccli.errors import CacheError
from nccli.io.cache.encoding import (
    IOSpec,
    get_spec,
    read_attr,
    read_elem,
    register_read,
    register_write,
    unsupported,
    write_elem,
)
from nccli.io.h5safe import check_size, check_stats_size
from nccli.layers import POOLS, Layer
from nccli.stats import STATES, ClassStats

__all__ = ["FORMAT_VERSION", "LAYER", "ROOT", "STATS", "stats_digest"]

ROOT, LAYER, STATS = "nccli-cache", "nccli-layer", "nccli-classstats"
#: the version nccli writes, of every element
FORMAT_VERSION = "2"
#: the layer attributes, in the order they are written
LAYER_ATTRS = ("module", "depth", "role", "dim", "io", "pool", "order")


def stats_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four state arrays (name, shape and little-endian bytes, in a fixed
    order): the ``sha256`` attribute of a statistics group.  It detects corruption of a
    cache, not a deliberate rewrite (whoever can edit the file can recompute it)."""
    h = hashlib.sha256(f"{STATS}/1".encode())  # the digest's own version: unchanged in v2
    for st in STATES:
        a = np.ascontiguousarray(arrays[st.name], dtype=st.numpy_dtype)
        h.update(f"|{st.name}{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def declared_vs_stored(ds: Any, where: str, what: str, *, compressed: str = "refuse") -> None:
    """Refuse a dataset that declares more bytes than the file stores (a forged shape would
    otherwise allocate them), and a compressed one unless ``compressed="stream"`` (features:
    read a chunk at a time)."""
    check_size(ds, where, what, compressed=compressed, error=CacheError, hint="re-extract it")


# ---------------------------------------------------------------- statistics
def _read_stats(group: Any, file: str, *, num_classes: int, dim: int, checksum: bool) -> ClassStats:
    where = f"{file}:{group.name}"
    for st in STATES:
        if st.name not in group:
            raise CacheError(f"{where}: statistics dataset {st.name!r} is missing; re-extract")
    K = int(group.attrs.get("num_classes", -1))
    d = int(group.attrs.get("dim", -1))
    if K < 1 or d < 1 or K != num_classes or d != dim:
        raise CacheError(
            f"{where}: statistics are for K={K} classes of dimension d={d}, the layer has "
            f"K={num_classes}, d={dim}; the cache is corrupt, re-extract it"
        )
    for st in STATES:
        ds, shape = group[st.name], st.shape(K, d)
        if ds.shape != shape:
            raise CacheError(
                f"{where}: statistics {st.name!r} has shape {ds.shape}, expected {shape}; "
                "the cache is corrupt, re-extract it"
            )
        if ds.dtype.kind not in ("iu" if st.name == "counts" else "f"):
            raise CacheError(f"{where}: statistics {st.name!r} have dtype {ds.dtype}; re-extract")
        declared_vs_stored(ds, where, f"statistics {st.name!r}")
    got = {st.name: np.asarray(group[st.name][()]) for st in STATES}
    stored = read_attr(group, "sha256")
    if stored is None and checksum:
        raise CacheError(
            f"{where}: the statistics carry no sha256 checksum, which a version-2 cache "
            "requires; the cache was modified, re-extract it"
        )
    if stored is not None and str(stored) != stats_digest(got):
        raise CacheError(
            f"{where}: statistics checksum mismatch (the sha256 stored at extraction does "
            "not match counts/means/scatter/class_ss); the cache was modified or corrupted, "
            "re-extract it"
        )
    return ClassStats.from_state_dict(got, K, d, source=where)


@register_read(IOSpec(STATS, "1"))
def _read_stats_v1(group: Any, where: str, **kw: Any) -> ClassStats:
    return _read_stats(group, where, checksum=False, **kw)


@register_read(IOSpec(STATS, "2"))
def _read_stats_v2(group: Any, where: str, **kw: Any) -> ClassStats:
    return _read_stats(group, where, checksum=True, **kw)


@register_write(IOSpec(STATS, FORMAT_VERSION))
def _write_stats(group: Any, stats: ClassStats) -> None:
    arrays = stats.state_dict()
    group.attrs["num_classes"] = stats.num_classes
    group.attrs["dim"] = stats.dim
    for name, arr in arrays.items():
        if name in group:
            del group[name]
        group.create_dataset(name, data=arr)
    group.attrs["sha256"] = stats_digest(arrays)


# ---------------------------------------------------------------------- layer
def _read_layer(g: Any, where: str, *, num_samples: int, num_classes: int, version: str) -> Layer:
    name = g.name.rpartition("/")[2]
    if get_spec(g).version != version:
        raise unsupported(g, where, LAYER, f" inside a version-{version} cache")
    if "stats" in g and get_spec(g["stats"]) != IOSpec(STATS, version):
        raise unsupported(g["stats"], where, STATS, f" inside a version-{version} cache")
    if "features" not in g and "stats" not in g:
        raise CacheError(f"{where}: /layers/{name} has neither features nor stats; re-extract")
    for key in ("features", "weight", "bias"):
        if key in g:
            mode = "stream" if key == "features" else "refuse"
            declared_vs_stored(g[key], where, f"/layers/{name}/{key}", compressed=mode)
    dim = int(read_attr(g, "dim", -1))
    pool = read_attr(g, "pool", "none")
    if not isinstance(pool, str) or pool not in POOLS:
        raise CacheError(
            f"{where}: /layers/{name} has pool {pool!r}, not one of {', '.join(POOLS)}; "
            "the cache is corrupt, re-extract it"
        )
    if "stats" not in g and dim > 0:  # stored statistics are checked when they are read
        check_stats_size(num_classes, dim, f"{where}: layer {name!r}", CacheError)
    N = num_samples
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
    return layer_record(g)


def layer_record(g: Any) -> Layer:
    """The :class:`Layer` a layer group describes (attributes only, nothing validated or
    read: ``nccli info`` shows unfinished files with it too)."""
    name = g.name.rpartition("/")[2]
    return Layer(
        name=name,
        dim=int(read_attr(g, "dim", -1)),
        module=str(read_attr(g, "module", name)),
        depth=int(read_attr(g, "depth", 0)),
        role=str(read_attr(g, "role", "other")),
        io=str(read_attr(g, "io", "input")),
        pool=str(read_attr(g, "pool", "none")),
        order=_order(read_attr(g, "order", -1)),
        stored=tuple(k for k in ("features", "weight", "bias", "stats") if k in g),
    )


def _order(value: Any) -> int:
    """The ``order`` attribute; anything but a non-negative integer reads as unknown (-1),
    and the layers are then listed by depth and name."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1


register_read(IOSpec(LAYER, "1"))(_read_layer)
register_read(IOSpec(LAYER, "2"))(_read_layer)


@register_write(IOSpec(LAYER, FORMAT_VERSION))
def _write_layer(
    g: Any,
    layer: Layer,
    *,
    num_samples: int,
    dtype: str,
    compression: str | None,
    features: bool = True,
) -> None:
    for key in LAYER_ATTRS:
        g.attrs[key] = getattr(layer, key)
    N = num_samples
    # chunks of ~1 MB rows-first: measure streams whole rows in order
    crow = max(1, min(N, max(64, (1 << 20) // (layer.dim * 4))))
    if features:  # without: statistics (and parameters) only, a language model's default
        g.create_dataset(
            "features",
            shape=(N, layer.dim),
            dtype=dtype,
            chunks=(crow, layer.dim),
            compression=compression,
        )
    # parameters keep their precision (float64 stays float64; halves are widened)
    for key in ("weight", "bias"):
        value = getattr(layer, key)
        if value is not None:
            arr = np.asarray(value)
            g.create_dataset(
                key, data=arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
            )


# ----------------------------------------------------------------------- root
def _read_layout(f: Any, where: str, version: str) -> dict[str, Layer]:
    N = read_attr(f, "num_samples")
    K = read_attr(f, "num_classes")
    for key in ("num_samples", "num_classes"):
        if not isinstance(read_attr(f, key), int) or read_attr(f, key) < 1:
            raise CacheError(f"{where}: root attribute {key!r} is missing or invalid; re-extract")
    for name in ("labels", "indices", "layers"):
        if name not in f:
            raise CacheError(
                f"{where}: dataset /{name} is missing; the cache is incomplete, re-extract"
            )
    for name in ("labels", "indices"):  # /logits are never read back
        declared_vs_stored(f[name], where, f"/{name}")
    if f["labels"].shape != (N,):
        raise CacheError(f"{where}: /labels has shape {f['labels'].shape}, expected ({N},)")
    if "logits" in f and f["logits"].shape != (N, K):
        raise CacheError(f"{where}: /logits has shape {f['logits'].shape}, expected ({N}, {K})")
    layers = {
        name: read_elem(g, LAYER, where, num_samples=N, num_classes=K, version=version)
        for name, g in f["layers"].items()
    }
    # the forward pass's order where every layer records it, else head depth, then name
    ordered = all(layer.order >= 0 for layer in layers.values())
    return dict(
        sorted(layers.items(), key=lambda kv: (kv[1].order if ordered else kv[1].depth, kv[0]))
    )


@register_read(IOSpec(ROOT, "1"))
def _read_root_v1(f: Any, where: str) -> dict[str, Layer]:
    """Version 1 also carried ``format`` and ``schema_version``; both must be right."""
    if read_attr(f, "format") != ROOT:
        raise CacheError(f"{where}: not an nccli cache (root attribute format is missing)")
    sv = read_attr(f, "schema_version")
    if sv != 1:
        raise unsupported(f, where, ROOT, f" (schema_version {sv!r})")
    return _read_layout(f, where, "1")


@register_read(IOSpec(ROOT, "2"))
def _read_root_v2(f: Any, where: str) -> dict[str, Layer]:
    return _read_layout(f, where, "2")


@register_write(IOSpec(ROOT, FORMAT_VERSION))
def _write_root(
    f: Any,
    layers: list[Layer],
    attrs: dict[str, Any],
    *,
    num_samples: int,
    num_classes: int,
    dtype: str,
    logits: bool,
    chunk_rows: int,
    compression: str | None,
    features: bool = True,
) -> None:
    for k, v in attrs.items():
        if v is not None:
            f.attrs[k] = str(v) if isinstance(v, str) else v  # str subclasses (torch version)
    N, K = num_samples, num_classes
    rows = max(1, min(chunk_rows, N))
    # chunked, so rows dropped by --skip-nonfinite can be cut off at finalize
    for key in ("labels", "indices"):
        f.create_dataset(key, shape=(N,), dtype="int64", chunks=(max(1, min(N, 1 << 16)),))
    if logits:
        f.create_dataset("logits", shape=(N, K), dtype="float32", chunks=(rows, K))
    grp = f.create_group("layers")
    for layer in layers:
        write_elem(
            grp.create_group(layer.name),
            LAYER,
            layer,
            num_samples=N,
            dtype=dtype,
            compression=compression,
            features=features,
        )


def write_stats(layer_group: Any, stats: ClassStats) -> None:
    """(Re)write the ``stats`` element of a layer group."""
    if "stats" in layer_group:
        del layer_group["stats"]
    write_elem(layer_group.create_group("stats"), STATS, stats)


def read_stats(layer_group: Any, where: str, num_classes: int, dim: int) -> ClassStats:
    """The ``stats`` element of a layer group, by its registered reader."""
    return read_elem(layer_group["stats"], STATS, where, num_classes=num_classes, dim=dim)
