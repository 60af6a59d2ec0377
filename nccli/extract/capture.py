"""Capturing a layer's features in the forward pass, and what to do with NaN/Inf.

:class:`Capture` hooks the chosen modules (their input for head layers, their output for
other selected modules; for a layer ``<module>#N`` the module's N-th call) and hands back
one ``(B, d)`` tensor per layer and forward: a feature map is pooled in the hook, on the
device, as the layer's ``pool`` says (:func:`nccli.extract.pooling.pool_features`), so
the map itself is not kept alive to the end of the forward pass.  :func:`nonfinite_rows` is the policy for non-finite values: refuse, naming the
checkpoint, layer and sample, or (``--skip-nonfinite``) drop the sample from every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from nccli.errors import DataError
from nccli.extract.discovery import first_input
from nccli.extract.pooling import pool_features
from nccli.layers import Layer

__all__ = ["Capture", "drop_rows", "nonfinite_rows"]


class Capture:
    """Hooks on the chosen modules; ``take`` returns this forward's ``(B, d)`` tensors."""

    def __init__(self, model: nn.Module, choices: list[Layer], source: str) -> None:
        self.source = source
        self.choices = choices
        self.seen: dict[str, list[torch.Tensor]] = {c.name: [] for c in choices}
        self.calls: dict[str, int] = {c.name: 0 for c in choices}  # this forward's, per layer
        modules = dict(model.named_modules())
        self.handles = [
            modules[c.module].register_forward_hook(self._hook(c), with_kwargs=True)
            for c in choices
        ]

    def _hook(self, choice: Layer) -> Callable[..., None]:
        want = choice.call  # 0: every call (the module runs once)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.calls[choice.name] += 1
            if want and self.calls[choice.name] != want:
                return
            t = first_input(args, kwargs) if choice.io == "input" else out
            if isinstance(t, torch.Tensor) and t.ndim >= 1:
                t = pool_features(t, choice.pool)
            self.seen[choice.name].append(t)

        return hook

    def take(self, B: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for c in self.choices:
            got = self.seen[c.name]
            self.seen[c.name], self.calls[c.name] = [], 0
            if len(got) != 1 or not isinstance(got[0], torch.Tensor):
                raise DataError(
                    f"{self.source}: layer {c.name} was captured {len(got)} times in one "
                    "forward pass (expected once); the model's control flow changed since the "
                    "probe"
                )
            t = got[0]
            if t.shape != (B, c.dim):
                raise DataError(
                    f"{self.source}: layer {c.name} gave features of shape {tuple(t.shape)}, "
                    f"expected ({B}, {c.dim}) as in the probe pass"
                )
            out[c.name] = t
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def nonfinite_rows(
    source: str,
    feats: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor],
    logits: torch.Tensor,
    indices: np.ndarray,
    feature_dtype: str,
    skip: bool = False,
) -> torch.Tensor | None:
    """Policy for NaN/Inf in a batch: ``None`` when every value is finite; else, with
    ``skip``, the mask of rows that are finite in *every* layer and the logits (a sample is
    dropped from all layers, so they keep the same N), and without it a DataError naming
    checkpoint, layer and sample.

    One device sync for the whole batch in the common (all finite) case.
    """
    tensors = [*feats.values(), logits]
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if bool(flags.all()):
        return None
    if skip:
        keep = torch.ones(len(indices), dtype=torch.bool, device=logits.device)
        for t in tensors:
            keep &= torch.isfinite(t).all(dim=1).to(keep.device)
        return keep
    for name, t in [*feats.items(), ("logits", logits)]:
        ok = torch.isfinite(t).all(dim=1)
        if bool(ok.all()):
            continue
        row = int(torch.nonzero(~ok)[0, 0].item())
        sample = int(indices[row])
        nbad = int((~ok).sum().item())
        if name in raw and bool(torch.isfinite(raw[name][row]).all()):
            raise DataError(
                f"{source}: layer {name}: sample {sample} overflows {feature_dtype} storage "
                f"({nbad} rows in this batch); use --dtype float32"
            )
        raise DataError(
            f"{source}: layer {name} has NaN or infinite values for sample {sample} ({nbad} "
            "rows in this batch); the checkpoint may have diverged, or the inputs need "
            "--normalize; --skip-nonfinite drops such samples"
        )


def drop_rows(
    keep: torch.Tensor,
    feats: dict[str, torch.Tensor],
    logits: torch.Tensor,
    yd: torch.Tensor,
    y: torch.Tensor,
    idx: np.ndarray,
    skipped: np.ndarray,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The batch without the rows ``keep`` rejects; ``skipped`` (per class) counts them."""
    kc = keep.cpu()
    skipped += np.bincount(y[~kc].numpy(), minlength=len(skipped))
    feats = {k: v[keep.to(v.device)] for k, v in feats.items()}
    return feats, logits[keep.to(logits.device)], yd[keep.to(yd.device)], y[kc], idx[kc.numpy()]
