"""Finite-difference check of a hypergradient estimator, with the error of the differences.

A bare relative error between an estimator and central differences depends on the
machine: at a small step the differences sit at their rounding floor, and another BLAS
kernel moves them. :func:`check_hypergradient` therefore estimates how far the
differences themselves can be trusted (truncation and rounding, see
:mod:`hypergrad.finite_difference`) and judges the estimator against that error bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import BilevelInputError, HyperparameterError
from .estimators import Estimator, make_estimator
from .finite_difference import CentralDifference, central_differences
from .problem import Problem
from .pytree import PyTree, tree_ravel, tree_unravel
from .validation import check_tree


@dataclass(frozen=True)
class GradientCheck:
    """An estimator against central differences on chosen flat coordinates of λ.

    Attributes (tensors have one entry per coordinate in ``coords``, float64, CPU):
        coords: flat indices into the raveled hyperparameters.
        estimate: the estimator's hypergradient there.
        finite_difference: the central differences D(eps) of h(λ) = F(w(λ), λ).
        rel_error: ‖estimate − finite_difference‖ / ‖finite_difference‖ (a bare number
            whose floor depends on the machine; read :attr:`verdict` instead).
        fd_error: the error bar of each difference (2 × truncation + rounding).
        truncation_error, rounding_error: its two parts.
        asymptotic: per coordinate, whether the differences at eps, 2·eps and 4·eps
            shrink like eps² (where not, eps is too large for h or a kink lies within it,
            and the error bar cannot be trusted).
        noise: the estimated computational noise σ of one evaluation of h.
        step: the step eps of the differences.
    """

    coords: list[int]
    estimate: torch.Tensor
    finite_difference: torch.Tensor
    rel_error: float
    fd_error: torch.Tensor
    truncation_error: torch.Tensor
    rounding_error: torch.Tensor
    asymptotic: torch.Tensor
    noise: float
    step: float

    @classmethod
    def of(cls, estimate: torch.Tensor, fd: CentralDifference,
           coords: Sequence[int] | None = None) -> GradientCheck:
        """Judge ``estimate`` (one entry per direction of ``fd``) against the differences
        ``fd`` of :func:`~hypergrad.finite_difference.central_differences` (``coords``
        labels the entries; default 0, 1, …).

        Raises:
            BilevelInputError: ``estimate`` or ``coords`` has another number of entries
                than ``fd``.
        """
        g = estimate.detach().reshape(-1).cpu().to(torch.float64)
        if g.numel() != fd.value.numel():
            raise BilevelInputError(f"estimate has {g.numel()} entries but the differences "
                                    f"have {fd.value.numel()}")
        coords = list(range(g.numel())) if coords is None else list(coords)
        if len(coords) != g.numel():
            raise BilevelInputError(f"coords labels {len(coords)} entries but the estimate "
                                    f"has {g.numel()}")
        rel = float((g - fd.value).norm() / fd.value.norm().clamp_min(1e-300))
        return cls(coords, g, fd.value, rel, fd.error, fd.truncation, fd.rounding,
                   fd.asymptotic, fd.noise, fd.step)

    @property
    def error_ratio(self) -> float:
        """max_i |estimate_i − fd_i| / fd_error_i: ≤ 1 means within the FD error."""
        gap = (self.estimate - self.finite_difference).abs()
        ratio = gap / self.fd_error.clamp_min(torch.finfo(torch.float64).tiny)
        return float(ratio.max())

    @property
    def conclusive(self) -> bool:
        """The error bars can be trusted and are fine enough to judge: the differences are
        in their s² regime at every coordinate (see ``asymptotic``) and ``resolution`` is
        below 1."""
        return bool(self.asymptotic.all()) and self.resolution < 1

    @property
    def agrees(self) -> bool:
        """The estimate lies within the finite differences' error bar at every coordinate,
        and the check is conclusive."""
        return self.conclusive and self.error_ratio <= 1.0

    @property
    def resolution(self) -> float:
        """max_i fd_error_i / max_j |fd_j|: the smallest discrepancy, relative to the
        largest derivative probed, that the check can see. At 1 or more the differences
        cannot tell the derivatives from zero."""
        largest = float(self.finite_difference.abs().max())
        if largest == 0.0:
            return math.inf
        return float(self.fd_error.max()) / largest

    @property
    def verdict(self) -> str:
        """"agrees within the FD error", "disagrees by k times the FD error" or
        "inconclusive: …", with the worst coordinate and how finely the differences
        resolve the derivatives."""
        gap = (self.estimate - self.finite_difference).abs()
        worst = int((gap / self.fd_error.clamp_min(torch.finfo(torch.float64).tiny)).argmax())
        detail = (f"coordinate {self.coords[worst]}: estimate {float(self.estimate[worst]):.6e}, "
                  f"finite difference {float(self.finite_difference[worst]):.6e} ± "
                  f"{float(self.fd_error[worst]):.1e}")
        if not bool(self.asymptotic.all()):
            bad = [c for c, ok in zip(self.coords, self.asymptotic.tolist(), strict=True)
                   if not ok]
            return (f"inconclusive: at coordinates {bad} the differences at eps, 2·eps and "
                    "4·eps do not shrink like eps² (eps is too large for h, or a kink lies "
                    f"within it): lower eps (largest gap {self.error_ratio:.3g} × the "
                    f"error bar; {detail})")
        if self.error_ratio > 1.0:
            return (f"disagrees by {self.error_ratio:.3g} times the FD error ({detail}; "
                    f"the differences resolve {self.resolution:.1e} of the largest "
                    "derivative)")
        if self.resolution >= 1:
            return (f"inconclusive: the FD error ({float(self.fd_error.max()):.1e}) exceeds "
                    "the derivatives, so agreement means nothing; change eps (largest gap "
                    f"{self.error_ratio:.2f} × the error bar; {detail})")
        return (f"agrees within the FD error (largest gap {self.error_ratio:.2f} × the "
                f"error bar; {detail}; the differences resolve {self.resolution:.1e} of "
                "the largest derivative)")

    def __str__(self) -> str:
        return f"GradientCheck({self.verdict})"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_hypergradient(problem: Problem, hparams: PyTree, params: PyTree,
                        estimator: str | Estimator = "implicit",
                        coords: Sequence[int] | int = 5, eps: float = 1e-5,
                        inner_solution: Callable[[PyTree], PyTree] | None = None,
                        seed: int = 0) -> GradientCheck:
    """Compare an estimator with central differences of h(λ) = F(w(λ), λ), with error bars.

    w(λ) is ``inner_solution(λ)`` if given (e.g. a closed form), else ``problem.steps``
    inner steps from ``params`` (the map unrolled estimators differentiate exactly).
    ``coords`` lists flat indices into λ, or gives how many to draw at random (seeded
    by ``seed``). ``eps`` is the step of the differences, in the units of λ.

    Each difference comes with an error bar (truncation from comparing steps eps and
    2·eps, rounding from the noise of h measured by Moré & Wild's difference table; see
    :mod:`hypergrad.finite_difference`). ``result.verdict`` says whether the estimator
    agrees within that error or by how many times it disagrees; ``result.agrees`` is the
    boolean (false also when the differences are not in their eps² regime, see
    ``result.asymptotic``). Costs 6 evaluations of h per coordinate plus 7. Use float64:
    in float32 the error bars are wide (the check says so through ``result.resolution``).

    Args:
        problem: the :class:`Problem`.
        hparams: λ, a pytree of floating tensors.
        params: the inner starting point, a pytree.
        estimator: the estimator under test (object or registry name).
        coords: flat indices into ``tree_ravel(hparams)``, or how many to draw.
        eps: the step of the differences, in the units of λ.
        inner_solution: optional ``hparams -> params`` giving w(λ) (e.g. a closed form).
        seed: seed of the coordinate draw.

    Returns:
        :class:`GradientCheck` (tensors with one entry per coordinate).

    Raises:
        TypeError: ``problem`` is not a :class:`Problem`.
        HyperparameterError: ``hparams`` is not a pytree of floating tensors.
        BilevelInputError: ``eps`` not a positive finite number, ``coords`` not int indices
            in range (or a count from 1 to the number of scalars), ``seed`` not an int,
            ``inner_solution`` not callable.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a hypergrad.Problem, got {type(problem).__name__}")
    if not (_is_number(eps) and math.isfinite(eps) and eps > 0):
        raise BilevelInputError(f"eps must be a positive finite step, got {eps!r}")
    if inner_solution is not None and not callable(inner_solution):
        raise BilevelInputError("inner_solution must be None or a callable hparams -> params, "
                                f"got {type(inner_solution).__name__}")
    if not _is_int(seed):
        raise BilevelInputError(f"seed must be an int, got {seed!r}")
    check_tree("hparams", hparams, HyperparameterError)
    est = make_estimator(estimator)
    flat = tree_ravel(hparams).detach()
    if _is_int(coords):
        if not 1 <= coords <= flat.numel():
            raise BilevelInputError(f"coords asks for {coords} coordinates drawn at random; "
                                    f"the hyperparameters have {flat.numel()} scalars")
        gen = torch.Generator().manual_seed(seed)
        coords = torch.randperm(flat.numel(), generator=gen)[:coords].tolist()
    if isinstance(coords, (str, bytes)) or not isinstance(coords, Sequence) or \
            not all(_is_int(i) for i in coords):
        raise BilevelInputError(f"coords must be a list of int flat indices or an int count, "
                                f"got {coords!r}")
    coords = [int(i) for i in coords]
    if not coords:
        raise BilevelInputError("coords is empty: give flat indices into the hyperparameters")
    bad = [i for i in coords if not 0 <= i < flat.numel()]
    if bad:
        raise BilevelInputError(f"coords {bad} are out of range: the hyperparameters have "
                                f"{flat.numel()} scalars")
    solve = inner_solution or (lambda lam: problem.solve_inner(params, lam)[0])

    def h(x: torch.Tensor) -> float:
        lam = tree_unravel(x, hparams)
        with torch.no_grad():
            return float(problem.outer_loss(solve(lam), lam, problem.outer_batch))

    basis = []
    for i in coords:
        e = torch.zeros_like(flat)
        e[i] = 1.0
        basis.append(e)
    fd = central_differences(h, flat, basis, eps)
    return GradientCheck.of(tree_ravel(est(problem, hparams, params).grad)[coords], fd, coords)
