"""Euclidean projections: membership, idempotence, the variational inequality, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from hypergrad.errors import BilevelInputError
from hypergrad.projections import (
    Ball,
    Box,
    Checked,
    Custom,
    Halfspace,
    Hyperplane,
    Identity,
    NonNegative,
    Product,
    Projection,
    Simplex,
    as_projection,
    check_feasible,
    checked,
    contains_tree,
    distance,
    project_tree,
)

D = torch.float64
EPS = torch.finfo(D).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(tuple(shape), generator=_gen(seed), dtype=D)


# --- samplers of points inside each set (independent of the projection under test) ---


def _box_points(lo, hi, n, k, g):
    return lo + (hi - lo) * torch.rand(k, n, generator=g, dtype=D)


def _halfspace_points(a, b, n, k, g):
    u = 3 * torch.randn(8 * k, n, generator=g, dtype=D)
    u = u[u @ a <= b]  # rejection: keep the points that satisfy the constraint
    return u[:k]


def _hyperplane_points(a, b, n, k, g):
    z = 3 * torch.randn(k, n, generator=g, dtype=D)
    z = z - (z @ a)[:, None] * a / (a @ a)  # component orthogonal to a
    return z + b * a / (a @ a)


def _simplex_points(r, n, k, g):
    e = -torch.log(torch.rand(k, n, generator=g, dtype=D))  # Dirichlet(1, ..., 1)
    pts = r * e / e.sum(1, keepdim=True)
    return torch.cat([pts, r * torch.eye(n, dtype=D)])  # and the vertices


def _ball_points(c, r, n, k, g):
    d = torch.randn(k, n, generator=g, dtype=D)
    d = d / d.norm(dim=1, keepdim=True)
    rad = r * torch.rand(k, 1, generator=g, dtype=D) ** (1 / n)
    rad[: k // 4] = r  # some on the sphere
    return c + rad * d


def _cases(n: int, seed: int):
    """(name, projection, k points inside the set) for flat vectors of n elements."""
    g = _gen(seed)
    k = 64
    lo = -torch.rand(n, generator=g, dtype=D)
    hi = torch.rand(n, generator=g, dtype=D)
    a = torch.randn(n, generator=g, dtype=D)
    b = float(torch.randn((), generator=g, dtype=D))
    c = torch.randn(n, generator=g, dtype=D)
    m = max(1, n // 2)
    cases = [
        ("box", Box(lo, hi), _box_points(lo, hi, n, k, g)),
        ("box_scalar", Box(-0.3, 0.2), _box_points(-0.3, 0.2, n, k, g)),
        ("box_lower_only", Box(lower=0.1), 0.1 + 3 * torch.rand(k, n, generator=g, dtype=D)),
        ("nonnegative", NonNegative(), 3 * torch.rand(k, n, generator=g, dtype=D)),
        ("halfspace", Halfspace(a, b), _halfspace_points(a, b, n, k, g)),
        ("hyperplane", Hyperplane(a, b), _hyperplane_points(a, b, n, k, g)),
        ("simplex", Simplex(), _simplex_points(1.0, n, k, g)),
        ("simplex_r", Simplex(radius=2.5), _simplex_points(2.5, n, k, g)),
        ("ball", Ball(1.5), _ball_points(0.0, 1.5, n, k, g)),
        ("ball_center", Ball(0.5, center=c), _ball_points(c, 0.5, n, k, g)),
        ("identity", Identity(), 3 * torch.randn(k, n, generator=g, dtype=D)),
        ("custom", Custom(lambda v: v.clamp(0, 1)), torch.rand(k, n, generator=g, dtype=D)),
    ]
    if n >= 2:
        parts = Product([(Simplex(), m), (Box(-1.0, 1.0), n - m)])
        pts = torch.cat([_simplex_points(1.0, m, k, g)[:k],
                         _box_points(-1.0, 1.0, n - m, k, g)], dim=1)
        cases.append(("product", parts, pts))
    return cases


def _inputs(n: int, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [3 * torch.randn(n, generator=g, dtype=D) for _ in range(5)] + [
        0.1 * torch.randn(n, generator=g, dtype=D), torch.zeros(n, dtype=D)]


CASE_NAMES = [name for name, _, _ in _cases(4, 0)]


@pytest.mark.parametrize("n", [1, 2, 7, 30])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_in_set_idempotent_and_variational_inequality(name, n):
    cases = {nm: (p, pts) for nm, p, pts in _cases(n, seed=n)}
    if name not in cases:
        pytest.skip("product needs two elements")
    proj, pts = cases[name]
    assert isinstance(proj, Projection)
    assert all(proj.contains(u) for u in pts), "sampler / contains disagree"
    for v in _inputs(n, seed=100 + n):
        v_before = v.clone()
        p = proj(v)
        assert torch.equal(v, v_before)  # input untouched
        assert p.shape == v.shape and p.dtype == v.dtype
        assert proj.contains(p)
        # idempotence holds to rounding: n ≤ 30 entries of size ≲ 10 give ≲ 2·n·EPS·10 ≈
        # 1.3e-13 (observed ≤ 2e-15), so 1e-12 leaves a margin of 500 over the observed
        assert torch.allclose(proj(p), p, rtol=0, atol=1e-12)  # idempotence
        # ⟨v − P(v), u − P(v)⟩ ≤ 0 for every u in the set: P(v) is the Euclidean projection.
        vi = (pts - p) @ (v - p)
        assert float(vi.max()) <= 1e-10
        assert distance(proj, v) == pytest.approx(float((p - v).norm()))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_tensors_of_any_shape_are_read_flat(name):
    n = 12
    proj = {nm: p for nm, p, _ in _cases(n, seed=3)}[name]
    v = _randn(3, 4, seed=5, scale=2.0)
    before = v.clone()
    out = proj(v)
    assert torch.equal(v, before)
    assert out.shape == (3, 4)
    assert torch.allclose(out.reshape(-1), proj(v.reshape(-1)), rtol=0, atol=1e-15)
    assert proj.contains(out) and proj.contains(out.reshape(-1))


def test_float32_outputs_pass_the_default_tolerance():
    n = 1000
    for _, proj, _ in _cases(n, seed=1):
        v = _randn(n, seed=2, scale=5.0).float()
        out = proj(v)
        assert out.dtype == torch.float32
        assert proj.contains(out)


def test_points_outside_are_rejected():
    assert not Box(0.0, 1.0).contains(torch.tensor([0.5, 1.01], dtype=D))
    assert not Box(0.0, 1.0).contains(torch.tensor([-1e-6, 0.5], dtype=D))
    assert Box(0.0, 1.0).contains(torch.tensor([-1e-10, 1 + 1e-10], dtype=D))
    assert not NonNegative().contains(torch.tensor([1.0, -1e-6], dtype=D))
    assert not Simplex().contains(torch.tensor([0.5, 0.6], dtype=D))
    assert not Simplex().contains(torch.tensor([1.1, -0.1], dtype=D))
    assert not Ball(1.0).contains(torch.tensor([0.8, 0.61], dtype=D))
    assert Ball(1.0).contains(torch.tensor([0.8, 0.6], dtype=D))
    a = torch.tensor([1.0, 1.0], dtype=D)
    assert not Halfspace(a, 1.0).contains(torch.tensor([0.6, 0.5], dtype=D))
    assert Halfspace(a, 1.0).contains(torch.tensor([0.5, 0.5], dtype=D))
    assert not Hyperplane(a, 1.0).contains(torch.tensor([0.4, 0.5], dtype=D))
    assert not Product([(Simplex(), 2), (NonNegative(), 1)]).contains(
        torch.tensor([0.5, 0.5, -1.0], dtype=D))
    assert Identity().contains(torch.tensor([1e300], dtype=D))
    # The tolerance is relative to the size of the bound.
    assert Box(upper=1e6).contains(torch.tensor([1e6 + 1e-3], dtype=D))
    assert not Box(upper=1e6).contains(torch.tensor([1e6 + 1e-1], dtype=D))


# ------------------------------------------------------------------ closed-form checks


def t(*xs):
    return torch.tensor(xs, dtype=D)


def test_closed_forms():
    assert torch.equal(Box(0.0, 1.0)(t(-2.0, 0.3, 5.0)), t(0.0, 0.3, 1.0))
    assert torch.equal(Box(t(0.0, 1.0), None)(t(-1.0, 0.0)), t(0.0, 1.0))
    assert torch.equal(Box(None, 0.5)(t(-1.0, 0.7)), t(-1.0, 0.5))
    assert torch.equal(NonNegative()(t(-1.0, 2.0, 0.0)), t(0.0, 2.0, 0.0))
    assert torch.allclose(Simplex()(t(0.5, 0.5)), t(0.5, 0.5), atol=1e-15)
    assert torch.allclose(Simplex()(t(2.0, 0.0)), t(1.0, 0.0), atol=1e-15)
    assert torch.allclose(Simplex()(t(0.0, 0.0, 0.0)), t(1, 1, 1) / 3, atol=1e-15)
    assert torch.allclose(Simplex()(t(3.0, 1.0, -5.0)), t(1.0, 0.0, 0.0), atol=1e-15)
    assert torch.allclose(Simplex()(t(0.6, 0.6, -1.0)), t(0.5, 0.5, 0.0), atol=1e-15)
    assert torch.allclose(Simplex(radius=3.0)(t(1.0, 2.0, 3.0)), t(0.0, 1.0, 2.0), atol=1e-15)
    assert torch.allclose(Simplex()(t(7.0)), t(1.0), atol=1e-15)
    assert torch.allclose(Ball(1.0)(t(3.0, 4.0)), t(0.6, 0.8), atol=1e-15)
    assert torch.equal(Ball(1.0)(t(0.3, 0.4)), t(0.3, 0.4))
    assert torch.equal(Ball(1.0)(t(0.0, 0.0)), t(0.0, 0.0))
    assert torch.allclose(Ball(2.0, center=t(1.0, 1.0))(t(1.0, 5.0)), t(1.0, 3.0), atol=1e-15)
    assert torch.allclose(Ball(1.0, center=1.0)(t(1.0, 3.0)), t(1.0, 2.0), atol=1e-15)
    x = t(1.0, 2.0)
    assert torch.equal(Identity()(x), x)
    assert torch.allclose(Product([(Simplex(), 2), (Box(0.0, 1.0), 1)])(t(2.0, 0.0, 3.0)),
                          t(1.0, 0.0, 1.0), atol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_halfspace_and_hyperplane_formulas(seed):
    n = 6
    a, v = _randn(n, seed=seed), _randn(n, seed=seed + 50, scale=3.0)
    for b in (-2.0, 0.0, 0.5, 4.0):
        excess = float(a @ v) - b
        expected = v - max(0.0, excess) / float(a @ a) * a
        assert torch.allclose(Halfspace(a, b)(v), expected, rtol=0, atol=1e-13)
        assert torch.allclose(Hyperplane(a, b)(v), v - excess / float(a @ a) * a,
                              rtol=0, atol=1e-13)
    # a of another shape with as many elements is read flat.
    assert torch.allclose(Halfspace(a.reshape(2, 3), 0.0)(v), Halfspace(a, 0.0)(v))
    # Inside the halfspace the point comes back unchanged.
    inside = v - (float(a @ v) + 1.0) / float(a @ a) * a
    assert torch.equal(Halfspace(a, 0.0)(inside), inside)


# ----------------------------------------------------------- simplex against references


def _simplex_bisection(v: np.ndarray, r: float) -> np.ndarray:
    """Bisection on θ for Σ max(v − θ, 0) = r (monotone decreasing in θ)."""
    lo, hi = v.min() - r, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > r:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_simplex_matches_bisection(n):
    rng = np.random.default_rng(n)
    for trial in range(10):
        r = float(rng.uniform(0.1, 5.0))
        v = rng.normal(size=n) * rng.choice([0.01, 1.0, 100.0])
        if trial == 0:
            v = np.round(v)  # ties
        got = Simplex(r)(torch.from_numpy(v)).numpy()
        np.testing.assert_allclose(got, _simplex_bisection(v, r), rtol=0, atol=1e-10 * max(1, r))


@pytest.mark.parametrize("seed", range(4))
def test_simplex_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n, r = 5, 1.5
    v = rng.normal(size=n)
    res = minimize(lambda u: 0.5 * np.sum((u - v) ** 2), np.full(n, r / n),
                   jac=lambda u: u - v, method="SLSQP", bounds=[(0, None)] * n,
                   constraints=[{"type": "eq", "fun": lambda u: u.sum() - r,
                                 "jac": lambda u: np.ones_like(u)}],
                   options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    got = Simplex(r)(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, res.x, atol=1e-6)
    assert 0.5 * np.sum((got - v) ** 2) <= res.fun + 1e-12


def test_simplex_low_precision_and_large_inputs():
    v = _randn(5000, seed=9, scale=0.01)
    ref = Simplex()(v)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = Simplex()(v.to(dtype))
        assert out.dtype == dtype
        assert abs(float(out.double().sum()) - 1.0) < 50 * torch.finfo(dtype).eps
        assert float((out.double() - ref).abs().max()) < 10 * torch.finfo(dtype).eps
    # A large common offset: θ ≈ 100 must not be rounded to float32 (ulp(100) ≈ 8e-6).
    v = (_randn(10_000, seed=10) + 100.0).float()
    out = Simplex()(v)
    assert abs(float(out.double().sum()) - 1.0) < 4 * torch.finfo(torch.float32).eps
    assert Simplex().contains(out)
    # A cumulative sum that cancels: 1e8 + many small entries.
    v = torch.cat([t(1e8, 1e8 - 0.5), _randn(100_000, seed=11)])
    out = Simplex()(v)
    assert torch.allclose(out[:2], t(0.75, 0.25), rtol=0, atol=1e-12)
    assert float(out[2:].abs().max()) == 0.0


# ------------------------------------------------------------------------- hypothesis

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3)
scales = st.sampled_from([1e-3, 1.0, 1e3])


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**16), scales, st.floats(0.01, 100.0))
def test_simplex_optimality_certificate(shape, seed, scale, r):
    v = _randn(*shape, seed=seed, scale=scale)
    p = Simplex(r)(v)
    assert p.shape == v.shape
    # Each entry max(v − θ, 0) carries an error of about EPS·max(|v|, θ), so sums over the
    # n ≤ 125 entries are off by up to (n + 2)·EPS·max(r, ‖v‖∞) (Higham's γ_n; a random
    # sweep of 6000 cases reaches a third of it). The sum and certificate tolerances below
    # are ≥ 10× that bound; idempotence uses it directly: P(p) moves p by the rounding of
    # Σp − r spread over the active entries, which scales with ‖v‖∞, not only with r.
    n, top = v.numel(), max(r, float(v.abs().max()))
    assert float(p.min()) >= 0 and abs(float(p.sum()) - r) <= 1e-12 * max(1, r, scale)
    # ⟨v − p, u − p⟩ is linear in u, so its maximum over the simplex is at a vertex r·e_i.
    g = (v - p).reshape(-1)
    pf = p.reshape(-1)
    assert float(r * g.max() - g @ pf) <= 1e-10 * max(1.0, scale) ** 2
    assert torch.allclose(Simplex(r)(p), p, rtol=0, atol=(n + 2) * EPS * top)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**16), scales, st.floats(0.01, 10.0), st.booleans())
def test_ball_optimality_certificate(shape, seed, scale, r, centered):
    v = _randn(*shape, seed=seed, scale=scale)
    c = _randn(*shape, seed=seed + 1) if centered else torch.zeros_like(v)
    proj = Ball(r, center=c if centered else None)
    p = proj(v)
    # p = c + r·(v − c)/‖v − c‖ rounds each entry by EPS/2·|p_i| (≈ |c_i| when r ≪ |c|)
    # and ‖·‖ of n terms adds n·EPS/2 relative: ‖p − c‖ ≤ r(1 + (n + 3)·EPS) + EPS·‖c‖.
    # (A flat r·(1 + 1e-14) failed for r = 0.0117, ‖c‖ ≈ 3: the excess was 1.2e-16.)
    assert float((p - c).norm()) <= r * (1 + (v.numel() + 3) * EPS) + EPS * float(c.norm())
    # max over the ball of ⟨g, u⟩ is ⟨g, c⟩ + r‖g‖.
    g = (v - p).reshape(-1)
    assert float(g @ (c - p).reshape(-1) + r * g.norm()) <= 1e-10 * max(1.0, scale) ** 2
    assert torch.allclose(proj(p), p, rtol=0, atol=1e-13 * max(1, scale))


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**16), scales)
def test_box_optimality_certificate(shape, seed, scale):
    v = _randn(*shape, seed=seed, scale=scale)
    lo = -torch.rand(v.shape, generator=_gen(seed), dtype=D)
    hi = lo + torch.rand(v.shape, generator=_gen(seed + 1), dtype=D)
    p = Box(lo, hi)(v)
    assert bool(((lo <= p) & (p <= hi)).all())
    g = v - p
    # Separable: each coordinate's term is maximised at one of the two bounds.
    assert bool((torch.maximum(g * (lo - p), g * (hi - p)) <= 0).all())
    assert torch.equal(Box(lo, hi)(p), p)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**16), scales, st.floats(-5, 5))
def test_halfspace_kkt(n, seed, scale, b):
    a = _randn(n, seed=seed)
    v = _randn(n, seed=seed + 1, scale=scale)
    p = Halfspace(a, b)(v)
    assert float(a @ p) <= b + 1e-12 * max(1, scale) * float(a.norm())
    # v − p = λ a with λ ≥ 0 and complementary slackness.
    lam = float((v - p) @ a) / float(a @ a)
    assert lam >= -1e-15
    assert torch.allclose(v - p, lam * a, rtol=0, atol=1e-12 * max(1, scale))
    assert abs(lam * (float(a @ p) - b)) <= 1e-9 * max(1, scale) ** 2


# ----------------------------------------------------------------------------- pytrees


def test_project_tree_single_projection_couples_the_leaves():
    tree = {"x": t(1.0, 2.0), "y": t(3.0, 4.0, 5.0).reshape(3, 1)}
    a = torch.ones(5, dtype=D)
    out = project_tree(Halfspace(a, 5.0), tree)
    assert list(out) == ["x", "y"] and out["y"].shape == (3, 1)
    # Σ = 15 > 5: every entry moves down by (15 − 5)/5 = 2.
    assert torch.allclose(out["x"], t(-1.0, 0.0)) and torch.allclose(out["y"].reshape(-1),
                                                                      t(1.0, 2.0, 3.0))
    assert torch.equal(tree["x"], t(1.0, 2.0))  # untouched
    assert contains_tree(Halfspace(a, 5.0), out) and not contains_tree(Halfspace(a, 5.0), tree)
    simplex = project_tree(Simplex(), tree)
    assert abs(float(sum(leaf.sum() for leaf in simplex.values())) - 1.0) < 1e-14
    # Also a tuple tree, as for the joint set C on (x, y).
    xy = project_tree(Ball(1.0), (t(3.0), t(4.0)))
    assert isinstance(xy, tuple) and torch.allclose(torch.cat(xy), t(0.6, 0.8))


def test_project_tree_mixed_dtypes_keep_their_dtype():
    tree = {"x": torch.tensor([2.0, 0.0], dtype=torch.float32), "y": t(0.0)}
    out = project_tree(Simplex(), tree)
    assert out["x"].dtype == torch.float32 and out["y"].dtype == D
    assert torch.allclose(out["x"].double(), t(1.0, 0.0)) and float(out["y"]) == 0.0


def test_project_tree_single_leaf_keeps_its_shape_for_box_bounds():
    w = _randn(3, 4, seed=1, scale=3.0)
    lo = torch.zeros(4, dtype=D)  # broadcasts along the rows of the leaf
    out = project_tree(Box(lo, 1.0), {"w": w})
    assert torch.equal(out["w"], w.clamp(0, 1))


def test_project_tree_dict_of_projections():
    tree = {"x": t(2.0, 0.0), "y": t(-1.0, 3.0), "z": t(-5.0)}
    out = project_tree({"x": Simplex(), "y": NonNegative()}, tree)
    assert torch.allclose(out["x"], t(1.0, 0.0))
    assert torch.equal(out["y"], t(0.0, 3.0))
    assert out["z"] is tree["z"]  # no projection: left as it is
    assert project_tree(None, tree) is tree
    assert contains_tree({"x": Simplex(), "y": NonNegative()}, out)
    assert not contains_tree({"x": Simplex()}, tree)
    # Plain functions are accepted as Custom projections.
    out = project_tree({"z": lambda v: v.clamp_min(0)}, tree)
    assert torch.equal(out["z"], t(0.0))
    with pytest.raises(BilevelInputError, match="'w'"):
        project_tree({"w": Simplex()}, tree)
    with pytest.raises(BilevelInputError, match="dict tree"):
        project_tree({"x": Simplex()}, [t(1.0)])


# --------------------------------------------------------------- checked / feasibility


def test_checked_catches_a_wrong_custom_projection():
    halve = Custom(lambda v: 0.5 * v)  # not idempotent: not a projection
    with pytest.raises(BilevelInputError,
                       match=r"^inner y: the projection returned a point outside its set "
                             r"\(distance"):
        checked(halve, "inner y")(t(1.0, 2.0))
    # Idempotent but onto the wrong set: only a membership test can tell.
    wrong = Custom(lambda v: v.clone(), contains=lambda v: bool((v >= 0).all()))
    with pytest.raises(BilevelInputError, match="outside its set.*disagree"):
        checked(wrong, "x")(t(-1.0, 2.0))
    # A membership test taking the tolerance.
    good = Custom(lambda v: v.clamp_min(0), contains=lambda v, tol: bool((v >= -tol).all()))
    assert torch.equal(checked(good, "x")(t(-1.0, 2.0)), t(0.0, 2.0))
    # Correct projections pass untouched.
    v = _randn(7, seed=3, scale=3.0)
    for proj in (Simplex(), Ball(0.5), Box(-0.1, 0.1), Custom(lambda v: v.clamp(0, 1))):
        assert torch.equal(checked(proj, "x")(v), proj(v))
    c = checked(Simplex(), "x")
    assert isinstance(c, Checked) and isinstance(c, Projection)
    assert c.contains(t(0.5, 0.5)) and not c.contains(t(0.5, 0.6))


def test_checked_catches_in_place_wrong_shape_and_nan():
    def in_place(v):
        return v.clamp_(0, 1)

    with pytest.raises(BilevelInputError, match="x: the projection modified its input in place"):
        checked(in_place, "x")(t(-1.0, 2.0))
    with pytest.raises(BilevelInputError, match="returned shape"):
        checked(lambda v: v.sum(), "x")(t(1.0, 2.0))
    with pytest.raises(BilevelInputError, match="NaN or inf"):
        checked(lambda v: v / 0.0, "x")(t(1.0, 2.0))
    spec = checked({"a": Simplex(), "b": NonNegative()}, "hparams")
    assert set(spec) == {"a", "b"} and spec["a"].name == "hparams['a']"
    assert checked(None, "x") is None
    # A checked dict of projections works with project_tree.
    out = project_tree(spec, {"a": t(2.0, 0.0), "b": t(-1.0)})
    assert torch.allclose(out["a"], t(1.0, 0.0)) and torch.equal(out["b"], t(0.0))


def test_check_feasible():
    check_feasible(Simplex(), t(0.3, 0.7), "x0")
    check_feasible(None, t(5.0), "x0")
    with pytest.raises(BilevelInputError,
                       match=r"^x0 is outside its feasible set: distance 0\.283 to the set"):
        check_feasible(Simplex(), t(0.7, 0.7), "x0")  # P = (0.5, 0.5): distance 0.2·√2
    with pytest.raises(BilevelInputError, match=r"y0\['b'\] is outside.*distance 1 "):
        check_feasible({"a": Simplex(), "b": NonNegative()},
                       {"a": t(1.0, 0.0), "b": t(-1.0, 2.0)}, "y0")
    # A single projection over a whole tree (the joint set C on (x, y)).
    joint = Halfspace(torch.ones(3, dtype=D), 1.0)
    check_feasible(joint, {"x": t(0.5), "y": t(0.25, 0.25)}, "(x0, y0)")
    with pytest.raises(BilevelInputError, match=r"\(x0, y0\) is outside"):
        check_feasible(joint, {"x": t(0.5), "y": t(0.5, 0.25)}, "(x0, y0)")


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize("make, field", [
    (lambda: Box(1.0, 0.0), "Box.lower"),
    (lambda: Box(t(0.0, 2.0), t(1.0, 1.0)), "Box.lower"),
    (lambda: Box(t(0.0, 1.0), t(1.0, 2.0, 3.0)), "Box.lower"),
    (lambda: Box(math.nan, 1.0), "Box.lower"),
    (lambda: Box(None, -math.inf), "Box.upper"),
    (lambda: Box("low", None), "Box.lower"),
    (lambda: Simplex(0.0), "Simplex.radius"),
    (lambda: Simplex(-1.0), "Simplex.radius"),
    (lambda: Simplex(math.inf), "Simplex.radius"),
    (lambda: Ball(0.0), "Ball.radius"),
    (lambda: Ball(-2.0), "Ball.radius"),
    (lambda: Ball(1.0, center=t(0.0, math.inf)), "Ball.center"),
    (lambda: Halfspace(torch.zeros(3, dtype=D), 1.0), "Halfspace.a"),
    (lambda: Halfspace(t(1.0, math.nan), 1.0), "Halfspace.a"),
    (lambda: Halfspace(t(1.0, 1.0), math.nan), "Halfspace.b"),
    (lambda: Hyperplane(torch.zeros(2, dtype=D), 0.0), "Hyperplane.a"),
    (lambda: Product([]), "Product.parts"),
    (lambda: Product([(Simplex(), 0)]), r"Product.parts\[0\] size"),
    (lambda: Product([(Simplex(), 2), (Box(), -1)]), r"Product.parts\[1\] size"),
    (lambda: Product([(Simplex(), 2.0)]), r"Product.parts\[0\] size"),
    (lambda: Product([(3, 2)]), r"Product.parts\[0\] projection"),
    (lambda: Product([Simplex()]), r"Product.parts\[0\]"),
    (lambda: Custom(3), "Custom.fn"),
    (lambda: Custom(lambda v: v, contains=1), "Custom.contains"),
    (lambda: Checked(Simplex(), "x", tol=-1.0), "Checked.tol"),
])
def test_invalid_settings_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_invalid_inputs_at_call_time():
    with pytest.raises(BilevelInputError, match="Halfspace.a has 3 elements"):
        Halfspace(torch.ones(3, dtype=D), 0.0)(t(1.0, 2.0))
    with pytest.raises(BilevelInputError, match="sizes sum to 3"):
        Product([(Simplex(), 2), (Box(), 1)])(t(1.0, 2.0))
    with pytest.raises(BilevelInputError, match="floating-point"):
        Simplex()(torch.tensor([1, 2]))
    with pytest.raises(BilevelInputError, match="Box.lower has shape"):
        Box(torch.zeros(3, dtype=D))(t(1.0, 2.0))
    with pytest.raises(BilevelInputError, match="returned shape"):
        Custom(lambda v: v[:1])(t(1.0, 2.0))
    with pytest.raises(BilevelInputError, match="empty"):
        Simplex()(torch.zeros(0, dtype=D))
    with pytest.raises(TypeError, match="Projection"):
        as_projection(3)


def test_settings_are_frozen_copies():
    lo = torch.zeros(2, dtype=D)
    box = Box(lo, 1.0)
    lo[0] = 5.0  # the box kept its own copy
    assert torch.equal(box(t(-1.0, -1.0)), t(0.0, 0.0))
    with pytest.raises(AttributeError):
        box.lower = 3.0
    assert Simplex(2) == Simplex(2.0) and isinstance(Simplex(2).radius, float)
    assert isinstance(as_projection(None), Identity)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_projections_on_cuda_match_cpu():
    n = 50
    for _, proj, _ in _cases(n, seed=4):
        v = _randn(n, seed=6, scale=3.0)
        gpu = proj(v.cuda())
        assert gpu.is_cuda and proj.contains(gpu)
        assert torch.allclose(gpu.cpu(), proj(v), rtol=0, atol=1e-12)
