"""All of nccli's rendering: what the commands print, write and draw.

Data goes to stdout (or ``-o``); notes, progress and errors go to stderr
(:mod:`~nccli.report.console`).  The library computes tidy frames and result objects; the
modules here only turn them into output:

=====================================  ===================================================
:mod:`~nccli.report.data`              CSV / TSV / JSON writers, ``wide``, cell formats,
                                       sparklines
:mod:`~nccli.report.output`            ``--format`` / ``-o``: table on a terminal, CSV
                                       when piped, files written atomically
:mod:`~nccli.report.console`           the stdout / stderr consoles (``NO_COLOR``), notes,
                                       progress bars, status spinners
:mod:`~nccli.report.measure_table`     the ``measure`` tables and cosine heatmaps
:mod:`~nccli.report.compare_table`     the ``compare`` tables and ``--fail-if`` lines
:mod:`~nccli.report.theory_table`      the ``measure --report theory`` panels
:mod:`~nccli.report.listing`           ``nccli info`` and ``nccli metrics``
:mod:`~nccli.report.plot`              ``compare --plot`` (matplotlib, optional)
=====================================  ===================================================

This package imports no command-line code, and the storage and numerics layers
(``nccli.io``, ``nccli.stats``, ``nccli.metrics``) never import it.  The writers and
renderers take the commands' :class:`~nccli.table.Rows` (or a DataFrame) and never import
pandas; only :mod:`~nccli.report.plot` works on DataFrames.  The data writers and the
measure table are re-exported here, imported on first use (so ``nccli.report.console`` and
``nccli info`` load neither the metric registry nor them); the other renderers are
imported from their modules (they pull in ``nccli.compare`` or matplotlib).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers
    from nccli.report.data import OutputFormat, fmt_value, sparkline, wide, write_data
    from nccli.report.measure_table import render_cosine_heatmaps, render_measure_table

_LAZY = {
    **dict.fromkeys(("OutputFormat", "fmt_value", "sparkline", "wide", "write_data"), "data"),
    **dict.fromkeys(("render_cosine_heatmaps", "render_measure_table"), "measure_table"),
}

__all__ = [
    "OutputFormat",
    "fmt_value",
    "render_cosine_heatmaps",
    "render_measure_table",
    "sparkline",
    "wide",
    "write_data",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"nccli.report.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nccli.report' has no attribute {name!r}")
