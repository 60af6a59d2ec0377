"""The ``--data`` spec: parse it into a :class:`DataRequest` and dispatch through ``FORMATS``.

A spec is an existing path (file or directory), ``path:selector`` (two array names, or a
split such as ``DIR:test``), ``x.npy,y.npy`` or an import string ``pkg.module:factory``.
Which reader opens it is decided by :data:`nccli.io.datasets.formats.FORMATS`, not here.
A spec that is no existing path is imported only when it clearly is an import string
(:func:`~nccli.io.datasets.factory.factory_spec_problem`): ``cifar:test`` without a
``cifar/`` is "no such dataset", never ``./cifar.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nccli.errors import DataError
from nccli.io._util import IMPORT_SPEC, check_input_file
from nccli.io.datasets.base import ArrayDataset
from nccli.io.datasets.factory import factory_spec_problem
from nccli.io.datasets.formats import FORMATS
from nccli.io.datasets.request import SPLITS, DataRequest

__all__ = ["open_dataset", "request_for"]


def open_dataset(
    spec: str | Path,
    *,
    split: str = "train",
    limit: int | None = None,
    normalize: str | None = None,
    num_classes: int | None = None,
) -> ArrayDataset:
    """Open the dataset named by ``spec`` (see :mod:`nccli.io.datasets` for the formats).

    ``limit`` keeps that many samples, evenly spaced over the split; ``normalize`` is
    ``"mean=...;std=..."``, a preset or ``"auto"`` (per-channel statistics of the selected
    samples, one extra pass).  ``num_classes`` overrides the class count taken from the
    format's metadata or ``max(label) + 1``.  Errors are :class:`~nccli.errors.DataError`
    naming the file, or :class:`~nccli.errors.UsageError` for a malformed spec.
    """
    common = {"limit": limit, "normalize": normalize, "num_classes": num_classes}
    req = request_for(str(spec), split, common)
    for fmt in FORMATS:
        found = fmt.detect(req)
        if found is not None:
            return fmt.open(req, found)
    raise DataError(
        f"{req.path}: unrecognised dataset file; expected .npz, HDF5 ('file.h5:/x,/y'), a pair "
        "'x.npy,y.npy', a CIFAR/MNIST/image-folder directory or 'pkg.module:factory'"
    )


def request_for(text: str, split: str, common: dict[str, Any]) -> DataRequest:
    """Resolve the spec ``text``: raises ``DataError`` for a path that does not exist."""
    path, selector = _locate(text)
    if path is None or isinstance(path, tuple):
        return DataRequest(text, None, path, selector, split, b"", common)
    if selector and (path.is_dir() or ("," not in selector and selector in SPLITS)):
        split, selector = selector, None  # DIR:test, data.npz:test
    magic = b""
    if not path.is_dir():
        check_input_file(path, "dataset")  # a FIFO would hang this very read
        with path.open("rb") as f:
            magic = f.read(8)
    return DataRequest(text, path, None, selector, split, magic, common)


def _locate(text: str) -> tuple[Path | tuple[Path, Path] | None, str | None]:
    """Split a spec into (path or npy pair or None for an import string, selector)."""
    if Path(text).exists():
        return Path(text), None
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().lower().endswith(".npy") for p in parts):
        pair = (Path(parts[0].strip()), Path(parts[1].strip()))
        for p in pair:
            if not p.exists():
                raise DataError(f"{p}: no such file; check the path")
        return pair, None
    if ":" in text:
        head, _, sel = text.rpartition(":")
        if Path(head).exists():
            return Path(head), sel.strip() or None
        if IMPORT_SPEC.match(text):
            why = factory_spec_problem(text)
            if why is None:
                return None, None
            raise DataError(
                f"no such dataset {head}: no file or directory of that name ({why}); check the path"
            )
        raise DataError(f"{head}: no such file or directory; check the path")
    raise DataError(f"{text}: no such file or directory; check the path")
