"""The user layer's parts: one hyperparameter validator and ``.grad`` writer, batches,
and BatchNorm statistics returned by the step (``buffers="track"``) rather than captured
into the problem: hand-written references, ``vmap`` over tasks, threads and nesting."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import bilevel
import bilevel.module as module_py
import hypergrad as hg
from bilevel.batches import At, Many, inner_source, is_single_batch, outer_source
from bilevel.buffers import (
    TrackedLayer,
    batchnorm_train,
    recording_batch_stats,
    update_running_stats,
)
from bilevel.hparams import HyperparameterTypeError, assign_grads, validate_hparams
from hypergrad.errors import BilevelInputError, HyperparameterError

DT = torch.float64
# Two float64 paths through the same few hundred operations (a 3-6-1 MLP, ≤ 5 steps)
# in another order or another kernel (vmap's batched matmuls, the hand-written
# reference's formulas): observed ≤ 3e-15 relative; 1e-12 keeps a margin > 300 while a
# missing term (the path through the running statistics: 2 % and 19 % of the two
# hypergradient entries here) fails by ten orders of magnitude.
TOL = 1e-12


def batches_of(n: int, size: int = 8, seed: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, generator=g, dtype=DT)
        out.append((x, torch.sin(x.sum(1, keepdim=True))))
    return out


def mlp(bn: bool, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6)] + ([nn.BatchNorm1d(6, momentum=momentum)] if bn else [])
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(6, 1)).to(DT)
    if bn:  # non-trivial running statistics
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(2)
    return model


def inner(out, batch, h):
    return ((out * h["scale"] - batch[1]) ** 2).mean()


def sq(out, batch, h):
    return ((out - batch[1]) ** 2).mean()


def decay(p, h):
    return h["wd"].exp() * sum((w ** 2).sum() for w in p.values())


def hparams() -> dict:
    return {"wd": torch.tensor(-2.0, dtype=DT), "scale": torch.tensor(1.3, dtype=DT)}


def close(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=tol), (k, a[k], b[k])


# --- hyperparameters ------------------------------------------------------------------------


class Images(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.images = nn.Parameter(torch.zeros(2, 3, dtype=DT))
        self.register_buffer("count", torch.zeros(()))


def test_validate_hparams_accepts_dicts_and_modules():
    h = hparams()
    got = validate_hparams(h)
    assert got == h and got is not h and all(got[k] is h[k] for k in h)
    mod = Images()
    assert validate_hparams(mod) == {"images": mod.images}
    assert module_py.hparams_dict(h) == got  # the old name stays


@pytest.mark.parametrize("bad, error, match", [
    ([torch.zeros(1)], HyperparameterTypeError, r"hparams must be a dict.*got list"),
    ({}, HyperparameterError, "hparams is empty"),
    (nn.Module(), HyperparameterError, "module Module has no parameters"),
    ({1: torch.zeros(())}, HyperparameterTypeError, "keys must be strings, got 1"),
    ({"lam": [1.0]}, HyperparameterError, r"hparams\['lam'\] must be a floating-point "
                                          r"tensor, got list"),
    ({"lam": torch.zeros(2, dtype=torch.long)}, HyperparameterError,
     r"hparams\['lam'\].*dtype torch.int64"),
], ids=["list", "empty", "module-without-parameters", "key", "value", "dtype"])
def test_validate_hparams_names_what_is_wrong(bad, error, match):
    with pytest.raises(error, match=match):
        validate_hparams(bad)
    # the same check, and the same error, in every layer that takes hyperparameters
    with pytest.raises(error, match=match):
        bilevel.wrap(mlp(False), sq, sq, bad, batches_of(1)[0], batches_of(1)[0], steps=1)


def test_validate_hparams_error_types_stay_compatible():
    """wrap raised TypeError for a non-dict, OuterLoop HyperparameterError: both hold."""
    with pytest.raises(TypeError):
        validate_hparams([torch.zeros(1)])
    with pytest.raises(HyperparameterError):
        validate_hparams([torch.zeros(1)])
    with pytest.raises(BilevelInputError, match=r"spec\['x'\]"):
        validate_hparams({"x": 1.0}, name="spec")


def test_assign_grads_writes_detached_copies_in_the_target_dtype():
    h = {"a": torch.zeros(2, dtype=torch.float32, requires_grad=True),
         "b": torch.zeros((), dtype=DT, requires_grad=True)}
    h["a"].grad = torch.ones(2)
    g = {"a": torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True) * 1}
    assign_grads(h, g)
    assert h["a"].grad.dtype == torch.float32 and torch.equal(h["a"].grad,
                                                              torch.tensor([1.0, 2.0]))
    assert not h["a"].grad.requires_grad and h["b"].grad is None
    mod = Images()
    assign_grads(mod, {"images": torch.ones(2, 3, dtype=DT)})
    assert torch.equal(mod.images.grad, torch.ones(2, 3, dtype=DT))
    g2 = torch.full((2, 3), 2.0, dtype=DT)
    assign_grads(mod, {"images": g2})
    assert mod.images.grad is not g2 and float(mod.images.grad.sum()) == 12.0


def test_assign_grads_checks_everything_before_writing():
    h = {"a": torch.zeros(2, requires_grad=True), "b": torch.zeros(3, requires_grad=True)}
    with pytest.raises(HyperparameterError, match=r"no hyperparameter named 'c'; have"):
        assign_grads(h, {"a": torch.ones(2), "c": torch.ones(1)})
    with pytest.raises(HyperparameterError,
                       match=r"gradient of hparams\['b'\] has shape \(2,\), expected \(3,\)"):
        assign_grads(h, {"a": torch.ones(2), "b": torch.ones(2)})
    with pytest.raises(HyperparameterError, match=r"no gradient for hparams\['b'\]"):
        assign_grads(h, {"a": torch.ones(2)}, complete=True)
    with pytest.raises(HyperparameterError, match=r"hparams\['a'\] must be a tensor"):
        assign_grads(h, {"a": [1.0, 2.0]})
    assert h["a"].grad is None and h["b"].grad is None  # nothing written by a failed call


# --- batches ----------------------------------------------------------------------------------


def test_batch_sources():
    x = torch.zeros(4, 3)
    assert all(is_single_batch(d) for d in (x, (x, x), [x], {"x": x}, None))
    assert not is_single_batch(iter([x]))
    full, at = inner_source((x, x), 5, seed=0)
    assert full.t is None and at(3).t == 3 and at(3).batch[0] is x
    data = [torch.full((2,), float(i)) for i in range(3)]
    full, at = inner_source(iter(data), 5, seed=0)
    assert full is None and at(4) == At(data[1], 4)  # read once, cycled
    ob, osb = outer_source(iter(data), seed=0)
    assert isinstance(ob.batch, Many) and len(ob.batch.batches) == 3 and osb(4).batch is data[1]
    with pytest.raises(BilevelInputError, match="inner_data yielded no batches"):
        inner_source(iter([]), 3, seed=0)


# --- BatchNorm statistics, returned by the step ------------------------------------------------


def reference_hypergradient(bn: bool, momentum: float | None, batches: list, val: tuple,
                            lr: float) -> dict:
    """Reverse-mode unrolling written by hand with torch.autograd: BatchNorm on batch
    statistics in the steps, its running statistics updated from each step's batch as
    nn.BatchNorm does (unbiased variance, momentum or cumulative average), and the outer
    loss in eval mode on them."""
    model = mlp(bn, momentum)
    h = {k: v.requires_grad_() for k, v in hparams().items()}
    p = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    last = "3" if bn else "2"
    if bn:
        m = model[1]
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        count = float(m.num_batches_tracked)

    def hidden(p, x):
        return x @ p["0.weight"].T + p["0.bias"]

    def head(p, z):
        return torch.tanh(z) @ p[f"{last}.weight"].T + p[f"{last}.bias"]

    for x, y in batches:
        z = hidden(p, x)
        if bn:
            z_hat = (z - z.mean(0)) / torch.sqrt(z.var(0, correction=0) + model[1].eps)
            out = head(p, z_hat * p["1.weight"] + p["1.bias"])
        else:
            out = head(p, z)
        loss = inner(out, (x, y), h) + decay(p, h)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        if bn:
            count += 1
            factor = 1.0 / count if momentum is None else momentum
            rm = (1 - factor) * rm + factor * z.mean(0)
            rv = (1 - factor) * rv + factor * z.var(0, correction=1)
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads, strict=True)}
    z = hidden(p, val[0])
    if bn:
        z = (z - rm) / torch.sqrt(rv + model[1].eps) * p["1.weight"] + p["1.bias"]
    outer = sq(head(p, z), val, h)
    return dict(zip(h, torch.autograd.grad(outer, list(h.values())), strict=True))


@pytest.mark.parametrize("bn, momentum", [(False, None), (True, 0.1), (True, None)],
                         ids=["plain", "track-ema", "track-cumulative"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hypergradient_equals_hand_written_unrolling(bn, momentum, mode):
    batches, val = batches_of(5), batches_of(1, size=12, seed=9)[0]
    mp = bilevel.wrap(mlp(bn, momentum), inner, sq, hparams(), iter(batches), val,
                      hg.SGD(lr=0.3), 5, penalty=decay, buffers="track" if bn else "batch_stats")
    got = mp.hypergradient(hg.Unrolled(mode=mode)).grad
    close(got, reference_hypergradient(bn, momentum, batches, val, 0.3))


def tracked_problem(**kw) -> module_py.ModuleProblem:
    return bilevel.wrap(mlp(True), inner, sq, hparams(), iter(batches_of(3)),
                        batches_of(1, size=12, seed=9)[0], hg.SGD(lr=0.3), 3, penalty=decay,
                        buffers="track", **kw)


def stacked(trees: list) -> dict:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def task_params(mp, n: int) -> list[dict]:
    """n different starting points (tasks), statistics included."""
    g = torch.Generator().manual_seed(11)
    return [{k: v + 0.1 * i * torch.randn(v.shape, generator=g, dtype=DT)
             for k, v in mp.params.items()} for i in range(n)]


def test_tracked_step_under_vmap_equals_separate_steps():
    mp = tracked_problem()
    h = hparams()
    starts, tasks = task_params(mp, 3), batches_of(3, seed=21)
    _, state = mp.init()
    xs = torch.stack([b[0] for b in tasks]), torch.stack([b[1] for b in tasks])

    def one(params, batch):
        return mp.step(params, state, h, batch, 0)[0]

    got = torch.func.vmap(one)(stacked(starts), xs)
    ref = stacked([one(p, b) for p, b in zip(starts, tasks, strict=True)])
    close(got, ref)
    assert float(ref["1.num_batches_tracked"][0]) == 3  # the statistics moved
    assert not torch.allclose(ref["1.running_mean"][0], mp.params["1.running_mean"])

    # per-task hypergradients of a 3-step unrolled loop (meta-learning's shape)
    def hypergradient(params, batch, hh):
        def outer(hh):
            p, s = params, state
            for t in range(3):
                p, s = mp.step(p, s, hh, batch, t)
            return mp.outer_loss(p, hh, batch)
        return torch.func.grad(outer)(hh)

    got = torch.func.vmap(hypergradient, in_dims=(0, 0, None))(stacked(starts), xs, h)
    ref = stacked([hypergradient(p, b, h) for p, b in zip(starts, tasks, strict=True)])
    close(got, ref)


def test_a_step_writes_nothing_on_the_problem():
    mp = tracked_problem()
    before = dict(vars(mp))
    params, state = mp.init()
    mp.step(params, state, hparams(), batches_of(1)[0], 0)
    mp.hypergradient(hg.Unrolled())
    assert vars(mp).keys() == before.keys()
    assert all(vars(mp)[k] is before[k] for k in before)


def run_in_threads(work, n: int) -> None:
    barrier = threading.Barrier(n)
    errors: list = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def test_recording_blocks_are_private_to_their_thread():
    """One BatchNorm layer run concurrently by several threads, each in its own block:
    every block holds exactly its own thread's passes (an attribute shared by the threads
    would mix them)."""
    bn = nn.BatchNorm1d(3).to(DT)
    bn.forward = batchnorm_train.__get__(bn)
    xs = [torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(i))
          for i in range(4)]
    blocks: list = [None] * 4

    def work(i: int) -> None:
        with recording_batch_stats() as block:
            for _ in range(50):
                bn(xs[i])
        blocks[i] = block

    run_in_threads(work, 4)
    for x, block in zip(xs, blocks, strict=True):
        assert list(block) == [bn] and len(block[bn]) == 50
        assert all(torch.equal(m, x.mean(0)) and torch.equal(v, x.var(0)) for m, v in block[bn])


def test_problems_in_threads_do_not_see_each_other():
    """One problem per thread (a problem's model calls swap tensors into its private copy,
    so one problem is not shared by concurrent threads), all wrapping the same module."""
    model = mlp(True)
    problems = [bilevel.wrap(model, inner, sq, hparams(), batches_of(1)[0], batches_of(1)[0],
                             hg.SGD(lr=0.3), 3, penalty=decay, buffers="track")
                for _ in range(4)]
    h = hparams()
    starts, tasks = task_params(problems[0], 4), batches_of(4, seed=21)
    _, state = problems[0].init()
    ref = [problems[0].step(p, state, h, b, 0)[0] for p, b in zip(starts, tasks, strict=True)]
    got: list = [None] * 4

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = problems[i].step(starts[i], state, h, tasks[i], 0)[0]

    run_in_threads(work, 4)
    for a, b in zip(got, ref, strict=True):
        close(a, b, 0.0)


def test_a_nested_step_does_not_hide_the_outer_records():
    """A step of the same problem taken while its own loss is being evaluated (here: inside
    ``inputs``, before the model runs) records into its own block; the outer step still
    sees its layers' forward pass (an instance attribute set and cleared by the nested
    step lost it: the count did not move)."""
    h = hparams()
    batch = batches_of(1)[0]
    depth = []

    def inputs(b, hh):
        if not depth and "mp" in box:
            depth.append(1)
            try:
                p, s = box["mp"].init()
                box["mp"].step(p, s, hh, b, 0)  # reentrant: a step inside a step
            finally:
                depth.clear()
        return b[0]

    box: dict = {}
    reentrant = tracked_problem(inputs=inputs)
    box["mp"] = reentrant
    params, state = reentrant.init()
    got = reentrant.step(params, state, h, batch, 0)[0]
    close(got, tracked_problem().step(params, state, h, batch, 0)[0], 0.0)
    assert float(got["1.num_batches_tracked"]) == 3


def test_records_of_another_model_are_ignored():
    """Layers of another problem that run inside a step's block (its inner forward
    called from the loss) do not update this problem's statistics."""
    other = tracked_problem()
    h = hparams()
    batch = batches_of(1)[0]

    def loss(out, b, hh):
        return inner(out, b, hh) + 0 * other.forward(other.params, b[0]).sum()

    mixed = bilevel.wrap(mlp(True), loss, sq, h, iter(batches_of(3)), batch,
                         hg.SGD(lr=0.3), 3, penalty=decay, buffers="track")
    params, state = mixed.init()
    close(mixed.step(params, state, h, batch, 0)[0],
          tracked_problem().step(params, state, h, batch, 0)[0], 0.0)


def test_update_running_stats_is_nn_batchnorm():
    layer = TrackedLayer("bn", None)
    stats = {"bn.running_mean": torch.zeros(3, dtype=DT), "bn.running_var": torch.ones(3, dtype=DT),
             "bn.num_batches_tracked": torch.tensor(0.0, dtype=DT)}
    bn = nn.BatchNorm1d(3, momentum=None).to(DT).train()
    xs = [torch.randn(5, 3, dtype=DT) for _ in range(3)]
    for x in xs:
        bn(x)
    new = update_running_stats(stats, [layer], {"bn": [(x.mean(0), x.var(0)) for x in xs]})
    assert torch.allclose(new["bn.running_mean"], bn.running_mean, rtol=0, atol=1e-15)
    assert torch.allclose(new["bn.running_var"], bn.running_var, rtol=0, atol=1e-15)
    assert float(new["bn.num_batches_tracked"]) == 3
    with recording_batch_stats() as outer_block:
        with recording_batch_stats() as inner_block:
            assert inner_block is not outer_block
    assert not outer_block and not inner_block
