"""Exceptions and warnings raised by hypergrad.

Each error names the argument at fault and what was expected, and is raised
before any expensive work starts.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class BilevelInputError(ValueError):
    """An argument has the wrong type, structure, shape, dtype or device."""


class HyperparameterError(BilevelInputError):
    """The hyperparameters are malformed or not read by the problem."""


class ObjectiveError(BilevelInputError):
    """An objective returned something other than a finite scalar tensor."""


class OptimizerSettingError(BilevelInputError):
    """An inner optimizer setting is out of range (a step size <= 0, a momentum >= 1, ...)."""


class NonFiniteError(FloatingPointError):
    """A loss, an iterate or a hypergradient contains NaN or inf."""


class LinearSolveError(NonFiniteError):
    """A linear solver broke down: the system is singular, not positive definite, or the
    iteration does not contract."""


class DivergenceError(NonFiniteError):
    """The inner run diverged: NaN or inf in its parameters, or a loss grown by many
    orders of magnitude."""


class ConvergenceWarning(UserWarning):
    """An inner solve or a linear solve stopped before reaching its tolerance."""


class SecondOrderError(BilevelInputError):
    """The second derivatives of the inner objective are wrong or unavailable along the
    route an estimator takes (see :mod:`hypergrad.second_order`)."""


class SecondOrderWarning(RuntimeWarning):
    """As :class:`SecondOrderError`, for estimators built with ``self_check="warn"``."""


def warn(message: str, category: type[Warning]) -> None:
    """Warn, attributing the warning to the first caller outside this package."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
