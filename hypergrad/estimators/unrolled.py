"""Unrolled (iterative) differentiation through T inner steps.

With w_{t+1}, s_{t+1} = Φ_t(w_t, s_t; λ) (s the optimizer state), the estimate is the
exact gradient of λ ↦ F(w_T(λ), λ) for the T-step map.

- reverse mode back-propagates through every step (memory O(T));
- ``recompute`` stores only the state at every ``segment``-th step and recomputes each
  segment's graph during the backward pass (memory O(T/k + k), O(√T) at k ≈ √T),
  giving the same result;
- forward mode carries the JVPs dw_t/dλ·e_i along the iterates for every hyperparameter
  coordinate e_i at once (vmap): memory O(1) in T, cost proportional to dim λ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.func import jvp, vmap

from ..optim import InnerOptimizer, State, check_settings
from ..optim.base import split
from ..problem import Problem, run_scope
from ..pytree import (
    PyTree,
    tree_detach,
    tree_flatten,
    tree_leaves,
    tree_norm,
    tree_ravel,
    tree_requires_grad,
    tree_unflatten,
    tree_unravel,
)
from ..second_order import Use, uses
from .base import (
    Diagnostics,
    Estimator,
    EstimatorState,
    Hypergradient,
    SelfCheck,
    check_growth,
    check_self_check,
    inner_fit,
    inner_loss_value,
)


def _float_leaves(tree: PyTree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _grads_or_zeros(grads: tuple, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


def run_autograd(problem: Problem, params: PyTree, state: State, hparams: PyTree, start: int,
                 stop: int, graph: bool = True, losses: list[torch.Tensor] | None = None,
                 ) -> tuple[PyTree, State]:
    """Inner steps ``start..stop-1`` as :meth:`Problem.run`, by plain autograd.

    Each step takes ∇_w f by ``torch.autograd.grad`` (``create_graph=graph``) on the leaves
    of ``params`` instead of ``torch.func.grad``: the same derivative, which reverse-mode
    unrolling back-propagates by double backward (the self-check's ``"reverse"`` route),
    without a functorch transform per step. The optimizer's callable settings (e.g. a
    learned ``lr = lambda h: h["log_lr"].exp()``) are evaluated once for all the steps
    (:func:`bind_settings`), and the terms the inner loss wraps in
    :func:`~hypergrad.problem.once_per_run` once for the whole run (one
    :func:`~hypergrad.problem.run_scope`). Without ``graph`` (or with grad mode off)
    nothing is kept for backward and the results are detached. A problem whose class
    overrides :meth:`Problem.step` or :meth:`Problem.run` (e.g. one that also updates
    BatchNorm statistics), and parameters with a leaf that is not a floating tensor, go
    through ``problem.run``.

    ``losses``, where given, receives the inner loss of each step run, f(w_t, λ, batch_t)
    as a detached 0-d tensor in step order (nothing on the ``problem.run`` path), e.g.
    for the divergence check, without another evaluation.

    Returns:
        ``(params, state)`` after step ``stop - 1`` (same structures as the inputs).
    """
    graph = graph and torch.is_grad_enabled()
    leaves, rebuild = split(params)
    if type(problem).step is not Problem.step or type(problem).run is not Problem.run or \
            not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        return problem.run(params, state, hparams, start, stop, graph=graph)
    if not graph:
        hparams, state = tree_detach(hparams), tree_detach(state)
        leaves = [x.detach() for x in leaves]
        params = rebuild(leaves)
    with torch.set_grad_enabled(graph):
        optimizer = bind_settings(problem.optimizer, hparams)
    # grad mode is on for the losses' gradients; without ``graph``, off for the updates
    update_mode = contextlib.nullcontext() if graph else torch.no_grad()
    with run_scope(), torch.enable_grad():
        for t in range(start, stop):
            inputs = [x if x.requires_grad else x.detach().requires_grad_() for x in leaves]
            loss = problem.inner_loss(rebuild(inputs), hparams, problem.batch_at(t))
            grads = torch.autograd.grad(loss, inputs, create_graph=graph, allow_unused=True,
                                        materialize_grads=True) \
                if loss.requires_grad else [torch.zeros_like(x) for x in inputs]
            if losses is not None:
                losses.append(loss.detach())
            with update_mode:
                params, state = optimizer.step(params, rebuild(list(grads)), state, hparams)
            leaves = split(params)[0]
    return params, state


def bind_settings(optimizer: InnerOptimizer, hparams: PyTree) -> InnerOptimizer:
    """``optimizer`` with its callable settings (the fields its ``limits`` name, and the
    callables inside a tuple setting such as Adam's ``betas``) replaced by their values at
    ``hparams``, so that a run of steps evaluates each once; an optimizer that is not a
    dataclass with ``limits``, or has no callable setting, is returned as it is.

    The values keep the graph to ``hparams`` (in grad mode): bind once per graph that is
    back-propagated, never across two backward passes.
    """
    names = getattr(optimizer, "limits", None)
    if not names or not dataclasses.is_dataclass(optimizer):
        return optimizer
    changes = {}
    for name in names:
        value = getattr(optimizer, name)
        if callable(value):
            changes[name] = value(hparams)
        elif isinstance(value, tuple) and any(callable(v) for v in value):
            changes[name] = tuple(v(hparams) if callable(v) else v for v in value)
    return dataclasses.replace(optimizer, **changes) if changes else optimizer


def inner_fit_autograd(problem: Problem, params: PyTree, hparams: PyTree) -> tuple[float, float]:
    """(f, ‖∇_w f‖) at ``params`` on the full batch, as :func:`~.base.inner_fit`, by plain
    autograd: one gradient evaluation, one host sync, no graph kept."""
    leaves, spec = tree_flatten(params)
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        return inner_fit(problem, params, hparams)
    inputs = [x.detach().requires_grad_() for x in leaves]
    with torch.enable_grad():
        f = problem.inner_loss(tree_unflatten(inputs, spec), tree_detach(hparams),
                               problem.full_batch())
        g = torch.autograd.grad(f, inputs, allow_unused=True, materialize_grads=True) \
            if f.requires_grad else [torch.zeros_like(x) for x in inputs]
    with torch.no_grad():
        f, gnorm = torch.stack((f.detach(), tree_norm(list(g)).to(f.dtype))).tolist()
    return f, gnorm


def unroll_reverse(problem: Problem, hparams: PyTree, params: PyTree, opt_state: State,
                   start: int, stop: int, segment: int | None = None,
                   losses: list[torch.Tensor] | None = None,
                   ) -> tuple[PyTree, PyTree, torch.Tensor]:
    """Reverse-mode hypergradient through steps ``start..stop-1`` from (params, opt_state).

    With ``segment = k`` only every k-th state is stored and each segment is recomputed
    in the backward pass; ``None`` keeps the whole graph.

    Args:
        problem: the bilevel problem (its ``optimizer``, ``inner_loss``, ``outer_loss``).
        hparams: λ, a pytree of floating tensors.
        params: w at step ``start``, a pytree (detached on entry).
        opt_state: the inner optimizer's state at step ``start``.
        start, stop: the step indices run, ``start <= stop``.
        segment: steps per stored state (checkpointing), or ``None``.
        losses: where given, receives the inner loss of every step, once each, as
            :func:`run_autograd` (left empty on its ``problem.run`` path).

    Returns:
        ``(grad, w_stop, loss)``: ∇_λ F (pytree matching ``hparams``), the detached
        iterate after step ``stop - 1`` (pytree matching ``params``) and F at it (a 0-d
        detached tensor).
    """
    lam = tree_requires_grad(hparams)
    lam_leaves = tree_leaves(lam)
    seg = max(stop - start, 1) if segment is None else segment
    bounds = list(range(start, stop, seg)) + [stop] if stop > start else [start, start]
    stored = []
    z = (tree_detach(params), tree_detach(opt_state))
    for a, b in zip(bounds[:-2], bounds[1:-1], strict=True):
        stored.append((a, b, z))
        z = run_autograd(problem, *z, lam, a, b, graph=False, losses=losses)

    def segment_grads(a: int, b: int, z_start: tuple, first: bool, outputs_fn,
                      record: list | None = None) -> tuple[list, list, tuple]:
        z_in = z_start if first else tree_requires_grad(z_start)
        with torch.enable_grad():
            z_out = run_autograd(problem, *z_in, lam, a, b, graph=True, losses=record)
            outputs, cotangents = outputs_fn(z_out)
        inputs = ([] if first else _float_leaves(z_in)) + lam_leaves
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        grads = torch.autograd.grad(
            [outputs[i] for i in live], inputs,
            None if cotangents is None else [cotangents[i] for i in live],
            allow_unused=True) if live else [None] * len(inputs)
        grads = _grads_or_zeros(grads, inputs)
        n = len(inputs) - len(lam_leaves)
        return grads[:n], grads[n:], z_out

    loss_box = []

    def outer(z_out: tuple) -> tuple[list, list | None]:
        loss = problem.outer_loss(z_out[0], lam, problem.outer_batch)
        loss_box.append(loss.detach())
        return [loss], None

    a, b = bounds[-2], bounds[-1]
    # the last segment; the stored ones recorded their losses going forward
    adjoint, g_lam, z_final = segment_grads(a, b, z, not stored, outer, losses)
    for a, b, z_start in reversed(stored):
        adj = adjoint

        def pulled(z_out: tuple, adj: list = adj) -> tuple[list, list]:
            return _float_leaves(z_out), adj

        adjoint, g_seg, _ = segment_grads(a, b, z_start, a == start, pulled)
        g_lam = [x + y for x, y in zip(g_lam, g_seg, strict=True)]
    grad = tree_unflatten(g_lam, tree_flatten(hparams)[1])
    return grad, tree_detach(z_final[0]), loss_box[0]


def unroll_forward(problem: Problem, hparams: PyTree, params: PyTree, opt_state: State,
                   start: int, stop: int, chunk_size: int | None = None,
                   ) -> tuple[PyTree, PyTree, torch.Tensor]:
    """Forward-mode hypergradient: one JVP per hyperparameter coordinate, batched by vmap.

    Memory is independent of ``stop - start``; cost grows with the number of scalar
    hyperparameters (the identity basis of ravelled λ is pushed through all steps).
    Forward-mode differentiation of the iterates (RTRL-style) follows Franceschi et al.,
    "Forward and reverse gradient-based hyperparameter optimization", ICML 2017.

    Args:
        problem, hparams, params, opt_state, start, stop: as in :func:`unroll_reverse`.
        chunk_size: coordinates per vmap chunk (``None``: all at once); lower it to
            save memory.

    Returns:
        ``(grad, w_stop, loss)`` as in :func:`unroll_reverse`.
    """
    lam = tree_detach(hparams)
    params, opt_state = tree_detach(params), tree_detach(opt_state)

    def h(lam_: PyTree) -> tuple[torch.Tensor, PyTree]:
        p, _ = problem.run(params, opt_state, lam_, start, stop, graph=True)
        return problem.outer_loss(p, lam_, problem.outer_batch), p

    flat = tree_ravel(lam)
    basis = tree_unravel(torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device), lam)
    # one function, many directions: random ops (seeded Dropout) draw the same for each
    directional = vmap(lambda e: jvp(h, (lam,), (e,), has_aux=True), chunk_size=chunk_size,
                       randomness="same")
    loss, dloss, p = directional(basis)
    grad = tree_unravel(dloss, lam)
    return grad, tree_map_first(p), loss[0]


def tree_map_first(tree: PyTree) -> PyTree:
    """The first entry along the leading (vmap) axis of every leaf, detached."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([x[0].detach() for x in leaves], spec)


def sqrt_segment(steps: int) -> int:
    """⌈√steps⌉ (at least 1): the checkpoint spacing giving memory O(√T)."""
    return max(1, math.ceil(math.sqrt(steps)))


@dataclass(frozen=True)
class Unrolled(Estimator):
    """Differentiate through all ``problem.steps`` inner steps (iterative differentiation).

    The estimate is the exact gradient of λ ↦ F(w_T(λ), λ) for the T-step map of
    ``problem.optimizer``; it is biased only in that w_T ≠ w*. Reverse mode keeps
    memory O(T) (O(√T) with ``recompute``); forward mode O(1) in T at a cost
    proportional to the number of scalar hyperparameters.

    Args:
        mode: ``"reverse"`` (back-propagation) or ``"forward"`` (JVPs; best for few
            hyperparameters, memory independent of T).
        recompute: store only every ``segment``-th state and recompute in backward.
        segment: steps per stored state with ``recompute``; default ⌈√T⌉.
        chunk_size: forward mode: hyperparameter coordinates per vmap chunk.
        grad_norm: measure ‖∇_w f‖ at the returned inner solution for
            ``Diagnostics.inner_grad_norm`` (one more gradient evaluation); ``False``
            skips it and reports NaN there.
        self_check: ``"error"`` (default), ``"warn"`` or ``"off"``: the second-order
            self-check on the first call for an inner loss (:mod:`hypergrad.second_order`).

    Raises:
        ValueError: ``mode`` not ``"reverse"``/``"forward"``, ``segment < 1``, or
            ``recompute`` with forward mode (at construction).
        BilevelInputError: a bad ``self_check`` (at construction).
        OptimizerSettingError: an inner optimizer setting out of range at ``hparams``
            (at call).
        DivergenceError, NonFiniteError, SecondOrderError: see :meth:`Estimator.__call__`.

    References:
        Reverse mode: Maclaurin, Duvenaud, Adams, "Gradient-based hyperparameter
        optimization through reversible learning", ICML 2015; forward and reverse
        mode: Franceschi, Donini, Frasconi, Pontil, "Forward and reverse gradient-based
        hyperparameter optimization", ICML 2017. Checkpointing: Griewank & Walther,
        "Evaluating Derivatives" (2008).

    Example:
        >>> est = Unrolled(mode="forward")  # a handful of hyperparameters
        >>> est.name, est.mode
        ('unrolled', 'forward')

        then ``est(problem, hparams, params)`` as for every estimator.
    """

    name: ClassVar[str] = "unrolled"
    mode: Literal["reverse", "forward"] = "reverse"
    recompute: bool = False
    segment: int | None = None
    chunk_size: int | None = None
    grad_norm: bool = True
    self_check: SelfCheck = field(default="error", kw_only=True)

    def __post_init__(self) -> None:
        check_self_check("Unrolled", self.self_check)
        if self.mode not in ("reverse", "forward"):
            raise ValueError(f"Unrolled.mode must be 'reverse' or 'forward', got {self.mode!r}")
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"Unrolled.segment must be >= 1, got {self.segment}")
        if not isinstance(self.grad_norm, bool):
            raise ValueError(f"Unrolled.grad_norm must be True or False, got {self.grad_norm!r}")
        if self.recompute and self.mode == "forward":
            raise ValueError("Unrolled: recompute applies to reverse mode only "
                             "(forward mode already uses memory independent of T)")

    def second_order_routes(self, state: EstimatorState) -> frozenset[Use]:
        """The (route, block) pairs this estimator differentiates by (see the base class)."""
        return unrolled_routes(self.mode)

    def route_options(self) -> list[tuple[frozenset[Use], str]]:
        """The settings to suggest when the self-check rejects a route (see the base class)."""
        return [(unrolled_routes("reverse"), "Unrolled(mode='reverse')"),
                (unrolled_routes("forward"), "Unrolled(mode='forward')")]

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        check_settings(problem.optimizer, hparams)
        # f(w_0) on the full batch for the divergence check: where every step sees that
        # batch, reverse mode records it at the first step; else one more evaluation
        reuse = self.mode == "reverse" and same_batch_throughout(problem)
        losses: list[torch.Tensor] = []
        start = None if reuse else inner_loss_value(problem, params, hparams)
        opt_state = problem.optimizer.init(tree_detach(params))
        grad, w, loss = differentiate(self, problem, hparams, params, opt_state,
                                      0, problem.steps, losses if reuse else None)
        if start is None:
            start = float(losses[0]) if losses else inner_loss_value(problem, params, hparams)
        end, gnorm = final_fit(problem, w, hparams, self.mode, self.grad_norm)
        check_growth(self.name, start, end, problem.steps)
        return Hypergradient(grad, w, state, Diagnostics(
            self.name, float(loss), gnorm, problem.steps))


def same_batch_throughout(problem: Problem) -> bool:
    """Whether every inner step of ``problem`` sees ``full_batch()`` (no ``step_batch``, and
    neither batch method overridden), so that the first step's loss is f(w_0) on it."""
    return problem.step_batch is None and type(problem).batch_at is Problem.batch_at and \
        type(problem).full_batch is Problem.full_batch


def final_fit(problem: Problem, params: PyTree, hparams: PyTree, mode: str,
              grad_norm: bool) -> tuple[float, float]:
    """(f, ‖∇_w f‖) at the inner solution ``params`` on the full batch (plain autograd in
    reverse mode, ``torch.func`` in forward mode); ‖∇_w f‖ is NaN without ``grad_norm``."""
    if not grad_norm:
        return inner_loss_value(problem, params, hparams), math.nan
    if mode == "reverse":
        return inner_fit_autograd(problem, params, hparams)
    return inner_fit(problem, params, hparams)


def unrolled_routes(mode: str) -> frozenset[Use]:
    """Reverse-mode unrolling takes double backward through each step's gradient (both
    blocks); forward mode, forward-over-reverse."""
    return uses("reverse" if mode == "reverse" else "forward")


def differentiate(est: Unrolled, problem: Problem, hparams: PyTree, params: PyTree,
                  opt_state: State, start: int, stop: int,
                  losses: list[torch.Tensor] | None = None,
                  ) -> tuple[PyTree, PyTree, torch.Tensor]:
    """Run the chosen unrolled mode of ``est`` over steps ``start..stop-1``; reverse mode
    appends each step's inner loss to ``losses`` where given (:func:`unroll_reverse`).

    Returns:
        ``(grad, w_stop, loss)`` as in :func:`unroll_reverse`.
    """
    if est.mode == "forward":
        return unroll_forward(problem, hparams, params, opt_state, start, stop, est.chunk_size)
    segment = (est.segment or sqrt_segment(stop - start)) if est.recompute else None
    return unroll_reverse(problem, hparams, params, opt_state, start, stop, segment, losses)


__all__ = ["Unrolled", "bind_settings", "differentiate", "final_fit", "inner_fit_autograd",
           "run_autograd", "unroll_forward", "unroll_reverse"]
