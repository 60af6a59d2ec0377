"""Bad inputs through the real CLI, each in its own process: exit code, one line, no debris.

Every case runs ``nccli.cli.main()`` with a real ``argv`` in a child process and checks

- the exit code (1: the data or a file is bad, 2: the command line is wrong, 0 for
  degenerate-but-valid data, which is reported with ``note:`` lines),
- exactly ONE line on stderr, ``nccli: error: ...``, naming the file (where there is one)
  and saying what to do,
- no ``Traceback`` anywhere in the output,
- no finished-looking output: no ``*.h5`` (nor a leftover ``.partial``) in the ``-o``
  directory of ``extract``, no ``-o`` file (nor its ``.partial``) of ``measure``.

Importing torch costs seconds on a slow machine, so the children are forked from a small
server process that has imported nccli once (``cli_harness.ForkCLI``): each case is still a
separate process with its own stdin/stdout/stderr, environment, working directory, resource
limits and exit status, running the same entry point as ``python -m nccli``
(:func:`test_fork_server_matches_python_m` checks that on one case).  The server only
imports modules and forks, so every child starts from the same clean state.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import signal
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import slow_model
import torch
from cli_harness import (
    REPO,
    ForkCLI,
    Result,
    Running,
    assert_clean_failure,
    assert_no_finished_output,
)
from helpers import Evil, python_m_nccli, save_state_dict, write_cluster_npz, write_features_npz

from nccli import zoo

K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"
BIG_D, BIG_N = 32, 4000
BIG_ARCH = f"mlp:in_dim={BIG_D},widths=32-,num_classes={K},head_depth=1"


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    server = ForkCLI(tmp_path_factory.mktemp("cli-io"))
    yield server
    server.close()


# --------------------------------------------------------------------------- good inputs


@dataclass
class Workspace:
    root: Path
    data: Path
    ckpt: Path
    feats: Path
    cache: Path
    big_data: Path
    big_ckpt: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, cli: ForkCLI) -> Workspace:
    root = tmp_path_factory.mktemp("good")
    write_cluster_npz(root / "data.npz", N, D, K, seed=1)
    write_cluster_npz(root / "big.npz", BIG_N, BIG_D, K, seed=2)
    save_state_dict(root / "run_ep005.pt", ARCH)
    torch.save(zoo.build(BIG_ARCH).state_dict(), root / "big.pt")  # torch's RNG runs on
    write_features_npz(root / "feats.npz", K)
    res = cli(extract(root / "run_ep005.pt", root / "data.npz", root / "cache"), cwd=root)
    assert res.code == 0, res
    return Workspace(
        root=root,
        data=root / "data.npz",
        ckpt=root / "run_ep005.pt",
        feats=root / "feats.npz",
        cache=root / "cache" / "run_ep005.h5",
        big_data=root / "big.npz",
        big_ckpt=root / "big.pt",
    )


def extract(ckpt: Path | str, data: Path | str, out: Path, *extra: str, arch: str = ARCH):
    args = ["extract", str(ckpt), "--data", str(data), "-o", str(out), "--device", "cpu"]
    args += ["-b", "16", *extra]
    return args + (["--arch", arch] if arch else [])


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """``build(ws, d)`` writes the bad input under ``d`` and returns the argv."""

    id: str
    build: Callable[[Workspace, Path], list[str]]
    code: int
    needles: tuple[str, ...] = ()
    fsize: int | None = None
    check: Callable[[Workspace, Path, Result], None] | None = None
    marks: list = field(default_factory=list)


def _truncate(src: Path, dst: Path, frac: float = 0.5) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(raw[: int(len(raw) * frac)])
    return dst


def _state_dict(ws: Workspace) -> dict[str, torch.Tensor]:
    return dict(torch.load(ws.ckpt, weights_only=True))


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _copy_cache(ws: Workspace, d: Path, name: str = "c.h5") -> Path:
    dst = d / name
    shutil.copy(ws.cache, dst)
    return dst


def _measure(path: Path | str, *extra: str) -> list[str]:
    return ["measure", str(path), "-f", "csv", "-o", "result.csv", *extra]


# ---- checkpoints
def b_ckpt_missing(ws, d):
    return extract(d / "nope.pt", ws.data, d / "out")


def b_ckpt_unreadable(ws, d):
    p = d / "locked.pt"
    shutil.copy(ws.ckpt, p)
    p.chmod(0)
    try:
        p.read_bytes()
    except PermissionError:
        return extract(p, ws.data, d / "out")
    pytest.skip("running as root: chmod 000 does not make a file unreadable")


def b_ckpt_empty(ws, d):
    (d / "empty.pt").write_bytes(b"")
    return extract(d / "empty.pt", ws.data, d / "out")


def b_ckpt_truncated(ws, d):
    return extract(_truncate(ws.ckpt, d / "trunc.pt"), ws.data, d / "out")


def b_ckpt_garbage(ws, d):
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return extract(d / "garbage.pt", ws.data, d / "out")


def b_ckpt_directory(ws, d):
    (d / "dir.pt").mkdir()
    return extract(d / "dir.pt", ws.data, d / "out")


def b_ckpt_missing_keys(ws, d):
    sd = _state_dict(ws)
    del sd["classifier.bias"]
    return extract(_save(sd, d / "missing.pt"), ws.data, d / "out")


def b_ckpt_unexpected_keys(ws, d):
    sd = _state_dict(ws)
    sd["extra.weight"] = torch.zeros(2, 2)
    return extract(_save(sd, d / "unexpected.pt"), ws.data, d / "out")


def b_ckpt_other_arch(ws, d):
    other = zoo.build(f"mlp:in_dim={D},widths=12-,num_classes={K},head_depth=1")
    return extract(_save(other.state_dict(), d / "other.pt"), ws.data, d / "out")


def b_ckpt_pickle_rce_pth(ws, d):
    # a nested training-script dict whose innermost state dict is a code-running pickle
    obj = {"epoch": 3, "model": {"state_dict": {"w": Evil(d / "pwned")}}}
    return extract(_save(obj, d / "evil.pth"), ws.data, d / "out")


def b_ckpt_pickle_rce_pt2(ws, d):
    evil = io.BytesIO()
    torch.save({"inputs": Evil(d / "pwned")}, evil)
    p = d / "evil.pt2"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("evil/archive_format", "pt2")
        zf.writestr("evil/version", "0")
        zf.writestr("evil/data/sample_inputs/model.pt", evil.getvalue())
    return extract(p, ws.data, d / "out", arch="")


def b_ckpt_raw_pickle_rce(ws, d):
    (d / "evil.bin").write_bytes(pickle.dumps(Evil(d / "pwned"), protocol=2))
    return extract(d / "evil.bin", ws.data, d / "out")


def b_ckpt_whole_module(ws, d):
    return extract(_save(zoo.build(ARCH), d / "whole.pt"), ws.data, d / "out", arch="")


def b_ckpt_needs_arch(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", arch="")


def b_torchscript_other_input(ws, d):
    other = zoo.build(f"mlp:in_dim=5,widths=10-,num_classes={K},head_depth=1")
    traced = torch.jit.trace(other, torch.zeros(2, 5))
    traced.save(str(d / "script.pt"))
    return extract(d / "script.pt", ws.data, d / "out", "--trust-checkpoint", arch="")


def b_ckpt_is_a_cache(ws, d):
    return extract(ws.cache, ws.data, d / "out")


def _no_side_effect(ws, d, res):
    assert not (d / "pwned").exists(), "the pickle payload ran"


# ---- datasets
def b_data_missing(ws, d):
    return extract(ws.ckpt, d / "nope.npz", d / "out")


def b_data_truncated(ws, d):
    return extract(ws.ckpt, _truncate(ws.data, d / "trunc.npz"), d / "out")


def _npz(d: Path, name: str, **arrays) -> Path:
    np.savez(d / name, **arrays)
    return d / name


def _xy(n: int = N, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % K


def b_data_wrong_width(ws, d):
    x, y = _xy(d=D - 1)
    return extract(ws.ckpt, _npz(d, "narrow.npz", x=x, y=y), d / "out")


def b_data_1d(ws, d):
    _, y = _xy()
    return extract(ws.ckpt, _npz(d, "flat.npz", x=np.zeros(N, np.float32), y=y), d / "out")


def b_data_labels_out_of_range(ws, d):
    x, y = _xy()
    y = y.copy()
    y[7] = 7
    return extract(ws.ckpt, _npz(d, "labels7.npz", x=x, y=y), d / "out")


def b_data_labels_float(ws, d):
    x, y = _xy()
    return extract(ws.ckpt, _npz(d, "flabels.npz", x=x, y=y + 0.5), d / "out")


def b_data_labels_negative(ws, d):
    x, y = _xy()
    y = y.copy()
    y[4] = -1
    return extract(ws.ckpt, _npz(d, "neg.npz", x=x, y=y), d / "out")


def b_data_too_few_samples(ws, d):
    x, _ = _xy(n=2)
    return extract(ws.ckpt, _npz(d, "two.npz", x=x, y=np.array([0, 2])), d / "out")


def b_data_length_mismatch(ws, d):
    x, y = _xy()
    return extract(ws.ckpt, _npz(d, "mismatch.npz", x=x, y=y[:80]), d / "out")


def b_data_nan_inputs(ws, d):
    x, y = _xy()
    x[5, 2] = np.nan
    return extract(ws.ckpt, _npz(d, "naninputs.npz", x=x, y=y), d / "out")


def b_data_object_array(ws, d):
    x, y = _xy()
    objs = np.empty(N, dtype=object)
    objs[:] = [Evil(d / "pwned")] * N
    return extract(ws.ckpt, _npz(d, "objects.npz", x=x, y=objs), d / "out")


def b_data_cifar_rce(ws, d):
    folder = d / "cifar"
    folder.mkdir()
    payload = pickle.dumps({b"data": Evil(d / "pwned"), b"labels": [0]}, protocol=2)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(payload)
    return extract(ws.ckpt, folder, d / "out")


def b_features_nonfinite(ws, d):
    model = zoo.build(ARCH)
    with torch.no_grad():
        model.body[0].weight[0, 0] = float("nan")
    return extract(_save(model.state_dict(), d / "diverged.pt"), ws.data, d / "out")


# ---- measure: feature files
def b_feat_nan(ws, d):
    z = dict(np.load(ws.feats))
    z["features"][7, 1] = np.inf
    return _measure(_npz(d, "nanfeat.npz", **z))


def b_feat_missing_labels(ws, d):
    z = dict(np.load(ws.feats))
    del z["labels"]
    return _measure(_npz(d, "nolabels.npz", **z))


def b_feat_float_labels(ws, d):
    z = dict(np.load(ws.feats))
    z["labels"] = z["labels"] + 0.25
    return _measure(_npz(d, "flabels.npz", **z))


def b_feat_labels_out_of_range(ws, d):
    z = dict(np.load(ws.feats))
    z["labels"][3] = 9
    return _measure(_npz(d, "labels9.npz", **z))


def b_feat_weight_shape(ws, d):
    z = dict(np.load(ws.feats))
    z["weight"] = np.zeros((K, 5))
    return _measure(_npz(d, "badweight.npz", **z))


# degenerate but valid: exit 0, the nan values explained by notes
def b_feat_single_class(ws, d):
    rng = np.random.default_rng(0)
    return [
        "measure",
        str(_npz(d, "one.npz", features=rng.normal(size=(20, 4)), labels=np.zeros(20, int))),
        "-f",
        "csv",
    ]


def b_feat_empty_class(ws, d):
    z = dict(np.load(ws.feats))
    path = _npz(d, "noweight.npz", features=z["features"], labels=z["labels"])
    return ["measure", str(path), "-f", "csv", "-k", "4"]


def b_feat_d_below_k(ws, d):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 5
    path = _npz(d, "narrow.npz", features=rng.normal(size=(40, 2)), labels=y)
    return ["measure", str(path), "-f", "csv"]


def b_data_class_without_samples(ws, d):
    x, y = _xy()
    return extract(ws.ckpt, _npz(d, "two_classes.npz", x=x, y=y % 2), d / "out")


def _has_cache_and_notes(ws, d, res):
    assert (d / "out" / "run_ep005.h5").exists()


def _nan_rows_explained(ws, d, res):
    rows = [line.split(",") for line in res.stdout.splitlines()[1:]]
    nan = [r[3] for r in rows if r[4] == "nan"]
    assert rows and nan, res
    assert "note:" in res.stderr, res


# ---- caches
def b_cache_truncated(ws, d):
    return _measure(_truncate(ws.cache, d / "trunc.h5"))


def _flip_bytes(path: Path, start: int, n: int = 32) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, start + n):
        raw[i] ^= 0xA5
    path.write_bytes(bytes(raw))


def b_cache_flipped_features(ws, d):
    # the middle of a layer's feature data: only a deep check can see it (measure trusts
    # the checksummed statistics and does not hash N x d features)
    path = _copy_cache(ws, d, "flipped.h5")
    with h5py.File(path, "r") as f:
        ds = f["layers/head.0/features"]
        where = ds.id.get_chunk_info(0).byte_offset + ds.id.get_storage_size() // 2
    _flip_bytes(path, where)
    return ["info", str(path), "--verify", "--deep"]


def b_cache_flipped_metadata(ws, d):
    # inside the object header of /layers: h5py fails in ways of its own choosing
    path = _copy_cache(ws, d, "flipped.h5")
    with h5py.File(path, "r") as f:
        where = h5py.h5o.get_info(f["layers"].id).addr
    _flip_bytes(path, where + 40)
    return _measure(path)


def b_cache_unknown_schema(ws, d):
    path = _copy_cache(ws, d, "future.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
        f.attrs["encoding-version"] = "99"
    return _measure(path)


def b_cache_missing_labels(ws, d):
    path = _copy_cache(ws, d, "nolabels.h5")
    with h5py.File(path, "r+") as f:
        del f["labels"]
    return _measure(path)


def b_cache_missing_stats_array(ws, d):
    path = _copy_cache(ws, d, "noscatter.h5")
    with h5py.File(path, "r+") as f:
        del f["layers/classifier/stats/scatter"]
    return _measure(path)


def b_cache_partial(ws, d):
    path = d / "run.h5.partial"
    shutil.copy(ws.cache, path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    return _measure(path)


def _flip_stats(path: Path, layer: str = "classifier", array: str = "scatter") -> None:
    with h5py.File(path, "r+") as f:
        ds = f[f"layers/{layer}/stats/{array}"]
        arr = ds[()]
        arr.reshape(-1).view(np.uint8)[3] ^= 0x01  # one low mantissa bit: still finite
        ds[...] = arr


def b_cache_stats_tampered_measure(ws, d):
    path = _copy_cache(ws, d, "tampered.h5")
    _flip_stats(path)
    return _measure(path)


def b_cache_stats_tampered_verify(ws, d):
    path = _copy_cache(ws, d, "tampered.h5")
    _flip_stats(path, "head.0", "means")
    return ["info", str(path), "--verify"]


def b_cache_huge_declared_stats(ws, d):
    # a small file whose extra layer declares a 10^5 x 10^5 scatter (80 GB) it does not
    # store: refused from the declared vs stored sizes, before anything is allocated
    path = _copy_cache(ws, d, "huge.h5")
    big = 100_000
    with h5py.File(path, "r+") as f:
        src = f["layers/head.0"]
        g = f["layers"].create_group("forged")
        for key in ("encoding-type", "encoding-version"):
            g.attrs[key] = src.attrs[key]
        g.attrs.update({"module": "forged", "depth": -1, "role": "other", "dim": big})
        g.create_dataset("features", shape=(N, big), dtype="f4", chunks=(1, 1000))
        st = g.create_group("stats")
        for key in ("encoding-type", "encoding-version"):
            st.attrs[key] = src["stats"].attrs[key]
        st.attrs.update({"num_classes": K, "dim": big})
        st.create_dataset("counts", data=np.full(K, N // K))
        st.create_dataset("class_ss", data=np.zeros(K))
        st.create_dataset("means", shape=(K, big), dtype="f8", chunks=(1, 1000))
        st.create_dataset("scatter", shape=(big, big), dtype="f8", chunks=(1000, 1000))
    return _measure(path)


# ---- output locations
def b_out_under_file(ws, d):
    (d / "file").write_text("x")
    return extract(ws.ckpt, ws.data, d / "file" / "out")


def b_out_is_file(ws, d):
    (d / "out").write_text("not a directory")
    return extract(ws.ckpt, ws.data, d / "out")


def _out_file_untouched(ws, d, res):
    assert (d / "out").read_text() == "not a directory"


def b_measure_out_under_file(ws, d):
    (d / "file").write_text("x")
    return ["measure", str(ws.feats), "-f", "csv", "-o", str(d / "file" / "result.csv")]


def b_disk_full_extract(ws, d):
    return extract(ws.big_ckpt, ws.big_data, d / "out", "-b", "500", arch=BIG_ARCH)


def b_disk_full_measure_output(ws, d):
    return _measure(ws.feats, "--per-class", "--geometry")


# ---- flags
def b_fail_if_malformed(ws, d):
    return ["compare", str(ws.cache), "--fail-if", "nc1>>", "-f", "csv", "-o", "result.csv"]


def b_fail_if_unknown_metric(ws, d):
    return ["compare", str(ws.cache), "--fail-if", "nc9>1", "-f", "csv", "-o", "result.csv"]


def b_arch_and_model(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--model", "pkg.mod:make")


def b_amp_on_cpu(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--amp", "fp16")


def b_batch_size_zero(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "-b", "0")


def b_missing_data_option(ws, d):
    return ["extract", str(ws.ckpt), "--arch", ARCH, "-o", str(d / "out")]


def b_unknown_option(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--frobnicate")


def b_unknown_layer(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--layers", "nosuch.layer")


def b_unknown_arch(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", arch="nosucharch:k=1")


def b_bad_model_import(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--model", "no_such_pkg.models:make", arch="")


def b_bad_normalize(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--normalize", "mean=0;std=0")


def b_cuda_missing(ws, d):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return extract(ws.ckpt, ws.data, d / "out", "--device", "cuda")


def b_limit_zero(ws, d):
    return extract(ws.ckpt, ws.data, d / "out", "--limit", "0")


def b_measure_bad_center(ws, d):
    return _measure(ws.feats, "--center", "median")


def b_measure_unknown_metric(ws, d):
    return _measure(ws.feats, "-m", "nc9")


def b_measure_unknown_layer(ws, d):
    return _measure(ws.cache, "--layer", "nosuch")


def b_measure_missing_file(ws, d):
    return _measure(d / "nope.h5")


CASES = [
    # checkpoints
    Case("ckpt-missing", b_ckpt_missing, 1, ("nope.pt", "no such checkpoint file", "check")),
    Case("ckpt-unreadable", b_ckpt_unreadable, 1, ("locked.pt", "ermission")),
    Case("ckpt-empty", b_ckpt_empty, 1, ("empty.pt", "empty", "re-save")),
    Case("ckpt-truncated", b_ckpt_truncated, 1, ("trunc.pt", "truncated or corrupt", "re-save")),
    Case("ckpt-garbage", b_ckpt_garbage, 1, ("garbage.pt", "not a checkpoint")),
    Case("ckpt-directory", b_ckpt_directory, 1, ("dir.pt", "is a directory")),
    Case("ckpt-missing-keys", b_ckpt_missing_keys, 1, ("missing.pt", "missing keys", "--arch")),
    Case("ckpt-unexpected-keys", b_ckpt_unexpected_keys, 1, ("unexpected.pt", "extra.weight")),
    Case("ckpt-other-arch", b_ckpt_other_arch, 1, ("other.pt", "shape mismatch", "--arch")),
    Case(
        "ckpt-pickle-rce-pth",
        b_ckpt_pickle_rce_pth,
        1,
        ("evil.pth", "--trust-checkpoint"),
        check=_no_side_effect,
    ),
    Case(
        "ckpt-pickle-rce-pt2",
        b_ckpt_pickle_rce_pt2,
        1,
        ("evil.pt2", "--trust-checkpoint"),
        check=_no_side_effect,
    ),
    Case(
        "ckpt-raw-pickle-rce",
        b_ckpt_raw_pickle_rce,
        1,
        ("evil.bin", "--trust-checkpoint"),
        check=_no_side_effect,
    ),
    Case("ckpt-whole-module", b_ckpt_whole_module, 1, ("whole.pt", "--trust-checkpoint")),
    Case("ckpt-weights-without-arch", b_ckpt_needs_arch, 2, ("run_ep005.pt", "--arch")),
    Case("torchscript-other-input", b_torchscript_other_input, 1, ("script.pt", "shape")),
    Case("ckpt-is-a-cache", b_ckpt_is_a_cache, 1, ("run_ep005.h5", "HDF5")),
    # datasets
    Case("data-missing", b_data_missing, 1, ("nope.npz", "no such file")),
    Case("data-truncated", b_data_truncated, 1, ("trunc.npz", "re-create")),
    Case("data-wrong-width", b_data_wrong_width, 1, ("run_ep005.pt", "shape")),
    Case("data-1d-inputs", b_data_1d, 1, ("flat.npz", "shape")),
    Case("data-labels-out-of-range", b_data_labels_out_of_range, 1, ("labels up to 7",)),
    Case("data-labels-float", b_data_labels_float, 1, ("flabels.npz", "label")),
    Case("data-labels-negative", b_data_labels_negative, 1, ("neg.npz", ">= 0")),
    Case("data-fewer-samples-than-classes", b_data_too_few_samples, 1, ("two.npz", "classes")),
    Case("data-length-mismatch", b_data_length_mismatch, 1, ("mismatch.npz", "labels")),
    Case("data-nan-inputs", b_data_nan_inputs, 1, ("naninputs.npz", "sample 5", "NaN")),
    Case("data-object-array", b_data_object_array, 1, ("objects.npz",), check=_no_side_effect),
    Case("data-cifar-pickle-rce", b_data_cifar_rce, 1, ("cifar",), check=_no_side_effect),
    Case("features-nonfinite", b_features_nonfinite, 1, ("diverged.pt", "--skip-nonfinite")),
    Case("data-class-without-samples", b_data_class_without_samples, 0, check=_has_cache_and_notes),
    # feature files
    Case("feat-nonfinite", b_feat_nan, 1, ("nanfeat.npz", "NaN", "--skip-nonfinite")),
    Case("feat-missing-labels", b_feat_missing_labels, 1, ("nolabels.npz", "labels")),
    Case("feat-float-labels", b_feat_float_labels, 1, ("flabels.npz", "integers")),
    Case("feat-labels-out-of-range", b_feat_labels_out_of_range, 1, ("labels9.npz", "9")),
    Case("feat-weight-shape", b_feat_weight_shape, 1, ("badweight.npz", "weight")),
    Case("feat-single-class", b_feat_single_class, 0, check=_nan_rows_explained),
    Case("feat-class-without-samples", b_feat_empty_class, 0, check=_nan_rows_explained),
    Case("feat-d-below-k", b_feat_d_below_k, 0),
    # caches
    Case("cache-truncated", b_cache_truncated, 1, ("trunc.h5", "re-extract")),
    Case(
        "cache-bytes-flipped-middle",
        b_cache_flipped_features,
        1,
        ("flipped.h5", "head.0", "re-extract"),
    ),
    Case(
        "cache-bytes-flipped-metadata",
        b_cache_flipped_metadata,
        1,
        ("flipped.h5", "corrupt", "re-extract"),
    ),
    Case("cache-unknown-schema", b_cache_unknown_schema, 1, ("future.h5", "schema_version 99")),
    Case("cache-missing-dataset", b_cache_missing_labels, 1, ("nolabels.h5", "/labels")),
    Case("cache-missing-stats", b_cache_missing_stats_array, 1, ("noscatter.h5", "scatter")),
    Case("cache-partial", b_cache_partial, 1, ("run.h5.partial", "--resume")),
    Case(
        "cache-stats-tampered-measure",
        b_cache_stats_tampered_measure,
        1,
        ("tampered.h5", "classifier", "checksum", "re-extract"),
    ),
    Case(
        "cache-stats-tampered-verify",
        b_cache_stats_tampered_verify,
        1,
        ("tampered.h5", "head.0", "checksum"),
    ),
    Case("cache-huge-declared-stats", b_cache_huge_declared_stats, 1, ("huge.h5", "forged")),
    # outputs
    Case("out-under-a-file", b_out_under_file, 2, ("file/out", "-o")),
    Case("out-is-a-file", b_out_is_file, 2, ("out", "directory"), check=_out_file_untouched),
    Case("measure-out-under-a-file", b_measure_out_under_file, 2, ("result.csv", "write")),
    Case("disk-full-extract", b_disk_full_extract, 1, ("big.h5", "space"), fsize=150_000),
    Case(
        "disk-full-measure-output",
        b_disk_full_measure_output,
        1,
        ("result.csv", "space"),
        fsize=2_000,
    ),
    # flags
    Case("fail-if-malformed", b_fail_if_malformed, 2, ("nc1>>", "METRIC OP NUMBER")),
    Case("fail-if-unknown-metric", b_fail_if_unknown_metric, 2, ("nc9",)),
    Case("arch-with-model", b_arch_and_model, 2, ("--arch", "--model")),
    Case("amp-on-cpu", b_amp_on_cpu, 2, ("--amp fp16", "--device cuda")),
    Case("batch-size-zero", b_batch_size_zero, 2, ("--batch-size", "--help")),
    Case("missing-data-option", b_missing_data_option, 2, ("--data", "--help")),
    Case("unknown-option", b_unknown_option, 2, ("--frobnicate",)),
    Case("unknown-layer", b_unknown_layer, 2, ("nosuch.layer", "modules are")),
    Case("unknown-arch", b_unknown_arch, 2, ("nosucharch",)),
    Case("model-import-fails", b_bad_model_import, 2, ("no_such_pkg", "install")),
    Case("normalize-zero-std", b_bad_normalize, 2, ("--normalize", "std")),
    Case("cuda-unavailable", b_cuda_missing, 2, ("--device cuda", "--device cpu")),
    Case("limit-zero", b_limit_zero, 2, ("--limit",)),
    Case("measure-bad-center", b_measure_bad_center, 2, ("--center",)),
    Case("measure-unknown-metric", b_measure_unknown_metric, 2, ("nc9",)),
    Case("measure-unknown-layer", b_measure_unknown_layer, 2, ("nosuch", "layers are")),
    Case("measure-missing-file", b_measure_missing_file, 1, ("nope.h5", "no such file")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Workspace, cli: ForkCLI, tmp_path: Path) -> None:
    argv = case.build(ws, tmp_path)
    res = cli(argv, cwd=tmp_path, fsize=case.fsize)
    assert_clean_failure(res, case.code, case.needles)
    if case.code != 0:
        assert_no_finished_output(tmp_path)
    if case.check is not None:
        case.check(ws, tmp_path, res)


def test_there_are_enough_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


# --------------------------------------------------------------------------- signals


def _start_slow_extract(cli: ForkCLI, ws: Workspace, d: Path) -> Running:
    model = slow_model.write(d, ARCH, 0.3)  # every forward sleeps 0.3 s
    run = cli.start(
        extract(ws.ckpt, ws.data, d / "out", "-b", "10", "--model", model, arch=""), cwd=d
    )
    part = d / "out" / "run_ep005.h5.partial"
    deadline = time.monotonic() + 60
    while not part.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert part.exists(), "the extraction never started writing"
    # wait for the first flushed batch (read past the writer's HDF5 lock; a read that
    # lands mid-flush fails and is retried); 8 more batches x 0.3 s are still to go
    while time.monotonic() < deadline:
        try:
            with h5py.File(part, "r", locking=False) as f:
                if int(f.attrs["rows_done"]) > 0:
                    break
        except (OSError, KeyError, RuntimeError):
            pass
        time.sleep(0.02)
    return run


@pytest.mark.slow
def test_sigint_mid_extraction(ws: Workspace, cli: ForkCLI, tmp_path: Path) -> None:
    run = _start_slow_extract(cli, ws, tmp_path)
    os.kill(run.pid, signal.SIGINT)
    res = cli.wait(run)
    assert_clean_failure(res, 130, ("interrupted", "run_ep005.h5.partial", "--resume"))
    assert_no_finished_output(tmp_path, partial_ok=True)
    with h5py.File(tmp_path / "out" / "run_ep005.h5.partial", "r") as f:
        assert 0 < int(f.attrs["rows_done"]) < N


@pytest.mark.slow
def test_sigkill_mid_extraction(ws: Workspace, cli: ForkCLI, tmp_path: Path) -> None:
    run = _start_slow_extract(cli, ws, tmp_path)
    os.kill(run.pid, signal.SIGKILL)
    res = cli.wait(run)
    assert res.code == -signal.SIGKILL
    assert_no_finished_output(tmp_path, partial_ok=True)
    res = cli(_measure(tmp_path / "out" / "run_ep005.h5.partial"), cwd=tmp_path)
    assert_clean_failure(res, 1, ("run_ep005.h5.partial", "--resume"))


# --------------------------------------------------------------------------- --debug, python -m


def test_debug_shows_the_traceback(ws: Workspace, cli: ForkCLI, tmp_path: Path) -> None:
    argv = extract(tmp_path / "nope.pt", ws.data, tmp_path / "out")
    res = cli(["--debug", *argv], cwd=tmp_path)
    assert res.code != 0
    assert "Traceback" in res.stderr and "no such checkpoint file" in res.stderr


@pytest.mark.slow
def test_fork_server_matches_python_m(ws: Workspace, cli: ForkCLI, tmp_path: Path) -> None:
    """The forked children behave like ``python -m nccli`` (one case, both ways)."""
    path = _copy_cache(ws, tmp_path, "tampered.h5")
    _flip_stats(path)
    argv = ["measure", str(path), "-f", "csv"]
    forked = cli(argv, cwd=tmp_path)
    proc = python_m_nccli(
        *argv, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    )
    assert (forked.code, forked.stdout, forked.stderr) == (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )
    assert proc.returncode == 1
