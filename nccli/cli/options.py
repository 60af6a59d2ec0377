"""The commands' arguments and options, as ``Annotated`` types (one definition each).

A command's signature is then one line per option, ``name: SomeOpt = default``.  The
choice enums are the library's own (:mod:`nccli.choices`, re-exported by
:mod:`nccli.extract.devices`, :mod:`nccli.analyses`, :mod:`nccli.compare`,
:mod:`nccli.report`), so the command line and the Python API accept the same values; they
import without torch or pandas, so building the app costs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nccli._version import __version__
from nccli.choices import (
    Across,
    Amp,
    By,
    Device,
    DistBackend,
    FeatureDtype,
    Fit,
    Loss,
    OutputFormat,
    Pool,
    Precision,
    ReportKind,
    RunFrom,
)

SETUP_PANEL = "Training setup"
#: ``--num-classes`` at most: above every single-label benchmark (ImageNet-21k: 21,841);
#: measure keeps several K×d float64 arrays, so a typo (``-k 10000000000``) must not
#: reach an allocation of terabytes
MAX_CLASSES = 10**6
#: ``--batch-size`` at most (2^24): a typo must not become one giant forward pass
MAX_BATCH = 2**24
#: ``--dist-timeout`` at most, in minutes (a week; Python's timedelta overflows far above)
MAX_DIST_TIMEOUT = 7 * 24 * 60.0
DIST_PANEL = "Distributed (torchrun)"


#: a boolean option's metavar: none (typer would show ``<bool>``, as if it took a value)
FLAG = ""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nccli {__version__}")
        raise typer.Exit()


# ------------------------------------------------------------------------ root
DebugOpt = Annotated[
    bool, typer.Option("--debug", metavar=FLAG, help="Show Python tracebacks for errors.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", metavar=FLAG, help="No progress or notes on stderr.")
]
VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version", metavar=FLAG, callback=_version, is_eager=True, help="Print the version."
    ),
]

# ---------------------------------------------------------------- data output
FormatOpt = Annotated[
    OutputFormat | None,
    typer.Option(
        "--format",
        "-f",
        help="table | csv | tsv | json (default: table on a terminal, csv when piped).",
    ),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", metavar=FLAG, help="One column per metric instead of tidy rows.")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write data here instead of stdout (without --format: .json, .tsv, else CSV).",
    ),
]

# ------------------------------------------------- shared by measure and compare
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
OodOpt = Annotated[
    Path | None,
    typer.Option(
        "--ood",
        metavar="CACHE",
        help="A cache (or features file) of out-of-distribution inputs through the same "
        "model: adds nc5 = mean_k |cos(μ_k, μ_G^ood)| per layer.",
    ),
]
MinClassCountOpt = Annotated[
    int,
    typer.Option(
        "--min-class-count",
        help="Leave classes with fewer samples out of every metric (a note counts them; "
        "classes without samples are always left out).",
        min=1,
    ),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes",
        "-k",
        help="K for feature files without a classifier (default: max label + 1).",
        min=1,
        max=MAX_CLASSES,
    ),
]

# --------------------------------------------------------------------- measure
MeasurePathsArg = Annotated[
    list[Path],
    typer.Argument(help="nccli caches, shard sets, directories, or .npz/.h5 feature files."),
]
MeasureMetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        "-m",
        help="Comma-separated metric names (`nccli metrics`) or families: classes, nc1..nc4, "
        "heldout, geometry, deep, mse, variants, ood, all (default: all that apply to each "
        "layer).",
    ),
]
PerClassOpt = Annotated[
    bool,
    typer.Option(
        "--per-class",
        metavar=FLAG,
        help="Add per-class rows: n_k, σ_k², ||μ_k||, ||w_k||, cosines.",
    ),
]
RecomputeOpt = Annotated[
    bool,
    typer.Option(
        "--recompute",
        metavar=FLAG,
        help="Stream the cached features again instead of using stored statistics.",
    ),
]
ChunkRowsOpt = Annotated[
    int, typer.Option("--chunk-rows", help="Rows per chunk for streaming passes.", min=1)
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        case_sensitive=False,
        help="Arithmetic of the within-class scatter's product (extract, measure "
        "--recompute): exact (float64) or fast (rows centred in float64, multiplied in "
        "float32 blocks: nc1 to a few 1e-7 relative, see docs/metrics.md).",
    ),
]
MeasureMaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Features that fit in SIZE are kept in memory after the statistics pass for "
        "the nc4/acc pass (one read); larger ones are read twice: 8G, 512M, 2GiB, bytes, or "
        "'none' (no limit; default: 1/16 of the memory, at most 1 GiB).",
    ),
]
LossOpt = Annotated[
    Loss | None,
    typer.Option(
        "--loss",
        help="Training loss of the run (ce | mse): selects the theory that applies; "
        "mse adds the mse_* decomposition rows.",
        rich_help_panel=SETUP_PANEL,
    ),
]
WdFeaturesOpt = Annotated[
    float | None,
    typer.Option(
        "--wd-features",
        help="Feature weight decay λ_H of the run (unconstrained-feature model).",
        rich_help_panel=SETUP_PANEL,
        min=0.0,
    ),
]
WdClassifierOpt = Annotated[
    float | None,
    typer.Option(
        "--wd-classifier",
        help="Classifier weight decay λ_W of the run (also the ridge λ of mse_*).",
        rich_help_panel=SETUP_PANEL,
        min=0.0,
    ),
]
HeadDepthOpt = Annotated[
    int | None,
    typer.Option(
        "--head-depth",
        help="Linear layers in the head incl. the classifier (default: the cached chain).",
        rich_help_panel=SETUP_PANEL,
        min=1,
    ),
]
GeometryOpt = Annotated[
    bool,
    typer.Option(
        "--geometry",
        metavar=FLAG,
        help="Add the cosine matrices of centred means and classifier rows "
        "(heatmaps in a table; rows with class, class2 in CSV/JSON).",
    ),
]
MeasureSkipNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--skip-nonfinite",
        metavar=FLAG,
        help="Drop feature-file rows with NaN/Inf (counted per class in a note) instead "
        "of failing.",
    ),
]
ReportOpt = Annotated[
    ReportKind | None,
    typer.Option(
        "--report",
        help="theory: each seed paper's hypotheses and predictions checked on the input.",
    ),
]

# --------------------------------------------------------------------- compare
ComparePathsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Caches / feature files of several checkpoints (any order), or directories."
    ),
]
AcrossOpt = Annotated[
    Across,
    typer.Option(
        "--across",
        "-a",
        help="[b]epochs[/b]: a row per checkpoint, sorted by epoch; [b]layers[/b]: a row "
        "per layer in depth order; [b]runs[/b]: each run's last checkpoint.",
    ),
]


FitOpt = Annotated[
    Fit | None,
    typer.Option(
        "--fit",
        help="[b]depth[/b] (with --across layers): fit log(metric) = a + s·layer per "
        "checkpoint; rows <metric>_depth_slope, _ratio (= e^s per layer) and _r2.",
    ),
]
ByOpt = Annotated[
    By | None,
    typer.Option(
        "--by",
        help="[b]run[/b]: runs side by side, aligned on epoch, with delta_<metric> rows "
        "(run − baseline); [b]split[/b]: train beside the held-out splits of each checkpoint "
        "(delta = split − train: the generalisation gap).",
    ),
]
CompareMetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        "-m",
        help="Comma-separated metric names or families (default nc1,nc2_etf_dist_means,nc3,nc4; 'all').",
    ),
]
RunFromOpt = Annotated[
    RunFrom,
    typer.Option(
        "--run-from",
        help="Run names: auto = cache 'run' attribute, else directory when inputs span "
        "several, else file name minus epoch; dir; stem.",
    ),
]
BaselineOpt = Annotated[
    str | None,
    typer.Option("--baseline", help="Reference run for --by run deltas (default: first run)."),
]
FailIfOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-if",
        help="Exit 1 if any row crosses METRIC OP NUMBER, e.g. 'nc1>0.05' (OP: > >= < <= ==); "
        "checks every checkpoint and layer; repeatable.",
    ),
]
FailIfLastOpt = Annotated[
    bool,
    typer.Option(
        "--fail-if-last", metavar=FLAG, help="Check --fail-if on each run's last checkpoint only."
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also draw metrics vs epoch (log scales) to this .png/.pdf/.svg (needs nccli\\[plot]).",
    ),
]

# ------------------------------------------------------- shared by extract and info
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
    typer.Option(
        "--model",
        help="Callable returning the nn.Module: 'pkg.module:factory' or a file "
        "'path/to/file.py:Class', optionally with arguments as for --arch, e.g. "
        "'models/resnet.py:ResNet18:num_classes=10'; a required num_classes or input size "
        "left out is read from the checkpoint. 'hf': the checkpoints are Hugging Face "
        "causal-LM folders (next-token NC over the vocabulary; needs nccli[transformers]); "
        "'hf:CONFIG_DIR': they are weight files (state dicts, safetensors) of the causal LM "
        "whose config.json is in CONFIG_DIR.",
    ),
]
StateKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--state-key",
        metavar="KEY",
        help="Where the weights are in a checkpoint dict, dotted: 'model_state', "
        "'ema.model', 'state_dict.ema' (default: found automatically; several candidates "
        "are refused).",
    ),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        help="'auto' (penultimate feature + deep linear head + classifier), 'blocks' (the "
        "model's top-level stages in executed order + the head), or module names / globs, "
        "comma-separated ('layer4,head.*'; '*' stays within one level, '**' crosses levels; "
        "'layer1.0.relu#2' is a module's 2nd call; add 'auto' to keep the head too).",
    ),
]
PoolOpt = Annotated[
    Pool | None,
    typer.Option(
        "--pool",
        help="How a selected module's feature map (B, C, H, W, ...) becomes one vector per "
        "sample: avg (global average over the spatial dims; the default), max, or flatten "
        "(all C·H·W values; also the only choice for a (B, X, Y) output).",
        show_default=False,
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Refuse, before any pass, layers whose statistics (d×d float64 scatter, class "
        "means, per-batch update) would need more: 8G, 512M, 2GiB, bytes, or 'none' "
        "(default: half the available memory).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        metavar=FLAG,
        help="Allow what can execute code: full unpickling, TorchScript and torch.export "
        "(.pt2) programs (trusted files only).",
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split: train, test, ...")]
EvalDataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--eval-data",
        metavar="NAME=DATA",
        help="A held-out split to extract too (repeatable): 'test=test.npz' writes "
        "<out>/test/<stem>.h5 per checkpoint, which measure and compare put beside the "
        "training cache (nc4/ncc_acc against the training class means; compare --by split).",
    ),
]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="Input preprocessing, required for image data (uint8, or values in 0..255): "
        "'none' (uint8: x/255 only), a preset (cifar10, cifar10-0.2023, cifar100, "
        "cifar100-0.2009, mnist, imagenet; applied after x/255), 'mean=a,b,c;std=d,e,f' or "
        "'auto' (statistics of the data, shown in a note).",
    ),
]

# --------------------------------------------------------------------- extract
CheckpointsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Checkpoints: state dicts (.pt/.pth/.bin), safetensors, TorchScript, "
        "torch.export .pt2."
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Dataset: data.npz, x.npy,y.npy, file.h5:/x,/y, a CIFAR/MNIST/image-folder "
        "directory, or pkg.module:factory.",
    ),
]
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Directory for the caches (<checkpoint stem>.h5).")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda, then mps, then cpu.")]
AmpOpt = Annotated[Amp, typer.Option("--amp", help="Autocast the forward pass (CUDA only).")]
BatchSizeOpt = Annotated[
    int,
    typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH, help="Samples per forward pass."),
]
DtypeOpt = Annotated[
    FeatureDtype,
    typer.Option("--dtype", help="Storage dtype of cached features; statistics are float64."),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", min=1, help="Use this many samples, evenly spaced."),
]
NumWorkersOpt = Annotated[
    int,
    typer.Option(
        "--num-workers",
        min=0,
        help="Load batches in a background thread, 2×N batches ahead (0: inline).",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume", metavar=FLAG, help="Continue an interrupted extraction from its .partial file."
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", metavar=FLAG, help="Redo caches that are already finished.")
]
DistBackendOpt = Annotated[
    DistBackend,
    typer.Option(
        "--dist-backend",
        help="Under torchrun: process-group backend (auto = nccl on CUDA, gloo on CPU).",
        rich_help_panel=DIST_PANEL,
    ),
]
DistTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--dist-timeout",
        min=0.1,
        max=MAX_DIST_TIMEOUT,
        help="Under torchrun: minutes a rank waits for the others before failing.",
        rich_help_panel=DIST_PANEL,
    ),
]
ExtractSkipNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--skip-nonfinite",
        metavar=FLAG,
        help="Drop samples with NaN/Inf features or logits in any layer from every layer "
        "(counted per class: a note and the skipped_nonfinite attribute) instead of "
        "failing.",
    ),
]

StoreFeaturesOpt = Annotated[
    bool,
    typer.Option(
        "--store-features",
        metavar=FLAG,
        help="Language models (--model hf): also cache every token's features (N×d; by "
        "default only the statistics and the LM head: nc4/acc/ncc_acc, which stream the "
        "features again, are then unavailable).",
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        min=1,
        help="Language models: use the first N next-token samples (positions), in order.",
    ),
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        "--seq-len",
        min=2,
        help="Language models: cut a text file (or a 1-D array of token ids) into "
        "sequences of this many tokens; required for text.",
    ),
]

# ------------------------------------------------------------------------ info
InfoPathArg = Annotated[
    Path, typer.Argument(help="An nccli cache (.h5 / .partial) or a checkpoint.")
]
ProbeDataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d", help="Dataset for the probe batch (else the model's input shape)."
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", metavar=FLAG, help="Print JSON instead of tables.")
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        metavar=FLAG,
        help="Check a cache: statistics checksums, shapes, label range, class counts = "
        "label histogram; exit 1 naming the corrupt layer.",
    ),
]
DeepOpt = Annotated[
    bool,
    typer.Option(
        "--deep",
        metavar=FLAG,
        help="With --verify: also recompute each layer's statistics from its features "
        "(must agree to 1e-8).",
    ),
]
