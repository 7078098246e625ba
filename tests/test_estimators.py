"""Estimators against closed forms and finite differences (float64)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import hypergrad as hg

from problems import DT, Ridge, logistic_problem, rel, rounding, with_estimate


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge.make()


def test_implicit_cg_matches_closed_form(ridge):
    problem = ridge.problem()
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-14, maxiter=50), inner_steps=0)
    out = hg.hypergradient(problem, ridge.hparams(), {"w": ridge.w_star()}, est)
    # Ridge's A has κ ≈ 3: CG's error ≤ κ·tol ≈ 3e-14, rounding ~1e-15 (observed 6e-16);
    # the 1e-10-1e-9 bounds of these closed-form tests keep > 1e5 margin and still see a
    # missing term or a wrong sign (O(1) relative)
    assert rel(out.grad["lam"], ridge.hypergrad()) < 1e-10
    d = out.diagnostics
    assert d.solve_converged and d.solve_residual < 1e-13  # CG's own residual, ≤ tol 1e-14
    # ‖∇_w f(w*)‖ = ‖A w* − Xᵀy/n‖ at the closed-form w*: ≈ 60 terms × EPS × ‖A‖‖w‖ ≈ 4e-14
    # at worst (observed 5e-16)
    assert d.inner_grad_norm < 1e-12 and d.solve_iterations <= 8


@pytest.mark.parametrize("mode", ["linearized", "jvp", "reverse"])
def test_implicit_every_hvp_mode(ridge, mode):
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-13), hvp=mode, inner_steps=0)
    out = est(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()})
    assert rel(out.grad["lam"], ridge.hypergrad()) < 1e-10


def test_implicit_solves_inner_problem_and_warm_starts(ridge):
    problem = ridge.problem(steps=2000)
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-12))
    first = est(problem, ridge.hparams(), ridge.params0())
    assert rel(first.grad["lam"], ridge.hypergrad()) < 1e-9
    # GD's fixed point is w* up to κ·EPS-level rounding (observed 1e-16 to 3e-16)
    assert rel(first.params["w"], ridge.w_star()) < 1e-12
    again = est(problem, ridge.hparams(), first.params, first.state)
    assert again.diagnostics.solve_iterations <= 1
    assert rel(again.grad["lam"], ridge.hypergrad()) < 1e-9


def test_implicit_warns_at_unconverged_inner_solve(ridge):
    with pytest.warns(hg.ConvergenceWarning, match="not converged"):
        out = hg.Implicit(inner_tol=1e-6)(ridge.problem(steps=3), ridge.hparams(), ridge.params0())
    assert out.diagnostics.inner_grad_norm > 1e-3


def test_implicit_warns_when_solve_stops_short(ridge):
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-14, maxiter=2), inner_steps=0)
    with pytest.warns(hg.ConvergenceWarning, match="linear solve"):
        out = est(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()})
    assert not out.diagnostics.solve_converged
    assert out.diagnostics.solve_residual > 1e-6


def _budgets(rate: float, start: float = 1e-2) -> np.ndarray:
    """Iteration counts over which rate^k falls from ``start`` to 1e-11 (above round-off)."""
    lo, hi = (math.log(x) / math.log(rate) for x in (start, 1e-11))
    return np.unique(np.linspace(lo, hi, 8).astype(int))


def test_neumann_error_follows_its_rate(ridge):
    """K Neumann terms leave v_K − v = −(I − αH)^{K+1} v: error ∝ (1 − αμ)^K."""
    mu, L = ridge.eigs()
    alpha = 1.0 / L
    A, w = ridge.A(), ridge.w_star()
    v = torch.linalg.solve(A, ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / ridge.Xv.shape[0])
    ks = _budgets(1 - alpha * mu, start=1e-4)
    errors = []
    for k in ks:
        est = hg.Implicit(solver=hg.Neumann(alpha=alpha, terms=int(k)), inner_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.ConvergenceWarning)
            out = est(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()})
        residual = torch.linalg.matrix_power(torch.eye(len(w), dtype=DT) - alpha * A, int(k) + 1)
        predicted = ridge.lam.exp() * w * (residual @ v)
        diff = out.grad["lam"] - ridge.hypergrad()
        # the prediction to 1e-6, above the rounding of K Neumann terms on 8 unknowns
        # (rounding(K·8, κ)·‖∇h‖ ≤ 2e-13, 6 % of the smallest predicted error)
        floor = rounding(int(k) * len(w), L / mu) * float(ridge.hypergrad().norm())
        assert (diff - predicted).norm() < 1e-6 * predicted.norm() + floor
        errors.append(rel(out.grad["lam"], ridge.hypergrad()))
    rate = math.exp(np.polyfit(ks, np.log(errors), 1)[0])
    assert abs(rate - (1 - alpha * mu)) < 0.01, (rate, 1 - alpha * mu)


def test_unrolled_gd_converges_to_closed_form(ridge):
    out = hg.Unrolled()(ridge.problem(steps=600), ridge.hparams(), ridge.params0())
    assert rel(out.grad["lam"], ridge.hypergrad()) < 1e-8
    assert out.diagnostics.inner_grad_norm < 1e-10


def test_forward_mode_equals_reverse_mode(ridge):
    problem = ridge.problem(optimizer=hg.Momentum(lr=0.05, momentum=0.8), steps=60)
    rev = hg.Unrolled()(problem, ridge.hparams(), ridge.params0())
    fwd = hg.Unrolled(mode="forward")(problem, ridge.hparams(), ridge.params0())
    # two accumulation orders over 60 steps of 60-sample products: rounding errors add as a
    # random walk, ≈ √(60·68)·EPS·κ ≈ 4e-14 (the worst case rounding(60·68, 3) ≈ 1e-11 is
    # not reached); observed ≤ 6e-16 on AVX-512, AVX2, scalar kernels and MKL_CBWR
    assert rel(fwd.grad["lam"], rev.grad["lam"]) < 1e-12
    # the forward pass is the same primal arithmetic under jvp (observed bit-equal)
    assert rel(fwd.params["w"], rev.params["w"]) < 1e-14


@pytest.mark.parametrize("optimizer", [hg.SGD(lr=0.1), hg.Adam(lr=0.05)])
@pytest.mark.parametrize("segment", [1, 7, None])
def test_recompute_equals_plain_unrolled(ridge, optimizer, segment):
    problem = ridge.problem(optimizer=optimizer, steps=50)
    plain = hg.Unrolled()(problem, ridge.hparams(), ridge.params0())
    recomputed = hg.Unrolled(recompute=True, segment=segment)(problem, ridge.hparams(),
                                                              ridge.params0())
    # the backward pass sums the same terms segment by segment (observed ≤ 7e-16, as above)
    assert rel(recomputed.grad["lam"], plain.grad["lam"]) < 1e-12
    assert torch.equal(recomputed.params["w"], plain.params["w"])


def test_truncated_bias_matches_theory(ridge):
    """At the fixed point the K-step bias is ∇²_λw f · H⁻¹ (I − γH)^K ∇_w F, ∝ (1 − γμ)^K."""
    mu, L = ridge.eigs()
    gamma = 1.0 / L
    A, w = ridge.A(), ridge.w_star()
    gF = ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / ridge.Xv.shape[0]
    exact = ridge.hypergrad()
    ks = _budgets(1 - gamma * mu, start=1e-4)
    errors = []
    problem = ridge.problem(steps=400)
    for k in ks:
        out = hg.Truncated(window=int(k))(problem, ridge.hparams(), ridge.params0())
        damped = torch.linalg.matrix_power(torch.eye(len(w), dtype=DT) - gamma * A, int(k)) @ gF
        bias = -ridge.lam.exp() * w * torch.linalg.solve(A, damped)
        floor = rounding(int(k) * len(w), L / mu) * float(exact.norm())  # as for Neumann
        assert (out.grad["lam"] - exact + bias).norm() < 1e-6 * bias.norm() + floor
        errors.append(rel(out.grad["lam"], exact))
    rate = math.exp(np.polyfit(ks, np.log(errors), 1)[0])
    assert abs(rate - (1 - gamma * mu)) < 0.01, (rate, 1 - gamma * mu)


def test_random_window_is_reproducible_and_carries_draws(ridge):
    problem = ridge.problem(steps=40)
    est = hg.Truncated(window=10, random=True, seed=3)
    starts = [est.window_start(40, i) for i in range(50)]
    assert min(starts) >= 0 and max(starts) <= 30 and len(set(starts)) > 10
    a = est(problem, ridge.hparams(), ridge.params0())
    b = est(problem, ridge.hparams(), ridge.params0())
    assert torch.equal(a.grad["lam"], b.grad["lam"])
    assert a.state["draws"] == 1
    c = est(problem, ridge.hparams(), ridge.params0(), a.state)
    assert c.state["draws"] == 2
    assert c.diagnostics.inner_steps == est.window_start(40, 1) + 10


def test_truncated_full_window_equals_unrolled(ridge):
    problem = ridge.problem(steps=30)
    full = hg.Unrolled()(problem, ridge.hparams(), ridge.params0())
    trunc = hg.Truncated(window=30)(problem, ridge.hparams(), ridge.params0())
    assert rel(trunc.grad["lam"], full.grad["lam"]) < 1e-13  # the same steps (observed equal)


# --- L2-regularised logistic regression on breast_cancer: every estimator vs FD ---------

@pytest.fixture(scope="module")
def logistic():
    """The problem (κ ≈ 12, T = 300 GD steps), w*, and central differences of h(λ)."""
    problem, hparams, params = logistic_problem(steps=300, optimizer=hg.SGD(lr=1.4))
    w_star, _ = problem.solve_inner(params, hparams, steps=600)
    check = hg.check_hypergradient(problem, hparams, w_star, hg.Implicit(inner_steps=0),
                                   coords=8, eps=1e-4)
    assert check.agrees, check.verdict
    # the bar resolves every probed derivative to 1e-6 (observed 3e-9: truncation ≈ 2e-12,
    # rounding ≈ 9e-13 against derivatives ≥ 3e-4): a wrong sign or a missing term shows
    assert check.resolution < 1e-6, check.verdict
    assert check.finite_difference.abs().max() > 1e-3  # the check is not vacuous
    return problem, hparams, w_star, check


ESTIMATORS = {
    "unrolled": hg.Unrolled(),
    "recompute": hg.Unrolled(recompute=True),
    "forward": hg.Unrolled(mode="forward"),
    "truncated": hg.Truncated(window=200),
    "random_window": hg.Truncated(window=250, random=True),
    "implicit_cg": hg.Implicit(solver=hg.ConjugateGradient(tol=1e-12)),
    "implicit_fixed_point": hg.Implicit(solver=hg.FixedPoint(alpha=1.4, tol=1e-12, maxiter=1000)),
    "implicit_gmres": hg.Implicit(solver=hg.GMRES(tol=1e-12)),
    "implicit_direct": hg.Implicit(solver=hg.Direct(symmetric=True)),
    "implicit_jvp_hvp": hg.Implicit(hvp="jvp"),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_matches_finite_differences(logistic, name):
    problem, hparams, w_star, check = logistic
    start = w_star if isinstance(ESTIMATORS[name], hg.Implicit) else \
        {k: torch.zeros_like(v) for k, v in w_star.items()}
    out = hg.hypergradient(problem, hparams, start, ESTIMATORS[name])
    # judged against the fixture's differences and their error bar (resolution ≤ 1e-6).
    # The estimators' own errors are below the bar: solves at tol 1e-12 (κ ≈ 12), the
    # default CG tol 1e-10 of implicit_jvp_hvp (≤ κ·tol ≈ 1e-9 relative, under half the
    # bar; observed 9e-11), windows of 200-250 of 300 steps (bias observed ~3e-15).
    judged = with_estimate(check, out.grad["lam"][check.coords])
    assert judged.agrees, f"{name}: {judged.verdict}"
    assert out.diagnostics.inner_grad_norm < 1e-10


@pytest.mark.parametrize("optimizer, steps", [(hg.Momentum(lr=0.8, momentum=0.3), 300),
                                              (hg.Nesterov(lr=0.8, momentum=0.3), 300),
                                              (hg.Adam(lr=0.5, eps=0.5), 800)])
def test_fixed_point_implicit_matches_unrolled_at_convergence(optimizer, steps):
    """(I − ∂_zΦ)ᵀ u = ∇_z F through the optimizer's step gives the unrolled limit."""
    problem, hparams, params = logistic_problem(steps=steps, optimizer=optimizer)
    unrolled = hg.Unrolled()(problem, hparams, params)
    assert unrolled.diagnostics.inner_grad_norm < 1e-12
    est = hg.Implicit(fixed_point=True, solver=hg.GMRES(tol=1e-12), inner_steps=0)
    implicit = est(problem, hparams, unrolled.params)
    assert implicit.diagnostics.solve_converged
    assert rel(implicit.grad["lam"], unrolled.grad["lam"]) < 1e-8
    plain = hg.Implicit(inner_steps=0)(problem, hparams, unrolled.params)
    assert rel(implicit.grad["lam"], plain.grad["lam"]) < 1e-8


@pytest.mark.parametrize("kw, match", [
    ({"inner_steps": -3}, "inner_steps must be None or an int >= 0, got -3"),
    ({"inner_steps": 2.5}, "inner_steps must be None or an int >= 0"),
    ({"inner_steps": True}, "inner_steps must be None or an int >= 0"),
    ({"inner_tol": -1.0}, "inner_tol must be None or a finite number >= 0"),
    ({"inner_tol": float("nan")}, "inner_tol must be None or a finite number >= 0"),
])
def test_implicit_refuses_bad_inner_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        hg.Implicit(**kw)
    hg.Implicit(inner_steps=0, inner_tol=None)  # w* = params, no warning: allowed


def test_fixed_point_needs_a_nonsymmetric_solver():
    with pytest.raises(ValueError, match="non-symmetric"):
        hg.Implicit(fixed_point=True, solver=hg.ConjugateGradient())
    problem, hparams, params = logistic_problem(steps=5, optimizer=hg.Chebyshev(mu=0.1, L=1.3))
    with pytest.raises(ValueError, match="fixed-point map"):
        hg.Implicit(fixed_point=True, inner_tol=None)(problem, hparams, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["unrolled", "recompute", "implicit_cg", "implicit_gmres"])
def test_estimators_on_cuda_match_cpu(name):
    ridge = Ridge.make()
    gpu = Ridge.make(device="cuda")
    est = ESTIMATORS[name]
    cpu_out = est(ridge.problem(steps=200), ridge.hparams(), ridge.params0())
    gpu_out = est(gpu.problem(steps=200), gpu.hparams(), gpu.params0())
    assert gpu_out.grad["lam"].is_cuda
    assert rel(gpu_out.grad["lam"].cpu(), cpu_out.grad["lam"]) < 1e-10


def test_warnings_point_at_the_callers_line(ridge):
    with pytest.warns(hg.ConvergenceWarning) as record:
        hg.hypergradient(ridge.problem(steps=3), ridge.hparams(), ridge.params0(),
                         hg.Implicit(inner_tol=1e-6))
    assert record[0].filename == __file__


def test_implicit_continues_the_inner_optimizer_state(ridge):
    problem = ridge.problem(optimizer=hg.Momentum(lr=0.1, momentum=0.9), steps=5)
    est = hg.Implicit(inner_tol=None)
    first = est(problem, ridge.hparams(), ridge.params0())
    second = est(problem, ridge.hparams(), first.params, first.state)
    w, s = problem.solve_inner(ridge.params0(), ridge.hparams(), steps=10)
    assert torch.equal(second.params["w"], w["w"])
    assert torch.equal(second.state["inner_state"]["m"]["w"], s["m"]["w"])


@pytest.mark.parametrize("mode", ["linearized", "auto", "jvp", "reverse"])
@pytest.mark.parametrize("steps", [0, 3])
def test_implicit_inner_grad_norm_and_evaluations(ridge, mode, steps):
    """Diagnostics.inner_grad_norm is ‖∇_w f‖ at the returned w* in every hvp mode (and
    the unconverged-inner warning is judged on it); with "linearized" it is read off the
    one evaluation of ∇_w f(w*) that the products are pulled back through, so f is
    evaluated once at w* per call (plus once before and once after the inner steps, for
    the divergence check, and once per inner step)."""
    calls = []

    def inner(p, h, batch):
        calls.append(1)
        return Ridge.inner_loss(p, h, batch)

    problem = hg.Problem(inner, Ridge.outer_loss, (ridge.X, ridge.y), (ridge.Xv, ridge.yv),
                         optimizer=hg.SGD(lr=1e-3), steps=steps)
    params = {"w": ridge.w_star() + 0.01}  # off w*, and a small lr: a visible gradient
    solver = hg.ConjugateGradient(tol=1e-13)
    hg.Implicit(solver=solver, hvp=mode, inner_tol=None)(problem, ridge.hparams(), params)
    calls.clear()  # the self-check ran on the first call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inner_tol=None: no warning
        out = hg.Implicit(solver=solver, hvp=mode, inner_tol=None)(
            problem, ridge.hparams(), params)
    n = ridge.X.shape[0]
    w = out.params["w"]
    grad = ridge.A() @ w - ridge.X.T @ ridge.y / n  # ∇_w f in closed form
    # the same gradient by another summation order: rounding of n·d products relative to
    # the terms' scale ‖A‖‖w‖ + ‖Xᵀy/n‖, which cancel to ‖∇_w f‖ (observed ≤ 1e-15 rel.)
    scale = float(torch.linalg.matrix_norm(ridge.A(), 2) * w.norm()
                  + (ridge.X.T @ ridge.y / n).norm())
    floor = rounding(n * ridge.X.shape[1]) * scale
    assert float(grad.norm()) > 1e3 * floor
    assert out.diagnostics.inner_grad_norm == pytest.approx(float(grad.norm()), rel=0,
                                                            abs=floor)
    if mode == "linearized":
        assert len(calls) == (1 if steps == 0 else steps + 3)
    with pytest.warns(hg.ConvergenceWarning, match="inner problem is not converged"):
        hg.Implicit(solver=solver, hvp=mode, inner_tol=1e-6)(problem, ridge.hparams(), params)
