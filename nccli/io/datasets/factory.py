"""``pkg.module:factory``: a map-style torch Dataset of ``(x, y)`` items from user code.

``factory`` may be a function, a Dataset class or a Dataset instance; a callable gets
``split=`` when its signature accepts it.  Items are read one by one (``__getitem__``);
labels come from ``targets``/``labels`` when the dataset has them, else from the items.

Importing runs code, so a spec is only imported when it clearly is an import string
(:func:`factory_spec_problem`): ``cifar:test`` (a missing ``cifar/`` and a split) or
``data.npz:x`` (a missing file and a member) is a path that does not exist, never a
``cifar.py`` or ``data/`` package from the working directory.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from nccli.errors import DataError, NCError
from nccli.io._util import IMPORT_SPEC, import_object, one_line
from nccli.io.datasets.base import ArrayDataset
from nccli.io.datasets.request import SPLITS, DataRequest

__all__ = ["TorchItems", "factory_spec_problem", "find_factory", "open_factory"]

#: after the colon these name a split (or a subset), never a factory attribute
SPLIT_WORDS = frozenset(
    (*SPLITS, "training", "testing", "eval", "evaluation", "dev", "all", "full", "extra")
)
#: a module path with one of these parts is a data file name, never a module (only
#: suffixes no Python module is named after: ``csv``, ``json`` or ``bin`` may be modules)
DATA_SUFFIXES = frozenset(
    "npz npy h5 hdf5 he5 pt pth pt2 ckpt safetensors pkl idx ubyte gz tgz bz2 xz png jpg "
    "jpeg bmp gif tif tiff webp".split()
)


def factory_spec_problem(spec: str) -> str | None:
    """Why ``spec`` is not clearly an import string ``pkg.module:factory`` (``None``: it is).

    It must have the import grammar, its attribute must not be a split name (``cifar:test``
    means the folder ``cifar``, ``train``/``test``/``val``/... are never imported) and its
    module path must not hold a data-file suffix (``data.npz:x`` is a file).
    """
    if not IMPORT_SPEC.match(spec):
        return "it is not an import string 'pkg.module:factory'"
    module, _, attr = spec.partition(":")
    if attr.lower() in SPLIT_WORDS:
        return f"':{attr}' names a split, so it is not imported as 'module:factory'"
    if any(part.lower() in DATA_SUFFIXES for part in module.split(".")[1:]):
        return f"{module!r} is a file name, so it is not imported as a module"
    return None


class TorchItems:
    """A map-style torch Dataset of ``(x, y)`` items, read item by item."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset = dataset
        self.where = where
        first = self.item(0)[0]
        self.item_shape = first.shape
        self.shape = (len(dataset), *first.shape)
        self.dtype = first.dtype

    def item(self, i: int) -> tuple[np.ndarray, Any]:
        try:
            entry = self.dataset[i]
        except (NCError, MemoryError):
            raise
        except Exception as exc:  # user code: one line naming the spec and the item
            raise DataError(
                f"{self.where}: reading item {i} failed with {type(exc).__name__}: "
                f"{one_line(exc)}; run with --debug for the traceback"
            ) from exc
        if not isinstance(entry, (tuple, list)) or len(entry) < 2:
            raise DataError(
                f"{self.where}: item {i} is a {type(entry).__name__}; the dataset must yield "
                "(x, y) pairs"
            )
        x = entry[0]
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.asarray(x), entry[1]

    def labels(self) -> np.ndarray:
        for attr in ("targets", "labels"):
            value = getattr(self.dataset, attr, None)
            if value is not None and len(value) == self.shape[0]:
                if isinstance(value, torch.Tensor):
                    value = value.cpu().numpy()
                return np.asarray(value)
        ys = [self.item(i)[1] for i in range(self.shape[0])]
        return np.asarray([y.item() if isinstance(y, torch.Tensor) else y for y in ys])

    def read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.item_shape), dtype=self.dtype)
        for j, i in enumerate(idx):
            x = self.item(int(i))[0]
            if x.shape != self.item_shape:
                raise DataError(
                    f"{self.where}: item {int(i)} has shape {x.shape}, item 0 has "
                    f"{self.item_shape}; all inputs must share one shape"
                )
            out[j] = x
        return out


def find_factory(req: DataRequest) -> str | None:
    """An import string: the spec named neither a path nor a ``.npy`` pair, and it clearly
    is one (:func:`factory_spec_problem`)."""
    if req.path is not None or req.pair is not None:
        return None
    return req.spec if factory_spec_problem(req.spec) is None else None


def open_factory(req: DataRequest, spec: str) -> ArrayDataset:
    obj = import_object(spec, flag="--data")
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__getitem__")):
        try:
            params = inspect.signature(obj).parameters
            takes_split = "split" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):
            takes_split = False
        try:
            obj = obj(split=req.split) if takes_split else obj()
        except NCError:
            raise
        except Exception as exc:
            raise DataError(
                f"{spec}: the dataset factory failed with {type(exc).__name__}: "
                f"{one_line(exc)}; run with --debug for the traceback"
            ) from exc
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise DataError(
            f"{spec}: returned a {type(obj).__name__}, not a map-style Dataset with "
            "__len__ and __getitem__"
        )
    if len(obj) == 0:
        raise DataError(f"{spec}: the dataset is empty")
    source = TorchItems(obj, spec)
    names = getattr(obj, "classes", None)
    return ArrayDataset(
        spec=spec,
        kind="torch",
        where=spec,
        source=source,
        labels=source.labels(),
        split=req.split,
        class_names=[str(c) for c in names] if isinstance(names, (list, tuple)) else None,
        **req.common,
    )
