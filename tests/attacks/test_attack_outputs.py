"""Attacks on what nccli writes: links planted at the output names, two nccli on one output,
a run killed with its lock held, a full disk.

Every output (a cache, a ``-o`` file, a ``--plot`` image) goes through
:mod:`nccli.io.safe`: a lock on ``<target>.lock``, a temporary created with
``O_EXCL|O_NOFOLLOW``, a rename when complete.  A link planted at any of those names is
refused with one line and its target's bytes stay as they were; a second writer refuses
with the first one's pid and leaves its files alone.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import slow_model
from attack_kit import ARCH, extract_argv
from cli_harness import (
    REPO,
    ForkCLI,
    Running,
    assert_clean_failure,
    assert_refused,
    assert_untouched,
)

from nccli.errors import DataError
from nccli.io.cache import CacheWriter
from nccli.io.safe import OutputLock, atomic_output
from nccli.layers import Layer

LINK = ("symbolic link",)
IN_USE = "in use by another nccli"


def _measure(good, *extra: str) -> list[str]:
    return ["measure", str(good.feats), "-f", "csv", "-o", "result.csv", *extra]


def _compare_plot(good) -> list[str]:
    return ["compare", str(good.cache), "-f", "csv", "--plot", "plot.png"]


def _no_lock_left(d: Path) -> None:
    left = sorted(p.name for p in d.rglob("*.lock"))
    assert not left, left


# --------------------------------------------------------------------------- planted links
def test_link_at_the_result_partial_is_refused(cli, good, victim, tmp_path) -> None:
    (tmp_path / "result.csv.partial").symlink_to(victim)
    res = cli(_measure(good), cwd=tmp_path)
    assert_refused(res, 1, "result.csv.partial", LINK)
    assert_untouched(victim)
    assert not (tmp_path / "result.csv").exists()
    assert (tmp_path / "result.csv.partial").is_symlink()  # not ours: left as it was
    _no_lock_left(tmp_path)


def test_link_at_the_result_itself_is_refused(cli, good, victim, tmp_path) -> None:
    (tmp_path / "result.csv").symlink_to(victim)
    res = cli(_measure(good), cwd=tmp_path)
    assert_refused(res, 1, "result.csv", LINK)
    assert_untouched(victim)
    assert (tmp_path / "result.csv").is_symlink()
    assert not (tmp_path / "result.csv.partial").exists()
    _no_lock_left(tmp_path)


def test_hard_link_at_the_result_partial_is_not_written_through(
    cli, good, victim, tmp_path
) -> None:
    """A hard link cannot be told from a leftover partial: its name is replaced (under the
    lock), its other name keeps its bytes, and the run succeeds."""
    os.link(victim, tmp_path / "result.csv.partial")
    res = cli(_measure(good), cwd=tmp_path)
    assert_clean_failure(res, 0, ())
    assert_untouched(victim)
    assert (tmp_path / "result.csv").read_text().startswith("source,")
    assert not (tmp_path / "result.csv.partial").exists()
    _no_lock_left(tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_link_at_the_lock_file_is_refused(cli, good, victim, tmp_path, kind) -> None:
    """The lock file holds the writer's pid: a planted link must not get it written in."""
    lock = tmp_path / "result.csv.lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    res = cli(_measure(good), cwd=tmp_path)
    assert_refused(res, 1, "result.csv.lock", LINK if kind == "symlink" else ("other names",))
    assert_untouched(victim)
    assert not (tmp_path / "result.csv").exists()


def test_link_at_the_plot_partial_is_refused(cli, good, victim, tmp_path) -> None:
    (tmp_path / "plot.png.partial").symlink_to(victim)
    res = cli(_compare_plot(good), cwd=tmp_path)
    assert_refused(res, 1, "plot.png.partial", LINK)
    assert_untouched(victim)
    assert not (tmp_path / "plot.png").exists()
    _no_lock_left(tmp_path)


def test_link_at_the_plot_itself_is_refused(cli, good, victim, tmp_path) -> None:
    (tmp_path / "plot.png").symlink_to(victim)
    res = cli(_compare_plot(good), cwd=tmp_path)
    assert_refused(res, 1, "plot.png", LINK)
    assert_untouched(victim)
    assert (tmp_path / "plot.png").is_symlink()


def test_link_at_the_cache_partial_is_refused(cli, good, victim, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_ep005.h5.partial").symlink_to(victim)
    res = cli(extract_argv(good.ckpt, good.data, out), cwd=tmp_path)
    assert_refused(res, 1, "run_ep005.h5.partial", LINK)
    assert_untouched(victim)
    assert not (out / "run_ep005.h5").exists()


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_cache_writer_refuses_a_link_at_the_partial(victim, tmp_path, resume) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.h5.partial").symlink_to(victim)
    with pytest.raises(DataError, match=r"c\.h5\.partial: is a symbolic link"):
        CacheWriter(out / "c.h5", [Layer("fc", 4)], 10, 3, resume=resume)
    assert_untouched(victim)
    assert (out / "c.h5.partial").is_symlink()
    _no_lock_left(out)


def test_link_at_the_cache_itself_is_refused_with_overwrite(cli, good, victim, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_ep005.h5").symlink_to(victim)
    res = cli(extract_argv(good.ckpt, good.data, out, "--overwrite"), cwd=tmp_path)
    assert_refused(res, 1, "run_ep005.h5", LINK)
    assert_untouched(victim)
    assert (out / "run_ep005.h5").is_symlink()
    assert not (out / "run_ep005.h5.partial").exists()


# --------------------------------------------------------------------------- two writers
def test_second_writer_of_a_result_refuses_and_the_first_finishes(cli, good, tmp_path) -> None:
    target = tmp_path / "result.csv"
    with atomic_output(target) as fh:  # this process is the first writer, mid-way
        fh.write("first,1\n")
        fh.flush()
        res = cli(_measure(good), cwd=tmp_path)
        assert_refused(res, 1, "result.csv", (f"{IN_USE} (pid {os.getpid()})", "choose another -o"))
        assert (tmp_path / "result.csv.partial").read_text() == "first,1\n"
        fh.write("first,2\n")
    assert target.read_text() == "first,1\nfirst,2\n"
    assert not (tmp_path / "result.csv.partial").exists()
    _no_lock_left(tmp_path)


def test_second_writer_of_a_plot_refuses(cli, good, tmp_path) -> None:
    with OutputLock(tmp_path / "plot.png"):
        res = cli(_compare_plot(good), cwd=tmp_path)
    assert_refused(res, 1, "plot.png", (f"{IN_USE} (pid {os.getpid()})",))
    assert not (tmp_path / "plot.png").exists()


def test_second_writer_of_a_cache_refuses(cli, good, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / "run_ep005.h5"):  # another nccli is about to write it
        res = cli(extract_argv(good.ckpt, good.data, out), cwd=tmp_path)
        assert_refused(res, 1, "run_ep005.h5", (f"{IN_USE} (pid {os.getpid()})",))
        assert sorted(p.name for p in out.iterdir()) == ["run_ep005.h5.lock"]
    assert not list(out.iterdir())


def _start_slow_extract(cli: ForkCLI, good, d: Path, seconds: float = 0.3) -> Running:
    """An extraction whose model sleeps ``seconds`` per batch of 10 (9 batches), once it
    has flushed its first batch."""
    model = slow_model.write(d, ARCH, seconds)
    run = cli.start(
        extract_argv(good.ckpt, good.data, d / "out", "-b", "10", "--model", model, arch=None),
        cwd=d,
    )
    part = d / "out" / "run_ep005.h5.partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with h5py.File(part, "r", locking=False) as f:
                if int(f.attrs["rows_done"]) > 0:
                    return run
        except (OSError, KeyError, RuntimeError):
            pass
        time.sleep(0.02)
    raise AssertionError("the extraction never flushed a batch")


def _measured(cli: ForkCLI, cache: Path, cwd: Path) -> pd.DataFrame:
    res = cli(["measure", str(cache), "-f", "csv"], cwd=cwd)
    assert res.code == 0, res
    return pd.read_csv(io.StringIO(res.stdout))


def _same_measurements(cli: ForkCLI, cache: Path, cwd: Path, good) -> None:
    """The cache measures as the fixture's (batch sizes differ: equal to rounding)."""
    got, want = _measured(cli, cache, cwd), _measured(cli, good.cache, cwd)
    pd.testing.assert_frame_equal(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_two_extractions_into_one_output(cli, good, tmp_path) -> None:
    """The second refuses with the first one's pid; the first finishes a correct cache."""
    (tmp_path / "cli2").mkdir()
    cli2 = ForkCLI(tmp_path / "cli2")  # one server runs one child at a time: a second one
    try:
        assert cli2(["--version"], cwd=tmp_path).code == 0  # imported before the race
        first = _start_slow_extract(cli, good, tmp_path, 0.5)
        res = cli2(extract_argv(good.ckpt, good.data, tmp_path / "out"), cwd=tmp_path)
        assert_refused(res, 1, "run_ep005.h5", (f"{IN_USE} (pid {first.pid})", "-o"))
        done = cli.wait(first)
    finally:
        cli2.close()
    assert done.code == 0, done
    cache = tmp_path / "out" / "run_ep005.h5"
    _same_measurements(cli, cache, tmp_path, good)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run_ep005.h5"]


@pytest.mark.slow
def test_stale_lock_of_a_killed_run_does_not_block_resume(cli, good, tmp_path) -> None:
    run = _start_slow_extract(cli, good, tmp_path)
    os.kill(run.pid, signal.SIGKILL)
    assert cli.wait(run).code == -signal.SIGKILL
    out = tmp_path / "out"
    assert (out / "run_ep005.h5.lock").read_text().strip() == str(run.pid)  # stale, unlocked
    res = cli(extract_argv(good.ckpt, good.data, out, "--resume"), cwd=tmp_path)
    assert res.code == 0, res
    assert "resuming at row" in res.stderr, res
    assert sorted(p.name for p in out.iterdir()) == ["run_ep005.h5"]
    _same_measurements(cli, out / "run_ep005.h5", tmp_path, good)


# --------------------------------------------------------------------------- full disk
def _limit_file_size(limit: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize(
    "fsize",
    [
        8_000,
        pytest.param(20_000, marks=pytest.mark.slow),
        pytest.param(30_000, marks=pytest.mark.slow),
    ],
)
def test_full_disk_is_one_line_and_no_crash(good, tmp_path, fsize) -> None:
    """A real process (the fork server's children skip the C exit handlers, where HDF5
    used to close a dataset freed by a failed write: SIGSEGV after the message).  The
    limits cut the cache while it is laid out, mid-rows and at the statistics."""
    argv = extract_argv(good.ckpt, good.data, tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "nccli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(REPO)},
        preexec_fn=_limit_file_size(fsize),
        timeout=300,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # -11 was the SIGSEGV
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "run_ep005.h5.partial: writing the cache failed" in lines[0], lines
    assert "full" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_replaced_result_keeps_its_permissions(cli, good, tmp_path) -> None:
    """The result is a new file renamed over the old one; it keeps the old one's mode."""
    target = tmp_path / "result.csv"
    target.write_text("old\n")
    target.chmod(0o664)
    res = cli(_measure(good), cwd=tmp_path)
    assert res.code == 0, res
    assert target.read_text().startswith("source,")
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
