"""Matrix-free linear solvers against dense solves and textbook convergence rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hypergrad.errors import NonFiniteError
from hypergrad.linear_solve.base import SolveResult
from hypergrad.linear_solve.cg import ConjugateGradient
from hypergrad.linear_solve.direct import Direct
from hypergrad.linear_solve.fixed_point import FixedPoint, Neumann
from hypergrad.linear_solve.gmres import GMRES
from hypergrad.pytree import tree_leaves, tree_ravel, tree_unravel

from problems import rounding

DT = torch.float64
LIKE = {"a": torch.zeros(3, 4, dtype=DT), "b": torch.zeros(8, dtype=DT)}
N = 20  # scalars in LIKE


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=rng(seed)))
    return q @ torch.diag(eigs.to(DT)) @ q.T


def nonsymmetric(n: int, seed: int = 1, scale: float = 0.3) -> torch.Tensor:
    """I + E with ‖E‖₂ ≈ 2·scale: non-symmetric and well conditioned."""
    E = torch.randn(n, n, dtype=DT, generator=rng(seed)) / n**0.5
    return torch.eye(n, dtype=DT) + scale * E


def cols(x: dict) -> torch.Tensor:
    """A batched tree as a (k, n) matrix."""
    return torch.cat([a.reshape(a.shape[0], -1) for a in tree_leaves(x)], dim=1)


def operator(A: torch.Tensor, batched: bool = False, like: dict = LIKE):
    """x ↦ A x on pytrees shaped like ``like`` (on batches of them if ``batched``)."""
    if batched:
        return lambda x: tree_unravel(cols(x) @ A.T, like)
    return lambda x: tree_unravel(A @ tree_ravel(x), like)


def vec(seed: int, k: int | None = None) -> dict:
    shape = (N,) if k is None else (k, N)
    return tree_unravel(torch.randn(*shape, dtype=DT, generator=rng(seed)), LIKE)


def rel_err(x: dict, ref: torch.Tensor) -> float:
    return float((tree_ravel(x) - ref).norm() / ref.norm())


SPD = spd(N, torch.linspace(1, 10, N))
NONSYM = nonsymmetric(N)
CONTRACTION = nonsymmetric(N, seed=2, scale=0.2)  # ρ(I − A) ≈ 0.2
KAPPA = 10.0  # the largest condition number of the three (SPD; NONSYM ≈ 2.5, CONTRACTION ≈ 1.7)


@pytest.mark.parametrize("solver, A", [
    (ConjugateGradient(), SPD),
    (ConjugateGradient(preconditioner=lambda r: r), SPD),
    (Direct(), SPD),
    (Direct(symmetric=True), SPD),
    (Direct(), NONSYM),
    (GMRES(), NONSYM),
    (GMRES(restart=4, maxiter=200), NONSYM),
    (FixedPoint(alpha=1.0, maxiter=200), CONTRACTION),
])
def test_matches_dense_solve(solver, A):
    b = vec(0)
    out = solver(operator(A), b)
    assert isinstance(out, SolveResult) and out.converged
    assert out.x.keys() == b.keys() and out.x["a"].shape == (3, 4) and out.x["a"].dtype == DT
    # relative error ≤ κ · relative residual: the iterative solvers' default tol 1e-10 ×
    # KAPPA = 1e-9 (Direct is exact up to rounding)
    assert rel_err(out.x, torch.linalg.solve(A, tree_ravel(b))) < 1e-9
    steps = 1 if isinstance(solver, Direct) else out.iterations  # Direct: before and after
    assert len(out.residuals) == steps + 1 and out.residuals[0] == pytest.approx(1.0)
    assert out.residual == out.residuals[-1] <= solver.tol
    true = (tree_ravel(b) - A @ tree_ravel(out.x)).norm() / tree_ravel(b).norm()
    # recursive vs recomputed residual: ≤ rounding(iterations · N, κ), a few 1e-12
    # (observed ≤ 2e-15)
    assert float(true) == pytest.approx(out.residual, abs=rounding(max(steps, 1) * N, KAPPA))


def reference_problem(d: int = 40, kappa: float = 50.0):
    A = spd(d, torch.linspace(1, kappa, d), seed=3)
    b = torch.randn(d, dtype=DT, generator=rng(4))
    return A, b, torch.linalg.solve(A, b), (lambda x: A @ x)


def test_reference_cg_vs_fixed_point_after_40_iterations():
    A, b, x_star, mv = reference_problem()
    cg = ConjugateGradient(tol=0.0, maxiter=40)(mv, b)
    fp = FixedPoint(alpha=1 / 50, tol=0.0, maxiter=40)(mv, b)
    assert cg.iterations == fp.iterations == 40 and not fp.converged
    err = lambda x: float((x - x_star).norm() / x_star.norm())  # noqa: E731
    assert err(cg.x) < 1e-6
    assert 0.1 < err(fp.x) < 0.5


def test_cg_error_bound():
    A, b, x_star, mv = reference_problem()
    kappa, q = 50.0, (50**0.5 - 1) / (50**0.5 + 1)
    for k in (1, 2, 5, 10, 20, 30):
        x = ConjugateGradient(tol=0.0, maxiter=k)(mv, b).x
        assert (x - x_star).norm() / x_star.norm() <= 2 * q**k * kappa**0.5


def test_fixed_point_rate_on_diagonal():
    mus = torch.tensor([1.0, 3.0, 6.0, 10.0], dtype=DT)
    alpha, b = 0.1, torch.ones(4, dtype=DT)
    x_star = b / mus
    ks = np.arange(20, 81, 10)
    errs = [float((FixedPoint(alpha=alpha, tol=0.0, maxiter=int(k))(lambda v: mus * v, b).x
                   - x_star).norm()) for k in ks]
    slope = np.polyfit(ks, np.log(errs), 1)[0]
    assert abs(slope - math.log(1 - alpha * mus[0].item())) < 0.01


def test_neumann_is_fixed_point_from_zero_and_the_series():
    A, alpha, K = CONTRACTION, 0.7, 6
    b = vec(5)
    neumann = Neumann(alpha=alpha, terms=K)(operator(A), b)
    fixed = FixedPoint(alpha=alpha, tol=0.0, maxiter=K + 1)(operator(A), b)
    series = sum(alpha * torch.linalg.matrix_power(torch.eye(N, dtype=DT) - alpha * A, j)
                 for j in range(K + 1)) @ tree_ravel(b)
    assert neumann.iterations == K + 1 and (Neumann().tol, Neumann(terms=3).maxiter) == (0.0, 4)
    torch.testing.assert_close(tree_ravel(neumann.x), tree_ravel(fixed.x), rtol=0, atol=1e-12)
    torch.testing.assert_close(tree_ravel(neumann.x), series, rtol=0, atol=1e-12)
    assert neumann.residuals == fixed.residuals


@pytest.mark.parametrize("solver, A", [
    (ConjugateGradient(tol=1e-12), SPD),
    (ConjugateGradient(tol=1e-12, preconditioner=lambda r: r), SPD),
    (FixedPoint(alpha=1.0, tol=1e-12, maxiter=200), CONTRACTION),
    (GMRES(tol=1e-12), NONSYM),
    (GMRES(tol=1e-12, restart=3, maxiter=300), NONSYM),
    (Direct(), NONSYM),
])
def test_batched_equals_loop(solver, A):
    B = tree_unravel(cols(vec(6, k=5)), LIKE)
    eigvec = torch.linalg.eigh(SPD).eigenvectors[:, 3]
    B["a"][1], B["b"][1] = tree_unravel(eigvec, LIKE).values()  # converges at once for CG
    B["a"][2], B["b"][2] = 0.0, 0.0  # b = 0: x = 0
    B["a"][3] *= 1e3  # columns of very different scales
    batched = solver(operator(A, batched=True), B, batched=True)
    looped = [solver(operator(A), {key: leaf[i] for key, leaf in B.items()}) for i in range(5)]
    assert batched.converged and all(out.converged for out in looped)
    for i, out in enumerate(looped):
        # a batched matmul against matrix-vector products through the same iterations:
        # rounding relative to each column's own scale (column 3 is 1e3 times the others),
        # ≤ rounding(iterations · N, κ) · ‖x_i‖ (observed ≤ 3e-16 · ‖x_i‖)
        x = tree_ravel(out.x)
        torch.testing.assert_close(cols(batched.x)[i], x, rtol=0, atol=rounding(
            out.iterations * N, KAPPA) * float(x.norm()))
    assert batched.iterations == max(out.iterations for out in looped)
    assert batched.residual == pytest.approx(max(out.residual for out in looped), rel=1e-6)
    assert cols(batched.x)[2].abs().max() == 0


@pytest.mark.parametrize("solver", [
    ConjugateGradient(damping=0.5), GMRES(damping=0.5), Direct(damping=0.5),
    Direct(damping=0.5, symmetric=True), FixedPoint(alpha=1 / 11, maxiter=400, damping=0.5),
])
def test_damping(solver):
    b = vec(7)
    out = solver(operator(SPD), b)
    x = torch.linalg.solve(SPD + 0.5 * torch.eye(N, dtype=DT), tree_ravel(b))
    assert out.converged and rel_err(out.x, x) < 1e-8
    assert rel_err(out.x, torch.linalg.solve(SPD, tree_ravel(b))) > 1e-2


@pytest.mark.parametrize("solver, A", [
    (ConjugateGradient(), SPD), (GMRES(), NONSYM), (FixedPoint(maxiter=200), CONTRACTION),
])
def test_warm_start(solver, A):
    b = vec(8)
    x_star = torch.linalg.solve(A, tree_ravel(b))
    exact = solver(operator(A), b, x0=tree_unravel(x_star, LIKE))
    assert exact.iterations == 0 and exact.converged and exact.residuals == [exact.residual]
    near = x_star + 1e-5 * torch.randn(N, dtype=DT, generator=rng(9))
    warm = solver(operator(A), b, x0=tree_unravel(near, LIKE))
    cold = solver(operator(A), b)
    assert warm.converged and warm.iterations < cold.iterations
    assert warm.residuals[0] < 1e-4 and rel_err(warm.x, x_star) < 1e-9  # κ · tol, as above


def test_jacobi_preconditioner_halves_cg_iterations():
    d = 40
    scale = torch.logspace(0, 4, d, dtype=DT)
    C = spd(d, torch.linspace(1, 5, d), seed=10)
    A = scale.sqrt()[:, None] * C * scale.sqrt()[None, :]
    b = torch.randn(d, dtype=DT, generator=rng(11))
    jacobi = lambda r: r / A.diagonal()  # noqa: E731
    plain = ConjugateGradient(tol=1e-8, maxiter=2000)(lambda x: A @ x, b)
    precond = ConjugateGradient(tol=1e-8, maxiter=2000, preconditioner=jacobi)(lambda x: A @ x, b)
    gmres = GMRES(tol=1e-8, preconditioner=jacobi)(lambda x: A @ x, b)
    x_star = torch.linalg.solve(A, b)
    assert plain.converged and precond.converged and gmres.converged
    assert 2 * precond.iterations <= plain.iterations
    assert float((precond.x - x_star).norm() / x_star.norm()) < 1e-6
    assert float((gmres.x - x_star).norm() / x_star.norm()) < 1e-6


@pytest.mark.parametrize("solver", [
    ConjugateGradient(maxiter=3), FixedPoint(alpha=0.1, maxiter=3), GMRES(maxiter=3),
    GMRES(maxiter=3, restart=2),
])
def test_maxiter_too_small(solver):
    out = solver(operator(SPD), vec(12))
    assert not out.converged and out.residual > solver.tol
    assert out.iterations == 3 and len(out.residuals) == 4
    assert out.residuals[0] == pytest.approx(1.0) and 1e-3 < out.residual < 1


def test_gmres_happy_breakdown():
    A = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=DT))
    b = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)
    out = GMRES(tol=0.0, maxiter=2)(lambda x: A @ x, b)
    floor = rounding(2 * 4, 3.0)  # 2 iterations on 4 unknowns, κ = 3: ≈ 1e-14
    assert out.iterations == 2 and out.residual < floor
    torch.testing.assert_close(out.x, b / A.diagonal(), rtol=0, atol=floor * float(b.norm()))
    more = GMRES(tol=1e-13, maxiter=50)(lambda x: A @ x, b)
    assert more.converged and more.iterations == 2


def test_gmres_exact_breakdown_in_a_batch():
    A = torch.diag(torch.tensor([2.0, 3.0, 5.0], dtype=DT))
    B = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=DT)
    first = GMRES(tol=0.0, maxiter=10)(lambda x: A @ x, B[0])
    assert first.converged and first.residual == 0 and first.iterations == 1  # A e₁ ∈ span e₁
    out = GMRES(tol=0.0, maxiter=10)(lambda X: X @ A, B, batched=True)
    # column i spans an (i+1)-dimensional Krylov space: the cycle ends there, w ≈ 0 up to
    # rounding of 3 iterations on 3 unknowns with κ = 2.5 (≈ 1e-14; observed 6e-16)
    floor = rounding(3 * 3, 2.5)
    assert out.residuals[3] < floor and out.residual < floor
    torch.testing.assert_close(out.x, B / A.diagonal(), rtol=0, atol=floor)


ALL = [ConjugateGradient(), FixedPoint(), Neumann(), GMRES(), Direct()]


@pytest.mark.parametrize("solver", ALL)
def test_non_finite_raises(solver):
    b = vec(13)
    b["b"][2] = float("nan")
    with pytest.raises(NonFiniteError, match=type(solver).__name__):
        solver(operator(SPD), b)
    bad = lambda x: {"a": x["a"] * float("inf"), "b": x["b"]}  # noqa: E731
    with pytest.raises(NonFiniteError, match="product"):
        solver(bad, vec(13))


@pytest.mark.parametrize("solver", ALL)
def test_zero_rhs(solver):
    out = solver(operator(SPD), {k: torch.zeros_like(v) for k, v in LIKE.items()},
                 x0=vec(14))
    assert out.converged and out.residual == 0 and out.iterations == 0
    assert all(float(a.abs().max()) == 0 for a in tree_leaves(out.x))


@pytest.mark.parametrize("cls, kwargs, field", [
    (ConjugateGradient, {"tol": -1.0}, "tol"),
    (ConjugateGradient, {"maxiter": 0}, "maxiter"),
    (ConjugateGradient, {"damping": -0.1}, "damping"),
    (ConjugateGradient, {"preconditioner": 3}, "preconditioner"),
    (FixedPoint, {"alpha": 0.0}, "alpha"),
    (FixedPoint, {"maxiter": 2.5}, "maxiter"),
    (Neumann, {"terms": -1}, "terms"),
    (Neumann, {"alpha": -1.0}, "alpha"),
    (GMRES, {"restart": 0}, "restart"),
    (GMRES, {"tol": float("nan")}, "tol"),
    (Direct, {"max_size": 0}, "max_size"),
    (Direct, {"damping": float("inf")}, "damping"),
])
def test_invalid_settings(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_direct_max_size_and_vmap_fallback():
    with pytest.raises(ValueError, match="max_size"):
        Direct(max_size=N - 1)(operator(SPD), vec(15))

    def no_vmap(x):  # .item() cannot be traced by vmap
        return tree_unravel(SPD @ tree_ravel(x) * (1.0 + 0 * tree_ravel(x)[0].item()), LIKE)

    out = Direct()(no_vmap, vec(15))
    # an LU solve of the same matrix built column by column: rounding-level, ~κ·EPS
    # (observed ≤ 1e-15), so 1e-12 keeps a 1e3 margin
    assert out.iterations == N and out.residual < 1e-12
    assert rel_err(out.x, torch.linalg.solve(SPD, tree_ravel(vec(15)))) < 1e-12


def test_cg_recursive_residual_and_float32():
    b = vec(16)
    out = ConjugateGradient(tol=1e-6, maxiter=50)(operator(SPD.float(), like={
        k: v.float() for k, v in LIKE.items()}), {k: v.float() for k, v in b.items()})
    assert out.converged and out.x["b"].dtype == torch.float32
    assert rel_err({k: v.double() for k, v in out.x.items()},
                   torch.linalg.solve(SPD, tree_ravel(b))) < 1e-4
    true = (tree_ravel(b) - SPD @ tree_ravel(out.x).double()).norm() / tree_ravel(b).norm()
    assert float(true) < 1e-5  # the recursive residual did not drift away from the true one


def test_gmres_says_a_singular_system_is_singular_and_stops():
    """b outside A's range: the Krylov space breaks down at once with the residual where it
    was; GMRES stops there (not after maxiter restarts) and says why."""
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    b = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # only the null direction
    result = GMRES(maxiter=1000)(lambda v: A @ v, b)
    assert not result.converged and result.iterations <= 2
    assert "singular" in result.note and "damping" in result.note
    # a consistent singular system still solves (b in the range)
    ok = GMRES(maxiter=1000)(lambda v: A @ v, torch.tensor([2.0, 1.0, 0.0],
                                                              dtype=torch.float64))
    assert ok.converged and ok.note is None
    assert torch.allclose(ok.x, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


# --- CG on one right-hand side (flat leaves, one host sync per iteration) -----------------


@pytest.mark.parametrize("kwargs", [{}, {"damping": 0.5}, {"preconditioner": "jacobi"}])
@pytest.mark.parametrize("warm", [False, True])
def test_cg_one_rhs_equals_a_batch_of_one(kwargs, warm):
    """The unbatched iteration and the batched one (k = 1) are the same iteration: the
    same iterates up to rounding, the same residual history, the same count."""
    A = SPD
    if kwargs.get("preconditioner") == "jacobi":
        kwargs = {"preconditioner": lambda r: tree_unravel(tree_ravel(r) / A.diagonal(), LIKE)}
    b = vec(20)
    x0 = vec(21) if warm else None
    solver = ConjugateGradient(tol=1e-10, maxiter=200, **kwargs)
    one = solver(operator(A), b, x0=x0)
    batch = ConjugateGradient(tol=1e-10, maxiter=200, damping=solver.damping,
                              preconditioner=None if solver.preconditioner is None else
                              lambda R: tree_unravel(cols(R) / A.diagonal(), LIKE))(
        operator(A, batched=True), {k: v[None] for k, v in b.items()},
        x0=None if x0 is None else {k: v[None] for k, v in x0.items()}, batched=True)
    assert one.converged and batch.converged and one.iterations == batch.iterations
    # the two differ only in the summation order of the inner products: rounding of
    # `iterations` steps on N unknowns with κ ≤ 10 (relative residuals: relative to ‖b‖)
    floor = rounding(one.iterations * N, KAPPA)
    np.testing.assert_allclose(one.residuals, batch.residuals, rtol=0, atol=floor)
    x = tree_ravel(one.x)
    torch.testing.assert_close(cols(batch.x)[0], x, rtol=0, atol=floor * float(x.norm()))
    x_star = torch.linalg.solve(A + solver.damping * torch.eye(N, dtype=DT), tree_ravel(b))
    assert rel_err(one.x, x_star) < KAPPA * solver.tol


def test_cg_one_rhs_leaves_its_inputs_alone():
    """The iteration updates its vectors in place: never b's or x0's."""
    b, x0 = vec(22), vec(23)
    b_copy, x0_copy = {k: v.clone() for k, v in b.items()}, {k: v.clone() for k, v in x0.items()}
    for start in (None, x0):
        out = ConjugateGradient(tol=1e-12)(operator(SPD), b, x0=start)
        assert out.converged
    for k in b:
        assert torch.equal(b[k], b_copy[k]) and torch.equal(x0[k], x0_copy[k])


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("at", [1, 3])
def test_cg_non_finite_product_at_a_later_iteration(batched, at):
    """NaN in the product A p of iteration ``at`` raises NonFiniteError at that product
    (the batched path checks every product, the other only when pᵀAp is not finite);
    a NaN iterate fed to A raises LinearSolveError."""
    from hypergrad.errors import LinearSolveError

    calls = []

    def flaky(x):
        calls.append(1)
        y = operator(SPD, batched)(x)
        if len(calls) == at:
            y["a"] = y["a"] * float("nan")
        return y

    b = vec(24) if not batched else tree_unravel(cols(vec(24, k=2)), LIKE)
    with pytest.raises(NonFiniteError, match="ConjugateGradient: the matrix-vector product"):
        ConjugateGradient(tol=0.0, maxiter=10)(flaky, b, batched=batched)
    assert len(calls) == at
    def nan_precond(r):
        return {k: v * float("nan") for k, v in r.items()}

    with pytest.raises(LinearSolveError, match="vector multiplied by A already contains NaN"):
        ConjugateGradient(preconditioner=nan_precond)(operator(SPD, batched), b,
                                                        batched=batched)


def test_cg_one_rhs_solution_in_the_precision_of_b():
    """A float32 warm start for a float64 system gives a float64 solution whose true
    residual is the one reported (a float32 x would stall near 1e-7)."""
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = m @ m.T / 40 + torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    x0 = torch.randn(40, generator=gen, dtype=torch.float32)
    out = ConjugateGradient(tol=1e-12, maxiter=400)(lambda v: a @ v.double(), b, x0=x0)
    assert out.x.dtype == torch.float64 and out.converged
    true = float((b - a @ out.x).norm() / b.norm())
    assert true <= 10 * out.residual + 1e-15


def test_cg_one_rhs_can_be_differentiated_in_b():
    """With b requiring grad the solve is recorded out of place: d(1ᵀx)/db = A⁻¹1 (the
    CG iterate is A⁻¹b to the tolerance; its derivative in b to the same order)."""
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    a = m @ m.T / 8 + torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    x = ConjugateGradient(tol=1e-13, maxiter=100)(lambda v: a @ v, b).x
    (g,) = torch.autograd.grad(x.sum(), b)
    expected = torch.linalg.solve(a, torch.ones(8, dtype=torch.float64))
    assert float((g - expected).norm() / expected.norm()) < 1e-9


def test_gmres_tol_zero_on_a_nonsingular_system_has_no_singular_note():
    """A breakdown at the rounding floor (tol=0 drives the residual there) is a solve, not
    the singular-system breakdown, which leaves the residual far above rounding."""
    a = torch.tensor([[4.0, 1, 0], [1, 3, 1], [0, 1, 2]], dtype=torch.float64)
    b = torch.tensor([1.0, 2, 3], dtype=torch.float64)
    out = GMRES(tol=0.0, maxiter=40, restart=3)(lambda v: a @ v, b)
    assert out.note is None and out.residual < 1e-13
    singular = torch.tensor([[1.0, 0], [0, 0]], dtype=torch.float64)
    out = GMRES(tol=1e-10, maxiter=40)(lambda v: singular @ v,
                                       torch.tensor([1.0, 1], dtype=torch.float64))
    assert out.note is not None and "singular" in out.note
