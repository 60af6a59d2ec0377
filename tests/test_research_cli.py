"""The command line's smaller research-workflow items (issue 13, point 9): ``-o`` infers
the format from its suffix, flags look and act like flags, ``-q``/``--debug`` after the
command, examples in every ``--help``, ``metrics --format``, a model's ``print()`` kept
off stdout, and an HDF5 root ``epoch`` attribute."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import python_m_nccli, runner, save_state_dict, write_cluster_npz

from nccli.cli import app
from nccli.errors import DataError

N, D, K = 40, 6, 4
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"


@pytest.fixture
def feats(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    labels = np.arange(N) % K
    features = rng.normal(size=(K, D))[labels] * 3 + rng.normal(size=(N, D))
    np.savez(tmp_path / "feats_ep003.npz", features=features, labels=labels)
    return tmp_path / "feats_ep003.npz"


def _measure(*args: str):
    return runner.invoke(app, ["measure", *map(str, args), "-m", "nc1,nc3"])


def test_output_suffix_picks_the_format(tmp_path, feats):
    res = _measure(feats, "-o", tmp_path / "out.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out.json").read_text())
    assert {r["metric"] for r in rows} == {"nc1", "nc3"}
    assert _measure(feats, "-o", tmp_path / "out.tsv").exit_code == 0
    assert (tmp_path / "out.tsv").read_text().splitlines()[0].split("\t")[:2] == [
        "source",
        "epoch",
    ]
    for name in ("out.txt", "OUT.CSV"):
        assert _measure(feats, "-o", tmp_path / name).exit_code == 0
        assert (tmp_path / name).read_text().startswith("source,epoch,")
    # an explicit --format wins over the suffix
    assert _measure(feats, "-f", "csv", "-o", tmp_path / "x.json").exit_code == 0
    assert (tmp_path / "x.json").read_text().startswith("source,epoch,")


@pytest.mark.parametrize("command", ["measure", "compare", "extract", "info", "metrics"])
def test_boolean_options_show_as_flags(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout  # --help included
    root = runner.invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "<bool>" not in root.stdout
    if command != "metrics":
        assert "Examples:" in res.stdout


def test_help_of_metrics_has_an_example():
    res = runner.invoke(app, ["metrics", "--help"])
    assert res.exit_code == 0 and "Examples:" in res.stdout


@pytest.mark.parametrize("command", ["measure", "compare"])
def test_a_value_given_to_a_flag_is_named(tmp_path, feats, command):
    res = runner.invoke(app, [command, str(feats), "--wide", "true"])
    assert res.exit_code == 2
    assert "no such file true (flags take no value" in res.output
    assert "--wide" in res.output


def test_quiet_and_debug_after_the_command(tmp_path, feats):
    res = runner.invoke(app, ["measure", str(feats), "-m", "nc1", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    # --debug after the command: the traceback (here, the exception itself) instead of a line
    missing = tmp_path / "missing.npz"
    res = runner.invoke(app, ["measure", str(missing), "--debug"])
    assert isinstance(res.exception, DataError)
    res = runner.invoke(app, ["measure", str(missing)])
    assert res.exit_code == 1 and "nccli: error:" in res.stderr
    # before the command, as before
    res = runner.invoke(app, ["-q", "measure", str(feats), "-m", "nc1"])
    assert res.exit_code == 0 and res.stderr == ""


def test_metrics_format():
    res = runner.invoke(app, ["metrics", "-f", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert set(rows[0]) == {"metric", "family", "better", "formula"}
    assert rows[0]["metric"] == "classes" and rows[0]["better"] == "-"  # a count
    assert rows[1]["metric"] == "nc1" and rows[1]["better"] == "lower"
    res = runner.invoke(app, ["metrics", "--format", "csv"])
    assert res.stdout.splitlines()[0] == "metric,family,better,formula"
    res = runner.invoke(app, ["metrics"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert "│" in res.stdout  # the table stays the default


def test_a_printing_model_keeps_stdout_to_the_cache_paths(tmp_path):
    data = write_cluster_npz(tmp_path / "data.npz", N, D, K, seed=1)
    ckpt = save_state_dict(tmp_path / "run_ep001.pt", ARCH)
    (tmp_path / "printy.py").write_text(
        "from nccli import zoo\n"
        "def build():\n"
        "    print('HELLO FROM THE MODEL')\n"
        f"    return zoo.build({ARCH!r})\n"
    )
    out = tmp_path / "cache"
    res = python_m_nccli(
        "extract", ckpt, "-d", data, "--model", "printy:build", "-o", out,
        "--device", "cpu", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(out / "run_ep001.h5")]
    assert "HELLO FROM THE MODEL" in res.stderr
    res = python_m_nccli("info", ckpt, "--model", "printy:build", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout)
    assert "HELLO FROM THE MODEL" in res.stderr


def _h5_features(path: Path, epoch: object) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(size=(N, D))
        f["labels"] = np.arange(N) % K
        f.attrs["epoch"] = epoch
    return path


def test_epoch_from_an_hdf5_root_attribute(tmp_path):
    good = _h5_features(tmp_path / "feats.h5", 7)
    res = runner.invoke(app, ["measure", str(good), "-m", "nc1", "-f", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["epoch"] == 7
    for bad in (1.5, float("nan"), float("inf")):
        path = _h5_features(tmp_path / "bad.h5", bad)
        res = runner.invoke(app, ["measure", str(path), "-m", "nc1"])
        assert res.exit_code == 1
        assert "'epoch' must be a whole number" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
