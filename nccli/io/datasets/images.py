"""Image folders: ``DIR/<class>/*.png|jpg|...|npy`` or ``DIR/<split>/<class>/...``.

Classes are the sorted folder names; files are decoded per batch (Pillow, or
``np.load(allow_pickle=False)`` for ``.npy``), so a folder larger than memory still
works.  All images must share one size and type.  This is the fallback for any
directory that holds no CIFAR batches or IDX files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError
from nccli.io._util import one_line
from nccli.io.datasets.base import ArrayDataset
from nccli.io.datasets.request import SPLITS, DataRequest

__all__ = ["IMAGE_SUFFIXES", "ImageFiles", "find_image_folder", "open_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")


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
                arr = np.load(f, allow_pickle=False)
            else:
                with _pil(f).open(f) as image:
                    if self.mode is None:
                        gray = image.mode in ("1", "L", "I", "I;16", "F")
                        self.mode = "L" if gray else "RGB"
                    arr = np.asarray(image.convert(self.mode))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{f}: cannot read image ({one_line(exc)})") from exc
        return arr

    def read(self, idx: np.ndarray) -> np.ndarray:
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
