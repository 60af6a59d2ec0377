"""What the attack tests share besides fixtures: the good inputs' shape and argv builders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"


@dataclass
class Good:
    root: Path
    data: Path  # .npz with x (N, D) float32, y (N,)
    ckpt: Path  # a state dict of ARCH
    cache: Path  # the finished cache of ckpt on data
    feats: Path  # a features file: features, labels, weight, bias


def extract_argv(
    ckpt: Path | str, data: Path | str, out: Path, *extra: str, arch: str | None = ARCH
) -> list[str]:
    """``nccli extract`` of ``ckpt`` on ``data`` into ``out`` on the CPU (``arch=None``:
    no ``--arch``)."""
    argv = ["extract", str(ckpt), "--data", str(data), "-o", str(out), "--device", "cpu"]
    return argv + ["-b", "16", *extra] + (["--arch", arch] if arch else [])
