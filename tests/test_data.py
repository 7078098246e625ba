"""Tests for :mod:`bilevel.data` (the old location of :mod:`bilevel.datasets`, re-exporting it):
the IDX reader, the loaders and their error messages. New behaviour: tests/test_datasets.py."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.data import (
    FASHION_MNIST_FILES,
    DataError,
    ImageDataset,
    load_arrays,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    load_image_folder,
    read_idx,
)

_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype("i2"): 0x0B,
    np.dtype("i4"): 0x0C,
    np.dtype("f4"): 0x0D,
    np.dtype("f8"): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as IDX: magic, big-endian sizes, big-endian data."""
    code = _CODES[arr.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> Path:
    """Write ``arr`` to ``path`` as an IDX file, optionally gzip-compressed."""
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def tiny_split(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random tiny ``uint8`` images (5x4) and labels cycling through ``classes``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.uint8)
    return x, y


def write_mnist_dir(root: Path, compress: bool) -> dict[str, np.ndarray]:
    """Write four tiny IDX files under the standard MNIST names; return the arrays."""
    root.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = tiny_split(20, 1)
    te_x, te_y = tiny_split(10, 2)
    arrays = {"image_train": tr_x, "label_train": tr_y, "image_test": te_x, "label_test": te_y}
    for key, arr in arrays.items():
        name = FASHION_MNIST_FILES[key] + (".gz" if compress else "")
        write_idx(root / name, arr, compress)
    return arrays


# ---------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(7, dtype=np.uint8),
        np.arange(-5, 5, dtype=np.int8),
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10,
        np.array([-30000, 0, 1, 30000], dtype=np.int16),
        np.array([[-(2**31), 2**31 - 1], [7, -7]], dtype=np.int32),
        np.linspace(-1.5, 2.5, 24, dtype=np.float32).reshape(2, 3, 4),
        np.array([np.pi, -np.e, 1e300], dtype=np.float64),
    ],
    ids=["u8-1d", "i8", "u8-3d", "i16", "i32", "f32-3d", "f64"],
)
def test_read_idx_round_trip(tmp_path: Path, arr: np.ndarray, compress: bool) -> None:
    path = write_idx(tmp_path / "a.idx", arr, compress)
    out = read_idx(path)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == arr.shape
    assert out.numpy().dtype == arr.dtype
    np.testing.assert_array_equal(out.numpy(), arr)


def test_read_idx_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_without_suffix = write_idx(tmp_path / "plain-name", arr, compress=True)
    plain_with_suffix = write_idx(tmp_path / "looks.gz", arr, compress=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix).numpy(), arr)
    np.testing.assert_array_equal(read_idx(plain_with_suffix).numpy(), arr)


def test_read_idx_empty_dimension(tmp_path: Path) -> None:
    out = read_idx(write_idx(tmp_path / "e", np.zeros((0, 3), dtype=np.uint8)))
    assert tuple(out.shape) == (0, 3)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:6], "truncated"),  # inside the size fields
        (lambda b: b[:3], "truncated"),  # inside the magic
        (lambda b: b + b"\x00\x01", "trailing"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:1] + b"\x07" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x0a" + b[3:], "unknown IDX type code 0x0A"),
        (lambda b: b[:3] + b"\x00", "zero dimensions"),
    ],
    ids=["truncated-data", "truncated-header", "truncated-magic", "trailing", "magic0",
         "magic1", "type-code", "ndim0"],
)
def test_read_idx_errors_name_the_file(tmp_path: Path, mutate, message: str,
                                       compress: bool) -> None:
    data = mutate(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
    path = tmp_path / "broken-file.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert "broken-file.idx" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_missing_and_corrupt_gzip(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))[:-10])
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(bad)


# ---------------------------------------------------------------------------- load_idx_dataset


def test_load_idx_dataset(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path, compress=False)
    ds = load_idx_dataset(
        *(tmp_path / FASHION_MNIST_FILES[k]
          for k in ("image_train", "label_train", "image_test", "label_test")),
        name="tiny",
    )
    assert ds.name == "tiny" and ds.num_classes == 10
    assert ds.train_x.shape == (20, 1, 5, 4) and ds.test_x.shape == (10, 1, 5, 4)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    # float32 pixels against float64 k/255: one or two float32 roundings of values ≤ 1,
    # ≤ ulp(1)/2 ≈ 6e-8 < 1e-7 on any IEEE-754 machine (here and below)
    np.testing.assert_allclose(ds.train_x[:, 0].numpy(), arrays["image_train"] / 255.0,
                               rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["label_test"])
    assert ds.image_shape == (1, 5, 4) and ds.num_channels == 1


def test_load_idx_dataset_float_images_and_mismatch(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 2, 3, 3)).astype(np.float32)  # (N, C, H, W)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    p = {n: tmp_path / n for n in ("xtr", "ytr", "xte", "yte")}
    write_idx(p["xtr"], x)
    write_idx(p["ytr"], y)
    write_idx(p["xte"], x[:2], compress=True)
    write_idx(p["yte"], y[:3])  # 2 images, 3 labels
    with pytest.raises(DataError, match="2 images .*3 labels"):
        load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"])
    write_idx(p["yte"], y[:2])
    ds = load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"], name="f")
    assert ds.train_x.shape == (6, 2, 3, 3) and ds.num_classes == 3
    torch.testing.assert_close(ds.train_x, torch.from_numpy(x))
    write_idx(p["ytr"], x[:, 0, 0, 0].copy())  # float labels
    with pytest.raises(DataError, match="ytr.*integer"):
        load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"])


# ---------------------------------------------------------------------------- digits


def test_load_digits() -> None:
    ds = load_digits()
    assert isinstance(ds, ImageDataset) and ds.name == "digits" and ds.num_classes == 10
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.test_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert 0.0 <= float(ds.test_x.min()) and float(ds.test_x.max()) <= 1.0
    # values are k / 16
    torch.testing.assert_close(ds.train_x * 16, (ds.train_x * 16).round())
    # stratified: every class's share of the test set matches its share overall (within 1)
    all_y = torch.cat([ds.train_y, ds.test_y])
    counts = torch.bincount(all_y, minlength=10)
    test_counts = torch.bincount(ds.test_y, minlength=10)
    assert int(counts.sum()) == 1797
    expected = counts.double() * 360 / 1797
    assert torch.all((test_counts.double() - expected).abs() <= 1.0)
    # deterministic, and the seed matters
    again = load_digits()
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    other = load_digits(seed=1)
    assert not torch.equal(ds.test_y, other.test_y) or not torch.equal(ds.test_x, other.test_x)


def test_split_validation_and_to() -> None:
    ds = load_digits()
    split = ds.split_validation(0.2, seed=3)
    assert len(split.train_y) + len(split.test_y) == len(ds.train_y)
    assert torch.equal(split.test_y, ds.split_validation(0.2, seed=3).test_y)
    val_counts = torch.bincount(split.test_y, minlength=10)
    train_counts = torch.bincount(ds.train_y, minlength=10)
    assert torch.all((val_counts.double() - 0.2 * train_counts.double()).abs() <= 1.0)
    assert split.num_classes == 10 and "val" in split.name
    moved = ds.to("cpu")
    assert moved.train_x.device.type == "cpu" and moved.num_classes == ds.num_classes
    with pytest.raises(ValueError, match="fraction"):
        ds.split_validation(1.0)


# ---------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(root=root)
    msg = str(info.value)
    assert f"Fashion-MNIST not found in {root}" in msg
    assert "dataset-fashion-mnist" in msg and "apt-get install" in msg and "root=" in msg


def test_fashion_mnist_default_root_missing_or_real() -> None:
    try:
        ds = load_fashion_mnist()
    except DataError as exc:
        assert "dataset-fashion-mnist" in str(exc)
    else:  # the Debian package is installed here
        assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
        assert ds.num_classes == 10


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_tmp_root(tmp_path: Path, compress: bool) -> None:
    arrays = write_mnist_dir(tmp_path / "fm", compress)
    ds = load_fashion_mnist(root=tmp_path / "fm")
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (20, 1, 5, 4)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["label_train"])
    via_name = load_dataset("fashion_mnist", root=tmp_path / "fm")
    assert torch.equal(via_name.test_x, ds.test_x)


def test_fashion_mnist_partial_root(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, compress=False)
    (tmp_path / FASHION_MNIST_FILES["label_test"]).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(root=tmp_path)


# ---------------------------------------------------------------------------- arrays / dispatch


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.random((12, 3, 4, 4)).astype(np.float32),
        "train_y": np.arange(12) % 4,
        "test_x": rng.random((5, 3, 4, 4)).astype(np.float32),
        "test_y": np.arange(5) % 4,
    }


def test_npz_round_trip(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    ds = load_dataset(path)
    assert ds.name == "mine" and ds.num_classes == 4
    for key in arrays:
        np.testing.assert_array_equal(getattr(ds, key).numpy(), arrays[key])
    with pytest.raises(DataError, match=r"mine\.npz\[train_y\]: 7 classes but 3 of them have "
                       r"no training example \(classes 4, 5, 6\)"):
        load_dataset(str(path), num_classes=7)  # classes 4..6 would never be learnt
    np.savez(tmp_path / "partial.npz", train_x=arrays["train_x"])
    with pytest.raises(DataError, match="missing arrays"):
        load_dataset(tmp_path / "partial.npz")
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "absent.npz")


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("digits").train_x.shape == (1437, 1, 8, 8)
    write_mnist_dir(tmp_path / "mydir", compress=True)
    ds = load_dataset(tmp_path / "mydir")
    assert ds.name == "mydir" and ds.train_x.shape == (20, 1, 5, 4)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar-1000")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset(tmp_path / "empty")


def test_load_arrays_uint8_scaling() -> None:
    x = np.array([[[0, 255], [51, 102]], [[255, 0], [102, 51]]], dtype=np.uint8)
    # two training classes: a single-class training split is refused (test_datasets.py)
    ds = load_arrays(x, np.array([1, 0]), x[:1], np.array([0]), name="u8")
    torch.testing.assert_close(ds.train_x, torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]],
                                                         [[[1.0, 0.0], [0.4, 0.2]]]]))
    assert ds.num_classes == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_y": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, -1])}, r"labels lie in \[-1"),
        ({"test_y": np.array([0, 1, 2, 3, 9])}, r"test_y: labels lie in \[0, 9\], expected"),
        ({"train_y": np.arange(11) % 4}, "12 images .*11 labels"),
        ({"test_x": np.zeros((5, 3, 4, 5), dtype=np.float32)}, "train images are"),
        ({"train_x": np.zeros((12, 4), dtype=np.float32)}, "images must be"),
        ({"train_y": (np.arange(12) % 4).reshape(12, 1)}, "labels must be 1-D"),
        ({"train_y": (np.arange(12) % 4).astype(np.float32)}, "integer dtype"),
        ({"train_x": np.full((12, 3, 4, 4), 2.0, dtype=np.float32)}, r"expected \[0, 1\]"),
        ({"train_x": np.full((12, 3, 4, 4), np.nan, dtype=np.float32)}, "NaN"),
        ({"train_x": np.zeros((12, 3, 4, 4), dtype=np.int32)}, "pixel_max"),
    ],
    ids=["negative-label", "label-too-big", "count", "image-shape", "ndim", "label-ndim",
         "label-dtype", "range", "nan", "int32"],
)
def test_load_arrays_errors(change: dict[str, np.ndarray], message: str) -> None:
    arrays = {**_arrays(), **change}
    kw = {"num_classes": 4} if "labels lie" in message else {}
    with pytest.raises(DataError, match=message):
        load_arrays(**arrays, name="bad", **kw)


def test_load_arrays_pixel_max() -> None:
    arrays = _arrays()
    arrays["train_x"] = (arrays["train_x"] * 1000).astype(np.int32)
    arrays["test_x"] = (arrays["test_x"] * 1000).astype(np.int32)
    ds = load_arrays(**arrays, pixel_max=1000)
    assert float(ds.train_x.max()) <= 1.0 and ds.train_x.dtype == torch.float32


# ---------------------------------------------------------------------------- image folders


def write_png(path: Path, arr: np.ndarray, fmt: str = "PNG") -> Path:
    """Write a ``uint8`` ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB) array as an image."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_image_folder(root: Path, rgb: bool = False, size: tuple[int, int] = (6, 5),
                       counts: tuple[int, int] = (3, 2)) -> dict[str, list[np.ndarray]]:
    """``root/{train,test}/{cat,dog}/NN.png`` with random pixels; the arrays per split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (*size, 3) if rgb else size
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, n in zip(("train", "test"), counts, strict=True):
        for cls in ("dog", "cat"):  # labels come from the sorted names: cat 0, dog 1
            for i in range(n):
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                write_png(root / split / cls / f"{i:02d}.png", arr)
    for split in written:
        for cls in ("cat", "dog"):
            for f in sorted((root / split / cls).iterdir()):
                with Image.open(f) as img:
                    written[split].append(np.asarray(img))
    return written


def test_load_image_folder_grayscale(tmp_path: Path) -> None:
    arrays = write_image_folder(tmp_path / "pets")
    ds = load_image_folder(tmp_path / "pets")
    assert ds.name == "pets" and ds.num_classes == 2
    assert ds.train_x.shape == (6, 1, 6, 5) and ds.test_x.shape == (4, 1, 6, 5)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(ds.train_x[:, 0].numpy(), np.stack(arrays["train"]) / 255.0,
                               rtol=0, atol=1e-7)
    via = load_dataset(tmp_path / "pets")  # a directory with train/ and test/
    assert torch.equal(via.test_x, ds.test_x)
    rgb = load_image_folder(tmp_path / "pets", grayscale=False)
    assert rgb.train_x.shape == (6, 3, 6, 5)
    assert torch.equal(rgb.train_x[:, 2], ds.train_x[:, 0])
    assert load_image_folder(tmp_path / "pets", num_classes=2).num_classes == 2


def test_load_image_folder_rgb_and_jpeg(tmp_path: Path) -> None:
    arrays = write_image_folder(tmp_path / "c", rgb=True, counts=(2, 1))
    ds = load_dataset(tmp_path / "c")
    assert ds.train_x.shape == (4, 3, 6, 5)
    np.testing.assert_allclose(ds.train_x.permute(0, 2, 3, 1).numpy(),
                               np.stack(arrays["train"]) / 255.0, rtol=0, atol=1e-7)
    gray = load_image_folder(tmp_path / "c", grayscale=True)
    assert gray.train_x.shape == (4, 1, 6, 5)
    assert 0.0 <= float(gray.train_x.min()) and float(gray.train_x.max()) <= 1.0
    # a JPEG next to the PNGs, and a grayscale image among colour ones: RGB for all
    write_png(tmp_path / "c" / "test" / "dog" / "x.JPG", np.full((6, 5), 128, np.uint8), "JPEG")
    mixed = load_image_folder(tmp_path / "c")
    assert mixed.test_x.shape == (3, 3, 6, 5)
    torch.testing.assert_close(mixed.test_x[-1], torch.full((3, 6, 5), 128 / 255), atol=0.02,
                               rtol=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: write_png(r / "train" / "cat" / "big.png", np.zeros((7, 5), np.uint8)),
         r"big\.png: image is 5x7 pixels but .* is 5x6"),
        (lambda r: (r / "test" / "dog" / "bad.png").write_bytes(b"not a png"),
         r"bad\.png: cannot read image"),
        (lambda r: write_png(r / "test" / "bird" / "0.png", np.zeros((6, 5), np.uint8)),
         r"different class folders .*only in test: \['bird'\]"),
        (lambda r: (r / "train" / "dog" / "notes.txt").write_text("x"),
         r"notes\.txt: not an image file"),
        (lambda r: (r / "train" / "fish").mkdir(), r"fish: class folder holds no images"),
        (lambda r: (r / "train" / "readme.md").write_text("x"),
         r"readme\.md: expected only class folders"),
    ],
    ids=["size", "unreadable", "classes", "stray-file", "empty-class", "stray-top"],
)
def test_load_image_folder_errors(tmp_path: Path, damage, message: str) -> None:
    write_image_folder(tmp_path, counts=(1, 1))
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped
    load_image_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_image_folder(tmp_path)


def test_load_image_folder_layout_errors(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "a", counts=(1, 1))
    with pytest.raises(DataError, match="num_classes=3 but there are 2 class folders"):
        load_image_folder(tmp_path / "a", num_classes=3)
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ folder"):
        load_image_folder(tmp_path / "b")
    with pytest.raises(DataError, match=r"b: looks like an image folder but has no test/ "
                       r"subfolder"):  # not an IDX folder either: said as an image folder
        load_dataset(tmp_path / "b")
