"""The old location of the dataset loaders, kept for backwards compatibility.

The loaders now live in the package :mod:`bilevel.datasets` (``_base.py``, ``idx.py``,
``arrays.py``, ``folder.py``, ``named.py``, ``tabular.py``, ``adapter.py``); this module
re-exports everything it used to export, so ``from bilevel.data import load_digits`` keeps
working. New code should import from :mod:`bilevel.datasets`.
"""

from __future__ import annotations

from .datasets import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_ROOT,
    IDX_TYPES,
    IMAGE_SUFFIXES,
    DataError,
    ImageDataset,
    PathLike,
    load_arrays,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    load_image_folder,
    read_idx,
)

__all__ = [
    "DataError",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_ROOT",
    "IDX_TYPES",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "PathLike",
    "load_arrays",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_image_folder",
    "read_idx",
]
