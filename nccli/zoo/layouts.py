"""The key layouts of CIFAR ResNet-18 state dicts in the wild, and the renames between them.

Three codebases save the same network under different module names:

- nccli (``resnet18``): classifier ``classifier``, projection ``layerN.M.shortcut.0/1``;
- kuangliu/pytorch-cifar: classifier ``linear``, projection ``layerN.M.shortcut.0/1``;
- torchvision (``resnet18_tv``): classifier ``fc``, projection ``layerN.M.downsample.0/1``.

Every other key (``conv1``, ``bn1``, ``layerN.M.conv1/bn1/conv2/bn2``, ``head.*``) is the
same in all of them.  :func:`adapt_resnet_state` renames a checkpoint's classifier and
projection keys into the target model's names, and only when that is unambiguous: the
checkpoint uses exactly one foreign name for the part, and the new key is one the model
has and the checkpoint does not.  Anything else keeps its name, so a real mismatch is
still reported by the names in the file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

__all__ = ["CLASSIFIER_NAMES", "SHORTCUT_NAMES", "adapt_resnet_state"]

V = TypeVar("V")

#: top-level module names of the classifier in the known layouts
CLASSIFIER_NAMES = ("classifier", "linear", "fc")
#: names of a residual block's 1x1 conv-BN projection in the known layouts
SHORTCUT_NAMES = ("shortcut", "downsample")

_SHORTCUT = re.compile(r"^(layer[1-4]\.\d+\.)(" + "|".join(SHORTCUT_NAMES) + r")\.(.+)$")


def _classifier_of(keys: Iterable[str]) -> set[str]:
    return {k.split(".", 1)[0] for k in keys if k.split(".", 1)[0] in CLASSIFIER_NAMES}


def _shortcut_of(keys: Iterable[str]) -> set[str]:
    return {m.group(2) for m in map(_SHORTCUT.match, keys) if m}


def _renamed(key: str, classifier: tuple[str, str] | None, shortcut: tuple[str, str] | None) -> str:
    """``key`` under the two renames ``(old, new)`` (``None``: leave that part alone)."""
    if classifier and key.startswith(classifier[0] + "."):
        return classifier[1] + key[len(classifier[0]) :]
    m = _SHORTCUT.match(key)
    if shortcut and m and m.group(2) == shortcut[0]:
        return f"{m.group(1)}{shortcut[1]}.{m.group(3)}"
    return key


def _rename(found: set[str], wanted: set[str]) -> tuple[str, str] | None:
    """``(old, new)`` when the checkpoint uses one name and the model another, else None."""
    if len(found) == 1 and len(wanted) == 1 and found != wanted:
        return next(iter(found)), next(iter(wanted))
    return None


def adapt_resnet_state(state: Mapping[str, V], expected: Collection[str]) -> Mapping[str, V]:
    """``state`` with its classifier and projection keys in the names of ``expected``.

    ``expected`` is the target model's state-dict keys; the target's own layout is read
    from them.  A part is renamed only when the checkpoint names it one way (``linear``,
    ``fc`` or ``classifier``; ``shortcut`` or ``downsample``) and the model another, and
    each key only when its new name is expected and not already in ``state``.  Returns
    ``state`` itself when nothing is renamed.
    """
    keys = list(state)
    expected = set(expected)
    classifier = _rename(_classifier_of(keys), _classifier_of(expected))
    shortcut = _rename(_shortcut_of(keys), _shortcut_of(expected))
    if classifier is None and shortcut is None:
        return state
    out: dict[str, V] = {}
    changed = False
    for key in keys:
        new = _renamed(key, classifier, shortcut)
        if new != key and (new not in expected or new in state or new in out):
            new = key  # a rename that does not land on a free model key: keep the file's name
        changed |= new != key
        out[new] = state[key]
    if not changed or len(out) != len(state):
        return state
    return out
