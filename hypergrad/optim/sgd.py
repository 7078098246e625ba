"""Plain gradient descent: w ← w − lr · (∇f + wd · w)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..pytree import PyTree, tree_flatten, tree_unflatten
from .base import (
    STEP_SIZE,
    WEIGHT_DECAY,
    Range,
    Setting,
    State,
    check_settings,
    leafwise,
    nonzero,
    resolve,
)


@dataclass(frozen=True)
class SGD:
    """Gradient descent with optional (coupled) weight decay ``wd``."""

    lr: Setting = 0.1
    weight_decay: Setting = 0.0
    carried: tuple[str, ...] = ()
    stationary: bool = True
    limits: ClassVar[dict[str, Range]] = {"lr": STEP_SIZE, "weight_decay": WEIGHT_DECAY}

    def __post_init__(self) -> None:
        check_settings(self)

    def init(self, params: PyTree) -> State:
        return {}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        leaves, spec = tree_flatten(params)
        lrs = leafwise(resolve(self.lr, hparams), params)
        wds = leafwise(resolve(self.weight_decay, hparams), params)
        new = [p - lr * (g + wd * p) if nonzero(wd) else p - lr * g
               for p, g, lr, wd in zip(leaves, tree_flatten(grads)[0], lrs, wds, strict=True)]
        return tree_unflatten(new, spec), state
