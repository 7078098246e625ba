"""Heavy-ball and Nesterov momentum in PyTorch's convention (``torch.optim.SGD``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..pytree import PyTree, tree_flatten, tree_unflatten, tree_zeros_like
from .base import (
    MOMENTUM,
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
class Momentum:
    """Heavy ball: g ← ∇f + wd·w;  m ← μ·m + g;  w ← w − lr·m.

    ``momentum`` is μ; state ``{"m": buffer like params}`` (zeros at init).
    """

    lr: Setting = 0.1
    momentum: Setting = 0.9
    weight_decay: Setting = 0.0
    carried: tuple[str, ...] = ("m",)
    stationary: bool = True
    nesterov: ClassVar[bool] = False
    limits: ClassVar[dict[str, Range]] = {"lr": STEP_SIZE, "momentum": MOMENTUM,
                                          "weight_decay": WEIGHT_DECAY}

    def __post_init__(self) -> None:
        check_settings(self)

    def init(self, params: PyTree) -> State:
        return {"m": tree_zeros_like(params)}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        leaves, spec = tree_flatten(params)
        settings = [leafwise(resolve(s, hparams), params)
                    for s in (self.lr, self.momentum, self.weight_decay)]
        new_p, new_m = [], []
        for p, g, m, lr, mu, wd in zip(leaves, tree_flatten(grads)[0],
                                       tree_flatten(state["m"])[0], *settings, strict=True):
            if nonzero(wd):
                g = g + wd * p
            m = mu * m + g
            new_p.append(p - lr * (g + mu * m if self.nesterov else m))
            new_m.append(m)
        return tree_unflatten(new_p, spec), {**state, "m": tree_unflatten(new_m, spec)}


@dataclass(frozen=True)
class Nesterov(Momentum):
    """Nesterov momentum: g ← ∇f + wd·w;  m ← μ·m + g;  w ← w − lr·(g + μ·m)."""

    nesterov: ClassVar[bool] = True
