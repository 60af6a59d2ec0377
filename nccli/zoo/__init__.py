"""Small built-in architectures, registered by name.

>>> from nccli import zoo
>>> name, kwargs = zoo.parse_arch("mlp:in_dim=8,widths=16-16,num_classes=3,head_depth=2")
>>> model = zoo.build(name, **kwargs)
>>> model.nccli_arch
'mlp:in_dim=8,widths=16-16,num_classes=3,head_depth=2'

Every factory takes only plain values (int, float, bool, None, lists of numbers), so
``format_arch(name, kwargs)`` is a string a cache can record and ``parse_arch`` reads back.
Built models carry that string as ``model.nccli_arch``.

``resnet18`` (kuangliu/pytorch-cifar's key names, classifier ``classifier``) and
``resnet18_tv`` (torchvision's names, ``stem="cifar"`` or ``"imagenet"``) also load each
other's state dicts and kuangliu's: the checkpoint loader calls a model's
``nccli_adapt_state(state)`` before checking keys (see :mod:`nccli.zoo.layouts`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from nccli.errors import UsageError
from nccli.zoo.cnn import VGG, ResNet18, ResNet18TV
from nccli.zoo.heads import simplex_etf
from nccli.zoo.mlp import MLP

__all__ = [
    "MLP",
    "VGG",
    "ResNet18",
    "ResNet18TV",
    "available",
    "build",
    "format_arch",
    "parse_arch",
    "register",
    "simplex_etf",
]

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_KEY = re.compile(r"^[A-Za-z_]\w*$")


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory`` under ``name`` (lower case, unique)."""

    def deco(factory: Factory) -> Factory:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise UsageError(f"zoo: architecture name {key!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with ``kwargs``; the model is in eval mode.

    ``name`` may also be a full spec such as ``"mlp:in_dim=64,widths=128,num_classes=10"``
    (see :func:`parse_arch`); explicit ``kwargs`` override values from the spec.  Unknown
    names, unknown or missing arguments raise :class:`~nccli.errors.UsageError`.
    """
    if ":" in name:
        name, spec_kwargs = parse_arch(name)
        kwargs = {**spec_kwargs, **kwargs}
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UsageError(f"zoo: unknown architecture {name!r}; available: {', '.join(available())}")
    factory = _REGISTRY[key]
    sig = inspect.signature(factory)
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(sig.parameters)
        raise UsageError(f"zoo: {key}: {exc} (accepted arguments: {accepted})") from None
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"zoo: {key}: bad arguments {kwargs} ({detail})") from exc
    model.nccli_arch = format_arch(key, kwargs)
    return model.eval()


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(low):
        return int(low)
    if _FLOAT.match(low):
        return float(low)
    if "-" in low or low == "":
        parts = text.split("-")
        if parts and parts[-1] == "":
            parts = parts[:-1]  # "256-" is the one-element list [256]
        items = [_parse_value(p) for p in parts]
        if any(isinstance(i, (list, str)) or i is None for i in items):
            raise UsageError(f"zoo: list value {text!r} must hold numbers separated by '-'")
        return items
    return text.strip()


def parse_arch(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"name:key=value,key=value"`` into ``(name, kwargs)``.

    Values are read as ``true``/``false`` → bool, ``none`` → None, integers, floats, and
    lists of numbers separated by ``-`` (``256-256-128``; ``256-`` is a one-element list,
    an empty value the empty list); anything else stays a string.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise UsageError(f"zoo: architecture spec {spec!r} has no name; e.g. 'mlp:in_dim=64,...'")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise UsageError(
                f"zoo: cannot read {item!r} in architecture spec {spec!r}; write key=value"
            )
        if key in kwargs:
            raise UsageError(f"zoo: {key!r} is given twice in architecture spec {spec!r}")
        kwargs[key] = _parse_value(value)
    return name, kwargs


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        parts = [_format_value(v) for v in value]
        if any(isinstance(v, (list, tuple, str, bool)) or v is None for v in value) or any(
            "-" in p for p in parts
        ):
            raise UsageError(f"zoo: list {value!r} must hold non-negative numbers to be recorded")
        return "-".join(parts) + ("-" if len(parts) == 1 else "")
    text = str(value)
    if any(c in text for c in ",=:-") or _parse_value(text) != text:
        raise UsageError(f"zoo: value {text!r} cannot be recorded in an architecture spec")
    return text


def format_arch(name: str, kwargs: dict[str, Any]) -> str:
    """Inverse of :func:`parse_arch`: ``("mlp", {"widths": [8, 8]})`` → ``"mlp:widths=8-8"``."""
    body = ",".join(f"{k}={_format_value(v)}" for k, v in kwargs.items())
    return f"{name}:{body}" if body else name


# The model classes are the factories: build() validates keyword arguments against their
# constructor signatures, so the recorded spec always names real parameters.
register("mlp")(MLP)
register("resnet18")(ResNet18)
register("resnet18_tv")(ResNet18TV)
register("vgg11")(functools.partial(VGG, 11))
register("vgg13")(functools.partial(VGG, 13))
