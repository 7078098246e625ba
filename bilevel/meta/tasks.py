"""Tasks for meta-learning: a batch of tasks with a leading task axis, and the samplers that
draw them.

* :class:`TaskBatch` -- ``B`` tasks, each a support set (to adapt on) and a query set (to
  evaluate the adapted model on), stacked along a leading task axis so that one ``vmap``
  runs every task at once.
* :func:`class_splits` / :func:`check_splits` -- disjoint meta-train / meta-validation /
  meta-test sets of class ids: a few-shot learner is tested on classes it never saw.
* :class:`EpisodeSampler` -- N-way K-shot classification episodes from any labelled data.
* :class:`SinusoidTasks` -- the sinusoid regression tasks of MAML (Finn et al., 2017).

Every sampler is reproducible: task ``t`` of call ``sample(num_tasks, step)`` is drawn from its
own generator seeded with ``mix_seed(seed, step, t)``, so it does not depend on ``num_tasks``,
on the calls made before, or on the global random state (a run replays and resumes
identically).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hypergrad.errors import BilevelInputError
from hypergrad.seeding import mix_seed

__all__ = ["EpisodeSampler", "SinusoidTasks", "TaskBatch", "check_splits", "class_splits"]

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` must be an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BilevelInputError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise BilevelInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def _is_label_dtype(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


# --------------------------------------------------------------------------------------------
# A batch of tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """``B`` tasks with a leading task axis.

    Attributes:
        support_x: ``(B, S, *features)`` inputs to adapt on.
        support_y: ``(B, S)`` integer class indices ``0 .. N-1`` (classification), or
            ``(B, S, *t)`` floating targets (regression).
        query_x: ``(B, Q, *features)`` inputs to evaluate the adapted model on.
        query_y: ``(B, Q)`` or ``(B, Q, *t)``, of the same kind as ``support_y``.
        info: optional per-task facts, each a tensor with leading size ``B`` (the sinusoid
            ``amplitude`` and ``phase`` of shape ``(B,)``; the dataset ``classes`` of each
            label, ``(B, N)``; ...). :meth:`select`, :meth:`chunks` and :meth:`to` carry them.

    The constructor checks structure only (no values, so it never waits on a device): the four
    tensors share one task axis ``B >= 1``, ``S >= 1`` and ``Q >= 1``, support and query have
    the same feature shape, labels lead with ``(B, S)`` / ``(B, Q)``, both labels are integer
    (classification, exactly 2-D) or both floating (regression, the same target shape), and
    every tensor, ``info`` included, is on one device.

    Raises:
        BilevelInputError: naming the tensor and the shapes at fault.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise BilevelInputError(f"TaskBatch.{name} must be a torch.Tensor, got "
                                        f"{type(value).__name__}")
        if not isinstance(self.info, Mapping):
            raise BilevelInputError(f"TaskBatch.info must be a dict of tensors, got "
                                    f"{type(self.info).__name__}")
        object.__setattr__(self, "info", dict(self.info))
        sx, sy, qx, qy = (getattr(self, n) for n in _FIELDS)
        for name, x in (("support_x", sx), ("query_x", qx)):
            if x.dim() < 2:
                raise BilevelInputError(f"TaskBatch.{name} must be (B, examples, *features), "
                                        f"got shape {_shape(x)}")
        num = sx.shape[0]
        if num < 1:
            raise BilevelInputError(f"TaskBatch holds no task: support_x has shape {_shape(sx)}")
        for name in _FIELDS[1:]:
            t = getattr(self, name)
            if t.dim() == 0 or t.shape[0] != num:
                raise BilevelInputError(
                    f"TaskBatch: the task axis does not match: support_x {_shape(sx)} has "
                    f"{num} tasks but {name} has shape {_shape(t)}")
        if sx.shape[1] < 1 or qx.shape[1] < 1:
            raise BilevelInputError(f"TaskBatch: every task needs at least one support and one "
                                    f"query example, got support_x {_shape(sx)} and query_x "
                                    f"{_shape(qx)}")
        if sx.shape[2:] != qx.shape[2:]:
            raise BilevelInputError(f"TaskBatch: support and query features differ: support_x "
                                    f"{_shape(sx)} but query_x {_shape(qx)}")
        for xname, x, yname, y in (("support_x", sx, "support_y", sy),
                                   ("query_x", qx, "query_y", qy)):
            if y.dim() < 2 or y.shape[:2] != x.shape[:2]:
                raise BilevelInputError(f"TaskBatch.{yname} must lead with {_shape(x)[:2]} like "
                                        f"{xname} {_shape(x)}, got shape {_shape(y)}")
        kinds = [_is_label_dtype(y) for y in (sy, qy)]
        for name, y in (("support_y", sy), ("query_y", qy)):
            if y.dtype == torch.bool or y.is_complex():
                raise BilevelInputError(f"TaskBatch.{name} must hold integer class indices or "
                                        f"floating targets, got dtype {y.dtype}")
        if kinds[0] != kinds[1]:
            raise BilevelInputError(f"TaskBatch: support_y ({sy.dtype}) and query_y ({qy.dtype}) "
                                    f"must both be integer labels or both floating targets")
        if kinds[0]:
            for name, y in (("support_y", sy), ("query_y", qy)):
                if y.dim() != 2:
                    raise BilevelInputError(f"TaskBatch.{name}: integer class labels must be "
                                            f"(B, examples), got shape {_shape(y)}")
        elif sy.shape[2:] != qy.shape[2:]:
            raise BilevelInputError(f"TaskBatch: support and query targets differ: support_y "
                                    f"{_shape(sy)} but query_y {_shape(qy)}")
        for key, value in self.info.items():
            if not isinstance(value, Tensor):
                raise BilevelInputError(f"TaskBatch.info[{key!r}] must be a tensor, got "
                                        f"{type(value).__name__}")
            if value.dim() == 0 or value.shape[0] != num:
                raise BilevelInputError(f"TaskBatch.info[{key!r}] must lead with the task axis "
                                        f"({num} tasks), got shape {_shape(value)}")
        named = [(n, getattr(self, n)) for n in _FIELDS]
        named += [(f"info[{k!r}]", v) for k, v in self.info.items()]
        for name, t in named[1:]:
            if t.device != sx.device:
                raise BilevelInputError(f"TaskBatch.{name} is on {t.device} but support_x is on "
                                        f"{sx.device}: move all tensors to one device")

    @property
    def num_tasks(self) -> int:
        """``B``, the number of tasks."""
        return int(self.support_x.shape[0])

    @property
    def is_classification(self) -> bool:
        """Whether the labels are integer class indices (not floating regression targets)."""
        return _is_label_dtype(self.support_y)

    @property
    def ways(self) -> int | None:
        """The number of classes ``N`` (one more than the largest label, support and query),
        or ``None`` for regression. Reads the labels (a device sync on an accelerator)."""
        if not self.is_classification:
            return None
        return int(torch.maximum(self.support_y.max(), self.query_y.max())) + 1

    def _map(self, fn: Any) -> TaskBatch:
        """A new batch with ``fn(name, tensor)`` applied to the four tensors and ``info``."""
        kw = {n: fn(n, getattr(self, n)) for n in _FIELDS}
        return TaskBatch(**kw, info={k: fn(f"info[{k!r}]", v) for k, v in self.info.items()})

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TaskBatch:
        """Move every tensor to ``device``; cast floating inputs, floating (regression) targets
        and floating ``info`` to ``dtype``. Integer labels and integer ``info`` keep theirs."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise BilevelInputError(f"TaskBatch.to: dtype must be a floating torch.dtype, got "
                                    f"{dtype!r}")

        def move(_: str, t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return self._map(move)

    def select(self, index: int | slice | Sequence[int] | Tensor) -> TaskBatch:
        """The tasks at ``index`` (an int, a slice, a sequence of ints, an integer tensor or a
        boolean mask of length ``B``), keeping the task axis: ``select(3)`` has one task.

        Raises:
            BilevelInputError: an index out of range or a selection of no task.
        """
        num = self.num_tasks
        if isinstance(index, bool):
            raise BilevelInputError(f"TaskBatch.select: index must be an int, a slice, ints or a "
                                    f"tensor, got {index!r}")
        if isinstance(index, int):
            if not -num <= index < num:
                raise BilevelInputError(f"TaskBatch.select: task {index} out of range for "
                                        f"{num} tasks")
            index = slice(index % num, index % num + 1)
        if isinstance(index, slice):
            count = len(range(*index.indices(num)))
        else:
            idx = torch.as_tensor(index)
            if idx.dtype == torch.bool:
                if idx.shape != (num,):
                    raise BilevelInputError(f"TaskBatch.select: a boolean mask must have shape "
                                            f"({num},), got {_shape(idx)}")
                idx = idx.nonzero().flatten()
            elif idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
                raise BilevelInputError(f"TaskBatch.select: index must be 1-D integers, got "
                                        f"dtype {idx.dtype} shape {_shape(idx)}")
            if idx.numel() and not bool(((idx >= -num) & (idx < num)).all()):
                raise BilevelInputError(f"TaskBatch.select: indices {idx.tolist()} out of range "
                                        f"for {num} tasks")
            index, count = idx.to(self.support_x.device), int(idx.numel())
        if count == 0:
            raise BilevelInputError(f"TaskBatch.select: {index!r} selects no task of {num}")
        return self._map(lambda _, t: t[index])

    def chunks(self, size: int) -> list[TaskBatch]:
        """Consecutive groups of at most ``size`` tasks, in order (the last may be smaller),
        e.g. to bound the memory of a ``vmap`` over tasks."""
        _check_int("TaskBatch.chunks: size", size, 1)
        return [self.select(slice(i, i + size)) for i in range(0, self.num_tasks, size)]

    def __repr__(self) -> str:
        info = f", info={sorted(self.info)}" if self.info else ""
        return (f"TaskBatch(tasks={self.num_tasks}, support_x={_shape(self.support_x)[1:]}, "
                f"support_y={_shape(self.support_y)[1:]}, query_x={_shape(self.query_x)[1:]}, "
                f"query_y={_shape(self.query_y)[1:]}, dtype={self.support_x.dtype}, "
                f"device={self.support_x.device}{info})")


# --------------------------------------------------------------------------------------------
# Class splits
# --------------------------------------------------------------------------------------------


def check_splits(*splits: Sequence[int]) -> tuple[list[int], ...]:
    """Validate class splits given by hand: each a non-empty sequence of distinct,
    non-negative int class ids, no class in two splits. Returns them as lists of ints.

    Raises:
        BilevelInputError: naming the split and the classes at fault.
    """
    if not splits:
        raise BilevelInputError("check_splits: give at least one split")
    out: list[list[int]] = []
    owner: dict[int, int] = {}
    for i, split in enumerate(splits):
        if hasattr(split, "tolist"):  # a tensor or an array
            split = split.tolist()
        if isinstance(split, (str, bytes)) or not isinstance(split, Sequence):
            raise BilevelInputError(f"split {i} must be a sequence of class ids, got "
                                    f"{type(split).__name__}")
        ids = list(split)
        bad = [c for c in ids if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad:
            raise BilevelInputError(f"split {i}: class ids must be non-negative ints, got {bad}")
        if not ids:
            raise BilevelInputError(f"split {i} is empty: every split needs at least one class")
        dup = sorted(c for c, k in Counter(ids).items() if k > 1)
        if dup:
            raise BilevelInputError(f"split {i} lists classes {dup} more than once")
        shared: dict[int, list[int]] = {}
        for c in ids:
            if c in owner:
                shared.setdefault(owner[c], []).append(c)
        if shared:
            j, cls = next(iter(sorted(shared.items())))
            raise BilevelInputError(f"splits {j} and {i} overlap: classes {sorted(cls)} are in "
                                    f"both (meta-train, validation and test classes must be "
                                    f"disjoint)")
        owner.update(dict.fromkeys(ids, i))
        out.append(ids)
    return tuple(out)


def class_splits(
    num_classes: int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    *,
    groups: Sequence[int] | Tensor | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """A seeded random split of the class ids ``0 .. num_classes-1`` into disjoint
    meta-train, meta-validation and meta-test classes (each sorted).

    Split sizes are ``round(fraction * n)`` for validation and test and the rest for training,
    each at least one. With ``groups`` (one group id per class), the groups are split instead
    and every class follows its group, so related classes never straddle two splits: for
    Omniglot with rotations (:func:`bilevel.meta.load_omniglot`, class ``r * C + c`` is
    character ``c`` rotated by ``r`` quarter turns) pass ``groups=[k % C for k in range(4 * C)]``
    to keep a character's four rotations together, as in the MAML paper.

    Raises:
        BilevelInputError: ``num_classes`` (or the number of groups) below 3, fractions that
            are not three positive numbers summing to 1, or a split that would be empty.
    """
    _check_int("class_splits: num_classes", num_classes, 1)
    _check_int("class_splits: seed", seed, -(2 ** 63))
    fr = tuple(fractions)
    if (len(fr) != 3 or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fr)
            or any(not f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6):
        raise BilevelInputError(f"class_splits: fractions must be three positive numbers "
                                f"(train, validation, test) summing to 1, got {fractions!r}")
    if groups is None:
        group_of = list(range(num_classes))
    else:
        group_of = groups.tolist() if isinstance(groups, Tensor) else list(groups)
        if len(group_of) != num_classes:
            raise BilevelInputError(f"class_splits: groups has {len(group_of)} entries for "
                                    f"{num_classes} classes")
        if any(isinstance(g, bool) or not isinstance(g, int) for g in group_of):
            raise BilevelInputError("class_splits: groups must be int group ids, one per class")
    names = sorted(set(group_of))
    n = len(names)
    sizes = [0, round(fr[1] * n), round(fr[2] * n)]
    sizes[0] = n - sizes[1] - sizes[2]
    what = "groups" if groups is not None else "classes"
    if min(sizes) < 1:
        raise BilevelInputError(f"class_splits: {n} {what} with fractions {fr} give split sizes "
                                f"{sizes}; every split needs at least one (use more classes or "
                                f"other fractions)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed)))
    where: dict[int, int] = {}
    start = 0
    for s, size in enumerate(sizes):
        for i in order[start:start + size].tolist():
            where[names[i]] = s
        start += size
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for cls, g in enumerate(group_of):
        out[where[g]].append(cls)
    return out


# --------------------------------------------------------------------------------------------
# Classification episodes
# --------------------------------------------------------------------------------------------


class EpisodeSampler:
    """N-way K-shot classification episodes drawn from a labelled dataset.

    Each task picks ``ways`` distinct classes from ``classes`` in random order (the first
    becomes label 0, the next label 1, ...), then, per class, ``shots + queries`` distinct
    examples without replacement: the first ``shots`` go to the support set and the rest to
    the query set, so support and query never share an example. Rows are **class-major**:
    support rows ``k * shots .. (k + 1) * shots - 1`` have label ``k`` (the query likewise
    with ``queries``); since labels are assigned to classes at random, the order carries no
    information about the class.

    ``info`` holds, per task, ``classes`` ``(B, N)`` (the dataset class of each label) and
    ``support_index`` / ``query_index`` ``(B, S)`` / ``(B, Q)`` (rows of ``x``).

    Args:
        x: ``(n, *features)`` inputs (a tensor or anything ``torch.as_tensor`` takes); the
            tasks live on its device and dtype.
        y: ``(n,)`` integer labels.
        ways: ``N >= 2`` classes per task.
        shots: ``K >= 1`` support examples per class.
        queries: ``>= 1`` query examples per class.
        classes: the class ids to draw from (a meta-train, validation or test split); all
            classes present in ``y`` when ``None``.
        seed: base seed; task ``t`` of ``sample(..., step)`` uses ``mix_seed(seed, step, t)``.

    Raises:
        BilevelInputError: before any work, naming what is wrong: a bad ``ways`` / ``shots``
            / ``queries``, ``x`` and ``y`` of different lengths, non-integer labels, repeated
            classes, more ways than classes, or a class with fewer than ``shots + queries``
            examples (every such class with its count).

    References:
        The episodic N-way K-shot protocol of Vinyals et al., "Matching networks for one
        shot learning", NeurIPS 2016.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        ways: int,
        shots: int,
        queries: int = 15,
        classes: Sequence[int] | Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.ways = _check_int("EpisodeSampler: ways", ways, 2)
        self.shots = _check_int("EpisodeSampler: shots (K)", shots, 1)
        self.queries = _check_int("EpisodeSampler: queries", queries, 1)
        self.seed = _check_int("EpisodeSampler: seed", seed, -(2 ** 63))
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dim() < 1:
            raise BilevelInputError(f"EpisodeSampler: x must be (n, *features), got shape "
                                    f"{_shape(x)}")
        if y.dim() != 1 or not _is_label_dtype(y):
            raise BilevelInputError(f"EpisodeSampler: y must be 1-D integer labels, got dtype "
                                    f"{y.dtype} shape {_shape(y)}")
        if x.shape[0] != y.shape[0]:
            raise BilevelInputError(f"EpisodeSampler: x has {x.shape[0]} examples "
                                    f"{_shape(x)} but y has {y.shape[0]} labels")
        labels = y.detach().cpu().long()
        present, counts = torch.unique(labels, return_counts=True)
        count_of = dict(zip(present.tolist(), counts.tolist(), strict=True))
        if classes is None:
            chosen = present.tolist()
        else:
            (chosen,) = check_splits(classes)
        if self.ways > len(chosen):
            raise BilevelInputError(f"EpisodeSampler: ways={self.ways} but only {len(chosen)} "
                                    f"classes are available ({_brief(chosen)})")
        need = self.shots + self.queries
        short = [(c, count_of.get(c, 0)) for c in chosen if count_of.get(c, 0) < need]
        if short:
            listed = ", ".join(f"class {c}: {k}" for c, k in short[:10])
            more = f" and {len(short) - 10} more" if len(short) > 10 else ""
            raise BilevelInputError(f"EpisodeSampler: {len(short)} classes have fewer than "
                                    f"shots + queries = {self.shots} + {self.queries} = {need} "
                                    f"examples ({listed}{more})")
        self.x = x
        self.classes: list[int] = chosen
        # one row of example indices per class, padded with -1; `count` valid entries each
        members = [torch.nonzero(labels == c).flatten() for c in chosen]
        self._count = torch.tensor([m.numel() for m in members])
        self._table = torch.full((len(chosen), int(self._count.max())), -1, dtype=torch.long)
        for i, m in enumerate(members):
            self._table[i, :m.numel()] = m

    def _draw(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """One task: the class rows chosen (N,) and example indices (N, shots + queries)."""
        rows = torch.randperm(len(self.classes), generator=gen)[:self.ways]
        table = self._table[rows]
        keys = torch.rand(table.shape, generator=gen).masked_fill_(table < 0, 2.0)
        order = keys.argsort(dim=1)[:, :self.shots + self.queries]
        return rows, table.gather(1, order)

    def sample(self, num_tasks: int, step: int = 0) -> TaskBatch:
        """``num_tasks`` episodes; the same ``(seed, step)`` gives the same tasks, and task
        ``t`` is the same whatever ``num_tasks``.

        Returns:
            A :class:`TaskBatch`: ``support_x`` ``(B, N·K, *features)``, ``support_y``
            ``(B, N·K)`` int64 labels in ``0 .. N-1``, ``query_x`` ``(B, N·Q, *features)``,
            ``query_y`` ``(B, N·Q)``, with B = ``num_tasks``.

        Raises:
            BilevelInputError: ``num_tasks`` < 1 or ``step`` < 0 (or not ints).
        """
        _check_int("EpisodeSampler.sample: num_tasks", num_tasks, 1)
        _check_int("EpisodeSampler.sample: step", step, 0)
        rows, picks = [], []
        for t in range(num_tasks):
            r, p = self._draw(torch.Generator().manual_seed(mix_seed(self.seed, step, t)))
            rows.append(r)
            picks.append(p)
        idx = torch.stack(picks)  # (B, N, K + Q)
        support = idx[:, :, :self.shots].reshape(num_tasks, -1)
        query = idx[:, :, self.shots:].reshape(num_tasks, -1)
        device = self.x.device
        labels = torch.arange(self.ways, device=device)
        classes = torch.tensor(self.classes)[torch.stack(rows)]
        return TaskBatch(
            support_x=self.x[support.to(device)],
            support_y=labels.repeat_interleave(self.shots).expand(num_tasks, -1).contiguous(),
            query_x=self.x[query.to(device)],
            query_y=labels.repeat_interleave(self.queries).expand(num_tasks, -1).contiguous(),
            info={"classes": classes.to(device), "support_index": support.to(device),
                  "query_index": query.to(device)},
        )

    def __repr__(self) -> str:
        return (f"EpisodeSampler(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
                f"classes={len(self.classes)}, examples={self.x.shape[0]}, seed={self.seed})")


def _brief(ids: Sequence[int], limit: int = 12) -> str:
    if len(ids) <= limit:
        return f"classes {list(ids)}"
    return f"classes {list(ids[:limit])} ... ({len(ids)} in all)"


# --------------------------------------------------------------------------------------------
# Sinusoid regression
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BilevelInputError(f"SinusoidTasks: {name} must be a (low, high) pair of numbers, "
                                f"got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise BilevelInputError(f"SinusoidTasks: {name} must be finite with low <= high, got "
                                f"{value!r}")
    return lo, hi


class SinusoidTasks:
    """Sinusoid regression (Finn et al., 2017): task ``y = A sin(x - φ)`` with
    ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]`` and inputs ``x ~ U[-5, 5]``; ``x`` and ``y`` shaped
    ``(B, S, 1)`` / ``(B, Q, 1)``, ``info = {"amplitude": (B,), "phase": (B,)}``.

    Draws are made in ``float64`` and cast to ``dtype``; ``y`` is then computed in ``dtype``
    from the cast values, so ``y == curve(info, x)`` exactly. A low equal to its high fixes
    that quantity (e.g. ``amplitude=(1.0, 1.0)``).

    Raises:
        BilevelInputError: ``shots`` or ``queries`` below 1, a range that is not a finite
            ``(low, high)`` pair with ``low <= high``, or a non-floating ``dtype``.
    """

    def __init__(
        self,
        shots: int,
        queries: int = 10,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shots = _check_int("SinusoidTasks: shots (K)", shots, 1)
        self.queries = _check_int("SinusoidTasks: queries", queries, 1)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.seed = _check_int("SinusoidTasks: seed", seed, -(2 ** 63))
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise BilevelInputError(f"SinusoidTasks: dtype must be a floating torch.dtype, got "
                                    f"{dtype!r}")
        self.dtype = dtype

    def sample(self, num_tasks: int, step: int = 0) -> TaskBatch:
        """``num_tasks`` tasks; the same ``(seed, step)`` gives the same tasks, and task ``t``
        is the same whatever ``num_tasks``.

        Returns:
            A :class:`TaskBatch` with ``x`` ``(B, shots, 1)`` / ``(B, queries, 1)`` and
            ``y`` likewise, in ``dtype``; ``info`` holds ``amplitude`` and ``phase``
            ``(B,)``.

        Raises:
            BilevelInputError: ``num_tasks`` < 1 or ``step`` < 0 (or not ints).
        """
        _check_int("SinusoidTasks.sample: num_tasks", num_tasks, 1)
        _check_int("SinusoidTasks.sample: step", step, 0)
        n = self.shots + self.queries
        params, xs = [], []
        for t in range(num_tasks):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, step, t))
            params.append(torch.rand(2, generator=gen, dtype=torch.float64))
            xs.append(torch.rand(n, 1, generator=gen, dtype=torch.float64))

        def scale(u: Tensor, lo_hi: tuple[float, float]) -> Tensor:
            return (lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u).to(self.dtype)

        u = torch.stack(params)
        info = {"amplitude": scale(u[:, 0], self.amplitude), "phase": scale(u[:, 1], self.phase)}
        x = scale(torch.stack(xs), self.x_range)
        y = self.curve(info, x)
        return TaskBatch(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:],
                         y[:, self.shots:], info=info)

    @staticmethod
    def curve(info: Mapping[str, Tensor] | TaskBatch, x: Tensor) -> Tensor:
        """The true function of each task at ``x`` (``(B, ...)``, e.g. a grid ``(B, M, 1)``
        for plots): ``A_b sin(x - φ_b)``. ``info`` is a batch's ``info`` (or the batch).

        Returns:
            A tensor shaped like ``x``.

        Raises:
            BilevelInputError: ``info`` without ``amplitude`` and ``phase``, or ``x``
                without a task axis matching them.
        """
        if isinstance(info, TaskBatch):
            info = info.info
        try:
            amp, phase = info["amplitude"], info["phase"]
        except (KeyError, TypeError):
            raise BilevelInputError("SinusoidTasks.curve: info must hold 'amplitude' and 'phase' "
                                    "tensors of shape (B,)") from None
        if amp.dim() != 1 or phase.shape != amp.shape or x.dim() < 1 or x.shape[0] != amp.shape[0]:
            raise BilevelInputError(f"SinusoidTasks.curve: amplitude {_shape(amp)} and phase "
                                    f"{_shape(phase)} must be (B,) with x leading with B, got x "
                                    f"{_shape(x)}")
        view = (-1,) + (1,) * (x.dim() - 1)
        return amp.view(view) * torch.sin(x - phase.view(view))

    def __repr__(self) -> str:
        return (f"SinusoidTasks(shots={self.shots}, queries={self.queries}, "
                f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range}, "
                f"seed={self.seed}, dtype={self.dtype})")

