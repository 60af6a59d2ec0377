"""Hostile checkpoints (and CIFAR pickles), each a runnable attack kept as a test.

Every case builds the crafted file under ``tmp_path``, runs the real CLI on it (``nccli
info FILE`` and/or ``nccli extract FILE ...``) and checks the contract of a refused input
(:func:`cli_harness.assert_refused`) plus the absence of the attack's side effect: the
marker file a payload would create, the bytes of the victim file it would overwrite, a
finished-looking cache.  Where the attack is live against torch itself, the case first
shows that (a control), so the test proves nccli stops a real attack, not a dud.

- ``dup-pt2-*``: a ``.pt2`` whose payload member appears twice; Python's ``zipfile``
  (nccli's old screen) reads the benign last copy, torch's reader the evil first one, and
  ``torch.export.load`` unpickles it fully on its own.  Refused as ambiguous, even with
  ``--trust-checkpoint``.
- ``zip-*``: the same ambiguity built other ways (duplicate ``data.pkl``, overlapping
  members, bytes before the archive, a member hidden in a gap, a local header naming
  another file).
- ``torchscript-from-file``: a TorchScript module whose ``__setstate__`` maps the victim
  with ``torch.from_file(shared=True)`` and overwrites it when ``torch.jit.load`` runs.
  Refused without ``--trust-checkpoint``, whatever the file is called.
- ``export-needs-trust``: a genuine ``torch.export`` archive is code too.
- ``cifar-*``: object, structured and void dtypes and shapes longer than their data in a
  CIFAR batch (an object array short of its shape made numpy read out of bounds: SIGSEGV).
- ``epoch-*``: epoch/step values that cannot be an epoch are not used (no traceback).
- ``nested-*``: a state dict 3,000 dicts deep, or in a dict containing itself.
- ``safetensors-*``: non-integer, negative, out-of-range, overlapping or repeated offsets.
- ``ckpt-fifo``: a named pipe as the checkpoint is refused instead of hanging.
"""

import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from attack_kit import ARCH, D, K, extract_argv
from cli_harness import (
    assert_clean_failure,
    assert_no_finished_output,
    assert_refused,
    assert_untouched,
)
from helpers import Evil, seeded_model

from nccli.io.cache import Cache

# --------------------------------------------------------------------------- builders


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _local(name: str, data: bytes) -> bytes:
    raw = name.encode()
    head = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
        len(raw), 0,
    )  # fmt: skip
    return head + raw + data


def _central(name: str, data: bytes, offset: int) -> bytes:
    raw = name.encode()
    head = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data),
        len(data), len(raw), 0, 0, 0, 0, 0, offset,
    )  # fmt: skip
    return head + raw


def write_zip(
    path: Path,
    stored: list[tuple[str, bytes]],
    listed: list[tuple[str, bytes, int]] | None = None,
    prefix: bytes = b"",
) -> Path:
    """A stored zip written by hand: the local members ``stored`` one after another, and
    a central directory listing ``listed`` (name, data, offset of its local header;
    default: each stored member where it was written).  ``prefix`` goes before it all
    without shifting the offsets (a zip appended to other bytes)."""
    body, offsets = b"", []
    for name, data in stored:
        offsets.append(len(body))
        body += _local(name, data)
    if listed is None:
        listed = [(n, d, off) for (n, d), off in zip(stored, offsets, strict=True)]
    cd = b"".join(_central(n, d, off) for n, d, off in listed)
    eocd = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(listed), len(listed), len(cd), len(body), 0
    )
    path.write_bytes(prefix + body + cd + eocd)
    return path


def _refused_everywhere(cli, path: Path, tmp_path: Path, needles: tuple[str, ...], *flags: str):
    """``nccli info FILE`` and ``nccli extract FILE`` both refuse ``path`` with ``needles``."""
    res = cli(["info", str(path), "--arch", ARCH, *flags], cwd=tmp_path)
    assert_refused(res, 1, path, needles)
    return res


def _refused_by_extract(cli, path: Path, good, tmp_path: Path, needles, *flags: str, arch=ARCH):
    res = cli(extract_argv(path, good.data, tmp_path / "out", *flags, arch=arch), cwd=tmp_path)
    assert_refused(res, 1, path, needles)
    assert_no_finished_output(tmp_path)
    return res


# --------------------------------------------------------------------------- zip ambiguity


def _evil_pt2(tmp_path: Path, marker: Path) -> tuple[Path, bytes, bytes]:
    """A real ``.pt2`` whose first weight is a pickled payload stored twice: evil first,
    benign last, laid out so that torch's reader picks the evil copy."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    model = seeded_model(ARCH)
    good = tmp_path / "src.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, D),)), str(good))
    members = _members(good.read_bytes())
    cfg_name = next(n for n, _ in members if n.endswith("model_weights_config.json"))
    top = cfg_name.split("/", 1)[0]
    cfg = json.loads(dict(members)[cfg_name])
    first = next(iter(cfg["config"]))
    cfg["config"][first].update(use_pickle=True, path_name="w_pickled")
    members = [(n, json.dumps(cfg).encode() if n == cfg_name else d) for n, d in members]
    evil = _torch_bytes(Evil(marker, via="system"))
    benign = _torch_bytes(torch.nn.Parameter(model.state_dict()[first]))
    payload = f"{top}/data/weights/w_pickled"
    path = tmp_path / "evil.pt2"
    for pad in range(16):  # miniz's sorted lookup picks one of two equal names: find a layout
        filler = [(f"{top}/a{i:03d}", b"") for i in range(pad)]
        write_zip(path, [*members, *filler, (payload, evil), (payload, benign)])
        if PT2ArchiveReader(str(path)).read_bytes("data/weights/w_pickled") == evil:
            return path, evil, benign
    pytest.fail("no layout makes torch read the first copy (has torch's zip reader changed?)")


def test_dup_pt2_member_is_refused_before_torch_unpickles_it(cli, good, tmp_path) -> None:
    marker = tmp_path / "pwned"
    path, evil, benign = _evil_pt2(tmp_path, marker)
    # the control: the two readers disagree, which is what the old screen fell for
    with zipfile.ZipFile(path) as zf:
        assert zf.read("src/data/weights/w_pickled") == benign
    needles = ("ambiguous zip archive", "two members named 'data/weights/w_pickled'")
    _refused_everywhere(cli, path, tmp_path, needles)
    _refused_everywhere(cli, path, tmp_path, needles, "--trust-checkpoint")  # never loadable
    _refused_by_extract(cli, path, good, tmp_path, needles, "--trust-checkpoint", arch=None)
    assert not marker.exists(), "the pickle payload ran"


def test_zip_duplicate_data_pkl_is_refused(cli, good, tmp_path) -> None:
    first = _torch_bytes({"w": torch.zeros(1)})
    members = _members(first)
    other = dict(_members(_torch_bytes({"w": torch.ones(1)})))["archive/data.pkl"]
    path = write_zip(tmp_path / "dup.pt", [*members, ("archive/data.pkl", other)])
    _refused_by_extract(cli, path, good, tmp_path, ("two members named 'data.pkl'",))


@pytest.mark.parametrize("layout", ["overlap", "prepended", "hidden-gap", "renamed-local"])
def test_zip_with_members_outside_its_layout_is_refused(cli, good, tmp_path, layout) -> None:
    base = _members(_torch_bytes({"w": torch.zeros(3)}))
    path = tmp_path / f"{layout}.pt"
    if layout == "overlap":  # a second entry pointing into the middle of the first member
        write_zip(path, base, [*_listed(base), ("archive/x", base[0][1][:4], 12)])
        needle = "overlaps the member before it"
    elif layout == "prepended":  # zipfile shifts its offsets by the junk, miniz does not
        write_zip(path, base, prefix=_local("archive/junk", b"x" * 64))
        needle = "data before or inside the archive"
    elif layout == "hidden-gap":  # a member the directory does not list, between two it does
        stored = [base[0], ("archive/hidden.pkl", b"\x80\x02N."), *base[1:]]
        listed = [e for e in _listed(stored) if e[0] != "archive/hidden.pkl"]
        write_zip(path, stored, listed)
        needle = "belong to no member"
    else:  # the local header names another member than the directory entry does
        stored = [("archive/data.pkX", base[0][1]), *base[1:]]
        listed = [("archive/data.pkl", *_listed(stored)[0][1:]), *_listed(stored)[1:]]
        write_zip(path, stored, listed)
        needle = "another name in its local header"
    _refused_by_extract(cli, path, good, tmp_path, ("ambiguous zip archive", needle))


def _listed(stored: list[tuple[str, bytes]]) -> list[tuple[str, bytes, int]]:
    out, pos = [], 0
    for name, data in stored:
        out.append((name, data, pos))
        pos += len(_local(name, data))
    return out


# --------------------------------------------------------------------------- programs


class FileClobber(torch.nn.Module):
    """Scripted, its ``__setstate__`` maps ``path`` shared and overwrites its first bytes
    when ``torch.jit.load`` reads the archive (no Python runs: TorchScript operators)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.w = torch.zeros(K, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return (self.path, self.training, self.w)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.path = state[0]
        mapped = torch.from_file(state[0], shared=True, size=5, dtype=torch.uint8)
        mapped.fill_(33)  # "!!!!!"
        self.training = state[1]
        self.w = state[2] + mapped.sum().float() * 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["model.pt", "weights.safetensors", "ckpt.bin"])
def test_torchscript_from_file_overwrite_needs_trust(cli, good, tmp_path, victim, name) -> None:
    decoy = tmp_path / "decoy.txt"
    decoy.write_bytes(b"precious bytes\n")
    scripted = torch.jit.script(FileClobber(str(decoy)))
    control = tmp_path / "control.pt"
    scripted.save(str(control))
    torch.jit.load(str(control))  # the control: loading it overwrites the file
    assert decoy.read_bytes().startswith(b"!!!!!")
    scripted.path = str(victim)
    path = tmp_path / name
    scripted.save(str(path))
    needles = ("is a TorchScript program", "--trust-checkpoint")
    res = _refused_everywhere(cli, path, tmp_path, needles)
    assert "write files" in res.stderr
    _refused_by_extract(cli, path, good, tmp_path, needles, arch=None)
    _refused_by_extract(cli, path, good, tmp_path, needles)  # --arch does not load it either
    assert_untouched(victim)


def test_export_archive_needs_trust(cli, good, tmp_path) -> None:
    path = tmp_path / "exported.bin"  # detected from the bytes, not the name
    torch.export.save(torch.export.export(seeded_model(ARCH), (torch.zeros(2, D),)), str(path))
    needles = ("is a torch.export (.pt2) program", "--trust-checkpoint")
    _refused_everywhere(cli, path, tmp_path, needles)
    _refused_by_extract(cli, path, good, tmp_path, needles, arch=None)
    res = cli(["info", str(path), "--arch", ARCH, "--trust-checkpoint"], cwd=tmp_path)
    assert_clean_failure(res, 0, ())  # the flag loads it (and torch logs nothing to stderr)


# --------------------------------------------------------------------------- CIFAR pickles


class _Forged:
    """Pickles as numpy's own ``_reconstruct(ndarray, ...)`` + ``__setstate__(state)``."""

    def __init__(self, state) -> None:
        self.state = state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


class _ForgedBuffer:
    """Pickles as protocol 5's ``_frombuffer(data, dtype, shape, order)``."""

    def __init__(self, data: bytes, dtype, shape) -> None:
        self.args = (data, dtype, shape, "C")

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer

        return (_frombuffer, self.args)


CIFAR_ARRAYS = {
    # the SIGSEGV: an object array whose stored items fall short of its shape
    "object-short": (_Forged((1, (1 << 20,), np.dtype("O"), False, [1])), "numpy dtype 'O8'"),
    "structured": (
        _Forged((1, (2,), np.dtype([("a", "u1"), ("b", "O")]), False, b"")),
        "numpy dtype 'V",
    ),
    "void": (_Forged((1, (4,), np.dtype("V8"), False, b"\0" * 32)), "numpy dtype 'V8'"),
    "short-data": (
        _Forged((1, (1 << 40, 3072), np.dtype("u1"), False, b"\0" * 3072)),
        "stored in 3072 bytes",
    ),
    "short-buffer": (_ForgedBuffer(b"\0" * 3072, np.dtype("u1"), (1 << 40, 3072)), "stored in"),
}


@pytest.mark.parametrize("case", list(CIFAR_ARRAYS))
def test_cifar_forged_arrays_are_refused(cli, good, tmp_path, case) -> None:
    forged, needle = CIFAR_ARRAYS[case]
    folder = tmp_path / "cifar"
    folder.mkdir()
    batch = {b"data": forged, b"labels": [0]}
    (folder / "data_batch_1").write_bytes(
        pickle.dumps(batch, protocol=5 if "buffer" in case else 2)
    )
    res = cli(extract_argv(good.ckpt, folder, tmp_path / "out"), cwd=tmp_path)
    assert res.code != -11, "numpy crashed (SIGSEGV)"
    assert_refused(res, 1, "data_batch_1", ("refusing to unpickle", needle))
    assert_no_finished_output(tmp_path)


# --------------------------------------------------------------------------- metadata numbers

EPOCHS = {
    "float-1e300": 1e300,
    "huge-int": 2**2000,  # the largest the weights-only unpickler reads (LONG1)
    "superscript-two": "²",
    "long-digits": "9" * 5000,
    "negative": -5,
    "int64-overflow": 2**63,
}


@pytest.mark.parametrize("case", list(EPOCHS))
def test_epoch_that_cannot_be_one_comes_from_the_name(cli, good, tmp_path, case) -> None:
    state = seeded_model(ARCH).state_dict()
    path = tmp_path / "run_ep004.pt"
    torch.save(
        {"state_dict": state, "epoch": EPOCHS[case], "step": EPOCHS[case], "note": -(2**2000)}, path
    )
    res = cli(extract_argv(path, good.data, tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    with Cache(tmp_path / "out" / "run_ep004.h5") as cache:
        assert cache.attrs["epoch"] == 4
        assert cache.attrs.get("step") in (None, -1)


def test_safetensors_epoch_superscript_is_not_used(cli, good, tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model_e7.safetensors"
    state = {k: v.contiguous() for k, v in seeded_model(ARCH).state_dict().items()}
    save_file(state, str(path), metadata={"epoch": "²", "step": "1" * 400})
    res = cli(extract_argv(path, good.data, tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    with Cache(tmp_path / "out" / "model_e7.h5") as cache:
        assert cache.attrs["epoch"] == 7


# --------------------------------------------------------------------------- nesting


@pytest.mark.parametrize("shape", ["deep", "cycle"])
def test_state_dict_nested_too_deep_is_refused(cli, good, tmp_path, shape) -> None:
    if shape == "deep":
        obj: dict = {"w": torch.zeros(1)}
        for _ in range(3000):
            obj = {"model": obj}
    else:
        obj = {"epoch": 1}
        obj["model"] = obj
    path = tmp_path / f"{shape}.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling 3,000 levels needs it; loading must not
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)
    _refused_by_extract(
        cli, path, good, tmp_path, ("nested more than 32 dicts deep", "model.state_dict()")
    )


# --------------------------------------------------------------------------- safetensors


def _safetensors(path: Path, header: str, data: bytes) -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _header(*offsets: str, names: str = "wv") -> str:
    """A safetensors JSON header: one F32 (2, 3) tensor per ``offsets`` entry."""
    entries = [
        f'"{name}": {{"dtype": "F32", "shape": [2, 3], "data_offsets": {off}}}'
        for name, off in zip(names, offsets, strict=False)
    ]
    return "{" + ", ".join(entries) + "}"


SAFETENSORS = {
    "float-offsets": (_header("[0.0, 24.0]"), "expected two integers"),
    "string-offsets": (_header('["0", "24"]'), "expected two integers"),
    "bool-offsets": (_header("[false, true]"), "expected two integers"),
    "negative-offsets": (_header("[-8, 16]"), "expected two integers"),
    "beyond-the-file": (_header("[0, 1000000000000]"), "expected two integers"),
    "huge-number": (_header("[0, 1e400]"), "expected two integers"),
    "overlapping": (_header("[0, 24]", "[12, 36]"), "starts at byte 12"),
    "repeated-key": (_header("[0, 24]", "[0, 24]", names="ww"), "appears twice"),
    "deep-json": ('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_safetensors_with_forged_offsets_is_refused(cli, good, tmp_path, case) -> None:
    header, needle = SAFETENSORS[case]
    data = b"\0" * (36 if case == "overlapping" else 24)
    path = _safetensors(tmp_path / f"{case}.safetensors", header, data)
    _refused_by_extract(cli, path, good, tmp_path, ("safetensors", needle))


# --------------------------------------------------------------------------- not a file


def test_checkpoint_fifo_is_refused_without_hanging(cli, good, tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    os.mkfifo(path)
    _refused_by_extract(cli, path, good, tmp_path, ("FIFO", "regular file"))


def test_zip_written_by_python_still_loads(cli, good, tmp_path) -> None:
    """The screen refuses ambiguity, not zips torch did not write: a state dict re-packed
    with Python's ``zipfile`` (as the hand-built cases above start from) still extracts."""
    path = tmp_path / "repacked.pt"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        for name, data in _members(good.ckpt.read_bytes()):
            zf.writestr(name, data)
    res = cli(extract_argv(path, good.data, tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert (tmp_path / "out" / "repacked.h5").is_file()


def test_cifar_batch_that_is_a_fifo_is_refused(cli, good, tmp_path) -> None:
    """A FIFO named like a batch would block the read for ever."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    os.mkfifo(folder / "data_batch_2")
    argv = extract_argv(good.ckpt, folder, tmp_path / "out", "--normalize", "none")
    res = cli.wait(cli.start(argv, cwd=tmp_path), 15)
    assert_refused(res, 1, "data_batch_2", ("FIFO", "not a regular file"))
    assert_no_finished_output(tmp_path)
