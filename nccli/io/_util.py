"""Helpers shared by the io readers: import strings and one-line error text."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from typing import Any

from nccli.errors import DataError, UsageError

__all__ = ["IMPORT_SPEC", "check_input_file", "file_sha256", "import_object", "one_line"]

#: ``pkg.module:attr`` or ``pkg.module:Class.attr``
IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


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


def import_object(spec: str, *, flag: str) -> Any:
    """Import ``module:attr`` and return the attribute.

    The current directory is searched as well as ``sys.path`` (like ``python -m``), so a
    ``models.py`` next to the data works without installing it.  ``flag`` names the
    option in error messages (``--model``, ``--data``).
    """
    if not IMPORT_SPEC.match(spec):
        raise UsageError(f"{flag} {spec!r}: expected an import string 'pkg.module:factory'")
    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"{flag} {spec!r}: cannot import {mod_name!r} ({one_line(exc)}); install it or run from "
            "the directory that holds it"
        ) from exc
    except Exception as exc:
        raise UsageError(
            f"{flag} {spec!r}: importing {mod_name!r} failed with {type(exc).__name__}: "
            f"{one_line(exc)}; run with --debug for the traceback"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{flag} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


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
