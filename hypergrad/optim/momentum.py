"""Heavy-ball and Nesterov momentum in PyTorch's convention (``torch.optim.SGD``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..pytree import PyTree, tree_zeros_like
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
    split,
)


@dataclass(frozen=True)
class Momentum:
    """Heavy ball: g ← ∇f + wd·w;  m ← μ·m + g;  w ← w − lr·m.

    ``momentum`` is μ; state ``{"m": buffer like params}`` (zeros at init), carried in
    the fixed-point map of ``Implicit(fixed_point=True)``. Settings are numbers,
    tensors, callables of the hyperparameters or per-leaf pytrees, as for :class:`SGD`.

    Args:
        lr: step size (> 0).
        momentum: μ in [0, 1).
        weight_decay: coupled L2 coefficient (≥ 0).

    Raises:
        OptimizerSettingError: a number out of range (at construction).

    References:
        Polyak, "Some methods of speeding up the convergence of iteration methods", 1964
        (in the convention of ``torch.optim.SGD``).
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
        """``{"m": zeros like params}``."""
        return {"m": tree_zeros_like(params)}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        """One differentiable step; returns ``(new_params, new_state)``."""
        leaves, rebuild = split(params)
        settings = [leafwise(resolve(s, hparams), params, len(leaves))
                    for s in (self.lr, self.momentum, self.weight_decay)]
        new_p, new_m = [], []
        for p, g, m, lr, mu, wd in zip(leaves, split(grads)[0], split(state["m"])[0],
                                       *settings, strict=True):
            if nonzero(wd):
                g = g + wd * p
            m = mu * m + g
            new_p.append(p - lr * (g + mu * m if self.nesterov else m))
            new_m.append(m)
        return rebuild(new_p), {**state, "m": rebuild(new_m)}


@dataclass(frozen=True)
class Nesterov(Momentum):
    """Nesterov momentum: g ← ∇f + wd·w;  m ← μ·m + g;  w ← w − lr·(g + μ·m).

    Same settings, state and errors as :class:`Momentum`.

    References:
        Nesterov, "A method for solving the convex programming problem with convergence
        rate O(1/k²)", 1983; Sutskever et al., ICML 2013 (the form of
        ``torch.optim.SGD(nesterov=True)``).
    """

    nesterov: ClassVar[bool] = True
