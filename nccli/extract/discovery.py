"""Layer discovery: the penultimate feature, the deep linear head and the classifier.

:func:`discover_layers` runs one probe forward with a hook on every leaf module.  In the
*executed* order it finds the classifier — the last ``nn.Linear`` whose output is the model
output (or, failing that, the last one with as many outputs as there are logits) — and
walks back through the trailing run of ``nn.Linear`` layers; ``Flatten``/``Dropout``/
``Identity`` pass through, anything else ends the run, and so does a linear layer whose
output is not exactly the next one's input (a functional ``relu`` or a residual add in
``forward`` is invisible to module hooks, but not to this check).  That run is the deep
linear head ``W_1 … W_L`` plus the classifier ``W_{L+1}``; its layers are cached by their
*input*, other ``--layers`` modules by their *output*, reduced to one vector per sample by
``--pool`` (roles and depths: :mod:`nccli.layers`; pooling: :mod:`nccli.extract.pooling`).
Each head layer keeps its own module's weight and bias, so a reader composes the
classifier acting on depth ``l`` as ``C_l = W_{L+1} ⋯ W_{l+1}``.

The ``--layers`` grammar (``auto``, ``blocks``, paths, one-level globs, ``name#N``) is
:mod:`nccli.extract.selection`'s; ``blocks`` is resolved here, from the probe: the outputs
of the root's children in the order they run, without the head, the modules that pass
their input through (``Flatten``, ``Identity``, ``Dropout``, an empty ``Sequential``) and
duplicates of the next layer's features; a leading run of leaf children (``conv1 bn1
relu``, the stem) gives its last one; plus the head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from nccli.errors import DataError, NCError, UsageError
from nccli.extract.pooling import check_pool, pooled
from nccli.extract.selection import Pattern, match_modules, names_list, split_layers
from nccli.io._util import one_line
from nccli.layers import Layer, show_classifier_input

__all__ = ["PASSTHROUGH", "Discovery", "discover_layers", "first_input", "logits_of"]

#: leaf modules a linear head may contain between its linear layers
PASSTHROUGH = (nn.Flatten, nn.Identity, _DropoutNd)


@dataclass
class Discovery:
    """What :func:`discover_layers` found.

    ``head`` lists the module paths of the linear chain from the first head layer to the
    classifier (empty when no classifier was found or asked for); ``layers`` are the
    layers to cache, head first (depth order), then other selected modules in executed
    order; ``executed`` is the leaf modules in the order the probe ran them; ``shapes`` the
    per-sample shape of each layer's module output (input for head layers) before pooling;
    ``notes`` what the selection decided that the user should hear once (stderr).
    """

    layers: list[Layer]
    classifier: str | None
    head: list[str]
    num_logits: int
    executed: list[str]
    input_shape: tuple[int, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def head_depth(self) -> int:
        """``L``: linear layers between the penultimate feature and the classifier."""
        return max(len(self.head) - 1, 0)

    def rows(self) -> list[dict[str, Any]]:
        """The layer layout as plain dicts, in executed order (for ``nccli info``)."""
        ordered = sorted(self.layers, key=lambda layer: layer.order)  # the forward pass's
        return show_classifier_input([layer.row() for layer in ordered])


@dataclass
class _Call:
    name: str
    module: nn.Module
    leaf: bool
    input: Any = None
    output: Any = None


def _group_name(path: str) -> str:
    return path or "model"


def logits_of(out: Any, source: str) -> torch.Tensor:
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


def first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None) if kwargs else None


@dataclass
class _Probe:
    """What the probe forward recorded."""

    calls: list[_Call]
    counts: dict[str, int]
    logits: torch.Tensor

    @property
    def leaf_calls(self) -> list[_Call]:
        return [c for c in self.calls if c.leaf]


def _probe(
    model: nn.Module,
    probe_batch: torch.Tensor,
    hooked: set[str],
    keep: set[str],
    leaves: set[str],
    source: str,
) -> _Probe:
    """One forward of ``probe_batch`` with a hook on every module in ``hooked``; the input
    and output tensors of the modules in ``keep`` are recorded."""
    calls: list[_Call] = []
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())

    def make_hook(name: str) -> Callable[..., None]:
        kept, leaf = name in keep, name in leaves

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            inp = first_input(args, kwargs) if kept else None
            calls.append(_Call(name, mod, leaf, inp, out if kept else None))

        return hook

    handles = []
    try:
        for name in sorted(hooked):
            try:
                handles.append(
                    modules[name].register_forward_hook(make_hook(name), with_kwargs=True)
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
    return _Probe(calls, counts, logits_of(out, source))


def _check_probe(model: nn.Module, probe: _Probe, B: int, source: str) -> int:
    """The number of logits; errors for an output that is no logits or a hidden model."""
    logits = probe.logits
    if logits.ndim != 2 or logits.shape[0] != B:
        raise DataError(
            f"{source}: the model output has shape {tuple(logits.shape)}; expected logits "
            f"(batch={B}, classes)"
        )
    if not probe.leaf_calls and any(True for _ in model.parameters()):
        raise DataError(
            f"{source}: no submodule ran as a Python module during the probe (a TorchScript "
            "or torch.export model hides its layers); pass --arch or --model so nccli can "
            "rebuild the architecture and load the weights into it"
        )
    return int(logits.shape[1])


def _head_calls(model: nn.Module, probe: _Probe, want_auto: bool, source: str) -> list[_Call]:
    """The head's calls; with ``auto`` a model without one is an error, else it is empty."""
    try:
        head = _find_head(probe.leaf_calls, probe.logits, probe.counts, source)
    except DataError:
        if want_auto:
            raise
        head = []  # explicit layers only: they are cached as "other"
    if want_auto and not head:
        if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise DataError(
                f"{source}: a {type(model).__name__} hides its layers from hooks; pass --arch "
                "or --model so nccli can rebuild the architecture and load the weights into it"
            )
        raise DataError(
            f"{source}: no nn.Linear classifier producing the {int(probe.logits.shape[1])} "
            "logits ran in the forward pass; choose the modules to cache with --layers NAME,..."
        )
    return head


def _head_layers(head: list[_Call], first: int, B: int, source: str) -> list[Layer]:
    """Records of the head layers from chain position ``first`` up (each by its input)."""
    L = len(head) - 1
    out: list[Layer] = []
    for depth, call in enumerate(head):
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
        out.append(
            Layer(
                name=_group_name(call.name),
                dim=int(lin.in_features),
                module=call.name,
                depth=depth,
                role=role,
                io="input",
                weight=_param(lin.weight),
                bias=_param(lin.bias),
            )
        )
    return out


@dataclass(frozen=True)
class _Pick:
    """A selected module call: the module, its call index (0: it runs once), where it ran
    in the probe (``probe.calls``) and what it returned."""

    module: str
    call: int
    index: int
    output: Any = field(compare=False)


def _runs(probe: _Probe, name: str) -> list[int]:
    return [i for i, c in enumerate(probe.calls) if c.name == name]


def _pick(probe: _Probe, name: str, call: int, token: str, source: str) -> _Pick:
    """The call of ``name`` that ``--layers`` asks for (``#N``, or its only call)."""
    runs = _runs(probe, name)
    n = len(runs)
    if call == 0 and n > 1:
        raise DataError(
            f"{source}: module {_group_name(name)} runs {n} times per forward pass; select "
            f"one call with --layers '{name}#1' … '{name}#{n}' (its N-th call)"
        )
    if call > n:
        raise UsageError(
            f"{source}: --layers {token!r}: module {_group_name(name)} runs {n} "
            f"time{'s' * (n != 1)} per forward pass, so it has no call #{call}"
        )
    i = runs[max(call, 1) - 1]
    return _Pick(name, call if n > 1 else 0, i, probe.calls[i].output)


def _selected(
    probe: _Probe, matched: dict[Pattern, list[str]], kept_head: list[str], source: str
) -> list[_Pick]:
    """The calls the explicit ``--layers`` patterns select outside the kept head."""
    picks: list[_Pick] = []
    for pat, hits in matched.items():
        ran = [n for n in hits if n in probe.counts]
        if not ran:
            raise UsageError(
                f"{source}: --layers {pat.text!r}: {names_list(hits, 4)} did not run during the "
                "forward pass; pick a module the model calls"
            )
        picks.extend(_pick(probe, n, pat.call, pat.text, source) for n in ran if n not in kept_head)
    return picks


def _check_output(out: Any, name: str, B: int, source: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != B:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(
            f"{source}: module {_group_name(name)} returns {shape}, not a (batch={B}, ...) "
            "tensor; select another module with --layers"
        )
    return out


def _other_layers(
    picks: list[_Pick], B: int, pool: str, source: str
) -> tuple[list[Layer], dict[str, tuple[int, ...]]]:
    """Records of the picked calls in executed order (each by its pooled output), and the
    per-sample shapes of those outputs."""
    out: list[Layer] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for p in sorted(set(picks), key=lambda p: p.index):
        t = _check_output(p.output, p.module, B, source)
        name = _group_name(p.module) + (f"#{p.call}" if p.call else "")
        shape = tuple(int(s) for s in t.shape[1:])
        used, dim = pooled(shape, pool, f"{source}: module {name}")
        shapes[name] = shape
        out.append(Layer(name, dim, p.module, -1, "other", "output", pool=used, order=p.index))
    return out, shapes


def _passes_through(call: _Call) -> bool:
    """A module that hands its input on (Flatten, Identity, Dropout, an empty Sequential,
    or one whose output equals its input on the probe)."""
    return isinstance(call.module, PASSTHROUGH) or _feeds(call.output, call.input)


def _blocks(model: nn.Module, probe: _Probe, head: list[_Call]) -> tuple[list[_Pick], list[str]]:
    """``--layers blocks``: the root's children in executed order (see the module notes),
    and notes on what was left out."""
    notes: list[str] = []
    modules = dict(model.named_modules())
    top = [n for n, _ in model.named_children()]
    if "blocks" in modules:
        notes.append(
            "--layers blocks selects the model's stages; its module named 'blocks' is "
            "selected with --layers 'block[s]'"
        )
    head_names = {c.name for c in head}
    end = next(i for i, c in enumerate(probe.calls) if c is head[0]) if head else len(probe.calls)
    cands: list[_Pick] = []
    for name in sorted((n for n in top if n in probe.counts), key=lambda n: _runs(probe, n)[0]):
        runs = _runs(probe, name)
        if any(h == name or h.startswith(name + ".") for h in head_names) or runs[-1] > end:
            continue  # the head (cached by its inputs) and what runs after it
        if len(runs) > 1:
            notes.append(
                f"--layers blocks: {name} runs {len(runs)} times per forward pass and is left "
                f"out; select a call with --layers '{name}#N'"
            )
            continue
        if not _passes_through(probe.calls[runs[0]]):
            cands.append(_Pick(name, 0, runs[0], probe.calls[runs[0]].output))
    leaf = [not any(True for _ in modules[p.module].children()) for p in cands]
    stem = next((k for k, is_leaf in enumerate(leaf) if not is_leaf), 0)
    cands = cands[max(stem - 1, 0) :]  # the stem's last module stands for it
    nxt = [*(p.output for p in cands[1:]), head[0].input if head else None]
    return [p for p, q in zip(cands, nxt, strict=True) if not _feeds(p.output, q)], notes


def _rank(head: list[Layer], calls: list[_Call], probe: _Probe, others: list[Layer]) -> None:
    """Each layer's ``order``: its place among the cached layers in the forward pass (a
    head layer where its module ran; an other layer holds its call's index until here)."""
    at = {id(c): i for i, c in enumerate(probe.calls)}
    for layer, call in zip(head, calls, strict=True):
        layer.order = at[id(call)]
    every = sorted(head + others, key=lambda c: c.order)
    for rank, layer in enumerate(every):
        layer.order = rank


def discover_layers(
    model: nn.Module,
    probe_batch: torch.Tensor,
    layers: str | Sequence[str] | None = "auto",
    *,
    pool: str | None = None,
    source: str = "model",
) -> Discovery:
    """Find the penultimate feature, the deep linear head and the classifier of ``model``.

    One forward pass of ``probe_batch`` (a few real samples, on the model's device) with a
    hook on every leaf module.  ``layers`` is ``"auto"`` (the head), ``"blocks"`` (the
    model's stages and the head) or dotted module names / globs / ``name#N`` separated by
    commas (``"layer4,head.*"``; the grammar is in the module notes), optionally with
    ``auto`` among them.  A selected head module is cached with the head modules above it
    (their weights compose its classifier); any other selected module is cached by its
    output, reduced by ``pool`` (``avg``, the default when ``None``, ``max`` or
    ``flatten``; :func:`nccli.extract.pooling.pooled`).  ``source`` names the checkpoint
    in error messages.
    """
    want_auto, want_blocks, patterns = split_layers(layers, source)
    pool_name = check_pool(pool)
    named = list(model.named_modules())
    modules = dict(named)
    leaves = {n for n, m in named if not any(True for _ in m.children())}
    matched, notes = match_modules(named, patterns, source)
    selected = {n for hits in matched.values() for n in hits}
    top = {n for n, _ in model.named_children()} if want_blocks else set()
    keep = {n for n in leaves if isinstance(modules[n], nn.Linear)} | selected | top
    probe = _probe(model, probe_batch, leaves | selected | top, keep, leaves, source)
    B = int(probe_batch.shape[0])
    K = _check_probe(model, probe, B, source)
    head = _head_calls(model, probe, want_auto, source)
    names = [c.name for c in head]
    # which head layers to keep: all for auto, else from the shallowest selected one up
    hit = [i for i, n in enumerate(names) if n in selected]
    first = 0 if want_auto else (min(hit) if hit else len(names))
    choices = _head_layers(head, first, B, source)
    kept_head = [c.module for c in choices]
    picks = _selected(probe, matched, kept_head, source)
    if want_blocks:
        found, more = _blocks(model, probe, head)
        picks, notes = picks + found, notes + more
    others, shapes = _other_layers(picks, B, pool_name, source)
    if not choices and not others:
        raise UsageError(f"{source}: --layers {layers!r} selects no layer to cache")
    _rank(choices, head[first:], probe, others)
    averaged = [c.name for c in others if c.pool == "avg"]
    if pool is None and averaged:
        notes.append(
            f"{names_list(averaged, 6)}: feature maps averaged over their spatial dims (--pool "
            "avg, the default; --pool max or --pool flatten to change)"
        )
    return Discovery(
        layers=choices + others,
        classifier=kept_head[-1] if kept_head else None,
        head=kept_head,
        num_logits=K,
        executed=[c.name for c in probe.leaf_calls],
        input_shape=tuple(int(s) for s in probe_batch.shape[1:]),
        shapes={**{c.name: (c.dim,) for c in choices}, **shapes},
        notes=notes,
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
