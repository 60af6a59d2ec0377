"""The run file: the observations a :class:`nccli.Tracker` made of one model in training.

Layout (``encoding-type="nccli-run"``, version 1; docs/cache-format.md, "Run files")::

    /                         encoding-type="nccli-run"  encoding-version="1"  complete=True
                              num_observations, num_classes, arch, classifier, head_depth,
                              nccli_version, created, updated, torch_version, feature_dtype
    /layers/<name>            the model description: attributes module depth role dim io
                              pool order of each tracked layer (no data)
    /observations/<i>         i = 0 … num_observations-1, in the order they were made;
                              encoding-type="nccli-observation"  encoding-version="1";
                              laid out like a cache root: epoch, step (when given), mode
                              (eval | train), num_samples, num_classes, created, device,
                              world_size; /labels (N,) only with features
    /observations/<i>/layers/<name>   an ``nccli-layer`` 2 group: weight, bias (the module's
                              parameters at that observation), stats (``nccli-classstats``
                              2, checksummed), features (N, d) only with store_features

Appending (:func:`append_observation`) validates the existing file as any input, writes a
new file beside it (``<path>.partial``, created exclusively under the output lock) with
the old observations copied and the new one added, and renames it over the old one: a
crash leaves the previous run file intact.  An observation whose layers or classes differ
from the description, or that repeats an (epoch, step) already recorded, is refused.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nccli._version import __version__
from nccli.errors import CacheError, DataError
from nccli.io.cache.elements import (
    FORMAT_VERSION,
    LAYER,
    LAYER_ATTRS,
    STATS,
    _read_layer,
    layer_record,
    write_stats,
)
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
from nccli.io.cache.reader import Cache, _reading
from nccli.io.h5safe import check_stats_size, open_input
from nccli.io.safe import (
    OutputLock,
    clear_stale,
    partial_path,
    refuse_link,
    remove_created,
    same_file,
)
from nccli.layers import Layer
from nccli.stats import ClassStats

__all__ = [
    "OBSERVATION",
    "RUN",
    "Observation",
    "ObservationCache",
    "RunFile",
    "RunModel",
    "append_observation",
    "is_run_file",
]

RUN, OBSERVATION = "nccli-run", "nccli-observation"
RUN_VERSION = "1"
MODES = ("eval", "train")
#: layer attributes that must agree between the description and every observation
_SAME = ("dim", "module", "depth", "role", "io", "pool")


@dataclass
class RunModel:
    """What a run file describes once: the tracked layers and the model's classes."""

    layers: list[Layer]
    num_classes: int
    arch: str
    classifier: str | None = None
    head_depth: int | None = None
    feature_dtype: str = "float32"


@dataclass
class Observation:
    """One observation: statistics (and parameters) of every tracked layer at one time."""

    epoch: int | None
    step: int | None
    mode: str
    stats: dict[str, ClassStats]
    params: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)
    features: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.stats.values())).n)


def _key(epoch: Any, step: Any) -> str:
    return f"epoch {epoch}" + ("" if step is None else f" step {step}")


# ----------------------------------------------------------------- elements
def _check_description(f: Any, where: str) -> dict[str, Layer]:
    K = read_attr(f, "num_classes")
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise CacheError(f"{where}: root attribute 'num_classes' is missing or invalid")
    if "layers" not in f or "observations" not in f:
        raise CacheError(f"{where}: /layers or /observations is missing; the run file is corrupt")
    layers = {name: layer_record(g) for name, g in f["layers"].items()}
    if not layers:
        raise CacheError(f"{where}: the run file describes no layers; it is corrupt")
    for layer in layers.values():
        problem = layer.problem()
        if problem is not None or layer.dim < 1:
            raise CacheError(f"{where}: {problem or f'layer {layer.name!r} has no dimension'}")
        check_stats_size(K, layer.dim, f"{where}: layer {layer.name!r}", CacheError)
    # the forward pass's order where every layer records it, else head depth, then name
    ordered = all(layer.order >= 0 for layer in layers.values())
    return dict(
        sorted(layers.items(), key=lambda kv: (kv[1].order if ordered else kv[1].depth, kv[0]))
    )


@register_read(IOSpec(RUN, RUN_VERSION))
def _read_run(f: Any, where: str) -> tuple[dict[str, Layer], list[dict[str, Any]]]:
    """The description and every observation's record, each checked against it."""
    layers = _check_description(f, where)
    K = int(read_attr(f, "num_classes"))
    n = read_attr(f, "num_observations")
    names = sorted(f["observations"])
    if not isinstance(n, int) or names != sorted(str(i) for i in range(max(n, 0))):
        raise CacheError(
            f"{where}: num_observations is {n!r} but /observations holds "
            f"{len(names)} groups ({', '.join(names[:5])}); the run file is corrupt"
        )
    obs = [
        read_elem(f[f"observations/{i}"], OBSERVATION, where, layers=layers, num_classes=K)
        for i in range(n)
    ]
    seen: set[tuple[Any, Any]] = set()
    for o in obs:
        k = (o["epoch"], o["step"])
        if k in seen:
            raise CacheError(f"{where}: two observations at {_key(*k)}; the run file is corrupt")
        seen.add(k)
    return layers, obs


def _int_or_none(g: Any, key: str, where: str) -> int | None:
    v = read_attr(g, key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CacheError(f"{where}: {g.name} has {key} {v!r}, not a whole number ≥ 0")
    return v


@register_read(IOSpec(OBSERVATION, RUN_VERSION))
def _read_observation(
    g: Any, where: str, *, layers: dict[str, Layer], num_classes: int
) -> dict[str, Any]:
    at = f"{where}:{g.name}"
    N = read_attr(g, "num_samples")
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise CacheError(f"{at}: num_samples is missing or invalid; the run file is corrupt")
    if read_attr(g, "num_classes") != num_classes:
        raise CacheError(f"{at}: num_classes differs from the run's {num_classes}")
    mode = read_attr(g, "mode")
    if mode not in MODES:
        raise CacheError(f"{at}: mode {mode!r} is not one of {', '.join(MODES)}")
    if "layers" not in g or sorted(g["layers"]) != sorted(layers):
        got = sorted(g["layers"]) if "layers" in g else []
        raise CacheError(
            f"{at}: holds layers {got}, the run describes {sorted(layers)}; the run file is corrupt"
        )
    out: dict[str, Layer] = {}
    for name, lg in g["layers"].items():
        if get_spec(lg) != IOSpec(LAYER, FORMAT_VERSION):
            raise unsupported(lg, where, LAYER, " inside a run file")
        if "stats" not in lg or get_spec(lg["stats"]) != IOSpec(STATS, FORMAT_VERSION):
            raise CacheError(f"{at}/layers/{name}: the statistics are missing or of another kind")
        layer = _read_layer(lg, where, num_samples=N, num_classes=num_classes, version="2")
        want = layers[name]
        diff = [k for k in _SAME if getattr(layer, k) != getattr(want, k)]
        if diff:
            raise CacheError(f"{at}/layers/{name}: {', '.join(diff)} differ from the description")
        out[name] = layer
    has_features = {"features" in layer.stored for layer in out.values()}
    if has_features == {True} and ("labels" not in g or g["labels"].shape != (N,)):
        raise CacheError(f"{at}: features without /labels of shape ({N},); the file is corrupt")
    if len(has_features) > 1:
        raise CacheError(f"{at}: some layers hold features and others not; the file is corrupt")
    epoch, step = _int_or_none(g, "epoch", where), _int_or_none(g, "step", where)
    if epoch is None and step is None:
        raise CacheError(f"{at}: has neither an epoch nor a step; the run file is corrupt")
    return {"epoch": epoch, "step": step, "mode": mode, "num_samples": N, "layers": out}


@register_write(IOSpec(OBSERVATION, RUN_VERSION))
def _write_observation(g: Any, model: RunModel, obs: Observation) -> None:
    N = obs.num_samples
    attrs = {
        **obs.attrs,
        "epoch": obs.epoch,
        "step": obs.step,
        "mode": obs.mode,
        "num_samples": N,
        "num_classes": model.num_classes,
        "created": _now(),
    }
    for k, v in attrs.items():
        if v is not None:
            g.attrs[k] = v
    if obs.features is not None:
        g.create_dataset("labels", data=np.asarray(obs.labels, dtype=np.int64))
    grp = g.create_group("layers")
    for layer in model.layers:
        lg = grp.create_group(layer.name)
        for key in LAYER_ATTRS:
            lg.attrs[key] = getattr(layer, key)
        W, b = obs.params.get(layer.name, (None, None))
        for key, value in (("weight", W), ("bias", b)):
            if value is not None:
                arr = np.asarray(value)
                lg.create_dataset(
                    key, data=arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
                )
        if obs.features is not None:
            h = np.asarray(obs.features[layer.name], dtype=model.feature_dtype)
            crow = max(1, min(N, max(64, (1 << 20) // (layer.dim * 4))))
            lg.create_dataset("features", data=h, chunks=(crow, layer.dim))
        write_stats(lg, obs.stats[layer.name])
        lg.attrs["encoding-type"] = LAYER  # the layer element of a cache, version 2
        lg.attrs["encoding-version"] = FORMAT_VERSION


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------- reading
class ObservationCache(Cache):
    """One observation of a run file, read as a cache (the group is laid out like a
    cache root): ``stats``, ``weight``, ``labels`` and ``iter_features`` validate as
    :class:`~nccli.io.cache.reader.Cache` does."""

    def __init__(self, run: RunFile, index: int, record: dict[str, Any]) -> None:  # noqa: D107
        self.path = run.path
        self.h5 = run.h5[f"observations/{index}"]
        self.version = FORMAT_VERSION
        self.layers = {name: record["layers"][name] for name in run.layers}
        self.index = index
        self.epoch, self.step, self.mode = record["epoch"], record["step"], record["mode"]

    @property
    def has_features(self) -> bool:
        return all("features" in layer.stored for layer in self.layers.values())

    def close(self) -> None:
        """The run file owns the HDF5 handle."""


class RunFile:
    """A validated, read-only run file: its description and its observations."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        if not self.path.exists():
            raise DataError(f"{where}: no such file")
        try:
            self.h5 = open_input(self.path, "run file", error=CacheError)
        except OSError as exc:
            raise CacheError(
                f"{where}: not a readable HDF5 file ({exc}); the run file may be truncated or "
                "corrupt"
            ) from None
        try:
            spec = get_spec(self.h5)
            if spec != IOSpec(RUN, RUN_VERSION):
                raise unsupported(self.h5, where, RUN)
            if not read_attr(self.h5, "complete", False):
                raise CacheError(f"{where}: the run file is not marked complete; it is corrupt")
            with _reading(where, "the run file's layout"):
                self.layers, self._records = read_elem(self.h5, RUN, where)
        except Exception:
            self.h5.close()
            raise

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: read_attr(self.h5, k) for k in self.h5.attrs}

    @property
    def num_classes(self) -> int:
        return int(read_attr(self.h5, "num_classes"))

    def __len__(self) -> int:
        return len(self._records)

    def observation(self, i: int) -> ObservationCache:
        return ObservationCache(self, i, self._records[i])

    def observations(self) -> Iterator[ObservationCache]:
        for i in range(len(self)):
            yield self.observation(i)

    def keys(self) -> list[tuple[int | None, int | None]]:
        """``(epoch, step)`` of every observation, in order."""
        return [(r["epoch"], r["step"]) for r in self._records]

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_run_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an HDF5 file whose root says it is a run file (of any
    version: the reader then explains a version it cannot read)."""
    if os.path.isdir(path):
        return False
    try:
        f = open_input(path, "input", contents=False)
    except Exception:  # noqa: BLE001 - not HDF5, unreadable: someone else's error to give
        return False
    with f:
        try:
            return read_attr(f, "encoding-type") == RUN
        except Exception:  # noqa: BLE001 - a damaged root
            return False


# ------------------------------------------------------------------- writing
def _check_fits(old: RunFile, model: RunModel, obs: Observation) -> None:
    where = str(old.path)
    have = {n: tuple(getattr(v, k) for k in _SAME) for n, v in old.layers.items()}
    want = {v.name: tuple(getattr(v, k) for k in _SAME) for v in model.layers}
    if have != want or old.num_classes != model.num_classes:
        raise DataError(
            f"{where}: the run file holds observations of other layers or classes "
            f"({', '.join(sorted(have))}; K={old.num_classes}) than this tracker's "
            f"({', '.join(sorted(want))}; K={model.num_classes}); choose another path or "
            "delete the file"
        )
    if (obs.epoch, obs.step) in old.keys():
        raise DataError(
            f"{where}: already holds an observation at {_key(obs.epoch, obs.step)}; "
            "pass another epoch or step"
        )


def _write_root(f: Any, model: RunModel, n: int, created: str | None) -> None:
    import torch  # the version recorded; torch is loaded whenever a tracker runs

    attrs = {
        "complete": True,
        "num_observations": n,
        "num_classes": model.num_classes,
        "arch": model.arch,
        "classifier": model.classifier,
        "head_depth": model.head_depth,
        "feature_dtype": model.feature_dtype,
        "nccli_version": __version__,
        "created": created or _now(),
        "updated": _now(),
        "torch_version": str(torch.__version__),
    }
    for k, v in attrs.items():
        if v is not None:
            f.attrs[k] = v
    grp = f.create_group("layers")
    for layer in model.layers:
        lg = grp.create_group(layer.name)
        for key in LAYER_ATTRS:
            lg.attrs[key] = getattr(layer, key)
    f.create_group("observations")


def append_observation(path: str | os.PathLike[str], model: RunModel, obs: Observation) -> int:
    """Add ``obs`` to the run file ``path`` (created when absent); its index.

    The existing file is validated first; the new one is written to ``<path>.partial``
    and renamed over it, so the run file on disk is always a complete one."""
    from nccli.io.cache.writer import _open_h5, _write_failed

    if obs.mode not in MODES:
        raise DataError(f"observation mode {obs.mode!r} is not one of {', '.join(MODES)}")
    path = Path(path)
    tmp = partial_path(path)
    refuse_link(path, "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(path, "path"):
        if path.exists() and not is_run_file(path):
            raise DataError(
                f"{path}: exists and is not an nccli run file; choose another path or delete it"
            )
        old = RunFile(path) if path.exists() else None
        ident = None
        try:
            if old is not None:
                _check_fits(old, model, obs)
            clear_stale(tmp, "path")
            f, ident = _open_h5(tmp, create=True)
            try:
                n = 0 if old is None else len(old)
                created = None if old is None else read_attr(old.h5, "created")
                write_elem(f, RUN, model, n + 1, created)
                for i in range(n):
                    f.copy(old.h5[f"observations/{i}"], f["observations"], name=str(i))
                write_elem(f["observations"].create_group(str(n)), OBSERVATION, model, obs)
                f.flush()
            finally:
                f.close()
        except (OSError, RuntimeError) as exc:
            if ident is not None:
                remove_created(tmp, ident)
            raise _write_failed(tmp, exc) from exc
        except BaseException:
            if ident is not None:
                remove_created(tmp, ident)
            raise
        finally:
            if old is not None:
                old.close()
        refuse_link(path, "path")
        if not same_file(tmp, ident):
            raise DataError(
                f"{tmp}: was replaced while nccli wrote it (another program writes there); "
                "choose another path"
            )
        os.replace(tmp, path)
    return n


register_write(IOSpec(RUN, RUN_VERSION))(_write_root)
