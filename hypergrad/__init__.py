"""hypergrad: the functional core of bilevel optimization on torch.func.

Solve min_λ F(w*(λ), λ) s.t. w*(λ) ∈ argmin_w f(w, λ) with pluggable hypergradient
estimators (unrolled, truncated, implicit) built on batched Hessian-vector products.
"""

from __future__ import annotations

from .check import GradientCheck, check_hypergradient
from .constrained import ConstrainedProblem
from .errors import (
    BilevelInputError,
    ConvergenceWarning,
    DivergenceError,
    HyperparameterError,
    LinearSolveError,
    NonFiniteError,
    ObjectiveError,
    OptimizerSettingError,
    SecondOrderError,
    SecondOrderWarning,
)
from .estimators import (
    ESTIMATORS,
    LVHBA,
    SABA,
    SOBA,
    ConstrainedDiagnostics,
    Diagnostics,
    Estimator,
    EstimatorState,
    Hypergradient,
    Implicit,
    KKTImplicit,
    LVHBARun,
    Truncated,
    Unrolled,
    make_estimator,
    soba_step_size,
)
from .hvp import Linearization, hvp, hvp_batched, mixed_vjp
from .implicit_diff import RootVJP, Stationarity, root_vjp
from .layers import (
    FixedPointInfo,
    RootLayer,
    UnrolledLayer,
    custom_root,
    fixed_point_layer,
    kkt_optimality,
    unrolled_layer,
)
from .linear_solve import (
    GMRES,
    ConjugateGradient,
    Direct,
    FixedPoint,
    Neumann,
    SolveResult,
    make_solver,
)
from .optim import OPTIMIZERS, SGD, Adam, AdamW, Chebyshev, Momentum, Nesterov, make_optimizer
from .problem import Problem, once_per_run, run_scope
from .pytree import PyTree
from .second_order import SecondOrderReport, check_second_order
from .seeding import mix_seed
from .validation import check_problem, check_problem_once

__version__ = "0.1.0"


def hypergradient(problem: Problem | ConstrainedProblem, hparams: PyTree, params: PyTree,
                  estimator: str | Estimator = "implicit", state: EstimatorState | None = None,
                  check: bool = True) -> Hypergradient:
    """Estimate ∇_λ F(w*(λ), λ) with the chosen estimator (object or registry name).

    ``params`` is the inner starting point (or the previous solution, to warm-start);
    ``state`` is the previous call's ``result.state``. With ``check`` the inputs are
    validated first (types, structure, dtypes, devices, scalar finite losses); a
    :class:`ConstrainedProblem` is checked by its estimator (feasible start, shape of g).

    Args:
        problem: the bilevel problem.
        hparams: the hyperparameters λ, a pytree (dict, list, tuple) of floating tensors.
        params: the inner variables w, a pytree of tensors (e.g. a model's parameters).
        estimator: an :class:`Estimator` or a name of :data:`ESTIMATORS`.
        state: the previous call's ``result.state`` (``None`` on the first call).
        check: validate the inputs with :func:`check_problem` first (one evaluation of
            each loss), once per problem: on the first call for this ``problem`` object
            and again when the shapes, dtypes or structure of ``hparams`` or ``params``
            change (:func:`hypergrad.validation.check_problem_once`).

    Returns:
        A :class:`Hypergradient` whose ``grad`` is a pytree matching ``hparams``.

    Raises:
        BilevelInputError: bad inputs (structure, dtype, device; its subclasses
            HyperparameterError and ObjectiveError: hyperparameters not read, a loss
            that is not a finite scalar).
        ValueError, TypeError: an unknown estimator name or bad estimator settings.
        DivergenceError, NonFiniteError, LinearSolveError, SecondOrderError: raised by
            the estimator (see :meth:`Estimator.__call__`).

    Example:
        >>> import torch, hypergrad
        >>> X, y = torch.randn(20, 3), torch.randn(20)
        >>> inner = lambda w, h, b: ((X @ w["w"] - y) ** 2).mean() + h["l2"].exp() * (
        ...     w["w"] ** 2).sum()
        >>> outer = lambda w, h, b: ((X @ w["w"] - y) ** 2).mean()
        >>> problem = hypergrad.Problem(inner, outer, optimizer=hypergrad.SGD(lr=0.1),
        ...                             steps=200)
        >>> result = hypergrad.hypergradient(problem, {"l2": torch.tensor(-2.0)},
        ...                                  {"w": torch.zeros(3)})
        >>> result.grad["l2"].shape
        torch.Size([])
    """
    est = make_estimator(estimator)
    if check and isinstance(problem, Problem):
        check_problem_once(problem, hparams, params)
    return est(problem, hparams, params, state)


__all__ = [
    "Adam", "AdamW", "BilevelInputError", "Chebyshev", "ConjugateGradient",
    "ConstrainedDiagnostics", "ConstrainedProblem", "ConvergenceWarning", "Diagnostics",
    "Direct", "DivergenceError", "ESTIMATORS", "Estimator", "EstimatorState", "FixedPoint",
    "GMRES", "GradientCheck", "Hypergradient", "HyperparameterError", "Implicit",
    "KKTImplicit", "LVHBA", "LVHBARun", "LinearSolveError", "Linearization", "Momentum", "Nesterov",
    "Neumann", "NonFiniteError", "ObjectiveError", "OptimizerSettingError", "Problem",
    "PyTree", "RootVJP", "SABA", "SGD", "SOBA", "SecondOrderError", "SecondOrderReport",
    "SecondOrderWarning", "SolveResult", "Stationarity", "Truncated", "Unrolled",
    "check_hypergradient", "check_problem", "check_second_order", "hvp", "hvp_batched",
    "hypergradient", "make_estimator", "make_solver", "make_optimizer", "mix_seed", "mixed_vjp",
    "OPTIMIZERS", "once_per_run", "root_vjp", "run_scope", "soba_step_size",
    "FixedPointInfo", "RootLayer", "UnrolledLayer", "custom_root", "fixed_point_layer",
    "kkt_optimality", "unrolled_layer",
]
