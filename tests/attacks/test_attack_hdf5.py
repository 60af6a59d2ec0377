"""Hostile HDF5 inputs (and named pipes), each a runnable attack kept as a test.

Every case builds the crafted file under ``tmp_path`` from one of the good inputs, runs
the real CLI on it (``nccli measure FILE``, ``nccli info FILE`` or ``nccli extract CKPT
--data FILE``) and checks the contract of a refused input
(:func:`cli_harness.assert_refused`): exit 1, one line naming the file and the offending
element, no traceback, peak RSS under 1 GB, no finished output, nothing read from the
file the attack points at.

- ``*-external-storage``: a dataset whose raw data lives in another file (a secret next to
  it, or a FIFO that would hang the read) — in a cache, a features file, a dataset.
- ``*-external-link``: a link into another file (one that exists, one that does not: the
  latter was a traceback).
- ``*-virtual``: a virtual dataset whose source was deleted (read silently as zeros).
- ``*-dangling-soft-link``: a soft link to nothing.
- ``feat-features-group``, ``feat-epoch-*``: a features file whose ``features`` is a group,
  whose ``epoch`` is NaN, fractional or an array (each was a traceback).
- ``fifo-*``: a named pipe given as a cache, a features file or a dataset is refused
  before anything opens it (it would block forever).
- ``emfile-*``: running out of file descriptors is reported as such, naming the file,
  never as "truncated or corrupt".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from attack_kit import extract_argv
from cli_harness import REPO, Result, assert_no_finished_output, assert_refused

SECRET = b"TOPSECRET" * 256
#: long enough for a real run, short enough that a hang fails the test instead of the suite
TIMEOUT = 60


# --------------------------------------------------------------------------- builders


def _run(cli, argv: list, cwd: Path) -> Result:
    return cli.wait(cli.start([str(a) for a in argv], cwd=cwd), timeout=TIMEOUT)


def _measure(cli, path: Path, cwd: Path, *extra: str) -> Result:
    return _run(cli, ["measure", path, "-o", cwd / "result.csv", *extra], cwd)


def _cache(good, d: Path, name: str = "evil.h5") -> Path:
    path = d / name
    shutil.copyfile(good.cache, path)
    return path


def _first_layer(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return sorted(f["layers"])[0]


def _secret(d: Path) -> Path:
    path = d / "secret.bin"
    path.write_bytes(SECRET)
    return path


def _replace(f: h5py.File, key: str, **kw) -> None:
    """Swap dataset ``key`` for one made with ``kw`` (same shape and dtype)."""
    shape, dtype = f[key].shape, f[key].dtype
    del f[key]
    f.create_dataset(key, shape=shape, dtype=dtype, **kw)


def _features_h5(good, d: Path, name: str = "feats.h5") -> Path:
    path = d / name
    with np.load(good.feats) as z, h5py.File(path, "w") as f:
        for key in z.files:
            f[key] = z[key]
    return path


def _dataset_h5(good, d: Path, name: str = "data.h5") -> Path:
    path = d / name
    with np.load(good.data) as z, h5py.File(path, "w") as f:
        f["x"], f["y"] = z["x"], z["y"]
    return path


def _extract(cli, good, data: Path | str, d: Path) -> Result:
    return _run(cli, extract_argv(good.ckpt, data, d / "out"), d)


def _no_secret(res: Result) -> None:
    assert "TOPSECRET" not in res.stdout + res.stderr


# --------------------------------------------------------------------------- caches


def test_cache_external_storage_is_refused(cli, good, tmp_path) -> None:
    """A layer's features stored in a secret file next to the cache: ``measure
    --recompute`` would have computed the statistics of the secret's bytes."""
    path, secret = _cache(good, tmp_path), _secret(tmp_path)
    layer = _first_layer(path)
    with h5py.File(path, "r+") as f:
        key = f"layers/{layer}/features"
        _replace(f, key, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    res = _measure(cli, path, tmp_path, "--recompute")
    assert_refused(res, 1, path, (f"/layers/{layer}/features", "external files"))
    assert_no_finished_output(tmp_path)
    _no_secret(res)


def test_cache_external_storage_fifo_does_not_hang(cli, good, tmp_path) -> None:
    """``/labels`` kept in a FIFO: reading them would block forever."""
    path, fifo = _cache(good, tmp_path), tmp_path / "pipe"
    os.mkfifo(fifo)
    with h5py.File(path, "r+") as f:
        _replace(f, "labels", external=[(str(fifo), 0, h5py.h5f.UNLIMITED)])
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("/labels", "external files"))
    assert_no_finished_output(tmp_path)


@pytest.mark.parametrize("target", ["exists", "missing"])
def test_cache_external_link_is_refused(cli, good, tmp_path, target: str) -> None:
    """A layer's features as a link into another file (reads outside the input); to a
    missing file it was a traceback."""
    path = _cache(good, tmp_path)
    other = tmp_path / "other.h5"
    layer = _first_layer(path)
    with h5py.File(path, "r+") as f:
        key = f"layers/{layer}/features"
        if target == "exists":
            with h5py.File(other, "w") as o:
                o["x"] = f[key][()]
        del f[key]
        f[key] = h5py.ExternalLink(str(other), "/x")
    for argv in (["measure", path], ["info", path], ["info", path, "--verify"]):
        res = _run(cli, argv, tmp_path)
        assert_refused(res, 1, path, (f"/layers/{layer}/features", "external link"))
    assert_no_finished_output(tmp_path)


def test_cache_virtual_dataset_is_refused(cli, good, tmp_path) -> None:
    """``/labels`` as a virtual dataset whose source file was deleted: HDF5 silently reads
    the fill value (every label 0) and the cache would have measured fine."""
    path, src = _cache(good, tmp_path), tmp_path / "src.h5"
    with h5py.File(path, "r+") as f:
        labels = f["labels"][()]
        with h5py.File(src, "w") as s:
            s["y"] = labels
        layout = h5py.VirtualLayout(shape=labels.shape, dtype=labels.dtype)
        layout[:] = h5py.VirtualSource(str(src), "y", shape=labels.shape)
        del f["labels"]
        f.create_virtual_dataset("labels", layout)
    src.unlink()
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("/labels", "virtual dataset"))
    assert_no_finished_output(tmp_path)


def test_cache_dangling_soft_link_is_refused(cli, good, tmp_path) -> None:
    path = _cache(good, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["indices"]
        f["indices"] = h5py.SoftLink("/nowhere")
    res = _run(cli, ["info", path], tmp_path)
    assert_refused(res, 1, path, ("/indices", "soft link to /nowhere"))


def test_cache_compressed_statistics_are_refused(cli, good, tmp_path) -> None:
    """nccli never compresses statistics: a compressed ``scatter`` can only be forged (and
    used to skip the declared-vs-stored check)."""
    path = _cache(good, tmp_path)
    layer = _first_layer(path)
    with h5py.File(path, "r+") as f:
        key = f"layers/{layer}/stats/scatter"
        data = f[key][()]
        del f[key]
        f.create_dataset(key, data=data, compression="gzip")
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("statistics 'scatter'", "is compressed", "forged"))
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- features files


def test_features_file_external_storage_is_refused(cli, good, tmp_path) -> None:
    path, secret = _features_h5(good, tmp_path), _secret(tmp_path)
    with h5py.File(path, "r+") as f:
        _replace(f, "features", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("/features", "external files"))
    assert_no_finished_output(tmp_path)
    _no_secret(res)


def test_features_file_that_is_a_group_is_refused(cli, good, tmp_path) -> None:
    path = _features_h5(good, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["features"]
        f.create_group("features")
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("'features' is a group, not an array",))


@pytest.mark.parametrize(
    ("epoch", "needle"),
    [
        (np.nan, "'epoch' must be a whole number, got nan"),
        (np.inf, "'epoch' must be a whole number, got inf"),
        (2.5, "'epoch' must be a whole number, got 2.5"),
        (np.arange(3), "'epoch' must be a single number, got shape (3,)"),
    ],
    ids=["nan", "inf", "fraction", "array"],
)
def test_features_file_bad_epoch_is_refused(cli, good, tmp_path, epoch, needle) -> None:
    for suffix in (".h5", ".npz"):
        if suffix == ".h5":
            path = _features_h5(good, tmp_path)
            with h5py.File(path, "r+") as f:
                f["epoch"] = epoch
        else:
            path = tmp_path / "feats.npz"
            with np.load(good.feats) as z:
                np.savez(path, epoch=epoch, **{k: z[k] for k in z.files})
        res = _measure(cli, path, tmp_path)
        assert_refused(res, 1, path, (needle,))
        assert_no_finished_output(tmp_path)


def test_features_file_dangling_soft_link_is_refused(cli, good, tmp_path) -> None:
    path = _features_h5(good, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["labels"]
        f["labels"] = h5py.SoftLink("/gone")
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("/labels", "soft link to /gone"))


def test_features_file_soft_link_inside_the_file_still_reads(cli, good, tmp_path) -> None:
    """The walk refuses links out of the file, not links within it: ``labels`` as a soft
    link to another dataset of the same file measures as before."""
    plain = _features_h5(good, tmp_path, "plain.h5")
    path = _features_h5(good, tmp_path, "linked.h5")
    with h5py.File(path, "r+") as f:
        f.move("labels", "y")
        f["labels"] = h5py.SoftLink("/y")
    want = _run(cli, ["measure", plain, "--format", "csv"], tmp_path)
    res = _run(cli, ["measure", path, "--format", "csv"], tmp_path)
    assert want.code == 0 and res.code == 0, (want, res)
    assert res.stdout.replace("linked.h5", "X") == want.stdout.replace("plain.h5", "X")


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("how", ["external-storage", "external-link", "virtual"])
def test_dataset_reading_outside_the_file_is_refused(cli, good, tmp_path, how: str) -> None:
    """Inputs of an HDF5 dataset taken from another file: ``extract`` would have run the
    model on the secret's bytes (or on zeros, for a virtual dataset whose source is gone)."""
    path = _dataset_h5(good, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(path, "r+") as f:
        x = f["x"][()]
        del f["x"]
        if how == "external-storage":
            secret = tmp_path / "secret.bin"
            secret.write_bytes(x.tobytes())
            f.create_dataset(
                "x", shape=x.shape, dtype=x.dtype, external=[(str(secret), 0, x.nbytes)]
            )
        elif how == "external-link":
            with h5py.File(other, "w") as o:
                o["x"] = x
            f["x"] = h5py.ExternalLink(str(other), "/x")
        else:
            with h5py.File(other, "w") as o:
                o["x"] = x
            layout = h5py.VirtualLayout(shape=x.shape, dtype=x.dtype)
            layout[:] = h5py.VirtualSource(str(other), "x", shape=x.shape)
            f.create_virtual_dataset("x", layout)
            other.unlink()
    res = _extract(cli, good, path, tmp_path)
    needle = {"external-storage": "external files", "external-link": "external link"}
    assert_refused(res, 1, path, ("/x", needle.get(how, "virtual dataset")))
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- FIFOs


@pytest.mark.parametrize("name", ["pipe.h5", "pipe.npz"])
def test_fifo_given_to_measure_is_refused(cli, tmp_path, name: str) -> None:
    path = tmp_path / name
    os.mkfifo(path)
    res = _measure(cli, path, tmp_path)
    assert_refused(res, 1, path, ("FIFO", "not a regular file"))
    assert_no_finished_output(tmp_path)


def test_fifo_given_to_info_is_refused(cli, tmp_path) -> None:
    path = tmp_path / "pipe.h5"
    os.mkfifo(path)
    res = _run(cli, ["info", path], tmp_path)
    assert_refused(res, 1, path, ("FIFO", "not a regular file"))


def test_fifo_in_an_npy_pair_is_refused(cli, good, tmp_path) -> None:
    with np.load(good.data) as z:
        np.save(tmp_path / "x.npy", z["x"])
    os.mkfifo(tmp_path / "y.npy")
    res = _extract(cli, good, f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}", tmp_path)
    assert_refused(res, 1, tmp_path / "y.npy", ("FIFO", "not a regular file"))
    assert_no_finished_output(tmp_path)


@pytest.mark.parametrize("name", ["pipe.h5", "pipe.npz"])
def test_fifo_given_as_dataset_is_refused(cli, good, tmp_path, name: str) -> None:
    path = tmp_path / name
    os.mkfifo(path)
    res = cli.wait(cli.start(extract_argv(good.ckpt, path, tmp_path / "out"), cwd=tmp_path), 15)
    assert_refused(res, 1, path, ("FIFO", "not a regular file"))
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- EMFILE

_NO_FDS = r"""
import os, resource, sys
import nccli.cli

def run(argv):
    sys.argv = ["nccli", *argv]
    try:
        nccli.cli.main()
    except SystemExit as exc:
        return exc.code or 0
    return 0

warm, target = sys.argv[1:3]
if run(["measure", warm]) != 0:  # every lazy import done while descriptors are left
    sys.exit(99)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
sys.exit(run(["measure", target]))
"""


@pytest.mark.parametrize("kind", ["cache", "features-npz", "features-h5"])
def test_out_of_file_descriptors_is_not_called_corrupt(good, tmp_path, kind: str) -> None:
    """With every descriptor in use, opening an input fails with EMFILE: the message says
    so and names the file, instead of calling a good file truncated or corrupt."""
    warm = {"cache": good.cache, "features-npz": good.feats}.get(kind)
    if kind == "cache":
        target = _cache(good, tmp_path, "copy.h5")
    elif kind == "features-npz":
        target = tmp_path / "copy.npz"
        shutil.copyfile(good.feats, target)
    else:
        warm = _features_h5(good, tmp_path, "warm.h5")
        target = _features_h5(good, tmp_path, "copy.h5")
    proc = subprocess.run(
        [sys.executable, "-c", _NO_FDS, str(warm), str(target)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        timeout=300,
    )
    res = Result(proc.returncode, "", proc.stderr)
    assert_refused(res, 1, target, ("too many open files",))
    assert "corrupt" not in proc.stderr


def test_partly_written_chunked_dataset_is_read_as_written(cli, good, tmp_path) -> None:
    """A dataset pre-allocated and filled in part (h5py stores no chunk that was never
    written; it reads as the fill value): legitimate input, extracted as it reads."""
    with np.load(good.data) as z:
        x, y = z["x"], np.sort(z["y"])
    path = tmp_path / "part.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(16, x.shape[1]), compression="gzip")
        ds = f.create_dataset("y", shape=y.shape, dtype="i8", chunks=(10,), compression="gzip")
        for i in range(0, len(y), 10):
            if y[i : i + 10].any():  # the all-zero chunks of class 0 stay unwritten
                ds[i : i + 10] = y[i : i + 10]
        assert ds.id.get_num_chunks() < -(-len(y) // 10)
    res = cli(extract_argv(good.ckpt, f"{path}:/x,/y", tmp_path / "out"), cwd=tmp_path)
    assert res.code == 0, res
    assert (tmp_path / "out" / "run_ep005.h5").is_file()
