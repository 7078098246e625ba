"""Datasets known by name: scikit-learn's digits (bundled) and Fashion-MNIST (local IDX files).

Nothing is downloaded. Fashion-MNIST is looked for in the folder given as ``root`` (in
Python) or ``--data-root`` (on the command line), else under the folder named by the
environment variable :data:`DATA_ENV` (``BILEVEL_DATA``), else where the Debian package
``dataset-fashion-mnist`` installs it (:data:`FASHION_MNIST_ROOT`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ._base import DataError, ImageDataset, PathLike
from .arrays import load_arrays
from .idx import FASHION_MNIST_FILES, find_idx_files, load_idx_dataset

__all__ = ["DATASET_ALIASES", "DATA_ENV", "DIGITS_CLASSES", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_ROOT", "dataset_key", "load_digits", "load_fashion_mnist"]

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

#: The spellings of the named datasets -> their canonical name (see :func:`dataset_key`).
DATASET_ALIASES: dict[str, str] = {
    "digits": "digits",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
}


def dataset_key(name_or_path: PathLike) -> str | None:
    """The canonical name of a named dataset (``"fashion-mnist"`` -> ``"fashion_mnist"``).

    Returns ``None`` for anything else (a path). Used by
    :func:`~bilevel.datasets.load_dataset` and by ``bilevel distill``'s per-dataset presets,
    so every accepted spelling gets the same data and the same defaults.
    """
    return DATASET_ALIASES.get(os.fspath(name_or_path)) if isinstance(
        name_or_path, (str, os.PathLike)) else None


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

    Warns:
        UserWarning: when ``$BILEVEL_DATA`` is set but does not hold the files and the
            Debian package's copy is used instead (naming the folder and the missing files).

    Raises:
        DataError: when the files are not there (saying where it looked, how to install
            them and how to point to them), are malformed, or ``root`` is empty (``""``).
    """
    if root is not None and not os.fspath(root):
        raise DataError("root is empty: give the folder holding the Fashion-MNIST files "
                        "(--data-root DIR / root=), or leave it out")
    folders = _candidates(root)
    partial: tuple[Path, list[str]] | None = None
    env = os.environ.get(DATA_ENV) if root is None else None
    for folder in folders:
        found, missing = find_idx_files(folder)
        if not missing:
            if env and str(folder) == FASHION_MNIST_ROOT:
                where, lacking = partial or (env, list(FASHION_MNIST_FILES.values()))
                warnings.warn(
                    f"${DATA_ENV} is set to {env}, but it holds no Fashion-MNIST ({where} "
                    f"lacks {', '.join(lacking)}[.gz]; its fashion-mnist/ and fashion_mnist/ "
                    f"sub-folders were searched too); using the Debian package's copy in "
                    f"{FASHION_MNIST_ROOT}", UserWarning, stacklevel=2)
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
