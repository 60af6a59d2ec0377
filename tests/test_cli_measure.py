"""`nccli measure` through CliRunner and a real subprocess pipeline."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import python_m_nccli, runner

from nccli import measure
from nccli.cli import app
from nccli.metrics import METRICS


@pytest.fixture()
def feats(tmp_path):
    rng = np.random.default_rng(0)
    K, d, N = 4, 12, 400
    y = rng.integers(0, K, N)
    mu = rng.normal(size=(K, d)) * 4
    H = (mu[y] + rng.normal(size=(N, d))).astype(np.float32)
    W = mu + 0.1 * rng.normal(size=(K, d))
    path = tmp_path / "run_ep012.npz"
    np.savez(path, features=H, labels=y, weight=W, bias=np.zeros(K))
    return path


def test_measure_csv_tidy(feats):
    res = runner.invoke(app, ["measure", str(feats), "--format", "csv"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df.columns) == ["source", "epoch", "layer", "metric", "value"]
    assert set(df["metric"]) >= {"nc1", "nc2_etf_dist_means", "nc3", "nc4"}
    assert (df["epoch"] == 12).all()
    api = measure(feats)
    merged = df.merge(api, on=["layer", "metric"], suffixes=("_cli", "_api"))
    np.testing.assert_allclose(merged["value_cli"], merged["value_api"], rtol=0, atol=0)


def test_measure_json_and_wide(feats):
    res = runner.invoke(app, ["measure", str(feats), "-f", "json", "--metrics", "nc1,nc4"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["metric"] for r in rows] == ["nc1", "nc4"]
    assert set(rows[0]) == {"source", "epoch", "layer", "metric", "value"}
    res = runner.invoke(app, ["measure", str(feats), "-f", "csv", "--wide", "-m", "nc1,nc3"])
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df.columns) == ["source", "epoch", "layer", "nc1", "nc3"]


def test_measure_family_selection_and_table(feats):
    res = runner.invoke(app, ["measure", str(feats), "-f", "table", "-m", "nc2"])
    assert res.exit_code == 0
    for name in METRICS:
        if METRICS[name].family == "nc2":
            assert name in res.stdout
    assert "nc1_trace" not in res.stdout


def test_measure_per_class(feats):
    res = runner.invoke(app, ["measure", str(feats), "-f", "csv", "--per-class", "-m", "nc1"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert "class" in df.columns
    nk = df[df["metric"] == "n_k"].sort_values("class")
    data = np.load(feats)
    np.testing.assert_array_equal(nk["value"].to_numpy(), np.bincount(data["labels"], minlength=4))


def test_nan_reason_reported(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "nocls.npz"
    np.savez(path, features=rng.normal(size=(50, 5)), labels=rng.integers(0, 3, 50))
    res = runner.invoke(app, ["measure", str(path), "-f", "csv"])
    assert res.exit_code == 0
    df = pd.read_csv(io.StringIO(res.stdout))
    assert np.isnan(df.set_index("metric").loc["nc3", "value"])
    assert "nc3 is nan: no classifier weight" in res.stderr


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["measure", "missing.npz"], 1, "missing.npz: no such file"),
        (["measure", "{feats}", "-m", "nc9"], 2, "unknown metric 'nc9'"),
        (["measure", "{feats}", "--layer", "nope"], 2, "no layer matches 'nope'"),
        (["measure", "{feats}", "--center", "median"], 2, "--center"),
        (["measure", "{feats}", "--format", "xml"], 2, "xml"),
    ],
)
def test_measure_errors(feats, args, code, needle):
    args = [a.replace("{feats}", str(feats)) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_bad_labels_file(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, features=np.zeros((4, 3)), labels=np.array([0.5, 1, 2, 0]))
    res = runner.invoke(app, ["measure", str(p)])
    assert res.exit_code == 1
    assert str(p) in res.stderr and "integers" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, features=np.zeros((4, 3)))
    proc = python_m_nccli("--debug", "measure", str(p))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    proc = python_m_nccli("measure", str(p))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no array named 'labels'" in proc.stderr


@pytest.mark.slow
def test_subprocess_pipeline(feats):
    """`nccli measure x.npz | python -c "import pandas ..."`: csv when piped."""
    cmd = (
        f"{sys.executable} -m nccli measure {feats} | "
        f'{sys.executable} -c "import sys, pandas; df = pandas.read_csv(sys.stdin); '
        "print(len(df), df.loc[df.metric == 'nc1', 'value'].iloc[0])\""
    )
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True)
    n, nc1 = proc.stdout.split()
    api = measure(feats).set_index("metric")["value"]
    assert int(n) == len(api)
    assert float(nc1) == api["nc1"]


def test_version_and_metrics_list():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "nccli" in res.stdout
    res = runner.invoke(app, ["metrics"])
    assert res.exit_code == 0 and "nc2_etf_dist_means" in res.stdout
