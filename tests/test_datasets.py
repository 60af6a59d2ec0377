"""Dataset readers: every format written here, read back, and bad inputs refused."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import Evil

from nccli.errors import DataError, UsageError
from nccli.io.datasets import ArrayDataset, open_dataset, parse_normalize

RNG = np.random.default_rng(0)


def collect(ds: ArrayDataset, batch_size: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, idx = [], [], []
    for x, y, i in ds.iter_batches(batch_size):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert i.dtype == np.int64 and len(i) == len(x) == len(y)
        xs.append(x.numpy())
        ys.append(y.numpy())
        idx.append(i)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)


def float_data(n: int = 30, d: int = 5, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.normal(size=(n, d)).astype(np.float32)
    y = np.arange(n) % k
    return x, y


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("keys", [("x", "y"), ("images", "labels"), ("data", "targets")])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path: Path, keys: tuple[str, str], compressed: bool) -> None:
    x, y = float_data()
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, **{keys[0]: x, keys[1]: y})
    ds = open_dataset(str(path))
    assert len(ds) == 30 and ds.num_classes == 3 and ds.input_shape == (5,)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, y)
    got_x, got_y, idx = collect(ds)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    np.testing.assert_array_equal(idx, np.arange(30))


def test_uncompressed_npz_is_memory_mapped(tmp_path: Path) -> None:
    x, y = float_data()
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    ds = open_dataset(path)
    assert isinstance(ds._source.array, np.memmap)  # no full copy of the inputs


def test_npz_uint8_hwc_images_become_chw_floats(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(12, 8, 6, 3), dtype=np.uint8)
    labels = np.arange(12) % 4
    path = tmp_path / "img.npz"
    np.savez(path, images=images, labels=labels)
    ds = open_dataset(path)
    assert ds.input_shape == (3, 8, 6)
    x, _, _ = collect(ds, 5)
    np.testing.assert_allclose(x, images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert x.min() >= 0 and x.max() <= 1


def test_uint8_grayscale_gets_a_channel(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(10, 7, 7), dtype=np.uint8)
    path = tmp_path / "g.npz"
    np.savez(path, x=images, y=np.arange(10) % 2)
    ds = open_dataset(path)
    assert ds.input_shape == (1, 7, 7)
    x, _, _ = collect(ds)
    np.testing.assert_allclose(x[:, 0], images / np.float32(255))


def test_npz_splits(tmp_path: Path) -> None:
    xtr, ytr = float_data(20)
    xte, yte = float_data(9)
    path = tmp_path / "s.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    assert len(open_dataset(path)) == 20
    test = open_dataset(path, split="test")
    assert test.split == "test" and len(test) == 9
    np.testing.assert_array_equal(collect(test)[0], xte)
    assert len(open_dataset(f"{path}:test")) == 9
    with pytest.raises(DataError, match="no 'val' split") as err:
        open_dataset(path, split="val")
    assert str(path) in str(err.value)


def test_npz_selector_and_unknown_keys(tmp_path: Path) -> None:
    x, y = float_data()
    path = tmp_path / "k.npz"
    np.savez(path, feats=x, classes=y)
    with pytest.raises(DataError, match="cannot tell inputs from labels") as err:
        open_dataset(path)
    assert str(path) in str(err.value) and "feats" in str(err.value)
    ds = open_dataset(f"{path}:feats,classes")
    np.testing.assert_array_equal(ds.labels, y)
    with pytest.raises(DataError, match="no array named 'nope'"):
        open_dataset(f"{path}:feats,nope")


def test_npy_pair(tmp_path: Path) -> None:
    x, y = float_data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = open_dataset(f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}")
    assert ds.kind == "npy"
    np.testing.assert_array_equal(collect(ds)[0], x)
    with pytest.raises(DataError, match="missing.npy"):
        open_dataset(f"{tmp_path / 'x.npy'},{tmp_path / 'missing.npy'}")


def test_hdf5(tmp_path: Path) -> None:
    x, y = float_data(40, 6, 4)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["x"] = x
        f["y"] = y
        f.create_group("g")
        f["g/feat"] = x * 2
        f["g/lab"] = y
    with open_dataset(f"{path}:/x,/y") as ds:
        assert ds.kind == "hdf5"
        got_x, got_y, _ = collect(ds, 16)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    with open_dataset(path) as ds:  # keys found without a selector
        assert len(ds) == 40
    with open_dataset(f"{path}:/g/feat,/g/lab", limit=10) as ds:
        got_x, _, idx = collect(ds, 3)
        np.testing.assert_array_equal(got_x, 2 * x[idx])
    with open_dataset(path, limit=4) as ds:  # sparse picks: an HDF5 point selection
        got_x, _, idx = collect(ds, 4)
        np.testing.assert_array_equal(idx, [0, 10, 20, 30])
        np.testing.assert_array_equal(got_x, x[idx])
    with pytest.raises(DataError, match="no array named '/nope'"):
        open_dataset(f"{path}:/nope,/y")


# --------------------------------------------------------------------------- CIFAR


def _cifar_batch(path: Path, n: int, label_key: bytes, k: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, k, size=n)]
    labels[:k] = list(range(k))
    batch = {b"batch_label": b"batch", label_key: labels, b"data": data, b"filenames": [b"a"] * n}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return data, np.asarray(labels)


def test_cifar10_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    parts = [_cifar_batch(root / f"data_batch_{i}", 12, b"labels", 10, i) for i in (1, 2)]
    xte, yte = _cifar_batch(root / "test_batch", 10, b"labels", 10, 9)
    names = [f"c{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))

    ds = open_dataset(str(tmp_path))  # finds the cifar-10-batches-py folder
    assert ds.kind == "cifar10" and len(ds) == 24 and ds.num_classes == 10
    assert ds.input_shape == (3, 32, 32)
    assert ds.class_names == [f"c{i}" for i in range(10)]
    x, y, _ = collect(ds, 10)
    expected = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32) / np.float32(255)
    np.testing.assert_allclose(x, expected)
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))

    test = open_dataset(f"{root}:test")
    assert test.split == "test"
    np.testing.assert_array_equal(test.labels, yte)


def test_cifar100(tmp_path: Path) -> None:
    _, ytr = _cifar_batch(tmp_path / "train", 120, b"fine_labels", 100, 1)
    _, yte = _cifar_batch(tmp_path / "test", 100, b"fine_labels", 100, 2)
    names = [f"f{i}" for i in range(100)]
    (tmp_path / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=4))
    ds = open_dataset(tmp_path)
    assert ds.kind == "cifar100" and ds.num_classes == 100 and len(ds) == 120
    np.testing.assert_array_equal(ds.labels, ytr)
    np.testing.assert_array_equal(open_dataset(tmp_path, split="test").labels, yte)
    assert ds.class_names == names


def test_cifar_unpickling_is_restricted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    root = tmp_path / "cifar"
    root.mkdir()
    batch = {
        b"data": np.zeros((10, 3072), np.uint8),
        b"labels": list(range(10)),
        b"x": Evil(marker, via="system"),
    }
    (root / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle posix\.system") as err:
        open_dataset(root)
    assert str(root / "data_batch_1") in str(err.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- MNIST IDX


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    ext = ".gz" if gz else ""
    images = RNG.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    _idx(raw / f"train-images-idx3-ubyte{ext}", images, gz)
    _idx(raw / f"train-labels-idx1-ubyte{ext}", labels, gz)
    _idx(raw / f"t10k-images-idx3-ubyte{ext}", images[:10], gz)
    _idx(raw / f"t10k-labels-idx1-ubyte{ext}", labels[:10], gz)
    ds = open_dataset(tmp_path)
    assert ds.kind == "mnist-idx" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    x, y, _ = collect(ds)
    np.testing.assert_allclose(x[:, 0], images / np.float32(255))
    np.testing.assert_array_equal(y, labels)
    assert len(open_dataset(tmp_path, split="test")) == 10


def test_truncated_idx(tmp_path: Path) -> None:
    images = np.zeros((10, 4, 4), np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte", images, False)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10), False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated") as err:
        open_dataset(tmp_path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- image folders


def _png_folder(root: Path, size: tuple[int, int] = (6, 5)) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    out: dict[str, list[np.ndarray]] = {}
    for name in ("cat", "dog", "eel"):
        (root / name).mkdir(parents=True)
        out[name] = []
        for i in range(3):
            arr = RNG.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
            out[name].append(arr)
    return out


def test_image_folder_png(tmp_path: Path) -> None:
    images = _png_folder(tmp_path / "train")
    _png_folder(tmp_path / "test")
    ds = open_dataset(tmp_path)
    assert ds.kind == "image-folder"
    assert ds.class_names == ["cat", "dog", "eel"] and ds.num_classes == 3
    assert ds.input_shape == (3, 5, 6)
    x, y, _ = collect(ds, 4)
    np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 3))
    expected = np.stack([a for name in ("cat", "dog", "eel") for a in images[name]])
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2) / np.float32(255))
    assert len(open_dataset(tmp_path, split="test")) == 9
    with pytest.raises(DataError, match="no 'val' split"):
        open_dataset(tmp_path, split="val")


def test_image_folder_npy_and_size_mismatch(tmp_path: Path) -> None:
    for k in range(2):
        (tmp_path / f"class{k}").mkdir()
        for i in range(2):
            np.save(tmp_path / f"class{k}" / f"{i}.npy", np.full((4, 4), 10 * k + i, np.uint8))
    ds = open_dataset(tmp_path)
    x, y, _ = collect(ds)
    assert x.shape == (4, 1, 4, 4)
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([0, 1, 10, 11]) / np.float32(255))
    np.save(tmp_path / "class1" / "2.npy", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="must share size") as err:
        collect(open_dataset(tmp_path))
    assert "2.npy" in str(err.value)


def test_image_folder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="pip install pillow") as err:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dataset found"):
        open_dataset(tmp_path)


# --------------------------------------------------------------------------- factories


def test_torch_dataset_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nccli_test_ds.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Squares(torch.utils.data.Dataset):
                def __init__(self, n, with_targets):
                    self.n = n
                    if with_targets:
                        self.targets = [i % 3 for i in range(n)]

                def __len__(self):
                    return self.n

                def __getitem__(self, i):
                    return torch.full((2, 4, 4), float(i)), torch.tensor(i % 3)

            def make(split="train"):
                return Squares(12 if split == "train" else 6, with_targets=True)

            def make_plain():
                return Squares(9, with_targets=False)

            def broken():
                raise RuntimeError("boom")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = open_dataset("nccli_test_ds:make")
    assert ds.kind == "torch" and len(ds) == 12 and ds.input_shape == (2, 4, 4)
    x, y, _ = collect(ds, 5)
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.arange(12))
    np.testing.assert_array_equal(y, np.arange(12) % 3)
    assert len(open_dataset("nccli_test_ds:make", split="test")) == 6
    plain = open_dataset("nccli_test_ds:make_plain")
    np.testing.assert_array_equal(plain.labels, np.arange(9) % 3)
    with pytest.raises(DataError, match="boom"):
        open_dataset("nccli_test_ds:broken")
    with pytest.raises(UsageError, match="cannot import"):
        open_dataset("nccli_no_such_module:make")


# --------------------------------------------------------------------------- validation


def _npz(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((4, 2)), np.array([0.0, 1.5, 1.0, 0.0]), "whole numbers, found 1.5 at index 1"),
        (np.zeros((4, 2)), np.array([0, -1, 1, 0]), ">= 0, found -1 at index 1"),
        (np.zeros((5, 2)), np.array([0, 1, 1, 0]), "5 inputs but 4 labels"),
        (np.zeros((2, 2)), np.array([0, 4]), "2 samples for 5 classes"),
        (np.zeros((4, 2)), np.eye(4), "labels have shape"),
        (np.zeros((4, 2)), np.array(["a", "b", "c", "d"]), "expected integer class indices"),
        (np.zeros(4), np.array([0, 1, 1, 0]), "inputs have shape"),
    ],
)
def test_bad_arrays_raise_data_error_naming_the_file(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str
) -> None:
    path = _npz(tmp_path, x, y)
    with pytest.raises(DataError, match=match) as err:
        open_dataset(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_whole_float_labels_are_accepted(tmp_path: Path) -> None:
    ds = open_dataset(_npz(tmp_path, np.zeros((4, 2)), np.array([0.0, 1.0, 2.0, 1.0])))
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 1])
    assert ds.labels.dtype == np.int64


def test_non_finite_inputs_are_found_while_reading(tmp_path: Path) -> None:
    x, y = float_data()
    x[17, 2] = np.nan
    path = _npz(tmp_path, x, y)
    ds = open_dataset(path)
    with pytest.raises(DataError, match="sample 17 has NaN") as err:
        collect(ds, 8)
    assert str(path) in str(err.value)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="no such file") as err:
        open_dataset(f"{tmp_path / 'nope.h5'}:/x,/y")
    assert "nope.h5" in str(err.value)
    junk = tmp_path / "junk.bin"
    junk.write_text("hello")
    with pytest.raises(DataError, match="unrecognised dataset file"):
        open_dataset(junk)
    np.save(tmp_path / "only.npy", np.zeros((3, 2)))
    with pytest.raises(DataError, match="no labels"):
        open_dataset(tmp_path / "only.npy")


# --------------------------------------------------------------------------- options


def test_limit_is_evenly_spaced_and_ordered(tmp_path: Path) -> None:
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.repeat(np.arange(4), 25)  # class-sorted, like an image folder
    ds = open_dataset(_npz(tmp_path, x, y), limit=8)
    assert len(ds) == 8
    np.testing.assert_array_equal(ds.indices, [0, 12, 25, 37, 50, 62, 75, 87])
    np.testing.assert_array_equal(np.bincount(ds.labels), [2, 2, 2, 2])
    got_x, got_y, idx = collect(ds, 3)
    np.testing.assert_array_equal(idx, ds.indices)
    np.testing.assert_array_equal(got_x[:, 0], ds.indices)
    np.testing.assert_array_equal(got_y, ds.labels)
    assert len(open_dataset(_npz(tmp_path, x, y), limit=1000)) == 100
    with pytest.raises(UsageError):
        open_dataset(_npz(tmp_path, x, y), limit=0)


def test_normalize_explicit_preset_and_auto(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(16, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "n.npz"
    np.savez(path, x=images, y=np.arange(16) % 2)
    plain, _, _ = collect(open_dataset(path))
    ds = open_dataset(path, normalize="mean=0.5,0.4,0.3;std=0.2,0.25,0.5")
    got, _, _ = collect(ds)
    mean = np.array([0.5, 0.4, 0.3], np.float32)[None, :, None, None]
    std = np.array([0.2, 0.25, 0.5], np.float32)[None, :, None, None]
    np.testing.assert_allclose(got, (plain - mean) / std, rtol=1e-5, atol=1e-6)
    assert ds.normalization == "uint8/255 then mean=0.5,0.4,0.3;std=0.2,0.25,0.5"
    auto = open_dataset(path, normalize="auto")
    got, _, _ = collect(auto)
    np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(got.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert auto.normalization.startswith("uint8/255 then mean=")
    assert parse_normalize("cifar10")[0] == [0.4914, 0.4822, 0.4465]
    with pytest.raises(UsageError, match="has 2 values"):
        open_dataset(path, normalize="mean=0.5,0.5;std=1,1")
    with pytest.raises(UsageError):
        open_dataset(path, normalize="mean=0.5;std=0")
    with pytest.raises(UsageError):
        open_dataset(path, normalize="scale=2")


def test_digest_and_describe(tmp_path: Path) -> None:
    x, y = float_data()
    path = _npz(tmp_path, x, y)
    a, b = open_dataset(path), open_dataset(path)
    assert a.digest() == b.digest() and len(a.digest()) == 64
    assert open_dataset(path, limit=10).digest() != a.digest()
    np.savez(path, x=x, y=(y + 1) % 3)
    assert open_dataset(path).digest() != a.digest()
    text = a.describe()
    assert "\n" not in text and "npz" in text and "30 samples" in text and "3 classes" in text


def test_iter_batches_rejects_bad_batch_size(tmp_path: Path) -> None:
    ds = open_dataset(_npz(tmp_path, *float_data()))
    with pytest.raises(UsageError):
        next(ds.iter_batches(0))
