"""The interface of matrix-free linear solvers.

A solver is a small frozen config object, called as ``solver(matvec, b, x0=None,
batched=False) -> SolveResult``. ``matvec`` maps a pytree to a pytree of the same
structure (x ↦ A x); with ``batched=True`` every leaf of ``b`` (and of ``x0``) carries
a leading dimension of k right-hand sides, ``matvec`` accepts such batches, and the k
systems are solved together (one batched product per iteration).

Every solver supports ``damping`` (solve (A + damping·I) x = b), a warm start ``x0``,
and reports the relative residual ‖b − A x‖ / ‖b‖ (the largest over the batch) with
its history, so that a solve that stopped short is never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..pytree import PyTree

MatVec = Callable[[PyTree], PyTree]


@dataclass(frozen=True)
class SolveResult:
    """Solution and diagnostics of one (possibly batched) linear solve.

    Attributes:
        x: the solution, a pytree matching ``b`` (with the leading batch dimension of k
            right-hand sides when ``batched``).
        iterations: matrix-vector products (iterations) spent; for :class:`Direct` the
            number n of unknowns (columns materialised).
        residual: final relative residual ‖b − (A + damping·I) x‖ / ‖b‖ (the largest
            over the batch; ‖r‖ where b = 0).
        converged: ``residual <= tol``.
        residuals: the relative residual before the first and after each iteration.
        note: what the solver met on the way (e.g. CG's negative curvature), for the
            warning when it did not converge.
    """

    x: PyTree
    iterations: int
    residual: float
    converged: bool
    residuals: list[float] = field(default_factory=list)
    #: what the solver met on the way (e.g. CG's negative curvature), for the warning
    #: when it did not converge
    note: str | None = None


@runtime_checkable
class LinearSolver(Protocol):
    """What every solver is: ``solver(matvec, b, x0=None, batched=False) -> SolveResult``.

    ``matvec`` maps a pytree to a pytree of the same structure (x ↦ A x); ``b`` is that
    pytree (with a leading dimension of k right-hand sides on every leaf when
    ``batched``); ``x0`` a warm start like ``b``. Solvers raise
    :class:`~hypergrad.errors.LinearSolveError` when they break down and
    :class:`~hypergrad.errors.NonFiniteError` when ``b``, ``x0`` or a product holds NaN
    or inf; a solve that merely stops above ``tol`` is reported in the result, not raised.
    """

    #: True if the solver needs a symmetric positive-definite operator (CG, Neumann).
    symmetric: bool
    tol: float
    maxiter: int

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult: ...
