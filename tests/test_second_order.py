"""The second-order self-check: silently wrong or unsupported second derivatives are caught.

Each case rebuilds a public bug report: a custom autograd.Function whose backward is
``once_differentiable`` (torch.func takes its second derivative as zero), PyTorch's fused
weight norm (wrong double backward), and ``F.mse_loss`` (no forward-over-reverse rule).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

import hypergrad as hg
from hypergrad import second_order

from problems import DT

N, D = 40, 5


@pytest.fixture(autouse=True)
def fresh_cache():
    second_order.clear_cache()
    yield
    second_order.clear_cache()


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    return X, X @ torch.randn(D, generator=g, dtype=DT) + 0.1 * torch.randn(N, generator=g,
                                                                           dtype=DT)


class Cube(torch.autograd.Function):
    """x³/3 with a correct first derivative but a backward that is not differentiable."""

    @staticmethod
    def forward(x):
        return x ** 3 / 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x * x


class CubeWithJvp(Cube):
    """The same, with a forward-mode rule: forward-over-reverse is right, double backward
    is not."""

    generate_vmap_rule = True  # forward-mode unrolling vmaps over the hyperparameters

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def jvp(ctx, t):
        return t * ctx.x * ctx.x


class SmoothCube(torch.autograd.Function):
    """x³/3 with a differentiable backward and no jvp: only double backward works, and it
    is right."""

    @staticmethod
    def forward(x):
        return x ** 3 / 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x * x


def cube_problem(fn, steps: int = 20) -> tuple[hg.Problem, dict, dict]:
    """Least squares plus a λ-weighted cubic term through ``fn`` (its second derivative
    2x carries the hypergradient's mixed term)."""
    X, y = data()

    def inner(p, h, batch):
        Xb, yb = batch
        r = Xb @ p["w"] - yb
        return 0.5 * (r @ r) / N + 0.05 * (h["lam"].exp() * fn.apply(p["w"])).sum() \
            + 0.5 * (p["w"] ** 2).sum()

    def outer(p, h, batch):
        Xb, yb = batch
        return 0.5 * ((Xb @ p["w"] - yb) ** 2).mean()

    problem = hg.Problem(inner, outer, (X, y), (X, y), optimizer=hg.SGD(lr=0.3), steps=steps)
    return problem, {"lam": torch.zeros(D, dtype=DT)}, {"w": 0.3 * torch.ones(D, dtype=DT)}


def true_unrolled(problem, hp, p):
    """The unrolled hypergradient with a correct second derivative: same problem with the
    cubic written in plain torch ops."""
    plain = hg.Problem(_plain(problem.inner_loss), problem.outer_loss, problem.inner_batch,
                       problem.outer_batch, optimizer=problem.optimizer, steps=problem.steps)
    return hg.Unrolled()(plain, hp, p).grad["lam"]


def _plain(inner):
    def f(p, h, batch):
        Xb, yb = batch
        r = Xb @ p["w"] - yb
        return 0.5 * (r @ r) / N + 0.05 * (h["lam"].exp() * p["w"] ** 3 / 3).sum() \
            + 0.5 * (p["w"] ** 2).sum()
    return f


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --- a backward that is not differentiable ----------------------------------------------


def test_once_differentiable_function_is_caught_by_every_route():
    problem, hp, p = cube_problem(Cube)
    for est in (hg.Unrolled(), hg.Unrolled(recompute=True), hg.Truncated(window=5),
                hg.Implicit(hvp="reverse"), hg.Implicit(hvp="linearized"), hg.SOBA()):
        with pytest.raises(hg.SecondOrderError, match="Cube.*once_differentiable") as info:
            est(problem, hp, p)
        assert "come out wrong by double backward" in str(info.value)
        assert "self_check='off'" in str(info.value)  # the way out is named
    for est in (hg.Unrolled(mode="forward"), hg.Implicit(hvp="jvp"), hg.SOBA(hvp="jvp")):
        with pytest.raises(hg.SecondOrderError, match="defines no jvp"):
            est(problem, hp, p)
    with pytest.raises(hg.SecondOrderError, match="No other setting"):
        hg.Implicit()(problem, hp, p)  # auto: no form works


@pytest.mark.filterwarnings("ignore:.*exactly zero:RuntimeWarning")
def test_the_bug_is_real_without_the_check():
    """With the check off, torch.func's zero second derivative gives a wrong hypergradient
    (if a future PyTorch fixes it, the check still passes and this test says so)."""
    problem, hp, p = cube_problem(Cube)
    silent = hg.Unrolled(self_check="off")(problem, hp, p).grad["lam"]
    truth = true_unrolled(problem, hp, p)
    assert rel(silent, truth) > 0.1, "PyTorch now differentiates once_differentiable twice"
    check = hg.check_hypergradient(problem, hp, p, hg.Unrolled(self_check="off"),
                                   coords=[0, 2, 4], eps=1e-5)
    assert not check.agrees and "disagrees" in check.verdict
    with pytest.warns(hg.SecondOrderWarning, match="Cube"):
        warned = hg.Unrolled(self_check="warn")(problem, hp, p).grad["lam"]
    assert torch.equal(warned, silent)


def test_forward_route_is_suggested_and_right_when_it_exists():
    problem, hp, p = cube_problem(CubeWithJvp)
    truth = true_unrolled(problem, hp, p)
    with pytest.raises(hg.SecondOrderError, match=r"Use Unrolled\(mode='forward'\)"):
        hg.Unrolled()(problem, hp, p)
    fwd = hg.Unrolled(mode="forward")(problem, hp, p)
    assert rel(fwd.grad["lam"], truth) < 1e-10
    with pytest.raises(hg.SecondOrderError, match=r"SOBA\(hvp='jvp'\)"):
        hg.SOBA()(problem, hp, p)
    # auto falls back to forward-over-reverse, says why, and is right
    long = hg.Problem(problem.inner_loss, problem.outer_loss, problem.inner_batch,
                      problem.outer_batch, optimizer=problem.optimizer, steps=400)
    with pytest.warns(RuntimeWarning, match="double backward are wrong"):
        out = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-12))(long, hp, p)
    assert out.state["hvp_mode"] == "jvp"
    assert rel(out.grad["lam"], true_unrolled(long, hp, p)) < 1e-8


def test_a_correct_lone_route_is_verified_by_differences():
    """Double backward is the only route and it is right: no false alarm."""
    problem, hp, p = cube_problem(SmoothCube)
    report = hg.check_second_order(problem, hp, p)
    assert report.status("reverse") == "ok"
    assert report.status("forward") == report.status("reverse_forward") == "unsupported"
    for block in ("hessian", "mixed"):
        fd, err = report.finite_difference[block], report.fd_error[block]
        assert fd is not None and err <= 1e-2 * report.scale[block]
        assert abs(report.routes["reverse"].value[block] - fd) <= err
    out = hg.Unrolled()(problem, hp, p)
    assert rel(out.grad["lam"], true_unrolled(problem, hp, p)) < 1e-12


# --- operators without forward-mode rules ------------------------------------------------


def mse_problem():
    X, y = data(1)

    def inner(p, h, batch):
        return F.mse_loss(batch[0] @ p["w"], batch[1]) + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    def outer(p, h, batch):
        return F.mse_loss(batch[0] @ p["w"], batch[1])

    problem = hg.Problem(inner, outer, (X, y), (X, y), optimizer=hg.SGD(lr=0.2), steps=200)
    return problem, {"lam": torch.zeros(D, dtype=DT)}, {"w": torch.zeros(D, dtype=DT)}


def test_missing_forward_rule_names_the_operator_and_the_route_to_use():
    problem, hp, p = mse_problem()
    for est, remedy in ((hg.Unrolled(mode="forward"), r"Unrolled\(mode='reverse'\)"),
                        (hg.Truncated(window=3, mode="forward"), r"Truncated\(mode='reverse'\)"),
                        (hg.Implicit(hvp="jvp"), r"Implicit\(hvp='linearized'\)")):
        with pytest.raises(hg.SecondOrderError, match="mse_loss") as info:
            est(problem, hp, p)
        assert "cannot be taken by forward-over-reverse" in str(info.value)
        assert info.match(remedy)
    with pytest.raises(hg.SecondOrderError, match="mse_loss.*mode='reverse'"):
        hg.hvp(problem.inner_loss, p, hp, problem.inner_batch, p, mode="jvp")


def test_auto_falls_back_silently_to_a_route_that_works():
    problem, hp, p = mse_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-12))(problem, hp, p)
    assert out.state["hvp_mode"] == "linearized"
    # eps where truncation (~1e-10) dominates rounding (~3e-12): the s² regime is clear
    check = hg.check_hypergradient(problem, hp, p, hg.Unrolled(), coords=[0, 3], eps=1e-4)
    assert check.agrees, check.verdict
    assert rel(out.grad["lam"][[0, 3]], check.finite_difference) < 1e-6


# --- fused kernels ---------------------------------------------------------------------


def test_fused_weight_norm_is_named():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    nn.utils.parametrizations.weight_norm(net[0])
    X, y = data(2)

    def inner(p, h, batch):
        out = functional_call(net, p, (batch[0],)).squeeze(-1)
        decay = sum((v ** 2).sum() for v in p.values())
        return ((out - batch[1]) ** 2).mean() + h["lam"].exp() * decay

    problem = hg.Problem(inner, inner, (X, y), (X, y), optimizer=hg.SGD(lr=0.1), steps=5)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    hp = {"lam": torch.tensor(-3.0, dtype=DT)}
    report = hg.check_second_order(problem, hp, params)
    assert report.status("reverse") == "wrong"
    with pytest.raises(hg.SecondOrderError, match="fused weight norm"):
        hg.Unrolled()(problem, hp, params)


# --- no false alarms -------------------------------------------------------------------


def test_relu_kinks_and_random_layers_raise_no_false_alarm():
    """A ReLU network (kinks everywhere) with dropout drawn inside the loss, unseeded, and
    a lone double-backward route (SmoothCube has no jvp), so the differences decide."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 1)).double()
    X, y = data(3)

    def inner(p, h, batch):
        out = functional_call(net, p, (batch[0],)).squeeze(-1)
        return ((out - batch[1]) ** 2).mean() + h["lam"].exp() * SmoothCube.apply(
            p["3.weight"]).pow(2).sum()

    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    report = hg.check_second_order(inner, {"lam": torch.tensor(-2.0, dtype=DT)}, params,
                                   (X, y))
    assert report.status("reverse") == "ok", report.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ordinary_problems_pass_in_both_precisions(dtype):
    X, y = (t.to(dtype) for t in data(4))
    net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)

    def inner(p, h, batch):
        out = functional_call(net, p, (batch[0],)).squeeze(-1)
        return ((out - batch[1]) ** 2).mean() + (h["lam"].exp() * p["0.weight"] ** 2).sum()

    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    report = hg.check_second_order(inner, {"lam": torch.zeros(16, D, dtype=dtype)}, params,
                                   (X, y))
    assert all(report.status(r) == "ok" for r in report.routes), report.summary()


# --- the switch and the cache -----------------------------------------------------------


def test_check_runs_once_per_objective(monkeypatch):
    calls = []
    real = second_order._run_check
    monkeypatch.setattr(second_order, "_run_check", lambda *a: calls.append(1) or real(*a))
    problem, hp, p = mse_problem()
    for _ in range(3):
        hg.Implicit(inner_tol=None)(problem, hp, p)
        hg.Unrolled()(problem, hp, p)
    assert len(calls) == 1
    same, _, _ = mse_problem()  # the same objective (code, closure) on other data: cached
    hg.Unrolled()(same, hp, p)
    assert len(calls) == 1
    hg.Unrolled(self_check="off")(*cube_problem(SmoothCube))
    assert len(calls) == 1
    hg.Unrolled()(*cube_problem(SmoothCube))  # another objective: checked
    assert len(calls) == 2


def test_self_check_setting_is_validated():
    for cls in (hg.Unrolled, hg.Truncated, hg.Implicit, hg.SOBA):
        with pytest.raises(hg.BilevelInputError, match="self_check"):
            cls(self_check="sometimes")
    with pytest.raises(hg.BilevelInputError, match="self_check"):
        hg.SABA(n_inner=2, n_outer=1, self_check=True)
    assert hg.make_estimator("unrolled", self_check="warn").self_check == "warn"


def test_the_docs_recorded_loop_in_forward_mode_names_mse_loss():
    """docs/bilevel.md's recorded loop (F.mse_loss) as written, then in forward mode."""
    import re
    from pathlib import Path

    import bilevel

    text = (Path(__file__).parents[1] / "docs" / "bilevel.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "inner_loop" in b)
    namespace: dict = {}
    exec(compile(block, "docs/bilevel.md", "exec"), namespace)
    with pytest.raises(hg.SecondOrderError, match=r"mse_loss[\s\S]*Unrolled\(mode='reverse'\)"):
        namespace["loop"].hypergradient(bilevel.Unrolled(mode="forward"))


# --- found by trying to break the check -------------------------------------------------


def test_float32_conv_net_with_batchnorm_and_max_pooling_is_no_false_alarm():
    """Kinks (ReLU, max-pooling) in float32: the differences straddle them at every step;
    the three AD routes, which agree, must not be outvoted by them."""
    import bilevel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    ce = lambda out, b, h: F.cross_entropy(out, b[1])  # noqa: E731
    pen = lambda p, h: h["lam"].exp() * sum((v ** 2).sum() for k, v in p.items()  # noqa: E731
                                            if "weight" in k)
    mp = bilevel.wrap(net, ce, ce, {"lam": torch.tensor(-3.0)}, (X, y), (X, y),
                      optimizer=bilevel.SGD(lr=0.05), steps=5, penalty=pen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ConvergenceWarning)  # CG on an indefinite H
        warnings.simplefilter("ignore", RuntimeWarning)  # SOBA's first step is zero
        for est in (hg.Unrolled(), hg.Truncated(window=2), hg.SOBA(), hg.Implicit()):
            mp.hypergradient(est)  # no SecondOrderError


def layer_norm_problem(through_layer_norm: bool):
    """λ enters through layer_norm (a learned input shift) or only through a penalty."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 5, generator=g, dtype=DT), torch.randn(32, generator=g, dtype=DT)

    def inner(p, h, b):
        shift = h["shift"] if through_layer_norm else 0.0
        z = F.layer_norm((b[0] + shift) @ p["W"].t(), (6,))
        reg = 0.1 if through_layer_norm else h["shift"].exp().sum()
        return ((z @ p["v"] - b[1]) ** 2).mean() + reg * ((p["W"] ** 2).sum()
                                                          + (p["v"] ** 2).sum())

    problem = hg.Problem(inner, inner, (X, y), (X, y), optimizer=hg.SGD(lr=0.05), steps=3)
    hp = {"shift": 0.1 * torch.randn(5, generator=g, dtype=DT)}
    p = {"W": torch.randn(6, 5, generator=g, dtype=DT), "v": torch.randn(6, generator=g, dtype=DT)}
    return problem, hp, p


def test_reverse_over_forward_through_layer_norm_is_named_and_only_where_used():
    """torch 2.13 gets reverse-over-forward through F.layer_norm wrong. Implicit(hvp="jvp")
    takes the mixed block that way: refused when λ enters through layer_norm, fine when λ
    only reaches a penalty (the Hessian block goes forward-over-reverse, which is right)."""
    problem, hp, p = layer_norm_problem(through_layer_norm=True)
    report = hg.check_second_order(problem, hp, p)
    if report.status("reverse_forward", "mixed") == "ok":
        pytest.skip("PyTorch now differentiates layer_norm right by reverse-over-forward")
    est = hg.Implicit(hvp="jvp", inner_tol=None)
    with pytest.raises(hg.SecondOrderError, match=r"layer_norm, whose reverse-over-forward "
                                                  r"[\s\S]*Implicit\(hvp='linearized'\)"):
        est(problem, hp, p)
    assert report.status("reverse") == "ok" and report.status("forward") == "ok"
    problem, hp, p = layer_norm_problem(through_layer_norm=False)
    est(problem, hp, p)  # no SecondOrderError


def test_float32_and_an_all_zero_start_do_not_hide_a_wrong_second_derivative():
    problem, hp, p = cube_problem(Cube)
    X, y = (t.float() for t in problem.inner_batch)
    problem32 = hg.Problem(problem.inner_loss, problem.outer_loss, (X, y), (X, y),
                           optimizer=problem.optimizer, steps=problem.steps)
    with pytest.raises(hg.SecondOrderError, match="Cube"):
        hg.Unrolled()(problem32, {"lam": hp["lam"].float()}, {"w": p["w"].float()})
    second_order.clear_cache()
    with pytest.raises(hg.SecondOrderError, match="Cube"):  # Cube'' vanishes at w = 0
        hg.Unrolled()(problem, hp, {"w": torch.zeros(D, dtype=DT)})


class DetachedCube(torch.autograd.Function):
    """Backward and jvp both use a detached x²: every route agrees, and all are wrong."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3 / 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x * x).detach()

    @staticmethod
    def jvp(ctx, t):
        return t * (ctx.x * ctx.x).detach()


def test_routes_that_agree_are_still_confirmed_by_differences():
    problem, hp, p = cube_problem(DetachedCube)
    report = hg.check_second_order(problem, hp, p)
    assert all(report.status(r, "hessian") == "wrong" for r in second_order.ROUTES), \
        report.summary()
    with pytest.raises(hg.SecondOrderError, match="DetachedCube"):
        hg.Unrolled(mode="forward")(problem, hp, p)


SWITCHED = nn.Tanh()


def test_an_objective_reading_a_rebound_global_is_checked_again():
    global SWITCHED
    X, y = data(5)

    def inner(p, h, b):
        return ((SWITCHED(b[0] @ p["w"]) - b[1]) ** 2).mean() + (h["lam"].exp() * p["w"] ** 2).sum()

    problem = hg.Problem(inner, inner, (X, y), (X, y), optimizer=hg.SGD(lr=0.1), steps=3)
    hp, p = {"lam": torch.zeros(D, dtype=DT)}, {"w": 0.1 * torch.ones(D, dtype=DT)}
    try:
        hg.Unrolled()(problem, hp, p)
        SWITCHED = lambda z: Cube.apply(z)  # noqa: E731 - now twice-differentiated wrongly
        with pytest.raises(hg.SecondOrderError, match="Cube"):
            hg.Unrolled()(problem, hp, p)
    finally:
        SWITCHED = nn.Tanh()


def test_fused_attention_without_double_backward_is_named():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 5, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)

    def inner(p, h, b):
        z = (b[0] @ p["W"].t()).view(1, 1, 30, 8)
        a = F.scaled_dot_product_attention(z, z, z, is_causal=True).view(30, 8)
        return ((a @ p["v"] - b[1]) ** 2).mean() + h["lam"].exp() * (p["W"] ** 2).sum()

    problem = hg.Problem(inner, inner, (X, y), (X, y), optimizer=hg.SGD(lr=0.01), steps=2)
    hp = {"lam": torch.tensor(-2.0, dtype=DT)}
    p = {"W": 0.3 * torch.randn(8, 5, generator=g, dtype=DT),
         "v": torch.randn(8, generator=g, dtype=DT)}
    report = hg.check_second_order(problem, hp, p)
    if report.status("reverse") == "ok":
        pytest.skip("this PyTorch has a double backward for CPU attention")
    with pytest.raises(hg.SecondOrderError, match=r"cannot be taken by double backward"
                                                  r"[\s\S]*sdpa_kernel\(SDPBackend\.MATH\)"):
        hg.Unrolled()(problem, hp, p)


def test_report_rejects_unknown_routes_and_blocks():
    problem, hp, p = mse_problem()
    report = hg.check_second_order(problem, hp, p)
    with pytest.raises(ValueError, match="unknown route 'jvp'"):
        report.status("jvp")
    with pytest.raises(ValueError, match="unknown block"):
        report.status("reverse", "w")


def test_the_cached_report_is_per_batch_too():
    """An operator passed in the batch is part of the cache key: the report for x³ is not
    reused for a Function whose double backward is wrong (it was, keyed by the objective
    alone, and Implicit then returned a silently wrong hypergradient)."""
    def inner(p, h, b):
        return b(p["x"]).sum() + 0.5 * (h["s"] * p["x"] ** 2).sum()

    w, hp = {"x": torch.tensor([1.0, 2.0], dtype=DT)}, {"s": torch.ones(2, dtype=DT)}
    assert hg.check_second_order(inner, hp, w, lambda x: x ** 3).status("reverse") == "ok"
    assert hg.check_second_order(inner, hp, w, Cube.apply).status("reverse") == "wrong"
