"""Cache integrity (checksums, ``info --verify``), ``--skip-nonfinite``, and where files go.

The CLI's bad-input table is in ``test_bad_inputs.py``; these tests use the Python API
and CliRunner to look at the numbers and files behind it.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import cluster_data, runner, save_state_dict, seeded_model, write_cluster_npz

import nccli.io.cache.writer as cache_mod
from nccli.cli import app
from nccli.errors import CacheError, DataError
from nccli.extract import extract
from nccli.io.cache import Cache, stats_digest, verify_cache
from nccli.measure import measure
from nccli.stats import ClassStats

ex = importlib.import_module("nccli.extract")  # the package re-exports the extract() function
api = importlib.import_module("nccli.extract.api")
pipeline = importlib.import_module("nccli.extract.pipeline")
K, D, N = 3, 6, 90
ARCH = f"mlp:in_dim={D},widths=10-,num_classes={K},head_depth=1"
LAYERS = ["head.0", "classifier"]
HUGE = 3e38  # finite inputs that overflow the first layer of `hot` to inf (then nan)
BAD_ROWS = [3, 10, 11, 50]  # classes 0, 1, 2, 2


def _xy(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return cluster_data(N, D, K, seed)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_cluster_npz(tmp_path / "data.npz", N, D, K, seed=1)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_state_dict(tmp_path / "run_ep005.pt", ARCH)


@pytest.fixture
def hot(tmp_path: Path) -> Path:
    """A checkpoint whose first layer sums its inputs with positive weights."""
    model = seeded_model(ARCH)
    with torch.no_grad():
        model.body[0].weight.abs_().add_(0.5)
    torch.save(model.state_dict(), tmp_path / "hot.pt")
    return tmp_path / "hot.pt"


def run(ckpt: Path, data: Path | str, out: Path, **kw) -> Path:
    kw.setdefault("arch", ARCH)
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", False)
    [path] = extract([str(ckpt)], str(data), out_dir=out, **kw)
    return path


@pytest.fixture
def cache(tmp_path: Path, ckpt: Path, data: Path) -> Path:
    return run(ckpt, data, tmp_path / "cache")


def _rewrite_stats(path: Path, layer: str, fn, resign: bool) -> None:
    """Apply ``fn(arrays)`` to a layer's stored statistics; ``resign`` re-stamps the sha256
    (a consistent-looking file whose numbers are wrong)."""
    with h5py.File(path, "r+") as f:
        g = f[f"layers/{layer}/stats"]
        arrays = {k: g[k][()] for k in ClassStats.states}
        fn(arrays)
        for k, v in arrays.items():
            g[k][...] = v
        if resign:
            g.attrs["sha256"] = stats_digest(arrays)


# --------------------------------------------------------------------------- checksums


def test_every_layer_is_signed(cache: Path) -> None:
    with h5py.File(cache, "r") as f:
        for name in LAYERS:
            g = f[f"layers/{name}/stats"]
            arrays = {k: g[k][()] for k in ClassStats.states}
            assert g.attrs["sha256"] == stats_digest(arrays)


def test_verify_reports_each_layer(cache: Path) -> None:
    lines = verify_cache(cache, deep=True)
    assert [line.split(":")[0] for line in lines] == LAYERS
    assert all("ok (checksum, class counts, recomputed from features)" in x for x in lines)
    res = runner.invoke(app, ["info", str(cache), "--verify"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"{cache}: {n}: ok (checksum, class counts)" for n in LAYERS]


def test_cache_without_checksum_still_reads(cache: Path) -> None:
    """Caches written before the checksum existed measure as before; --verify says so.

    Those are version-1 caches (the checksum is required from version 2 on): the file is
    turned into one as nccli 0.1.0 wrote it, without the checksums."""
    before = measure(cache, metrics="nc1")
    with h5py.File(cache, "r+") as f:
        f.attrs.update({"format": "nccli-cache", "schema_version": 1, "encoding-version": "1"})
        for name in LAYERS:
            f[f"layers/{name}"].attrs["encoding-version"] = "1"
            f[f"layers/{name}/stats"].attrs["encoding-version"] = "1"
            del f[f"layers/{name}/stats"].attrs["sha256"]
    after = measure(cache, metrics="nc1")
    assert before["value"].tolist() == after["value"].tolist()
    assert all("no checksum" in line for line in verify_cache(cache))


def test_counts_that_disagree_with_the_labels(cache: Path) -> None:
    """A re-signed file whose class counts moved one sample: only --verify sees it."""

    def move(a: dict[str, np.ndarray]) -> None:
        a["counts"][0] -= 1
        a["counts"][1] += 1

    _rewrite_stats(cache, "classifier", move, resign=True)
    with pytest.raises(CacheError, match=r"layer 'classifier': the statistics count \[29, 31"):
        verify_cache(cache)
    res = runner.invoke(app, ["info", str(cache), "--verify"])
    assert res.exit_code == 1
    assert "classifier" in res.stderr and "re-extract" in res.stderr


def test_deep_verify_recomputes_from_features(cache: Path) -> None:
    def nudge(a: dict[str, np.ndarray]) -> None:
        a["means"][2, 0] *= 1 + 1e-6  # far above 1e-8, far below anything visible

    _rewrite_stats(cache, "head.0", nudge, resign=True)
    assert verify_cache(cache)  # shallow: checksum and counts agree
    with pytest.raises(CacheError, match=r"layer 'head.0': the stored statistics \(means\)"):
        verify_cache(cache, deep=True)


def test_measure_refuses_a_tampered_layer_by_name(cache: Path) -> None:
    _rewrite_stats(cache, "head.0", lambda a: a["class_ss"].__imul__(1.5), resign=False)
    with pytest.raises(CacheError, match=r"head\.0/stats: statistics checksum mismatch"):
        measure(cache)


def test_tampered_shard_is_named(tmp_path: Path, cache: Path) -> None:
    shards = [tmp_path / "run.rank0.h5", tmp_path / "run.rank1.h5"]
    for rank, p in enumerate(shards):
        shutil.copy(cache, p)
        with h5py.File(p, "r+") as f:  # shard attributes: names alone do not make a set
            n = int(f.attrs["num_samples"])
            f.attrs.update(
                rank=rank, world_size=2, row_start=rank * n, row_stop=(rank + 1) * n,
                total_samples=2 * n,
            )  # fmt: skip
    _rewrite_stats(shards[1], "classifier", lambda a: a["means"].__iadd__(1.0), resign=False)
    res = runner.invoke(app, ["measure", str(shards[0]), str(shards[1]), "-f", "csv"])
    assert res.exit_code == 1
    assert "run.rank1.h5:/layers/classifier/stats: statistics checksum mismatch" in res.stderr


# --------------------------------------------------------------------------- --skip-nonfinite


def _bad_data(tmp_path: Path) -> tuple[Path, Path]:
    """The dataset with BAD_ROWS blown up, and the same dataset without those rows."""
    x, y = _xy()
    x[BAD_ROWS] = HUGE
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    keep = np.setdiff1d(np.arange(N), BAD_ROWS)
    np.savez(tmp_path / "clean.npz", x=x[keep], y=y[keep])
    return tmp_path / "bad.npz", tmp_path / "clean.npz"


def test_nonfinite_is_an_error_by_default(tmp_path: Path, hot: Path) -> None:
    bad, _ = _bad_data(tmp_path)
    with pytest.raises(DataError, match=r"sample 3 .*--skip-nonfinite drops such samples"):
        run(hot, bad, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_skip_nonfinite_drops_rows_from_every_layer(tmp_path: Path, hot: Path) -> None:
    bad, clean = _bad_data(tmp_path)
    path = run(hot, bad, tmp_path / "skip", skip_nonfinite=True)
    ref = run(hot, clean, tmp_path / "clean")
    dropped = np.bincount(np.arange(N)[BAD_ROWS] % K, minlength=K)
    with Cache(path) as c, Cache(ref) as r:
        assert c.num_samples == N - len(BAD_ROWS)
        kept = np.setdiff1d(np.arange(N), BAD_ROWS)
        np.testing.assert_array_equal(c.h5["indices"][()], kept)  # dataset rows, not renumbered
        np.testing.assert_array_equal(c.labels(), r.labels())
        for name in LAYERS:
            np.testing.assert_array_equal(
                c.h5[f"layers/{name}"].attrs["skipped_nonfinite"], dropped
            )
            feats = c.h5[f"layers/{name}/features"][()]
            # the same rows as a run without them (float32 GEMMs of other batch shapes)
            np.testing.assert_allclose(
                feats, r.h5[f"layers/{name}/features"][()], rtol=1e-5, atol=1e-5
            )
            a = c.stats(name)
            np.testing.assert_array_equal(a.counts, r.stats(name).counts)
            fresh = ClassStats.from_arrays(feats, c.labels(), K)  # exactly the kept rows
            for state in ("means", "scatter", "class_ss"):
                x, y = getattr(a, state), getattr(fresh, state)
                assert np.abs(x - y).max() <= 1e-10 * np.abs(y).max(), (name, state)
    assert len(verify_cache(path, deep=True)) == len(LAYERS)


def test_skip_nonfinite_cli_note(tmp_path: Path, hot: Path) -> None:
    bad, _ = _bad_data(tmp_path)
    args = ["extract", str(hot), "--data", str(bad), "--arch", ARCH, "-o", str(tmp_path / "o")]
    res = runner.invoke(app, [*args, "--device", "cpu", "-b", "16", "--skip-nonfinite"])
    assert res.exit_code == 0, res.output
    [note] = [line for line in res.stderr.splitlines() if "skipped" in line]
    assert "skipped 4 samples with NaN/Inf" in note and "class 0: 1, class 1: 1, class 2: 2" in note


def test_skip_nonfinite_survives_resume(tmp_path: Path, hot: Path, monkeypatch) -> None:
    """Interrupted after rows were dropped, then resumed: the same cache as one run."""
    bad, _ = _bad_data(tmp_path)
    full = run(hot, bad, tmp_path / "full", skip_nonfinite=True)
    out = tmp_path / "out"
    submit = pipeline.BackgroundWriter.submit
    seen: list[int] = []

    def counting(self, item) -> None:
        submit(self, item)
        seen.append(1)
        if len(seen) == 2:  # after rows 0..31: three of the bad rows are gone
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(pipeline.BackgroundWriter, "submit", counting)
        with pytest.raises(KeyboardInterrupt, match="kept 29 rows; continue with --resume"):
            run(hot, bad, out, skip_nonfinite=True)
    with h5py.File(out / "hot.h5.partial", "r") as f:
        assert (f.attrs["rows_done"], f.attrs["rows_read"]) == (29, 32)
    path = run(hot, bad, out, skip_nonfinite=True, resume=True)
    with Cache(path) as a, Cache(full) as b:
        assert a.num_samples == b.num_samples == N - len(BAD_ROWS)
        for name in LAYERS:
            np.testing.assert_array_equal(
                a.h5[f"layers/{name}/features"][()], b.h5[f"layers/{name}/features"][()]
            )
            np.testing.assert_array_equal(
                a.h5[f"layers/{name}"].attrs["skipped_nonfinite"],
                b.h5[f"layers/{name}"].attrs["skipped_nonfinite"],
            )


def test_measure_skip_nonfinite_on_a_feature_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    y = np.arange(60) % K
    H = rng.normal(size=(60, 5)) + 3 * np.eye(K, 5)[y]
    W = rng.normal(size=(K, 5))
    keep = np.ones(60, bool)
    keep[[2, 5, 8]] = False  # classes 2, 2, 2
    Hbad = H.copy()
    Hbad[2, 0], Hbad[5, 4], Hbad[8, 1] = np.nan, np.inf, -np.inf
    np.savez(tmp_path / "bad.npz", features=Hbad, labels=y, weight=W, bias=np.zeros(K))
    np.savez(tmp_path / "ref.npz", features=H[keep], labels=y[keep], weight=W, bias=np.zeros(K))
    with pytest.raises(DataError, match="--skip-nonfinite"):
        measure(tmp_path / "bad.npz")
    got = measure(tmp_path / "bad.npz", skip_nonfinite=True)
    want = measure(tmp_path / "ref.npz")
    assert got["metric"].tolist() == want["metric"].tolist()
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-12, equal_nan=True)
    assert "skipped 3 samples with NaN/Inf features (--skip-nonfinite; class 2: 3)" in " ".join(
        got.attrs["notes"]
    )
    res = runner.invoke(
        app, ["measure", str(tmp_path / "bad.npz"), "--skip-nonfinite", "-f", "csv"]
    )
    assert res.exit_code == 0 and "class 2: 3" in res.stderr


# --------------------------------------------------------------------------- where files go


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_inside_inputs_never_become_paths(tmp_path: Path, data: Path) -> None:
    """A checkpoint reached through ``..`` whose dict carries path-like ``name``/``run``
    entries, read with a dataset of path-like class folders: the only new file is
    ``<out>/<file stem>.h5``."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    state = {
        "state_dict": seeded_model(ARCH).state_dict(),
        "name": "../../escaped",
        "run": "/tmp/escaped-run",
        "arch": "../x",
    }
    torch.save(state, work / "ep7.pt")
    folder = work / "images"
    x, y = _xy()
    for k, cls in enumerate(["..cls", "cls name", "...."]):
        (folder / cls).mkdir(parents=True)
        for i in np.flatnonzero(y == k)[:6]:
            np.save(folder / cls / f"{i}.npy", x[i])
    before = _tree(tmp_path)
    out = work / "out"
    for spec in (data, folder):
        args = ["extract", "sub/../ep7.pt", "--data", str(spec), "--arch", ARCH, "-o", str(out)]
        cwd = os.getcwd()
        os.chdir(work)
        try:
            res = runner.invoke(app, [*args, "--device", "cpu", "--overwrite"])
        finally:
            os.chdir(cwd)
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == str(out / "ep7.h5")
    assert _tree(tmp_path) - before == {"work/out", "work/out/ep7.h5"}
    assert not Path("/tmp/escaped-run").exists()


def test_cache_names_come_from_the_file_name_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert api.cache_path(out, Path("a/../../b/ep1.pt")) == out / "ep1.h5"
    assert api.cache_path(out, Path("/x/y/..pt")) == out / "..h5"  # a file named '..h5'
    assert api.cache_path(out, Path("...")) == out / "....h5"
    assert api.cache_path(out, Path("noext")) == out / "noext.h5"


def test_partial_that_is_a_symlink_is_not_written_through(
    tmp_path: Path, ckpt: Path, data: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_ep005.h5.partial").symlink_to(victim)
    with pytest.raises(DataError, match="is a symbolic link"):
        run(ckpt, data, out)
    assert victim.read_text() == "precious"


def test_output_directory_checked_before_any_work(tmp_path: Path, ckpt: Path, data: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    res = runner.invoke(
        app, ["extract", str(ckpt), "--data", str(data), "--arch", ARCH, "-o", f"{blocker}/a/b"]
    )
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"nccli: error: -o {blocker}/a/b: is under {blocker}, which is a file; pass a "
        "directory for the caches"
    )


def test_not_enough_disk_space_is_refused_up_front(
    tmp_path: Path, ckpt: Path, data: Path, monkeypatch
) -> None:
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda _: real._replace(free=10_000))
    with pytest.raises(DataError, match=r"needs about 0\.\d MB but only 0\.0 MB are free"):
        run(ckpt, data, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_unreadable_checkpoint_is_named(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    """The chmod-000 case of test_bad_inputs is skipped as root; the check itself is not."""
    from nccli.errors import CheckpointError
    from nccli.io import checkpoints

    real = os.access
    monkeypatch.setattr(checkpoints.os, "access", lambda p, mode: p != ckpt and real(p, mode))
    with pytest.raises(CheckpointError, match=r"run_ep005.pt: not readable .*chmod u\+r"):
        checkpoints.load_model(ckpt, arch=ARCH)
