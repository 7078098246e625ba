"""Restarted GMRES, with the k Arnoldi processes of a batch run in lockstep."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..pytree import PyTree, tree_add, tree_axpy, tree_norm, tree_sub, tree_vdot, tree_zeros_like
from .base import MatVec, SolveResult
from .system import _cols, _lift, _System, check, check_common

#: a relative residual below ROUNDING × machine epsilon is at the rounding floor: a
#: breakdown there means solved, not singular
ROUNDING = 1e3


@dataclass(frozen=True)
class GMRES:
    """Restarted GMRES(m) for a general non-singular A + damping·I, m = ``restart``.

    Each cycle builds an orthonormal basis V of the Krylov space K_m(A M⁻¹, r₀) by
    Arnoldi with modified Gram–Schmidt, A M⁻¹ V_m = V_{m+1} H̄, and takes
    x = x₀ + M⁻¹ V_m y with y = argmin ‖‖r₀‖ e₁ − H̄ y‖ (Givens rotations). The
    preconditioner M⁻¹ acts on the right, so the residual minimised is the true one.
    ``maxiter`` counts the Arnoldi steps (products) over all cycles; each cycle ends with
    one extra product for the true residual, which is what ``residual`` reports.
    A column stops at an exact (happy) breakdown or once its residual reaches ``tol``;
    in a batch it then waits for the others until the cycle ends.

    Args:
        tol: stop once the relative residual ≤ tol.
        maxiter: total Arnoldi steps (products) over all cycles.
        restart: m, the Krylov dimension of one cycle (memory m + 1 vectors like ``b``).
        damping: solve (A + damping·I) x = b (finite, ≥ 0).
        preconditioner: optional right preconditioner v ↦ M⁻¹ v on pytrees like ``b``.

    Raises:
        ValueError: a bad setting (at construction).
        LinearSolveError, NonFiniteError: NaN or inf in the iterates, ``b``, ``x0`` or a
            product.

    References:
        Saad & Schultz, "GMRES: a generalized minimal residual algorithm for solving
        nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986.
    """

    tol: float = 1e-10
    maxiter: int = 100
    restart: int = 30
    damping: float = 0.0
    preconditioner: MatVec | None = None
    symmetric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_common(self)
        check(self, "restart", isinstance(self.restart, int) and self.restart >= 1,
               "an int >= 1")

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult:
        """Solve (A + damping·I) x = b; arguments and result as
        :meth:`~hypergrad.linear_solve.ConjugateGradient.__call__`."""
        system = _System.build(self, matvec, b, batched)
        precond = _lift(self.preconditioner, batched) or (lambda v: v)
        x, r = system.start(x0)
        rel = system.relative(r)
        active, history = rel > self.tol, [float(rel.max())]
        singular = torch.zeros_like(active)
        while active.any() and len(history) <= self.maxiter:
            steps = min(self.restart, self.maxiter + 1 - len(history))
            before = rel
            dx, rel, stuck = self._cycle(system, precond, r, active, rel, steps, history)
            x = tree_add(x, precond(dx))
            r = tree_sub(system.b, system.apply(x))
            rel = system.relative(r).where(active, rel)
            # a breakdown that left the residual where it was, above rounding: b is not in
            # A's range (at the rounding floor, e.g. with tol=0, it is merely solved)
            floor = ROUNDING * torch.finfo(rel.dtype).eps
            singular = singular | (stuck & (rel > self.tol) & (rel > 0.5 * before)
                                   & (rel > floor))
            active = active & (rel > self.tol) & ~singular
            history[-1] = float(rel.max())
        result = system.result(x, len(history) - 1, history, self.tol)
        if bool(singular.any()):
            result = replace(result, note=(
                f"GMRES broke down at relative residual {float(rel[singular].max()):.2e}: the "
                "Krylov space is invariant under A but does not hold b, so the system is "
                "singular (b is not in A's range) and more iterations cannot help. Add "
                "damping (GMRES(damping=...)), or check that the optimality condition's "
                "Jacobian is invertible at the solution"))
        return result

    def _cycle(self, system: _System, precond: MatVec, r: PyTree, active: torch.Tensor,
               rel: torch.Tensor, steps: int, history: list[float],
               ) -> tuple[PyTree, torch.Tensor, torch.Tensor]:
        """At most ``steps`` Arnoldi steps from r; returns the update V y, the residuals and
        which columns broke down (an invariant Krylov space: exact if b lies in it).

        A column that stops gets zero basis vectors from then on, so its later Hessenberg
        columns are zero (made identity on the diagonal) and it takes no further update.
        """
        beta = tree_norm(r, batched=True)
        eps = torch.finfo(beta.dtype).eps
        running = active
        broke = torch.zeros_like(active)
        basis = [_cols(torch.where(running, 1 / beta, 0), r)]
        rotations: list[tuple[torch.Tensor, torch.Tensor]] = []
        R = beta.new_zeros(beta.shape[0], steps, steps)  # triangular factor of H̄ = Q R
        g = beta.new_zeros(beta.shape[0], steps + 1)  # Qᵀ ‖r‖ e₁
        g[:, 0] = torch.where(running, beta, 0)
        for j in range(steps):
            if not running.any():
                break
            w = system.apply(precond(basis[j]))
            wnorm, h = tree_norm(w, batched=True), []
            for v in basis:
                h.append(tree_vdot(w, v, batched=True))
                w = tree_axpy(-h[-1], v, w, batched=True)
            hnext = tree_norm(w, batched=True)
            for i, (c, s) in enumerate(rotations):
                h[i], h[i + 1] = c * h[i] + s * h[i + 1], c * h[i + 1] - s * h[i]
            d = torch.hypot(h[j], hnext)
            c, s = torch.where(d > 0, h[j] / d, 1), torch.where(d > 0, hnext / d, 0)
            rotations.append((c, s))
            h[j] = torch.where(d > 0, d, 1)
            R[:, : j + 1, j] = torch.stack(h, dim=1)
            g[:, j], g[:, j + 1] = c * g[:, j], -s * g[:, j]
            rel = (g[:, j + 1].abs() / system.bscale).where(running, rel)
            history.append(float(rel.max()))
            breakdown = hnext <= 100 * eps * wnorm  # A V_{j+1} ⊂ span V: the solve is exact
            broke = broke | (running & breakdown)
            running = running & ~breakdown & (rel > self.tol)
            basis.append(_cols(torch.where(running, 1 / hnext, 0), w))
        m = len(rotations)
        y = torch.linalg.solve_triangular(R[:, :m, :m], g[:, :m, None], upper=True)[..., 0]
        dx = tree_zeros_like(r)
        for j in range(m):
            dx = tree_axpy(y[:, j], basis[j], dx, batched=True)
        return dx, rel, broke
