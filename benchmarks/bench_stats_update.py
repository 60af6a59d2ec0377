"""``ClassStats.update`` at many classes: the sparse merge against a dense full-K one.

A language model's vocabulary is K = 50,000 classes, of which a 512-row batch holds a few
hundred.  ``ClassStats.update`` reduces the batch over its ``K_b`` present classes and
merges only those rows (``O(B·d + K_b·d + d²)``); the reference below is the
straightforward dense update, written here: the batch reduced over all K classes (a
``(K, d)`` array of class sums) and the pairwise (Chan) merge applied to all K rows, as
``nccli`` did before (``O(K·d)`` per update).  Both fold the same ``--updates`` batches of
``--batch`` float32 rows (numpy) into float64 statistics; the times exclude building the
batches, and the two results are checked to agree.

    python benchmarks/bench_stats_update.py                  # K=50,000, d=1024, 200 × 512
    python benchmarks/bench_stats_update.py --classes 5000 --dim 256
    python benchmarks/bench_stats_update.py --zipf 1.1       # token-like label frequencies
    python benchmarks/bench_stats_update.py --ref-updates 20 # the dense one is slow (~3 s each)
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import nccli
from nccli import ClassStats


class DenseStats:
    """The dense reference: the same four float64 states, every update touching all K
    rows (the cross term's product, as before, only those of the classes in both)."""

    def __init__(self, K: int, d: int) -> None:
        self.counts = np.zeros(K, dtype=np.int64)
        self.means = np.zeros((K, d))
        self.scatter = np.zeros((d, d))
        self.class_ss = np.zeros(K)

    def update(self, h: np.ndarray, y: np.ndarray) -> None:
        K, d = self.means.shape
        h = h.astype(np.float64)
        cnt_b = np.bincount(y, minlength=K)
        idx = (y[:, None] * d + np.arange(d)).reshape(-1)  # class sums as nccli's numpy path
        sums = np.bincount(idx, weights=h.reshape(-1), minlength=K * d).reshape(K, d)
        means_b = sums / np.maximum(cnt_b, 1)[:, None]
        centred = h - means_b[y]
        ss_b = np.bincount(y, weights=np.einsum("ij,ij->i", centred, centred), minlength=K)
        n = self.counts + cnt_b
        na, nb, nn_ = (c.astype(np.float64) for c in (self.counts, cnt_b, n))
        delta = means_b - self.means
        w = na * nb / (nn_ + (n == 0))
        self.means = self.means + delta * (nb / (nn_ + (n == 0)))[:, None]
        both = np.flatnonzero(w)  # the cross term over the classes in both partitions
        cross = delta[both] * np.sqrt(w[both])[:, None]
        self.scatter += centred.T @ centred + cross.T @ cross
        self.class_ss += ss_b + w * (delta * delta).sum(1)
        self.counts = n


def make_batches(args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    K, d = args.classes, args.dim
    if args.zipf:
        p = 1.0 / np.arange(1, K + 1) ** args.zipf
        p /= p.sum()
    centres = rng.normal(size=(min(K, 4096), d)).astype(np.float32)
    out = []
    for _ in range(args.updates + 1):  # the first one warms
        y = rng.choice(K, args.batch, p=p) if args.zipf else rng.integers(0, K, args.batch)
        h = centres[y % centres.shape[0]] + 0.1 * rng.standard_normal((args.batch, d), np.float32)
        out.append((h, y.astype(np.int64)))
    return out


def run(st, batches) -> float:
    t0 = time.perf_counter()
    for h, y in batches:
        st.update(h, y)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument(
        "--ref-updates", type=int, default=None, help="time the reference on the first N only"
    )
    ap.add_argument("--zipf", type=float, default=0.0, help="label exponent (0: uniform)")
    args = ap.parse_args()
    batches = make_batches(args)
    n_ref = min(args.ref_updates or args.updates, args.updates)
    kb = np.mean([np.unique(y).size for _, y in batches[1:]])
    print(
        f"nccli {nccli.__version__}, numpy {np.__version__}, {platform.machine()}; "
        f"K={args.classes} d={args.dim}: {args.updates} updates of {args.batch} float32 rows, "
        f"{kb:.0f} classes per batch on average"
    )
    sparse = ClassStats(args.classes, args.dim)
    dense = DenseStats(args.classes, args.dim)
    sparse.update(*batches[0])  # warm both (first touch of the pages, BLAS threads)
    dense.update(*batches[0])
    t_sparse = run(sparse, batches[1:])
    t_dense = run(dense, batches[1 : 1 + n_ref])
    if n_ref < args.updates:  # check against the same prefix
        sparse = ClassStats(args.classes, args.dim)
        run(sparse, batches[: 1 + n_ref])
    for name in ("counts", "means", "scatter", "class_ss"):
        got, want = getattr(sparse, name), getattr(dense, name)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * scale, err_msg=name)
    ms_sparse, ms_dense = 1e3 * t_sparse / args.updates, 1e3 * t_dense / n_ref
    print(
        f"sparse (ClassStats.update) {t_sparse:8.2f} s for {args.updates}: {ms_sparse:8.2f} ms/update"
    )
    print(f"dense full-K reference     {t_dense:8.2f} s for {n_ref}: {ms_dense:8.2f} ms/update")
    print(f"ratio dense / sparse per update {ms_dense / ms_sparse:8.1f}x (results agree)")


if __name__ == "__main__":
    main()
