"""Exceptions and warnings raised by hypergrad.

Each error names the argument at fault and what was expected, and is raised
before any expensive work starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

# The package's loggers write nowhere unless the application configures logging.
logging.getLogger("hypergrad").addHandler(logging.NullHandler())


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


#: the :attr:`ConvergenceWarning.kind` of each thing that can stop short of its tolerance
INNER_NOT_CONVERGED = "inner problem not converged"
LINEAR_SOLVE_NOT_CONVERGED = "linear solve did not converge"
NOT_A_KKT_POINT = "lower level not a KKT point"


class ConvergenceWarning(UserWarning):
    """An inner solve or a linear solve stopped before reaching its tolerance.

    ``kind`` says what stopped short without this occurrence's numbers (e.g.
    :data:`LINEAR_SOLVE_NOT_CONVERGED`), so that repeats can be counted and shown once
    (see :func:`kind_of`); the numbers are in the estimator's diagnostics.
    """

    kind: str = "did not converge"

    def __init__(self, message: str = "", kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class SecondOrderError(BilevelInputError):
    """The second derivatives of the inner objective are wrong or unavailable along the
    route an estimator takes (see :mod:`hypergrad.second_order`)."""


class SecondOrderWarning(RuntimeWarning):
    """As :class:`SecondOrderError`, for estimators built with ``self_check="warn"``."""


# --- warnings: attributed to the user's code, routed through an optional hook -------------

#: folders whose frames are library code: a warning points at the first frame outside them
_LIBRARY_DIRS: list[str] = [str(Path(__file__).resolve().parent) + os.sep,
                            str(Path(torch.__file__).resolve().parent) + os.sep]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\b(?:nan|inf)\b")

#: ``warning -> warning to show, or None``: see :func:`route_warnings`
WarningRoute = Callable[[Warning], "Warning | None"]
_ROUTE: ContextVar[WarningRoute | None] = ContextVar("hypergrad_warning_route", default=None)


def register_library_path(path: str | os.PathLike[str]) -> None:
    """Treat the code under folder ``path`` as library code when attributing warnings
    (bilevel registers its own package; :func:`warn` skips hypergrad's and torch's)."""
    folder = str(Path(path).resolve()) + os.sep
    if folder not in _LIBRARY_DIRS:
        _LIBRARY_DIRS.append(folder)
        _is_library.cache_clear()


@functools.lru_cache(maxsize=512)
def _is_library(filename: str) -> bool:
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, ValueError):  # pragma: no cover
        resolved = filename
    return any(resolved.startswith(d) or filename.startswith(d) for d in _LIBRARY_DIRS)


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called from the caller of this
    function, that names the first frame outside the library folders (hypergrad, torch,
    and those of :func:`register_library_path`): the user's line that led to the warning."""
    level, frame = 2, sys._getframe(2)
    while frame is not None:
        if not _is_library(frame.f_code.co_filename):
            return level
        frame, level = frame.f_back, level + 1
    return level - 1  # all of it is library code (a console script): the outermost frame


def kind_of(warning: Warning) -> str:
    """What a warning is about, without its numbers: its ``kind`` attribute (see
    :class:`ConvergenceWarning`) or else its message with every number replaced by ``#``.
    Warnings of one kind differ only in their numbers, so counting by kind de-duplicates."""
    kind = getattr(warning, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    return _NUMBER.sub("#", str(warning))


@contextlib.contextmanager
def route_warnings(route: WarningRoute) -> Iterator[None]:
    """Within the block (in this thread or task), hand every warning of :func:`warn` to
    ``route`` first: it returns the warning to issue (the same or an amended one) or
    ``None`` to drop it. :class:`bilevel.OuterLoop` counts them by :func:`kind_of` this way
    and shows each kind once. The innermost block's route applies."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def warn(message: str, category: type[Warning], kind: str | None = None) -> None:
    """Issue a warning of ``category``, attributed to the first caller outside the library
    (hypergrad, bilevel, torch), unless a :func:`route_warnings` hook drops it.

    ``kind`` (default: the category's own, else the message without its numbers; see
    :func:`kind_of`) names what the warning is about, for counting repeats.
    """
    if issubclass(category, ConvergenceWarning):
        warning: Warning = category(message, kind=kind)
    else:
        warning = category(message)
        if kind is not None:
            warning.kind = kind  # type: ignore[attr-defined]
    route = _ROUTE.get()
    if route is not None:
        shown = route(warning)
        if shown is None:
            return
        warning = shown
    warnings.warn(warning, stacklevel=user_stacklevel())
