"""The "Analyse" commands: ``measure`` and ``compare``.

The library and the renderers are imported inside the commands: building the app (and
``--help``, ``--version``) costs neither pandas nor the metric kernels.
"""

from __future__ import annotations

import typer

from nccli.choices import Across, Precision, ReportKind, RunFrom
from nccli.cli.core import (
    STATE,
    Command,
    DebugAfterOpt,
    QuietAfterOpt,
    app,
    refuse_flag_values,
    split_list,
    user_errors,
)
from nccli.cli.options import (
    AcrossOpt,
    BaselineOpt,
    ByOpt,
    CenterOpt,
    ChunkRowsOpt,
    CompareMetricsOpt,
    ComparePathsArg,
    FailIfLastOpt,
    FailIfOpt,
    FitOpt,
    FormatOpt,
    GeometryOpt,
    HeadDepthOpt,
    LayerOpt,
    LossOpt,
    MeasureMaxMemoryOpt,
    MeasureMetricsOpt,
    MeasurePathsArg,
    MeasureSkipNonfiniteOpt,
    MinClassCountOpt,
    NumClassesOpt,
    OodOpt,
    OutOpt,
    PerClassOpt,
    PlotOpt,
    PrecisionOpt,
    RecomputeOpt,
    ReportOpt,
    RunFromOpt,
    WdClassifierOpt,
    WdFeaturesOpt,
    WideOpt,
)


def _fewer(option: str | None, num_classes: int | None) -> str | None:
    """What to try when memory runs out: a smaller ``option`` and, when given, a smaller
    ``--num-classes`` (the per-class statistics grow with it)."""
    given = [
        o for o in (option, f"--num-classes (now {num_classes})" if num_classes else None) if o
    ]
    return f"a smaller {' or '.join(given)}" if given else None


@app.command(cls=Command, rich_help_panel="Analyse")
def measure(
    paths: MeasurePathsArg,
    layer: LayerOpt = None,
    metrics: MeasureMetricsOpt = None,
    per_class: PerClassOpt = False,
    center: CenterOpt = "global",
    recompute: RecomputeOpt = False,
    precision: PrecisionOpt = Precision.exact,
    max_memory: MeasureMaxMemoryOpt = None,
    num_classes: NumClassesOpt = None,
    min_class_count: MinClassCountOpt = 1,
    ood: OodOpt = None,
    chunk_rows: ChunkRowsOpt = 8192,
    fmt: FormatOpt = None,
    as_wide: WideOpt = False,
    output: OutOpt = None,
    loss: LossOpt = None,
    wd_features: WdFeaturesOpt = None,
    wd_classifier: WdClassifierOpt = None,
    head_depth: HeadDepthOpt = None,
    geometry: GeometryOpt = False,
    skip_nonfinite: MeasureSkipNonfiniteOpt = False,
    report: ReportOpt = None,
    quiet: QuietAfterOpt = False,
    debug: DebugAfterOpt = False,
) -> None:
    """Neural Collapse metrics (NC1–NC4, CDNV, ETF geometry) for each input and layer.

    Examples: [b]nccli measure cache/ep0400.h5 -l penultimate -m nc1,nc3[/b] and
    [b]nccli measure feats.npz --wide -o nc.json[/b] (the format follows the suffix).
    """
    with user_errors(
        "measure", paths, reduce=_fewer(f"--chunk-rows (now {chunk_rows})", num_classes)
    ):
        refuse_flag_values(paths)
        from nccli.report.console import print_notes
        from nccli.report.output import emit

        inputs = [str(p) for p in paths]
        setup = {
            "loss": None if loss is None else loss.value,
            "wd_features": wd_features,
            "wd_classifier": wd_classifier,
            "head_depth": head_depth,
        }
        common = {
            "center": center,
            "recompute": recompute,
            "num_classes": num_classes,
            "min_class_count": min_class_count,
            "chunk_rows": chunk_rows,
            **setup,
        }
        if report is ReportKind.theory:
            from nccli.report.theory_table import render_theory
            from nccli.theory import theory_table

            df = theory_table(inputs, **common)
            emit(df, fmt, as_wide=False, output=output, render_table=render_theory)
            print_notes(df.attrs.get("notes", []), STATE.quiet)
            return
        from nccli.measure import measure_table

        df = measure_table(
            inputs,
            layers=split_list(layer) or None,
            metrics=metrics,
            per_class=per_class,
            geometry=geometry,
            skip_nonfinite=skip_nonfinite,
            precision=precision.value,
            max_memory=max_memory,
            ood=None if ood is None else str(ood),
            **common,
        )
        emit(df, fmt, as_wide=as_wide, output=output)
        print_notes(df.attrs.get("notes", []), STATE.quiet)


@app.command(cls=Command, rich_help_panel="Analyse")
def compare(
    paths: ComparePathsArg,
    across: AcrossOpt = Across.epochs,
    by: ByOpt = None,
    layer: LayerOpt = None,
    metrics: CompareMetricsOpt = None,
    run_from: RunFromOpt = RunFrom.auto,
    baseline: BaselineOpt = None,
    fail_if: FailIfOpt = None,
    fail_if_last: FailIfLastOpt = False,
    fit: FitOpt = None,
    plot: PlotOpt = None,
    center: CenterOpt = "global",
    num_classes: NumClassesOpt = None,
    min_class_count: MinClassCountOpt = 1,
    fmt: FormatOpt = None,
    as_wide: WideOpt = False,
    output: OutOpt = None,
    quiet: QuietAfterOpt = False,
    debug: DebugAfterOpt = False,
) -> None:
    """Compare NC metrics across checkpoints, layers or runs; gate a pipeline with --fail-if.

    Rows are tidy like [b]measure[/b] (source,epoch,layer,metric,value), plus a [b]run[/b] column when there are several runs (or --by run / --across runs) and [b]step[/b] when checkpoints record one. The table shows, per metric, a log-scale sparkline trend and first→last.

    With --by run the deltas are extra rows whose metric is [b]delta_<metric>[/b] = this run − baseline at the same epoch and layer (--wide makes them columns).

    --fail-if checks every row of its metric (all checkpoints and selected layers; nan rows are skipped with a note; --fail-if-last: last checkpoint of each run only). The data is still written, then each crossing row is named on stderr and the exit code is 1. A malformed threshold or unknown metric exits 2.

    Examples: [b]nccli compare cache/run1 --plot nc.png[/b] and
    [b]nccli compare cache/run1 cache/run2 --by run --fail-if 'nc1>0.05' --fail-if-last[/b]
    """
    with user_errors("compare", paths, reduce=_fewer(None, num_classes)):
        refuse_flag_values(paths)
        from nccli.compare import compare as run_compare
        from nccli.report.compare_table import render_compare, violation_lines
        from nccli.report.console import print_notes, status_spinner, stderr_console
        from nccli.report.output import emit

        if plot is not None:
            from nccli.report.plot import check_plot_path, plot_compare

            check_plot_path(plot)
        with status_spinner(not STATE.quiet) as progress:
            result = run_compare(
                [str(p) for p in paths],
                across=across,
                by=by,
                layers=split_list(layer) or None,
                metrics=metrics,
                run_of=run_from,
                baseline=baseline,
                fail_if=fail_if or (),
                fail_if_last=fail_if_last,
                center=center,
                num_classes=num_classes,
                min_class_count=min_class_count,
                fit=None if fit is None else fit.value,
                progress=progress,
            )
        data = result.wide_rows() if as_wide else result.rows
        emit(
            data,
            fmt,
            as_wide=False,
            output=output,
            render_table=lambda _df, console: render_compare(result, console),
        )
        print_notes(result.notes, STATE.quiet)
        if plot is not None:
            plot_compare(result, plot)
            if not STATE.quiet:
                stderr_console().print(f"wrote {plot}")
        for line in violation_lines(result):
            typer.echo(line, err=True)
        result.check(name_first=False)
