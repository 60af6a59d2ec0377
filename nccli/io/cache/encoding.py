"""Element encodings of the cache: ``(encoding-type, encoding-version)`` → reader, writer.

Every element nccli writes (the file root, each ``/layers/<name>`` group, each ``stats``
group) carries two string attributes, ``encoding-type`` and ``encoding-version``, as in
anndata's on-disk format.  Readers are looked up by the pair: an unknown pair is refused
with one message naming the element, the file and the versions this nccli reads — there
is no best-effort fallback.  Writers are registered per type for the version nccli
writes, and the registry stamps the pair after the writer ran, so no writer can forget it.

Adding a cache element, or a new version of one: write its reader and writer in
:mod:`nccli.io.cache.elements` and decorate them with :func:`register_read` /
:func:`register_write`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from nccli.errors import CacheError

__all__ = [
    "IOSpec",
    "get_spec",
    "read_attr",
    "read_elem",
    "register_read",
    "register_write",
    "versions",
    "write_elem",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class IOSpec:
    """What an element is and which version of its layout."""

    type: str
    version: str

    def __str__(self) -> str:
        return f"{self.type} {self.version}"


def read_attr(obj: Any, key: str, default: Any = None) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    v = obj.attrs.get(key, default)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def get_spec(obj: Any) -> IOSpec:
    """The element's encoding; a missing attribute reads as ``""``."""
    t, v = read_attr(obj, "encoding-type", ""), read_attr(obj, "encoding-version", "")
    return IOSpec(t if isinstance(t, str) else repr(t), v if isinstance(v, str) else repr(v))


_READERS: dict[IOSpec, Callable[..., Any]] = {}
_WRITERS: dict[str, tuple[IOSpec, Callable[..., Any]]] = {}


def register_read(spec: IOSpec) -> Callable[[F], F]:
    """Register the reader of one (type, version); registering a pair twice is a bug."""

    def deco(fn: F) -> F:
        if spec in _READERS:
            raise TypeError(f"a reader for {spec} is already registered")
        _READERS[spec] = fn
        return fn

    return deco


def register_write(spec: IOSpec) -> Callable[[F], F]:
    """Register the writer of ``spec.type`` (one version is written per type)."""

    def deco(fn: F) -> F:
        known = _WRITERS.get(spec.type)
        if known is not None and known[0] != spec:
            raise TypeError(f"{spec.type} is already written as version {known[0].version}")
        _WRITERS[spec.type] = (spec, fn)
        return fn

    return deco


def versions(type_: str) -> list[str]:
    """The versions of ``type_`` this nccli reads, oldest first."""
    return sorted((s.version for s in _READERS if s.type == type_), key=lambda v: (len(v), v))


def unsupported(obj: Any, where: str, expect: str, note: str = "") -> CacheError:
    """The error for an element whose encoding has no reader."""
    spec = get_spec(obj)
    known = ", ".join(versions(expect)) or "none"
    return CacheError(
        f"{where}: {obj.name} has encoding-type {spec.type!r} encoding-version "
        f"{spec.version!r}{note}, which this nccli cannot read (it reads {expect} versions "
        f"{known}); upgrade nccli or re-extract"
    )


def read_elem(obj: Any, expect: str, where: str, **kw: Any) -> Any:
    """Read ``obj`` with the reader registered for its encoding, which must be of type
    ``expect``; ``where`` names the file in errors, ``kw`` go to the reader."""
    spec = get_spec(obj)
    reader = _READERS.get(spec) if spec.type == expect else None
    if reader is None:
        raise unsupported(obj, where, expect)
    return reader(obj, where, **kw)


def write_elem(group: Any, type_: str, *args: Any, **kw: Any) -> Any:
    """Write an element of ``type_`` into ``group`` with its registered writer, then stamp
    ``group`` with the writer's (type, version)."""
    spec, fn = _WRITERS[type_]
    out = fn(group, *args, **kw)
    group.attrs["encoding-type"] = spec.type
    group.attrs["encoding-version"] = spec.version
    return out
