"""Every dataset format → batches of ``(x float32, y int64, indices)``, in a fixed order.

:func:`open_dataset` reads a spec string and returns an :class:`ArrayDataset`:

- ``data.npz``: arrays ``x``/``y`` (also ``X``/``y``, ``images``/``labels``,
  ``data``/``targets``, ``data``/``labels``, ``features``/``labels``); ``x_test``/``y_test``
  for a split; ``data.npz:xkey,ykey`` names them.  Uncompressed members are memory-mapped.
- ``x.npy,y.npy``: two arrays, memory-mapped.
- ``file.h5:/x,/y``: two HDF5 datasets, sliced lazily (keys found as for npz when the
  selector is left out).
- a directory with ``data_batch_*``/``test_batch``: CIFAR-10 python batches; with
  ``train``/``test``/``meta`` files: CIFAR-100 (fine labels).  ``cifar-10-batches-py`` and
  ``cifar-100-python`` subfolders are found.
- a directory with ``train-images-idx3-ubyte[.gz]`` etc. (or ``raw/``, ``*/raw/``): MNIST
  or Fashion-MNIST IDX files, ``t10k-*`` for ``test``.
- ``DIR/<class>/*.png|jpg|...|npy`` (or ``DIR/<split>/<class>/...``): an image folder;
  classes are the sorted folder names.  Needs Pillow for anything but ``.npy``.
- ``pkg.module:factory``: a map-style torch Dataset of ``(x, y)``; ``factory`` gets
  ``split=`` when it accepts it (a Dataset class or instance works too).

``DIR:test`` (and ``file.npz:test``) picks the split, overriding ``split``.  CIFAR batches are
unpickled with an allow-list (dicts, lists, bytes, str and numpy arrays only); anything
else is refused.  ``uint8`` inputs are images: they are scaled to [0, 1], ``(H, W)``
becomes ``(1, H, W)`` and ``(H, W, C)`` becomes ``(C, H, W)``.  Other dtypes are cast to
float32 as they are.  Image data (``uint8``, or values all in [0, 255] above 10) need an
explicit ``normalize`` for ``extract`` (:meth:`ArrayDataset.require_normalize`).  Labels are checked once at open (integer, >= 0, one per input);
inputs are checked for NaN/inf batch by batch.

Modules: :mod:`.base` (the dataset, batching, label checks), :mod:`.preprocess` (layout,
scaling, normalisation), :mod:`.arrays`, :mod:`.cifar`, :mod:`.idx`, :mod:`.images`,
:mod:`.factory` (one family of formats each), :mod:`.request` (what a spec resolves to),
:mod:`.formats` (the ordered table of formats: add a new one there) and :mod:`.spec`
(parsing the spec and dispatching through the table).
"""

from __future__ import annotations

from nccli.io.datasets.arrays import KEY_PAIRS
from nccli.io.datasets.base import ArrayDataset
from nccli.io.datasets.formats import FORMATS
from nccli.io.datasets.images import IMAGE_SUFFIXES
from nccli.io.datasets.preprocess import NORMALIZE_PRESETS, parse_normalize
from nccli.io.datasets.request import DataRequest, DatasetFormat
from nccli.io.datasets.spec import open_dataset

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "KEY_PAIRS",
    "NORMALIZE_PRESETS",
    "ArrayDataset",
    "DataRequest",
    "DatasetFormat",
    "open_dataset",
    "parse_normalize",
]
