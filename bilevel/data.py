"""Image dataset loaders for dataset distillation.

Everything here reads from local disk or from an installed package; nothing is ever downloaded.

* :class:`ImageDataset` -- a small frozen container: ``train_x, train_y, test_x, test_y``
  (images ``float32`` in ``[0, 1]`` shaped ``(N, C, H, W)``, labels ``int64``),
  ``num_classes`` and ``name``.
* :func:`read_idx` -- a strict reader for the IDX format (MNIST / Fashion-MNIST files), plain or
  gzip-compressed (detected by the gzip magic bytes, not by the file name).
* :func:`load_idx_dataset` -- four IDX files to an :class:`ImageDataset`.
* :func:`load_digits` -- scikit-learn's bundled 8x8 digits, with a fixed stratified split.
* :func:`load_fashion_mnist` -- the IDX files of the Debian package ``dataset-fashion-mnist``.
* :func:`load_arrays` -- NumPy arrays, validated.
* :func:`load_image_folder` -- a folder of PNG/JPEG files, ``root/{train,test}/<class>/*``
  (read with Pillow).
* :func:`load_dataset` -- dispatch on a name, a directory of IDX files, an image folder or an
  ``.npz`` file.

Every problem with the data is reported as a :class:`DataError` (a :class:`ValueError`)
naming the file or the array at fault.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DataError",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_ROOT",
    "IDX_TYPES",
    "ImageDataset",
    "load_arrays",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_image_folder",
    "read_idx",
]

PathLike = str | os.PathLike[str]

#: Default install location of the Debian package ``dataset-fashion-mnist``.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

#: The usual MNIST-style file names; each may also carry a ``.gz`` suffix.
FASHION_MNIST_FILES: dict[str, str] = {
    "image_train": "train-images-idx3-ubyte",
    "label_train": "train-labels-idx1-ubyte",
    "image_test": "t10k-images-idx3-ubyte",
    "label_test": "t10k-labels-idx1-ubyte",
}

#: IDX type code -> big-endian NumPy dtype.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: File suffixes (case-insensitive) that :func:`load_image_folder` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_GZIP_MAGIC = b"\x1f\x8b"
_NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")


class DataError(ValueError):
    """A dataset file or array is missing, malformed or inconsistent."""


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


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

    Instances are built by the loaders of this module, which validate their inputs; the
    constructor itself does not re-check the tensors.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str

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
        """Return a copy with all four tensors moved to ``device``."""
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
        for hyperparameter selection). Per class, ``round(fraction * n_class)`` examples are
        held out (at least one, and at least one is kept, for classes with two or more
        examples). The result depends only on ``seed`` and the data.

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


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from exc
    return raw


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (plain or gzip) into a tensor of the shape stored in its header.

    Format: two zero bytes, a type code (``0x08`` ubyte, ``0x09`` byte, ``0x0B`` short,
    ``0x0C`` int, ``0x0D`` float, ``0x0E`` double), the number of dimensions, one
    big-endian ``uint32`` size per dimension, then the data, big-endian, in C order.
    Gzip compression is detected from the first two bytes, whatever the file name.

    Returns:
        a CPU tensor of dtype ``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or
        ``float64`` (native byte order).

    Raises:
        DataError: naming the file, if it is missing, has a wrong magic, an unknown type code,
            zero dimensions, fewer bytes than the header promises (truncated) or more
            (trailing garbage).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(data)} bytes, header needs 4")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: not an IDX file: magic starts with {data[:2].hex()}, expected 0000"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, header of {ndim} dimensions "
            f"needs {header}"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, header promises {expected} "
            f"(shape {shape}, {dtype.itemsize}-byte items)"
        )
    if len(data) > expected:
        raise DataError(
            f"{path}: {len(data) - expected} trailing bytes after the IDX data "
            f"(expected {expected} bytes for shape {shape})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def load_idx_dataset(
    image_train: PathLike,
    label_train: PathLike,
    image_test: PathLike,
    label_test: PathLike,
    name: str = "idx",
    num_classes: int | None = None,
    pixel_max: float | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from four IDX files.

    Images may be ``(N, H, W)`` (a channel dimension is added) or ``(N, C, H, W)``; labels
    must be 1-D integers. Images are scaled as in :func:`load_arrays` (``uint8`` by 255,
    float images must already be in ``[0, 1]``, other types need ``pixel_max``).

    Raises:
        DataError: naming the offending file.
    """
    paths = {
        "train_x": Path(image_train),
        "train_y": Path(label_train),
        "test_x": Path(image_test),
        "test_y": Path(label_test),
    }
    arrays = {key: read_idx(p).numpy() for key, p in paths.items()}
    return _build(arrays, {k: str(p) for k, p in paths.items()}, name, num_classes, pixel_max)


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def _images(arr: np.ndarray, what: str, pixel_max: float | None) -> torch.Tensor:
    """Validate and scale one image array to ``float32`` ``(N, C, H, W)`` in ``[0, 1]``."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim != 4:
        raise DataError(f"{what}: images must be (N, H, W) or (N, C, H, W), got {arr.shape}")
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


def _build(
    arrays: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    name: str,
    num_classes: int | None,
    pixel_max: float | None,
) -> ImageDataset:
    """Validate four arrays (keys ``train_x, train_y, test_x, test_y``) into a dataset."""
    xs = {k: _images(np.asarray(arrays[k]), sources[k], pixel_max) for k in ("train_x", "test_x")}
    ys = {k: _labels(np.asarray(arrays[k]), sources[k]) for k in ("train_y", "test_y")}
    for split in ("train", "test"):
        x, y = xs[f"{split}_x"], ys[f"{split}_y"]
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name}: {split} split has {x.shape[0]} images ({sources[f'{split}_x']}) "
                f"but {y.shape[0]} labels ({sources[f'{split}_y']})"
            )
    if xs["train_x"].shape[1:] != xs["test_x"].shape[1:]:
        raise DataError(
            f"{name}: train images are {tuple(xs['train_x'].shape[1:])} but test images are "
            f"{tuple(xs['test_x'].shape[1:])}"
        )
    if xs["train_x"].shape[0] == 0:
        raise DataError(f"{name}: the training split is empty ({sources['train_x']})")
    all_y = torch.cat([ys["train_y"], ys["test_y"]])
    if num_classes is None:
        num_classes = int(all_y.max()) + 1
    elif num_classes < 1:
        raise DataError(f"{name}: num_classes must be positive, got {num_classes}")
    for key, y in ys.items():
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"{sources[key]}: labels lie in [{int(y.min())}, {int(y.max())}], "
                f"expected [0, {num_classes - 1}]"
            )
    return ImageDataset(
        train_x=xs["train_x"],
        train_y=ys["train_y"],
        test_x=xs["test_x"],
        test_y=ys["test_y"],
        num_classes=int(num_classes),
        name=name,
    )


def load_arrays(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    name: str = "arrays",
    num_classes: int | None = None,
    pixel_max: float | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from NumPy arrays (or anything ``np.asarray`` accepts).

    Args:
        train_x, test_x: images ``(N, H, W)`` or ``(N, C, H, W)`` of the same per-image shape.
            ``uint8`` images are divided by 255; float images must already lie in ``[0, 1]``;
            other integer types need ``pixel_max``. With ``pixel_max`` given, every image is
            divided by it.
        train_y, test_y: 1-D integer labels, one per image.
        name: dataset name.
        num_classes: the number of classes; inferred as ``max label + 1`` when ``None``.
        pixel_max: the value that maps to 1.0.

    Raises:
        DataError: on a wrong shape or dtype, a count mismatch, pixel values outside the range,
            NaNs, a negative label or a label ``>= num_classes``.
    """
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    sources = {k: f"{name}.{k}" for k in arrays}
    return _build(arrays, sources, name, num_classes, pixel_max)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


_GRAY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B")


def _pil_image() -> Any:
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


def _read_image(image_mod: Any, path: Path, gray: bool | None) -> tuple[np.ndarray, bool]:
    """One image as ``float64`` ``(H, W, C)`` in ``[0, 1]``; also whether it was grayscale.

    ``gray=None`` keeps the image's own kind (grayscale or RGB); alpha is dropped.
    """
    try:
        with image_mod.open(path) as img:
            img.load()
            is_gray = img.mode in _GRAY_MODES
            if img.mode.startswith("I;16"):
                arr = np.asarray(img, dtype=np.float64) / 65535.0
            elif gray or (gray is None and is_gray):
                arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, is_gray


def load_image_folder(
    root: PathLike,
    *,
    num_classes: int | None = None,
    grayscale: bool | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from a folder of PNG/JPEG images on local disk.

    Layout: ``root/train/<class_name>/*.png`` (or ``.jpg`` / ``.jpeg``, any case) and
    ``root/test/<class_name>/*``. Class names, sorted, give the labels ``0, 1, ...``; both
    splits must have the same class folders, each with at least one image. Hidden files
    (``.DS_Store``) are skipped; any other file is an error. Images are read in name order
    with Pillow and must all have the same width and height.

    Args:
        root: the dataset folder.
        num_classes: if given, the number of class folders must equal it.
        grayscale: ``True`` converts every image to one channel, ``False`` to three (RGB);
            ``None`` gives one channel when every image is grayscale and RGB otherwise.
            Alpha channels are dropped; 16-bit grayscale is scaled by 1/65535.

    Returns:
        ``float32`` images in ``[0, 1]`` shaped ``(N, C, H, W)``; named after ``root``.

    Raises:
        DataError: naming the folder or file at fault (missing split or class folders,
            different classes in the two splits, an unreadable file, an image of another
            size, a ``num_classes`` mismatch).
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
    image_mod = _pil_image()
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
    sources = {k: f"{root}/{k.split('_')[0]}" for k in _NPZ_KEYS}
    return _build(out, sources, root.name or str(root), len(names), None)


# --------------------------------------------------------------------------------------------
# Named datasets
# --------------------------------------------------------------------------------------------


def load_digits(test_size: int = 360, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (no download) as an :class:`ImageDataset`.

    1797 grayscale 8x8 images, 10 classes; pixel values 0..16 are divided by 16, giving
    ``(N, 1, 8, 8)`` ``float32`` images in ``[0, 1]``. The split is a fixed, seeded,
    stratified one (``sklearn.model_selection.train_test_split`` with ``stratify=y`` and
    ``random_state=seed``): by default 1437 training and 360 test images, the same on every
    call and every machine.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return load_arrays(tr_x, tr_y, te_x, te_y, name="digits", num_classes=10, pixel_max=16.0)


def _find_idx(root: Path, base: str) -> Path | None:
    """Return ``root/base`` or ``root/base.gz``, whichever exists (plain first)."""
    for candidate in (root / base, root / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dir(root: Path, name: str, num_classes: int | None = None) -> ImageDataset | None:
    """Load the four standard-named IDX files of ``root``; ``None`` if any is missing."""
    found = {key: _find_idx(root, base) for key, base in FASHION_MNIST_FILES.items()}
    if any(p is None for p in found.values()):
        return None
    return load_idx_dataset(**found, name=name, num_classes=num_classes)  # type: ignore[arg-type]


def load_fashion_mnist(root: PathLike = FASHION_MNIST_ROOT) -> ImageDataset:
    """Fashion-MNIST from the IDX files installed by the Debian package ``dataset-fashion-mnist``.

    Looks in ``root`` for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with ``.gz``.
    Returns 60000/10000 ``(N, 1, 28, 28)`` images in ``[0, 1]`` and 10 classes (for the
    real data).

    Raises:
        DataError: when the files are not there (with install instructions) or malformed.
    """
    root = Path(root)
    ds = _load_idx_dir(root, "fashion_mnist", num_classes=10)
    if ds is None:
        missing = [b for b in FASHION_MNIST_FILES.values() if _find_idx(root, b) is None]
        raise DataError(
            f"Fashion-MNIST not found in {root}: install the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass root= "
            f"(missing: {', '.join(missing)}[.gz])"
        )
    return ds


def load_dataset(name_or_path: PathLike, **kw: Any) -> ImageDataset:
    """Load a dataset by name or path.

    * ``"digits"`` -> :func:`load_digits` (``kw``: ``test_size``, ``seed``);
    * ``"fashion_mnist"`` / ``"fashion-mnist"`` -> :func:`load_fashion_mnist` (``kw``: ``root``);
    * a directory with ``train/`` and ``test/`` subfolders -> :func:`load_image_folder`
      (``kw``: ``num_classes``, ``grayscale``);
    * any other directory, holding the four standard-named IDX files (see
      :data:`FASHION_MNIST_FILES`, plain or ``.gz``) -> :func:`load_idx_dataset` (``kw``:
      ``num_classes``, ``pixel_max``);
    * an ``.npz`` file with arrays ``train_x, train_y, test_x, test_y`` -> :func:`load_arrays`
      (``kw``: ``num_classes``, ``pixel_max``).

    The dataset's name is the given name, or the directory / file stem.

    Raises:
        DataError: for an unknown name, a missing path, or malformed data.
    """
    key = str(name_or_path)
    if key == "digits":
        return load_digits(**kw)
    if key in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        return load_fashion_mnist(**kw)
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "train").is_dir() and (path / "test").is_dir():
            return load_image_folder(path, **kw)
        paths = {}
        for k, base in FASHION_MNIST_FILES.items():
            found = _find_idx(path, base)
            if found is None:
                raise DataError(f"{path}: directory lacks the IDX file {base}[.gz] (and is not "
                                f"an image folder with train/ and test/ subfolders)")
            paths[k] = found
        return load_idx_dataset(**paths, name=path.name or str(path), **kw)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _NPZ_KEYS if k not in npz.files]
                if missing:
                    raise DataError(f"{path}: missing arrays {missing} (has {npz.files})")
                arrays = {k: npz[k] for k in _NPZ_KEYS}
        except DataError:
            raise
        except (OSError, ValueError, zlib.error) as exc:
            raise DataError(f"{path}: cannot read .npz ({exc})") from exc
        num_classes = kw.pop("num_classes", None)
        pixel_max = kw.pop("pixel_max", None)
        if kw:
            raise TypeError(f"{path}: unexpected keyword arguments {sorted(kw)} for an .npz file")
        sources = {k: f"{path}[{k}]" for k in _NPZ_KEYS}
        return _build(arrays, sources, path.stem, num_classes, pixel_max)
    raise DataError(
        f"unknown dataset {key!r}: expected 'digits', 'fashion_mnist', a directory of IDX files, "
        f"an image folder (train/ and test/ of class folders) or an .npz file"
    )

