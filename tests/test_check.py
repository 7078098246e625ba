"""The finite-difference check itself: error bars on known functions, the noise estimate,
and verdicts on a right and on deliberately wrong estimators (float64)."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

import hypergrad as hg
from hypergrad.finite_difference import central_differences, estimate_noise
from hypergrad.pytree import tree_map

from problems import DT, EPS, Ridge, rel, rounding

X = torch.tensor([0.3, -0.7, 1.1], dtype=DT)
BASIS = [torch.eye(3, dtype=DT)[i] for i in range(3)]
A = torch.tensor([1.5, -2.0, 0.25], dtype=DT)


def cubic(x: torch.Tensor) -> float:
    """h = Σ a_i x_i³: D(s) along e_i is exactly 3a_i x_i² + a_i s² (h'''/6 = a_i)."""
    return float((A * x ** 3).sum())


def exp_sum(x: torch.Tensor) -> float:
    """h = Σ e^{x_i}: D(s) = e^{x_i} sinh(s)/s = e^{x_i} (1 + s²/6 + s⁴/120 + …)."""
    return float(x.exp().sum())


def unit_noise(x: torch.Tensor) -> float:
    """Deterministic pseudo-random noise of mean 0 and standard deviation 1 (uniform on
    [−√3, √3]), a hash of the bits of x: the same on every machine."""
    digest = hashlib.blake2b(x.numpy().tobytes(), digest_size=8).digest()
    return (2 * int.from_bytes(digest, "little") / 2 ** 64 - 1) * math.sqrt(3)


# --- error bars on known functions -------------------------------------------------------

@pytest.mark.parametrize("step", [1e-3, 1e-2, 1e-1])
def test_truncation_of_a_cubic_is_exactly_c_s2(step):
    """For a cubic the Richardson estimate |D(2s) − D(s)| / 3 is exactly |h'''/6|·s²; the
    only error left is rounding, ≲ EPS·|h| / s per difference."""
    fd = central_differences(cubic, X, BASIS, step)
    exact_truncation = A.abs() * step ** 2
    roundoff = 64 * EPS * (A.abs() * X.abs() ** 3).sum() / step  # of D(s), D(2s) and their gap
    torch.testing.assert_close(fd.truncation, exact_truncation, rtol=0, atol=float(roundoff))
    torch.testing.assert_close(fd.value - 3 * A * X ** 2, A * step ** 2, rtol=0,
                               atol=float(roundoff))
    assert torch.equal(fd.error, 2 * fd.truncation + fd.rounding)
    assert bool(((fd.value - 3 * A * X ** 2).abs() <= fd.error).all())  # the bar covers it


def test_truncation_of_exp_matches_c_s2_and_the_bar_covers_the_error():
    """D(s) − h' = e^x (s²/6 + s⁴/120 + …); the estimate is e^x s²/6 · (1 + O(s²))."""
    for step in [1e-4, 1e-3, 1e-2, 1e-1]:
        fd = central_differences(exp_sum, X, BASIS, step)
        c_s2 = X.exp() * step ** 2 / 6
        assert float((fd.truncation / c_s2 - 1).abs().max()) < 1e-3 + step ** 2, step
        error = (fd.value - X.exp()).abs()
        assert bool((error <= fd.error).all()), (step, error, fd.error)
        assert bool((error >= 0.9 * c_s2).all())  # the truncation is real, and it is seen


def test_rounding_part_scales_as_one_over_the_step():
    """At small steps h = Σ e^x is at its rounding floor (σ = EPS·|h|): the rounding part
    is 3σ/(√2 s), it dominates the bar, and the bar still covers the error."""
    rows = []
    for step in [1e-8, 1e-7, 1e-6]:
        fd = central_differences(exp_sum, X, BASIS, step)
        assert fd.noise == pytest.approx(EPS * exp_sum(X), rel=1e-5)
        torch.testing.assert_close(fd.rounding, torch.full((3,), 3 * fd.noise / (
            math.sqrt(2) * step), dtype=DT), rtol=1e-14, atol=0)
        assert bool((fd.value - X.exp()).abs().le(fd.error).all()), step
        rows.append(float(fd.rounding[0]) * step)
    assert max(rows) / min(rows) < 1 + 1e-5  # rounding · s is constant


@pytest.mark.parametrize("sigma", [1e-6, 1e-9, 1e-12])
def test_ecnoise_recovers_an_injected_noise_level(sigma):
    """h = Σ e^x + σ·u(x) with unit pseudo-random u, at 40 points. Seven values give a rough
    estimate σ̂ (a mean of at most 5 squared differences), so the test asks for what such
    an estimate delivers: the median within a factor 1.5 of σ, 85 % within a factor 3, and
    the error bar covering 80 % of the differences (it is a statistical bar; observed:
    medians 0.80-0.81, 36-39 of 40 within a factor 3, 36-40 covered)."""
    ratios, covered = [], 0
    for k in range(40):
        x = X + 0.01 * k
        fd = central_differences(lambda y: exp_sum(y) + sigma * unit_noise(y), x, BASIS, 1e-3)
        ratios.append(fd.noise / sigma)
        torch.testing.assert_close(fd.rounding, torch.full((3,), 3 * fd.noise / (
            math.sqrt(2) * 1e-3), dtype=DT), rtol=1e-14, atol=0)
        covered += int(((fd.value - x.exp()).abs() <= fd.error).all())
    ratios.sort()
    assert 1 / 1.5 < ratios[20] < 1.5, ratios
    assert sum(1 / 3 < r < 3 for r in ratios) >= 34, ratios
    assert covered >= 32, covered


def test_estimate_noise_on_a_table():
    g = torch.Generator().manual_seed(0)
    smooth = [math.exp(0.3 + j * 1e-5) for j in range(7)]
    for sigma in [1e-7, 1e-10]:
        noise = torch.randn(7, generator=g, dtype=DT) * sigma
        values = [s + float(n) for s, n in zip(smooth, noise, strict=True)]
        assert 1 / 3 < estimate_noise(values) / sigma < 3
    assert estimate_noise([2.0] * 7, floor=1e-15) == 1e-15  # no noise seen: the floor
    assert estimate_noise(smooth, floor=0.0) < 1e-15  # a smooth table: rounding only
    assert estimate_noise(smooth, floor=1e-3) == 1e-3
    with pytest.raises(ValueError, match="at least 4"):
        estimate_noise([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="not finite"):
        estimate_noise([1.0, 2.0, math.nan, 4.0])


def test_central_differences_reject_bad_arguments():
    for step in [0.0, -1e-3, math.inf, math.nan]:
        with pytest.raises(ValueError, match="step"):
            central_differences(cubic, X, BASIS, step)
    with pytest.raises(ValueError, match="at least one direction"):
        central_differences(cubic, X, [], 1e-3)
    with pytest.raises(ValueError, match="shape of x"):
        central_differences(cubic, X, [torch.ones(2, dtype=DT)], 1e-3)
    with pytest.raises(ValueError, match="smaller step"):
        central_differences(lambda x: float(torch.log(x[0])), X, BASIS, 1.0)
    with pytest.raises(ValueError, match="step"):
        central_differences(cubic, X, BASIS, True)
    with pytest.raises(ValueError, match="list of tensors"):
        central_differences(cubic, X, torch.stack(BASIS), 1e-3)
    with pytest.raises(ValueError, match="tensor of the shape of x"):
        central_differences(cubic, X, [[1.0, 0.0, 0.0]], 1e-3)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        central_differences(cubic, torch.ones(3, dtype=torch.int64), BASIS, 1e-3)
    with pytest.raises(ValueError, match="h must return a scalar"):
        central_differences(lambda x: x * 2, X, BASIS, 1e-3)
    for floor in (-1.0, math.nan):
        with pytest.raises(ValueError, match="floor"):
            estimate_noise([1.0, 2.0, 3.0, 4.0], floor=floor)
    with pytest.raises(ValueError, match="sequence of numbers"):
        estimate_noise("abcd")


# --- check_hypergradient on Ridge (closed-form w*(λ)) ------------------------------------

@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge.make()


def closed_form(r: Ridge):
    """w*(λ) = (XᵀX/n + diag e^λ)⁻¹ Xᵀy/n for any λ."""
    def solve(h):
        A = r.X.T @ r.X / r.X.shape[0] + torch.diag(h["lam"].exp())
        return {"w": torch.linalg.solve(A, r.X.T @ r.y / r.X.shape[0])}
    return solve


EXACT = hg.Implicit(solver=hg.Direct(symmetric=True), inner_steps=0)
ALL = list(range(8))


def check(r: Ridge, estimator, problem=None, **kw) -> hg.GradientCheck:
    return hg.check_hypergradient(problem or r.problem(), r.hparams(), {"w": r.w_star()},
                                  estimator, inner_solution=closed_form(r),
                                  **{"eps": 1e-4, "coords": ALL, **kw})


@dataclasses.dataclass(frozen=True)
class Wrong(hg.Estimator):
    """The right hypergradient, transformed: the faults the check must catch."""

    name = "wrong"
    base: hg.Estimator
    fault: str  # "sign", "scale" or "missing_term"

    def compute(self, problem, hparams, params, state):
        if self.fault == "missing_term":  # ignores the direct term ∂_λF of the outer loss
            problem = dataclasses.replace(problem, outer_loss=Ridge.outer_loss)
        out = self.base(problem, hparams, params, state)
        if self.fault == "sign":
            out = dataclasses.replace(out, grad=tree_map(lambda g: -g, out.grad))
        elif self.fault == "scale":
            out = dataclasses.replace(out, grad=tree_map(lambda g: (1 + 1e-3) * g, out.grad))
        return out


def with_direct_term(r: Ridge) -> hg.Problem:
    """Ridge whose outer loss also has a direct term 5e-4·Σλ² (its gradient, 1e-3·λ, is
    0.2-6 % of the hypergradient's entries)."""
    def outer(p, h, batch):
        return Ridge.outer_loss(p, h, batch) + 5e-4 * (h["lam"] ** 2).sum()
    return dataclasses.replace(r.problem(), outer_loss=outer)


def test_a_correct_estimator_agrees(ridge):
    out = check(ridge, EXACT)
    assert out.agrees, out.verdict
    assert out.verdict.startswith("agrees within the FD error"), out.verdict
    assert out.resolution < 1e-5  # ~1e-8 here: relative errors above 1e-5 would show
    # the same 8×8 solves along two paths: ≤ rounding(64 ops, κ(A) ≈ 3) apart
    assert rel(out.estimate, ridge.hypergrad()) < rounding(64, 3.0)
    assert out.coords == ALL and out.step == 1e-4
    assert torch.equal(out.fd_error, 2 * out.truncation_error + out.rounding_error)
    assert str(out) == f"GradientCheck({out.verdict})"
    direct = with_direct_term(ridge)
    assert check(ridge, EXACT, direct).agrees


def test_unrolled_agrees_with_differences_of_the_unrolled_map(ridge):
    """Without ``inner_solution`` h runs ``problem.steps`` inner steps: the map Unrolled
    differentiates exactly, far from convergence too."""
    out = hg.check_hypergradient(ridge.problem(steps=10), ridge.hparams(), ridge.params0(),
                                 "unrolled", coords=[0, 4, 7], eps=1e-4)
    assert out.agrees and out.resolution < 1e-5, out.verdict


@pytest.mark.parametrize("fault", ["sign", "scale", "missing_term"])
def test_a_wrong_estimator_disagrees(ridge, fault):
    problem = with_direct_term(ridge) if fault == "missing_term" else ridge.problem()
    out = check(ridge, Wrong(EXACT, fault), problem)
    assert not out.agrees, out.verdict
    assert out.verdict.startswith("disagrees by"), out.verdict
    assert "times the FD error" in out.verdict and "coordinate" in out.verdict
    # every fault is far outside the bar: the smallest, 1e-3 relative, by > 1e3 times
    assert out.error_ratio > 1e3, out.verdict
    assert out.resolution < 1e-5


def test_coordinates_drawn_at_random_are_seeded(ridge):
    a = hg.check_hypergradient(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()}, EXACT,
                               coords=3, inner_solution=closed_form(ridge), seed=4)
    b = hg.check_hypergradient(ridge.problem(), ridge.hparams(), {"w": ridge.w_star()}, EXACT,
                               coords=3, inner_solution=closed_form(ridge), seed=4)
    assert a.coords == b.coords and len(set(a.coords)) == 3
    assert all(0 <= i < 8 for i in a.coords) and a.agrees
    assert torch.equal(a.finite_difference, b.finite_difference)


def test_an_inconclusive_check_says_so(ridge):
    """A step so small that rounding swamps the derivatives (σ/s ≈ 2e-2 ≫ |∇h| ≤ 4e-3 on
    coordinates 0-3): the verdict says the differences cannot tell, and a wrong sign is
    neither passed nor judged."""
    out = check(ridge, Wrong(EXACT, "sign"), eps=1e-14, coords=[0, 1, 2, 3])
    assert out.resolution >= 1 and not out.conclusive and not out.agrees
    assert out.verdict.startswith("inconclusive"), out.verdict
    # with coordinate 6 (|∇h| ≈ 0.28) among them, the same step sees the wrong sign there
    out = check(ridge, Wrong(EXACT, "sign"), eps=1e-14)
    assert out.resolution < 1 and out.verdict.startswith("disagrees"), out.verdict


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_a_step_too_large_for_h_is_inconclusive_not_a_disagreement(ridge, eps):
    """At eps ~ 1 the exp(λ) inside h is far from its s² regime: D(s), D(2s), D(4s) do not
    shrink like s², so the bar cannot be trusted and the check says so (a correct
    estimator would otherwise 'disagree' by tens of times the bar)."""
    out = check(ridge, EXACT, eps=eps)
    assert not out.conclusive and not out.agrees
    assert out.verdict.startswith("inconclusive") and "lower eps" in out.verdict, out.verdict
    assert check(ridge, EXACT, eps=1e-2).conclusive  # the same coordinates at a fit step


def test_check_rejects_bad_arguments(ridge):
    p, hp, w = ridge.problem(), ridge.hparams(), ridge.params0()
    for eps in [0.0, -1e-5, math.nan, math.inf, "1e-5"]:
        with pytest.raises(hg.BilevelInputError, match="eps"):
            hg.check_hypergradient(p, hp, w, EXACT, eps=eps)
    with pytest.raises(hg.BilevelInputError, match="empty"):
        hg.check_hypergradient(p, hp, w, EXACT, coords=[])
    for count in (0, 9):
        with pytest.raises(hg.BilevelInputError, match=rf"coords asks for {count} .*8 scalars"):
            hg.check_hypergradient(p, hp, w, EXACT, coords=count)
    with pytest.raises(hg.BilevelInputError, match=r"\[8, -1\] are out of range.*8 scalars"):
        hg.check_hypergradient(p, hp, w, EXACT, coords=[0, 8, -1])
    for coords in (True, [1.7], "0", [True]):
        with pytest.raises(hg.BilevelInputError, match="coords must be a list of int"):
            hg.check_hypergradient(p, hp, w, EXACT, coords=coords)
    with pytest.raises(hg.BilevelInputError, match="eps"):
        hg.check_hypergradient(p, hp, w, EXACT, eps=True)
    with pytest.raises(hg.BilevelInputError, match="seed must be an int"):
        hg.check_hypergradient(p, hp, w, EXACT, coords=2, seed="a")
    with pytest.raises(hg.BilevelInputError, match="inner_solution must be"):
        hg.check_hypergradient(p, hp, w, EXACT, inner_solution=3)
    with pytest.raises(hg.HyperparameterError, match="floating-point"):
        hg.check_hypergradient(p, {"lam": torch.zeros(8, dtype=torch.int64)}, w, EXACT)
    with pytest.raises(TypeError, match="hypergrad.Problem"):
        hg.check_hypergradient("ridge", hp, w, EXACT)
    fd = central_differences(lambda x: float((x ** 2).sum()), torch.ones(2, dtype=DT),
                             list(torch.eye(2, dtype=DT)), 1e-3)
    with pytest.raises(hg.BilevelInputError, match="coords labels 1 entries"):
        hg.GradientCheck.of(torch.tensor([2.0, 2.0], dtype=DT), fd, coords=[7])
    with pytest.raises(hg.BilevelInputError, match="estimate has 3 entries"):
        hg.GradientCheck.of(torch.zeros(3, dtype=DT), fd)
