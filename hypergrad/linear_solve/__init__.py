"""Matrix-free linear solvers on pytrees: CG, fixed point (Neumann), GMRES, direct."""

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

__all__ = ["SOLVERS", "ConjugateGradient", "Direct", "FixedPoint", "GMRES", "LinearSolver",
           "MatVec", "Neumann", "SolveResult"]
