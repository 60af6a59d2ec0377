"""Every command the documentation shows runs as written (issue 13).

The documents: ``README.md``, ``sample_data/README.md`` and ``docs/*.md``.  The convention
for their fenced code blocks (``docs/usage.md`` repeats it in a comment at its top):

- ```` ```bash ````, ```` ```sh ````, ```` ```shell ````: every line is a command (a
  leading ``$ `` is dropped, ``\\`` continues a line, a heredoc ``<<'EOF'`` takes the lines
  up to ``EOF``); blank and ``#`` lines are skipped.
- ```` ```console ````: only the lines starting with ``$ `` (and their continuations and
  heredocs) are commands; the other lines are their output and are not checked.
- ```` ```python ````: the block runs as a script (``python -c``).
- ```` ```text ```` or no language: never run — output, diagrams, and the real-world
  variants that need what the project cannot have (a GPU, a cluster, CIFAR on disk).  Such
  a block must not look runnable: no line of it may start with ``nccli `` (``$ nccli``
  output transcripts belong in ```` ```text ````, which may).
- Every command must exit 0, unless its (last) line ends with a comment saying
  ``# exits N``: then it must exit N (a ``--fail-if`` gate, a refusal).
- ``<!-- docs-test: skip: REASON -->`` on the line right before a fence: the block is not
  run (``make test`` would run this very suite; the benchmarks take minutes).  A skipped
  block must hold no ``nccli`` command, so every ``nccli`` command shown in a shell block
  is run.

Each document runs in its own workspace, top to bottom: a temporary directory holding
copies of ``sample_data/`` and ``scripts/``, the working directory of the first command
(``cd`` persists, like a shell session).  What one command writes is there for the next,
so a doc builds its own files (caches, a features file, a model file) before it uses them.

How a command runs: an ``nccli ...`` line (optionally with ``NAME=value`` before it)
through the fork server of ``tests/cli_harness.py`` — a real ``nccli`` process, its exit
status and its working directory, forked from a server that imported torch once (a few
ms instead of about 2 s), with bash expanding the words (globs, quotes, comments) exactly
as a shell would.  A line with a pipe, a redirect, ``&&`` or ``;``, a heredoc, or another
program (``python``, ``torchrun``, ``cat``, ``ls``, ``mkdir``) runs with ``bash -c`` and
the venv's ``bin/`` first on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import ForkCLI

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "sample_data" / "README.md", *sorted(REPO.glob("docs/*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
EXITS = re.compile(r"#[^'\"]*\bexits (\d+)\b[^'\"]*$")
ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
#: shell operators that need a real shell (shlex punctuation tokens)
OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "<<", "(", ")", "2>", "&>"}
# the doc workspace's environment: the venv first; no torchrun variables from outside
VENV_BIN = str(Path(sys.executable).parent)
ENV = {
    **{
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    },
    "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
    "NO_COLOR": "1",
    "COLUMNS": "120",
}


@dataclass
class Command:
    doc: Path
    line: int  # 1-based line of the command's first line in the doc
    text: str  # as written, continuations and heredoc included
    lang: str  # the block's language
    expect: int = 0

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    @property
    def program(self) -> list[str]:
        """The words after any leading ``NAME=value`` assignments."""
        words = _words(self.text)
        while words and ASSIGN.match(words[0]):
            words = words[1:]
        return words

    @property
    def is_nccli(self) -> bool:
        return self.program[:1] == ["nccli"]


@dataclass
class Block:
    doc: Path
    line: int  # line of the opening fence
    lang: str
    body: list[str]
    skip: str | None  # the reason, when marked


def _words(text: str) -> list[str]:
    """``text`` as shlex words (comments dropped); ``[]`` when shlex cannot split it."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return []


def parse_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(prev)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        blocks.append(Block(doc, i + 1, lang, lines[i + 1 : j], skip.group(1) if skip else None))
        i = j + 1
    return blocks


def commands_of(block: Block) -> list[Command]:
    """The commands of one shell or python block, in order."""
    if block.lang == "python":
        return [Command(block.doc, block.line + 1, "\n".join(block.body), "python")]
    out: list[Command] = []
    body = block.body
    k = 0
    while k < len(body):
        raw = body[k]
        start = k
        k += 1
        stripped = raw.strip()
        prompt = stripped.startswith("$ ") or stripped == "$"
        if block.lang == "console" and not prompt:
            continue  # output
        text = stripped[2:] if prompt else stripped
        if not text or text.startswith("#"):
            continue
        parts = [text]
        while parts[-1].endswith("\\") and k < len(body):
            parts.append(body[k].strip())
            k += 1
        m = HEREDOC.search(" ".join(parts))
        if m:
            end = m.group(2)
            while k < len(body) and body[k].strip() != end:
                parts.append(body[k])
                k += 1
            parts.append(end)
            k += 1
        full = "\n".join(parts)
        last = parts[0] if m else parts[-1]
        exits = EXITS.search(last)
        out.append(
            Command(
                block.doc,
                block.line + 1 + start,
                full,
                block.lang,
                int(exits.group(1)) if exits else 0,
            )
        )
    return out


def doc_commands(doc: Path) -> list[Command]:
    cmds: list[Command] = []
    for block in parse_blocks(doc):
        if block.skip is None and (block.lang in SHELL or block.lang == "python"):
            cmds += commands_of(block)
    return cmds


def needs_shell(text: str) -> bool:
    if "\n" in text.replace("\\\n", ""):  # a heredoc
        return True
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.commenters = "#"
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:
        return True
    return any(t in OPERATORS or set(t) <= set("|&;<>()") for t in tokens)


def argv_of(text: str, cwd: Path) -> list[str]:
    """The words bash makes of ``text`` in ``cwd``: globs, quotes, braces, comments."""
    res = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + text],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout.split("\0")[:-1]


# --------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    server = ForkCLI(tmp_path_factory.mktemp("docs-cli"))
    yield server
    server.close()


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("sample_data", "scripts"):
        shutil.copytree(
            REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return ws


def _tail(text: str, n: int = 30) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join((["..."] if len(lines) > n else []) + lines[-n:])


def run_command(cmd: Command, cwd: Path, env: dict[str, str], cli: ForkCLI) -> tuple[int, str]:
    """Run one command; its exit status and a description of what it printed."""
    if cmd.lang == "python":
        res = subprocess.run(
            [sys.executable, "-c", cmd.text], cwd=cwd, env=env, capture_output=True, text=True
        )
        return res.returncode, f"--- stdout\n{_tail(res.stdout)}\n--- stderr\n{_tail(res.stderr)}"
    if cmd.is_nccli and not needs_shell(cmd.text):
        argv = argv_of(cmd.text, cwd)
        extra: dict[str, str] = {}
        while ASSIGN.match(argv[0]):
            name, _, value = argv.pop(0).partition("=")
            extra[name] = value
        assert argv[0] == "nccli"
        res = cli(argv[1:], cwd=cwd, env={**env, **extra})
        return res.code, f"--- stdout\n{_tail(res.stdout)}\n--- stderr\n{_tail(res.stderr)}"
    res = subprocess.run(
        ["bash", "-c", cmd.text], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return res.returncode, f"--- stdout\n{_tail(res.stdout)}\n--- stderr\n{_tail(res.stderr)}"


def run_doc(doc: Path, tmp_path: Path, cli: ForkCLI) -> int:
    cwd = workspace(tmp_path)
    env = dict(ENV)
    cmds = doc_commands(doc)
    for cmd in cmds:
        words = _words(cmd.text)
        if words[:1] == ["cd"] and len(words) == 2 and not needs_shell(cmd.text):
            cwd = (cwd / words[1]).resolve()
            assert cwd.is_dir(), f"{cmd.where()}: `{cmd.text}`: no such directory"
            continue
        if words[:1] == ["export"] and not needs_shell(cmd.text):
            for word in words[1:]:
                name, _, value = word.partition("=")
                env[name] = value
            continue
        code, output = run_command(cmd, cwd, env, cli)
        if code != cmd.expect:
            shown = "\n    ".join(cmd.text.splitlines())
            want = "0" if cmd.expect == 0 else f"{cmd.expect} (its `# exits` comment)"
            pytest.fail(
                f"{cmd.where()}: the doc's command\n    {shown}\nexited {code}, expected "
                f"{want} (run in {cwd})\n{output}",
                pytrace=False,
            )
    return len(cmds)


def _stale(cmd: Command) -> str | None:
    """What is missing for a command the test does not run: a ``make`` target that the
    Makefile lacks, a script (``python path.py``) that the repository lacks."""
    words = cmd.program
    if words[:1] == ["make"]:
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        missing = [t for t in words[1:] if not t.startswith("-") and t not in targets]
        return f"`make {missing[0]}`: no such Makefile target" if missing else None
    if words and Path(words[0]).name.startswith("python") and len(words) > 1:
        script = words[1]
        if script.endswith(".py") and not (REPO / script).is_file():
            return f"`{script}`: no such file in the repository"
    return None


# --------------------------------------------------------------------------- tests
def _id(doc: Path) -> str:
    return str(doc.relative_to(REPO))


#: documents whose commands take long (extraction of whole runs, torchrun)
SLOW = {"README.md", "docs/usage.md", "sample_data/README.md"}


def _params() -> list:
    return [
        pytest.param(doc, id=_id(doc), marks=[pytest.mark.slow] if _id(doc) in SLOW else [])
        for doc in DOCS
        if doc_commands(doc)
    ]


@pytest.mark.parametrize("doc", _params())
def test_doc_commands_run_as_written(doc: Path, tmp_path: Path, cli: ForkCLI) -> None:
    """Every command of the doc's shell and python blocks, in order, in one workspace."""
    assert run_doc(doc, tmp_path, cli) > 0


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_doc_blocks_follow_the_convention(doc: Path) -> None:
    """No runnable-looking command hides where the test does not run it, and every
    ``nccli`` command names a real subcommand (checked without running anything)."""
    from typer.main import get_command

    from nccli.cli import app

    names = set(get_command(app).commands)  # type: ignore[attr-defined]
    problems = []
    for block in parse_blocks(doc):
        where = f"{_id(doc)}:{block.line}"
        runnable = block.lang in SHELL and block.skip is None
        if block.lang in SHELL and block.skip is not None:
            hidden = [c for c in commands_of(block) if "nccli" in _words(c.text)]
            if hidden:
                problems.append(f"{where}: a skipped block holds `{hidden[0].text}`")
            problems += [f"{c.where()}: {why}" for c in commands_of(block) if (why := _stale(c))]
        elif not runnable and block.lang not in ("python", "text"):
            for line in block.body:
                if line.strip().startswith("nccli "):
                    problems.append(
                        f"{where}: `{line.strip()}` in a ```{block.lang or '(none)'} block: "
                        "make it ```bash (run by this test) or ```text"
                    )
        if not runnable:
            continue
        for cmd in commands_of(block):
            words = _words(cmd.text)
            if "…" in cmd.text or any(w in ("...", "…") for w in words):
                problems.append(f"{cmd.where()}: a placeholder in `{cmd.text}`")
            if cmd.is_nccli:
                sub = next((w for w in cmd.program[1:] if not w.startswith("-")), None)
                if sub not in names:
                    problems.append(f"{cmd.where()}: `nccli {sub}` is no command ({names})")
    assert not problems, "\n".join(problems)
