"""``compare --across layers --fit depth``: the per-layer decay of log(metric) (issue 14)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from helpers import runner
from test_compare import LAYERS, write_cache

from nccli.cli import app
from nccli.compare import compare
from nccli.compare.depth import fit_log_line


def _reference(values: np.ndarray) -> tuple[float, float]:
    """Slope and R² of log(values) against 0..n-1 by numpy's polyfit (the obvious way)."""
    x = np.arange(len(values), dtype=float)
    y = np.log(values)
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (slope * x + icept)
    return float(slope), 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())


def test_fit_log_line_closed_forms_and_reference():
    s, r2, n = fit_log_line(0.8 * 0.5 ** np.arange(6))  # halves every layer
    assert s == pytest.approx(math.log(0.5), rel=1e-12) and r2 == pytest.approx(1.0) and n == 6
    s, r2, _ = fit_log_line(np.full(4, 0.3))  # flat: nothing to explain, nothing left
    assert s == pytest.approx(0.0, abs=1e-15) and r2 == 1.0
    v = np.array([1.4, 0.9, 0.7, 0.2, 0.15])
    s, r2, _ = fit_log_line(v)
    ref_s, ref_r2 = _reference(v)
    assert s == pytest.approx(ref_s, rel=1e-12) and r2 == pytest.approx(ref_r2, rel=1e-12)
    # unusable layers are left out of the fit; too few give nan
    s2, _, n = fit_log_line(np.array([1.4, np.nan, 0.7, -1.0, 0.15]))
    ref = np.polyfit([0.0, 2.0, 4.0], np.log([1.4, 0.7, 0.15]), 1)[0]  # positions 0, 2, 4
    assert n == 3 and s2 == pytest.approx(ref, rel=1e-12)
    assert math.isnan(fit_log_line(np.array([1.0, 0.5]))[0])


def test_gaps_use_the_layer_positions():
    """A nan layer keeps its place on the depth axis (x is the position, not the rank)."""
    v = np.array([1.0, np.nan, 0.25, 0.125])
    s, r2, _ = fit_log_line(v)
    assert s == pytest.approx(math.log(0.5), rel=1e-12) and r2 == pytest.approx(1.0)


def test_compare_fit_depth_rows_table_and_refusals(tmp_path):
    caches = [write_cache(tmp_path / f"ep{e:03d}.h5", e) for e in (5, 80)]
    res = compare(caches, across="layers", metrics="nc1,nc1_trace", fit="depth")
    df = res.data
    fits = df[df["layer"] == ""]
    layers = df[df["layer"] != ""]
    assert list(dict.fromkeys(layers["layer"])) == list(LAYERS)
    for src, part in layers.groupby("source"):
        got = fits[fits["source"] == src].set_index("metric")["value"]
        assert list(got.index) == [
            f"{m}_depth_{s}" for m in ("nc1", "nc1_trace") for s in ("slope", "ratio", "r2")
        ]
        for m in ("nc1", "nc1_trace"):
            ref_s, ref_r2 = _reference(part[part["metric"] == m]["value"].to_numpy())
            assert got[f"{m}_depth_slope"] == pytest.approx(ref_s, rel=1e-10)
            assert got[f"{m}_depth_ratio"] == pytest.approx(math.exp(ref_s), rel=1e-10)
            assert got[f"{m}_depth_r2"] == pytest.approx(ref_r2, rel=1e-10)
    # CLI: CSV carries the rows, the table a "fit" row, and the plot still draws the layers
    args = ["compare", *map(str, caches), "--across", "layers", "-m", "nc1", "--fit", "depth"]
    out = runner.invoke(app, [*args, "-f", "csv"])
    assert out.exit_code == 0, out.stderr
    csv = pd.read_csv(io.StringIO(out.stdout), keep_default_na=False)
    assert sorted(set(csv[csv["layer"] == ""]["metric"])) == [
        "nc1_depth_r2",
        "nc1_depth_ratio",
        "nc1_depth_slope",
    ]
    tab = runner.invoke(app, [*args, "-f", "table"], env={"COLUMNS": "200"})
    assert tab.exit_code == 0, tab.stderr
    assert tab.stdout.count("fit ") == 2 and "/layer R²" in tab.stdout
    png = tmp_path / "depth.png"
    assert runner.invoke(app, [*args, "--plot", str(png), "-q"]).exit_code == 0
    assert png.stat().st_size > 1000
    bad = runner.invoke(app, ["compare", *map(str, caches), "--fit", "depth"])
    assert bad.exit_code == 2
    assert "--fit depth" in bad.stderr and "--across layers" in bad.stderr
    # nc3 is nan on the layer without a classifier: 2 usable layers, so the fit is nan
    res = compare(caches[0], across="layers", metrics="nc3", fit="depth")
    assert res.data[res.data["metric"] == "nc3_depth_slope"]["value"].isna().all()
    assert any("--fit depth: nc3 has fewer than 3 layers" in n for n in res.notes)
