"""The unrolled Jacobian against the closed form of Scieur et al. (2022), t = 1..500.

For f(x, θ) = ½ xᵀ(H₀ + θI)x + bᵀx and a first-order method with residual polynomial
P_t (x_t − x* = P_t(H)(x_0 − x*)), differentiating in θ gives, with x_0 fixed,

    ∂x_t = ∂x* − P_t(H) ∂x* + P_t′(H)(x_0 − x*),    ∂x* = −H⁻¹ x*.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import jvp

import hypergrad as hg

DT = torch.float64
D, MU, L, T = 12, 1.0, 100.0, 500


@pytest.fixture(scope="module")
def quadratic():
    g = torch.Generator().manual_seed(0)
    eig = torch.cat([torch.tensor([MU, L], dtype=DT),
                     MU + (L - MU) * torch.rand(D - 2, generator=g, dtype=DT)])
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
    b = torch.randn(D, generator=g, dtype=DT)
    return eig, Q, b


def _problem(eig, Q, b, optimizer, steps=T):
    H0 = Q @ torch.diag(eig) @ Q.T

    def f(p, h, _):
        x = p["x"]
        return 0.5 * x @ (H0 @ x) + 0.5 * h["theta"] * (x @ x) + b @ x

    c = torch.linspace(-1, 1, D, dtype=DT)
    return hg.Problem(f, lambda p, h, _: c @ p["x"], optimizer=optimizer, steps=steps), c


def _unrolled_jacobians(problem):
    """dx_t/dθ for t = 1..T, by forward mode through the library's inner steps."""
    def iterates(theta):
        hp = {"theta": theta}
        p = {"x": torch.zeros(D, dtype=DT)}
        state = problem.optimizer.init(p)
        xs = []
        for t in range(problem.steps):
            p, state = problem.step(p, state, hp, t)
            xs.append(p["x"])
        return torch.stack(xs)

    zero = torch.zeros((), dtype=DT)
    return jvp(iterates, (zero,), (torch.ones((), dtype=DT),))[1]


def _closed_form(eig, Q, b, P, dP):
    """∂x_t in the original basis for t = 1..T from P_t and P_t′ on the eigenvalues."""
    bq = Q.T @ b
    x_star = -bq / eig
    dx_star = -x_star / eig
    ts = torch.arange(1, T + 1, dtype=DT)[:, None]
    jac = dx_star - P(ts, eig) * dx_star + dP(ts, eig) * (0 - x_star)
    return jac @ Q.T, dx_star @ Q.T


def _gd_polynomials(h):
    P = lambda t, lam: (1 - h * lam) ** t  # noqa: E731
    dP = lambda t, lam: -t * h * (1 - h * lam) ** (t - 1)  # noqa: E731
    return P, dP


def _chebyshev_polynomials():
    sigma = lambda lam: (L + MU - 2 * lam) / (L - MU)  # noqa: E731
    s0 = (L + MU) / (L - MU)

    def tu(n_max, x):
        """T_n(x) and U_{n-1}(x) for n = 1..n_max by the three-term recurrences."""
        T_prev, T_cur = torch.ones_like(x), x
        U_prev, U_cur = torch.zeros_like(x), torch.ones_like(x)  # U_{-1}, U_0
        Ts, Us = [T_cur], [U_cur]
        for _ in range(n_max - 1):
            T_prev, T_cur = T_cur, 2 * x * T_cur - T_prev
            U_prev, U_cur = U_cur, 2 * x * U_cur - U_prev
            Ts.append(T_cur)
            Us.append(U_cur)
        return torch.stack(Ts), torch.stack(Us)

    ts = torch.arange(1, T + 1, dtype=DT)[:, None]
    T0 = torch.cosh(ts * math.acosh(s0))

    def P(t, lam):
        return tu(T, sigma(lam))[0] / T0

    def dP(t, lam):
        return t * tu(T, sigma(lam))[1] * (-2 / (L - MU)) / T0

    return P, dP


CASES = {
    "gd_1/L": (lambda: hg.SGD(lr=1 / L), lambda: _gd_polynomials(1 / L)),
    "gd_1.5/L": (lambda: hg.SGD(lr=1.5 / L), lambda: _gd_polynomials(1.5 / L)),
    "gd_1.98/L": (lambda: hg.SGD(lr=1.98 / L), lambda: _gd_polynomials(1.98 / L)),
    "chebyshev": (lambda: hg.Chebyshev(mu=MU, L=L), _chebyshev_polynomials),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unrolled_jacobian_equals_closed_form_at_every_step(quadratic, case):
    eig, Q, b = quadratic
    make_opt, make_poly = CASES[case]
    problem, c = _problem(eig, Q, b, make_opt())
    jac = _unrolled_jacobians(problem)
    closed, dx_star = _closed_form(eig, Q, b, *make_poly())
    scale = torch.maximum(closed.norm(dim=1), dx_star.norm().expand(T))
    err = (jac - closed).norm(dim=1) / scale
    # 500 steps on 12 unknowns at κ = 100 round to ≤ rounding(500·12, 100) ≈ 2.7e-10 even in
    # the worst case (observed 5e-15)
    assert float(err.max()) < 1e-9, (int(err.argmax()) + 1, float(err.max()))
    # the Jacobian error itself (not only the Jacobian) follows the closed form
    gap, gap_closed = (jac - dx_star).norm(dim=1), (closed - dx_star).norm(dim=1)
    visible = gap_closed > 1e-6 * dx_star.norm()
    assert float(((gap - gap_closed).abs() / gap_closed)[visible].max()) < 1e-6


def test_large_steps_burn_in_before_the_jacobian_converges(quadratic):
    """Near 2/L the mode λ = L has |1 − hλ| = r close to 1: its iterate error r^t falls
    from the start, its Jacobian error t·h·r^{t−1}·|x_0 − x*| first grows for ≈ 1/(1 − r)
    steps (the curse of unrolling)."""
    eig, Q, b = quadratic
    h = 1.98 / L
    problem, _ = _problem(eig, Q, b, hg.SGD(lr=h))
    jac = _unrolled_jacobians(problem) @ Q  # eigenbasis
    _, dx_star = _closed_form(eig, Q, b, *_gd_polynomials(h))
    mode = 1  # eig[1] == L
    gap = (jac[:, mode] - (dx_star @ Q)[mode]).abs()
    peak = int(gap.argmax()) + 1
    burn_in = 1 / (1 - abs(1 - h * L))
    assert 0.5 * burn_in < peak < 1.5 * burn_in, (peak, burn_in)
    assert gap[peak - 1] > 10 * gap[0] and gap[-1] < gap[peak - 1]


@pytest.mark.parametrize("steps", [1, 10, 100, 500])
@pytest.mark.parametrize("case", ["gd_1.98/L", "chebyshev"])
def test_unrolled_estimator_is_the_closed_form_projection(quadratic, steps, case):
    eig, Q, b = quadratic
    make_opt, make_poly = CASES[case]
    problem, c = _problem(eig, Q, b, make_opt(), steps=steps)
    closed, _ = _closed_form(eig, Q, b, *make_poly())
    hparams, params = {"theta": torch.zeros((), dtype=DT)}, {"x": torch.zeros(D, dtype=DT)}
    for est in (hg.Unrolled(), hg.Unrolled(mode="forward"), hg.Unrolled(recompute=True)):
        with warnings.catch_warnings():  # x_1 = −h b does not depend on θ: a zero gradient
            warnings.simplefilter("ignore" if steps == 1 else "error", RuntimeWarning)
            out = est(problem, hparams, params)
        expected = c @ closed[steps - 1]
        assert abs(float(out.grad["theta"] - expected)) < 1e-9 * max(1.0, abs(float(expected)))
