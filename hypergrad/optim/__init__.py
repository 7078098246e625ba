"""Differentiable inner optimizers as pure ``init`` / ``step`` pairs on pytrees."""

from .adam import Adam, AdamW
from .base import InnerOptimizer, Range, Setting, State, check_settings
from .chebyshev import Chebyshev
from .momentum import Momentum, Nesterov
from .registry import OPTIMIZERS, make_optimizer
from .sgd import SGD

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "Chebyshev", "InnerOptimizer", "Momentum",
           "Nesterov", "Range", "Setting", "State", "check_settings", "make_optimizer"]
