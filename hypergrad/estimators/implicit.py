"""Implicit differentiation (AID) at an approximate inner solution w*.

Stationarity ∇_w f(w*, λ) = 0 gives, by the implicit function theorem,

    ∇h(λ) = ∇_λ F − ∇²_λw f · v,    H v = ∇_w F,    H = ∇²_ww f(w*, λ),

with H v solved matrix-free by any linear solver. With ``fixed_point=True`` the
optimality condition is instead z* = Φ(z*, λ) for the inner optimizer's step Φ on
z = (w, carried state) (heavy-ball, Nesterov, Adam), a non-symmetric system:

    (I − ∂_zΦ)ᵀ u = ∇_z F,    ∇h(λ) = ∇_λ F + ∂_λΦᵀ u.

Both are :func:`hypergrad.implicit_diff.root_vjp` of an optimality function,
T = ∇_w f (a :class:`~hypergrad.implicit_diff.Stationarity`) or T = z − Φ(z, λ), with
∇_w F and ∇_λ F from one pass (:func:`~hypergrad.implicit_diff.outer_grads`).

Both systems are warm-started from the previous outer step's solution, carried in
``state["v"]``, and the inner optimizer continues from its state in
``state["inner_state"]`` (momentum buffers, Adam moments); the Hessian-vector product
form chosen by ``hvp="auto"`` on the first call is kept in ``state["hvp_mode"]``.
A warning is raised when ‖∇_w f(w*)‖ exceeds
``inner_tol``: implicit gradients at an unconverged inner solve can be wrong by tens
of percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.func import grad

from ..errors import INNER_NOT_CONVERGED, ConvergenceWarning, warn
from ..hvp import HVP_MODES, HVPMode
from ..implicit_diff import (
    Optimality,
    Stationarity,
    linearize,
    outer_grads,
    root_vjp,
    solve_linearized,
)
from ..linear_solve import GMRES, ConjugateGradient, LinearSolver
from ..optim import State, check_settings
from ..problem import Problem
from ..pytree import PyTree, tree_detach, tree_map2, tree_norm, tree_sub, tree_zeros_like
from ..second_order import BLOCKS, Use, check_second_order, uses
from ..validation import read_only_by_settings
from .base import (
    Diagnostics,
    Estimator,
    EstimatorState,
    Hypergradient,
    SelfCheck,
    check_growth,
    check_inner_params,
    check_self_check,
    inner_fit,
    inner_loss_value,
)


@dataclass(frozen=True)
class Implicit(Estimator):
    """Implicit-function-theorem hypergradient (approximate implicit differentiation, AID).

    Runs ``inner_steps`` graph-free inner steps to w*, then solves H v = ∇_w F with
    ``solver`` (H = ∇²_ww f(w*, λ), or I − ∂_zΦ with ``fixed_point``) and returns
    ∇_λ F − ∇²_λw f · v. Memory does not grow with the number of inner steps.

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
        self_check: ``"error"`` (default), ``"warn"`` or ``"off"``: the second-order
            self-check on the first call for an inner loss (:mod:`hypergrad.second_order`).
            With ``hvp="auto"`` it also rules out a form whose products are wrong or
            unsupported: a model without forward-mode rules gets ``"linearized"``, one
            whose double backward is wrong ``"jvp"``.

    Raises:
        ValueError: at construction: ``inner_steps`` not ``None`` or an int >= 0,
            ``inner_tol`` not ``None`` or a finite number >= 0, an unknown ``hvp``, or a
            symmetric-only solver (CG) with ``fixed_point``; at call: ``fixed_point``
            with an optimizer whose step depends on the iteration count (Chebyshev).
        TypeError: ``solver`` is not a :class:`~hypergrad.linear_solve.LinearSolver`.
        BilevelInputError: a bad ``self_check``.
        OptimizerSettingError: an inner optimizer setting out of range at ``hparams``.
        DivergenceError: the inner run diverged (NaN/inf, or a loss grown 1e10 times).
        LinearSolveError: the solver broke down (e.g. CG on a non-positive-definite H).
        NonFiniteError, SecondOrderError: see :meth:`Estimator.__call__`.

    Warns:
        ConvergenceWarning: ‖∇_w f(w*)‖ > ``inner_tol`` (the estimate may be badly
            wrong), or the linear solve stopped above its tolerance.
        RuntimeWarning: a zero estimate, e.g. hyperparameters read only by optimizer
            settings, which do not move the fixed point.

    References:
        Pedregosa, "Hyperparameter optimization with approximate gradient" (HOAG), ICML
        2016; Lorraine, Vicol, Duvenaud, "Optimizing millions of hyperparameters by
        implicit differentiation", AISTATS 2020; Grazzi, Franceschi, Pontil, Salzo, "On
        the iteration complexity of hypergradient computation", ICML 2020.
    """

    name: ClassVar[str] = "implicit"
    solver: LinearSolver | None = None
    hvp: HVPMode = "auto"
    fixed_point: bool = False
    inner_steps: int | None = None
    inner_tol: float | None = 1e-4
    warm_start: bool = True
    self_check: SelfCheck = field(default="error", kw_only=True)

    def __post_init__(self) -> None:
        check_self_check("Implicit", self.self_check)
        if self.inner_steps is not None and (
                isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int)
                or self.inner_steps < 0):
            raise ValueError(f"Implicit.inner_steps must be None or an int >= 0, got "
                             f"{self.inner_steps!r}")
        if self.inner_tol is not None and not (
                isinstance(self.inner_tol, (int, float)) and not isinstance(self.inner_tol, bool)
                and math.isfinite(self.inner_tol) and self.inner_tol >= 0):
            raise ValueError(f"Implicit.inner_tol must be None or a finite number >= 0, got "
                             f"{self.inner_tol!r}")
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

    def second_order_routes(self, state: EstimatorState) -> frozenset[Use]:
        """The (route, block) pairs this estimator differentiates by (see the base class)."""
        if self.fixed_point:
            return hvp_routes("reverse")
        return hvp_routes(state.get("hvp_mode", self.hvp))

    def route_options(self) -> list[tuple[frozenset[Use], str]]:
        """The settings to suggest when the self-check rejects a route (see the base class)."""
        if self.fixed_point:
            return []
        return [(hvp_routes("linearized"), "Implicit(hvp='linearized')"),
                (hvp_routes("jvp"), "Implicit(hvp='jvp')")]

    def verify_second_order(self, problem: Problem, hparams: PyTree, params: PyTree,
                            state: EstimatorState) -> EstimatorState:
        """With ``hvp="auto"`` keep only the forms whose routes the self-check accepts
        (the choice is kept in ``state["hvp_mode"]`` when one form is ruled out)."""
        if self.fixed_point or self.hvp != "auto" or "hvp_mode" in state:
            return super().verify_second_order(problem, hparams, params, state)
        report = check_second_order(problem.inner_loss, hparams, params,
                                    self.second_order_batch(problem))
        usable = [m for m in ("linearized", "jvp") if report.usable(hvp_routes(m))]
        if not usable:
            self.second_order_failure(report, hvp_routes("linearized") | hvp_routes("jvp"))
        elif len(usable) == 1:
            if any(report.status("reverse", b) in ("wrong", "disputed") for b in BLOCKS):
                warn("implicit: Hessian-vector products by double backward are wrong for "
                     "this inner loss (an operator whose backward is not differentiable); "
                     "hvp='auto' uses forward-over-reverse ('jvp'), which agrees with "
                     "central differences", RuntimeWarning)
            return {**state, "hvp_mode": usable[0]}
        return state

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        hparams = tree_detach(hparams)
        mode = state.get("hvp_mode", self.hvp) if self.hvp == "auto" else self.hvp
        # "linearized" evaluates ∇_w f(w*) with its graph anyway: its norm comes free
        free_norm = not self.fixed_point and mode in ("linearized", "auto")
        w, opt_state, gnorm = self._solve_inner(problem, hparams, params, state,
                                                need_norm=not free_norm)
        # ∇F before the linearization: its graph is freed before the solve's is recorded
        loss, (gF_w, gF_lam) = outer_grads(problem.outer_loss, w, hparams, problem.outer_batch)
        lin = None
        if not self.fixed_point:
            lin = linearize(Stationarity(problem.inner_loss, problem.full_batch()), w,
                            hparams, mode)
            if gnorm is None:
                gnorm = (float(tree_norm(lin.value)) if lin.value is not None
                         else inner_fit(problem, w, hparams)[1])
                self._check_inner_norm(gnorm)
        x0 = state.get("v") if self.warm_start else None
        new_state = dict(state)
        if lin is None:
            T = self._fixed_point_residual(problem, opt_state)
            z = (w, _carried(problem, opt_state))
            out = root_vjp(T, z, hparams, (gF_w, tree_zeros_like(z[1])), self.linear_solver,
                           x0=x0)
        else:
            out = solve_linearized(lin, gF_w, self.linear_solver, x0=x0)
            new_state["hvp_mode"] = out.mode
        result = out.solve
        new_state["v"] = tree_detach(result.x)
        new_state["inner_state"] = opt_state
        steps = problem.steps if self.inner_steps is None else self.inner_steps
        return Hypergradient(tree_map2(torch.add, gF_lam, out.grad), w, new_state, Diagnostics(
            self.name, float(loss), gnorm, steps, solve_iterations=result.iterations,
            solve_residual=result.residual, solve_converged=result.converged,
            solve_residuals=result.residuals, solve_note=result.note))

    def _solve_inner(self, problem: Problem, hparams: PyTree, params: PyTree,
                     state: EstimatorState, need_norm: bool = True,
                     ) -> tuple[PyTree, State, float | None]:
        """w* by the graph-free inner steps, checked for divergence (NaN or inf, or a
        loss grown by orders of magnitude), and ‖∇_w f(w*)‖ (checked against
        ``inner_tol``) if ``need_norm``, else ``None`` (the caller gets it elsewhere)."""
        steps = problem.steps if self.inner_steps is None else self.inner_steps
        check_settings(problem.optimizer, hparams)
        start = inner_loss_value(problem, params, hparams) if steps else 0.0
        w, opt_state = problem.solve_inner(
            params, hparams, self.inner_steps,
            state.get("inner_state") if self.warm_start else None)
        check_inner_params(self.name, w, steps)
        gnorm = None
        if need_norm:
            end, gnorm = inner_fit(problem, w, hparams)
        elif steps:
            end = inner_loss_value(problem, w, hparams)
        if steps:
            check_growth(self.name, start, end, steps)
        if gnorm is not None:
            self._check_inner_norm(gnorm)
        return w, opt_state, gnorm

    def _check_inner_norm(self, gnorm: float) -> None:
        """Warn when ‖∇_w f(w*)‖ exceeds ``inner_tol``."""
        if self.inner_tol is not None and gnorm > self.inner_tol:
            warn(
                f"implicit: the inner problem is not converged (‖∇_w f‖ = {gnorm:.2e} > "
                f"inner_tol = {self.inner_tol:.0e}); the hypergradient may be badly wrong. "
                "Run more inner steps or use an unrolled estimator", ConvergenceWarning,
                kind=INNER_NOT_CONVERGED)

    def zero_message(self, problem: Problem, hparams: PyTree, params: PyTree) -> str:
        """Zero because only optimizer settings read the hyperparameters, or as usual."""
        if not read_only_by_settings(problem, hparams, params):
            return super().zero_message(problem, hparams, params)
        return (f"{self.name}: the hypergradient is exactly zero because the hyperparameters "
                "are read only by optimizer settings (learning rate, momentum, ...), which "
                "have no effect at the fixed point w* (where ∇_w f(w*) = 0 whatever the "
                "step), so implicit differentiation gives zero for them. Use an unrolled "
                "estimator (Unrolled or Truncated), which differentiates through the inner "
                "steps")

    def _fixed_point_residual(self, problem: Problem, opt_state: State) -> Optimality:
        """T(z, λ) = z − Φ(z, λ) for the optimizer's step Φ on z = (w, carried state), the
        non-carried state (settings, step count) held at ``opt_state``."""
        opt = problem.optimizer
        if not opt.stationary:
            raise ValueError(f"Implicit(fixed_point=True): {type(opt).__name__} changes its "
                             "step with the iteration count, so it has no fixed-point map")
        batch = problem.full_batch()

        def residual(z: tuple[PyTree, dict], lam: PyTree) -> tuple[PyTree, dict]:
            p, c = z
            p_new, s_new = opt.step(p, grad(problem.inner_loss)(p, lam, batch),
                                    {**opt_state, **c}, lam)
            return tree_sub(z, (p_new, {k: s_new[k] for k in opt.carried}))

        return residual


def _carried(problem: Problem, opt_state: State) -> dict:
    """The part of the optimizer state its step carries from one iteration to the next."""
    return {k: opt_state[k] for k in problem.optimizer.carried}


def hvp_routes(mode: str) -> frozenset[Use]:
    """The (route, block) pairs of an HVP form: double backward for ``"reverse"`` and
    ``"linearized"`` (products and the mixed term); ``"jvp"`` takes the products (Hessian
    block) by forward-over-reverse and the mixed term by reverse-over-forward."""
    if mode == "jvp":
        return frozenset({("forward", "hessian"), ("reverse_forward", "mixed")})
    if mode == "auto":
        return frozenset()
    return uses("reverse")
