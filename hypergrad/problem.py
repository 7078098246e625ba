"""The bilevel problem in functional form.

    min_λ F(w*(λ), λ)   s.t.   w*(λ) ∈ argmin_w f(w, λ)

Objectives are plain functions ``f(params, hparams, batch) -> scalar tensor`` on
pytrees. The inner problem is approached by ``steps`` steps of a differentiable
inner optimizer; estimators differ in how they differentiate through that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad

from .hvp import Objective
from .optim import SGD, InnerOptimizer, State
from .pytree import PyTree, tree_detach


@dataclass(frozen=True)
class Problem:
    """A bilevel problem: inner/outer objectives, their data and the inner optimizer.

    Args:
        inner_loss: f(params, hparams, batch), minimised over params.
        outer_loss: F(params, hparams, batch), whose hypergradient in hparams is sought.
        inner_batch: the batch f sees (full-batch); implicit estimators use it for H.
        outer_batch: the batch F sees.
        optimizer: differentiable inner optimizer (``init`` / ``step``).
        steps: number of inner optimizer steps T.
        step_batch: optional ``t -> batch`` giving the minibatch of inner step t
            (stochastic inner training); defaults to ``inner_batch`` at every step.
            Indexing by step keeps recomputation and resumption reproducible.
        outer_step_batch: optional ``t -> batch``, the outer minibatch of outer step t
            for stochastic estimators (SOBA); defaults to ``outer_batch``.

    ``params`` and ``hparams`` are pytrees (dicts, lists, tuples of tensors); each
    objective must return a finite 0-d tensor. A batch is anything the objectives
    accept (e.g. a tuple ``(x, y)`` of tensors ``(N, ...)`` and ``(N,)``).

    Raises:
        TypeError: an objective that is not callable, or an optimizer without
            ``init``/``step``.
        ValueError: ``steps`` not a non-negative int.
    """

    inner_loss: Objective
    outer_loss: Objective
    inner_batch: Any = None
    outer_batch: Any = None
    optimizer: InnerOptimizer = field(default_factory=SGD)
    steps: int = 100
    step_batch: Callable[[int], Any] | None = None
    outer_step_batch: Callable[[int], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Problem.{name} must be callable f(params, hparams, batch), "
                                f"got {type(getattr(self, name)).__name__}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Problem.steps must be a non-negative int, got {self.steps!r}")
        if not isinstance(self.optimizer, InnerOptimizer):
            raise TypeError("Problem.optimizer must have init(params) and "
                            "step(params, grads, state, hparams); "
                            f"got {type(self.optimizer).__name__}")

    def batch_at(self, t: int) -> Any:
        """The inner batch of step t: ``step_batch(t)``, or ``inner_batch``."""
        return self.step_batch(t) if self.step_batch is not None else self.inner_batch

    def outer_batch_at(self, t: int) -> Any:
        """The outer batch of outer step t: ``outer_step_batch(t)``, or ``outer_batch``."""
        return self.outer_step_batch(t) if self.outer_step_batch is not None else \
            self.outer_batch

    def full_batch(self) -> Any:
        """The batch of the optimality conditions ∇_w f = 0 (Hessians, gradient norms):
        ``inner_batch``, or the last step's batch when only ``step_batch`` is given."""
        if self.inner_batch is None and self.step_batch is not None:
            return self.step_batch(max(self.steps - 1, 0))
        return self.inner_batch

    def inner_grad(self, params: PyTree, hparams: PyTree) -> PyTree:
        """∇_w f(params, hparams, full_batch), a pytree matching ``params``."""
        return grad(self.inner_loss)(params, hparams, self.full_batch())

    def step(self, params: PyTree, state: State, hparams: PyTree,
             t: int) -> tuple[PyTree, State]:
        """One differentiable inner step Φ_t(params, state; λ) on ``batch_at(t)``.

        Returns:
            ``(params, state)`` after the step (same structures as the inputs).
        """
        g = grad(self.inner_loss)(params, hparams, self.batch_at(t))
        return self.optimizer.step(params, g, state, hparams)

    def run(self, params: PyTree, state: State, hparams: PyTree, start: int, stop: int,
            graph: bool = True) -> tuple[PyTree, State]:
        """Inner steps start..stop-1; without ``graph`` nothing is kept for backward.

        Returns:
            ``(params, state)`` after step ``stop - 1`` (detached without ``graph``).
        """
        if not graph:
            hparams = tree_detach(hparams)
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            for t in range(start, stop):
                params, state = self.step(params, state, hparams, t)
        if not graph:
            params, state = tree_detach(params), tree_detach(state)
        return params, state

    def solve_inner(self, params: PyTree, hparams: PyTree, steps: int | None = None,
                    state: State | None = None) -> tuple[PyTree, State]:
        """Approximate w*(λ) by ``steps`` (default ``self.steps``) graph-free steps,
        continuing from the optimizer ``state`` if given (else a fresh one).

        Returns:
            ``(w, state)``: the detached inner solution (pytree matching ``params``) and
            the optimizer state.
        """
        params = tree_detach(params)
        state = self.optimizer.init(params) if state is None else state
        return self.run(params, state, hparams, 0, self.steps if steps is None else steps,
                        graph=False)


#: the values of once_per_run in the current run scope (None: no scope open)
_RUN_VALUES: ContextVar[dict | None] = ContextVar("hypergrad_run_values", default=None)


def once_per_run(fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """``fn(*args)``, evaluated once per run of inner steps where the estimator allows it.

    For a term of the inner loss that depends on the hyperparameters (or constants) alone,
    not on the parameters or the batch, e.g. soft labels ``softmax(hparams["labels"])``:
    write ``once_per_run(soft, hparams["labels"])`` with a function ``soft`` defined once
    (not a new lambda per call). Inside a :func:`run_scope` (reverse-mode unrolling opens
    one for each run of steps that it back-propagates once) the value is computed at the
    first call with these tensor objects and this ``fn`` and reused, with its graph, at
    the later steps of the run; elsewhere (other estimators, ``torch.func`` transforms,
    direct calls) it is plain ``fn(*args)``. Either way the result and its derivatives are
    the same.

    Args:
        fn: a pure function of ``args``.
        *args: tensors (e.g. hyperparameter leaves), matched by identity and version;
            other arguments (numbers, strings) by value.

    Returns:
        ``fn(*args)``.

    Raises:
        TypeError: inside a run scope, an argument that is neither a tensor nor hashable.
    """
    values = _RUN_VALUES.get()
    if values is None:
        return fn(*args)
    try:
        key = (fn, torch.is_grad_enabled(),
               *((id(a), a._version) if isinstance(a, torch.Tensor) else (type(a), a)
                 for a in args))
        hash(key)
    except TypeError as exc:
        raise TypeError("once_per_run: arguments must be tensors or hashable values (numbers, "
                        f"strings, tuples of them), got {[type(a).__name__ for a in args]}"
                        ) from exc
    hit = values.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], args, strict=True)):
        return hit[1]
    value = fn(*args)
    values[key] = (args, value)
    return value


@contextmanager
def run_scope() -> Iterator[None]:
    """A scope in which :func:`once_per_run` reuses its values: open it around the steps
    of one graph that is back-propagated once (a value shared by two backward passes
    would meet a freed graph). Scopes nest; each starts empty."""
    token = _RUN_VALUES.set({})
    try:
        yield
    finally:
        _RUN_VALUES.reset(token)

