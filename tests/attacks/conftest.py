"""Shared set-up of the attack tests (issue: hostile and faulty inputs).

Every test here builds one crafted input (a runnable attack, kept as code), runs the real
CLI on it through the fork server (:mod:`cli_harness`) and checks the contract of a
refused input: exit 1 or 2, one stderr line naming the file, no traceback, peak RSS under
1 GB, and no side effect (a marker file never appears, a victim file's bytes are
unchanged, no finished-looking output).

All of them are marked ``slow`` (see ``pytest_collection_modifyitems`` below).

Fixtures: ``cli`` (the fork server), ``good`` (valid inputs to tamper with: a dataset, a
state-dict checkpoint, its cache and a features file), ``victim`` (a file whose bytes must
not change).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from attack_kit import ARCH, D, Good, K, N, extract_argv
from cli_harness import ForkCLI
from helpers import save_state_dict, write_cluster_npz, write_features_npz


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    server = ForkCLI(tmp_path_factory.mktemp("attack-cli"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, cli: ForkCLI) -> Good:
    root = tmp_path_factory.mktemp("good")
    write_cluster_npz(root / "data.npz", N, D, K, seed=1)
    save_state_dict(root / "run_ep005.pt", ARCH)
    write_features_npz(root / "feats.npz", K)
    res = cli(extract_argv(root / "run_ep005.pt", root / "data.npz", root / "cache"), cwd=root)
    assert res.code == 0, res
    return Good(
        root,
        root / "data.npz",
        root / "run_ep005.pt",
        root / "cache" / "run_ep005.h5",
        root / "feats.npz",
    )


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file an attack may try to overwrite; tests check its bytes afterwards."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious bytes\n")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every attack runs the real CLI end to end (about a minute in all): they are ``slow``,
    so ``make test-quick`` leaves them out and ``make test`` (CI) runs them.  The harness
    check (``test_attack_smoke.py``) stays in the quick loop."""
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        if path.parent == here and path.name != "test_attack_smoke.py":
            item.add_marker(pytest.mark.slow)
