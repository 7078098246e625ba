"""Finite-difference check of a hypergradient estimator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .estimators import Estimator, make_estimator
from .problem import Problem
from .pytree import PyTree, tree_ravel, tree_unravel


@dataclass(frozen=True)
class GradientCheck:
    """Estimator against central differences on chosen flat coordinates of λ."""

    coords: list[int]
    estimate: torch.Tensor
    finite_difference: torch.Tensor
    rel_error: float


def check_hypergradient(problem: Problem, hparams: PyTree, params: PyTree,
                        estimator: str | Estimator = "implicit",
                        coords: Sequence[int] | int = 5, eps: float = 1e-5,
                        inner_solution: Callable[[PyTree], PyTree] | None = None,
                        seed: int = 0) -> GradientCheck:
    """Compare an estimator with central differences of h(λ) = F(w(λ), λ).

    w(λ) is ``inner_solution(λ)`` if given (e.g. a closed form), else ``problem.steps``
    inner steps from ``params`` (the map unrolled estimators differentiate exactly).
    ``coords`` lists flat indices into λ, or gives how many to draw at random. The
    relative error is ‖ĝ − g_fd‖ / ‖g_fd‖ over those coordinates. Use float64.
    """
    est = make_estimator(estimator)
    flat = tree_ravel(hparams).detach()
    if isinstance(coords, int):
        gen = torch.Generator().manual_seed(seed)
        coords = torch.randperm(flat.numel(), generator=gen)[:coords].tolist()
    coords = list(coords)
    solve = inner_solution or (lambda lam: problem.solve_inner(params, lam)[0])

    def h(x: torch.Tensor) -> float:
        lam = tree_unravel(x, hparams)
        with torch.no_grad():
            return float(problem.outer_loss(solve(lam), lam, problem.outer_batch))

    fd = []
    for i in coords:
        e = torch.zeros_like(flat)
        e[i] = eps
        fd.append((h(flat + e) - h(flat - e)) / (2 * eps))
    fd_t = torch.tensor(fd, dtype=flat.dtype)
    g = tree_ravel(est(problem, hparams, params).grad).detach()[coords].cpu()
    rel = float((g - fd_t).norm() / fd_t.norm().clamp_min(1e-300))
    return GradientCheck(coords, g, fd_t, rel)
