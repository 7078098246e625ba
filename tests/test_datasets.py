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
    ds = load_dataset(tmp_path / "named.npz")
    # num_classes comes from the names: a class may be absent from the data
    assert ds.class_names == ("a", "b", "c", "d") and ds.num_classes == 4
    with pytest.raises(DataError, match=r"4 class names for num_classes=3"):
        load_dataset(tmp_path / "named.npz", num_classes=3)
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
    ([(torch.full((1, 2, 2), 2.0), 0), (torch.zeros(1, 2, 2), 1)],
     r"bad\.train: pixel values .* lie in \[0, 2\], expected \[0, 1\]"),
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
    # a root is for named datasets: with a path it is refused, for digits it is not needed
    with pytest.raises(DataError, match="only used by the named datasets"):
        load_dataset(tmp_path / "data" / "fashion-mnist", root=tmp_path)
    assert load_dataset("digits", root=tmp_path).num_classes == 10


def test_fashion_mnist_environment_without_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A $BILEVEL_DATA without Fashion-MNIST falls back to the Debian package's folder."""
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path))
    try:
        ds = load_fashion_mnist()
    except DataError as exc:  # the package is not installed here
        msg = str(exc)
        assert f"Fashion-MNIST not found in {tmp_path}" in msg
        assert bilevel.datasets.FASHION_MNIST_ROOT in msg
    else:
        assert ds.train_x.shape == (60000, 1, 28, 28)


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
    assert summary["complete"] and summary["test_acc"] * 10 == pytest.approx(
        round(summary["test_acc"] * 10))  # over the 10 test images of the tiny files
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
