"""``measure --report theory``: each seed paper's hypotheses and predictions, checked.

For every input (checkpoint) and each of the four seed papers, the report lists

- the **hypotheses** the paper's theorem needs, as measured on this checkpoint (training
  error from ``acc``, loss type and weight decays as given on the command line, bias
  present, class balance, head depth, balancedness, conditioning), each with a verdict
  ``holds`` / ``fails`` / ``unknown``;
- the **conclusions** it predicts (NC1–NC3, simplex ETF or orthogonal frame, lengths), the
  measured value, the expected range, and ``agrees`` / ``disagrees`` (or, when a hypothesis
  fails, ``holds (not predicted)`` / ``does not hold (not predicted)``); ``unknown`` when
  the value could not be measured;
- an ``overall`` row: ``consistent`` (all hypotheses hold and all conclusions agree),
  ``inconsistent`` (all hypotheses hold, some conclusion does not), ``not applicable``
  (a hypothesis fails) or ``undetermined`` (a hypothesis is unknown — pass ``--loss`` /
  ``--wd-*``).

Rows have the columns ``source, paper, claim, measured, expected, verdict`` (strings), so
the CSV/JSON output is one row per claim.  The thresholds that turn numbers into verdicts
are :data:`THRESHOLDS` (documented in ``docs/theory.md``).

Layers used: the *head input* is the first view of the linear chain (``h⁽⁰⁾``, the
features before the linear part), the *classifier input* the last one (the features the
final classifier reads; the "last-layer features" of the unconstrained-feature papers).
"Every layer" claims take the worst value over the chain.  Without a chain, the last
layer with a classifier plays both roles.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nccli import analyses
from nccli.io.sources import Source
from nccli.measure import (
    MeasureOptions,
    measure_layer,
    measured_views,
    opened_sources,
    per_class_table,
)
from nccli.metrics import METRICS, MetricSet
from nccli.metrics import deep_linear as deep
from nccli.metrics.nc import Undefined
from nccli.table import Rows

if TYPE_CHECKING:  # pragma: no cover - the DataFrame is built only for Python callers
    import pandas as pd

__all__ = ["COLUMNS", "PAPERS", "THRESHOLDS", "theory_report", "theory_rows", "theory_table"]

COLUMNS = ["source", "paper", "claim", "measured", "expected", "verdict"]

#: the numbers that turn measurements into verdicts (docs/theory.md explains each)
THRESHOLDS: dict[str, float] = {
    "train_error": 0.01,  # training error ≤ 1 %: the run is in the terminal phase
    "imbalance": 1.1,  # max n_k / min n_k ≤ 1.1: the classes count as balanced
    "balancedness": 0.1,  # balancedness_l ≤ 0.1 at every layer of the head
    "cond": 10.0,  # cond_l of the head input ≤ 10: "bounded conditioning"
    "nc1": 0.1,  # nc1 ≤ 0.1: within-class variability has collapsed
    "etf_dist": 0.2,  # nc2_etf_dist_* ≤ 0.2: a simplex ETF
    "nc3": 0.2,  # nc3 ≤ 0.2: classifier and centred means are self-dual
    "of_maxcos": 0.1,  # of_maxcos_* ≤ 0.1: an orthogonal frame (all angles 84°–96°)
    "align_cos": 0.9,  # mean_k cos(w_k, μ_k) ≥ 0.9: classifier rows aligned with means
    "length_rtol": 0.1,  # predicted vs measured per-class lengths within 10 %
    "mse_dev_frac": 0.05,  # term B ≤ 5 % of the MSE loss: near the central path
}

PAPERS = {
    "zhu": "Zhu et al. 2021 — CE + weight decay (UFM)",
    "han": "Han, Papyan & Donoho 2022 — MSE central path",
    "dang": "Dang et al. 2023 — deep linear heads",
    "jacot": "Jacot et al. 2024 — wide nets + weight decay",
}

HOLDS, FAILS, UNKNOWN = "holds", "fails", "unknown"


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _num(ms: MetricSet | None, name: str) -> float | None:
    if ms is None or name not in ms:
        return None
    v = float(ms[name])
    return v if math.isfinite(v) else None


def _worst(sets: Sequence[MetricSet], name: str) -> float | None:
    vals = [v for v in (_num(ms, name) for ms in sets) if v is not None]
    return max(vals) if vals else None


@dataclass
class Evidence:
    """What one checkpoint shows: the measurements every paper's claims are checked on."""

    source: str
    counts: np.ndarray
    loss: str | None
    wd_features: float | None
    wd_classifier: float | None
    depth: int | None
    bias_free: bool | None
    acc: float | None
    chain: list[MetricSet] = field(default_factory=list)  # bottom → top
    top: MetricSet | None = None
    bottom: MetricSet | None = None
    align_cos: float | None = None
    length_err: float | None = None  # max relative error of predicted lengths
    length_note: str = ""
    w_monotone: bool | None = None

    @property
    def imbalance(self) -> float | None:
        c = self.counts[self.counts > 0]
        if c.size < 2 or (self.counts == 0).any():
            return None
        return float(c.max() / c.min())

    @property
    def balanced(self) -> bool | None:
        r = self.imbalance
        return None if r is None else r <= THRESHOLDS["imbalance"]


def _gather(source: Source, opts: MeasureOptions) -> Evidence:
    views = measured_views(source, opts)
    chain_views = deep.head_chain(views)
    if not chain_views:
        with_cls = [v for v in views if v.classifier_weight is not None]
        chain_views = with_cls[-1:] if with_cls else views[-1:]
    top_view, bottom_view = chain_views[-1], chain_views[0]
    explicit = dataclasses.replace(opts, metrics="all", notes=[], per_class=False)
    no_pass = [n for n in METRICS if not METRICS[n].needs_pass]
    sets: list[MetricSet] = []
    for v in chain_views:
        names = list(METRICS) if v is top_view else no_pass
        sets.append(measure_layer(v, explicit, names, views))
    top_stats = top_view.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows)
    ev = Evidence(
        source=source.label,
        counts=top_stats.counts,
        loss=opts.loss,
        wd_features=opts.wd_features,
        wd_classifier=opts.wd_classifier,
        depth=analyses.head_depth(opts, deep.head_chain(views)),
        bias_free=deep.head_is_bias_free(top_view),
        acc=_num(sets[-1], "acc"),
        chain=sets,
        top=sets[-1],
        bottom=sets[0],
    )
    if top_view.classifier_weight is not None:
        tab = per_class_table(top_view, top_stats, opts.center)
        cos = tab["cos_w_mu"]
        ev.align_cos = float(np.mean(cos)) if np.isfinite(cos).all() else None
    # lengths of the bias-free MSE optimum, on the head input (the UFM features H)
    if bottom_view.classifier_weight is not None:
        st = bottom_view.stats(recompute=opts.recompute, chunk_rows=opts.chunk_rows)
        w_norm = np.linalg.norm(bottom_view.classifier_weight, axis=1)
        n = st.counts
        big = [(k, l) for k in range(n.size) for l in range(n.size) if n[k] > n[l]]
        if big:
            ev.w_monotone = all(w_norm[k] >= 0.99 * w_norm[l] for k, l in big)
        if analyses.predictions_wanted(opts):
            try:
                w_pred, mu_pred = analyses.layer_predictions(bottom_view, st, opts, views)
            except Undefined as exc:
                ev.length_note = str(exc)
            else:
                mu_norm = np.linalg.norm(st.means, axis=1)
                errs = []
                for meas, pred in ((w_norm, w_pred), (mu_norm, mu_pred)):
                    ok = np.isfinite(pred) & (n > 0)
                    scale = np.maximum(np.abs(pred[ok]), 1e-12)
                    errs.append(np.abs(meas[ok] - pred[ok]) / scale)
                allerr = np.concatenate(errs)
                ev.length_err = float(allerr.max()) if allerr.size else None
        else:
            ev.length_note = "pass --loss mse --wd-features λ_H --wd-classifier λ_W"
    return ev


# ------------------------------------------------------------------ claims
@dataclass
class _Paper:
    key: str
    ev: Evidence
    rows: list[dict[str, str]] = field(default_factory=list)
    hyp: list[str] = field(default_factory=list)
    con: list[bool | None] = field(default_factory=list)

    def hypothesis(self, claim: str, status: str, measured: str, expected: str) -> None:
        self.hyp.append(status)
        self.rows.append(self._row(f"hypothesis: {claim}", measured, expected, status))

    def info(self, claim: str, measured: str) -> None:
        self.rows.append(self._row(f"setting: {claim}", measured, "", "info"))

    def conclusion(
        self, claim: str, value: float | None, expected: str, ok: bool | None, shown: str = ""
    ) -> None:
        applies = FAILS not in self.hyp
        self.con.append(ok)
        if ok is None:
            verdict = UNKNOWN
        elif applies:
            verdict = "agrees" if ok else "disagrees"
        else:
            verdict = "holds (not predicted)" if ok else "does not hold (not predicted)"
        measured = shown or _fmt(value)
        self.rows.append(self._row(f"predicts: {claim}", measured, expected, verdict))

    def overall(self) -> None:
        n_h = len(self.hyp)
        fails = self.hyp.count(FAILS)
        unknown = self.hyp.count(UNKNOWN)
        known = [c for c in self.con if c is not None]
        agree = sum(bool(c) for c in known)
        measured = (
            f"hypotheses: {n_h - fails - unknown}/{n_h} hold"
            + (f", {fails} fail" if fails else "")
            + (f", {unknown} unknown" if unknown else "")
            + f"; conclusions: {agree}/{len(self.con)} observed"
        )
        if fails:
            verdict = "not applicable"
        elif unknown:
            verdict = "undetermined"
        elif len(known) < len(self.con):
            verdict = "undetermined"
        else:
            verdict = "consistent" if agree == len(self.con) else "inconsistent"
        self.rows.append(self._row("overall", measured, "", verdict))

    def _row(self, claim: str, measured: str, expected: str, verdict: str) -> dict[str, str]:
        return {
            "source": self.ev.source,
            "paper": PAPERS[self.key],
            "claim": claim,
            "measured": measured,
            "expected": expected,
            "verdict": verdict,
        }


def _status(ok: bool | None) -> str:
    return UNKNOWN if ok is None else (HOLDS if ok else FAILS)


def _le(v: float | None, thr: float) -> bool | None:
    return None if v is None else v <= thr


def _common_error(p: _Paper) -> None:
    ev = p.ev
    err = None if ev.acc is None else 1.0 - ev.acc
    measured = "no classifier" if err is None else f"acc {ev.acc:.4f} (error {err:.2%})"
    p.hypothesis(
        "training error ≈ 0 (terminal phase)",
        _status(_le(err, THRESHOLDS["train_error"])),
        measured,
        f"error ≤ {THRESHOLDS['train_error']:.0%}",
    )


def _balance(p: _Paper, want: bool = True) -> None:
    ev = p.ev
    r = ev.imbalance
    measured = "a class has no samples" if r is None else f"max/min n_k = {_fmt(r)}"
    ok = ev.balanced if want else (None if ev.balanced is None else not ev.balanced)
    p.hypothesis(
        "classes balanced" if want else "classes imbalanced",
        _status(ok),
        measured,
        f"max/min n_k {'≤' if want else '>'} {THRESHOLDS['imbalance']}",
    )


def _loss(p: _Paper, want: tuple[str, ...]) -> None:
    ev = p.ev
    ok = None if ev.loss is None else ev.loss in want
    p.hypothesis(
        f"loss is {' or '.join(w.upper() for w in want)}",
        _status(ok),
        "not given (--loss)" if ev.loss is None else ev.loss.upper(),
        "/".join(w.upper() for w in want),
    )


def _wd(ev: Evidence) -> tuple[bool | None, str]:
    vals = [ev.wd_features, ev.wd_classifier]
    if all(v is None for v in vals):
        return None, "not given (--wd-features, --wd-classifier)"
    shown = f"λ_H={_fmt(ev.wd_features)}, λ_W={_fmt(ev.wd_classifier)}".replace("nan", "?")
    if any(v is None for v in vals):
        return (False if any(v == 0 for v in vals) else None), shown
    return all(v > 0 for v in vals), shown


def _nc_conclusions(p: _Paper, sets: Sequence[MetricSet], where: str) -> None:
    t = THRESHOLDS
    v = _worst(sets, "nc1")
    p.conclusion(f"NC1 within-class collapse ({where})", v, f"nc1 ≤ {t['nc1']}", _le(v, t["nc1"]))
    v = _worst(sets, "nc2_etf_dist_means")
    p.conclusion(
        f"NC2 centred means form a simplex ETF ({where})",
        v,
        f"nc2_etf_dist_means ≤ {t['etf_dist']}",
        _le(v, t["etf_dist"]),
    )
    v = _worst(sets, "nc2_etf_dist_classifier")
    p.conclusion(
        f"NC2 classifier rows form a simplex ETF ({where})",
        v,
        f"nc2_etf_dist_classifier ≤ {t['etf_dist']}",
        _le(v, t["etf_dist"]),
    )
    v = _worst(sets, "nc3")
    p.conclusion(f"NC3 self-duality ({where})", v, f"nc3 ≤ {t['nc3']}", _le(v, t["nc3"]))


def _bias_text(ev: Evidence) -> str:
    return {None: "no classifier", True: "no (bias-free)", False: "yes"}[ev.bias_free]


def _zhu(ev: Evidence) -> _Paper:
    p = _Paper("zhu", ev)
    _loss(p, ("ce",))
    ok, shown = _wd(ev)
    p.hypothesis("weight decay on features and classifier", _status(ok), shown, "λ_H, λ_W > 0")
    _balance(p)
    _common_error(p)
    _nc_conclusions(p, [ev.top] if ev.top is not None else [], "classifier input")
    p.overall()
    return p


def _han(ev: Evidence) -> _Paper:
    p = _Paper("han", ev)
    _loss(p, ("mse",))
    bias = None if ev.bias_free is None else not ev.bias_free
    p.hypothesis("classifier has a bias", _status(bias), _bias_text(ev), "yes")
    _balance(p)
    _common_error(p)
    v = _num(ev.top, "mse_dev_frac")
    p.conclusion(
        "classifier stays near the least-squares one (term B negligible)",
        v,
        f"mse_dev_frac ≤ {THRESHOLDS['mse_dev_frac']}",
        _le(v, THRESHOLDS["mse_dev_frac"]),
    )
    _nc_conclusions(p, [ev.top] if ev.top is not None else [], "classifier input")
    p.overall()
    return p


def _dang(ev: Evidence) -> _Paper:
    t = THRESHOLDS
    p = _Paper("dang", ev)
    p.info("head depth M (linear layers incl. classifier)", str(ev.depth))
    p.info("bias in the head", _bias_text(ev))
    _loss(p, ("mse", "ce"))
    # which theorem covers the run: balanced (MSE or CE) → ETF; bias-free MSE → orthogonal frame
    orthogonal = ev.bias_free is True and ev.loss == "mse"
    if ev.bias_free is None or ev.balanced is None:
        covered = None
    elif ev.loss is None:
        covered = True if ev.balanced else None
    else:
        covered = orthogonal or ev.balanced
    regime = "orthogonal frame (bias-free MSE)" if orthogonal else "simplex ETF (balanced)"
    p.hypothesis(
        "setting covered (balanced classes, or bias-free MSE)",
        _status(covered),
        f"{'balanced' if ev.balanced else 'imbalanced'}, bias {_bias_text(ev)}",
        "balanced, or bias-free with --loss mse",
    )
    _common_error(p)
    v = _worst(ev.chain, "nc1")
    p.conclusion("NC1 at every layer of the head", v, f"nc1 ≤ {t['nc1']}", _le(v, t["nc1"]))
    if len(ev.chain) >= 2:
        v = _worst(ev.chain[1:], "balancedness_l")
        p.conclusion(
            "the linear layers are balanced",
            v,
            f"balancedness_l ≤ {t['balancedness']}",
            _le(v, t["balancedness"]),
        )
    if orthogonal:
        v = _worst(ev.chain, "of_maxcos_means")
        p.conclusion(
            f"class means form an {regime} at every layer",
            v,
            f"of_maxcos_means ≤ {t['of_maxcos']}",
            _le(v, t["of_maxcos"]),
        )
        v = _worst(ev.chain, "of_maxcos_classifier")
        p.conclusion(
            "classifier rows are orthogonal",
            v,
            f"of_maxcos_classifier ≤ {t['of_maxcos']}",
            _le(v, t["of_maxcos"]),
        )
        if ev.length_err is not None:
            p.conclusion(
                "per-class lengths ||w_k||, ||μ_k|| follow the closed form",
                ev.length_err,
                f"max relative error ≤ {t['length_rtol']:.0%}",
                ev.length_err <= t["length_rtol"],
                shown=f"max relative error {ev.length_err:.2%}",
            )
        elif ev.w_monotone is not None:
            p.conclusion(
                "larger classes have longer classifier rows",
                None,
                "||w_k|| grows with n_k",
                ev.w_monotone,
                shown="yes" if ev.w_monotone else "no",
            )
    else:
        _nc_conclusions(p, ev.chain[-1:], "classifier input")
        v = _worst(ev.chain, "nc2_etf_dist_means")
        p.conclusion(
            "centred means form a simplex ETF at every layer",
            v,
            f"nc2_etf_dist_means ≤ {t['etf_dist']}",
            _le(v, t["etf_dist"]),
        )
    p.overall()
    return p


def _jacot(ev: Evidence) -> _Paper:
    t = THRESHOLDS
    p = _Paper("jacot", ev)
    deep_ok = None if ev.depth is None else ev.depth >= 2
    p.hypothesis(
        "the network ends in ≥ 2 linear layers", _status(deep_ok), f"M = {ev.depth}", "M ≥ 2"
    )
    ok, shown = _wd(ev)
    p.hypothesis("trained with weight decay", _status(ok), shown, "λ > 0")
    _common_error(p)
    v = _worst(ev.chain[1:], "balancedness_l") if len(ev.chain) >= 2 else None
    p.hypothesis(
        "the linear layers are balanced",
        _status(_le(v, t["balancedness"])),
        _fmt(v) if v is not None else "no pair of linear layers cached",
        f"balancedness_l ≤ {t['balancedness']}",
    )
    v = _num(ev.bottom, "cond_l")
    p.hypothesis(
        "bounded conditioning of the features before the linear head",
        _status(_le(v, t["cond"])),
        f"cond_l = {_fmt(v)}",
        f"cond_l ≤ {t['cond']:g}",
    )
    v = _num(ev.top, "nc1")
    p.conclusion("NC1 at the classifier input", v, f"nc1 ≤ {t['nc1']}", _le(v, t["nc1"]))
    v = _num(ev.top, "of_maxcos_means")
    p.conclusion(
        "NC2: class means are orthogonal",
        v,
        f"of_maxcos_means ≤ {t['of_maxcos']}",
        _le(v, t["of_maxcos"]),
    )
    v = ev.align_cos
    p.conclusion(
        "NC3: classifier rows aligned with the class means",
        v,
        f"mean cos(w_k, μ_k) ≥ {t['align_cos']}",
        None if v is None else v >= t["align_cos"],
    )
    p.overall()
    return p


def theory_rows(source: Source, opts: MeasureOptions) -> list[dict[str, str]]:
    """The report rows of one opened source."""
    ev = _gather(source, opts)
    rows: list[dict[str, str]] = []
    for build in (_zhu, _han, _dang, _jacot):
        rows.extend(build(ev).rows)
    return rows


def theory_report(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    loss: str | None = None,
    wd_features: float | None = None,
    wd_classifier: float | None = None,
    head_depth: int | None = None,
    center: str = "global",
    recompute: bool = False,
    num_classes: int | None = None,
    chunk_rows: int = 8192,
    min_class_count: int = 1,
) -> pd.DataFrame:
    """The theory report of each input as a frame with :data:`COLUMNS` (all strings)."""
    return theory_table(
        paths,
        loss=loss,
        wd_features=wd_features,
        wd_classifier=wd_classifier,
        head_depth=head_depth,
        center=center,
        recompute=recompute,
        num_classes=num_classes,
        chunk_rows=chunk_rows,
        min_class_count=min_class_count,
    ).to_frame()


def theory_table(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], **options: Any
) -> Rows:
    """:func:`theory_report` without pandas (what ``measure --report theory`` writes): the
    same keywords, a :class:`~nccli.table.Rows` back (``attrs["notes"]``: the notes)."""
    opts = MeasureOptions(**options)
    rows: list[dict[str, str]] = []
    with opened_sources(paths, opts) as sources:
        for src in sources:
            rows.extend(theory_rows(src, opts))
    out = Rows.from_records(rows, COLUMNS)
    out.attrs["notes"] = list(opts.notes)  # the classes left out (nccli.classes)
    return out
