"""Datasets from local disk or installed packages; nothing is ever downloaded.

* :class:`ImageDataset` -- a small frozen container: ``train_x, train_y, test_x, test_y``
  (images ``float32`` in ``[0, 1]`` shaped ``(N, C, H, W)``, labels ``int64``),
  ``num_classes``, ``name`` and ``class_names`` (``_base.py``).
* :func:`read_idx`, :func:`load_idx_dataset` -- the IDX format of MNIST-style files, plain
  or gzip (``idx.py``).
* :func:`load_arrays`, :func:`load_npz` -- NumPy arrays and ``.npz`` files, validated;
  channels-last images are detected and transposed (``arrays.py``).
* :func:`load_image_folder` -- PNG/JPEG files, ``root/{train,test}/<class>/*`` (``folder.py``).
* :func:`load_digits`, :func:`load_fashion_mnist` -- named datasets (``named.py``).
* :func:`load_tabular`, :func:`stratified_split` -- scikit-learn's tabular sets split
  train/validation/test by class, as ``bilevel run`` uses them (``tabular.py``).
* :func:`from_torch_dataset` -- any ``torch.utils.data.Dataset`` of ``(image, label)``
  pairs (``adapter.py``).
* :func:`load_dataset` -- dispatch on a name, a directory of IDX files, an image folder or
  an ``.npz`` file.

Every problem with the data is reported at load time as a :class:`DataError` (a
:class:`ValueError`) naming the file or the array at fault: malformed files, empty splits,
labels out of range, a training split with fewer than two classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._base import DataError, ImageDataset, PathLike, stratified_indices
from .adapter import from_torch_dataset
from .arrays import load_arrays, load_npz
from .folder import IMAGE_SUFFIXES, load_image_folder
from .idx import FASHION_MNIST_FILES, IDX_TYPES, find_idx_files, load_idx_dataset, read_idx
from .named import (
    DATA_ENV,
    DATASET_ALIASES,
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    dataset_key,
    load_digits,
    load_fashion_mnist,
)
from .tabular import TABULAR_DATASETS, load_tabular, stratified_split

__all__ = [
    "DATASET_ALIASES",
    "DATA_ENV",
    "DIGITS_CLASSES",
    "DataError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_ROOT",
    "IDX_TYPES",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "NAMED_DATASETS",
    "PathLike",
    "TABULAR_DATASETS",
    "dataset_key",
    "find_idx_files",
    "from_torch_dataset",
    "load_arrays",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_image_folder",
    "load_npz",
    "load_tabular",
    "read_idx",
    "stratified_indices",
    "stratified_split",
]

#: The names :func:`load_dataset` knows (other strings are paths); :func:`dataset_key`
#: maps each to its canonical name.
NAMED_DATASETS = tuple(DATASET_ALIASES)


def load_dataset(name_or_path: PathLike, root: PathLike | None = None,
                 **kw: Any) -> ImageDataset:
    """Load an image dataset by name or path.

    * ``"digits"`` -> :func:`load_digits` (``kw``: ``test_size``, ``seed``; bundled with
      scikit-learn, so a ``root`` is refused);
    * ``"fashion_mnist"`` / ``"fashion-mnist"`` / ``"fashionmnist"`` (:func:`dataset_key`)
      -> :func:`load_fashion_mnist`, looking in
      ``root`` (or ``root/fashion-mnist/``) when given, else in ``$BILEVEL_DATA`` and the
      Debian package's folder;
    * a directory with ``train/`` and ``test/`` subfolders -> :func:`load_image_folder`
      (``kw``: ``num_classes``, ``grayscale``);
    * any other directory, holding the four standard-named IDX files (see
      :data:`FASHION_MNIST_FILES`, plain or ``.gz``) -> :func:`load_idx_dataset` (``kw``:
      ``num_classes``, ``pixel_max``, ``channels_last``);
    * an ``.npz`` file (suffix in any case) with arrays ``train_x, train_y, test_x,
      test_y`` (and optionally ``class_names``) -> :func:`load_npz` (``kw``:
      ``num_classes``, ``pixel_max``, ``channels_last``).

    The dataset's name is the given name, or the directory / file stem.

    Args:
        name_or_path: a name above or a path.
        root: the folder holding a named dataset's files (the ``--data-root`` of the
            command line); only for ``fashion_mnist``. An empty one (``""``) is refused.

    Raises:
        DataError: for an unknown or empty name, a missing path, ``root`` given with a path
            or with ``digits``, an empty ``root``, or malformed data.
        TypeError: for keyword arguments the chosen loader does not take.
    """
    key = dataset_key(name_or_path)
    if root is not None and not os.fspath(root):
        raise DataError("root is empty (--data-root ''): give the folder holding the "
                        "dataset's files, or leave it out")
    if key == "digits":
        if root is not None:
            raise DataError(f"digits ships with scikit-learn; root= (--data-root) is for "
                            f"fashion_mnist, got root={os.fspath(root)!r}")
        return load_digits(**kw)
    if key == "fashion_mnist":
        return load_fashion_mnist(root, **kw)
    if not os.fspath(name_or_path):
        raise DataError("empty dataset name: expected 'digits', 'fashion_mnist' or a path")
    path = Path(name_or_path)
    if root is not None:
        raise DataError(f"{path}: a data root ({root}) is only used by the named datasets "
                        f"(fashion_mnist); give the dataset's full path instead")
    if path.is_dir():
        has_train, has_test = (path / "train").is_dir(), (path / "test").is_dir()
        if has_train and has_test:
            return load_image_folder(path, **kw)
        found, missing = find_idx_files(path)
        if missing and (has_train or has_test):
            lacking = "test" if has_train else "train"
            raise DataError(f"{path}: looks like an image folder but has no {lacking}/ "
                            f"subfolder (so it is not an image folder with train/ and test/ "
                            f"subfolders; expected {path}/train/<class>/*.png and "
                            f"{path}/test/<class>/*.png)")
        if missing:
            raise DataError(f"{path}: directory lacks the IDX file {missing[0]}[.gz] (and is "
                            f"not an image folder with train/ and test/ subfolders)")
        return load_idx_dataset(**found, name=path.name or str(path), **kw)
    if path.suffix.lower() == ".npz":
        return load_npz(path, **kw)
    raise DataError(
        f"unknown dataset {os.fspath(name_or_path)!r}: expected 'digits', 'fashion_mnist', a "
        f"directory of IDX files, an image folder (train/ and test/ of class folders) or an "
        f".npz file"
    )
