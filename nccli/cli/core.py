"""The Typer app, its root options (``--debug``, ``--quiet``, ``--version``) and the one
place errors and library warnings become stderr lines and an exit code.

:func:`user_errors` keeps the promise of docs/security.md: an :class:`NCError` prints its
message; anything else that escapes a command (a bug, or a library failure nothing
converted) prints ONE line naming its type and exits 1; ``--debug`` shows the traceback.
:func:`library_warnings` turns warnings into deduplicated ``note:`` lines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from nccli.cli.options import DebugOpt, QuietOpt, VersionOpt
from nccli.errors import NCError, UsageError


class _Group(typer.core.TyperGroup):
    """The app's group: its commands are :class:`Command` s."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag(super().get_help_option(ctx))


class Command(typer.core.TyperCommand):
    """A command whose ``--help`` reads as the flag it is (click gives it a ``<bool>``
    metavar in the option table, which reads as if it took a value)."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag(super().get_help_option(ctx))


def _flag(option: Any) -> Any:
    if option is not None:
        option.metavar = ""
    return option


app = typer.Typer(
    cls=_Group,
    name="nccli",
    help="Measure Neural Collapse in trained networks: extract → measure → compare.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _State:
    debug: bool = False
    quiet: bool = False
    warnings_hooked: bool = False  # main() installed the note hook (see library_warnings)


STATE = _State()


def click_exceptions() -> tuple[type[Exception], ...]:
    """click's ``ClickException`` (the base of ``typer.BadParameter``, wherever typer gets
    click from), ``typer.Abort`` and ``typer.Exit``: the control flow of the command line,
    never an error of nccli (``Exit`` and ``Abort`` are ``RuntimeError`` subclasses)."""
    base = next(
        (c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
        typer.BadParameter,
    )
    return base, typer.Abort, typer.Exit


def _squeeze(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------- errors


@contextlib.contextmanager
def user_errors(
    command: str | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    reduce: str | None = None,
) -> Iterator[None]:
    """Turn every exception a command lets escape into one stderr line and an exit code.

    ``command`` and ``inputs`` (what the user named) let an out-of-memory or unexpected
    failure say which input was being processed; ``reduce`` is what to try when memory runs
    out (e.g. ``"a smaller --batch-size (now 256)"``; ``None``: no option helps).
    """
    passthrough = click_exceptions()
    try:
        yield
    except NCError as exc:
        if STATE.debug:
            raise
        msg = " ".join(str(exc).split())
        typer.echo(f"nccli: error: {msg}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if STATE.debug:
            raise
        why = " ".join(str(exc).split())  # e.g. what was kept for --resume
        typer.echo(f"nccli: interrupted; {why}" if why else "nccli: interrupted", err=True)
        raise typer.Exit(130) from None
    except passthrough:
        raise
    except Exception as exc:  # noqa: BLE001 - the last-resort net: one line, never a traceback
        if STATE.debug:
            raise
        try:
            line = failure_line(exc, command, inputs, reduce)
        except Exception:  # noqa: BLE001 - describing the failure must not fail itself
            line = unexpected_line(exc, None)
        typer.echo(f"nccli: error: {line}", err=True)
        raise typer.Exit(1) from None


def failure_line(
    exc: BaseException,
    command: str | None,
    inputs: Sequence[str | os.PathLike[str]],
    reduce: str | None,
) -> str:
    """The message for an exception that is not an :class:`NCError`."""
    if isinstance(exc, OSError) and not is_out_of_memory(exc):  # a file or a pipe failed
        name = exc.filename or input_of(exc, inputs, guess=False)  # a pipe is no input
        prefix = f"{name}: " if name else ""
        return f"{prefix}{_squeeze(exc.strerror or str(exc)) or type(exc).__name__}"
    where = input_of(exc, inputs)
    if is_out_of_memory(exc):
        return oom_line(exc, command, where, reduce)
    return unexpected_line(exc, where)


def unexpected_line(exc: BaseException, where: str | None) -> str:
    text = _squeeze(str(exc)) or "(no message)"
    during = f" while processing {where}" if where else ""
    return (
        f"unexpected {type(exc).__name__}{during}: {text}; rerun with --debug for the "
        "traceback and please report it"
    )


_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory", re.I)


def is_out_of_memory(exc: BaseException) -> bool:
    """``MemoryError``, torch's ``OutOfMemoryError`` (CUDA/MPS) and allocator failures
    (a ``RuntimeError`` saying it cannot allocate), ``ENOMEM``."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)[:2000]))


_SIZE_UNITS = re.compile(r"allocate (?:more than )?(\d+(?:\.\d+)? ?[KMGTPE]i?B)\b", re.I)
_SIZE_BYTES = re.compile(r"allocate (\d+) bytes", re.I)


def _alloc_size(exc: BaseException) -> str | None:
    """The failed allocation, when the message says it (numpy, torch CPU / CUDA)."""
    text = str(exc)[:2000]
    m = _SIZE_BYTES.search(text)
    if m:
        size = float(m.group(1))
        for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if size < 1024 or unit == "PiB":
                return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
    m = _SIZE_UNITS.search(text)
    return m.group(1) if m else None


def oom_line(exc: BaseException, command: str | None, where: str | None, reduce: str | None) -> str:
    head = "out of memory"
    head += f" in {command}" if command else ""
    head += f" while processing {where}" if where else ""
    size = _alloc_size(exc)
    head += f" (allocating {size})" if size else ""
    fixed = "the per-class statistics (classes × feature dimension)"
    fixed += " or the model" if command in ("extract", "info") else ""
    if reduce:
        return f"{head}; try {reduce}; if {fixed} alone do not fit, no option reduces them"
    return f"{head}; no option of this command reduces {fixed}; use a machine with more memory"


def input_of(
    exc: BaseException, inputs: Sequence[str | os.PathLike[str]], *, guess: bool = True
) -> str | None:
    """Which of the user's ``inputs`` the failing code was working on: the innermost frame
    of the traceback holding one of them (as a path, or an object's ``path``/``where``);
    with ``guess`` the only input when there is one; else ``None``."""
    wanted: dict[str, str] = {}
    for p in inputs:
        with contextlib.suppress(TypeError, ValueError):
            wanted[os.path.abspath(os.fspath(p))] = os.fspath(p)
    if not wanted:
        return None
    if isinstance(exc, OSError) and exc.filename:
        hit = _match(exc.filename, wanted)
        if hit:
            return hit
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            hit = _match(value, wanted)
            if hit:
                return hit
    return next(iter(wanted.values())) if guess and len(wanted) == 1 else None


def _match(value: Any, wanted: dict[str, str]) -> str | None:
    candidates = [value]
    if not isinstance(value, (str, Path)):
        for attr in ("path", "where"):
            try:
                candidates.append(getattr(value, attr, None))
            except Exception:  # noqa: BLE001 - a closed file, a lazy property: not a hit
                continue
    for c in candidates:
        if isinstance(c, (str, Path)) and 0 < len(str(c)) < 4096:
            with contextlib.suppress(TypeError, ValueError):
                hit = wanted.get(os.path.abspath(os.fspath(c)))
                if hit:
                    return hit
    return None


# ------------------------------------------------------------------ warnings

#: warnings addressed to nccli's developers, not to its users: silenced (``--debug`` shows
#: them).  Deprecations (nccli pins what it calls; the user cannot act on them) and
#: torch's known noise: TypedStorage, read-only numpy arrays handed to torch (nccli
#: memory-maps inputs and copies each batch), TorchScript/jit deprecation.
_SILENCED_CATEGORIES = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
    ResourceWarning,
)
_SILENCED_MESSAGES = (
    r"TypedStorage is deprecated",
    r"The given NumPy array is not writable",
    r"(?s).*torch\.jit",
    r"(?s).*TorchScript",
    r"Named tensors and all their associated APIs",
)


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
    """While the command runs, each distinct warning becomes one ``note: ...`` line on
    stderr (none with ``--quiet``) instead of Python's two-line ``file:line: Warning``
    block; the known noise is silenced.  ``--debug`` leaves Python's display alone, and so
    do ``-W``/``PYTHONWARNINGS`` (the user chose a policy).  The filters are set by the
    root callback (after ``--debug`` is parsed); everything is restored on exit."""
    if sys.warnoptions:
        yield
        return
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if STATE.debug:
            original(message, category, filename, lineno, file, line)
            return
        text = warning_note(message, category, filename)
        if STATE.quiet or text in seen:
            return
        seen.add(text)
        with contextlib.suppress(Exception):  # a closed stderr must not turn into an error
            typer.echo(f"note: {text}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        STATE.warnings_hooked = True
        try:
            yield
        finally:
            STATE.warnings_hooked = False


def _install_warning_filters() -> None:
    warnings.simplefilter("always")  # the hook deduplicates; Python's registry would not
    for category in _SILENCED_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for pattern in _SILENCED_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)


def warning_note(message: Warning | str, category: type[Warning], filename: str) -> str:
    """``numpy RuntimeWarning: overflow encountered in cast``: who warned, the category
    and the message on one line."""
    origin = category.__module__.split(".")[0]
    if origin in ("builtins", "warnings"):
        parts = Path(filename).parts
        for marker in ("site-packages", "dist-packages"):
            if marker in parts[:-1]:
                origin = parts[parts.index(marker) + 1]
                break
        else:
            origin = ""
    origin = "" if origin in ("nccli", "builtins", "warnings") else origin.removesuffix(".py")
    text = _squeeze(str(message)) or "(no message)"
    return f"{origin} {category.__name__}: {text}".strip()


# ------------------------------------------------------------------------ root


@app.callback()
def _root(debug: DebugOpt = False, quiet: QuietOpt = False, version: VersionOpt = False) -> None:
    """nccli — Neural Collapse metrics from checkpoints, caches and feature files."""
    STATE.debug = debug
    STATE.quiet = quiet
    if STATE.warnings_hooked and not debug:
        _install_warning_filters()


def _quiet_after(value: bool) -> None:
    if value:  # absent after the command: what the root option said stands
        STATE.quiet = True


def _debug_after(value: bool) -> None:
    if value:
        STATE.debug = True


#: ``-q`` / ``--debug`` after the command name (``nccli measure x.h5 -q``): the same state
#: as before it; every command takes them (``quiet: QuietAfterOpt = False``)
QuietAfterOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        metavar="",  # a flag: no <bool>
        callback=_quiet_after,
        expose_value=False,
        help="No progress or notes on stderr (also before the command).",
    ),
]
DebugAfterOpt = Annotated[
    bool,
    typer.Option(
        "--debug",
        metavar="",  # a flag: no <bool>
        callback=_debug_after,
        expose_value=False,
        help="Show Python tracebacks for errors (also before the command).",
    ),
]

#: what a value given to a flag looks like (``--wide true``: click takes ``true`` as a path)
_FLAG_VALUES = frozenset({"true", "false", "yes", "no", "on", "off"})


def refuse_flag_values(paths: Sequence[str | os.PathLike[str]]) -> None:
    """A path ``true``/``false``/... that does not exist was meant as a flag's value:
    say so (exit 2) instead of "no such file"."""
    for p in paths:
        name = os.fspath(p)
        if name.lower() in _FLAG_VALUES and not os.path.lexists(name):
            raise UsageError(
                f"no such file {name} (flags take no value: write e.g. --wide, not --wide {name})"
            )


def split_list(items: list[str] | None) -> list[str]:
    """Repeatable, comma-separated option values as one list (``-l a,b -l c``)."""
    return [p.strip() for item in (items or []) for p in item.split(",") if p.strip()]
