"""Image folders: ``DIR/<class>/*.png|jpg|...|npy`` or ``DIR/<split>/<class>/...``.

Classes are the sorted folder names; files are decoded per batch (Pillow, or
``np.load(allow_pickle=False)`` for ``.npy``), so a folder larger than memory still
works.  All images must share one size and type.  This is the fallback for any
directory that holds no CIFAR batches or IDX files.

An image's size is read from its header before it is decoded: more than
:data:`MAX_IMAGE_PIXELS` pixels, or another size than the first image's, is refused
before any pixel is decoded (Pillow's own decompression-bomb warning becomes that
refusal), and a batch may hold at most :data:`MAX_BATCH_BYTES` of decoded pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.io._util import one_line
from nccli.io.datasets.base import ArrayDataset
from nccli.io.datasets.request import SPLITS, DataRequest

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_BATCH_BYTES",
    "MAX_IMAGE_PIXELS",
    "ImageFiles",
    "find_image_folder",
    "open_image_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")
#: the most pixels (height × width) of one image nccli decodes (8192 × 8192)
MAX_IMAGE_PIXELS = 1 << 26
#: the most bytes of decoded pixels one batch of images may hold
MAX_BATCH_BYTES = 1 << 32


class ImageFiles:
    """Image files decoded per batch (Pillow, or ``np.load`` for ``.npy``)."""

    def __init__(self, files: list[Path], root: Path) -> None:
        self.files = files
        self.root = root
        self.mode: str | None = None
        first = self._load(files[0])
        self.item_shape = first.shape
        self.shape = (len(files), *first.shape)
        self.dtype = first.dtype

    def _load(self, f: Path) -> np.ndarray:
        try:
            if f.suffix.lower() == ".npy":
                # memory-mapped first: numpy checks the header against the file's size
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
                chw = arr.ndim == 3 and arr.shape[-1] > 4  # (C, H, W): pixels are H × W
                self._check_size(f, arr.shape, _prod(arr.shape[1:] if chw else arr.shape[:2]))
                arr = np.array(arr)
            else:
                with self._open(f) as image:
                    self._check_size(f, image.size[::-1], _prod(image.size))
                    if self.mode is None:
                        gray = image.mode in ("1", "L", "I", "I;16", "F")
                        self.mode = "L" if gray else "RGB"
                    arr = np.asarray(image.convert(self.mode))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{f}: cannot read image ({one_line(exc)})") from exc
        return arr

    @staticmethod
    def _open(f: Path) -> Any:
        """``Image.open`` (lazy: the header only), Pillow's decompression-bomb warning made
        an error, so that it is refused in one line instead of printed."""
        image = _pil(f)
        with warnings.catch_warnings():
            warnings.simplefilter("error", image.DecompressionBombWarning)
            try:
                return image.open(f)
            except (image.DecompressionBombWarning, image.DecompressionBombError) as exc:
                raise DataError(
                    f"{f}: image is too large to decode ({one_line(exc)}); nccli decodes at "
                    f"most {MAX_IMAGE_PIXELS} pixels per image, resize it"
                ) from None

    def _check_size(self, f: Path, hw: tuple[int, ...], pixels: int) -> None:
        """Refuse an image by its header before decoding it: too many pixels, or another
        size than the first image (which would be refused after decoding anyway)."""
        if pixels > MAX_IMAGE_PIXELS:
            raise DataError(
                f"{f}: image is {'x'.join(map(str, hw))} = {pixels} pixels, more than nccli "
                f"decodes ({MAX_IMAGE_PIXELS}); resize it"
            )
        first = getattr(self, "item_shape", None)
        if first is not None and tuple(hw) != tuple(first[: len(hw)]):
            raise DataError(
                f"{f}: image is {'x'.join(map(str, hw))} but {self.files[0].name} is "
                f"{'x'.join(map(str, first[: len(hw)]))}; all images in {self.root} must share "
                "size and type (resize them first)"
            )

    def read(self, idx: np.ndarray) -> np.ndarray:
        item = self.dtype.itemsize * _prod(self.item_shape)
        if len(idx) * item > MAX_BATCH_BYTES:
            raise DataError(
                f"{self.files[0]}: a batch of {len(idx)} images of {self.item_shape} holds "
                f"{len(idx) * item} bytes, more than nccli decodes at once ({MAX_BATCH_BYTES}); "
                "use a smaller --batch-size or resize the images"
            )
        out = np.empty((len(idx), *self.item_shape), dtype=self.dtype)
        for j, i in enumerate(idx):
            arr = self._load(self.files[int(i)])
            if arr.shape != self.item_shape or arr.dtype != self.dtype:
                raise DataError(
                    f"{self.files[int(i)]}: image is {arr.shape} {arr.dtype} but "
                    f"{self.files[0].name} is {self.item_shape} {self.dtype}; all images in "
                    f"{self.root} must share size and type (resize them first)"
                )
            out[j] = arr
        return out


def _prod(shape: Any) -> int:
    return int(np.prod(tuple(shape), dtype=object))


def _pil(path: Path) -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            f"{path}: reading {path.suffix} images needs Pillow; pip install pillow (or store "
            "the images as .npy)"
        ) from exc
    return Image


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_image_folder(req: DataRequest) -> Path | None:
    """Any directory: the last directory format, whose opener says what is missing."""
    return req.path if req.is_dir else None


def open_image_folder(req: DataRequest, root: Path) -> ArrayDataset:
    split = req.split
    subdirs = _class_dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLITS and _class_dirs(d)]
    if split_dirs:
        chosen = next((d for d in split_dirs if d.name == split), None)
        if chosen is None:
            raise DataError(
                f"{root}: has no {split!r} split (found: {', '.join(d.name for d in split_dirs)})"
            )
        root, subdirs = chosen, _class_dirs(chosen)
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(subdirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(f)
                labels.append(k)
    if not files:
        raise DataError(
            f"{root}: no dataset found (no CIFAR batches, MNIST IDX files or "
            f"<class>/<image> folders with {', '.join(IMAGE_SUFFIXES)})"
        )
    if any(f.suffix.lower() != ".npy" for f in files):
        _pil(next(f for f in files if f.suffix.lower() != ".npy"))
    return ArrayDataset(
        spec=req.spec,
        kind="image-folder",
        where=str(root),
        source=ImageFiles(files, root),
        labels=np.asarray(labels, dtype=np.int64),
        split=split,
        class_names=[d.name for d in subdirs],
        **req.common,
    )
