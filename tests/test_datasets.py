"""Tests for :mod:`bilevel.datasets`: class names, stratified splits, the torch adapter, load-time
checks of bad data, and the data root (``root=``, ``$BILEVEL_DATA``, ``--data-root``).

The IDX, array, folder and digits basics are in tests/test_data.py (through the old module
:mod:`bilevel.data`, which re-exports this package).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import idx_bytes, tiny_split, write_idx, write_image_folder, write_mnist_dir

import bilevel.data
import bilevel.datasets
from bilevel.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    DataError,
    ImageDataset,
    from_torch_dataset,
    load_arrays,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    load_image_folder,
    load_tabular,
    read_idx,
    stratified_indices,
    stratified_split,
)

# ---------------------------------------------------------------------------- the package


def test_old_module_re_exports_the_package() -> None:
    """``bilevel.data`` keeps every name it exported, as the very same objects."""
    for name in bilevel.data.__all__:
        assert getattr(bilevel.data, name) is getattr(bilevel.datasets, name), name
    assert bilevel.data.IMAGE_SUFFIXES is bilevel.datasets.IMAGE_SUFFIXES  # meta/datasets.py
    assert set(bilevel.data.__all__) >= {"DataError", "ImageDataset", "load_dataset",
                                         "load_digits", "load_fashion_mnist", "read_idx"}
    assert "old location" in bilevel.data.__doc__


# ---------------------------------------------------------------------------- class names


def test_class_names_of_named_datasets_and_folders(tmp_path: Path) -> None:
    digits = load_digits()
    assert digits.class_names == tuple("0123456789") and digits.class_name(3) == "3"
    write_mnist_dir(tmp_path / "fm", compress=False)
    fm = load_fashion_mnist(tmp_path / "fm")
    assert fm.class_names == FASHION_MNIST_CLASSES and len(fm.class_names) == 10
    assert fm.class_name(0) == "T-shirt/top" and fm.class_name(9) == "Ankle boot"
    write_image_folder(tmp_path / "pets", counts=(1, 1))
    pets = load_image_folder(tmp_path / "pets")
    assert pets.class_names == ("cat", "dog") and pets.class_name(1) == "dog"
    # split_validation and .to keep them; a dataset without names shows numbers
    assert fm.split_validation(0.5).class_names == FASHION_MNIST_CLASSES
    assert pets.to("cpu").class_names == ("cat", "dog")
    idx = load_dataset(tmp_path / "fm")  # a bare IDX folder names no classes
    assert idx.class_names == () and idx.class_name(7) == "7"


def test_npz_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.random((6, 1, 3, 3)), "train_y": np.array([0, 1, 2] * 2),
              "test_x": rng.random((3, 1, 3, 3)), "test_y": np.array([0, 1, 2])}
    np.savez(tmp_path / "named.npz", **arrays, class_names=np.array(["a", "b", "c", "d"]))
    # num_classes comes from the names: a class absent from the training data is refused
    with pytest.raises(DataError, match=r"named\.npz\[train_y\]: 4 classes \(4 class names\) "
                       r"but 1 of them has no training example \(classes 3\)"):
        load_dataset(tmp_path / "named.npz")
    np.savez(tmp_path / "named.npz", **arrays, class_names=np.array(["a", "b", "c"]))
    ds = load_dataset(tmp_path / "named.npz")
    assert ds.class_names == ("a", "b", "c") and ds.num_classes == 3
    with pytest.raises(DataError, match=r"3 class names for num_classes=4"):
        load_dataset(tmp_path / "named.npz", num_classes=4)
    np.savez(tmp_path / "short.npz", **arrays, class_names=np.array(["a", "b"]))
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "short.npz")
    # two names, so two classes: the label 2 is out of range, in the file named
    assert "short.npz[train_y]" in str(info.value) and "expected [0, 1]" in str(info.value)
    np.savez(tmp_path / "numbers.npz", **arrays, class_names=np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"numbers\.npz\[class_names\].*strings"):
        load_dataset(tmp_path / "numbers.npz")


def test_image_dataset_checks_class_names() -> None:
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(DataError, match="toy: 3 class names for 2 classes"):
        ImageDataset(x, y, x, y, num_classes=2, name="toy", class_names=("a", "b", "c"))
    with pytest.raises(DataError, match="sequence of strings"):
        ImageDataset(x, y, x, y, num_classes=2, name="toy", class_names="ab")  # type: ignore
    ds = ImageDataset(x, y, x, y, num_classes=2, name="toy", class_names=["a", "b"])  # type: ignore
    assert ds.class_names == ("a", "b")  # stored as a tuple
    with pytest.raises(DataError, match="1 class names for num_classes=2"):
        load_arrays(x.numpy(), y.numpy(), x.numpy(), y.numpy(), num_classes=2, class_names=["a"])


# ---------------------------------------------------------------------------- stratified splits


def test_stratified_indices_spread_every_class() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 7 + [3] * 1)
    parts = stratified_indices(labels, [44, 22, 22], seed=5)
    assert [len(p) for p in parts] == [44, 22, 22]
    assert sorted(torch.cat(parts).tolist()) == list(range(88))  # a partition
    counts = torch.bincount(labels, minlength=4).double()
    for part in parts:
        got = torch.bincount(labels[part], minlength=4).double()
        assert torch.all((got - counts * len(part) / 88).abs() <= 1.0), got
    again = stratified_indices(labels, [44, 22, 22], seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = stratified_indices(labels, [44, 22, 22], seed=6)
    assert not torch.equal(parts[0].sort().values, other[0].sort().values)
    with pytest.raises(ValueError, match="sum to 88"):
        stratified_indices(labels, [44, 22])


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_load_tabular_is_stratified(name: str) -> None:
    splits = load_tabular(name, 0.5, 0.25, seed=0)
    y_all = torch.cat([y for _, y in splits.values()])
    n = len(y_all)
    assert [len(splits[k][1]) for k in ("train", "val", "test")] == \
        [int(0.5 * n), int(0.25 * n), n - int(0.5 * n) - int(0.25 * n)]
    counts = torch.bincount(y_all).double()
    for x, y in splits.values():
        assert x.dtype == torch.float64 and y.dtype == torch.int64 and x.shape[0] == len(y)
        share = torch.bincount(y, minlength=len(counts)).double()
        assert torch.all((share - counts * len(y) / n).abs() <= 1.0), (name, share)
    # the parts are a partition: together they hold every example of the data once
    from sklearn import datasets

    x_all, _ = getattr(datasets, f"load_{name}")(return_X_y=True)
    rows = torch.cat([x for x, _ in splits.values()])
    x_all = torch.from_numpy(x_all)
    perm = torch.arange(x_all.shape[1], dtype=torch.float64) + 1  # a generic projection
    torch.testing.assert_close((rows @ perm).sort().values, (x_all @ perm).sort().values)


def test_stratified_split_errors() -> None:
    x = torch.randn(10, 2)
    y = torch.tensor([0, 1] * 5)
    with pytest.raises(DataError, match=r"mine: labels lie in \[-1, 1\]"):
        stratified_split(x, torch.tensor([-1, 1] * 5), 0.5, 0.2, name="mine")
    with pytest.raises(DataError, match="mine: the val part is empty"):
        stratified_split(x, y, 0.5, 0.05, name="mine")
    with pytest.raises(DataError, match="mine: the training part holds only class 0"):
        stratified_split(x, torch.zeros(10, dtype=torch.long), 0.5, 0.2, name="mine")
    with pytest.raises(DataError, match="mine: labels must be 1-D integers"):
        stratified_split(x, y.float(), 0.5, 0.2, name="mine")
    with pytest.raises(DataError, match="fractions"):
        stratified_split(x, y, 0.8, 0.2, name="mine")
    with pytest.raises(DataError, match="unknown tabular dataset 'mnist'"):
        load_tabular("mnist")


def test_bilevel_run_split_is_stratified() -> None:
    """`bilevel run`'s tabular data comes from the stratified split (standardised after)."""
    from bilevel.cli import load_data
    from bilevel.config import parse_config

    cfg = parse_config({
        "model": {"sizes": [4]}, "data": {"dataset": "iris", "standardize": False},
        "hyperparameters": {"tune": ["log_lr"]}, "inner": {"steps": 1},
        "estimator": {"name": "unrolled"}, "outer": {"lr": 0.1, "steps": 1},
        "output": {"dir": "unused"}})
    data = load_data(cfg)
    assert {k: torch.bincount(y).tolist() for k, (_, y) in data.items()} == \
        {"train": [25, 25, 25], "val": [12, 13, 12], "test": [13, 12, 13]}
    expected = load_tabular("iris", 0.5, 0.25, seed=0)
    for k, (x, y) in data.items():
        torch.testing.assert_close(x, expected[k][0].float())
        assert torch.equal(y, expected[k][1])


# ---------------------------------------------------------------------------- torch adapter


class PairDataset(torch.utils.data.Dataset):
    """A minimal map-style dataset of the given items."""

    def __init__(self, items: list, classes: list[str] | None = None) -> None:
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class FakeFashionMNIST(torch.utils.data.Dataset):
    """Shaped like ``torchvision.datasets.FashionMNIST`` (``data`` uint8 ``(N, H, W)``,
    ``targets``, ``classes``; items are ``(PIL image, int)``), without torchvision or files."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, n: int, seed: int, transform=None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (n, 7, 6), dtype=torch.uint8, generator=gen)
        self.targets = torch.arange(n) % 10
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index].numpy(), mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def test_from_torch_dataset_torchvision_like() -> None:
    train, test = FakeFashionMNIST(30, 0), FakeFashionMNIST(10, 1)
    ds = from_torch_dataset(train, test, name="fake")
    assert ds.name == "fake" and ds.num_classes == 10
    assert ds.class_names == FASHION_MNIST_CLASSES  # from the dataset's .classes
    assert ds.train_x.shape == (30, 1, 7, 6) and ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and torch.equal(ds.train_y, train.targets)
    torch.testing.assert_close(ds.train_x[:, 0], train.data.float() / 255, rtol=0, atol=1e-7)
    torch.testing.assert_close(ds.test_x[:, 0], test.data.float() / 255, rtol=0, atol=1e-7)
    # a ToTensor-like transform (float (C, H, W) in [0, 1]) gives the same images
    def to_tensor(img) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None]

    same = from_torch_dataset(FakeFashionMNIST(30, 0, to_tensor), test)
    torch.testing.assert_close(same.train_x, ds.train_x)
    # max_items: evenly spaced items, so a class-sorted dataset keeps its classes
    small = from_torch_dataset(train, test, max_items=10)
    assert len(small.train_y) == len(small.test_y) == 10
    assert torch.equal(small.train_y, train.targets[torch.arange(10) * 3])


def test_from_torch_dataset_image_kinds() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # NumPy (H, W, C)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()  # tensor (C, H, W)
    items = [
        (chw, 0),                                       # uint8 tensor, int label
        (chw.float() / 255, torch.tensor(1)),           # float tensor, 0-d tensor label
        (hwc, np.int64(2)),                             # NumPy HWC uint8, NumPy label
        (Image.fromarray(hwc), 0),                      # RGB PIL image
        (torch.from_numpy(hwc), 1),                     # a tensor (H, W, C): detected
        (Image.fromarray(hwc).convert("RGBA"), 2),      # alpha dropped
    ]
    ds = from_torch_dataset(PairDataset(items, classes=["x", "y", "z"]),
                            PairDataset(items[:3]), name="kinds")
    assert ds.train_x.shape == (6, 3, 6, 5) and ds.class_names == ("x", "y", "z")
    want = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    for i in range(6):
        torch.testing.assert_close(ds.train_x[i], want, rtol=0, atol=1e-6)
    assert ds.train_y.tolist() == [0, 1, 2, 0, 1, 2]
    gray = [(torch.rand(4, 5), 0), (rng.integers(0, 256, (4, 5), dtype=np.uint8), 1)]
    g = from_torch_dataset(PairDataset(gray), PairDataset(gray), class_names=["a", "b"])
    assert g.train_x.shape == (2, 1, 4, 5) and g.class_names == ("a", "b")


class Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        if i == 2:
            raise FileNotFoundError("img_2.png")
        return torch.zeros(1, 2, 2), i


@pytest.mark.parametrize(("items", "message"), [
    ([(torch.zeros(1, 2, 2), 0), torch.zeros(1, 2, 2)], r"bad\.train\[1\]: expected an "
     r"\(image, label\) pair, got Tensor"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 2, 2), 1, "extra")],
     r"bad\.train\[1\]: expected an \(image, label\) pair, got a 3-tuple"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 2), 1)],
     r"bad\.train\[1\]: image of shape .*\(1, 3, 2\) but bad\.train\[0\] is \(1, 2, 2\)"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 2, 2), 1.0)],
     r"bad\.train\[1\]: label must be an int .*float 1\.0"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 2, 2), torch.tensor([1]))],
     r"bad\.train\[1\]: label .*shape \(1,\)"),
    ([(torch.zeros(1, 2, 2), 0), ("image.png", 1)], r"bad\.train\[1\]: image of type str"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(2, 2, 2, 2), 1)],
     r"bad\.train\[1\]: image of shape \(2, 2, 2, 2\)"),
    ([(torch.zeros(1, 2, 2, dtype=torch.int32), 0)], r"bad\.train\[0\]: image of dtype int32"),
    ([(torch.zeros(1, 2, 2), 0), (torch.full((1, 2, 2), 2.0), 1)],
     r"bad\.train\[1\]: pixel values lie in \[2, 2\], expected \[0, 1\] \(for float pixels "
     r"in 0\.\.255 pass pixel_max=255\)"),
    ([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 2, 2), 0)],
     r"bad\.train: the training split of bad holds only class 0"),
    ([], r"bad\.train: the dataset is empty"),
])
def test_from_torch_dataset_errors(items: list, message: str) -> None:
    test = PairDataset([(torch.zeros(1, 2, 2), 0)])
    with pytest.raises(DataError, match=message):
        from_torch_dataset(PairDataset(items), test, name="bad")


def test_from_torch_dataset_dataset_failures() -> None:
    good = PairDataset([(torch.zeros(1, 2, 2), 0), (torch.ones(1, 2, 2), 1)])
    with pytest.raises(DataError, match=r"t\.test\[2\]: reading the item failed "
                       r"\(FileNotFoundError: img_2\.png\)"):
        from_torch_dataset(good, Broken(), name="t")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 2, 2), 0

    with pytest.raises(DataError, match=r"t\.test: Stream has no len\(\)"):
        from_torch_dataset(good, Stream(), name="t")
    with pytest.raises(DataError, match=r"t\.test: labels lie in \[5, 5\], expected \[0, 1\]"):
        from_torch_dataset(good, PairDataset([(torch.zeros(1, 2, 2), 5)]), name="t")
    with pytest.raises(DataError, match="max_items must be a positive int"):
        from_torch_dataset(good, good, max_items=0)


def test_from_torch_dataset_progress(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    """A progress bar above PROGRESS_MIN_ITEMS items (lowered here), none below."""
    from bilevel.datasets import adapter

    train, test = FakeFashionMNIST(30, 0), FakeFashionMNIST(10, 1)
    from_torch_dataset(train, test, name="quiet")
    assert "quiet" not in capsys.readouterr().err
    monkeypatch.setattr(adapter, "PROGRESS_MIN_ITEMS", 20)
    from_torch_dataset(train, test, name="shown")
    err = capsys.readouterr().err
    assert "converting shown" in err and "/40" in err


# ---------------------------------------------------------------------------- bad data


def test_truncated_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez_compressed(good, train_x=rng.random((50, 1, 8, 8)), train_y=np.arange(50) % 2,
                        test_x=rng.random((10, 1, 8, 8)), test_y=np.arange(10) % 2)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 40):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError) as info:
            load_dataset(bad)
        msg = str(info.value)
        assert str(bad) in msg and "truncated or corrupt" in msg, msg
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"array\.npz: not an \.npz archive"):
        load_dataset(npy)


def test_channels_last_arrays_are_transposed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 3, 8, 7), dtype=np.uint8)
    nhwc = nchw.transpose(0, 2, 3, 1).copy()  # (6, 8, 7, 3): not 8 channels of 7x3 images
    y = np.arange(6) % 2
    ds = load_arrays(nhwc, y, nhwc[:2], y[:2])
    assert ds.train_x.shape == (6, 3, 8, 7)
    torch.testing.assert_close(ds.train_x, torch.from_numpy(nchw).float() / 255)
    np.savez(tmp_path / "hwc.npz", train_x=nhwc, train_y=y, test_x=nhwc[:2], test_y=y[:2])
    assert torch.equal(load_dataset(tmp_path / "hwc.npz").train_x, ds.train_x)
    gray = load_arrays(nhwc[..., :1], y, nhwc[:2, ..., :1], y[:2])  # (N, H, W, 1)
    assert gray.train_x.shape == (6, 1, 8, 7)
    # ambiguous (both axes could be channels): read as (N, C, H, W) unless told
    amb = rng.random((6, 3, 4, 4))
    assert load_arrays(amb, y, amb, y).train_x.shape == (6, 3, 4, 4)
    assert load_arrays(amb, y, amb, y, channels_last=True).train_x.shape == (6, 4, 3, 4)
    assert load_arrays(nhwc, y, nhwc, y, channels_last=False).train_x.shape == (6, 8, 7, 3)
    with pytest.raises(DataError, match=r"chw\.train_x: channels_last=True but the last axis"):
        load_arrays(nchw, y, nchw, y, name="chw", channels_last=True)


def test_idx_absurd_dimensions(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    absurd = data[:4] + struct.pack(">3I", 4_000_000_000, 4_000_000_000, 4_000_000_000) + \
        data[16:]
    for compress in (False, True):
        path = tmp_path / f"huge-{compress}.idx"
        path.write_bytes(gzip.compress(absurd) if compress else absurd)
        with pytest.raises(DataError) as info:
            read_idx(path)
        msg = str(info.value)
        assert str(path) in msg and "(4000000000, 4000000000, 4000000000)" in msg, msg
        assert "the file holds 40" in msg and "overflow" not in msg


def _npz(path: Path, **change: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.random((8, 1, 3, 3)), "train_y": np.arange(8) % 4,
              "test_x": rng.random((4, 1, 3, 3)), "test_y": np.arange(4) % 4}
    np.savez(path, **{**arrays, **change})
    return path


def test_empty_test_split(tmp_path: Path) -> None:
    path = _npz(tmp_path / "notest.npz", test_x=np.zeros((0, 1, 3, 3)),
                test_y=np.zeros(0, np.int64))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "notest.npz[test_x]" in msg and "the test split of notest is empty" in msg
    # the same through IDX files: the error names the file
    p = {k: tmp_path / k for k in ("xtr", "ytr", "xte", "yte")}
    x, y = tiny_split(6, 0, classes=3)
    write_idx(p["xtr"], x)
    write_idx(p["ytr"], y)
    write_idx(p["xte"], np.zeros((0, 5, 4), np.uint8))
    write_idx(p["yte"], np.zeros(0, np.uint8))
    with pytest.raises(DataError, match=rf"{p['xte'].name}: the test split of idx is empty"):
        load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"])


def test_fewer_than_two_training_classes(tmp_path: Path) -> None:
    path = _npz(tmp_path / "one.npz", train_y=np.full(8, 2))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "one.npz[train_y]" in msg and "holds only class 2" in msg and "at least two" in msg
    # an image folder with a single class folder
    write_image_folder(tmp_path / "single", counts=(1, 1))
    for split in ("train", "test"):
        for f in (tmp_path / "single" / split / "dog").iterdir():
            f.unlink()
        (tmp_path / "single" / split / "dog").rmdir()
    with pytest.raises(DataError, match=r"single/train: the training split of single holds "
                       r"only class 0"):
        load_dataset(tmp_path / "single")


def test_labels_out_of_range(tmp_path: Path) -> None:
    """A test label beyond the training classes is caught at load, naming the file."""
    path = _npz(tmp_path / "range.npz", test_y=np.array([0, 1, 2, 7]))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "range.npz[test_y]" in msg and "labels lie in [0, 7], expected [0, 3]" in msg
    assert "inferred from the training labels" in msg
    _npz(tmp_path / "neg.npz", train_y=np.array([0, 1, 2, 3, -1, 0, 1, 2]))
    with pytest.raises(DataError, match=r"neg\.npz\[train_y\]: labels lie in \[-1, 3\]"):
        load_dataset(tmp_path / "neg.npz")
    write_mnist_dir(tmp_path / "fm", compress=False)  # labels 0..9, and Fashion-MNIST has 10
    write_idx(tmp_path / "fm" / FASHION_MNIST_FILES["label_test"], np.array([0, 12] * 5, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels lie in \[0, 12\], "
                       r"expected \[0, 9\]"):
        load_fashion_mnist(tmp_path / "fm")


# ---------------------------------------------------------------------------- data root


def test_fashion_mnist_root_and_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_mnist_dir(tmp_path / "data" / "fashion-mnist", compress=True)
    # root: the folder of the files or the folder above it
    for root in (tmp_path / "data", tmp_path / "data" / "fashion-mnist"):
        ds = load_dataset("fashion_mnist", root=root)
        assert ds.train_x.shape == (20, 1, 5, 4) and ds.class_names == FASHION_MNIST_CLASSES
        np.testing.assert_array_equal(ds.test_y.numpy(), arrays["label_test"])
    # $BILEVEL_DATA, when no root is given
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "data"))
    assert load_dataset("fashion-mnist").train_x.shape == (20, 1, 5, 4)
    # an explicit root is the only place looked at
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", root=tmp_path / "empty")
    msg = str(info.value)
    assert f"Fashion-MNIST not found in {tmp_path / 'empty'}" in msg
    for advice in ("--data-root DIR", "root=", "apt-get install dataset-fashion-mnist",
                   "BILEVEL_DATA", "train-images-idx3-ubyte"):
        assert advice in msg, advice
    # a root is for named datasets: with a path it is refused, and with digits
    with pytest.raises(DataError, match="only used by the named datasets"):
        load_dataset(tmp_path / "data" / "fashion-mnist", root=tmp_path)
    for root in (tmp_path, "/nonexistent"):
        with pytest.raises(DataError, match="digits ships with scikit-learn; root= "
                           r"\(--data-root\) is for fashion_mnist"):
            load_dataset("digits", root=root)


def test_fashion_mnist_environment_without_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A $BILEVEL_DATA without Fashion-MNIST falls back to the Debian package's folder, warning."""
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path))
    debian = Path(bilevel.datasets.FASHION_MNIST_ROOT)
    if not (debian / "train-images-idx3-ubyte.gz").is_file():  # the package is not installed
        with pytest.raises(DataError) as info:
            load_fashion_mnist()
        msg = str(info.value)
        assert f"Fashion-MNIST not found in {tmp_path}" in msg
        assert bilevel.datasets.FASHION_MNIST_ROOT in msg
        return
    # the fallback is kept, but said: the folder and the files it lacks
    write_idx(tmp_path / FASHION_MNIST_FILES["image_train"], np.zeros((2, 2, 2), np.uint8))
    with pytest.warns(UserWarning) as record:
        ds = load_fashion_mnist()
    assert ds.train_x.shape == (60000, 1, 28, 28)
    msg = str(record[0].message)
    assert f"$BILEVEL_DATA is set to {tmp_path}, but it holds no Fashion-MNIST" in msg, msg
    assert "lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in msg
    assert "train-images-idx3-ubyte," not in msg  # the one it has is not listed
    assert f"using the Debian package's copy in {debian}" in msg
    # an explicit root that lacks the files stays an error, with no fallback
    with pytest.raises(DataError, match=f"Fashion-MNIST not found in {tmp_path}"):
        load_fashion_mnist(tmp_path)


def _distill_args(out: Path, *more: str) -> list[str]:
    return ["--dataset", "fashion_mnist", "--net", "mlp", "--hidden", "8", "--ipc", "1",
            "--outer-steps", "1", "--inner-steps", "2", "--eval-nets", "1", "--no-progress",
            "--no-reference", "--no-cache", "--checkpoint-every", "0", "--out", str(out), *more]


def test_distill_data_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bilevel.distill.app import main as distill_main

    (tmp_path / "nothing").mkdir()
    code = distill_main(_distill_args(tmp_path / "o1", "--data-root", str(tmp_path / "nothing")))
    err = capsys.readouterr().err
    assert code == 2
    assert f"Fashion-MNIST not found in {tmp_path / 'nothing'}" in err and "--data-root" in err
    write_mnist_dir(tmp_path / "fm", compress=False)
    assert distill_main(_distill_args(tmp_path / "o2", "--data-root", str(tmp_path / "fm"))) == 0
    assert "distilling fashion_mnist (20 training images, 10 classes)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary  # the run completed and wrote its summary


RUN_CONFIG = """\
[model]
sizes = [4]

[data]
dataset = "{dataset}"
{extra}
[hyperparameters]
tune = ["log_lr"]

[inner]
steps = 2

[estimator]
name = "unrolled"

[outer]
lr = 0.05
steps = 1

[output]
dir = "{out}"
"""


def _run_config(tmp_path: Path, dataset: str = "fashion_mnist", extra: str = "val = 0.5\n") -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(RUN_CONFIG.format(dataset=dataset, extra=extra,
                                      out=(tmp_path / "run").as_posix()))
    return str(path)


def test_run_data_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bilevel.cli import main

    write_mnist_dir(tmp_path / "data" / "fashion-mnist", compress=False)
    data = (tmp_path / "data").as_posix()
    # --data-root on the command line; a run stopped early resumes with it, not without
    assert main(["run", _run_config(tmp_path), "--data-root", data, "--stop-after", "0"]) == 0
    assert not (tmp_path / "run" / "summary.json").exists()
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "run")]) == 2  # not on other data (Debian's)
    err = capsys.readouterr().err
    assert "settings differ" in err and "data.root" in err and str(tmp_path / "data") in err
    assert main(["resume", str(tmp_path / "run"), "--data-root", data]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["tuned_test_acc"] * 10 == pytest.approx(
        round(summary["tuned_test_acc"] * 10))  # over the 10 test images of the tiny files
    # [data] root in the config, and --data-root overriding it
    cfg = _run_config(tmp_path, extra=f'root = "{(tmp_path / "nowhere").as_posix()}"\n')
    assert main(["run", cfg, "--overwrite"]) == 2
    assert "data.root: expected an existing folder" in capsys.readouterr().err
    cfg = _run_config(tmp_path, extra=f'root = "{data}"\n')
    assert main(["run", cfg, "--overwrite"]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["run", cfg, "--overwrite", "--data-root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "data.dataset: Fashion-MNIST not found in" in err and "--data-root DIR" in err
    # a root is refused with a tabular dataset or a path, naming the key
    assert main(["run", _run_config(tmp_path, "iris", ""), "--data-root", data]) == 2
    assert "--data-root: not used with 'iris'" in capsys.readouterr().err
    cfg = _run_config(tmp_path, (tmp_path / "data" / "fashion-mnist").as_posix(),
                      f'root = "{data}"\n')
    assert main(["run", cfg]) == 2
    assert "data.root: only used by the named datasets" in capsys.readouterr().err


# ---------------------------------------------------------------------------- review fixes


def _split(n: int = 20, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n) % classes, np.arange(max(n // 4, classes)) % classes


def test_undetectable_layout_is_refused(tmp_path: Path) -> None:
    """(N, 28, 28, 2): 28 channels of 28x2, or 2 channels of 28x28? Asked, not guessed."""
    rng = np.random.default_rng(0)
    ytr, yte = _split()
    x = rng.random((20, 28, 28, 2))
    path = tmp_path / "hwc2.npz"
    np.savez(path, train_x=x, train_y=ytr, test_x=x[:5], test_y=yte)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "hwc2.npz[train_x]" in msg and "(20, 28, 28, 2)" in msg, msg
    assert "28 channels of 28x2" in msg and "2 channels of 28x28" in msg, msg
    assert "channels_last=True" in msg and "channels_last=False" in msg, msg
    assert load_dataset(path, channels_last=True).train_x.shape == (20, 2, 28, 28)
    assert load_dataset(path, channels_last=False).train_x.shape == (20, 28, 28, 2)
    # the same through IDX files: the file is named
    p = {k: tmp_path / k for k in ("xtr", "ytr", "xte", "yte")}
    for key, arr in zip(p, ((x * 255).astype(np.uint8), ytr.astype(np.uint8),
                            (x[:5] * 255).astype(np.uint8), yte.astype(np.uint8)), strict=True):
        write_idx(p[key], arr)
    with pytest.raises(DataError, match=rf"{p['xtr']}: cannot tell the layout"):
        load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"])
    # channels-first data of 2 channels, and the usual channels-last shapes, still load
    assert load_arrays(x.transpose(0, 3, 1, 2), ytr, x[:5].transpose(0, 3, 1, 2),
                       yte).train_x.shape == (20, 2, 28, 28)
    assert load_arrays(x[..., :1], ytr, x[:5, ..., :1], yte).train_x.shape == (20, 1, 28, 28)
    for bad in ("no", 0, 1, "False"):
        with pytest.raises(DataError, match=r"channels_last must be True, False or None"):
            load_arrays(x, ytr, x[:5], yte, channels_last=bad)


@pytest.mark.parametrize(("shape", "axis"), [((20, 1, 0, 8), 2), ((20, 0, 8, 8), 1),
                                             ((20, 8, 0), 2), ((20, 8, 8, 0), 3)])
def test_empty_image_dimension(tmp_path: Path, shape: tuple[int, ...], axis: int) -> None:
    ytr, yte = _split()
    path = tmp_path / "flat.npz"
    np.savez(path, train_x=np.zeros(shape), train_y=ytr, test_x=np.zeros((5, *shape[1:])),
             test_y=yte)
    with pytest.raises(DataError, match=rf"flat\.npz\[train_x\]: images shaped "
                       rf"\({shape[0]}, .*\) have an empty dimension \(axis {axis} has size 0\)"):
        load_dataset(path)


def test_empty_image_dimension_idx(tmp_path: Path) -> None:
    p = {k: tmp_path / k for k in ("xtr", "ytr", "xte", "yte")}
    write_idx(p["xtr"], np.zeros((20, 0, 0), np.uint8))
    write_idx(p["ytr"], (np.arange(20) % 2).astype(np.uint8))
    write_idx(p["xte"], np.zeros((4, 0, 0), np.uint8))
    write_idx(p["yte"], (np.arange(4) % 2).astype(np.uint8))
    with pytest.raises(DataError, match=rf"{p['xtr']}: images shaped \(20, 0, 0\) have an "
                       r"empty dimension \(axis 1"):
        load_idx_dataset(p["xtr"], p["ytr"], p["xte"], p["yte"])


def test_classes_without_training_examples(tmp_path: Path) -> None:
    import time

    x = np.random.default_rng(0).random((8, 1, 3, 3))
    # train labels {0, 2}, test label 1: three classes, one never trained
    _npz(tmp_path / "gap.npz", train_y=np.array([0, 2] * 4), test_y=np.array([1, 0, 2, 1]))
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "gap.npz")
    msg = str(info.value)
    assert "gap.npz[train_y]: 3 classes (num_classes inferred from the training labels) but " \
        "1 of them has no training example (classes 1)" in msg, msg
    # a stray label 255: 256 classes, 252 of them absent, the first few shown
    with pytest.raises(DataError, match=r"stray\.train_y: 256 classes .* but 251 of them have no "
                       r"training example \(classes 4, 5, 6, 7, 8, \.\.\.\)"):
        load_arrays(x, np.array([0, 1, 2, 3, 255, 0, 1, 2]), x[:4], np.arange(4), name="stray")
    # a label 2**40 is refused at once (no per-class work over 2**40 classes)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"1099511627777 classes .* \(classes 2, 3, 4, 5, 6, "):
        load_arrays(x, np.array([0, 1, 2**40, 0, 1, 0, 1, 0]), x[:4], np.array([0, 1, 0, 1]))
    assert time.perf_counter() - start < 5
    # more class names than classes present
    with pytest.raises(DataError, match=r"names\.train_y: 5 classes \(5 class names\) but 1 of "
                       r"them has no training example \(classes 4\)"):
        load_arrays(x, np.arange(8) % 4, x[:4], np.arange(4), name="names",
                    class_names=list("abcde"))
    # explicit num_classes likewise
    with pytest.raises(DataError, match=r"6 classes but 2 of them .*\(classes 4, 5\)"):
        load_arrays(x, np.arange(8) % 4, x[:4], np.arange(4), num_classes=6)
    # every class present: fine
    assert load_arrays(x, np.arange(8) % 4, x[:4], np.arange(4)).num_classes == 4


def test_negative_labels_message(tmp_path: Path) -> None:
    _npz(tmp_path / "neg.npz", train_y=-1 - np.arange(8) % 2)
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "neg.npz")
    msg = str(info.value)
    assert "neg.npz[train_y]: labels lie in [-2, -1], expected class numbers 0, 1, 2, ..." in msg
    assert "[0, 0]" not in msg


def _zip_npy(path: Path, shapes: dict[str, tuple[int, ...]], bad: dict[str, bytes]) -> Path:
    """An .npz whose members hold only a header (the data is missing), or given bytes."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for key, shape in shapes.items():
            f = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8" if key.endswith("x") else "<i8", "fortran_order": False,
                    "shape": shape})
            z.writestr(f"{key}.npy", bad.get(key, f.getvalue()))
    return path


def test_npz_huge_or_broken_header(tmp_path: Path) -> None:
    shapes = {"train_x": (10**9, 10**9), "train_y": (3,), "test_x": (2, 1, 2, 2),
              "test_y": (2,)}
    path = _zip_npy(tmp_path / "huge.npz", shapes, {})
    with pytest.raises(DataError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert f"{path}[train_x]" in msg and "shape too large" in msg, msg
    assert not isinstance(info.value.__cause__, MemoryError)  # not chained: memory freed
    path = _zip_npy(tmp_path / "garbled.npz", {**shapes, "train_x": (3, 1, 2, 2)},
                    {"train_x": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}\n    "})
    with pytest.raises(DataError, match=r"garbled\.npz\[train_x\]: cannot read the array"):
        load_dataset(path)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG file whose header claims ``width x height`` pixels (its data holds one)."""
    import zlib as _zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", _zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [20_000, 10_000])  # the bomb error, and the bomb warning
def test_png_decompression_bomb(tmp_path: Path, side: int) -> None:
    write_image_folder(tmp_path / "pets", counts=(1, 1))
    bomb = next((tmp_path / "pets" / "train" / "cat").iterdir())
    _png_claiming(bomb, side, side)
    with pytest.raises(DataError, match=rf"{bomb}: image too large, refused as a possible "
                       r"decompression bomb"):
        load_dataset(tmp_path / "pets")


def test_idx_too_many_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "deep.idx"
    path.write_bytes(bytes([0, 0, 0x08, 65]) + struct.pack(">65I", *[1] * 65) + b"\x07")
    with pytest.raises(DataError, match=rf"{path}: IDX header declares 65 dimensions, more "
                       r"than the 64"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x08, 64]) + struct.pack(">64I", *[1] * 64) + b"\x07")
    assert read_idx(path).shape == (1,) * 64


def test_from_torch_dataset_wide_pil_modes() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    f = rng.random((4, 5)).astype(np.float32)
    i16 = rng.integers(0, 65536, (4, 5)).astype(np.uint16)
    items = [(Image.fromarray(f, mode="F"), 0),
             (Image.fromarray(i16.astype(np.int32), mode="I"), 1),
             (Image.fromarray(i16), 0)]  # mode I;16
    assert [img.mode for img, _ in items] == ["F", "I", "I;16"]
    ds = from_torch_dataset(PairDataset(items), PairDataset(items), name="wide")
    torch.testing.assert_close(ds.train_x[0, 0], torch.from_numpy(f))  # kept, not zeroed
    want = torch.from_numpy(i16 / 65535).float()
    torch.testing.assert_close(ds.train_x[1, 0], want)  # scaled, not clipped at 255
    torch.testing.assert_close(ds.train_x[2, 0], want)
    bad_f = Image.fromarray(f * 255, mode="F")
    with pytest.raises(DataError, match=r"w\.train\[1\]: float image \(PIL mode F\) with "
                       r"values in \[.*\], expected \[0, 1\]"):
        from_torch_dataset(PairDataset([items[0], (bad_f, 1)]), PairDataset(items), name="w")
    big = Image.fromarray(np.full((4, 5), 70_000, np.int32), mode="I")
    with pytest.raises(DataError, match=r"w\.train\[1\]: integer image \(PIL mode I\) with "
                       r"values in \[70000, 70000\]; only 16-bit values 0\.\.65535"):
        from_torch_dataset(PairDataset([items[0], (big, 1)]), PairDataset(items), name="w")


def test_from_torch_dataset_pixel_max() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (2, 1, 3, 3))).float()
    items = [(x[0], 0), (x[1], 1)]
    with pytest.raises(DataError, match=r"p\.train\[0\]: pixel values lie in .* expected "
                       r"\[0, 1\] \(for float pixels in 0\.\.255 pass pixel_max=255\)"):
        from_torch_dataset(PairDataset(items), PairDataset(items), name="p")
    ds = from_torch_dataset(PairDataset(items), PairDataset(items), pixel_max=255)
    torch.testing.assert_close(ds.train_x, x / 255)
    # any integer dtype with pixel_max, as load_arrays
    raw = [(np.full((3, 3), 4095, np.int16), 0), (np.zeros((3, 3), np.int16), 1)]
    assert float(from_torch_dataset(PairDataset(raw), PairDataset(raw),
                                    pixel_max=4095).train_x.max()) == 1.0
    with pytest.raises(DataError, match=r"p\.train\[1\]: pixel values lie in \[.*\] after "
                       r"dividing by pixel_max=1, expected \[0, 1\]$"):
        from_torch_dataset(PairDataset([(x[0] / 255, 0), (x[1], 1)]), PairDataset(items),
                           name="p", pixel_max=1)
    # normalised images: the hint is to give them unnormalised
    normed = [((x[0] / 255 - 0.5) / 0.5, 0), (x[1] / 255, 1)]
    with pytest.raises(DataError, match=r"p\.train\[0\]: pixel values lie in \[-0\.9.*\], "
                       r"expected \[0, 1\]: images must be unnormalised, with pixels in "
                       r"\[0, pixel_max\]") as info:
        from_torch_dataset(PairDataset(normed), PairDataset(items), name="p")
    assert "pass pixel_max" not in str(info.value)
    for bad in (0, -1.0, float("nan"), True, "255"):
        with pytest.raises(DataError, match="pixel_max must be a positive number"):
            from_torch_dataset(PairDataset(items), PairDataset(items), pixel_max=bad)


def test_digits_refuses_a_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bilevel.distill.app import main as distill_main

    with pytest.raises(DataError, match="digits ships with scikit-learn"):
        load_dataset("digits", root="/nonexistent")
    args = _distill_args(tmp_path / "o", "--data-root", str(tmp_path))
    args[1] = "digits"
    assert distill_main(args) == 2
    err = capsys.readouterr().err
    assert "digits ships with scikit-learn; root= (--data-root) is for fashion_mnist" in err


def test_dataset_aliases_and_presets(tmp_path: Path) -> None:
    import argparse

    from bilevel.datasets import dataset_key
    from bilevel.distill.app import PRESETS, add_arguments, config_from_args

    assert [dataset_key(n) for n in ("fashion_mnist", "fashion-mnist", "fashionmnist",
                                     "digits", "fashion", str(tmp_path))] == [
        "fashion_mnist", "fashion_mnist", "fashion_mnist", "digits", None, None]
    write_mnist_dir(tmp_path / "fm", compress=False)
    p = argparse.ArgumentParser()
    add_arguments(p)
    for alias in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        assert load_dataset(alias, root=tmp_path / "fm").name == "fashion_mnist"
        cfg = config_from_args(p.parse_args(["--dataset", alias]), alias)
        assert cfg.width == PRESETS["fashion_mnist"]["width"] == 128, alias
        assert cfg.inner_optimizer == "momentum", alias


def test_load_dataset_messages_and_spellings(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from bilevel.distill.app import main as distill_main

    path = _npz(tmp_path / "upper.npz").rename(tmp_path / "UPPER.NPZ")
    assert load_dataset(path).name == "UPPER"
    for name in ("fashion_mnist", "digits"):
        with pytest.raises(DataError, match="root is empty"):
            load_dataset(name, root="")
    with pytest.raises(DataError, match="root is empty"):
        load_fashion_mnist("")
    with pytest.raises(DataError, match="empty dataset name"):
        load_dataset("")
    assert distill_main(_distill_args(tmp_path / "o", "--data-root", "")) == 2
    assert "root is empty" in capsys.readouterr().err
    (tmp_path / "half" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=r"half: looks like an image folder but has no train/"):
        load_dataset(tmp_path / "half")


def test_config_takes_every_spelling_of_a_named_dataset() -> None:
    from bilevel.config import parse_config

    table = {"model": {"sizes": [4]}, "hyperparameters": {"tune": ["log_wd"]},
             "inner": {"steps": 2}, "estimator": {"name": "unrolled"},
             "outer": {"lr": 0.1, "steps": 1}, "output": {"dir": "runs/x"}}
    for spelling in ("fashion-mnist", "fashionmnist", "fashion_mnist"):
        cfg = parse_config({**table, "data": {"dataset": spelling}})
        assert cfg.data.dataset == "fashion_mnist" and cfg.data.own_split
