"""Mixed data: a cache, a partial or a shard set must never mix rows of different data.

The dataset's identity covers the inputs' values (``dataset_content_sha256``, hashed as
they stream through the extraction), not only its labels: a re-run after the inputs
changed re-extracts (with a note), ``--resume`` after a change refuses, and files named
like the shards of one run are merged only when their attributes say they are.  Labels
beyond the model's logits blame the dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import slow_model
from attack_kit import ARCH, D, K, N, extract_argv
from cli_harness import (
    ForkCLI,
    Running,
    assert_clean_failure,
    assert_no_finished_output,
    assert_refused,
)
from helpers import cluster_data, save_state_dict

from nccli.io.cache import Cache


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _setup(d: Path, seed: int = 1) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A checkpoint and a dataset in ``d``; the data's arrays."""
    x, y = cluster_data(N, D, K, seed)
    ckpt = save_state_dict(d / "run_ep005.pt", ARCH)
    return ckpt, _npz(d / "data.npz", x, y), x, y


def _notes(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def _stats(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with Cache(path) as c:
        return {
            name: {k: getattr(c.stats(name), k) for k in ("counts", "means", "scatter")}
            for name in c.layers
        }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_changed_inputs_with_the_same_labels_are_extracted_again(cli: ForkCLI, tmp_path):
    ckpt, data, x, y = _setup(tmp_path)
    out = tmp_path / "out"
    assert cli(extract_argv(ckpt, data, out), cwd=tmp_path).code == 0
    cache = out / "run_ep005.h5"
    old = Cache(cache).attrs["dataset_content_sha256"]
    _npz(data, x + 1.0, y)  # other inputs, the very same labels
    res = cli(extract_argv(ckpt, data, out), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    [note] = _notes(res)
    assert "run_ep005.h5" in note and "changed since this cache was extracted" in note, res
    assert "extracting it again" in note
    # the cache now holds the new data's numbers: those of a fresh run on it
    fresh = tmp_path / "fresh"
    assert cli(extract_argv(ckpt, data, fresh), cwd=tmp_path).code == 0
    got, want = _stats(cache), _stats(fresh / "run_ep005.h5")
    for name in want:
        for k in want[name]:
            np.testing.assert_array_equal(got[name][k], want[name][k], err_msg=f"{name} {k}")
    new = Cache(cache).attrs["dataset_content_sha256"]
    assert new != old and new == Cache(fresh / "run_ep005.h5").attrs["dataset_content_sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["run_ep005.h5"]


def test_unchanged_inputs_are_still_skipped(cli: ForkCLI, tmp_path):
    ckpt, data, x, y = _setup(tmp_path)
    out = tmp_path / "out"
    assert cli(extract_argv(ckpt, data, out), cwd=tmp_path).code == 0
    cache = out / "run_ep005.h5"
    before = _sha(cache)
    # the file rewritten with the same values, and another batch size: the digest is of
    # the values in fixed blocks of rows, so hashing without the model agrees
    _npz(data, x.copy(), y)
    res = cli([*extract_argv(ckpt, data, out), "-b", "7"], cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    [note] = _notes(res)
    assert "run_ep005.h5: already extracted, skipped" in note, res
    assert _sha(cache) == before


def test_cache_without_an_inputs_digest_is_extracted_again_with_a_note(cli: ForkCLI, tmp_path):
    """A cache written before the digest existed: nccli cannot tell whether the data
    changed, so it extracts again (once) and says why."""
    ckpt, data, _, _ = _setup(tmp_path)
    out = tmp_path / "out"
    assert cli(extract_argv(ckpt, data, out), cwd=tmp_path).code == 0
    cache = out / "run_ep005.h5"
    want = _stats(cache)
    with h5py.File(cache, "r+") as f:
        for key in ("dataset_content_sha256", "dataset_block_sha256"):
            del f.attrs[key]
    res = cli(["measure", str(cache), "-f", "csv"], cwd=tmp_path)
    assert res.code == 0, res  # measure never needs it
    res = cli(extract_argv(ckpt, data, out), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    [note] = _notes(res)
    assert "run_ep005.h5" in note and "cannot be told" in note and "extracting it again" in note
    assert "dataset_content_sha256" in Cache(cache).attrs
    got = _stats(cache)
    for name in want:
        np.testing.assert_array_equal(got[name]["scatter"], want[name]["scatter"])
    res = cli(extract_argv(ckpt, data, out), cwd=tmp_path)
    assert "already extracted" in res.stderr, res


# --------------------------------------------------------------------------- --resume


def _killed_mid_run(cli: ForkCLI, d: Path, ckpt: Path, data: Path) -> Path:
    """Start a slow extraction (every forward sleeps), SIGKILL it once a batch is on disk;
    the partial it leaves."""
    model = slow_model.write(d, ARCH, 0.3)
    argv = extract_argv(ckpt, data, d / "out", "-b", "10", "--model", model, arch=None)
    run: Running = cli.start(argv, cwd=d)
    part = d / "out" / "run_ep005.h5.partial"
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and not done:
        try:  # read past the writer's HDF5 lock; a read that lands mid-flush is retried
            with h5py.File(part, "r", locking=False) as f:
                done = int(f.attrs["rows_done"])
        except (OSError, KeyError, RuntimeError, FileNotFoundError):
            pass
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    res = cli.wait(run)
    assert res.code == -signal.SIGKILL, res
    assert done > 0, "the extraction never wrote a batch"
    with h5py.File(part, "r") as f:
        assert 0 < int(f.attrs["rows_done"]) < N
    return part


@pytest.mark.slow
def test_resume_after_the_inputs_changed_is_refused(cli: ForkCLI, tmp_path):
    ckpt, data, x, y = _setup(tmp_path)
    part = _killed_mid_run(cli, tmp_path, ckpt, data)
    before = _sha(part)
    x2 = x.copy()
    x2[3] += 0.5  # one value of one row the partial already holds
    _npz(data, x2, y)
    res = cli(extract_argv(ckpt, data, tmp_path / "out", "--resume"), cwd=tmp_path)
    assert_refused(res, 1, part, ("no longer match", "delete the partial", "without --resume"))
    assert _sha(part) == before  # left exactly as it was
    assert_no_finished_output(tmp_path, partial_ok=True)


@pytest.mark.slow
def test_resume_with_unchanged_inputs_continues(cli: ForkCLI, tmp_path):
    """The control: same inputs (the file rewritten), so the rows are checked and kept, and
    the resumed cache equals one uninterrupted run."""
    ckpt, data, x, y = _setup(tmp_path)
    part = _killed_mid_run(cli, tmp_path, ckpt, data)
    with h5py.File(part, "r") as f:
        done = int(f.attrs["rows_done"])
    _npz(data, x.copy(), y)
    res = cli(extract_argv(ckpt, data, tmp_path / "out", "--resume"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert f"resuming at row {done} of {N}" in res.stderr, res
    full = tmp_path / "full"
    assert cli(extract_argv(ckpt, data, full), cwd=tmp_path).code == 0
    a, b = tmp_path / "out" / "run_ep005.h5", full / "run_ep005.h5"
    got, want = _stats(a), _stats(b)
    for name in want:
        np.testing.assert_allclose(got[name]["means"], want[name]["means"], rtol=1e-12)
        np.testing.assert_array_equal(got[name]["counts"], want[name]["counts"])
    assert Cache(a).attrs["dataset_content_sha256"] == Cache(b).attrs["dataset_content_sha256"]


# --------------------------------------------------------------------------- shard sets


def _two_checkpoints(cli: ForkCLI, d: Path) -> tuple[Path, Path]:
    """Caches of two different checkpoints on the same data, named as rank files."""
    _, data, _, _ = _setup(d)
    for seed in (0, 1):
        ckpt = save_state_dict(d / f"m{seed}.pt", ARCH, seed=seed)
        assert cli(extract_argv(ckpt, data, d / "caches"), cwd=d).code == 0
    shards = d / "shards"
    shards.mkdir()
    a, b = shards / "m.rank0.h5", shards / "m.rank1.h5"
    shutil.copy(d / "caches" / "m0.h5", a)
    shutil.copy(d / "caches" / "m1.h5", b)
    return a, b


def test_hand_named_rank_files_of_two_checkpoints_are_refused(cli: ForkCLI, tmp_path):
    a, b = _two_checkpoints(cli, tmp_path)
    for inputs in ([a, b], [a.parent]):
        res = cli(["measure", *map(str, inputs), "-f", "csv"], cwd=tmp_path)
        assert_refused(res, 1, a, (b.name, "no shard attributes", "refusing to merge"))
        assert res.stdout == ""
    res = cli(["measure", str(a), "-f", "csv"], cwd=tmp_path)  # alone it is one cache
    assert res.code == 0, res


def test_forged_shard_attributes_of_two_checkpoints_are_refused(cli: ForkCLI, tmp_path):
    """Shard attributes do not make a set either: the checkpoints differ."""
    a, b = _two_checkpoints(cli, tmp_path)
    for rank, path in enumerate((a, b)):
        with h5py.File(path, "r+") as f:
            n = int(f.attrs["num_samples"])
            f.attrs.update(
                rank=rank, world_size=2, row_start=rank * n, row_stop=(rank + 1) * n,
                total_samples=2 * n,
            )  # fmt: skip
    res = cli(["measure", str(a), str(b), "-f", "csv"], cwd=tmp_path)
    assert_refused(res, 1, b, (a.name, "different checkpoint_sha256", "refusing to merge"))


# --------------------------------------------------------------------------- labels


def test_labels_beyond_the_logits_blame_the_dataset(cli: ForkCLI, tmp_path):
    ckpt, _, x, y = _setup(tmp_path)
    y = y.copy()
    y[7] = 7
    data = _npz(tmp_path / "labels7.npz", x, y)
    res = cli(extract_argv(ckpt, data, tmp_path / "out"), cwd=tmp_path)
    assert_refused(
        res,
        1,
        data,
        ("has labels up to 7", f"outputs {K} logits", "dataset is the likely culprit"),
    )
    assert res.stderr.startswith(f"nccli: error: {data}: has labels up to 7"), res
    assert_no_finished_output(tmp_path)
