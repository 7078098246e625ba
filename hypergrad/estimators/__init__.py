"""Hypergradient estimators behind one interface, chosen by object or by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..linear_solve import make_solver
from .base import Diagnostics, Estimator, EstimatorState, Hypergradient
from .implicit import Implicit
from .kkt import KKTImplicit
from .lvhba import LVHBA, ConstrainedDiagnostics, LVHBARun
from .soba import SABA, SOBA, soba_step_size
from .truncated import Truncated
from .unrolled import Unrolled

#: Names accepted wherever an estimator is expected, with their settings.
ESTIMATORS: dict[str, tuple[type[Estimator], dict[str, Any]]] = {
    "unrolled": (Unrolled, {}),
    "recompute": (Unrolled, {"recompute": True}),
    "forward": (Unrolled, {"mode": "forward"}),
    "truncated": (Truncated, {}),
    "random_window": (Truncated, {"random": True}),
    "implicit": (Implicit, {}),
    "fixed_point": (Implicit, {"fixed_point": True}),
    "kkt": (KKTImplicit, {}),
    "lvhba": (LVHBA, {}),
    "soba": (SOBA, {}),
    "saba": (SABA, {}),
}


def make_estimator(name: str | Estimator, **settings: Any) -> Estimator:
    """An estimator from its registry name (``"implicit"``, ``"truncated"``, …) and settings.

    A ``solver`` setting may be a solver object, a :data:`hypergrad.linear_solve.SOLVERS`
    name or a table ``{"name": "cg", "maxiter": 20, "damping": 1e-3}``
    (:func:`~hypergrad.linear_solve.make_solver`), so configs can choose and budget it.

    Args:
        name: a key of :data:`ESTIMATORS` (``"unrolled"``, ``"recompute"``, ``"forward"``,
            ``"truncated"``, ``"random_window"``, ``"implicit"``, ``"fixed_point"``,
            ``"kkt"``, ``"lvhba"``, ``"soba"``, ``"saba"``), or an estimator object,
            returned as is.
        **settings: the estimator's constructor arguments, overriding the registry's
            defaults for that name.

    Returns:
        The :class:`Estimator`.

    Raises:
        ValueError: an unknown name or solver, or a setting the estimator refuses.
        TypeError: settings the estimator does not take, or settings given with an
            estimator object.
    """
    if isinstance(name, Estimator):
        if settings:
            raise TypeError("settings can only be given with an estimator name")
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    cls, defaults = ESTIMATORS[name]
    if isinstance(settings.get("solver"), (str, Mapping)):
        settings = {**settings, "solver": make_solver(settings["solver"])}
    return cls(**{**defaults, **settings})


__all__ = [
    "ConstrainedDiagnostics", "Diagnostics", "ESTIMATORS", "Estimator", "EstimatorState",
    "Hypergradient", "Implicit", "KKTImplicit", "LVHBA", "LVHBARun", "SABA", "SOBA", "Truncated",
    "Unrolled", "make_estimator", "soba_step_size",
]
