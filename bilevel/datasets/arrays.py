"""Datasets from NumPy arrays and ``.npz`` files, and the validation every loader goes through.

:func:`build` turns four arrays into an :class:`~bilevel.datasets.ImageDataset` or raises a
:class:`~bilevel.datasets.DataError` naming the file (or array) and the problem: wrong
shapes or dtypes, an empty image dimension, an image layout it cannot tell, pixel values
outside ``[0, 1]`` after scaling, a count mismatch, an empty split, labels out of range, a
training split with fewer than two classes or missing a class, class names that do not
match the number of classes.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ._base import DataError, ImageDataset, PathLike

__all__ = ["CHANNELS", "NPZ_KEYS", "build", "load_arrays", "load_npz"]

#: The channel counts recognised when telling ``(N, H, W, C)`` from ``(N, C, H, W)``
#: (``channels_last=True`` accepts up to ``max(CHANNELS)``).
CHANNELS = (1, 3, 4)
#: The arrays an ``.npz`` dataset must hold (``class_names`` is optional).
NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _check_channels_last(channels_last: object, name: str) -> None:
    """Refuse a ``channels_last`` that is not ``True``, ``False`` or ``None``."""
    if channels_last is not None and not isinstance(channels_last, (bool, np.bool_)):
        raise DataError(f"{name}: channels_last must be True, False or None (detect), got "
                        f"{channels_last!r}")


def _channels_first(arr: np.ndarray, what: str, channels_last: bool | None) -> np.ndarray:
    """A 4-D image array as ``(N, C, H, W)``: ``channels_last=None`` detects the layout.

    Raises:
        DataError: for ``channels_last=True`` when the last axis is no channel count, and
            when detection reads more than 4 channels while the last axis could be the
            channels (``(N, 28, 28, 2)``): the layout must then be given.
    """
    detect = channels_last is None
    if detect:
        channels_last = arr.shape[3] in CHANNELS and arr.shape[1] > max(CHANNELS)
    if channels_last:
        if arr.shape[3] > max(CHANNELS):
            raise DataError(f"{what}: channels_last=True but the last axis of images shaped "
                            f"{arr.shape} has {arr.shape[3]} entries, expected at most "
                            f"{max(CHANNELS)} channels")
        return arr.transpose(0, 3, 1, 2)
    if detect and arr.shape[1] > max(CHANNELS) and arr.shape[3] <= max(CHANNELS):
        _, a, b, c = arr.shape
        raise DataError(
            f"{what}: cannot tell the layout of images shaped {arr.shape}: channels-first "
            f"they are {a} channels of {b}x{c} pixels, channels-last {c} channels of {a}x{b} "
            f"pixels; pass channels_last=True or channels_last=False (the latter for real "
            f"{a}-channel data)"
        )
    return arr


def _images(arr: np.ndarray, what: str, pixel_max: float | None,
            channels_last: bool | None = None) -> torch.Tensor:
    """Validate and scale one image array to ``float32`` ``(N, C, H, W)`` in ``[0, 1]``."""
    if arr.ndim in (3, 4) and 0 in arr.shape[1:]:
        axis = arr.shape.index(0, 1)
        raise DataError(f"{what}: images shaped {arr.shape} have an empty dimension (axis "
                        f"{axis} has size 0); every image needs at least one channel and "
                        f"one pixel")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = _channels_first(arr, what, channels_last)
    else:
        raise DataError(f"{what}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), "
                        f"got {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DataError(f"{what}: images must have an integer or float dtype, got {arr.dtype}")
    if pixel_max is None:
        if arr.dtype == np.uint8:
            scale = 255.0
        elif np.issubdtype(arr.dtype, np.floating):
            scale = 1.0
        else:
            raise DataError(
                f"{what}: images of dtype {arr.dtype} need pixel_max= to be scaled to [0, 1]"
            )
    else:
        if not pixel_max > 0:
            raise DataError(f"pixel_max must be positive, got {pixel_max}")
        scale = float(pixel_max)
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64) / scale).float()
    if out.numel():
        if not torch.isfinite(out).all():
            raise DataError(f"{what}: images contain NaN or infinite values")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{what}: pixel values after scaling by 1/{scale:g} lie in [{lo:g}, {hi:g}], "
                f"expected [0, 1] (pass pixel_max=)"
            )
    return out


def _labels(arr: np.ndarray, what: str) -> torch.Tensor:
    """Validate one label array and return it as ``int64``."""
    if arr.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what}: labels must have an integer dtype, got {arr.dtype}")
    return torch.from_numpy(np.asarray(arr, dtype=np.int64).copy())


def _class_names(names: Sequence[str] | np.ndarray | None, what: str) -> tuple[str, ...]:
    """Class names as a tuple of strings (``()`` for ``None``)."""
    if names is None:
        return ()
    arr = np.asarray(names)
    if arr.ndim != 1 or not (arr.dtype.kind == "U" or all(isinstance(n, str) for n in names)):
        raise DataError(f"{what}: class names must be a 1-D sequence of strings, got "
                        f"{arr.dtype} of shape {arr.shape}")
    return tuple(str(n) for n in arr)


def _missing_classes(present: torch.Tensor, num_classes: int, first: int) -> list[int]:
    """The first ``first`` classes of ``range(num_classes)`` not in ``present`` (sorted, unique).

    Walks the gaps between the present classes, so the cost does not grow with
    ``num_classes`` (a stray label ``2**40`` is answered at once)."""
    missing: list[int] = []
    expected = 0
    for cls in [*present.tolist(), num_classes]:
        while expected < cls and len(missing) < first:
            missing.append(expected)
            expected += 1
        if len(missing) >= first:
            break
        expected = cls + 1
    return missing


def _check_every_class_trained(train_y: torch.Tensor, num_classes: int, source: str,
                               how: str) -> None:
    """Refuse classes in ``[0, num_classes)`` without a training example (labels in range)."""
    present = torch.unique(train_y)  # sorted
    if present.numel() == num_classes:
        return
    missing = _missing_classes(present, num_classes, 5)
    n_missing = num_classes - present.numel()
    shown = ", ".join(map(str, missing)) + (", ..." if n_missing > len(missing) else "")
    raise DataError(
        f"{source}: {num_classes} classes{how} but {n_missing} of them "
        f"{'has' if n_missing == 1 else 'have'} no training "
        f"example (classes {shown}); every class in [0, {num_classes - 1}] needs at least "
        f"one training example (a stray label, or num_classes / class_names too large?)"
    )


def build(
    arrays: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    name: str,
    num_classes: int | None,
    pixel_max: float | None,
    class_names: Sequence[str] | np.ndarray | None = None,
    channels_last: bool | None = None,
) -> ImageDataset:
    """Validate four arrays (keys ``train_x, train_y, test_x, test_y``) into a dataset.

    ``sources`` names where each array came from (a file, ``file[key]``); error messages
    name it. ``num_classes`` is, when ``None``, ``len(class_names)`` or else the largest
    *training* label plus one. Images are read as in :func:`load_arrays`.

    Raises:
        DataError: naming the source of the first problem found (see :func:`load_arrays`).
    """
    _check_channels_last(channels_last, name)
    xs = {k: _images(np.asarray(arrays[k]), sources[k], pixel_max, channels_last)
          for k in ("train_x", "test_x")}
    ys = {k: _labels(np.asarray(arrays[k]), sources[k]) for k in ("train_y", "test_y")}
    names = _class_names(class_names, f"{name}: class_names")
    for split in ("train", "test"):
        x, y = xs[f"{split}_x"], ys[f"{split}_y"]
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name}: {split} split has {x.shape[0]} images ({sources[f'{split}_x']}) "
                f"but {y.shape[0]} labels ({sources[f'{split}_y']})"
            )
        if x.shape[0] == 0:
            raise DataError(f"{sources[f'{split}_x']}: the {split} split of {name} is empty "
                            f"(no images)")
    if xs["train_x"].shape[1:] != xs["test_x"].shape[1:]:
        raise DataError(
            f"{name}: train images are {tuple(xs['train_x'].shape[1:])} but test images are "
            f"{tuple(xs['test_x'].shape[1:])}"
        )
    for key, y in ys.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataError(f"{sources[key]}: labels lie in [{lo}, {hi}], expected class "
                            f"numbers 0, 1, 2, ... (found negative labels)")
    how = ""
    if num_classes is None:
        if names:
            num_classes, how = len(names), f" ({len(names)} class names)"
        else:
            num_classes = int(ys["train_y"].max()) + 1
            how = " (num_classes inferred from the training labels)"
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    if names and len(names) != num_classes:
        raise DataError(f"{name}: {len(names)} class names for num_classes={num_classes} "
                        f"(class_names={list(names)})")
    for key, y in ys.items():
        lo, hi = int(y.min()), int(y.max())
        if hi >= num_classes:
            raise DataError(f"{sources[key]}: labels lie in [{lo}, {hi}], expected "
                            f"[0, {num_classes - 1}]{how}")
        if key == "train_y" and lo == hi:  # before the test labels: the likelier cause
            raise DataError(f"{sources[key]}: the training split of {name} holds only class "
                            f"{lo}; a classifier needs at least two classes")
    _check_every_class_trained(ys["train_y"], num_classes, sources["train_y"], how)
    return ImageDataset(
        train_x=xs["train_x"],
        train_y=ys["train_y"],
        test_x=xs["test_x"],
        test_y=ys["test_y"],
        num_classes=int(num_classes),
        name=name,
        class_names=names,
    )


def load_arrays(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    name: str = "arrays",
    num_classes: int | None = None,
    pixel_max: float | None = None,
    *,
    class_names: Sequence[str] | None = None,
    channels_last: bool | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from NumPy arrays (or anything ``np.asarray`` accepts).

    Args:
        train_x, test_x: images ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` of the
            same per-image shape. ``uint8`` images are divided by 255; float images must
            already lie in ``[0, 1]``; other integer types need ``pixel_max``. With
            ``pixel_max`` given, every image is divided by it.
        train_y, test_y: 1-D integer labels, one per image.
        name: dataset name.
        num_classes: the number of classes; when ``None``, ``len(class_names)`` or else the
            largest training label plus one (a test label beyond it is an error). Every
            class in ``[0, num_classes)`` must have at least one training example.
        pixel_max: the value that maps to 1.0.
        class_names: one name per class, kept in :attr:`ImageDataset.class_names`.
        channels_last: the layout of 4-D images. ``None`` (default) detects it: images whose
            last axis has 1, 3 or 4 entries while axis 1 has more than 4 (``(N, 28, 28, 3)``) are
            channels-last and transposed to ``(N, C, H, W)``; every other shape, including
            the ambiguous ones where both axes could be channels (``(N, 3, 4, 4)``,
            ``(N, 2, 3, 3)``), is read as ``(N, C, H, W)`` -- except that a reading of more
            than 4 channels while the last axis has at most 4 entries (``(N, 28, 28, 2)``:
            28 channels of 28x2, or 2 channels of 28x28?) is refused and the layout must be
            given. ``True`` / ``False`` force the layout (``True`` for up to 4 channels,
            ``False`` for real data of more than 4 channels).

    Returns:
        ``float32`` images ``(N, C, H, W)`` in ``[0, 1]`` and ``int64`` labels.

    Raises:
        DataError: on a wrong shape or dtype, an image dimension of size 0, a layout that
            cannot be detected (see ``channels_last``) or a ``channels_last`` that is not
            ``True``, ``False`` or ``None``, a count mismatch, pixel values outside the
            range, NaNs, an empty split, a negative label or one ``>= num_classes``, fewer
            than two classes in the training split, a class without training examples, or
            ``len(class_names) != num_classes``.
    """
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    sources = {k: f"{name}.{k}" for k in arrays}
    return build(arrays, sources, name, num_classes, pixel_max, class_names, channels_last)


def _member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of an open ``.npz`` file (a :class:`DataError` naming it if unreadable)."""
    try:
        return npz[key]
    except MemoryError as exc:  # numpy's _ArrayMemoryError: a header declaring a huge shape
        raise DataError(f"{path}[{key}]: the array's header declares a shape too large to "
                        f"load ({exc}); the file is corrupt or not meant for this") from None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}[{key}]: cannot read the array, truncated or corrupt "
                        f"({type(exc).__name__}: {exc})") from exc


def load_npz(
    path: PathLike,
    num_classes: int | None = None,
    pixel_max: float | None = None,
    *,
    channels_last: bool | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` from an ``.npz`` file (:func:`numpy.savez`).

    The file holds the arrays ``train_x, train_y, test_x, test_y`` (read as in
    :func:`load_arrays`) and optionally ``class_names`` (a 1-D string array, one name per
    class). Nothing is unpickled. The dataset is named after the file's stem.

    Raises:
        DataError: naming the file: missing, not a readable zip archive (truncated or
            corrupt), missing arrays, an array whose header is malformed or declares a
            shape too large for memory (naming the array), or any problem of
            :func:`load_arrays`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # an .npy array named .npz
            raise DataError(f"{path}: not an .npz archive (a single array of shape "
                            f"{getattr(npz, 'shape', '?')})")
        with npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (has {npz.files})")
            keys = [*NPZ_KEYS, "class_names"] if "class_names" in npz.files else NPZ_KEYS
            arrays = {k: _member(npz, k, path) for k in keys}
            names = arrays.pop("class_names", None)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read .npz, truncated or corrupt "
                        f"({type(exc).__name__}: {exc})") from exc
    sources = {k: f"{path}[{k}]" for k in NPZ_KEYS}
    return build(arrays, sources, path.stem, num_classes, pixel_max,
                 _class_names(names, f"{path}[class_names]"), channels_last)
