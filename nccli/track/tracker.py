"""``nccli.Tracker``: the statistics of a live model, observed during training.

:meth:`Tracker.observe` makes one extra pass over a loader, in eval mode without grad,
with the same hooks, pooling and float64 statistics as ``nccli extract``
(:func:`~nccli.extract.discovery.discover_layers`, :class:`~nccli.extract.capture.Capture`;
features are cast to the storage dtype, float32 by default, before they are folded in, as
extract does); :meth:`Tracker.collect` folds in the features of the training forward
passes of one epoch instead (no extra pass, but the network moves while it is measured).
Each observation is appended to the run file (:mod:`nccli.io.cache.run`), which
``nccli measure`` and ``nccli compare`` read as a trajectory.  Afterwards every module's
``training`` flag, every parameter's ``requires_grad``, the grad mode and the device are
as before, and every hook is removed, also when the pass raises.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nccli.errors import DataError, UsageError
from nccli.extract.capture import Capture
from nccli.extract.devices import FEATURE_DTYPES
from nccli.extract.discovery import Discovery, _param, discover_layers
from nccli.io.cache.run import Observation, RunModel, append_observation
from nccli.layers import Layer
from nccli.stats import ClassStats
from nccli.track import dist as _dist
from nccli.track.batches import (
    batch_size,
    eval_mode,
    head_rows,
    labels_tensor,
    model_device,
    preserved,
    split_batch,
    to_device,
    unwrap,
)

__all__ = ["PROBE_SAMPLES", "Collector", "Tracker"]

#: samples of the first batch that run the discovery probe (as in extract)
PROBE_SAMPLES = 8


class _Accumulator:
    """The statistics (and, with ``store``, host copies of the features) of one observation."""

    def __init__(self, layers: list[Layer], K: int, device: torch.device, dtype: str, where: str):
        self.layers = layers
        self.dtype = FEATURE_DTYPES[dtype]
        self.stats = {
            c.name: ClassStats(K, c.dim, device=device, source=f"{where}:{c.name}") for c in layers
        }
        self.device = device
        self.rows: dict[str, list[np.ndarray]] | None = None
        self.labels: list[np.ndarray] = []
        self.batches = 0

    def keep_features(self) -> None:
        self.rows = {c.name: [] for c in self.layers}

    def add(self, feats: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        for name, h in feats.items():
            h = h.detach().to(self.dtype)  # the features as extract would store them
            self.stats[name].update(h if h.device == self.device else h.to(self.device), y)
            if self.rows is not None:
                self.rows[name].append(h.cpu().numpy())
        if self.rows is not None:
            self.labels.append(y.cpu().numpy())
        self.batches += 1


class Collector:
    """The handle :meth:`Tracker.collect` yields: call :meth:`labels` once after every
    training forward pass, with that batch's labels."""

    def __init__(self, tracker: Tracker, acc: _Accumulator, cap: Capture) -> None:
        self._tracker, self._acc, self._cap = tracker, acc, cap

    def _captured(self) -> dict[str, int]:
        return {name: len(got) for name, got in self._cap.seen.items()}

    def labels(self, y: Any) -> None:
        """Fold the features of the forward pass just run into the statistics, with
        ``y`` (one class index per sample) as its labels."""
        counts = self._captured()
        if set(counts.values()) != {1}:
            n = max(counts.values())
            what = "no forward pass ran" if n == 0 else f"{n} forward passes ran"
            raise DataError(
                f"{self._tracker.path}: collect: {what} since the last labels() call; call "
                "labels(y) exactly once after each training forward pass (forwards outside "
                "training, or activation checkpointing that reruns them, break the pairing)"
            )
        first = next(iter(self._cap.seen.values()))[0]
        B = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else None
        yt = labels_tensor(y, B, self._acc.device)
        self._acc.add(self._cap.take(int(yt.shape[0])), yt)

    def pending(self) -> bool:
        return any(self._captured().values())


class Tracker:
    """Neural-collapse statistics of ``model``, observed while it trains.

    ``layers`` and ``pool`` are those of ``nccli extract`` (``"auto"``: the penultimate
    feature and the linear head); the layers are discovered on the first observation,
    from a few samples of its first batch.  ``path`` is the run file (required).
    ``num_classes`` defaults to the model's number of logits.  ``device``: where the
    float64 statistics live (default: the model's device).  ``store_features`` keeps each
    observation's features in the run file too (needed by ``nc4``, ``acc``, ``ncc_acc``
    and ``--recompute``; N × d values per layer and observation, held in host memory
    during the pass).  ``unpack``: ``fn(item) -> (inputs, labels)`` for loader items the
    default contract (:mod:`nccli.track.batches`) does not read.  ``probe``: an input
    batch for discovery, when the first observation is a :meth:`collect`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "auto",
        path: str | os.PathLike[str] | None = None,
        *,
        num_classes: int | None = None,
        pool: str | None = None,
        device: str | torch.device | None = None,
        store_features: bool = False,
        feature_dtype: str = "float32",
        arch: str | None = None,
        unpack: Callable[[Any], Any] | None = None,
        probe: Any = None,
    ) -> None:
        if path is None:
            raise UsageError("Tracker needs path=, the run file its observations go to")
        if not isinstance(model, nn.Module):
            raise UsageError(f"Tracker needs an nn.Module, got {type(model).__name__}")
        if feature_dtype not in FEATURE_DTYPES:
            raise UsageError(f"feature_dtype must be float32 or float16, got {feature_dtype!r}")
        if num_classes is not None and int(num_classes) < 1:
            raise UsageError(f"num_classes must be at least 1, got {num_classes}")
        self.model = model
        self.net = unwrap(model)
        self.layers = layers
        self.path = Path(path)
        self.num_classes = num_classes
        self.pool = pool
        self.device = None if device is None else torch.device(device)
        self.store_features = bool(store_features)
        self.feature_dtype = feature_dtype
        self.arch = arch or f"<{type(self.net).__qualname__} module>"
        self.unpack = unpack
        self.discovery: Discovery | None = None
        self._probe = probe

    # ---------------------------------------------------------------- discovery
    @property
    def stats_device(self) -> torch.device:
        return self.device if self.device is not None else model_device(self.net)

    def _discover(self, x: Any) -> Discovery:
        """Discovery on the first samples of ``x`` (the model is in eval mode here)."""
        if self.discovery is not None:
            return self.discovery
        if not isinstance(x, torch.Tensor):
            raise UsageError(
                f"{self.path}: layer discovery needs the model input as one tensor, got a "
                f"{type(x).__name__}; pass Tracker(unpack=fn) with fn(item) -> (tensor, labels)"
            )
        probe = head_rows(x, PROBE_SAMPLES)
        disc = discover_layers(self.net, probe, self.layers, pool=self.pool, source=str(self.path))
        K = self.num_classes or disc.num_logits
        if disc.classifier is not None and K != disc.num_logits:
            raise UsageError(
                f"{self.path}: num_classes={K} but the classifier {disc.classifier} has "
                f"{disc.num_logits} outputs"
            )
        self.num_classes = K
        self.discovery = disc
        return disc

    def _run_model(self) -> RunModel:
        disc = self.discovery
        assert disc is not None and self.num_classes is not None
        return RunModel(
            layers=[_bare(c) for c in disc.layers],
            num_classes=self.num_classes,
            arch=self.arch,
            classifier=disc.classifier,
            head_depth=disc.head_depth if disc.head else None,
            feature_dtype=self.feature_dtype,
        )

    def _accumulator(self, epoch: int | None, step: int | None) -> _Accumulator:
        disc = self.discovery
        assert disc is not None and self.num_classes is not None
        where = f"{self.path}@{_when(epoch, step)}"
        acc = _Accumulator(
            disc.layers, self.num_classes, self.stats_device, self.feature_dtype, where
        )
        if self.store_features:
            acc.keep_features()
        return acc

    # ---------------------------------------------------------------- observe
    def observe(
        self, loader: Iterable[Any], *, epoch: int | None = None, step: int | None = None
    ) -> int:
        """One pass over ``loader`` in eval mode without grad; the observation is appended
        to the run file.  Returns its index in the file."""
        epoch, step = _check_when(epoch, step)
        _dist.check_sampler(loader)
        dev = model_device(self.net)
        acc = None
        with preserved(self.net):
            eval_mode(self.net)
            with torch.no_grad():
                cap = None
                try:
                    for item in loader:
                        x, y = split_batch(item, self.unpack)
                        x = to_device(x, dev)
                        if cap is None:
                            self._discover(x)
                            acc = self._accumulator(epoch, step)
                            cap = Capture(self.net, self.discovery.layers, str(self.path))
                        self.net(x)
                        B = batch_size(x)
                        yt = labels_tensor(y, B, acc.device)
                        acc.add(cap.take(int(yt.shape[0])), yt)
                finally:
                    if cap is not None:
                        cap.remove()
        if acc is None:
            acc = self._empty_shard(epoch, step)
        return self._record(acc, epoch, step, "eval")

    def _empty_shard(self, epoch: int | None, step: int | None) -> _Accumulator:
        """A rank whose shard is empty still takes part in the merge (after discovery)."""
        if self.discovery is None or _dist.world() is None:
            raise DataError(f"{self.path}: the loader yielded no batches; nothing to observe")
        return self._accumulator(epoch, step)

    # ---------------------------------------------------------------- collect
    @contextlib.contextmanager
    def collect(
        self, *, epoch: int | None = None, step: int | None = None, probe: Any = None
    ) -> Iterator[Collector]:
        """Accumulate from the training forward passes run inside the block.

        ``with tracker.collect(epoch=e) as c:`` … ``out = model(x); c.labels(y)`` …: the
        hooks capture each forward's features (detached: no gradient flows into the
        statistics), :meth:`Collector.labels` pairs them with the batch's labels.  The
        statistics describe the *moving* network (every batch is seen by other weights);
        the classifier stored is the one at the end of the block.  The observation is
        appended when the block ends without an error; the hooks are removed either way.
        Discovery needs an input: the one of an earlier :meth:`observe`, ``probe`` here,
        or ``Tracker(probe=...)``."""
        epoch, step = _check_when(epoch, step)
        if self.discovery is None:
            x = probe if probe is not None else self._probe
            if x is None:
                raise UsageError(
                    f"{self.path}: collect() before any observe() needs an input batch for "
                    "layer discovery: pass collect(probe=x) or Tracker(probe=x)"
                )
            with preserved(self.net):
                eval_mode(self.net)
                self._discover(to_device(x, model_device(self.net)))
        acc = self._accumulator(epoch, step)
        cap = Capture(self.net, self.discovery.layers, str(self.path))
        c = Collector(self, acc, cap)
        try:
            yield c
            if c.pending():
                raise DataError(
                    f"{self.path}: collect: the last forward pass of the block got no "
                    "labels(y) call; call it once after each training forward pass"
                )
        finally:
            cap.remove()
        if acc.batches == 0 and _dist.world() is None:
            raise DataError(f"{self.path}: collect: no labels(y) call in the block; nothing seen")
        self._record(acc, epoch, step, "train")

    # ---------------------------------------------------------------- record
    def _params(self) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
        """The head layers' module parameters now (the model changes between epochs)."""
        modules = dict(self.net.named_modules())
        out: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        for c in self.discovery.layers:
            m = modules[c.module]
            if c.weight is not None and isinstance(m, nn.Linear):
                out[c.name] = (_param(m.weight), _param(m.bias))
        return out

    def _record(self, acc: _Accumulator, epoch: int | None, step: int | None, mode: str) -> int:
        stats, features, labels = acc.stats, None, None
        ranks = _dist.world()
        if acc.rows is not None:
            features = {
                k: _cat(v, c.dim) for (k, v), c in zip(acc.rows.items(), acc.layers, strict=True)
            }
            labels = np.concatenate(acc.labels) if acc.labels else np.zeros(0, np.int64)
        if ranks is not None:
            stats = _dist.merge(stats)
            if features is not None:
                both = _dist.gather_rows({**features, "/labels": labels})
                labels = None if both is None else both.pop("/labels")
                features = both
        n = next(iter(stats.values())).n
        if n == 0:
            raise DataError(f"{self.path}: no samples were observed at {_when(epoch, step)}")
        obs = Observation(
            epoch,
            step,
            mode,
            stats,
            self._params(),
            features,
            labels,
            attrs={
                "device": str(self.stats_device),
                "world_size": 1 if ranks is None else ranks[1],
            },
        )
        self.last_stats = stats
        if ranks is None:
            return append_observation(self.path, self._run_model(), obs)
        index, ok = -1, False
        if ranks[0] == 0:
            try:
                index, ok = append_observation(self.path, self._run_model(), obs), True
            finally:
                _dist.agree(ok, f"writing {self.path}")
        else:
            _dist.agree(True, f"writing {self.path}")
        return index

    # ---------------------------------------------------------------- results
    def frame(self, **kw: Any) -> Any:
        """The tidy DataFrame ``nccli.compare(path, **kw)`` gives for the run file."""
        from nccli.compare import compare

        return compare(self.path, **kw).data

    def measure(self, observation: int = -1, **kw: Any) -> Any:
        """``nccli.measure`` rows of one observation of the run file (default: the last);
        ``kw`` are :func:`nccli.measure.measure`'s options (``metrics``, ``layers`` …)."""
        from nccli.measure import MeasureOptions, measure_sources, opened_sources

        layers = kw.pop("layers", None)
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        opts = MeasureOptions(layers=layers, **kw)
        with opened_sources(self.path, opts) as sources:
            return measure_sources([sources[observation]], opts)


def _bare(layer: Layer) -> Layer:
    return Layer(
        layer.name,
        layer.dim,
        layer.module,
        layer.depth,
        layer.role,
        layer.io,
        layer.pool,
        layer.order,
    )


def _cat(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _when(epoch: int | None, step: int | None) -> str:
    return ("" if epoch is None else f"ep{epoch}") + ("" if step is None else f"s{step}")


def _check_when(epoch: Any, step: Any) -> tuple[int | None, int | None]:
    """``(epoch, step)`` as Python ints; at least one is needed, both whole numbers ≥ 0."""
    for name, v in (("epoch", epoch), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
            raise UsageError(f"{name} must be a whole number ≥ 0, got {v!r}")
    if epoch is None and step is None:
        raise UsageError("an observation needs epoch= (or step=): compare orders them by it")
    return (None if epoch is None else int(epoch)), (None if step is None else int(step))
