"""Issue 13, "never silently wrong", as a researcher meets it through the real CLI.

* a ``--fail-if`` gate whose metric is nan everywhere checked nothing: it fails (exit 1,
  one ``nccli: fail-if: … checked nothing`` line, even with ``-q``), the data still written;
* a features file whose labels start at 1 (or skip a class) with the number of classes
  inferred from the largest label is refused, naming the file and the likely cause;
  ``--num-classes`` (or a wider classifier) keeps measuring the stats as they are;
* ``extract`` on 1-based labels says the labels start at 1.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import runner, seeded_model, write_cluster_npz

from nccli.cli import app
from nccli.compare import compare
from nccli.errors import DataError, ThresholdExceeded
from nccli.extract import extract

K, N, D = 4, 120, 8
NC3_NOTHING = (
    "nccli: fail-if: nc3>0.01 checked nothing: nc3 has no finite value "
    "(no classifier weight for this layer)"
)


def _features(
    path: Path,
    epoch: int | None = None,
    *,
    weight: bool = False,
    shift: int = 0,
    labels: np.ndarray | None = None,
    weight_rows: int = K,
) -> Path:
    """Class-structured features; ``labels`` defaults to 0..K-1 (plus ``shift``)."""
    rng = np.random.default_rng(epoch or 0)
    y = np.repeat(np.arange(K), N // K) if labels is None else labels
    mu = np.random.default_rng(1).normal(size=(int(y.max()) + 1, D)) * 3
    arrays = {"features": (mu[y] + rng.normal(size=(len(y), D))).astype(np.float32)}
    arrays["labels"] = y + shift
    if weight:
        arrays["weight"] = np.random.default_rng(2).normal(size=(weight_rows, D))
    if epoch is not None:
        arrays["epoch"] = np.array(epoch)
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def no_weight_run(tmp_path) -> list[str]:
    """Two checkpoints of features with no classifier weight: nc3 is nan everywhere."""
    return [str(_features(tmp_path / f"run_ep{e:03d}.npz", e)) for e in (1, 2)]


def _csv(res) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(res.stdout))


# ------------------------------------------------------------- gates that check nothing
def test_fail_if_on_an_all_nan_metric_fails(no_weight_run):
    res = runner.invoke(app, ["compare", *no_weight_run, "-f", "csv", "--fail-if", "nc3>0.01"])
    assert res.exit_code == 1, res.stderr
    lines = res.stderr.splitlines()
    assert lines.count(NC3_NOTHING) == 1, res.stderr
    assert lines[-1] == "nccli: error: --fail-if nc3>0.01 checked nothing (no finite value)"
    assert "crosses" not in res.stderr
    # the data is still written as usual
    df = _csv(res)
    assert set(df["metric"]) >= {"nc1", "nc3"}
    assert df.loc[df["metric"] == "nc3", "value"].isna().all()
    assert df.loc[df["metric"] == "nc1", "value"].map(math.isfinite).all()


def test_fail_if_checked_nothing_is_not_hidden_by_quiet(no_weight_run, tmp_path):
    out = tmp_path / "result.csv"
    args = ["-q", "compare", *no_weight_run, "-f", "csv", "-o", str(out)]
    res = runner.invoke(app, [*args, "--fail-if", "nc3>0.01"])
    assert res.exit_code == 1
    assert NC3_NOTHING in res.stderr.splitlines()
    assert "note:" not in res.stderr
    assert len(pd.read_csv(out)) == 2 * 4  # 2 checkpoints x the 4 default metrics
    # only the last checkpoint checked: still nothing finite, still a failure
    last = runner.invoke(app, [*args, "--fail-if", "nc3>0.01", "--fail-if-last"])
    assert last.exit_code == 1 and NC3_NOTHING in last.stderr.splitlines()


def test_fail_if_checked_nothing_alongside_a_crossing(no_weight_run):
    res = runner.invoke(
        app,
        ["compare", *no_weight_run, "-f", "csv", "--fail-if", "nc1>0", "--fail-if", "nc3>0.01"],
    )
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert sum("crosses nc1>0" in ln for ln in lines) == 2
    assert NC3_NOTHING in lines
    assert lines[-1] == (
        "nccli: error: 2 of 2 checked rows crossed --fail-if (nc1>0); "
        "--fail-if nc3>0.01 checked nothing (no finite value)"
    )


def test_fail_if_checked_nothing_in_the_api(no_weight_run):
    res = compare(no_weight_run, metrics="nc1", fail_if=["nc3>0.01", "nc1>1e6"])
    assert not res.violations and not res.ok
    [u] = res.unchecked
    assert str(u.threshold) == "nc3>0.01" and u.reason == "no classifier weight for this layer"
    with pytest.raises(ThresholdExceeded, match=r"--fail-if nc3>0.01 checked nothing"):
        res.check()


def test_normal_fail_if_is_unchanged(tmp_path):
    paths = [str(_features(tmp_path / f"w_ep{e:03d}.npz", e, weight=True)) for e in (1, 2)]
    args = ["compare", *paths, "-f", "csv"]
    ok = runner.invoke(app, [*args, "--fail-if", "nc3>1e6", "--fail-if", "nc1>1e6"])
    assert ok.exit_code == 0, ok.stderr
    assert "checked nothing" not in ok.stderr and "fail-if" not in ok.stderr
    bad = runner.invoke(app, [*args, "--fail-if", "nc1>0"])
    assert bad.exit_code == 1
    assert "checked nothing" not in bad.stderr
    assert (
        bad.stderr.splitlines()[-1] == "nccli: error: 2 of 2 checked rows crossed --fail-if (nc1>0)"
    )
    # some nan rows, some finite: checked, with the note as before
    mixed = [paths[0], str(_features(tmp_path / "n_ep003.npz", 3))]
    res = runner.invoke(app, ["compare", *mixed, "-f", "csv", "--fail-if", "nc3>1e6"])
    assert res.exit_code == 0, res.stderr
    assert "note: --fail-if nc3>1e+06: 1 row(s) are nan and were not checked" in res.stderr
    assert "checked nothing" not in res.stderr


# ------------------------------------------------------------- labels starting at 1
def test_one_based_labels_are_refused(tmp_path):
    path = _features(tmp_path / "feats.npz", shift=1)  # labels 1..4
    expect = (
        f"nccli: error: {path}: class 0 has no samples but labels go up to 4 (5 classes "
        "inferred from the largest label); are the labels 1-based? subtract 1, or pass "
        "--num-classes if those classes are absent on purpose (they are then left out of "
        "every metric)"
    )
    for cmd in (["measure", str(path)], ["compare", str(path), "--fail-if", "nc1>1"]):
        res = runner.invoke(app, [*cmd, "-f", "csv"])
        assert res.exit_code == 1, (cmd, res.stdout)
        assert res.stderr.splitlines() == [expect], cmd
        assert res.stdout == ""


def test_a_gap_in_the_labels_is_refused(tmp_path):
    y = np.repeat([0, 1, 5, 6, 7, 8, 9, 10], 10)  # classes 2, 3, 4 empty
    path = _features(tmp_path / "gap.npz", labels=y)
    res = runner.invoke(app, ["measure", str(path), "-f", "csv"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f"nccli: error: {path}: 3 of 11 classes have no samples (2, 3, 4) but labels go up to "
        "10 (11 classes inferred from the largest label); renumber the labels 0..7 so that "
        "every class has samples, or pass --num-classes if those classes are absent on "
        "purpose (they are then left out of every metric)"
    ]
    many = _features(tmp_path / "many.npz", labels=np.repeat([0, 9], 10))
    res = runner.invoke(app, ["measure", str(many), "-f", "csv"])
    assert res.exit_code == 1
    assert "8 of 10 classes have no samples (1, 2, 3, 4, 5, …)" in res.stderr


# absent classes under --num-classes or a wider classifier: tests/test_measured_classes.py


# ------------------------------------------------------------- extract
ARCH = f"mlp:in_dim={D},widths=10-,num_classes=3,head_depth=2,head_width=8"


def _extract(tmp_path: Path, data: Path):
    import torch

    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": seeded_model(ARCH).state_dict()}, ckpt)
    return extract(
        [str(ckpt)],
        str(data),
        out_dir=tmp_path / "out",
        arch=ARCH,
        device="cpu",
        batch_size=32,
        progress=False,
    )


def test_extract_names_one_based_labels(tmp_path):
    data = write_cluster_npz(tmp_path / "d.npz", 30, D, 3, seed=0)
    with np.load(data) as f:
        x, y = f["x"], f["y"]
    np.savez(tmp_path / "one.npz", x=x, y=y + 1)  # labels 1..3 on a 3-logit model
    with pytest.raises(
        DataError,
        match=r"outputs 3 logits .*; its labels start at 1: are they "
        r"1-based\? the dataset is the likely culprit",
    ):
        _extract(tmp_path, tmp_path / "one.npz")
    np.savez(tmp_path / "zero.npz", x=x, y=y * 2)  # labels 0, 2, 4: not a 1-based mistake
    with pytest.raises(DataError, match=r"outputs 3 logits") as exc:
        _extract(tmp_path, tmp_path / "zero.npz")
    assert "start at 1" not in str(exc.value)
