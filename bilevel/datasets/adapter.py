"""Any ``torch.utils.data.Dataset`` of ``(image, label)`` pairs as an :class:`ImageDataset`.

Works with torchvision's datasets (``FashionMNIST``, ``CIFAR10``, ``ImageFolder``...)
without importing torchvision: only ``len(ds)`` and ``ds[i]`` are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._base import DataError, ImageDataset
from .arrays import CHANNELS, build
from .folder import pil_array

__all__ = ["PROGRESS_MIN_ITEMS", "from_torch_dataset"]

#: Converting more items than this (both splits together) shows a tqdm progress bar.
PROGRESS_MIN_ITEMS = 5000


def _is_pil(obj: Any) -> bool:
    """Whether ``obj`` is a Pillow image (without importing Pillow when it is not)."""
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "mode")


def _scaled(arr: np.ndarray, what: str, pixel_max: float | None) -> np.ndarray:
    """Scale one tensor / array image to ``[0, 1]``: see :func:`from_torch_dataset`."""
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{what}: image of dtype {arr.dtype}; expected uint8 (0..255) or float "
                        f"(0..1), or any integer type with pixel_max=")
    if pixel_max is not None:
        return (arr.astype(np.float64) / pixel_max).astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise DataError(f"{what}: image of dtype {arr.dtype}; expected uint8 (0..255) or float "
                    f"(0..1), or pass pixel_max= (the value that maps to 1.0)")


def _check_range(arr: np.ndarray, what: str, pixel_max: float | None, pil: bool) -> None:
    """Refuse NaNs and values outside ``[0, 1]`` of one scaled image, with a hint."""
    if not arr.size:
        return
    if not np.isfinite(arr).all():
        raise DataError(f"{what}: image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return
    found = f"{what}: pixel values lie in [{lo:g}, {hi:g}]"
    if pixel_max is not None and not pil:
        found += f" after dividing by pixel_max={pixel_max:g}"
    if lo < 0.0:
        raise DataError(f"{found}, expected [0, 1]: images must be unnormalised, with pixels "
                        f"in [0, pixel_max] (drop transforms.Normalize; normalise later)")
    hint = "" if pixel_max is not None or pil else \
        " (for float pixels in 0..255 pass pixel_max=255)"
    raise DataError(f"{found}, expected [0, 1]{hint}")


def _image(img: Any, what: str, pixel_max: float | None = None) -> np.ndarray:
    """One image as ``float32`` ``(C, H, W)``: see :func:`from_torch_dataset`."""
    if _is_pil(img):
        arr, _ = pil_array(img, None, what)
        out = arr.transpose(2, 0, 1).astype(np.float32)
        _check_range(out, what, pixel_max, pil=True)
        return out
    if isinstance(img, torch.Tensor):
        arr, channels_first = img.detach().cpu().numpy(), True
    elif isinstance(img, np.ndarray):
        arr, channels_first = img, False
    else:
        raise DataError(f"{what}: image of type {type(img).__name__}; expected a tensor "
                        f"(C, H, W) or (H, W), a PIL image or a NumPy array (H, W, C) or (H, W)")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        first, last = arr.shape[0] in CHANNELS, arr.shape[2] in CHANNELS
        if channels_first and last and not first:  # a tensor (H, W, C)
            channels_first = False
        elif not channels_first and first and not last:  # an array (C, H, W)
            channels_first = True
        if not channels_first:
            arr = arr.transpose(2, 0, 1)
    else:
        raise DataError(f"{what}: image of shape {tuple(arr.shape)}; expected (C, H, W) or "
                        f"(H, W) for a tensor, (H, W, C) or (H, W) for an array")
    out = _scaled(np.ascontiguousarray(arr), what, pixel_max)
    _check_range(out, what, pixel_max, pil=False)
    return out


def _label(label: Any, what: str) -> int:
    """One label as an ``int``: a Python or NumPy integer or a 0-d integer tensor."""
    if isinstance(label, torch.Tensor):
        if label.dim() == 0 and not label.dtype.is_floating_point and label.dtype != torch.bool:
            return int(label)
    elif isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    shown = f"tensor of shape {tuple(label.shape)} and dtype {label.dtype}" \
        if isinstance(label, torch.Tensor) else f"{type(label).__name__} {label!r}"
    raise DataError(f"{what}: label must be an int or a 0-d integer tensor, got {shown}")


def _convert(ds: Any, split: str, name: str, max_items: int | None, bar: Any,
             pixel_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (or ``max_items`` evenly spaced) items of one split as ``(N, C, H, W)`` and labels."""
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{name}.{split}: {type(ds).__name__} has no len(); expected a "
                        f"map-style dataset (len(ds) and ds[i])") from None
    if max_items is not None and max_items < n:
        indices = [i * n // max_items for i in range(max_items)]
    else:
        indices = list(range(n))
    images: np.ndarray | None = None
    labels = np.empty(len(indices), dtype=np.int64)
    first = ""
    for row, i in enumerate(indices):
        what = f"{name}.{split}[{i}]"
        try:
            item = ds[i]
        except Exception as exc:  # the dataset's own failure, with the index added
            raise DataError(f"{what}: reading the item failed ({type(exc).__name__}: "
                            f"{exc})") from exc
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) \
                else type(item).__name__
            raise DataError(f"{what}: expected an (image, label) pair, got {kind}")
        image = _image(item[0], what, pixel_max)
        if images is None:
            images = np.empty((len(indices), *image.shape), dtype=np.float32)
            first = what
        elif image.shape != images.shape[1:]:
            raise DataError(f"{what}: image of shape (C, H, W) = {image.shape} but {first} is "
                            f"{images.shape[1:]} (all images must have the same shape)")
        images[row] = image
        labels[row] = _label(item[1], what)
        bar.update(1)
    if images is None:
        raise DataError(f"{name}.{split}: the dataset is empty")
    return images, labels


def from_torch_dataset(
    train: Any,
    test: Any,
    *,
    num_classes: int | None = None,
    name: str = "torch",
    class_names: Sequence[str] | None = None,
    max_items: int | None = None,
    pixel_max: float | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` from two map-style datasets of ``(image, label)`` pairs.

    Each item ``ds[i]`` must be a pair ``(image, label)``. The image may be a tensor
    ``(C, H, W)`` or ``(H, W)`` (as torchvision's ``ToTensor`` gives), a PIL image
    (grayscale stays one channel, other modes become RGB, alpha dropped) or a NumPy
    array ``(H, W, C)`` or ``(H, W)`` (as PIL and OpenCV give); a 3-D tensor whose last
    axis alone has 1, 3 or 4 entries is read as ``(H, W, C)``, a 3-D array whose first
    axis alone has them as ``(C, H, W)``. Tensor and array pixels: ``uint8`` are divided by
    255 and float must lie in ``[0, 1]``, unless ``pixel_max`` is given, which divides them
    all (of any integer or float dtype). PIL images are scaled by their mode, whatever
    ``pixel_max``: 8-bit modes by 1/255; 16-bit grayscale (``I;16``) and 32-bit integer
    (``I``) by 1/65535, refused unless the values fit in ``0..65535``; float (``F``) kept,
    refused unless in ``[0, 1]`` (see :func:`~bilevel.datasets.folder.pil_array`). Every
    image is checked as it is read: pixel values outside ``[0, 1]`` (e.g. normalised
    images, which must be given unnormalised) are refused naming the item. The label is an
    ``int`` (or NumPy integer) or a 0-d integer tensor. All images must have the same shape.
    Converting more than :data:`PROGRESS_MIN_ITEMS` items shows a progress bar (tqdm, on
    stderr).

    Args:
        train, test: the two splits (``len(ds)`` and ``ds[i]``; no ``DataLoader``).
        num_classes: the number of classes; default ``len(class_names)``, else the largest
            training label plus one.
        name: the dataset's name (logs and error messages).
        class_names: one name per class; default the training dataset's ``classes``
            attribute (torchvision's datasets have one) when it is a list of strings.
        max_items: read at most this many items of each split, evenly spaced over it
            (``i * len(ds) // max_items``), so a class-sorted dataset keeps every class.
        pixel_max: the tensor / array pixel value that maps to 1.0 (e.g. ``255`` for float
            pixels in ``0..255``, ``4095`` for 12-bit ``int16`` data).

    Returns:
        ``float32`` images ``(N, C, H, W)`` in ``[0, 1]`` and ``int64`` labels, with the
        class names.

    Raises:
        DataError: naming the split and index (``name.train[17]``) of an item that is not an
            ``(image, label)`` pair, an image of another type, shape or dtype, pixel values
            outside ``[0, 1]`` after scaling, a PIL image of mode ``I`` / ``I;16`` / ``F``
            whose values do not fit (above), a label that is not an integer, an item the
            dataset fails to read; a ``pixel_max`` that is not a positive number; or any problem of
            :func:`~bilevel.datasets.load_arrays` (empty split, labels out of range, fewer
            than two training classes, class names of the wrong length).
    """
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int)
                                  or max_items < 1):
        raise DataError(f"{name}: max_items must be a positive int, got {max_items!r}")
    if pixel_max is not None and (isinstance(pixel_max, bool) or not isinstance(
            pixel_max, (int, float, np.integer, np.floating)) or not 0 < pixel_max < np.inf):
        raise DataError(f"{name}: pixel_max must be a positive number, got {pixel_max!r}")
    if pixel_max is not None:
        pixel_max = float(pixel_max)
    if class_names is None:
        classes = getattr(train, "classes", None)
        if isinstance(classes, (list, tuple)) and classes and all(
                isinstance(c, str) for c in classes):
            class_names = tuple(classes)
    from tqdm.auto import tqdm

    sizes = []
    for ds in (train, test):
        try:
            sizes.append(min(len(ds), max_items or len(ds)))
        except TypeError:
            sizes.append(0)  # reported by _convert
    total = sum(sizes)
    with tqdm(total=total, desc=f"converting {name}", unit="img", leave=False,
              disable=total <= PROGRESS_MIN_ITEMS) as bar:
        arrays = {}
        for split, ds in (("train", train), ("test", test)):
            arrays[f"{split}_x"], arrays[f"{split}_y"] = _convert(ds, split, name, max_items,
                                                                  bar, pixel_max)
    sources = {f"{s}_{k}": f"{name}.{s}" for s in ("train", "test") for k in ("x", "y")}
    return build(arrays, sources, name, num_classes, None, class_names, channels_last=False)
