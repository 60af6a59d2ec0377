"""ClassStats reduces a batch with numpy on the CPU and with torch on a device: both paths
give the same statistics, and the CUDA path (when there is a GPU) matches the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nccli.stats as stats_mod
from nccli import ClassStats


def _data(seed: int = 0, n: int = 503, d: int = 17, K: int = 6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    H = 1e3 * rng.normal(size=(K, d))[y] + rng.normal(size=(n, d))
    return H, y, K


def _assert_same(a: ClassStats, b: ClassStats, rtol: float = 1e-12) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    for name in ("means", "scatter", "class_ss"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_reductions_agree(monkeypatch, dtype):
    H, y, K = _data()
    H = H.astype(dtype)
    fast = ClassStats.from_arrays(H, y, K, batch_size=64)
    monkeypatch.setattr(stats_mod, "_FORCE_TORCH_PATH", True)
    ref = ClassStats.from_arrays(H, y, K, batch_size=64)
    _assert_same(fast, ref)


def test_float64_input_is_not_modified():
    """The CPU path centres its own float32→float64 copy in place; float64 input is shared,
    so it must be left untouched."""
    H, y, K = _data(1)
    before = H.copy()
    ClassStats.from_arrays(H, y, K, batch_size=100)
    np.testing.assert_array_equal(H, before)


def test_half_precision_tensors():
    H, y, K = _data(2)
    h16 = torch.from_numpy(H / 1e3).to(torch.bfloat16)
    st = ClassStats.from_arrays(h16, torch.from_numpy(y), K, batch_size=50)
    ref = ClassStats.from_arrays(h16.double().numpy(), y, K)
    _assert_same(st, ref, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_accumulation_matches_cpu():
    H, y, K = _data(3)
    gpu = ClassStats(K, H.shape[1], device="cuda")
    for s in range(0, len(y), 128):
        gpu.update(torch.from_numpy(H[s : s + 128]).cuda(), torch.from_numpy(y[s : s + 128]).cuda())
    assert gpu._scatter.device.type == "cuda"  # accumulated on the device
    _assert_same(gpu, ClassStats.from_arrays(H, y, K), rtol=1e-10)


def test_big_endian_and_reversed_arrays(tmp_path):
    """HDF5 files written big-endian and arrays with negative strides are accepted."""
    import h5py

    from nccli import measure

    H, y, K = _data(4)
    ref = ClassStats.from_arrays(H, y, K)
    _assert_same(ClassStats.from_arrays(H[::-1], y[::-1], K), ref, rtol=1e-10)
    _assert_same(ClassStats.from_arrays(H.astype(">f8"), y.astype(">i8"), K), ref)
    path = tmp_path / "be.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=H.astype(">f8"))
        f["labels"] = y
    np.savez(tmp_path / "le.npz", features=H, labels=y)
    a = measure(path, metrics="nc1,ncc_acc")["value"].to_numpy()
    b = measure(tmp_path / "le.npz", metrics="nc1,ncc_acc")["value"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_torch_states_match_numpy_states(precision):
    """The torch-state path (what a CUDA device uses) run on the CPU: update, merge either
    way, flatten/unflatten and ``to`` agree with the numpy states."""
    H, y, K = _data(5)
    ref = ClassStats.from_arrays(H, y, K, batch_size=64, precision=precision)
    t = ClassStats(K, H.shape[1], precision=precision)
    t._device = torch.device("cpu")  # torch tensors on the CPU: the device path, no GPU
    t.reset()
    for s in range(0, len(y), 64):
        t.update(torch.from_numpy(H[s : s + 64]), torch.from_numpy(y[s : s + 64]))
    assert isinstance(t._scatter, torch.Tensor) and t.on_torch
    _assert_same(t, ref, rtol=1e-12 if precision == "exact" else 1e-6)
    both = ref.copy().merge(ref)
    _assert_same(t.copy().merge(ref), both, rtol=1e-12 if precision == "exact" else 1e-6)
    _assert_same(ref.copy().merge(t), both, rtol=1e-12 if precision == "exact" else 1e-6)
    back = ClassStats.unflatten(t.flatten(), K, H.shape[1])
    _assert_same(back, t, rtol=0)
    assert isinstance(t.to("cpu")._scatter, np.ndarray) and t.device == "cpu"
