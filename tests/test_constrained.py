"""Constrained lower levels: LV-HBA on the known-solution toy, KKT implicit gradients
against finite differences of a closed form, and the two routes against each other."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg
from hypergrad.constrained import ConstrainedProblem
from hypergrad.finite_difference import central_differences
from hypergrad.projections import Custom, Halfspace

from problems import fd_check

DT = torch.float64


# --- LV-HBA on the toy of REFERENCE.md §2 (n = 100, x* = −0.3, λ* = 1) ------------------

def toy_problem(n: int = 100, debug: bool = False) -> ConstrainedProblem:
    def F(y, x, _):
        return 0.5 * ((x["x"] - y["y2"]) ** 2).sum() + 0.5 * ((y["y1"] - 1) ** 2).sum()

    def f(y, x, _):
        return 0.5 * (y["y1"] ** 2).sum() - x["x"] @ y["y1"] + y["y2"].sum()

    def g(y, x, _):
        return -(x["x"].sum() + y["y1"].sum() + y["y2"].sum()).reshape(1)

    C = Halfspace(-torch.ones(3 * n, dtype=DT), 0.0)  # {g ≤ 0} on the flat (x, y1, y2)
    return ConstrainedProblem(f, F, g, 1, joint_set=C, debug=debug)


def run_lvhba(problem, est, x, y, iterations, stop=None):
    state, history = None, []
    for k in range(iterations):
        out = est(problem, x, y, state)
        x = {name: v - est.alpha * out.grad[name] for name, v in x.items()}
        y, state = out.params, out.state
        history.append(out.diagnostics)
        if stop is not None and k % 100 == 0 and stop(x, y, state):
            break
    return x, y, state, history


def test_lvhba_solves_the_known_solution_toy():
    n = 100
    problem = toy_problem(n)
    est = hg.LVHBA(alpha=0.01, beta=0.1, eta=0.01, gamma1=1.0, gamma2=1.0, c_bar=10.0, p=0.3)
    x0 = {"x": torch.zeros(n, dtype=DT)}
    y0 = {"y1": torch.zeros(n, dtype=DT), "y2": torch.zeros(n, dtype=DT)}
    x_star = torch.full((n,), -0.3, dtype=DT)

    def rel_x(x):
        return float((x["x"] - x_star).norm() / x_star.norm())

    def done(x, y, state):
        return rel_x(x) < 5e-3 and abs(float(state["lam"][0]) - 1) < 5e-3

    x, y, state, history = run_lvhba(problem, est, x0, y0, 20_000, stop=done)
    assert rel_x(x) < 1e-2 and abs(float(state["lam"][0]) - 1) < 1e-2
    assert float((y["y1"] - 0.7).abs().max()) < 0.05
    assert float((y["y2"] + 0.4).abs().max()) < 0.05
    # the joint projection keeps g ≤ 0 up to rounding of a 300-term sum (≲ 1e-13; observed
    # 1.4e-14)
    assert history[-1].max_violation < 1e-10
    assert abs(history[-1].value_gap) < 1e-2 < abs(history[0].value_gap)
    assert len(history) < 20_000


def test_lvhba_state_is_explicit_and_resumable():
    problem, est = toy_problem(10), hg.LVHBA()
    x = {"x": torch.zeros(10, dtype=DT)}
    y = {"y1": torch.zeros(10, dtype=DT), "y2": torch.zeros(10, dtype=DT)}
    a = run_lvhba(problem, est, x, y, 6)
    first = run_lvhba(problem, est, x, y, 3)
    state = first[2]
    xs, ys = first[0], first[1]
    for _ in range(3):
        out = est(problem, xs, ys, state)
        xs = {"x": xs["x"] - est.alpha * out.grad["x"]}
        ys, state = out.params, out.state
    assert torch.equal(xs["x"], a[0]["x"]) and state["k"] == 6
    assert set(state) == {"theta", "lam", "z", "k"}


# --- KKT implicit differentiation on a QP with an active coupled constraint ------------

M, N = 6, 4


@pytest.fixture(scope="module")
def qp():
    """f = ½ yᵀAy − (Bx)ᵀy,  g = [1ᵀy + 3 − 0.1 x₀,  −10 − y₀],  F = ½‖y − t‖² + ½‖x‖².

    The first constraint binds (the outer target t pulls 1ᵀy up), the second never does.
    """
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(M, M, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.linspace(1, 5, M, dtype=DT)) @ Q.T
    B = torch.randn(M, N, generator=gen, dtype=DT)
    t = 3.0 + torch.randn(M, generator=gen, dtype=DT)
    direction = torch.linalg.solve(A, B).sum(0)  # 1ᵀA⁻¹B: pushes 1ᵀy above the bound
    x0 = 3.0 * direction / direction.norm() ** 2 + 0.1 * torch.randn(N, generator=gen, dtype=DT)

    def f(y, x, _):
        return 0.5 * y["y"] @ (A @ y["y"]) - (B @ x["x"]) @ y["y"]

    def g(y, x, _):
        return torch.stack([y["y"].sum() + 3 - 0.1 * x["x"][0], -10 - y["y"][0]])

    def F(y, x, _):
        return 0.5 * ((y["y"] - t) ** 2).sum() + 0.5 * (x["x"] ** 2).sum()

    def solve(x):
        """y*, μ* with the first constraint active: [[A, 1], [1ᵀ, 0]] (y, μ) = (Bx, x₀/10 − 3)."""
        K = torch.zeros(M + 1, M + 1, dtype=DT)
        K[:M, :M], K[:M, M], K[M, :M] = A, 1, 1
        rhs = torch.cat([B @ x, (0.1 * x[0] - 3).reshape(1)])
        sol = torch.linalg.solve(K, rhs)
        return sol[:M], sol[M]

    C = Halfspace(torch.cat([torch.tensor([-0.1, 0, 0, 0], dtype=DT), torch.ones(M, dtype=DT)]),
                  -3.0)  # the binding constraint on the flat (x, y), for LV-HBA
    problem = ConstrainedProblem(f, F, g, 2, joint_set=C)
    return problem, x0, solve, F, A, B, t


def _h(F, solve, x):
    return float(F({"y": solve(x)[0]}, {"x": x}, None))


def test_qp_setting_has_an_active_constraint_with_positive_multiplier(qp):
    problem, x0, solve, _, A, B, _ = qp
    y, mu = solve(x0)
    unconstrained = torch.linalg.solve(A, B @ x0)
    assert float(unconstrained.sum()) > 0.1 * float(x0[0]) - 3  # the constraint binds
    assert float(mu) > 0.1


@pytest.mark.parametrize("given_multipliers", [False, True])
def test_kkt_hypergradient_matches_finite_differences(qp, given_multipliers):
    problem, x0, solve, F, *_ = qp
    y, mu = solve(x0)
    state = {"multipliers": torch.stack([mu, torch.zeros((), dtype=DT)])} \
        if given_multipliers else None
    out = hg.KKTImplicit(solver=hg.GMRES(tol=1e-13))(problem, {"x": x0}, {"y": y}, state)
    # h is quadratic in x (y*(x) is linear while the constraint stays active), so the
    # differences have no truncation error and a large step keeps rounding (≈ 3σ/(√2 s),
    # σ ≈ EPS·|h|) small: the bar resolves ~2e-11 of each derivative at s = 1e-3.
    fd = central_differences(lambda x: _h(F, solve, x), x0, list(torch.eye(N, dtype=DT)), 1e-3)
    check = fd_check(out.grad["x"], fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-6, check.verdict  # a wrong sign or a missing term shows
    assert out.state["active"] == [0]
    # GMRES at tol 1e-13 on the 7×7 KKT system vs a dense solve (observed 9e-16)
    assert abs(out.diagnostics.multipliers[0] - float(mu)) < 1e-10
    assert out.diagnostics.multipliers[1] == 0.0
    assert out.diagnostics.solve_converged


def test_kkt_warns_away_from_a_kkt_point(qp):
    problem, x0, solve, *_ = qp
    y, _ = solve(x0)
    with pytest.warns(hg.ConvergenceWarning, match="not a KKT point"):
        hg.KKTImplicit()(problem, {"x": x0}, {"y": y + 0.01})


def test_lvhba_and_kkt_descent_reach_the_same_point(qp):
    """Both routes to the constrained bilevel solution agree on x*."""
    problem, x0, solve, *_ = qp
    kkt, x = hg.KKTImplicit(), x0.clone()
    for _ in range(300):
        y, mu = solve(x)
        out = kkt(problem, {"x": x}, {"y": y}, {"multipliers": torch.stack([mu, mu * 0])})
        x = x - 0.1 * out.grad["x"]
    assert float(out.grad["x"].norm()) < 1e-10
    x_kkt, (y_kkt, mu_kkt) = x, solve(x)
    assert float(mu_kkt) > 0.1  # still active at the solution: the closed form holds

    est = hg.LVHBA(alpha=0.2, beta=0.1, eta=0.2, gamma1=1.0, gamma2=1.0, c_bar=10.0, p=0.3)
    xs, ys, state, history = run_lvhba(problem, est, {"x": x0.clone()},
                                       {"y": solve(x0)[0]}, 3000)
    assert float((xs["x"] - x_kkt).norm() / x_kkt.norm()) < 1e-2
    assert float((ys["y"] - y_kkt).norm() / y_kkt.norm()) < 1e-2
    assert abs(float(state["lam"][0]) - float(mu_kkt)) < 1e-2


# --- Bad input ----------------------------------------------------------------------

def test_constraints_of_the_wrong_shape_are_rejected():
    problem = ConstrainedProblem(lambda y, x, b: (y["y"] ** 2).sum() + x["x"].sum(),
                                 lambda y, x, b: y["y"].sum(),
                                 lambda y, x, b: y["y"][:2], 3)
    with pytest.raises(hg.BilevelInputError, match=r"shape \(3,\), got \(2,\)"):
        hg.LVHBA()(problem, {"x": torch.zeros(2, dtype=DT)}, {"y": torch.zeros(4, dtype=DT)})
    with pytest.raises(hg.BilevelInputError, match="num_constraints"):
        ConstrainedProblem(problem.inner_loss, problem.outer_loss, problem.constraints, 0)


def test_infeasible_start_is_rejected():
    problem = toy_problem(5)
    x = {"x": -torch.ones(5, dtype=DT)}
    y = {"y1": torch.zeros(5, dtype=DT), "y2": torch.zeros(5, dtype=DT)}
    with pytest.raises(hg.BilevelInputError, match="joint_set"):
        hg.LVHBA()(problem, x, y)


def test_debug_mode_catches_a_projection_that_leaves_its_set():
    wrong = Custom(lambda v: v + 1.0, contains=lambda v, tol=1e-8: bool((v <= 0).all()))
    problem = ConstrainedProblem(lambda y, x, b: ((y["y"] - x["x"]) ** 2).sum(),
                                 lambda y, x, b: (y["y"] ** 2).sum(),
                                 inner_set=wrong, debug=True)
    with pytest.raises(hg.BilevelInputError, match="inner_set"):
        hg.LVHBA()(problem, {"x": torch.zeros(3, dtype=DT)}, {"y": -torch.ones(3, dtype=DT)})


def test_lvhba_settings_are_checked():
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        hg.LVHBA(alpha=0)
    with pytest.raises(ValueError, match=r"p must lie in \(0, 0.5\)"):
        hg.LVHBA(p=0.7)


def test_lvhba_without_constraints_reaches_the_implicit_gradient_stationary_point(qp):
    """A strongly convex unconstrained lower level: LV-HBA and implicit-gradient descent
    (the core's Implicit estimator) reach the same x*, which has a closed form here."""
    problem, x0, _, F, A, B, target = qp
    f = problem.inner_loss
    M = torch.linalg.solve(A, B)  # y*(x) = M x, h(x) = ½‖Mx − t‖² + ½‖x‖²
    x_star = torch.linalg.solve(M.T @ M + torch.eye(N, dtype=DT), M.T @ target)

    core = hg.Problem(f, F, optimizer=hg.SGD(lr=0.3), steps=40)
    x, w = x0.clone(), {"y": torch.zeros(M.shape[0], dtype=DT)}
    state = None
    for _ in range(200):
        out = hg.Implicit()(core, {"x": x}, w, state)
        x, w, state = x - 0.3 * out.grad["x"], out.params, out.state
    assert float((x - x_star).norm() / x_star.norm()) < 1e-8

    free = ConstrainedProblem(f, F)
    est = hg.LVHBA(alpha=0.2, beta=0.1, eta=0.2, c_bar=10.0, p=0.3)
    xs, ys, _, history = run_lvhba(free, est, {"x": x0.clone()}, {"y": M @ x0}, 3000)
    assert float((xs["x"] - x_star).norm() / x_star.norm()) < 1e-2
    assert history[-1].inner_grad_norm < 1e-2 * history[0].inner_grad_norm


def test_compiled_lvhba_equals_eager():
    """``compile=True`` runs the same iteration through torch.compile (one compilation)."""
    problem = toy_problem(20)
    x = {"x": torch.zeros(20, dtype=DT)}
    y = {"y1": torch.zeros(20, dtype=DT), "y2": torch.zeros(20, dtype=DT)}
    eager = run_lvhba(problem, hg.LVHBA(), x, y, 30)
    compiled = run_lvhba(problem, hg.LVHBA(compile=True), x, y, 30)
    # inductor fuses and reorders the same float64 arithmetic (no fast-math): 30 iterations
    # on 60 unknowns differ by a few ulp (observed ≤ 5e-4 of these tolerances on AVX-512,
    # AVX2, scalar kernels and MKL_CBWR=COMPATIBLE)
    assert torch.allclose(compiled[0]["x"], eager[0]["x"], rtol=1e-12, atol=1e-14)
    assert torch.allclose(compiled[2]["lam"], eager[2]["lam"], rtol=1e-12, atol=1e-14)
    assert compiled[3][-1].value_gap == pytest.approx(eager[3][-1].value_gap, rel=1e-9, abs=1e-12)
