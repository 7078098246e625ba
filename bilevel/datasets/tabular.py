"""scikit-learn's bundled tabular datasets, split train/validation/test by class.

``bilevel run`` reads ``digits`` (64 pixel features), ``breast_cancer``, ``iris`` and
``wine`` through :func:`load_tabular`; :func:`stratified_split` splits any ``(X, y)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._base import DataError, stratified_indices

__all__ = ["SPLITS", "TABULAR_DATASETS", "Splits", "load_tabular", "stratified_split"]

#: The scikit-learn datasets :func:`load_tabular` reads (``sklearn.datasets.load_<name>``).
TABULAR_DATASETS = ("digits", "breast_cancer", "iris", "wine")
#: The three parts of a split, in order.
SPLITS = ("train", "val", "test")

#: ``{"train": (X, y), "val": (X, y), "test": (X, y)}``
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]


def stratified_split(x: Any, y: Any, train: float, val: float, seed: int = 0,
                     name: str = "data") -> Splits:
    """Split ``(x, y)`` into train, validation and test parts with the classes spread evenly.

    The parts have ``int(train * N)``, ``int(val * N)`` and the remaining examples; each
    class's share of every part matches its share of the whole within one example
    (:func:`~bilevel.datasets.stratified_indices`). The split depends only on ``seed``
    and ``y``.

    Args:
        x: ``(N, ...)`` inputs (tensor or array; kept in their dtype).
        y: ``(N,)`` integer labels in ``[0, num_classes)``.
        train, val: fractions in ``(0, 1)`` with ``train + val < 1``; the test part is the rest.
        seed: the seed of the split.
        name: the data's name, for error messages.

    Returns:
        ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with ``int64`` labels.

    Raises:
        DataError: naming ``name``: labels that are not 1-D integers or are negative, a count
            mismatch, bad fractions, an empty part, or fewer than two classes in the
            training part.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{name}: labels must be 1-D integers, got {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    if x.shape[:1] != y.shape:
        raise DataError(f"{name}: {x.shape[0] if x.dim() else 0} inputs but {len(y)} labels")
    if not (0 < train < 1 and 0 < val < 1 and train + val < 1):
        raise DataError(f"{name}: train and val must be fractions in (0, 1) with train + val "
                        f"< 1, got {train!r}, {val!r}")
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{name}: labels lie in [{int(y.min())}, {int(y.max())}], expected "
                        f"[0, {int(y.max())}] (non-negative class numbers)")
    n = len(y)
    sizes = [int(train * n), int(val * n)]
    sizes.append(n - sum(sizes))
    for part, size in zip(SPLITS, sizes, strict=True):
        if size == 0:
            raise DataError(f"{name}: the {part} part is empty ({n} examples split "
                            f"{train:g}/{val:g}/rest); use more data or larger fractions")
    parts = stratified_indices(y, sizes, seed)
    out = {part: (x[idx], y[idx]) for part, idx in zip(SPLITS, parts, strict=True)}
    present = torch.unique(out["train"][1]).tolist()
    if len(present) < 2:
        raise DataError(f"{name}: the training part holds only class {present[0]}; a "
                        f"classifier needs at least two classes")
    return out


def load_tabular(name: str, train: float = 0.5, val: float = 0.25, seed: int = 0) -> Splits:
    """A scikit-learn bundled dataset (no download), split by :func:`stratified_split`.

    Args:
        name: one of :data:`TABULAR_DATASETS` (``sklearn.datasets.load_<name>``).
        train, val: fractions of the whole; the test part is the rest.
        seed: the seed of the split.

    Returns:
        ``{"train": (X, y), "val": (X, y), "test": (X, y)}``: ``float64`` features
        ``(N, features)`` as scikit-learn gives them (``digits``: 64 pixels, 0..16) and
        ``int64`` labels.

    Raises:
        DataError: for an unknown name or a split :func:`stratified_split` refuses.
    """
    if name not in TABULAR_DATASETS:
        raise DataError(f"unknown tabular dataset {name!r}: expected one of "
                        f"{', '.join(TABULAR_DATASETS)}")
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return stratified_split(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64),
                            train, val, seed, name=name)
