"""Tests for :class:`bilevel.meta.MetaLearner` (float64 unless said): meta-gradients against
finite differences with error bars, against a hand-written per-task loop and against iMAML's
closed form on linear regression; vmap against the loop, chunks, the fallback to the loop;
BatchNorm per task; a sinusoid training run; checkpoint and resume; evaluate(); bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hypergrad as hg
from bilevel.meta import (
    EpisodeSampler,
    MetaLearner,
    SinusoidTasks,
    TaskBatch,
    check_splits,
    digits_d4,
    nearest_centroid,
)
from bilevel.meta.learner import LOG_LR
from hypergrad.errors import BilevelInputError
from hypergrad.finite_difference import central_differences

from problems import DT, fd_check, rel, rounding, with_estimate

FEATURES, WIDTH, WAYS = 6, 8, 3
SUPPORT, QUERY = 5, 7
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "imaml", "reptile")
SECOND_ORDER = ("maml", "anil", "metasgd")


# --------------------------------------------------------------------------------------------
# Models, tasks and the hand-written reference
# --------------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Sequential:
    """A 6-8-3 tanh MLP (smooth, so that central differences see no kink)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(),
                             nn.Linear(WIDTH, WAYS)).to(DT)


def class_tasks(num: int = 4, seed: int = 0, shift: float = 0.0) -> TaskBatch:
    """``num`` random 3-way tasks; task ``i``'s inputs are offset by ``shift · i``."""
    g = torch.Generator().manual_seed(seed)
    offset = shift * torch.arange(num, dtype=DT).view(num, 1, 1)
    return TaskBatch(torch.randn(num, SUPPORT, FEATURES, generator=g, dtype=DT) + offset,
                     torch.randint(0, WAYS, (num, SUPPORT), generator=g),
                     torch.randn(num, QUERY, FEATURES, generator=g, dtype=DT) + offset,
                     torch.randint(0, WAYS, (num, QUERY), generator=g))


def flat(tree: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([tree[k].detach().reshape(-1) for k in keys])


def unflat(x: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = x[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def mask_of(like: dict[str, torch.Tensor], keys: set[str]) -> torch.Tensor:
    """The flat 0/1 mask of the entries of ``keys``."""
    return torch.cat([torch.full((v.numel(),), float(k in keys), dtype=DT)
                      for k, v in like.items()])


def model_forward(model: nn.Module):
    return lambda p, x: functional_call(model, p, (x,))


def reference_meta_loss(forward, h: dict[str, torch.Tensor], tasks: TaskBatch, steps: int,
                        adapted: list[str], lr: float, window: int | None = None,
                        loss=F.cross_entropy) -> tuple[torch.Tensor, list[dict]]:
    """(1/B) Σ_i L_i^query(φ_i) task by task with plain autograd: φ_i ← φ_i − α ⊙ ∇L_i^support
    for ``steps`` steps from θ, differentiating through the inner gradients of the last
    ``window`` steps (all when ``None``; 0 is first order: the inner gradients are
    constants). Meta-SGD's α is exp(h["log_lr.<name>"]) where ``h`` has those entries.
    Returns the meta-loss and each task's adapted parameters."""
    theta = {k: v for k, v in h.items() if not k.startswith(LOG_LR)}
    lrs = {k: h[LOG_LR + k].exp() if LOG_LR + k in h else lr for k in adapted}
    first_graph = 0 if window is None else steps - window
    losses, adapted_params = [], []
    for i in range(tasks.num_tasks):
        phi = dict(theta)
        for t in range(steps):
            inner = loss(forward(phi, tasks.support_x[i]), tasks.support_y[i])
            grads = torch.autograd.grad(inner, [phi[k] for k in adapted],
                                        create_graph=t >= first_graph, retain_graph=True)
            for k, g in zip(adapted, grads, strict=True):
                phi[k] = phi[k] - lrs[k] * g
        losses.append(loss(forward(phi, tasks.query_x[i]), tasks.query_y[i]))
        adapted_params.append(phi)
    return torch.stack(losses).mean(), adapted_params


def reference_grad(forward, hparams: dict[str, torch.Tensor], tasks: TaskBatch, steps: int,
                   adapted: list[str], lr: float, window: int | None = None,
                   ) -> tuple[dict[str, torch.Tensor], float]:
    """The meta-gradient of :func:`reference_meta_loss` by torch.autograd.grad, and the loss."""
    h = {k: v.detach().clone().requires_grad_() for k, v in hparams.items()}
    value, _ = reference_meta_loss(forward, h, tasks, steps, adapted, lr, window)
    grads = torch.autograd.grad(value, list(h.values()), allow_unused=True)
    return ({k: torch.zeros_like(v) if g is None else g
             for (k, v), g in zip(h.items(), grads, strict=True)}, float(value.detach()))


def perturbed(learner: MetaLearner, seed: int = 3) -> dict[str, torch.Tensor]:
    """The learner's meta-parameters with Meta-SGD's log step sizes spread out (±0.3), so
    that a per-element step size that is mixed up or ignored shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.3 * torch.randn(v.shape, generator=g, dtype=DT)
            if k.startswith(LOG_LR) else v.detach().clone()
            for k, v in learner.hparams.items()}


# Two float64 paths to one meta-gradient (the learner's vmap against a per-task loop, chunks
# against the whole batch, the core route against the fast path) round differently. Each
# entry is built by a chain of 4(T + 1) passes through the 6-8-3 MLP (T inner steps and the
# query pass, forward and backward, doubled by the second-order terms), each a sum of at
# most max(S, Q, width) = 8 terms, then a mean over tasks: Higham's bound rounding(ops)
# (tests/problems.py) with ops = 4(T + 1)·8 + B. A rounding error made at one inner step
# is carried through the later ones by ∏‖I − αH_t‖, O(1) for these short runs (T ≤ 3,
# α‖H‖ ≲ 1), so cond = 1. For T = 3 this is 6e-14; what is observed is 1e-16..2e-15 (≥ 30×
# below), and a real error (a missing term, a dropped step, a per-element step size mixed
# up) is ≥ 1e-3 relative here (mutations of the learner tried: 1e-2 to 1).
def path_tol(steps: int, num: int = 4) -> float:
    return rounding(4 * (steps + 1) * max(SUPPORT, QUERY, WIDTH) + num)


# --------------------------------------------------------------------------------------------
# 1. Meta-gradients against central differences of the meta-loss
# --------------------------------------------------------------------------------------------

# meta-parameters that no inner step moves: their whole gradient comes through the query
# loss (and the inner gradients they shape): ANIL's body, Meta-SGD's step sizes
SPECIAL = {"maml": set(), "anil": {"0.weight", "0.bias"},
           "metasgd": {LOG_LR + k for k in ("0.weight", "0.bias", "2.weight", "2.bias")}}


@pytest.mark.parametrize("algorithm", SECOND_ORDER)
def test_meta_gradient_agrees_with_finite_differences(algorithm):
    model, tasks = mlp(), class_tasks()
    learner = MetaLearner(model, algorithm, inner_lr=0.4, inner_steps=3)
    h0 = perturbed(learner)
    keys = list(h0)
    x0 = flat(h0, keys)

    def meta_loss(x: torch.Tensor) -> float:
        return learner.meta_gradient(tasks, unflat(x, h0)).diagnostics.outer_loss

    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(x0.numel(), generator=g, dtype=DT) for _ in range(2)]
    special = mask_of(h0, SPECIAL[algorithm] or {"0.weight"})
    dirs.append(torch.randn(x0.numel(), generator=g, dtype=DT) * special)
    dirs = [d / d.norm() for d in dirs]
    # step 1e-4 on unit directions: truncation ~ s²·h''' (observed 1e-12..4e-10), rounding
    # 3σ/(√2 s) with σ ≈ EPS·|h| ≈ 2e-16 (5e-12): the bars resolve ~1e-8 of the directional
    # derivatives (~1e-2), and a wrong term moves them by far more than that
    fd = central_differences(meta_loss, x0, dirs, 1e-4)
    grad = flat(learner.meta_gradient(tasks, h0).grad, keys)
    along = lambda v: torch.stack([d @ v for d in dirs])  # noqa: E731
    check = fd_check(along(grad), fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-5, check.verdict  # fine enough to see the errors below
    # the check can fail: a gradient without the second-order terms (first-order MAML), or
    # without the special entries' gradient, lies outside the error bars
    fo = MetaLearner(model, algorithm, inner_lr=0.4, inner_steps=3, estimator="truncated",
                     window=0).meta_gradient(tasks, h0).grad
    wrong = with_estimate(check, along(flat(fo, keys)))
    assert not wrong.agrees and wrong.rel_error > 1e-3, wrong.verdict
    dropped = with_estimate(check, along(grad * (1 - special)))
    assert not dropped.agrees, dropped.verdict
    assert float(grad[special.bool()].norm()) > 1e-3  # those entries do get a gradient


# --------------------------------------------------------------------------------------------
# 2. Against a hand-written per-task loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", SECOND_ORDER)
def test_meta_gradient_equals_a_hand_written_loop(algorithm):
    model, tasks, steps, lr = mlp(), class_tasks(), 3, 0.4
    learner = MetaLearner(model, algorithm, inner_lr=lr, inner_steps=steps)
    h = perturbed(learner)
    keys = list(h)
    result = learner.meta_gradient(tasks, h)
    ref, ref_loss = reference_grad(model_forward(model), h, tasks, steps,
                                   learner.net.adapted, lr)
    tol = path_tol(steps)
    assert rel(flat(result.grad, keys), flat(ref, keys)) <= tol
    assert abs(result.diagnostics.outer_loss - ref_loss) <= tol * ref_loss
    if algorithm == "anil":
        assert learner.net.adapted == ["2.weight", "2.bias"]
    if algorithm == "metasgd":  # the learned step sizes, element by element
        lrs = learner.inner_lrs(h)
        assert set(lrs) == set(learner.net.adapted)
        for k, v in lrs.items():
            assert torch.equal(v, h[LOG_LR + k].exp())
    # the other estimators of the same meta-gradient
    for est in ("recompute", hg.Unrolled()):
        other = MetaLearner(model, algorithm, inner_lr=lr, inner_steps=steps, estimator=est)
        assert rel(flat(other.meta_gradient(tasks, h).grad, keys), flat(ref, keys)) <= tol, est


def test_first_order_and_truncated_maml_against_the_reference():
    model, tasks, steps, lr = mlp(), class_tasks(), 3, 0.4
    names = [n for n, _ in model.named_parameters()]
    forward = model_forward(model)

    def grad_of(**kw) -> torch.Tensor:
        learner = MetaLearner(model, inner_lr=lr, inner_steps=steps, **kw)
        return flat(learner.meta_gradient(tasks).grad, names)

    def ref(window: int | None) -> torch.Tensor:
        h = {k: v.detach() for k, v in model.named_parameters()}
        return flat(reference_grad(forward, h, tasks, steps, names, lr, window)[0], names)

    tol = path_tol(steps)
    maml, fomaml = grad_of(), grad_of(algorithm="fomaml")
    assert rel(maml, ref(None)) <= tol
    # first-order MAML: the inner gradients taken as constants
    assert rel(fomaml, ref(0)) <= tol
    assert rel(fomaml, maml) > 1e9 * tol  # the second-order terms matter (observed 0.6)
    # truncated back-propagation: window = T is MAML, 0 is FOMAML, 1 is its own thing
    assert rel(grad_of(estimator="truncated", window=steps), maml) <= tol
    assert rel(grad_of(estimator="truncated", window=0), fomaml) <= tol
    one = grad_of(estimator="truncated", window=1)
    assert rel(one, ref(1)) <= tol
    assert min(rel(one, maml), rel(one, fomaml)) > 1e9 * tol  # (observed 0.4 and 0.2)


def test_zero_inner_steps_is_the_query_gradient_at_theta():
    model, tasks = mlp(), class_tasks()
    names = [n for n, _ in model.named_parameters()]
    result = MetaLearner(model, "maml", inner_steps=0).meta_gradient(tasks)
    h = {k: v.detach() for k, v in model.named_parameters()}
    ref, _ = reference_grad(model_forward(model), h, tasks, 0, names, 0.0)
    assert rel(flat(result.grad, names), flat(ref, names)) <= path_tol(0)


def test_reptile_gradient_is_theta_minus_mean_adapted():
    model, tasks, steps, lr = mlp(), class_tasks(), 3, 0.4
    names = [n for n, _ in model.named_parameters()]
    learner = MetaLearner(model, "reptile", inner_lr=lr, inner_steps=steps)
    result = learner.meta_gradient(tasks)
    theta = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    loss, phis = reference_meta_loss(model_forward(model), theta, tasks, steps, names, lr,
                                     window=0)
    want = {k: theta[k].detach() - torch.stack([p[k].detach() for p in phis]).mean(0)
            for k in names}
    tol = path_tol(steps)
    assert rel(flat(result.grad, names), flat(want, names)) <= tol
    # the query loss after adaptation is reported (reptile does not use it)
    assert abs(result.diagnostics.outer_loss - float(loss.detach())) <= tol * float(loss.detach())
    # and adapt() gives the same φ_i
    adapted = learner.adapt(tasks)
    for k in names:
        assert rel(adapted[k], torch.stack([p[k].detach() for p in phis])) <= tol


# --------------------------------------------------------------------------------------------
# 3. iMAML against the closed form on linear regression
# --------------------------------------------------------------------------------------------


def linear_tasks(num: int = 3, d: int = 4, support: int = 10, query: int = 12,
                 seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num, d, 1, generator=g, dtype=DT)
    xs = torch.randn(num, support, d, generator=g, dtype=DT)
    xq = torch.randn(num, query, d, generator=g, dtype=DT)
    noise = lambda n: 0.1 * torch.randn(num, n, 1, generator=g, dtype=DT)  # noqa: E731
    return TaskBatch(xs, xs @ w + noise(support), xq, xq @ w + noise(query))


def test_imaml_equals_the_closed_form_on_linear_regression():
    d, lam = 4, 2.0
    tasks = linear_tasks(d=d)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(d, 1, bias=False).to(DT)
    theta = model.weight.detach().reshape(d)
    X, y = tasks.support_x, tasks.support_y.squeeze(-1)
    Xq, yq = tasks.query_x, tasks.query_y.squeeze(-1)
    eye = torch.eye(d, dtype=DT)
    # L_i(φ) = mean_j (x_jᵀφ − y_j)²: Hessian H_i = 2XᵀX/n, gradient H_i φ − 2Xᵀy/n
    H = 2 * X.transpose(1, 2) @ X / X.shape[1]
    Hq = 2 * Xq.transpose(1, 2) @ Xq / Xq.shape[1]
    phi = torch.linalg.solve(H + lam * eye, lam * theta + 2 * (X.transpose(1, 2) @ y.unsqueeze(
        -1)).squeeze(-1) / X.shape[1])
    gq = (Hq @ phi.unsqueeze(-1)).squeeze(-1) - 2 * (Xq.transpose(1, 2) @ yq.unsqueeze(
        -1)).squeeze(-1) / Xq.shape[1]

    # gradient descent on L_i + λ/2‖φ − θ‖² at α = 1/(L + λ) contracts the error by
    # ρ = 1 − (μ + λ)/(L + λ) per step (μ, L: extreme eigenvalues of H_i over the tasks)
    eig = torch.linalg.eigvalsh(H)
    mu, big = float(eig.min()), float(eig.max())
    lr, rho = 1.0 / (big + lam), 1.0 - (mu + lam) / (big + lam)
    steps = math.ceil(math.log(1e-15) / math.log(rho))
    # a-priori bound on ‖φ_T − φ*‖ per task, ρ^T ‖θ − φ*‖, plus the rounding of the
    # iteration (each step's error, ~d·n·EPS·‖φ‖, is damped by ρ: Σ ρ^t = 1/(1 − ρ))
    phi_err = rho ** steps * (theta - phi).norm(dim=1) + \
        rounding(d * X.shape[1]) / (1 - rho) * phi.norm(dim=1)

    for damping in (0.0, 1.0):
        learner = MetaLearner(model, "imaml", inner_lr=lr, inner_steps=steps, lam=lam,
                              cg_steps=d, cg_damping=damping)
        A = (1 + damping / lam) * eye + H / lam
        want = torch.linalg.solve(A, gq).mean(0)
        result = learner.meta_gradient(tasks)
        got = result.grad["weight"].reshape(d)
        # ‖A⁻¹‖ ≤ 1 (A ⪰ I) and ∇L^query is linear in φ with slope Hq: the inner error
        # moves each task's meta-gradient by at most ‖Hq_i‖·‖Δφ_i‖; CG in d steps is exact
        # up to rounding of κ(A)·(its d products)
        cond = float(torch.linalg.cond(A).max())
        tol = float((torch.linalg.matrix_norm(Hq, 2) * phi_err).mean()) + \
            rounding(4 * d * d, cond) * float(want.norm())
        assert float((got - want).norm()) <= tol, (float((got - want).norm()), tol)
        assert tol < 1e-10 * float(want.norm())  # a check that could fail
        # the proximal inner solution is φ* (adapt runs the same inner loop)
        adapted = learner.adapt(tasks)["weight"].reshape(-1, d)
        assert bool(((adapted - phi).norm(dim=1) <= phi_err).all())
        assert result.diagnostics.solve_residual < 1e-10  # d CG steps: converged
    # the check sees a wrong solve: one CG step, or the damped system for the undamped one
    one = MetaLearner(model, "imaml", inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=1,
                      cg_damping=0.0).meta_gradient(tasks).grad["weight"].reshape(d)
    undamped = torch.linalg.solve(eye + H / lam, gq).mean(0)
    assert rel(one, undamped) > 1e-4
    assert rel(want, undamped) > 1e-2  # (want: the damped answer from the loop above)


# --------------------------------------------------------------------------------------------
# 4. vmap against the loop; chunks; the fallback to the loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_vmap_loop_and_chunks_give_the_same_meta_gradient(algorithm):
    model, tasks, steps = mlp(), class_tasks(num=5), 2
    kw = dict(inner_lr=0.4, inner_steps=steps)
    grads = {}
    for batching, chunk in (("vmap", None), ("loop", None), ("vmap", 2), ("loop", 2)):
        learner = MetaLearner(model, algorithm, batching=batching, task_chunk=chunk, **kw)
        h = perturbed(learner)
        result = learner.meta_gradient(tasks, h)
        assert learner.batching_used == batching
        grads[batching, chunk] = (flat(result.grad, list(h)), result.diagnostics.outer_loss)
    ref, ref_loss = grads["vmap", None]
    # iMAML adds the conjugate-gradient solve: 5 more products, each error amplified by
    # κ(I + H/λ) ≤ 1 + ‖H‖/λ, a few here (λ = 2): a factor 10 on the bound
    tol = path_tol(steps, 5) * (10 if algorithm == "imaml" else 1)
    for key, (g, loss) in grads.items():
        assert rel(g, ref) <= tol, key
        assert abs(loss - ref_loss) <= tol * ref_loss, key


class ItemNet(nn.Module):
    """A model vmap cannot run: its forward reads an activation with ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(FEATURES, WIDTH)
        self.out = nn.Linear(WIDTH, WAYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if h.abs().max().item() > 2.0:  # never true (tanh), but data-dependent
            h = h * 0
        return self.out(h)


def test_auto_batching_falls_back_to_the_loop_with_a_warning():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ItemNet().to(DT)
    tasks = class_tasks()
    auto = MetaLearner(model, "maml", inner_lr=0.4, inner_steps=2)
    assert auto.batching_used is None
    with pytest.warns(RuntimeWarning, match="vmap"):
        got = auto.meta_gradient(tasks)
    assert auto.batching_used == "loop" and "vmap" in auto.batching_reason
    loop = MetaLearner(model, "maml", inner_lr=0.4, inner_steps=2, batching="loop")
    want = loop.meta_gradient(tasks)
    for k in want.grad:
        assert torch.equal(got.grad[k], want.grad[k]), k
    with warnings.catch_warnings():  # decided once: no second warning
        warnings.simplefilter("error")
        auto.meta_gradient(tasks)
    # vmap refuses it outright
    with pytest.raises(RuntimeError, match="item"):
        MetaLearner(model, "maml", batching="vmap").meta_gradient(tasks)
    # a model vmap runs is vmapped under "auto", silently
    plain = MetaLearner(mlp(), "maml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.meta_gradient(tasks)
    assert plain.batching_used == "vmap"


def test_predict_first_falls_back_to_the_loop_too():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ItemNet().to(DT)
    tasks = class_tasks()
    loop = MetaLearner(model, "maml", inner_lr=0.4, batching="loop")
    adapted = loop.adapt(tasks)
    auto = MetaLearner(model, "maml", inner_lr=0.4)
    with pytest.warns(RuntimeWarning, match="vmap"):
        got = auto.predict(tasks.query_x, adapted)
    assert torch.equal(got, loop.predict(tasks.query_x, adapted))


# --------------------------------------------------------------------------------------------
# 5. BatchNorm: per-task statistics, the user's module never written
# --------------------------------------------------------------------------------------------


def bn_model() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh(),
                              nn.Linear(WIDTH, WAYS)).to(DT)
        bn = model[1]
        with torch.no_grad():  # values no fresh layer has, so that a write shows
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    return model


def bn_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm model with the statistics of the batch ``x`` (one task's set)."""
    h = F.linear(x, p["0.weight"], p["0.bias"])
    h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True, eps=1e-5)
    return F.linear(torch.tanh(h), p["3.weight"], p["3.bias"])


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_uses_each_tasks_statistics_and_writes_nothing(training):
    model = bn_model()
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = class_tasks(shift=1.5)  # tasks with different means: the statistics differ
    steps, lr = 2, 0.4
    learner = MetaLearner(model, "maml", inner_lr=lr, inner_steps=steps)
    names = [n for n, _ in model.named_parameters()]
    result = learner.meta_gradient(tasks)
    h = {k: v.detach() for k, v in model.named_parameters()}
    ref, ref_loss = reference_grad(bn_forward, h, tasks, steps, names, lr)
    tol = path_tol(steps)
    assert rel(flat(result.grad, names), flat(ref, names)) <= tol
    assert abs(result.diagnostics.outer_loss - ref_loss) <= tol * ref_loss
    # the loop gives the same numbers (vmap's statistics are per task, as the loop's)
    loop = MetaLearner(model, "maml", inner_lr=lr, inner_steps=steps, batching="loop")
    assert rel(flat(loop.meta_gradient(tasks).grad, names), flat(ref, names)) <= tol
    # predictions: per task, not over all tasks' examples at once
    out = learner.predict(tasks.query_x, learner.adapt(tasks, steps=0))
    per_task = torch.stack([bn_forward(h, x) for x in tasks.query_x])
    pooled = bn_forward(h, tasks.query_x.reshape(-1, FEATURES)).view_as(per_task)
    assert rel(out, per_task) <= tol
    assert rel(out, pooled) > 0.1
    ev = learner.evaluate(SinglesSampler(tasks), num_tasks=4, steps=(0,), progress=False)
    want = (per_task.argmax(-1) == tasks.query_y).double().mean(1).mean()
    assert ev.after[0][0] == pytest.approx(float(want), abs=1e-15)
    # the user's module: parameters and buffers bit-identical, its mode untouched
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert model.training == training and model[1].training == training
    assert model[1].track_running_stats


class SinglesSampler:
    """Serves one fixed batch of tasks one task at a time (``sample(n, step)`` gives task
    ``step``), counting the calls."""

    def __init__(self, tasks: TaskBatch) -> None:
        self.tasks, self.calls = tasks, 0

    def sample(self, num_tasks: int, step: int = 0) -> TaskBatch:
        self.calls += 1
        return self.tasks.select(slice(step * num_tasks, (step + 1) * num_tasks))


def dropout_pair() -> tuple[nn.Sequential, nn.Sequential]:
    """The 6-8-3 MLP with a dropout layer, and the same weights without it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        drop = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), nn.Dropout(0.5),
                             nn.Linear(WIDTH, WAYS)).to(DT)
    plain = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), nn.Identity(),
                          nn.Linear(WIDTH, WAYS)).to(DT)
    plain.load_state_dict(drop.state_dict())
    return drop, plain


def test_evaluate_runs_with_dropout_off():
    tasks = class_tasks(num=8, seed=5)
    results = []
    for model in dropout_pair():
        learner = MetaLearner(model, "maml", inner_lr=0.4, inner_steps=2)
        results.append(learner.evaluate(SinglesSampler(tasks), num_tasks=8, batch=4,
                                        steps=(0, 1, 2), progress=False))
    assert results[0].after == results[1].after
    # (meta-training keeps dropout on: the meta-gradient is random)
    learner = MetaLearner(dropout_pair()[0], "maml", inner_lr=0.4, inner_steps=2)
    names = [n for n, _ in learner.net.module.named_parameters()]
    first, second = (flat(learner.meta_gradient(tasks).grad, names) for _ in range(2))
    assert not torch.equal(first, second)


def test_predict_runs_with_dropout_off():
    tasks = class_tasks(seed=5)
    drop, plain = (MetaLearner(m, "maml", inner_lr=0.4, inner_steps=1) for m in dropout_pair())
    adapted = plain.adapt(tasks)
    want = plain.predict(tasks.query_x, adapted)
    assert torch.equal(drop.predict(tasks.query_x, adapted), want)


# --------------------------------------------------------------------------------------------
# 6. A sinusoid training run
# --------------------------------------------------------------------------------------------


def sinusoid_mlp(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                             nn.Linear(40, 1))


def test_sinusoid_meta_training_learns_to_adapt():
    # float32, MAML's network (1-40-40-1 ReLU), one inner step. Measured (seeds 0, 1, 3 of
    # the initialisation; about 3 s for 600 outer steps): untrained, one step lowers the
    # test MSE by a factor 1.07 (4.19 -> 3.93); after 600 steps by 1.50-1.64 (e.g.
    # 3.00 -> 1.83); after 1000 steps by 1.75-2.0. A factor 2 would need ~1000 steps at
    # Adam 1e-3 (6 s here), so the test asks 600 steps for a factor 1.3: far above what an
    # untrained model's step gives and below the worst seed measured, with the 95% CIs of
    # the two means apart.
    model = sinusoid_mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MetaLearner(model, "maml", inner_lr=0.02, inner_steps=1)
    test = SinusoidTasks(shots=10, seed=1)
    before = learner.evaluate(test, num_tasks=200, steps=(0, 1), progress=False)
    loop = learner.outer_loop(SinusoidTasks(shots=10), meta_batch=10, progress=False,
                              optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    history = loop.run(600)
    ev = learner.evaluate(test, num_tasks=200, steps=(0, 1), progress=False)
    assert ev.metric == "mse" and ev.num_tasks == 200 and ev.nearest_centroid is None
    (mse0, ci0), (mse1, ci1) = ev.after[0], ev.after[1]
    assert before.after[0][0] / before.after[1][0] < 1.2
    assert mse0 / mse1 > 1.3, ev.table()
    assert mse1 + ci1 < mse0 - ci0, ev.table()
    assert mse1 < 0.6 * before.after[1][0]
    # the meta-loss fell (means of the first and last 100 steps)
    losses = [r["outer_loss"] for r in history]
    assert np.mean(losses[-100:]) < 0.7 * np.mean(losses[:100])
    # the user's module is never written: training moved the learner's copy only
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert not torch.equal(learner.hparams["0.weight"], start["0.weight"])


# --------------------------------------------------------------------------------------------
# 7. Checkpoint and resume
# --------------------------------------------------------------------------------------------


def small_regressor() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_checkpoint_and_resume_are_bit_identical(tmp_path, algorithm):
    def make_loop(**kw):
        learner = MetaLearner(small_regressor(), algorithm, inner_lr=0.05, inner_steps=2)
        loop = learner.outer_loop(SinusoidTasks(shots=5, dtype=DT), meta_batch=3,
                                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                                  progress=False, **kw)
        return learner, loop

    straight, loop = make_loop()
    loop.run(6)
    run = tmp_path / "run"
    first, loop = make_loop(run_dir=run, checkpoint_every=2)
    loop.run(4)
    loop.close()
    again, loop = make_loop(run_dir=run, checkpoint_every=2)
    assert loop.resume() == 4
    loop.run(6)
    loop.close()
    assert set(again.hparams) == set(straight.hparams)
    for k, v in straight.hparams.items():
        assert torch.equal(again.hparams[k], v), k
    # the comparison means something: the six steps moved θ, and step 4 is not step 6
    start = dict(small_regressor().named_parameters())
    assert all(not torch.equal(straight.hparams[k], start[k]) for k in start)
    assert any(not torch.equal(first.hparams[k], straight.hparams[k]) for k in start)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # every step logged once
    # the learner's model holds the trained initialisation
    trained = again.model()
    for k, p in trained.named_parameters():
        assert torch.equal(p, straight.hparams[k])


# --------------------------------------------------------------------------------------------
# 8. evaluate()
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    x, y = digits_d4()
    return x.flatten(1).to(DT), y


def ci95(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), 1.96 * float(values.std(ddof=1)) / math.sqrt(values.size)


def test_evaluate_600_tasks_against_hand_computed_values(digits):
    x, y = digits
    sampler = EpisodeSampler(x, y, ways=5, shots=1, queries=5, classes=list(range(40)), seed=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(64, 5).to(DT)
    lr = 0.5
    learner = MetaLearner(model, "maml", inner_lr=lr, inner_steps=1)
    ev = learner.evaluate(sampler, progress=False)  # 600 tasks, steps (0, 1), batches of 100
    assert ev.metric == "accuracy" and ev.num_tasks == 600 and sorted(ev.after) == [0, 1]
    # by hand: the batches evaluate() draws, the unadapted and once-adapted accuracies
    names = ["weight", "bias"]
    forward = model_forward(model)
    h = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    acc0, acc1, centroid = [], [], []
    for i in range(6):
        tasks = sampler.sample(100, i)
        for t in range(100):
            task = tasks.select(t)
            _, (phi,) = reference_meta_loss(forward, h, task, 1, names, lr)
            for acc, p in ((acc0, h), (acc1, phi)):
                pred = forward({k: v.detach() for k, v in p.items()}, task.query_x[0])
                acc.append(float((pred.argmax(-1) == task.query_y[0]).double().mean()))
        centroid.append(nearest_centroid(tasks).numpy())
    for steps, values in ((0, acc0), (1, acc1)):
        mean, ci = ci95(np.array(values))
        assert ev.after[steps][0] == pytest.approx(mean, rel=rounding(600))
        assert ev.after[steps][1] == pytest.approx(ci, rel=rounding(600))
    mean, ci = ci95(np.concatenate(centroid))
    assert ev.nearest_centroid == pytest.approx((mean, ci), rel=rounding(600))
    assert 0.2 < mean < 1  # above chance: the baseline is the real one
    # steps=(0,) is the unadapted model alone
    only = learner.evaluate(sampler, steps=(0,), progress=False)
    assert sorted(only.after) == [0] and only.after[0] == ev.after[0]
    assert "centroid" in ev.table() and ev.to_dict()["num_tasks"] == 600


def test_evaluate_regression_has_no_centroid_and_counts_a_partial_batch():
    model = small_regressor()
    learner = MetaLearner(model, "maml", inner_lr=0.05, inner_steps=1)
    sampler = SinusoidTasks(shots=5, dtype=DT, seed=4)
    ev = learner.evaluate(sampler, num_tasks=50, batch=20, steps=(0,), progress=False)
    assert ev.metric == "mse" and ev.num_tasks == 50 and ev.nearest_centroid is None
    # the test set is sample(50, 0) whatever the batch (adapted 20, 20 and 10 at a time)
    tasks = sampler.sample(50, 0)
    with torch.no_grad():
        pred = torch.stack([model(x) for x in tasks.query_x])
    mean, ci = ci95(((pred - tasks.query_y) ** 2).mean((1, 2)).numpy())
    assert ev.after[0] == pytest.approx((mean, ci), rel=rounding(50))
    other = learner.evaluate(sampler, num_tasks=50, batch=7, steps=(0,), progress=False)
    assert other.after[0] == pytest.approx(ev.after[0], rel=rounding(50))


# --------------------------------------------------------------------------------------------
# 9. Bad input: named errors before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"algorithm": "protonet"}, "algorithm must be one of"),
    ({"inner_lr": 0}, "inner_lr must be a finite number > 0, got 0"),
    ({"inner_lr": -0.1}, "inner_lr must be a finite number > 0"),
    ({"inner_lr": float("nan")}, "inner_lr must be a finite number > 0, got nan"),
    ({"inner_steps": -1}, "inner_steps must be an int >= 0, got -1"),
    ({"estimator": "implicit"}, "estimator must be 'unrolled', 'truncated', 'recompute'"),
    ({"algorithm": "fomaml", "estimator": "truncated", "window": 1},
     "estimator='truncated' applies to maml, anil and metasgd"),
    ({"algorithm": "fomaml", "estimator": "recompute"}, "applies to maml, anil and metasgd"),
    ({"algorithm": "imaml", "estimator": hg.Unrolled()}, "applies to maml, anil and metasgd"),
    ({"window": 2}, "window applies to estimator='truncated' only"),
    ({"estimator": "truncated"}, "estimator='truncated' needs window"),
    ({"head": "2"}, "head applies to algorithm='anil' only"),
    ({"algorithm": "anil", "head": "fc"}, "head='fc' matches no parameter"),
    ({"algorithm": "anil", "head": ["2.weight", "nope"]}, r"head names \['nope'\]"),
    ({"algorithm": "anil", "head": ["0.weight", "0.bias", "2.weight", "2.bias"]},
     "head covers every parameter"),
    ({"batching": "gpu"}, "batching must be one of"),
    ({"task_chunk": 0}, "task_chunk must be an int >= 1, got 0"),
])
def test_bad_learner_arguments_are_named(kw, match):
    with pytest.raises(BilevelInputError, match=match):
        MetaLearner(mlp(), **kw)


def test_bad_tasks_and_samplers_are_named():
    x = torch.randn(60, 4, dtype=DT)
    y = torch.arange(60) % 6
    learner = MetaLearner(mlp(), "maml")
    with pytest.raises(BilevelInputError, match="tasks must be a bilevel.meta.TaskBatch"):
        learner.meta_gradient({"support_x": x})
    g = torch.randn
    with pytest.raises(BilevelInputError, match="support and query features differ"):
        TaskBatch(g(2, 3, 4), g(2, 3, 1), g(2, 5, 5), g(2, 5, 1))
    with pytest.raises(BilevelInputError, match="the task axis does not match.*query_y"):
        TaskBatch(g(2, 3, 4), g(2, 3, 1), g(2, 5, 4), g(3, 5, 1))
    with pytest.raises(BilevelInputError, match="ways=7 but only 6 classes"):
        EpisodeSampler(x, y, ways=7, shots=1, queries=1)
    with pytest.raises(BilevelInputError, match="ways=4 but only 3 classes"):
        EpisodeSampler(x, y, ways=4, shots=1, queries=1, classes=[0, 1, 2])
    with pytest.raises(BilevelInputError, match=r"splits 0 and 1 overlap: classes \[2\]"):
        check_splits([0, 1, 2], [2, 3])
    with pytest.raises(BilevelInputError, match=r"shots \(K\) must be >= 1, got 0"):
        EpisodeSampler(x, y, ways=2, shots=0)
    with pytest.raises(BilevelInputError, match=r"SinusoidTasks: shots \(K\) must be >= 1"):
        SinusoidTasks(shots=0)


def test_bad_evaluate_and_outer_loop_arguments_do_no_work():
    learner = MetaLearner(mlp(), "maml")
    sampler = SinglesSampler(class_tasks())
    with pytest.raises(BilevelInputError, match="num_tasks must be an int >= 1, got 0"):
        learner.evaluate(sampler, num_tasks=0)
    with pytest.raises(BilevelInputError, match="steps must be an int >= 0, got -1"):
        learner.evaluate(sampler, steps=(0, -1))
    with pytest.raises(BilevelInputError, match="meta_batch must be an int >= 1, got 0"):
        learner.outer_loop(sampler, meta_batch=0)
    with pytest.raises(BilevelInputError, match="eval_every > 0 needs validation"):
        learner.outer_loop(sampler, eval_every=5)
    with pytest.raises(BilevelInputError, match="sampler must have sample"):
        learner.outer_loop([1, 2, 3])
    assert sampler.calls == 0 and learner.loop is None


@pytest.mark.parametrize("algorithm, settings", [
    ("maml", {}), ("fomaml", {}), ("maml", {"estimator": "truncated", "window": 1}),
])
def test_factored_path_equals_the_generic_one(algorithm, settings):
    """An MLP takes the factored inner loop by default; it equals the generic vmap path."""
    tasks = class_tasks(seed=11)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(tasks.support_x.shape[-1], 8), nn.Tanh(),
                              nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    fast = MetaLearner(model, algorithm, inner_lr=0.3, inner_steps=3, **settings)
    slow = MetaLearner(model, algorithm, inner_lr=0.3, inner_steps=3, factored=False, **settings)
    assert fast._factored is not None and slow._factored is None
    a, b = fast.meta_gradient(tasks), slow.meta_gradient(tasks)
    names = list(a.grad)
    ga, gb = flat(a.grad, names), flat(b.grad, names)
    assert (ga - gb).abs().max() <= 1e-12 * gb.abs().max()
    assert a.diagnostics.outer_loss == pytest.approx(b.diagnostics.outer_loss, rel=1e-12)


def test_factored_true_says_why_not():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with pytest.raises(BilevelInputError, match="factored=True but .*BatchNorm1d"):
        MetaLearner(model, "maml", factored=True)
    with pytest.raises(BilevelInputError, match="factored=True but .*metasgd"):
        MetaLearner(nn.Linear(4, 2).to(DT), "metasgd", factored=True)


# --------------------------------------------------------------------------------------------
# Misuse found by review: each was mishandled once
# --------------------------------------------------------------------------------------------


def test_the_vmap_probe_leaves_the_random_state_alone():
    drop, _ = dropout_pair()
    learner = MetaLearner(drop, "maml", inner_lr=0.3, inner_steps=1)  # batching="auto"
    before = torch.get_rng_state()
    assert learner._choose_batching(class_tasks()) and learner.batching_used == "vmap"
    # a resumed run must draw what a straight one draws
    assert torch.equal(torch.get_rng_state(), before)


def test_inputs_the_model_cannot_take_are_named_not_blamed_on_vmap():
    learner = MetaLearner(mlp(), "maml", inner_lr=0.3, inner_steps=1)
    wide = class_tasks()
    wide = TaskBatch(torch.cat([wide.support_x, wide.support_x], -1), wide.support_y,
                     torch.cat([wide.query_x, wide.query_x], -1), wide.query_y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BilevelInputError, match=r"cannot run on a task's support_x of "
                                                    r"shape \(5, 12\)"):
            learner.meta_gradient(wide)
        with pytest.raises(BilevelInputError, match="with or without vmap"):
            learner.predict(wide.query_x, learner.adapt(class_tasks()))
    assert learner.batching_used == "vmap"  # decided on good inputs, never on bad ones


def test_outputs_unfit_for_the_labels_or_targets_are_refused():
    five_way = TaskBatch(torch.randn(2, 5, FEATURES, dtype=DT), torch.arange(5).repeat(2, 1),
                         torch.randn(2, 5, FEATURES, dtype=DT), torch.arange(5).repeat(2, 1))
    with pytest.raises(BilevelInputError, match="5 classes"):
        MetaLearner(mlp(), "maml").meta_gradient(five_way)  # 3 logits for 5 classes
    wide = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    sines = SinusoidTasks(shots=5, dtype=DT).sample(2)
    with pytest.raises(BilevelInputError, match=r"outputs of shape \(5, 5\).*broadcast"):
        MetaLearner(wide, "maml").meta_gradient(sines)
    per_example = MetaLearner(mlp(), "maml", factored=False,
                              loss=lambda p, y: F.cross_entropy(p, y, reduction="none"))
    with pytest.raises(BilevelInputError, match="a task's mean loss"):
        per_example.meta_gradient(class_tasks())


def test_integer_inputs_are_cast_and_nan_inputs_refused():
    tasks = class_tasks()
    ints = TaskBatch((tasks.support_x * 4).round().to(torch.int64), tasks.support_y,
                     (tasks.query_x * 4).round().to(torch.int64), tasks.query_y)
    learner = MetaLearner(mlp(), "maml", inner_lr=0.3, inner_steps=1)
    cast = TaskBatch(ints.support_x.to(DT), ints.support_y, ints.query_x.to(DT), ints.query_y)
    assert torch.equal(flat(learner.meta_gradient(ints).grad, learner.net.names),
                       flat(learner.meta_gradient(cast).grad, learner.net.names))
    bad = tasks.query_x.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(BilevelInputError, match="query_x holds NaN"):
        learner.meta_gradient(TaskBatch(tasks.support_x, tasks.support_y, bad, tasks.query_y))


def test_frozen_parameters_stay_constants_and_tied_ones_leave_the_factored_path():
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    learner = MetaLearner(model, "maml", inner_lr=0.3, inner_steps=2)
    assert "0.weight" not in learner.hparams and learner._factored is None
    assert "frozen" in learner.factored_reason
    adapted = learner.adapt(class_tasks())
    assert torch.equal(learner.model().state_dict()["0.weight"], frozen)
    assert adapted["0.bias"].shape[0] == 4 and "0.weight" not in adapted
    tied = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)).to(DT)
    tied[2].weight = tied[0].weight
    shared = MetaLearner(tied, "maml", inner_lr=0.3, inner_steps=1)
    assert shared._factored is None and "shares parameters" in shared.factored_reason
    x = torch.randn(2, 5, WIDTH, dtype=DT)
    y = torch.randint(0, WIDTH, (2, 5))
    assert shared.meta_gradient(TaskBatch(x, y, x, y)).diagnostics.outer_loss > 0


class Counter(nn.Module):
    """A model whose forward writes a buffer in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, WAYS)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


def test_buffers_written_by_the_forward_stay_private():
    model = Counter().to(DT)
    MetaLearner(model, "maml", inner_lr=0.3, inner_steps=2, batching="loop").meta_gradient(
        class_tasks())
    assert float(model.calls) == 0


def test_model_copy_normalises_with_batch_statistics():
    model = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh(),
                          nn.Linear(WIDTH, WAYS)).to(DT)
    learner = MetaLearner(model, "maml", inner_lr=0.3, inner_steps=1)
    tasks = class_tasks()
    copy_ = learner.model().eval()
    predicted = learner.predict(tasks.query_x, learner.adapt(tasks, steps=0))
    with torch.no_grad():
        assert torch.allclose(copy_(tasks.query_x[0]), predicted[0], rtol=0, atol=1e-12)
    assert model[1].track_running_stats  # the user's module is as it was


def test_evaluate_and_outer_loop_arguments_are_checked_before_work():
    learner = MetaLearner(mlp(), "maml", inner_lr=0.3, inner_steps=1)
    sampler = EpisodeSampler(torch.randn(60, FEATURES, dtype=DT), torch.arange(6).repeat(10),
                             ways=3, shots=2, queries=2)
    with pytest.raises(BilevelInputError, match="steps must be a collection"):
        learner.evaluate(sampler, 10, steps=3)
    with pytest.raises(BilevelInputError, match="sampler must have sample"):
        learner.evaluate(None, 10)
    with pytest.raises(BilevelInputError, match="first_step"):
        learner.evaluate(sampler, 10, first_step=-1)
    partial = {k: v for k, v in learner.hparams.items() if k != "0.bias"}
    with pytest.raises(BilevelInputError, match=r"missing \['0.bias'\]"):
        learner.evaluate(sampler, 10, hparams=partial)
    with pytest.raises(BilevelInputError, match="validation must be a task sampler"):
        learner.outer_loop(sampler, 2, validation="S", eval_every=1)
    with pytest.raises(BilevelInputError, match="validation tasks must be of the training"):
        learner.outer_loop(sampler, 2, validation=SinusoidTasks(shots=2, dtype=DT),
                           eval_every=1)
    with pytest.warns(RuntimeWarning, match="validation is the training sampler"):
        learner.outer_loop(sampler, 2, validation=sampler, eval_every=1)


def test_anil_default_head_is_the_last_module_with_parameters_of_its_own():
    from bilevel.nets import MLP

    net = MLP((1, 2, 3), WAYS).to(DT)
    learner = MetaLearner(net, "anil")
    last = [k for k, m in net.named_modules() if list(m.parameters(recurse=False))][-1]
    assert learner.net.adapted == [f"{last}.weight", f"{last}.bias"]


def test_evaluate_counts_diverged_tasks_and_averages_the_others():
    sampler = SinusoidTasks(shots=5, dtype=DT, seed=3)
    calm = MetaLearner(small_regressor(), "maml", inner_lr=0.01, inner_steps=1).evaluate(
        sampler, 10, steps=(0, 1), progress=False)
    assert calm.diverged == {} and calm.per_task[1].shape == (10,)
    wild = MetaLearner(small_regressor(), "maml", inner_lr=1e3, inner_steps=1)
    with pytest.warns(RuntimeWarning, match="diverged on 10 of 10 tasks after 200 steps"):
        ev = wild.evaluate(sampler, 10, steps=(0, 200), progress=False)
    assert ev.diverged == {200: 10} and math.isnan(ev.after[200][0])
    assert ev.after[0] == calm.after[0] and "10 diverged tasks left out" in ev.table()


def test_imaml_says_when_its_solve_is_useless_or_its_inner_steps_diverge():
    tasks = class_tasks()
    with pytest.raises(hg.DivergenceError, match="lower inner_lr"):
        MetaLearner(mlp(), "imaml", inner_lr=1e200, inner_steps=3).meta_gradient(tasks)
    result = MetaLearner(mlp(), "imaml", inner_lr=0.3, inner_steps=3).meta_gradient(tasks)
    assert result.diagnostics.solve_residual < 1 and result.diagnostics.solve_converged is None
