"""Helpers shared by the io readers: import strings and files, one-line error text."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from nccli.errors import DataError, UsageError

__all__ = [
    "IMPORT_SPEC",
    "check_input_file",
    "file_sha256",
    "import_file",
    "import_object",
    "is_file_target",
    "one_line",
    "public_callables",
    "split_model_spec",
]

#: ``pkg.module:attr`` or ``pkg.module:Class.attr``
IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: a callable's name after the target: ``factory`` or ``Class.attr``
_ATTR = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """Exception text squeezed onto one line and cut to ``limit`` characters."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    if "Traceback" in text:
        # an error that embeds a traceback (TorchScript, a worker process): the last line
        # says what went wrong, the frames above it would read like an nccli crash
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines and "Traceback" not in lines[-1] else "see --debug"
        text = re.sub(r"^\s*[\w.]*(?:Error|Exception): ", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_model_spec(spec: str, *, flag: str = "--model") -> tuple[str, str, str | None]:
    """``target:callable[:key=value,...]`` → ``(target, callable, args or None)``.

    ``target`` is ``pkg.module`` or ``path/to/file.py``; a path may itself hold ``:``, so
    the spec is split from the right: the last part is the arguments when it holds ``=``
    (or is empty), and the callable (an identifier) is the part before them.
    """
    text = spec.strip()
    usage = (
        f"{flag} {spec!r}: expected 'pkg.module:callable' or 'path/to/file.py:callable', "
        "optionally followed by ':key=value,...'"
    )
    head, sep, last = text.rpartition(":")
    if not sep or not head:
        raise UsageError(usage)
    args: str | None = None
    before, _, callable_name = head.rpartition(":")
    if (
        "=" in last
        or last == ""
        or (not _ATTR.match(last) and ":" in head)
        # 'file.py:Net:width' (an argument without '='): the target is the file, not
        # 'file.py:Net'
        or (not _plausible(head) and _plausible(before) and _ATTR.match(callable_name))
    ):
        args = last
        head, sep, last = head.rpartition(":")
        if not sep or not head:
            raise UsageError(usage)
    if not _ATTR.match(last):
        raise UsageError(
            f"{flag} {spec!r}: {last!r} is not a callable's name; write "
            "'target:callable' (a Python identifier), then ':key=value,...' for its arguments"
        )
    return head, last, args


def _plausible(target: str) -> bool:
    """Whether ``target`` can be what a ``--model`` callable is taken from."""
    return target.endswith(".py") or bool(_ATTR.match(target))


def is_file_target(target: str) -> bool:
    """Whether a ``--model`` target names a file (``x.py``, ``a/b``) rather than a module."""
    return target.endswith(".py") or "/" in target or os.sep in target


def import_object(spec: str, *, flag: str, shown: str | None = None) -> Any:
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return the attribute.

    For a module, the current directory is searched as well as ``sys.path`` (like
    ``python -m``), so a ``models.py`` next to the data works without installing it.  A
    file is imported by path under a name of its own (:func:`import_file`).  ``flag``
    names the option in error messages (``--model``, ``--data``), ``shown`` the spec as
    the user wrote it (default ``spec``).
    """
    shown = spec if shown is None else shown
    target, _, attr = spec.rpartition(":")
    if target and _ATTR.match(attr) and is_file_target(target):
        module = import_file(target, flag=flag, shown=shown)
        where = f"file {target!r}"
    else:
        if not IMPORT_SPEC.match(spec):
            raise UsageError(
                f"{flag} {shown!r}: expected an import string 'pkg.module:factory' or "
                "'path/to/file.py:factory'"
            )
        module = _import_module(target, flag=flag, shown=shown)
        where = f"module {target!r}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            offer = public_callables(module)
            raise UsageError(
                f"{flag} {shown!r}: {where} has no attribute {attr!r}"
                + (f"; it defines {', '.join(offer)}" if offer else "")
            )
        obj = getattr(obj, part)
    return obj


def public_callables(module: Any, limit: int = 8) -> list[str]:
    """A few public callables of ``module``: the ones defined in it first."""
    own, other = [], []
    for name, value in vars(module).items():
        if name.startswith("_") or not callable(value):
            continue
        mine = getattr(value, "__module__", None) == module.__name__
        (own if mine else other).append(name)
    found = own + other
    return found[:limit] + (["..."] if len(found) > limit else [])


def _import_module(mod_name: str, *, flag: str, shown: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"{flag} {shown!r}: cannot import {mod_name!r} ({one_line(exc)}); install it or run "
            "from the directory that holds it"
        ) from exc
    except Exception as exc:
        raise UsageError(
            f"{flag} {shown!r}: importing {mod_name!r} failed with {type(exc).__name__}: "
            f"{one_line(exc)}; run with --debug for the traceback"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_file(target: str, *, flag: str, shown: str) -> Any:
    """Import the Python file ``target`` by path and return the module.

    The module gets a name of its own (from a hash of its path), so two ``models.py`` of
    two repositories never clash.  A file inside a package folder (``__init__.py`` next to
    it, and above) is imported as a submodule of that package, registered under such a
    name too, so ``from .blocks import X`` works; the file's folder, the folder above the
    package and the current directory are on ``sys.path`` during the import, so sibling
    imports (``import resnet_utils``, ``from models.blocks import X``) work as they do
    when the repository's own scripts run.
    """
    p = Path(target)
    if not p.exists():
        raise UsageError(
            f"{flag} {shown!r}: no such file {target!r}; check the path (relative to {os.getcwd()})"
        )
    if not p.is_file() or p.suffix != ".py":
        raise UsageError(
            f"{flag} {shown!r}: {target!r} is not a .py file; point it at the Python file "
            "that defines the model, or write 'pkg.module:callable'"
        )
    path = p.resolve()
    packages: list[Path] = []
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        packages.insert(0, folder)
        folder = folder.parent
    tag = hashlib.sha256(str(path.parent if not packages else packages[0]).encode()).hexdigest()
    dirs = [str(d) for d in dict.fromkeys((path.parent, folder, Path.cwd()))]
    added = [d for d in dirs if d not in sys.path]
    before = set(sys.modules)
    sys.path[:0] = added
    try:
        if not packages:
            return _exec_file(f"_nccli_user_{tag[:12]}_{_ident(path.stem)}", path)
        top = f"_nccli_user_{tag[:12]}_{_ident(packages[0].name)}"
        if top not in sys.modules:
            _exec_file(top, packages[0] / "__init__.py", package=packages[0])
        parts = [top, *(d.name for d in packages[1:])]
        if path.name != "__init__.py":
            parts.append(path.stem)
        return importlib.import_module(".".join(parts))
    except (Exception, SystemExit) as exc:  # a script's argparse at import time exits
        for name in set(sys.modules) - before:
            if name.startswith("_nccli_user_"):
                del sys.modules[name]
        raise UsageError(
            f"{flag} {shown!r}: importing {target!r} failed with {type(exc).__name__}: "
            f"{one_line(exc)}; run with --debug for the traceback"
        ) from exc
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)


def _ident(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _exec_file(name: str, path: Path, package: Path | None = None) -> Any:
    """Run ``path`` as the module ``name`` (a package when ``package`` is its folder)."""
    if name in sys.modules:
        return sys.modules[name]
    import importlib.util

    locations = [str(package)] if package is not None else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check_input_file(path: str | os.PathLike[str], what: str = "input") -> None:
    """Refuse an input that is not a regular file before anything opens it: a FIFO or a
    socket would make a read hang, a device read without end (``/dev/zero``).  A missing
    path is left to the caller's own "no such file" message; a directory is refused."""
    import stat

    try:
        mode = os.stat(path).st_mode  # follows a symlink: the target is what is read
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataError(f"{path}: cannot inspect the {what} ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
    )
    raise DataError(f"{path}: the {what} is {kind}, not a regular file; pass a file")
