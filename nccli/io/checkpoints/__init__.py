"""Every checkpoint format → an ``nn.Module``, loaded safely.

:func:`load_model` is the only entry point.  The format is read from the file's bytes, not
its extension (``format`` in the result in brackets):

- zip with ``data.pkl``, or a legacy pickle: ``torch.load(weights_only=True)``; a state
  dict, possibly nested under ``state_dict``/``model``/``model_state_dict``/``net``/
  ``module`` (or the entry ``state_key`` names: ``ema.model``; two candidates, such as a
  model and its EMA, are refused rather than guessed between), loaded into ``arch`` or
  ``model`` [``state_dict``]; a whole pickled ``nn.Module`` only with
  ``trust_checkpoint=True`` [``pickle``]
- zip with ``code/`` or ``constants.pkl``: ``torch.jit.load``, only with
  ``trust_checkpoint=True`` [``torchscript``]
- zip with ``archive_format`` = ``pt2`` or ``models/*.json``:
  ``torch.export.load(...).module()``, only with ``trust_checkpoint=True`` [``export``]
- 8-byte little-endian length + JSON header: the ``safetensors`` package, whose
  ``__metadata__`` may carry ``epoch``/``step`` [``safetensors``]

Nothing is unpickled outside the weights-only unpickler unless ``trust_checkpoint`` is
set: a file that needs it raises :class:`~nccli.errors.UnsafeCheckpointError` naming the
globals it would import.  TorchScript and ``torch.export`` archives are programs (loading
one runs code stored in it), so they too need ``trust_checkpoint``; a state dict or
safetensors file never does.  Every zip is first screened by :mod:`.zipscreen` (no
duplicate, overlapping or stray members), so what nccli inspects is what torch reads.
When ``arch`` or ``model`` is given for a TorchScript, export or pickled-module file, that
architecture is built and the file's weights are loaded into it, so the result has the
named submodules hooks need.

Modules: :mod:`.base` (the reader contract, shared helpers), :mod:`.pickled`
(``torch.save``), :mod:`.tensors` (safetensors), :mod:`.archives` (TorchScript, export),
:mod:`.formats` (the ordered table of formats: add a new one there) and :mod:`.weights`
(loading weights into ``--arch``/``--model``), :mod:`.zipscreen` (one view of a zip for
every reader); this module checks the file and assembles the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import nccli.zoo as zoo
from nccli.errors import CheckpointError, DataError, UsageError
from nccli.io._util import check_input_file, file_sha256
from nccli.io.checkpoints.base import CheckpointFormat, Contents, as_int
from nccli.io.checkpoints.formats import FORMATS, detect_format
from nccli.io.checkpoints.pickled import WRAPPER_KEYS, select_state
from nccli.io.checkpoints.weights import STRIP_PREFIXES, build_target, load_into
from nccli.io.names import epoch_step_from_path, fill_from_name

__all__ = [
    "FORMATS",
    "STRIP_PREFIXES",
    "WRAPPER_KEYS",
    "CheckpointFormat",
    "LoadedCheckpoint",
    "load_model",
]


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode) and what is known about where it came from.

    ``format`` is one of ``state_dict``, ``safetensors``, ``torchscript``, ``export`` or
    ``pickle``.  ``arch`` is the zoo spec (``nccli.zoo.format_arch``) or the ``--model``
    import string the module was built from, ``None`` when the file held the whole model.
    ``metadata`` holds the safetensors ``__metadata__`` or the top-level str/int/float/bool
    entries of a checkpoint dict, as strings.  ``state_key`` is the dotted key of the
    checkpoint dict the weights came from (``None``: its top level); ``notes`` say what
    was inferred from the weights (``num_classes`` the ``arch``/``model`` left out).
    """

    module: nn.Module
    format: str
    epoch: int | None
    step: int | None
    sha256: str
    path: Path
    arch: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: where ``epoch`` / ``step`` came from: ``"checkpoint"`` (stored in it), ``"name"``
    #: (its file or folder name) or ``None`` (unknown)
    epoch_from: str | None = None
    step_from: str | None = None
    state_key: str | None = None
    notes: list[str] = field(default_factory=list)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    model: str | None = None,
    trust_checkpoint: bool = False,
    map_location: str | torch.device | None = "cpu",
    state_key: str | None = None,
) -> LoadedCheckpoint:
    """Load the checkpoint at ``path`` as a module in eval mode.

    ``arch`` is a zoo spec (``"resnet18:num_classes=10"``, see :func:`nccli.zoo.parse_arch`)
    and ``model`` an import string ``"pkg.module:factory"`` or a file
    ``"path/to/file.py:factory"``, optionally followed by arguments
    (``":num_classes=10,width=8"``), whose call returns an ``nn.Module``; one of them is
    needed when the file holds only weights.  A required ``num_classes`` or input size
    left out is read from the weights (a note in ``notes``).  ``state_key`` is the dotted
    key of the weights in a checkpoint dict, instead of the automatic search.  Raises
    :class:`~nccli.errors.CheckpointError` for a missing, empty, truncated or foreign file
    and for weights that do not fit the architecture (names listed),
    :class:`~nccli.errors.UnsafeCheckpointError` when the file needs arbitrary unpickling
    or is a TorchScript/``torch.export`` program and ``trust_checkpoint`` is false, and :class:`~nccli.errors.UsageError` for a bad
    ``arch``/``model`` or when neither is given for a state dict.
    """
    p = Path(path)
    if arch is not None and model is not None:
        raise UsageError(f"{p}: pass either --arch or --model, not both")
    _check_file(p)
    digest = file_sha256(p)
    got = detect_format(p).read(p, trust_checkpoint, map_location)
    chosen = select_state(p, got, state_key)
    stored = _epoch_step(p, got)
    epoch, step = _from_names(p, *stored)
    # where each number came from: the cache records it, so a trajectory can say why it
    # is ordered as it is
    origin = {
        k: None if v is None else "checkpoint" if s is not None else "name"
        for k, v, s in (("epoch", epoch, stored[0]), ("step", step, stored[1]))
    }
    module, label, notes = _module_for(p, got, arch, model)
    if isinstance(map_location, (str, torch.device)):
        module = module.to(map_location)
    if module is not got.whole or got.format != "export":  # an exported graph is traced: no .eval()
        module.eval()
    return LoadedCheckpoint(
        module,
        got.format,
        epoch,
        step,
        digest,
        p,
        label,
        got.meta,
        origin["epoch"],
        origin["step"],
        chosen,
        notes,
    )


def _check_file(p: Path) -> None:
    """Refuse a path that is not a readable, non-empty regular file before anything opens
    it (a FIFO would hang the read, a device never end)."""
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file; check the path")
    if p.is_dir():
        if (p / "config.json").is_file():  # a Hugging Face model folder
            raise CheckpointError(
                f"{p}: is a directory holding config.json; for a Hugging Face causal LM pass "
                "--model hf, else the checkpoint file inside it"
            )
        raise CheckpointError(f"{p}: is a directory; pass the checkpoint file inside it")
    try:
        check_input_file(p, "checkpoint")
    except DataError as exc:
        raise CheckpointError(str(exc)) from None
    if not os.access(p, os.R_OK):
        raise CheckpointError(
            f"{p}: not readable (permission denied); fix its permissions (chmod u+r) or "
            "copy it somewhere readable"
        )
    if p.stat().st_size == 0:
        raise CheckpointError(
            f"{p}: file is empty (0 bytes); the save was probably interrupted, re-save or "
            "re-copy it"
        )


def _epoch_step(p: Path, got: Contents) -> tuple[int | None, int | None]:
    """Epoch and step stored in the file (dict entries, then metadata).

    A stored value that cannot be an epoch or step (see :func:`~.base.as_int`: negative,
    beyond int64, not ASCII digits) is not used, so the name decides."""
    epoch, step = got.epoch, got.step
    if epoch is None:
        epoch = as_int(got.meta.get("epoch"))
    if step is None:
        step = as_int(got.meta.get("step", got.meta.get("global_step")))
    return epoch, step


def _from_names(p: Path, epoch: int | None, step: int | None) -> tuple[int | None, int | None]:
    """Fill what the file does not store from its name (the file's, else its folder's:
    ``ep5/ckpt.pth``); a number in the name beyond int64 is not used (a cache records it as
    an int64).  A name's epoch that is the very number the file stores as its step
    (``ckpt_0300.pt`` holding ``step=300``) is that step, not also an epoch."""
    name_epoch, name_step = epoch_step_from_path(p)
    return fill_from_name(epoch, step, as_int(name_epoch), as_int(name_step))


def _module_for(
    p: Path, got: Contents, arch: str | None, model: str | None
) -> tuple[nn.Module, str | None, list[str]]:
    """The module to return, its ``arch`` label and the notes on what was inferred: the
    named architecture with the file's weights loaded into it, or the file's own whole
    module."""
    if arch is not None or model is not None:
        state = got.state
        if state is None and got.whole is not None:
            state = got.whole.state_dict()
        assert state is not None
        target, label, notes = build_target(p, arch, model, state)
        load_into(target, state, p, label)
        return target, label, notes
    if got.whole is not None:
        return got.whole, None, []
    assert got.state is not None
    raise UsageError(
        f"{p}: holds only weights ({len(got.state)} tensors); pass --arch NAME[:key=value,...] "
        f"(built in: {', '.join(zoo.available())}) or --model pkg.module:factory or "
        "path/to/file.py:Class[:key=value,...]"
    )
