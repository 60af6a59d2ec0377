"""The "Utils" commands: ``metrics``."""

from __future__ import annotations

from nccli.choices import OutputFormat
from nccli.cli.core import Command, DebugAfterOpt, QuietAfterOpt, app, user_errors
from nccli.cli.options import FormatOpt


@app.command("metrics", cls=Command, rich_help_panel="Utils")
def list_metrics(
    fmt: FormatOpt = None,
    quiet: QuietAfterOpt = False,
    debug: DebugAfterOpt = False,
) -> None:
    """List every metric name, its family and formula (docs/metrics.md).

    The table is the default even when piped (as before); -f csv|tsv|json gives the
    columns metric,family,better,formula.

    Examples: [b]nccli metrics[/b] and [b]nccli metrics -f csv | grep nc1[/b]
    """
    with user_errors("metrics"):
        from nccli.metrics import METRICS
        from nccli.report.console import stdout_console
        from nccli.report.listing import metrics_frame, render_metrics
        from nccli.report.output import emit

        emit(
            metrics_frame(METRICS.values()),
            fmt or OutputFormat.table,
            as_wide=False,
            render_table=lambda _df, _console: render_metrics(
                METRICS.values(), stdout_console(highlight=True)
            ),
        )
