"""Layer discovery: the penultimate feature, the deep linear head and the classifier.

:func:`discover_layers` runs one probe forward with a hook on every leaf module.  In the
*executed* order it finds the classifier — the last ``nn.Linear`` whose output is the model
output (or, failing that, the last one with as many outputs as there are logits) — and
walks back through the trailing run of ``nn.Linear`` layers; ``Flatten``/``Dropout``/
``Identity`` pass through, anything else ends the run, and so does a linear layer whose
output is not exactly the next one's input (a functional ``relu`` or a residual add in
``forward`` is invisible to module hooks, but not to this check).  That run is the deep
linear head ``W_1 … W_L`` plus the classifier ``W_{L+1}``; its layers are cached by their
*input*, other ``--layers`` modules by their flattened *output* (roles and depths:
:mod:`nccli.layers`).  Each head layer keeps its own module's weight and bias, so a reader
composes the classifier acting on depth ``l`` as ``C_l = W_{L+1} ⋯ W_{l+1}``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from nccli.errors import DataError, NCError, UsageError
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
    order; ``executed`` is the leaf modules in the order the probe ran them.
    """

    layers: list[Layer]
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
        return show_classifier_input([layer.row() for layer in self.layers])


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


def _names(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


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


def _match(
    named: list[tuple[str, nn.Module]], patterns: list[str], source: str
) -> dict[str, list[str]]:
    """Module paths matched by each ``--layers`` pattern (each must match one)."""
    matched: dict[str, list[str]] = {}
    for pat in patterns:
        hits = [n for n, _ in named if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
        if not hits:
            raise UsageError(
                f"{source}: --layers {pat!r} matches no module; modules are "
                f"{_names([n for n, _ in named if n], 12)}"
            )
        matched[pat] = hits
    return matched


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


def _other_layers(
    probe: _Probe, matched: dict[str, list[str]], kept_head: list[str], B: int, source: str
) -> list[Layer]:
    """Records of the selected modules outside the kept head (each by its flat output)."""
    ran_first: dict[str, int] = {}
    for i, c in enumerate(probe.calls):
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
    out: list[Layer] = []
    for name in sorted(others, key=lambda n: ran_first[n]):
        if probe.counts.get(name, 0) != 1:
            raise DataError(
                f"{source}: module {name} runs {probe.counts[name]} times per forward pass; nccli "
                "caches one feature per sample, select a module that runs once"
            )
        out_t = next(c.output for c in probe.calls if c.name == name)
        if not isinstance(out_t, torch.Tensor) or out_t.ndim < 1 or out_t.shape[0] != B:
            shape = tuple(out_t.shape) if isinstance(out_t, torch.Tensor) else type(out_t).__name__
            raise DataError(
                f"{source}: module {name} returns {shape}, not a (batch={B}, ...) tensor; "
                "select another module with --layers"
            )
        dim = int(math.prod(out_t.shape[1:]))
        out.append(
            Layer(name=_group_name(name), dim=dim, module=name, depth=-1, role="other", io="output")
        )
    return out


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
    matched = _match(named, patterns, source)
    selected = {n for hits in matched.values() for n in hits}
    keep = {n for n in leaves if isinstance(modules[n], nn.Linear)} | selected
    probe = _probe(model, probe_batch, leaves | selected, keep, leaves, source)
    B = int(probe_batch.shape[0])
    K = _check_probe(model, probe, B, source)
    head = _head_calls(model, probe, want_auto, source)
    names = [c.name for c in head]
    # which head layers to keep: all for auto, else from the shallowest selected one up
    hit = [i for i, n in enumerate(names) if n in selected]
    first = 0 if want_auto else (min(hit) if hit else len(names))
    choices = _head_layers(head, first, B, source)
    kept_head = [c.module for c in choices]
    choices += _other_layers(probe, matched, kept_head, B, source)
    if not choices:
        raise UsageError(f"{source}: --layers {layers!r} selects no layer to cache")
    return Discovery(
        layers=choices,
        classifier=kept_head[-1] if kept_head else None,
        head=kept_head,
        num_logits=K,
        executed=[c.name for c in probe.leaf_calls],
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
