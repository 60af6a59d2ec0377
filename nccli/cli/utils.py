"""The "Utils" commands: ``metrics``."""

from __future__ import annotations

from nccli.cli.core import app
from nccli.metrics import METRICS
from nccli.report.console import stdout_console
from nccli.report.listing import render_metrics


@app.command("metrics", rich_help_panel="Utils")
def list_metrics() -> None:
    """List every metric name, its family and formula (docs/metrics.md)."""
    render_metrics(METRICS.values(), stdout_console(highlight=True))
