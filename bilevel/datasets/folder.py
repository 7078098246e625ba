"""Image folders: ``root/{train,test}/<class>/*.png`` read with Pillow."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._base import DataError, ImageDataset, PathLike
from .arrays import NPZ_KEYS, build

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "pil_array"]

#: File suffixes (case-insensitive) that :func:`load_image_folder` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_GRAY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def pil_image() -> Any:
    """``PIL.Image``, imported on first use."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise DataError(
            "reading an image folder needs Pillow (a dependency of bilevel): pip install pillow"
        ) from None
    return Image


def _entries(folder: Path) -> list[Path]:
    """The non-hidden entries of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                  key=lambda p: p.name)


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` of one split folder (``root/train``)."""
    classes: dict[str, list[Path]] = {}
    for entry in _entries(split_dir):
        if not entry.is_dir():
            raise DataError(f"{entry}: expected only class folders in {split_dir}")
        files = []
        for f in _entries(entry):
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{f}: not an image file (expected {', '.join(IMAGE_SUFFIXES)} files in "
                    f"the class folder {entry})"
                )
            files.append(f)
        if not files:
            raise DataError(f"{entry}: class folder holds no images")
        classes[entry.name] = files
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    return classes


def pil_array(img: Any, gray: bool | None, what: str = "image") -> tuple[np.ndarray, bool]:
    """A Pillow image as ``float64`` ``(H, W, C)`` in ``[0, 1]``; also whether it was grayscale.

    ``gray=None`` keeps the image's own kind (grayscale or RGB), ``True`` / ``False`` convert
    to one / three channels; alpha is dropped. Modes ``1``, ``L``, ``P``, ``RGB``... are
    8-bit (divided by 255). The one-channel modes of wider pixels are read from their own
    values, never through an 8-bit conversion (which would clip them): 16-bit grayscale
    (``I;16``) and 32-bit integer (``I``) images are divided by 65535, and ``I`` values must
    fit in 16 bits (``0..65535``); float images (``F``) are kept as they are and must lie
    in ``[0, 1]``. With ``gray=False`` they are repeated to three channels.

    Raises:
        DataError: naming ``what``, for an ``I`` image with values outside ``0..65535``, an
            ``F`` image with values outside ``[0, 1]`` (or NaN), or an image Pillow cannot
            convert.
    """
    mode = img.mode
    is_gray = mode in _GRAY_MODES
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "F":
            if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
                raise DataError(f"{what}: float image (PIL mode F) with values in [{lo:g}, "
                                f"{hi:g}], expected [0, 1]")
        else:
            if lo < 0 or hi > 65535:
                raise DataError(f"{what}: integer image (PIL mode {mode}) with values in "
                                f"[{lo:g}, {hi:g}]; only 16-bit values 0..65535 are read "
                                f"(divided by 65535)")
            arr = arr / 65535.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if gray is False:
            arr = np.repeat(arr, 3, axis=2)
        return arr, is_gray
    try:
        if gray or (gray is None and is_gray):
            arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    except ValueError as exc:  # a mode Pillow cannot convert
        raise DataError(f"{what}: cannot convert a PIL image of mode {mode} ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, is_gray


def _read_image(image_mod: Any, path: Path, gray: bool | None) -> tuple[np.ndarray, bool]:
    """One image file as ``float64`` ``(H, W, C)`` in ``[0, 1]`` (:func:`pil_array`).

    An image whose header claims more pixels than Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 million) is refused, before it is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_mod.DecompressionBombWarning)
            with image_mod.open(path) as img:
                img.load()
                return pil_array(img, gray, str(path))
    except (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image too large, refused as a possible decompression bomb "
                        f"({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def load_image_folder(
    root: PathLike,
    *,
    num_classes: int | None = None,
    grayscale: bool | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from a folder of PNG/JPEG images on local disk.

    Layout: ``root/train/<class_name>/*.png`` (or ``.jpg`` / ``.jpeg``, any case) and
    ``root/test/<class_name>/*``. Class folder names, sorted, give the labels ``0, 1, ...``
    and the dataset's :attr:`~ImageDataset.class_names`; both
    splits must have the same class folders, each with at least one image. Hidden files
    (``.DS_Store``) are skipped; any other file is an error. Images are read in name order
    with Pillow and must all have the same width and height.

    Args:
        root: the dataset folder.
        num_classes: if given, the number of class folders must equal it.
        grayscale: ``True`` converts every image to one channel, ``False`` to three (RGB);
            ``None`` gives one channel when every image is grayscale and RGB otherwise.
            Alpha channels are dropped; 16-bit grayscale is scaled by 1/65535 (see
            :func:`pil_array`).

    Returns:
        ``float32`` images in ``[0, 1]`` shaped ``(N, C, H, W)``; named after ``root``.
        A training split with a single class folder is refused (see
        :func:`~bilevel.datasets.load_arrays`).

    Raises:
        DataError: naming the folder or file at fault (missing split or class folders,
            different classes in the two splits, an unreadable file, an image too large
            (a decompression bomb), an image of another size, a ``num_classes`` mismatch).
    """
    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: no {split}/ folder (expected {root}/{split}/<class>/*.png)")
    splits = {split: _class_files(root / split) for split in ("train", "test")}
    names = sorted(splits["train"])
    if sorted(splits["test"]) != names:
        only_train = sorted(set(names) - set(splits["test"]))
        only_test = sorted(set(splits["test"]) - set(names))
        raise DataError(
            f"{root}: train/ and test/ have different class folders (only in train: "
            f"{only_train}, only in test: {only_test})"
        )
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"{root}: num_classes={num_classes} but there are {len(names)} class "
                        f"folders {names}")
    image_mod = pil_image()
    raw: dict[str, list[tuple[Path, np.ndarray, int]]] = {"train": [], "test": []}
    all_gray = True
    size: tuple[Path, tuple[int, int]] | None = None
    for split, classes in splits.items():
        for label, name in enumerate(names):
            for f in classes[name]:
                arr, is_gray = _read_image(image_mod, f, grayscale)
                all_gray &= is_gray
                if size is None:
                    size = (f, arr.shape[:2])
                elif arr.shape[:2] != size[1]:
                    (h, w), (h0, w0) = arr.shape[:2], size[1]
                    raise DataError(f"{f}: image is {w}x{h} pixels but {size[0]} is {w0}x{h0} "
                                    f"(all images must have the same size)")
                raw[split].append((f, arr, label))
    gray = all_gray if grayscale is None else grayscale
    out: dict[str, np.ndarray] = {}
    for split, items in raw.items():
        images = []
        for _, arr, _ in items:
            if not gray and arr.shape[2] == 1:
                arr = np.repeat(arr, 3, axis=2)
            images.append(arr.transpose(2, 0, 1))
        out[f"{split}_x"] = np.stack(images)
        out[f"{split}_y"] = np.array([label for _, _, label in items], dtype=np.int64)
    sources = {k: f"{root}/{k.split('_')[0]}" for k in NPZ_KEYS}
    return build(out, sources, root.name or str(root), len(names), None, class_names=names,
                 channels_last=False)
