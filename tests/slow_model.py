"""A model that sleeps in every forward pass, so a test can kill an extraction mid-way.

nccli has no test hook for this: the test slows the *model* instead.  ``write(dir, arch,
seconds)`` writes a small module into ``dir`` (a run's working directory, which
``--model`` searches like ``python -m``) and returns the ``--model`` import string.  The
module builds the zoo architecture ``arch`` — the same state-dict layout, so a checkpoint
saved from ``--arch arch`` loads into it — with a forward pre-hook that sleeps.
"""

from __future__ import annotations

from pathlib import Path

MODULE = "nccli_test_slow_model"

_SOURCE = """\
import time

from nccli import zoo

ARCH = {arch!r}
SECONDS = {seconds!r}


def build():
    name, kwargs = zoo.parse_arch(ARCH)
    model = zoo.build(name, **kwargs)
    model.register_forward_pre_hook(lambda module, args: time.sleep(SECONDS))
    return model
"""


def write(directory: Path, arch: str, seconds: float) -> str:
    """Write the slow-model module into ``directory``; the ``--model`` spec that builds it."""
    (Path(directory) / f"{MODULE}.py").write_text(_SOURCE.format(arch=arch, seconds=seconds))
    return f"{MODULE}:build"
