"""Differentiable inner optimizers as pure ``init`` / ``step`` pairs on pytrees."""

from .adam import Adam, AdamW
from .base import InnerOptimizer, Setting, State
from .chebyshev import Chebyshev
from .momentum import Momentum, Nesterov
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Chebyshev", "InnerOptimizer", "Momentum", "Nesterov",
           "Setting", "State"]
