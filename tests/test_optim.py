"""The inner optimizers: trajectories against torch.optim, settings as hyperparameters,
purity, forward mode, finite double backward, Chebyshev polynomials, fixed points."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jvp

from hypergrad.finite_difference import central_differences
from hypergrad.optim import SGD, Adam, AdamW, Chebyshev, InnerOptimizer, Momentum, Nesterov
from hypergrad.pytree import tree_leaves, tree_map, tree_ravel, tree_structure, tree_unravel

from problems import fd_check, rounding

DT = torch.float64
gen = torch.Generator().manual_seed(0)
X, Y = torch.randn(20, 5, generator=gen, dtype=DT), torch.randn(20, 3, generator=gen, dtype=DT)
XV, YV = torch.randn(15, 5, generator=gen, dtype=DT), torch.randn(15, 3, generator=gen, dtype=DT)
P0 = {"w": 0.3 * torch.randn(5, 3, generator=gen, dtype=DT),
      "b": 0.3 * torch.randn(3, generator=gen, dtype=DT)}


def lsq(p, x=X, y=Y):
    return 0.5 * ((x @ p["w"] + p["b"] - y) ** 2).sum(1).mean()


def lsq_grad(p, x=X, y=Y):
    r = (x @ p["w"] + p["b"] - y) / len(x)
    return {"w": x.T @ r, "b": r.sum(0)}


def unroll(opt, hparams, steps, p=P0, x=X):
    s = opt.init(p)
    for _ in range(steps):
        p, s = opt.step(p, lsq_grad(p, x), s, hparams)
    return p, s


def torch_traj(make, steps=25):
    ps = {k: v.clone().requires_grad_(True) for k, v in P0.items()}
    opt, out = make(ps), []
    for _ in range(steps):
        opt.zero_grad()
        lsq(ps).backward()
        opt.step()
        out.append({k: v.detach().clone() for k, v in ps.items()})
    return out


def our_traj(opt, steps=25):
    p, s, out = P0, opt.init(P0), []
    for _ in range(steps):
        p, s = opt.step(p, lsq_grad(p), s, {})
        out.append(p)
    return out


def groups(ps, **kw):
    return [{"params": [ps["w"]]}, {"params": [ps["b"]], **kw}]


CASES = {
    "sgd": (SGD(lr=0.2), lambda ps: torch.optim.SGD(ps.values(), lr=0.2)),
    "sgd_wd": (SGD(lr=0.2, weight_decay=0.1),
               lambda ps: torch.optim.SGD(ps.values(), lr=0.2, weight_decay=0.1)),
    "momentum": (Momentum(lr=0.05, momentum=0.9, weight_decay=0.05),
                 lambda ps: torch.optim.SGD(ps.values(), lr=0.05, momentum=0.9,
                                            weight_decay=0.05)),
    "nesterov": (Nesterov(lr=0.05, momentum=0.8, weight_decay=0.05),
                 lambda ps: torch.optim.SGD(ps.values(), lr=0.05, momentum=0.8,
                                            weight_decay=0.05, nesterov=True)),
    "adam": (Adam(lr=0.05), lambda ps: torch.optim.Adam(ps.values(), lr=0.05)),
    "adam_wd": (Adam(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                lambda ps: torch.optim.Adam(ps.values(), lr=0.05, betas=(0.8, 0.99), eps=1e-6,
                                            weight_decay=0.1)),
    "adamw": (AdamW(lr=0.05, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps.values(), lr=0.05, weight_decay=0.1)),
    # per-leaf settings, against torch param groups
    "sgd_leaf": (SGD(lr={"w": 0.2, "b": 0.05}),
                 lambda ps: torch.optim.SGD(groups(ps, lr=0.05), lr=0.2)),
    "momentum_leaf": (Momentum(lr=0.05, momentum={"w": 0.9, "b": 0.5}),
                      lambda ps: torch.optim.SGD(groups(ps, momentum=0.5), lr=0.05,
                                                 momentum=0.9)),
    "adamw_leaf": (AdamW(lr=lambda h: {"w": 0.05, "b": 0.02}, weight_decay={"w": 0.1, "b": 0.0}),
                   lambda ps: torch.optim.AdamW(groups(ps, lr=0.02, weight_decay=0.0), lr=0.05,
                                                weight_decay=0.1)),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_optim(name):
    ours, make = CASES[name]
    assert isinstance(ours, InnerOptimizer)
    # torch.optim's foreach kernels against our pytree arithmetic: 25 steps on entries ≲ 1
    # differ by a few ulp (observed ≤ 2.8e-16), 1e-12 is > 3e3 times that
    for a, b in zip(our_traj(ours), torch_traj(make), strict=True):
        for k in P0:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    assert lsq(a) < 0.9 * lsq(P0)


def test_lsq_grad():
    # the same 20-sample sums by hand and by autograd: ≤ rounding(20) ≈ 2e-14 relative at
    # worst, observed ≤ 2.2e-16, so rtol 1e-13 still has a margin of 150 over the observed
    for k, v in grad(lsq)(P0).items():
        torch.testing.assert_close(lsq_grad(P0)[k], v, rtol=1e-13, atol=1e-15)


def test_fields():
    assert (Momentum().carried, Nesterov().carried, Adam().carried) == (("m",),) * 3
    assert AdamW().weight_decay == 1e-2 and Adam().weight_decay == 0.0
    assert Chebyshev(1.0, 10.0).carried == () and not Chebyshev(1.0, 10.0).stationary
    assert all(o.stationary for o in (SGD(), Momentum(), Nesterov(), Adam(), AdamW()))
    with pytest.raises(ValueError):
        Chebyshev(10.0, 1.0)


LOG = lambda key: lambda h: h[key].exp()  # noqa: E731
HYPER = {
    "sgd_lr": (SGD(lr=LOG("x")), -1.5),
    "momentum_lr": (Momentum(lr=LOG("x"), momentum=0.8), -2.5),
    "nesterov_lr": (Nesterov(lr=LOG("x"), momentum=0.8), -2.5),
    "adam_lr": (Adam(lr=LOG("x"), weight_decay=0.05), -2.5),
    "sgd_wd": (SGD(lr=0.2, weight_decay=LOG("x")), -1.0),
    "adamw_wd": (AdamW(lr=0.05, weight_decay=LOG("x")), -1.0),
    "adam_beta1": (Adam(lr=0.05, betas=(lambda h: torch.sigmoid(h["x"]), 0.99)), 1.5),
    "momentum_leaf_lr": (Momentum(lr=lambda h: {"w": h["x"].exp(), "b": 0.1}), -2.5),
}


def val_after(opt, x, steps=10):
    return lsq(unroll(opt, {"x": x}, steps)[0], XV, YV)


@pytest.mark.parametrize("name", HYPER)
def test_hypergradient_matches_finite_differences(name):
    opt, x0 = HYPER[name]
    x = torch.tensor(x0, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(val_after(opt, x), x)
    fd = central_differences(lambda y: float(val_after(opt, y.reshape(()))),
                             torch.tensor([x0], dtype=DT), [torch.ones(1, dtype=DT)], 1e-5)
    assert abs(g.item()) > 1e-4
    check = fd_check(g, fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-6, check.verdict  # observed ≤ 3e-9


@pytest.mark.parametrize("opt", [Momentum(lr=LOG("x")), Adam(lr=LOG("x"))], ids=["mom", "adam"])
def test_forward_mode_equals_reverse_mode(opt):
    x = torch.tensor(-2.5, dtype=DT, requires_grad=True)
    (rev,) = torch.autograd.grad(val_after(opt, x), x)
    _, fwd = jvp(lambda y: val_after(opt, y), (x.detach(),), (torch.ones((), dtype=DT),))
    # two accumulation orders through 10 steps (observed ≤ 6e-16 relative): > 1e5 margin
    assert abs(fwd.item() - rev.item()) <= 1e-10 * abs(rev.item())
    # vmap over a batch of tangents too
    tang = torch.tensor([1.0, -2.0], dtype=DT)
    _, batch = torch.vmap(lambda v: jvp(lambda y: val_after(opt, y), (x.detach(),), (v,)))(tang)
    torch.testing.assert_close(batch, tang * rev, rtol=1e-10, atol=0)


def test_wrong_per_leaf_structure_raises():
    for opt in (SGD(lr={"w": 0.1}), Momentum(momentum={"w": 0.9, "c": 0.1}),
                Adam(lr={"w": 0.1, "b": 0.1, "c": 0.1}), AdamW(weight_decay=[0.1, 0.1]),
                Chebyshev(mu={"w": 1.0}, L=10.0)):
        with pytest.raises(ValueError):
            opt.step(P0, P0, opt.init(P0), {})


@pytest.mark.parametrize("opt", [SGD(weight_decay=0.1), Momentum(weight_decay=0.1), Nesterov(),
                                 Adam(lr=0.1, weight_decay=0.1), AdamW(lr=0.1),
                                 Chebyshev(0.5, 5.0)], ids=lambda o: type(o).__name__)
def test_step_is_pure(opt):
    p, s = unroll(opt, {}, 3)
    g = lsq_grad(p)
    copies = [tree_map(lambda a: a.clone() if torch.is_tensor(a) else a, x) for x in (p, g, s)]
    p2, s2 = opt.step(p, g, s, {})
    for x, c in zip((p, g, s), copies, strict=True):
        assert tree_structure(x) == tree_structure(c)
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                   for a, b in zip(tree_leaves(x), tree_leaves(c), strict=True))
    assert not torch.equal(tree_ravel(p2), tree_ravel(p))


def test_adam_zero_gradient_double_backward_is_finite():
    x_data = X.clone()
    x_data[:, 0] = 0  # w[0, :] is ignored by the loss: exactly zero gradient, v stays 0
    lr = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    opt = Adam(lr=lambda h: h["lr"].exp())

    def run(h):
        p = {k: v.clone().requires_grad_(True) for k, v in P0.items()}
        p0, s = p, opt.init(p)
        for _ in range(5):
            g = torch.autograd.grad(lsq(p, x_data), list(p.values()), create_graph=True)
            p, s = opt.step(p, dict(zip(p, g, strict=True)), s, h)
        return lsq(p, XV * (x_data[:1] != 0), YV), p0, s

    out, p0, s = run({"lr": lr})
    assert torch.all(s["v"]["w"][0] == 0) and torch.all(s["v"]["w"][1:] > 0)
    grads = torch.autograd.grad(out, [lr, p0["w"], p0["b"]])
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs() > 1e-4 and torch.all(grads[1][0] == 0)
    fd = central_differences(lambda y: float(run({"lr": y.reshape(())})[0].detach()),
                             lr.detach().reshape(1), [torch.ones(1, dtype=DT)], 1e-5)
    check = fd_check(grads[0], fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-6, check.verdict


def _quadratic(d=20, mu=1.0, L=100.0):
    g = torch.Generator().manual_seed(1)
    lam = torch.linspace(mu, L, d, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return Q, lam, (Q * lam) @ Q.T, torch.randn(d, generator=g, dtype=DT)


def _cheb_poly(t, z):
    """T_t(z) from the trigonometric / hyperbolic formula."""
    inside = torch.cos(t * torch.acos(z.clamp(-1, 1)))
    return torch.where(z.abs() <= 1, inside, torch.cosh(t * torch.acosh(z.clamp_min(1))))


@pytest.mark.parametrize("with_b", [False, True])
def test_chebyshev_residual_polynomial(with_b):
    mu, L, d = 1.0, 100.0, 20
    Q, lam, H, x0 = _quadratic(d, mu, L)
    b = H @ torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=DT) if with_b \
        else torch.zeros(d, dtype=DT)
    x_star = torch.linalg.solve(H, b)
    like = {"a": x0[:8], "b": x0[8:]}
    opt = Chebyshev(mu=lambda h: h["mu"], L=L)
    p, s = tree_unravel(x0, like), opt.init(tree_unravel(x0, like))
    e0 = Q.T @ (x0 - x_star)
    sigma = torch.tensor((L + mu) / (L - mu), dtype=DT)
    for t in range(1, 101):
        p, s = opt.step(p, tree_unravel(H @ tree_ravel(p) - b, like), s, {"mu": mu})
        Pt = _cheb_poly(t, (L + mu - 2 * lam) / (L - mu)) / _cheb_poly(t, sigma)
        ref, err = Q @ (Pt * e0), tree_ravel(p) - x_star
        # with b ≠ 0, ∇f = Hx − b cancels to about EPS·‖b‖, so the iterates reach x* only to
        # rounding(d, κ)·‖x*‖ ≈ 4e-12 (Higham's bound for a solve; observed ≤ 3e-14); without
        # b the error shrinks with the iterate (1e-10 relative to it, observed ≤ 5e-13)
        tol = rounding(d, L / mu) * x_star.norm() if with_b else 1e-10 * ref.norm()
        assert (err - ref).norm() <= tol, t
        assert s["t"] == t
        if t == 50:
            cheb50 = err.norm()
    gd = Q.T @ x0
    for _ in range(50):
        gd = gd - (lam * gd - Q.T @ b) / L
    ratio = cheb50 / (gd - Q.T @ x_star).norm()
    assert ratio < 1e-3  # (1 − μ/L)^50 ≈ 0.6 for GD against 1/T_50(σ) ≈ 1e-4
    assert cheb50 <= 1.01 * e0.norm() / _cheb_poly(50, sigma)


def test_chebyshev_settings_are_differentiable():
    _, _, H, x0 = _quadratic(8, 1.0, 20.0)
    opt = Chebyshev(mu=lambda h: h["mu"], L=lambda h: h["L"])

    def loss(L):
        p, s = x0, opt.init(x0)
        for _ in range(6):
            p, s = opt.step(p, H @ p, s, {"mu": torch.tensor(1.0, dtype=DT), "L": L})
        return 0.5 * p @ p

    L = torch.tensor(22.0, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(loss(L), L)
    fd = central_differences(lambda y: float(loss(y.reshape(()))), L.detach().reshape(1),
                             [torch.ones(1, dtype=DT)], 1e-5)
    check = fd_check(g, fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-6, check.verdict


@pytest.mark.parametrize("opt", [Momentum(), Nesterov(), Adam(lr=0.1), SGD()],
                         ids=lambda o: type(o).__name__)
def test_fixed_point_at_zero_gradient(opt):
    p, s = unroll(opt, {}, 4)  # a nontrivial second moment / counter for Adam
    s = {**s, **{k: tree_map(torch.zeros_like, s[k]) for k in opt.carried}}
    zero = tree_map(torch.zeros_like, p)
    p2, s2 = opt.step(p, zero, s, {})
    assert torch.equal(tree_ravel(p2), tree_ravel(p))
    for k in opt.carried:
        assert torch.equal(tree_ravel(s2[k]), tree_ravel(s[k]))
    assert math.isfinite(lsq(p2).item())
