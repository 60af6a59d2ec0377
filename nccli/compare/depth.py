"""``compare --across layers --fit depth``: how fast a metric decays through the network.

The "law of data separation" (He & Su 2022) finds that within-class variability falls by
a roughly constant *factor* per layer: ``log NC1(l) ≈ a + s·l`` with ``l`` the layer's
position in execution order (0 = the first layer compared).  For each checkpoint and
metric this module fits that line by ordinary least squares on the layers whose value is
finite and positive and reports

- ``<metric>_depth_slope`` = ``s`` (natural log per layer; negative: the metric falls),
- ``<metric>_depth_ratio`` = ``exp(s)``, the factor per layer (He & Su's ``ρ``),
- ``<metric>_depth_r2`` = ``1 − SS_res/SS_tot`` of the fit in log space.

A scale factor of the metric (``Tr(Σ_W Σ_B⁺)`` is ``K·nc1``) moves ``a``, not ``s``, so the
slope is the same for either convention.  Fewer than three usable layers give ``nan`` with
a note (two points always fit exactly; ``R²`` would say nothing).
"""

from __future__ import annotations

import math

import numpy as np

from nccli.choices import Fit
from nccli.table import Rows

__all__ = ["FIT_SUFFIXES", "MIN_LAYERS", "Fit", "depth_fits", "fit_log_line"]


#: the rows a fit adds per metric, in this order
FIT_SUFFIXES = ("_depth_slope", "_depth_ratio", "_depth_r2")
#: usable layers a fit needs
MIN_LAYERS = 3


def fit_log_line(values: np.ndarray) -> tuple[float, float, int]:
    """``(slope, R², n)`` of ``log v_l = a + s·l`` over the finite positive ``v_l``
    (``l`` = position in ``values``); ``nan`` slope and R² below :data:`MIN_LAYERS` points.

    ``R²`` is 1 when the points lie exactly on the line (including a flat line)."""
    v = np.asarray(values, dtype=np.float64)
    x = np.arange(v.size, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    n = int(ok.sum())
    if n < MIN_LAYERS:
        return math.nan, math.nan, n
    x, y = x[ok], np.log(v[ok])
    xc, yc = x - x.mean(), y - y.mean()
    slope = float(xc @ yc / (xc @ xc))
    resid = yc - slope * xc
    ss_tot, ss_res = float(yc @ yc), float(resid @ resid)
    scale = max(float(np.abs(y).max()), 1.0)
    # a flat line: no variance to explain, and none left unexplained
    r2 = 1.0 if ss_tot <= (1e-12 * scale) ** 2 * n else 1.0 - ss_res / ss_tot
    return slope, r2, n


def depth_fits(data: Rows, metrics: list[str], notes: list[str]) -> Rows:
    """The fit rows of each checkpoint (rows of ``data`` in depth order per checkpoint):
    columns of ``data`` with ``layer`` empty and metrics ``<m>_depth_slope/_ratio/_r2``."""
    keys = [c for c in ("run", "source") if c in data]
    rows: list[dict] = []
    short: dict[str, list[str]] = {}
    for _, part in data.groupby(keys):
        first = part.take([0]).records()[0]
        pairs = list(part.tuples(["metric", "value"]))
        for m in metrics:
            values = np.array([v for name, v in pairs if name == m], dtype=np.float64)
            if values.size == 0:
                continue
            slope, r2, n = fit_log_line(values)
            if n < MIN_LAYERS:
                short.setdefault(m, []).append(str(first["source"]))
            base = {c: first[c] for c in data.columns if c not in ("layer", "metric", "value")}
            for suffix, value in zip(
                FIT_SUFFIXES,
                (slope, math.exp(slope) if math.isfinite(slope) else math.nan, r2),
                strict=True,
            ):
                rows.append({**base, "layer": "", "metric": m + suffix, "value": value})
    for m, sources in short.items():
        few = ", ".join(sources[:3]) + (f", … {len(sources) - 3} more" if len(sources) > 3 else "")
        notes.append(
            f"--fit depth: {m} has fewer than {MIN_LAYERS} layers with a finite positive value "
            f"in {few}; its fit is nan"
        )
    return Rows.from_records(rows, data.columns, data.kinds)
