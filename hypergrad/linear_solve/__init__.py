"""Matrix-free linear solvers on pytrees: CG, fixed point (Neumann), GMRES, direct."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .base import LinearSolver, MatVec, SolveResult
from .cg import ConjugateGradient
from .direct import Direct
from .fixed_point import FixedPoint, Neumann
from .gmres import GMRES

SOLVERS = {
    "cg": ConjugateGradient,
    "fixed_point": FixedPoint,
    "neumann": Neumann,
    "gmres": GMRES,
    "direct": Direct,
}



def make_solver(spec: str | Mapping[str, Any] | LinearSolver) -> LinearSolver:
    """A linear solver from its :data:`SOLVERS` name (``"cg"``), a table naming it with its
    settings (``{"name": "cg", "maxiter": 20, "damping": 1e-3}``, the form a TOML config
    holds), or a solver object (returned as is).

    Args:
        spec: ``"cg"``, ``"fixed_point"``, ``"neumann"``, ``"gmres"`` or ``"direct"``, a
            mapping with ``name`` and the solver's settings, or a solver object.

    Returns:
        The solver (a :class:`LinearSolver`).

    Raises:
        ValueError: an unknown name, a table without ``name``, a setting the solver does
            not take, or a value the solver refuses (its own message).
        TypeError: ``spec`` is none of the above.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        if callable(spec) and hasattr(spec, "maxiter"):
            return spec
        raise TypeError(f"solver must be a name of {sorted(SOLVERS)}, a table such as "
                        f"{{name = \"cg\", maxiter = 20}}, or a solver object, got "
                        f"{type(spec).__name__} {spec!r}")
    settings = dict(spec)
    name = settings.pop("name", None)
    if name not in SOLVERS:
        raise ValueError(f"solver name must be one of {sorted(SOLVERS)}, got {name!r}")
    cls = SOLVERS[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"solver {name!r} takes {', '.join(fields)}; not "
                         f"{', '.join(unknown)}")
    return cls(**settings)


__all__ = ["SOLVERS", "ConjugateGradient", "Direct", "FixedPoint", "GMRES", "LinearSolver",
           "MatVec", "Neumann", "SolveResult", "make_solver"]
