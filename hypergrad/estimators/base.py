"""The one interface every hypergradient estimator shares.

An estimator is a small frozen config object. Calling it,

    result = estimator(problem, hparams, params, state)

returns a :class:`Hypergradient`: the hypergradient (same structure as ``hparams``),
the inner solution reached (pass it back as ``params`` to warm-start the next outer
step), the estimator's explicit state for the next call (warm starts of linear
systems, random-window draws), and :class:`Diagnostics`. Estimators never keep state
of their own; whatever they carry between outer steps is in ``result.state``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ..errors import ConvergenceWarning, NonFiniteError, warn
from ..problem import Problem
from ..pytree import PyTree, tree_leaves, tree_norm, tree_paths

EstimatorState = dict[str, Any]


@dataclass(frozen=True)
class Diagnostics:
    """What an estimator measured about its own answer.

    ``inner_grad_norm`` is ‖∇_w f‖ at the returned inner solution; ``solve_*`` describe
    the linear solve of implicit estimators (``None`` for the others).
    """

    estimator: str
    outer_loss: float
    inner_grad_norm: float
    inner_steps: int
    hypergrad_norm: float = math.nan
    solve_iterations: int | None = None
    solve_residual: float | None = None
    solve_converged: bool | None = None
    solve_residuals: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Hypergradient:
    """An estimate of ∇_λ F(w*(λ), λ) with the inner solution and diagnostics."""

    grad: PyTree
    params: PyTree
    state: EstimatorState
    diagnostics: Diagnostics


class Estimator(ABC):
    """Base class: timing, result checks and warnings around :meth:`compute`."""

    name: ClassVar[str]
    #: warn when the estimate is exactly zero (off where zero is a legitimate answer)
    warn_zero: ClassVar[bool] = True

    def __call__(self, problem: Problem, hparams: PyTree, params: PyTree,
                 state: EstimatorState | None = None) -> Hypergradient:
        start = time.perf_counter()
        result = self.compute(problem, hparams, params, dict(state or {}))
        _check_finite(result.grad, self.name)
        d = result.diagnostics
        if d.solve_converged is False:
            warn(
                f"{self.name}: the linear solve stopped at relative residual "
                f"{d.solve_residual:.2e} after {d.solve_iterations} iterations; raise "
                "maxiter or tol", ConvergenceWarning)
        if self.warn_zero and all(bool((g == 0).all()) for g in tree_leaves(result.grad)):
            warn(f"{self.name}: the hypergradient is exactly zero: the outer loss does not "
                 "depend on the hyperparameters through this estimate", RuntimeWarning)
        seconds = time.perf_counter() - start
        return replace(result, diagnostics=replace(
            d, seconds=seconds, hypergrad_norm=float(tree_norm(result.grad))))

    @abstractmethod
    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """Estimate the hypergradient; subclasses implement this."""


def _check_finite(tree: PyTree, who: str) -> None:
    for path, leaf in zip(tree_paths(tree), tree_leaves(tree), strict=True):
        if not bool(torch.isfinite(leaf).all()):
            raise NonFiniteError(f"{who}: the hypergradient{path} contains NaN or inf; "
                                 "lower the step sizes (the inner learning rate, or "
                                 "alpha/eta of LV-HBA) or check the losses")


def inner_grad_norm(problem: Problem, params: PyTree, hparams: PyTree) -> float:
    """‖∇_w f(params, hparams, inner_batch)‖ without keeping a graph."""
    with torch.no_grad():
        return float(tree_norm(problem.inner_grad(params, hparams)))
