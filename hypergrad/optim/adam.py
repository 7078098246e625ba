"""Adam and AdamW, matching ``torch.optim.Adam`` / ``torch.optim.AdamW``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pytree import PyTree, tree_flatten, tree_leaves, tree_unflatten, tree_zeros_like
from .base import (
    BETA,
    EPS,
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
class Adam:
    """Adam with coupled L2 weight decay, t counting from 1:

    g ← ∇f + wd·w;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
    w ← w − lr · m̂ / (√v̂ + eps)  with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ).

    ``betas`` is a pair of settings or a setting resolving to a pair. State
    ``{"m", "v", "t"}``; only ``m`` is carried, ``v`` and ``t`` are held fixed in the
    fixed-point map. √v has derivative 0 at v = 0 so that double backward stays finite.

    Args:
        lr: step size (> 0; learning-rate scale, default 1e-3).
        betas: (β₁, β₂), each in [0, 1).
        eps: added to √v̂ (> 0).
        weight_decay: coupled L2 coefficient (≥ 0).

    Raises:
        OptimizerSettingError: a number out of range (at construction).

    References:
        Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.
    """

    lr: Setting = 1e-3
    betas: tuple[Setting, Setting] | Setting = (0.9, 0.999)
    eps: Setting = 1e-8
    weight_decay: Setting = 0.0
    carried: tuple[str, ...] = ("m",)
    stationary: bool = True
    decoupled: ClassVar[bool] = False
    limits: ClassVar[dict[str, Range]] = {"lr": STEP_SIZE, "betas": BETA, "eps": EPS,
                                          "weight_decay": WEIGHT_DECAY}

    def __post_init__(self) -> None:
        check_settings(self)

    def init(self, params: PyTree) -> State:
        """``{"m": zeros, "v": zeros (like params), "t": 0}``."""
        return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "t": 0}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        """One differentiable step; returns ``(new_params, new_state)``."""
        leaves, spec = tree_flatten(params)
        t = state["t"] + 1
        b1, b2 = (resolve(b, hparams) for b in resolve(self.betas, hparams))
        settings = [leafwise(s, params, len(leaves)) for s in
                    (resolve(self.lr, hparams), b1, b2, resolve(self.eps, hparams),
                     resolve(self.weight_decay, hparams))]
        new_p, new_m, new_v = [], [], []
        for p, g, m, v, lr, b1, b2, eps, wd in zip(
                leaves, tree_leaves(grads), tree_leaves(state["m"]),
                tree_leaves(state["v"]), *settings, strict=True):
            decay = nonzero(wd)
            if decay and not self.decoupled:
                g = g + wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (g * g)
            update = m / ((1 - b1**t) * (_safe_sqrt(v) / (1 - b2**t) ** 0.5 + eps))
            if decay and self.decoupled:
                update = update + wd * p
            new_p.append(p - lr * update)
            new_m.append(m)
            new_v.append(v)
        return tree_unflatten(new_p, spec), {**state, "m": tree_unflatten(new_m, spec),
                                              "v": tree_unflatten(new_v, spec), "t": t}


@dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay: w ← w − lr·(m̂/(√v̂ + eps) + wd·w).

    Settings as :class:`Adam` (``weight_decay`` defaults to 1e-2, as in
    ``torch.optim.AdamW``).

    References:
        Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019.
    """

    weight_decay: Setting = 1e-2
    decoupled: ClassVar[bool] = True


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v for v ≥ 0 whose derivatives at v = 0 are 0 instead of inf (no 0·inf = NaN)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))),
                       torch.zeros_like(v))
