"""Plain gradient descent: w ← w − lr · (∇f + wd · w)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..pytree import PyTree
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
    split,
)


@dataclass(frozen=True)
class SGD:
    """Gradient descent with optional (coupled) weight decay: w ← w − lr · (∇f + wd · w).

    Each setting is a number, a tensor, a callable ``hparams -> tensor`` (so that it can
    be a hyperparameter, e.g. ``lr=lambda h: h["log_lr"].exp()``, a learning rate
    learned in log space), or a pytree matching ``params`` giving one value per leaf.

    Args:
        lr: step size (learning-rate scale, > 0).
        weight_decay: coefficient of the L2 term added to the gradient (≥ 0).
        carried, stationary: the optimizer protocol's flags (leave the defaults).

    Raises:
        OptimizerSettingError: a number out of range (at construction); callables and
            tensors are checked by the estimators at each call.

    Example:
        >>> import torch
        >>> opt = SGD(lr=0.5)
        >>> w, _ = opt.step({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}, {}, None)
        >>> w["w"]
        tensor(0.)
    """

    lr: Setting = 0.1
    weight_decay: Setting = 0.0
    carried: tuple[str, ...] = ()
    stationary: bool = True
    limits: ClassVar[dict[str, Range]] = {"lr": STEP_SIZE, "weight_decay": WEIGHT_DECAY}

    def __post_init__(self) -> None:
        check_settings(self)

    def init(self, params: PyTree) -> State:
        """The empty state ``{}`` (plain gradient descent carries nothing)."""
        return {}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        """One differentiable step; ``grads`` matches ``params``; returns
        ``(new_params, state)``, nothing done in place."""
        leaves, rebuild = split(params)
        lr, wd = resolve(self.lr, hparams), resolve(self.weight_decay, hparams)
        if not (nonzero(wd) or isinstance(lr, (dict, list, tuple))):  # one lr, no decay
            return rebuild([p - lr * g for p, g in zip(leaves, split(grads)[0],
                                                        strict=True)]), state
        lrs = leafwise(lr, params, len(leaves))
        wds = leafwise(wd, params, len(leaves))
        new = [p - lr * (g + wd * p) if nonzero(wd) else p - lr * g
               for p, g, lr, wd in zip(leaves, split(grads)[0], lrs, wds, strict=True)]
        return rebuild(new), state
