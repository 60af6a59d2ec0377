"""``measure`` against the hardware bound, and its peak memory in N (issue 16).

For each (N, d, K) an HDF5 feature file of synthetic float32 features (with a classifier,
so NC4 runs) is written, and in the same process, interleaved, best of ``--repeat`` (wall
time, and process CPU time of every thread):

- **nccli**: ``nccli.measure(path)`` — every default metric; the statistics streamed once
  and, when the features fit ``--max-memory`` (default 1/16 of the memory, at most 1 GiB),
  the NC4 pass over the kept chunks (else a second read);
- **bound**: one chunked read of the features plus one ``HᵀH`` GEMM in float32.

Then the peak resident memory (``VmHWM``) of ``nccli measure`` in a fresh process at each
``--rss`` size (d = 512, K = 100).

Run: ``.venv/bin/python benchmarks/bench_measure_bound.py`` (defaults: the issue's sizes,
(50k, 512, 100) and (200k, 512, 100); RSS at N = 200k and 1M; needs about 2.5 GB of /tmp).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from nccli import measure


def make_features(path: Path, N: int, d: int, K: int, seed: int = 0, chunk: int = 20000) -> None:
    """Synthetic clustered float32 features written in chunks (memory stays small)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, d)).astype(np.float32) * 3
    W = means + 0.3 * rng.normal(size=(K, d)).astype(np.float32)
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", (N, d), dtype="float32", chunks=(min(N, 4096), d))
        labels = f.create_dataset("labels", (N,), dtype="int64")
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            y = rng.integers(0, K, n)
            feats[s : s + n] = means[y] + rng.normal(size=(n, d)).astype(np.float32)
            labels[s : s + n] = y
        f["weight"] = W
        f["bias"] = np.zeros(K, dtype=np.float32)


def bound(path: Path, dataset: str = "features", chunk_rows: int = 8192) -> None:
    """One chunked read of the features (``dataset``: a features file's, or a cache layer's
    ``layers/<name>/features``) + one d×d GEMM in float32."""
    with h5py.File(path, "r") as f:
        X = f[dataset]
        G = np.zeros((X.shape[1], X.shape[1]), dtype=np.float32)
        for s in range(0, X.shape[0], chunk_rows):
            h = np.asarray(X[s : s + chunk_rows], dtype=np.float32)  # float16 caches widened
            G += h.T @ h


def timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds (every thread) of ``fn()``; the CPU time is what load
    on a shared machine disturbs least."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def peak_rss_mb(path: Path, *extra: str) -> float:
    """Peak RSS (MB) of ``nccli measure PATH`` in a fresh process (its own VmHWM)."""
    code = (
        "import sys; from nccli.cli import app; app(args=sys.argv[1:], standalone_mode=False);"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')),"
        " file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "measure", str(path), "-f", "csv", "-q", *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stderr.strip().splitlines()[-1]) / 1024


def _sizes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(float(v)) for v in s.split(",")) for s in text.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50000,512,100 200000,512,100", help="'N,d,K N,d,K'")
    ap.add_argument("--rss", default="200000 1000000", help="N values for the RSS rows")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="directory for the feature files")
    ap.add_argument("--precision", default="exact", help="measure's precision (exact|fast)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nccli-bound-", dir=args.tmp))
    try:
        print(
            f"{'N':>8} {'d':>5} {'K':>5} {'nccli (s)':>10} {'bound (s)':>10} {'ratio':>7}"
            f" {'cpu nccli':>10} {'cpu bound':>10} {'cpu ratio':>10}"
        )
        for N, d, K in _sizes(args.sizes):
            path = tmp / f"f{N}_{d}_{K}.h5"
            make_features(path, N, d, K)
            measure(path)  # warm the page cache and the imports
            ours, ref = [], []
            for _ in range(args.repeat):
                ours.append(timed(lambda p=path: measure(p, precision=args.precision)))
                ref.append(timed(lambda p=path: bound(p)))
            (t, tc), (b, bc) = min(ours), min(ref)
            print(
                f"{N:>8} {d:>5} {K:>5} {t:10.3f} {b:10.3f} {t / b:7.2f}"
                f" {tc:10.3f} {bc:10.3f} {tc / bc:10.2f}",
                flush=True,
            )
            path.unlink()
        rss = {}
        for N in (int(float(v)) for v in args.rss.split()):
            path = tmp / f"rss{N}.h5"
            make_features(path, N, 512, 100)
            rss[N] = peak_rss_mb(path)
            mb = N * 512 * 4 / 1e6
            print(f"peak RSS, N = {N:>8} (features {mb:.0f} MB): {rss[N]:.0f} MB", flush=True)
            path.unlink()
        if len(rss) >= 2:
            lo, hi = min(rss), max(rss)
            print(f"RSS ratio N={hi} / N={lo}: {rss[hi] / rss[lo]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
