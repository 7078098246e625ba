"""LV-HBA: a single-loop, Hessian-free method for lower levels with coupled constraints.

Yao, Yu, Zeng and Zhang (ICLR 2024). With the proximal Lagrangian value function

    v_γ(x, y, z) = min_{θ∈Y} max_{λ≥0} f(θ, x) + λᵀg(θ, x) + ‖θ − y‖²/(2γ1) − ‖λ − z‖²/(2γ2),

the bilevel problem becomes min F(y, x) s.t. f(y, x) − v_γ(x, y, z) ≤ 0 over
(x, y) ∈ C, z ∈ [0, r]^l, solved with the penalty c_k = c̄ (k+1)^p. One iteration:

    θ ← Proj_Y(θ − η [∇_y f(θ, x) + Σ λ_i ∇_y g_i(θ, x) + (θ − y)/γ1])
    λ ← Proj_{≥0}(λ + η [g(θ, x) − (λ − z)/γ2])                      (with the new θ)
    d_x = ∇_x F(y, x)/c_k + ∇_x f(y, x) − ∇_x f(θ, x) − Σ λ_i ∇_x g_i(θ, x)
    d_y = ∇_y F(y, x)/c_k + ∇_y f(y, x) − (y − θ)/γ1
    (x, y) ← Proj_C((x, y) − α (d_x, d_y))
    z ← Proj_[0,r](z − β (z − λ)/γ2)

Only gradients are used (no Hessian-vector products).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..constrained import ConstrainedProblem
from ..pytree import (
    PyTree,
    tree_detach,
    tree_flatten,
    tree_leaves,
    tree_map2,
    tree_norm,
    tree_requires_grad,
    tree_sub,
    tree_unflatten,
)
from .base import Diagnostics, Estimator, EstimatorState, Hypergradient


@dataclass(frozen=True)
class ConstrainedDiagnostics(Diagnostics):
    """Diagnostics of LV-HBA at the iterate (x_k, y_k) the step started from.

    ``max_violation`` = max(g(y, x), 0); ``value_gap`` = f(y, x) − v_γ(x, y, z) (v_γ
    evaluated at the current θ, λ: ≥ 0 up to their inexactness); ``theta_gap`` =
    ‖θ − y‖; ``multipliers`` = λ; ``penalty`` = c_k.
    """

    max_violation: float = math.nan
    value_gap: float = math.nan
    theta_gap: float = math.nan
    multipliers: list[float] | None = None
    penalty: float = math.nan


@dataclass(frozen=True)
class LVHBA(Estimator):
    """One LV-HBA iteration per call (see the module docstring for the equations).

    Called as ``est(problem, x, y, state)`` with a :class:`ConstrainedProblem`. It returns
    ``grad`` = (x − x⁺)/α, so that an outer step x ← x − α·grad (``torch.optim.SGD``
    with ``lr=alpha``) lands exactly on the projected LV-HBA iterate x⁺; ``params`` = y⁺;
    and the state {θ, λ, z, k} for the next call (θ = y, λ = z = 0 at the start).

    Args:
        alpha: step of (x, y).  beta: step of z.  eta: step of θ and λ.
        gamma1, gamma2: proximal parameters.  c_bar, p: penalty c_k = c̄ (k+1)^p, p ∈ (0, ½).
        r: the box Z = [0, r]^l of z.
    """

    name: ClassVar[str] = "lvhba"
    warn_zero: ClassVar[bool] = False  # a zero step is legitimate at a fixed point
    alpha: float = 0.01
    beta: float = 0.1
    eta: float = 0.01
    gamma1: float = 1.0
    gamma2: float = 1.0
    c_bar: float = 10.0
    p: float = 0.3
    r: float = 1e3

    def __post_init__(self) -> None:
        for field in ("alpha", "beta", "eta", "gamma1", "gamma2", "c_bar", "r"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LVHBA.{field} must be a positive number, got {value!r}")
        if not 0 < self.p < 0.5:
            raise ValueError(f"LVHBA.p must lie in (0, 0.5), got {self.p!r}")

    def init_state(self, problem: ConstrainedProblem, params: PyTree) -> EstimatorState:
        leaf = tree_leaves(params)[0]
        zeros = torch.zeros(problem.num_constraints, dtype=leaf.dtype, device=leaf.device)
        return {"theta": tree_detach(params), "lam": zeros, "z": zeros.clone(), "k": 0}

    def compute(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        if not isinstance(problem, ConstrainedProblem):
            raise TypeError("LVHBA needs a ConstrainedProblem, got "
                            f"{type(problem).__name__}")
        x, y = tree_detach(hparams), tree_detach(params)
        if state.get("k", 0) == 0:
            problem.check_start(y, x)
        if "theta" not in state:
            state = {**state, **self.init_state(problem, y)}
        theta, lam, z, k = state["theta"], state["lam"], state["z"], state["k"]
        batch, c = problem.inner_batch, self.c_bar * (k + 1) ** self.p

        # One backward pass for ∇_θ L(θ, x; λ) and ∇_(y,x) [F/c + f](y, x).
        th_, y_, x_ = (tree_requires_grad(t) for t in (theta, y, x))
        with torch.enable_grad():
            L_old = problem.lagrangian(lam)(th_, x, batch)
            F = problem.outer_loss(y_, x_, problem.outer_batch)
            f = problem.inner_loss(y_, x_, batch)
            g_theta, gP_y, gP_x = _grads(L_old + F / c + f, th_, y_, x_)
        g_y = problem.g(y, x)

        # θ and λ: one projected gradient step on the proximal min-max problem.
        theta = problem.project_y(tree_map2(
            lambda t, gt, yy: t - self.eta * (gt + (t - yy) / self.gamma1), theta, g_theta, y))
        lam_new = lam
        if problem.num_constraints:
            lam_new = (lam + self.eta * (problem.g(theta, x) - (lam - z) / self.gamma2))
            lam_new = lam_new.clamp_min(0)

        # ∇_x of the Lagrangian at the new (θ, λ).
        x_ = tree_requires_grad(x)
        with torch.enable_grad():
            L_theta = problem.lagrangian(lam_new)(theta, x_, batch)
            (gL_x,) = _grads(L_theta, x_)
        d_x = tree_sub(gP_x, gL_x)
        d_y = tree_map2(lambda gy, yt: gy - yt / self.gamma1, gP_y, tree_sub(y, theta))
        x_new, y_new = problem.project_xy(
            tree_map2(lambda a, d: a - self.alpha * d, x, d_x),
            tree_map2(lambda a, d: a - self.alpha * d, y, d_y))
        z_new = (z - self.beta * (z - lam_new) / self.gamma2).clamp(0, self.r)

        F, f, L_theta = F.detach(), f.detach(), L_theta.detach()
        theta_gap = float(tree_norm(tree_sub(theta, y)))
        v_gamma = (float(L_theta) + theta_gap ** 2 / (2 * self.gamma1)
                   - float((lam_new - z).pow(2).sum()) / (2 * self.gamma2))
        step = (float(tree_norm(tree_sub(x, x_new))) ** 2
                + float(tree_norm(tree_sub(y, y_new))) ** 2) ** 0.5 / self.alpha
        diagnostics = ConstrainedDiagnostics(
            self.name, float(F), step, 1,
            max_violation=float(g_y.clamp_min(0).max()) if g_y.numel() else 0.0,
            value_gap=float(f) - v_gamma, theta_gap=theta_gap,
            multipliers=lam_new.tolist(), penalty=c)
        direction = tree_map2(lambda a, b: (a - b) / self.alpha, x, x_new)
        new_state = {**state, "theta": theta, "lam": lam_new, "z": z_new, "k": k + 1}
        return Hypergradient(direction, y_new, new_state, diagnostics)



def _grads(value: torch.Tensor, *trees: PyTree) -> list[PyTree]:
    """∇ of a scalar with respect to each tree (zeros where it does not depend on it)."""
    groups = [tree_flatten(t) for t in trees]
    flat = torch.autograd.grad(value, [x for leaves, _ in groups for x in leaves],
                               allow_unused=True)
    out, i = [], 0
    for leaves, spec in groups:
        part, i = flat[i:i + len(leaves)], i + len(leaves)
        out.append(tree_unflatten([torch.zeros_like(x) if d is None else d
                                   for x, d in zip(leaves, part, strict=True)], spec))
    return out
