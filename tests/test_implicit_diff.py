"""The implicit-differentiation primitive on its own (closed forms, the unrolled limit of a
non-symmetric fixed point, a KKT system with an active constraint, batched cotangents),
and the estimators built on it against references computed here from first principles."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import hypergrad as hg
from hypergrad.implicit_diff import Stationarity, linearize, outer_grads, root_vjp

from problems import DT, Ridge, rel

MODES = ["linearized", "reverse", "jvp", "auto"]


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge.make()


def ridge_implicit(ridge: Ridge, cotangent: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """−∂_λ(∇_w f)ᵀ v with (A + δI) v = c in closed form: ∇_w f = A w − Xᵀy/n has
    ∂_λ(∇_w f) = diag(e^λ ⊙ w*), so the implicit part is −e^λ ⊙ w* ⊙ v."""
    A = ridge.A() + damping * torch.eye(len(ridge.lam), dtype=DT)
    return -ridge.lam.exp() * ridge.w_star() * torch.linalg.solve(A, cotangent)


def ridge_root_vjp(ridge: Ridge, cotangent: dict, solver, **kwargs) -> hg.RootVJP:
    return root_vjp(Stationarity(ridge.inner_loss, (ridge.X, ridge.y)), {"w": ridge.w_star()},
                    ridge.hparams(), cotangent, solver, **kwargs)


# --- stationarity: a quadratic with a closed form ---------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", [hg.ConjugateGradient(tol=1e-14, maxiter=50),
                                    hg.GMRES(tol=1e-14), hg.Direct(symmetric=True)],
                         ids=["cg", "gmres", "direct"])
def test_stationarity_matches_the_closed_form(ridge, mode, solver):
    c = torch.linspace(-1.0, 1.0, len(ridge.lam), dtype=DT)
    out = ridge_root_vjp(ridge, {"w": c}, solver, mode=mode)
    # A has κ ≈ 3: the solves at tol 1e-14 (or dense) are exact to ~κ·1e-14; 1e-10 keeps a
    # wide margin over that and rounding while a wrong sign or term (O(1)) shows
    assert rel(out.grad["lam"], ridge_implicit(ridge, c)) < 1e-10
    assert out.solve.converged
    assert rel(out.solve.x["w"], torch.linalg.solve(ridge.A(), c)) < 1e-10
    assert out.mode in (("linearized", "jvp") if mode == "auto" else (mode,))


def test_the_hypergradient_is_the_direct_part_plus_the_implicit_part(ridge):
    """With (F, (∇_w F, ∇_λ F)) from outer_grads at w*: ∇h = ∇_λ F + root_vjp(…).grad."""
    w, lam = {"w": ridge.w_star()}, ridge.hparams()
    loss, (gF_w, gF_lam) = outer_grads(ridge.outer_loss, w, lam, (ridge.Xv, ridge.yv))
    assert float(loss) == pytest.approx(float(ridge.outer_loss(w, lam, (ridge.Xv, ridge.yv))),
                                        rel=1e-15)
    out = ridge_root_vjp(ridge, gF_w, hg.ConjugateGradient(tol=1e-14, maxiter=50))
    assert rel(gF_lam["lam"] + out.grad["lam"], ridge.hypergrad()) < 1e-10


def test_damping_and_warm_start(ridge):
    c = {"w": torch.ones(len(ridge.lam), dtype=DT)}
    damped = ridge_root_vjp(ridge, c, hg.ConjugateGradient(tol=1e-14, maxiter=50, damping=0.3))
    assert rel(damped.grad["lam"], ridge_implicit(ridge, c["w"], damping=0.3)) < 1e-10
    plain = ridge_root_vjp(ridge, c, hg.ConjugateGradient(tol=1e-12))
    again = ridge_root_vjp(ridge, c, hg.ConjugateGradient(tol=1e-12), x0=plain.solve.x)
    assert again.solve.iterations == 0 and torch.equal(again.grad["lam"], plain.grad["lam"])


def test_linearized_evaluates_the_optimality_function_once(ridge):
    """"Linearize once, apply many": one evaluation of T (with its graph) serves every
    product of the solve and the final VJP; "reverse" evaluates T for each of them."""
    calls = []
    T = Stationarity(ridge.inner_loss, (ridge.X, ridge.y))

    def counted(x, theta):
        calls.append(1)
        return T(x, theta)

    c = {"w": torch.ones(len(ridge.lam), dtype=DT)}
    reference = ridge_root_vjp(ridge, c, hg.ConjugateGradient(tol=1e-14, maxiter=50))
    out = root_vjp(counted, {"w": ridge.w_star()}, ridge.hparams(), c,
                   hg.ConjugateGradient(tol=1e-14, maxiter=50), symmetric=True)
    assert len(calls) == 1 and out.solve.iterations >= 5
    assert torch.equal(out.grad["lam"], reference.grad["lam"])
    calls.clear()
    out = root_vjp(counted, {"w": ridge.w_star()}, ridge.hparams(), c,
                   hg.ConjugateGradient(tol=1e-14, maxiter=50), symmetric=True, mode="reverse")
    assert len(calls) == out.solve.iterations + 1  # one per product, one for the VJP in θ


def test_modes_and_solvers_that_do_not_fit_are_refused(ridge):
    def T(x, theta):
        return x - 0.5 * x + theta

    x, theta, c = torch.ones(3, dtype=DT), torch.ones(3, dtype=DT), torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="symmetric"):
        root_vjp(T, x, theta, c, hg.ConjugateGradient())
    with pytest.raises(ValueError, match="Stationarity"):
        root_vjp(T, x, theta, c, hg.GMRES(), mode="jvp")
    with pytest.raises(ValueError, match="mode"):
        linearize(T, x, theta, mode="forward")
    # a plain T asserted symmetric may use CG: T = ½x + θ, so v = 2c and −∂_θTᵀv = −2c
    out = root_vjp(T, x, theta, c, hg.ConjugateGradient(tol=1e-14), symmetric=True)
    assert torch.allclose(out.grad, -2 * c, rtol=1e-14, atol=0)


# --- a non-symmetric fixed point ----------------------------------------------------------

def fixed_point_map():
    """Φ(x, θ) = tanh(M x + C θ) with ‖M‖₂ = 0.5 (a contraction) and M non-symmetric."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(6, 6, generator=gen, dtype=DT)
    M = 0.5 * M / torch.linalg.matrix_norm(M, 2)
    C = torch.randn(6, 3, generator=gen, dtype=DT)
    t = torch.randn(6, generator=gen, dtype=DT)
    theta = torch.randn(3, generator=gen, dtype=DT)

    def phi(x, th):
        return torch.tanh(M @ x + C @ th)

    return M, C, t, theta, phi


def test_fixed_point_matches_the_closed_form_and_the_unrolled_limit():
    M, C, t, theta, phi = fixed_point_map()
    x = torch.zeros(6, dtype=DT)
    for _ in range(200):  # contraction by 0.5: x* to rounding
        x = phi(x, theta)
    assert float((x - phi(x, theta)).norm()) < 1e-15

    def F(x_, th):
        return 0.5 * ((x_ - t) ** 2).sum() + 0.5 * (th ** 2).sum()

    out = root_vjp(lambda x_, th: x_ - phi(x_, th), x, theta, x - t, hg.GMRES(tol=1e-14))
    implicit = theta + out.grad
    # closed form: Φ's Jacobians are D M and D C with D = diag(1 − x*²) (x* = tanh(…)), so
    # dx*/dθ = (I − DM)⁻¹ DC and ∇h = θ + (dx*/dθ)ᵀ (x* − t)
    D = torch.diag(1 - x ** 2)
    closed = theta + (torch.linalg.solve(torch.eye(6, dtype=DT) - D @ M, D @ C)).T @ (x - t)
    # κ(I − DM) ≤ 3 and GMRES at tol 1e-14 on 6 unknowns: ~1e-14; 1e-11 sees any real error
    assert rel(implicit, closed) < 1e-11
    # the unrolled limit: differentiate 200 steps of the map (error ∝ 200·0.5^199)
    th = theta.clone().requires_grad_()
    xt = torch.zeros(6, dtype=DT)
    for _ in range(200):
        xt = phi(xt, th)
    unrolled, = torch.autograd.grad(F(xt, th), th)
    assert rel(implicit, unrolled) < 1e-11
    reverse = root_vjp(lambda x_, th: x_ - phi(x_, th), x, theta, x - t, hg.GMRES(tol=1e-14),
                       mode="reverse")
    assert rel(reverse.grad, out.grad) < 1e-13  # the same products, formed anew each time


# --- KKT: a QP with an active constraint ----------------------------------------------

M_, N_ = 5, 3


@pytest.fixture(scope="module")
def qp():
    """min_y ½ yᵀAy − (Bx)ᵀy  s.t.  1ᵀy ≤ 0.1 x₀ − 3 (active),  −10 − y₀ ≤ 0 (inactive);
    F = ½‖y − t‖² + ½‖x‖². On the active set y*(x), μ*(x) solve the KKT system
    K (y, μ) = (Bx, 0.1 x₀ − 3), K = [[A, 1], [1ᵀ, 0]]."""
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(M_, M_, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.linspace(1, 4, M_, dtype=DT)) @ Q.T
    B = torch.randn(M_, N_, generator=gen, dtype=DT)
    t = 3.0 + torch.randn(M_, generator=gen, dtype=DT)
    x = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    K = torch.zeros(M_ + 1, M_ + 1, dtype=DT)
    K[:M_, :M_], K[:M_, M_], K[M_, :M_] = A, 1, 1
    R = torch.zeros(M_ + 1, N_, dtype=DT)  # d(rhs)/dx
    R[:M_], R[M_, 0] = B, 0.1
    sol = torch.linalg.solve(K, R @ x + torch.cat([torch.zeros(M_, dtype=DT),
                                                   torch.tensor([-3.0], dtype=DT)]))
    y, mu = sol[:M_], sol[M_]
    dy_dx = torch.linalg.solve(K, R)[:M_]
    hypergrad = x + dy_dx.T @ (y - t)

    def f(y_, x_, _):
        return 0.5 * y_["y"] @ (A @ y_["y"]) - (B @ x_["x"]) @ y_["y"]

    def g(y_, x_, _):
        return torch.stack([y_["y"].sum() + 3 - 0.1 * x_["x"][0], -10 - y_["y"][0]])

    def F(y_, x_, _):
        return 0.5 * ((y_["y"] - t) ** 2).sum() + 0.5 * (x_["x"] ** 2).sum()

    problem = hg.ConstrainedProblem(f, F, g, 2)
    return problem, x, y, mu, hypergrad, K


def test_qp_constraint_is_active_with_a_positive_multiplier(qp):
    problem, x, y, mu, *_ = qp
    g = problem.g({"y": y}, {"x": x})
    assert abs(float(g[0])) < 1e-12 and float(g[1]) < -1 and float(mu) > 0.1


@pytest.mark.parametrize("mode", MODES)
def test_kkt_system_by_stationarity_of_the_lagrangian(qp, mode):
    """T = ∇_(y, μ_A) L is the KKT conditions; its Jacobian in (y, μ_A) is K."""
    problem, x, y, mu, hypergrad, K = qp

    def L(z, x_, batch):
        return problem.inner_loss(z[0], x_, batch) + z[1] @ problem.g(z[0], x_)[:1]

    gF_y = y - t_of(problem, y, x)
    out = root_vjp(Stationarity(L), ({"y": y}, mu.reshape(1)), {"x": x},
                   ({"y": gF_y}, torch.zeros(1, dtype=DT)), hg.Direct(), mode=mode)
    # dense solves of a 6×6 system with κ(K) ≈ 20 against another: rounding ~1e-14
    assert rel(x + out.grad["x"], hypergrad) < 1e-12
    v = torch.linalg.solve(K, torch.cat([gF_y, torch.zeros(1, dtype=DT)]))
    assert rel(torch.cat([out.solve.x[0]["y"], out.solve.x[1]]), v) < 1e-12


def t_of(problem, y, x):
    """The outer target t, from ∇_y F = y − t."""
    return y - grad(problem.outer_loss)({"y": y}, {"x": x}, None)["y"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("given", [False, True])
def test_kkt_estimator_matches_the_closed_form(qp, mode, given):
    problem, x, y, mu, hypergrad, _ = qp
    state = {"multipliers": torch.stack([mu, torch.zeros((), dtype=DT)])} if given else None
    out = hg.KKTImplicit(hvp=mode)(problem, {"x": x}, {"y": y}, state)
    assert rel(out.grad["x"], hypergrad) < 1e-12  # dense solves of one 6×6 system
    assert out.state["active"] == [0] and set(out.state) >= {"multipliers", "active"}
    assert abs(out.diagnostics.multipliers[0] - float(mu)) < 1e-12
    assert out.diagnostics.multipliers[1] == 0.0 and out.diagnostics.solve_converged


# --- batched cotangents ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linearized", "reverse", "jvp"])
def test_batched_cotangents_equal_separate_solves(ridge, mode):
    gen = torch.Generator().manual_seed(7)
    C = torch.randn(4, len(ridge.lam), generator=gen, dtype=DT)
    solver = hg.ConjugateGradient(tol=1e-14, maxiter=50)
    out = ridge_root_vjp(ridge, {"w": C}, solver, mode=mode, batched=True)
    assert out.grad["lam"].shape == C.shape
    for k in range(4):
        one = ridge_root_vjp(ridge, {"w": C[k]}, solver, mode=mode)
        # the batched solve runs each column to tol 1e-14 too: same answer to ~κ·tol
        assert rel(out.grad["lam"][k], one.grad["lam"]) < 1e-12
        assert rel(out.grad["lam"][k], ridge_implicit(ridge, C[k])) < 1e-10


def test_batched_cotangents_of_a_fixed_point():
    M, C, t, theta, phi = fixed_point_map()
    x = torch.zeros(6, dtype=DT)
    for _ in range(200):
        x = phi(x, theta)
    cot = torch.stack([x - t, torch.ones(6, dtype=DT), torch.arange(6, dtype=DT)])
    T = lambda x_, th: x_ - phi(x_, th)  # noqa: E731
    out = root_vjp(T, x, theta, cot, hg.GMRES(tol=1e-14), batched=True)
    for k in range(3):
        one = root_vjp(T, x, theta, cot[k], hg.GMRES(tol=1e-14))
        assert rel(out.grad[k], one.grad) < 1e-12


# --- the estimators on the primitive --------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_implicit_every_mode_matches_the_closed_form_with_its_state(ridge, mode):
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-14, maxiter=50), hvp=mode,
                      inner_steps=0)
    out = est(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()})
    assert rel(out.grad["lam"], ridge.hypergrad()) < 1e-10  # as in test_estimators
    assert set(out.state) == {"v", "inner_state", "hvp_mode"}
    assert out.state["hvp_mode"] in (("linearized", "jvp") if mode == "auto" else (mode,))
    # state["v"] solves H v = ∇_w F (the sign the warm start has always carried)
    gF = ridge.Xv.T @ (ridge.Xv @ ridge.w_star() - ridge.yv) / ridge.Xv.shape[0]
    assert rel(out.state["v"]["w"], torch.linalg.solve(ridge.A(), gF)) < 1e-10
    again = est(ridge.problem(), ridge.hparams(), out.params, out.state)
    assert again.diagnostics.solve_iterations == 0 and again.state["hvp_mode"] == \
        out.state["hvp_mode"]


def test_fixed_point_implicit_keeps_its_state_shape(ridge):
    problem = ridge.problem(optimizer=hg.Momentum(lr=0.3, momentum=0.5), steps=400)
    est = hg.Implicit(fixed_point=True, solver=hg.GMRES(tol=1e-13))
    out = est(problem, ridge.hparams(), ridge.params0())
    assert rel(out.grad["lam"], ridge.hypergrad()) < 1e-9  # the fixed point of GD = w*
    v_w, v_carried = out.state["v"]
    assert set(v_carried) == set(problem.optimizer.carried) and v_w["w"].shape == (8,)
    again = est(problem, ridge.hparams(), out.params, out.state)
    assert again.diagnostics.solve_iterations == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_on_cuda_matches_cpu(ridge, mode):
    gpu = Ridge.make(device="cuda")
    c = torch.linspace(-1.0, 1.0, len(ridge.lam), dtype=DT)
    solver = hg.ConjugateGradient(tol=1e-14, maxiter=50)
    cpu_out = ridge_root_vjp(ridge, {"w": c}, solver, mode=mode)
    gpu_out = ridge_root_vjp(gpu, {"w": c.cuda()}, solver, mode=mode)
    assert gpu_out.grad["lam"].is_cuda
    # another BLAS on a κ ≈ 3 system solved to 1e-14: agreement to ~1e-14
    assert rel(gpu_out.grad["lam"].cpu(), cpu_out.grad["lam"]) < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fixed_point_and_batched_on_cuda_match_cpu(ridge):
    gpu = Ridge.make(device="cuda")
    est = hg.Implicit(fixed_point=True, solver=hg.GMRES(tol=1e-13))
    outs = [est(r.problem(optimizer=hg.Momentum(lr=0.3, momentum=0.5), steps=400),
                r.hparams(), r.params0()) for r in (ridge, gpu)]
    assert rel(outs[1].grad["lam"].cpu(), outs[0].grad["lam"]) < 1e-10
    C = torch.randn(3, len(ridge.lam), generator=torch.Generator().manual_seed(0), dtype=DT)
    solver = hg.ConjugateGradient(tol=1e-14, maxiter=50)
    cpu_out = ridge_root_vjp(ridge, {"w": C}, solver, batched=True)
    gpu_out = ridge_root_vjp(gpu, {"w": C.cuda()}, solver, batched=True)
    assert rel(gpu_out.grad["lam"].cpu(), cpu_out.grad["lam"]) < 1e-10


@pytest.mark.parametrize("mode", ["linearized", "reverse", "jvp"])
def test_linearization_value_and_solve_linearized(ridge, mode):
    """``linearize(..., "linearized").value`` is T at the point (here ∇_w f, detached), the
    others leave it None; ``solve_linearized`` on a linearization is ``root_vjp``."""
    from hypergrad.implicit_diff import solve_linearized

    T = Stationarity(ridge.inner_loss, (ridge.X, ridge.y))
    w = {"w": ridge.w_star() + 0.1}
    lin = linearize(T, w, ridge.hparams(), mode)
    if mode == "linearized":
        assert not lin.value["w"].requires_grad
        # the same gradient, evaluated with and without a graph: bitwise equal kernels
        assert torch.equal(lin.value["w"], T(w, ridge.hparams())["w"])
    else:
        assert lin.value is None
    c = {"w": torch.ones(len(ridge.lam), dtype=DT)}
    solver = hg.ConjugateGradient(tol=1e-14, maxiter=50)
    out = solve_linearized(lin, c, solver)
    ref = root_vjp(T, w, ridge.hparams(), c, solver, mode=mode)
    assert out.mode == ref.mode == mode and out.solve.iterations == ref.solve.iterations
    assert torch.equal(out.grad["lam"], ref.grad["lam"])
