"""``NCCallback``: a tiny Lightning run logs the run file's values through a CSV logger."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import runner
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from nccli.cli import app  # noqa: E402
from nccli.errors import UsageError  # noqa: E402
from nccli.integrations.lightning import NCCallback  # noqa: E402

K, D, N = 3, 5, 60


class TinyMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 12), nn.ReLU(), nn.Linear(12, K))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    x = torch.randn(K, D, generator=g)[y] * 2 + torch.randn(N, D, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_callback_logs_what_compare_reads(tmp_path):
    torch.manual_seed(0)
    logger = pl.loggers.CSVLogger(tmp_path, name="lt")
    cb = NCCallback(every_n_epochs=1, loader="train")
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _data())
    run = tmp_path / "lt" / "version_0" / "nc.h5"
    assert cb.tracker.path == run and run.exists()
    assert model.training  # Lightning's own mode, as the callback found it
    csv = pd.read_csv(tmp_path / "lt" / "version_0" / "metrics.csv")
    res = runner.invoke(app, ["compare", str(run), "-f", "csv", "-m", "nc1,nc2_etf_dist_means,nc3"])
    assert res.exit_code == 0, res.output
    ref = pd.read_csv(io.StringIO(res.stdout))
    assert sorted(set(ref["epoch"])) == [0, 1]
    frame = cb.tracker.frame(metrics="nc1,nc2_etf_dist_means,nc3")
    assert np.allclose(frame["value"], ref["value"], rtol=1e-12)
    checked = 0
    for r in ref.itertuples():
        name = f"nc/{r.metric}/{r.layer}"
        logged = csv.loc[csv["epoch"] == r.epoch, name].dropna()
        assert len(logged) == 1, (name, r.epoch)
        assert logged.iloc[0] == pytest.approx(r.value, rel=1e-12)
        assert cb.logged[r.epoch][name] == pytest.approx(r.value, rel=1e-15)
        checked += 1
    assert checked == 2 * 3  # two epochs, three metrics of the one head layer


def test_callback_options_are_checked():
    with pytest.raises(UsageError, match="every_n_epochs"):
        NCCallback(every_n_epochs=0)
    with pytest.raises(UsageError, match="loader"):
        NCCallback(loader="test")
