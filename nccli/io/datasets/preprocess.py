"""What happens to raw samples on the way to the model: image layout, scaling, normalisation.

``uint8`` inputs are images: they are scaled to [0, 1], ``(H, W)`` becomes ``(1, H, W)``
and ``(H, W, C)`` becomes ``(C, H, W)``; other dtypes are cast to float32 as they are.
``--normalize`` takes ``none``, ``mean=...;std=...``, a preset name or ``auto`` (per-channel
statistics of the selected samples, computed by the dataset in one extra pass).

Preprocessing is never guessed: :func:`pixel_data` says when inputs are image data that
need an explicit ``--normalize`` (``uint8``, or any other dtype whose first
``PIXEL_PROBE`` selected samples all lie in [0, 255] and exceed ``PIXEL_LIMIT``), and
:func:`needs_normalize` is the one line that asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nccli.errors import UsageError

__all__ = [
    "NORMALIZE_PRESETS",
    "PIXEL_LIMIT",
    "PIXEL_PROBE",
    "Layout",
    "channel_stats",
    "needs_normalize",
    "normalization",
    "parse_normalize",
    "pixel_data",
]

#: per-channel (mean, std) of pixels scaled to [0, 1].  ``cifar10``/``cifar100`` are the
#: per-pixel std of the training set; ``-0.2023``/``-0.2009`` are the values most CIFAR
#: training code (kuangliu/pytorch-cifar, many NC codebases) normalises with.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar10-0.2023": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar100-0.2009": ((0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: other inputs (float, integer but not uint8) are unscaled pixels when the first
#: ``PIXEL_PROBE`` selected samples all lie in [0, 255] and reach above ``PIXEL_LIMIT``
PIXEL_LIMIT = 10.0
PIXEL_PROBE = 1024


def pixel_data(dtype: np.dtype, probe: np.ndarray) -> str | None:
    """Why inputs of ``dtype`` (``probe``: raw leading samples) are image data that need an
    explicit ``--normalize`` (``"uint8"``, ``"float32 in 0..255"``), or ``None``: ``uint8``
    always; any other dtype when every probed value lies in [0, 255] and one is above
    :data:`PIXEL_LIMIT` (already-normalised arrays, features and [0, 1] images are not)."""
    if dtype == np.uint8:
        return "uint8"
    if probe.size == 0 or probe.dtype.kind not in "biuf":
        return None
    lo, hi = float(np.min(probe)), float(np.max(probe))  # NaN: not pixels (and refused later)
    if lo >= 0 and PIXEL_LIMIT < hi <= 255:
        return f"{dtype} in {lo:g}..{hi:g}"
    return None


def needs_normalize(what: str, where: str) -> str:
    """The one line asking for an explicit ``--normalize`` for image data ``what``."""
    fmt = ",".join
    if what != "uint8":  # not scaled to [0, 1]: the presets' numbers do not fit them
        return (
            f"{where}: image data ({what}) need an explicit --normalize: none (values as "
            f"stored) or mean=...;std=... in their units (the presets {', '.join(NORMALIZE_PRESETS)} "
            "are for pixels scaled to [0, 1]: store uint8 or divide by 255 first)"
        )
    presets = ", ".join(
        f"{name} (mean {fmt(f'{v:g}' for v in m)} std {fmt(f'{v:g}' for v in s)})"
        for name, (m, s) in NORMALIZE_PRESETS.items()
    )
    return (
        f"{where}: image data (uint8) need an explicit --normalize: none (x/255 only), "
        f"{presets}, or mean=...;std=... (applied after x/255)"
    )


@dataclass(frozen=True)
class Layout:
    """How a stored sample of shape ``item`` becomes a float32 model input."""

    images: bool
    add_channel: bool
    hwc: bool
    input_shape: tuple[int, ...]

    @classmethod
    def of(cls, item: tuple[int, ...], dtype: np.dtype) -> Layout:
        """The layout for per-sample shape ``item`` stored as ``dtype``."""
        images = dtype == np.uint8
        add_channel = images and len(item) == 2
        # (H, W, C) when the last axis looks like colour channels and the first does not
        hwc = (
            images
            and len(item) == 3
            and item[2] in (1, 3, 4)
            and (item[0] not in (1, 3, 4) or item[2] < item[0])
        )
        if add_channel:
            shape: tuple[int, ...] = (1, *item)
        elif hwc:
            shape = (item[2], item[0], item[1])
        else:
            shape = tuple(item)
        return cls(images, add_channel, hwc, shape)

    def to_float(self, raw: np.ndarray) -> np.ndarray:
        """A fresh, C-contiguous float32 batch in model layout."""
        x = np.asarray(raw).astype(np.float32)  # always a fresh array: safe to edit in place
        if self.images:
            np.divide(x, 255.0, out=x)
            if self.add_channel:
                x = x[:, None]
            elif self.hwc:
                x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    """``"mean=0.5,0.5,0.5;std=0.2,0.2,0.2"`` or a preset name → ``(mean, std)``.

    Presets: see :data:`NORMALIZE_PRESETS`.  ``"none"`` and ``"auto"`` are resolved by
    :class:`ArrayDataset` (no normalisation; statistics of the data itself).
    """
    preset = NORMALIZE_PRESETS.get(text.strip().lower())
    if preset is not None:
        return list(preset[0]), list(preset[1])
    values: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, rest = part.partition("=")
        key = key.strip().lower()
        try:
            numbers = [float(v) for v in rest.split(",")]
        except ValueError:
            numbers = []
        if not eq or key not in ("mean", "std") or not numbers:
            raise UsageError(
                f"--normalize {text!r}: expected 'mean=a,b,c;std=d,e,f', 'none', 'auto' or one of "
                f"{', '.join(NORMALIZE_PRESETS)}"
            )
        values[key] = numbers
    if set(values) != {"mean", "std"}:
        raise UsageError(f"--normalize {text!r}: give both mean= and std=")
    if any(not math.isfinite(v) for v in values["mean"] + values["std"]) or any(
        v <= 0 for v in values["std"]
    ):
        raise UsageError(f"--normalize {text!r}: values must be finite and std positive")
    return values["mean"], values["std"]


def normalization(
    mean: list[float], std: list[float], input_shape: tuple[int, ...], where: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Broadcastable float32 ``(mean, std)`` for ``(N, *input_shape)`` batches and the
    resolved ``mean=...;std=...`` text; one value or one per channel (axis 0)."""
    channels = input_shape[0]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise UsageError(
                f"--normalize: {name} has {len(values)} values but {where} has "
                f"{channels} channels; give 1 or {channels}"
            )
    bshape = (1, channels) + (1,) * (len(input_shape) - 1)
    mean_b = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).reshape(bshape)
    std_b = np.broadcast_to(np.asarray(std, np.float32), (channels,)).reshape(bshape)
    fmt = ",".join
    text = f"mean={fmt(f'{v:.6g}' for v in mean)};std={fmt(f'{v:.6g}' for v in std)}"
    return mean_b, std_b, text


def channel_stats(batches: Iterable[np.ndarray], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (float64 sums) over ``(N, C, ...)`` batches."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for x in batches:
        axes = (0, *range(2, x.ndim))
        x64 = x.astype(np.float64)
        total += x64.sum(axis=axes)
        total_sq += np.square(x64).sum(axis=axes)
        count += x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std == 0] = 1.0  # a constant channel is only shifted
    return mean.tolist(), std.tolist()
