"""Checkpoint + dataset → nccli cache: layer discovery, hooks, batched forward, writer thread.

:func:`discover_layers` runs one probe forward with a hook on every leaf module.  In the
*executed* order it finds the classifier — the last ``nn.Linear`` whose output is the model
output (or, failing that, the last one with as many outputs as there are logits) — and
walks back through the trailing run of ``nn.Linear`` layers; ``Flatten``/``Dropout``/
``Identity`` pass through, anything else ends the run, and so does a linear layer whose
output is not exactly the next one's input (a functional ``relu`` or a residual add in
``forward`` is invisible to module hooks, but not to this check).  That run is the deep
linear head ``W_1 … W_L`` plus the classifier ``W_{L+1}``:

==================  ===========  ===============  ==================================
cache group         features     depth            role
==================  ===========  ===============  ==================================
first head module   its input    0                ``penultimate``
next head modules   their input  1 … L-1          ``linear``
classifier          its input    L                ``classifier`` (``penultimate`` if L=0)
``--layers`` extra  its output   -1               ``other`` (no weight)
==================  ===========  ===============  ==================================

Each head group stores its own module's weight and bias, so a reader composes the
classifier acting on depth ``l`` as ``C_l = W_{L+1} ⋯ W_{l+1}``
(:func:`nccli.io.sources._compose_classifiers`); the root attribute ``classifier`` names
the classifier module.

:func:`extract` opens the dataset once and, per checkpoint, loads the model, discovers
its layers and streams the dataset through it under ``torch.inference_mode()``
(``torch.autocast`` with ``amp`` on CUDA; pinned host buffers and ``non_blocking``
copies there).  Features are cast to the storage dtype *before* they are folded into
:class:`~nccli.stats.ClassStats` (on the GPU when there is one), so the statistics in the
cache equal the statistics recomputed from the cached features.  A background thread
writes the rows into ``<out>/<stem>.h5.partial`` (bounded queue: HDF5 writes overlap the
next forward, memory stays flat) and flushes after every batch, so a killed run leaves a
consistent partial file that ``resume=True`` continues from ``rows_done``; the file is
renamed to ``<stem>.h5`` only when complete.

Test hook: the environment variable ``NCCLI_TEST_SLOW_BATCH=<seconds>`` makes
:func:`extract` sleep that long after every batch, so a test can kill a run mid-way.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from rich.markup import escape
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from nccli.errors import CacheError, DataError, NCError, UsageError
from nccli.extract.devices import (
    AMP_DTYPES,
    FEATURE_DTYPES,
    device_label,
    input_dtype,
    resolve_device,
)
from nccli.io._util import file_sha256, one_line
from nccli.io.cache import Cache, CacheWriter, LayerSpec, _attr, is_cache, partial_path
from nccli.stats import ClassStats

__all__ = [
    "Discovery",
    "LayerChoice",
    "describe_cache",
    "describe_checkpoint",
    "discover_layers",
    "extract",
    "resolve_device",
]

#: leaf modules a linear head may contain between its linear layers
PASSTHROUGH = (nn.Flatten, nn.Identity, _DropoutNd)
#: seconds to sleep after every batch (tests kill a run mid-way with it)
SLOW_BATCH_ENV = "NCCLI_TEST_SLOW_BATCH"
#: samples in the discovery probe batch
PROBE_SAMPLES = 8
#: batches the writer thread may lag behind the forward pass
WRITE_QUEUE = 3


# =========================================================================== discovery


@dataclass
class LayerChoice:
    """One layer to cache: which module, which side of it, and where it sits in the head."""

    name: str  # cache group name (the module path)
    module: str  # dotted module path
    io: str  # "input" (head layers) or "output" (other selected modules)
    depth: int  # 0..L in the head, -1 outside it
    role: str  # penultimate | linear | classifier | other
    dim: int
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)

    def spec(self) -> LayerSpec:
        """The cache writer's description of this layer."""
        return LayerSpec(
            name=self.name,
            dim=self.dim,
            module=self.module,
            depth=self.depth,
            role=self.role,
            io=self.io,
            weight=self.weight,
            bias=self.bias,
        )


@dataclass
class Discovery:
    """What :func:`discover_layers` found.

    ``head`` lists the module paths of the linear chain from the first head layer to the
    classifier (empty when no classifier was found or asked for); ``layers`` are the
    layers to cache, head first (depth order), then other selected modules in executed
    order; ``executed`` is the leaf modules in the order the probe ran them.
    """

    layers: list[LayerChoice]
    classifier: str | None
    head: list[str]
    num_logits: int
    executed: list[str]
    input_shape: tuple[int, ...]

    @property
    def head_depth(self) -> int:
        """``L``: linear layers between the penultimate feature and the classifier."""
        return max(len(self.head) - 1, 0)

    def rows(self) -> list[dict[str, Any]]:
        """The layer layout as plain dicts (for ``nccli info``)."""
        return [
            {
                "name": c.name,
                "module": c.module,
                "io": c.io,
                "depth": c.depth,
                "role": c.role,
                "dim": c.dim,
                "weight": None if c.weight is None else list(c.weight.shape),
                "bias": c.bias is not None,
            }
            for c in self.layers
        ]


@dataclass
class _Call:
    name: str
    module: nn.Module
    leaf: bool
    input: Any = None
    output: Any = None


def _group_name(path: str) -> str:
    return path or "model"


def _split_layers(layers: str | Sequence[str] | None) -> tuple[bool, list[str]]:
    """``"auto"`` / ``"a.b,c.*"`` / a list → (want the auto head, explicit patterns)."""
    if layers is None:
        return True, []
    items = [layers] if isinstance(layers, str) else list(layers)
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not tokens:
        return True, []
    auto = any(t.lower() == "auto" for t in tokens)
    return auto, [t for t in tokens if t.lower() != "auto"]


def _logits_of(out: Any, source: str) -> torch.Tensor:
    """The logits tensor inside a model output (tensor, tuple, dict or ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(
        f"{source}: the model returned a {type(out).__name__}; nccli needs the logits as a "
        "tensor (or a tuple/dict whose first item or 'logits' entry is one)"
    )


def _feeds(out: Any, inp: Any) -> bool:
    """True when ``inp`` is ``out`` itself, possibly reshaped (Flatten/Dropout/Identity)."""
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    if out is inp:
        return True
    if out.numel() != inp.numel() or out.dtype != inp.dtype:
        return False
    return bool(torch.equal(out.reshape(-1), inp.reshape(-1)))


def _param(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach().cpu()
    return (t if t.dtype == torch.float64 else t.float()).numpy().copy()


def _names(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None) if kwargs else None


def discover_layers(
    model: nn.Module,
    probe_batch: torch.Tensor,
    layers: str | Sequence[str] | None = "auto",
    *,
    source: str = "model",
) -> Discovery:
    """Find the penultimate feature, the deep linear head and the classifier of ``model``.

    One forward pass of ``probe_batch`` (a few real samples, on the model's device) with a
    hook on every leaf module.  ``layers`` is ``"auto"`` (the head), or dotted module
    names / globs separated by commas (``"layer4,head.*"``), optionally with ``auto``
    among them.  A selected head module is cached with the head modules above it (their
    weights compose its classifier); any other selected module is cached by its
    flattened output.  ``source`` names the checkpoint in error messages.
    """
    want_auto, patterns = _split_layers(layers)
    named = list(model.named_modules())
    modules = dict(named)
    leaves = {n for n, m in named if not any(True for _ in m.children())}

    matched: dict[str, list[str]] = {}
    for pat in patterns:
        hits = [n for n, _ in named if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
        if not hits:
            raise UsageError(
                f"{source}: --layers {pat!r} matches no module; modules are "
                f"{_names([n for n, _ in named if n], 12)}"
            )
        matched[pat] = hits
    selected = {n for hits in matched.values() for n in hits}

    calls: list[_Call] = []
    counts: dict[str, int] = {}
    keep_tensors = {n for n in leaves if isinstance(modules[n], nn.Linear)} | selected

    def make_hook(name: str, leaf: bool) -> Callable[..., None]:
        keep = name in keep_tensors

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            calls.append(
                _Call(
                    name,
                    mod,
                    leaf,
                    _first_input(args, kwargs) if keep else None,
                    out if keep else None,
                )
            )

        return hook

    handles = []
    try:
        for name in sorted(leaves | selected):
            try:
                handles.append(
                    modules[name].register_forward_hook(
                        make_hook(name, name in leaves), with_kwargs=True
                    )
                )
            except (RuntimeError, AttributeError, TypeError):
                continue  # TorchScript modules take no Python hooks
        with torch.inference_mode():
            try:
                out = model(probe_batch)
            except NCError:
                raise
            except Exception as exc:
                raise DataError(
                    f"{source}: the probe forward pass failed ({type(exc).__name__}: "
                    f"{one_line(exc, 160)}); check that the model fits inputs of shape "
                    f"{tuple(probe_batch.shape[1:])}"
                ) from exc
    finally:
        for h in handles:
            h.remove()

    logits = _logits_of(out, source)
    B = int(probe_batch.shape[0])
    if logits.ndim != 2 or logits.shape[0] != B:
        raise DataError(
            f"{source}: the model output has shape {tuple(logits.shape)}; expected logits "
            f"(batch={B}, classes)"
        )
    K = int(logits.shape[1])
    leaf_calls = [c for c in calls if c.leaf]
    if not leaf_calls and any(True for _ in model.parameters()):
        raise DataError(
            f"{source}: no submodule ran as a Python module during the probe (a TorchScript "
            "or torch.export model hides its layers); pass --arch or --model so nccli can "
            "rebuild the architecture and load the weights into it"
        )

    if want_auto:
        head_calls = _find_head(leaf_calls, logits, counts, source)
    else:
        try:
            head_calls = _find_head(leaf_calls, logits, counts, source)
        except DataError:
            head_calls = []  # explicit layers only: they are cached as "other"
    if want_auto and not head_calls:
        if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise DataError(
                f"{source}: a {type(model).__name__} hides its layers from hooks; pass --arch "
                "or --model so nccli can rebuild the architecture and load the weights into it"
            )
        raise DataError(
            f"{source}: no nn.Linear classifier producing the {K} logits ran in the forward "
            "pass; choose the modules to cache with --layers NAME,..."
        )
    head_names = [c.name for c in head_calls]

    # which head layers to keep: all for auto, else from the shallowest selected one up
    if want_auto:
        first = 0
    else:
        hit = [i for i, n in enumerate(head_names) if n in selected]
        first = min(hit) if hit else len(head_names)
    L = len(head_calls) - 1
    choices: list[LayerChoice] = []
    for depth, call in enumerate(head_calls):
        if depth < first:
            continue
        x = call.input
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != B:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(
                f"{source}: {_group_name(call.name)} receives input of shape {shape}; nccli "
                f"caches one feature vector per sample, i.e. (batch={B}, features); choose "
                "other layers with --layers"
            )
        role = "penultimate" if depth == 0 else "classifier" if depth == L else "linear"
        lin = call.module
        assert isinstance(lin, nn.Linear)
        choices.append(
            LayerChoice(
                name=_group_name(call.name),
                module=call.name,
                io="input",
                depth=depth,
                role=role,
                dim=int(lin.in_features),
                weight=_param(lin.weight),
                bias=_param(lin.bias),
            )
        )
    kept_head = [c.module for c in choices]

    ran_first: dict[str, int] = {}
    for i, c in enumerate(calls):
        ran_first.setdefault(c.name, i)
    others: list[str] = []
    for pat, hits in matched.items():
        ran = [n for n in hits if n in ran_first]
        if not ran:
            raise UsageError(
                f"{source}: --layers {pat!r}: {_names(hits, 4)} did not run during the forward "
                "pass; pick a module the model calls"
            )
        others.extend(n for n in ran if n not in kept_head and n not in others)
    for name in sorted(others, key=lambda n: ran_first[n]):
        if counts.get(name, 0) != 1:
            raise DataError(
                f"{source}: module {name} runs {counts[name]} times per forward pass; nccli "
                "caches one feature per sample, select a module that runs once"
            )
        out_t = next(c.output for c in calls if c.name == name)
        if not isinstance(out_t, torch.Tensor) or out_t.ndim < 1 or out_t.shape[0] != B:
            shape = tuple(out_t.shape) if isinstance(out_t, torch.Tensor) else type(out_t).__name__
            raise DataError(
                f"{source}: module {name} returns {shape}, not a (batch={B}, ...) tensor; "
                "select another module with --layers"
            )
        choices.append(
            LayerChoice(
                name=_group_name(name),
                module=name,
                io="output",
                depth=-1,
                role="other",
                dim=int(math.prod(out_t.shape[1:])),
            )
        )
    if not choices:
        raise UsageError(f"{source}: --layers {layers!r} selects no layer to cache")
    return Discovery(
        layers=choices,
        classifier=kept_head[-1] if kept_head else None,
        head=kept_head,
        num_logits=K,
        executed=[c.name for c in leaf_calls],
        input_shape=tuple(int(s) for s in probe_batch.shape[1:]),
    )


def _find_head(
    leaf_calls: list[_Call], logits: torch.Tensor, counts: dict[str, int], source: str
) -> list[_Call]:
    """The classifier call and the linear calls feeding it, first head layer first."""
    K = int(logits.shape[1])
    lin = [i for i, c in enumerate(leaf_calls) if isinstance(c.module, nn.Linear)]
    exact = [i for i in lin if leaf_calls[i].output is logits]
    by_width = [i for i in lin if leaf_calls[i].module.out_features == K]
    pick = exact or by_width
    if not pick:
        return []
    cls = leaf_calls[pick[-1]]
    if counts.get(cls.name, 0) != 1:
        raise DataError(
            f"{source}: the classifier {cls.name} runs {counts[cls.name]} times per forward "
            "pass; nccli cannot tell which call gives the logits, select layers with --layers"
        )
    chain = [cls]
    for j in range(pick[-1] - 1, -1, -1):
        c = leaf_calls[j]
        if isinstance(c.module, PASSTHROUGH):
            continue
        if (
            isinstance(c.module, nn.Linear)
            and counts.get(c.name, 0) == 1
            and _feeds(c.output, chain[-1].input)
        ):
            chain.append(c)
            continue
        break
    chain.reverse()
    return chain


# =========================================================================== writer thread


@dataclass
class _Rows:
    start: int
    labels: np.ndarray
    indices: np.ndarray
    features: dict[str, torch.Tensor]
    logits: torch.Tensor
    ready: torch.cuda.Event | None = None
    rows_read: int | None = None  # dataset rows consumed (--skip-nonfinite drops some)
    skipped: np.ndarray | None = None  # samples dropped per class so far


class _BackgroundWriter:
    """Writes batches into a :class:`CacheWriter` from a thread, in order, flushing each.

    ``submit`` blocks while ``WRITE_QUEUE`` batches are pending (flat memory) and
    re-raises an error the thread hit; ``close`` drains the queue and joins.
    """

    def __init__(self, writer: CacheWriter) -> None:
        self.writer = writer
        self.error: BaseException | None = None
        self._q: queue.Queue[_Rows | None] = queue.Queue(maxsize=WRITE_QUEUE)
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

    def submit(self, item: _Rows) -> None:
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


# =========================================================================== extraction


@dataclass
class _Settings:
    device: torch.device
    amp: str
    batch_size: int
    feature_dtype: str
    layers: str | Sequence[str]
    arch: str | None
    model: str | None
    trust_checkpoint: bool
    resume: bool
    overwrite: bool
    command: str
    notes: bool
    rank: int = 0  # distributed extraction (nccli.distributed): this rank's shard
    world_size: int = 1
    skip_nonfinite: bool = False  # drop samples with NaN/Inf in any layer, from every layer


def _eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``; graphs from ``torch.export`` refuse train/eval switching (they are
    captured in inference mode already), so that refusal is not an error here."""
    with contextlib.suppress(NotImplementedError):
        module.eval()
    return module


def _row_range(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """The contiguous, disjoint slice of ``n`` rows that ``rank`` of ``world_size`` takes
    (no padding duplicates: they would bias the statistics)."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def _shard_attrs(cfg: _Settings, n: int) -> dict[str, int]:
    """Root attributes of a distributed shard (none for a single-process run)."""
    if cfg.world_size <= 1:
        return {}
    start, stop = _row_range(n, cfg.rank, cfg.world_size)
    return {
        "rank": cfg.rank,
        "world_size": cfg.world_size,
        "row_start": start,
        "row_stop": stop,
        "total_samples": n,
    }


def _iter_rows(
    ds: Any, start: int, stop: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Batches of dataset positions ``start:stop`` (rows before ``start`` are not read)."""
    if start >= stop:
        return
    yield from ds.iter_batches(batch_size, start, stop)


def _prefetch(it: Iterator[Any], depth: int, prepare: Callable[[Any], Any]) -> Iterator[Any]:
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


class _Capture:
    """Hooks on the chosen modules; ``take`` returns this forward's ``(B, d)`` tensors."""

    def __init__(self, model: nn.Module, choices: list[LayerChoice], source: str) -> None:
        self.source = source
        self.choices = choices
        self.seen: dict[str, list[torch.Tensor]] = {c.name: [] for c in choices}
        modules = dict(model.named_modules())
        self.handles = [
            modules[c.module].register_forward_hook(self._hook(c), with_kwargs=True)
            for c in choices
        ]

    def _hook(self, choice: LayerChoice) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            t = _first_input(args, kwargs) if choice.io == "input" else out
            self.seen[choice.name].append(t)

        return hook

    def take(self, B: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for c in self.choices:
            got = self.seen[c.name]
            self.seen[c.name] = []
            if len(got) != 1 or not isinstance(got[0], torch.Tensor):
                raise DataError(
                    f"{self.source}: layer {c.name} was captured {len(got)} times in one "
                    "forward pass (expected once); the model's control flow changed since the "
                    "probe"
                )
            t = got[0].reshape(got[0].shape[0], -1) if got[0].ndim != 2 else got[0]
            if t.shape != (B, c.dim):
                raise DataError(
                    f"{self.source}: layer {c.name} gave features of shape {tuple(t.shape)}, "
                    f"expected ({B}, {c.dim}) as in the probe pass"
                )
            out[c.name] = t
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _nonfinite_rows(
    source: str,
    feats: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor],
    logits: torch.Tensor,
    indices: np.ndarray,
    feature_dtype: str,
    skip: bool = False,
) -> torch.Tensor | None:
    """Policy for NaN/Inf in a batch: ``None`` when every value is finite; else, with
    ``skip``, the mask of rows that are finite in *every* layer and the logits (a sample is
    dropped from all layers, so they keep the same N), and without it a DataError naming
    checkpoint, layer and sample.

    One device sync for the whole batch in the common (all finite) case.
    """
    tensors = [*feats.values(), logits]
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if bool(flags.all()):
        return None
    if skip:
        keep = torch.ones(len(indices), dtype=torch.bool, device=logits.device)
        for t in tensors:
            keep &= torch.isfinite(t).all(dim=1).to(keep.device)
        return keep
    for name, t in [*feats.items(), ("logits", logits)]:
        ok = torch.isfinite(t).all(dim=1)
        if bool(ok.all()):
            continue
        row = int(torch.nonzero(~ok)[0, 0].item())
        sample = int(indices[row])
        nbad = int((~ok).sum().item())
        if name in raw and bool(torch.isfinite(raw[name][row]).all()):
            raise DataError(
                f"{source}: layer {name}: sample {sample} overflows {feature_dtype} storage "
                f"({nbad} rows in this batch); use --dtype float32"
            )
        raise DataError(
            f"{source}: layer {name} has NaN or infinite values for sample {sample} ({nbad} "
            "rows in this batch); the checkpoint may have diverged, or the inputs need "
            "--normalize; --skip-nonfinite drops such samples"
        )


def _drop_rows(
    keep: torch.Tensor,
    feats: dict[str, torch.Tensor],
    logits: torch.Tensor,
    yd: torch.Tensor,
    y: torch.Tensor,
    idx: np.ndarray,
    skipped: np.ndarray,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The batch without the rows ``keep`` rejects; ``skipped`` (per class) counts them."""
    kc = keep.cpu()
    skipped += np.bincount(y[~kc].numpy(), minlength=len(skipped))
    feats = {k: v[keep.to(v.device)] for k, v in feats.items()}
    return feats, logits[keep.to(logits.device)], yd[keep.to(yd.device)], y[kc], idx[kc.numpy()]


def _check_existing(path: Path, sha: str, ds: Any, split: str, cfg: _Settings) -> bool:
    """True when a finished cache for the same checkpoint and data exists (skip it)."""
    if not path.exists() or cfg.overwrite:
        return False
    if not is_cache(path):
        raise UsageError(
            f"{path}: exists and is not an nccli cache; remove it, choose another -o, or pass "
            "--overwrite"
        )
    try:
        with Cache(path) as c:
            attrs = c.attrs
    except CacheError as exc:
        raise UsageError(f"{exc}; or pass --overwrite to replace it") from None
    want = {
        "checkpoint_sha256": sha,
        "dataset_digest": ds.digest(),
        "split": split,
        "feature_dtype": cfg.feature_dtype,
        **_shard_attrs(cfg, len(ds)),
    }
    diff = [k for k, v in want.items() if attrs.get(k) != v]
    if diff:
        raise UsageError(
            f"{path}: exists but was made from a different {', '.join(diff)}; pass --overwrite "
            "to replace it"
        )
    return True


def _check_partial(tmp: Path, sha: str, ds: Any, cfg: _Settings, layers: list[str]) -> bool:
    """Whether ``tmp`` can be resumed; raise if it belongs to another run."""
    try:
        f = h5py.File(tmp, "r")
    except OSError:
        return False  # unreadable (killed mid-flush): start over
    try:
        attrs = {k: _attr(f, k) for k in f.attrs}
        have = sorted(f["layers"]) if "layers" in f else []
    except (OSError, KeyError, ValueError):
        return False
    finally:
        f.close()
    want = {
        "checkpoint_sha256": sha,
        "dataset_digest": ds.digest(),
        "feature_dtype": cfg.feature_dtype,
        **_shard_attrs(cfg, len(ds)),
    }
    diff = [k for k, v in want.items() if attrs.get(k) != v]
    if have != sorted(layers):
        diff.append("layers")
    if diff:
        raise CacheError(
            f"{tmp}: cannot resume: the partial cache was made with a different "
            f"{', '.join(diff)}; delete it or run without --resume"
        )
    return True


class _Run:
    """State shared by the checkpoints of one :func:`extract` call."""

    def __init__(
        self, ds: Any, data: str, split: str, cfg: _Settings, progress: Any, prefetch: int
    ) -> None:
        self.ds = ds
        self.prefetch = prefetch
        self.data = data
        self.split = split
        self.cfg = cfg
        self.progress = progress
        self.console = progress.console if progress is not None else None
        self.slow = float(os.environ.get(SLOW_BATCH_ENV, "0") or 0)
        n_probe = min(len(ds), PROBE_SAMPLES)
        self.probe = next(iter(ds.iter_batches(n_probe)))[0]
        self.max_label = int(np.max(ds.labels)) if len(ds.labels) else -1

    def note(self, text: str) -> None:
        if self.cfg.notes and self.console is not None:
            self.console.print(
                f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True, highlight=False
            )

    # ------------------------------------------------------------------ per checkpoint
    def one(self, ckpt: Path, out_path: Path) -> Path:
        from nccli.io.checkpoints import load_model

        cfg = self.cfg
        if out_path.exists() and not cfg.overwrite and ckpt.is_file():
            if _check_existing(out_path, file_sha256(ckpt), self.ds, self.split, cfg):
                self.note(f"{out_path}: already extracted, skipped (pass --overwrite to redo it)")
                return out_path
        loaded = load_model(
            ckpt,
            arch=cfg.arch,
            model=cfg.model,
            trust_checkpoint=cfg.trust_checkpoint,
            map_location="cpu",
        )
        model = _eval_mode(loaded.module.to(cfg.device))
        x_dtype = input_dtype(model)
        src = str(ckpt)
        disc = discover_layers(model, self.probe.to(cfg.device, x_dtype), cfg.layers, source=src)
        K = disc.num_logits
        if K != self.ds.num_classes and self.max_label + 1 > K:
            raise DataError(
                f"{src}: the model outputs {K} logits but {self.data} has labels up to "
                f"{self.max_label} ({self.ds.num_classes} classes); check num_classes in "
                "--arch/--model or the dataset"
            )
        start, stop = _row_range(len(self.ds), cfg.rank, cfg.world_size)
        N = stop - start
        tmp = partial_path(out_path)
        names = [c.name for c in disc.layers]
        resuming = (
            cfg.resume and tmp.exists() and _check_partial(tmp, loaded.sha256, self.ds, cfg, names)
        )
        if tmp.exists() and not resuming:
            self.note(f"{tmp}: starting over (an unfinished cache was there)")
        attrs = {
            "checkpoint": str(ckpt.resolve()),
            "checkpoint_sha256": loaded.sha256,
            "checkpoint_format": loaded.format,
            "dataset": self.data,
            "dataset_digest": self.ds.digest(),
            "dataset_description": self.ds.describe(),
            "normalization": getattr(self.ds, "normalization", None),
            "split": self.split,
            "arch": loaded.arch or f"<{loaded.format} module>",
            "epoch": loaded.epoch,
            "step": loaded.step,
            "torch_version": str(torch.__version__),
            "device": device_label(cfg.device),
            "amp": cfg.amp,
            "command": cfg.command,
            "classifier": disc.classifier,
            "head_depth": disc.head_depth if disc.head else None,
            "batch_size": cfg.batch_size,
            "row_start": start,
            **_shard_attrs(cfg, len(self.ds)),
        }

        def open_writer(resume: bool) -> CacheWriter:
            return CacheWriter(
                out_path,
                [c.spec() for c in disc.layers],
                N,
                K,
                attrs=attrs,
                feature_dtype=cfg.feature_dtype,
                logits=True,
                resume=resume,
            )

        stats: dict[str, ClassStats] | None = None
        writer: CacheWriter | None = None
        if resuming:
            try:
                writer = open_writer(True)
                stats = self._restore_stats(writer, disc, K, src)
                self.note(f"{tmp}: resuming at row {writer.rows_done} of {N}")
            except (OSError, KeyError, ValueError, CacheError, DataError) as exc:
                if writer is not None:
                    writer.close()
                self.note(f"{tmp}: cannot resume ({one_line(exc, 120)}); starting over")
                writer = stats = None
        if writer is None:
            try:
                writer = open_writer(False)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a fresh file that failed to set up is garbage
                raise
        try:
            if stats is None:
                stats = self._restore_stats(writer, disc, K, src)
            path = self._stream(model, x_dtype, disc, writer, stats, src, start, stop)
        except BaseException as exc:
            keep = (
                not isinstance(exc, NCError) and getattr(writer, "h5", None) is not None
            ) and self._rows_done(writer) > 0
            if keep:
                rows = self._rows_done(writer)
                writer.close()
                hint = f"{tmp}: kept {rows} rows; continue with --resume"
                if isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt(hint) from exc  # the CLI prints it on one line
                self.note(hint)
            else:
                writer.abort()
            raise
        return path

    @staticmethod
    def _rows_done(writer: CacheWriter) -> int:
        try:
            return writer.rows_done
        except Exception:  # noqa: BLE001 - a closed or broken file holds nothing resumable
            return 0

    def _stats_device(self) -> torch.device:
        dev = self.cfg.device
        return dev if dev.type == "cuda" else torch.device("cpu")

    def _restore_stats(
        self, writer: CacheWriter, disc: Discovery, K: int, src: str
    ) -> dict[str, ClassStats]:
        """Fresh statistics, or those of the rows a resumed partial already holds (folded in
        the same batches an uninterrupted run would use)."""
        sdev = self._stats_device()
        stats = {
            c.name: ClassStats(K, c.dim, device=sdev, source=f"{src}:{c.name}") for c in disc.layers
        }
        done = writer.rows_done
        f = writer.h5
        B = self.cfg.batch_size
        for lo in range(0, done, B):
            hi = min(lo + B, done)
            y = torch.from_numpy(np.asarray(f["labels"][lo:hi])).to(sdev)
            for c in disc.layers:
                h = torch.from_numpy(np.asarray(f[f"layers/{c.name}/features"][lo:hi]))
                stats[c.name].update(h.to(sdev), y)
        return stats

    def _stream(
        self,
        model: nn.Module,
        x_dtype: torch.dtype,
        disc: Discovery,
        writer: CacheWriter,
        stats: dict[str, ClassStats],
        src: str,
        start: int,
        stop: int,
    ) -> Path:
        cfg = self.cfg
        dev = cfg.device
        cuda = dev.type == "cuda"
        K = disc.num_logits
        store = FEATURE_DTYPES[cfg.feature_dtype]
        amp_dtype = AMP_DTYPES[cfg.amp]
        sdev = self._stats_device()
        done = writer.rows_done
        read = writer.rows_read  # more than done when --skip-nonfinite dropped rows
        skipped = writer.skipped_nonfinite
        if cfg.skip_nonfinite and skipped is None:
            skipped = np.zeros(K, dtype=np.int64)
        N = stop - start
        task = None
        if self.progress is not None:
            task = self.progress.add_task(escape(Path(src).name), total=N, completed=read)

        def prepare(batch: Any) -> Any:
            x, y, idx = batch
            x = x.to(dtype=x_dtype)
            if cuda:
                x = x.pin_memory()
            return x, y, idx

        cap = _Capture(model, disc.layers, src)
        bg = _BackgroundWriter(writer)
        row = done
        try:
            batches = _iter_rows(self.ds, start + read, stop, cfg.batch_size)
            for x, y, idx in _prefetch(batches, self.prefetch, prepare):
                B = int(len(idx))
                xd = x.to(dev, non_blocking=True)
                yd = y.to(sdev, non_blocking=True)
                autocast = (
                    torch.autocast(device_type="cuda", dtype=amp_dtype)
                    if cuda and amp_dtype is not None
                    else contextlib.nullcontext()
                )
                with torch.inference_mode(), autocast:
                    out = model(xd)
                    raw = cap.take(B)
                    logits = _logits_of(out, src)
                    if logits.shape != (B, K):
                        raise DataError(
                            f"{src}: the model gave logits of shape {tuple(logits.shape)}, "
                            f"expected ({B}, {K})"
                        )
                    logits = logits.float()
                    feats = {k: v.to(store) for k, v in raw.items()}
                    keep = _nonfinite_rows(
                        src, feats, raw, logits, idx, cfg.feature_dtype, cfg.skip_nonfinite
                    )
                    if keep is not None and skipped is not None:
                        feats, logits, yd, y, idx = _drop_rows(
                            keep, feats, logits, yd, y, np.asarray(idx), skipped
                        )
                    for name, h in feats.items():
                        stats[name].update(h if h.device == sdev else h.to(sdev), yd)
                    host, host_logits, ready = self._to_host(feats, logits, cuda)
                read += B
                bg.submit(
                    _Rows(
                        row,
                        y.numpy(),
                        np.asarray(idx),
                        host,
                        host_logits,
                        ready,
                        rows_read=read if skipped is not None else None,
                        skipped=None if skipped is None else skipped.copy(),
                    )
                )
                row += len(idx)
                if task is not None:
                    self.progress.update(task, advance=B)
                if self.slow > 0:
                    time.sleep(self.slow)
        except BaseException:
            cap.remove()
            with contextlib.suppress(Exception):
                bg.close()  # queued rows are whole batches: keep them for --resume
            raise
        cap.remove()
        bg.close()
        if read != N:
            raise DataError(
                f"{src}: the dataset yielded {read} of {N} rows; was {self.data} changed while "
                "extracting?"
            )
        if task is not None:
            self.progress.update(task, visible=False)
        # a shard is published only once every rank has finished (nccli.distributed)
        path = writer.finalize(stats, publish=cfg.world_size <= 1)
        if skipped is not None and skipped.any():
            per_class = ", ".join(f"class {k}: {int(n)}" for k, n in enumerate(skipped) if n)
            self.note(
                f"{src}: skipped {int(skipped.sum())} samples with NaN/Inf features or logits "
                f"(--skip-nonfinite; {per_class}); every layer's statistics exclude them"
            )
        return path

    @staticmethod
    def _to_host(
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


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def _check_options(
    checkpoints: Sequence[str | os.PathLike[str]],
    amp: str,
    batch_size: int,
    feature_dtype: str,
    limit: int | None,
    num_workers: int,
    arch: str | None,
    model: str | None,
) -> list[Path]:
    if amp not in AMP_DTYPES:
        raise UsageError(f"--amp {amp!r}: choose one of {', '.join(AMP_DTYPES)}")
    if feature_dtype not in FEATURE_DTYPES:
        raise UsageError(f"--dtype {feature_dtype!r}: choose float32 or float16")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {limit}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {num_workers}")
    if arch is not None and model is not None:
        raise UsageError("pass either --arch or --model, not both")
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise UsageError("no checkpoint given; pass one or more checkpoint files")
    seen: dict[str, Path] = {}
    for p in paths:
        other = seen.setdefault(p.stem, p)
        if other != p:
            raise UsageError(
                f"{p}: has the same name as {other}, so both would be cached as {p.stem}.h5; "
                "extract them into different -o directories"
            )
    return paths


def _check_out_dir(out: Path) -> None:
    """Refuse an ``-o`` that cannot become a writable directory, before any work is done
    (the nearest existing ancestor decides; nothing is created here)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == out else f"is under {probe}, which is a file"
        raise UsageError(f"-o {out}: {what}; pass a directory for the caches")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: {probe} is not writable; choose another -o directory")


def _cache_path(out: Path, ckpt: Path) -> Path:
    """``<out>/<checkpoint stem>.h5``.  Only the checkpoint file's own name is used (never a
    path or a name stored inside the checkpoint or the dataset), so a cache cannot land
    outside ``out``."""
    stem = ckpt.name[: -len(ckpt.suffix)] if ckpt.suffix else ckpt.name
    if not stem or "/" in stem or os.sep in stem:  # a file name never is, but be explicit
        raise UsageError(f"{ckpt}: cannot name a cache after this file; rename the checkpoint")
    return out / f"{stem}.h5"  # '..pt' gives the file '..h5', still inside out


def extract(
    checkpoints: Sequence[str | os.PathLike[str]],
    data: str,
    *,
    arch: str | None = None,
    model: str | None = None,
    out_dir: str | os.PathLike[str],
    layers: str | Sequence[str] = "auto",
    device: str = "auto",
    amp: str = "off",
    batch_size: int = 256,
    feature_dtype: str = "float32",
    split: str = "train",
    limit: int | None = None,
    normalize: str | None = None,
    trust_checkpoint: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    command: str | None = None,
    distributed: bool | None = None,
    dist_backend: str = "auto",
    dist_timeout: float = 30.0,
    skip_nonfinite: bool = False,
) -> list[Path]:
    """Extract features and statistics of every checkpoint into ``out_dir/<stem>.h5``.

    ``data`` is a dataset spec (:func:`nccli.io.datasets.open_dataset`), opened once.
    ``arch`` (zoo spec) or ``model`` (``pkg.module:factory``) builds the network a state
    dict is loaded into.  ``layers`` is ``"auto"`` or names/globs (:func:`discover_layers`).
    ``amp`` (``bf16``/``fp16``) needs CUDA.  ``feature_dtype`` is how features are stored;
    statistics are float64 of the stored values.  A finished cache of the same checkpoint
    and data is skipped unless ``overwrite``; ``resume`` continues a ``.partial`` left by
    an interrupted run.  ``num_workers > 0`` loads (and pins) batches in a background
    thread, ``2·num_workers`` ahead.  ``progress=False`` silences stderr (bar and notes);
    the bar only shows on a terminal.  Returns the cache paths, in checkpoint order.

    Under ``torchrun`` with ``WORLD_SIZE > 1`` (``distributed=None`` detects it; ``False``
    ignores it) each rank extracts a disjoint shard into ``<stem>.rank<r>.h5`` and the
    ranks' statistics are merged and checked on rank 0 (:mod:`nccli.distributed`);
    ``dist_backend`` is ``auto``/``gloo``/``nccl``, ``dist_timeout`` the minutes a rank
    waits for the others.  Returns this rank's shard paths then.

    ``skip_nonfinite`` drops samples whose features or logits hold NaN/Inf in any layer
    from every layer (a note and the ``skipped_nonfinite`` attribute of each layer count
    them per class) instead of failing on the first one.
    """
    paths = _check_options(
        checkpoints, amp, batch_size, feature_dtype, limit, num_workers, arch, model
    )
    dev = resolve_device(device)
    from nccli.extract import distributed as dist_mod

    launch = dist_mod.detect() if distributed is not False else None
    if distributed and launch is None:
        raise UsageError(
            "distributed=True but this process was not started by torchrun with WORLD_SIZE > 1"
        )
    group = None
    if launch is not None:
        group = dist_mod.setup(launch, dev, dist_backend, dist_timeout)
        dev = group.device
    if amp != "off" and dev.type != "cuda":
        raise UsageError(
            f"--amp {amp} needs a CUDA device (this run uses {dev}); use --amp off or --device cuda"
        )
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such checkpoint file; check the path")
    from nccli.io.datasets import open_dataset

    out = Path(out_dir)
    _check_out_dir(out)
    cfg = _Settings(
        device=dev,
        amp=amp,
        batch_size=batch_size,
        feature_dtype=feature_dtype,
        layers=layers,
        arch=arch,
        model=model,
        trust_checkpoint=trust_checkpoint,
        resume=resume,
        overwrite=overwrite,
        command=command if command is not None else shlex.join(sys.argv),
        notes=progress,
        rank=group.rank if group is not None else 0,
        world_size=group.world_size if group is not None else 1,
        skip_nonfinite=skip_nonfinite,
    )
    written: list[Path] = []
    try:
        ds = open_dataset(data, split=split, limit=limit, normalize=normalize)
    except BaseException:
        if group is not None:
            group.close()
        raise
    try:
        if group is not None and len(ds) < group.world_size:
            raise UsageError(
                f"{data}: {len(ds)} samples cannot be split over {group.world_size} ranks; "
                "start fewer processes"
            )
        # one progress bar (rank 0's shard) under torchrun; every rank prints its notes
        with _progress(progress and cfg.rank == 0) as bar:
            run = _Run(ds, str(data), split, cfg, bar, prefetch=2 * num_workers)
            for p in paths:
                if group is None:
                    written.append(run.one(p, _cache_path(out, p)))
                    continue
                written.append(
                    dist_mod.run_checkpoint(
                        group,
                        lambda shard, p=p: run.one(p, shard),
                        p,
                        _cache_path(out, p),
                        np.asarray(ds.labels),
                        run.note if progress else lambda _: None,
                    )
                )
    finally:
        close = getattr(ds, "close", None)
        if close is not None:
            close()
        if group is not None:
            group.close()
    return written


# =========================================================================== info


def describe_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Attributes and layer layout of a cache (or of an unfinished ``.partial``)."""
    p = Path(path)
    if p.name.endswith(".partial"):
        try:
            f = h5py.File(p, "r")
        except OSError as exc:
            raise CacheError(f"{p}: not a readable HDF5 file ({one_line(exc)})") from None
        with f:
            attrs = {k: _attr(f, k) for k in f.attrs}
            layers = [
                _layer_row(name, g, has_features="features" in g)
                for name, g in (f["layers"].items() if "layers" in f else [])
            ]
        return {"path": str(p), "complete": False, "attrs": attrs, "layers": layers}
    with Cache(p) as c:
        rows = []
        for name in c.layers:
            g = c.h5[f"layers/{name}"]
            rows.append(_layer_row(name, g, has_features="features" in g))
        return {"path": str(p), "complete": True, "attrs": c.attrs, "layers": rows}


def _layer_row(name: str, g: h5py.Group, has_features: bool) -> dict[str, Any]:
    return {
        "name": name,
        "module": str(_attr(g, "module", name)),
        "io": str(_attr(g, "io", "input")),
        "depth": int(_attr(g, "depth", 0)),
        "role": str(_attr(g, "role", "other")),
        "dim": int(_attr(g, "dim", -1)),
        "dtype": str(g["features"].dtype) if has_features else None,
        "weight": list(g["weight"].shape) if "weight" in g else None,
        "stats": "stats" in g,
    }


def _probe_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape a zoo model records, or that its first layer implies."""
    for attr in ("nccli_input_shape", "input_shape"):
        shape = getattr(module, attr, None)
        if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape):
            return tuple(shape)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (int(m.in_features),)
        if any(True for _ in m.parameters(recurse=False)):
            return None
    return None


def describe_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    model: str | None = None,
    data: str | None = None,
    split: str = "train",
    normalize: str | None = None,
    layers: str | Sequence[str] = "auto",
    trust_checkpoint: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """What ``extract --layers <layers>`` would cache for this checkpoint.

    The probe is the first samples of ``data`` when given, else seeded noise shaped like
    the model's recorded input (``input_shape`` on the module, or an MLP's first linear
    layer); a convolutional model without one needs ``data``.
    """
    from nccli.io.checkpoints import load_model

    if arch is not None and model is not None:
        raise UsageError("pass either --arch or --model, not both")
    dev = resolve_device(device)
    loaded = load_model(
        path, arch=arch, model=model, trust_checkpoint=trust_checkpoint, map_location="cpu"
    )
    module = _eval_mode(loaded.module.to(dev))
    if data is not None:
        from nccli.io.datasets import open_dataset

        with open_dataset(data, split=split, normalize=normalize) as ds:
            probe = next(iter(ds.iter_batches(PROBE_SAMPLES)))[0]
    else:
        shape = _probe_shape(module)
        if shape is None:
            raise UsageError(
                f"{path}: cannot tell the model's input shape; pass --data SPEC so nccli can "
                "run a probe batch"
            )
        # seeded noise rather than zeros: the head check compares values, and a hidden
        # relu between two linear layers is invisible on an all-zero probe
        probe = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    disc = discover_layers(module, probe.to(dev, input_dtype(module)), layers, source=str(path))
    return {
        "path": str(path),
        "format": loaded.format,
        "arch": loaded.arch,
        "epoch": loaded.epoch,
        "step": loaded.step,
        "sha256": loaded.sha256,
        "input_shape": list(disc.input_shape),
        "num_logits": disc.num_logits,
        "classifier": disc.classifier,
        "head_depth": disc.head_depth,
        "layers": disc.rows(),
    }
