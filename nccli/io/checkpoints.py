"""Every checkpoint format → an ``nn.Module``, loaded safely.

:func:`load_model` is the only entry point.  The format is read from the file's bytes, not
its extension (``format`` in the result in brackets):

- zip with ``data.pkl``, or a legacy pickle: ``torch.load(weights_only=True)``; a state
  dict, possibly nested under ``state_dict``/``model``/``model_state_dict``/``net``/
  ``module``, loaded into ``arch`` or ``model`` [``state_dict``]; a whole pickled
  ``nn.Module`` only with ``trust_checkpoint=True`` [``pickle``]
- zip with ``code/`` or ``constants.pkl``: ``torch.jit.load`` [``torchscript``]
- zip with ``archive_format`` = ``pt2`` or ``models/*.json``:
  ``torch.export.load(...).module()`` [``export``]
- 8-byte little-endian length + JSON header: the ``safetensors`` package, whose
  ``__metadata__`` may carry ``epoch``/``step`` [``safetensors``]

Nothing is unpickled outside the weights-only unpickler unless ``trust_checkpoint`` is
set: a file that needs it raises :class:`~nccli.errors.UnsafeCheckpointError` naming the
globals it would import.  ``torch.export`` archives are screened the same way before
``torch.export.load`` (which would otherwise fall back to full unpickling on its own).
When ``arch`` or ``model`` is given for a TorchScript, export or pickled-module file, that
architecture is built and the file's weights are loaded into it, so the result has the
named submodules hooks need.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nccli.zoo as zoo
from nccli.errors import CheckpointError, UnsafeCheckpointError, UsageError
from nccli.io._util import file_sha256, import_object, one_line
from nccli.io.names import epoch_step_from_name

__all__ = ["LoadedCheckpoint", "load_model"]

#: Keys under which training scripts nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
#: Prefixes added by DataParallel/DDP, Lightning-style wrappers and ``torch.compile``.
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")
_SCALARS = (str, int, float, bool)
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode) and what is known about where it came from.

    ``format`` is one of ``state_dict``, ``safetensors``, ``torchscript``, ``export`` or
    ``pickle``.  ``arch`` is the zoo spec (``nccli.zoo.format_arch``) or the ``--model``
    import string the module was built from, ``None`` when the file held the whole model.
    ``metadata`` holds the safetensors ``__metadata__`` or the top-level str/int/float/bool
    entries of a checkpoint dict, as strings.
    """

    module: nn.Module
    format: str
    epoch: int | None
    step: int | None
    sha256: str
    path: Path
    arch: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    model: str | None = None,
    trust_checkpoint: bool = False,
    map_location: str | torch.device | None = "cpu",
) -> LoadedCheckpoint:
    """Load the checkpoint at ``path`` as a module in eval mode.

    ``arch`` is a zoo spec (``"resnet18:num_classes=10"``, see :func:`nccli.zoo.parse_arch`)
    and ``model`` an import string ``"pkg.module:factory"`` whose call returns an
    ``nn.Module``; one of them is needed when the file holds only weights.  Raises
    :class:`~nccli.errors.CheckpointError` for a missing, empty, truncated or foreign file
    and for weights that do not fit the architecture (names listed),
    :class:`~nccli.errors.UnsafeCheckpointError` when the file needs arbitrary unpickling
    and ``trust_checkpoint`` is false, and :class:`~nccli.errors.UsageError` for a bad
    ``arch``/``model`` or when neither is given for a state dict.
    """
    p = Path(path)
    if arch is not None and model is not None:
        raise UsageError(f"{p}: pass either --arch or --model, not both")
    _check_file(p)
    digest = file_sha256(p)
    kind = _detect_format(p)

    meta: dict[str, str] = {}
    epoch: int | None = None
    step: int | None = None
    state: Mapping[str, Any] | None = None
    whole: nn.Module | None = None

    if kind == "safetensors":
        state, meta = _read_safetensors(p, map_location)
        fmt = "safetensors"
    elif kind == "torchscript":
        whole, fmt = _read_torchscript(p, map_location), "torchscript"
    elif kind == "export":
        whole, fmt = _read_export(p, trust_checkpoint), "export"
    else:
        obj = _torch_load(p, trust_checkpoint, map_location)
        if isinstance(obj, nn.Module):
            whole, fmt = obj, "pickle"
        elif isinstance(obj, Mapping):
            meta = {str(k): str(v) for k, v in obj.items() if isinstance(v, _SCALARS)}
            epoch = _as_int(obj.get("epoch"))
            step = _as_int(obj.get("step", obj.get("global_step")))
            found = _find_state_dict(obj)
            if found is None:
                keys = _names(str(k) for k in obj)
                raise CheckpointError(
                    f"{p}: no state dict found (top-level keys: {keys}); expected tensors or "
                    f"an entry named one of {', '.join(WRAPPER_KEYS)}"
                )
            if isinstance(found, nn.Module):
                whole, fmt = found, "pickle"
            else:
                state, fmt = found, "state_dict"
        else:
            raise CheckpointError(
                f"{p}: holds a {type(obj).__name__}, not a state dict or a model; save "
                "model.state_dict() or the model itself"
            )

    if epoch is None:
        epoch = _as_int(meta.get("epoch"))
    if step is None:
        step = _as_int(meta.get("step", meta.get("global_step")))
    name_epoch, name_step = epoch_step_from_name(p.name)
    epoch = name_epoch if epoch is None else epoch
    step = name_step if step is None else step

    label: str | None = None
    if arch is not None or model is not None:
        target, label = _build_target(p, arch, model)
        if state is None and whole is not None:
            state = whole.state_dict()
        assert state is not None
        _load_into(target, state, p, label)
        module = target
    elif whole is not None:
        module = whole
    else:
        assert state is not None
        raise UsageError(
            f"{p}: holds only weights ({len(state)} tensors); pass --arch NAME[:key=value,...] "
            f"(built in: {', '.join(zoo.available())}) or --model pkg.module:factory"
        )

    if isinstance(map_location, (str, torch.device)):
        module = module.to(map_location)
    if module is not whole or fmt != "export":  # an exported graph is traced: no .eval()
        module.eval()
    return LoadedCheckpoint(module, fmt, epoch, step, digest, p, label, meta)


# --------------------------------------------------------------------------- file checks


def _check_file(p: Path) -> None:
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file; check the path")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory; pass the checkpoint file inside it")
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


def _corrupt(p: Path, what: str, exc: BaseException | str) -> CheckpointError:
    return CheckpointError(
        f"{p}: {what} is truncated or corrupt ({one_line(exc)}); re-save or re-copy the checkpoint"
    )


def _detect_format(p: Path) -> str:
    """Return ``torch``, ``torchscript``, ``export`` or ``safetensors`` from the bytes."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
                rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
                if "archive_format" in rel:
                    fmt_name = next(n for n in names if n.endswith("archive_format"))
                    if zf.read(fmt_name).strip() == b"pt2":
                        return "export"
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _corrupt(p, "zip archive", exc) from exc
        if any(r.startswith("models/") and r.endswith(".json") for r in rel) or (
            "serialized_exported_program.json" in rel
        ):
            return "export"
        if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
            return "torchscript"
        if "data.pkl" in rel:
            return "torch"
        raise CheckpointError(
            f"{p}: is a zip archive but not a PyTorch checkpoint (no data.pkl, TorchScript "
            "code or torch.export model inside); an .npz belongs to --data"
        )
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= _MAX_SAFETENSORS_HEADER:
            if n > size - 8:
                raise _corrupt(
                    p, "safetensors file", f"header declares {n} bytes, file has {size - 8}"
                )
            return "safetensors"
    if head[:1] == b"\x80":  # pickle PROTO opcode: legacy torch.save format
        return "torch"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        raise CheckpointError(
            f"{p}: is an HDF5 file (an nccli cache or a Keras model?), not a PyTorch checkpoint"
        )
    raise CheckpointError(
        f"{p}: not a checkpoint (starts with bytes {head[:4].hex(' ')}: no zip archive, pickle "
        "or safetensors header); pass a file written by torch.save, torch.jit.save, "
        "torch.export.save or safetensors"
    )


# --------------------------------------------------------------------------- readers


def _torch_load(p: Path, trust: bool, map_location: Any) -> Any:
    """``torch.load`` with the weights-only unpickler; full unpickling only if trusted."""
    try:
        return torch.load(p, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        if not trust:
            unsafe = _unsafe_globals(p, exc)
            if unsafe is None:
                raise _corrupt(p, "pickle", exc) from exc
            raise UnsafeCheckpointError(
                f"{p}: loading needs arbitrary unpickling ({unsafe}), which can execute code; "
                "pass --trust-checkpoint only if you trust the source, or re-save it as "
                "model.state_dict() or safetensors"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise _corrupt(p, "checkpoint", exc) from exc
    try:
        return torch.load(p, weights_only=False, map_location=map_location)
    except Exception as exc:
        raise _corrupt(p, "checkpoint", exc) from exc


def _unsafe_globals(p: Path | io.BytesIO, exc: BaseException) -> str | None:
    """Describe the globals the weights-only unpickler refused; ``None`` if it was corruption."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:
        names = []
    if isinstance(p, io.BytesIO):
        p.seek(0)
    msg = str(exc)
    names += [m for m in re.findall(r"GLOBAL ([\w.]+)", msg) if m not in names]
    if names:
        return f"it references {_names(sorted(names), 3)}"
    if "Unsupported" in msg or "unsupported" in msg:
        return "it uses pickle operations the weights-only loader refuses"
    return None


def _read_safetensors(p: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _validate_safetensors_header(p)
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise CheckpointError(
            f"{p}: is a safetensors file but the 'safetensors' package is not installed; "
            "pip install nccli[safetensors]"
        ) from exc
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(p), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise _corrupt(p, "safetensors file", exc) from exc
    return state, meta


def _validate_safetensors_header(p: Path) -> None:
    """Bounds-check the header and the data offsets before anything is allocated."""
    size = p.stat().st_size
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(p, "safetensors header", exc) from exc
    if not isinstance(header, dict):
        raise _corrupt(p, "safetensors header", "the header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise _corrupt(p, "safetensors header", f"tensor {key!r} has no data_offsets")
        end = max(end, int(offsets[1]))
    available = size - 8 - n
    if end != available:
        raise _corrupt(
            p,
            "safetensors file",
            f"header indexes {end} bytes of tensor data, the file holds {available}",
        )


def _read_torchscript(p: Path, map_location: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but files still exist
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location=map_location)
    except Exception as exc:
        raise _corrupt(p, "TorchScript archive", exc) from exc


def _read_export(p: Path, trust: bool) -> nn.Module:
    if not trust:
        reason = _export_needs_trust(p)
        if reason is not None:
            raise UnsafeCheckpointError(
                f"{p}: this torch.export archive needs arbitrary unpickling ({reason}), which "
                "can execute code; pass --trust-checkpoint only if you trust the source"
            )
    try:
        return torch.export.load(str(p)).module()
    except Exception as exc:
        raise _corrupt(p, "torch.export archive", exc) from exc


def _export_needs_trust(p: Path) -> str | None:
    """Check every pickled payload in a ``.pt2`` with the weights-only unpickler."""
    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
        pickled: list[str] = [n for n in names if n.endswith(".pt")]
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("opaque_obj_"):
                return f"{name} is a plain pickle"
            if not name.endswith("_config.json") or "/data/" not in f"/{name}":
                continue
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError):
                continue
            folder = name.rsplit("/", 1)[0]
            for entry in config.values() if isinstance(config, dict) else []:
                if isinstance(entry, dict) and entry.get("use_pickle"):
                    path_name = str(entry.get("path_name", ""))
                    if path_name.startswith("opaque_obj_"):
                        return f"{path_name} is a plain pickle"
                    if not path_name.startswith("custom_obj_"):
                        pickled.append(f"{folder}/{path_name}")
        for name in pickled:
            if name not in names:
                continue
            buf = io.BytesIO(zf.read(name))
            try:
                torch.load(buf, weights_only=True)
            except Exception as exc:
                buf.seek(0)
                return f"{name}: {_unsafe_globals(buf, exc) or one_line(exc, 80)}"
    return None


# --------------------------------------------------------------------------- state dicts


def _find_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Any] | nn.Module | None:
    """The state dict (or whole module) inside a checkpoint dict, searched recursively."""
    for key in WRAPPER_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            return value
        if isinstance(value, Mapping) and value:
            found = _find_state_dict(value)
            if found is not None:
                return found
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    return None


def _strip_prefixes(state: Mapping[str, Any], expected: set[str]) -> Mapping[str, Any]:
    """Strip ``module.``/``model.``/``_orig_mod.`` while every key has one; keep the best fit.

    Each stripping step yields a candidate; the one sharing most keys with the model wins
    (ties go to the least stripped), so a model whose own attribute is ``model`` still loads.
    """
    candidates = [state]
    current = state
    while current:
        prefix = next(
            (pre for pre in STRIP_PREFIXES if all(k.startswith(pre) for k in current)), None
        )
        if prefix is None:
            break
        current = {k[len(prefix) :]: v for k, v in current.items()}
        candidates.append(current)
    return max(candidates, key=lambda c: len(expected.intersection(c)))


def _load_into(target: nn.Module, state: Mapping[str, Any], p: Path, label: str) -> None:
    expected = target.state_dict()
    state = _strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (checkpoint vs model): {_names(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{p}: weights do not fit {label}: {'; '.join(problems)}; check that --arch/--model "
            "matches the training run"
        )
    try:
        target.load_state_dict(dict(state), strict=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: weights do not fit {label}: {one_line(exc)}") from exc


def _build_target(p: Path, arch: str | None, model: str | None) -> tuple[nn.Module, str]:
    if arch is not None:
        module = zoo.build(arch)
        return module, str(getattr(module, "nccli_arch", arch))
    assert model is not None
    factory = import_object(model, flag="--model")
    if isinstance(factory, nn.Module):
        return factory, model
    if not callable(factory):
        raise UsageError(f"--model {model!r}: is not callable; point it at a factory function")
    try:
        module = factory()
    except Exception as exc:
        raise UsageError(
            f"--model {model!r}: calling the factory failed with {type(exc).__name__}: "
            f"{one_line(exc)}; run with --debug for the traceback"
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"--model {model!r}: the factory returned a {type(module).__name__}, not an nn.Module"
        )
    return module, model


# --------------------------------------------------------------------------- small helpers


def _names(items: Iterable[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 7 more``."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _as_int(value: Any) -> int | None:
    """An epoch/step number from an int, whole float, 0-d tensor or digit string."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None
