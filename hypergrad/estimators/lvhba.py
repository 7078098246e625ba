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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch.func import grad_and_value

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
    """Diagnostics of LV-HBA (and :class:`KKTImplicit`) at the iterate (x_k, y_k) the step
    started from; all plain Python numbers.

    Attributes:
        max_violation: max(g(y, x), 0), the largest constraint violation (0 if feasible).
        value_gap: f(y, x) − v_γ(x, y, z) (v_γ evaluated at the current θ, λ: ≥ 0 up to
            their inexactness); NaN for :class:`KKTImplicit`.
        theta_gap: ‖θ − y‖; NaN for :class:`KKTImplicit`.
        multipliers: the multipliers λ (one per constraint, length l), or ``None``.
        penalty: the penalty c_k of this iteration; NaN for :class:`KKTImplicit`.
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

    ``grad`` matches ``x`` (``hparams``), ``params`` matches ``y``; the state holds
    ``"theta"`` (pytree like ``y``), ``"lam"`` and ``"z"`` (tensors of shape ``(l,)``)
    and ``"k"`` (int, iterations done). Diagnostics are :class:`ConstrainedDiagnostics`.
    The problem's ``inner_loss`` is f, ``outer_loss`` F and ``constraints`` g; no
    Hessian-vector products are taken, so no second-order self-check is run.

    Args:
        alpha: step of (x, y).
        beta: step of z.
        eta: step of θ and λ.
        gamma1, gamma2: proximal parameters γ1 (of θ) and γ2 (of λ).
        c_bar, p: penalty c_k = c̄ (k+1)^p, p ∈ (0, ½).
        r: the box Z = [0, r]^l of z.
        compile: run the iteration through ``torch.compile`` (one compilation per
            problem, tens of seconds; then many times faster on small problems, where
            eager execution is dominated by per-operation overhead).

    Raises:
        ValueError: a step, proximal parameter, ``c_bar`` or ``r`` not a positive finite
            number, or ``p`` outside (0, 0.5) (at construction).
        TypeError: ``problem`` is not a :class:`~hypergrad.ConstrainedProblem`.
        BilevelInputError: on the first call (k = 0), a starting point outside its
            sets (the message gives the distance), or ``g`` of the wrong shape.
        DivergenceError, NonFiniteError: NaN or inf in the iterate or the step (lower
            ``alpha`` and ``eta``).

    References:
        Yao, Yu, Zeng, Zhang, "Constrained bi-level optimization: proximal Lagrangian
        value function approach and Hessian-free algorithm", ICLR 2024.
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
    compile: bool = False

    def __post_init__(self) -> None:
        for field in ("alpha", "beta", "eta", "gamma1", "gamma2", "c_bar", "r"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LVHBA.{field} must be a positive number, got {value!r}")
        if not 0 < self.p < 0.5:
            raise ValueError(f"LVHBA.p must lie in (0, 0.5), got {self.p!r}")

    def init_state(self, problem: ConstrainedProblem, params: PyTree) -> EstimatorState:
        """The starting state: θ = y (``params``), λ = z = 0 (shape ``(l,)``), k = 0."""
        leaf = tree_leaves(params)[0]
        zeros = torch.zeros(problem.num_constraints, dtype=leaf.dtype, device=leaf.device)
        return {"theta": tree_detach(params), "lam": zeros, "z": zeros.clone(), "k": 0}

    def compute(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        if not isinstance(problem, ConstrainedProblem):
            raise TypeError("LVHBA needs a ConstrainedProblem, got "
                            f"{type(problem).__name__}")
        x, y = tree_detach(hparams), tree_detach(params)
        if state.get("k", 0) == 0:
            problem.check_start(y, x)
        if "theta" not in state:
            state = {**state, **self.init_state(problem, y)}
        theta, lam, z, k = state["theta"], state["lam"], state["z"], state["k"]
        c = self.c_bar * (k + 1) ** self.p
        iterate = _compiled_iteration(self, problem) if self.compile else \
            partial(_iteration, self, problem, _autograd_grads)
        direction, y_new, theta, lam_new, z_new, stats = iterate(
            x, y, theta, lam, z, torch.tensor(c, dtype=lam.dtype, device=lam.device))
        F, value_gap, theta_gap, violation, step = stats.tolist()
        diagnostics = ConstrainedDiagnostics(
            self.name, F, step, 1, max_violation=violation, value_gap=value_gap,
            theta_gap=theta_gap, multipliers=lam_new.tolist(), penalty=c)
        new_state = {**state, "theta": theta, "lam": lam_new, "z": z_new, "k": k + 1}
        return Hypergradient(direction, y_new, new_state, diagnostics)



def _iteration(est: LVHBA, problem: ConstrainedProblem, grads: Callable, x: PyTree,
               y: PyTree, theta: PyTree, lam: torch.Tensor, z: torch.Tensor,
               c: torch.Tensor) -> tuple:
    """One LV-HBA iteration on tensors only (so that it can be compiled).

    ``grads(fn, *trees)`` returns (aux, [∇ of fn's value in each tree]) for fn returning
    (value, aux). Returns (x − x⁺)/α, y⁺, θ⁺, λ⁺, z⁺ and the diagnostics at (y, x) as one
    tensor: F, f − v_γ, ‖θ⁺ − y‖, max(g, 0), ‖((x, y) − (x⁺, y⁺))/α‖.
    """
    batch = problem.inner_batch

    def penalised(th: PyTree, yy: PyTree, xx: PyTree) -> tuple[torch.Tensor, tuple]:
        # ∇_θ L(θ, x; λ) and ∇_(y,x) [F/c + f](y, x) from one backward pass
        F = problem.outer_loss(yy, xx, problem.outer_batch)
        f = problem.inner_loss(yy, xx, batch)
        L = problem.lagrangian(lam)(th, x, batch)
        return L + F / c + f, (F.detach(), f.detach())

    (F, f), (g_theta, gP_y, gP_x) = grads(penalised, theta, y, x)
    g_y = problem.g(y, x)

    # θ and λ: one projected gradient step on the proximal min-max problem.
    theta = problem.project_y(tree_map2(
        lambda t, gt, yy: t - est.eta * (gt + (t - yy) / est.gamma1), theta, g_theta, y))
    lam_new = lam
    if problem.num_constraints:
        lam_new = (lam + est.eta * (problem.g(theta, x) - (lam - z) / est.gamma2)).clamp_min(0)

    def lagrangian_x(xx: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
        L = problem.lagrangian(lam_new)(theta, xx, batch)
        return L, L.detach()

    L_theta, (gL_x,) = grads(lagrangian_x, x)
    d_x = tree_sub(gP_x, gL_x)
    d_y = tree_map2(lambda gy, yt: gy - yt / est.gamma1, gP_y, tree_sub(y, theta))
    x_new, y_new = problem.project_xy(tree_map2(lambda a, d: a - est.alpha * d, x, d_x),
                                      tree_map2(lambda a, d: a - est.alpha * d, y, d_y))
    z_new = (z - est.beta * (z - lam_new) / est.gamma2).clamp(0, est.r)

    direction = tree_map2(lambda a, b: (a - b) / est.alpha, x, x_new)
    theta_gap = tree_norm(tree_sub(theta, y))
    v_gamma = L_theta + theta_gap ** 2 / (2 * est.gamma1) - (lam_new - z).pow(2).sum() / (
        2 * est.gamma2)
    step = (tree_norm(direction) ** 2 + tree_norm(tree_sub(y, y_new)) ** 2 / est.alpha ** 2
            ).sqrt()
    violation = g_y.clamp_min(0).max() if g_y.numel() else torch.zeros_like(F)
    stats = torch.stack([F, f - v_gamma, theta_gap, violation, step])
    return direction, y_new, theta, lam_new, z_new, stats


def _autograd_grads(fn: Callable, *trees: PyTree) -> tuple[Any, list[PyTree]]:
    """(aux, gradients) of ``fn(*trees) = (value, aux)`` by one ``torch.autograd.grad``."""
    leaves = [tree_requires_grad(t) for t in trees]
    with torch.enable_grad():
        value, aux = fn(*leaves)
        return aux, _grads(value, *leaves)


def _func_grads(fn: Callable, *trees: PyTree) -> tuple[Any, list[PyTree]]:
    """The same with ``torch.func``, which ``torch.compile`` traces."""
    gs, (_, aux) = grad_and_value(fn, argnums=tuple(range(len(trees))), has_aux=True)(*trees)
    return aux, list(gs)


@functools.lru_cache(maxsize=8)
def _compiled_iteration(est: LVHBA, problem: ConstrainedProblem) -> Callable:
    return torch.compile(partial(_iteration, est, problem, _func_grads), dynamic=False)


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
