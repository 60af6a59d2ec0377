"""One checkpoint through the dataset: skip, resume or start, stream, finalise.

:class:`Runner` holds what the checkpoints of one ``extract`` call share (the open
dataset, its probe batch, the settings, the progress bar).  :meth:`Runner.one` loads a
checkpoint, discovers its layers and streams the dataset through it under
``torch.inference_mode()`` (``torch.autocast`` with ``amp`` on CUDA).  Features are cast to
the storage dtype *before* they are folded into :class:`~nccli.stats.ClassStats` (on the
GPU when there is one), so the statistics in the cache equal the statistics recomputed
from the cached features.  Rows go to ``<out>/<stem>.h5.partial`` through the background
writer; a killed run leaves a consistent partial that ``resume`` continues from
``rows_read``; the file is renamed to ``<stem>.h5`` only when complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from nccli.errors import CacheError, DataError, NCError
from nccli.extract.capture import Capture, drop_rows, nonfinite_rows
from nccli.extract.devices import (
    AMP_DTYPES,
    FEATURE_DTYPES,
    device_label,
    input_dtype,
    stats_device,
)
from nccli.extract.discovery import Discovery, discover_layers, logits_of
from nccli.extract.pipeline import BackgroundWriter, Rows, iter_rows, prefetch, to_host
from nccli.io._util import file_sha256, one_line
from nccli.io.cache import CacheWriter, existing_matches, partial_path, partial_resumable
from nccli.report.console import print_notes
from nccli.stats import ClassStats

__all__ = ["PROBE_SAMPLES", "Runner", "Settings", "eval_mode", "row_range"]

#: samples in the discovery probe batch
PROBE_SAMPLES = 8


@dataclass
class Settings:
    """What one ``extract`` call was asked to do (validated by :mod:`nccli.extract.api`)."""

    device: torch.device
    amp: str
    batch_size: int
    feature_dtype: str
    layers: str | Sequence[str]
    arch: str | None
    model: str | None
    trust_checkpoint: bool
    resume: bool
    overwrite: bool
    command: str
    notes: bool
    rank: int = 0  # distributed extraction (nccli.extract.distributed): this rank's shard
    world_size: int = 1
    skip_nonfinite: bool = False  # drop samples with NaN/Inf in any layer, from every layer


def eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``; graphs from ``torch.export`` refuse train/eval switching (they are
    captured in inference mode already), so that refusal is not an error here."""
    with contextlib.suppress(NotImplementedError):
        module.eval()
    return module


def row_range(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """The contiguous, disjoint slice of ``n`` rows that ``rank`` of ``world_size`` takes
    (no padding duplicates: they would bias the statistics)."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def shard_attrs(cfg: Settings, n: int) -> dict[str, int]:
    """Root attributes of a distributed shard (none for a single-process run)."""
    if cfg.world_size <= 1:
        return {}
    start, stop = row_range(n, cfg.rank, cfg.world_size)
    return {
        "rank": cfg.rank,
        "world_size": cfg.world_size,
        "row_start": start,
        "row_stop": stop,
        "total_samples": n,
    }


@dataclass
class _Model:
    """A loaded checkpoint, on its device, with its discovered layers."""

    module: nn.Module
    x_dtype: torch.dtype
    disc: Discovery
    sha256: str
    format: str
    arch: str | None
    epoch: int | None
    step: int | None


class Runner:
    """State shared by the checkpoints of one ``extract`` call."""

    def __init__(
        self, ds: Any, data: str, split: str, cfg: Settings, progress: Any, prefetch: int
    ) -> None:
        self.ds = ds
        self.prefetch = prefetch
        self.data = data
        self.split = split
        self.cfg = cfg
        self.progress = progress
        self.console = progress.console if progress is not None else None
        n_probe = min(len(ds), PROBE_SAMPLES)
        self.probe = next(iter(ds.iter_batches(n_probe)))[0]
        self.max_label = int(np.max(ds.labels)) if len(ds.labels) else -1

    def note(self, text: str) -> None:
        """One note on stderr (unless notes are off)."""
        if self.console is not None:
            print_notes([text], quiet=not self.cfg.notes, console=self.console, escape_text=True)

    def _want(self, sha: str) -> dict[str, Any]:
        """Root attributes a cache of this run must carry to be skipped or resumed."""
        cfg = self.cfg
        return {
            "checkpoint_sha256": sha,
            "dataset_digest": self.ds.digest(),
            "feature_dtype": cfg.feature_dtype,
            **shard_attrs(cfg, len(self.ds)),
        }

    # ------------------------------------------------------------------ per checkpoint
    def one(self, ckpt: Path, out_path: Path) -> Path:
        """Extract ``ckpt`` into ``out_path`` (or skip it when already done); the path."""
        cfg = self.cfg
        if out_path.exists() and not cfg.overwrite and ckpt.is_file():
            want = {**self._want(file_sha256(ckpt)), "split": self.split}
            if existing_matches(out_path, want):
                self.note(f"{out_path}: already extracted, skipped (pass --overwrite to redo it)")
                return out_path
        m = self._load(ckpt)
        start, stop = row_range(len(self.ds), cfg.rank, cfg.world_size)
        writer, stats = self._open(out_path, m, start, stop, str(ckpt))
        tmp = partial_path(out_path)
        try:
            return self._stream(m, writer, stats, str(ckpt), start, stop)
        except BaseException as exc:
            rows = _rows_done(writer)
            if not isinstance(exc, NCError) and getattr(writer, "h5", None) is not None and rows:
                writer.close()
                hint = f"{tmp}: kept {rows} rows; continue with --resume"
                if isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt(hint) from exc  # the CLI prints it on one line
                self.note(hint)
            else:
                writer.abort()
            raise

    def _load(self, ckpt: Path) -> _Model:
        from nccli.io.checkpoints import load_model

        cfg = self.cfg
        loaded = load_model(
            ckpt,
            arch=cfg.arch,
            model=cfg.model,
            trust_checkpoint=cfg.trust_checkpoint,
            map_location="cpu",
        )
        module = eval_mode(loaded.module.to(cfg.device))
        x_dtype = input_dtype(module)
        src = str(ckpt)
        disc = discover_layers(module, self.probe.to(cfg.device, x_dtype), cfg.layers, source=src)
        K = disc.num_logits
        if K != self.ds.num_classes and self.max_label + 1 > K:
            raise DataError(
                f"{src}: the model outputs {K} logits but {self.data} has labels up to "
                f"{self.max_label} ({self.ds.num_classes} classes); check num_classes in "
                "--arch/--model or the dataset"
            )
        return _Model(
            module,
            x_dtype,
            disc,
            loaded.sha256,
            loaded.format,
            loaded.arch,
            loaded.epoch,
            loaded.step,
        )

    def _attrs(self, ckpt: Path, m: _Model, start: int) -> dict[str, Any]:
        """The root attributes recorded with the cache."""
        cfg = self.cfg
        return {
            "checkpoint": str(ckpt.resolve()),
            "checkpoint_sha256": m.sha256,
            "checkpoint_format": m.format,
            "dataset": self.data,
            "dataset_digest": self.ds.digest(),
            "dataset_description": self.ds.describe(),
            "normalization": getattr(self.ds, "normalization", None),
            "split": self.split,
            "arch": m.arch or f"<{m.format} module>",
            "epoch": m.epoch,
            "step": m.step,
            "torch_version": str(torch.__version__),
            "device": device_label(cfg.device),
            "amp": cfg.amp,
            "command": cfg.command,
            "classifier": m.disc.classifier,
            "head_depth": m.disc.head_depth if m.disc.head else None,
            "batch_size": cfg.batch_size,
            "row_start": start,
            **shard_attrs(cfg, len(self.ds)),
        }

    def _open(
        self, out_path: Path, m: _Model, start: int, stop: int, src: str
    ) -> tuple[CacheWriter, dict[str, ClassStats]]:
        """A writer on a resumed partial (with the statistics of its rows) or a fresh one."""
        cfg = self.cfg
        tmp = partial_path(out_path)
        names = [c.name for c in m.disc.layers]
        resuming = (
            cfg.resume and tmp.exists() and partial_resumable(tmp, self._want(m.sha256), names)
        )
        if tmp.exists() and not resuming:
            self.note(f"{tmp}: starting over (an unfinished cache was there)")

        def open_writer(resume: bool) -> CacheWriter:
            return CacheWriter(
                out_path,
                m.disc.layers,
                stop - start,
                m.disc.num_logits,
                attrs=self._attrs(Path(src), m, start),
                feature_dtype=cfg.feature_dtype,
                logits=True,
                resume=resume,
            )

        if resuming:
            writer = None
            try:
                writer = open_writer(True)
                stats = self._restore_stats(writer, m.disc, src)
                self.note(f"{tmp}: resuming at row {writer.rows_done} of {stop - start}")
                return writer, stats
            except (OSError, KeyError, ValueError, CacheError, DataError) as exc:
                if writer is not None:
                    writer.close()
                self.note(f"{tmp}: cannot resume ({one_line(exc, 120)}); starting over")
        try:
            writer = open_writer(False)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a fresh file that failed to set up is garbage
            raise
        try:
            return writer, self._restore_stats(writer, m.disc, src)
        except BaseException:
            writer.abort()
            raise

    def _restore_stats(
        self, writer: CacheWriter, disc: Discovery, src: str
    ) -> dict[str, ClassStats]:
        """Fresh statistics, or those of the rows a resumed partial already holds (folded in
        the same batches an uninterrupted run would use)."""
        sdev = stats_device(self.cfg.device)
        K = disc.num_logits
        stats = {
            c.name: ClassStats(K, c.dim, device=sdev, source=f"{src}:{c.name}") for c in disc.layers
        }
        done = writer.rows_done
        B = self.cfg.batch_size
        for lo in range(0, done, B):
            labels, feats = writer.read_rows(lo, min(lo + B, done))
            y = torch.from_numpy(labels).to(sdev)
            for c in disc.layers:
                stats[c.name].update(torch.from_numpy(feats[c.name]).to(sdev), y)
        return stats

    # ------------------------------------------------------------------ streaming
    def _stream(
        self,
        m: _Model,
        writer: CacheWriter,
        stats: dict[str, ClassStats],
        src: str,
        start: int,
        stop: int,
    ) -> Path:
        """Every remaining row of ``start:stop`` through the model; the finished path."""
        cfg = self.cfg
        cuda = cfg.device.type == "cuda"
        done, read = writer.rows_done, writer.rows_read  # read > done: rows were dropped
        skipped = writer.skipped_nonfinite
        if cfg.skip_nonfinite and skipped is None:
            skipped = np.zeros(m.disc.num_logits, dtype=np.int64)
        N = stop - start
        task = None
        if self.progress is not None:
            task = self.progress.add_task(escape(Path(src).name), total=N, completed=read)

        def prepare(batch: Any) -> Any:
            x, y, idx = batch
            x = x.to(dtype=m.x_dtype)
            return (x.pin_memory() if cuda else x), y, idx

        cap = Capture(m.module, m.disc.layers, src)
        bg = BackgroundWriter(writer)
        row = done
        try:
            batches = iter_rows(self.ds, start + read, stop, cfg.batch_size)
            for x, y, idx in prefetch(batches, self.prefetch, prepare):
                item = self._forward(m, cap, stats, x, y, idx, src, skipped)
                read += int(len(idx))
                item.start, item.rows_read = row, read if skipped is not None else None
                bg.submit(item)
                row += len(item.indices)
                if task is not None:
                    self.progress.update(task, advance=int(len(idx)))
        except BaseException:
            cap.remove()
            with contextlib.suppress(Exception):
                bg.close()  # queued rows are whole batches: keep them for --resume
            raise
        cap.remove()
        bg.close()
        if read != N:
            raise DataError(
                f"{src}: the dataset yielded {read} of {N} rows; was {self.data} changed while "
                "extracting?"
            )
        if task is not None:
            self.progress.update(task, visible=False)
        # a shard is published only once every rank has finished (nccli.extract.distributed)
        path = writer.finalize(stats, publish=cfg.world_size <= 1)
        if skipped is not None and skipped.any():
            per_class = ", ".join(f"class {k}: {int(n)}" for k, n in enumerate(skipped) if n)
            self.note(
                f"{src}: skipped {int(skipped.sum())} samples with NaN/Inf features or logits "
                f"(--skip-nonfinite; {per_class}); every layer's statistics exclude them"
            )
        return path

    def _forward(
        self,
        m: _Model,
        cap: Capture,
        stats: dict[str, ClassStats],
        x: torch.Tensor,
        y: torch.Tensor,
        idx: Any,
        src: str,
        skipped: np.ndarray | None,
    ) -> Rows:
        """One batch: forward, capture, non-finite policy, statistics; the rows to write
        (``start`` and ``rows_read`` are filled in by the caller)."""
        cfg = self.cfg
        dev, cuda = cfg.device, cfg.device.type == "cuda"
        sdev = stats_device(dev)
        K = m.disc.num_logits
        B = int(len(idx))
        store = FEATURE_DTYPES[cfg.feature_dtype]
        amp_dtype = AMP_DTYPES[cfg.amp]
        xd = x.to(dev, non_blocking=True)
        yd = y.to(sdev, non_blocking=True)
        autocast = (
            torch.autocast(device_type="cuda", dtype=amp_dtype)
            if cuda and amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = m.module(xd)
            raw = cap.take(B)
            logits = logits_of(out, src)
            if logits.shape != (B, K):
                raise DataError(
                    f"{src}: the model gave logits of shape {tuple(logits.shape)}, "
                    f"expected ({B}, {K})"
                )
            logits = logits.float()
            feats = {k: v.to(store) for k, v in raw.items()}
            keep = nonfinite_rows(
                src, feats, raw, logits, idx, cfg.feature_dtype, cfg.skip_nonfinite
            )
            if keep is not None and skipped is not None:
                feats, logits, yd, y, idx = drop_rows(
                    keep, feats, logits, yd, y, np.asarray(idx), skipped
                )
            for name, h in feats.items():
                stats[name].update(h if h.device == sdev else h.to(sdev), yd)
            host, host_logits, ready = to_host(feats, logits, cuda)
        return Rows(
            0,
            y.numpy(),
            np.asarray(idx),
            host,
            host_logits,
            ready,
            skipped=None if skipped is None else skipped.copy(),
        )


def _rows_done(writer: CacheWriter) -> int:
    try:
        return writer.rows_done
    except Exception:  # noqa: BLE001 - a closed or broken file holds nothing resumable
        return 0
