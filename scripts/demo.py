"""`make demo`: run nccli end to end and show Neural Collapse being measured.

Without sample checkpoints this writes synthetic "training run" feature files whose
within-class spread shrinks epoch by epoch (a Neural-Collapse-like trajectory) and
measures them with the real CLI.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_out"


def run(*args: str) -> None:
    """Run an nccli command, echoing it like a shell session."""
    print(f"\n$ nccli {' '.join(shlex.quote(a) for a in args)}", flush=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "110")}
    subprocess.run([sys.executable, "-m", "nccli", *args], check=True, env=env)


def synthetic_run(folder: Path, epochs: list[int], K: int = 10, d: int = 64, n_per: int = 100) -> list[Path]:
    """Features of a simplex-ETF-bound run: spread falls as 1/epoch, W aligns with the means."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    etf = np.sqrt(K / (K - 1)) * (np.eye(K) - 1.0 / K)
    basis, _ = np.linalg.qr(rng.normal(size=(d, K)))
    target = etf @ basis.T  # K × d simplex ETF
    start = rng.normal(size=(K, d))
    y = np.repeat(np.arange(K), n_per)
    paths = []
    for ep in epochs:
        t = ep / epochs[-1]
        means = (1 - t) * start + t * 4 * target
        spread = 1.5 / (1 + ep / 5)
        H = means[y] + spread * rng.normal(size=(y.size, d))
        W = (1 - t) * rng.normal(size=(K, d)) + t * target
        path = folder / f"synthetic_ep{ep:03d}.npz"
        np.savez(path, features=H.astype(np.float32), labels=y, weight=W, bias=np.zeros(K), epoch=ep)
        paths.append(path)
    return paths


def main() -> None:
    paths = synthetic_run(OUT / "synthetic", [0, 5, 20, 50, 100, 200, 400])
    run("measure", str(paths[-1]), "--format", "table")
    run("measure", str(paths[-1]), "--metrics", "nc1,nc4", "--format", "csv")


if __name__ == "__main__":
    main()
