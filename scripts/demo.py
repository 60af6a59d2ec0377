"""`make demo`: nccli end to end on the committed sample runs (``sample_data/``).

Every step is the real CLI, echoed like a shell session; the steps run in this one
process through the Typer app (``nccli.cli.app``, the same code as the ``nccli`` command),
so the demo pays for Python, torch and the imports once rather than nine times:

1. ``nccli extract`` every checkpoint of the four sample runs into
   ``demo_out/cache/<run>/`` (finished caches are skipped, so a second demo is quick),
   run 1 also over the held-out test digits (``--eval-data``) and its last checkpoint
   with the hidden layers too (``demo_out/cache/run1_depth/``);
2. ``nccli measure`` the last checkpoint of run 1 (CE, deep linear head): every metric,
   every head layer;
3. ``nccli compare`` run 1's trajectory over its checkpoints, drawn to
   ``demo_out/nc_run1.png``;
4. ``nccli compare --across layers``: how collapse changes through run 1's linear head;
5. ``nccli compare --across runs``: the last checkpoint of each run side by side;
6. ``nccli measure --per-class`` on run 3 (MSE, bias-free head, imbalanced classes): the
   orthogonal-frame geometry and the closed-form lengths beside the measured ones;
7. ``nccli compare --across layers --fit depth``: collapse through the whole network,
   hidden layers and head, with the per-layer decay of log NC1 (``demo_out/nc_depth.png``);
8. ``nccli compare --by split``: train beside the held-out digits over run 1.

``sample_data/`` is made by ``scripts/make_sample_data.py`` (see ``sample_data/README.md``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sample_data"
OUT = ROOT / "demo_out"


def rel(path: Path) -> str:
    """``path`` relative to the repository root (shorter command lines)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def nccli(*args: str) -> None:
    """Run ``nccli ARGS`` in this process (from the repository root), echoing the command
    first; a failing step stops the demo with its exit code, as the shell would."""
    from nccli.cli import app
    from nccli.cli.core import library_warnings

    print(f"\n$ nccli {' '.join(shlex.quote(a) for a in args)}", flush=True)
    with library_warnings():
        code = app(args=list(args), prog_name="nccli", standalone_mode=False)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)


def heading(text: str) -> None:
    print(f"\n## {text}", flush=True)


def main() -> int:
    manifest_path = DATA / "runs.json"
    if not manifest_path.is_file():
        print(
            f"demo: {rel(manifest_path)} is missing; build the sample runs first with "
            "`python scripts/make_sample_data.py` (about 2 minutes on a CPU)",
            file=sys.stderr,
        )
        return 1
    runs = json.loads(manifest_path.read_text())["runs"]
    os.environ.setdefault("COLUMNS", "110")  # the tables' width, as in a terminal
    os.chdir(ROOT)  # the commands name paths relative to the repository root
    t0 = time.perf_counter()
    cache = OUT / "cache"

    heading("1. Extract features of every sample checkpoint (finished caches are skipped)")
    for name, run in runs.items():
        checkpoints = [rel(DATA / c) for c in run["checkpoints"]]
        # run 1 also over the held-out digits: cache/run1_ce/test/*.h5
        held_out = (
            ["--eval-data", f"test={rel(DATA / 'digits_test.npz')}"] if name == "run1_ce" else []
        )
        nccli(
            "extract",
            *checkpoints,
            "--data",
            rel(DATA / run["data"]),
            "--arch",
            run["arch"],
            *held_out,
            "-o",
            rel(cache / name),
        )
    depth = cache / "run1_depth"
    # the last checkpoint of run 1 with its hidden layers too (the ReLU outputs of the body)
    nccli(
        "extract",
        rel(DATA / runs["run1_ce"]["checkpoints"][-1]),
        "--data",
        rel(DATA / runs["run1_ce"]["data"]),
        "--arch",
        runs["run1_ce"]["arch"],
        "--layers",
        "body.1,body.3,auto",
        "-o",
        rel(depth),
    )

    run1 = cache / "run1_ce"
    last1 = run1 / Path(runs["run1_ce"]["checkpoints"][-1]).with_suffix(".h5").name
    heading("2. Every metric at the last checkpoint of run 1 (CE, 3-layer linear head)")
    nccli("measure", rel(last1), "--format", "table")

    heading("3. Run 1's trajectory over training, plotted")
    nccli("compare", rel(run1), "--format", "table", "--plot", rel(OUT / "nc_run1.png"))

    heading("4. Through run 1's deep linear head (last checkpoint)")
    nccli(
        "compare",
        rel(last1),
        "--across",
        "layers",
        "--metrics",
        "nc1,nc1_trace,nc3,cond_l,erank_l",
        "--format",
        "table",
    )

    heading("5. The last checkpoint of every run, at the classifier input")
    lasts = [
        cache / name / Path(run["checkpoints"][-1]).with_suffix(".h5").name
        for name, run in runs.items()
    ]
    nccli(
        "compare",
        *[rel(p) for p in lasts],
        "--across",
        "runs",
        "--layer",
        "classifier",
        "--metrics",
        "nc1,nc2_etf_dist_means,nc3,acc,of_maxcos_means",
        "--format",
        "table",
    )

    run3 = runs["run3_mse_imb"]
    last3 = cache / "run3_mse_imb" / Path(run3["checkpoints"][-1]).with_suffix(".h5").name
    heading("6. Run 3 (MSE, bias-free head, classes 10:1): orthogonal frame, per class")
    nccli(
        "measure",
        rel(last3),
        "--layer",
        "classifier",
        "--metrics",
        "geometry",
        "--per-class",
        "--loss",
        "mse",
        "--wd-features",
        str(run3["wd"]),
        "--wd-classifier",
        str(run3["wd"]),
        "--format",
        "table",
    )

    heading("7. Collapse through the whole network (run 1, last checkpoint): hidden layers + head")
    nccli(
        "compare",
        rel(depth),
        "--across",
        "layers",
        "--metrics",
        "nc1,nc1_trace,ncc_acc",
        "--fit",
        "depth",
        "--format",
        "table",
        "--plot",
        rel(OUT / "nc_depth.png"),
    )

    heading("8. Train against held-out test digits over run 1 (test NC4/NCC use the train means)")
    nccli(
        "compare",
        rel(run1),
        rel(run1 / "test"),
        "--by",
        "split",
        "--layer",
        "penultimate",
        "--metrics",
        "nc1,ncc_acc,acc",
        "--format",
        "table",
    )

    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; plot: {rel(OUT / 'nc_run1.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
