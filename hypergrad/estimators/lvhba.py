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

Only gradients are used (no Hessian-vector products). The iteration runs on flat
vectors: v = (ravel(x), ravel(y)) and ravel(θ); the user's f, F and g see pytrees of
views into them, and the projections act on the flat vectors
(:meth:`ConstrainedProblem.flat_projections`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch.func import grad_and_value

from ..constrained import ConstrainedProblem, FlatMap
from ..errors import BilevelInputError, DivergenceError
from ..pytree import PyTree, tree_detach, tree_flatten, tree_leaves
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
        iteration: k, the number of LV-HBA iterations before this one (``state["k"]``);
            ``None`` for :class:`KKTImplicit`.
    """

    max_violation: float = math.nan
    value_gap: float = math.nan
    theta_gap: float = math.nan
    multipliers: list[float] | None = None
    penalty: float = math.nan
    iteration: int | None = None


@dataclass(frozen=True)
class LVHBARun:
    """What :meth:`LVHBA.run` returns.

    Attributes:
        hparams: x after the last iteration (the projected iterate), a pytree like the
            ``hparams`` passed in.
        params: y after the last iteration, a pytree like ``params``.
        state: the state to continue from (``{"theta", "lam", "z", "k"}``, as from a call).
        diagnostics: :class:`ConstrainedDiagnostics` of the iterations k with
            k % ``diagnostics_every`` == 0 and of the last one, oldest first; each has
            ``iteration`` = k, ``inner_steps`` = iterations of this run so far,
            ``hypergrad_norm`` = ‖(x_k − x_{k+1})/α‖ and ``seconds`` since the run started.
    """

    hparams: PyTree
    params: PyTree
    state: EstimatorState
    diagnostics: list[ConstrainedDiagnostics]


@dataclass(frozen=True)
class LVHBA(Estimator):
    """LV-HBA iterations (see the module docstring for the equations).

    **One iteration per call**, ``est(problem, x, y, state)`` with a
    :class:`ConstrainedProblem`: it returns ``grad`` = (x − x⁺)/α, so that an outer step
    x ← x − α·grad (``torch.optim.SGD`` with ``lr=alpha``) lands on the projected LV-HBA
    iterate x⁺ (up to rounding); ``params`` = y⁺; the state {θ, λ, z, k} for the next call
    (θ = y, λ = z = 0 at the start); and diagnostics of the iteration.

    **Many iterations per call**, :meth:`run`: the same iteration ``iterations`` times
    on flat vectors, x⁺ kept exactly, diagnostics (and the NaN/inf check) only every
    ``diagnostics_every``-th iteration and at the last. On small problems, where each
    iteration costs little arithmetic, this is several times faster than a loop of calls.

    ``grad`` matches ``x`` (``hparams``), ``params`` matches ``y``; the state holds
    ``"theta"`` (pytree like ``y``), ``"lam"`` and ``"z"`` (tensors of shape ``(l,)``)
    and ``"k"`` (int, iterations done). The leaves of x and y are floating-point tensors
    of one dtype and device. Diagnostics are :class:`ConstrainedDiagnostics`. The
    problem's ``inner_loss`` is f, ``outer_loss`` F and ``constraints`` g; no
    Hessian-vector products are taken, so no second-order self-check is run.

    Args:
        alpha: step of (x, y).
        beta: step of z.
        eta: step of θ and λ.
        gamma1, gamma2: proximal parameters γ1 (of θ) and γ2 (of λ).
        c_bar, p: penalty c_k = c̄ (k+1)^p, p ∈ (0, ½).
        r: the box Z = [0, r]^l of z.
        compile: run the iteration through ``torch.compile`` (compiled once per problem
            and shapes: seconds; then several times faster on small problems, where eager
            execution is dominated by per-operation overhead).
        diagnostics_every: in :meth:`run`, compute diagnostics (two gradient-free
            evaluations of g and a few norms, one host sync) and check for NaN/inf at
            iterations k with k % diagnostics_every == 0, and at the last. A call of the
            estimator always computes them (it is a run of one iteration).

    Raises:
        ValueError: a step, proximal parameter, ``c_bar`` or ``r`` not a positive finite
            number, ``p`` outside (0, 0.5), ``diagnostics_every`` not a positive int (at
            construction).
        TypeError: ``problem`` is not a :class:`~hypergrad.ConstrainedProblem`.
        BilevelInputError: on the first call (k = 0), a starting point outside its
            sets (the message gives the distance), or ``g`` of the wrong shape; leaves of
            x and y that are not floating tensors of one dtype and device; a state whose
            θ does not match y or whose λ, z are not of shape ``(l,)``.
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
    diagnostics_every: int = 100

    def __post_init__(self) -> None:
        for field in ("alpha", "beta", "eta", "gamma1", "gamma2", "c_bar", "r"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LVHBA.{field} must be a positive number, got {value!r}")
        if not 0 < self.p < 0.5:
            raise ValueError(f"LVHBA.p must lie in (0, 0.5), got {self.p!r}")
        if not _positive_int(self.diagnostics_every):
            raise ValueError("LVHBA.diagnostics_every must be a positive int, got "
                             f"{self.diagnostics_every!r}")

    def init_state(self, problem: ConstrainedProblem, params: PyTree) -> EstimatorState:
        """The starting state: θ = y (``params``), λ = z = 0 (shape ``(l,)``), k = 0."""
        leaf = tree_leaves(params)[0]
        zeros = torch.zeros(problem.num_constraints, dtype=leaf.dtype, device=leaf.device)
        return {"theta": tree_detach(params), "lam": zeros, "z": zeros.clone(), "k": 0}

    def compute(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One iteration; call the estimator instead (``__call__`` adds the checks)."""
        start = time.perf_counter()
        plan, (v, theta, lam, z, k), state = self._begin(problem, hparams, params, state)
        if self.compile:
            kt = torch.tensor(float(k), dtype=torch.float64, device=v.device)
            *new, stats, _ = plan.compiled(v, theta, lam, z, kt)
        else:
            *new, values = plan.step(v, theta, lam, z, self.penalty(k))
            stats = _stats(self, problem, plan.layout, v, new, z, values)
        v_new, theta, lam_new, z_new = new
        diagnostics, _ = self._diagnostics(stats.tolist(), k, 1, start)
        layout, n = plan.layout, plan.layout.nx
        direction = layout.x_tree((v[:n] - v_new[:n]) / self.alpha)
        new_state = {**state, "theta": layout.y_tree(theta), "lam": lam_new, "z": z_new,
                     "k": k + 1}
        return Hypergradient(direction, layout.y_tree(v_new[n:]), new_state, diagnostics)

    def run(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
            iterations: int, state: EstimatorState | None = None) -> LVHBARun:
        """Run ``iterations`` LV-HBA iterations from (x, y) = (``hparams``, ``params``).

        The same iterates as ``iterations`` calls of the estimator (up to rounding: a call
        returns x⁺ as the step (x − x⁺)/α, which the caller turns back into x⁺), at a
        fraction of the cost. Diagnostics and the NaN/inf check run only at iterations k
        with k % ``diagnostics_every`` == 0 and at the last, so a divergence is reported
        at most ``diagnostics_every`` iterations after it started.

        Args:
            problem: the constrained problem.
            hparams: x, a pytree of floating tensors; params: y, likewise (one dtype and
                device for all leaves of both).
            iterations: how many iterations to run (≥ 1).
            state: the state to continue from (``result.state`` of a call or a run);
                ``None``: θ = y, λ = z = 0, k = 0.

        Returns:
            :class:`LVHBARun`: x, y and the state after the last iteration, and the
            diagnostics taken.

        Raises:
            ValueError: ``iterations`` not a positive int.
            DivergenceError: NaN or inf in x, y, θ, λ or z at a diagnosed iteration.
            TypeError, BilevelInputError: as a call of the estimator.
        """
        if not _positive_int(iterations):
            raise ValueError(f"LVHBA.run: iterations must be a positive int, got {iterations!r}")
        start = time.perf_counter()
        plan, (v, theta, lam, z, k0), state = self._begin(problem, hparams, params,
                                                          dict(state or {}))
        every, last = self.diagnostics_every, iterations - 1
        kt = torch.tensor(float(k0), dtype=torch.float64, device=v.device)
        history = []
        for i in range(iterations):
            k = k0 + i
            if self.compile:  # the diagnostics come with the step, from inside the graph
                *new, stats, kt = plan.compiled(v, theta, lam, z, kt)
            else:
                *new, values = plan.step(v, theta, lam, z, self.penalty(k))
            if k % every == 0 or i == last:
                if not self.compile:
                    stats = _stats(self, problem, plan.layout, v, new, z, values)
                diagnostics, finite = self._diagnostics(stats.tolist(), k, i + 1, start)
                history.append(diagnostics)
                if not finite:
                    raise DivergenceError(
                        f"{self.name}: NaN or inf in {_nonfinite(new)} after iteration {k} "
                        f"(checked every {every} iterations); lower alpha and eta")
            v, theta, lam, z = new
        layout, n = plan.layout, plan.layout.nx
        state = {**state, "theta": layout.y_tree(theta), "lam": lam, "z": z,
                 "k": k0 + iterations}
        return LVHBARun(layout.x_tree(v[:n]), layout.y_tree(v[n:]), state, history)

    def penalty(self, k: int) -> float:
        """c_k = c̄ (k+1)^p, the penalty of iteration k (k = 0, 1, …)."""
        return self.c_bar * (k + 1) ** self.p

    # --- plumbing ----------------------------------------------------------------------

    def _begin(self, problem: ConstrainedProblem, hparams: PyTree, params: PyTree,
               state: EstimatorState) -> tuple[_Plan, tuple, EstimatorState]:
        """Check the inputs, complete the state, and flatten: (plan, (v, θ, λ, z, k), state)."""
        if not isinstance(problem, ConstrainedProblem):
            raise TypeError("LVHBA needs a ConstrainedProblem, got "
                            f"{type(problem).__name__}")
        x_leaves, x_spec = tree_flatten(hparams)
        y_leaves, y_spec = tree_flatten(params)
        _check_leaves(x_leaves, y_leaves)
        plan = _plan(self, problem, x_spec, y_spec, x_leaves, y_leaves)
        if state.get("k", 0) == 0:
            problem.check_start(tree_detach(params), tree_detach(hparams))
        if "theta" not in state:
            state = {**state, **self.init_state(problem, params)}
        lam, z, k = state["lam"], state["z"], state["k"]
        for key, value in (("lam", lam), ("z", z)):
            if not isinstance(value, torch.Tensor) or value.shape != (problem.num_constraints,):
                got = (tuple(value.shape) if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise BilevelInputError(f"LVHBA: state[{key!r}] must be a tensor of shape "
                                        f"({problem.num_constraints},), got {got}")
        v = torch.cat([a.reshape(-1) for a in x_leaves + y_leaves]).detach()
        flat = (v, plan.layout.ravel_theta(state["theta"]), lam.detach(), z.detach(), k)
        return plan, flat, state

    def _diagnostics(self, numbers: list[float], k: int, steps: int, start: float
                     ) -> tuple[ConstrainedDiagnostics, bool]:
        """:class:`ConstrainedDiagnostics` from the numbers of :func:`_stats`, and whether
        the new iterate is finite."""
        F, gap, theta_gap, violation, step, x_step, finite = numbers[:7]
        diagnostics = ConstrainedDiagnostics(
            self.name, F, step, steps, hypergrad_norm=x_step,
            seconds=time.perf_counter() - start, max_violation=violation, value_gap=gap,
            theta_gap=theta_gap, multipliers=numbers[7:], penalty=self.penalty(k),
            iteration=k)
        return diagnostics, finite == 1.0


def _stats(est: LVHBA, problem: ConstrainedProblem, layout: _Layout, v: torch.Tensor,
           new: list[torch.Tensor], z: torch.Tensor, values: tuple) -> torch.Tensor:
    """The diagnostics of the step v → v⁺ as one tensor (tensor operations only, so that
    they can be compiled with the step): F, f − v_γ, ‖θ⁺ − y‖, max(g(y, x), 0),
    ‖((x, y) − (x⁺, y⁺))/α‖, ‖(x − x⁺)/α‖, 1 if x⁺, y⁺, θ⁺, λ⁺, z⁺ are finite (else 0),
    then λ⁺."""
    v_new, theta, lam, _ = new
    F, f, L_theta = values
    n = layout.nx
    with torch.no_grad():
        x, y = layout.trees(v)
        x_step = torch.linalg.vector_norm((v[:n] - v_new[:n]) / est.alpha)
        theta_gap = torch.linalg.vector_norm(theta - v[n:])
        v_gamma = L_theta + theta_gap ** 2 / (2 * est.gamma1) - (lam - z).pow(2).sum() / (
            2 * est.gamma2)
        step = (x_step ** 2 + torch.linalg.vector_norm(v[n:] - v_new[n:]) ** 2
                / est.alpha ** 2).sqrt()
        violation = (problem.g(y, x).clamp_min(0).max() if problem.num_constraints
                     else torch.zeros_like(F))
        finite = torch.stack([t.isfinite().all() for t in new]).all().to(F.dtype)
        return torch.cat([torch.stack([F, f - v_gamma, theta_gap, violation, step, x_step,
                                       finite]), lam])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _nonfinite(new: list[torch.Tensor]) -> str:
    """Which of (x, y), θ, λ, z holds NaN or inf (for the error message)."""
    names = ("(x, y)", "θ", "λ", "z")
    return ", ".join(name for name, t in zip(names, new, strict=True)
                     if not bool(t.isfinite().all()))


class _Layout:
    """Where the leaves of x and y sit in the flat vector v = (ravel(x), ravel(y)) (and
    those of θ in ravel(θ)); the user's functions see pytrees of views into v."""

    def __init__(self, x_spec: Any, y_spec: Any, x_leaves: list[torch.Tensor],
                 y_leaves: list[torch.Tensor]) -> None:
        self.x_spec, self.y_spec = x_spec, y_spec
        self.x_shapes = tuple(a.shape for a in x_leaves)
        self.y_shapes = tuple(a.shape for a in y_leaves)
        self.x_sizes = tuple(a.numel() for a in x_leaves)
        self.y_sizes = tuple(a.numel() for a in y_leaves)
        self.nx = sum(self.x_sizes)
        self._x_unflatten, self._y_unflatten = _unflattener(x_spec), _unflattener(y_spec)

    def ravel_theta(self, theta: PyTree) -> torch.Tensor:
        """ravel(θ), detached; θ must match y in structure and shapes."""
        leaves, spec = tree_flatten(theta)
        if spec != self.y_spec or not all(isinstance(a, torch.Tensor) for a in leaves) or \
                tuple(a.shape for a in leaves) != self.y_shapes:
            raise BilevelInputError("LVHBA: state['theta'] must have the structure and leaf "
                                    "shapes of params (y)")
        return torch.cat([a.reshape(-1) for a in leaves]).detach()

    def trees(self, v: torch.Tensor) -> tuple[PyTree, PyTree]:
        """(x, y) as pytrees of views into v."""
        leaves = _views(v, self.x_sizes + self.y_sizes, self.x_shapes + self.y_shapes)
        m = len(self.x_sizes)
        return self._x_unflatten(leaves[:m]), self._y_unflatten(leaves[m:])

    def x_tree(self, flat: torch.Tensor) -> PyTree:
        """A pytree like x of views into ``flat`` (shape ``(n_x,)``)."""
        return self._x_unflatten(_views(flat, self.x_sizes, self.x_shapes))

    def y_tree(self, flat: torch.Tensor) -> PyTree:
        """A pytree like y of views into ``flat`` (shape ``(n_y,)``)."""
        return self._y_unflatten(_views(flat, self.y_sizes, self.y_shapes))


def _unflattener(spec: Any) -> Callable[[list], PyTree]:
    """``spec.unflatten``, or a faster equivalent for a flat dict of tensors."""
    if spec.type is dict and all(child.is_leaf() for child in spec.children()):
        keys = tuple(spec.context)
        return lambda leaves: dict(zip(keys, leaves, strict=True))
    return spec.unflatten


def _views(flat: torch.Tensor, sizes: tuple[int, ...], shapes: tuple) -> list[torch.Tensor]:
    parts = flat.split(sizes) if len(sizes) > 1 else (flat,)
    return [part if part.shape == shape else part.view(shape)
            for part, shape in zip(parts, shapes, strict=True)]


def _check_leaves(x_leaves: list, y_leaves: list) -> None:
    for name, leaves in (("hparams (x)", x_leaves), ("params (y)", y_leaves)):
        if not leaves:
            raise BilevelInputError(f"LVHBA: {name} has no tensors")
        for a in leaves:
            if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                got = a.dtype if isinstance(a, torch.Tensor) else type(a).__name__
                raise BilevelInputError(f"LVHBA: the leaves of {name} must be floating-point "
                                        f"tensors, got {got}")
    kinds = {(a.dtype, a.device) for a in x_leaves + y_leaves}
    if len(kinds) > 1:
        raise BilevelInputError("LVHBA: the leaves of hparams (x) and params (y) must share "
                                f"one dtype and device (they are iterated as one vector), "
                                f"got {sorted(map(str, kinds))}")


# --- the iteration ---------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Plan:
    """One problem's iteration for one layout: ``step(v, θ, λ, z, c_k)`` eager, returning
    (v⁺, θ⁺, λ⁺, z⁺, (F, f, L(θ⁺, x; λ⁺))), and ``compiled(v, θ, λ, z, k)`` (k a 0-d
    float64 tensor), returning (v⁺, θ⁺, λ⁺, z⁺, diagnostics tensor, k + 1)."""

    layout: _Layout
    step: Callable
    compiled: Callable | None


_MAX_PLANS = 8  # per problem (one per set of step settings and variable shapes)


def _plan(est: LVHBA, problem: ConstrainedProblem, x_spec: Any, y_spec: Any,
          x_leaves: list[torch.Tensor], y_leaves: list[torch.Tensor]) -> _Plan:
    """The plan for (problem, the settings of the step, the structure, shapes, dtype and
    device of x and y), cached on the problem: the projections are resolved and the
    compiled function built once (torch.compile guards on them, so a new plan would
    compile again)."""
    settings = (est.alpha, est.beta, est.eta, est.gamma1, est.gamma2, est.c_bar, est.p,
                est.r, est.compile)
    leaf = x_leaves[0]
    key = ("lvhba", settings, x_spec, y_spec, tuple(a.shape for a in x_leaves),
           tuple(a.shape for a in y_leaves), leaf.dtype, leaf.device)
    cache = problem._solver_cache
    plan = cache.get(key)
    if plan is not None:
        return plan
    layout = _Layout(x_spec, y_spec, x_leaves, y_leaves)
    project_y, project_v = problem.flat_projections(layout.x_tree(torch.zeros(layout.nx)),
                                                    layout.y_tree(torch.zeros(
                                                        sum(layout.y_sizes))))
    step = partial(_step, est, problem, layout, project_y, project_v, _autograd_grads)
    compiled = None
    if est.compile:
        compiled = torch.compile(partial(_counted_step, est, problem, layout, project_y,
                                         project_v), dynamic=False)
    plan = _Plan(layout, step, compiled)
    while len(cache) >= _MAX_PLANS:
        del cache[next(iter(cache))]
    cache[key] = plan
    return plan


def _counted_step(est: LVHBA, problem: ConstrainedProblem, layout: _Layout,
                  project_y: FlatMap | None, project_v: FlatMap | None, v: torch.Tensor,
                  theta: torch.Tensor, lam: torch.Tensor, z: torch.Tensor,
                  k: torch.Tensor) -> tuple:
    """:func:`_step` for compilation: c_k computed from k (a 0-d float64 tensor), k + 1
    returned, so that no tensor is created and nothing is synchronised per iteration, and
    the diagnostics (:func:`_stats`) returned instead of (F, f, L), computed inside the
    graph where they cost little."""
    c = (est.c_bar * (k + 1) ** est.p).to(v.dtype)
    *new, values = _step(est, problem, layout, project_y, project_v, _func_grads, v, theta,
                         lam, z, c)
    return (*new, _stats(est, problem, layout, v, new, z, values), k + 1)


def _step(est: LVHBA, problem: ConstrainedProblem, layout: _Layout,
          project_y: FlatMap | None, project_v: FlatMap | None, grads: Callable,
          v: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor, z: torch.Tensor,
          c: float | torch.Tensor) -> tuple:
    """One LV-HBA iteration on flat tensors (so that it can be compiled).

    ``v`` = (ravel(x), ravel(y)), ``theta`` = ravel(θ), ``lam`` and ``z`` of shape (l,),
    ``c`` = c_k. ``grads(fn, *tensors)`` returns (aux, [∇ of fn's value in each tensor])
    for fn returning (value, aux). Returns v⁺, θ⁺, λ⁺, z⁺ and the detached values
    (F(y, x), f(y, x), L(θ⁺, x; λ⁺)) for the diagnostics.
    """
    batch, n = problem.inner_batch, layout.nx
    x, y = v[:n], v[n:]
    x_tree = layout.x_tree(x)  # x as a constant (no gradient flows into it)

    def penalised(th: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        # ∇_θ L(θ, x; λ) and ∇_(x,y) [F/c + f](y, x) from one backward pass
        xx, yy = layout.trees(vv)
        F = problem.outer_loss(yy, xx, problem.outer_batch)
        f = problem.inner_loss(yy, xx, batch)
        L = problem.lagrangian(lam)(layout.y_tree(th), x_tree, batch)
        return L + F / c + f, (F.detach(), f.detach())

    (F, f), (g_theta, g_v) = grads(penalised, theta, v)

    # θ: one projected gradient step on the proximal min-max problem.
    theta = theta - est.eta * (g_theta + (theta - y) / est.gamma1)
    if project_y is not None:
        theta = project_y(theta)
    theta_tree = layout.y_tree(theta)

    def lagrangian_x(xx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        # λ's projected step with the new θ, then L(θ⁺, x; λ⁺) = f + λ⁺ᵀg to differentiate
        # in x: g(θ⁺, x) is evaluated once for both
        x_at = layout.x_tree(xx)
        if not problem.num_constraints:
            L = problem.inner_loss(theta_tree, x_at, batch)
            return L, (L.detach(), lam)
        g = problem.g(theta_tree, x_at)
        lam_new = (lam + est.eta * (g.detach() - (lam - z) / est.gamma2)).clamp_min(0)
        L = problem.inner_loss(theta_tree, x_at, batch) + lam_new @ g
        return L, (L.detach(), lam_new)

    (L_theta, lam_new), (g_x,) = grads(lagrangian_x, x)
    # d = (d_x, d_y) = ∇_(x,y)[F/c + f] − (∇_x L(θ⁺, x; λ⁺), (y − θ⁺)/γ1)
    d = g_v - torch.cat([g_x, (y - theta) / est.gamma1])
    v_new = v - est.alpha * d
    if project_v is not None:
        v_new = project_v(v_new)
    z_new = (z - est.beta * (z - lam_new) / est.gamma2).clamp(0, est.r)
    return v_new, theta, lam_new, z_new, (F, f, L_theta)


def _autograd_grads(fn: Callable, *tensors: torch.Tensor
                    ) -> tuple[Any, list[torch.Tensor]]:
    """(aux, gradients) of ``fn(*tensors) = (value, aux)`` by one ``torch.autograd.grad``
    (zeros where the value does not depend on a tensor)."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    with torch.enable_grad():
        value, aux = fn(*leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return aux, [torch.zeros_like(t) if g is None else g
                 for t, g in zip(leaves, grads, strict=True)]


def _func_grads(fn: Callable, *tensors: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """The same with ``torch.func``, which ``torch.compile`` traces."""
    gs, (_, aux) = grad_and_value(fn, argnums=tuple(range(len(tensors))),
                                  has_aux=True)(*tensors)
    return aux, list(gs)

