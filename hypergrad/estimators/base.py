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
from typing import Any, ClassVar, Literal

import torch
from torch.func import grad_and_value

from ..errors import (
    LINEAR_SOLVE_NOT_CONVERGED,
    BilevelInputError,
    ConvergenceWarning,
    DivergenceError,
    NonFiniteError,
    SecondOrderError,
    SecondOrderWarning,
    warn,
)
from ..optim import check_settings
from ..problem import Problem
from ..pytree import PyTree, tree_leaves, tree_norm, tree_paths
from ..second_order import (
    BLOCK_NAMES,
    ROUTE_NAMES,
    SecondOrderReport,
    Use,
    check_second_order,
)

EstimatorState = dict[str, Any]
#: what an estimator does with the second-order self-check: raise, warn, or skip it
SelfCheck = Literal["error", "warn", "off"]
SELF_CHECK_MODES = ("error", "warn", "off")


@dataclass(frozen=True)
class Diagnostics:
    """What an estimator measured about its own answer (plain Python numbers, no tensors).

    Attributes:
        estimator: the estimator's registry name (``"implicit"``, ``"truncated"``, …).
        outer_loss: F(w, λ) at the returned inner solution, on ``problem.outer_batch``.
        inner_grad_norm: ‖∇_w f‖ (Euclidean norm over all leaves) at the returned inner
            solution, on the full inner batch; near 0 means the inner problem is solved.
        inner_steps: inner optimizer steps run in this call.
        hypergrad_norm: ‖∇_λ F‖ of the returned estimate (filled in by
            :meth:`Estimator.__call__`).
        solve_iterations: iterations of the linear solve (implicit estimators only,
            ``None`` for the others).
        solve_residual: final relative residual ‖b − Av‖ / ‖b‖ of the linear solve.
        solve_converged: whether the linear solve reached its tolerance.
        solve_residuals: the relative residual after each solver iteration.
        seconds: wall-clock time of the whole call, in seconds.
        solve_note: advice printed when the solve did not converge (``None``: default).
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
    solve_note: str | None = None


@dataclass(frozen=True)
class Hypergradient:
    """An estimate of ∇_λ F(w*(λ), λ) with the inner solution and diagnostics.

    Attributes:
        grad: the hypergradient, a pytree matching ``hparams`` (same structure, shapes,
            dtypes and devices), detached.
        params: the inner solution reached, a pytree matching ``params`` (detached); pass
            it back as ``params`` to warm-start the next outer step.
        state: the estimator's explicit state, to pass back as ``state`` on the next call
            (warm-start vectors, window draws, step counters); ``{}`` if it keeps none.
        diagnostics: :class:`Diagnostics` of this call.
    """

    grad: PyTree
    params: PyTree
    state: EstimatorState
    diagnostics: Diagnostics


class Estimator(ABC):
    """Base class of all hypergradient estimators: timing, result checks and warnings
    around :meth:`compute`.

    Subclasses are frozen dataclasses holding settings only; everything carried between
    outer steps travels in ``Hypergradient.state``.
    """

    name: ClassVar[str]
    #: warn when the estimate is exactly zero (off where zero is a legitimate answer)
    warn_zero: ClassVar[bool] = True

    def __call__(self, problem: Problem, hparams: PyTree, params: PyTree,
                 state: EstimatorState | None = None) -> Hypergradient:
        """Estimate ∇_λ F(w*(λ), λ) at ``hparams``, starting the inner problem at ``params``.

        Args:
            problem: the bilevel problem (:class:`~hypergrad.Problem`, or
                :class:`~hypergrad.ConstrainedProblem` for :class:`~hypergrad.LVHBA`).
            hparams: the hyperparameters λ, a pytree of floating-point tensors.
            params: the inner starting point w₀ (or the previous solution, to warm-start),
                a pytree of tensors accepted by ``problem.inner_loss``.
            state: the previous call's ``result.state``, or ``None`` on the first call.

        Returns:
            A :class:`Hypergradient`: ``grad`` (pytree matching ``hparams``), ``params``
            (pytree matching ``params``), the next ``state`` and :class:`Diagnostics`.

        Raises:
            DivergenceError: the inner run diverged (NaN/inf in the inner solution, or an
                inner loss grown by more than 1e10 times).
            NonFiniteError: the hypergradient contains NaN or inf.
            SecondOrderError: the self-check found the inner loss's second derivatives
                wrong or unavailable along this estimator's route (``self_check="error"``).
            LinearSolveError: the linear solve of an implicit estimator broke down.
            BilevelInputError: inputs the estimator refuses (see each subclass).

        Warns:
            ConvergenceWarning: the linear solve stopped above its tolerance.
            RuntimeWarning: the estimate is exactly zero.
        """
        start = time.perf_counter()
        state = dict(state or {})
        if getattr(self, "self_check", "off") != "off" and isinstance(problem, Problem):
            # settings out of range fail at once, not after the self-check's evaluations
            check_settings(problem.optimizer, hparams)
            state = self.verify_second_order(problem, hparams, params, state)
        result = self.compute(problem, hparams, params, state)
        gnorm, params_finite = _norm_and_finite(result)
        if not (math.isfinite(gnorm) and params_finite):
            _check_finite(result, self.name)  # raises, naming the leaf (not on overflow)
        d = result.diagnostics
        if d.solve_converged is False:
            advice = d.solve_note or "raise maxiter or tol"
            warn(f"{self.name}: the linear solve stopped at relative residual "
                 f"{d.solve_residual:.2e} after {d.solve_iterations} iterations; {advice}",
                 ConvergenceWarning, kind=LINEAR_SOLVE_NOT_CONVERGED)
        if self.warn_zero and gnorm == 0 and all(  # (a norm of 0 may be an underflow)
                bool((g == 0).all()) for g in tree_leaves(result.grad)):
            warn(self.zero_message(problem, hparams, result.params), RuntimeWarning)
        seconds = time.perf_counter() - start
        return replace(result, diagnostics=replace(d, seconds=seconds, hypergrad_norm=gnorm))

    @abstractmethod
    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """Estimate the hypergradient; subclasses implement this."""

    def zero_message(self, problem: Problem, hparams: PyTree, params: PyTree) -> str:
        """The warning for an exactly zero estimate; subclasses say why where they know."""
        return (f"{self.name}: the hypergradient is exactly zero: the outer loss does not "
                "depend on the hyperparameters through this estimate")

    # --- the second-order self-check (see hypergrad.second_order) ---------------------

    def second_order_routes(self, state: EstimatorState) -> frozenset[Use]:
        """The (route, block) pairs by which this estimator forms second derivatives of
        the inner loss: routes ``"reverse"``, ``"forward"``, ``"reverse_forward"``, blocks
        ``"hessian"`` (∂²f/∂w²) and ``"mixed"`` (∂²f/∂λ∂w); empty: none."""
        return frozenset()

    def route_options(self) -> list[tuple[frozenset[Use], str]]:
        """Settings of this estimator and the pairs each uses, to suggest one that works."""
        return []

    def second_order_batch(self, problem: Problem) -> Any:
        """The inner batch the self-check evaluates f on (that of the optimality
        conditions by default)."""
        return problem.full_batch()

    def verify_second_order(self, problem: Problem, hparams: PyTree, params: PyTree,
                            state: EstimatorState) -> EstimatorState:
        """Run the (cached) self-check on the inner loss and act on the routes this
        estimator uses: raise :class:`SecondOrderError` (or warn, with
        ``self_check="warn"``) when one is wrong or unsupported. Returns ``state``."""
        routes = self.second_order_routes(state)
        if not routes:
            return state
        report = check_second_order(problem.inner_loss, hparams, params,
                                    self.second_order_batch(problem))
        if not report.usable(routes):
            self.second_order_failure(report, routes)
        return state

    def second_order_failure(self, report: SecondOrderReport, routes: frozenset[Use]) -> None:
        """Raise (or warn about) the routes of ``routes`` that the report rejects."""
        message = second_order_message(self, report, routes)
        if getattr(self, "self_check", "error") == "warn":
            warn(message, SecondOrderWarning)
        else:
            raise SecondOrderError(message)


def check_self_check(owner: str, value: object) -> None:
    """Validate an estimator's ``self_check`` setting."""
    if value not in SELF_CHECK_MODES:
        raise BilevelInputError(f"{owner}.self_check must be one of {SELF_CHECK_MODES}, "
                                f"got {value!r}")


def second_order_message(est: Estimator, report: SecondOrderReport,
                         routes: frozenset[Use]) -> str:
    """Which (route, block) pairs failed, the likely operator, and what to use instead."""
    bad = sorted((r, b) for r, b in routes if report.status(r, b) not in ("ok", "unverified"))
    verbs = {"wrong": "come out wrong by", "unsupported": "cannot be taken by",
             "disputed": "disagree between routes, unresolved by central differences, by"}
    grouped: dict[tuple[str, str], list[str]] = {}
    for r, b in bad:
        grouped.setdefault((report.status(r, b), r), []).append(BLOCK_NAMES[b])
    parts = [f"{est.name}: the second derivatives of the inner loss "
             + "; ".join(f"{verbs[status]} {ROUTE_NAMES[r]} in block{'s' * (len(blocks) > 1)} "
                         + " and ".join(blocks) for (status, r), blocks in grouped.items())
             + ", which this estimator uses. On random probes, uᵀ(∂²f)v is:\n"
             + report.summary()]
    failed = {r for r, b in bad}
    raised = sorted({report.routes[r].error for r in failed
                     if report.status(r) == "unsupported" and report.routes[r].error})
    if raised:
        op = report.unsupported_operator
        forward = failed & {"forward", "reverse_forward"}
        named = (f"The operator without a forward-mode rule is {op}. "
                 if op and forward else "")
        parts.append(named + "PyTorch said: " + " | ".join(raised)[:400])
    if report.suspects:
        parts.append("Likely cause: " + "; ".join(report.suspects) + ".")
    elif any(report.status(r, b) in ("wrong", "disputed") for r, b in bad):
        parts.append("Likely cause: an operator whose backward (or jvp) is not itself "
                     "differentiable, e.g. a custom autograd.Function with "
                     "@once_differentiable, or a kernel with wrong second derivatives.")
    working = [how for needs, how in est.route_options() if report.usable(needs)
               and not needs <= routes]
    if working:
        parts.append(f"Use {' or '.join(working)}, which works here, or write the operator "
                     "with basic differentiable torch ops.")
    else:
        parts.append("No other setting of this estimator avoids it: replace the operator "
                     "(write it with basic differentiable torch ops).")
    parts.append(f"(To skip this check: {type(est).__name__}(..., self_check='off'); "
                 "self_check='warn' warns instead.)")
    return "\n".join(parts)


def _norm_and_finite(result: Hypergradient) -> tuple[float, bool]:
    """‖grad‖ and whether every tensor leaf of ``params`` is free of NaN and inf, from one
    host sync (a NaN or inf in ``grad`` makes the norm non-finite)."""
    norm = tree_norm(result.grad)
    leaves = [a for a in tree_leaves(result.params) if isinstance(a, torch.Tensor)]
    if not leaves:
        return float(norm), True
    finite = torch.stack([torch.isfinite(a).all().to(norm.device) for a in leaves]).all()
    value, ok = torch.stack((norm, finite.to(norm))).tolist()
    return value, bool(ok)


def _check_finite(result: Hypergradient, who: str) -> None:
    """NaN or inf in the hypergradient or in the inner solution, blamed on a diverged
    inner run when the inner solution has them too."""
    diverged = nonfinite_leaf(result.params, "params")
    steps = result.diagnostics.inner_steps
    for path, leaf in zip(tree_paths(result.grad), tree_leaves(result.grad), strict=True):
        if not bool(torch.isfinite(leaf).all()):
            if diverged is not None:
                raise DivergenceError(f"{who}: the hypergradient{path} contains NaN or inf "
                                      f"because {_diverged(who, diverged, steps)}")
            raise NonFiniteError(f"{who}: the hypergradient{path} contains NaN or inf; "
                                 "lower the step sizes (the inner learning rate, or "
                                 "alpha/eta of LV-HBA) or check the losses")
    if diverged is not None:
        raise DivergenceError(f"{who}: {_diverged(who, diverged, steps)}")


#: an inner run diverged if its final loss exceeds both GROWTH × |initial loss| and FLOOR
GROWTH, FLOOR = 1e10, 1e10


def nonfinite_leaf(tree: PyTree, name: str) -> str | None:
    """The name of the first leaf of ``tree`` with NaN or inf, or None (one host sync)."""
    leaves = [a for a in tree_leaves(tree) if isinstance(a, torch.Tensor)]
    if not leaves or bool(torch.stack([torch.isfinite(a).all() for a in leaves]).all()):
        return None
    for path, leaf in zip(tree_paths(tree), tree_leaves(tree), strict=True):
        if isinstance(leaf, torch.Tensor) and not bool(torch.isfinite(leaf).all()):
            return name + path
    return None


#: the inner step sizes of estimators without an inner optimizer
_STEP_SIZES = {"soba": "rho", "saba": "rho", "lvhba": "alpha and eta"}


def _lower_step(who: str) -> str:
    """What to do about a diverged inner run."""
    if who in _STEP_SIZES:
        return f"lower {_STEP_SIZES[who]}"
    return "lower the inner step size (lr): gradient descent diverges once lr > 2/λ_max(∇²_w f)"


def _diverged(who: str, leaf: str, steps: int) -> str:
    return (f"the inner run diverged: {leaf} contains NaN or inf after {steps} inner steps; "
            + _lower_step(who))


def check_inner_params(who: str, params: PyTree, steps: int) -> None:
    """Raise :class:`DivergenceError` naming the first leaf of the inner solution with NaN
    or inf, before any work is done at it."""
    leaf = nonfinite_leaf(params, "params")
    if leaf is not None:
        raise DivergenceError(f"{who}: {_diverged(who, leaf, steps)}" if steps else
                              f"{who}: {leaf} contains NaN or inf (inner_steps=0 takes it "
                              "as the inner solution)")


def check_growth(who: str, start: float, end: float, steps: int) -> None:
    """Raise :class:`DivergenceError` when the inner loss grew from ``start`` to ``end``
    by more than GROWTH times (and beyond FLOOR): a step size too large for the inner
    problem, even if nothing overflowed yet. A healthy run never trips it."""
    if end > GROWTH * abs(start) and end > FLOOR:
        raise DivergenceError(
            f"{who}: the inner run diverged: the inner loss went from {start:.3e} to "
            f"{end:.3e} over {steps} inner steps; " + _lower_step(who))


def inner_loss_value(problem: Problem, params: PyTree, hparams: PyTree) -> float:
    """f(params, hparams, full batch) without keeping a graph."""
    with torch.no_grad():
        return float(problem.inner_loss(params, hparams, problem.full_batch()))


def inner_fit(problem: Problem, params: PyTree, hparams: PyTree) -> tuple[float, float]:
    """(f, ‖∇_w f‖) at ``params`` on the full batch: one gradient evaluation, one host
    sync, no graph kept."""
    with torch.no_grad():
        g, f = grad_and_value(problem.inner_loss)(params, hparams, problem.full_batch())
        f, gnorm = torch.stack((f.detach(), tree_norm(g).to(f.dtype))).tolist()
    return f, gnorm


def inner_grad_norm(problem: Problem, params: PyTree, hparams: PyTree) -> float:
    """‖∇_w f(params, hparams, inner_batch)‖ without keeping a graph."""
    with torch.no_grad():
        return float(tree_norm(problem.inner_grad(params, hparams)))
