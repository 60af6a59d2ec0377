"""The attack harness itself: a refused input is measured and checked as promised."""

from __future__ import annotations

from attack_kit import extract_argv
from cli_harness import assert_refused


def test_missing_checkpoint_is_refused_with_its_name(cli, good, tmp_path) -> None:
    res = cli(extract_argv(tmp_path / "nope.pt", good.data, tmp_path / "out"), cwd=tmp_path)
    assert_refused(res, 1, tmp_path / "nope.pt", ("no such checkpoint file",))
    assert 0 < res.maxrss_mb < 1024
