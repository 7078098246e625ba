"""Inner optimizers by name, for configs, command lines and recipes.

``make_optimizer("momentum", lr=0.01, momentum=0.9)`` is ``Momentum(lr=0.01,
momentum=0.9)``; :data:`OPTIMIZERS` lists the names. Every place that accepts an
optimizer name (TOML configs, ``bilevel distill --inner-optimizer``, evaluation recipes)
reads this one table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import BilevelInputError
from .adam import Adam, AdamW
from .base import InnerOptimizer
from .momentum import Momentum, Nesterov
from .sgd import SGD

#: name -> class of the differentiable inner optimizers
OPTIMIZERS: dict[str, type] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adam": Adam,
    "adamw": AdamW,
}


def make_optimizer(name: str, **settings: Any) -> InnerOptimizer:
    """The inner optimizer called ``name`` (see :data:`OPTIMIZERS`) with ``settings``.

    Settings the optimizer does not have are an error, except ``momentum`` for those
    without one (so one recipe can name any optimizer).

    Args:
        name: ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"`` or ``"adamw"``.
        **settings: the optimizer's constructor arguments (``lr``, ``momentum``, …).

    Returns:
        The optimizer object (an :class:`~hypergrad.optim.InnerOptimizer`).

    Raises:
        BilevelInputError: an unknown name or setting, or a setting out of range.
    """
    if name not in OPTIMIZERS:
        raise BilevelInputError(f"unknown inner optimizer {name!r}; choose one of "
                                f"{sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if "momentum" not in fields:
        settings.pop("momentum", None)
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise BilevelInputError(f"{cls.__name__} has no setting(s) {unknown}; it takes "
                                f"{sorted(fields - {'carried', 'stationary'})}")
    return cls(**settings)


__all__ = ["OPTIMIZERS", "make_optimizer"]
