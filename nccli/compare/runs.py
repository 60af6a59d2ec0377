"""Run names: which run each checkpoint belongs to (``--run-from``).

By default (``auto``): the cache's ``run`` attribute; else, when the inputs lie in more than
one directory, the parent directory's name; else the file stem with its epoch/step part
removed (``run1_ep050.h5`` → ``run1``); else the parent directory's name.  ``dir`` /
``stem`` force one rule, and any callable ``Source -> str`` may be given.

Trajectory order (:func:`trajectory_order`): within a run, checkpoints are ordered by their
epoch (then step) — recorded in the checkpoint or cache, else in the file or folder name
(:mod:`nccli.io.names`); when none of them has one, by natural sort of their paths
(``ckpt_2`` before ``ckpt_10``) if the numbers in the paths tell them apart, else in the
order given.  A note says which rule decided.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nccli.choices import RunFrom
from nccli.io.names import epoch_step_from_path, strip_epoch_step
from nccli.io.sources import Source


def _file_stem(source: Source) -> str:
    name = Path(source.path).name
    for suffix in (".h5", ".hdf5", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _parent(source: Source) -> Path:
    return Path(source.path).resolve().parent


def _dir_names(parents: Sequence[Path]) -> dict[Path, str]:
    """Shortest trailing path of each directory that tells them apart."""
    uniq = list(dict.fromkeys(parents))
    for depth in range(1, 1 + max((len(p.parts) for p in uniq), default=1)):
        names = {p: "/".join(p.parts[-depth:]) for p in uniq}
        if len(set(names.values())) == len(uniq):
            return names
    return {p: str(p) for p in uniq}


def run_names(
    sources: Sequence[Source], run_of: str | RunFrom | Callable[[Source], str] = "auto"
) -> list[str]:
    """The run name of each source (see the module docstring for the rules)."""
    if callable(run_of) and not isinstance(run_of, str):
        return [str(run_of(s)) for s in sources]
    how = RunFrom(run_of)
    parents = [_parent(s) for s in sources]
    dirnames = _dir_names(parents)
    out: list[str] = []
    no_attr = [p for s, p in zip(sources, parents, strict=True) if not _run_attr(s)]
    multi_dir = len(set(no_attr)) > 1
    for s, parent in zip(sources, parents, strict=True):
        attr = _run_attr(s)
        dname = dirnames[parent] or _file_stem(s)
        stem = strip_epoch_step(_file_stem(s))
        if how is RunFrom.dir:
            out.append(dname)
        elif how is RunFrom.stem:
            out.append(stem or _file_stem(s))
        elif attr:
            out.append(attr)
        elif multi_dir:
            out.append(dname)
        else:
            out.append(stem or dname)
    return out


def _run_attr(source: Source) -> str | None:
    v = source.attrs.get("run") if source.attrs else None
    if v is None:
        return None
    v = str(v).strip()
    return v or None


# ------------------------------------------------------------------ trajectory order
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple:
    """Sort key that reads digit runs as numbers: ``ckpt_2`` before ``ckpt_10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in _DIGITS.split(str(path))
        if part
    )


def _numbers(path: str) -> tuple[int, ...]:
    return tuple(int(d) for d in _DIGITS.findall(str(path)))


def _from_name(source: Source, field: str) -> bool:
    """Whether ``source``'s epoch (or step) is the one its name (or its checkpoint's file or
    folder name, for a cache) gives."""
    value = getattr(source, field)
    attrs = source.attrs or {}
    origin = attrs.get(f"{field}_from")  # recorded by extract: "checkpoint" or "name"
    if origin is not None:
        return origin == "name"
    names = [source.path, *([attrs["checkpoint"]] if attrs.get("checkpoint") else [])]
    i = 0 if field == "epoch" else 1
    return any(epoch_step_from_path(str(n))[i] == value for n in names)


def trajectory_order(sources: Sequence[Source]) -> tuple[list[int], str]:
    """The order of one run's checkpoints (indices into ``sources``, as given) and the rule
    that decided it: ``"by the epoch in their file names"``, ``"by the step recorded in
    them"``, ``"by natural sort of their paths"``, ``"in the order given"``, …"""
    idx = list(range(len(sources)))
    known = [i for i in idx if sources[i].epoch is not None or sources[i].step is not None]
    unknown = [i for i in idx if i not in known]
    if len({_numbers(sources[i].path) for i in unknown}) > 1:
        unknown.sort(key=lambda i: natural_key(sources[i].path))  # stable: ties keep order
        rest = "by natural sort of their paths"
    else:
        rest = "in the order given"
    if not known:
        return unknown, rest
    known.sort(key=lambda i: _epoch_key(sources[i], i))
    field = "epoch" if any(sources[i].epoch is not None for i in known) else "step"
    named = [_from_name(sources[i], field) for i in known]
    where = "recorded in them or in their file names"
    if all(named) or not any(named):
        where = "in their file names" if all(named) else "recorded in them"
    rule = f"by the {field} {where}"
    if unknown:
        rule += f"; {len(unknown)} without one come last, {rest}"
    return known + unknown, rule


def _epoch_key(s: Source, i: int) -> tuple[Any, ...]:
    e, st = s.epoch, s.step
    return (e is None, e or 0, st is None, st or 0, natural_key(s.path), i)
