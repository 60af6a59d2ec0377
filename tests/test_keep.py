"""measure keeps a streamed layer's chunks for the NC4 pass when they fit --max-memory
(one read of the file), and reads twice otherwise; the numbers are the same."""

from __future__ import annotations

import numpy as np
import pytest

from nccli import measure
from nccli.io.sources import ArraySource


@pytest.fixture()
def feats(tmp_path):
    rng = np.random.default_rng(0)
    K, d, N = 4, 6, 500
    y = rng.integers(0, K, N)
    mu = 3 * rng.normal(size=(K, d))
    H = (mu[y] + rng.normal(size=(N, d))).astype(np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, features=H, labels=y, weight=mu, bias=np.zeros(K))
    return path


@pytest.mark.parametrize(("max_memory", "reads"), [(None, 1), ("none", 1), ("1k", 2)])
def test_reads_of_the_features(feats, monkeypatch, max_memory, reads):
    calls = []
    real = ArraySource._batches

    def counting(self, layer, chunk_rows):
        calls.append(layer)
        return real(self, layer, chunk_rows)

    monkeypatch.setattr(ArraySource, "_batches", counting)
    df = measure(feats, metrics="nc1,nc4,acc", chunk_rows=64, max_memory=max_memory)
    assert len(calls) == reads
    monkeypatch.setattr(ArraySource, "_batches", real)
    ref = measure(feats, metrics="nc1,nc4,acc", chunk_rows=64, max_memory="1")
    np.testing.assert_array_equal(df["value"].to_numpy(), ref["value"].to_numpy())
