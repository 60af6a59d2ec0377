"""Build ``sample_data/``: four small training runs on scikit-learn's digits, with checkpoints.

    python scripts/make_sample_data.py                    # the committed sample_data/ (~1 min)
    python scripts/make_sample_data.py --quick --out tmp  # a tiny version in seconds (tests;
                                                          # --out is required with --quick)
    python scripts/make_sample_data.py --report           # measure the committed files

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes), pixels scaled by 1/16,
a fixed stratified 80/20 train/test split (``digits_train.npz``/``digits_test.npz``, arrays
``x`` float32 (N, 64) and ``y`` int64), and for run 3 a subsample of the train split whose
class sizes fall geometrically 10:1 from class 0 to class 9 (``digits_train_imbalanced.npz``).

Runs (zoo MLPs; SGD with momentum 0.9, batch 64, weight decay on every parameter, 5 warm-up
epochs then a cosine decay of the learning rate to 0; He-normal body, orthogonal head init):

1. ``run1_ce``      cross-entropy + weight decay; ReLU body 64-256-256-128, a deep linear
                    head of two 128-wide Linear layers with bias, then the classifier;
2. ``run2_mse``     the same model with MSE loss on one-hot targets + weight decay;
3. ``run3_mse_imb`` MSE, bias-free head (head layers and classifier have no bias) on the
                    imbalanced subset;
4. ``run4_ce_etf``  cross-entropy with a fixed simplex-ETF classifier; the feature entering
                    the classifier has dimension 10 (= number of classes).

Checkpoints ``<run>/epNNNN.pt`` (``{"state_dict", "epoch", "arch", "run", ...}``) are saved at
the epochs in ``EPOCHS``; epoch 0 is the initialisation.  ``runs.json`` records, per run,
the ``--arch`` spec for ``nccli extract``, the data file, loss, weight decay, learning rate,
epochs and the train/test accuracy and loss at every saved epoch.

Determinism: every run seeds its own generators, training runs on the CPU with one thread
and ``torch.use_deterministic_algorithms(True)``, so two invocations on the same machine
write identical weights (float results can differ in the last bits across CPU types).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from nccli import zoo  # noqa: E402

K = 10
EPOCHS = [0, 5, 20, 50, 100, 200, 400]
QUICK_EPOCHS = [0, 1, 3]
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMBALANCE_RATIO = 10.0  # n_0 / n_9 in the imbalanced subset


@dataclass
class RunConfig:
    """One training run: what goes into ``runs.json`` besides its measured history."""

    name: str
    description: str
    arch: str
    data: str
    loss: str
    wd: float
    lr: float
    momentum: float
    batch_size: int
    epochs: list[int]
    schedule: str = "cosine"
    init: str = "he"
    warmup: int = 5
    lr_floor: float = 0.0
    seed: int = 0
    checkpoints: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def mlp_arch(
    widths: list[int], head_depth: int, head_width: int, *, bias: bool = True, etf: bool = False
) -> str:
    """The zoo spec of a digits MLP (what ``nccli extract --arch`` takes)."""
    kw: dict[str, Any] = {
        "in_dim": 64,
        "widths": widths,
        "num_classes": K,
        "head_depth": head_depth,
        "head_width": head_width,
    }
    if not bias:
        kw["head_bias"] = False
        kw["classifier_bias"] = False
    if etf:
        kw["etf_classifier"] = True
    return zoo.format_arch("mlp", kw)


def run_configs(quick: bool) -> list[RunConfig]:
    """The four runs (tiny widths and three epochs with ``quick``).

    Hyper-parameters were tuned so that every run reaches 100% training accuracy and
    collapses (see ``sample_data/README.md``).  Run 1 uses a weight decay of 1e-4: with
    1e-3 the deep linear head's low-rank bias shrinks the between-class spectrum of the
    classifier input to a few directions late in training and nc1 climbs back up (1.09
    -> 0.10 at epoch 20 -> 0.23 at epoch 400).
    """
    widths, head = ([32, 32, 16], 16) if quick else ([256, 256, 128], 128)
    epochs = QUICK_EPOCHS if quick else EPOCHS
    common = dict(momentum=0.9, batch_size=64, epochs=epochs)
    return [
        RunConfig(
            "run1_ce",
            "cross-entropy + weight decay, 3-layer deep linear head with bias",
            mlp_arch(widths, 2, head),
            "digits_train.npz",
            "ce",
            wd=1e-4,
            lr=0.1,
            seed=1,
            **common,
        ),
        RunConfig(
            "run2_mse",
            "MSE (one-hot targets) + weight decay, same model as run1",
            mlp_arch(widths, 2, head),
            "digits_train.npz",
            "mse",
            wd=1e-3,
            lr=0.1,
            seed=2,
            **common,
        ),
        RunConfig(
            "run3_mse_imb",
            "MSE + weight decay, bias-free deep linear head, classes imbalanced 10:1",
            mlp_arch(widths, 2, head, bias=False),
            "digits_train_imbalanced.npz",
            "mse",
            wd=1e-3,
            lr=0.1,
            seed=3,
            **common,
        ),
        RunConfig(
            "run4_ce_etf",
            "cross-entropy + weight decay, fixed simplex-ETF classifier, feature dim = K = 10",
            mlp_arch(widths, 1, K, etf=True),
            "digits_train.npz",
            "ce",
            wd=5e-5,
            lr=0.2,
            seed=4,
            **common,
        ),
    ]


# ------------------------------------------------------------------------------------- data
def make_datasets(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the train/test/imbalanced ``.npz`` files and return them by file name."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    idx = np.arange(y.size)
    tr, te = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED, shuffle=True
    )
    tr, te = np.sort(tr), np.sort(te)
    sets = {
        "digits_train.npz": (x[tr], y[tr]),
        "digits_test.npz": (x[te], y[te]),
        "digits_train_imbalanced.npz": imbalanced_subset(x[tr], y[tr]),
    }
    for name, (xs, ys) in sets.items():
        np.savez_compressed(out / name, x=xs, y=ys)
    return sets


def imbalanced_sizes(available: np.ndarray, ratio: float = IMBALANCE_RATIO) -> np.ndarray:
    """Class sizes falling geometrically by ``ratio`` from class 0 to class K-1."""
    top = int(available.min())
    steps = np.arange(available.size) / (available.size - 1)
    return np.maximum(2, np.round(top * ratio**-steps)).astype(np.int64)


def imbalanced_subset(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subsample of the train split with class sizes from :func:`imbalanced_sizes`."""
    rng = np.random.default_rng(SPLIT_SEED)
    sizes = imbalanced_sizes(np.bincount(y, minlength=K))
    keep = np.concatenate(
        [rng.choice(np.flatnonzero(y == k), size=n, replace=False) for k, n in enumerate(sizes)]
    )
    keep = np.sort(keep)
    return x[keep], y[keep]


# --------------------------------------------------------------------------------- training
def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or MSE ``(1/2N) Σ_i ||f(x_i) - e_{y_i}||²`` (docs/metrics.md's scaling)."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(dim=1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on the full arrays."""
    model.eval()
    logits = model(x)
    return float(loss_fn(kind, logits, y)), float((logits.argmax(1) == y).float().mean())


def lr_schedule(
    opt: torch.optim.Optimizer, kind: str, warmup: int, epochs: int, floor: float = 0.0
) -> Any:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to ``floor`` x the base
    rate at ``epochs`` (``kind="cosine"``) or a constant rate (``kind="constant"``)."""

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        t = (epoch - warmup) / max(epochs - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def initialise(model: nn.Module, how: str) -> None:
    """``"he"``: He-normal body, orthogonal (norm-preserving) head; ``"default"``: PyTorch's.

    PyTorch's default ``nn.Linear`` init shrinks activations by about sqrt(3) per layer,
    so a deep *linear* head starts near zero and learns its singular directions one at a
    time (a low-rank start the weight decay then keeps); a norm-preserving init avoids it.
    """
    if how == "default":
        return
    for module in model.body:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    for module in model.head:
        nn.init.orthogonal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if model.classifier.weight.requires_grad:
        nn.init.normal_(model.classifier.weight, std=model.classifier.in_features**-0.5)
        if model.classifier.bias is not None:
            nn.init.zeros_(model.classifier.bias)


def save_checkpoint(model: nn.Module, cfg: RunConfig, epoch: int, folder: Path) -> Path:
    path = folder / f"ep{epoch:04d}.pt"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "epoch": epoch,
            "arch": cfg.arch,
            "run": cfg.name,
            "loss": cfg.loss,
            "wd": cfg.wd,
        },
        path,
    )
    return path


def train(
    cfg: RunConfig, sets: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, log: Any
) -> RunConfig:
    """Train one run, saving a checkpoint at every epoch of ``cfg.epochs``."""
    torch.manual_seed(cfg.seed)
    model = zoo.build(cfg.arch)
    initialise(model, cfg.init)
    xs, ys = sets[cfg.data]
    xt, yt = sets["digits_test.npz"]
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    x_test, y_test = torch.from_numpy(xt), torch.from_numpy(yt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    last = cfg.epochs[-1]
    sched = lr_schedule(opt, cfg.schedule, cfg.warmup, last, cfg.lr_floor)
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    folder = out / cfg.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg.checkpoints, cfg.history = [], []
    for epoch in range(last + 1):
        if epoch > 0:
            model.train()
            order = torch.randperm(y.numel(), generator=gen)
            for start in range(0, y.numel(), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(cfg.loss, model(x[batch]), y[batch]).backward()
                opt.step()
            sched.step()
        if epoch in cfg.epochs:
            path = save_checkpoint(model, cfg, epoch, folder)
            cfg.checkpoints.append(str(path.relative_to(out)))
            tr_loss, tr_acc = evaluate(model, cfg.loss, x, y)
            te_loss, te_acc = evaluate(model, cfg.loss, x_test, y_test)
            cfg.history.append(
                {
                    "epoch": epoch,
                    "train_loss": round(tr_loss, 6),
                    "train_acc": round(tr_acc, 6),
                    "test_loss": round(te_loss, 6),
                    "test_acc": round(te_acc, 6),
                }
            )
            print(
                f"{cfg.name:>13} ep {epoch:4d}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
                f"test acc {te_acc:.4f}",
                file=log,
                flush=True,
            )
    return cfg


def dump_json(obj: Any) -> str:
    """``json.dumps(indent=2)`` with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2)
    return (
        re.sub(
            r"\[\s*([-0-9.e,\s]+?)\s*\]",
            lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
            text,
        )
        + "\n"
    )


def generate(out: Path, quick: bool, log: Any = sys.stderr) -> dict[str, Any]:
    """Write datasets, checkpoints and ``runs.json`` under ``out``; return the manifest."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sets = make_datasets(out)
    runs = [train(cfg, sets, out, log) for cfg in run_configs(quick)]
    counts = {name: np.bincount(ys, minlength=K).tolist() for name, (_, ys) in sets.items()}
    manifest = {
        "description": "Neural Collapse sample runs on scikit-learn digits (see README.md)",
        "generator": "scripts/make_sample_data.py" + (" --quick" if quick else ""),
        "num_classes": K,
        "preprocessing": "pixels / 16 (float32, 64 features); no mean/std normalisation",
        "split": {"test_fraction": TEST_FRACTION, "stratified": True, "seed": SPLIT_SEED},
        "class_counts": counts,
        "torch_version": torch.__version__,
        "runs": {cfg.name: {k: v for k, v in asdict(cfg).items() if k != "name"} for cfg in runs},
    }
    (out / "runs.json").write_text(dump_json(manifest))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=log)
    return manifest


# ---------------------------------------------------------------------------------- report
def head_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every head layer and of the classifier, keyed by module name (the
    names ``nccli extract`` gives these layers: ``head.0`` is the penultimate feature)."""
    feats: dict[str, torch.Tensor] = {}
    handles = []
    layers = [(f"head.{i}", m) for i, m in enumerate(model.head)]
    layers.append(("classifier", model.classifier))
    for name, module in layers:

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            feats[name] = args[0].detach().to(torch.float64)

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return feats


def measure_run(folder: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per checkpoint of ``run``: nc1 of every head layer's input, train/test accuracy,
    and at the classifier input ``of_maxcos`` and the per-class lengths."""
    from nccli.metrics import geometry, nc
    from nccli.stats import ClassStats

    data = np.load(folder / run["data"])
    test = np.load(folder / "digits_test.npz")
    x, y = torch.from_numpy(data["x"]), data["y"]
    out = []
    for ckpt in run["checkpoints"]:
        obj = torch.load(folder / ckpt, weights_only=True)
        model = zoo.build(run["arch"])
        model.load_state_dict(obj["state_dict"])
        with torch.no_grad():
            train_acc = float((model(x).argmax(1).numpy() == y).mean())
            test_acc = float(
                (model(torch.from_numpy(test["x"])).argmax(1).numpy() == test["y"]).mean()
            )
        row: dict[str, Any] = {
            "epoch": obj["epoch"],
            "train_acc": train_acc,
            "test_acc": test_acc,
            "nc1": {},
        }
        for layer, h in head_features(model, x).items():
            stats = ClassStats.from_arrays(h, y, num_classes=K)
            row["nc1"][layer] = nc.nc1(stats)
            if layer == "classifier":
                w = model.classifier.weight.detach().double().numpy()
                row["of_maxcos_means"] = geometry.of_maxcos_means(stats)
                row["of_maxcos_classifier"] = geometry.of_maxcos_classifier(w)
                row["n_k"] = stats.counts
                row["mu_norm"] = np.linalg.norm(stats.means, axis=1)
                row["w_norm"] = np.linalg.norm(w, axis=1)
                row["cos_w_mu"] = np.sum(w * stats.means, axis=1) / (row["w_norm"] * row["mu_norm"])
        out.append(row)
    return out


def report(folder: Path) -> str:
    """Markdown tables of every run, measured with nccli from the files in ``folder``."""
    from nccli.metrics import geometry

    manifest = json.loads((folder / "runs.json").read_text())
    measured = {name: measure_run(folder, run) for name, run in manifest["runs"].items()}
    layers = ["head.0", "head.1", "classifier"]
    lines = [
        "| run | train acc | test acc | "
        + " | ".join(f"nc1 `{layer}`" for layer in layers)
        + " | of_maxcos_means |",
        "|---|---|---|" + "---|" * len(layers) + "---|",
    ]
    for name, rows in measured.items():
        a, b = rows[0], rows[-1]
        cells = [
            f"{a['nc1'][la]:.3g} → {b['nc1'][la]:.3g}" if la in a["nc1"] else "—" for la in layers
        ]
        lines.append(
            f"| {name} | {a['train_acc']:.3f} → {b['train_acc']:.3f} | "
            f"{a['test_acc']:.3f} → {b['test_acc']:.3f} | "
            + " | ".join(cells)
            + f" | {a['of_maxcos_means']:.3f} → {b['of_maxcos_means']:.3f} |"
        )
    epochs = [r["epoch"] for r in next(iter(measured.values()))]
    lines += ["", "| nc1 at `classifier` | " + " | ".join(f"ep {e}" for e in epochs) + " |"]
    lines.append("|---|" + "---|" * len(epochs))
    for name, rows in measured.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{r['nc1']['classifier']:.4g}" for r in rows) + " |"
        )
    for key in ("of_maxcos_means", "of_maxcos_classifier"):
        rows = measured["run3_mse_imb"]
        lines.append(f"| run3 {key} | " + " | ".join(f"{r[key]:.3f}" for r in rows) + " |")
    run3 = manifest["runs"]["run3_mse_imb"]
    last = measured["run3_mse_imb"][-1]
    depth = parse_head_depth(run3["arch"]) + 1
    w_pred, mu_pred = geometry.predict_layer_lengths(
        last["n_k"], run3["wd"], run3["wd"], depth, depth - 1
    )
    lines += [
        "",
        "| class | n_k | ‖μ_k‖ | predicted ‖μ_k‖ | ‖w_k‖ | predicted ‖w_k‖ | cos(w_k, μ_k) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in range(K):
        lines.append(
            f"| {k} | {last['n_k'][k]} | {last['mu_norm'][k]:.3f} | {mu_pred[k]:.3f} | "
            f"{last['w_norm'][k]:.3f} | {w_pred[k]:.3f} | {last['cos_w_mu'][k]:.3f} |"
        )
    return "\n".join(lines)


def parse_head_depth(arch: str) -> int:
    """``head_depth`` of a zoo spec (0 when absent)."""
    return int(zoo.parse_arch(arch)[1].get("head_depth", 0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: sample_data/)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny widths, 3 epochs (seconds)")
    parser.add_argument(
        "--report", action="store_true", help="only print measured numbers of --out's runs"
    )
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out DIR (it must not overwrite the committed sample_data/)")
    out = ROOT / "sample_data" if args.out is None else args.out
    if args.report:
        print(report(out))
        return
    generate(out, args.quick)


if __name__ == "__main__":
    main()
