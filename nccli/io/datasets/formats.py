"""The dataset formats, in the order :func:`~nccli.io.datasets.spec.open_dataset` tries them.

To add a format, write its detector and opener (see
:class:`~nccli.io.datasets.request.DatasetFormat`) in a module of this package and add one
row to :data:`FORMATS`.  Order matters only where detectors overlap: the image folder
accepts any directory, so it stays after the other directory formats.
"""

from __future__ import annotations

from nccli.io.datasets.arrays import (
    find_hdf5,
    find_npy,
    find_npy_pair,
    find_npz,
    open_hdf5,
    open_npy_pair,
    open_npz,
    refuse_single_npy,
)
from nccli.io.datasets.cifar import find_cifar, open_cifar
from nccli.io.datasets.factory import find_factory, open_factory
from nccli.io.datasets.idx import find_idx, open_idx
from nccli.io.datasets.images import find_image_folder, open_image_folder
from nccli.io.datasets.request import DatasetFormat

__all__ = ["FORMATS"]

FORMATS: tuple[DatasetFormat, ...] = (
    # spec strings that are not a path
    DatasetFormat("torch", find_factory, open_factory),
    DatasetFormat("npy", find_npy_pair, open_npy_pair),
    # files, told apart by their first bytes
    DatasetFormat("hdf5", find_hdf5, open_hdf5),
    DatasetFormat("npz", find_npz, open_npz),
    DatasetFormat("single-npy", find_npy, refuse_single_npy),
    # directories
    DatasetFormat("cifar", find_cifar, open_cifar),
    DatasetFormat("mnist-idx", find_idx, open_idx),
    DatasetFormat("image-folder", find_image_folder, open_image_folder),
)
