"""Running the real CLI fast, many times: a fork server and the checks of a clean failure.

:class:`ForkCLI` imports nccli once in a server process and forks a child per command, so
a test runs ``nccli <argv>`` as a real process (own stdin/stdout/stderr, exit status,
signals, resource limits) in milliseconds instead of a second of imports.  Each result
carries the child's peak resident memory.  :func:`assert_clean_failure` is the contract
of a refused input: the exit code, exactly one ``nccli: error:`` line naming the file, no
traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


_SERVER = r"""
import atexit, json, os, resource, signal, sys, traceback
import h5py, numpy, torch  # noqa: F401  (the expensive imports, done once)
import nccli.cli, nccli.compare, nccli.extract, nccli.measure  # noqa: F401
import nccli.io.checkpoints, nccli.io.datasets, nccli.io.sources  # noqa: F401

proto = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    proto.flush(); sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            proto.close()
            # Ctrl-C as in a terminal, even when the suite was started as a background job
            # of a non-interactive shell (which hands every child SIGINT ignored)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            for target, name in ((1, "stdout"), (2, "stderr")):
                fd = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, target)
                os.close(fd)
            if req.get("fsize"):
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            sys.argv = ["nccli", *req["argv"]]
            try:
                nccli.cli.main()
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            try:
                atexit._run_exitfuncs()
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    proto.write(json.dumps({"pid": pid}) + "\n")
    proto.flush()
    _, status, usage = os.wait4(pid, 0)
    # ru_maxrss: the child's peak resident set, in KiB on Linux
    reply = {"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}
    proto.write(json.dumps(reply) + "\n")
    proto.flush()
"""


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    maxrss_mb: float = 0.0  # the child's peak resident memory

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class Running:
    pid: int
    out: Path
    err: Path


class ForkCLI:
    """Runs ``nccli <argv>`` in children forked from a server that imported nccli once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.count = 0
        self.pending: Running | None = None  # started, status not read yet
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the CLI child within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.poll()})")
        return json.loads(line)

    def start(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        fsize: int | None = None,
    ) -> Running:
        if self.pending is not None:  # a failed test left a child running: reap it first
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pending.pid, signal.SIGKILL)
            self.pending = None
            self._read(30)
        self.count += 1
        out = self.tmp / f"{self.count}.out"
        err = self.tmp / f"{self.count}.err"
        full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
        full_env.update(env or {})
        req = {
            "argv": [str(a) for a in argv],
            "cwd": str(cwd),
            "env": full_env,
            "stdout": str(out),
            "stderr": str(err),
            "fsize": fsize,
        }
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        self.pending = Running(self._read(60)["pid"], out, err)
        return self.pending

    def wait(self, run: Running, timeout: float = 120) -> Result:
        try:
            reply = self._read(timeout)
        except TimeoutError:
            os.kill(run.pid, signal.SIGKILL)
            self._read(10)
            raise
        finally:
            self.pending = None
        return Result(
            reply["status"],
            run.out.read_text(),
            run.err.read_text(),
            reply.get("maxrss_kb", 0) / 1024,
        )

    def __call__(self, argv: list[str], **kw) -> Result:
        return self.wait(self.start(argv, **kw))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def assert_clean_failure(res: Result, code: int, needles: tuple[str, ...]) -> None:
    """Exit code, no traceback, exactly one ``nccli:`` line holding every needle."""
    assert res.code == code, res
    assert "Traceback" not in res.stdout + res.stderr, res
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if code == 0:
        assert all(line.startswith("note:") for line in lines), res
        return
    assert len(lines) == 1, res
    assert lines[0].startswith("nccli: "), res
    for needle in needles:
        assert needle in lines[0], (needle, res)


def assert_no_finished_output(d: Path, *, partial_ok: bool = False) -> None:
    out = d / "out"
    if out.is_dir():
        left = sorted(p.name for p in out.iterdir())
        assert not [n for n in left if n.endswith(".h5")], left
        if not partial_ok:
            assert not [n for n in left if n.endswith(".partial")], left
    assert not (d / "result.csv").exists()
    assert not (d / "result.csv.partial").exists()


def assert_refused(
    res: Result,
    code: int,
    path: Path | str,
    needles: tuple[str, ...] = (),
    *,
    max_rss_mb: float = 1024,
) -> None:
    """A hostile input refused: exit ``code`` (1 or 2), one ``nccli:`` line that names
    ``path`` (its file name suffices) and holds every needle, no traceback, and a peak
    resident memory under ``max_rss_mb``."""
    assert code in (1, 2), code
    assert_clean_failure(res, code, (Path(path).name, *needles))
    assert res.maxrss_mb < max_rss_mb, f"peak RSS {res.maxrss_mb:.0f} MB\n{res}"


def assert_untouched(victim: Path, before: bytes = b"precious bytes\n") -> None:
    """The victim file still holds exactly ``before``."""
    assert victim.read_bytes() == before, f"{victim} was modified"
