"""Distributed extraction: a real ``torchrun --nproc-per-node 2 -m nccli extract`` on gloo.

The 2-rank shard set must measure exactly like a 1-rank extraction.  The batch size
divides both shards (``N = 91`` splits 45 + 46, batches of 15), so every sample sees the
same batch composition in both runs and the features are bitwise equal; only the
statistics' merge order differs, which the pairwise update keeps to ~1e-15.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import save_state_dict, write_cluster_npz

from nccli import measure
from nccli.errors import CacheError, DataError, UsageError
from nccli.extract import extract
from nccli.extract import row_range as _row_range
from nccli.extract.distributed import Launch, detect, shard_path, stale_shards

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

K, D, N, B = 3, 6, 91, 15
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=2,head_width=8"
LAYERS = ["head.0", "head.1", "classifier"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_data(path: Path, bad_row: int | None = None) -> Path:
    return write_cluster_npz(path, N, D, K, seed=0, bad_row=bad_row)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    ckpt = save_state_dict(tmp_path / "ep10.pt", ARCH, wrap=True)
    return ckpt, write_data(tmp_path / "data.npz")


def torchrun(tmp_path: Path, ckpt: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "nccli",
        "extract",
        str(ckpt),
        "-d",
        str(data),
        "--arch",
        ARCH,
        "-o",
        str(out),
        "-b",
        str(B),
        "--dist-backend",
        "gloo",
        "--dist-timeout",
        "1",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_same_metrics(got, want) -> None:
    key = ["layer", "metric", "class", "class2"]
    key = [k for k in key if k in want.columns]
    a = got.set_index(key)["value"].sort_index()
    b = want.set_index(key)["value"].sort_index()
    assert list(a.index) == list(b.index)
    av, bv = a.to_numpy(float), b.to_numpy(float)
    assert np.array_equal(np.isnan(av), np.isnan(bv))
    ok = ~np.isnan(bv)
    np.testing.assert_allclose(av[ok], bv[ok], rtol=1e-10, atol=1e-12)


def read_rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {n: f[f"layers/{n}/features"][()] for n in f["layers"]}
        out["indices"] = f["indices"][()]
        out["labels"] = f["labels"][()]
        out["attrs"] = dict(f.attrs)
        return out


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    ref = extract(
        [ckpt], str(data), arch=ARCH, out_dir=tmp_path / "ref", batch_size=B, progress=False
    )[0]

    t0 = time.perf_counter()
    rc, log = torchrun(tmp_path, ckpt, data, tmp_path / "out")
    elapsed = time.perf_counter() - t0
    assert rc == 0, log
    assert elapsed < 60, f"2-rank extraction took {elapsed:.1f} s"
    shards = sorted((tmp_path / "out").glob("ep10.rank*.h5"))
    assert [p.name for p in shards] == ["ep10.rank0.h5", "ep10.rank1.h5"]
    assert not list((tmp_path / "out").glob("*.partial"))
    assert "merged 2 shards, 91 samples" in log

    # disjoint contiguous shards covering every row exactly once, no padding
    rows = [read_rows(p) for p in shards]
    whole = read_rows(ref)
    for r, part in enumerate(rows):
        a = part["attrs"]
        start, stop = _row_range(N, r, 2)
        assert (a["rank"], a["world_size"], a["row_start"], a["row_stop"]) == (r, 2, start, stop)
        assert (a["total_samples"], a["num_samples"]) == (N, stop - start)
        np.testing.assert_array_equal(part["indices"], np.arange(start, stop))
    idx = np.concatenate([p["indices"] for p in rows])
    assert len(idx) == N and np.array_equal(np.sort(idx), np.arange(N))
    np.testing.assert_array_equal(idx, whole["indices"])
    for name in LAYERS:
        np.testing.assert_array_equal(np.concatenate([p[name] for p in rows]), whole[name])

    # every metric of the shard set (as files or as the directory) equals the 1-rank run
    want = measure(ref, per_class=True, geometry=True)
    for inputs in (shards, tmp_path / "out"):
        got = measure(inputs, per_class=True, geometry=True)
        assert set(got["source"]) == {"ep10.h5"}
        assert_same_metrics(got, want)
    assert_same_metrics(measure(shards, recompute=True), measure(ref, recompute=True))

    # one shard alone is not the run
    with pytest.raises(CacheError, match="incomplete shard set"):
        measure(shards[0])

    # the same command again skips the finished shards
    rc, log = torchrun(tmp_path, ckpt, data, tmp_path / "out")
    assert rc == 0, log
    assert log.count("already extracted") == 2


@pytest.mark.slow
def test_failed_rank_leaves_no_finished_shard(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    ckpt, _ = setup
    data = write_data(tmp_path / "bad.npz", bad_row=80)  # in rank 1's shard only
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc, log = torchrun(tmp_path, ckpt, data, out)
    assert rc != 0
    assert time.perf_counter() - t0 < 60
    assert "sample 80 has NaN" in log
    assert "rank(s) 1 of 2 failed" in log
    # rank 0 finished its shard but did not publish it: nothing looks finished
    assert sorted(p.name for p in out.iterdir()) == ["ep10.rank0.h5.partial"]
    with pytest.raises(DataError, match="no nccli caches"):
        measure(out)

    # fixed data (same spec, same labels): --resume keeps rank 0's rows, redoes rank 1
    write_data(data)
    rc, log = torchrun(tmp_path, ckpt, data, out, "--resume")
    assert rc == 0, log
    assert "resuming at row 45 of 45" in log
    assert sorted(p.name for p in out.iterdir()) == ["ep10.rank0.h5", "ep10.rank1.h5"]
    ref = extract(
        [ckpt], str(data), arch=ARCH, out_dir=tmp_path / "ref", batch_size=B, progress=False
    )[0]
    assert_same_metrics(measure(out), measure(ref))


# ------------------------------------------------------------------------ no processes


def test_detect_reads_the_torchrun_environment() -> None:
    assert detect({}) is None
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}) is None
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    assert detect(env) == Launch(3, 4, 1, "node0", "29500")
    with pytest.raises(UsageError, match="outside"):
        detect({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UsageError, match="not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("n", [1, 2, 7, 90, 91, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_row_ranges_cover_every_row_once(n: int, world: int) -> None:
    if world > n:
        return
    ranges = [_row_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_names(tmp_path: Path) -> None:
    out = tmp_path / "ep10.h5"
    assert shard_path(out, 3) == tmp_path / "ep10.rank3.h5"
    for r in (0, 1, 2, 3, 11):
        shard_path(out, r).write_bytes(b"")
    assert [p.name for p in stale_shards(out, 2)] == [
        "ep10.rank11.h5",
        "ep10.rank2.h5",
        "ep10.rank3.h5",
    ]


def test_distributed_true_needs_torchrun(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    with pytest.raises(UsageError, match="torchrun"):
        extract([ckpt], str(data), arch=ARCH, out_dir=tmp_path, distributed=True, progress=False)
