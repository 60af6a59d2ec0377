"""Research repositories' models through the real CLI (issue 13, point 6).

A user points ``--model`` at a file of their repository, with constructor arguments in
the ``--arch`` syntax (``models/tiny.py:TinyNet:num_classes=3,width=8``), or leaves out
``num_classes`` and the input size for nccli to read from the weights (one note each).
Checkpoints nest their weights under arbitrary keys: ``--state-key ema.model`` picks
one, and a file holding a model and its EMA is refused rather than guessed between.
Every run is a real ``nccli`` process forked from a server that imported nccli once
(:class:`cli_harness.ForkCLI`), so sibling imports and ``sys.path`` behave as for a user.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_harness import ForkCLI, Result, assert_clean_failure, assert_no_finished_output
from helpers import write_cluster_npz
from torch import nn

from nccli.io.cache import Cache

K, D, N, WIDTH = 3, 6, 60, 8

UTILS = """
from torch import nn


def block(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU())
"""

TINY = """
from torch import nn

import {utils}  # a sibling module, imported as the repository's own scripts do

NAME = "not callable"


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_dim, width=8):
        super().__init__()
        self.body = {utils}.block(in_dim, width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.linear(self.body(x))


class Renamed(TinyNet):
    # the hook a zoo model has: keys of another layout renamed to this model's
    def nccli_adapt_state(self, state):
        return {{k.replace("fc.", "linear."): v for k, v in state.items()}}


def broken(**kwargs):
    raise ValueError("the config file is missing")


def not_a_model():
    return 3
"""

PKG_BLOCKS = """
from torch import nn


def stack(n_in, widths):
    layers = []
    for w in widths:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        n_in = w
    return nn.Sequential(*layers), n_in
"""

PKG_MLP = """
from torch import nn

from .blocks import stack  # a relative import: the file is part of a package


class MLP(nn.Module):
    def __init__(self, in_features, hidden, num_classes):
        super().__init__()
        self.body, width = stack(in_features, hidden)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))
"""


@dataclass
class Repo:
    root: Path  # the working directory of every run
    data: Path
    tiny: nn.Module  # TinyNet(K, D, WIDTH) with seed 0
    other: nn.Module  # the same architecture with seed 1 (the "EMA")
    flat: Path  # tiny's state dict
    flat_other: Path


def _import(path: Path, name: str):
    """A repository file as a module (sys.path holds its folder during the import)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    server = ForkCLI(tmp_path_factory.mktemp("cli-model-spec"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("research")
    models = root / "repo" / "models"
    models.mkdir(parents=True)
    (models / "tiny_utils.py").write_text(UTILS)
    (models / "tiny.py").write_text(TINY.format(utils="tiny_utils"))
    odd = root / "repo" / "run:3"  # a folder whose name holds the separator
    odd.mkdir()
    (odd / "odd_utils.py").write_text(UTILS)
    (odd / "tiny.py").write_text(TINY.format(utils="odd_utils"))
    pkg = root / "repo" / "pkgnets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text(PKG_BLOCKS)
    (pkg / "mlp.py").write_text(PKG_MLP)
    (root / "repo" / "bad_syntax.py").write_text("def f(:\n")
    (root / "repo" / "needs_dep.py").write_text("import no_such_module_for_nccli_tests\n")
    (root / "repo" / "notes.txt").write_text("not python\n")
    mod = _import(models / "tiny.py", "nccli_test_repo_tiny")
    torch.manual_seed(0)
    tiny = mod.TinyNet(K, D, WIDTH).eval()
    torch.manual_seed(1)
    other = mod.TinyNet(K, D, WIDTH).eval()
    torch.save(tiny.state_dict(), root / "flat.pt")
    torch.save(other.state_dict(), root / "flat_other.pt")
    data = write_cluster_npz(root / "data.npz", N, D, K, seed=1)
    return Repo(root, data, tiny, other, root / "flat.pt", root / "flat_other.pt")


def _extract(cli: ForkCLI, repo: Repo, ckpt: Path, out: str, model: str, *extra: str) -> Result:
    rel = ckpt.relative_to(repo.root)  # as a user names it: the notes say 'ckpt.pth: ...'
    argv = ["extract", str(rel), "-d", str(repo.data), "--model", model, "-o", out]
    return cli([*argv, "--device", "cpu", "-b", "16", *extra], cwd=repo.root)


def _values(cli: ForkCLI, cache: Path) -> dict[tuple[str, str], float]:
    """The finite metric values ``measure`` reports for ``cache`` (nan is no number to
    compare), measured once per cache."""
    if cache in _MEASURED:
        return _MEASURED[cache]
    res = cli(["measure", str(cache), "-f", "json", "-m", "nc1,nc2,nc3,acc"], cwd=cache.parent)
    assert res.code == 0, res
    rows = json.loads(res.stdout)
    got = {
        (r["layer"], r["metric"]): r["value"]
        for r in rows
        if isinstance(r["value"], (int, float)) and math.isfinite(r["value"])
    }
    assert len(got) >= 4, rows
    _MEASURED[cache] = got
    return got


_MEASURED: dict[Path, dict[tuple[str, str], float]] = {}


def _attrs(cache: Path) -> dict:
    with Cache(cache) as c:
        return c.attrs


def _notes(res: Result) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("note:")]


SPEC = f"repo/models/tiny.py:TinyNet:num_classes={K},in_dim={D},width={WIDTH}"


@pytest.fixture(scope="module")
def explicit(cli: ForkCLI, repo: Repo) -> Path:
    """tiny's weights extracted with every constructor argument given."""
    res = _extract(cli, repo, repo.flat, "explicit", SPEC)
    assert res.code == 0, res
    assert not _notes(res), res  # nothing inferred: nothing to say
    return repo.root / "explicit" / "flat.h5"


# ------------------------------------------------------------------ file models, arguments
def test_file_model_with_arguments(explicit: Path) -> None:
    attrs = _attrs(explicit)
    assert attrs["arch"] == SPEC  # the spec as given, to replay
    assert "state_key" not in attrs  # a flat state dict: no key was followed


def test_num_classes_and_input_size_inferred(cli: ForkCLI, repo: Repo, explicit: Path) -> None:
    res = _extract(cli, repo, repo.flat, "inferred", "repo/models/tiny.py:TinyNet")
    assert res.code == 0, res
    assert _notes(res) == [
        f"note: flat.pt: num_classes={K} inferred from linear.weight ({K}, {WIDTH})",
        f"note: flat.pt: in_dim={D} inferred from body.0.weight ({WIDTH}, {D})",
    ]
    cache = repo.root / "inferred" / "flat.h5"
    assert _values(cli, cache) == _values(cli, explicit)
    # the recorded spec replays without the checkpoint's help
    assert _attrs(cache)["arch"] == f"repo/models/tiny.py:TinyNet:num_classes={K},in_dim={D}"


def test_a_given_argument_is_never_overridden(cli: ForkCLI, repo: Repo) -> None:
    res = _extract(cli, repo, repo.flat, "wrong", "repo/models/tiny.py:TinyNet:num_classes=5")
    assert_clean_failure(res, 1, ("flat.pt", "linear.weight", "(3, 8) vs (5, 8)"))
    assert [n for n in _notes(res) if "num_classes" in n] == []


def test_path_with_a_colon_and_a_package_with_relative_imports(
    cli: ForkCLI, repo: Repo, explicit: Path
) -> None:
    odd = f"repo/run:3/tiny.py:TinyNet:num_classes={K},in_dim={D}"
    res = _extract(cli, repo, repo.flat, "odd", odd)
    assert res.code == 0, res
    assert _values(cli, repo.root / "odd" / "flat.h5") == _values(cli, explicit)
    mod = _import(repo.root / "repo" / "pkgnets" / "blocks.py", "nccli_test_pkg_blocks")
    torch.manual_seed(2)
    body, width = mod.stack(D, [16, 8])
    state = {**{f"body.{k}": v for k, v in body.state_dict().items()}}
    state.update({f"classifier.{k}": v for k, v in nn.Linear(width, K).state_dict().items()})
    torch.save(state, repo.root / "pkg.pt")
    by_file = _extract(
        cli, repo, repo.root / "pkg.pt", "pkg1", "repo/pkgnets/mlp.py:MLP:hidden=16-8"
    )
    assert by_file.code == 0, by_file
    assert _notes(by_file) == [
        f"note: pkg.pt: num_classes={K} inferred from classifier.weight ({K}, 8)",
        f"note: pkg.pt: in_features={D} inferred from body.0.weight (16, {D})",
    ]
    # the same package as an import string, from the repository's folder
    argv = ["extract", str(repo.root / "pkg.pt"), "-d", str(repo.data), "-o", "../pkg2"]
    by_name = cli(
        [
            *argv,
            "--model",
            "pkgnets.mlp:MLP:hidden=16-8,num_classes=3",
            "--device",
            "cpu",
            "-b",
            "16",
        ],
        cwd=repo.root / "repo",
    )
    assert by_name.code == 0, by_name
    assert _attrs(repo.root / "pkg2" / "pkg.h5")["arch"] == (
        f"pkgnets.mlp:MLP:hidden=16-8,num_classes={K},in_features={D}"
    )
    assert _values(cli, repo.root / "pkg1" / "pkg.h5") == _values(
        cli, repo.root / "pkg2" / "pkg.h5"
    )


def test_the_adapt_state_hook_renames_keys(cli: ForkCLI, repo: Repo, explicit: Path) -> None:
    state = {k.replace("linear.", "fc."): v for k, v in repo.tiny.state_dict().items()}
    torch.save(state, repo.root / "fc.pt")
    spec = f"repo/models/tiny.py:Renamed:num_classes={K},in_dim={D}"
    res = _extract(cli, repo, repo.root / "fc.pt", "renamed", spec)
    assert res.code == 0, res
    assert _values(cli, repo.root / "renamed" / "fc.h5") == _values(cli, explicit)


# ------------------------------------------------------------------ where the weights are
def test_kuangliu_style_checkpoint(cli: ForkCLI, repo: Repo, explicit: Path) -> None:
    """``{'net': DataParallel state dict, 'acc': ..., 'epoch': ...}`` as pytorch-cifar saves."""
    wrapped = {f"module.{k}": v for k, v in repo.tiny.state_dict().items()}
    torch.save({"net": wrapped, "acc": 93.1, "epoch": 7}, repo.root / "ckpt.pth")
    res = _extract(cli, repo, repo.root / "ckpt.pth", "kuangliu", "repo/models/tiny.py:TinyNet")
    assert res.code == 0, res
    assert f"note: ckpt.pth: num_classes={K} inferred from linear.weight ({K}, {WIDTH})" in (
        _notes(res)
    )
    cache = repo.root / "kuangliu" / "ckpt.h5"
    attrs = _attrs(cache)
    assert (attrs["epoch"], attrs["state_key"]) == (7, "net")
    assert _values(cli, cache) == _values(cli, explicit)
    info = cli(["info", str(cache)], cwd=repo.root)
    assert info.code == 0 and "state_key" in info.stdout and "net" in info.stdout, info


@pytest.fixture(scope="module")
def ema_ckpt(repo: Repo) -> Path:
    sd1, sd2 = repo.tiny.state_dict(), repo.other.state_dict()
    assert not torch.equal(sd1["linear.weight"], sd2["linear.weight"])
    torch.save({"model": sd1, "ema": {"model": sd2}, "epoch": 3}, repo.root / "ema.pth")
    return repo.root / "ema.pth"


def test_state_key_picks_the_ema(cli: ForkCLI, repo: Repo, ema_ckpt: Path, explicit: Path) -> None:
    res = _extract(cli, repo, ema_ckpt, "ema", SPEC, "--state-key", "ema.model")
    assert res.code == 0, res
    cache = repo.root / "ema" / "ema.h5"
    assert _attrs(cache)["state_key"] == "ema.model"
    ref = _extract(cli, repo, repo.flat_other, "other", SPEC)
    assert ref.code == 0, ref
    got = _values(cli, cache)
    assert got == _values(cli, repo.root / "other" / "flat_other.h5")
    assert got != _values(cli, explicit)  # the model's own weights give other numbers
    res = _extract(cli, repo, ema_ckpt, "model", SPEC, "--state-key", "model")
    assert res.code == 0, res
    assert _values(cli, repo.root / "model" / "ema.h5") == _values(cli, explicit)
    # the cache of the EMA is not the cache of the model: not skipped as already done
    again = _extract(cli, repo, ema_ckpt, "ema", SPEC, "--state-key", "model")
    assert_clean_failure(again, 2, ("ema.h5", "different state_key", "--overwrite"))
    same = _extract(cli, repo, ema_ckpt, "ema", SPEC, "--state-key", "ema.model")
    assert same.code == 0 and "already extracted" in same.stderr, same


def test_info_on_a_checkpoint_takes_the_state_key(cli: ForkCLI, repo: Repo, ema_ckpt: Path) -> None:
    argv = ["info", ema_ckpt.name, "--model", "repo/models/tiny.py:TinyNet", "--json"]
    res = cli([*argv, "--state-key", "ema.model"], cwd=repo.root)
    assert res.code == 0, res
    desc = json.loads(res.stdout)
    assert (desc["state_key"], desc["num_logits"]) == ("ema.model", K)
    assert f"note: ema.pth: num_classes={K} inferred from linear.weight ({K}, {WIDTH})" in (
        _notes(res)
    )


def test_two_candidates_are_refused(cli: ForkCLI, repo: Repo, ema_ckpt: Path) -> None:
    res = _extract(cli, repo, ema_ckpt, "out", SPEC)
    assert_clean_failure(res, 2, ("ema.pth", "'model'", "'ema.model'", "--state-key"))
    assert_no_finished_output(repo.root)
    sd1, sd2 = repo.tiny.state_dict(), repo.other.state_dict()
    for other_key in ("ema_state_dict", "model_ema"):
        path = repo.root / f"{other_key}.pth"
        torch.save({"state_dict": sd1, other_key: sd2}, path)
        res = _extract(cli, repo, path, "out", SPEC)
        assert_clean_failure(res, 2, (path.name, "'state_dict'", f"'{other_key}'", "--state-key"))


def test_optimizer_and_scheduler_state_are_no_candidates(
    cli: ForkCLI, repo: Repo, explicit: Path
) -> None:
    model = copy.deepcopy(repo.tiny)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, D)).sum().backward()
    opt.step()  # momentum buffers: the optimizer's state holds tensors
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    sd = repo.tiny.state_dict()  # the weights before the step, as in `explicit`
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    torch.save(ckpt, repo.root / "with_opt.pth")
    res = _extract(cli, repo, repo.root / "with_opt.pth", "opt", SPEC)
    assert res.code == 0, res
    assert _attrs(repo.root / "opt" / "with_opt.h5")["state_key"] == "model"
    assert _values(cli, repo.root / "opt" / "with_opt.h5") == _values(cli, explicit)


@pytest.mark.parametrize(
    ("key", "needles"),
    [
        ("ema.modle", ("no key 'modle' in entry 'ema'", "keys there: model")),
        ("nope", ("no key 'nope' in the checkpoint", "keys there: model, ema, epoch")),
        ("ema", ("'ema' is a dict but not a state dict", "--state-key ema.model")),
        ("epoch", ("holds a value of type int, not a state dict",)),
    ],
)
def test_a_bad_state_key_lists_the_keys(
    cli: ForkCLI, repo: Repo, ema_ckpt: Path, key: str, needles: tuple[str, ...]
) -> None:
    res = _extract(cli, repo, ema_ckpt, "out", SPEC, "--state-key", key)
    assert_clean_failure(res, 2, ("ema.pth", f"--state-key {key!r}", *needles))
    assert_no_finished_output(repo.root)


# ------------------------------------------------------------------ spec failures
SPEC_FAILURES = [
    ("repo/models/nope.py:TinyNet", ("no such file 'repo/models/nope.py'",)),
    ("repo/notes.txt:TinyNet", ("'repo/notes.txt' is not a .py file",)),
    ("repo/models:TinyNet", ("is not a .py file",)),
    ("repo/bad_syntax.py:f", ("failed with SyntaxError", "--debug")),
    ("repo/needs_dep.py:f", ("ModuleNotFoundError", "no_such_module_for_nccli_tests", "--debug")),
    ("repo/models/tiny.py:TinyNt", ("has no attribute 'TinyNt'", "TinyNet", "broken")),
    ("repo/models/tiny.py:TinyNet:width", ("cannot read 'width'", "key=value")),
    ("repo/models/tiny.py:TinyNet:width=8,width=9", ("'width' is given twice",)),
    ("repo/models/tiny.py:TinyNet:width=1-a", ("list value '1-a'",)),
    (
        "repo/models/tiny.py:TinyNet:bogus=1",
        ("unexpected keyword argument 'bogus'", "TinyNet takes num_classes, in_dim, width=8"),
    ),
    ("repo/models/tiny.py:broken", ("calling broken failed with ValueError", "config file")),
    ("repo/models/tiny.py:not_a_model", ("returned a int, not an nn.Module",)),
    ("repo/models/tiny.py:NAME", ("NAME is not callable",)),
    ("repo/models/tiny.py", ("expected 'pkg.module:callable' or 'path/to/file.py:callable'",)),
    ("repo/models/tiny.py:3", ("'3' is not a callable's name",)),
    ("no_such_pkg_nccli.nets:MLP:hidden=4", ("cannot import 'no_such_pkg_nccli.nets'",)),
]


@pytest.mark.parametrize(("spec", "needles"), SPEC_FAILURES, ids=[s for s, _ in SPEC_FAILURES])
def test_a_bad_model_spec_is_one_line(
    cli: ForkCLI, repo: Repo, spec: str, needles: tuple[str, ...]
) -> None:
    res = _extract(cli, repo, repo.flat, "out", spec)
    assert_clean_failure(res, 2, (f"--model {spec!r}", *needles))
    assert_no_finished_output(repo.root)


def test_nothing_to_infer_from_keeps_the_missing_argument_error(cli: ForkCLI, repo: Repo) -> None:
    torch.save({"scale": torch.ones(3), "shift": torch.zeros(3)}, repo.root / "vectors.pt")
    res = _extract(cli, repo, repo.root / "vectors.pt", "out", "repo/models/tiny.py:TinyNet")
    assert_clean_failure(res, 2, ("missing a required argument: 'num_classes'", "TinyNet takes"))


def test_debug_shows_the_import_traceback(cli: ForkCLI, repo: Repo) -> None:
    res = _extract(cli, repo, repo.flat, "out", "repo/needs_dep.py:f", "--debug")
    assert res.code != 0
    assert "Traceback" in res.stderr and "no_such_module_for_nccli_tests" in res.stderr, res


# ------------------------------------------------------------------ the Python API
def test_load_model_api(repo: Repo, ema_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nccli.io.checkpoints import load_model

    monkeypatch.chdir(repo.root)
    before = list(sys.path)
    got = load_model(ema_ckpt, model="repo/models/tiny.py:TinyNet", state_key="ema.model")
    assert sys.path == before  # the repository's folders were on it during the import only
    assert got.state_key == "ema.model"
    assert got.arch == f"repo/models/tiny.py:TinyNet:num_classes={K},in_dim={D}"
    assert [n.split(": ", 1)[1] for n in got.notes] == [
        f"num_classes={K} inferred from linear.weight ({K}, {WIDTH})",
        f"in_dim={D} inferred from body.0.weight ({WIDTH}, {D})",
    ]
    for k, v in repo.other.state_dict().items():
        assert torch.equal(got.module.state_dict()[k], v), k
    # the module has a name of its own: a user's own 'tiny' module is not it
    assert type(got.module).__module__.startswith("_nccli_user_")


def test_zoo_arch_infers_num_classes(tmp_path: Path) -> None:
    from helpers import save_state_dict

    from nccli.io.checkpoints import load_model

    path = save_state_dict(tmp_path / "m.pt", "mlp:in_dim=6,widths=10-,num_classes=3,head_depth=1")
    got = load_model(path, arch="mlp:widths=10-,head_depth=1")
    assert got.arch == "mlp:widths=10-,head_depth=1,num_classes=3,in_dim=6"
    assert got.notes == [
        f"{path}: num_classes=3 inferred from classifier.weight (3, 10)",
        f"{path}: in_dim=6 inferred from body.0.weight (10, 6)",
    ]
