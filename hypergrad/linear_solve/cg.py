"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

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
        system = _System.build(self, matvec, b, batched)
        precond = _lift(self.preconditioner, batched) or (lambda r: r)
        x, r = system.start(x0)
        rel = system.relative(r)
        active, history = rel > self.tol, [float(rel.max())]
        z = precond(r)
        p, rz = z, tree_vdot(r, z, batched=True)
        while active.any() and len(history) <= self.maxiter:
            ap = system.apply(p)
            step = torch.where(active, rz / tree_vdot(p, ap, batched=True), 0)
            x, r = tree_axpy(step, p, x, batched=True), tree_axpy(-step, ap, r, batched=True)
            rel = system.relative(r)
            active = active & (rel > self.tol)
            history.append(float(rel.max()))
            z = precond(r)
            rz, rz_old = tree_vdot(r, z, batched=True), rz
            p = tree_axpy(torch.where(active, rz / rz_old, 0), p, z, batched=True)
        return system.result(x, len(history) - 1, history, self.tol)
