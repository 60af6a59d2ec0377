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

The inputs' values are hashed as they are read (:class:`~nccli.io.datasets.base.InputsHash`,
in the loader): the partial records the digests of the rows read so far, the finished
cache their digest ``dataset_content_sha256``.  A finished cache is skipped only when that
digest still matches the data (hashed once per call, without the model); ``--resume``
re-hashes the rows a partial holds and refuses when they no longer match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from nccli.errors import CacheError, DataError, NCError, UsageError
from nccli.extract.capture import Capture, drop_rows, nonfinite_rows
from nccli.extract.devices import (
    AMP_DTYPES,
    FEATURE_DTYPES,
    device_label,
    input_dtype,
    stats_device,
)
from nccli.extract.discovery import Discovery, discover_layers, logits_of
from nccli.extract.pipeline import BackgroundWriter, Rows, prefetch, to_host
from nccli.extract.plan import check_plan, make_plan, memory_limit
from nccli.extract.pooling import check_pool
from nccli.extract.selection import head_only
from nccli.io._util import file_sha256, one_line
from nccli.io.cache import CacheWriter, existing_matches, partial_path, partial_resumable
from nccli.io.cache.state import inputs_record
from nccli.io.cache.writer import claim_output
from nccli.report.console import print_notes
from nccli.stats import PRECISIONS, ClassStats

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
    state_key: str | None = None  # --state-key: where in the checkpoint dict the weights are
    pool: str | None = None  # --pool for feature maps (None: avg, the default, noted)
    max_memory: str | int | float | None = None  # --max-memory (None: half the available)
    precision: str = "exact"  # --precision: the scatter's product (nccli.stats.ClassStats)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )


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
    epoch_from: str | None = None  # "checkpoint" | "name"
    step_from: str | None = None
    state_key: str | None = None  # the checkpoint dict's entry the weights came from


class Runner:
    """State shared by the checkpoints of one ``extract`` call."""

    def __init__(
        self, ds: Any, data: str, split: str, cfg: Settings, progress: Any, prefetch: int
    ) -> None:
        self.ds = ds
        self.prefetch = prefetch
        self.data = data
        self.split = split
        #: held-out splits (--eval-data): the training cache's name relative to this one
        self.reference: Callable[[Path], str] | None = None
        self.cfg = cfg
        self.progress = progress
        self.console = progress.console if progress is not None else None
        n_probe = min(len(ds), PROBE_SAMPLES)
        self.probe = next(iter(ds.iter_batches(n_probe)))[0]
        self.max_label = int(np.max(ds.labels)) if len(ds.labels) else -1
        self.label_counts = np.bincount(np.asarray(ds.labels, dtype=np.int64).reshape(-1))
        self._digests: dict[tuple[int, int], str] = {}  # inputs' digest per row range
        self._noted: set[str] = set()  # discovery notes are said once per call

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
            # a cache of another entry of the same file (the EMA, not the model) is not it
            **({"state_key": cfg.state_key.strip()} if cfg.state_key is not None else {}),
            # feature maps pooled otherwise are other features (head-only runs have none)
            **({"pool": _pool(cfg)} if not head_only(cfg.layers) else {}),
        }

    def inputs_digest(self, start: int, stop: int) -> str:
        """The digest of the inputs of rows ``start:stop``: from this call's extraction of
        them, else by reading them once (no model)."""
        key = (start, stop)
        if key not in self._digests:
            inputs = self.ds.hash_inputs(self.ds.inputs_hash(start, stop), stop)
            self._digests[key] = inputs.hexdigest()
        return self._digests[key]

    def _unchanged(self, out_path: Path, have: dict[str, Any], start: int, stop: int) -> bool:
        """Whether the finished cache was made from these very inputs (skip it); a note
        saying why it is extracted again when not."""
        stored = have.get("dataset_content_sha256")
        if stored is None:
            self.note(
                f"{out_path}: written by an nccli that did not record the inputs' values, so "
                f"whether {self.data} changed since cannot be told; extracting it again"
            )
            return False
        if stored != self.inputs_digest(start, stop):
            self.note(
                f"{out_path}: the inputs in {self.data} changed since this cache was "
                "extracted (same labels, other values); extracting it again"
            )
            return False
        self.note(f"{out_path}: already extracted, skipped (pass --overwrite to redo it)")
        return True

    # ------------------------------------------------------------------ per checkpoint
    def one(self, ckpt: Path, out_path: Path) -> Path:
        """Extract ``ckpt`` into ``out_path`` (or skip it when already done); the path."""
        cfg = self.cfg
        start, stop = row_range(len(self.ds), cfg.rank, cfg.world_size)
        if out_path.exists() and not cfg.overwrite and ckpt.is_file():
            want = {**self._want(file_sha256(ckpt)), "split": self.split}
            have = existing_matches(out_path, want)
            if have is not None and self._unchanged(out_path, have, start, stop):
                return out_path
        m = self._load(ckpt)
        # the planned statistics must fit before anything is allocated or created
        limit, how = memory_limit(cfg.max_memory, stats_device(cfg.device))
        check_plan(
            make_plan(m.disc, stop - start, cfg.batch_size, cfg.feature_dtype),
            limit,
            how,
            str(ckpt),
        )
        # this process owns the cache (and its partial) from here on: a second nccli
        # writing it, or a link planted at either name, is refused before anything is read
        with claim_output(out_path):
            return self._write(m, out_path, start, stop, ckpt)

    def _write(self, m: _Model, out_path: Path, start: int, stop: int, ckpt: Path) -> Path:
        """Open (resume or start) the claimed cache and stream the rows into it."""
        writer, stats, inputs = self._open(out_path, m, start, stop, str(ckpt))
        tmp = partial_path(out_path)
        try:
            return self._stream(m, writer, stats, str(ckpt), inputs)
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
            state_key=cfg.state_key,
        )
        for text in loaded.notes:  # what was inferred from the weights (num_classes)
            self.note(text)
        module = eval_mode(loaded.module.to(cfg.device))
        x_dtype = input_dtype(module)
        src = str(ckpt)
        probe = self.probe.to(cfg.device, x_dtype)
        disc = discover_layers(module, probe, cfg.layers, pool=cfg.pool, source=src)
        for text in disc.notes:
            if text not in self._noted:
                self._noted.add(text)
                self.note(text)
        K = disc.num_logits
        if K != self.ds.num_classes and self.max_label + 1 > K:
            one = int(np.min(self.ds.labels)) == 1  # labels 1..K on a K-logit model
            raise DataError(
                f"{self.data}: has labels up to {self.max_label} but the model {src} outputs "
                f"{K} logits (classes 0..{K - 1}); "
                + ("its labels start at 1: are they 1-based? " if one else "")
                + "the dataset is the likely culprit: check "
                "its labels and that --data and --split are the data this model was trained "
                "on (or, if the model really has more classes, num_classes in --arch/--model)"
            )
        self._note_absent_classes(K)
        return _Model(
            module,
            x_dtype,
            disc,
            loaded.sha256,
            loaded.format,
            loaded.arch,
            loaded.epoch,
            loaded.step,
            loaded.epoch_from,
            loaded.step_from,
            loaded.state_key,
        )

    def _note_absent_classes(self, K: int) -> None:
        """One note when the model has classes the data have no sample of (a classifier
        wider than the labels): measure leaves them out (nccli.classes)."""
        absent = np.setdiff1d(np.arange(K), np.flatnonzero(self.label_counts[:K]))
        text = (
            f"{self.data}: the model has {K} classes and the data have no sample of "
            f"{absent.size} of them ("
            + ", ".join(str(int(k)) for k in absent[:5])
            + (", ..." if absent.size > 5 else "")
            + f"); measure leaves them out and uses the other {K - absent.size}"
        )
        if absent.size and text not in self._noted:
            self._noted.add(text)
            self.note(text)

    def _attrs(self, ckpt: Path, m: _Model, start: int, inputs: Any) -> dict[str, Any]:
        """The root attributes recorded with the cache (``inputs``: the fresh hash)."""
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
            "reference_cache": None if self.reference is None else self.reference(ckpt),
            "arch": m.arch or f"<{m.format} module>",
            "state_key": m.state_key,
            "epoch": m.epoch,
            "step": m.step,
            "epoch_from": m.epoch_from,
            "step_from": m.step_from,
            "torch_version": str(torch.__version__),
            "device": device_label(cfg.device),
            "amp": cfg.amp,
            "pool": _pool(cfg),
            "command": cfg.command,
            "classifier": m.disc.classifier,
            "head_depth": m.disc.head_depth if m.disc.head else None,
            "batch_size": cfg.batch_size,
            "stats_precision": cfg.precision,
            "row_start": start,
            **shard_attrs(cfg, len(self.ds)),
            "dataset_block_rows": inputs.block,
            "dataset_hashed_rows": inputs.rows,
            "dataset_block_sha256": inputs.blocks(),
        }

    def _resumed_inputs(self, tmp: Path, attrs: dict[str, Any], start: int, stop: int) -> Any:
        """The inputs' hash at the partial's last row, once the rows it holds are checked
        against the data (read again, no model); a CacheError when they no longer match
        or cannot be checked (the partial is left as it is)."""
        rows = int(attrs.get("rows_read", attrs.get("rows_done", 0)))
        inputs = self.ds.inputs_hash(start, stop)
        rec = inputs_record(attrs)
        if rec is None or rec[1] != rows:
            if rows == 0:
                return inputs
            raise CacheError(
                f"{tmp}: cannot resume: the partial has no record of its inputs' values "
                f"(written by an older nccli), so its {rows} rows cannot be checked against "
                f"{self.data}; delete the partial or run without --resume"
            )
        self.ds.hash_inputs(inputs, start + rows)
        if rec[0] != inputs.block or not np.array_equal(rec[2], inputs.blocks()):
            raise CacheError(
                f"{tmp}: cannot resume: the {rows} rows already in the partial no longer "
                f"match {self.data} (its inputs changed since they were extracted); delete "
                "the partial or run without --resume"
            )
        return inputs

    def _open(
        self, out_path: Path, m: _Model, start: int, stop: int, src: str
    ) -> tuple[CacheWriter, dict[str, ClassStats], Any]:
        """A writer on a resumed partial (with the statistics of its rows) or a fresh one,
        and the inputs' hash positioned at its first row still to read."""
        cfg = self.cfg
        tmp = partial_path(out_path)
        names = [c.name for c in m.disc.layers]
        found = (
            partial_resumable(tmp, self._want(m.sha256), names)
            if cfg.resume and tmp.exists()
            else None
        )
        resuming = found is not None
        if tmp.exists() and not resuming:
            self.note(f"{tmp}: starting over (an unfinished cache was there)")
        inputs = self._resumed_inputs(tmp, found, start, stop) if found is not None else None

        def open_writer(resume: bool) -> CacheWriter:
            return CacheWriter(
                out_path,
                m.disc.layers,
                stop - start,
                m.disc.num_logits,
                attrs=self._attrs(Path(src), m, start, self.ds.inputs_hash(start, stop)),
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
                return writer, stats, inputs
            except (OSError, KeyError, ValueError, CacheError, DataError) as exc:
                if writer is not None:
                    writer.close()
                self.note(f"{tmp}: cannot resume ({one_line(exc, 120)}); starting over")
        writer = open_writer(False)  # a writer that fails to set up removes what it made
        try:
            fresh = self.ds.inputs_hash(start, stop)
            return writer, self._restore_stats(writer, m.disc, src), fresh
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
            c.name: ClassStats(
                K, c.dim, device=sdev, source=f"{src}:{c.name}", precision=self.cfg.precision
            )
            for c in disc.layers
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
        inputs: Any,
    ) -> Path:
        """Every remaining row of ``inputs.start:inputs.stop`` through the model, the
        inputs hashed as they are read; the finished path."""
        cfg = self.cfg
        cuda = cfg.device.type == "cuda"
        start, stop = inputs.start, inputs.stop
        done, read = writer.rows_done, writer.rows_read  # read > done: rows were dropped
        skipped = writer.skipped_nonfinite
        if cfg.skip_nonfinite and skipped is None:
            skipped = np.zeros(m.disc.num_logits, dtype=np.int64)
        N = stop - start
        task = None
        if self.progress is not None:
            task = self.progress.add_task(escape(Path(src).name), total=N, completed=read)

        def prepare(batch: Any) -> Any:
            x, y, idx, hashed = batch
            x = x.to(dtype=m.x_dtype)
            return (x.pin_memory() if cuda else x), y, idx, hashed

        cap = Capture(m.module, m.disc.layers, src)
        bg = BackgroundWriter(writer)
        row = done
        try:
            batches = _hashed(self.ds, inputs, start + read, cfg.batch_size)
            for x, y, idx, hashed in prefetch(batches, self.prefetch, prepare):
                item = self._forward(m, cap, stats, x, y, idx, src, skipped)
                read += int(len(idx))
                item.start, item.rows_read = row, read if skipped is not None else None
                item.inputs = (inputs.block, *hashed)  # recorded with the rows, in one flush
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
        return self._finish(writer, stats, src, inputs, skipped)

    def _finish(
        self,
        writer: CacheWriter,
        stats: dict[str, ClassStats],
        src: str,
        inputs: Any,
        skipped: np.ndarray | None,
    ) -> Path:
        """Statistics and the inputs' digest into the cache, marked complete."""
        digest = inputs.hexdigest()
        self._digests[(inputs.start, inputs.stop)] = digest
        # a shard is published only once every rank has finished (nccli.extract.distributed)
        path = writer.finalize(
            stats,
            {"dataset_content_sha256": digest},
            publish=self.cfg.world_size <= 1,
        )
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


def _pool(cfg: Settings) -> str:
    """The ``--pool`` asked for (what feature maps get; each layer records what it got)."""
    return check_pool(cfg.pool)


def _rows_done(writer: CacheWriter) -> int:
    try:
        return writer.rows_done
    except Exception:  # noqa: BLE001 - a closed or broken file holds nothing resumable
        return 0


def _hashed(ds: Any, inputs: Any, start: int, batch_size: int) -> Iterator[tuple[Any, ...]]:
    """The batches of positions ``start:inputs.stop``, each with ``(rows, blocks)``: the
    digests of the inputs read up to and including it (taken in the loader, as it is read)."""
    for x, y, idx in ds.iter_batches(batch_size, start, inputs.stop, inputs=inputs):
        yield x, y, idx, (inputs.rows, inputs.blocks())
