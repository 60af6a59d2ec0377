"""Run names: which run each checkpoint belongs to (``--run-from``).

By default (``auto``): the cache's ``run`` attribute; else, when the inputs lie in more than
one directory, the parent directory's name; else the file stem with its epoch/step part
removed (``run1_ep050.h5`` → ``run1``); else the parent directory's name.  ``dir`` /
``stem`` force one rule, and any callable ``Source -> str`` may be given.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from pathlib import Path

from nccli.io.names import strip_epoch_step
from nccli.io.sources import Source


class RunFrom(str, enum.Enum):
    """``--run-from`` choices: how a checkpoint's run name is found."""

    auto = "auto"
    dir = "dir"
    stem = "stem"


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
