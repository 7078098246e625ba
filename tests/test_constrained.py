"""Constrained lower levels: LV-HBA on the known-solution toy, KKT implicit gradients
against finite differences of a closed form, and the two routes against each other."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hypergrad as hg
from hypergrad.constrained import ConstrainedProblem
from hypergrad.finite_difference import central_differences
from hypergrad.projections import Ball, Box, Custom, Halfspace, Simplex

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


# --- LVHBA.run: many iterations on flat vectors, diagnostics every k-th ------------------

def _toy_start(n):
    return ({"x": torch.zeros(n, dtype=DT)},
            {"y1": torch.zeros(n, dtype=DT), "y2": torch.zeros(n, dtype=DT)})


def closed_form_lvhba(n, iterations, est):
    """The LV-HBA iteration on the toy with its gradients written out (no autograd, no
    projections module): θ, then λ with the new θ, then (x, y) with the new θ and λ,
    then z with the new λ. Returns x, y1, y2, θ, λ, z."""
    a, b, e, g1, g2 = est.alpha, est.beta, est.eta, est.gamma1, est.gamma2
    v, theta = torch.zeros(3 * n, dtype=DT), torch.zeros(2 * n, dtype=DT)
    lam = z = torch.zeros((), dtype=DT)
    for k in range(iterations):
        c = est.c_bar * (k + 1) ** est.p
        x, y1, y2 = v[:n], v[n:2 * n], v[2 * n:]
        grad_theta = torch.cat([theta[:n] - x - lam, (1 - lam).expand(n)])
        theta = theta - e * (grad_theta + (theta - v[n:]) / g1)
        lam = (lam + e * (-(x.sum() + theta.sum()) - (lam - z) / g2)).clamp_min(0)
        d = torch.cat([(x - y2) / c - y1 + theta[:n] + lam,
                       (y1 - 1) / c + (y1 - x) - (y1 - theta[:n]) / g1,
                       (y2 - x) / c + 1 - (y2 - theta[n:]) / g1])
        v = v - a * d
        v = v + (-v.sum()).clamp_min(0) / (3 * n)  # Proj onto {−1ᵀv ≤ 0}
        z = (z - b * (z - lam) / g2).clamp(0, est.r)
    return v[:n], v[n:2 * n], v[2 * n:], theta, lam, z


def test_lvhba_run_and_calls_follow_the_written_out_iteration():
    """run() and a loop of calls against the toy's iteration with hand-written gradients.

    The two differ only in the order of floating-point operations (autograd and the
    projection module against closed forms): 400 iterations on 30 unknowns agreed to
    ≤ 3e-14 relative (observed, largest in x); the bound, 1e-12, leaves room for other
    kernels, while a wrong order of updates (λ stepped with the old θ) shows at 3e-3."""
    n, iterations = 10, 400
    est = hg.LVHBA(diagnostics_every=50)
    x_ref, y1_ref, y2_ref, theta_ref, lam_ref, z_ref = closed_form_lvhba(n, iterations, est)
    out = est.run(toy_problem(n), *_toy_start(n), iterations)
    calls = run_lvhba(toy_problem(n), est, *_toy_start(n), iterations)
    for x, y, state in ((out.hparams, out.params, out.state), calls[:3]):
        for got, want in ((x["x"], x_ref), (y["y1"], y1_ref), (y["y2"], y2_ref),
                          (torch.cat([state["theta"]["y1"], state["theta"]["y2"]]), theta_ref),
                          (state["lam"][0], lam_ref), (state["z"][0], z_ref)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
        assert state["k"] == iterations


def test_lvhba_run_equals_a_loop_of_calls():
    """Same iterates as calls, up to the round trip x − α·((x − x⁺)/α) of a call's x-step
    (a few ulp per iteration; observed: bitwise equal on this toy), on a problem with two
    constraints, separate sets X and Y and a dict of per-leaf projections."""
    problem, x, y = _sets_problem()
    est = hg.LVHBA(alpha=0.05, eta=0.05, diagnostics_every=7)
    out = est.run(problem, x, y, 60)
    xs, ys, state, history = run_lvhba(problem, est, x, y, 60)
    for got, want in ((out.hparams, xs), (out.params, ys), (out.state["theta"], state["theta"])):
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=1e-12, atol=1e-14)
    assert torch.allclose(out.state["lam"], state["lam"], rtol=1e-12, atol=1e-14)
    assert torch.allclose(out.state["z"], state["z"], rtol=1e-12, atol=1e-14)
    assert float(out.state["lam"].max()) > 0  # a constraint is active: λ is exercised
    # the diagnostics of run() are those of the calls at the same iterations
    assert [d.iteration for d in out.diagnostics] == [0, 7, 14, 21, 28, 35, 42, 49, 56, 59]
    for d in out.diagnostics:
        ref = history[d.iteration]
        assert ref.iteration == d.iteration and d.penalty == ref.penalty
        for name in ("outer_loss", "inner_grad_norm", "max_violation", "value_gap",
                     "theta_gap"):
            assert getattr(d, name) == pytest.approx(getattr(ref, name), rel=1e-12, abs=1e-15)
        assert d.multipliers == pytest.approx(ref.multipliers, rel=1e-12, abs=1e-15)


def _sets_problem():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(3, 4, generator=gen, dtype=DT)

    def f(y, x, _):
        return (0.5 * (y["a"] ** 2).sum() - (x["w"] * y["a"]).sum()
                + 0.3 * (y["b"] - x["s"].sum()).pow(2).sum())

    def F(y, x, _):
        return (((y["a"] - W) ** 2).sum() + (y["b"] ** 2).sum() + 0.1 * (x["w"] ** 2).sum()
                + x["s"].sum() ** 2)

    def g(y, x, _):
        return torch.stack([y["a"].sum() - 1.0 - x["s"].sum(), 0.5 - y["b"].sum()])

    problem = ConstrainedProblem(f, F, g, 2, inner_set={"a": Box(-0.5, 0.8), "b": Ball(2.0)},
                                 outer_set=Box(-1.0, 1.0))
    x = {"w": torch.zeros(3, 4, dtype=DT), "s": torch.zeros(2, dtype=DT)}
    y = {"a": torch.zeros(3, 4, dtype=DT), "b": torch.full((5,), 0.2, dtype=DT)}
    return problem, x, y


def test_lvhba_diagnostics_every_changes_no_iterate_and_resumes_its_schedule():
    problem = toy_problem(10)
    every_1 = hg.LVHBA(diagnostics_every=1).run(problem, *_toy_start(10), 250)
    every_100 = hg.LVHBA(diagnostics_every=100).run(problem, *_toy_start(10), 250)
    for a, b in ((every_1.hparams, every_100.hparams), (every_1.params, every_100.params),
                 (every_1.state["theta"], every_100.state["theta"])):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(every_1.state["lam"], every_100.state["lam"])
    assert [d.iteration for d in every_1.diagnostics] == list(range(250))
    # every 100th iteration (k = 0, 100, 200) and the last, always
    assert [d.iteration for d in every_100.diagnostics] == [0, 100, 200, 249]
    assert [d.inner_steps for d in every_100.diagnostics] == [1, 101, 201, 250]
    assert every_100.diagnostics[-1] == replace(every_1.diagnostics[-1],
                                                seconds=every_100.diagnostics[-1].seconds)
    # continuing from the state: the same iterates, the schedule follows k
    est = hg.LVHBA(diagnostics_every=100)
    first = est.run(problem, *_toy_start(10), 150)
    second = est.run(problem, first.hparams, first.params, 100, first.state)
    assert torch.equal(second.hparams["x"], every_100.hparams["x"])
    assert second.state["k"] == 250
    assert [d.iteration for d in first.diagnostics + second.diagnostics] == [0, 100, 149, 200,
                                                                            249]


def test_lvhba_run_reports_divergence_at_the_next_diagnosed_iteration():
    """η(1 + 1/γ1) = 10 makes the θ-step expand by 9 per iteration: inf after ~330
    iterations, then NaN; with diagnostics every 500th iteration it is caught at k = 500."""
    est = hg.LVHBA(alpha=0.01, eta=5.0, diagnostics_every=500)
    with pytest.raises(hg.DivergenceError, match=r"NaN or inf in .*θ.* after iteration 500"):
        est.run(toy_problem(5), *_toy_start(5), 2000)


def test_lvhba_run_rejects_bad_input():
    problem, est = toy_problem(4), hg.LVHBA()
    x, y = _toy_start(4)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        est.run(problem, x, y, 0)
    with pytest.raises(ValueError, match="diagnostics_every must be a positive int"):
        hg.LVHBA(diagnostics_every=0)
    with pytest.raises(hg.BilevelInputError, match="one dtype and device"):
        est.run(problem, {"x": x["x"].float()}, y, 3)
    with pytest.raises(hg.BilevelInputError, match=r"state\['theta'\]"):
        est.run(problem, x, y, 3, {"theta": {"y1": y["y1"]}, "lam": torch.zeros(1, dtype=DT),
                                   "z": torch.zeros(1, dtype=DT), "k": 1})
    with pytest.raises(hg.BilevelInputError, match=r"state\['lam'\] must be a tensor of shape"):
        est(problem, x, y, {"theta": y, "lam": torch.zeros(2, dtype=DT),
                            "z": torch.zeros(1, dtype=DT), "k": 1})


@pytest.mark.parametrize("case", ["joint", "dict_and_box", "single_on_many_leaves"])
def test_flat_projections_equal_the_tree_projections(case):
    """ConstrainedProblem.flat_projections acts on flat vectors exactly as project_y and
    project_xy act on the trees (same values, bitwise)."""
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(3, 4, generator=gen, dtype=DT), "s": torch.randn(2, generator=gen,
                                                                          dtype=DT)}
    y = {"a": 3 * torch.randn(3, 4, generator=gen, dtype=DT),
         "b": 3 * torch.randn(5, generator=gen, dtype=DT)}
    f = lambda y, x, b: y["a"].sum()  # noqa: E731
    sets = {
        "joint": dict(joint_set=Halfspace(torch.ones(31, dtype=DT), -100.0),
                      inner_set=Ball(1.0)),
        "dict_and_box": dict(inner_set={"a": Box(-0.5, 0.8), "b": Ball(2.0)},
                             outer_set={"w": Box(-1.0, 1.0)}),  # "s" left free
        "single_on_many_leaves": dict(inner_set=Simplex(), outer_set=None),
    }[case]
    problem = ConstrainedProblem(f, f, **sets)
    project_y, project_xy = problem.flat_projections(x, y)
    ravel = hg.pytree.tree_ravel
    assert torch.equal(project_y(ravel(y)), ravel(problem.project_y(y)))
    v = torch.cat([ravel(x), ravel(y)])
    assert torch.equal(project_xy(v), torch.cat([ravel(t) for t in problem.project_xy(x, y)]))
    assert not torch.equal(project_xy(v), v)  # the sets do move the point
    assert ConstrainedProblem(f, f).flat_projections(x, y) == (None, None)


def test_kkt_auto_hvp_probes_once_for_a_problem(qp, monkeypatch):
    """KKTImplicit's Lagrangian takes the multipliers and active set as data, so
    hvp="auto" remembers its choice across calls (it probed on every call when they were
    captured by a new closure each time), and the results equal hvp="linearized"."""
    import sys

    import hypergrad.implicit_diff as implicit_diff

    hvp_module = sys.modules["hypergrad.hvp"]  # (hypergrad.hvp is also the function)
    problem, x0, solve, *_ = qp
    hvp_module.clear_mode_cache()
    probes = []
    real = implicit_diff.choose_between
    monkeypatch.setattr(implicit_diff, "choose_between",
                        lambda *a, **k: (probes.append(1), real(*a, **k))[1])
    for shift in (0.0, 0.01, 0.02):
        x = x0 + shift
        y, mu = solve(x)
        auto = hg.KKTImplicit(solver=hg.GMRES(tol=1e-13))(problem, {"x": x}, {"y": y})
        fixed = hg.KKTImplicit(solver=hg.GMRES(tol=1e-13), hvp="linearized")(
            problem, {"x": x}, {"y": y})
        assert torch.allclose(auto.grad["x"], fixed.grad["x"], rtol=1e-9, atol=1e-12)
    assert len(probes) == 1
    hvp_module.clear_mode_cache()
