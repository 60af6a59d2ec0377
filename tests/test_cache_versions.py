"""Cache format versions: the (encoding-type, encoding-version) registry, version 2 as
written today, and version-1 caches (nccli 0.1.0) read unchanged.

``tests/data/cache_v1.h5`` was written by nccli 0.1.0 (an MLP with a two-layer linear head
on 60 digits); ``cache_v1_measure.json`` is what that nccli measured on it
(``measure --metrics all --per-class -f json``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from nccli import ClassStats, measure
from nccli.errors import CacheError
from nccli.io.cache import Cache, CacheWriter, Layer, get_spec, verify_cache
from nccli.io.cache.encoding import IOSpec, register_read, register_write, versions

DATA = Path(__file__).parent / "data"
V1 = DATA / "cache_v1.h5"
K, N, D = 3, 30, 4


def _v2(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(N) % K
    h = (rng.normal(size=(N, D)) + 2 * np.eye(K, D)[y]).astype(np.float32)
    W = rng.normal(size=(K, D))
    w = CacheWriter(path, [Layer("fc", D, module="fc", role="penultimate", weight=W)], N, K)
    w.write_rows(0, y, np.arange(N), {"fc": h})
    w.finalize({"fc": ClassStats.from_arrays(h, y, K)})
    return path


def test_version_1_cache_measures_as_nccli_0_1_0_did(tmp_path: Path) -> None:
    path = tmp_path / "cache_v1.h5"
    shutil.copy(V1, path)
    with Cache(path) as c:
        assert c.version == "1"
        assert list(c.layers) == ["head.0", "head.1", "classifier"]
        K = c.num_classes
    expect = json.loads((DATA / "cache_v1_measure.json").read_text())
    df = measure(path, metrics="all", per_class=True)
    # `classes` (the number of classes measured) is newer than 0.1.0: every class has samples
    added = df[df["metric"] == "classes"]
    assert list(added["value"]) == [float(K)] * 3
    # so are the held-out metrics (nan here: a training split has no training reference)
    newer = df[df["metric"].str.endswith("_train_means")]
    assert len(newer) == 6 and newer["value"].isna().all()
    known = {row["metric"] for row in expect}
    got = df[df["metric"].isin(known)].to_dict(orient="records")
    assert len(got) == len(expect)
    for a, b in zip(got, expect, strict=True):
        cls = None if a["class"] is None or a["class"] is pd.NA else int(a["class"])
        assert (a["layer"], a["metric"], cls) == (b["layer"], b["metric"], b["class"])
        if b["value"] is None:
            assert a["value"] is None or math.isnan(a["value"])
        else:
            assert a["value"] == pytest.approx(b["value"], rel=1e-12, abs=1e-14), a


def test_version_1_cache_verifies(tmp_path: Path) -> None:
    lines = verify_cache(V1, deep=True)
    assert len(lines) == 3 and all("ok (checksum, class counts, recomputed" in x for x in lines)


def test_version_2_has_one_version_marker(tmp_path: Path) -> None:
    path = _v2(tmp_path / "c.h5")
    with h5py.File(path, "r") as f:
        assert "format" not in f.attrs and "schema_version" not in f.attrs
        assert get_spec(f) == IOSpec("nccli-cache", "2")
        assert get_spec(f["layers/fc"]) == IOSpec("nccli-layer", "2")
        assert get_spec(f["layers/fc/stats"]) == IOSpec("nccli-classstats", "2")
    with Cache(path) as c:
        assert c.version == "2"


def test_version_2_requires_the_statistics_checksum(tmp_path: Path) -> None:
    path = _v2(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        del f["layers/fc/stats"].attrs["sha256"]
    with Cache(path) as c, pytest.raises(CacheError, match="no sha256 checksum"):
        c.stats("fc")


def test_version_1_statistics_without_checksum_still_read(tmp_path: Path) -> None:
    path = tmp_path / "v1.h5"
    shutil.copy(V1, path)
    with h5py.File(path, "r+") as f:
        del f["layers/head.0/stats"].attrs["sha256"]
    with Cache(path) as c:
        assert c.stats("head.0").n == 60
    assert "no checksum (written by an older nccli)" in verify_cache(path)[0]


@pytest.mark.parametrize(
    ("element", "type_"),
    [("/", "nccli-cache"), ("/layers/fc", "nccli-layer"), ("/layers/fc/stats", "nccli-classstats")],
)
def test_unknown_version_names_the_element_and_the_file(
    tmp_path: Path, element: str, type_: str
) -> None:
    path = _v2(tmp_path / "future.h5")
    with h5py.File(path, "r+") as f:
        f[element].attrs["encoding-version"] = "10000.0"
    with pytest.raises(CacheError) as err:
        with Cache(path) as c:
            c.stats("fc")
    msg = str(err.value)
    assert str(path) in msg and "encoding-version '10000.0'" in msg
    assert element.rstrip("/") in msg or element == "/"
    assert f"it reads {type_} versions 1, 2" in msg


def test_mixed_versions_are_refused(tmp_path: Path) -> None:
    """A version-2 cache holds version-2 elements only (an edited file could otherwise
    carry statistics of the version whose checksum is optional)."""
    path = _v2(tmp_path / "mixed.h5")
    with h5py.File(path, "r+") as f:
        f["layers/fc/stats"].attrs["encoding-version"] = "1"
    with pytest.raises(CacheError, match="inside a version-2 cache"):
        Cache(path)


def test_registry_refuses_a_second_reader_or_writer_version() -> None:
    assert versions("nccli-cache") == ["1", "2"]
    with pytest.raises(TypeError, match="already registered"):
        register_read(IOSpec("nccli-cache", "2"))(lambda *a: None)
    with pytest.raises(TypeError, match="already written as version 2"):
        register_write(IOSpec("nccli-layer", "3"))(lambda *a: None)
