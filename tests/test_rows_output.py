"""The pandas-free writers (:mod:`nccli.report.data` on :class:`nccli.table.Rows`) write
the bytes the pandas ones wrote (issue 16): the old implementation is kept here as the
reference and both are run on the same random tidy rows."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest

from nccli.choices import OutputFormat
from nccli.report.data import wide, write_data
from nccli.table import Rows


def _ref_wide(df: pd.DataFrame) -> pd.DataFrame:
    index = [c for c in ("source", "epoch", "layer", "class", "class2") if c in df.columns]
    order = list(dict.fromkeys(df["metric"]))
    out = df.pivot_table(index=index, columns="metric", values="value", dropna=False, sort=False)
    out = out.reindex(columns=order).reset_index()
    out.columns.name = None
    return out


def _ref_write(df: pd.DataFrame, fmt: OutputFormat, as_wide: bool) -> str:
    data = _ref_wide(df) if as_wide and not df.empty else df
    buf = io.StringIO()
    if fmt in (OutputFormat.csv, OutputFormat.tsv):
        data = data.copy()
        for col in data.columns:
            if data[col].dtype.kind == "f":
                data[col] = [repr(float(v)) if not math.isnan(v) else "nan" for v in data[col]]
        data.to_csv(buf, sep="," if fmt is OutputFormat.csv else "\t", index=False, na_rep="")
        return buf.getvalue()
    records = []
    for rec in data.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                v = None
            elif hasattr(v, "item"):
                v = v.item()
            clean[k] = v
        records.append(clean)
    return json.dumps(records, indent=1, allow_nan=False) + "\n"


def _random_rows(seed: int) -> Rows:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 30))
    sources = ["a.h5", "b,c.h5", 'q"x.npz', "d e"][: int(rng.integers(1, 5))]
    split = bool(rng.integers(2))
    per_class = bool(rng.integers(2))
    geometry = per_class and bool(rng.integers(2))
    cols = ["source", *(["split"] if split else []), "epoch", "layer"]
    cols += (["class"] if per_class else []) + (["class2"] if geometry else [])
    cols += ["metric", "value"]
    recs = []
    for _ in range(n):
        r = {
            "source": str(rng.choice(sources)),
            "split": rng.choice(["train", "test", None]),
            "epoch": [None, 0, 3, 10][int(rng.integers(4))],
            "layer": str(rng.choice(["fc", "layer4", "head.0"])),
            "metric": str(rng.choice(["nc1", "nc2", "classes", "n_k"])),
            "value": [float("nan"), 0.1 + 0.2, 1e-300, 3, 2.5e7, -1.0][int(rng.integers(6))],
        }
        if per_class:
            r["class"] = [None, 0, 1, 7][int(rng.integers(4))]
        if geometry:
            r["class2"] = [None, 0, 1][int(rng.integers(3))] if r["class"] is not None else None
        recs.append(r)
    kinds = {"epoch": "int", "class": "int", "class2": "int"}
    return Rows.from_records(recs, cols, kinds)


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("fmt", [OutputFormat.csv, OutputFormat.tsv, OutputFormat.json])
def test_rows_write_the_bytes_pandas_wrote(seed, fmt):
    rows = _random_rows(seed)
    df = rows.to_frame()
    for as_wide in (False, True):
        want = _ref_write(df, fmt, as_wide)
        got, got_df = io.StringIO(), io.StringIO()
        write_data(rows, fmt, got, as_wide=as_wide)
        write_data(df, fmt, got_df, as_wide=as_wide)
        assert got.getvalue() == want
        assert got_df.getvalue() == want


@pytest.mark.parametrize("seed", range(20))
def test_wide_of_a_frame_is_the_pivot(seed):
    df = _random_rows(seed).to_frame()
    if df.empty:
        return
    pd.testing.assert_frame_equal(wide(df), _ref_wide(df))


def test_repeated_rows_are_averaged_as_pandas_does():
    vals = [0.1, 0.7, 1e16, 1.0, -1e16, float("nan"), 0.3]
    rows = Rows.from_records(
        [{"source": "a", "epoch": 1, "layer": "fc", "metric": "nc1", "value": v} for v in vals],
        ["source", "epoch", "layer", "metric", "value"],
        {"epoch": "int"},
    )
    assert wide(rows)["nc1"] == _ref_wide(rows.to_frame())["nc1"].tolist()


def test_kinds_follow_pandas_inference():
    rows = Rows(
        ["i", "f", "n", "s", "b", "o"],
        {
            "i": [1, 2],
            "f": [1, None],
            "n": [None, None],
            "s": ["x", None],
            "b": [True, False],
            "o": [1, "x"],
        },
    )
    df = rows.to_frame()
    for c in rows.columns:
        got = io.StringIO()
        write_data(rows.select([c]), OutputFormat.csv, got)
        assert got.getvalue() == _ref_write(df[[c]], OutputFormat.csv, False)


def _cache(path, epoch: int, run: str) -> None:
    from nccli import ClassStats
    from nccli.io.cache import CacheWriter, LayerSpec

    K, N, D = 3, 60, 5
    rng = np.random.default_rng(epoch + 10 * len(run))
    y = np.arange(N) % K
    h = (rng.normal(size=(N, D)) + 3 * np.eye(K, D)[y]).astype(np.float32)
    specs = [
        LayerSpec("a", D, module="a", depth=0),
        LayerSpec(
            "fc", D, module="fc", depth=1, role="penultimate", weight=rng.normal(size=(K, D))
        ),
    ]
    w = CacheWriter(path, specs, N, K, attrs={"epoch": epoch, "run": run, "classifier": "fc"})
    w.write_rows(0, y, np.arange(N), {"a": h, "fc": 2 * h}, logits=None)
    w.finalize({"a": ClassStats.from_arrays(h, y, K), "fc": ClassStats.from_arrays(2 * h, y, K)})


@pytest.mark.parametrize(
    "kw",
    [
        {"fail_if": ["nc1>0.1"]},
        {"by": "run", "fail_if": ["delta_nc1<0"], "fail_if_last": True},
        {"across": "layers"},
        {"across": "runs", "metrics": "nc1,nc3"},
    ],
)
def test_compare_rows_are_the_frame(tmp_path, kw):
    from nccli.compare import compare, to_wide

    paths = []
    for run in ("r1", "r2"):
        for epoch in (1, 5):
            paths.append(tmp_path / f"{run}_ep{epoch}.h5")
            _cache(paths[-1], epoch, run)
    res = compare(paths, **kw)
    df = res.data
    assert res.rows.to_frame().equals(df)
    assert df.attrs["notes"] == res.notes
    for fmt in (OutputFormat.csv, OutputFormat.json):
        got = io.StringIO()
        write_data(res.rows, fmt, got)
        assert got.getvalue() == _ref_write(df, fmt, False)
    wide_df = res.wide()
    pd.testing.assert_frame_equal(to_wide(df), wide_df)
    got = io.StringIO()
    write_data(res.wide_rows(), OutputFormat.csv, got)
    assert got.getvalue() == _ref_write(wide_df, OutputFormat.csv, False)
