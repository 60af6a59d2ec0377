"""Start-up time of the commands that need no model (issue 16).

Each command runs in a fresh process, ``--repeat`` times (default 5); the median wall time
(and CPU time, user + system, which load on a shared machine disturbs less) is printed
next to the floor of any Python tool (``python -c pass``) and of one that reads HDF5 with
numpy (``python -c "import numpy, h5py"``):

- ``nccli --version``;
- ``nccli measure FEATS`` on a 200×16 feature file (``.npz``, CSV to stdout);
- ``nccli measure CACHE`` and ``nccli compare CACHE CACHE --fail-if 'nc1>1e9'`` on two small
  caches (the gate a training loop would run every epoch).

Run: ``.venv/bin/python benchmarks/bench_startup.py [--repeat 5]``.  Times vary with the
machine's load; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _nccli() -> list[str]:
    """The console script next to this interpreter, else ``python -m nccli``."""
    script = Path(sys.executable).with_name("nccli")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nccli"]


def medians(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system) of ``cmd``'s process;
    the CPU time is what a loaded machine disturbs least."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def write_inputs(tmp: Path) -> tuple[Path, list[Path]]:
    """A 200×16 feature file and two small caches (epochs 1 and 2)."""
    from nccli import ClassStats
    from nccli.io.cache import CacheWriter, LayerSpec

    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    H = (3 * rng.normal(size=(4, 16))[y] + rng.normal(size=(200, 16))).astype(np.float32)
    feats = tmp / "tiny.npz"
    np.savez(feats, features=H, labels=y, weight=rng.normal(size=(4, 16)), bias=np.zeros(4))
    caches = []
    for epoch in (1, 2):
        path = tmp / f"ep{epoch:04d}.h5"
        W = rng.normal(size=(4, 16))
        spec = LayerSpec("fc", 16, module="fc", depth=0, role="penultimate", weight=W, bias=None)
        w = CacheWriter(path, [spec], 200, 4, attrs={"epoch": epoch, "classifier": "fc"})
        w.write_rows(0, y, np.arange(200), {"fc": H}, logits=None)
        w.finalize({"fc": ClassStats.from_arrays(H, y, 4)})
        caches.append(path)
    return feats, caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nccli-startup-"))
    try:
        feats, caches = write_inputs(tmp)
        nccli = _nccli()
        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ('python -c "import numpy, h5py"', [sys.executable, "-c", "import numpy, h5py"], None),
            ("nccli --version", [*nccli, "--version"], 0.25),
            ("nccli measure tiny.npz (200×16)", [*nccli, "measure", str(feats), "-f", "csv"], 0.5),
            (
                "nccli measure ep0001.h5 (cache)",
                [*nccli, "measure", str(caches[0]), "-f", "csv"],
                None,
            ),
            (
                "nccli compare ep0001.h5 ep0002.h5 --fail-if 'nc1>1e9'",
                [*nccli, "compare", *map(str, caches), "--fail-if", "nc1>1e9", "-f", "csv"],
                None,
            ),
        ]
        print(f"median of {args.repeat} fresh processes, seconds")
        print(f"{'command':<58} {'wall':>7} {'cpu':>7}  target (wall)")
        for label, cmd, target in rows:
            t, cpu = medians(cmd, args.repeat)
            verdict = "" if target is None else f"≤ {target} {'yes' if t <= target else 'NO'}"
            print(f"{label:<58} {t:7.3f} {cpu:7.3f}  {verdict}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
