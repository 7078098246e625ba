"""Solver layers (hypergrad.layers): implicit, unrolled and fixed-point backward.

Every gradient is judged against central finite differences with their own error bars
(hypergrad.finite_difference: truncation by Richardson, rounding by the measured noise),
and each check first asserts that the error bar is far below the directional derivative,
so that a wrong sign or a wrong factor could not pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, vmap

import hypergrad as hg
from hypergrad.errors import LINEAR_SOLVE_NOT_CONVERGED, BilevelInputError, ConvergenceWarning
from hypergrad.finite_difference import central_differences
from hypergrad.layers import (
    RootLayer,
    custom_root,
    fixed_point_layer,
    kkt_optimality,
    unrolled_layer,
)
from hypergrad.linear_solve import GMRES, ConjugateGradient, Direct
from hypergrad.projections import Simplex

DT = torch.float64


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def assert_matches_fd(h, theta: torch.Tensor, gradient: torch.Tensor, step: float = 1e-4,
                      directions: int = 3, seed: int = 0) -> None:
    """``gradient`` of the scalar ``h`` at ``theta`` agrees with central differences along
    random directions within their error bars, which are at most 1% of the derivative
    (a negated or halved gradient fails)."""
    dirs = [_t(*theta.shape, seed=seed + i) for i in range(directions)]
    dirs = [d / d.norm() for d in dirs]
    fd = central_differences(lambda p: float(h(p)), theta.detach(), dirs, step)
    est = torch.stack([(gradient * d).sum() for d in dirs]).detach()
    assert bool(fd.asymptotic.all()), fd
    assert bool((fd.error <= 1e-2 * fd.value.abs()).all()), (fd.error, fd.value)
    assert bool(((est - fd.value).abs() <= fd.error).all()), (est, fd.value, fd.error)


def test_fd_check_rejects_a_wrong_sign():
    A = _t(4, 4, seed=1)
    h = lambda t: (A @ t).sin().sum()  # noqa: E731
    t = _t(4, seed=2)
    g = torch.func.grad(h)(t)
    assert_matches_fd(h, t, g)
    for wrong in (-g, 0.5 * g):
        with pytest.raises(AssertionError):
            assert_matches_fd(h, t, wrong)


# --- (a) a quadratic program with active constraints --------------------------------------


class BoxQP:
    """min_x ½ xᵀQx + (c + Bθ)ᵀx subject to 0 ≤ x ≤ 1, solved by projected gradient to
    machine precision; several bounds are strictly active at the θ used."""

    n, m = 8, 3

    def __init__(self) -> None:
        M = _t(self.n, self.n, seed=10)
        self.Q = M @ M.T / self.n + 0.5 * torch.eye(self.n, dtype=DT)
        self.c = 2.0 * _t(self.n, seed=11)
        self.B = _t(self.n, self.m, seed=12)
        self.eta = 1.0 / float(torch.linalg.eigvalsh(self.Q).max())
        self.theta = 0.3 * _t(self.m, seed=13)

    def grad_f(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.Q @ x + self.c + self.B @ theta

    def step(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return (x - self.eta * self.grad_f(x, theta)).clamp(0.0, 1.0)

    def optimality(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x - self.step(x, theta)

    def solve(self, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        x = init
        for _ in range(20000):
            new = self.step(x, theta)
            if float((new - x).norm()) <= 1e-15:
                return new
            x = new
        raise AssertionError("projected gradient did not converge")

    def outer(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.arange(1.0, self.n + 1, dtype=DT)).sum() + (x ** 2).sum()


@pytest.fixture(scope="module")
def qp() -> BoxQP:
    return BoxQP()


def test_box_qp_has_strictly_active_and_free_coordinates(qp):
    x = qp.solve(torch.zeros(qp.n, dtype=DT), qp.theta)
    g = qp.grad_f(x, qp.theta)
    lower, upper = x <= 0, x >= 1
    free = ~(lower | upper)
    assert lower.any() and free.any()
    # strict complementarity: a perturbation of θ by 1e-3 keeps the active set
    assert bool((g[lower] > 0.05).all()) and bool((g[upper] < -0.05).all())
    assert bool(((x[free] > 0.05) & (x[free] < 0.95)).all())


@pytest.mark.parametrize("solver", [GMRES(tol=1e-12), Direct()])
def test_box_qp_projected_fixed_point_matches_finite_differences(qp, solver):
    layer = custom_root(qp.optimality, solver)(qp.solve)
    x0 = torch.zeros(qp.n, dtype=DT)
    h = lambda t: qp.outer(layer(x0, t))  # noqa: E731
    theta = qp.theta.clone().requires_grad_()
    h(theta).backward()
    assert layer.last_solve is not None and layer.last_solve.converged
    assert_matches_fd(h, qp.theta, theta.grad)


def test_box_qp_implicit_equals_unrolled_projected_gradient(qp):
    layer = custom_root(qp.optimality)(qp.solve)
    unrolled = unrolled_layer(qp.step, 600)
    x0 = torch.zeros(qp.n, dtype=DT)
    g_imp = grad(lambda t: qp.outer(layer(x0, t)))(qp.theta)
    g_unr = grad(lambda t: qp.outer(unrolled(x0, t)))(qp.theta)
    assert float((g_imp - g_unr).norm() / g_imp.norm()) < 1e-6


def test_box_qp_through_its_kkt_conditions(qp):
    """The same QP through T = (∇f + ∂gᵀν, ν ⊙ g) with g = (−x, x − 1) ≤ 0: matches
    finite differences and the projected fixed point."""
    def f(x, t):
        return 0.5 * x @ qp.Q @ x + (qp.c + qp.B @ t) @ x

    T = kkt_optimality(f, inequality=lambda x, t: torch.cat([-x, x - 1]))

    @custom_root(T)
    def solve(init, t):
        x = qp.solve(init[0], t)
        g = qp.grad_f(x, t)  # ∇f = ν_lower − ν_upper on the active bounds
        nu = torch.cat([torch.where(x <= 0, g, 0), torch.where(x >= 1, -g, 0)])
        return (x, None, nu)

    init = (torch.zeros(qp.n, dtype=DT), None, torch.zeros(2 * qp.n, dtype=DT))
    assert float(T(solve(init, qp.theta), qp.theta)[0].norm()) < 1e-12
    h = lambda t: qp.outer(solve(init, t)[0])  # noqa: E731
    g_kkt = grad(h)(qp.theta)
    assert solve.last_solve.converged
    assert_matches_fd(h, qp.theta, g_kkt)
    projected = custom_root(qp.optimality)(qp.solve)
    g_proj = grad(lambda t: qp.outer(projected(init[0], t)))(qp.theta)
    torch.testing.assert_close(g_kkt, g_proj, rtol=1e-9, atol=0)


def test_simplex_qp_through_the_projection_matches_finite_differences():
    n = 6
    M = _t(n, n, seed=20)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)
    eta = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    proj = Simplex()
    theta0 = 0.5 * _t(n, seed=21)

    def step(x, theta):
        return proj(x - eta * (Q @ x + theta))

    def solve(init, theta):
        x = init
        for _ in range(20000):
            new = step(x, theta)
            if float((new - x).norm()) <= 1e-15:
                return new
            x = new
        raise AssertionError("not converged")

    layer = custom_root(lambda x, t: x - step(x, t), "gmres")(solve)
    x0 = torch.full((n,), 1.0 / n, dtype=DT)
    w = torch.arange(1.0, n + 1, dtype=DT)
    xs = solve(x0, theta0)
    assert int((xs == 0).sum()) >= 1 and int((xs > 1e-3).sum()) >= 2  # active bounds
    h = lambda t: (w * layer(x0, t)).sum() + (layer(x0, t) ** 2).sum()  # noqa: E731
    g = grad(h)(theta0)
    assert_matches_fd(h, theta0, g, step=1e-5)


def test_equality_constrained_qp_through_its_kkt_conditions():
    """min ½xᵀQx + θᵀx s.t. Ax = b: the solution is a pytree (x, μ), T the KKT residual
    (symmetric indefinite: GMRES)."""
    n, p = 6, 2
    M = _t(n, n, seed=30)
    Q = M @ M.T / n + torch.eye(n, dtype=DT)
    A, b = _t(p, n, seed=31), _t(p, seed=32)

    def kkt(sol, theta):
        x, mu = sol
        return (Q @ x + theta + A.T @ mu, A @ x - b)

    def solve(init, theta):
        K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(p, p, dtype=DT)], 1)])
        z = torch.linalg.solve(K, torch.cat([-theta, b]))
        return (z[:n], z[n:])

    layer = custom_root(kkt, "gmres")(solve)
    init = (torch.zeros(n, dtype=DT), torch.zeros(p, dtype=DT))
    h = lambda t: (layer(init, t)[0] ** 3).sum() + layer(init, t)[1].sum()  # noqa: E731
    theta0 = _t(n, seed=33)
    g = grad(h)(theta0)
    assert_matches_fd(h, theta0, g)


# --- (b) a fixed-point map ----------------------------------------------------------------

N_FP = 6
W_FP = 0.4 * _t(N_FP, N_FP, seed=40) / N_FP ** 0.5


def phi(x, theta):
    return torch.tanh(W_FP @ x + theta)


def test_fixed_point_layer_matches_finite_differences():
    layer = fixed_point_layer(phi, tol=1e-14)
    x0 = torch.zeros(N_FP, dtype=DT)
    w = _t(N_FP, seed=41)
    h = lambda t: (w * layer(x0, t)).sum()  # noqa: E731
    theta = _t(N_FP, seed=42)
    g = grad(h)(theta)
    assert layer.last_forward is not None and layer.last_forward.converged
    assert layer.last_solve is not None and layer.last_solve.converged
    assert_matches_fd(h, theta, g)
    # equals the closed form (I − ∂_xΦ)⁻ᵀ: ∂x*/∂θ = (I − D W)⁻¹ D, D = diag(1 − x*²)
    xs = layer(x0, theta)
    D = torch.diag(1 - xs ** 2)
    J = torch.linalg.solve(torch.eye(N_FP, dtype=DT) - D @ W_FP, D)
    torch.testing.assert_close(g, J.T @ w, rtol=1e-9, atol=0)


def test_fixed_point_as_custom_root_equals_unrolled_iteration():
    @custom_root(lambda x, t: x - phi(x, t), solver="gmres")
    def solve(init, theta):
        x = init
        for _ in range(200):
            x = phi(x, theta)
        return x

    unrolled = unrolled_layer(phi, 200)
    x0 = torch.zeros(N_FP, dtype=DT)
    theta = _t(N_FP, seed=43)
    h_imp = lambda t: (solve(x0, t) ** 2).sum()  # noqa: E731
    h_unr = lambda t: (unrolled(x0, t) ** 2).sum()  # noqa: E731
    g_imp, g_unr = grad(h_imp)(theta), grad(h_unr)(theta)
    assert float((g_imp - g_unr).norm() / g_imp.norm()) < 1e-6


def test_float32_defaults_converge_without_warnings():
    """The default tolerances follow the dtype: float32 reaches them, and the gradient is
    the float64 one to float32 accuracy."""
    layer = fixed_point_layer(lambda x, t: torch.tanh(W_FP.to(x.dtype) @ x + t))
    theta = _t(N_FP, seed=47)
    h = lambda t: (layer(torch.zeros(N_FP, dtype=t.dtype), t) ** 2).sum()  # noqa: E731
    g64 = grad(h)(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g32 = grad(h)(theta.float())
    assert layer.last_forward.converged and layer.last_solve.converged
    # the forward stops at a relative change of 1.2e-5, the backward at a residual of
    # 1.2e-5; ‖W‖₂ ≈ 0.7 bounds ‖(I − ∂_xΦ)⁻¹‖ by 1/(1 − 0.7) ≈ 3.3, so the error is at
    # most ≈ 3.3 · 2 · 1.2e-5 ≈ 8e-5 normwise (1.2e-5 measured)
    assert float((g32.double() - g64).norm() / g64.norm()) < 2e-4


def test_fixed_point_layer_warns_when_the_forward_does_not_converge():
    layer = fixed_point_layer(phi, forward_iterations=2, tol=1e-14)
    with pytest.warns(ConvergenceWarning, match="forward iteration stopped"):
        layer(torch.zeros(N_FP, dtype=DT), _t(N_FP, seed=44))
    assert layer.last_forward is not None and not layer.last_forward.converged
    assert layer.last_forward.iterations == 2


# --- (c) a smooth convex problem: L2-regularised logistic regression ----------------------

N_LR, D_LR = 40, 5
X_LR = _t(N_LR, D_LR, seed=50)
Y_LR = torch.sign(X_LR @ _t(D_LR, seed=51) + 0.5 * _t(N_LR, seed=52))
X_VAL = _t(20, D_LR, seed=53)
Y_VAL = torch.sign(X_VAL @ _t(D_LR, seed=51))


def logistic(w, lam, X=X_LR, y=Y_LR):
    """mean log(1 + exp(−y Xw)) + λ/2 ‖w‖², λ a 0-d tensor."""
    return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * lam * (w @ w)


def newton(init, lam, X=X_LR, y=Y_LR):
    """Newton's method to machine precision (strongly convex for λ > 0)."""
    w = init
    for _ in range(100):
        g = torch.func.grad(logistic)(w, lam, X, y)
        if float(g.norm()) <= 1e-14:
            return w
        H = torch.func.hessian(logistic)(w, lam, X, y)
        w = w - torch.linalg.solve(H, g)
    raise AssertionError("Newton did not converge")


def validation(w):
    return torch.nn.functional.softplus(-Y_VAL * (X_VAL @ w)).mean()


def lr_layer(**kw) -> RootLayer:
    return custom_root(hg.Stationarity(lambda w, lam, _: logistic(w, lam)), **kw)(newton)


W0 = torch.zeros(D_LR, dtype=DT)
LAM = torch.tensor(0.05, dtype=DT)


@pytest.mark.parametrize("mode", ["linearized", "reverse", "jvp", "auto"])
def test_logistic_regression_matches_finite_differences(mode):
    layer = lr_layer(mode=mode)
    h = lambda log_lam: validation(layer(W0, log_lam.exp()[0]))  # noqa: E731
    log_lam = LAM.log().reshape(1)
    g = grad(h)(log_lam)
    assert isinstance(layer.solver, ConjugateGradient) and layer.symmetric
    assert_matches_fd(h, log_lam, g, step=1e-3, directions=1)


def test_logistic_regression_with_a_plain_optimality_function():
    layer = custom_root(lambda w, lam: torch.func.grad(logistic)(w, lam), symmetric=True,
                        solver="cg")(newton)
    lam = LAM.clone().requires_grad_()
    validation(layer(W0, lam)).backward()
    expected = grad(lambda t: validation(lr_layer()(W0, t)))(LAM)
    torch.testing.assert_close(lam.grad, expected, rtol=1e-10, atol=0)


def test_logistic_regression_implicit_equals_unrolled_gradient_descent():
    L = float(torch.linalg.eigvalsh(X_LR.T @ X_LR).max()) / (4 * N_LR) + float(LAM)
    step = lambda w, lam: w - torch.func.grad(logistic)(w, lam) / L  # noqa: E731
    unrolled = unrolled_layer(step, 1500)
    g_imp = grad(lambda t: validation(lr_layer()(W0, t)))(LAM)
    g_unr = grad(lambda t: validation(unrolled(W0, t)))(LAM)
    assert float((g_imp - g_unr).abs() / g_imp.abs()) < 1e-6
    # with recompute (stored every 40 steps) the unrolled gradient is the same
    lam = LAM.clone().requires_grad_()
    validation(unrolled_layer(step, 1500, recompute=True, segment=40)(W0, lam)).backward()
    torch.testing.assert_close(lam.grad, g_unr, rtol=1e-12, atol=0)
    # recompute runs every step twice (forward without a graph, backward per segment)
    calls = []

    def counted(w, lam):
        calls.append(1)
        return step(w, lam)

    lam = LAM.clone().requires_grad_()
    out = unrolled_layer(counted, 100, recompute=True, segment=10)(W0, lam)
    assert len(calls) == 100
    validation(out).backward()
    assert len(calls) == 200
    # an unconverged unroll is visibly different: the comparison can fail
    g_short = grad(lambda t: validation(unrolled_layer(step, 5)(W0, t)))(LAM)
    assert float((g_imp - g_short).abs() / g_imp.abs()) > 1e-2


# --- torch.func transforms ----------------------------------------------------------------


def test_func_grad_equals_autograd():
    layer = lr_layer()
    lam = LAM.clone().requires_grad_()
    validation(layer(W0, lam)).backward()
    g = grad(lambda t: validation(layer(W0, t)))(LAM)
    torch.testing.assert_close(g, lam.grad, rtol=1e-13, atol=0)


def test_vmap_over_a_batch_of_problems_equals_the_loop():
    """Each problem has its own data and λ: vmap over (λ, X, y) of grad, grad of vmap, and
    vmap followed by backward all equal the loop."""
    layer = custom_root(lambda w, lam, X, y: torch.func.grad(logistic)(w, lam, X, y),
                        symmetric=True)(newton)
    k = 3
    lams = torch.tensor([0.02, 0.1, 0.5], dtype=DT)
    Xs = torch.stack([_t(N_LR, D_LR, seed=60 + i) for i in range(k)])
    ys = torch.sign(Xs @ _t(D_LR, seed=51))

    def h(lam, X, y):
        return validation(layer(W0, lam, X, y))

    loop = torch.stack([grad(h)(lams[i], Xs[i], ys[i]) for i in range(k)])
    loop_x = torch.stack([grad(h, argnums=1)(lams[i], Xs[i], ys[i]) for i in range(k)])
    assert float(loop.abs().min()) > 1e-3 and float((loop[0] - loop[1]).abs()) > 1e-3
    torch.testing.assert_close(vmap(grad(h))(lams, Xs, ys), loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(vmap(grad(h, argnums=1))(lams, Xs, ys), loop_x,
                               rtol=1e-10, atol=1e-15)
    total = lambda lam_: vmap(h)(lam_, Xs, ys).sum()  # noqa: E731
    torch.testing.assert_close(grad(total)(lams), loop, rtol=1e-12, atol=0)
    lam = lams.clone().requires_grad_()
    vmap(h)(lam, Xs, ys).sum().backward()
    torch.testing.assert_close(lam.grad, loop, rtol=1e-12, atol=0)
    # an unbatched argument (λ shared) is broadcast
    shared = vmap(grad(h), in_dims=(None, 0, 0))(lams[1], Xs, ys)
    torch.testing.assert_close(shared[1], loop[1], rtol=1e-12, atol=0)


def test_vmap_fixed_point_layer_and_unrolled_equal_the_loop():
    layer = fixed_point_layer(phi, tol=1e-14)
    x0 = torch.zeros(N_FP, dtype=DT)
    thetas = torch.stack([_t(N_FP, seed=70 + i) for i in range(3)])
    h = lambda t: (layer(x0, t) ** 2).sum()  # noqa: E731
    loop = torch.stack([grad(h)(t) for t in thetas])
    torch.testing.assert_close(vmap(grad(h))(thetas), loop, rtol=1e-12, atol=0)
    # nested: a 2 × 3 grid of problems, the inner batch dimension not leading
    grid = torch.stack([thetas, 0.5 * thetas]).transpose(0, 1)  # (3, 2, n)
    nested = vmap(vmap(grad(h)), in_dims=1)(grid)  # (2, 3, n)
    torch.testing.assert_close(nested[0], loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(nested[1, 2], grad(h)(0.5 * thetas[2]), rtol=1e-12, atol=0)
    for recompute in (False, True):
        unr = unrolled_layer(phi, 60, recompute=recompute)
        hu = lambda t, unr=unr: (unr(x0, t) ** 2).sum()  # noqa: E731
        loop_u = torch.stack([grad(hu)(t) for t in thetas])
        torch.testing.assert_close(vmap(grad(hu))(thetas), loop_u, rtol=1e-12, atol=0)
        torch.testing.assert_close(loop_u, loop, rtol=1e-8, atol=0)


def test_jacrev_uses_one_batched_solve_and_equals_the_closed_form():
    layer = fixed_point_layer(phi, tol=1e-14)
    x0, theta = torch.zeros(N_FP, dtype=DT), _t(N_FP, seed=45)
    J = torch.func.jacrev(lambda t: layer(x0, t))(theta)
    assert layer.solves == 1 and layer.last_solve.converged
    xs = layer(x0, theta)
    D = torch.diag(1 - xs ** 2)
    expected = torch.linalg.solve(torch.eye(N_FP, dtype=DT) - D @ W_FP, D)
    torch.testing.assert_close(J, expected, rtol=1e-9, atol=1e-14)
    Jb = vmap(torch.func.jacrev(lambda t: layer(x0, t)))(torch.stack([theta, 2 * theta]))
    torch.testing.assert_close(Jb[0], J, rtol=1e-12, atol=1e-15)


def test_forward_mode_is_refused_clearly():
    layer = fixed_point_layer(phi)
    x0, theta = torch.zeros(N_FP, dtype=DT), _t(N_FP, seed=46)
    with pytest.raises(NotImplementedError, match="forward mode"):
        torch.func.jvp(lambda t: layer(x0, t), (theta,), (torch.ones_like(theta),))


def test_pytree_arguments_and_non_tensor_arguments():
    """Arguments may be dicts and plain numbers; gradients reach every floating leaf."""
    def T(x, p, scale):
        return scale * (x - torch.tanh(p["W"] @ x + p["b"]))

    @custom_root(T)
    def solve(init, p, scale):
        x = init
        for _ in range(300):
            x = torch.tanh(p["W"] @ x + p["b"])
        return x

    p = {"W": W_FP.clone(), "b": _t(N_FP, seed=80)}
    g = grad(lambda p_: solve(torch.zeros(N_FP, dtype=DT), p_, 2.0).sum())(p)
    u = unrolled_layer(lambda x, p_: torch.tanh(p_["W"] @ x + p_["b"]), 300)
    g_u = grad(lambda p_: u(torch.zeros(N_FP, dtype=DT), p_).sum())(p)
    for key in p:
        torch.testing.assert_close(g[key], g_u[key], rtol=1e-9, atol=1e-14)


# --- diagnostics, warnings, errors --------------------------------------------------------


def test_non_convergence_warns_and_the_diagnostics_show_it():
    seen = []
    layer = lr_layer(solver=ConjugateGradient(maxiter=1, tol=1e-12), on_solve=seen.append)
    lam = LAM.clone().requires_grad_()
    with pytest.warns(ConvergenceWarning, match="stopped at relative residual") as record:
        validation(layer(W0, lam)).backward()
    assert [w.message.kind for w in record] == [LINEAR_SOLVE_NOT_CONVERGED]
    s = layer.last_solve
    assert s is not None and not s.converged and s.iterations == 1 and s.residual > 1e-12
    assert seen == [s] and layer.solves == 1
    d = layer.diagnostics
    assert d["converged"] is False and d["iterations"] == 1 and len(d["residuals"]) == 2
    # a converged solve is silent
    layer = lr_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validation(layer(W0, LAM.clone().requires_grad_())).backward()
    assert layer.diagnostics["converged"] is True


def test_the_implicit_backward_is_first_order_only():
    layer = lr_layer()
    lam = LAM.clone().requires_grad_()
    (g,) = torch.autograd.grad(validation(layer(W0, lam)), lam, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        g.backward()


def test_bad_input_is_refused_at_construction():
    T = lambda x, t: x - t  # noqa: E731
    with pytest.raises(BilevelInputError, match="optimality must be a callable"):
        custom_root("grad")
    with pytest.raises(BilevelInputError, match="solver"):
        custom_root(T, solver="lu")
    with pytest.raises(BilevelInputError, match="linear solver"):
        custom_root(T, solver=object())
    with pytest.raises(BilevelInputError, match="needs a symmetric"):
        custom_root(T, solver="cg")
    with pytest.raises(BilevelInputError, match="needs a symmetric"):
        custom_root(T, solver=ConjugateGradient(maxiter=5))
    with pytest.raises(BilevelInputError, match="mode must be"):
        custom_root(T, mode="forward")
    with pytest.raises(BilevelInputError, match="needs the loss"):
        custom_root(T, mode="jvp")
    with pytest.raises(BilevelInputError, match="decorated solver must be callable"):
        custom_root(T)(3)
    with pytest.raises(BilevelInputError, match="phi must be"):
        fixed_point_layer(None)
    with pytest.raises(BilevelInputError, match="forward_iterations"):
        fixed_point_layer(phi, forward_iterations=0)
    with pytest.raises(BilevelInputError, match="tol"):
        fixed_point_layer(phi, tol=-1.0)
    with pytest.raises(BilevelInputError, match="step must be"):
        unrolled_layer(1, 3)
    with pytest.raises(BilevelInputError, match="iterations"):
        unrolled_layer(phi, -1)
    with pytest.raises(BilevelInputError, match="segment"):
        unrolled_layer(phi, 4, recompute=True, segment=0)
    with pytest.raises(BilevelInputError, match="objective must be callable"):
        kkt_optimality(None)
    with pytest.raises(BilevelInputError, match="inequality must be callable or None"):
        kkt_optimality(lambda x: x.sum(), inequality=1.0)


def test_bad_input_is_refused_at_call():
    layer = lr_layer()
    with pytest.raises(BilevelInputError, match="one argument"):
        layer(W0, LAM, LAM)
    bad = custom_root(lambda x, t: x - t)(lambda init, t: (t, t))
    with pytest.raises(BilevelInputError, match="structure"):
        bad(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    T = kkt_optimality(lambda x, t: (x - t).square().sum(), equality=lambda x, t: x[:1])
    with pytest.raises(BilevelInputError, match="triple"):
        T((torch.zeros(2, dtype=DT), None, None), torch.ones(2, dtype=DT))
    bad = custom_root(lambda x, t: (x - t,))(lambda init, t: t.clone())
    with pytest.raises(BilevelInputError, match="optimality's value has structure"):
        bad(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT, requires_grad=True)).sum().backward()
    bad = custom_root(lambda x, t: x - t)(lambda init, t: "x")
    with pytest.raises(BilevelInputError, match="floating tensor"):
        bad(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    # a solver returning another shape or dtype than init's is refused in the forward
    for wrong in (torch.zeros(3, dtype=DT), torch.zeros(2, dtype=torch.float32)):
        bad = custom_root(lambda x, t: x - t)(lambda init, t, w=wrong: w)
        with pytest.raises(BilevelInputError, match="shape and dtype of init"):
            bad(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT, requires_grad=True))
    bad = fixed_point_layer(lambda x, t: torch.cat([x, t]))
    with pytest.raises(BilevelInputError, match=r"Φ\(x\) has shape \(4,\), x has \(2,\)"):
        bad(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
