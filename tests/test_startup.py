"""The commands that read caches and feature files start without torch or pandas
(issue 16).

Each command runs in a fresh ``python -X importtime -m nccli ...`` and the modules it
imported are read from stderr.  Neither ``torch`` nor ``pandas`` may appear for
``--version``, ``measure`` (a cache and a feature file, in every output format),
``compare``, ``info CACHE`` and ``metrics``: the commands build their rows as a
:class:`nccli.table.Rows` and write and draw those; pandas is imported only where a
DataFrame is returned (the Python API) and for ``compare --plot`` (docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from nccli import ClassStats
from nccli.io.cache import CacheWriter, LayerSpec

K, N, D = 3, 90, 5


def _cache(path, epoch: int) -> None:
    rng = np.random.default_rng(epoch)
    y = np.arange(N) % K
    h = (rng.normal(size=(N, D)) + 3 * np.eye(K, D)[y]).astype(np.float32)
    W, b = rng.normal(size=(K, D)), rng.normal(size=K)
    spec = LayerSpec("fc", D, module="fc", depth=0, role="penultimate", weight=W, bias=b)
    w = CacheWriter(path, [spec], N, K, attrs={"epoch": epoch, "classifier": "fc"})
    w.write_rows(0, y, np.arange(N), {"fc": h}, logits=None)
    w.finalize({"fc": ClassStats.from_arrays(h, y, K)})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    for epoch in (1, 2):
        _cache(root / f"ep{epoch:04d}.h5", epoch)
    rng = np.random.default_rng(0)
    np.savez(root / "feats.npz", features=rng.normal(size=(200, 16)), labels=np.arange(200) % 4)
    return root


def _imported(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nccli", *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "nccli" in names  # the importtime output was read
    return names


def test_version_imports_neither_torch_nor_pandas():
    names = _imported("--version")
    assert "torch" not in names
    assert "pandas" not in names


def test_info_on_a_cache_imports_neither_torch_nor_pandas(inputs):
    names = _imported("info", inputs / "ep0001.h5")
    assert "torch" not in names
    assert "pandas" not in names


@pytest.mark.parametrize(
    "command",
    [
        ("measure", "ep0001.h5"),
        ("measure", "ep0001.h5", "--recompute", "-m", "nc1,nc4"),
        ("measure", "feats.npz"),
        ("measure", "feats.npz", "--per-class", "--geometry", "-f", "table"),
        ("measure", "ep0001.h5", "--per-class", "--wide", "-f", "json"),
        ("measure", "ep0001.h5", "--report", "theory", "-f", "table"),
        ("compare", "ep0001.h5", "ep0002.h5"),
        ("compare", "ep0001.h5", "ep0002.h5", "-f", "table", "--fail-if", "nc1>1e9"),
        ("compare", "ep0001.h5", "ep0002.h5", "--wide", "-f", "tsv"),
        ("info", "ep0001.h5"),
        ("metrics",),
        ("metrics", "-f", "csv"),
    ],
    ids=lambda c: " ".join(c),
)
def test_commands_on_caches_import_neither_torch_nor_pandas(inputs, command):
    args = [str(inputs / a) if a.endswith((".h5", ".npz")) else a for a in command]
    names = _imported(*args)
    assert "torch" not in names
    assert "pandas" not in names


def test_class_stats_on_numpy_arrays_do_not_import_torch():
    code = (
        "import sys, numpy as np; from nccli import ClassStats; "
        "st = ClassStats.from_arrays(np.eye(4), np.arange(4), 4, batch_size=2); "
        "st.merge(st.copy()); ClassStats.from_state_dict(st.state_dict(), 4, 4); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
