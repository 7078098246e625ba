"""The distillation outer step against a hand-written autograd BPTT (benchmarks/distill_step.py),
and the pieces that make the library's reverse-mode unrolling cheap: plain-autograd inner
steps (``run_autograd``), settings bound once per run (``bind_settings``), values computed
once per run (``once_per_run``), the parameter swap of the distiller's network, the
skipped gradient norm and the flat-dict shortcut of the inner optimizers (``split``).

All comparisons are in float64. Two computations of the same function by the same
operations in the same order agree exactly; the tolerances (1e-10 relative) only leave
room for a different order of the same floating-point operations, whose rounding (~1e-16
per operation) grows by at most a few orders of magnitude over 30 inner steps here (the
measured differences are 0 to 4e-16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import hypergrad as hg
from bilevel.data import load_digits
from bilevel.distill import DistillConfig, Distiller
from bilevel.distill.core import _ParameterSwap, _redrawable
from bilevel.distill.evaluate import init_networks
from bilevel.nets import make_net
from hypergrad.estimators.unrolled import bind_settings, run_autograd, unroll_reverse
from hypergrad.finite_difference import central_differences
from hypergrad.optim.base import split
from hypergrad.problem import once_per_run, run_scope
from hypergrad.pytree import tree_flatten, tree_unflatten

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"
TOL = 1e-10


def _bench():
    spec = importlib.util.spec_from_file_location("distill_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["distill_step"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def _old_style_hypergrad(problem: hg.Problem, hparams: dict, w0: dict) -> dict:
    """∇_λ F through Problem.run (torch.func.grad at every step, the settings resolved at
    every step): the implementation reverse-mode unrolling used before run_autograd."""
    lam = {k: v.detach().clone().requires_grad_() for k, v in hparams.items()}
    with torch.enable_grad():
        w, _ = problem.run(w0, problem.optimizer.init(w0), lam, 0, problem.steps)
        loss = problem.outer_loss(w, lam, problem.outer_batch)
    return dict(zip(lam, torch.autograd.grad(loss, list(lam.values())), strict=True))


# -- the hand-written reference ---------------------------------------------------------


def test_hand_bptt_gives_the_library_hypergradient(bench, digits):
    case = bench.build_case(dtype="float64", data=digits)
    for step in (0, 1, 2):
        hand, _ = bench.hand_hypergrad(case, case.hparams, step)
        lib = bench.library_hypergrad(case, step)
        assert set(lib) == {"images", "labels", "log_lr"}
        assert _rel(lib, hand) < TOL, step
        bench.library_step(case)  # new hyperparameters for the next comparison
        case.hparams = {k: v.detach().clone().requires_grad_()
                        for k, v in case.distiller.hparams.items()}


def test_hand_steps_follow_the_library_steps(bench, digits):
    case = bench.build_case(dtype="float64", data=digits)
    fc = bench.hand_side(case.distiller, explicit=False)
    for _ in range(3):
        lib = bench.library_step(case)
        assert bench.hand_step(case) == pytest.approx(lib, rel=TOL)
        assert bench.hand_step(fc) == pytest.approx(lib, rel=TOL)
    assert bench.relative_difference(case.distiller.hparams, case.hparams) < TOL
    assert bench.relative_difference(case.distiller.hparams, fc.hparams) < TOL


def test_hand_reference_matches_central_differences(bench, digits):
    """The reference itself, in the learned log learning rate, against central
    differences of the outer loss (a short inner run: 3 steps, IPC 1)."""
    case = bench.build_case(ipc=1, inner_steps=3, dtype="float64", data=digits)
    grads, _ = bench.hand_hypergrad(case, case.hparams, 0)
    hp = {k: v.detach() for k, v in case.hparams.items()}

    def outer(x: torch.Tensor) -> float:
        at = {**hp, "log_lr": x.reshape(())}
        return float(bench.hand_hypergrad(case, {k: v.clone().requires_grad_()
                                                 for k, v in at.items()}, 0)[1])

    x = hp["log_lr"].reshape(1).clone()
    # the net has ReLUs: a step of 1e-3 moves a unit across its kink (D(s) is then off by
    # 3e-6 at a bar of 1e-7); at 1e-5 none moves and D(s) agrees with AD to 1.5e-11
    fd = central_differences(outer, x, [torch.ones(1, dtype=torch.float64)], 1e-5)
    assert bool(fd.asymptotic[0])
    assert abs(float(grads["log_lr"]) - float(fd.value[0])) <= float(fd.error[0])


def test_benchmark_json(bench, tmp_path):
    out = tmp_path / "step.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--json", str(out), "--rounds", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    rec = json.loads(out.read_text())
    assert rec["agreement_float64"] < TOL and rec["trajectory_agreement"] < 1e-4
    assert rec["ratio"] > 0 and rec["rounds"] == 2 and rec["torch"] == torch.__version__


# -- reverse-mode unrolling by plain autograd --------------------------------------------


@pytest.mark.parametrize("estimator", ["unrolled", "recompute", "truncated", "random_window"])
def test_distiller_estimators_match_the_torch_func_steps(digits, estimator):
    cfg = DistillConfig(ipc=2, inner_steps=6, dtype="float64", estimator=estimator,
                        estimator_settings={"window": 6} if "window" in estimator
                        or estimator == "truncated" else {})
    d = Distiller(digits, cfg)
    problem, w0 = d.problem(0)
    hp = {k: v.detach().clone() for k, v in d.hparams.items()}
    got = d.estimator(problem, hp, w0).grad
    assert _rel(got, _old_style_hypergrad(problem, hp, w0)) < TOL
    assert math.isnan(d.estimator(problem, hp, w0).diagnostics.inner_grad_norm)


@pytest.mark.parametrize("opt", [
    hg.SGD(lr=lambda h: h["log_lr"].exp(), weight_decay=lambda h: 0.1 * h["s"] ** 2),
    hg.Momentum(lr=lambda h: h["log_lr"].exp(), momentum=lambda h: torch.sigmoid(h["s"])),
    hg.Adam(lr=lambda h: 0.1 * h["log_lr"].exp(), betas=(lambda h: torch.sigmoid(h["s"]), 0.99)),
])
@pytest.mark.parametrize("recompute", [False, True])
def test_unrolled_matches_torch_func_steps(opt, recompute):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, generator=gen, dtype=torch.float64)

    def inner(p, h, batch):
        r = torch.tanh(batch[0] @ p["w"] + p["b"]) - batch[1]
        return (r ** 2).mean() + once_per_run(torch.exp, h["s"]) * (p["w"] ** 2).sum()

    def outer(p, h, batch):
        return ((batch[0] @ p["w"] + p["b"] - 2 * batch[1]) ** 2).mean()

    problem = hg.Problem(inner, outer, (a, y), (a, y), optimizer=opt, steps=7)
    hp = {"log_lr": torch.tensor(-1.0, dtype=torch.float64),
          "s": torch.tensor(-0.5, dtype=torch.float64)}
    w0 = {"w": torch.randn(3, generator=gen, dtype=torch.float64),
          "b": torch.zeros((), dtype=torch.float64)}
    est = hg.Unrolled(recompute=recompute, segment=3)
    got = est(problem, hp, w0)
    assert _rel(got.grad, _old_style_hypergrad(problem, hp, w0)) < TOL
    ref = hg.Unrolled(mode="forward")(problem, hp, w0)
    assert _rel(got.grad, ref.grad) < 1e-8  # forward mode: other operations, same value
    assert got.diagnostics.inner_grad_norm == pytest.approx(ref.diagnostics.inner_grad_norm,
                                                            rel=TOL)
    w_func, _ = problem.run(w0, opt.init(w0), hp, 0, 7, graph=False)
    w_auto, _ = run_autograd(problem, w0, opt.init(w0), hp, 0, 7, graph=False)
    assert all(not v.requires_grad for v in w_auto.values())
    assert _rel(w_auto, w_func) < TOL


def test_grad_norm_setting():
    with pytest.raises(ValueError, match="grad_norm"):
        hg.Unrolled(grad_norm=1)
    with pytest.raises(ValueError, match="grad_norm"):
        hg.Truncated(window=2, grad_norm="no")
    problem = hg.Problem(lambda p, h, b: ((p - h) ** 2).sum(), lambda p, h, b: (p ** 2).sum(),
                         optimizer=hg.SGD(lr=0.1), steps=5)
    hp, w0 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    on, off = hg.Unrolled()(problem, hp, w0), hg.Unrolled(grad_norm=False)(problem, hp, w0)
    assert torch.equal(on.grad, off.grad) and math.isnan(off.diagnostics.inner_grad_norm)
    # w − λ ← 0.8 (w − λ) at each step: ∇f(w_5) = 2 (w_5 − λ) = −2 · 0.8⁵ λ
    assert on.diagnostics.inner_grad_norm == pytest.approx(2 * 0.8 ** 5 * 5 ** 0.5, rel=1e-12)


def test_bind_settings():
    h = {"log_lr": torch.tensor(0.5, requires_grad=True)}
    sgd = hg.SGD(lr=lambda h: h["log_lr"].exp())
    bound = bind_settings(sgd, h)
    assert isinstance(bound.lr, torch.Tensor) and bound.lr.grad_fn is not None
    assert float(bound.lr.detach()) == pytest.approx(math.exp(0.5), rel=1e-6)
    plain = hg.SGD(lr=0.3)
    assert bind_settings(plain, h) is plain
    adam = bind_settings(hg.Adam(betas=(lambda h: torch.sigmoid(h["log_lr"]), 0.99)), h)
    assert isinstance(adam.betas[0], torch.Tensor) and adam.betas[1] == 0.99


def test_once_per_run_scope():
    calls = []

    def soft(x):
        calls.append(1)
        return F.softmax(x, -1)

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    once_per_run(soft, x), once_per_run(soft, x)
    assert len(calls) == 2  # no scope: every call computes
    with run_scope():
        a, b = once_per_run(soft, x), once_per_run(soft, x)
        assert a is b and len(calls) == 3
        once_per_run(soft, x.detach())  # another tensor: computed
        with torch.no_grad():
            assert once_per_run(soft, x).grad_fn is None  # grad mode is part of the key
        assert len(calls) == 5
        with run_scope():
            once_per_run(soft, x)  # a nested scope starts empty
        assert len(calls) == 6
    (g,) = torch.autograd.grad((a * torch.arange(4.0, dtype=torch.float64)).sum(), x)
    with torch.no_grad():
        p = F.softmax(x, -1)
        ref = p * (torch.arange(4.0, dtype=torch.float64) - (p * torch.arange(4.0)).sum(-1,
                                                                                    True))
    assert torch.allclose(g, ref, rtol=1e-12, atol=1e-15)  # (entries near 0 cancel alike)


@pytest.mark.filterwarnings("ignore::hypergrad.errors.ConvergenceWarning")
def test_soft_labels_with_implicit_and_recompute(digits):
    """The soft labels are shared only within one graph: estimators that back-propagate the
    same hyperparameters several times (implicit HVPs, recomputed segments) still work."""
    for estimator in ("implicit", "recompute"):
        cfg = DistillConfig(ipc=1, inner_steps=4, estimator=estimator, dtype="float64")
        d = Distiller(digits, cfg)
        d.step()
        assert all(torch.isfinite(v.grad if v.grad is not None else torch.zeros(1)).all()
                   for v in d.hparams.values())
        assert math.isfinite(d.history[-1]["outer_loss"])


# -- the distiller's network and initial parameters --------------------------------------


@pytest.mark.parametrize("net,shape,settings", [
    ("mlp", (1, 8, 8), {"hidden": (16, 8)}),
    ("mlp", (3, 4, 4), {"hidden": ()}),  # softmax regression: no relu at all
    ("convnet", (1, 8, 8), {"width": 4, "depth": 2, "norm": "instance"}),
    ("convnet", (3, 16, 16), {"width": 4, "depth": 3, "norm": "none"}),
])
def test_parameter_swap_is_functional_call(net, shape, settings):
    module = make_net(net, shape, 5, **settings).double()
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    params = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
              for k, v in before.items()}
    x = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    swap = _ParameterSwap(module)
    assert torch.equal(swap(params, x), functional_call(module, params, (x,)))
    with pytest.raises(KeyError):  # the last parameter missing: the others are swapped in
        swap({k: v for k, v in list(params.items())[:-1]}, x)
    with pytest.raises(RuntimeError):  # the network raises after the swap
        swap(params, torch.randn(4, 7, generator=gen, dtype=torch.float64))
    after = dict(module.named_parameters())
    assert all(after[k] is not params.get(k) and torch.equal(after[k], before[k])
               for k in before)
    assert all(isinstance(v, torch.nn.Parameter) for v in after.values())


def test_problem_start_is_init_networks(digits):
    d = Distiller(digits, DistillConfig(ipc=1, inner_steps=2))
    for step in (0, 5):
        _, w0 = d.problem(step)
        _, ref = init_networks(d.make_net, [hg.mix_seed(0, step)])
        assert set(w0) == set(ref) and all(torch.equal(w0[k], ref[k][0]) for k in ref)
    state = torch.get_rng_state()
    d.problem(1)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched


def test_split_matches_tree_flatten():
    for tree in ({"b": torch.ones(2), "a": torch.zeros(1)},
                 {"a": {"x": torch.ones(1)}, "b": [torch.zeros(2)]}, [torch.ones(3)]):
        leaves, rebuild = split(tree)
        ref, spec = tree_flatten(tree)
        assert all(a is b for a, b in zip(leaves, ref, strict=True))
        new = [v + 1 for v in leaves]
        assert tree_flatten(rebuild(new))[1] == spec
        assert all(torch.equal(a, b) for a, b in zip(tree_flatten(rebuild(new))[0],
                                                     tree_flatten(tree_unflatten(new, spec))[0],
                                                     strict=True))


@pytest.mark.parametrize("net,dtype", [("mlp", "float32"), ("mlp", "float64"),
                                       ("convnet", "float64")])
def test_initial_params_redrawn_in_place_are_a_new_network(digits, net, dtype):
    d = Distiller(digits, DistillConfig(ipc=1, inner_steps=2, net=net, width=4, dtype=dtype))
    assert _redrawable(d._init_net)
    first = d.initial_params(3)
    for seed in (3, 11):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = d.make_net().to(dtype=d.config.torch_dtype)
        got = d.initial_params(seed)
        assert list(got) == [k for k, _ in ref.named_parameters()]
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                   for k, v in ref.named_parameters())
    again = d.initial_params(3)
    assert all(torch.equal(first[k], again[k]) for k in first)  # no aliasing of the kept net


def test_initial_params_of_other_networks_are_built_anew(digits):
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3))

    d = Distiller(digits, DistillConfig(ipc=1, inner_steps=2))
    assert not _redrawable(Custom())
    d._init_net, d.make_net = Custom(), Custom
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = Custom()
    assert torch.equal(d.initial_params(5)["w"], ref.w)


def _quadratic_problem(steps: int, step_batch=None):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)

    def inner(p, h, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean() + h["s"].exp() * (p["w"] ** 2).sum()

    def outer(p, h, batch):
        return ((batch[0] @ p["w"] - 2 * batch[1]) ** 2).mean()

    problem = hg.Problem(inner, outer, (a, y), (a, y), optimizer=hg.SGD(lr=0.2), steps=steps,
                         step_batch=step_batch)
    hp = {"s": torch.tensor(-1.0, dtype=torch.float64)}
    w0 = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
    return problem, hp, w0


@pytest.mark.parametrize("segment", [None, 1, 2, 3, 7])
def test_unroll_reverse_records_every_step_loss_once(segment):
    problem, hp, w0 = _quadratic_problem(7)
    ref, w = [], w0
    for t in range(7):  # the losses along the iterates, step by step
        ref.append(problem.inner_loss(w, hp, problem.batch_at(t)).detach())
        w, _ = run_autograd(problem, w, {}, hp, t, t + 1, graph=False)
    losses = []
    unroll_reverse(problem, hp, w0, {}, 0, 7, segment, losses)
    assert len(losses) == 7
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(losses, ref,
                                                                         strict=True))


def test_unrolled_divergence_check_uses_the_first_step_loss(monkeypatch):
    import hypergrad.estimators.unrolled as unrolled

    calls = []
    real = unrolled.inner_loss_value
    monkeypatch.setattr(unrolled, "inner_loss_value",
                        lambda *a: calls.append(1) or real(*a))
    problem, hp, w0 = _quadratic_problem(4)
    hg.Unrolled(grad_norm=False, self_check="off")(problem, hp, w0)
    assert len(calls) == 1  # the end only: f(w_0) is the first step's loss
    seen = []
    monkeypatch.setattr(unrolled, "check_growth", lambda who, s, e, n: seen.append(s))
    for est, batches in ((hg.Unrolled(self_check="off"), None),
                         (hg.Unrolled(mode="forward", self_check="off"), None),
                         (hg.Unrolled(self_check="off"), lambda t: problem.inner_batch)):
        p, _, _ = _quadratic_problem(4, batches)
        est(p, hp, w0)
    f0 = float(problem.inner_loss(w0, hp, problem.full_batch()))
    assert seen == [f0, f0, f0]


def test_unrolled_divergence_still_raised():
    problem, hp, w0 = _quadratic_problem(60)
    problem = dataclasses.replace(problem, optimizer=hg.SGD(lr=3.0))
    with pytest.raises(hg.DivergenceError, match="the inner loss went from"):
        hg.Unrolled(self_check="off")(problem, hp, w0)


def test_sgd_shortcut_matches_per_leaf_settings():
    gen = torch.Generator().manual_seed(2)
    p = {"a": torch.randn(3, generator=gen, dtype=torch.float64),
         "b": torch.randn(2, 2, generator=gen, dtype=torch.float64)}
    g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in p.items()}
    lr = torch.tensor(0.3, dtype=torch.float64)
    one, _ = hg.SGD(lr=lr).step(p, g, {}, None)
    per_leaf, _ = hg.SGD(lr={"a": lr, "b": lr}, weight_decay={"a": 0.0, "b": 0.0}).step(
        p, g, {}, None)
    assert all(torch.equal(one[k], p[k] - lr * g[k]) for k in p)
    assert all(torch.equal(one[k], per_leaf[k]) for k in p)
    decayed, _ = hg.SGD(lr=lr, weight_decay=0.5).step(p, g, {}, None)
    assert all(torch.equal(decayed[k], p[k] - lr * (g[k] + 0.5 * p[k])) for k in p)


def test_first_step_loss_not_reused_when_batches_may_differ():
    from hypergrad.estimators.unrolled import same_batch_throughout

    class OwnFullBatch(hg.Problem):
        def full_batch(self):
            return (self.inner_batch[0][:4], self.inner_batch[1][:4])

    problem, hp, w0 = _quadratic_problem(3)
    assert same_batch_throughout(problem)
    assert not same_batch_throughout(dataclasses.replace(problem, step_batch=lambda t: None))
    own = OwnFullBatch(**{f.name: getattr(problem, f.name)
                          for f in dataclasses.fields(problem)})
    assert not same_batch_throughout(own)


def test_hand_written_convnet_bptt_equals_the_library(bench, digits):
    """The generic hand-written side (functional_call), which the GPU benchmark times for
    ConvNet-3 on Fashion-MNIST, gives the library's hypergradient on a ConvNet too (float64:
    the same operations in the same order, so equal to rounding; 1e-10 relative)."""
    assert bench.agreement(data=digits, net="convnet", width=4, ipc=1, inner_steps=3) <= 1e-10
    with pytest.raises(ValueError, match="MLP only"):
        bench.build_case(1, 2, data=digits, net="convnet", width=4)  # explicit=True default


def test_once_per_run_keys_other_arguments_by_value():
    calls = []

    def scaled(t, c):
        calls.append(c)
        return t * c

    t = torch.ones(2)
    with run_scope():
        first, again, other = (once_per_run(scaled, t, 2.0), once_per_run(scaled, t, 2.0),
                               once_per_run(scaled, t, 3.0))
    assert calls == [2.0, 3.0] and again is first and torch.equal(other, 3 * t)
    with run_scope(), pytest.raises(TypeError, match="hashable"):
        once_per_run(scaled, t, [1.0])
