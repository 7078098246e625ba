"""Truncated back-propagation: differentiate only the last K of T inner steps.

K-RMD (Shaban et al., 2019) runs T − K steps without a graph, then K differentiable
steps. For an α-strongly convex, β-smooth inner problem and step γ ≤ 1/β its bias
decays like (1 − γα)^K. The random-window variant (RaT-BPTT, Feng et al., 2024)
draws the number of graph-free steps N0 uniformly from {0, …, T − K} at each call,
so that the window slides over the whole trajectory across outer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..optim import check_settings
from ..problem import Problem
from ..pytree import PyTree, tree_detach
from ..second_order import Use
from ..seeding import mix_seed
from .base import (
    Diagnostics,
    Estimator,
    EstimatorState,
    Hypergradient,
    SelfCheck,
    check_growth,
    check_self_check,
    inner_loss_value,
)
from .unrolled import Unrolled, differentiate, final_fit, run_autograd, unrolled_routes


@dataclass(frozen=True)
class Truncated(Estimator):
    """Back-propagate through the last ``window`` (K) steps of ``problem.steps`` (T).

    The first T − K steps (N0 of them with ``random``) run without a graph; memory is
    O(K). With ``random`` only N0 + K ≤ T steps are run, and ``Diagnostics.inner_steps``
    says how many.

    Args:
        window: number K of differentiated steps (K ≥ T gives full unrolling).
        random: draw the window's start uniformly at each call (RaT-BPTT); the draw
            count is kept in ``state["draws"]`` so runs are reproducible and resumable.
        seed: seed of the window draws.
        mode, recompute, segment: how the window itself is differentiated (see
            :class:`Unrolled`).
        grad_norm: measure ‖∇_w f‖ at the returned solution, as in :class:`Unrolled`.
        self_check: the second-order self-check, as in :class:`Unrolled`.

    Raises:
        ValueError: ``window`` not a positive int (at construction).
        BilevelInputError: a bad ``self_check`` (at construction).
        OptimizerSettingError, DivergenceError, NonFiniteError, SecondOrderError: at call,
            as for :class:`Unrolled`.

    References:
        K-RMD: Shaban, Cheng, Hatch, Boots, "Truncated back-propagation for bilevel
        optimization", AISTATS 2019. Random window: Feng, Vedantam, Kempe, "Embarrassingly
        simple dataset distillation" (RaT-BPTT), ICLR 2024.
    """

    name: ClassVar[str] = "truncated"
    window: int = 10
    random: bool = False
    seed: int = 0
    mode: Literal["reverse", "forward"] = "reverse"
    recompute: bool = False
    segment: int | None = None
    grad_norm: bool = True
    self_check: SelfCheck = field(default="error", kw_only=True)

    def __post_init__(self) -> None:
        check_self_check("Truncated", self.self_check)
        if not isinstance(self.grad_norm, bool):
            raise ValueError(f"Truncated.grad_norm must be True or False, got "
                             f"{self.grad_norm!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"Truncated.window must be a positive int, got {self.window!r}")

    def window_start(self, steps: int, draws: int) -> int:
        """N0: graph-free steps before the window, for ``steps`` = T and the ``draws``-th
        call (an int in ``[0, max(T − K, 0)]``; always T − K without ``random``)."""
        slack = max(steps - self.window, 0)
        if not self.random:
            return slack
        gen = torch.Generator().manual_seed(mix_seed(self.seed, draws))
        return int(torch.randint(0, slack + 1, (), generator=gen))

    def second_order_routes(self, state: EstimatorState) -> frozenset[Use]:
        """The (route, block) pairs this estimator differentiates by (see the base class)."""
        return unrolled_routes(self.mode)

    def route_options(self) -> list[tuple[frozenset[Use], str]]:
        """The settings to suggest when the self-check rejects a route (see the base class)."""
        return [(unrolled_routes("reverse"), "Truncated(mode='reverse')"),
                (unrolled_routes("forward"), "Truncated(mode='forward')")]

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        draws = int(state.get("draws", 0))
        n0 = self.window_start(problem.steps, draws)
        stop = min(n0 + self.window, problem.steps)
        params = tree_detach(params)
        check_settings(problem.optimizer, hparams)
        start = inner_loss_value(problem, params, hparams)
        opt_state = problem.optimizer.init(params)
        params, opt_state = run_autograd(problem, params, opt_state, hparams, 0, n0,
                                         graph=False)
        inner = Unrolled(mode=self.mode, recompute=self.recompute, segment=self.segment)
        grad, w, loss = differentiate(inner, problem, hparams, params, opt_state, n0, stop)
        end, gnorm = final_fit(problem, w, hparams, self.mode, self.grad_norm)
        check_growth(self.name, start, end, stop)
        new_state = {**state, "draws": draws + 1} if self.random else state
        return Hypergradient(grad, w, new_state, Diagnostics(
            self.name, float(loss), gnorm, stop))
