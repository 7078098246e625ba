"""Implicit differentiation through the KKT conditions of a constrained lower level.

At a primal-dual solution (y*, μ*) of min_y { f(y, x) : g(y, x) ≤ 0 } with active set
A = {i : g_i(y*, x) ≥ −active_tol}, stationarity and the active constraints,

    ∇_y L(y, x, μ) = ∇_y f + J_Aᵀ μ_A = 0,    g_A(y, x) = 0,

define y*(x) implicitly (under strict complementarity and LICQ). With the symmetric,
indefinite KKT matrix K = [[∇²_yy L, J_Aᵀ], [J_A, 0]],

    K (v, u) = (∇_y F, 0),    ∇h(x) = ∇_x F − ∇²_xy L · v − ∂_x g_Aᵀ u.

K is the Hessian of the Lagrangian L(y, μ_A; x) = f + μᵀ g in (y, μ_A) (its gradient
(∇_y L, g_A) is the KKT conditions), so this is :func:`hypergrad.implicit_diff.root_vjp`
of a :class:`~hypergrad.implicit_diff.Stationarity` in z = (y, μ_A): one linearization
gives K (v, u) and the mixed term ∇²_xy L · v + ∂_x g_Aᵀ u from the same pullback.
The multipliers come from ``state["multipliers"]`` when known, else from the least-squares
solution of the stationarity condition on the active set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.func import grad, jacrev

from ..constrained import ConstrainedProblem
from ..errors import NOT_A_KKT_POINT, ConvergenceWarning, warn
from ..hvp import HVP_MODES, HVPMode, Objective
from ..implicit_diff import Stationarity, outer_grads, root_vjp
from ..linear_solve import GMRES, Direct, LinearSolver
from ..pytree import PyTree, tree_detach, tree_map2, tree_norm, tree_numel, tree_ravel, tree_unravel
from .base import Estimator, EstimatorState, Hypergradient
from .lvhba import ConstrainedDiagnostics


@dataclass(frozen=True)
class KKTImplicit(Estimator):
    """Hypergradient of a constrained lower level by the implicit function theorem on KKT.

    Called as ``est(problem, x, y_star, state)`` with a :class:`ConstrainedProblem` and an
    (accurate) lower-level solution ``y_star``; ``state["multipliers"]`` (shape ``(l,)``)
    may give μ*. The simple sets of the problem are not differentiated: express bounds
    that can be active as constraints g.

    The result's ``grad`` matches ``x``, its ``params`` is ``y_star`` (not moved), its
    ``state`` holds ``"multipliers"`` (tensor ``(l,)``) and ``"active"`` (list of
    indices), and its diagnostics are :class:`ConstrainedDiagnostics`
    (``inner_grad_norm`` is then ‖∇_y L‖, ``inner_steps`` 0).

    Args:
        solver: solver for the symmetric indefinite KKT system (default: dense up to
            2000 unknowns, GMRES above).
        active_tol: constraints with g_i ≥ −active_tol count as active.
        stationarity_tol: warn when ‖∇_y L(y*, x, μ*)‖ exceeds it (``None``: never).
        hvp: form of the Hessian-vector products of the Lagrangian.

    Raises:
        ValueError: an unknown ``hvp`` or a negative ``active_tol`` (at construction);
            ``state["multipliers"]`` not of shape ``(l,)`` (at call).
        TypeError: ``problem`` is not a :class:`~hypergrad.ConstrainedProblem`.
        LinearSolveError: the KKT system is singular (e.g. LICQ fails) or the solver broke
            down.

    Warns:
        ConvergenceWarning: ``y_star`` is not a KKT point to ``stationarity_tol``.
        RuntimeWarning: an active constraint with a zero multiplier (no strict
            complementarity: the solution map may not be differentiable).

    References:
        The KKT conditions (Karush 1939; Kuhn & Tucker 1951) differentiated as in Amos &
        Kolter, "OptNet: differentiable optimization as a layer in neural networks",
        ICML 2017; the implicit function theorem on them as in Gould et al., "On
        differentiating parameterized argmin and argmax problems", 2016.
    """

    name: ClassVar[str] = "kkt"
    solver: LinearSolver | None = None
    active_tol: float = 1e-6
    stationarity_tol: float | None = 1e-6
    hvp: HVPMode = "auto"

    def __post_init__(self) -> None:
        if self.hvp not in HVP_MODES:
            raise ValueError(f"KKTImplicit.hvp must be one of {HVP_MODES}, got {self.hvp!r}")
        if not self.active_tol >= 0:
            raise ValueError(f"KKTImplicit.active_tol must be >= 0, got {self.active_tol!r}")

    def linear_solver(self, size: int) -> LinearSolver:
        """``solver``, or by default a dense solve up to 2000 unknowns and GMRES above
        (``size`` is the number of unknowns, dim y + |A|)."""
        if self.solver is not None:
            return self.solver
        return Direct(max_size=2000) if size <= 2000 else GMRES(tol=1e-10, maxiter=2000,
                                                                restart=100)

    def compute(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        if not isinstance(problem, ConstrainedProblem):
            raise TypeError("KKTImplicit needs a ConstrainedProblem, got "
                            f"{type(problem).__name__}")
        x, y, batch = tree_detach(hparams), tree_detach(params), problem.inner_batch
        g_val = problem.g(y, x)
        active = (g_val >= -self.active_tol).nonzero().flatten()
        mu = self._multipliers(problem, y, x, state, active)
        stationarity = float(tree_norm(grad(problem.lagrangian(mu))(y, x, batch)))
        if self.stationarity_tol is not None and stationarity > self.stationarity_tol:
            warn(f"kkt: y is not a KKT point (‖∇_y L‖ = {stationarity:.2e}); the "
                 "hypergradient may be wrong: solve the lower level more accurately",
                 ConvergenceWarning, kind=NOT_A_KKT_POINT)
        if bool((mu[active] <= 0).any()):
            warn("kkt: an active constraint has a zero multiplier (no strict "
                 "complementarity): the solution map may not be differentiable here",
                 RuntimeWarning)
        loss, (gF_y, gF_x) = outer_grads(problem.outer_loss, y, x, problem.outer_batch)
        rhs = (gF_y, g_val.new_zeros(len(active)))
        held = mu.index_fill(0, active, 0)
        out = root_vjp(Stationarity(_kkt_lagrangian(problem), (batch, held, active)),
                       (y, mu[active]), x, rhs, self.linear_solver(tree_numel(y) + len(active)),
                       mode=self.hvp)
        result = out.solve
        diagnostics = ConstrainedDiagnostics(
            self.name, float(loss), stationarity, 0, solve_iterations=result.iterations,
            solve_residual=result.residual, solve_converged=result.converged,
            solve_residuals=result.residuals, solve_note=result.note,
            max_violation=float(g_val.clamp_min(0).max()) if g_val.numel() else 0.0,
            multipliers=mu.tolist())
        new_state = {**state, "multipliers": mu, "active": active.tolist()}
        return Hypergradient(tree_map2(torch.add, gF_x, out.grad), y, new_state, diagnostics)

    def _multipliers(self, problem: ConstrainedProblem, y: PyTree, x: PyTree,
                     state: EstimatorState, active: torch.Tensor) -> torch.Tensor:
        """μ* from the state, else argmin_μA ‖∇_y f + J_Aᵀ μ_A‖ (zero off the active set),
        J_A the Jacobian of the active constraints."""
        l, like = problem.num_constraints, tree_ravel(y)
        given = state.get("multipliers")
        if given is not None:
            mu = torch.as_tensor(given, dtype=like.dtype, device=like.device)
            if mu.shape != (l,):
                raise ValueError(f"state['multipliers'] must have shape ({l},), got "
                                 f"{tuple(mu.shape)}")
            return mu
        mu = like.new_zeros(l)
        if len(active):
            J = _active_jacobian(problem, y, x, active)
            gf = tree_ravel(grad(problem.inner_loss)(y, x, problem.inner_batch))
            mu[active] = torch.linalg.lstsq(J.T, -gf.unsqueeze(1)).solution.squeeze(1)
        return mu


def _kkt_lagrangian(problem: ConstrainedProblem) -> Objective:
    """L((y, μ_A), x) = f(y, x) + μᵀ g(y, x) with the active multipliers μ_A a variable
    and the others held: ∇_(y, μ_A) L = (∇_y L, g_A), the KKT conditions. Its batch is
    ``(inner batch, held, active)``: ``held`` the multipliers with the active entries
    zeroed, ``active`` the active indices. (Passed as data, not captured, so that the
    objective is the same from call to call and ``hvp="auto"`` remembers its choice.)"""

    def L(z: tuple[PyTree, torch.Tensor], x: PyTree, batch: Any) -> torch.Tensor:
        inner_batch, held, active = batch
        y, mu_active = z
        value = problem.inner_loss(y, x, inner_batch)
        if problem.num_constraints:
            g = problem.g(y, x)
            value = value + held @ g + mu_active @ g[active]
        return value

    return L


def _active_jacobian(problem: ConstrainedProblem, y: PyTree, x: PyTree,
                     active: torch.Tensor) -> torch.Tensor:
    """The rows ∇_y g_i(y, x), i ∈ A, as a dense (|A|, dim y) matrix."""
    flat = tree_ravel(y)
    if not len(active):
        return flat.new_zeros(0, flat.numel())
    rows = jacrev(lambda f: problem.g(tree_unravel(f, y), x)[active])(flat)
    return rows.reshape(len(active), -1)

