"""Tests for :mod:`bilevel.meta` tasks and data: TaskBatch, class splits, the episode and
sinusoid samplers, digits under D4, the Omniglot loader and the nearest-centroid baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.data import DataError
from bilevel.meta import (
    D4_NAMES,
    EpisodeSampler,
    SinusoidTasks,
    TaskBatch,
    check_splits,
    class_splits,
    d4_transform,
    digits_d4,
    load_omniglot,
    nearest_centroid,
)
from hypergrad.errors import BilevelInputError


def labelled(num_classes: int = 10, per_class: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[i] = (i, y_i)``: every row names its own index and class. Classes interleaved."""
    n = num_classes * per_class
    y = torch.arange(n) % num_classes
    x = torch.stack([torch.arange(n, dtype=torch.float32), y.float()], dim=1)
    return x, y


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------


def test_episode_shapes_labels_and_provenance():
    x, y = labelled()
    ways, shots, queries, num = 4, 3, 5, 6
    split = [1, 2, 4, 6, 7, 9]
    tasks = EpisodeSampler(x, y, ways, shots, queries, classes=split, seed=3).sample(num, step=2)
    assert tasks.num_tasks == num and tasks.ways == ways and tasks.is_classification
    assert tasks.support_x.shape == (num, ways * shots, 2)
    assert tasks.query_x.shape == (num, ways * queries, 2)
    assert tasks.support_y.dtype == tasks.query_y.dtype == torch.long
    # class-major rows: label k on rows k*shots .. (k+1)*shots-1
    assert torch.equal(tasks.support_y[0], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(tasks.query_y[0], torch.arange(ways).repeat_interleave(queries))
    for b in range(num):
        for k in range(ways):
            assert int((tasks.support_y[b] == k).sum()) == shots
            assert int((tasks.query_y[b] == k).sum()) == queries
        classes = tasks.info["classes"][b]
        assert len(set(classes.tolist())) == ways and set(classes.tolist()) <= set(split)
        # every row is a real example of the class its label stands for
        pairs = ((tasks.support_x[b], tasks.support_y[b]), (tasks.query_x[b], tasks.query_y[b]))
        for xs, ys in pairs:
            assert torch.equal(xs[:, 1].long(), classes[ys])
            assert torch.equal(y[xs[:, 0].long()], classes[ys])
        s_rows = set(tasks.support_x[b, :, 0].tolist())
        q_rows = set(tasks.query_x[b, :, 0].tolist())
        assert len(s_rows) == ways * shots and len(q_rows) == ways * queries
        assert not s_rows & q_rows
        assert torch.equal(tasks.info["support_index"][b].float(), tasks.support_x[b, :, 0])
        assert torch.equal(tasks.info["query_index"][b].float(), tasks.query_x[b, :, 0])


def test_episodes_reproducible_and_different_across_steps():
    x, y = labelled()
    make = lambda seed: EpisodeSampler(x, y, ways=5, shots=2, queries=3, seed=seed)  # noqa: E731
    a, b = make(0).sample(8, step=4), make(0).sample(8, step=4)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.support_x, make(0).sample(8, step=5).support_x)
    assert not torch.equal(a.support_x, make(1).sample(8, step=4).support_x)
    assert not torch.equal(a.support_x[0], a.support_x[1])  # tasks differ within a call
    # task t does not depend on how many tasks are drawn, nor on the global random state
    torch.manual_seed(123)
    few = make(0).sample(3, step=4)
    assert torch.equal(few.query_x, a.query_x[:3])


def test_episode_labels_spread_over_classes():
    x, y = labelled(num_classes=6)
    tasks = EpisodeSampler(x, y, ways=3, shots=1, queries=1).sample(300)
    first = tasks.info["classes"][:, 0]
    counts = torch.bincount(first, minlength=6)
    assert counts.min() > 25  # label 0 goes to each class about 50 times


def test_episode_refusals_name_what_is_wrong():
    x, y = labelled(num_classes=5, per_class=8)
    with pytest.raises(BilevelInputError, match=r"shots \(K\) must be >= 1, got 0"):
        EpisodeSampler(x, y, ways=3, shots=0)
    with pytest.raises(BilevelInputError, match="ways must be >= 2"):
        EpisodeSampler(x, y, ways=1, shots=1, queries=1)
    with pytest.raises(BilevelInputError, match="queries must be >= 1"):
        EpisodeSampler(x, y, ways=2, shots=1, queries=0)
    with pytest.raises(BilevelInputError, match=r"ways=4 but only 3 classes .*\[0, 2, 3\]"):
        EpisodeSampler(x, y, ways=4, shots=1, queries=1, classes=[0, 2, 3])
    with pytest.raises(BilevelInputError, match=r"classes \[2\] more than once"):
        EpisodeSampler(x, y, ways=2, shots=1, queries=1, classes=[0, 2, 2])
    with pytest.raises(BilevelInputError, match="x has 40 examples .* but y has 39 labels"):
        EpisodeSampler(x, y[:-1], ways=2, shots=1, queries=1)
    with pytest.raises(BilevelInputError, match="y must be 1-D integer labels"):
        EpisodeSampler(x, y.float(), ways=2, shots=1, queries=1)
    # a class with too few examples: named with its count (4 of class 3 left)
    keep = (y != 3) | (torch.arange(len(y)) < 20)
    with pytest.raises(BilevelInputError, match=r"shots \+ queries = 2 \+ 5 = 7 .*class 3: 4"):
        EpisodeSampler(x[keep], y[keep], ways=2, shots=2, queries=5)
    with pytest.raises(BilevelInputError, match="class 9: 0"):
        EpisodeSampler(x, y, ways=2, shots=1, queries=1, classes=[0, 9])
    sampler = EpisodeSampler(x, y, ways=2, shots=1, queries=1)
    with pytest.raises(BilevelInputError, match="num_tasks must be >= 1"):
        sampler.sample(0)


# --------------------------------------------------------------------------------------------
# Class splits
# --------------------------------------------------------------------------------------------


def test_class_splits_disjoint_covering_seeded():
    train, val, test = class_splits(80, seed=1)
    assert (len(train), len(val), len(test)) == (48, 16, 16)
    assert sorted(train + val + test) == list(range(80))
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)
    assert class_splits(80, seed=1) == (train, val, test)
    assert class_splits(80, seed=2) != (train, val, test)
    assert check_splits(train, val, test) == (train, val, test)
    a, b, c = class_splits(10, fractions=(0.5, 0.25, 0.25))
    assert (len(a), len(b), len(c)) == (6, 2, 2)  # round half to even: round(2.5) == 2


def test_class_splits_groups_keep_related_classes_together():
    num = 7
    groups = [k % num for k in range(4 * num)]  # four rotations of seven characters
    splits = class_splits(4 * num, groups=groups, seed=5)
    assert sorted(sum(splits, [])) == list(range(4 * num))
    for split in splits:
        chars = {k % num for k in split}
        assert sorted(split) == sorted(r * num + c for c in chars for r in range(4))


def test_split_refusals():
    with pytest.raises(BilevelInputError, match=r"splits 0 and 1 overlap: classes \[3, 5\]"):
        check_splits([1, 3, 5], [3, 4, 5], [6])
    with pytest.raises(BilevelInputError, match="split 2 is empty"):
        check_splits([1], [2], [])
    with pytest.raises(BilevelInputError, match="non-negative ints"):
        check_splits([1, -2])
    with pytest.raises(BilevelInputError, match="every split needs at least one"):
        class_splits(2)
    with pytest.raises(BilevelInputError, match="summing to 1"):
        class_splits(10, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(BilevelInputError, match="summing to 1"):
        class_splits(10, fractions=(0.8, 0.2))
    with pytest.raises(BilevelInputError, match="groups has 3 entries for 4 classes"):
        class_splits(4, groups=[0, 1, 2])


# --------------------------------------------------------------------------------------------
# TaskBatch
# --------------------------------------------------------------------------------------------


def batch(b: int = 4, s: int = 3, q: int = 5, feat: tuple[int, ...] = (2,)) -> TaskBatch:
    return TaskBatch(torch.randn(b, s, *feat), torch.randint(0, 3, (b, s)),
                     torch.randn(b, q, *feat), torch.randint(0, 3, (b, q)),
                     info={"id": torch.arange(b)})


def test_taskbatch_validation_names_tensors_and_shapes():
    good = batch()
    with pytest.raises(BilevelInputError, match=r"support_x \(4, 3, 2\) but query_x \(4, 5, 3\)"):
        TaskBatch(good.support_x, good.support_y, torch.randn(4, 5, 3), good.query_y)
    with pytest.raises(BilevelInputError,
                       match=r"task axis does not match: support_x \(4, 3, 2\) has 4 tasks but "
                             r"query_x has shape \(3, 5, 2\)"):
        TaskBatch(good.support_x, good.support_y, good.query_x[:3], good.query_y)
    with pytest.raises(BilevelInputError, match="task axis does not match.*query_y"):
        TaskBatch(good.support_x, good.support_y, good.query_x, good.query_y[:2])
    with pytest.raises(BilevelInputError, match=r"support_y must lead with \(4, 3\)"):
        TaskBatch(good.support_x, good.support_y[:, :2], good.query_x, good.query_y)
    with pytest.raises(BilevelInputError, match="at least one support and one query"):
        TaskBatch(good.support_x[:, :0], good.support_y[:, :0], good.query_x, good.query_y)
    with pytest.raises(BilevelInputError, match="holds no task"):
        TaskBatch(good.support_x[:0], good.support_y[:0], good.query_x[:0], good.query_y[:0])
    with pytest.raises(BilevelInputError, match="must both be integer labels or both floating"):
        TaskBatch(good.support_x, good.support_y, good.query_x, good.query_y.float())
    with pytest.raises(BilevelInputError, match="support_y must be a torch.Tensor, got list"):
        TaskBatch(good.support_x, [0, 1], good.query_x, good.query_y)
    with pytest.raises(BilevelInputError, match=r"info\['a'\] must lead with the task axis"):
        TaskBatch(good.support_x, good.support_y, good.query_x, good.query_y,
                  info={"a": torch.zeros(3)})
    with pytest.raises(BilevelInputError, match="query_x is on meta but support_x is on cpu"):
        TaskBatch(good.support_x, good.support_y, good.query_x.to("meta"), good.query_y)
    reg = TaskBatch(torch.randn(2, 3, 1), torch.randn(2, 3, 1), torch.randn(2, 4, 1),
                    torch.randn(2, 4, 1))
    assert reg.ways is None and not reg.is_classification
    with pytest.raises(BilevelInputError, match="support and query targets differ"):
        TaskBatch(reg.support_x, reg.support_y, reg.query_x, torch.randn(2, 4, 2))


def test_taskbatch_select_chunks_to():
    tb = batch(b=5)
    parts = tb.chunks(2)
    assert [p.num_tasks for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p.query_x for p in parts]), tb.query_x)
    assert torch.equal(torch.cat([p.info["id"] for p in parts]), tb.info["id"])
    one = tb.select(-1)
    assert one.num_tasks == 1 and torch.equal(one.support_x[0], tb.support_x[4])
    picked = tb.select([3, 0])
    assert picked.info["id"].tolist() == [3, 0]
    mask = torch.tensor([True, False, True, False, False])
    assert tb.select(mask).info["id"].tolist() == [0, 2]
    with pytest.raises(BilevelInputError, match="task 5 out of range for 5 tasks"):
        tb.select(5)
    with pytest.raises(BilevelInputError, match="selects no task"):
        tb.select(slice(3, 3))
    with pytest.raises(BilevelInputError, match="size must be >= 1"):
        tb.chunks(0)
    d = tb.to(dtype=torch.float64)
    assert d.support_x.dtype == torch.float64 and d.support_y.dtype == torch.long
    assert d.info["id"].dtype == torch.long
    reg = SinusoidTasks(shots=2).sample(3).to(dtype=torch.float64)
    assert reg.support_y.dtype == reg.info["amplitude"].dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Sinusoids
# --------------------------------------------------------------------------------------------


def test_sinusoid_ranges_function_and_reproducibility():
    gen = SinusoidTasks(shots=10, queries=7, seed=4)
    tasks = gen.sample(400, step=3)
    assert tasks.support_x.shape == (400, 10, 1) and tasks.query_y.shape == (400, 7, 1)
    amp, phase = tasks.info["amplitude"], tasks.info["phase"]
    assert amp.shape == phase.shape == (400,)
    assert 0.1 <= float(amp.min()) and float(amp.max()) <= 5.0
    assert 0.0 <= float(phase.min()) and float(phase.max()) <= math.pi
    xs = torch.cat([tasks.support_x, tasks.query_x], dim=1)
    ys = torch.cat([tasks.support_y, tasks.query_y], dim=1)
    assert -5.0 <= float(xs.min()) and float(xs.max()) <= 5.0
    assert float(amp.max()) - float(amp.min()) > 4.0 and float(xs.max()) - float(xs.min()) > 9.0
    # y = A sin(x - phi), exactly as curve() computes it, and close to a float64 recomputation
    assert torch.equal(ys, gen.curve(tasks.info, xs))
    ref = amp.double()[:, None, None] * torch.sin(xs.double() - phase.double()[:, None, None])
    torch.testing.assert_close(ys.double(), ref, rtol=0, atol=1e-5)
    again = SinusoidTasks(shots=10, queries=7, seed=4).sample(400, step=3)
    assert torch.equal(again.query_x, tasks.query_x) and torch.equal(again.info["phase"], phase)
    assert not torch.equal(gen.sample(400, step=4).info["phase"], phase)
    grid = torch.linspace(-5, 5, 50).expand(400, 50).unsqueeze(-1)
    assert gen.curve(tasks, grid).shape == (400, 50, 1)
    assert SinusoidTasks(2, dtype=torch.float64).sample(2).support_x.dtype == torch.float64


def test_sinusoid_refusals():
    with pytest.raises(BilevelInputError, match=r"shots \(K\) must be >= 1"):
        SinusoidTasks(shots=0)
    with pytest.raises(BilevelInputError, match="amplitude must be finite with low <= high"):
        SinusoidTasks(shots=5, amplitude=(5.0, 0.1))
    with pytest.raises(BilevelInputError, match="dtype must be a floating"):
        SinusoidTasks(shots=5, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def test_digits_d4_classes_are_exact_transforms():
    from sklearn.datasets import load_digits

    x, y = digits_d4()
    raw = torch.from_numpy(load_digits().images).float() / 16.0  # (1797, 8, 8)
    digit = torch.from_numpy(load_digits().target)
    n = raw.shape[0]
    assert x.shape == (8 * n, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(torch.unique(y), torch.arange(80))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[:n, 0], raw) and torch.equal(y[:n], digit)
    # by hand: g = 1 is a quarter turn counter-clockwise, g = 6 a mirror then a half turn
    assert torch.equal(x[n:2 * n, 0], torch.rot90(raw, 1, dims=(1, 2)))
    assert torch.equal(y[n:2 * n], 10 + digit)
    mirrored = raw.flip(2).flip(1).flip(2)  # mirror left-right, then half turn = flip rows
    assert torch.equal(x[6 * n:7 * n, 0], mirrored)
    assert torch.equal(y[6 * n:7 * n], 60 + digit)
    assert len(D4_NAMES) == 8 and D4_NAMES[6] == "flip+rot180"
    # the eight transforms are distinct group elements
    probe = torch.arange(9.0).view(3, 3)
    assert len({tuple(d4_transform(probe, g).flatten().tolist()) for g in range(8)}) == 8


def write_omniglot(root: Path, sets: dict[str, list[str]], chars: int = 3, drawings: int = 4,
                   size: int = 6) -> dict[str, np.ndarray]:
    """Tiny Omniglot: black ink (0) on white (255), mode "L" PNGs; returns ink arrays by path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ink: dict[str, np.ndarray] = {}
    for image_set, alphabets in sets.items():
        for alphabet in alphabets:
            for c in range(chars):
                folder = root / image_set / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    drawing = rng.random((size, size)) < 0.3
                    path = folder / f"{c:02d}{d:02d}_{d + 1:02d}.png"
                    Image.fromarray(np.where(drawing, 0, 255).astype(np.uint8), "L").save(path)
                    ink[str(path)] = drawing.astype(np.float32)
    return ink


def test_omniglot_loader_layout_rotations_and_names(tmp_path):
    ink = write_omniglot(tmp_path, {"images_background": ["Alpha", "Beta"]})
    x, y, names = load_omniglot(tmp_path, rotations=False, image_size=6)
    assert x.shape == (24, 1, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.long
    assert names == [f"{a}/character{c:02d}" for a in ("Alpha", "Beta") for c in (1, 2, 3)]
    assert torch.equal(y, torch.arange(6).repeat_interleave(4))
    first = sorted(p for p in ink if "Alpha/character01" in p)[0]
    assert torch.equal(x[0, 0], torch.from_numpy(ink[first]))  # ink = 1, paper = 0

    xr, yr, names_r = load_omniglot(tmp_path, rotations=True, image_size=6)
    assert xr.shape == (96, 1, 6, 6) and len(names_r) == 24 and int(yr.max()) == 23
    assert names_r[6] == "Alpha/character01/rot90" and names_r[23] == "Beta/character03/rot270"
    assert torch.equal(xr[:24], x)
    for r in (1, 2, 3):
        assert torch.equal(xr[24 * r:24 * (r + 1)], torch.rot90(x, r, dims=(-2, -1)))
        assert torch.equal(yr[24 * r:24 * (r + 1)], y + 6 * r)
    # root pointing at the set itself; resizing with Pillow
    small, _, _ = load_omniglot(tmp_path / "images_background", rotations=False, image_size=3)
    assert small.shape == (24, 1, 3, 3)
    assert 0.0 <= float(small.min()) and float(small.max()) <= 1.0
    # a sampler over the loaded data, four ways of four drawings
    tasks = EpisodeSampler(xr, yr, ways=4, shots=1, queries=3).sample(2)
    assert tasks.support_x.shape == (2, 4, 1, 6, 6)


def test_omniglot_reads_both_sets(tmp_path):
    write_omniglot(tmp_path, {"images_background": ["Alpha"], "images_evaluation": ["Gamma"]})
    _, y, names = load_omniglot(tmp_path, rotations=False, image_size=6)
    assert names[0].startswith("Alpha/") and names[-1].startswith("Gamma/") and len(names) == 6
    assert int(y.max()) == 5


def test_omniglot_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.*Omniglot folder not found"):
        load_omniglot(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        load_omniglot(tmp_path)
    write_omniglot(tmp_path, {"images_background": ["Alpha"]})
    empty = tmp_path / "images_background" / "Alpha" / "character09"
    empty.mkdir()
    with pytest.raises(DataError, match="character09: character folder holds no images"):
        load_omniglot(tmp_path)
    bad = empty / "0001_01.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="0001_01.png: cannot read image"):
        load_omniglot(tmp_path)
    bad.unlink()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        load_omniglot(tmp_path)
    with pytest.raises(BilevelInputError, match="image_size must be a positive int"):
        load_omniglot(tmp_path, image_size=0)


# --------------------------------------------------------------------------------------------
# Nearest-centroid baseline
# --------------------------------------------------------------------------------------------


def test_nearest_centroid_separable_and_chance():
    gen = torch.Generator().manual_seed(0)
    centers = 10.0 * torch.randn(8, 5, generator=gen)
    y = torch.arange(800) % 8
    x = centers[y] + 0.1 * torch.randn(800, 5, generator=gen)
    tasks = EpisodeSampler(x, y, ways=5, shots=2, queries=10).sample(20)
    acc = nearest_centroid(tasks)
    assert acc.shape == (20,) and torch.equal(acc, torch.ones(20))
    noise = torch.randn(800, 5, generator=gen)
    labels = torch.randint(0, 8, (800,), generator=gen)
    chance = nearest_centroid(EpisodeSampler(noise, labels, ways=5, shots=2,
                                             queries=10).sample(400))
    assert abs(float(chance.mean()) - 0.2) < 0.03
    with pytest.raises(BilevelInputError, match="needs integer class labels"):
        nearest_centroid(SinusoidTasks(shots=2).sample(2))
