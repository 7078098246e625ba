"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..errors import LinearSolveError, NonFiniteError
from ..pytree import (
    PyTree,
    tree_all_finite,
    tree_axpy,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
    tree_vdot,
)
from .base import MatVec, SolveResult
from .system import _lift, _System, check_common, check_product, check_rhs


@dataclass(frozen=True)
class ConjugateGradient:
    """Preconditioned conjugate gradients for a symmetric positive-definite A + damping·I.

    With z = M⁻¹ r (M = I without a preconditioner), each iteration takes
    α = ⟨r, z⟩ / ⟨p, A p⟩, x ← x + α p, r ← r − α A p, p ← z' + (⟨r', z'⟩ / ⟨r, z⟩) p,
    and the A-norm error falls at least like 2 ((√κ − 1) / (√κ + 1))^k. One product per
    iteration and, for one right-hand side, one host sync (the step, pᵀAp, ⟨r, M⁻¹r⟩ and
    ‖r‖ read together); the residuals reported are the recursive ones.

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
        if not batched:
            return self._solve_one(matvec, b, x0)
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
                col, where = _column(system, broken)
                raise _breakdown(len(history), where, system.damping, float(curvature[col]))
            if met and indefinite is None:
                col, where = _column(system, negative)
                indefinite = _nonpositive(len(history), where, system.damping,
                                          float(curvature[col]), float(rz[col]))
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

    def _solve_one(self, matvec: MatVec, b: PyTree, x0: PyTree | None) -> SolveResult:
        """The iteration of :meth:`__call__` for one right-hand side, on the flat list of
        leaves (flattened once; no batch dimension). One host sync per iteration: the
        step, the curvature, ⟨r, M⁻¹r⟩ and the residual together. A NaN or inf in a product
        A p makes pᵀAp non-finite, so the products are checked leaf by leaf only then, and
        raise as :meth:`_System.apply` does."""
        name, tol, damping = type(self).__name__, self.tol, self.damping
        bs, spec = tree_flatten(b)

        def leaves(tree: PyTree) -> list[torch.Tensor]:
            out = tree_leaves(tree)
            if len(out) != len(bs):
                raise ValueError(f"{name}: got a tree of {len(out)} leaves where b has "
                                 f"{len(bs)}")
            return out

        def apply(v: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            y = leaves(matvec(tree_unflatten(v, spec)))
            return y, [a + damping * c for a, c in zip(y, v, strict=True)] if damping else y

        def as_tree(v: list[torch.Tensor]) -> PyTree:
            return tree_unflatten(v, spec)

        bnorm_f = math.sqrt(max(float(_dot(bs, bs).detach()), 0.0))
        if not math.isfinite(bnorm_f):
            check_rhs(name, b)
        bscale = bnorm_f if bnorm_f > 0 else 1.0
        if x0 is None or not bnorm_f > 0:
            x, r = [torch.zeros_like(a) for a in bs], [a.clone() for a in bs]
            rel = 1.0 if bnorm_f > 0 else 0.0
        else:
            if not tree_all_finite(x0):
                raise NonFiniteError(f"{name}: the initial guess x0 contains NaN or inf")
            # in b's precision (the batched path promotes the same way)
            x = [c.to(torch.promote_types(c.dtype, a.dtype)) * 1.0
                 for a, c in zip(bs, leaves(x0), strict=True)]
            y, ax = apply(x)
            check_product(name, as_tree(x), as_tree(y))
            r = [a - c for a, c in zip(bs, ax, strict=True)]
            rel = math.sqrt(max(float(_dot(r, r).detach()), 0.0)) / bscale
        history, indefinite = [rel], None
        precond = self.preconditioner
        # updates in place unless autograd records the solve (b, x0 or A requiring grad):
        # then out of place, so that the solution can be differentiated
        graph = torch.is_grad_enabled() and any(
            a.requires_grad for a in bs + ([] if x0 is None else tree_leaves(x0)))
        if rel > tol:
            z = leaves(precond(as_tree(r))) if precond else r
            p, rz = [a.clone() for a in z], _dot(r, z)
            while True:
                y, ap = apply(p)
                graph = graph or (torch.is_grad_enabled() and any(a.requires_grad for a in ap))
                curvature = _dot(p, ap)
                step = rz / curvature
                if graph:
                    x = [torch.addcmul(a, c, step) for a, c in zip(x, p, strict=True)]
                    r = [torch.addcmul(a, c, step, value=-1) for a, c in zip(r, ap, strict=True)]
                else:
                    for a, c in zip(x, p, strict=True):
                        a.addcmul_(c, step)
                    for a, c in zip(r, ap, strict=True):
                        a.addcmul_(c, step, value=-1)
                rr = _dot(r, r)
                step_f, pap, rz_f, rr_f = torch.stack((step, curvature, rz, rr)).detach().tolist()
                if not (math.isfinite(step_f) and math.isfinite(pap)):
                    check_product(name, as_tree(p), as_tree(y))
                    if not math.isfinite(step_f):
                        raise _breakdown(len(history), "", damping, pap)
                if not (pap > 0 and rz_f > 0) and indefinite is None:
                    indefinite = _nonpositive(len(history), "", damping, pap, rz_f)
                rel = math.sqrt(rr_f) / bscale if rr_f >= 0 else math.nan
                history.append(rel)
                if not rel <= DIVERGED * history[0]:
                    raise _diverged(history, indefinite)
                if not rel > tol or len(history) > self.maxiter:
                    break
                z = leaves(precond(as_tree(r))) if precond else r
                rz, rz_old = (_dot(r, z) if precond else rr), rz
                beta = rz / rz_old
                p = [torch.addcmul(a, c, beta) for a, c in zip(z, p, strict=True)]
        result = SolveResult(as_tree(x), len(history) - 1, history[-1], history[-1] <= tol,
                             history)
        if indefinite is not None and not result.converged:
            result = replace(result, note=f"CG met {indefinite}")
        return result


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """⟨x, y⟩ over matching lists of leaves (a 0-d tensor)."""
    terms = [torch.dot(a.reshape(-1), c.reshape(-1)) if a.dtype == c.dtype else (a * c).sum()
             for a, c in zip(xs, ys, strict=True)]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)


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


def _breakdown(iteration: int, where: str, damping: float, pap: float) -> LinearSolveError:
    """The error for a step α = ⟨r, M⁻¹r⟩ / pᵀAp that is not finite: pᵀAp = 0, A singular
    (``where`` names the column of a batched solve)."""
    damped = "(A + damping·I)" if damping else "A"
    return LinearSolveError(
        f"ConjugateGradient broke down at iteration {iteration}{where}: the curvature "
        f"pᵀ{damped}p = {pap:.3e} gives no finite step, so the system is "
        "singular or not positive definite (CG needs a symmetric positive-definite matrix). "
        + _ADVICE)


def _nonpositive(iteration: int, where: str, damping: float, pap: float, rz: float) -> str:
    """What a step of the wrong sign met (CG may still converge on an indefinite system;
    this is reported only if it does not)."""
    if pap > 0:
        return (f"⟨r, M⁻¹r⟩ = {rz:.3e} ≤ 0 at iteration {iteration}{where}: the "
                "preconditioner is not positive definite; fix it or drop it")
    damped = "(A + damping·I)" if damping else "A"
    return (f"the curvature pᵀ{damped}p = {pap:.3e} ≤ 0 at iteration {iteration}{where}: the "
            "system is singular or not positive definite, which CG does not handle, so more "
            "iterations may not help. " + _ADVICE)
