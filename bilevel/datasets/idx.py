"""The IDX format of MNIST-style files: a strict reader and four files to a dataset."""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._base import DataError, ImageDataset, PathLike
from .arrays import build

__all__ = ["FASHION_MNIST_FILES", "IDX_TYPES", "find_idx_files", "load_idx_dataset",
           "read_idx"]

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

_GZIP_MAGIC = b"\x1f\x8b"
#: The most dimensions an IDX file may declare (NumPy's limit).
MAX_DIMS = 64


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
    Gzip compression is detected from the first two bytes, whatever the file name. The
    sizes in the header are checked against the file's length before anything is
    allocated.

    Returns:
        a CPU tensor of dtype ``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or
        ``float64`` (native byte order).

    Raises:
        DataError: naming the file, if it is missing, has a wrong magic, an unknown type code,
            zero or more than 64 dimensions, fewer bytes than the header promises
            (truncated, or absurd sizes in the header) or more (trailing garbage).
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
    if ndim > MAX_DIMS:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions, more than the "
                        f"{MAX_DIMS} an array can have")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, header of {ndim} dimensions "
            f"needs {header}"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated IDX file or absurd header: dimensions {shape} of "
            f"{dtype.itemsize}-byte items need {expected} bytes, the file holds {len(data)}"
        )
    if len(data) > expected:
        raise DataError(
            f"{path}: {len(data) - expected} trailing bytes after the IDX data "
            f"(expected {expected} bytes for shape {shape})"
        )
    try:
        arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
        return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))
    except (ValueError, RuntimeError, TypeError) as exc:  # e.g. more dimensions than allowed
        raise DataError(f"{path}: cannot hold the IDX data of shape {shape} in an array "
                        f"({type(exc).__name__}: {exc})") from exc


def load_idx_dataset(
    image_train: PathLike,
    label_train: PathLike,
    image_test: PathLike,
    label_test: PathLike,
    name: str = "idx",
    num_classes: int | None = None,
    pixel_max: float | None = None,
    *,
    class_names: Sequence[str] | None = None,
    channels_last: bool | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from four IDX files.

    Images may be ``(N, H, W)`` (a channel dimension is added), ``(N, C, H, W)`` or
    ``(N, H, W, C)``; labels must be 1-D integers. Images are scaled and their layout
    detected as in :func:`~bilevel.datasets.load_arrays` (``uint8`` by 255, float images
    must already be in ``[0, 1]``, other types need ``pixel_max``).

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
    return build(arrays, {k: str(p) for k, p in paths.items()}, name, num_classes, pixel_max,
                 class_names, channels_last)


def _find_idx(root: Path, base: str) -> Path | None:
    """Return ``root/base`` or ``root/base.gz``, whichever exists (plain first)."""
    for candidate in (root / base, root / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(root: PathLike) -> tuple[dict[str, Path], list[str]]:
    """The standard-named IDX files of the folder ``root`` (:data:`FASHION_MNIST_FILES`).

    Returns:
        ``(found, missing)``: the paths found, keyed like the arguments of
        :func:`load_idx_dataset`, and the base names of the files not found (each looked for
        plain and with ``.gz``).
    """
    root = Path(root)
    found, missing = {}, []
    for key, base in FASHION_MNIST_FILES.items():
        path = _find_idx(root, base)
        if path is None:
            missing.append(base)
        else:
            found[key] = path
    return found, missing
