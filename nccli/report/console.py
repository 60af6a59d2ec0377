"""The consoles: data tables to stdout; notes, progress and status to stderr.

One place decides how nccli talks to a terminal: ``NO_COLOR`` (any non-empty value) turns
colour off, markup is never auto-highlighted, and progress bars and spinners only appear
when stderr is a terminal (so a pipeline's logs stay clean).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def stdout_console(*, highlight: bool = False) -> Console:
    """Console for data tables (stdout)."""
    return Console(no_color=_no_color(), highlight=highlight)


def stderr_console() -> Console:
    """Console for notes, progress and errors (never stdout)."""
    return Console(stderr=True, no_color=_no_color(), highlight=False)


def print_notes(
    notes: Iterable[str],
    quiet: bool = False,
    *,
    console: Console | None = None,
    escape_text: bool = False,
) -> None:
    """Reasons for nan values (and other notes), ``note: …`` on stderr; nothing when
    ``quiet``.  ``console``: print through this one instead (a live progress bar's, so the
    bar stays below the notes); ``escape_text``: show ``[...]`` in a note literally."""
    notes = list(notes)
    if quiet or not notes:
        return
    console = console if console is not None else stderr_console()
    for note in notes:
        text = escape(note) if escape_text else note
        console.print(f"[yellow]note:[/yellow] {text}", soft_wrap=True, highlight=False)


def progress_bar(enabled: bool) -> Any:
    """A transient rich progress bar on stderr (description, bar, n/total, time left);
    disabled unless ``enabled`` and stderr is a terminal.  Use it as a context manager."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = stderr_console()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


@contextlib.contextmanager
def status_spinner(
    enabled: bool, text: str = "measuring"
) -> Iterator[Callable[[str], None] | None]:
    """A ``text…`` spinner on stderr while the block runs; yields the callback that updates
    it (``text <msg>``), or ``None`` when not ``enabled`` or stderr is not a terminal."""
    err = stderr_console()
    if not (enabled and err.is_terminal):
        yield None
        return
    status = err.status(f"{text}…")
    status.start()
    try:
        yield lambda msg: status.update(f"{text} {msg}")
    finally:
        status.stop()
