"""A PyTorch Lightning callback: neural collapse every few epochs, logged and recorded.

>>> from nccli.integrations.lightning import NCCallback            # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[NCCallback(every_n_epochs=5)])  # doctest: +SKIP

At the end of every ``every_n_epochs``-th training epoch (epochs counted from 1, so
``every_n_epochs=5`` observes after epochs 5, 10, …; the observation's ``epoch`` is
Lightning's ``current_epoch``, 0-based), :meth:`nccli.Tracker.observe` runs one eval-mode
pass over the chosen loader: ``"train"`` (``trainer.train_dataloader``: the loader Lightning
trains on, with its sampler and augmentation), ``"val"`` (the first of
``trainer.val_dataloaders``) or a callable ``fn(trainer, pl_module) -> loader``.  The metrics
of that observation are logged to every configured logger (``trainer.loggers``) as
``nc/<metric>/<layer>`` at ``trainer.global_step``, and the run file is written (default
``<trainer.log_dir>/nc.h5``) for ``nccli compare``.  Under DDP every rank observes its
shard, the statistics are merged and rank 0 logs and writes.

``lightning`` is an optional extra (``pip install nccli[lightning]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nccli.errors import UsageError

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "nccli.integrations.lightning needs PyTorch Lightning: pip install 'nccli[lightning]' "
        "(or pip install lightning)"
    ) from exc

__all__ = ["DEFAULT_METRICS", "NCCallback"]

#: logged by default: what needs no stored features
DEFAULT_METRICS = ("nc1", "nc2_etf_dist_means", "nc3")

LoaderChoice = str | Callable[[Any, Any], Any]


class NCCallback(pl.Callback):
    """Observe the model with :class:`nccli.Tracker` every ``every_n_epochs`` epochs.

    ``metrics``: the metric names logged (default :data:`DEFAULT_METRICS`; ``nc4``,
    ``acc`` and ``ncc_acc`` need ``store_features=True``).  ``path``: the run file
    (default ``<trainer.log_dir>/nc.h5``).  ``layers``, ``pool`` and the other keyword
    arguments go to :class:`nccli.Tracker`.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        loader: LoaderChoice = "train",
        metrics: Sequence[str] | str | None = None,
        path: str | os.PathLike[str] | None = None,
        layers: str | Sequence[str] = "auto",
        **tracker_kw: Any,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise UsageError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise UsageError(f"every_n_epochs must be a positive integer, got {every_n_epochs}")
        if not callable(loader) and loader not in ("train", "val"):
            raise UsageError(f"loader must be 'train', 'val' or a callable, got {loader!r}")
        self.every_n_epochs = every_n_epochs
        self.loader = loader
        self.metrics = list(DEFAULT_METRICS) if metrics is None else metrics
        self.path = None if path is None else Path(path)
        self.layers = layers
        self.tracker_kw = tracker_kw
        self.tracker: Any = None
        #: the values logged at each observation: ``{epoch: {name: value}}``
        self.logged: dict[int, dict[str, float]] = {}

    def _loader(self, trainer: Any, pl_module: Any) -> Any:
        if callable(self.loader):
            return self.loader(trainer, pl_module)
        if self.loader == "train":
            got = trainer.train_dataloader
            if got is None:
                raise UsageError("NCCallback(loader='train'): the trainer has no train_dataloader")
            if isinstance(got, (list, tuple, dict)):
                raise UsageError(
                    "NCCallback(loader='train'): the module trains on several loaders; pass "
                    "loader=fn with fn(trainer, pl_module) -> the loader to observe"
                )
            return got
        got = trainer.val_dataloaders
        if isinstance(got, (list, tuple)):
            got = got[0] if got else None
        if got is None:
            raise UsageError(
                "NCCallback(loader='val'): the trainer has no validation loader (the callback "
                "runs at the end of a training epoch; give the module a val_dataloader, or "
                "pass loader=callable)"
            )
        return got

    def _tracker(self, trainer: Any, pl_module: Any) -> Any:
        if self.tracker is None:
            from nccli.track import Tracker

            path = self.path
            if path is None:
                base = trainer.log_dir or trainer.default_root_dir
                path = Path(base) / "nc.h5"
            self.tracker = Tracker(pl_module, self.layers, path, **self.tracker_kw)
        return self.tracker

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        if (epoch + 1) % self.every_n_epochs:
            return
        tracker = self._tracker(trainer, pl_module)
        tracker.observe(self._loader(trainer, pl_module), epoch=epoch)
        if trainer.global_rank != 0:
            return
        rows = tracker.measure(metrics=self.metrics)
        values = {
            f"nc/{r.metric}/{r.layer}": float(r.value)
            for r in rows.itertuples()
            if r.metric != "classes" and not math.isnan(float(r.value))
        }
        self.logged[epoch] = values
        for logger in trainer.loggers:
            logger.log_metrics({**values, "epoch": epoch}, step=trainer.global_step)
