"""Time `nccli measure` against a notebook-style reference and a hardware bound.

For each (N, d, K) it writes synthetic float32 features to an HDF5 features file and
times, in the same run:

- nccli   `nccli.measure(path)`: streaming statistics + NC1–NC3 + the chunked NC4 pass
- ref     `benchmarks/notebook_reference.py`: per-sample outer products for Σ_W, d×d
          pinv, per-sample NC4 loop (run on the first `--ref-rows` rows and scaled
          linearly to N, since it is linear in N — the table says so)
- bound   one chunked read of the features + one HᵀH GEMM in float32

and `measure` from stored statistics only (no NC4 pass) on a cache, and the peak
resident memory of `nccli measure` in a subprocess for two values of N.

    python benchmarks/bench_measure.py            # all sizes
    python benchmarks/bench_measure.py --small    # skip (200k, 2048, 1000)

Many classes (issue 15), `--many-classes`: an fp16 cache per (N, d, K) — (200k, 512, 10k)
and (1M, 1024, 50k), or smaller ones with `--quick`, or any list with `--sizes` — written
with nccli's CacheWriter (generation is not timed), then `nccli measure` on it in a fresh
subprocess (wall time and peak RSS from `getrusage(RUSAGE_CHILDREN)` of a wrapper process),
for every default metric and for the default metrics without the NC4 pass (the difference is
the pass), next to the bound measured in the same run (one read of the features + one d×d
GEMM):

    python benchmarks/bench_measure.py --many-classes --quick
    python benchmarks/bench_measure.py --many-classes --sizes 200000,512,10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_measure_bound import bound, make_features  # noqa: E402
from notebook_reference import notebook_metrics  # noqa: E402

from nccli import ClassStats, measure  # noqa: E402
from nccli.io.cache import CacheWriter, LayerSpec  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def reference(path: Path, rows: int, K: int) -> float:
    with h5py.File(path, "r") as f:
        H = f["features"][:rows]
        y = f["labels"][:rows]
        W, b = f["weight"][()], f["bias"][()]
    t = time.perf_counter()
    notebook_metrics(H, y, W, b, K)
    return time.perf_counter() - t


def stats_only_cache(path: Path, d: int, K: int, n_per: int = 3) -> None:
    """A cache holding only statistics (features of a few rows) for the stats-only timing."""
    rng = np.random.default_rng(1)
    N = K * n_per
    y = np.repeat(np.arange(K), n_per)
    H = (rng.normal(size=(K, d))[y] + rng.normal(size=(N, d))).astype(np.float32)
    W = rng.normal(size=(K, d)).astype(np.float32)
    spec = [LayerSpec("fc", d, module="fc", role="penultimate", weight=W, bias=np.zeros(K))]
    w = CacheWriter(path, spec, N, K, attrs={"classifier": "fc"}, logits=False)
    w.write_rows(0, y, np.arange(N), {"fc": H})
    w.finalize({"fc": ClassStats.from_arrays(H, y, K)})


def peak_rss_mb(path: Path) -> float:
    """Peak RSS of `nccli measure` on ``path`` in a fresh process (MB).

    Read from /proc/self/status (VmHWM belongs to the new address space; ru_maxrss would
    carry over the high-water mark of the forking parent)."""
    code = (
        "import sys; from nccli import measure; measure(sys.argv[1]);"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip()) / 1024


def import_rss_mb() -> float:
    """Peak RSS of a process that only imports nccli (MB): the baseline."""
    code = (
        "import nccli;"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()) / 1024


# ---------------------------------------------------------------- many classes (issue 15)
#: the issue's two scenarios, and the smaller ones of ``--quick``
MANY_CLASSES = [(200_000, 512, 10_000), (1_000_000, 1024, 50_000)]
MANY_CLASSES_QUICK = [(20_000, 512, 1_000), (50_000, 512, 2_500), (50_000, 1024, 5_000)]
#: the default metrics without the NC4 pass (nc4, acc, ncc_acc)
NO_PASS = "classes,nc1,nc2,nc3,geometry,cond_l"


def make_cache(path: Path, N: int, d: int, K: int, seed: int = 0, chunk: int = 20_000) -> None:
    """An fp16 cache of near-collapsed features over K classes (every class present), with
    its statistics computed from the values as stored, like ``extract`` does."""
    rng = np.random.default_rng(seed)
    means = 3 * rng.normal(size=(K, d)).astype(np.float32)
    W = means + 0.3 * rng.normal(size=(K, d)).astype(np.float32)
    spec = [LayerSpec("fc", d, module="fc", role="penultimate", weight=W, bias=np.zeros(K))]
    w = CacheWriter(
        path, spec, N, K, attrs={"classifier": "fc"}, feature_dtype="float16", logits=False
    )
    st = ClassStats(K, d)
    for s in range(0, N, chunk):
        n = min(chunk, N - s)
        y = rng.integers(0, K, n)
        if s == 0:
            y[: min(n, K)] = np.arange(min(n, K))
        H = (means[y] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float16)
        w.write_rows(s, y, np.arange(s, s + n), {"fc": H})
        st.update(H, y)
    w.finalize({"fc": st})


def timed_measure(path: Path, metrics: str | None = None) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MB) of ``nccli measure`` in a fresh subprocess, from
    ``getrusage(RUSAGE_CHILDREN)`` of a wrapper whose only child it is."""
    cmd = [str(Path(sys.executable).with_name("nccli")), "measure", str(path), "--format", "csv"]
    if metrics:
        cmd += ["--metrics", metrics]
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True
    )
    wall, rss_kb = out.stdout.split()
    return float(wall), float(rss_kb) / 1024


def many_classes(sizes: list[tuple[int, int, int]], tmp: Path) -> list[dict]:
    """The issue-15 table: every default metric, the same without the NC4 pass, the bound."""
    head = (
        f"{'N':>9} {'d':>5} {'K':>6} {'cache MB':>9} | {'all s':>7} {'RSS MB':>7} | "
        f"{'no-pass s':>9} {'RSS MB':>7} | {'bound s':>7} {'all/bound':>9}"
    )
    print(head)
    print("-" * len(head))
    results = []
    for N, d, K in sizes:
        path = tmp / f"c_{N}_{d}_{K}.h5"
        t = time.perf_counter()
        make_cache(path, N, d, K)
        gen = time.perf_counter() - t
        size = path.stat().st_size / 2**20
        t_bound = best_of(lambda p=path: bound(p, "layers/fc/features"), 2)
        t_all, rss_all = timed_measure(path)
        t_np, rss_np = timed_measure(path, NO_PASS)
        row = {"N": N, "d": d, "K": K, "cache_mb": size, "generate_s": gen, "all_s": t_all,
               "all_rss_mb": rss_all, "no_pass_s": t_np, "no_pass_rss_mb": rss_np,
               "bound_s": t_bound}  # fmt: skip
        results.append(row)
        print(
            f"{N:>9} {d:>5} {K:>6} {size:>9.0f} | {t_all:>7.1f} {rss_all:>7.0f} | "
            f"{t_np:>9.1f} {rss_np:>7.0f} | {t_bound:>7.2f} {t_all / t_bound:>9.1f}",
            flush=True,
        )
        path.unlink()
    return results


def _sizes(text: str) -> list[tuple[int, int, int]]:
    parts = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    if len(parts) % 3:
        raise SystemExit("--sizes takes N,d,K triples: 200000,512,10000[,N,d,K ...]")
    return [tuple(parts[i : i + 3]) for i in range(0, len(parts), 3)]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="skip (200k, 2048, 1000)")
    ap.add_argument("--ref-rows", type=int, default=4000, help="rows the reference runs on")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--many-classes", action="store_true", help="the issue-15 scenarios")
    ap.add_argument("--quick", action="store_true", help="--many-classes: smaller sizes")
    ap.add_argument("--sizes", type=_sizes, help="--many-classes: N,d,K triples")
    ap.add_argument("--tmp", type=Path, help="folder for the generated files")
    args = ap.parse_args()
    if args.many_classes:
        sizes = args.sizes or (MANY_CLASSES_QUICK if args.quick else MANY_CLASSES)
        print(f"cpus {os.cpu_count()}")
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            results = many_classes(sizes, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    sizes = [(50_000, 512, 10), (50_000, 512, 100), (20_000, 512, 100)]
    if not args.small:
        sizes.append((200_000, 2048, 1000))
    print(f"threads: torch {__import__('torch').get_num_threads()}, cpus {os.cpu_count()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        header = f"{'N':>8} {'d':>5} {'K':>5} | {'nccli s':>8} {'ref s':>9} {'bound s':>8} | {'ref/nccli':>9} {'nccli/bound':>11}"
        print(header)
        print("-" * len(header))
        for N, d, K in sizes:
            path = tmp / f"f_{N}_{d}_{K}.h5"
            make_features(path, N, d, K)
            measure(path)  # warm-up (BLAS threads, file cache)
            t_nccli = best_of(lambda p=path: measure(p), args.repeat)
            t_bound = best_of(lambda p=path: bound(p), args.repeat)
            rows = min(N, args.ref_rows)
            t_ref = reference(path, rows, K) * N / rows
            results.append(
                {"N": N, "d": d, "K": K, "nccli_s": t_nccli, "ref_s": t_ref, "bound_s": t_bound}
            )
            print(
                f"{N:>8} {d:>5} {K:>5} | {t_nccli:>8.3f} {t_ref:>9.2f} {t_bound:>8.3f} | "
                f"{t_ref / t_nccli:>9.1f} {t_nccli / t_bound:>11.2f}",
                flush=True,
            )
            path.unlink()
        print(f"(ref is timed on {args.ref_rows} rows and scaled linearly to N)")

        cache = tmp / "stats_only.h5"
        stats_only_cache(cache, 2048, 1000)
        no_pass = "nc1,nc1_trace,cdnv,nc2,nc3"
        measure(cache, metrics=no_pass)
        t_stats = best_of(lambda: measure(cache, metrics=no_pass), args.repeat)
        print(f"\nmeasure from stored statistics, K=1000, d=2048, no NC4 pass: {t_stats:.3f} s")
        results.append({"stats_only_K1000_d2048_s": t_stats})

        print(
            f"\npeak RSS of `measure` (fresh process; importing nccli alone: {import_rss_mb():.0f} MB):"
        )
        for N in (20_000, 100_000):
            path = tmp / f"m_{N}.h5"
            make_features(path, N, 512, 100)
            rss = peak_rss_mb(path)
            size = path.stat().st_size / 2**20
            print(f"  N={N:>7} d=512 K=100  features {size:7.1f} MB  peak RSS {rss:7.1f} MB")
            results.append({"rss_N": N, "features_mb": size, "peak_rss_mb": rss})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
