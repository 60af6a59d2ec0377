"""Arranging ``compare``'s rows: one frame in display order, the ``--by run`` deltas, the
``--fit depth`` rows, layers lined up by role, repeated notes merged, and the public
columns (:mod:`nccli.compare` is the use case that calls these).  The rows are
:class:`~nccli.table.Rows`: no pandas on the way from the caches to the output."""

from __future__ import annotations

from nccli.compare.depth import FIT_SUFFIXES, depth_fits
from nccli.compare.thresholds import DELTA_PREFIX
from nccli.heldout import TRAIN
from nccli.table import Rows, is_missing

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


def label_by_role(frames: list[Rows], layers: list[str] | None, notes: list[str]) -> None:
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
        df.data["layer"] = [role] * len(df)
    which = ", ".join(f"{name} ({who})" for name, who in first.items())
    notes.append(f"--layer {role} is {which} in these models: rows are labelled {role}")


def arrange(
    frames: list[Rows],
    names: list[str],
    by_run: bool,
    baseline: str | None,
    notes: list[str],
) -> Rows:
    """One frame, with the ``delta_`` rows for ``by="run"``, sorted for display: by run,
    checkpoint, layer, metric (or by epoch first, runs side by side, with ``by="run"``)."""
    data = Rows.concat(frames)
    metric_rank = {m: i for i, m in enumerate(names)}
    metric_rank.update({DELTA_PREFIX + m: len(names) + i for i, m in enumerate(names)})
    if by_run:
        deltas = _deltas(data, baseline, names, notes)
        if not deltas.empty:
            data = Rows.concat([data, deltas])
        order = ["epoch", "step", "_run", "_lr", "_mr"]
    else:
        order = ["_run", "_ck", "_lr", "_mr"]
    return data.with_column("_mr", data.map("metric", metric_rank)).sort(order)


def with_fits(data: Rows, names: list[str], notes: list[str]) -> Rows:
    """``data`` with each checkpoint's depth-fit rows after its layers (:mod:`.depth`)."""
    fits = depth_fits(data, names, notes)
    if fits.empty:
        return data
    fits = fits.with_column("_lr", [len(data)] * len(fits))  # after every layer
    # each metric's slope, ratio, r2 together, in the order of the metrics
    rank = {
        m + s: len(names) + len(FIT_SUFFIXES) * j + i
        for j, m in enumerate(names)
        for i, s in enumerate(FIT_SUFFIXES)
    }
    fits = fits.with_column("_mr", fits.map("metric", rank))
    return Rows.concat([data, fits]).sort(["_run", "_ck", "_lr", "_mr"])


def public_columns(data: Rows, *, keep_run: bool) -> Rows:
    """The tidy columns (``run`` only when ``keep_run``, ``step`` only when any is set,
    ``split`` only when the inputs hold more than one split or a held-out one)."""
    keep_step = not all(map(is_missing, data["step"]))
    splits = {s for s in data["split"] if not is_missing(s)} if "split" in data else set()
    keep_split = len(splits) > 1 or bool(splits - {TRAIN})
    cols = [
        c
        for c in ("source", "run", "split", "epoch", "step", "layer", "metric", "value")
        if (c != "run" or keep_run) and (c != "step" or keep_step) and (c != "split" or keep_split)
    ]
    return data.select(cols)


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


def _deltas(data: Rows, baseline: str, names: list[str], notes: list[str]) -> Rows:
    """``delta_<m>`` rows: each non-baseline run minus the baseline at the same epoch, layer."""
    base = data.where([r == baseline for r in data["run"]])
    ref = {
        (e, layer, m): v for e, layer, m, v in base.tuples(["epoch", "layer", "metric", "value"])
    }
    rows = []
    unmatched: dict[str, set] = {}
    for rec in data.where([r != baseline for r in data["run"]]).records():
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
    return Rows.from_records(rows, data.columns, data.kinds)
