"""The ``measure --report theory`` table: a panel per source, a section per seed paper
(claim, measured, expected, verdict), verdicts coloured."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from nccli.table import Rows

_STYLE = {
    "holds": "green",
    "agrees": "green",
    "consistent": "bold green",
    "fails": "red",
    "disagrees": "red",
    "inconsistent": "bold red",
    "unknown": "yellow",
    "undetermined": "bold yellow",
    "not applicable": "dim",
    "info": "dim",
}


def render_theory(df: Any, console: Console) -> None:
    """One panel per source, a section per paper: claim, measured, expected, verdict
    (``df``: the :class:`~nccli.table.Rows` of the report, or its DataFrame)."""
    df = df if isinstance(df, Rows) else Rows.from_frame(df)
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    for (source,), part in df.groupby(["source"]):
        table = Table(header_style="bold", show_lines=False, expand=False)
        for col in ("claim", "measured", "expected", "verdict"):
            table.add_column(col, overflow="fold")
        for (paper,), rows in part.groupby(["paper"]):
            table.add_section()
            table.add_row(f"[bold cyan]{paper}[/bold cyan]", "", "", "")
            for r in rows.records():
                style = _STYLE.get(r["verdict"], "dim" if "not predicted" in r["verdict"] else "")
                verdict = f"[{style}]{r['verdict']}[/]" if style else r["verdict"]
                table.add_row("  " + r["claim"], r["measured"], r["expected"], verdict)
        console.print(Panel(table, title=f"theory check · {source}", title_align="left"))
