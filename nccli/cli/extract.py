"""The "Extract" commands: ``extract`` and ``info``."""

from __future__ import annotations

import contextlib
import importlib
import shlex
import sys
from collections.abc import Callable
from typing import Any

import typer

from nccli.choices import Amp, Device, DistBackend, FeatureDtype, Precision
from nccli.cli.core import (
    STATE,
    Command,
    DebugAfterOpt,
    QuietAfterOpt,
    app,
    refuse_flag_values,
    user_errors,
)
from nccli.cli.options import (
    AmpOpt,
    ArchOpt,
    BatchSizeOpt,
    CheckpointsArg,
    DataOpt,
    DeepOpt,
    DeviceOpt,
    DistBackendOpt,
    DistTimeoutOpt,
    DtypeOpt,
    EvalDataOpt,
    ExtractSkipNonfiniteOpt,
    InfoPathArg,
    JsonOpt,
    LayersOpt,
    LimitOpt,
    MaxMemoryOpt,
    MaxTokensOpt,
    ModelOpt,
    NormalizeOpt,
    NumWorkersOpt,
    OutDirOpt,
    OverwriteOpt,
    PoolOpt,
    PrecisionOpt,
    ProbeDataOpt,
    ResumeOpt,
    SeqLenOpt,
    SplitOpt,
    StateKeyOpt,
    StoreFeaturesOpt,
    TrustOpt,
    VerifyOpt,
)
from nccli.errors import DataError


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on the first call: building the app (``--help``,
    ``--version``) then loads neither torch nor h5py nor pandas."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


run_extract = _lazy("nccli.extract", "extract")
describe_checkpoint = _lazy("nccli.extract", "describe_checkpoint")
describe_cache = _lazy("nccli.io.cache", "describe")
is_cache = _lazy("nccli.io.cache", "is_cache")
verify_cache = _lazy("nccli.io.cache", "verify_cache")
stdout_console = _lazy("nccli.report.console", "stdout_console")
info_json = _lazy("nccli.report.listing", "info_json")
render_info = _lazy("nccli.report.listing", "render_info")


def _command_line() -> str:
    return shlex.join(["nccli", *sys.argv[1:]])


def _smaller(batch_size: int, num_workers: int) -> str:
    """What to try when extract runs out of memory."""
    hint = f"a smaller --batch-size (now {batch_size})"
    if num_workers:
        hint += f" or fewer --num-workers (now {num_workers}: 2×{num_workers} batches wait ahead)"
    return hint


def _lm_args(
    model: str | None,
    checkpoints: list[Any],
    state_key: str | None,
    store_features: bool,
    max_tokens: int | None,
    seq_len: int | None,
) -> dict[str, Any]:
    """``model``, ``state_key`` and ``lm`` for the library: the language-model options
    given (``--model hf``; refused for other models).  ``--model hf:CONFIG_DIR FILE...``:
    the files are weight files of the config in that folder (``lm['config']``); a
    language model's ``--state-key`` travels with its options."""
    lm = {"store_features": store_features, "max_tokens": max_tokens, "seq_len": seq_len}
    spec = (model or "").strip()
    if spec != "hf" and not spec.startswith("hf:"):
        return {"model": model, "state_key": state_key, "lm": lm}
    inline = spec[3:].strip()
    if inline and checkpoints:
        model, lm = "hf", {**lm, "config": inline}
    return {"model": model, "state_key": None, "lm": {**lm, "state_key": state_key}}


@app.command(cls=Command, rich_help_panel="Extract")
def extract(
    checkpoints: CheckpointsArg,
    data: DataOpt,
    out_dir: OutDirOpt,
    arch: ArchOpt = None,
    model: ModelOpt = None,
    state_key: StateKeyOpt = None,
    layers: LayersOpt = "auto",
    pool: PoolOpt = None,
    max_memory: MaxMemoryOpt = None,
    precision: PrecisionOpt = Precision.exact,
    device: DeviceOpt = Device.auto,
    amp: AmpOpt = Amp.off,
    batch_size: BatchSizeOpt = 256,
    dtype: DtypeOpt = FeatureDtype.float32,
    split: SplitOpt = "train",
    eval_data: EvalDataOpt = None,
    limit: LimitOpt = None,
    normalize: NormalizeOpt = None,
    num_workers: NumWorkersOpt = 0,
    trust_checkpoint: TrustOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    dist_backend: DistBackendOpt = DistBackend.auto,
    dist_timeout: DistTimeoutOpt = 30.0,
    skip_nonfinite: ExtractSkipNonfiniteOpt = False,
    store_features: StoreFeaturesOpt = False,
    max_tokens: MaxTokensOpt = None,
    seq_len: SeqLenOpt = None,
    quiet: QuietAfterOpt = False,
    debug: DebugAfterOpt = False,
) -> None:
    """Run checkpoints over a dataset; cache features, logits and statistics (HDF5).

    Prints the cache paths on stdout; progress and notes go to stderr.  Under
    `torchrun --nproc-per-node G -m nccli extract ...` each rank writes a disjoint shard
    <stem>.rank<r>.h5; measure reads the shard set as one cache.  What the model code
    itself prints goes to stderr.

    Examples: [b]nccli extract run/ep*.pt -d digits.npz --arch mlp:in_dim=64,widths=256-128,num_classes=10
    -o cache[/b], [b]nccli extract ckpt.pt -d cifar10/ --normalize cifar10 --model
    mypkg.nets:build -o cache --limit 5000[/b] and [b]nccli extract checkpoint/ckpt.pth -d
    cifar10/ --normalize cifar10 --model models/resnet.py:ResNet18:num_classes=10
    --state-key net -o cache[/b]; language models: [b]--model hf runs/checkpoint-* -d tokens.npy[/b]
    or [b]--model hf:run/config ckpt_*.pt[/b]
    """
    with user_errors("extract", [*checkpoints, data], reduce=_smaller(batch_size, num_workers)):
        refuse_flag_values(checkpoints)
        with contextlib.redirect_stdout(sys.stderr):  # the model's print(): not a cache path
            paths = run_extract(
                [str(p) for p in checkpoints],
                data,
                arch=arch,
                out_dir=out_dir,
                layers=layers,
                device=device.value,
                amp=amp.value,
                batch_size=batch_size,
                feature_dtype=dtype.value,
                split=split,
                eval_data=eval_data,
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
                pool=None if pool is None else pool.value,
                max_memory=max_memory,
                precision=precision.value,
                **_lm_args(model, checkpoints, state_key, store_features, max_tokens, seq_len),
            )
        for p in paths:
            typer.echo(str(p))


@app.command(cls=Command, rich_help_panel="Extract")
def info(
    path: InfoPathArg,
    arch: ArchOpt = None,
    model: ModelOpt = None,
    state_key: StateKeyOpt = None,
    data: ProbeDataOpt = None,
    split: SplitOpt = "train",
    normalize: NormalizeOpt = None,
    layers: LayersOpt = "auto",
    pool: PoolOpt = None,
    max_memory: MaxMemoryOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
    verify: VerifyOpt = False,
    deep: DeepOpt = False,
    quiet: QuietAfterOpt = False,
    debug: DebugAfterOpt = False,
) -> None:
    """Show a cache's attributes and layer layout, or what `--layers` picks in a checkpoint.

    Examples: [b]nccli info cache/ep0400.h5 --verify[/b] and
    [b]nccli info ckpt.pt --arch resnet18:num_classes=10 --json[/b]
    """
    with user_errors("info", [path]):
        refuse_flag_values([path])
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if verify or deep:
            for line in verify_cache(path, deep=deep):
                typer.echo(f"{path}: {line}")
            return
        if path.name.endswith(".partial") or is_cache(path):
            desc = describe_cache(path)
            head = dict(desc["attrs"])
            if not desc["complete"]:
                head = {"status": "unfinished (extract --resume continues it)", **head}
        else:
            with contextlib.redirect_stdout(sys.stderr):  # the model's print(): not data
                desc = describe_checkpoint(
                    path,
                    arch=arch,
                    model=model,
                    data=data,
                    split=split,
                    normalize=normalize,
                    layers=layers,
                    trust_checkpoint=trust_checkpoint,
                    state_key=state_key,
                    pool=None if pool is None else pool.value,
                    max_memory=max_memory,
                )
            head = {k: v for k, v in desc.items() if k not in ("layers", "plan")}
        if as_json:
            typer.echo(info_json(desc))
            return
        render_info(path, head, desc["layers"], stdout_console())
