"""Arranging ``compare``'s rows: one frame in display order, the ``--by run`` deltas, the
``--fit depth`` rows, layers lined up by role, repeated notes merged, and the public
columns (:mod:`nccli.compare` is the use case that calls these)."""

from __future__ import annotations

import pandas as pd

from nccli.compare.depth import FIT_SUFFIXES, depth_fits
from nccli.compare.thresholds import DELTA_PREFIX
from nccli.heldout import TRAIN

__all__ = [
    "ONE_LAYER_ROLES",
    "arrange",
    "collapse_notes",
    "label_by_role",
    "public_columns",
    "with_fits",
]


#: roles that pick one layer per source, so sources can be lined up by them
ONE_LAYER_ROLES = ("penultimate", "classifier")


def label_by_role(frames: list[pd.DataFrame], layers: list[str] | None, notes: list[str]) -> None:
    """``--layer penultimate`` / ``--layer classifier`` across models that name that layer
    differently (``fc``, ``classifier``, ``head.0``): label the rows by the role so the
    runs line up (tables, deltas, the plot), and say which layer each source gave."""
    if not layers or len(layers) != 1 or layers[0] not in ONE_LAYER_ROLES:
        return
    role = layers[0]
    first: dict[str, str] = {}  # layer name → the first run or source that has it
    for df in frames:
        for who, layer in zip(df["run"], df["layer"], strict=True):
            first.setdefault(str(layer), str(who))
    if len(first) < 2:
        return
    for df in frames:
        df["layer"] = role
    which = ", ".join(f"{name} ({who})" for name, who in first.items())
    notes.append(f"--layer {role} is {which} in these models: rows are labelled {role}")


def arrange(
    frames: list[pd.DataFrame],
    names: list[str],
    by_run: bool,
    baseline: str | None,
    notes: list[str],
) -> pd.DataFrame:
    """One frame, with the ``delta_`` rows for ``by="run"``, sorted for display: by run,
    checkpoint, layer, metric (or by epoch first, runs side by side, with ``by="run"``)."""
    data = pd.concat(frames, ignore_index=True)
    data["step"] = data["step"].astype("Int64")
    data["epoch"] = data["epoch"].astype("Int64")
    metric_rank = {m: i for i, m in enumerate(names)}
    metric_rank.update({DELTA_PREFIX + m: len(names) + i for i, m in enumerate(names)})
    if by_run:
        deltas = _deltas(data, baseline, names, notes)
        if not deltas.empty:
            data = pd.concat([data, deltas], ignore_index=True)
        order = ["epoch", "step", "_run", "_lr", "_mr"]
    else:
        order = ["_run", "_ck", "_lr", "_mr"]
    data["_mr"] = data["metric"].map(metric_rank)
    return data.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)


def with_fits(data: pd.DataFrame, names: list[str], notes: list[str]) -> pd.DataFrame:
    """``data`` with each checkpoint's depth-fit rows after its layers (:mod:`.depth`)."""
    fits = depth_fits(data, names, notes)
    if fits.empty:
        return data
    fits["_lr"] = len(data)  # after every layer of the checkpoint
    # each metric's slope, ratio, r2 together, in the order of the metrics
    rank = {
        m + s: len(names) + len(FIT_SUFFIXES) * j + i
        for j, m in enumerate(names)
        for i, s in enumerate(FIT_SUFFIXES)
    }
    fits["_mr"] = fits["metric"].map(rank)
    out = pd.concat([data, fits], ignore_index=True)
    return out.sort_values(["_run", "_ck", "_lr", "_mr"], kind="stable").reset_index(drop=True)


def public_columns(data: pd.DataFrame, *, keep_run: bool) -> pd.DataFrame:
    """The tidy columns (``run`` only when ``keep_run``, ``step`` only when any is set,
    ``split`` only when the inputs hold more than one split or a held-out one)."""
    keep_step = bool(data["step"].notna().any())
    splits = set(data["split"].dropna()) if "split" in data.columns else set()
    keep_split = len(splits) > 1 or bool(splits - {TRAIN})
    cols = [
        c
        for c in ("source", "run", "split", "epoch", "step", "layer", "metric", "value")
        if (c != "run" or keep_run) and (c != "step" or keep_step) and (c != "split" or keep_split)
    ]
    return data[cols].copy()


def collapse_notes(notes: list[str], labels: list[str]) -> list[str]:
    """Merge ``"<source> <layer>: <why>"`` notes that repeat for many checkpoints."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        src = next((lab for lab in labels if note.startswith(lab + " ")), None)
        key = note if src is None else note[len(src) + 1 :]
        groups.setdefault(key, []).append(src or "")
    out = []
    for key, srcs in groups.items():
        if len(srcs) == 1:
            out.append(f"{srcs[0]} {key}".strip())
        else:
            more = f", … {len(srcs) - 3} more" if len(srcs) > 3 else ""
            out.append(f"{key} ({', '.join(srcs[:3])}{more})")
    return out


def _deltas(data: pd.DataFrame, baseline: str, names: list[str], notes: list[str]) -> pd.DataFrame:
    """``delta_<m>`` rows: each non-baseline run minus the baseline at the same epoch, layer."""
    base = data[data["run"] == baseline]
    ref = {
        (e, layer, m): v
        for e, layer, m, v in base[["epoch", "layer", "metric", "value"]].itertuples(
            index=False, name=None
        )
    }
    rows = []
    unmatched: dict[str, set] = {}
    for rec in data[data["run"] != baseline].to_dict("records"):
        key = (rec["epoch"], rec["layer"], rec["metric"])
        if rec["metric"] not in names:
            continue
        if key not in ref:
            unmatched.setdefault(rec["run"], set()).add(
                f"epoch {rec['epoch']} layer {rec['layer']}"
            )
            continue
        rows.append(
            {**rec, "metric": DELTA_PREFIX + rec["metric"], "value": rec["value"] - ref[key]}
        )
    for run, where in unmatched.items():
        shown = sorted(where)
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        notes.append(
            f"run {run}: no delta where baseline {baseline} has no matching checkpoint/layer "
            f"({'; '.join(shown[:5])}{more})"
        )
    return pd.DataFrame(rows, columns=data.columns)
