"""Richardson (fixed-point) iteration and the truncated Neumann series built on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import LinearSolveError
from ..pytree import PyTree, tree_axpy, tree_sub
from .base import MatVec, SolveResult
from .system import _System, check, check_common

#: growth of the residual over its start beyond which a fixed-point iteration has diverged
DIVERGED = 1e10


@dataclass(frozen=True)
class FixedPoint:
    """Richardson iteration v ← v + α (b − (A + damping·I) v).

    The error contracts by I − αA at every step, so along an eigenvector of an SPD A with
    eigenvalue μ it falls like (1 − αμ)^k (α = 1/L with L ≥ λ_max is safe). It also
    converges for non-symmetric A whenever the spectral radius of I − αA is below 1.
    Each iteration takes one product, which also gives the exact residual. A residual
    grown ``DIVERGED`` (1e10) times over its start raises
    :class:`~hypergrad.errors.LinearSolveError`: the iteration does not contract.

    Args:
        alpha: step α (finite, > 0; below 2/λ_max(A) for an SPD A).
        tol: stop once the relative residual ≤ tol.
        maxiter: at most this many iterations (products).
        damping: solve (A + damping·I) x = b (finite, ≥ 0).

    Raises:
        ValueError: a bad setting (at construction).
        LinearSolveError: the residual grew 1e10 times (no contraction).
        NonFiniteError: NaN or inf in ``b``, ``x0`` or a product.

    References:
        Richardson iteration (Richardson 1911); as a hypergradient solver, Grazzi et
        al., ICML 2020 and Lorraine et al., AISTATS 2020.
    """

    alpha: float = 1.0
    tol: float = 1e-10
    maxiter: int = 100
    damping: float = 0.0
    symmetric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check(self, "alpha", math.isfinite(self.alpha) and self.alpha > 0, "finite and > 0")
        check_common(self)

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult:
        """Solve (A + damping·I) x = b; arguments and result as
        :meth:`~hypergrad.linear_solve.ConjugateGradient.__call__`."""
        return self._solve(_System.build(self, matvec, b, batched), x0)

    def _solve(self, system: _System, x0: PyTree | None) -> SolveResult:
        x, r = system.start(x0)
        rel = system.relative(r)
        active, history = rel > self.tol, [float(rel.max())]
        while active.any() and len(history) <= self.maxiter:
            x = tree_axpy(self.alpha * active.to(rel.dtype), r, x, batched=True)
            r = tree_sub(system.b, system.apply(x))
            rel = system.relative(r).where(active, rel)
            active = active & (rel > self.tol)
            history.append(float(rel.max()))
            if not history[-1] <= DIVERGED * history[0]:
                raise self._diverged(system.name, history)
        return system.result(x, len(history) - 1, history, self.tol)

    def _diverged(self, name: str, history: list[float]) -> LinearSolveError:
        damped = "(A + damping·I)" if self.damping else "A"
        return LinearSolveError(
            f"{name} diverged: the relative residual grew from {history[0]:.2e} to "
            f"{history[-1]:.2e} in {len(history) - 1} iterations, so the spectral radius of "
            f"I − alpha·{damped} is not below 1 (alpha = {self.alpha:g}). Lower alpha "
            "(below 2/λ_max(A)); if A is singular or indefinite, add damping or use GMRES "
            "or Direct")


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series v = α Σ_{j=0}^{K} (I − α (A + damping·I))^j b, K = ``terms``.

    This is exactly K + 1 fixed-point steps from v = 0 (:class:`FixedPoint` with tol = 0),
    which converges to A⁻¹ b when the spectral radius of I − αA is below 1. A given ``x0``
    replaces the start v = 0 (then v is no longer the plain series); it is ignored otherwise.

    Args:
        alpha: step α (finite, > 0).
        terms: K, the number of series terms after the first (int ≥ 0).
        damping: solve (A + damping·I) x = b (finite, ≥ 0).

    Raises:
        ValueError: a bad setting (at construction).
        LinearSolveError, NonFiniteError: as :class:`FixedPoint`.

    References:
        Lorraine, Vicol, Duvenaud, "Optimizing millions of hyperparameters by implicit
        differentiation", AISTATS 2020.
    """

    alpha: float = 1.0
    terms: int = 10
    damping: float = 0.0
    symmetric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check(self, "alpha", math.isfinite(self.alpha) and self.alpha > 0, "finite and > 0")
        check(self, "terms", isinstance(self.terms, int) and self.terms >= 0, "an int >= 0")
        check(self, "damping", math.isfinite(self.damping) and self.damping >= 0,
               "finite and >= 0")

    @property
    def tol(self) -> float:
        """0: the series always runs its ``terms + 1`` steps."""
        return 0.0

    @property
    def maxiter(self) -> int:
        """``terms + 1`` fixed-point steps."""
        return self.terms + 1

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult:
        """Solve (A + damping·I) x = b; arguments and result as
        :meth:`~hypergrad.linear_solve.ConjugateGradient.__call__` (``x0`` replaces the
        start v = 0)."""
        steps = FixedPoint(self.alpha, tol=0.0, maxiter=self.maxiter, damping=self.damping)
        return steps._solve(_System.build(self, matvec, b, batched), x0)
