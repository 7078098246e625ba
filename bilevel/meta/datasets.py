"""Datasets with many classes, for few-shot classification.

Nothing is downloaded: :func:`digits_d4` builds on scikit-learn's bundled digits, and
:func:`load_omniglot` reads the Omniglot images from a folder on local disk.

* :func:`digits_d4` -- the 8x8 digits and their seven other symmetries of the square (the
  dihedral group D4), each symmetry of each digit a class of its own: 80 classes.
* :func:`d4_transform` -- the element ``g`` of D4 applied to images.
* :func:`load_omniglot` -- Omniglot (Lake et al., 2015) in its standard folder layout, with the
  90/180/270-degree rotations as new classes as in the MAML paper.

Both return ``x`` ``(N, 1, H, W)`` ``float32`` in ``[0, 1]`` and ``y`` ``(N,)`` ``int64``,
ready for :class:`bilevel.meta.EpisodeSampler`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.data import IMAGE_SUFFIXES, DataError
from hypergrad.errors import BilevelInputError

__all__ = ["D4_NAMES", "OMNIGLOT_SETS", "d4_transform", "digits_d4", "load_omniglot"]

PathLike = str | os.PathLike[str]

#: The eight elements of D4 in the order of :func:`d4_transform` (``g = 0 .. 7``).
D4_NAMES = ("identity", "rot90", "rot180", "rot270",
            "flip", "flip+rot90", "flip+rot180", "flip+rot270")

#: The two folders of the Omniglot release, in the order :func:`load_omniglot` reads them.
OMNIGLOT_SETS = ("images_background", "images_evaluation")

_ROTATION_NAMES = ("", "/rot90", "/rot180", "/rot270")


def d4_transform(images: Tensor, g: int) -> Tensor:
    """Apply the element ``g`` (``0 .. 7``, named in :data:`D4_NAMES`) of the dihedral group
    of the square to the last two axes of ``images``: for ``g < 4``,
    ``torch.rot90(images, g, dims=(-2, -1))`` (``g`` counter-clockwise quarter turns); for
    ``g >= 4``, the same rotation by ``g - 4`` quarter turns after a left-right mirror
    ``torch.flip(images, dims=(-1,))``.

    Args:
        images: a tensor ``(..., H, H)``, square in its last two axes (e.g. ``(N, 1, 8, 8)``).
        g: the group element, an int in ``0 .. 7``.

    Returns:
        A new tensor of the same shape and dtype.

    Raises:
        BilevelInputError: ``g`` not an int in 0..7, or images not square.
    """
    if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 8:
        raise BilevelInputError(f"d4_transform: g must be an int in 0..7, got {g!r}")
    if images.dim() < 2 or images.shape[-1] != images.shape[-2]:
        raise BilevelInputError(f"d4_transform: images must be square in their last two axes, "
                                f"got shape {tuple(images.shape)}")
    if g >= 4:
        images = torch.flip(images, dims=(-1,))
    return torch.rot90(images, g % 4, dims=(-2, -1))


def digits_d4() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten 8x8 digits under each of the eight symmetries of the
    square, every (symmetry, digit) pair a class: 80 classes, 14376 images.

    Image ``i`` of transform ``g`` is ``d4_transform(digit_i, g)`` at row ``g * 1797 + i`` with
    class ``10 * g + digit``; pixel values 0..16 are divided by 16. Digits that are nearly
    symmetric make some classes look alike (a 0 or an 8 under ``rot180``, a 6 under ``rot180``
    and a 9, a 1 under ``flip``): the task is harder than its 80 classes suggest, which is
    acceptable for a test of mechanics. With so few underlying shapes, split classes with
    :func:`bilevel.meta.class_splits` and report a meta-learner beside
    :func:`bilevel.meta.nearest_centroid`.

    Returns:
        ``x`` ``(14376, 1, 8, 8)`` ``float32`` in ``[0, 1]`` and ``y`` ``(14376,)`` ``int64``
        in ``0 .. 79``.

    Raises:
        DataError: when scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits_d4 needs scikit-learn's bundled digits: pip install "
                        "scikit-learn") from None
    bunch = load_digits()
    base = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    digit = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x = torch.cat([d4_transform(base, g) for g in range(8)])
    y = torch.cat([10 * g + digit for g in range(8)])
    return x.contiguous(), y


# --------------------------------------------------------------------------------------------
# Omniglot
# --------------------------------------------------------------------------------------------


def _pil_image() -> Any:
    """``PIL.Image``, imported on first use."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("load_omniglot reads PNG files with Pillow (a dependency of "
                        "bilevel): pip install pillow") from None
    return Image


def _entries(folder: Path) -> list[Path]:
    """The non-hidden entries of ``folder``, sorted by name."""
    try:
        found = list(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc})") from exc
    return sorted((p for p in found if not p.name.startswith(".")), key=lambda p: p.name)


def _subfolders(folder: Path, what: str) -> list[Path]:
    """The sub-folders of ``folder``; any other (non-hidden) entry is an error."""
    out = []
    for entry in _entries(folder):
        if not entry.is_dir():
            raise DataError(f"{entry}: expected only {what} folders in {folder}")
        out.append(entry)
    return out


def _image_sets(root: Path) -> list[Path]:
    """The folders of alphabets under ``root``: its ``images_background`` and
    ``images_evaluation`` when it has either, else ``root`` itself."""
    if not root.exists():
        raise DataError(f"{root}: Omniglot folder not found (expected {root}/images_background/"
                        f"<alphabet>/<character>/*.png)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the Omniglot folder with "
                        f"images_background/ or images_evaluation/)")
    sets = [root / name for name in OMNIGLOT_SETS if (root / name).is_dir()]
    return sets or [root]


def _read_character(image_mod: Any, path: Path, size: int) -> np.ndarray:
    """One drawing as ``float32`` ``(size, size)``, ink 1 on a background of 0."""
    try:
        with image_mod.open(path) as img:
            gray = img.convert("L")
            if gray.size != (size, size):
                gray = gray.resize((size, size), resample=image_mod.Resampling.LANCZOS)
            arr = np.asarray(gray, dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return 1.0 - arr / 255.0


def load_omniglot(
    root: PathLike,
    rotations: bool = True,
    image_size: int = 28,
) -> tuple[Tensor, Tensor, list[str]]:
    """Omniglot from local disk: 1623 handwritten characters of 50 alphabets, 20 drawings each.

    Layout (that of the release, ``images_background.zip`` and ``images_evaluation.zip``
    unpacked): ``root/images_background/<alphabet>/<character>/*.png`` and/or
    ``root/images_evaluation/<alphabet>/<character>/*.png``; both are read when present
    (background first), or ``root`` may be one of them (``root/<alphabet>/<character>/*``).
    Hidden files are skipped; anything else out of place is an error.

    Each character is a class, numbered in the order read (set, alphabet, character, all by
    name). Images are converted to grayscale, resized to ``image_size`` square with Pillow's
    Lanczos filter (as in the MAML code) and inverted so that ink is 1 and paper 0.

    With ``rotations``, the character's drawings turned by 90, 180 and 270 degrees
    (``torch.rot90(x, r, dims=(-2, -1))``, counter-clockwise) are new classes, as in the MAML
    paper: class ``r * C + c`` is character ``c`` turned ``r`` quarter turns, named
    ``"<alphabet>/<character>/rot90"`` (``/rot180``, ``/rot270``; no suffix for ``r = 0``),
    and the rows of ``x`` come in the same rotation-major blocks. To keep a character's
    rotations in one split, use ``class_splits(4 * C, groups=[k % C for k in range(4 * C)])``.
    The full dataset with rotations is 129840 images (about 400 MB at 28x28 in ``float32``).

    Returns:
        ``x`` ``(N, 1, image_size, image_size)`` ``float32`` in ``[0, 1]``, ``y`` ``(N,)``
        ``int64`` and the class names, ``"<alphabet>/<character>[/rot90]"``.

    Raises:
        DataError: naming the path and what is wrong: a missing folder, an alphabet without
            characters, a character without images, a file that is not a PNG/JPEG image or
            cannot be read, no images at all, the same character in both sets, or Pillow not
            installed.
        BilevelInputError: ``image_size`` not a positive int.

    References:
        Lake, Salakhutdinov, Tenenbaum, "Human-level concept learning through
        probabilistic program induction", Science 350, 2015 (the dataset); rotations as
        new classes: Santoro et al., ICML 2016, and Finn et al., ICML 2017.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise BilevelInputError(f"load_omniglot: image_size must be a positive int, got "
                                f"{image_size!r}")
    root = Path(root)
    characters: dict[str, list[Path]] = {}
    for image_set in _image_sets(root):
        alphabets = _subfolders(image_set, "alphabet")
        if not alphabets:
            raise DataError(f"{image_set}: no images (expected <alphabet>/<character>/*.png "
                            f"folders)")
        for alphabet in alphabets:
            chars = _subfolders(alphabet, "character")
            if not chars:
                raise DataError(f"{alphabet}: alphabet folder holds no character folders")
            for char in chars:
                files = _entries(char)
                if not files:
                    raise DataError(f"{char}: character folder holds no images")
                for f in files:
                    if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                        raise DataError(f"{f}: not an image file (expected "
                                        f"{', '.join(IMAGE_SUFFIXES)} files in {char})")
                name = f"{alphabet.name}/{char.name}"
                if name in characters:
                    raise DataError(f"{char}: character {name} is also in "
                                    f"{characters[name][0].parent}")
                characters[name] = files
    image_mod = _pil_image()
    images, labels = [], []
    for label, files in enumerate(characters.values()):
        images.extend(_read_character(image_mod, f, image_size) for f in files)
        labels.extend([label] * len(files))
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.long)
    names = list(characters)
    if not rotations:
        return x, y, names
    num = len(names)
    x = torch.cat([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)]).contiguous()
    y = torch.cat([y + r * num for r in range(4)])
    names = [name + suffix for suffix in _ROTATION_NAMES for name in names]
    return x, y, names
