"""Dense solve: materialise A from n products with the identity basis."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import vmap

from ..errors import LinearSolveError, NonFiniteError
from ..pytree import PyTree, tree_leaves, tree_map, tree_stack, tree_unravel, tree_zeros_like
from .base import MatVec, SolveResult
from .system import _System, check


def _ravel_cols(x: PyTree) -> torch.Tensor:
    """The k columns of a batched tree as the rows of a (k, n) matrix."""
    return torch.cat([a.reshape(a.shape[0], -1) for a in tree_leaves(x)], dim=1)


@dataclass(frozen=True)
class Direct:
    """Exact solve of (A + damping·I) x = b with A[:, i] = A eᵢ, i = 1..n.

    Costs n products and O(n³) work, so n (the number of scalars per right-hand side)
    is capped by ``max_size``. ``symmetric=True`` uses a Cholesky factorisation (with an
    LU fallback when A is not positive definite). ``x0`` is ignored; ``converged`` says
    whether the relative residual of the dense solve is below ``tol``. A singular matrix
    raises :class:`~hypergrad.errors.LinearSolveError` (add ``damping``).

    Args:
        damping: solve (A + damping·I) x = b (finite, ≥ 0).
        symmetric: try a Cholesky factorisation first.
        max_size: the largest number n of unknowns accepted (memory O(n²)).
        tol: relative residual below which ``converged`` is True.

    Raises:
        ValueError: a bad setting (at construction); n > ``max_size`` (at call).
        LinearSolveError: A + damping·I is singular.
        NonFiniteError: NaN or inf in ``b`` or in a product A eᵢ.

    Source: LU / Cholesky factorisation (``torch.linalg.solve``,
    ``torch.cholesky_solve``).
    """

    damping: float = 0.0
    symmetric: bool = False
    max_size: int = 10_000
    tol: float = 1e-5

    def __post_init__(self) -> None:
        check(self, "damping", math.isfinite(self.damping) and self.damping >= 0,
               "finite and >= 0")
        check(self, "symmetric", isinstance(self.symmetric, bool), "a bool")
        check(self, "max_size", isinstance(self.max_size, int) and self.max_size >= 1,
               "an int >= 1")
        check(self, "tol", self.tol >= 0, ">= 0")

    @property
    def maxiter(self) -> int:
        """``max_size`` (the solver protocol's budget: at most that many products)."""
        return self.max_size

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult:
        """Solve (A + damping·I) x = b; arguments and result as
        :meth:`~hypergrad.linear_solve.ConjugateGradient.__call__` (``x0`` is ignored)."""
        system = _System.build(self, matvec, b, batched)
        B = _ravel_cols(system.b).T  # (n, k)
        n = B.shape[0]
        if n > self.max_size:
            raise ValueError(f"Direct: the system has n = {n} unknowns, more than max_size = "
                             f"{self.max_size}; raise max_size or use an iterative solver")
        if not system.nonzero.any():
            return system.result(tree_zeros_like(system.b), 0, [0.0], self.tol)
        eye, like = torch.eye(n, dtype=B.dtype, device=B.device), tree_map(lambda a: a[0], system.b)
        A = self._materialise(matvec, eye, like, batched) + self.damping * eye
        X = self._solve(A, B)
        residual = float((torch.linalg.vector_norm(B - A @ X, dim=0) / system.bscale).max())
        if not math.isfinite(residual):  # singular to working precision without a LinAlgError
            raise self._singular(n, "the solution contains NaN or inf")
        return system.result(tree_unravel(X.T, like), n, [1.0, residual], self.tol)

    def _materialise(self, matvec: MatVec, eye: torch.Tensor, like: PyTree,
                     batched: bool) -> torch.Tensor:
        """The dense A, from the products with the basis e₁..eₙ (rows of ``eye``)."""
        basis = tree_unravel(eye, like)
        if batched:
            columns = matvec(basis)
        else:
            try:
                columns = vmap(matvec)(basis)
            except Exception:  # a matvec that vmap cannot trace: one product at a time
                columns = tree_stack([matvec(tree_unravel(e, like)) for e in eye])
        A = _ravel_cols(columns).T
        if not torch.isfinite(A).all():
            raise NonFiniteError("Direct: the matrix-vector product returned NaN or inf")
        return A

    def _solve(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            L, info = torch.linalg.cholesky_ex(A)
            if info == 0:
                return torch.cholesky_solve(B, L)
        try:
            return torch.linalg.solve(A, B)
        except torch.linalg.LinAlgError as exc:
            raise self._singular(A.shape[0], "a zero pivot in its LU factorisation") from exc

    def _singular(self, n: int, found: str) -> LinearSolveError:
        matrix = f"A + damping·I (damping = {self.damping:g})" if self.damping else "A"
        return LinearSolveError(
            f"Direct: the {n}×{n} matrix {matrix} is singular ({found}), so the system has "
            "no unique solution. Add damping (Direct(damping=...), e.g. 1e-6 × the scale of "
            "A) or regularise the inner problem so that its Hessian is positive definite")
