"""Datasets known by name: scikit-learn's digits (bundled) and Fashion-MNIST (local IDX files).

Nothing is downloaded. Fashion-MNIST is looked for in the folder given as ``root`` (in
Python) or ``--data-root`` (on the command line), else under the folder named by the
environment variable :data:`DATA_ENV` (``BILEVEL_DATA``), else where the Debian package
``dataset-fashion-mnist`` installs it (:data:`FASHION_MNIST_ROOT`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._base import DataError, ImageDataset, PathLike
from .arrays import load_arrays
from .idx import FASHION_MNIST_FILES, find_idx_files, load_idx_dataset

__all__ = ["DATA_ENV", "DIGITS_CLASSES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT",
           "load_digits", "load_fashion_mnist"]

#: Default install location of the Debian package ``dataset-fashion-mnist``.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: The environment variable naming a folder searched for named datasets
#: (``$BILEVEL_DATA/fashion-mnist/`` or the folder itself).
DATA_ENV = "BILEVEL_DATA"
#: The ten Fashion-MNIST classes, by label.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
#: The ten digits classes, by label.
DIGITS_CLASSES = tuple(str(d) for d in range(10))

#: Sub-folders of a data root that may hold Fashion-MNIST.
_FASHION_FOLDERS = ("fashion-mnist", "fashion_mnist")


def load_digits(test_size: int = 360, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (no download) as an :class:`ImageDataset`.

    1797 grayscale 8x8 images, 10 classes named ``"0"`` .. ``"9"``; pixel values 0..16 are
    divided by 16, giving ``(N, 1, 8, 8)`` ``float32`` images in ``[0, 1]``. The split is a
    fixed, seeded, stratified one (``sklearn.model_selection.train_test_split`` with
    ``stratify=y`` and ``random_state=seed``): by default 1437 training and 360 test images,
    the same on every call and every machine.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return load_arrays(tr_x, tr_y, te_x, te_y, name="digits", num_classes=10, pixel_max=16.0,
                       class_names=DIGITS_CLASSES)


def _candidates(root: PathLike | None) -> list[Path]:
    """The folders that may hold Fashion-MNIST, in the order they are searched."""
    if root is not None:
        bases = [Path(root)]
    else:
        env = os.environ.get(DATA_ENV)
        bases = [Path(env)] if env else []
    folders = [f for b in bases for f in (b, *(b / sub for sub in _FASHION_FOLDERS))]
    return folders if root is not None else [*folders, Path(FASHION_MNIST_ROOT)]


def load_fashion_mnist(root: PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from its four IDX files on local disk (never downloaded).

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each plain or with ``.gz``)
    in ``root`` or its sub-folder ``fashion-mnist/`` (or ``fashion_mnist/``). Without
    ``root``: in ``$BILEVEL_DATA`` and its sub-folders the same way, then in
    :data:`FASHION_MNIST_ROOT`, where the Debian package ``dataset-fashion-mnist`` installs
    them. Returns 60000/10000 ``(N, 1, 28, 28)`` images in ``[0, 1]``, 10 classes named as
    in :data:`FASHION_MNIST_CLASSES` (for the real data).

    Raises:
        DataError: when the files are not there (saying where it looked, how to install
            them and how to point to them) or are malformed.
    """
    folders = _candidates(root)
    partial: tuple[Path, list[str]] | None = None
    for folder in folders:
        found, missing = find_idx_files(folder)
        if not missing:
            return load_idx_dataset(**found, name="fashion_mnist", num_classes=10,
                                    class_names=FASHION_MNIST_CLASSES)
        if found and partial is None:
            partial = (folder, missing)
    where, missing = partial or (folders[0], list(FASHION_MNIST_FILES.values()))
    others = [str(f) for f in folders if f != where]
    looked = f" (also looked in {', '.join(others)})" if others else ""
    raise DataError(
        f"Fashion-MNIST not found in {where}{looked}: missing {', '.join(missing)}[.gz]. "
        f"Install the Debian package dataset-fashion-mnist (apt-get install "
        f"dataset-fashion-mnist), or give the folder holding the IDX files with "
        f"--data-root DIR (bilevel run / bilevel distill), root= (Python) or the "
        f"{DATA_ENV} environment variable"
    )
