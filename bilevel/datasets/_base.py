"""The dataset container, the data error and the stratified split every loader shares."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

__all__ = ["DataError", "ImageDataset", "PathLike", "stratified_indices"]

PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A dataset file or array is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image classification dataset with a train and a test split.

    Attributes:
        train_x: ``float32`` images in ``[0, 1]``, shape ``(N_train, C, H, W)``.
        train_y: ``int64`` labels in ``[0, num_classes)``, shape ``(N_train,)``.
        test_x: ``float32`` images in ``[0, 1]``, shape ``(N_test, C, H, W)``.
        test_y: ``int64`` labels in ``[0, num_classes)``, shape ``(N_test,)``.
        num_classes: number of classes.
        name: a human-readable name (used in logs).
        class_names: one name per class (``len == num_classes``), shown in tables and
            plots; empty when the data does not name its classes (then ``"0"``, ``"1"``...).

    Instances are built by the loaders of :mod:`bilevel.datasets`, which validate their
    inputs; the constructor itself only checks ``class_names`` (not the tensors).

    Raises:
        DataError: if ``class_names`` is not empty and does not hold ``num_classes`` strings.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(
                isinstance(n, str) for n in names):
            raise DataError(f"{self.name}: class_names must be a sequence of strings, got "
                            f"{names!r}")
        if names and len(names) != self.num_classes:
            raise DataError(f"{self.name}: {len(names)} class names for {self.num_classes} "
                            f"classes (class_names={list(names)})")
        object.__setattr__(self, "class_names", tuple(names))

    def class_name(self, label: int) -> str:
        """The name of class ``label`` (its number when the data names no classes)."""
        return self.class_names[label] if self.class_names else str(label)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_channels(self) -> int:
        """Number of image channels ``C``."""
        return int(self.train_x.shape[1])

    def to(self, device: torch.device | str) -> ImageDataset:
        """Return a copy with all four tensors moved to ``device`` (class names kept)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> ImageDataset:
        """Hold out a stratified part of the *training* split as validation data.

        Returns a new dataset whose ``train_*`` is the remaining training data and whose
        ``test_*`` is the held-out validation part (so the real test set stays unseen, e.g.
        for hyperparameter selection); the class names are kept. Per class,
        ``round(fraction * n_class)`` examples are held out (at least one, and at least one
        is kept, for classes with two or more examples). The result depends only on
        ``seed`` and the data.

        Raises:
            ValueError: if ``fraction`` is not in ``(0, 1)``.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        gen = torch.Generator().manual_seed(int(seed))
        labels = self.train_y.cpu()
        val_parts: list[torch.Tensor] = []
        for cls in range(self.num_classes):
            idx = torch.nonzero(labels == cls, as_tuple=False).flatten()
            n = int(idx.numel())
            if n < 2:
                continue
            k = min(max(int(round(fraction * n)), 1), n - 1)
            perm = idx[torch.randperm(n, generator=gen)]
            val_parts.append(perm[:k])
        if not val_parts:
            raise ValueError(f"{self.name}: no class has two or more training examples")
        mask = torch.zeros(labels.numel(), dtype=torch.bool)
        mask[torch.cat(val_parts)] = True
        mask = mask.to(self.train_y.device)
        return dataclasses.replace(
            self,
            train_x=self.train_x[~mask],
            train_y=self.train_y[~mask],
            test_x=self.train_x[mask],
            test_y=self.train_y[mask],
            name=f"{self.name}[val={fraction:g},seed={seed}]",
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, num_classes={self.num_classes}, "
            f"image_shape={tuple(self.train_x.shape[1:])}, train={len(self.train_y)}, "
            f"test={len(self.test_y)})"
        )


def stratified_indices(labels: torch.Tensor, sizes: Sequence[int],
                       seed: int = 0) -> list[torch.Tensor]:
    """Split ``range(len(labels))`` into consecutive parts of the given ``sizes``, stratified.

    Every class is spread evenly over the parts: within each class the examples are shuffled
    (by ``seed``) and example ``r`` of ``n`` in its class gets the position ``(r + 0.5) / n``;
    sorting all examples by position (ties in a seeded random order) and cutting the order
    into ``sizes`` gives each part ``size * n / N`` examples of every class, within one.

    Args:
        labels: ``(N,)`` integer class labels (any values; each distinct value is a class).
        sizes: the number of examples of each part; they must sum to ``N``.
        seed: the seed of the shuffles; the result depends only on it and ``labels``.

    Returns:
        one ``int64`` index tensor per part, in the order of ``sizes``.

    Raises:
        ValueError: if ``labels`` is not 1-D or ``sizes`` do not sum to ``N``.
    """
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n = labels.numel()
    if any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"sizes {list(sizes)} must be non-negative and sum to {n}")
    gen = torch.Generator().manual_seed(int(seed))
    position = torch.empty(n, dtype=torch.float64)
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls, as_tuple=False).flatten()
        shuffled = idx[torch.randperm(idx.numel(), generator=gen)]
        ranks = torch.arange(idx.numel(), dtype=torch.float64)
        position[shuffled] = (ranks + 0.5) / idx.numel()
    tie_break = torch.randperm(n, generator=gen)
    order = tie_break[torch.sort(position[tie_break], stable=True).indices]
    return list(torch.split(order, list(sizes)))
