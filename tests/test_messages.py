"""Errors whose words match the numbers: a broken-down linear solve blames the system, not
the product; a diverged inner run blames the step size, not the linear solver; optimizer
settings out of range are refused; a zero hypergradient says why (float64, fast)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hypergrad as hg
from hypergrad.estimators.base import FLOOR, GROWTH, check_growth
from hypergrad.optim import check_settings

from problems import DT, Ridge


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge.make(n=20, d=4, nv=10)


def diag(*values: float):
    a = torch.tensor(values, dtype=DT)
    return lambda x: a * x


def ones(n: int = 2) -> torch.Tensor:
    return torch.ones(n, dtype=DT)


def ridge_problem(ridge: Ridge, optimizer, steps: int, inner_loss=None) -> hg.Problem:
    return hg.Problem(inner_loss or ridge.inner_loss, ridge.outer_loss, (ridge.X, ridge.y),
                      (ridge.Xv, ridge.yv), optimizer=optimizer, steps=steps)


def test_error_classes_extend_the_old_ones():
    assert issubclass(hg.LinearSolveError, hg.NonFiniteError)
    assert issubclass(hg.DivergenceError, hg.NonFiniteError)
    assert issubclass(hg.OptimizerSettingError, hg.BilevelInputError)
    assert issubclass(hg.OptimizerSettingError, ValueError)


# --- 1. CG breakdown: the curvature, not the product ---------------------------------------

@pytest.mark.parametrize("a, iteration", [
    ((1.0, -1.0), 1),  # indefinite, pᵀAp = 1 − 1 = 0 on p = b
    ((1.0, 0.0), 2),   # singular, b outside the range of A
    ((0.0, 0.0), 1),   # A = 0
])
def test_cg_breakdown_names_the_curvature(a, iteration):
    with pytest.raises(hg.LinearSolveError, match=(
            rf"ConjugateGradient broke down at iteration {iteration}: the curvature "
            r"pᵀAp = 0\.000e\+00 gives no finite step, so the system is singular or not "
            r"positive definite.*ConjugateGradient\(damping=\.\.\.\).*GMRES, Direct")):
        hg.ConjugateGradient()(diag(*a), ones())


def test_cg_breakdown_with_damping_and_in_a_batch():
    with pytest.raises(hg.LinearSolveError, match=re.escape("pᵀ(A + damping·I)p = 0.000e+00")):
        hg.ConjugateGradient(damping=1.0)(diag(1.0, -3.0), ones())  # 2 − 2 = 0
    B = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DT)  # column 0 solves in one step
    with pytest.raises(hg.LinearSolveError, match=r"iteration 1 \(column 1\): the curvature"):
        hg.ConjugateGradient()(lambda X: X * torch.tensor([1.0, -1.0], dtype=DT), B,
                               batched=True)


def test_cg_on_an_indefinite_system_is_judged_by_its_residual():
    """Negative curvature alone is no error (CG often converges on an invertible indefinite
    Hessian, as at a saddle of a network's loss); it is named if the solve then fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hg.ConjugateGradient()(diag(1.0, -2.0), ones())  # pᵀAp = −1 < 0, then exact
    torch.testing.assert_close(out.x, torch.tensor([1.0, -0.5], dtype=DT))
    out = hg.ConjugateGradient(maxiter=1)(diag(1.0, -2.0), ones())
    assert not out.converged
    assert re.search(r"^CG met the curvature pᵀAp = -1\.000e\+00 ≤ 0 at iteration 1: the "
                     r"system is singular or not positive definite.*ConjugateGradient\("
                     r"damping=\.\.\.\)", out.note), out.note


def test_an_estimator_warns_once_with_the_solver_note():
    """Implicit on an indefinite Hessian that CG does not solve: one ConvergenceWarning,
    which gives CG's finding instead of 'raise maxiter or tol'."""
    inner = lambda p, h, b: 0.5 * (p["w"] * h["d"] * p["w"]).sum()  # noqa: E731
    outer = lambda p, h, b: (p["w"] - 1).pow(2).sum()  # noqa: E731
    problem = hg.Problem(inner, outer, steps=0)
    est = hg.Implicit(solver=hg.ConjugateGradient(maxiter=1), inner_steps=0, inner_tol=None)
    with pytest.warns(hg.ConvergenceWarning) as record:
        est(problem, {"d": torch.tensor([1.0, -2.0], dtype=DT)},
            {"w": torch.tensor([0.5, 0.3], dtype=DT)})
    messages = [str(w.message) for w in record if w.category is hg.ConvergenceWarning]
    assert len(messages) == 1, messages
    assert "CG met the curvature" in messages[0] and "raise maxiter" not in messages[0]


@pytest.mark.parametrize("maxiter", [20, 100])
def test_cg_on_a_singular_inconsistent_system_says_it_diverged(maxiter):
    """A = diag(1, 0, 2, 0.5, 1) with b outside its range: the iterates grow without bound.
    CG must say so, not return a huge answer nor blame a preconditioner."""
    A = diag(1.0, 0.0, 2.0, 0.5, 1.0)
    b = torch.tensor([0.3, 0.2, 0.1, 0.4, 0.5], dtype=DT)
    with pytest.raises(hg.LinearSolveError, match=r"ConjugateGradient diverged: the relative "
                                                  r"residual grew .*singular.*damping"):
        hg.ConjugateGradient(maxiter=maxiter)(A, b)


def test_cg_on_a_singular_hessian_from_an_estimator():
    """The inner loss ignores w[1]: H = diag(1, 0), and ∇_w F has a part along w[1]."""
    inner = lambda p, h, b: 0.5 * (p["w"][0] - 1) ** 2 + 0 * h["s"]  # noqa: E731
    outer = lambda p, h, b: 0.5 * ((h["s"] * p["w"] - 1) ** 2).sum()  # noqa: E731
    problem = hg.Problem(inner, outer, steps=0)
    est = hg.Implicit(inner_steps=0, inner_tol=None)
    with pytest.raises(hg.LinearSolveError, match=r"ConjugateGradient broke down at iteration 2: "
                                                  r"the curvature pᵀAp = 0\.000e\+00"):
        est(problem, {"s": torch.tensor(1.0, dtype=DT)}, {"w": torch.zeros(2, dtype=DT)})


def test_cg_blames_a_bad_preconditioner():
    flip = torch.tensor([1.0, -1.0], dtype=DT)  # M⁻¹ = diag(1, −1): indefinite
    out = hg.ConjugateGradient(preconditioner=lambda r: flip * r, maxiter=1)(
        diag(2.0, 1.0), torch.tensor([1.0, 2.0], dtype=DT))
    assert "met ⟨r, M⁻¹r⟩ = -3.000e+00 ≤ 0 at iteration 1: the preconditioner is not " \
        "positive" in out.note, out.note
    with pytest.raises(hg.LinearSolveError, match="already contains NaN or inf.*preconditioner"):
        hg.ConjugateGradient(preconditioner=lambda r: r * float("nan"))(diag(2.0, 2.0), ones())


@pytest.mark.parametrize("solver", [hg.ConjugateGradient(), hg.GMRES(), hg.FixedPoint(),
                                    hg.Neumann()], ids=lambda s: type(s).__name__)
def test_a_genuinely_nan_product_is_still_blamed(solver):
    with pytest.raises(hg.NonFiniteError, match="the matrix-vector product returned NaN") as e:
        solver(lambda x: x * float("nan"), ones())
    assert not isinstance(e.value, hg.LinearSolveError)


@pytest.mark.parametrize("solver, name", [
    (hg.FixedPoint(alpha=1.0, maxiter=100), "FixedPoint"),
    (hg.Neumann(alpha=1.0, terms=100), "Neumann"),
])
def test_fixed_point_divergence_names_the_growth(solver, name):
    """I − αA = diag(−2, 0): the residual doubles each step and passes 1e10 at 2³⁴."""
    with pytest.raises(hg.LinearSolveError, match=re.escape(
            f"{name} diverged: the relative residual grew from 1.00e+00 to {2.0 ** 34:.2e} in "
            "34 iterations, so the spectral radius of I − alpha·A is not below 1 (alpha = 1). "
            "Lower alpha")):
        solver(diag(3.0, 1.0), torch.tensor([1.0, 0.0], dtype=DT))


# --- 2. Direct on a singular matrix --------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_direct_singular_is_a_library_error(symmetric):
    with pytest.raises(hg.LinearSolveError, match=(
            r"Direct: the 3×3 matrix A is singular .*Direct\(damping=\.\.\.\)")):
        hg.Direct(symmetric=symmetric)(diag(1.0, 2.0, 0.0), ones(3))
    out = hg.Direct(damping=1.0, symmetric=symmetric)(diag(1.0, 2.0, 0.0), ones(3))
    torch.testing.assert_close(out.x, torch.tensor([0.5, 1 / 3, 1.0], dtype=DT))


def test_direct_names_the_damping():
    with pytest.raises(hg.LinearSolveError, match=re.escape(
            "the 2×2 matrix A + damping·I (damping = 1) is singular")):
        hg.Direct(damping=1.0)(diag(1.0, -1.0), ones())


# --- 3. zero through optimizer settings only -----------------------------------------------

def _lr_only(ridge: Ridge, steps: int = 200) -> hg.Problem:
    lam = ridge.lam.exp()

    def inner(p, h, b):
        r = b[0] @ p["w"] - b[1]
        return 0.5 * (r @ r) / len(r) + 0.5 * (lam * p["w"] ** 2).sum()

    optimizer = hg.SGD(lr=lambda h: h["log_lr"].exp())
    return ridge_problem(ridge, optimizer, steps, inner_loss=inner)


def test_implicit_zero_through_settings_says_why(ridge):
    hp = {"log_lr": torch.tensor(-1.0, dtype=DT)}
    with pytest.warns(RuntimeWarning, match=(
            r"implicit: the hypergradient is exactly zero because the hyperparameters are read "
            r"only by optimizer settings \(learning rate, momentum, \.\.\.\), which have no "
            r"effect at the fixed point w\*.*Unrolled or Truncated")):
        out = hg.hypergradient(_lr_only(ridge), hp, ridge.params0(), "implicit")
    assert float(out.grad["log_lr"]) == 0.0
    # an unrolled estimator does differentiate the learning rate (a short run: nonzero)
    short = hg.hypergradient(_lr_only(ridge, steps=3), hp, ridge.params0(), "unrolled")
    assert abs(float(short.grad["log_lr"])) > 1e-3


def test_generic_zero_warning_otherwise(ridge):
    inner = lambda p, h, b: ridge.inner_loss(p, {"lam": ridge.lam}, b) + 0 * h["c"]  # noqa: E731
    problem = ridge_problem(ridge, hg.SGD(lr=0.3), 200, inner_loss=inner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg.hypergradient(problem, {"c": torch.tensor(1.0, dtype=DT)}, ridge.params0())
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("the outer loss does not depend on the hyperparameters" in t for t in texts)
    assert not any("optimizer settings" in t for t in texts)


def test_settings_in_a_tuple_count_as_readers(ridge):
    """Adam's betas may hold a callable: its hyperparameter is read (check_problem)."""
    adam = hg.Adam(lr=0.05, betas=(lambda h: torch.sigmoid(h["x"]), 0.99))
    hp = {**ridge.hparams(), "x": torch.tensor(1.0, dtype=DT)}
    out = hg.hypergradient(ridge_problem(ridge, adam, 5), hp, ridge.params0(), "unrolled")
    assert float(out.grad["x"]) != 0.0


# --- 4. a diverged inner run (NaN) is blamed on the step size ------------------------------

@pytest.mark.parametrize("estimator", ["implicit", "fixed_point"])
def test_implicit_after_a_nan_inner_run(ridge, estimator):
    problem = ridge_problem(ridge, hg.SGD(lr=1e3), 400)
    with pytest.raises(hg.DivergenceError, match=(
            r"implicit: the inner run diverged: params\['w'\] contains NaN or inf after 400 "
            r"inner steps; lower the inner step size \(lr\)")):
        hg.hypergradient(problem, ridge.hparams(), ridge.params0(), estimator)


@pytest.mark.parametrize("estimator", ["unrolled", "truncated", "forward"])
def test_unrolled_after_a_nan_inner_run(ridge, estimator):
    problem = ridge_problem(ridge, hg.SGD(lr=1e3), 400)
    with pytest.raises(hg.DivergenceError, match=(
            r"the hypergradient\['lam'\] contains NaN or inf because the inner run diverged: "
            r"params\['w'\] contains NaN or inf after 400 inner steps; lower the inner step")):
        hg.hypergradient(problem, ridge.hparams(), ridge.params0(), estimator)


def test_implicit_given_nan_params_without_inner_steps(ridge):
    bad = {"w": torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=DT)}
    with pytest.raises(hg.DivergenceError, match=r"params\['w'\] contains NaN or inf "
                                                 r"\(inner_steps=0"):
        hg.Implicit(inner_steps=0)(ridge.problem(), ridge.hparams(), bad)


# --- 5. optimizer settings out of range ----------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: hg.SGD(lr=-0.1), r"SGD: lr must be finite and > 0 .*, got -0\.1$"),
    (lambda: hg.SGD(lr=0.0), r"SGD: lr must be finite and > 0 .*, got 0\.0$"),
    (lambda: hg.SGD(lr=float("inf")), r"SGD: lr must be finite and > 0 .*, got inf$"),
    (lambda: hg.SGD(lr={"w": 0.1, "b": -1.0}), r"SGD: lr\['b'\] must be .*, got -1\.0$"),
    (lambda: hg.SGD(weight_decay=-1e-3), r"SGD: weight_decay must be finite and >= 0 .*-0\.001$"),
    (lambda: hg.Momentum(momentum=1.0), r"Momentum: momentum must be in \[0, 1\) .*, got 1\.0$"),
    (lambda: hg.Nesterov(momentum=-0.5), r"Nesterov: momentum must be in \[0, 1\) .*-0\.5$"),
    (lambda: hg.Momentum(lr=-1.0), r"Momentum: lr must be finite and > 0"),
    (lambda: hg.Adam(betas=(0.9, 1.0)), r"Adam: betas\[1\] must be in \[0, 1\) .*, got 1\.0$"),
    (lambda: hg.Adam(betas=(-0.1, 0.999)), r"Adam: betas\[0\] must be in \[0, 1\)"),
    (lambda: hg.Adam(eps=0.0), r"Adam: eps must be finite and > 0 .*, got 0\.0$"),
    (lambda: hg.AdamW(weight_decay=-0.1), r"AdamW: weight_decay must be finite and >= 0"),
    (lambda: hg.AdamW(lr=-3e-4), r"AdamW: lr must be finite and > 0 .*, got -0\.0003$"),
    (lambda: hg.Chebyshev(mu=0.0, L=1.0), r"Chebyshev: mu must be finite and > 0 .*, got 0\.0$"),
    (lambda: hg.Chebyshev(mu=2.0, L=1.0), r"Chebyshev: mu must be < L, got mu = 2\.0 and "
                                          r"L = 1\.0$"),
])
def test_settings_out_of_range_are_refused_at_construction(make, match):
    with pytest.raises(hg.OptimizerSettingError, match=match):
        make()


def test_valid_settings_and_deferred_ones_are_accepted():
    for opt in (hg.SGD(lr=0.1, weight_decay=0.0), hg.Momentum(momentum=0.0),
                hg.Adam(betas=(0.0, 0.5)), hg.Chebyshev(mu=0.1, L=1.0),
                hg.SGD(lr=lambda h: -1.0), hg.SGD(lr=torch.tensor(-1.0, dtype=DT))):
        check_settings(opt)  # callables and tensors wait for the hyperparameters


@pytest.mark.parametrize("estimator", ["implicit", "unrolled", "truncated", "fixed_point"])
def test_learned_setting_checked_at_each_call(ridge, estimator):
    problem = ridge_problem(ridge, hg.SGD(lr=lambda h: h["lr"]), 5)
    est = hg.make_estimator(estimator)
    with pytest.raises(hg.OptimizerSettingError,
                       match=r"SGD: lr\(hparams\) must be finite and > 0 .*, got -0\.25$"):
        est(problem, {"lr": torch.tensor(-0.25, dtype=DT)}, ridge.params0())


def test_setting_checks_at_validation_and_for_tensors(ridge):
    problem = ridge_problem(ridge, hg.Momentum(lr=0.1, momentum=lambda h: h["m"]), 5)
    with pytest.raises(hg.OptimizerSettingError, match=(
            r"Momentum: momentum\(hparams\) must be in \[0, 1\) .*, got 1\.5 \(an entry of a "
            r"tensor of shape \(2,\)\)")):
        hg.check_problem(problem, {**ridge.hparams(), "m": torch.tensor([0.5, 1.5], dtype=DT)},
                         ridge.params0())
    lr = torch.tensor(0.1, dtype=DT)
    problem = ridge_problem(ridge, hg.SGD(lr=lr), 5)
    hg.hypergradient(problem, ridge.hparams(), ridge.params0(), "unrolled")
    lr.fill_(-0.1)  # changed in place after construction
    with pytest.raises(hg.OptimizerSettingError, match=r"SGD: lr must be .*, got -0\.1"):
        hg.Unrolled()(problem, ridge.hparams(), ridge.params0())


def test_chebyshev_learned_bounds_are_ordered(ridge):
    cheb = hg.Chebyshev(mu=lambda h: h["mu"], L=3.0)
    problem = ridge_problem(ridge, cheb, 5)
    with pytest.raises(hg.OptimizerSettingError, match=r"Chebyshev: mu\(hparams\) must be < L, "
                                                       r"got mu\(hparams\) = 4\.0 and L = 3\.0"):
        hg.Truncated(window=2)(problem, {"mu": torch.tensor(4.0, dtype=DT)}, ridge.params0())


# --- 6. a finite but diverging inner run ---------------------------------------------------

def _inner_losses(ridge: Ridge, lr: float, steps: int) -> tuple[float, float]:
    """f at the start and after ``steps`` gradient steps, by hand."""
    p = ridge.params0()
    start = float(ridge.inner_loss(p, ridge.hparams(), (ridge.X, ridge.y)))
    A, c = ridge.A(), ridge.X.T @ ridge.y / ridge.X.shape[0]
    w = p["w"]
    for _ in range(steps):
        w = w - lr * (A @ w - c)
    return start, float(ridge.inner_loss({"w": w}, ridge.hparams(), (ridge.X, ridge.y)))


@pytest.mark.parametrize("estimator, steps", [
    ("implicit", 40), ("fixed_point", 40), ("unrolled", 40), ("forward", 40),
    (hg.Truncated(window=5), 40),
])
def test_a_finite_divergence_is_caught(ridge, estimator, steps):
    """lr = 2.5/L: the top mode grows by |1 − 2.5| = 1.5 a step, the loss by 2.25."""
    lr = 2.5 / ridge.eigs()[1]
    start, end = _inner_losses(ridge, lr, steps)
    assert 1e13 < end < 1e15  # finite: no NaN anywhere
    problem = ridge_problem(ridge, hg.SGD(lr=lr), steps)
    name = hg.make_estimator(estimator).name
    with pytest.raises(hg.DivergenceError, match=re.escape(
            f"{name}: the inner run diverged: the inner loss went from {start:.3e} to "
            f"{end:.3e} over {steps} inner steps; lower the inner step size (lr)")):
        hg.hypergradient(problem, ridge.hparams(), ridge.params0(), estimator)


def test_growth_thresholds():
    assert GROWTH >= 1e10 and FLOOR >= 1e10
    check_growth("x", 1e-12, 1e-2, 10)   # a warm start near 0 rising a little: healthy
    check_growth("x", 0.0, 1e9, 10)      # below the floor
    check_growth("x", 1e3, 1e12, 10)     # 1e9-fold: not enough
    check_growth("x", 1.0, float("nan"), 10)  # NaN is left to the finiteness checks
    with pytest.raises(hg.DivergenceError, match=r"went from 1\.000e\+00 to 2\.000e\+10 over 7"):
        check_growth("x", 1.0, 2e10, 7)
    with pytest.raises(hg.DivergenceError, match="to inf over"):
        check_growth("x", 1.0, float("inf"), 7)


def test_healthy_runs_pass_silently(ridge):
    lr = 1.0 / ridge.eigs()[1]
    problem = ridge_problem(ridge, hg.SGD(lr=lr), 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for est in ("implicit", "unrolled", "truncated"):
            hg.hypergradient(problem, ridge.hparams(), ridge.params0(), est)
