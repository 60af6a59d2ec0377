"""The metrics registry (nccli/metrics/registry.py): one declaration per metric drives
``measure``, ``--metrics``, ``nccli metrics`` and the docs; shared computations run once."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import runner

from nccli.cli import app
from nccli.errors import UsageError
from nccli.measure import measure
from nccli.metrics import (
    CORE_FAMILIES,
    METRICS,
    LayerContext,
    Metric,
    MetricInfo,
    Undefined,
    compute_metrics,
    registry,
    select_metrics,
)
from nccli.metrics import mse as mse_mod
from nccli.stats import ClassStats

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
K, D = 4, 6


def _data(seed: int = 0, n: int = 30):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n)
    H = rng.normal(size=(len(y), D)) + 3.0 * np.eye(K, D)[y]
    W = rng.normal(size=(K, D)) + np.eye(K, D)
    return H, y, W, rng.normal(size=K)


@pytest.fixture()
def npz(tmp_path):
    H, y, W, b = _data()
    path = tmp_path / "run_ep007.npz"
    np.savez(path, features=H, labels=y, weight=W, bias=b)
    return path


@pytest.fixture()
def npz_no_classifier(tmp_path):
    H, y, _, _ = _data(1)
    path = tmp_path / "plain.npz"
    np.savez(path, features=H, labels=y)
    return path


def _sw_trace(ctx: LayerContext) -> float:
    """A throwaway kernel: Tr(Σ_W) from the statistics."""
    return float(np.trace(ctx.stats.scatter) / ctx.stats.n)


@pytest.fixture()
def throwaway():
    """A metric of a new family, declared for one test only."""
    m = Metric("tmp_sw_trace", "scratch", "Tr(Σ_W)", _sw_trace)
    with METRICS.declared(m):
        yield m
    assert "tmp_sw_trace" not in METRICS


# ------------------------------------------------------------------ adding a metric
def test_throwaway_metric_flows_through_measure(npz, throwaway):
    H, y, _, _ = _data()
    mu = np.stack([H[y == k].mean(0) for k in range(K)])
    expected = float(np.sum((H - mu[y]) ** 2) / len(y))
    df = measure(npz)
    assert list(df.metric)[-1] == "tmp_sw_trace"  # declared last: shown last
    got = df.set_index("metric")["value"]["tmp_sw_trace"]
    assert got == pytest.approx(expected, rel=1e-12)
    # by name and by its family, through the CLI too
    assert list(measure(npz, metrics="tmp_sw_trace").metric) == ["tmp_sw_trace"]
    assert list(measure(npz, metrics="scratch,cdnv").metric) == ["tmp_sw_trace", "cdnv"]
    res = runner.invoke(app, ["measure", str(npz), "-m", "tmp_sw_trace", "-f", "csv"])
    assert res.exit_code == 0, res.output
    assert "tmp_sw_trace" in res.stdout
    # a family outside nc1–nc4 is not compute_metrics' business
    st = ClassStats.from_arrays(H, y, K)
    assert "tmp_sw_trace" not in compute_metrics(st)


def test_throwaway_metric_is_gone_after_the_test(npz):
    assert "tmp_sw_trace" not in set(measure(npz).metric)
    with pytest.raises(UsageError, match="unknown metric"):
        select_metrics("tmp_sw_trace")


def test_needs_and_display_rule_are_declarative(npz, npz_no_classifier):
    """A metric needing a classifier and shown by default only with one: left out of the
    default output without a classifier, ``nan`` with the reason when asked for."""
    m = Metric(
        "tmp_w_norm",
        "scratch",
        "||W||_F",
        lambda c: float(np.linalg.norm(c.weight)),
        needs=(registry.CLASSIFIER,),
        requires=lambda c: "too few classes" if c.stats.num_classes < 3 else None,
        shown_by_default=lambda c: c.has_classifier,
    )
    with METRICS.declared(m):
        assert "tmp_w_norm" not in set(measure(npz_no_classifier).metric)
        ex = measure(npz_no_classifier, metrics="tmp_w_norm")
        assert list(ex.metric) == ["tmp_w_norm"] and np.isnan(ex.value.iloc[0])
        assert ex.attrs["notes"] == [
            "plain.npz features: tmp_w_norm is nan: no classifier weight for this layer"
        ]
        _, _, W, _ = _data()
        val = measure(npz).set_index("metric")["value"]["tmp_w_norm"]
        assert val == pytest.approx(np.linalg.norm(W), rel=1e-12)
    assert not registry.METRICS.get("tmp_w_norm")


def test_declaring_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="declared twice"):
        METRICS.declare(Metric("nc1", "nc1", "again", _sw_trace))
    assert METRICS["nc1"].formula == "(1/K) Tr(Σ_W Σ_B⁺)"


# ------------------------------------------------------------------ compute groups
def test_a_compute_group_runs_once_per_layer(npz):
    calls = []

    def group(ctx: LayerContext) -> tuple[float, float]:
        def run() -> tuple[float, float]:
            calls.append(1)
            return 1.0, 2.0

        return ctx.shared("tmp_group", run)

    a = Metric("tmp_a", "scratch", "a", lambda c: group(c)[0])
    b = Metric("tmp_b", "scratch", "b", lambda c: group(c)[1])
    with METRICS.declared(a, b):
        df = measure(npz, metrics="scratch")
    assert list(df.value) == [1.0, 2.0]
    assert len(calls) == 1


def test_a_failed_compute_group_is_not_rerun(npz):
    calls = []

    def run() -> float:
        calls.append(1)
        raise Undefined("the group has no value here")

    metrics = [
        Metric(f"tmp_{i}", "scratch", "x", lambda c: c.shared("tmp_failing", run)) for i in range(3)
    ]
    with METRICS.declared(*metrics):
        df = measure(npz, metrics="scratch")
    assert len(calls) == 1
    assert df.value.isna().all()
    assert df.attrs["notes"] == [
        f"run_ep007.npz features: tmp_{i} is nan: the group has no value here" for i in range(3)
    ]


def test_nc4_family_shares_one_feature_pass(npz, monkeypatch):
    calls = []
    real = registry.nc4_pass

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(registry, "nc4_pass", counting)
    df = measure(npz, metrics="nc4,acc,ncc_acc")
    assert list(df.metric) == ["nc4", "acc", "ncc_acc"] and df.value.notna().all()
    assert len(calls) == 1


def test_a_failed_feature_pass_runs_once_and_explains_all_three(npz, monkeypatch):
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        raise Undefined("no samples")

    monkeypatch.setattr(registry, "nc4_pass", failing)
    df = measure(npz, metrics="nc4,acc,ncc_acc")
    assert len(calls) == 1
    assert df.attrs["notes"] == [
        f"run_ep007.npz features: {n} is nan: no samples" for n in ("nc4", "acc", "ncc_acc")
    ]


def test_ncc_acc_without_a_classifier(npz_no_classifier):
    df = measure(npz_no_classifier, metrics="nc4,acc,ncc_acc").set_index("metric")["value"]
    assert np.isnan(df["nc4"]) and np.isnan(df["acc"])
    H, y, _, _ = _data(1)
    mu = np.stack([H[y == k].mean(0) for k in range(K)])
    nearest = np.argmin(((H[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
    assert df["ncc_acc"] == pytest.approx(np.mean(nearest == y), rel=1e-12)


def test_mse_family_shares_one_decomposition(npz, monkeypatch):
    calls = []
    real = mse_mod.mse_decomposition

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(mse_mod, "mse_decomposition", counting)
    df = measure(npz, loss="mse")
    assert {"mse_ls", "mse_dev", "mse_dev_frac"} <= set(df.metric)
    assert len(calls) == 1


# ------------------------------------------------------------------ the declarations
def test_declarations():
    assert METRICS.families == (
        "classes",
        "nc1",
        "heldout",
        "nc2",
        "nc3",
        "nc4",
        "geometry",
        "deep",
        "mse",
        "variants",
        "ood",
    )
    assert [n for n, m in METRICS.items() if m.count] == ["classes", "nc1_rank"]
    assert set(CORE_FAMILIES) <= set(METRICS.families)
    assert MetricInfo is Metric
    assert [n for n, m in METRICS.items() if m.needs_pass] == [
        "nc4",
        "acc",
        "ncc_acc",
        "margin_min",
    ]
    assert [n for n, m in METRICS.items() if not m.default] == ["erank_l"]
    for name, m in METRICS.items():
        assert m.name == name and m.formula and callable(m.kernel)
        assert isinstance(m.higher_is_better, bool)


def test_every_metric_is_documented():
    text = DOCS.read_text()
    # `name` or `name = formula`, the way the sections define them
    missing = [n for n in METRICS if not re.search(rf"`{re.escape(n)}[`\s]", text)]
    assert not missing, f"metrics not named in docs/metrics.md: {missing}"


def test_every_metric_is_listed_by_nccli_metrics():
    res = runner.invoke(app, ["metrics"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    listed = [line.split("│")[1].strip() for line in res.stdout.splitlines() if "│" in line]
    assert listed == list(METRICS)


def test_nccli_metrics_shows_every_formula_verbatim():
    """Formulas hold ``[...]`` (``P[argmax ...]``), which rich would read as markup."""
    res = runner.invoke(app, ["metrics"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    rows = [line.split("│") for line in res.stdout.splitlines() if "│" in line]
    shown = {r[1].strip(): r[4].strip() for r in rows}
    assert shown == {name: m.formula for name, m in METRICS.items()}
