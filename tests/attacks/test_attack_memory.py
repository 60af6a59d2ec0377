"""Memory bombs: inputs of a few KB that declare gigabytes, each a runnable attack.

Every case builds the crafted file under ``tmp_path`` (each under 1 MB), runs the real
CLI on it and checks the contract of a refused input (:func:`cli_harness.assert_refused`:
exit 1, one line naming the file and the number it declares, no traceback) with a peak
resident memory far below what the file asks for (under 1 GB; the cases pin under 600 MB),
and no finished output.

- ``cache-*``: a compressed (hence forged) 80 GB scatter or 4 GB weight, labels and
  features declaring 10^9 rows the file never stored (read whole before validation).
- ``feat-*``: compressed labels or features declaring 10^9 rows (chunks never stored),
  compressed labels within their chunks but beyond what is read whole, a few-KB
  features file of 10^6 dimensions (an 8 TB scatter).
- ``npz-*``: a bzip2 (or lzma) member, a deflated member beyond the decompression bound,
  a ``.npy`` header that claims more bytes than its member holds (it was memory-mapped
  past the member's end).
- ``hdf5-data-*``: a dataset whose compressed chunks are larger than nccli decompresses
  at once, labels beyond the bound of what is read whole.
- ``image-*``: a PNG whose header declares 81 or 400 megapixels (a 80 KB file decoded to
  81 MB, then batched), first in the folder or inside the probe batch.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from attack_kit import extract_argv
from cli_harness import Result, assert_no_finished_output, assert_refused

TIMEOUT = 120
#: the peak RSS every refusal must stay under (the CLI itself takes about 200-300 MB)
RSS_MB = 600
BIG = 10**9  # rows a few-KB file declares


def _run(cli, argv: list, cwd: Path) -> Result:
    return cli.wait(cli.start([str(a) for a in argv], cwd=cwd), timeout=TIMEOUT)


def _measure(cli, path: Path, cwd: Path, *extra: str) -> Result:
    return _run(cli, ["measure", path, "-o", cwd / "result.csv", *extra], cwd)


def _extract(cli, good, data: Path | str, d: Path) -> Result:
    return _run(cli, extract_argv(good.ckpt, data, d / "out"), d)


def _refused(res: Result, path: Path, *needles: str) -> None:
    assert path.stat().st_size < 1 << 20, "the attack file itself must be small"
    assert_refused(res, 1, path, needles, max_rss_mb=RSS_MB)


def _deflated_chunks(ds: h5py.Dataset) -> None:
    """Store every chunk of the gzip-compressed ``ds`` as deflated zeros, written
    directly (compressed once: a 64 MB chunk costs 64 KB)."""
    nbytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
    data = zlib.compress(bytes(nbytes), 9)
    for offset in itertools.product(
        *(range(0, s, c) for s, c in zip(ds.shape, ds.chunks, strict=True))
    ):
        ds.id.write_direct_chunk(offset, data)


def _gzip(f: h5py.File, key: str, shape: tuple, dtype: str, chunks: tuple, fill: bool):
    ds = f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, compression="gzip")
    if fill:
        _deflated_chunks(ds)
    return ds


# --------------------------------------------------------------------------- caches


def _cache(good, d: Path, name: str = "bomb.h5") -> Path:
    path = d / name
    shutil.copyfile(good.cache, path)
    return path


def test_cache_compressed_huge_scatter_is_refused(cli, good, tmp_path) -> None:
    """An extra layer whose statistics declare a 10^5 × 10^5 scatter (80 GB), compressed
    so that the declared-vs-stored check used to be skipped: it was read whole."""
    path = _cache(good, tmp_path)
    big = 100_000
    with h5py.File(path, "r+") as f:
        src = next(iter(f["layers"].values()))
        K = int(f.attrs["num_classes"])
        g = f["layers"].create_group("forged")
        for key in ("encoding-type", "encoding-version"):
            g.attrs[key] = src.attrs[key]
        g.attrs.update({"module": "forged", "depth": -1, "role": "other", "dim": big})
        st = g.create_group("stats")
        for key in ("encoding-type", "encoding-version"):
            st.attrs[key] = src["stats"].attrs[key]
        st.attrs.update({"num_classes": K, "dim": big})
        st.create_dataset("counts", data=src["stats/counts"][()])
        st.create_dataset("class_ss", data=np.zeros(K))
        for key, shape in (("means", (K, big)), ("scatter", (big, big))):
            st.create_dataset(key, shape=shape, dtype="f8", chunks=(1, 1000), compression="gzip")
    res = _measure(cli, path, tmp_path)
    _refused(res, path, "/layers/forged/stats", "is compressed", "forged")
    assert_no_finished_output(tmp_path)


def test_cache_compressed_huge_weight_is_refused(cli, good, tmp_path) -> None:
    """A layer's weight replaced by a compressed (10^8, d) matrix that stores nothing:
    ``Cache.weight`` skipped its size check for compressed data and read 10^8·d floats."""
    path = _cache(good, tmp_path)
    with h5py.File(path, "r+") as f:
        name = next(n for n, g in f["layers"].items() if "weight" in g)
        key = f"layers/{name}/weight"
        dim = f[key].shape[1]
        del f[key]
        f.create_dataset(
            key, shape=(10**8, dim), dtype="f4", chunks=(4096, dim), compression="gzip"
        )
    res = _measure(cli, path, tmp_path)
    _refused(res, path, f"/layers/{name}/weight", "is compressed")
    assert_no_finished_output(tmp_path)


def test_cache_declaring_a_billion_rows_is_refused(cli, good, tmp_path) -> None:
    """``num_samples`` = 10^9 with ``/labels`` and every layer's features declared that
    long and never stored, statistics removed: ``measure`` read the 8 GB of labels whole
    before checking them."""
    path = _cache(good, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["num_samples"] = BIG
        for key in ("labels", "indices"):
            del f[key]
            f.create_dataset(key, shape=(BIG,), dtype="i8", chunks=(1 << 16,))
        if "logits" in f:
            K = f["logits"].shape[1]
            del f["logits"]
            f.create_dataset("logits", shape=(BIG, K), dtype="f4", chunks=(1 << 14, K))
        for g in f["layers"].values():
            del g["stats"]
            dim, dtype = g["features"].shape[1], g["features"].dtype
            del g["features"]
            g.create_dataset("features", shape=(BIG, dim), dtype=dtype, chunks=(1 << 14, dim))
    for argv in (["measure", path], ["info", path, "--verify"]):
        res = _run(cli, argv, tmp_path)
        _refused(res, path, "/labels", f"declares {8 * BIG} bytes", "stores 0")
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- features files


def test_features_file_billion_compressed_rows_are_refused(cli, tmp_path) -> None:
    """Features (10^9, 4) and labels (10^9,), gzip-compressed, no chunk stored: 3 KB that
    read as 8 GB of labels (whole) and 16 GB of features.  Unwritten chunks are legitimate
    in an input (they read as the fill value), so it is the labels, read whole, whose
    declared size is refused before anything is allocated."""
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        _gzip(f, "features", (BIG, 4), "f4", (1 << 16, 4), fill=False)
        _gzip(f, "labels", (BIG,), "i8", (1 << 16,), fill=False)
    res = _measure(cli, path, tmp_path)
    _refused(res, path, "'labels'", f"declares {8 * BIG} bytes, compressed", "refuses more than")
    assert_no_finished_output(tmp_path)


def test_features_file_compressed_labels_beyond_the_bound(cli, tmp_path) -> None:
    """40 M rows whose chunks are all stored (deflated zeros, 520 KB in all): streaming
    the features is fine, but the 320 MB of labels would be read whole (and copied)."""
    path = tmp_path / "bomb.h5"
    rows = 40 << 20
    with h5py.File(path, "w") as f:
        _gzip(f, "features", (rows, 1), "f4", (16 << 20, 1), fill=True)
        _gzip(f, "labels", (rows,), "i8", (8 << 20,), fill=True)
    res = _measure(cli, path, tmp_path)
    _refused(res, path, "'labels'", f"declares {8 * rows} bytes, compressed", "268435456")
    assert_no_finished_output(tmp_path)


@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_features_file_of_a_million_dimensions_is_refused(cli, tmp_path, fmt: str) -> None:
    """Two samples of 10^6 zeros (8 KB compressed): their d×d scatter is 8 TB."""
    path = tmp_path / f"wide.{fmt}"
    d = 10**6
    if fmt == "h5":
        with h5py.File(path, "w") as f:
            _gzip(f, "features", (2, d), "f4", (2, d), fill=True)
            f["labels"] = np.array([0, 1])
    else:
        np.savez_compressed(path, features=np.zeros((2, d), np.float32), labels=np.array([0, 1]))
    res = _measure(cli, path, tmp_path)
    _refused(res, path, f"{d}-dimensional features need 8000.0 GB of statistics")
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- npz


def _header_bytes(header: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _zeros_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: str) -> None:
    """``name`` holding a .npy of zeros of ``shape``, streamed (never all in memory)."""
    header = _header_bytes({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = bytes(16 << 20)
    with zf.open(name, "w", force_zip64=True) as m:
        m.write(header)
        while left:
            m.write(block[: min(left, len(block))])
            left -= min(left, len(block))


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
@pytest.mark.parametrize("command", ["measure", "extract"])
def test_npz_bzip2_or_lzma_member_is_refused(cli, good, tmp_path, method, command) -> None:
    """bzip2 expands zeros about 10^6-fold (a 1 KB member: 1 GB), and numpy decompressed
    the member whole; nccli reads only stored and deflated members."""
    path = tmp_path / "bomb.npz"
    keys = ("features", "labels") if command == "measure" else ("x", "y")
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        _zeros_member(zf, f"{keys[0]}.npy", (1 << 21, 6), "f4")  # 48 MB of zeros
        _zeros_member(zf, f"{keys[1]}.npy", (1 << 21,), "i8")
    name = "bzip2" if method == zipfile.ZIP_BZIP2 else "lzma"
    if command == "measure":
        res = _measure(cli, path, tmp_path)
    else:
        res = _extract(cli, good, path, tmp_path)
    _refused(res, path, f"member '{keys[0]}.npy' is {name}", "stored or deflated")
    assert_no_finished_output(tmp_path)


def test_npz_deflated_member_beyond_the_bound_is_refused(cli, good, tmp_path) -> None:
    """300 MB of deflated zeros (300 KB): decompressed whole before anything was checked."""
    path = tmp_path / "bomb.npz"
    rows = (300 << 20) // 24
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        _zeros_member(zf, "x.npy", (rows, 6), "f4")
        _zeros_member(zf, "y.npy", (rows,), "i8")
    res = _extract(cli, good, path, tmp_path)
    _refused(res, path, "member 'x.npy'", f"declares {rows * 24} bytes, compressed", "268435456")
    assert_no_finished_output(tmp_path)


@pytest.mark.parametrize("command", ["measure", "extract"])
def test_npz_header_longer_than_its_member_is_refused(cli, good, tmp_path, command) -> None:
    """A stored member whose header says float64 over float32 data: the memory map ran
    past the member's end, into the next member's bytes (numpy itself refuses the file)."""
    path = tmp_path / "liar.npz"
    with np.load(good.feats if command == "measure" else good.data) as z:
        arrays = {k: z[k] for k in z.files}
    xk = "features" if command == "measure" else "x"
    x = arrays.pop(xk).astype(np.float32)
    header = _header_bytes({"descr": "<f8", "fortran_order": False, "shape": x.shape})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{xk}.npy", header + x.tobytes())
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w") as m:
                np.lib.format.write_array(m, v)
        zf.writestr("pad.npy", bytes(1 << 16))  # more bytes after it for the map to reach
    res = (
        _measure(cli, path, tmp_path)
        if command == "measure"
        else _extract(cli, good, path, tmp_path)
    )
    _refused(res, path, f"member '{xk}.npy' declares shape {x.shape} float64", f"holds {x.nbytes}")
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- HDF5 datasets


def test_hdf5_dataset_chunk_too_large_to_decompress(cli, good, tmp_path) -> None:
    """Inputs compressed in one 1.3 GB chunk (HDF5 decompresses a chunk whole to read any
    slice of it): refused from the chunk shape."""
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        _gzip(f, "x", (90, 6, 600_000), "f4", (90, 6, 600_000), fill=False)
        f["y"] = np.arange(90) % 3
    res = _extract(cli, good, path, tmp_path)
    _refused(res, path, "inputs 'x'", f"chunks of {90 * 6 * 600_000 * 4} bytes")
    assert_no_finished_output(tmp_path)


def test_hdf5_dataset_labels_beyond_the_bound(cli, good, tmp_path) -> None:
    """Labels of 40 M rows, every chunk stored as deflated zeros (325 KB): they were read
    whole (320 MB, then copied by the checks) before the count was compared with the
    inputs'."""
    path = tmp_path / "bomb.h5"
    rows = 40 << 20
    with np.load(good.data) as z, h5py.File(path, "w") as f:
        f["x"] = z["x"]
        _gzip(f, "y", (rows,), "i8", (8 << 20,), fill=True)
    res = _extract(cli, good, path, tmp_path)
    _refused(res, path, "labels 'y'", f"declares {8 * rows} bytes, compressed")
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- images


def _png(path: Path, width: int, height: int, *, data: bool = True) -> None:
    """A grayscale PNG of zeros, compressed as it is written (81 MP: about 80 KB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    comp, parts = zlib.compressobj(9), []
    if data:
        row = bytes(width + 1)
        for _ in range(height):
            parts.append(comp.compress(row))
    parts.append(comp.flush())
    body = b"".join(parts)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("size", "needle"),
    [((9000, 9000), "9000x9000 = 81000000 pixels"), ((20000, 20000), "too large to decode")],
    ids=["81MP", "400MP"],
)
def test_image_with_huge_dimensions_is_refused_before_decoding(
    cli, good, tmp_path, size, needle
) -> None:
    """The first image of a folder declares 81 (or 400) megapixels: it was decoded whole at
    open and the probe batch stacked 16 copies of its size (5 GB as float32)."""
    root = tmp_path / "images"
    for k in range(3):
        (root / f"class{k}").mkdir(parents=True)
    big = root / "class0" / "a.png"
    _png(big, *size, data=size[0] * size[1] < 10**8)
    for k in (1, 2):
        _png(root / f"class{k}" / "b.png", 2, 3)
    res = _extract(cli, good, root, tmp_path)
    _refused(res, big, needle)
    assert_no_finished_output(tmp_path)


def test_huge_image_inside_the_probe_batch_is_refused(cli, good, tmp_path) -> None:
    """Small first image, a 81-megapixel one in the first batch: refused from its header
    when the batch is read, before any of its pixels are decoded."""
    root = tmp_path / "images"
    for k in range(3):
        (root / f"class{k}").mkdir(parents=True)
        _png(root / f"class{k}" / "a.png", 2, 3)
    big = root / "class1" / "b.png"
    _png(big, 9000, 9000)
    # uint8 images need an explicit --normalize before any batch is read
    res = _run(
        cli, extract_argv(good.ckpt, root, tmp_path / "out", "--normalize", "none"), tmp_path
    )
    _refused(res, big, "81000000 pixels")
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- controls


def test_valid_compressed_inputs_measure_the_same(cli, good, tmp_path) -> None:
    """The guards refuse forgeries, not compression: the good features file rewritten as
    gzip-compressed HDF5 and as a compressed ``.npz`` measures exactly as the original."""
    with np.load(good.feats) as z:
        arrays = {k: z[k] for k in z.files}
    h5 = tmp_path / "feats.h5"
    with h5py.File(h5, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, compression="gzip", shuffle=True, chunks=True)
    npz = tmp_path / "feats_c.npz"
    np.savez_compressed(npz, **arrays)
    want = _run(cli, ["measure", good.feats, "--format", "csv"], tmp_path)
    assert want.code == 0, want
    for path in (h5, npz):
        res = _run(cli, ["measure", path, "--format", "csv"], tmp_path)
        assert res.code == 0, res
        assert res.stdout.replace(path.name, "X") == want.stdout.replace(good.feats.name, "X")
