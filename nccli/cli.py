"""The ``nccli`` command line: thin Typer commands over the library.

Each command parses its options, calls one library function and renders the result.
Data goes to stdout; progress, notes and errors to stderr.  A user error
(:class:`~nccli.errors.NCError`) becomes one stderr line and exit code 1 (bad data) or 2
(bad usage); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nccli._version import __version__
from nccli.analyses import Loss, ReportKind
from nccli.compare import Across, By, RunFrom
from nccli.errors import DataError, NCError, UsageError
from nccli.report import OutputFormat

app = typer.Typer(
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


STATE = _State()


def stderr_console() -> Console:
    """Console for notes, progress and errors (never stdout)."""
    return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one stderr line and an exit code."""
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
    except MemoryError:
        if STATE.debug:
            raise
        typer.echo("nccli: error: out of memory; use smaller --chunk-rows", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if STATE.debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        typer.echo(f"nccli: error: {where}{exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nccli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show Python tracebacks for errors.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """nccli — Neural Collapse metrics from checkpoints, caches and feature files."""
    STATE.debug = debug
    STATE.quiet = quiet


def resolve_format(fmt: OutputFormat | None) -> OutputFormat:
    """``table`` on a terminal, ``csv`` when stdout is piped."""
    if fmt is not None:
        return fmt
    return OutputFormat.table if sys.stdout.isatty() else OutputFormat.csv


def emit(
    df, fmt: OutputFormat | None, *, as_wide: bool, output: Path | None = None, render_table=None
) -> None:  # noqa: ANN001
    """Write a result frame to stdout (or ``output``) in the chosen format."""
    from nccli.report import render_measure_table, write_data

    fmt = resolve_format(fmt)
    if output is not None and str(output) != "-":
        if fmt is OutputFormat.table:
            fmt = OutputFormat.csv
        tmp = output.with_name(output.name + ".partial")
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                write_data(df, fmt, fh, as_wide=as_wide)
            os.replace(tmp, output)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise DataError(
                    f"{output}: cannot write ({exc.strerror or exc}): the disk (or a file-size "
                    "limit) is full; free disk space or choose another -o"
                ) from None
            raise UsageError(
                f"{output}: cannot write ({exc.strerror or exc}); choose another -o"
            ) from None
        return
    if fmt is OutputFormat.table:
        console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
        (render_table or render_measure_table)(df, console)
    else:
        write_data(df, fmt, sys.stdout, as_wide=as_wide)


def print_notes(notes: list[str]) -> None:
    """Reasons for nan values, on stderr."""
    if STATE.quiet or not notes:
        return
    console = stderr_console()
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)


FormatOpt = Annotated[
    OutputFormat | None,
    typer.Option(
        "--format",
        "-f",
        help="table | csv | tsv | json (default: table on a terminal, csv when piped).",
    ),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="One column per metric instead of tidy rows.")
]
OutOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write data here instead of stdout.")
]
# options shared by measure and compare
LayerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        "-l",
        help="Layer name, glob, or role (penultimate, linear, classifier, head); repeatable or comma-separated.",
    ),
]
CenterOpt = Annotated[
    str, typer.Option("--center", help="global (sample-weighted μ_G) or classmean.")
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes",
        "-k",
        help="K for feature files without a classifier (default: max label + 1).",
    ),
]


@app.command(rich_help_panel="Analyse")
def measure(
    paths: Annotated[
        list[Path],
        typer.Argument(help="nccli caches, shard sets, directories, or .npz/.h5 feature files."),
    ],
    layer: LayerOpt = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            "-m",
            help="Comma-separated metric names or families nc1..nc4, geometry, deep, mse "
            "(default: all that apply to each layer).",
        ),
    ] = None,
    per_class: Annotated[
        bool,
        typer.Option(
            "--per-class", help="Add per-class rows: n_k, σ_k², ||μ_k||, ||w_k||, cosines."
        ),
    ] = False,
    center: CenterOpt = "global",
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute",
            help="Stream the cached features again instead of using stored statistics.",
        ),
    ] = False,
    num_classes: NumClassesOpt = None,
    chunk_rows: Annotated[
        int, typer.Option("--chunk-rows", help="Rows per chunk for streaming passes.", min=1)
    ] = 8192,
    fmt: FormatOpt = None,
    as_wide: WideOpt = False,
    output: OutOpt = None,
    loss: Annotated[
        Loss | None,
        typer.Option(
            "--loss",
            help="Training loss of the run (ce | mse): selects the theory that applies; "
            "mse adds the mse_* decomposition rows.",
            rich_help_panel="Training setup",
        ),
    ] = None,
    wd_features: Annotated[
        float | None,
        typer.Option(
            "--wd-features",
            help="Feature weight decay λ_H of the run (unconstrained-feature model).",
            rich_help_panel="Training setup",
            min=0.0,
        ),
    ] = None,
    wd_classifier: Annotated[
        float | None,
        typer.Option(
            "--wd-classifier",
            help="Classifier weight decay λ_W of the run (also the ridge λ of mse_*).",
            rich_help_panel="Training setup",
            min=0.0,
        ),
    ] = None,
    head_depth: Annotated[
        int | None,
        typer.Option(
            "--head-depth",
            help="Linear layers in the head incl. the classifier (default: the cached chain).",
            rich_help_panel="Training setup",
            min=1,
        ),
    ] = None,
    geometry: Annotated[
        bool,
        typer.Option(
            "--geometry",
            help="Add the cosine matrices of centred means and classifier rows "
            "(heatmaps in a table; rows with class, class2 in CSV/JSON).",
        ),
    ] = False,
    skip_nonfinite: Annotated[
        bool,
        typer.Option(
            "--skip-nonfinite",
            help="Drop feature-file rows with NaN/Inf (counted per class in a note) instead "
            "of failing.",
        ),
    ] = False,
    report: Annotated[
        ReportKind | None,
        typer.Option(
            "--report",
            help="theory: each seed paper's hypotheses and predictions checked on the input.",
        ),
    ] = None,
) -> None:
    """Neural Collapse metrics (NC1–NC4, CDNV, ETF geometry) for each input and layer."""
    from nccli.measure import measure as run_measure

    with user_errors():
        layers = [p.strip() for item in (layer or []) for p in item.split(",") if p.strip()]
        setup = {
            "loss": None if loss is None else loss.value,
            "wd_features": wd_features,
            "wd_classifier": wd_classifier,
            "head_depth": head_depth,
        }
        if report is ReportKind.theory:
            from nccli.theory import render_theory, theory_report

            df = theory_report(
                [str(p) for p in paths],
                center=center,
                recompute=recompute,
                num_classes=num_classes,
                chunk_rows=chunk_rows,
                **setup,
            )
            emit(df, fmt, as_wide=False, output=output, render_table=render_theory)
            return
        df = run_measure(
            [str(p) for p in paths],
            layers=layers or None,
            metrics=metrics,
            per_class=per_class,
            center=center,
            recompute=recompute,
            num_classes=num_classes,
            chunk_rows=chunk_rows,
            geometry=geometry,
            skip_nonfinite=skip_nonfinite,
            **setup,
        )
        emit(df, fmt, as_wide=as_wide, output=output)
        print_notes(df.attrs.get("notes", []))


@app.command(rich_help_panel="Analyse")
def compare(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Caches / feature files of several checkpoints (any order), or directories."
        ),
    ],
    across: Annotated[
        Across,
        typer.Option(
            "--across",
            "-a",
            help="[b]epochs[/b]: a row per checkpoint, sorted by epoch; [b]layers[/b]: a row "
            "per layer in depth order; [b]runs[/b]: each run's last checkpoint.",
        ),
    ] = Across.epochs,
    by: Annotated[
        By | None,
        typer.Option(
            "--by",
            help="[b]run[/b]: runs side by side, aligned on epoch, with delta_<metric> rows "
            "(run − baseline).",
        ),
    ] = None,
    layer: LayerOpt = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            "-m",
            help="Comma-separated metric names or families (default nc1,nc2_etf_dist_means,nc3,nc4; 'all').",
        ),
    ] = None,
    run_from: Annotated[
        RunFrom,
        typer.Option(
            "--run-from",
            help="Run names: auto = cache 'run' attribute, else directory when inputs span "
            "several, else file name minus epoch; dir; stem.",
        ),
    ] = RunFrom.auto,
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", help="Reference run for --by run deltas (default: first run)."),
    ] = None,
    fail_if: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-if",
            help="Exit 1 if any row crosses METRIC OP NUMBER, e.g. 'nc1>0.05' (OP: > >= < <= ==); "
            "checks every checkpoint and layer; repeatable.",
        ),
    ] = None,
    fail_if_last: Annotated[
        bool,
        typer.Option("--fail-if-last", help="Check --fail-if on each run's last checkpoint only."),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw metrics vs epoch (log scales) to this .png/.pdf/.svg (needs nccli\\[plot]).",
        ),
    ] = None,
    center: CenterOpt = "global",
    num_classes: NumClassesOpt = None,
    fmt: FormatOpt = None,
    as_wide: WideOpt = False,
    output: OutOpt = None,
) -> None:
    """Compare NC metrics across checkpoints, layers or runs; gate a pipeline with --fail-if.

    Rows are tidy like [b]measure[/b] (source,epoch,layer,metric,value), plus a [b]run[/b] column when there are several runs (or --by run / --across runs) and [b]step[/b] when checkpoints record one. The table shows, per metric, a log-scale sparkline trend and first→last.

    With --by run the deltas are extra rows whose metric is [b]delta_<metric>[/b] = this run − baseline at the same epoch and layer (--wide makes them columns).

    --fail-if checks every row of its metric (all checkpoints and selected layers; nan rows are skipped with a note; --fail-if-last: last checkpoint of each run only). The data is still written, then each crossing row is named on stderr and the exit code is 1. A malformed threshold or unknown metric exits 2.
    """
    from nccli.compare import compare as run_compare
    from nccli.compare import render_table

    with user_errors():
        if plot is not None:
            from nccli.plot import check_plot_path

            check_plot_path(plot)
        layers = [p.strip() for item in (layer or []) for p in item.split(",") if p.strip()]
        progress = None
        status = None
        err = stderr_console()
        if not STATE.quiet and err.is_terminal:
            status = err.status("measuring…")
            status.start()
            progress = lambda msg: status.update(f"measuring {msg}")  # noqa: E731
        try:
            result = run_compare(
                [str(p) for p in paths],
                across=across,
                by=by,
                layers=layers or None,
                metrics=metrics,
                run_of=run_from,
                baseline=baseline,
                fail_if=fail_if or (),
                fail_if_last=fail_if_last,
                center=center,
                num_classes=num_classes,
                progress=progress,
            )
        finally:
            if status is not None:
                status.stop()
        data = result.wide() if as_wide else result.data
        emit(
            data,
            fmt,
            as_wide=False,
            output=output,
            render_table=lambda _df, console: render_table(result, console),
        )
        print_notes(result.notes)
        if plot is not None:
            from nccli.plot import plot_compare

            plot_compare(result, plot)
            if not STATE.quiet:
                err.print(f"wrote {plot}")
        if result.violations:
            shown = result.violations[:20]
            for v in shown:
                typer.echo(f"nccli: fail-if: {v.describe(result.has_runs)}", err=True)
            if len(result.violations) > len(shown):
                typer.echo(
                    f"nccli: fail-if: … and {len(result.violations) - len(shown)} more rows",
                    err=True,
                )
            result.check(name_first=False)


class DeviceChoice(str, Enum):
    """Where ``extract`` runs the forward pass."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DistBackendChoice(str, Enum):
    """Process-group backend of a torchrun extraction."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class AmpChoice(str, Enum):
    """Mixed precision for the forward pass (CUDA only)."""

    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class DtypeChoice(str, Enum):
    """Storage dtype of cached features (statistics are always float64)."""

    float32 = "float32"
    float16 = "float16"


ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Built-in architecture, e.g. 'resnet18:num_classes=10' or "
        "'mlp:in_dim=784,widths=256-256,num_classes=10,head_depth=2'.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Import string 'pkg.module:factory' returning the nn.Module."),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        help="'auto' (penultimate feature + deep linear head + classifier) or module names / "
        "globs, comma-separated ('layer4,head.*'; add 'auto' to keep the head too).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow full unpickling of the checkpoint (can execute code: trusted files only).",
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split: train, test, ...")]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="Input normalisation: 'mean=a,b,c;std=d,e,f', a preset (cifar10, cifar100, "
        "mnist, imagenet) or 'auto'.",
    ),
]


def _command_line() -> str:
    import shlex

    return shlex.join(["nccli", *sys.argv[1:]])


@app.command(rich_help_panel="Extract")
def extract(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints: state dicts (.pt/.pth/.bin), safetensors, TorchScript, "
            "torch.export .pt2."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Dataset: data.npz, x.npy,y.npy, file.h5:/x,/y, a CIFAR/MNIST/image-folder "
            "directory, or pkg.module:factory.",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the caches (<checkpoint stem>.h5).")
    ],
    arch: ArchOpt = None,
    model: ModelOpt = None,
    layers: LayersOpt = "auto",
    device: Annotated[
        DeviceChoice, typer.Option("--device", help="auto = cuda, then mps, then cpu.")
    ] = DeviceChoice.auto,
    amp: Annotated[
        AmpChoice, typer.Option("--amp", help="Autocast the forward pass (CUDA only).")
    ] = AmpChoice.off,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Samples per forward pass.")
    ] = 256,
    dtype: Annotated[
        DtypeChoice,
        typer.Option("--dtype", help="Storage dtype of cached features; statistics are float64."),
    ] = DtypeChoice.float32,
    split: SplitOpt = "train",
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Use this many samples, evenly spaced."),
    ] = None,
    normalize: NormalizeOpt = None,
    num_workers: Annotated[
        int,
        typer.Option(
            "--num-workers",
            min=0,
            help="Load batches in a background thread, 2×N batches ahead (0: inline).",
        ),
    ] = 0,
    trust_checkpoint: TrustOpt = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted extraction from its .partial file."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo caches that are already finished.")
    ] = False,
    dist_backend: Annotated[
        DistBackendChoice,
        typer.Option(
            "--dist-backend",
            help="Under torchrun: process-group backend (auto = nccl on CUDA, gloo on CPU).",
            rich_help_panel="Distributed (torchrun)",
        ),
    ] = DistBackendChoice.auto,
    dist_timeout: Annotated[
        float,
        typer.Option(
            "--dist-timeout",
            min=0.1,
            help="Under torchrun: minutes a rank waits for the others before failing.",
            rich_help_panel="Distributed (torchrun)",
        ),
    ] = 30.0,
    skip_nonfinite: Annotated[
        bool,
        typer.Option(
            "--skip-nonfinite",
            help="Drop samples with NaN/Inf features or logits in any layer from every layer "
            "(counted per class: a note and the skipped_nonfinite attribute) instead of "
            "failing.",
        ),
    ] = False,
) -> None:
    """Run checkpoints over a dataset; cache features, logits and statistics (HDF5).

    Prints the cache paths on stdout; progress and notes go to stderr.  Under
    `torchrun --nproc-per-node G -m nccli extract ...` each rank writes a disjoint shard
    <stem>.rank<r>.h5; measure reads the shard set as one cache.
    """
    from nccli.extract import extract as run_extract

    with user_errors():
        paths = run_extract(
            [str(p) for p in checkpoints],
            data,
            arch=arch,
            model=model,
            out_dir=out_dir,
            layers=layers,
            device=device.value,
            amp=amp.value,
            batch_size=batch_size,
            feature_dtype=dtype.value,
            split=split,
            limit=limit,
            normalize=normalize,
            trust_checkpoint=trust_checkpoint,
            resume=resume,
            overwrite=overwrite,
            num_workers=num_workers,
            progress=not STATE.quiet,
            command=_command_line(),
            dist_backend=dist_backend.value,
            dist_timeout=dist_timeout,
            skip_nonfinite=skip_nonfinite,
        )
        for p in paths:
            typer.echo(str(p))


@app.command(rich_help_panel="Extract")
def info(
    path: Annotated[Path, typer.Argument(help="An nccli cache (.h5 / .partial) or a checkpoint.")],
    arch: ArchOpt = None,
    model: ModelOpt = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Dataset for the probe batch (else the model's input shape)."
        ),
    ] = None,
    split: SplitOpt = "train",
    normalize: NormalizeOpt = None,
    layers: LayersOpt = "auto",
    trust_checkpoint: TrustOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check a cache: statistics checksums, shapes, label range, class counts = "
            "label histogram; exit 1 naming the corrupt layer.",
        ),
    ] = False,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="With --verify: also recompute each layer's statistics from its features "
            "(must agree to 1e-8).",
        ),
    ] = False,
) -> None:
    """Show a cache's attributes and layer layout, or what `--layers` picks in a checkpoint."""
    import json

    from rich.table import Table

    from nccli.extract import describe_cache, describe_checkpoint
    from nccli.io.cache import is_cache

    with user_errors():
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if verify or deep:
            from nccli.io.cache import verify_cache

            for line in verify_cache(path, deep=deep):
                typer.echo(f"{path}: {line}")
            return
        if path.name.endswith(".partial") or is_cache(path):
            desc = describe_cache(path)
            head = dict(desc["attrs"])
            if not desc["complete"]:
                head = {"status": "unfinished (extract --resume continues it)", **head}
        else:
            desc = describe_checkpoint(
                path,
                arch=arch,
                model=model,
                data=data,
                split=split,
                normalize=normalize,
                layers=layers,
                trust_checkpoint=trust_checkpoint,
            )
            head = {k: v for k, v in desc.items() if k != "layers"}
        if as_json:
            typer.echo(json.dumps(desc, indent=2, default=str))
            return
        console = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
        attrs = Table(show_header=False, title=_info_cell(path), title_justify="left")
        attrs.add_column(style="bold")
        attrs.add_column(overflow="fold")
        for k, v in head.items():
            attrs.add_row(_info_cell(k), _info_cell(v))
        console.print(attrs)
        rows = desc["layers"]
        cols = [c for c in _INFO_COLUMNS if any(c in r for r in rows)]
        table = Table(header_style="bold")
        for c in cols:
            table.add_column(c)
        for row in rows:
            table.add_row(*(_info_cell(row.get(c)) for c in cols))
        console.print(table)


_INFO_COLUMNS = ("name", "module", "io", "depth", "role", "dim", "dtype", "weight", "bias", "stats")


def _info_cell(value: object) -> str:
    from rich.markup import escape

    if value is None:
        return ""
    if isinstance(value, list):
        return "x".join(map(str, value))
    return escape(str(value))


@app.command("metrics", rich_help_panel="Utils")
def list_metrics() -> None:
    """List every metric name, its family and formula (METRICS.md)."""
    from rich.table import Table

    from nccli.metrics import METRICS

    table = Table(header_style="bold")
    for col in ("metric", "family", "better", "formula"):
        table.add_column(col)
    for info in METRICS.values():
        table.add_row(
            info.name, info.family, "higher" if info.higher_is_better else "lower", info.formula
        )
    Console(no_color=bool(os.environ.get("NO_COLOR"))).print(table)


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """click's ``ClickException`` (the base of ``typer.BadParameter``, wherever typer gets
    click from) and ``typer.Abort``."""
    base = next(
        (c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
        typer.BadParameter,
    )
    return base, typer.Abort


def main() -> None:
    """Console-script entry point.

    A command-line mistake click catches (missing or unknown option, bad value) is one
    stderr line and exit 2, like the errors of the commands themselves.
    """
    ClickException, Abort = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `nccli`: the help, exit 2
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        msg = " ".join(exc.format_message().split()).rstrip(".")
        typer.echo(f"nccli: error: {msg}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Abort:
        typer.echo("nccli: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
