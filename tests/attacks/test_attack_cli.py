"""The CLI's own promises under hostile or absurd input (issue: hostile and faulty inputs).

- numbers too large for int64 in a file name are ignored (the epoch is then unknown), never
  an ``OverflowError`` or an HDF5 attribute failure;
- ``-b`` and ``-k`` are bounded (``1 <= -b <= 2^24``, ``1 <= -k <= 10^6``): one usage line,
  exit 2, before anything is read or allocated;
- the last-resort net of ``cli.user_errors``: any exception that nothing converted into an
  ``NCError`` is ONE line (``unexpected TypeName: ...; rerun with --debug ...``), exit 1,
  no traceback; ``--debug`` shows the traceback;
- out of memory names the command, the input and an option that really reduces it;
- library warnings become deduplicated ``note:`` lines, known noise is silenced;
- ``--data cifar:test`` never imports a ``cifar.py`` from the working directory.

The failures nothing else catches are injected through ``--model pkg:factory`` (the run's
working directory is on the import path for it): the factory returns the right
architecture, but its ``eval`` raises.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from attack_kit import ARCH, extract_argv
from cli_harness import assert_clean_failure, assert_refused

import nccli.cli
from nccli.cli.core import user_errors
from nccli.io.names import MAX_NUMBER, epoch_step_from_name

#: a ``--model`` factory module: ARCH (so the weights fit) whose ``eval()`` runs ``BODY``
FAILING_FACTORY = """
import pickle, zipfile
from nccli import zoo

def _fail(self, *args, **kwargs):
    BODY

def make():
    module = zoo.build(ARCH)
    module.eval = _fail.__get__(module)
    return module
"""


def _failing_model(root: Path, name: str, body: str) -> str:
    source = FAILING_FACTORY.replace("BODY", body).replace("ARCH", repr(ARCH))
    (root / f"{name}.py").write_text(source)
    return f"{name}:make"


def _extract_with_model(cli, good, tmp_path: Path, model: str, *pre: str, out: str = "out"):
    argv = extract_argv(good.ckpt, good.data, tmp_path / out, "--model", model, arch=None)
    return cli([*pre, *argv], cwd=tmp_path)


# ------------------------------------------------------------------ int64 in names


def test_names_ignore_numbers_beyond_int64() -> None:
    assert epoch_step_from_name("ep99999999999999999999.pt") == (None, None)
    assert epoch_step_from_name(f"ep{MAX_NUMBER}.pt") == (MAX_NUMBER, None)
    assert epoch_step_from_name(f"ep{MAX_NUMBER + 1}.pt") == (None, None)
    assert epoch_step_from_name("e" + "9" * 5000) == (None, None)  # not even int() runs
    assert epoch_step_from_name("ep" + "0" * 300 + "7.pt") == (7, None)
    assert epoch_step_from_name("epoch=3-step=99999999999999999999999.ckpt") == (3, None)


def test_epoch_beyond_int64_in_a_file_name_is_unknown(cli, good, tmp_path) -> None:
    ckpt = shutil.copy(good.ckpt, tmp_path / "ep99999999999999999999.pt")
    res = cli(extract_argv(ckpt, good.data, tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    cache = tmp_path / "out" / "ep99999999999999999999.h5"
    assert res.stdout.split() == [str(cache)]
    info = cli(["info", str(cache), "--json"], cwd=tmp_path)
    assert info.code == 0, info
    assert json.loads(info.stdout)["attrs"].get("epoch") is None
    res = cli(["measure", str(cache), "-f", "csv", "-m", "nc1"], cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert "nc1" in res.stdout


# -------------------------------------------------------------- option bounds


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("0", "greater than or equal to 1"),
        ("1e20", "valid integer"),
        ("100000000000000000000", "less than or equal to 16777216"),
        ("16777217", "less than or equal to 16777216"),
    ],
)
def test_batch_size_is_bounded(cli, good, tmp_path, value, needle) -> None:
    argv = extract_argv(good.ckpt, good.data, tmp_path / "out")
    argv[argv.index("-b") + 1] = value
    res = cli(argv, cwd=tmp_path)
    assert_clean_failure(res, 2, ("--batch-size", needle))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("0", "greater than or equal to 1"),
        ("-3", "greater than or equal to 1"),
        ("1e12", "valid integer"),
        ("10**30", "valid integer"),
        ("1000001", "less than or equal to 1000000"),
        ("100000000000000000000", "less than or equal to 1000000"),
    ],
)
def test_num_classes_is_bounded(cli, good, tmp_path, value, needle) -> None:
    for command in ("measure", "compare"):
        res = cli([command, str(good.feats), "-k", value], cwd=tmp_path)
        assert_clean_failure(res, 2, ("--num-classes", needle))
        assert res.maxrss_mb < 1024, res.maxrss_mb


def test_num_classes_in_range_still_works(cli, good, tmp_path) -> None:
    res = cli(["measure", str(good.feats), "-k", "3", "-f", "csv", "-m", "nc1"], cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert "nc1" in res.stdout


# ------------------------------------------------------------ the last-resort net


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("RuntimeError", "raise RuntimeError('boom from the model')"),
        ("RecursionError", "return self.eval()"),
        ("KeyError", "return {}['missing key']"),
        ("OverflowError", "return int(float('inf'))"),
        ("UnicodeDecodeError", "return b'\\xff\\xfe'.decode('utf-8')"),
        ("BadZipFile", "raise zipfile.BadZipFile('File is not a zip file')"),
        ("UnpicklingError", "raise pickle.UnpicklingError('invalid load key')"),
        ("AttributeError", "return None.weight"),
    ],
)
def test_unexpected_exception_is_one_line(cli, good, tmp_path, kind, body) -> None:
    model = _failing_model(tmp_path, f"bad_{kind.lower()}", body)
    res = _extract_with_model(cli, good, tmp_path, model)
    assert_refused(
        res, 1, good.ckpt, (f"unexpected {kind}", "rerun with --debug", "please report it")
    )
    assert not list((tmp_path / "out").glob("*.h5"))


def test_debug_shows_the_traceback_of_an_unexpected_exception(cli, good, tmp_path) -> None:
    model = _failing_model(tmp_path, "bad_debug", "raise RuntimeError('boom from the model')")
    res = _extract_with_model(cli, good, tmp_path, model, "--debug")
    assert res.code == 1, res
    assert "Traceback" in res.stderr and "boom from the model" in res.stderr, res
    assert "bad_debug.py" in res.stderr, res


def test_main_catches_what_escapes_outside_the_commands(monkeypatch, capsys) -> None:
    def broken(**_kw):
        raise LookupError("escaped the commands")

    monkeypatch.setattr(nccli.cli, "app", broken)
    monkeypatch.setattr("sys.argv", ["nccli", "metrics"])
    with pytest.raises(SystemExit) as stop:
        nccli.cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "nccli: error: unexpected LookupError: escaped the commands; rerun with --debug for "
        "the traceback and please report it"
    ]


# ----------------------------------------------------------------- out of memory


def test_out_of_memory_in_extract_names_the_input_and_batch_size(cli, good, tmp_path) -> None:
    body = (
        "raise MemoryError('Unable to allocate 7.28 TiB for an array with shape "
        "(1000000000000,) and data type float64')"
    )
    model = _failing_model(tmp_path, "oom_numpy", body)
    res = _extract_with_model(cli, good, tmp_path, model)
    assert_refused(
        res,
        1,
        good.ckpt,
        ("out of memory in extract", "(allocating 7.28 TiB)", "--batch-size (now 16)"),
    )
    assert "--chunk-rows" not in res.stderr
    assert "no option reduces them" in res.stderr  # a model or K×d that does not fit


def test_torch_allocator_failure_is_out_of_memory(cli, good, tmp_path) -> None:
    body = (
        "raise RuntimeError('[enforce fail at alloc_cpu.cpp:127] err == 0. "
        "DefaultCPUAllocator: can\\'t allocate memory: you tried to allocate 8000000000000 "
        "bytes. Error code 12 (Cannot allocate memory)')"
    )
    model = _failing_model(tmp_path, "oom_torch", body)
    res = _extract_with_model(cli, good, tmp_path, model)
    assert_refused(res, 1, good.ckpt, ("out of memory in extract", "(allocating 7.3 TiB)"))
    assert "unexpected" not in res.stderr


def _oom_line(command: str, inputs: list[Path], capsys, **kw) -> str:
    with pytest.raises(typer.Exit) as stop, user_errors(command, inputs, **kw):
        raise MemoryError("Unable to allocate 8.00 GiB for an array with shape (2**30,)")
    assert stop.value.exit_code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_out_of_memory_hint_depends_on_the_command(capsys, tmp_path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    line = _oom_line("measure", [a], capsys, reduce="a smaller --chunk-rows (now 8192)")
    assert line.startswith(f"nccli: error: out of memory in measure while processing {a} ")
    assert "try a smaller --chunk-rows (now 8192)" in line
    assert "classes × feature dimension" in line and "no option reduces them" in line
    line = _oom_line("compare", [a, b], capsys)  # two inputs, neither in the traceback
    assert "out of memory in compare (allocating 8.00 GiB)" in line
    assert "--chunk-rows" not in line and "no option of this command reduces" in line


# --------------------------------------------------------------------- warnings

WARNING_FACTORY = """
import warnings
import numpy as np
from nccli import zoo

def make():
    for _ in range(3):
        warnings.warn("odd thing in the weights", UserWarning)
    warnings.warn("old api", DeprecationWarning)
    warnings.warn("soon gone", FutureWarning)
    warnings.warn("TypedStorage is deprecated. It will be removed in the future", UserWarning)
    np.float32(3e38) * np.float32(10)
    return zoo.build(ARCH)
"""


@pytest.fixture
def warning_model(tmp_path: Path) -> str:
    (tmp_path / "warny.py").write_text(WARNING_FACTORY.replace("ARCH", repr(ARCH)))
    return "warny:make"


def test_library_warnings_become_deduplicated_notes(cli, good, tmp_path, warning_model) -> None:
    res = _extract_with_model(cli, good, tmp_path, warning_model)
    assert_clean_failure(res, 0, ())  # exit 0, every stderr line a note
    notes = res.stderr.splitlines()
    assert notes.count("note: UserWarning: odd thing in the weights") == 1, res
    assert any("RuntimeWarning: overflow encountered" in n for n in notes), res
    for noise in ("TypedStorage", "old api", "soon gone", "warnings.warn"):
        assert noise not in res.stderr, res
    assert res.stdout.strip().endswith("run_ep005.h5")


def test_quiet_silences_warning_notes_and_debug_shows_them(
    cli, good, tmp_path, warning_model
) -> None:
    res = _extract_with_model(cli, good, tmp_path, warning_model, "--quiet")
    assert res.code == 0 and res.stderr == "", res
    res = _extract_with_model(cli, good, tmp_path, warning_model, "--debug", "-q", out="out2")
    assert res.code == 0, res
    assert "warny.py" in res.stderr and "UserWarning: odd thing" in res.stderr, res


# ------------------------------------------------------------- dataset specs

MARKER_MODULE = """
import pathlib
pathlib.Path(MARKER).write_text("imported")

def make(split="train"):
    raise RuntimeError("must never run")
"""


@pytest.mark.parametrize(
    ("module", "spec", "name"),
    [
        ("cifar", "cifar:test", "cifar"),
        ("cifar", "cifar:TRAIN", "cifar"),
        ("cifar", "cifar:validation", "cifar"),
        ("data", "data.npz:features", "data.npz"),
    ],
)
def test_a_missing_dataset_is_never_imported(cli, good, tmp_path, module, spec, name) -> None:
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{module}.py").write_text(MARKER_MODULE.replace("MARKER", repr(str(marker))))
    res = cli(extract_argv(good.ckpt, spec, tmp_path / "out"), cwd=tmp_path)
    assert_refused(res, 1, name, (f"no such dataset {name}", "check the path"))
    assert not marker.exists(), "the --data spec imported code from the working directory"


FACTORY_DATASET = """
import numpy as np
import torch

class Items(torch.utils.data.Dataset):
    def __init__(self, x, y, broken):
        self.x, self.y, self.broken = x, y, broken

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.broken:
            raise KeyError(f"no item {i}")
        return torch.from_numpy(self.x[i]), int(self.y[i])

def make(split="train"):
    data = np.load(DATA)
    return Items(data["x"], data["y"], broken=False)

def broken(split="train"):
    data = np.load(DATA)
    return Items(data["x"], data["y"], broken=True)
"""


def test_factory_specs_still_import_and_their_failures_are_one_line(cli, good, tmp_path) -> None:
    (tmp_path / "mydata.py").write_text(FACTORY_DATASET.replace("DATA", repr(str(good.data))))
    res = cli(extract_argv(good.ckpt, "mydata:make", tmp_path / "out"), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert res.stdout.strip().endswith("run_ep005.h5")
    res = cli(extract_argv(good.ckpt, "mydata:broken", tmp_path / "out2"), cwd=tmp_path)
    assert_refused(res, 1, "mydata:broken", ("reading item 0 failed with KeyError", "no item 0"))
