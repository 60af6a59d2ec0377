"""The contract between :func:`~nccli.io.datasets.spec.open_dataset` and the formats.

``open_dataset`` resolves a ``--data`` spec once into a :class:`DataRequest` (path, ``.npy``
pair or import string, selector, split, the file's first bytes), so detectors stay cheap
predicates and no format re-parses the spec.  A :class:`DatasetFormat` is a detector and
an opener; :data:`nccli.io.datasets.formats.FORMATS` lists them in the order tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nccli.io.datasets.base import ArrayDataset

__all__ = ["SPLITS", "DataRequest", "DatasetFormat"]

#: split names: a selector that is one of these picks the split (``DIR:test``)
SPLITS = ("train", "test", "val", "valid", "validation")


@dataclass(frozen=True)
class DataRequest:
    """A located spec.

    ``path`` is the file or directory (``None`` for a ``.npy`` pair or an import string),
    ``pair`` the two ``.npy`` files, ``selector`` what follows the last ``:`` when it is not
    the split, ``magic`` the first 8 bytes of a file (``b""`` otherwise) and ``common`` the
    keyword arguments every :class:`~nccli.io.datasets.base.ArrayDataset` gets (``limit``,
    ``normalize``, ``num_classes``).
    """

    spec: str
    path: Path | None
    pair: tuple[Path, Path] | None
    selector: str | None
    split: str
    magic: bytes
    common: dict[str, Any]

    @property
    def is_dir(self) -> bool:
        return self.path is not None and self.path.is_dir()

    @property
    def is_file(self) -> bool:
        return self.path is not None and not self.path.is_dir()


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format: ``detect(request)`` returns what to open (the file, the folder
    holding the data, the ``.npy`` pair, the import string) or ``None`` when the request is
    not this format, without raising; ``open(request, found)`` reads it into an
    :class:`~nccli.io.datasets.base.ArrayDataset` or raises a ``DataError`` naming the file.
    """

    name: str
    detect: Callable[[DataRequest], Any]
    open: Callable[[DataRequest, Any], ArrayDataset]
