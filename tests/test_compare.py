"""`nccli compare`: ordering, layers, runs + deltas, thresholds, CSV pipeline, plot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import python_m_nccli, runner

from nccli.cli import app
from nccli.compare import compare, parse_threshold, run_names
from nccli.errors import ThresholdExceeded, UsageError
from nccli.io.cache import CacheWriter, LayerSpec
from nccli.io.names import strip_epoch_step as strip_epoch
from nccli.io.sources import open_sources
from nccli.measure import measure
from nccli.stats import ClassStats

K, N = 4, 240
LAYERS = ("block", "feat", "head_in")  # depth order


def _features(epoch: int, seed: int, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-structured features whose within-class spread shrinks with the epoch."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), N // K)
    mu = np.random.default_rng(100 + seed).normal(size=(K, d)) * 3
    noise = 2.0 / (1.0 + epoch) ** 0.7
    H = mu[y] + noise * rng.normal(size=(N, d))
    return H, y, mu


def write_npz(path: Path, epoch: int, seed: int = 0, with_epoch_array: bool = True) -> Path:
    H, y, mu = _features(epoch, seed)
    arrays = {"features": H.astype(np.float32), "labels": y, "weight": mu, "bias": np.zeros(K)}
    if with_epoch_array:
        arrays["epoch"] = np.array(epoch)
    np.savez(path, **arrays)
    return path


def write_cache(path: Path, epoch: int, run: str | None = None, seed: int = 0) -> Path:
    """A real 3-layer cache: block (no weight) → feat --W1--> head_in --W2--> logits."""
    H, y, mu = _features(epoch, seed)
    rng = np.random.default_rng(7 + seed)
    W1 = rng.normal(size=(6, 8)) / 3
    b1 = rng.normal(size=6) * 0.1
    H2 = H @ W1.T + b1
    M2 = (mu @ W1.T + b1) - (mu @ W1.T + b1).mean(0)
    W2 = M2 + 0.05 * rng.normal(size=M2.shape)
    B = np.tanh(H[:, :5]) + 0.1 * rng.normal(size=(N, 5))
    feats = {"block": B, "feat": H, "head_in": H2}
    specs = [
        LayerSpec("block", 5, depth=0, role="other"),
        LayerSpec("feat", 8, depth=1, role="penultimate", weight=W1, bias=b1),
        LayerSpec("head_in", 6, depth=2, role="classifier", weight=W2, bias=np.zeros(K)),
    ]
    attrs = {"epoch": epoch, "classifier": "head_in"}
    if run is not None:
        attrs["run"] = run
    w = CacheWriter(path, specs, num_samples=N, num_classes=K, attrs=attrs, logits=False)
    stored = {k: v.astype(np.float32) for k, v in feats.items()}
    w.write_rows(0, y, np.arange(N), stored)
    stats = {k: ClassStats.from_arrays(v, y, K) for k, v in stored.items()}
    w.finalize(stats)
    return path


@pytest.fixture()
def npz_run(tmp_path):
    d = tmp_path / "npz"
    d.mkdir()
    return [write_npz(d / f"run1_ep{e:03d}.npz", e) for e in (0, 5, 50, 200)]


@pytest.fixture()
def two_runs(tmp_path):
    out = {}
    for run, seed in (("base", 0), ("wide", 1)):
        d = tmp_path / run
        d.mkdir()
        out[run] = [write_cache(d / f"ep{e:03d}.h5", e, seed=seed) for e in (1, 10, 100)]
    return out


def _csv(res) -> pd.DataFrame:
    assert res.exit_code == 0, res.stdout + res.stderr
    return pd.read_csv(io.StringIO(res.stdout))


# ----------------------------------------------------------------- unit parts
def test_parse_threshold_and_errors():
    t = parse_threshold(" nc1 >= 5e-2 ")
    assert (t.metric, t.op, t.value) == ("nc1", ">=", 0.05)
    assert t.crossed(0.05) and not t.crossed(0.04) and not t.crossed(float("nan"))
    assert parse_threshold("delta_nc3<-0.1").value == -0.1
    for bad in ("nc1>>", "nc1", ">0.1", "nc1=0.1", "nc1>abc", "nc1 > 0.1 x"):
        with pytest.raises(UsageError, match="METRIC OP NUMBER"):
            parse_threshold(bad)
    with pytest.raises(UsageError, match="unknown metric 'nc9'"):
        parse_threshold("nc9>1")


def test_run_names_rules(tmp_path):
    assert strip_epoch("run1_ep050") == "run1"
    assert strip_epoch("ep010") is None
    assert strip_epoch("final") is None
    flat = tmp_path / "flat"
    flat.mkdir()
    files = [write_npz(flat / n, 1) for n in ("run1_ep001.npz", "run2_ep001.npz", "ep001.npz")]
    srcs = open_sources(files)
    # one directory: the stem without the epoch, else the directory name
    assert run_names(srcs) == ["run1", "run2", "flat"]
    assert run_names(srcs, "dir") == ["flat"] * 3
    assert run_names(srcs, lambda s: "x" + s.label[:4]) == ["xrun1", "xrun2", "xep00"]
    # several directories: the directory names; a cache 'run' attribute wins
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    c1 = write_cache(tmp_path / "a" / "m_ep1.h5", 1)
    c2 = write_cache(tmp_path / "b" / "m_ep1.h5", 1)
    c3 = write_cache(tmp_path / "b" / "m_ep2.h5", 2, run="named")
    srcs2 = open_sources([c1, c2, c3])
    assert run_names(srcs2) == ["a", "b", "named"]
    for s in srcs + srcs2:
        s.close()


# ---------------------------------------------------------------- compare API
def test_default_orders_by_epoch_whatever_the_argument_order(npz_run):
    shuffled = [npz_run[2], npz_run[0], npz_run[3], npz_run[1]]
    res = compare(shuffled)
    df = res.data
    assert list(df.columns) == ["source", "epoch", "layer", "metric", "value"]
    assert list(dict.fromkeys(df["epoch"])) == [0, 5, 50, 200]
    assert list(dict.fromkeys(df["metric"])) == ["nc1", "nc2_etf_dist_means", "nc3", "nc4"]
    nc1 = df[df["metric"] == "nc1"]["value"].to_numpy()
    assert np.all(np.diff(nc1) < 0), "nc1 must fall as the features collapse"
    # the values are exactly those of measure
    ref = measure(npz_run, metrics="nc1,nc2_etf_dist_means,nc3,nc4")
    merged = df.merge(ref, on=["source", "layer", "metric"], suffixes=("", "_m"))
    assert len(merged) == len(df)
    np.testing.assert_array_equal(merged["value"], merged["value_m"])
    # CLI: the same order, and the trend table renders
    out = _csv(runner.invoke(app, ["compare", *map(str, shuffled), "-f", "csv", "-m", "nc1"]))
    assert out["epoch"].tolist() == [0, 5, 50, 200]
    assert out["source"].tolist() == [p.name for p in npz_run]
    tab = runner.invoke(app, ["compare", *map(str, shuffled), "-f", "table"])
    assert tab.exit_code == 0, tab.stderr
    assert "first→last" in tab.stdout and "layer features" in tab.stdout
    assert any(ch in tab.stdout for ch in "▁▂▃▄▅▆▇█")


def test_epoch_from_file_name_and_step_tiebreak(tmp_path):
    a = write_npz(tmp_path / "m_ep3_step900.npz", 3, with_epoch_array=False)
    b = write_npz(tmp_path / "m_ep3_step100.npz", 3, with_epoch_array=False)
    c = write_npz(tmp_path / "m_ep1.npz", 1, with_epoch_array=False)
    df = compare([a, b, c], metrics="nc1").data
    assert list(df.columns) == ["source", "epoch", "step", "layer", "metric", "value"]
    assert df["source"].tolist() == ["m_ep1.npz", "m_ep3_step100.npz", "m_ep3_step900.npz"]


def test_across_layers_depth_order(tmp_path):
    cache = write_cache(tmp_path / "ep040.h5", 40)
    res = compare(cache, across="layers", metrics="nc1,nc3")
    df = res.data
    assert list(dict.fromkeys(df["layer"])) == list(LAYERS)
    assert df[df["layer"] == "block"].set_index("metric")["value"].isna()["nc3"]
    assert any("block" in n and "nc3" in n for n in res.notes)
    w = res.wide()
    assert list(w.columns) == ["source", "epoch", "layer", "nc1", "nc3"]
    assert w["layer"].tolist() == list(LAYERS)
    # a pattern that selects layers out of order still comes back in depth order
    res2 = compare(cache, across="layers", layers="head_in,block", metrics="nc1")
    assert res2.data["layer"].tolist() == ["block", "head_in"]
    tab = runner.invoke(app, ["compare", str(cache), "--across", "layers", "-f", "table"])
    assert tab.exit_code == 0, tab.stderr
    assert "depth" in tab.stdout and "head_in" in tab.stdout


def test_by_run_deltas_equal_measure_differences(two_runs):
    files = two_runs["wide"][::-1] + two_runs["base"]  # wide named first ...
    res = compare(files, by="run", baseline="base", metrics="nc1,nc3,nc4", layers="feat,head_in")
    df = res.data
    assert res.runs == ["base", "wide"]
    assert list(df.columns) == ["source", "run", "epoch", "layer", "metric", "value"]
    assert list(dict.fromkeys(df["epoch"])) == [1, 10, 100]
    deltas = df[df["metric"].str.startswith("delta_")]
    assert set(deltas["run"]) == {"wide"}
    assert len(deltas) == 3 * 2 * 3  # epochs × layers × metrics
    for e_idx, epoch in enumerate((1, 10, 100)):
        a = measure(two_runs["base"][e_idx], metrics="nc1,nc3,nc4")
        b = measure(two_runs["wide"][e_idx], metrics="nc1,nc3,nc4")
        expect = (
            b.set_index(["layer", "metric"])["value"] - a.set_index(["layer", "metric"])["value"]
        )
        for layer in ("feat", "head_in"):
            for m in ("nc1", "nc3", "nc4"):
                got = deltas[
                    (deltas["epoch"] == epoch)
                    & (deltas["layer"] == layer)
                    & (deltas["metric"] == f"delta_{m}")
                ]["value"]
                assert len(got) == 1
                assert got.iloc[0] == pytest.approx(expect[(layer, m)], rel=1e-12, abs=1e-15)
    # wide: delta columns next to the metrics, nan for the baseline run
    w = res.wide()
    assert {"delta_nc1", "delta_nc3", "delta_nc4"} <= set(w.columns)
    assert w[w["run"] == "base"]["delta_nc1"].isna().all()
    assert w[w["run"] == "wide"]["delta_nc1"].notna().all()
    # the CLI table shows the runs side by side with the delta columns
    tab = runner.invoke(
        app, ["compare", *map(str, files), "--by", "run", "--baseline", "base", "-f", "table"]
    )
    assert tab.exit_code == 0, tab.stderr
    assert "nc1 ↓" in tab.stdout and "Δ wide−base" in tab.stdout
    assert "first→last" in tab.stdout


def test_by_run_needs_two_runs_and_epochs(npz_run, tmp_path):
    res = runner.invoke(app, ["compare", *map(str, npz_run), "--by", "run", "-f", "csv"])
    assert res.exit_code == 2
    assert "at least two runs" in res.stderr and "Traceback" not in res.stderr
    res = runner.invoke(
        app, ["compare", str(npz_run[0]), "--across", "layers", "--by", "run", "-f", "csv"]
    )
    assert res.exit_code == 2


def test_by_run_unmatched_and_duplicate_epochs(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    a = [write_npz(tmp_path / "a" / f"ep{e}.npz", e) for e in (1, 2, 3)]
    b = [write_npz(tmp_path / "b" / f"ep{e}.npz", e, seed=1) for e in (2, 3, 4)]
    res = compare(a + b, by="run", metrics="nc1")
    deltas = res.data[res.data["metric"] == "delta_nc1"]
    assert deltas["epoch"].tolist() == [2, 3]
    assert any("run b" in n and "epoch 4" in n for n in res.notes)
    dup = write_npz(tmp_path / "b" / "again_ep3.npz", 3)
    cli = runner.invoke(app, ["compare", *map(str, a + b), str(dup), "--by", "run", "-f", "csv"])
    assert cli.exit_code == 1
    assert "two checkpoints at epoch 3" in cli.stderr and "Traceback" not in cli.stderr


def test_across_runs_takes_each_runs_last_checkpoint(two_runs):
    files = two_runs["base"] + two_runs["wide"]
    res = compare(files, across="runs", metrics="nc1", layers="feat")
    df = res.data
    assert df["run"].tolist() == ["base", "wide"]
    assert df["epoch"].tolist() == [100, 100]


# ----------------------------------------------------------------- thresholds
def test_fail_if_exit_codes_and_rows(npz_run):
    args = ["compare", *map(str, npz_run), "-f", "csv", "-m", "nc1"]
    ok = runner.invoke(app, [*args, "--fail-if", "nc1>1e6"])
    assert ok.exit_code == 0, ok.stderr
    data = _csv(ok)
    # crossing: data still written on stdout, offending rows named on stderr, exit 1
    nc1 = data.set_index("epoch")["value"]
    limit = float(nc1[50])  # epochs 0, 5 and 50 are >= it
    bad = runner.invoke(app, [*args, "--fail-if", f"nc1>={limit!r}"])
    assert bad.exit_code == 1
    assert pd.read_csv(io.StringIO(bad.stdout)).shape == data.shape
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("nccli: fail-if:")]
    assert len(lines) == 3
    for epoch, ln in zip((0, 5, 50), lines, strict=True):
        assert f"run1_ep{epoch:03d}.npz" in ln and f"epoch {epoch}" in ln
        assert "layer features" in ln and f"{float(nc1[epoch]):.6g}" in ln
    assert "3 of 4 checked rows crossed" in bad.stderr
    # only the last checkpoint: epoch 200 is below the limit
    last = runner.invoke(app, [*args, "--fail-if", f"nc1>={limit!r}", "--fail-if-last"])
    assert last.exit_code == 0, last.stderr
    # a threshold on a metric not in --metrics is measured and checked anyway
    extra = runner.invoke(app, [*args, "--fail-if", "nc3<-1"])
    assert extra.exit_code == 0
    assert set(_csv(extra)["metric"]) == {"nc1", "nc3"}
    # usage errors: one line, exit 2, nothing measured
    for spec in ("nc1>>", "nc9>0.1", "nc1", "delta_nc1>0"):
        res = runner.invoke(app, [*args, "--fail-if", spec])
        assert res.exit_code == 2, spec
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("nccli: error:"), spec
        assert res.stdout == ""


def test_fail_if_api_check(npz_run):
    res = compare(npz_run, metrics="nc1", fail_if=["nc1>0"])
    assert not res.ok and len(res.violations) == 4
    assert [v.epoch for v in res.violations] == [0, 5, 50, 200]
    with pytest.raises(ThresholdExceeded, match="4 of 4 checked rows"):
        res.check()
    assert compare(npz_run, metrics="nc1", fail_if=["nc1<0"]).ok


# ------------------------------------------------------------------- outputs
def test_json_wide_and_output_file(npz_run, tmp_path):
    res = runner.invoke(app, ["compare", *map(str, npz_run), "-f", "json", "-m", "nc1,nc4"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert set(rows[0]) == {"source", "epoch", "layer", "metric", "value"}
    assert [r["epoch"] for r in rows[::2]] == [0, 5, 50, 200]
    out = tmp_path / "w.csv"
    res = runner.invoke(
        app, ["compare", *map(str, npz_run), "--wide", "-m", "nc1,nc4", "-o", str(out)]
    )
    assert res.exit_code == 0, res.stderr
    w = pd.read_csv(out)
    assert list(w.columns) == ["source", "epoch", "layer", "nc1", "nc4"]
    assert w["epoch"].tolist() == [0, 5, 50, 200]


@pytest.mark.slow
def test_subprocess_pipeline_csv(two_runs, tmp_path):
    files = [str(p) for p in two_runs["base"][::-1] + two_runs["wide"]]
    proc = python_m_nccli("compare", *files, "--by", "run", "-m", "nc1", timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(io.StringIO(proc.stdout))  # piped: csv by default
    assert list(df.columns) == ["source", "run", "epoch", "layer", "metric", "value"]
    assert set(df["metric"]) == {"nc1", "delta_nc1"}
    assert set(df["layer"]) == set(LAYERS)
    base = df[(df["run"] == "base") & (df["metric"] == "nc1")].set_index(["epoch", "layer"])
    wide = df[(df["run"] == "wide") & (df["metric"] == "nc1")].set_index(["epoch", "layer"])
    delta = df[df["metric"] == "delta_nc1"].set_index(["epoch", "layer"])
    # full-precision CSV: the deltas read back equal the differences read back
    diff = (wide["value"] - base["value"]).reindex(delta.index)
    np.testing.assert_allclose(delta["value"], diff, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- plot
def test_plot_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "nc.png"
    files = [str(p) for p in two_runs["base"] + two_runs["wide"]]
    res = runner.invoke(app, ["compare", *files, "-f", "csv", "--plot", str(png)])
    assert res.exit_code == 0, res.stderr
    data = png.read_bytes()
    assert len(data) > 2000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not png.with_name(png.name + ".partial").exists()
    # zeros (nc4 = 0) and epoch 0 on log axes, and --across layers
    z = tmp_path / "z"
    z.mkdir()
    npz = [write_npz(z / f"r_ep{e}.npz", e) for e in (0, 3, 300)]
    res = compare(npz, metrics="nc1,nc4")
    assert (res.data[res.data["metric"] == "nc4"]["value"] == 0).any()
    from nccli.report.plot import plot_compare

    assert plot_compare(res, tmp_path / "z.png").stat().st_size > 2000
    assert plot_compare(compare(two_runs["base"][0], across="layers"), tmp_path / "l.svg").exists()
    bad = runner.invoke(app, ["compare", *files, "--plot", str(tmp_path / "x.nope")])
    assert bad.exit_code == 2 and "unknown image type" in bad.stderr


@pytest.mark.parametrize(
    ("values", "scale"),
    [([0.97, 0.99, 1.0], "linear"), ([1.0, 0.3, 0.06], "log"), ([0.0, 1e-3, 0.9], "symlog"),
     ([-0.2, 0.5], "symlog"), ([float("nan"), 2.0, 1e3], "log")],
)  # fmt: skip
def test_plot_y_axis_is_logarithmic_only_over_orders_of_magnitude(values, scale):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from nccli.report.plot import _set_yscale

    ax = Figure().subplots()
    _set_yscale(ax, values)
    assert ax.get_yscale() == scale


def test_plot_without_matplotlib_is_one_line(npz_run, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    res = runner.invoke(app, ["compare", *map(str, npz_run), "--plot", str(tmp_path / "a.png")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0
    assert "pip install 'nccli[plot]'" in res.stderr
