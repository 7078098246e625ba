"""Implicit differentiation (AID) at an approximate inner solution w*.

Stationarity ∇_w f(w*, λ) = 0 gives, by the implicit function theorem,

    ∇h(λ) = ∇_λ F − ∇²_λw f · v,    H v = ∇_w F,    H = ∇²_ww f(w*, λ),

with H v solved matrix-free by any linear solver. With ``fixed_point=True`` the
optimality condition is instead z* = Φ(z*, λ) for the inner optimizer's step Φ on
z = (w, carried state) (heavy-ball, Nesterov, Adam), a non-symmetric system:

    (I − ∂_zΦ)ᵀ u = ∇_z F,    ∇h(λ) = ∇_λ F + ∂_λΦᵀ u.

Both systems are warm-started from the previous outer step's solution, carried in
``state["v"]``, and the inner optimizer continues from its state in
``state["inner_state"]`` (momentum buffers, Adam moments); the Hessian-vector product
form chosen by ``hvp="auto"`` on the first call is kept in ``state["hvp_mode"]``.
A warning is raised when ‖∇_w f(w*)‖ exceeds
``inner_tol``: implicit gradients at an unconverged inner solve can be wrong by tens
of percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.func import grad, vjp

from ..errors import ConvergenceWarning, warn
from ..hvp import HVP_MODES, HVPMode, Linearization, mixed_vjp
from ..linear_solve import GMRES, ConjugateGradient, LinearSolver, SolveResult
from ..optim import State
from ..problem import Problem
from ..pytree import PyTree, tree_detach, tree_map2, tree_zeros_like
from .base import Diagnostics, Estimator, EstimatorState, Hypergradient, inner_grad_norm


@dataclass(frozen=True)
class Implicit(Estimator):
    """Implicit-function-theorem hypergradient.

    Args:
        solver: linear solver for H v = ∇_w F (default CG); it must handle
            non-symmetric systems when ``fixed_point`` is set (default then GMRES).
        hvp: Hessian-vector product form (``"auto"``, ``"linearized"``, ``"jvp"``,
            ``"reverse"``), see :mod:`hypergrad.hvp`.
        fixed_point: differentiate the optimizer's fixed-point map instead of ∇_w f = 0.
        inner_steps: graph-free inner steps to reach w* from ``params`` (default
            ``problem.steps``; 0 takes ``params`` as w*).
        inner_tol: warn when ‖∇_w f(w*)‖ exceeds it (``None``: never).
        warm_start: start the linear solve from the previous solution and the inner
            optimizer from its previous state, both kept in ``state``.
    """

    name: ClassVar[str] = "implicit"
    solver: LinearSolver | None = None
    hvp: HVPMode = "auto"
    fixed_point: bool = False
    inner_steps: int | None = None
    inner_tol: float | None = 1e-4
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.hvp not in HVP_MODES:
            raise ValueError(f"Implicit.hvp must be one of {HVP_MODES}, got {self.hvp!r}")
        solver = self.linear_solver
        if not isinstance(solver, LinearSolver):
            raise TypeError(f"Implicit.solver must be a linear solver such as "
                            f"ConjugateGradient(), got {type(solver).__name__}")
        if self.fixed_point and solver.symmetric:
            raise ValueError(f"Implicit(fixed_point=True) solves a non-symmetric system; "
                             f"{type(solver).__name__} needs a symmetric one: use GMRES, "
                             "FixedPoint or Direct")

    @property
    def linear_solver(self) -> LinearSolver:
        """The solver in use: ``solver``, or CG (GMRES with ``fixed_point``) by default."""
        if self.solver is not None:
            return self.solver
        return GMRES() if self.fixed_point else ConjugateGradient()

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        hparams = tree_detach(hparams)
        w, opt_state = problem.solve_inner(
            params, hparams, self.inner_steps,
            state.get("inner_state") if self.warm_start else None)
        gnorm = inner_grad_norm(problem, w, hparams)
        if self.inner_tol is not None and gnorm > self.inner_tol:
            warn(
                f"implicit: the inner problem is not converged (‖∇_w f‖ = {gnorm:.2e} > "
                f"inner_tol = {self.inner_tol:.0e}); the hypergradient may be badly wrong. "
                "Run more inner steps or use an unrolled estimator", ConvergenceWarning)
        loss, (gF_w, gF_lam) = _outer_grads(problem, w, hparams)
        x0 = state.get("v") if self.warm_start else None
        new_state = dict(state)
        if self.fixed_point:
            grad_, result = self._fixed_point(problem, w, opt_state, hparams, gF_w, gF_lam, x0)
        else:
            hvp_mode = state.get("hvp_mode", self.hvp) if self.hvp == "auto" else self.hvp
            grad_, result, new_state["hvp_mode"] = self._stationary(
                problem, w, hparams, gF_w, gF_lam, x0, hvp_mode)
        new_state["v"] = tree_detach(result.x)
        new_state["inner_state"] = opt_state
        steps = problem.steps if self.inner_steps is None else self.inner_steps
        return Hypergradient(grad_, w, new_state, Diagnostics(
            self.name, float(loss), gnorm, steps, solve_iterations=result.iterations,
            solve_residual=result.residual, solve_converged=result.converged,
            solve_residuals=result.residuals))

    def _stationary(self, problem: Problem, w: PyTree, lam: PyTree, gF_w: PyTree,
                    gF_lam: PyTree, x0: PyTree | None, hvp_mode: HVPMode,
                    ) -> tuple[PyTree, SolveResult, str]:
        batch = problem.full_batch()
        H = Linearization(problem.inner_loss, w, lam, batch, mode=hvp_mode)
        result = self.linear_solver(H.matvec, gF_w, x0=x0)
        mixed = mixed_vjp(problem.inner_loss, w, lam, batch, result.x, mode=H.mode)
        return tree_map2(torch.sub, gF_lam, mixed), result, H.mode

    def _fixed_point(self, problem: Problem, w: PyTree, opt_state: State, lam: PyTree,
                     gF_w: PyTree, gF_lam: PyTree, x0: PyTree | None,
                     ) -> tuple[PyTree, SolveResult]:
        opt = problem.optimizer
        if not opt.stationary:
            raise ValueError(f"Implicit(fixed_point=True): {type(opt).__name__} changes its "
                             "step with the iteration count, so it has no fixed-point map")
        batch = problem.full_batch()
        carried = {k: opt_state[k] for k in opt.carried}

        def phi(z: tuple[PyTree, dict], lam_: PyTree) -> tuple[PyTree, dict]:
            p, c = z
            g = grad(problem.inner_loss)(p, lam_, batch)
            p_new, s_new = opt.step(p, g, {**opt_state, **c}, lam_)
            return p_new, {k: s_new[k] for k in opt.carried}

        _, pullback = vjp(phi, (w, carried), lam)
        rhs = (gF_w, tree_zeros_like(carried))

        def matvec(u: PyTree) -> PyTree:  # (I − ∂_zΦ)ᵀ u
            return tree_map2(torch.sub, u, pullback(u)[0])

        result = self.linear_solver(matvec, rhs, x0=x0)
        return tree_map2(torch.add, gF_lam, pullback(result.x)[1]), result


def _outer_grads(problem: Problem, w: PyTree, lam: PyTree) -> tuple[torch.Tensor, Any]:
    """F(w, λ) and (∇_w F, ∇_λ F)."""
    def F(w_: PyTree, lam_: PyTree) -> torch.Tensor:
        out = problem.outer_loss(w_, lam_, problem.outer_batch)
        return out, out.detach()

    grads, loss = grad(F, argnums=(0, 1), has_aux=True)(w, lam)
    return loss, grads
