"""Implicit differentiation of a root: an optimality function, a linear solve, a VJP.

A solution x*(θ) is defined by optimality conditions T(x*, θ) = 0, T having the tree
structure of x. By the implicit function theorem ∂x*/∂θ = −(∂_x T)⁻¹ ∂_θ T, so for an
outer objective F(x*(θ), θ) with cotangent c = ∇_x F at x*,

    ∇_θ F(x*(θ), θ) = ∇_θ F − (∂_θ T)ᵀ v,    where  (∂_x T)ᵀ v = c.

:func:`root_vjp` solves for v matrix-free and returns the implicit part −(∂_θ T)ᵀ v with
the solve (v in ``solve.x``, and its diagnostics). Sign convention: v solves the system
with +c (JAXopt's ``root_vjp`` solves with −c and returns +(∂_θ T)ᵀ u, u = −v), so that v
is the familiar H⁻¹ ∇_w F and a warm start carried between calls keeps its meaning.

The three optimality functions of this package:

- stationarity of an inner loss f, T = ∇_x f (:class:`Stationarity`): ∂_x T = ∇²_xx f is
  symmetric, and the implicit part is −∇²_θx f · v with H v = ∇_x F;
- a fixed point x = Φ(x, θ), T = x − Φ: (I − ∂_xΦ)ᵀ v = c, implicit part +∂_θΦᵀ v;
- KKT conditions of min_y {f : g_A = 0}: T = ∇_(y, μ_A) L for the Lagrangian
  L = f + μ_Aᵀ g_A, whose Jacobian is the symmetric indefinite KKT matrix.

Both products come from one linearization of T at (x*, θ) (:func:`linearize`): with
``mode="linearized"`` T is evaluated once, its graph recorded in (x, θ) together, and that
one graph serves every product of the solve, pulled back to x, and then the final VJP,
pulled back to θ ("linearize once, apply many"): for T = ∇_x f, the Hessian products and
the mixed product ∇²_θx f · v from one evaluation of ∇_x f. The other modes re-form the
products: ``"reverse"`` differentiates T anew for every product (no graph kept between
products); for a :class:`Stationarity`, ``"jvp"`` takes the products by
forward-over-reverse and the θ-part by reverse-over-forward (no double backward at all,
for operators whose double backward is wrong), and ``"auto"`` chooses between
``"linearized"`` and ``"jvp"`` once per problem (:func:`hypergrad.hvp.choose_between`,
remembered by :func:`hypergrad.hvp.remembered_mode`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.func import grad, jvp, vjp, vmap

from .hvp import HVPMode, Objective, choose_between, hvp_batched, mixed_vjp, remembered_mode
from .linear_solve import LinearSolver, SolveResult
from .pytree import PyTree, tree_flatten, tree_leaves, tree_map, tree_unflatten

#: T(x, θ) -> a tree shaped like x, zero at the solution
Optimality = Callable[[PyTree, PyTree], PyTree]


@dataclass(frozen=True)
class Stationarity:
    """T(x, θ) = ∇_x f(x, θ, batch): the optimality condition of a minimum (or saddle
    point) of f. Knowing f, and not only T, allows the ``"jvp"`` and ``"auto"`` modes.

    Args:
        objective: f(x, θ, batch) -> 0-d tensor.
        batch: the data f sees.
    """

    objective: Objective
    batch: Any = None

    def __call__(self, x: PyTree, theta: PyTree) -> PyTree:
        """∇_x f(x, θ, batch), a pytree matching ``x``."""
        return grad(self.objective)(x, theta, self.batch)


@dataclass(frozen=True)
class Linearized:
    """T linearized at (x*, θ): the two products of the implicit function theorem.

    ``transposed(u, batched)`` is (∂_x T)ᵀ u (a tree like x), ``args_vjp(u, batched)``
    is (∂_θ T)ᵀ u (a tree like θ); with ``batched`` every leaf of u carries a leading
    dimension of k vectors. ``mode`` says how the products are formed.
    """

    transposed: Callable[[PyTree, bool], PyTree]
    args_vjp: Callable[[PyTree, bool], PyTree]
    mode: str
    #: T(x*, θ) (detached, a tree like x) where the mode evaluated it anyway
    #: (``"linearized"``), else ``None``; for a :class:`Stationarity` it is ∇_x f(x*, θ),
    #: whose norm says how well the inner problem is solved
    value: PyTree | None = None


class RootVJP(NamedTuple):
    """What :func:`root_vjp` returns: ``(grad, solve, mode)``."""

    #: the implicit part −(∂_θ T)ᵀ v of the hypergradient (a tree like θ)
    grad: PyTree
    #: the solve of (∂_x T)ᵀ v = c: v is ``solve.x``, with its diagnostics
    solve: SolveResult
    #: the mode the products were formed in (``"auto"`` resolved)
    mode: str


def root_vjp(optimality: Optimality, solution: PyTree, args: PyTree, cotangent: PyTree,
             solver: LinearSolver, *, symmetric: bool = False, mode: HVPMode = "linearized",
             x0: PyTree | None = None, batched: bool = False) -> RootVJP:
    """The implicit part of the hypergradient at a root of ``optimality``.

    Solves (∂_x T)ᵀ v = ``cotangent`` with ``solver`` (from ``x0`` if given) and returns
    −(∂_θ T)ᵀ v, all at x = ``solution``, θ = ``args``; add it to ∇_θ F. ``symmetric``
    says that ∂_x T is symmetric (always so for a :class:`Stationarity`), which a solver
    for symmetric systems (CG, Neumann) needs. With ``batched`` every leaf of
    ``cotangent`` (and of ``x0``) carries a leading dimension of k right-hand sides, solved
    together, and the result carries it too.

    Args:
        optimality: T(x, θ), a tree shaped like x, zero at the solution (e.g. a
            :class:`Stationarity`).
        solution: x*, a pytree.
        args: θ, a pytree.
        cotangent: c = ∇_x F at x*, a pytree matching ``solution``.
        solver: a linear solver (:mod:`hypergrad.linear_solve`).
        symmetric: ∂_x T is symmetric.
        mode: how the products are formed (see :func:`linearize`).
        x0: warm start of v, like ``cotangent``.
        batched: k right-hand sides at once.

    Returns:
        :class:`RootVJP` ``(grad, solve, mode)``: −(∂_θ T)ᵀ v (pytree matching ``args``),
        the :class:`~hypergrad.linear_solve.SolveResult` (v in ``solve.x``), and the mode
        used.

    Raises:
        ValueError: a symmetric-only solver for a system not declared symmetric, or a
            bad ``mode``.
        LinearSolveError, NonFiniteError: raised by the solver.
        SecondOrderError: ``mode="jvp"`` and an operator lacks a forward-mode rule.

    References:
        The implicit function theorem as in Blondel et al., "Efficient and modular
        implicit differentiation", NeurIPS 2022 (JAXopt's ``root_vjp``, with the sign of
        v flipped as described in the module docstring).
    """
    if solver.symmetric and not (symmetric or isinstance(optimality, Stationarity)):
        raise ValueError(f"root_vjp: {type(solver).__name__} needs a symmetric system; "
                         "pass symmetric=True if ∂_x T is symmetric, else use GMRES, "
                         "FixedPoint or Direct")
    return solve_linearized(linearize(optimality, solution, args, mode), cotangent, solver,
                            x0=x0, batched=batched)


def solve_linearized(lin: Linearized, cotangent: PyTree, solver: LinearSolver, *,
                     x0: PyTree | None = None, batched: bool = False) -> RootVJP:
    """:func:`root_vjp` from a linearization already made by :func:`linearize` (e.g. to
    read ``lin.value`` first): solves (∂_x T)ᵀ v = ``cotangent`` and returns
    ``(−(∂_θ T)ᵀ v, solve, mode)``. The arguments are those of :func:`root_vjp`; the
    solver must suit the system (no symmetry check here).

    Raises:
        LinearSolveError, NonFiniteError: raised by the solver.
    """
    result = solver(lambda u: lin.transposed(u, batched), cotangent, x0=x0, batched=batched)
    return RootVJP(tree_map(torch.neg, lin.args_vjp(result.x, batched)), result, lin.mode)


def linearize(optimality: Optimality, solution: PyTree, args: PyTree,
              mode: HVPMode = "linearized") -> Linearized:
    """The products (∂_x T)ᵀ u and (∂_θ T)ᵀ u at (``solution``, ``args``), formed in
    ``mode``: ``"linearized"`` (T evaluated once with its graph in (x, θ), pulled back to
    x for every product and to θ for the VJP), ``"reverse"`` (a VJP of T for every
    product); for a :class:`Stationarity` also ``"jvp"`` and ``"auto"`` (see the module
    docstring).

    Raises:
        ValueError: an unknown ``mode``, or ``"jvp"``/``"auto"`` without a
            :class:`Stationarity`.
    """
    x, theta = solution, args
    if mode == "linearized":
        xs, ts = _tracked(x), _tracked(theta)
        with torch.enable_grad():
            out = optimality(xs, ts)
        return Linearized(_lift(_pullback(out, xs)), _lift(_pullback(out, ts)), "linearized",
                          tree_map(torch.Tensor.detach, out))
    if mode == "reverse":
        def transposed(u: PyTree) -> PyTree:
            return vjp(lambda x_: optimality(x_, theta), x)[1](u)[0]

        def args_vjp(u: PyTree) -> PyTree:
            return vjp(lambda t: optimality(x, t), theta)[1](u)[0]

        return Linearized(_lift(transposed), _lift(args_vjp), "reverse")
    if mode not in ("jvp", "auto"):
        raise ValueError(f"linearize: mode must be 'linearized', 'reverse', 'jvp' or "
                         f"'auto', got {mode!r}")
    if not isinstance(optimality, Stationarity):
        raise ValueError(f"linearize: mode {mode!r} needs the objective whose gradient T "
                         "is: pass a Stationarity(f, batch), or use 'linearized' or 'reverse'")
    forward = _forward(optimality, x, theta)
    if mode == "jvp":
        return forward
    built: list[Linearized] = []

    def linearized() -> Callable[[PyTree], PyTree]:
        built.append(linearize(optimality, x, theta, "linearized"))
        return lambda u: built[0].transposed(u, False)

    def probe(u: PyTree) -> PyTree:  # raw forward-over-reverse: its failure is no error here
        return jvp(lambda x_: optimality(x_, theta), (x,), (u,))[1]

    # the choice is remembered per problem (objective and layout): later calls skip the probe
    chosen = remembered_mode(optimality.objective, x, theta, optimality.batch,
                             lambda: choose_between(linearized, probe, x), kind="root")
    if chosen == "jvp":
        return forward
    return built[0] if built else linearize(optimality, x, theta, "linearized")


def _forward(stationarity: Stationarity, x: PyTree, theta: PyTree) -> Linearized:
    """Products by forward-over-reverse (H symmetric: Hᵀu = H u) and the θ-part by
    reverse-over-forward, ∂_θ ⟨∇_x f, u⟩ with ⟨∇_x f, u⟩ a JVP of f: no double backward.
    A missing forward-mode rule is reported by :mod:`hypergrad.hvp` with the operator."""
    f, batch = stationarity.objective, stationarity.batch

    def transposed(u: PyTree, batched: bool) -> PyTree:
        return hvp_batched(f, x, theta, batch, u, mode="jvp", batched=batched)

    def args_vjp(u: PyTree, batched: bool) -> PyTree:
        return _lift(lambda u_: mixed_vjp(f, x, theta, batch, u_, mode="jvp"))(u, batched)

    return Linearized(transposed, args_vjp, "jvp")


def _tracked(tree: PyTree) -> PyTree:
    """Detached copies of the leaves, requiring grad: the point T is recorded at."""
    return tree_map(lambda a: a.detach().requires_grad_(), tree)


def _pullback(out: PyTree, inputs: PyTree) -> Callable[[PyTree], PyTree]:
    """u ↦ uᵀ ∂out/∂inputs through the recorded graph of ``out`` (kept for the next
    product). Only the part of the graph between ``out`` and ``inputs`` runs: the products
    in x skip the branches that lead only to θ, and the VJP in θ those that lead only to x.
    (The pullback of ``torch.func.vjp`` in (x, θ) runs both every time; on an MLP with a
    weight-decay λ its final VJP cost a whole Hessian product where the θ-part alone costs
    almost nothing.)"""
    outs, (ins, spec) = tree_leaves(out), tree_flatten(inputs)
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    live_outs = [outs[i] for i in live]

    def pull(u: PyTree) -> PyTree:
        us = tree_leaves(u)
        grads = torch.autograd.grad(live_outs, ins, [us[i] for i in live],
                                    retain_graph=True, allow_unused=True) if live else \
            [None] * len(ins)
        return tree_unflatten([torch.zeros_like(a) if g is None else g
                               for g, a in zip(grads, ins, strict=True)], spec)

    return pull


def _lift(fn: Callable[[PyTree], PyTree]) -> Callable[[PyTree, bool], PyTree]:
    """``fn`` on one vector, or by ``vmap`` on a batch of vectors."""
    return lambda u, batched: vmap(fn)(u) if batched else fn(u)


def outer_grads(objective: Objective, params: PyTree, hparams: PyTree,
                batch: Any) -> tuple[torch.Tensor, tuple[PyTree, PyTree]]:
    """F(params, hparams, batch) (detached) and (∇_params F, ∇_hparams F), from one
    reverse pass: the cotangent and the direct part of an implicit hypergradient.

    Returns:
        ``(loss, (grad_params, grad_hparams))``: a 0-d tensor and pytrees matching
        ``params`` and ``hparams``.
    """
    def F(p: PyTree, h: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
        out = objective(p, h, batch)
        return out, out.detach()

    grads, loss = grad(F, argnums=(0, 1), has_aux=True)(params, hparams)
    return loss, grads


__all__ = ["Linearized", "Optimality", "RootVJP", "Stationarity", "linearize",
           "outer_grads", "root_vjp", "solve_linearized"]
