"""bilevel.module: nn.Module problems equal the same problem written against the core."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hypergrad as hg
from bilevel.module import (
    BufferPolicyError,
    InnerLoopError,
    ModuleProblem,
    assign_grads,
    wrap,
)
from bilevel.outer import OuterLoop
from hypergrad.errors import BilevelInputError, HyperparameterError, ObjectiveError
from hypergrad.finite_difference import central_differences
from hypergrad.pytree import tree_ravel, tree_unravel

from problems import fd_check

DT = torch.float64
# The module layer and the hand-written core run the same float64 arithmetic in another
# order (functional_call, flattening, batch norm): 15 steps of a 3-6-1 MLP on ≤ 24 samples
# round to ~1e-15 (observed ≤ 4e-16 absolute), so TOL keeps a margin > 1e4 and a wrong
# term (a missed penalty, a buffer read in the wrong mode: ≥ 1e-3 relative) still fails.
TOL = 1e-10
# CG stops at relative residual tol = 1e-10 on H = ∇²_w f at w_15, which is indefinite
# here (|λ|max/|λ|min ≈ 3.8e3): the two paths' solutions may each be off by κ·tol, so
# they agree to 2·κ·tol ≈ 8e-7 relative, not to rounding (observed 3e-10 under
# MKL_CBWR=COMPATIBLE, 40 % of the flat TOL this test used before).
CG_TOL = 2 * 3.8e3 * 1e-10
STEPS = 15


def data(n: int = 24, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)


def mlp(bn: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh()]
    layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(6, 1)]
    model = nn.Sequential(*layers).to(DT)
    if bn:  # non-trivial running statistics
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def mse(out, batch, h):
    return F.mse_loss(out, batch[1])


def layer_wd(p, h):
    """Per-layer weight decay, one log-coefficient per Linear layer."""
    names = sorted({k.split(".")[0] for k in p})
    return sum(0.5 * h[f"wd{i}"].exp() * (p[f"{n}.weight"] ** 2).sum()
               for i, n in enumerate(names))


def wd_hparams() -> dict:
    return {"wd0": torch.tensor(-1.0, dtype=DT), "wd1": torch.tensor(-2.0, dtype=DT)}


def snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def assert_unchanged(model: nn.Module, snap: tuple) -> None:
    state, flags, req = snapshot(model)
    assert flags == snap[1] and req == snap[2]
    assert all(p.grad is None for p in model.parameters())
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k


def close(a: dict, b: dict, tol: float = TOL, atol: float | None = None) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=tol if atol is None else atol), \
            (k, a[k], b[k])


def direct_problem(bn: str | None = None, model: nn.Module | None = None) -> hg.Problem:
    """The same MLP problem written by hand against the core (no module machinery)."""

    def net(p, x):
        h = x @ p["0.weight"].T + p["0.bias"]
        if bn is not None:
            m = model[1]
            rm, rv = (None, None) if bn == "batch_stats" else (m.running_mean, m.running_var)
            h = F.batch_norm(h, rm, rv, p["1.weight"], p["1.bias"],
                             training=bn == "batch_stats", eps=m.eps)
        last = "3" if bn is not None else "2"
        return torch.tanh(h) @ p[f"{last}.weight"].T + p[f"{last}.bias"]

    def f(p, h, batch):
        layers = ["0", "2"] if bn is None else ["0", "1", "3"]  # BN's weight gets wd1
        wd = sum(0.5 * h[f"wd{i}"].exp() * (p[f"{n}.weight"] ** 2).sum()
                 for i, n in enumerate(layers))
        return F.mse_loss(net(p, batch[0]), batch[1]) + wd

    def Fo(p, h, batch):
        return F.mse_loss(net(p, batch[0]), batch[1])

    return hg.Problem(f, Fo, data(), data(16, seed=1), optimizer=hg.SGD(lr=0.2), steps=STEPS)


IMPLICIT = hg.Implicit(solver=hg.Direct(), inner_tol=None)  # exact solve: no CG round-off


@pytest.mark.parametrize("estimator, grad_tol",
                         [(hg.Unrolled(), TOL), (hg.Implicit(inner_tol=None), CG_TOL),
                          (IMPLICIT, TOL)], ids=["unrolled", "implicit-cg", "implicit-direct"])
def test_mlp_matches_core(estimator, grad_tol):
    model = mlp()
    snap = snapshot(model)
    mp = wrap(model, mse, mse, wd_hparams(), data(), data(16, seed=1), hg.SGD(lr=0.2), STEPS,
              penalty=layer_wd)
    got = mp.hypergradient(estimator)
    ref = hg.hypergradient(direct_problem(), wd_hparams(), mp.init()[0], estimator)
    close(got.grad, ref.grad, grad_tol, atol=0.0)  # entries ≈ 0.05-0.07: relative
    close(got.params, ref.params)
    assert_unchanged(model, snap)
    trained = mp.export(got.params)
    x = data()[0]
    # the exported module runs the same kernels (observed equal); 1e-14 ≈ 45 ulp of outputs ≈ 1
    assert torch.allclose(trained(x), mp.forward(got.params, x, outer=True), rtol=0, atol=1e-14)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("policy", ["batch_stats", "frozen"])
def test_batchnorm_policies(policy):
    model = mlp(bn=True)
    model.eval()  # the user's flag must survive, whatever it is
    snap = snapshot(model)
    h = {**wd_hparams(), "wd2": torch.tensor(-3.0, dtype=DT)}
    mp = wrap(model, mse, mse, h, data(), data(16, seed=1), hg.SGD(lr=0.2), STEPS,
              penalty=layer_wd, buffers=policy)
    for est in (hg.Unrolled(), IMPLICIT):
        got = mp.hypergradient(est)
        ref = hg.hypergradient(direct_problem(policy, model), h, mp.init()[0], est)
        close(got.grad, ref.grad)
    assert_unchanged(model, snap)
    assert not model.training


def test_batchnorm_impossible_settings():
    model = mlp(bn=True)
    with pytest.raises(BilevelInputError, match=r"1 \(BatchNorm1d\).*batch_stats"):
        wrap(model, mse, mse, wd_hparams(), data(), data(), buffers="running")
    x, y = data(1)
    mp = wrap(model, mse, mse, {"wd0": torch.tensor(0.0, dtype=DT)}, (x, y), data(),
              penalty=lambda p, h: h["wd0"].exp() * (p["0.weight"] ** 2).sum(), steps=2)
    with pytest.raises(BilevelInputError, match="BatchNorm1d.*frozen"):
        mp.hypergradient("unrolled")


class Distilled(nn.Module):
    """Learnable synthetic inputs and soft targets (dataset distillation)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.images = nn.Parameter(torch.randn(5, 3, generator=g, dtype=DT))
        self.labels = nn.Parameter(torch.randn(5, 1, generator=g, dtype=DT))


def test_hparam_module():
    hmod = Distilled()

    def inner(out, batch, h):
        return F.mse_loss(out, h["labels"])

    kw = dict(inputs=lambda batch, h: h["images"], outer_inputs=lambda b: b[0], steps=STEPS)
    mp = wrap(mlp(), inner, mse, hmod, None, data(16, seed=1), hg.SGD(lr=0.2), **kw)
    assert mp.hparams["images"] is hmod.images
    got = mp.hypergradient("unrolled")
    plain = {k: v.detach().clone() for k, v in hmod.named_parameters()}
    ref = wrap(mlp(), inner, mse, plain, None, data(16, seed=1), hg.SGD(lr=0.2), **kw)
    close(got.grad, ref.hypergradient("unrolled").grad)
    before = hmod.images.detach().clone()
    assign_grads(hmod, got.grad)
    torch.optim.SGD(hmod.parameters(), lr=0.1).step()
    # torch.optim rounds p − lr·g once or twice, the reference twice: ≤ 2 ulp of |images| ≲ 4,
    # i.e. ≤ 2e-15
    assert torch.allclose(hmod.images, before - 0.1 * got.grad["images"], rtol=0, atol=1e-14)


def loader_problem(model=None, **kw) -> ModuleProblem:
    x, y = data(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    return wrap(model or mlp(), mse, mse, wd_hparams(), loader, data(16, seed=1),
                hg.SGD(lr=0.2), 7, penalty=layer_wd, **kw)


def test_dataloader_deterministic_and_cycled():
    rng = torch.random.get_rng_state()
    a, b = loader_problem(), loader_problem()
    assert torch.equal(torch.random.get_rng_state(), rng)  # global RNG untouched
    ga, gb = a.hypergradient("unrolled"), b.hypergradient("unrolled")
    close(ga.grad, gb.grad, 0.0)
    first, fifth = a.problem.step_batch(0).batch, a.problem.step_batch(4).batch
    assert all(torch.equal(u, v) for u, v in zip(first, fifth, strict=True))  # 4 batches


def user_loop(mp: ModuleProblem, batches, val) -> dict:
    h = {k: v.detach().clone().requires_grad_() for k, v in mp.hparams.items()}
    params, state = mp.init()
    for t, batch in enumerate(batches):
        params, state = mp.step(params, state, h, batch, t)
    loss = mp.outer_loss(params, h, val)
    return dict(zip(h, torch.autograd.grad(loss, list(h.values())), strict=True))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_user_loop_equals_managed(dropout):
    mp = loader_problem(mlp(dropout=dropout))
    batches = [mp.problem.step_batch(t).batch for t in range(mp.problem.steps)]
    got = user_loop(mp, batches, data(16, seed=1))
    close(got, mp.hypergradient("unrolled").grad)
    if dropout:  # reproducible masks, and they matter
        close(got, user_loop(mp, batches, data(16, seed=1)), 0.0)
        other = loader_problem(mlp(dropout=dropout), seed=1).hypergradient("unrolled").grad
        assert not torch.allclose(other["wd0"], got["wd0"])


def test_outer_iterable_is_mean_over_batches():
    xv, yv = data(16, seed=1)
    loader = DataLoader(TensorDataset(xv, yv), batch_size=8)
    a = wrap(mlp(), mse, mse, wd_hparams(), data(), loader, hg.SGD(lr=0.2), STEPS,
             penalty=layer_wd)
    b = wrap(mlp(), mse, mse, wd_hparams(), data(), (xv, yv), hg.SGD(lr=0.2), STEPS,
             penalty=layer_wd)
    close(a.hypergradient("unrolled").grad, b.hypergradient("unrolled").grad)


def test_errors():
    model = mlp()
    with pytest.raises(TypeError, match="nn.Module"):
        wrap(lambda x: x, mse, mse, wd_hparams(), data(), data())
    with pytest.raises(TypeError, match="hparams must be a dict"):
        wrap(model, mse, mse, [torch.zeros(1)], data(), data())
    with pytest.raises(HyperparameterError, match="wd0"):
        wrap(model, mse, mse, {"wd0": 1.0}, data(), data())
    with pytest.raises(TypeError, match="inner_loss must be callable"):
        wrap(model, 3, mse, wd_hparams(), data(), data())
    with pytest.raises(TypeError, match="iterable of batches"):
        wrap(model, mse, mse, wd_hparams(), 3, data())
    with pytest.raises(BilevelInputError, match="buffers="):
        wrap(model, mse, mse, wd_hparams(), data(), data(), buffers="running")
    bad = wrap(model, lambda out, b, h: (out - b[1]) ** 2, mse, wd_hparams(), data(), data(),
               penalty=layer_wd, steps=2)
    with pytest.raises(ObjectiveError, match=r"inner_loss must return a scalar.*\(24, 1\)"):
        bad.hypergradient("unrolled")
    nodefault = wrap(model, mse, mse, wd_hparams(), {"x": data()[0]}, data(), penalty=layer_wd)
    with pytest.raises(BilevelInputError, match="inputs=lambda"):
        nodefault.hypergradient("unrolled")


def test_dropout_with_implicit_and_under_vmap():
    def make(**kw):
        return wrap(mlp(dropout=0.3), mse, mse, wd_hparams(), data(), data(16, seed=1),
                    hg.SGD(lr=0.2), 3, penalty=layer_wd, **kw)

    close(make().hypergradient(IMPLICIT).grad, make().hypergradient(IMPLICIT).grad, 0.0)
    mp = make()
    xs = data()[0].reshape(4, 6, 3)
    with pytest.raises(BilevelInputError, match="train=False"):
        torch.func.vmap(lambda x: mp.forward(mp.params, x))(xs)
    off = make(train=False)
    ref = wrap(mlp(), mse, mse, wd_hparams(), data(), data(16, seed=1), hg.SGD(lr=0.2), 3,
               penalty=layer_wd)
    close(off.hypergradient(IMPLICIT).grad, ref.hypergradient(IMPLICIT).grad)
    outs = torch.func.vmap(lambda x: off.forward(off.params, x))(xs)
    assert outs.shape == (4, 6, 1)


def test_user_loop_then_implicit_at_its_end_point():
    """The docs' recipe: a user-written loop without a graph, then Implicit(inner_steps=0)."""
    model = mlp()
    mp = wrap(model, mse, mse, wd_hparams(), data(), data(16, seed=1), hg.SGD(lr=0.2), STEPS,
              penalty=layer_wd)
    params, state = mp.init()
    with torch.no_grad():
        for t in range(STEPS):
            params, state = mp.step(params, state, mp.hparams, data(), t)
    est = hg.Implicit(solver=hg.Direct(), inner_tol=None)
    mine = mp.hypergradient(hg.Implicit(solver=hg.Direct(), inner_steps=0, inner_tol=None),
                            params=params)
    managed = mp.hypergradient(est)
    close(mine.params, managed.params)
    close(mine.grad, managed.grad)


# --- buffers="track" ---------------------------------------------------------------------


def batches_of(n: int, size: int = 8, seed: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, generator=g, dtype=DT)
        out.append((x, torch.sin(x.sum(1, keepdim=True))))
    return out


def sq(out, batch, h):
    """Mean squared error written out (F.mse_loss has no forward-over-reverse rule)."""
    return ((out - batch[1]) ** 2).mean()


def bn_hparams() -> dict:
    return {**wd_hparams(), "wd2": torch.tensor(-3.0, dtype=DT)}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_track_running_stats_match_eager_training(momentum):
    model = mlp(bn=True)
    model[1].momentum = momentum
    model[1].num_batches_tracked.fill_(3)
    model.eval()  # the user's flag must survive
    snap = snapshot(model)
    h, batches = bn_hparams(), batches_of(5)
    mp = wrap(model, mse, mse, h, iter(batches), data(16, seed=1), hg.SGD(lr=0.2), 5,
              penalty=layer_wd, buffers="track")
    got = mp.hypergradient(hg.Unrolled()).params
    eager = copy.deepcopy(model).train()
    opt = torch.optim.SGD(eager.parameters(), lr=0.2)
    for x, y in batches:
        opt.zero_grad()
        (F.mse_loss(eager(x), y) + layer_wd(dict(eager.named_parameters()), h)).backward()
        opt.step()
    trained = mp.export(got).state_dict()
    ref = eager.state_dict()
    assert trained.keys() == ref.keys()
    assert int(trained["1.num_batches_tracked"]) == 8
    assert trained["1.num_batches_tracked"].dtype == torch.long
    for k in ref:
        assert torch.allclose(trained[k], ref[k], rtol=TOL, atol=TOL), k
    assert not torch.allclose(ref["1.running_mean"], model[1].running_mean)
    # the user-written loop and the recorded loop carry the same statistics
    params, state = mp.init()
    with torch.no_grad():
        for t, batch in enumerate(batches):
            params, state = mp.step(params, state, h, batch, t)
    close(params, got)
    # the outer loss uses them in eval mode, as the exported module does (BatchNorm's eval
    # formula in another order: a few ulp of outputs ≈ 1, observed ≤ 2e-16)
    x = data(16, seed=1)[0]
    assert torch.allclose(mp.export(got).eval()(x), mp.forward(got, x, outer=True), rtol=0,
                          atol=1e-13)
    assert_unchanged(model, snap)
    assert not model.training


def test_track_hypergradient_matches_finite_differences():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.5), nn.Tanh(),
                          nn.Linear(4, 1)).to(DT)
    batches, val = batches_of(3, size=6), batches_of(1, size=10, seed=9)[0]

    def inner(out, batch, h):
        return sq(out * h["scale"], batch, h)

    def make(h):
        return wrap(model, inner, sq, h, iter(batches), val, hg.SGD(lr=0.5), 3,
                    penalty=lambda p, h: h["wd"].exp() * sum((w ** 2).sum()
                                                             for w in p.values()),
                    buffers="track")

    h = {"wd": torch.tensor(-1.0, dtype=DT), "scale": torch.tensor([1.5], dtype=DT)}

    def value(hh):
        mp = make(hh)
        w = mp.problem.solve_inner(mp.params, hh)[0]
        return float(mp.outer_loss(w, hh, val))

    # differences in (wd, scale) with error bars; at eps = 1e-6 rounding dominates
    # (σ ≈ EPS·|h|) and the bar resolves ~1e-9 of each derivative
    flat = tree_ravel(h)
    fd = central_differences(lambda x: value(tree_unravel(x, h)), flat,
                             list(torch.eye(flat.numel(), dtype=DT)), 1e-6)
    assert bool((fd.value.abs() > 1e-3).all())  # both derivatives matter
    mp = make(h)
    for est in (hg.Unrolled(), hg.Unrolled(mode="forward"), hg.Truncated(window=3),
                hg.Unrolled(recompute=True, segment=1)):
        check = fd_check(tree_ravel(mp.hypergradient(est).grad), fd)
        assert check.agrees, f"{est}: {check.verdict}"
        assert check.resolution < 1e-6, check.verdict  # a wrong sign or missing term shows
    # the statistics matter: treating them as constants gives another answer, which the
    # check rejects (it is ~5 % off, the bar ~1e-9)
    frozen = make(h)
    frozen._updated_stats = lambda stats, seen: {k: v.detach() for k, v in
                                                 ModuleProblem._updated_stats(
                                                     frozen, stats, seen).items()}
    check = fd_check(tree_ravel(frozen.hypergradient(hg.Unrolled()).grad), fd)
    assert not check.agrees and check.verdict.startswith("disagrees"), check.verdict
    assert check.rel_error > 1e-3


def test_track_in_outer_loop_warm_starts_the_statistics():
    model = mlp(bn=True)
    mp = wrap(model, sq, sq, bn_hparams(), data(), data(16, seed=1), hg.SGD(lr=0.2), 3,
              penalty=layer_wd, buffers="track")
    loop = OuterLoop(mp.problem, mp.hparams, mp.params, hg.Truncated(window=2),
                     lambda hp: torch.optim.SGD(hp, lr=0.1))
    loop.run(2)
    assert float(loop.params["1.num_batches_tracked"]) == 6  # 2 outer steps x 3 inner
    assert not torch.allclose(loop.params["1.running_var"], mp.params["1.running_var"])
    assert int(model[1].num_batches_tracked) == 0


def test_track_rejects_what_it_cannot_do():
    model = mlp(bn=True)
    mp = wrap(model, mse, mse, bn_hparams(), data(), data(16, seed=1), hg.SGD(lr=0.2), 3,
              penalty=layer_wd, buffers="track")
    for est in (IMPLICIT, "fixed_point", "soba"):
        with pytest.raises(BufferPolicyError, match="track.*Unrolled"):
            mp.hypergradient(est)
    with pytest.raises(BufferPolicyError, match="Implicit"):
        OuterLoop(mp.problem, mp.hparams, mp.params, "implicit")
    with pytest.raises(BufferPolicyError, match="Implicit"):
        with mp.inner_loop() as loop:
            loop.step(data())
        loop.hypergradient(IMPLICIT)
    with pytest.raises(BufferPolicyError, match="running statistics"):
        mp.step({k: v for k, v in mp.params.items() if "running" not in k},
                {}, mp.hparams, data(), 0)
    inorm = nn.Sequential(nn.Linear(3, 4), nn.InstanceNorm1d(4, track_running_stats=True))
    with pytest.raises(BufferPolicyError, match=r"1 \(InstanceNorm1d\)"):
        wrap(inorm.to(DT), mse, mse, wd_hparams(), data(), data(), buffers="track")


# --- recorded user-written loops -----------------------------------------------------------


RECORDED = [hg.Unrolled(), hg.Unrolled(recompute=True), hg.Unrolled(mode="forward"),
            hg.Truncated(window=3), hg.Truncated(window=3, random=True), IMPLICIT]


def recorded_setup(dropout: float = 0.0, bn: str | None = None, steps: int = 6):
    model = mlp(bn=bn is not None, dropout=dropout)
    h = bn_hparams() if bn else wd_hparams()
    kw = {"buffers": bn} if bn else {}
    batches = batches_of(steps)
    mp = wrap(model, sq, sq, h, iter(batches), data(16, seed=1), hg.SGD(lr=0.2), steps,
              penalty=layer_wd, **kw)
    return mp, batches


@pytest.mark.parametrize("est", RECORDED, ids=["unrolled", "recompute", "forward",
                                                 "truncated", "random_window", "implicit"])
def test_recorded_loop_equals_managed(est):
    mp, batches = recorded_setup()
    seen = []
    with mp.inner_loop() as loop:
        for batch in batches:
            params = loop.step(batch)
            seen.append(float(mp.inner_loss(params, mp.hparams, batch)))  # user code
    assert loop.steps == len(batches)
    got = loop.hypergradient(est)
    ref = mp.hypergradient(est)
    close(got.grad, ref.grad)
    close(got.params, ref.params)
    if not getattr(est, "random", False):  # a random window ends before the last step
        # the replay reaches what the user saw: the same steps again (observed equal)
        close(got.params, loop.params, 1e-12)


@pytest.mark.parametrize("setting", [{"dropout": 0.3}, {"bn": "track"}, {"bn": "frozen"}],
                         ids=["dropout", "track", "frozen"])
def test_recorded_loop_other_settings(setting):
    mp, batches = recorded_setup(**setting, steps=4)
    with mp.inner_loop() as loop:
        for batch in batches:
            loop.step(batch)
    for est in (hg.Unrolled(), hg.Truncated(window=2)):
        got, ref = loop.hypergradient(est), mp.hypergradient(est)
        close(got.grad, ref.grad)
        close(got.params, loop.params, 1e-12)


def test_recorded_loop_early_stop_and_outer_data():
    mp, batches = recorded_setup(steps=12)
    with mp.inner_loop() as loop:
        for batch in batches:
            params = loop.step(batch)
            if float(mp.inner_loss(params, mp.hparams, batch)) < 0.35:  # data-dependent
                break
    n = loop.steps
    assert 1 < n < len(batches)
    val = data(12, seed=4)
    ref = wrap(mlp(), sq, sq, wd_hparams(), iter(batches[:n]), val, hg.SGD(lr=0.2), n,
               penalty=layer_wd)
    for est in (hg.Unrolled(), hg.Truncated(window=2), IMPLICIT):
        got = loop.hypergradient(est, outer_data=val)
        close(got.grad, ref.hypergradient(est).grad)
        close(got.params, loop.params, 1e-12)


def test_recorded_loop_misuse():
    mp, batches = recorded_setup(steps=3)
    with mp.inner_loop() as loop:
        with pytest.raises(InnerLoopError, match="no recorded step"):
            loop.hypergradient("unrolled")
        loop.step(batches[0])
    with pytest.raises(InnerLoopError, match="after the"):
        loop.step(batches[1])
    with pytest.raises(InnerLoopError, match="ended"):
        with loop:
            pass
    h = {k: v.clone() for k, v in mp.hparams.items()}
    with mp.inner_loop(h) as loop:
        loop.step(batches[0])
        h["wd0"] += 0.5
        with pytest.raises(InnerLoopError, match=r"\['wd0'\] changed"):
            loop.step(batches[1])
    with pytest.raises(InnerLoopError, match="changed"):
        loop.hypergradient("unrolled")
    with mp.inner_loop() as loop:
        params = loop.step(batches[0])
        params["0.weight"].mul_(2)
        with pytest.raises(InnerLoopError, match="in place"):
            loop.step(batches[1])
    with mp.inner_loop() as loop:  # a failing step is not recorded
        with pytest.raises(BilevelInputError):
            loop.step({"x": batches[0][0]})
        assert loop.steps == 0
