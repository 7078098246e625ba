"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..errors import LinearSolveError
from ..pytree import PyTree, tree_axpy, tree_vdot
from .base import MatVec, SolveResult
from .system import _lift, _System, check_common


@dataclass(frozen=True)
class ConjugateGradient:
    """Preconditioned conjugate gradients for a symmetric positive-definite A + damping·I.

    With z = M⁻¹ r (M = I without a preconditioner), each iteration takes
    α = ⟨r, z⟩ / ⟨p, A p⟩, x ← x + α p, r ← r − α A p, p ← z' + (⟨r', z'⟩ / ⟨r, z⟩) p,
    and the A-norm error falls at least like 2 ((√κ − 1) / (√κ + 1))^k. One product per
    iteration; the residuals reported are the recursive ones.

    A step α that is not finite (pᵀAp = 0: A singular or indefinite) raises
    :class:`~hypergrad.errors.LinearSolveError`. A curvature pᵀAp < 0 is not an error by
    itself (CG often still converges on an invertible indefinite system, such as the
    Hessian at a saddle of a network's loss); it is named in ``result.note`` (and so in the
    estimator's ConvergenceWarning) if the solve then stops short of ``tol``. A residual
    grown ``DIVERGED`` (1e10) times over its start raises ``LinearSolveError`` (a singular
    system whose right-hand side is outside its range makes the iterates grow without
    bound).

    Args:
        tol: stop once the relative residual ‖b − Ax‖ / ‖b‖ ≤ tol (unitless).
        maxiter: at most this many iterations (matrix-vector products).
        damping: solve (A + damping·I) x = b (≥ 0; regularises a singular H).
        preconditioner: optional r ↦ M⁻¹ r, a symmetric positive-definite map on pytrees
            like ``b``.

    Raises:
        ValueError: ``tol`` < 0, ``maxiter`` not an int ≥ 1, ``damping`` negative or not
            finite, or ``preconditioner`` not callable (at construction).
        LinearSolveError: a non-finite step (pᵀAp = 0) or a residual grown 1e10 times.
        NonFiniteError: NaN or inf in ``b``, ``x0`` or a product A x.

    References:
        Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems",
        J. Res. Nat. Bur. Standards 49, 1952.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> out = ConjugateGradient(tol=1e-8)(lambda v: A @ v, torch.tensor([1.0, 2.0]))
        >>> out.converged, out.x
        (True, tensor([0.0909, 0.6364]))
    """

    tol: float = 1e-10
    maxiter: int = 100
    damping: float = 0.0
    preconditioner: MatVec | None = None
    symmetric: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_common(self)

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None,
                 batched: bool = False) -> SolveResult:
        """Solve (A + damping·I) x = b.

        Args:
            matvec: x ↦ A x on pytrees like ``b`` (symmetric positive definite A).
            b: the right-hand side, a pytree of floating tensors.
            x0: warm start like ``b`` (default 0).
            batched: every leaf of ``b`` and ``x0`` has a leading dimension of k
                right-hand sides, solved together; ``matvec`` must accept such batches.

        Returns:
            :class:`SolveResult` with ``x`` shaped like ``b``.
        """
        system = _System.build(self, matvec, b, batched)
        precond = _lift(self.preconditioner, batched) or (lambda r: r)
        x, r = system.start(x0)
        rel = system.relative(r)
        active, history, indefinite = rel > self.tol, [float(rel.max())], None
        z = precond(r)
        p, rz = z, tree_vdot(r, z, batched=True)
        while active.any() and len(history) <= self.maxiter:
            ap = system.apply(p)
            curvature = tree_vdot(p, ap, batched=True)
            step = torch.where(active, rz / curvature, 0)
            broken, negative = active & ~step.isfinite(), active & ~((curvature > 0) & (rz > 0))
            x, r = tree_axpy(step, p, x, batched=True), tree_axpy(-step, ap, r, batched=True)
            rel = system.relative(r)
            active = active & (rel > self.tol)
            worst, failed, met = torch.stack(  # one host sync per iteration, as ever
                (rel.max(), broken.any().to(rel.dtype), negative.any().to(rel.dtype))).tolist()
            if failed:
                raise _breakdown(system, len(history), broken, curvature)
            if met and indefinite is None:
                indefinite = _nonpositive(system, len(history), negative, curvature, rz)
            history.append(worst)
            if not worst <= DIVERGED * history[0]:
                raise _diverged(history, indefinite)
            z = precond(r)
            rz, rz_old = tree_vdot(r, z, batched=True), rz
            p = tree_axpy(torch.where(active, rz / rz_old, 0), p, z, batched=True)
        result = system.result(x, len(history) - 1, history, self.tol)
        if indefinite is not None and not result.converged:
            result = replace(result, note=f"CG met {indefinite}")
        return result


#: growth of the relative residual over its start beyond which CG has diverged (on an SPD
#: system the residual stays within √κ of its start)
DIVERGED = 1e10


def _diverged(history: list[float], indefinite: str | None) -> LinearSolveError:
    met = f" It met {indefinite}" if indefinite else ""
    return LinearSolveError(
        f"ConjugateGradient diverged: the relative residual grew from {history[0]:.2e} to "
        f"{history[-1]:.2e} in {len(history) - 1} iterations, so the system is singular "
        "(with a right-hand side outside its range) or not positive definite." + met + " "
        + _ADVICE)


_ADVICE = ("Add damping (ConjugateGradient(damping=...)) or use a solver for general systems "
           "(GMRES, Direct)")


def _column(system: _System, mask: torch.Tensor) -> tuple[int, str]:
    """The first column in ``mask``, and how to name it in a message."""
    col = int(mask.nonzero()[0, 0])
    return col, f" (column {col})" if system.batched else ""


def _breakdown(system: _System, iteration: int, broken: torch.Tensor,
               curvature: torch.Tensor) -> LinearSolveError:
    """The error for a step α = ⟨r, M⁻¹r⟩ / pᵀAp that is not finite: pᵀAp = 0, A singular."""
    col, where = _column(system, broken)
    damped = "(A + damping·I)" if system.damping else "A"
    return LinearSolveError(
        f"ConjugateGradient broke down at iteration {iteration}{where}: the curvature "
        f"pᵀ{damped}p = {float(curvature[col]):.3e} gives no finite step, so the system is "
        "singular or not positive definite (CG needs a symmetric positive-definite matrix). "
        + _ADVICE)


def _nonpositive(system: _System, iteration: int, negative: torch.Tensor,
                 curvature: torch.Tensor, rz: torch.Tensor) -> str:
    """What a step of the wrong sign met (CG may still converge on an indefinite system;
    this is reported only if it does not)."""
    col, where = _column(system, negative)
    pap, rz = float(curvature[col]), float(rz[col])
    if pap > 0:
        return (f"⟨r, M⁻¹r⟩ = {rz:.3e} ≤ 0 at iteration {iteration}{where}: the "
                "preconditioner is not positive definite; fix it or drop it")
    damped = "(A + damping·I)" if system.damping else "A"
    return (f"the curvature pᵀ{damped}p = {pap:.3e} ≤ 0 at iteration {iteration}{where}: the "
            "system is singular or not positive definite, which CG does not handle, so more "
            "iterations may not help. " + _ADVICE)
