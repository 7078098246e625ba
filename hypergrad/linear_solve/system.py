"""Plumbing shared by the solvers: validation and (A + damping·I) x = b as k columns.

Internally the solvers work on k columns (k = 1 when ``batched=False``): each leaf
carries a leading dimension k, step sizes are vectors of length k, and a column
whose relative residual reached ``tol`` is frozen while the others go on. (CG solves a
single right-hand side on the flat list of leaves instead, without the column
dimension; it shares the checks below.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LinearSolveError, NonFiniteError
from ..pytree import (
    PyTree,
    tree_all_finite,
    tree_axpy,
    tree_map,
    tree_norm,
    tree_sub,
    tree_zeros_like,
)
from .base import MatVec, SolveResult


def check(solver: object, field: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{type(solver).__name__}: {field} must be {expected}, "
                         f"got {getattr(solver, field)!r}")


def check_common(solver: object) -> None:
    """Validate the ``tol``, ``maxiter``, ``damping`` and ``preconditioner`` fields."""
    tol, maxiter, damping = solver.tol, solver.maxiter, solver.damping
    check(solver, "tol", tol >= 0, ">= 0")
    check(solver, "maxiter", isinstance(maxiter, int) and maxiter >= 1, "an int >= 1")
    check(solver, "damping", math.isfinite(damping) and damping >= 0, "finite and >= 0")
    precond = getattr(solver, "preconditioner", None)
    check(solver, "preconditioner", precond is None or callable(precond), "None or callable")


def _as_cols(x: PyTree, batched: bool) -> PyTree:
    """``x`` with a leading column dimension (of size 1 unless already ``batched``)."""
    return x if batched else tree_map(lambda a: a.unsqueeze(0), x)


def _lift(fn: Callable[[PyTree], PyTree] | None, batched: bool) -> Callable | None:
    """``fn`` as a map on batches of columns; an unbatched ``fn`` sees the single column."""
    if fn is None or batched:
        return fn
    return lambda x: _as_cols(fn(tree_map(lambda a: a[0], x)), False)


def _cols(alpha: torch.Tensor, x: PyTree) -> PyTree:
    """Column i of the batched tree ``x`` scaled by ``alpha[i]``."""
    return tree_map(lambda a: a * alpha.reshape(-1, *[1] * (a.dim() - 1)), x)


def check_rhs(name: str, b: PyTree) -> None:
    """Raise :class:`NonFiniteError` when the right-hand side holds NaN or inf."""
    if not tree_all_finite(b):
        raise NonFiniteError(f"{name}: the right-hand side b contains NaN or inf")


def check_product(name: str, x: PyTree, y: PyTree) -> None:
    """Raise when the product ``y`` = A ``x`` holds NaN or inf: a :class:`LinearSolveError`
    if ``x`` already did (the solve broke down, not A), else a :class:`NonFiniteError`."""
    if not tree_all_finite(y):
        if not tree_all_finite(x):  # the solver fed it NaN: blame the solve, not A
            raise LinearSolveError(
                f"{name}: the solve broke down: the vector multiplied by A already "
                "contains NaN or inf (the iterates overflowed: A is singular or not "
                "positive definite, or a preconditioner is; add damping or use Direct)")
        raise NonFiniteError(f"{name}: the matrix-vector product returned NaN or inf")


@dataclass(frozen=True)
class _System:
    """(A + damping·I) x = b as k columns; every product is checked for NaN and inf."""

    name: str
    matvec: MatVec  # on batches
    b: PyTree  # batched
    bnorm: torch.Tensor  # (k,)
    damping: float
    batched: bool
    #: ‖b‖ per column, 1 where b = 0: the denominator of the relative residual
    bscale: torch.Tensor

    @classmethod
    def build(cls, solver: object, matvec: MatVec, b: PyTree, batched: bool) -> _System:
        name = type(solver).__name__
        check_rhs(name, b)
        b = _as_cols(b, batched)
        bnorm = tree_norm(b, batched=True)
        return cls(name, _lift(matvec, batched), b, bnorm, solver.damping, batched,
                   torch.where(bnorm > 0, bnorm, 1))

    @property
    def nonzero(self) -> torch.Tensor:
        return self.bnorm > 0

    def apply(self, x: PyTree) -> PyTree:
        """(A + damping·I) x."""
        y = self.matvec(x)
        check_product(self.name, x, y)
        return tree_axpy(self.damping, x, y) if self.damping else y

    def relative(self, r: PyTree) -> torch.Tensor:
        """‖r‖ / ‖b‖ per column (‖r‖ for the columns where b = 0)."""
        return tree_norm(r, batched=True) / self.bscale

    def start(self, x0: PyTree | None) -> tuple[PyTree, PyTree]:
        """The initial iterate (x0, or 0 in the columns where b = 0) and its residual."""
        if x0 is None or not self.nonzero.any():
            return tree_zeros_like(self.b), self.b
        if not tree_all_finite(x0):
            raise NonFiniteError(f"{self.name}: the initial guess x0 contains NaN or inf")
        x = _cols(self.nonzero.to(self.bnorm.dtype), _as_cols(x0, self.batched))
        return x, tree_sub(self.b, self.apply(x))

    def result(self, x: PyTree, iterations: int, history: list[float],
               tol: float) -> SolveResult:
        """Package the solve; the residual is the last entry of ``history``."""
        if not self.batched:
            x = tree_map(lambda a: a[0], x)
        return SolveResult(x, iterations, history[-1], history[-1] <= tol, history)
