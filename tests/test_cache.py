"""The HDF5 cache schema: write, read back, and refuse tampered or unfinished files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import runner

from nccli import ClassStats, measure
from nccli.cli import app
from nccli.errors import CacheError
from nccli.io.cache import Cache, CacheWriter, LayerSpec, partial_path
from nccli.io.sources import open_sources

K, N = 3, 120
#: a cache written by nccli 0.1.0 (format version 1), kept to prove it still reads
V1_CACHE = Path(__file__).parent / "data" / "cache_v1.h5"


def _write_cache(path, *, finish=True, dims=(6, 4)):
    """A two-layer head: penultimate (6) → linear (6→4) → classifier (4→K)."""
    rng = np.random.default_rng(3)
    y = np.arange(N) % K
    h0 = rng.normal(size=(N, dims[0])) + 3 * np.eye(K, dims[0])[y]
    W1 = rng.normal(size=(dims[1], dims[0]))
    b1 = rng.normal(size=dims[1])
    h1 = h0 @ W1.T + b1
    W2 = rng.normal(size=(K, dims[1]))
    b2 = rng.normal(size=K)
    specs = [
        LayerSpec(
            "head.0", dims[0], module="head.0", depth=0, role="penultimate", weight=W1, bias=b1
        ),
        LayerSpec(
            "classifier",
            dims[1],
            module="classifier",
            depth=1,
            role="classifier",
            weight=W2,
            bias=b2,
        ),
    ]
    w = CacheWriter(
        path,
        specs,
        N,
        K,
        attrs={"epoch": 7, "classifier": "classifier", "arch": "test"},
        chunk_rows=32,
    )
    feats = {"head.0": h0.astype(np.float32), "classifier": h1.astype(np.float32)}
    stats = {n: ClassStats(K, f.shape[1]) for n, f in feats.items()}
    for start in range(0, N, 50):
        sl = slice(start, start + 50)
        w.write_rows(
            start, y[sl], np.arange(N)[sl], {n: f[sl] for n, f in feats.items()}, logits=None
        )
        for n, f in feats.items():
            stats[n].update(f[sl], y[sl])
    if not finish:
        w.close()
        return None
    w.finalize(stats)
    return feats, y, (W1, b1, W2, b2)


def test_round_trip_and_composite_classifier(tmp_path):
    path = tmp_path / "c.h5"
    feats, y, (W1, b1, W2, b2) = _write_cache(path)
    assert path.exists() and not partial_path(path).exists()
    with Cache(path) as c:
        assert list(c.layers) == ["head.0", "classifier"]
        st = c.stats("head.0")
        ref = ClassStats.from_arrays(feats["head.0"], y, K)
        np.testing.assert_allclose(st.scatter, ref.scatter, rtol=1e-12)
        assert c.attrs["epoch"] == 7
    (src,) = open_sources([path])
    v0 = src.layers["head.0"]
    np.testing.assert_allclose(v0.classifier_weight, W2 @ W1.astype(np.float32), rtol=1e-5)
    np.testing.assert_allclose(
        v0.classifier_bias,
        W2.astype(np.float32) @ b1.astype(np.float32) + b2.astype(np.float32),
        rtol=1e-5,
    )
    src.close()
    df = measure(path, metrics="nc1,nc4")
    assert set(df["layer"]) == {"head.0", "classifier"}
    # stored statistics and a streaming recompute agree
    df2 = measure(path, metrics="nc1,nc4", recompute=True)
    np.testing.assert_allclose(df["value"], df2["value"], rtol=1e-10)


def test_partial_cache_is_refused(tmp_path):
    path = tmp_path / "p.h5"
    _write_cache(path, finish=False)
    assert not path.exists()
    res = runner.invoke(app, ["measure", str(partial_path(path))])
    assert res.exit_code == 1
    assert "unfinished cache" in res.stderr and "--resume" in res.stderr


def _tamper(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda f: f.attrs.__setitem__("encoding-version", "10000.0"), "'10000.0'"),
        (lambda f: f["layers/head.0"].attrs.__setitem__("encoding-type", "floob"), "'floob'"),
        (
            lambda f: f["layers/head.0/stats"].attrs.__setitem__("encoding-version", "7"),
            "encoding-version '7'",
        ),
        (lambda f: f.__delitem__("labels"), "/labels is missing"),
        (lambda f: f["layers/head.0/stats"].__delitem__("scatter"), "'scatter' is missing"),
        (lambda f: f.attrs.__setitem__("complete", False), "marked incomplete"),
        (lambda f: f.attrs.__delitem__("encoding-type"), "not an nccli cache"),
    ],
)
def test_tampered_cache_clear_error(tmp_path, tamper, needle):
    path = tmp_path / "t.h5"
    _write_cache(path)
    _tamper(path, tamper)
    _assert_measure_refuses(path, needle)


def _assert_measure_refuses(path, needle):
    """``nccli measure path`` fails with exit 1 and one message naming the file and
    holding ``needle``, without a traceback."""
    res = runner.invoke(app, ["measure", str(path)])
    assert res.exit_code == 1, res.output
    assert needle in res.stderr
    assert str(path) in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda f: f.attrs.__setitem__("schema_version", 99), "schema_version 99"),
        (lambda f: f.attrs.__delitem__("format"), "not an nccli cache"),
        (lambda f: f.attrs.__setitem__("encoding-version", "10000.0"), "'10000.0'"),
        (lambda f: f["layers/head.0/stats"].attrs.__setitem__("encoding-version", "7"), "'7'"),
    ],
)
def test_tampered_version_1_cache_clear_error(tmp_path, tamper, needle):
    """Version-1 caches carried three version markers; each one is still checked."""
    path = tmp_path / "v1.h5"
    path.write_bytes(V1_CACHE.read_bytes())
    _tamper(path, tamper)
    _assert_measure_refuses(path, needle)


def test_truncated_cache(tmp_path):
    path = tmp_path / "t.h5"
    _write_cache(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheError, match="truncated or corrupt"):
        Cache(path)


def test_labels_out_of_range_in_cache(tmp_path):
    path = tmp_path / "t.h5"
    _write_cache(path)
    _tamper(path, lambda f: f["labels"].__setitem__(0, 17))
    res = runner.invoke(app, ["measure", str(path)])
    assert res.exit_code == 1
    assert "outside 0..2" in res.stderr


def test_shards_measure_as_one(tmp_path):
    """x.rank0.h5 + x.rank1.h5 are one source whose statistics are the merge."""
    rng = np.random.default_rng(5)
    H = rng.normal(size=(N, 5)) + 2 * np.eye(K, 5)[np.arange(N) % K]
    y = np.arange(N) % K
    W = rng.normal(size=(K, 5))
    for r, sl in enumerate((slice(0, 50), slice(50, N))):
        spec = [LayerSpec("fc", 5, module="fc", role="penultimate", weight=W)]
        shard = {"rank": r, "world_size": 2, "row_start": sl.start, "row_stop": sl.stop}
        attrs = {"classifier": "fc", **shard, "total_samples": N}  # names alone make no set
        w = CacheWriter(tmp_path / f"x.rank{r}.h5", spec, sl.stop - sl.start, K, attrs=attrs)
        w.write_rows(0, y[sl], np.arange(N)[sl], {"fc": H[sl].astype(np.float32)})
        w.finalize({"fc": ClassStats.from_arrays(H[sl].astype(np.float32), y[sl], K)})
    np.savez(tmp_path / "all.npz", features=H.astype(np.float32), labels=y, weight=W)
    a = measure(sorted(tmp_path.glob("x.rank*.h5")))
    b = measure(tmp_path / "all.npz")
    assert a["source"].nunique() == 1 and a["source"].iloc[0] == "x.h5"
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-9, atol=1e-12)
