"""The ``measure --report theory`` table: a panel per source, a section per seed paper
(claim, measured, expected, verdict), verdicts coloured."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

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


def render_theory(df: pd.DataFrame, console: Console) -> None:
    """One panel per source, a section per paper: claim, measured, expected, verdict."""
    if df.empty:
        console.print("[dim]no rows[/dim]")
        return
    for source, part in df.groupby("source", sort=False):
        table = Table(header_style="bold", show_lines=False, expand=False)
        for col in ("claim", "measured", "expected", "verdict"):
            table.add_column(col, overflow="fold")
        for paper, rows in part.groupby("paper", sort=False):
            table.add_section()
            table.add_row(f"[bold cyan]{paper}[/bold cyan]", "", "", "")
            for _, r in rows.iterrows():
                style = _STYLE.get(r["verdict"], "dim" if "not predicted" in r["verdict"] else "")
                verdict = f"[{style}]{r['verdict']}[/]" if style else r["verdict"]
                table.add_row("  " + r["claim"], r["measured"], r["expected"], verdict)
        console.print(Panel(table, title=f"theory check · {source}", title_align="left"))
