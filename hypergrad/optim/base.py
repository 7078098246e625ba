"""The interface of differentiable inner optimizers.

An inner optimizer is a pair of pure functions, as in Optax:

- ``init(params) -> state``: a dict of tensors/pytrees (and Python ints);
- ``step(params, grads, state, hparams) -> (params, state)``: one update.

Nothing is done in place and no graph is kept between calls, so any estimator can
differentiate through ``step`` (reverse or forward mode) or stop the graph between
steps. ``carried`` names the state entries that evolve with the iterate (momentum
buffers); they join the parameters in the fixed-point map used by implicit
differentiation, while other entries (Adam's second moment, step counters) are held
fixed there. ``stationary`` says whether ``step`` is a fixed map of (params, state),
which implicit differentiation through the optimizer's fixed point requires.

A setting (learning rate, momentum, weight decay) is a number, a tensor, or a
callable ``hparams -> tensor`` so that it can be a hyperparameter that receives a
gradient, e.g. ``SGD(lr=lambda h: h["log_lr"].exp())``. A setting may also resolve
to a pytree with the structure of the parameters, giving one value per leaf.

An optimizer may declare the valid range of each setting in a class attribute
``limits`` (field name -> :class:`Range`) and pairs that must be ordered in ``ordered``
(Chebyshev's mu < L): :func:`check_settings` refuses numbers out of range at
construction, and the estimators check callables and tensors once per call, at the
hyperparameters given (never inside the inner steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import OptimizerSettingError
from ..pytree import PyTree, tree_flatten, tree_leaves, tree_structure, tree_unflatten

Setting = float | torch.Tensor | Callable[[PyTree], Any]
State = dict[str, Any]


@runtime_checkable
class InnerOptimizer(Protocol):
    """A differentiable inner optimizer: ``init(params) -> state`` and
    ``step(params, grads, state, hparams) -> (params, state)``, pure functions on pytrees.

    ``carried`` names the state entries that evolve with the iterate (joined to the
    parameters in the fixed-point map of implicit differentiation); ``stationary`` says
    whether ``step`` is a fixed map of (params, state).
    """

    carried: tuple[str, ...]
    stationary: bool

    def init(self, params: PyTree) -> State: ...

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]: ...


@dataclass(frozen=True)
class Range:
    """The valid values of a setting: finite, above ``low`` (or equal if ``closed``) and
    below ``high``; ``why`` says what goes wrong outside."""

    low: float
    high: float = math.inf
    closed: bool = False
    why: str = ""

    def holds(self, x: Any) -> Any:
        """Whether ``x`` (a number or tensor, elementwise) lies in the range."""
        return (x >= self.low if self.closed else x > self.low) & (x < self.high)

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"finite and {'>=' if self.closed else '>'} {self.low:g}"
        return f"in {'[' if self.closed else '('}{self.low:g}, {self.high:g})"


STEP_SIZE = Range(0.0, why="a step size <= 0 does not descend")
WEIGHT_DECAY = Range(0.0, closed=True, why="a negative one pushes the weights away from 0")
MOMENTUM = Range(0.0, 1.0, closed=True, why="a momentum >= 1 never forgets and diverges")
BETA = Range(0.0, 1.0, closed=True, why="a moving average needs a weight in [0, 1)")
EPS = Range(0.0, why="it keeps the step finite where the second moment is 0")
CURVATURE = Range(0.0, why="μ and L bound the Hessian's eigenvalues, μI ⪯ H ⪯ LI")


def check_settings(optimizer: Any, hparams: PyTree | None = None) -> None:
    """Refuse settings outside their ``optimizer.limits`` (a step size <= 0, a momentum
    >= 1, ...) and a violated ``optimizer.ordered`` pair (Chebyshev's mu < L).

    Without ``hparams`` (at construction) only plain numbers are checked; with them,
    callables are resolved and tensors read as well: once per estimator call, one host
    sync per tensor setting, never in the inner steps.

    Args:
        optimizer: an inner optimizer with a ``limits`` (and optionally ``ordered``)
            class attribute; others pass.
        hparams: the hyperparameters at which to resolve callable settings, or ``None``.

    Raises:
        OptimizerSettingError: a setting out of range, of the wrong type (a string, a
            boolean or complex tensor…), or an unordered pair.
    """
    name = type(optimizer).__name__
    for field, limit in getattr(optimizer, "limits", {}).items():
        try:
            values = list(_values(getattr(optimizer, field), hparams, field))
        except OptimizerSettingError as exc:
            raise OptimizerSettingError(f"{name}: {exc}") from None
        for path, value in values:
            ok = limit.holds(value)
            if not _all(ok):
                raise OptimizerSettingError(
                    f"{name}: {path} must be {limit} ({limit.why}), got {_bad(value, ok)}")
    for low, high in getattr(optimizer, "ordered", ()):
        lows = list(_values(getattr(optimizer, low), hparams, low))
        highs = list(_values(getattr(optimizer, high), hparams, high))
        for (lpath, lv), (hpath, hv) in _broadcast(lows, highs):
            if not _all(lv < hv):
                raise OptimizerSettingError(f"{name}: {lpath} must be < {hpath}, got {lpath} = "
                                            f"{_show(lv)} and {hpath} = {_show(hv)}")


def _values(setting: Any, hparams: PyTree | None, path: str) -> Iterator[tuple[str, Any]]:
    """(path, number or tensor) for each leaf of a setting, ``lr(hparams)`` for a callable
    ``lr``; callables and tensors are skipped without ``hparams``."""
    if callable(setting):
        if hparams is not None:
            with torch.no_grad():
                value = setting(hparams)
            yield from _values(value, hparams, f"{path}(hparams)")
    elif isinstance(setting, (tuple, list)):
        for i, v in enumerate(setting):
            yield from _values(v, hparams, f"{path}[{i}]")
    elif isinstance(setting, dict):
        for k, v in setting.items():
            yield from _values(v, hparams, f"{path}[{k!r}]")
    elif isinstance(setting, torch.Tensor):
        if not (setting.is_floating_point() or setting.dtype in _INTEGER_DTYPES):
            raise OptimizerSettingError(f"{path} must be a number, a floating tensor or a "
                                        f"callable of the hyperparameters, got a tensor of "
                                        f"dtype {setting.dtype}")
        if hparams is not None:
            yield path, setting.detach()
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
        yield path, setting
    else:
        raise OptimizerSettingError(
            f"{path} must be a number, a tensor or a callable of the hyperparameters "
            f"(e.g. lambda h: h['log_lr'].exp()), got {type(setting).__name__} {setting!r}")


_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _broadcast(a: list, b: list) -> list[tuple]:
    """Pairs of per-leaf values, a single value paired with every leaf of the other."""
    if not a or not b:
        return []  # a callable not resolved yet
    return list(zip(a * len(b) if len(a) == 1 else a, b * len(a) if len(b) == 1 else b,
                    strict=False))


def _all(ok: Any) -> bool:
    return bool(ok.all()) if isinstance(ok, torch.Tensor) else bool(ok)


def _bad(value: Any, ok: Any) -> str:
    """The value, or for a tensor its first entry that fails."""
    if not isinstance(value, torch.Tensor):
        return f"{value!r}"
    if value.dim() == 0:
        return f"{value.item()!r}"
    return f"{value[~ok][0].item()!r} (an entry of a tensor of shape {tuple(value.shape)})"


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return f"a tensor in [{value.min().item():g}, {value.max().item():g}]"
    return f"{value.item() if isinstance(value, torch.Tensor) else value!r}"


def resolve(setting: Setting, hparams: PyTree) -> Any:
    """The value of a setting for these hyperparameters."""
    return setting(hparams) if callable(setting) else setting


def nonzero(value: Any) -> bool:
    """False only for a plain number equal to 0 (a term that can be skipped)."""
    return not (isinstance(value, (int, float)) and value == 0)


def leafwise(value: Any, params: PyTree, n_leaves: int | None = None) -> list[Any]:
    """One value per parameter leaf: a scalar is repeated, a matching pytree is split.
    ``n_leaves``, the number of leaves of ``params`` where the caller knows it, saves
    flattening ``params`` for a scalar."""
    if not isinstance(value, (dict, list, tuple)):
        return [value] * (len(tree_leaves(params)) if n_leaves is None else n_leaves)
    spec = tree_structure(params)
    if tree_structure(value) != spec:
        raise ValueError(
            "a per-leaf optimizer setting must have the structure of the parameters; "
            f"got {tree_structure(value)}, expected {spec}")
    return tree_flatten(value)[0]


def split(tree: PyTree) -> tuple[list[Any], Callable[[list[Any]], PyTree]]:
    """``(leaves, rebuild)``: the leaves of ``tree`` and a function putting new leaves into
    its structure, as ``tree_flatten`` / ``tree_unflatten`` (same order), with a shortcut
    for a flat dict of tensors, the usual parameters, which the generic pytree code
    flattens several times slower (inner optimizers do it at every step)."""
    if type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values()):
        keys = list(tree)
        return list(tree.values()), lambda leaves: dict(zip(keys, leaves, strict=True))
    leaves, spec = tree_flatten(tree)
    return leaves, lambda new: tree_unflatten(new, spec)


def map_leaves(fn: Callable[..., Any], params: PyTree, *others: PyTree) -> PyTree:
    """Apply ``fn(p, *o)`` leafwise over ``params`` and trees of the same structure."""
    leaves, spec = tree_flatten(params)
    other_leaves = [tree_flatten(o)[0] for o in others]
    return tree_unflatten([fn(p, *o) for p, *o in zip(leaves, *other_leaves, strict=True)], spec)
