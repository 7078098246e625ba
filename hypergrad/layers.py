"""Solver layers: a solver's output made differentiable through ordinary autograd.

An inner solver ``solve(init, *args) -> x*`` defines x*(args) by optimality conditions
T(x*, *args) = 0. Three kinds of layer differentiate it:

- :func:`custom_root`, implicit backward: the forward runs the solver without a graph; the
  backward solves (∂_x T)ᵀ v = c with a linear solver of :mod:`hypergrad.linear_solve` and
  returns −(∂_args T)ᵀ v (the implicit function theorem, :func:`~hypergrad.root_vjp`).
  Memory and cost do not depend on how the solver found x*; the gradient is that of the
  exact solution, so it is right only as far as the solver converged. T may be the
  stationarity of a loss (:class:`~hypergrad.Stationarity`), a fixed-point residual, a
  projected-gradient residual, or KKT conditions (:func:`kkt_optimality`).
- :func:`unrolled_layer`, unrolled backward: K iterations x ← step(x, *args) recorded by
  autograd (optionally with checkpointed recompute, memory O(√K)); the exact gradient of
  the K-step map, converged or not.
- :func:`fixed_point_layer`, a deep-equilibrium layer: the forward iterates x = Φ(x, *args)
  to a tolerance and the backward solves (I − ∂_xΦ)ᵀ v = c (T = x − Φ).

The implicit layers (and the recomputed segments of an unrolled one) are
``torch.autograd.Function`` subclasses with ``setup_context`` and a ``vmap`` rule, so they
work under ``torch.func.grad``, ``torch.func.vmap`` (a batch of problems, each solved and
differentiated on its own), ``torch.func.jacrev`` and their compositions, as well as with
``loss.backward()``. Under ``vmap`` the solver runs once per problem (a solver with
data-dependent control flow, e.g. a loop to a tolerance, cannot be vmapped itself), and
so does the backward solve; the rows of ``jacrev`` (one problem, many cotangents) share one
batched solve.

References:
    Amos & Kolter, "OptNet: differentiable optimization as a layer in neural networks",
    ICML 2017. Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019. Blondel et
    al., "Efficient and modular implicit differentiation", NeurIPS 2022 (JAXopt's
    ``custom_root``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import (
    INNER_NOT_CONVERGED,
    LINEAR_SOLVE_NOT_CONVERGED,
    BilevelInputError,
    ConvergenceWarning,
    warn,
)
from .estimators.unrolled import sqrt_segment
from .implicit_diff import Stationarity, root_vjp
from .linear_solve import GMRES, ConjugateGradient, LinearSolver, SolveResult, make_solver
from .pytree import PyTree, tree_flatten, tree_unflatten

#: how the products of the backward solve are formed (see :func:`hypergrad.linearize`)
MODES = ("linearized", "reverse", "jvp", "auto")


# --- the layer objects -------------------------------------------------------------------


@dataclass
class FixedPointInfo:
    """How the forward iteration of a :func:`fixed_point_layer` ended.

    Attributes:
        iterations: applications of Φ.
        residual: the last step's relative change ‖x_k − x_{k−1}‖ / (1 + ‖x_k‖), x_k =
            Φ(x_{k−1}) the returned iterate (unitless).
        converged: ``residual <= tol``.
    """

    iterations: int
    residual: float
    converged: bool


@dataclass(eq=False)
class RootLayer:
    """A solver made differentiable by the implicit function theorem (see
    :func:`custom_root`). Call it as the solver: ``layer(init, *args) -> x*``.

    Attributes:
        solve: the wrapped solver, ``solve(init, *args) -> x*`` (a tensor or pytree).
        optimality: T(x, *args), zero at x* (a tree like x).
        solver: the linear solver of the backward pass (see :meth:`solver_for`).
        symmetric: ∂_x T is symmetric.
        mode: how the products of the backward solve are formed.
        on_solve: called with the :class:`~hypergrad.linear_solve.SolveResult` of every
            backward solve, or ``None``.
        last_solve: the result of the latest backward solve (``None`` before the first);
            under ``vmap`` that of the last problem of the batch.
        solves: backward solves run so far.
        last_forward: for a :func:`fixed_point_layer`, how its latest forward iteration
            ended (:class:`FixedPointInfo`); else ``None``.
    """

    solve: Callable[..., PyTree]
    optimality: Callable[..., PyTree]
    solver: LinearSolver
    symmetric: bool
    mode: str
    on_solve: Callable[[SolveResult], Any] | None = None
    #: ``solver`` is the default one, whose tolerance follows the dtype
    default_solver: bool = False
    last_solve: SolveResult | None = field(default=None, init=False)
    solves: int = field(default=0, init=False)
    last_forward: FixedPointInfo | None = field(default=None, init=False)

    def __call__(self, init: PyTree, *args: Any) -> PyTree:
        """x* = solve(init, *args), differentiable in every floating tensor of ``args``
        (not in ``init``: x* does not depend on where the solver started).

        The solver runs under ``torch.no_grad()`` on the arguments as given (a solver that
        needs autograd itself, e.g. a ``torch.optim`` loop, opens ``torch.enable_grad()``
        on detached copies).

        Args:
            init: the starting point, a tensor or pytree with the structure of x* (or
                ``None`` for a solver that needs none); not differentiated.
            *args: the arguments of the solver and of the optimality condition: tensors,
                pytrees of tensors, or other Python values (constants).

        Returns:
            x*, with the structure of ``init`` (detached from the solver's own graph,
            attached to ``args`` by the implicit function theorem).

        Raises:
            BilevelInputError: a :class:`~hypergrad.Stationarity` optimality with other
                than one argument after ``init``; the solver returning anything but
                floating tensors, or a structure other than ``init``'s.
        """
        if isinstance(self.optimality, Stationarity) and len(args) != 1:
            raise BilevelInputError(
                f"custom_root: with a Stationarity optimality the solver takes init and one "
                f"argument θ (a pytree: pack several into a tuple or dict), got {len(args)}")
        init_leaves, init_spec = tree_flatten(init)
        arg_leaves, arg_spec = tree_flatten(tuple(args))
        plan = _Plan(self, init_spec, arg_spec, len(init_leaves))
        outs = _Root.apply(plan, *init_leaves, *arg_leaves)
        return plan.rebuild(outs)

    def solver_for(self, dtype: torch.dtype) -> LinearSolver:
        """The backward solver for tensors of ``dtype``: ``solver``, except that the
        default one's tolerance is raised to 100 ε of a dtype coarser than float64
        (1.2e-5 in float32), which a residual can reach."""
        if not self.default_solver or not dtype.is_floating_point:
            return self.solver
        return dataclasses.replace(self.solver, tol=max(self.solver.tol, _floor(dtype)))

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The latest backward solve as a dict: ``iterations``, ``residual``,
        ``converged``, ``residuals`` (history) and ``note``; empty before the first."""
        s = self.last_solve
        if s is None:
            return {}
        return {"iterations": s.iterations, "residual": s.residual,
                "converged": s.converged, "residuals": list(s.residuals), "note": s.note}

    def _record(self, result: SolveResult) -> None:
        self.last_solve, self.solves = result, self.solves + 1
        if self.on_solve is not None:
            self.on_solve(result)
        if not result.converged:
            advice = result.note or "raise the solver's maxiter or tol"
            warn(f"solver layer: the backward linear solve ({type(self.solver).__name__}) "
                 f"stopped at relative residual {result.residual:.2e} after "
                 f"{result.iterations} iterations; {advice}",
                 ConvergenceWarning, kind=LINEAR_SOLVE_NOT_CONVERGED)


def custom_root(optimality: Callable[..., PyTree], solver: Any = None, *,
                symmetric: bool | None = None, mode: str = "linearized",
                on_solve: Callable[[SolveResult], Any] | None = None,
                ) -> Callable[[Callable[..., PyTree]], RootLayer]:
    """Decorator: make ``solve(init, *args) -> x*`` differentiable by the implicit
    function theorem, given its optimality condition T(x*, *args) = 0.

    The forward runs ``solve`` without a graph (any solver: a loop to a tolerance, a
    projected method, SciPy on detached copies). The backward solves (∂_x T)ᵀ v = c, c
    the incoming gradient of x*, with ``solver`` and returns −(∂_args T)ᵀ v; its
    diagnostics are in the returned layer's ``last_solve`` (and passed to ``on_solve``),
    and a :class:`~hypergrad.ConvergenceWarning` (kind ``LINEAR_SOLVE_NOT_CONVERGED``) is
    issued when it stopped above its tolerance. Works with ``loss.backward()``,
    ``torch.func.grad`` and ``torch.func.vmap`` over a batch of problems (see the module
    docstring), and ``torch.func.jacrev`` (one batched linear solve for all the rows).
    Reverse mode and first order only: the backward is not itself differentiable, and
    forward mode (``torch.func.jvp``, ``jacfwd``) raises ``NotImplementedError``.

    Every tensor that x* depends on and that should receive a gradient must be passed in
    ``args`` (a tensor captured in ``solve``'s or ``optimality``'s closure is a constant
    to the layer).

    Optimality conditions:

    - stationarity of a loss f(x, θ): ``Stationarity(f_)`` with ``f_(x, θ, batch)``
      (the solver then takes ``(init, θ)``; symmetric, CG by default), or any
      ``lambda x, *args: torch.func.grad(f)(x, *args)``;
    - a fixed point x = Φ(x, *args): ``lambda x, *args: x - phi(x, *args)`` (or
      :func:`fixed_point_layer`);
    - KKT conditions (:func:`kkt_optimality`, the solution then the triple (x, μ, ν)),
      or a projected fixed point x = Π(x − η∇f(x, *args)) for a constrained problem
      (both non-symmetric: GMRES).

    Args:
        optimality: T(x, *args) -> a tree like x (zero at the solution), or a
            :class:`~hypergrad.Stationarity`.
        solver: the linear solver of the backward pass: a solver object, a name
            (``"cg"``, ``"gmres"``, ...) or a table (see
            :func:`~hypergrad.make_solver`); default ``ConjugateGradient(tol=1e-10,
            maxiter=1000)`` when ``symmetric`` else ``GMRES(tol=1e-10, maxiter=1000)``,
            the tolerance raised to 100 ε for dtypes coarser than float64.
        symmetric: ∂_x T is symmetric (default: True for a Stationarity, else False).
            CG needs it (a solver whose ``symmetric`` is True).
        mode: ``"linearized"`` (T evaluated once per backward, its graph reused),
            ``"reverse"`` (a VJP of T per product); for a Stationarity also ``"jvp"``
            and ``"auto"`` (see :func:`hypergrad.linearize`).
        on_solve: optional callback given each backward solve's
            :class:`~hypergrad.linear_solve.SolveResult`.

    Returns:
        A decorator turning ``solve`` into a :class:`RootLayer`.

    Raises:
        BilevelInputError: ``optimality`` not callable, ``solver`` not a linear solver,
            a symmetric-only solver (CG) for a system not declared symmetric,
            an unknown ``mode``, ``"jvp"``/``"auto"`` without a Stationarity, or (when
            decorating) ``solve`` not callable.

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> @custom_root(lambda x, b: A @ x - b, symmetric=True)
        ... def solve(init, b):
        ...     return torch.linalg.solve(A, b)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> solve(torch.zeros(2, dtype=torch.float64), b).sum().backward()
        >>> torch.allclose(b.grad, torch.linalg.solve(A, torch.ones(2, dtype=b.dtype)))
        True
    """
    stationary = isinstance(optimality, Stationarity)
    if not callable(optimality):
        raise BilevelInputError(f"custom_root: optimality must be a callable T(x, *args), "
                                f"got {type(optimality).__name__} {optimality!r}")
    if symmetric is None:
        symmetric = stationary
    if not isinstance(symmetric, bool):
        raise BilevelInputError(f"custom_root: symmetric must be a bool, got {symmetric!r}")
    if mode not in MODES:
        raise BilevelInputError(f"custom_root: mode must be one of {MODES}, got {mode!r}")
    if mode in ("jvp", "auto") and not stationary:
        raise BilevelInputError(f"custom_root: mode {mode!r} needs the loss: pass "
                                "optimality=Stationarity(f), or use 'linearized' or 'reverse'")
    lin = _linear_solver(solver, symmetric or stationary, "custom_root")
    if lin.symmetric and not (symmetric or stationary):
        raise BilevelInputError(
            f"custom_root: {type(lin).__name__} needs a symmetric ∂_x T, and the system was "
            "not declared symmetric: pass symmetric=True if it is (stationarity of a loss), "
            "else use solver='gmres', 'fixed_point' or 'direct'")
    if on_solve is not None and not callable(on_solve):
        raise BilevelInputError(f"custom_root: on_solve must be callable, got {on_solve!r}")

    def decorate(solve: Callable[..., PyTree]) -> RootLayer:
        if not callable(solve):
            raise BilevelInputError(f"custom_root: the decorated solver must be callable "
                                    f"solve(init, *args), got {type(solve).__name__}")
        return RootLayer(solve, optimality, lin, bool(symmetric or stationary), mode, on_solve,
                         default_solver=solver is None)

    return decorate


def fixed_point_layer(phi: Callable[..., PyTree], solver: Any = None, *,
                      forward_iterations: int = 1000, tol: float | None = None,
                      mode: str = "linearized",
                      on_solve: Callable[[SolveResult], Any] | None = None) -> RootLayer:
    """A deep-equilibrium layer: ``layer(init, *args)`` iterates x ← Φ(x, *args) from
    ``init`` until ‖Φ(x) − x‖ ≤ tol · (1 + ‖Φ(x)‖) (at most ``forward_iterations``
    times; Φ(x) is returned)
    and differentiates the fixed point implicitly: the backward solves
    (I − ∂_xΦ)ᵀ v = c and returns (∂_argsΦ)ᵀ v.

    The plain iteration converges when Φ is a contraction in x near the fixed point; the
    forward's end is in ``layer.last_forward`` and a
    :class:`~hypergrad.ConvergenceWarning` (kind ``INNER_NOT_CONVERGED``) says when it
    stopped short.

    Args:
        phi: Φ(x, *args) -> a tree like x.
        solver: the backward linear solver, as in :func:`custom_root` (default GMRES;
            I − ∂_xΦ is not symmetric in general).
        forward_iterations: at most this many applications of Φ (int ≥ 1).
        tol: the forward's relative tolerance (≥ 0); default 1e-10, or 100 ε for
            dtypes coarser than float64 (1.2e-5 in float32).
        mode: as in :func:`custom_root` (``"linearized"`` or ``"reverse"``).
        on_solve: as in :func:`custom_root`.

    Returns:
        A :class:`RootLayer`.

    Raises:
        BilevelInputError: ``phi`` not callable, ``forward_iterations`` not an int ≥ 1,
            ``tol`` negative or not finite, or a bad ``solver``/``mode`` (see
            :func:`custom_root`).
    """
    if not callable(phi):
        raise BilevelInputError(f"fixed_point_layer: phi must be a callable Φ(x, *args), "
                                f"got {type(phi).__name__} {phi!r}")
    if isinstance(forward_iterations, bool) or not isinstance(forward_iterations, int) \
            or forward_iterations < 1:
        raise BilevelInputError(f"fixed_point_layer: forward_iterations must be an int >= 1, "
                                f"got {forward_iterations!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool)
                                and math.isfinite(tol) and tol >= 0):
        raise BilevelInputError(f"fixed_point_layer: tol must be a finite number >= 0, "
                                f"got {tol!r}")

    def optimality(x: PyTree, *args: Any) -> PyTree:
        return _tree_sub(x, phi(x, *args))

    box: list[RootLayer] = []

    def iterate(init: PyTree, *args: Any) -> PyTree:
        leaves = tree_flatten(init)[0]
        floor = _floor(leaves[0].dtype) if leaves and isinstance(leaves[0], torch.Tensor) \
            else 0.0
        eps = max(1e-10, floor) if tol is None else tol
        x, k, change = init, 0, math.inf
        while k < forward_iterations:
            k += 1
            new = phi(x, *args)
            change = _tree_norm(_tree_sub(x, new)) / (1 + _tree_norm(new))
            x = new
            if change <= eps:
                break
        info = FixedPointInfo(k, change, change <= eps)
        box[0].last_forward = info
        if not info.converged:
            warn(f"fixed_point_layer: the forward iteration stopped at relative change "
                 f"{change:.2e} after {k} iterations (tol {eps:.1e}); Φ may not contract: "
                 "raise forward_iterations or check Φ", ConvergenceWarning,
                 kind=INNER_NOT_CONVERGED)
        return x

    layer = custom_root(optimality, solver, symmetric=False, mode=mode,
                        on_solve=on_solve)(iterate)
    box.append(layer)
    return layer


def kkt_optimality(objective: Callable[..., torch.Tensor],
                   equality: Callable[..., torch.Tensor] | None = None,
                   inequality: Callable[..., torch.Tensor] | None = None,
                   ) -> Callable[..., PyTree]:
    """The KKT conditions of min_x f(x, *args) s.t. h(x, *args) = 0, g(x, *args) ≤ 0, as
    an optimality function for :func:`custom_root`: with the solution the triple
    ``(x, μ, ν)`` (μ ``None`` without equalities, ν ``None`` without inequalities),

        T((x, μ, ν), *args) = (∇_x f + ∂_x hᵀ μ + ∂_x gᵀ ν,  h(x),  ν ⊙ g(x)),

    zero at a KKT point. Its Jacobian is not symmetric (use GMRES, the default, or
    Direct) and is invertible under LICQ and strict complementarity (every active
    inequality with ν_i > 0); inactive inequalities (g_i < 0, ν_i = 0) need no special
    care. The solver must return the multipliers too (e.g. from the projected-gradient
    solution, ν_i = the size of the gradient pushing against bound i).

    Args:
        objective: f(x, *args) -> 0-d tensor, x a tensor or pytree.
        equality: h(x, *args) -> 1-d tensor of the equality constraints, or ``None``.
        inequality: g(x, *args) -> 1-d tensor of the inequality constraints (≤ 0), or
            ``None``.

    Returns:
        T(sol, *args) -> a tuple ``(∇_x L, h, ν ⊙ g)`` matching ``sol = (x, μ, ν)``.

    Raises:
        BilevelInputError: a function not callable (at construction); at call, ``sol``
            not a triple (x, μ, ν) whose μ and ν are ``None`` exactly when the
            constraints are absent.

    References:
        Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022
        (JAXopt's ``make_kkt_optimality_fun``).
    """
    for name, fn, optional in (("objective", objective, False), ("equality", equality, True),
                               ("inequality", inequality, True)):
        if not (callable(fn) or (optional and fn is None)):
            raise BilevelInputError(f"kkt_optimality: {name} must be callable"
                                    f"{' or None' if optional else ''}, got {fn!r}")

    def lagrangian(x: PyTree, mu: torch.Tensor | None, nu: torch.Tensor | None,
                   *args: Any) -> torch.Tensor:
        out = objective(x, *args)
        if mu is not None:
            out = out + (mu * equality(x, *args)).sum()
        if nu is not None:
            out = out + (nu * inequality(x, *args)).sum()
        return out

    def T(sol: PyTree, *args: Any) -> PyTree:
        if not (isinstance(sol, (tuple, list)) and len(sol) == 3
                and (sol[1] is None) == (equality is None)
                and (sol[2] is None) == (inequality is None)):
            raise BilevelInputError(
                "kkt_optimality: the solution must be a triple (x, μ, ν), μ None exactly "
                "when there are no equality constraints and ν None exactly when there are "
                f"no inequality constraints; got {type(sol).__name__}")
        x, mu, nu = sol
        grad_x = torch.func.grad(lagrangian)(x, mu, nu, *args)
        return (grad_x, None if mu is None else equality(x, *args),
                None if nu is None else nu * inequality(x, *args))

    return T


@dataclass(frozen=True)
class UnrolledLayer:
    """K iterations x ← step(x, *args) differentiated by autograd (see
    :func:`unrolled_layer`). Call it as ``layer(init, *args) -> x_K``."""

    step: Callable[..., PyTree]
    iterations: int
    recompute: bool = False
    segment: int | None = None

    def __call__(self, init: PyTree, *args: Any) -> PyTree:
        """x_K from x_0 = ``init``, differentiable in ``init`` and ``args``."""
        x = init
        if not self.recompute:
            for _ in range(self.iterations):
                x = self.step(x, *args)
            return x
        seg = self.segment or sqrt_segment(self.iterations)
        leaves, spec = tree_flatten(x)
        arg_leaves, arg_spec = tree_flatten(tuple(args))
        done = 0
        while done < self.iterations:
            k = min(seg, self.iterations - done)
            segment = _SegmentSpec(self.step, k, spec, arg_spec, len(leaves))
            leaves = list(_Segment.apply(segment, *leaves, *arg_leaves))
            done += k
        return tree_unflatten(leaves, spec)


def unrolled_layer(step: Callable[..., PyTree], iterations: int, *, recompute: bool = False,
                   segment: int | None = None) -> UnrolledLayer:
    """The layer with unrolled backward: ``layer(init, *args)`` runs K = ``iterations``
    steps x ← step(x, *args) with autograd recording them, so the gradient is exactly that
    of the K-step map (memory O(K); O(K/k + k) with ``recompute``, each segment of k
    steps recomputed in the backward pass from its stored start, same result). Compare
    it with :func:`custom_root` on the same problem: they agree once the iterates (and
    their Jacobian) have converged.

    ``step`` must be a differentiable torch function (no ``.item()`` or data-dependent
    branches) to be used under ``torch.func.vmap``; with ``recompute`` it runs once per
    problem of a vmapped batch. With ``recompute`` the layer is first-order only.

    Args:
        step: one solver iteration, step(x, *args) -> a tree like x.
        iterations: K, an int ≥ 0.
        recompute: store only every ``segment``-th iterate and recompute in backward.
        segment: steps per stored iterate with ``recompute`` (default ⌈√K⌉).

    Returns:
        An :class:`UnrolledLayer`.

    Raises:
        BilevelInputError: ``step`` not callable, ``iterations`` not an int ≥ 0,
            ``segment`` not an int ≥ 1.
    """
    if not callable(step):
        raise BilevelInputError(f"unrolled_layer: step must be a callable step(x, *args), "
                                f"got {type(step).__name__} {step!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise BilevelInputError(f"unrolled_layer: iterations must be an int >= 0, "
                                f"got {iterations!r}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int)
                                or segment < 1):
        raise BilevelInputError(f"unrolled_layer: segment must be an int >= 1 or None, "
                                f"got {segment!r}")
    return UnrolledLayer(step, iterations, recompute, segment)


# --- the autograd functions --------------------------------------------------------------


def _linear_solver(spec: Any, symmetric: bool, who: str) -> LinearSolver:
    """The backward solver from ``spec`` (default CG or GMRES), or a BilevelInputError."""
    if spec is None:
        return ConjugateGradient(tol=1e-10, maxiter=1000) if symmetric else \
            GMRES(tol=1e-10, maxiter=1000)
    expected = (f"{who}: solver must be a linear solver of hypergrad.linear_solve "
                "(ConjugateGradient, GMRES, FixedPoint, Neumann, Direct), its name or a table "
                "naming it")
    try:
        solver = make_solver(spec)
    except TypeError as exc:
        raise BilevelInputError(f"{expected}, got {type(spec).__name__} {spec!r}") from exc
    except ValueError as exc:
        raise BilevelInputError(f"{expected}: {exc}") from exc
    if not isinstance(solver, LinearSolver) or not isinstance(
            getattr(solver, "symmetric", None), bool):
        raise BilevelInputError(f"{expected}, got {type(spec).__name__} {spec!r}")
    return solver


@dataclass
class _Plan:
    """What one call of a layer passes through ``_Root.apply`` besides its tensors."""

    layer: RootLayer
    init_spec: Any
    arg_spec: Any
    n_init: int
    #: the structure of x* and the positions of its tensor leaves (the others are None)
    out_spec: Any = None
    out_pos: list[int] = field(default_factory=list)

    def args(self, arg_leaves: Sequence[Any]) -> tuple[Any, ...]:
        return tree_unflatten(list(arg_leaves), self.arg_spec)

    def rebuild(self, tensors: Sequence[Any]) -> PyTree:
        """x* from its tensor leaves (``None`` where x* holds ``None``)."""
        leaves: list[Any] = [None] * self.out_spec.num_leaves
        for i, t in zip(self.out_pos, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.out_spec)

    def strip(self, tree: PyTree, what: str) -> list[Any]:
        """The tensor leaves of a tree shaped like x* (T's value), in order."""
        leaves, spec = tree_flatten(tree)
        if spec != self.out_spec:
            raise BilevelInputError(f"custom_root: {what} has structure {spec}, the solution "
                                    f"{self.out_spec}: they must match")
        return [leaves[i] for i in self.out_pos]

    def differentiable(self, arg_leaves: Sequence[Any]) -> list[int]:
        """Positions of the floating tensors among the argument leaves."""
        return [i for i, a in enumerate(arg_leaves)
                if isinstance(a, torch.Tensor) and a.is_floating_point()]


class _Root(torch.autograd.Function):
    """x* = solve(init, *args) forward; the implicit function theorem backward."""

    @staticmethod
    def forward(plan: _Plan, *leaves: Any) -> tuple[torch.Tensor, ...]:
        init = tree_unflatten(list(leaves[:plan.n_init]), plan.init_spec)
        args = plan.args(leaves[plan.n_init:])
        with torch.no_grad():
            out = plan.layer.solve(init, *args)
        out_leaves, spec = tree_flatten(out)
        pos = [i for i, o in enumerate(out_leaves) if o is not None]
        if not pos or not all(isinstance(out_leaves[i], torch.Tensor)
                              and out_leaves[i].is_floating_point() for i in pos):
            raise BilevelInputError("custom_root: the solver must return a floating tensor "
                                    f"or a pytree of floating tensors, got {out!r}")
        if plan.n_init and spec != plan.init_spec:
            raise BilevelInputError(f"custom_root: the solver's output has structure {spec}, "
                                    f"its init {plan.init_spec}: they must match")
        for i in pos if plan.n_init else ():
            x0, x = leaves[i], out_leaves[i]
            if isinstance(x0, torch.Tensor) and (x.shape != x0.shape or x.dtype != x0.dtype):
                raise BilevelInputError(
                    f"custom_root: the solver's output (leaf {i}) is {x.dtype} of shape "
                    f"{tuple(x.shape)}, its init {x0.dtype} of shape {tuple(x0.shape)}: "
                    "x* must have the shape and dtype of init")
        plan.out_spec, plan.out_pos = spec, pos
        return tuple(out_leaves[i].detach().clone() for i in pos)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
                      ) -> None:
        plan = inputs[0]
        arg_leaves = inputs[1 + plan.n_init:]
        ctx.plan = plan
        ctx.diff = plan.differentiable(arg_leaves)
        ctx.fixed = [None if i in ctx.diff else a for i, a in enumerate(arg_leaves)]
        ctx.n_args = len(arg_leaves)
        ctx.save_for_backward(*output, *[arg_leaves[i] for i in ctx.diff])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        plan, n_out = ctx.plan, len(grads)
        saved = ctx.saved_tensors
        x, theta = saved[:n_out], saved[n_out:]
        spec = _AdjointSpec(plan, ctx.fixed, ctx.diff)
        arg_grads = _Adjoint.apply(spec, n_out, *x, *grads, *theta) if theta else ()
        out: list[Any] = [None] * ctx.n_args
        for i, g in zip(ctx.diff, arg_grads, strict=True):
            out[i] = g
        return (None, *([None] * plan.n_init), *out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(
            "custom_root: forward mode (torch.func.jvp, jacfwd, torch.autograd.forward_ad) "
            "is not supported: the implicit layer has a reverse-mode rule only; use "
            "backward(), torch.func.grad, vjp or jacrev")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], plan: _Plan, *leaves: Any
             ) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        results = [_Root.apply(plan, *_select(leaves, in_dims[1:], b))
                   for b in range(info.batch_size)]
        outs = tuple(torch.stack(cols) for cols in zip(*results, strict=True))
        return outs, (0,) * len(outs)


@dataclass
class _AdjointSpec:
    """The backward problem: the layer, the fixed (non-differentiable) argument leaves and
    the positions of the differentiable ones."""

    plan: _Plan
    fixed: list[Any]
    diff: list[int]
    #: the cotangents carry a leading dimension of k right-hand sides (one solve for all)
    batched: bool = False

    def args(self, theta: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        leaves = list(self.fixed)
        for i, t in zip(self.diff, theta, strict=True):
            leaves[i] = t
        return self.plan.args(leaves)


class _Adjoint(torch.autograd.Function):
    """−(∂_θ T)ᵀ v with (∂_x T)ᵀ v = c, at one problem. Under vmap: one batched solve
    when only the cotangents are batched (jacrev), else a loop over the problems."""

    @staticmethod
    def forward(spec: _AdjointSpec, n_out: int, *leaves: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        # x and T's value as the list of x*'s tensor leaves (pytree None leaves dropped)
        layer, plan = spec.plan.layer, spec.plan
        x, cot = list(leaves[:n_out]), list(leaves[n_out:2 * n_out])
        theta = list(leaves[2 * n_out:])
        T = layer.optimality
        if isinstance(T, Stationarity):
            f, batch = T.objective, T.batch

            def objective(x_: list, th: list, b: Any) -> torch.Tensor:
                return f(plan.rebuild(x_), spec.args(th)[0], b)

            optimality: Any = Stationarity(objective, batch)
        else:
            def optimality(x_: list, th: list) -> PyTree:
                return plan.strip(T(plan.rebuild(x_), *spec.args(th)), "the optimality's value")
        solver = layer.solver_for(leaves[0].dtype)
        result = root_vjp(optimality, x, theta, cot, solver, symmetric=layer.symmetric,
                          mode=layer.mode, batched=spec.batched)
        layer._record(result.solve)
        return tuple(g.detach() for g in result.grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("custom_root: the implicit backward is first-order only; it "
                           "cannot be differentiated again (use unrolled_layer for "
                           "higher-order derivatives)")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], spec: _AdjointSpec, n_out: int,
             *leaves: Any) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        dims = in_dims[2:]
        x_dims, cot_dims = dims[:n_out], dims[n_out:2 * n_out]
        if not spec.batched and all(d is None for d in x_dims + dims[2 * n_out:]):
            # one problem, k cotangents (jacrev, or vmap over the outer loss): one
            # batched solve of k right-hand sides
            k = info.batch_size
            cots = [c.expand(k, *c.shape) if d is None else c.movedim(d, 0)
                    for c, d in zip(leaves[n_out:2 * n_out], cot_dims, strict=True)]
            batched = _AdjointSpec(spec.plan, spec.fixed, spec.diff, batched=True)
            outs = _Adjoint.apply(batched, n_out, *leaves[:n_out], *cots,
                                  *leaves[2 * n_out:])
            return tuple(outs), (0,) * len(outs)
        results = [_Adjoint.apply(spec, n_out, *_select(leaves, dims, b))
                   for b in range(info.batch_size)]
        outs = tuple(torch.stack(cols) for cols in zip(*results, strict=True))
        return outs, (0,) * len(outs)


@dataclass(frozen=True)
class _SegmentSpec:
    """k steps of an unrolled layer, recomputed in the backward pass."""

    step: Callable[..., PyTree]
    k: int
    spec: Any
    arg_spec: Any
    n: int

    def run(self, leaves: Sequence[Any]) -> list[Any]:
        z = tree_unflatten(list(leaves[:self.n]), self.spec)
        args = tree_unflatten(list(leaves[self.n:]), self.arg_spec)
        for _ in range(self.k):
            z = self.step(z, *args)
        out, out_spec = tree_flatten(z)
        if out_spec != self.spec:
            raise BilevelInputError(f"unrolled_layer: step changed the structure of x from "
                                    f"{self.spec} to {out_spec}")
        return out


class _Segment(torch.autograd.Function):
    """A segment of k steps: run without a graph forward, recomputed with one backward
    (only its start is stored)."""

    @staticmethod
    def forward(seg: _SegmentSpec, *leaves: Any) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(o.detach().clone() for o in seg.run(leaves))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        seg, leaves = inputs[0], inputs[1:]
        ctx.seg = seg
        ctx.diff = [i for i, a in enumerate(leaves)
                    if isinstance(a, torch.Tensor) and a.is_floating_point()]
        ctx.fixed = [None if i in ctx.diff else a for i, a in enumerate(leaves)]
        ctx.save_for_backward(*[leaves[i] for i in ctx.diff])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors

        def run(diff: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            leaves = list(ctx.fixed)
            for i, t in zip(ctx.diff, diff, strict=True):
                leaves[i] = t
            return tuple(ctx.seg.run(leaves))

        with torch.enable_grad():
            _, pull = torch.func.vjp(run, tuple(saved))
            (got,) = pull(tuple(grads))
        result: list[Any] = [None] * len(ctx.fixed)
        for i, g in zip(ctx.diff, got, strict=True):
            result[i] = g
        return (None, *result)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], seg: _SegmentSpec, *leaves: Any
             ) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        results = [_Segment.apply(seg, *_select(leaves, in_dims[1:], b))
                   for b in range(info.batch_size)]
        outs = tuple(torch.stack(cols) for cols in zip(*results, strict=True))
        return outs, (0,) * len(outs)


def _select(leaves: Sequence[Any], dims: Sequence[int | None], b: int) -> list[Any]:
    """The b-th problem of a vmapped call: each batched leaf indexed along its dim."""
    return [a if d is None else a.select(d, b) for a, d in zip(leaves, dims, strict=True)]


def _tree_sub(x: PyTree, y: PyTree) -> PyTree:
    xs, spec = tree_flatten(x)
    ys, spec_y = tree_flatten(y)
    if spec != spec_y:
        raise BilevelInputError(f"fixed_point_layer: Φ(x) has structure {spec_y}, x has "
                                f"{spec}: they must match")
    for a, b in zip(xs, ys, strict=True):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise BilevelInputError(f"fixed_point_layer: Φ(x) has shape {tuple(b.shape)}, x "
                                    f"has {tuple(a.shape)}: they must match")
    return tree_unflatten([a - b for a, b in zip(xs, ys, strict=True)], spec)


def _floor(dtype: torch.dtype) -> float:
    """100 ε of a floating dtype coarser than float64 (0 for float64 and finer)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return 100 * eps if eps > torch.finfo(torch.float64).eps else 0.0


def _tree_norm(x: PyTree) -> float:
    return math.sqrt(sum(float((a * a).sum()) for a in tree_flatten(x)[0]))


__all__ = ["FixedPointInfo", "RootLayer", "UnrolledLayer", "custom_root",
           "fixed_point_layer", "kkt_optimality", "unrolled_layer"]
