"""The ``--layers`` grammar: which modules a selection names.

Comma-separated items (:func:`split_layers`):

- ``auto``: the penultimate feature, the deep linear head and the classifier (the default);
- ``blocks``: the outputs of the model's top-level stages in executed order, plus the head
  (resolved from the probe by :mod:`nccli.extract.discovery`);
- a module path (``layer4``, ``layer1.0.conv1``), or a glob where ``*`` and ``?`` stay
  within one level of the path and ``**`` crosses levels: ``layer*`` matches ``layer1`` …
  ``layer4``; ``layer**`` everything under them too; ``**.relu`` every module called
  ``relu`` at any depth (the top-level one too); ``[abc]`` is a character class
  (``block[s]`` names a module called ``blocks``, which the keyword would shadow);
- ``<module>#N``: the N-th call (1-based) of a module that runs several times per forward
  pass (a ReLU shared inside a residual block: ``layer1.0.relu#2``).  A module that runs
  several times and is named without ``#N`` is refused, naming the count.

A glob matching more than :data:`MANY_MATCHES` modules is noted once (each is cached with
its own d×d statistics; the memory plan, :mod:`nccli.extract.plan`, refuses what does
not fit) rather than refused: ``**.relu`` over a deep network is a legitimate depth study.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from nccli.errors import UsageError

__all__ = [
    "KEYWORDS",
    "MANY_MATCHES",
    "Pattern",
    "head_only",
    "match_modules",
    "names_list",
    "split_layers",
]

#: a glob matching more modules than this gets a note
MANY_MATCHES = 16
#: the ``--layers`` keywords
KEYWORDS = ("auto", "blocks")


def names_list(items: Sequence[str], limit: int = 8) -> str:
    """``a, b, c and 5 more``."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


@dataclass(frozen=True)
class Pattern:
    """One ``--layers`` item: a module path or glob, and a call index (0: none given)."""

    text: str
    glob: str
    call: int

    def matches(self, name: str) -> bool:
        return name == self.glob or bool(glob_regex(self.glob).match(name))


@lru_cache(maxsize=256)
def glob_regex(pat: str) -> re.Pattern[str]:
    """A module-path glob as a regex: ``*``/``?`` within one level, ``**`` across levels
    (``**.`` also matches no level: ``**.relu`` matches ``relu``), ``[...]`` a class."""
    out: list[str] = []
    i = 0
    while i < len(pat):
        if pat.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] in "*?":
            out.append("[^.]*" if pat[i] == "*" else "[^.]")
            i += 1
        elif pat[i] == "[" and (j := pat.find("]", i + 2)) > 0:
            body = pat[i + 1 : j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def parse_pattern(token: str, source: str) -> Pattern:
    """``glob`` or ``glob#N`` (N ≥ 1)."""
    glob, sep, call = token.partition("#")
    if not sep:
        return Pattern(token, token, 0)
    if not glob or not call.isdigit() or int(call) < 1:
        raise UsageError(
            f"{source}: --layers {token!r}: write '<module>#N' with N = 1, 2, ... (the N-th "
            "call of a module that runs several times per forward pass)"
        )
    return Pattern(token, glob, int(call))


def split_layers(
    layers: str | Sequence[str] | None, source: str
) -> tuple[bool, bool, list[Pattern]]:
    """``"auto"`` / ``"blocks"`` / ``"a.b,c.*,d#2"`` / a list → (want the auto head, want
    the blocks, explicit patterns)."""
    if layers is None:
        return True, False, []
    items = [layers] if isinstance(layers, str) else list(layers)
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not tokens:
        return True, False, []
    blocks = any(t.lower() == "blocks" for t in tokens)
    auto = blocks or any(t.lower() == "auto" for t in tokens)
    rest = [parse_pattern(t, source) for t in tokens if t.lower() not in KEYWORDS]
    return auto, blocks, rest


def head_only(layers: str | Sequence[str] | None) -> bool:
    """Whether ``layers`` asks for the auto head alone (whose inputs are never pooled)."""
    _, blocks, patterns = split_layers(layers, "--layers")
    return not blocks and not patterns


def match_modules(
    named: list[tuple[str, nn.Module]], patterns: list[Pattern], source: str
) -> tuple[dict[Pattern, list[str]], list[str]]:
    """Module paths matched by each ``--layers`` pattern (each must match one), and notes
    for globs that match many."""
    matched: dict[Pattern, list[str]] = {}
    notes: list[str] = []
    for pat in patterns:
        hits = [n for n, _ in named if n and pat.matches(n)]
        if not hits:
            deeper = [n for n, _ in named if n and _crossing(pat.glob, n)]
            hint = f"; '*' stays within one level, '**' crosses levels ({names_list(deeper, 4)})"
            raise UsageError(
                f"{source}: --layers {pat.text!r} matches no module"
                + (hint if deeper else "")
                + f"; modules are {names_list([n for n, _ in named if n], 12)}"
            )
        if len(hits) > MANY_MATCHES:
            notes.append(
                f"--layers {pat.text!r} matches {len(hits)} modules ({names_list(hits, 4)}); each "
                "is cached with its own d×d statistics"
            )
        matched[pat] = hits
    return matched, notes


def _crossing(glob: str, name: str) -> bool:
    """Whether ``glob`` would match ``name`` if ``*`` crossed levels (for the hint)."""
    return bool(glob_regex(glob.replace("**", "*").replace("*", "**")).match(name))
