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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..pytree import PyTree, tree_flatten, tree_structure, tree_unflatten

Setting = float | torch.Tensor | Callable[[PyTree], Any]
State = dict[str, Any]


@runtime_checkable
class InnerOptimizer(Protocol):
    carried: tuple[str, ...]
    stationary: bool

    def init(self, params: PyTree) -> State: ...

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]: ...


def resolve(setting: Setting, hparams: PyTree) -> Any:
    """The value of a setting for these hyperparameters."""
    return setting(hparams) if callable(setting) else setting


def nonzero(value: Any) -> bool:
    """False only for a plain number equal to 0 (a term that can be skipped)."""
    return not (isinstance(value, (int, float)) and value == 0)


def leafwise(value: Any, params: PyTree) -> list[Any]:
    """One value per parameter leaf: a scalar is repeated, a matching pytree is split."""
    leaves, spec = tree_flatten(params)
    if isinstance(value, (dict, list, tuple)):
        if tree_structure(value) != spec:
            raise ValueError(
                "a per-leaf optimizer setting must have the structure of the parameters; "
                f"got {tree_structure(value)}, expected {spec}")
        return tree_flatten(value)[0]
    return [value] * len(leaves)


def map_leaves(fn: Callable[..., Any], params: PyTree, *others: PyTree) -> PyTree:
    """Apply ``fn(p, *o)`` leafwise over ``params`` and trees of the same structure."""
    leaves, spec = tree_flatten(params)
    other_leaves = [tree_flatten(o)[0] for o in others]
    return tree_unflatten([fn(p, *o) for p, *o in zip(leaves, *other_leaves, strict=True)], spec)
