"""What ``measure`` and ``compare`` read: nccli caches, shard sets, plain feature files.

Every input becomes a :class:`Source` (one checkpoint's features) holding
:class:`LayerView` s in depth order.  A layer view gives the statistics (stored, or
recomputed by streaming the features), chunked ``(features, labels)`` batches for the NC4
pass, and the classifier that acts on that layer — for a layer inside a deep linear head,
the composite affine map of the linear layers above it (docs/metrics.md, "Deep linear heads").

Plain files: ``.npz`` or ``.h5``/``.hdf5`` with arrays ``features`` (N, d), ``labels`` (N,)
and optionally ``weight`` (K, d), ``bias`` (K,) and a scalar ``epoch``.  HDF5 features are
streamed in chunks; stored ``.npz`` members are memory-mapped, deflated ones (which cannot
be read in parts) decompressed whole within a bound (:mod:`nccli.io.h5safe`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nccli.errors import CacheError, DataError, UsageError
from nccli.io._util import check_input_file, one_line
from nccli.io.cache import SHARD, Cache, check_shard_set, is_cache
from nccli.io.cache.run import RunFile, is_run_file
from nccli.io.cache.state import check_shard_files
from nccli.io.h5safe import (
    check_size,
    check_stats_size,
    inflate_bound,
    iter_rows,
    npz_member,
    open_failure,
    open_input,
)
from nccli.io.keep import kept_batches, stream_stats
from nccli.io.names import epoch_step_from_name, fill_from_name
from nccli.layers import Layer, compose_classifiers, head_chain
from nccli.stats import ClassStats

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclass
class LayerView:
    """One layer of one source, as the metrics see it: the cached :class:`Layer` record
    (its own module's ``weight``/``bias`` loaded, float64), the classifier acting on it,
    and its statistics."""

    source: Source
    layer: Layer
    classifier_weight: np.ndarray | None = None  # composite classifier acting on this layer
    classifier_bias: np.ndarray | None = None
    _stats: ClassStats | None = field(default=None, repr=False)
    _recomputed: ClassStats | None = field(default=None, repr=False)

    @classmethod
    def of(cls, source: Source, info: Layer, wb: tuple[Any, Any] | None) -> LayerView:
        """The view of a stored layer record with its own module's ``(weight, bias)``."""
        w, b = (None, None) if wb is None else wb
        return cls(source, dataclasses.replace(info, weight=w, bias=b))

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def dim(self) -> int:
        return self.layer.dim

    @property
    def depth(self) -> int:
        return self.layer.depth

    @property
    def role(self) -> str:
        return self.layer.role

    @property
    def weight(self) -> np.ndarray | None:
        """This layer's own module (``W_{l+1}``), float64."""
        return self.layer.weight

    @property
    def bias(self) -> np.ndarray | None:
        return self.layer.bias

    def stats(self, recompute: bool = False, chunk_rows: int = 8192) -> ClassStats:
        """Stored statistics, or (``recompute``) those of one streaming pass over the
        features — made once per view and reused by every later call that asks for them."""
        if recompute:
            if self._recomputed is None:
                self._recomputed = self._stream(chunk_rows)
            return self._recomputed
        if self._stats is None:
            self._stats = self._stream(chunk_rows)
        return self._stats

    def _stream(self, chunk_rows: int) -> ClassStats:
        """One pass over the features; the chunks are kept for the next pass over this
        layer (NC4) when they fit ``source.keep_bytes`` (:mod:`nccli.io.keep`)."""
        st = ClassStats(self.source.num_classes, self.dim, source=f"{self.source.path}:{self.name}")
        st.precision = self.source.precision
        return stream_stats(self, st, chunk_rows)

    @property
    def has_features(self) -> bool:
        """Whether :meth:`batches` has features to stream (a run file recorded without
        ``store_features``, or a language-model cache extracted without
        ``--store-features``, holds statistics only)."""
        stored = self.layer.stored  # a cache layer's datasets (empty: not a cache)
        return self.source.has_features and (not stored or "features" in stored)

    @property
    def feature_dtype(self) -> str | None:
        """The dtype the features were stored (or computed) in: it bounds how precisely
        the statistics resolve small directions (:class:`~nccli.metrics.LayerContext`)."""
        if isinstance(self.source, ArraySource):
            return str(self.source._features.dtype)
        value = self.source.attrs.get("feature_dtype")
        return None if value is None else str(value)

    def batches(self, chunk_rows: int = 8192) -> Batches:
        """``(features, labels)`` chunks of at most ``chunk_rows`` rows (those kept by the
        last pass over this layer when there are, without reading them again)."""
        kept = kept_batches(self, chunk_rows)
        return kept if kept is not None else self.source._batches(self.name, chunk_rows)


class Source:
    """One checkpoint's cached features: a cache, a shard set, or a plain features file."""

    path: str
    num_classes: int
    epoch: int | None
    step: int | None
    layers: dict[str, LayerView]
    attrs: dict[str, Any]
    has_features: bool = True
    precision: str = "exact"  # the scatter's arithmetic when statistics are streamed
    keep_bytes: float = 0  # bytes of one layer's chunks a pass may keep for the next (0: none)
    _kept: tuple[str, int, list[Any]] | None = None  # (layer, chunk_rows, chunks) kept

    def _batches(self, layer: str, chunk_rows: int) -> Batches:
        raise TypeError  # pragma: no cover - every subclass overrides it

    def close(self) -> None:
        """Release open files."""

    @property
    def notes(self) -> list[str]:
        """What was done to the input that the numbers depend on (e.g. dropped rows)."""
        return []

    @property
    def label(self) -> str:
        """Short name used in the ``source`` column."""
        return Path(self.path).name


def _compose_classifiers(views: list[LayerView], classifier: str | None) -> None:
    """Give each layer of the linear head the composite affine map of the layers above it
    (:func:`nccli.layers.compose_classifiers`); the chain must end at the cache's
    classifier."""
    chain = head_chain(views)
    if not chain or (classifier is not None and chain[-1].name != classifier):
        return
    for v, (C, c) in zip(chain, compose_classifiers(chain), strict=True):
        v.classifier_weight, v.classifier_bias = C, c


class CacheSource(Source):
    """One nccli cache file, or the shard files of one distributed extraction."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.caches = [Cache(p) for p in paths]
        first = self.caches[0]
        self.path = (
            str(first.path) if len(paths) == 1 else SHARD.sub(r"\g<base>.h5", first.path.name)
        )
        if len(paths) > 1:
            self.path = str(first.path.with_name(self.path))
        self.attrs = first.attrs
        self.num_classes = first.num_classes
        for c in self.caches[1:]:
            if c.num_classes != first.num_classes or list(c.layers) != list(first.layers):
                raise CacheError(
                    f"{c.path}: shard does not match {first.path} (classes or layers differ)"
                )
        if any("world_size" in c.attrs for c in self.caches):
            check_shard_set(self.caches, self.path)
            self.attrs = {
                k: v
                for k, v in first.attrs.items()
                if k not in ("rank", "row_start", "row_stop", "total_samples")
            }
            self.attrs["num_samples"] = first.attrs.get("total_samples")
        self.epoch, self.step = fill_from_name(
            self.attrs.get("epoch"), self.attrs.get("step"), *epoch_step_from_name(self.path)
        )
        self.layers = {}
        for name, info in first.layers.items():
            view = LayerView.of(self, info, first.weight(name))
            if info.has_stats:
                st = first.stats(name)
                for c in self.caches[1:]:
                    st.merge(c.stats(name))
                view._stats = st
            self.layers[name] = view
        _compose_classifiers(list(self.layers.values()), self.attrs.get("classifier"))
        for c in self.caches:
            c.labels()  # validates the label range once

    def _batches(self, layer: str, chunk_rows: int) -> Batches:
        for c in self.caches:
            yield from c.iter_features(layer, chunk_rows)

    def close(self) -> None:
        for c in self.caches:
            c.close()


class RunSource(Source):
    """One observation of a run file (:mod:`nccli.io.cache.run`): a source of its own,
    with the observation's epoch and step, labelled ``<file>@ep<epoch>`` (``s<step>``)."""

    def __init__(self, run: RunFile, index: int, users: list[int]) -> None:
        self.run, self._users, self._open = run, users, True
        obs = run.observation(index)
        self.obs = obs
        self.path = str(run.path)
        self.num_classes = run.num_classes
        self.epoch, self.step = obs.epoch, obs.step
        self.has_features = obs.has_features
        run_attrs = run.attrs
        self.attrs = {
            **{k: v for k, v in run_attrs.items() if k != "num_observations"},
            **obs.attrs,
            "observation": index,
            "epoch_from": "run",
            "step_from": "run",
        }
        self.layers = {}
        for name, info in obs.layers.items():
            view = LayerView.of(self, info, obs.weight(name))
            view._stats = obs.stats(name)
            self.layers[name] = view
        _compose_classifiers(list(self.layers.values()), run_attrs.get("classifier"))
        if self.has_features:
            obs.labels()  # validates the label range once

    @property
    def label(self) -> str:
        name = Path(self.path).name
        when = "" if self.epoch is None else f"ep{self.epoch}"
        return f"{name}@{when}{'' if self.step is None else f's{self.step}'}"

    def _batches(self, layer: str, chunk_rows: int) -> Batches:
        if not self.has_features:
            raise CacheError(
                f"{self.label}: the run file holds no features (recorded without "
                "store_features), only statistics; nc4, acc and ncc_acc need them: leave them "
                "out of --metrics, or record with Tracker(store_features=True)"
            )
        yield from self.obs.iter_features(layer, chunk_rows)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._users[0] -= 1
            if self._users[0] == 0:
                self.run.close()


def open_run(path: str | os.PathLike[str]) -> list[RunSource]:
    """One :class:`RunSource` per observation of the run file ``path``; the file closes
    when the last of them is closed."""
    run = RunFile(path)
    users = [0]
    out: list[RunSource] = []
    try:
        if len(run) == 0:
            raise CacheError(f"{path}: the run file holds no observations")
        for i in range(len(run)):
            out.append(RunSource(run, i, users))
            users[0] += 1
    except BaseException:
        run.close()
        raise
    return out


def _integer_labels(p: Path, labels: Any) -> np.ndarray:
    """``labels`` as int64, refusing fractional, non-integer or negative ones."""
    y = np.asarray(labels[()])
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{p}: 'labels' are fractional floats; class labels must be integers")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iub":
        raise DataError(f"{p}: 'labels' have dtype {y.dtype}; class labels must be integers")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{p}: 'labels' contain negative values ({int(y.min())})")
    return y


def _classifier(p: Path, W: Any, b: Any, dim: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The file's optional ``weight`` (K, d) and ``bias`` (K,), float64, checked."""
    W = None if W is None else np.asarray(W[()], dtype=np.float64)
    b = None if b is None else np.asarray(b[()], dtype=np.float64).reshape(-1)
    if W is not None and (W.ndim != 2 or W.shape[1] != dim):
        raise DataError(f"{p}: 'weight' has shape {W.shape}; expected (K, {dim}) to match features")
    if b is not None and (W is None or b.shape != (W.shape[0],)):
        raise DataError(f"{p}: 'bias' has shape {b.shape}; it needs a 'weight' with as many rows")
    for nm, arr in (("weight", W), ("bias", b)):
        if arr is not None and not np.isfinite(arr).all():
            raise DataError(f"{p}: '{nm}' contains NaN or Inf")
    return W, b


def _refuse_empty_classes(p: Path, y: np.ndarray, K: int) -> None:
    """A class below the largest label with no samples, when K came from that label, is
    almost always a numbering mistake (1-based labels, a gap), not a class left out on
    purpose: refuse it, naming the likely cause."""
    empty = np.flatnonzero(np.bincount(y, minlength=K) == 0)
    if not empty.size:
        return
    n = int(empty.size)
    if n == 1:
        what = f"class {int(empty[0])} has no samples"
    else:
        few = ", ".join(str(int(c)) for c in empty[:5]) + (", …" if n > 5 else "")
        what = f"{n} of {K} classes have no samples ({few})"
    if empty[0] == 0 and int(y.min()) == 1:
        fix = "are the labels 1-based? subtract 1"
    else:
        fix = f"renumber the labels 0..{K - n - 1} so that every class has samples"
    raise DataError(
        f"{p}: {what} but labels go up to {K - 1} ({K} classes inferred from the largest "
        f"label); {fix}, or pass --num-classes if those classes are absent on purpose (they "
        "are then left out of every metric)"
    )


class ArraySource(Source):
    """A plain ``.npz`` / ``.h5`` features file (``features``, ``labels``, opt. ``weight``,
    ``bias``, ``epoch``).

    Every array's declared size is checked against what the file holds before it is read
    (:mod:`nccli.io.h5safe`): stored ``.npz`` members are memory-mapped, HDF5 features
    are read a chunk at a time, labels a bounded chunk at a time and checked as they come.
    ``skip_nonfinite`` drops rows whose features hold NaN/Inf from every pass (statistics
    and the classifier pass alike); :attr:`skipped` counts them per class once a full pass
    has run, and :attr:`notes` reports them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int | None = None,
        *,
        skip_nonfinite: bool = False,
    ) -> None:
        self.path = str(path)
        self.attrs = {}
        self._h5: h5py.File | None = None
        self.skip_nonfinite = skip_nonfinite
        self.skipped: np.ndarray | None = None
        p = Path(path)
        check_input_file(p, "features file")
        if p.suffix == ".npz":
            arrays, keys = self._load_npz(p)
            get = arrays.get
        else:
            self._h5 = self._open_h5(p)
            keys = set(self._h5.keys())

            def get(k: str, default: Any = None) -> Any:
                return self._h5[k] if k in self._h5 else default

        try:
            self._setup(p, keys, get, num_classes)
        except BaseException:
            self.close()
            raise

    def _setup(self, p: Path, keys: set[str], get: Any, num_classes: int | None) -> None:
        for need in ("features", "labels"):
            if need not in keys:
                raise DataError(
                    f"{p}: no array named {need!r} (found: {', '.join(sorted(keys)) or 'none'}); "
                    "a features file needs 'features' (N, d) and 'labels' (N,)"
                )
        feats, labels = get("features"), get("labels")
        if self._h5 is not None:  # npz members were checked as they were opened
            check_size(feats, str(p), "'features'", compressed="stream", every_chunk=False)
            for key in ("labels", "weight", "bias", "epoch"):
                if get(key) is not None:
                    check_size(get(key), str(p), f"{key!r}", compressed="whole", every_chunk=False)
        if feats.ndim != 2:
            raise DataError(f"{p}: 'features' must be 2-D (N, d), got shape {feats.shape}")
        if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
            raise DataError(
                f"{p}: 'labels' has shape {labels.shape} but 'features' has {feats.shape[0]} rows"
            )
        y = np.empty(labels.shape, dtype=np.int64)
        for start, chunk in iter_rows(labels):  # a bounded read each, checked as it comes
            y[start : start + len(chunk)] = _integer_labels(p, chunk)
        if feats.dtype.kind not in "fiu":
            raise DataError(f"{p}: 'features' have dtype {feats.dtype}; expected numbers")
        W, b = _classifier(p, get("weight"), get("bias"), int(feats.shape[1]))
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"num_classes must be at least 1, got {num_classes}")
        K = num_classes or (W.shape[0] if W is not None else int(y.max()) + 1 if y.size else 0)
        if y.size and y.max() >= K:
            raise DataError(
                f"{p}: labels go up to {int(y.max())} but there are {K} classes "
                f"({'rows of weight' if W is not None else '--num-classes'}); fix the labels"
            )
        if K < 1:
            raise DataError(f"{p}: no samples")
        if num_classes is None and W is None:  # K inferred from the labels: none may be empty
            _refuse_empty_classes(p, y, K)
        check_stats_size(K, int(feats.shape[1]), str(p))
        self.num_classes = K
        self._features = feats
        self._labels = y
        name_epoch, name_step = epoch_step_from_name(p.name)
        ep = get("epoch")
        if ep is None and self._h5 is not None and "epoch" in self._h5.attrs:
            ep = np.asarray(self._h5.attrs["epoch"])  # a root attribute, when no dataset
        self.epoch = self._epoch(p, ep, name_epoch)
        self.step = name_step
        layer = Layer("features", int(feats.shape[1]), role="penultimate", weight=W, bias=b)
        view = LayerView(self, layer)
        view.classifier_weight, view.classifier_bias = W, b
        self.layers = {"features": view}

    @staticmethod
    def _epoch(p: Path, ep: Any, default: int | None) -> int | None:
        """The file's scalar ``epoch`` (a whole number), else the one in its name."""
        if ep is None:
            return default
        if ep.shape is None or math.prod(ep.shape) != 1:
            raise DataError(f"{p}: 'epoch' must be a single number, got shape {ep.shape}")
        v = np.asarray(ep[()]).reshape(-1)[0]
        if v.dtype.kind in "iu" or (v.dtype.kind == "f" and np.isfinite(v) and v == np.round(v)):
            return int(v)
        raise DataError(f"{p}: 'epoch' must be a whole number, got {v.item()!r}")

    @staticmethod
    def _open_h5(p: Path) -> h5py.File:
        try:
            return open_input(p, "features file")
        except OSError as exc:
            raise DataError(
                f"{p}: not a readable HDF5 file ({one_line(exc, 160)}); it may be truncated "
                "or corrupt, re-extract the cache or re-create the file"
            ) from None

    @staticmethod
    def _load_npz(p: Path) -> tuple[dict[str, np.ndarray], set[str]]:
        """The members a features file uses, each checked (:func:`npz_member`), and the
        names of all of its arrays."""
        try:
            with zipfile.ZipFile(p) as zf:
                names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
                budget = [inflate_bound(p.stat().st_size)]
                used = sorted(names & {"features", "labels", "weight", "bias", "epoch"})
                arrays = {k: npz_member(p, zf, k, budget=budget) for k in used}
        except FileNotFoundError:
            raise DataError(f"{p}: no such file") from None
        except OSError as exc:
            fail = open_failure(exc, p, "features file")
            if fail is not None:
                raise fail from None
            raise DataError(f"{p}: not a readable .npz file ({exc}); is it truncated?") from None
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise DataError(f"{p}: not a readable .npz file ({exc}); is it truncated?") from None
        # the features stay memory-mapped (read per batch); the rest is small: in memory
        return {k: v if k == "features" else np.array(v) for k, v in arrays.items()}, names

    def _batches(self, layer: str, chunk_rows: int) -> Batches:
        N = self._labels.shape[0]
        dropped = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, N, chunk_rows):
            stop = min(N, start + chunk_rows)
            try:
                h = np.asarray(self._features[start:stop])
            except OSError as exc:
                raise DataError(f"{self.path}: cannot read features ({exc})") from None
            if not h.flags.writeable:  # a memory-mapped npz member: torch wants its own copy
                h = np.array(h)
            y = self._labels[start:stop]
            if self.skip_nonfinite and h.dtype.kind == "f":
                ok = np.isfinite(h).all(axis=1)
                if not ok.all():
                    dropped += np.bincount(y[~ok], minlength=self.num_classes)
                    h, y = h[ok], y[ok]
            yield h, y
        if self.skip_nonfinite:
            self.skipped = dropped

    @property
    def notes(self) -> list[str]:
        if self.skipped is None or not self.skipped.any():
            return []
        per_class = ", ".join(f"class {k}: {int(n)}" for k, n in enumerate(self.skipped) if n)
        return [
            f"{self.label}: skipped {int(self.skipped.sum())} samples with NaN/Inf features "
            f"(--skip-nonfinite; {per_class})"
        ]

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()


def open_sources(
    paths: Sequence[str | os.PathLike[str]],
    num_classes: int | None = None,
    *,
    skip_nonfinite: bool = False,
) -> list[Source]:
    """Open every input; shard files ``x.rank<r>.h5`` of one run become one source, and
    a run file (:mod:`nccli.io.cache.run`) one source per observation.

    Files are merged as shards only when their attributes say they are the shards of one
    run (:func:`~nccli.io.cache.state.check_shard_files`), never by their names alone.
    A directory stands for the caches it holds.  ``skip_nonfinite`` drops NaN/Inf rows of
    plain feature files (caches never hold any: ``extract`` refuses or drops them).
    """
    expanded: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q
                for q in p.iterdir()
                if q.suffix in (".h5", ".hdf5") and (is_run_file(q) or is_cache(q))
            )
            if not found:
                raise DataError(f"{p}: directory holds no nccli caches (*.h5)")
            expanded.extend(found)
        else:
            expanded.append(p)
    groups: dict[str, list[Path]] = {}
    for p in expanded:
        m = SHARD.match(p.name)
        key = str(p.with_name(m.group("base"))) + "#shards" if m else str(p)
        groups.setdefault(key, []).append(p)
    out: list[Source] = []
    try:
        for key, members in groups.items():
            first = members[0]
            if not first.exists() and not first.name.endswith(".partial"):
                raise DataError(f"{first}: no such file")
            if first.name.endswith(".partial") and is_run_file(first):
                raise CacheError(
                    f"{first}: an unfinished append to a run file (a Tracker was stopped while "
                    f"writing it); {first.name[: -len('.partial')]} holds every observation "
                    "made before: read that one and delete this file"
                )
            if first.name.endswith(".partial"):
                Cache(first)  # raises the clear "unfinished cache" error
            if key.endswith("#shards"):
                members.sort(key=lambda q: int(SHARD.match(q.name).group("rank")))
                if len(members) > 1:
                    check_shard_files(members)
                out.append(CacheSource(members))
            elif first.suffix in (".h5", ".hdf5") and is_run_file(first):
                out.extend(open_run(first))
            elif first.suffix in (".h5", ".hdf5") and is_cache(first):
                out.append(CacheSource([first]))
            elif first.suffix in (".npz", ".h5", ".hdf5"):
                out.append(ArraySource(first, num_classes, skip_nonfinite=skip_nonfinite))
            else:
                raise DataError(
                    f"{first}: unknown input type; measure reads nccli caches (.h5) or "
                    "features files (.npz/.h5 with 'features' and 'labels')"
                )
    except BaseException:
        for s in out:
            s.close()
        raise
    return out
