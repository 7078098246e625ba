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


class NonFiniteError(FloatingPointError):
    """A loss, an iterate or a hypergradient contains NaN or inf."""


class ConvergenceWarning(UserWarning):
    """An inner solve or a linear solve stopped before reaching its tolerance."""


def warn(message: str, category: type[Warning]) -> None:
    """Warn, attributing the warning to the first caller outside this package."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
