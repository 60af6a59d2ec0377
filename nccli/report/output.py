"""Where a result (:class:`~nccli.table.Rows`, or a DataFrame) goes: a table on a
terminal, CSV when piped, or a file (``-o``).

A file is written to ``<name>.partial`` and renamed (:func:`nccli.io.safe.atomic_output`),
so a failed write (a full disk) never leaves a truncated file under the requested name, a
link planted at either name is refused, and a second nccli writing the same file refuses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from nccli.errors import DataError, UsageError
from nccli.io.safe import DISK_FULL, atomic_output
from nccli.report.console import stdout_console
from nccli.report.data import OutputFormat, write_data
from nccli.report.measure_table import render_measure_table

#: draws a result (:class:`~nccli.table.Rows` or a DataFrame) on a console
TableRenderer = Callable[[Any, Console], None]


#: ``-o`` without ``--format``: the format its suffix names (any other suffix: CSV)
SUFFIX_FORMATS = {".csv": OutputFormat.csv, ".tsv": OutputFormat.tsv, ".json": OutputFormat.json}


def resolve_format(fmt: OutputFormat | None, output: Path | None = None) -> OutputFormat:
    """An explicit ``fmt`` wins; else a file ``output`` is written in the format its suffix
    names (``.csv``, ``.tsv``, ``.json``; any other suffix: CSV); else ``table`` on a
    terminal, ``csv`` when stdout is piped."""
    if fmt is not None:
        return fmt
    if output is not None and str(output) != "-":
        return SUFFIX_FORMATS.get(output.suffix.lower(), OutputFormat.csv)
    return OutputFormat.table if sys.stdout.isatty() else OutputFormat.csv


def write_file(df: Any, fmt: OutputFormat, output: Path, *, as_wide: bool) -> None:
    """Write ``df`` to ``output`` (a table becomes CSV) through a ``.partial`` file
    (:func:`nccli.io.safe.atomic_output`: no links followed, one writer at a time)."""
    if fmt is OutputFormat.table:
        fmt = OutputFormat.csv
    try:
        with atomic_output(output, "w", encoding="utf-8", newline="") as fh:
            write_data(df, fmt, fh, as_wide=as_wide)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise DataError(
                f"{output}: cannot write ({exc.strerror or exc}): the disk (or a file-size "
                "limit) is full; free disk space or choose another -o"
            ) from None
        raise UsageError(
            f"{output}: cannot write ({exc.strerror or exc}); choose another -o"
        ) from None


def emit(
    df: Any,
    fmt: OutputFormat | None,
    *,
    as_wide: bool,
    output: Path | None = None,
    render_table: TableRenderer | None = None,
) -> None:
    """Write a result frame to stdout (or ``output``) in the chosen format; a table is
    drawn by ``render_table`` (default: the measure table)."""
    fmt = resolve_format(fmt, output)
    if output is not None and str(output) != "-":
        write_file(df, fmt, output, as_wide=as_wide)
        return
    if fmt is OutputFormat.table:
        (render_table or render_measure_table)(df, stdout_console())
    else:
        write_data(df, fmt, sys.stdout, as_wide=as_wide)
