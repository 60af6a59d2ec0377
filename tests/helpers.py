"""Plain helpers that several test modules share (the fixtures are in ``conftest.py``).

Every helper reproduces, value for value, what the modules wrote out before: the same
seeds, shapes, draw order and dtypes, so moving a test onto one changes no input.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

#: one ``CliRunner`` for every module that drives the Typer app in-process
runner = CliRunner()


# --------------------------------------------------------------------------- models
def seeded_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """``zoo.build(arch)`` right after ``torch.manual_seed(seed)``."""
    from nccli import zoo

    torch.manual_seed(seed)
    return zoo.build(arch)


def save_state_dict(path: Path, arch: str, *, wrap: bool = False, seed: int = 0) -> Path:
    """A state-dict checkpoint of :func:`seeded_model` at ``path`` (under a
    ``"state_dict"`` key with ``wrap``)."""
    state = seeded_model(arch, seed).state_dict()
    torch.save({"state_dict": state} if wrap else state, path)
    return path


# --------------------------------------------------------------------------- data
def cluster_data(
    n: int, d: int, k: int, seed: int, scale: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 inputs round ``k`` random class centres (``scale`` · N(0, 1)) with unit
    noise; labels ``arange(n) % k``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = (rng.normal(size=(k, d)) * scale)[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y


def write_cluster_npz(
    path: Path,
    n: int,
    d: int,
    k: int,
    seed: int,
    scale: float = 2.0,
    *,
    bad_row: int | None = None,
) -> Path:
    """:func:`cluster_data` saved as ``x``/``y`` in an ``.npz``; ``bad_row`` is set to NaN."""
    x, y = cluster_data(n, d, k, seed, scale)
    if bad_row is not None:
        x[bad_row] = np.nan
    np.savez(path, x=x, y=y)
    return path


def assert_stats_close(a, b, label: str, rel: float = 1e-10) -> None:
    """Two ``ClassStats`` agree array by array to ``rel`` of ``b``'s largest entry (or of 1,
    whichever is larger); ``label`` names the layer in the failure."""
    for attr in ("counts", "means", "scatter", "class_ss"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert np.abs(x - y).max() <= rel * max(np.abs(y).max(), 1), (label, attr)


# --------------------------------------------------------------------------- pickles
class Evil:
    """A pickle payload: unpickling it runs code that creates ``marker``.

    ``via="mkdir"`` calls ``os.mkdir(marker)``; ``via="system"`` runs ``touch marker``
    through ``os.system`` (a loader that names what it refused says ``posix.system``).
    """

    def __init__(self, marker: Path, via: str = "mkdir") -> None:
        self.marker = marker
        self.via = via

    def __reduce__(self):  # type: ignore[no-untyped-def]
        if self.via == "system":
            return (os.system, (f"touch {self.marker}",))
        return (os.mkdir, (str(self.marker),))


# --------------------------------------------------------------------------- processes
def python_m_nccli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    """``python -m nccli ARGS`` in a real child process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "nccli", *map(str, args)], capture_output=True, text=True, **kw
    )


# --------------------------------------------------------------------------- hypothesis
def draw_merge_tree(draw, m: int) -> list[tuple[int, int]]:
    """A random binary merge tree over ``m`` items: steps ``(i, j)``, merge item ``j`` into
    item ``i`` and drop ``j``, until one is left."""
    import hypothesis.strategies as st

    steps = []
    while m > 1:
        i = draw(st.integers(0, m - 1))
        j = draw(st.integers(0, m - 2))
        steps.append((i, j if j < i else j + 1))
        m -= 1
    return steps


def fold_and_merge(shards, steps, H: np.ndarray, y: np.ndarray, num_classes: int):
    """Fold each shard's ``(lo, hi)`` batches of ``H, y`` into its own ``ClassStats`` with
    ``update``, then merge them along ``steps`` (:func:`draw_merge_tree`); the last one."""
    from nccli.stats import ClassStats

    items = []
    for shard in shards:
        s = ClassStats(num_classes, H.shape[1])
        for lo, hi in shard:
            s.update(H[lo:hi], y[lo:hi])
        items.append(s)
    for i, j in steps:
        items[i].merge(items[j])
        del items[j]
    (merged,) = items
    return merged


def write_features_npz(
    path: Path, num_classes: int, n: int = 60, dim: int = 4, seed: int = 3
) -> Path:
    """A plain features file for ``measure``: ``features`` (n, dim) clustered by class,
    ``labels``, a random classifier ``weight`` and a zero ``bias``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    np.savez(
        path,
        features=rng.normal(size=(n, dim)) + 3 * np.eye(num_classes, dim)[y],
        labels=y,
        weight=rng.normal(size=(num_classes, dim)),
        bias=np.zeros(num_classes),
    )
    return path
