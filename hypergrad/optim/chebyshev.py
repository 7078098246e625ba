"""The Chebyshev semi-iterative method for quadratics with μI ⪯ H ⪯ LI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..pytree import PyTree, tree_flatten, tree_unflatten
from .base import CURVATURE, Range, Setting, State, check_settings, leafwise, resolve


@dataclass(frozen=True)
class Chebyshev:
    """Chebyshev iteration, optimal for quadratics with spectrum in [mu, L]:

    x₁ = x₀ − (2/(L+μ))·∇f(x₀);  x_{t+1} = x_t − α_t ∇f(x_t) + β_t (x_t − x_{t−1}),

    with ρ_t = T_t(σ)/T_{t+1}(σ), σ = (L+μ)/(L−μ), α_t = 4ρ_t/(L−μ), β_t = ρ_{t−1}ρ_t, so
    that x_t − x* = P_t(H)(x₀ − x*) with P_t(λ) = T_t((L+μ−2λ)/(L−μ)) / T_t(σ).
    State ``{"prev": x_{t−1}, "t": t}``; the step depends on t, so it is not stationary
    (``Implicit(fixed_point=True)`` refuses it).

    Args:
        mu, L: bounds μ < L (both > 0) on the eigenvalues of the inner Hessian; numbers,
            tensors or callables of the hyperparameters.

    Raises:
        OptimizerSettingError: ``mu`` or ``L`` not positive, or ``mu >= L``.

    References:
        Golub & Varga, "Chebyshev semi-iterative methods...", Numer. Math. 1961; its
        Jacobian convergence: Scieur, Gidel, Bertrand, Pedregosa, "The curse of
        unrolling", NeurIPS 2022.
    """

    mu: Setting
    L: Setting
    carried: tuple[str, ...] = ()
    stationary: bool = False
    limits: ClassVar[dict[str, Range]] = {"mu": CURVATURE, "L": CURVATURE}
    ordered: ClassVar[tuple[tuple[str, str], ...]] = (("mu", "L"),)

    def __post_init__(self) -> None:
        check_settings(self)

    def init(self, params: PyTree) -> State:
        """``{"prev": params, "t": 0}``."""
        return {"prev": params, "t": 0}

    def step(self, params: PyTree, grads: PyTree, state: State,
             hparams: PyTree) -> tuple[PyTree, State]:
        """One differentiable step; returns ``(new_params, new_state)``."""
        leaves, spec = tree_flatten(params)
        t = state["t"]
        mus = leafwise(resolve(self.mu, hparams), params)
        Ls = leafwise(resolve(self.L, hparams), params)
        new = []
        for p, g, q, mu, L in zip(leaves, tree_flatten(grads)[0], tree_flatten(state["prev"])[0],
                                  mus, Ls, strict=True):
            if t == 0:
                new.append(p - (2 / (L + mu)) * g)
                continue
            # e^{−arccosh σ} = (√L − √μ)/(√L + √μ): the ratios T_t/T_{t+1} without overflow
            r = (L**0.5 - mu**0.5) / (L**0.5 + mu**0.5)
            rho_prev, rho = _rho(r, t - 1), _rho(r, t)
            new.append(p - (4 * rho / (L - mu)) * g + (rho_prev * rho) * (p - q))
        return tree_unflatten(new, spec), {**state, "prev": params, "t": t + 1}


def _rho(r: Any, k: int) -> Any:
    """T_k(σ)/T_{k+1}(σ) = cosh(kφ)/cosh((k+1)φ) written with r = e^{−φ}."""
    r2k = r ** (2 * k)
    return r * (1 + r2k) / (1 + r2k * r * r)
