"""Hessian-vector products: every form against the others, finite differences, loops."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from torch.func import grad

import hypergrad as hg
from hypergrad.finite_difference import central_differences
from hypergrad.pytree import tree_map, tree_ravel, tree_stack, tree_unravel

from problems import fd_check, fd_directional, normwise_resolution, rounding

DT = torch.float64
H = importlib.import_module("hypergrad.hvp")  # ``hg.hvp`` is the function
ID = importlib.import_module("hypergrad.implicit_diff")


@pytest.fixture(autouse=True)
def _fresh_mode_cache():
    """Every test starts without remembered "auto" choices."""
    H.clear_mode_cache()
    yield
    H.clear_mode_cache()


def _mlp_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {"w1": torch.randn(5, 7, generator=g, dtype=DT) / 3,
              "b1": torch.randn(7, generator=g, dtype=DT),
              "w2": torch.randn(7, 3, generator=g, dtype=DT) / 3}
    hparams = {"log_wd": torch.randn(3, generator=g, dtype=DT)}
    X = torch.randn(20, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=g)

    def f(p, h, batch):
        Xb, yb = batch
        logits = torch.tanh(Xb @ p["w1"] + p["b1"]) @ p["w2"]
        reg = sum(h["log_wd"][i].exp() * (p[k] ** 2).sum() for i, k in enumerate(p))
        return torch.nn.functional.cross_entropy(logits, yb) + 0.5 * reg

    return f, params, hparams, (X, y)


def _random_like(tree, seed):
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda a: torch.randn(a.shape, generator=g, dtype=a.dtype), tree)


def _fd_hvp(f, params, hparams, batch, v, eps=1e-5):
    """Central differences of ∇_w f along v, each entry with its error bar."""
    flat, vf = tree_ravel(params), tree_ravel(v)
    gw = lambda x: tree_ravel(grad(f)(tree_unravel(x, params), hparams, batch))  # noqa: E731
    return fd_directional(gw, flat, vf, eps)


@pytest.mark.parametrize("mode", ["jvp", "reverse", "linearized", "auto"])
def test_hvp_forms_agree_with_each_other_and_finite_differences(mode):
    f, params, hparams, batch = _mlp_problem()
    v = _random_like(params, 1)
    exact = torch.func.hessian(lambda x: f(tree_unravel(x, params), hparams, batch))(
        tree_ravel(params)) @ tree_ravel(v)
    out = tree_ravel(hg.hvp(f, params, hparams, batch, v, mode=mode))
    # the same 63×63 product along two paths (dense Hessian vs autodiff): each entry sums
    # ~20 samples × 63 weights, well scaled (‖|H||v|‖/‖Hv‖ ≈ 1.3): bound 7e-13, observed 2e-16
    assert (out - exact).norm() / exact.norm() < rounding(20 * 63, 1.3)
    check = fd_check(out, _fd_hvp(f, params, hparams, batch, v))
    assert check.agrees, check.verdict
    # normwise, since some entries of Hv are near zero: observed 4e-10 (truncation and
    # rounding of eps = 1e-5 both ~2e-10); a wrong sign or a missing term shows
    assert normwise_resolution(check) < 1e-6, check.verdict


@pytest.mark.parametrize("mode", ["jvp", "reverse", "linearized"])
def test_batched_equals_looped(mode):
    f, params, hparams, batch = _mlp_problem()
    vs = [_random_like(params, s) for s in range(6)]
    looped = tree_stack([hg.hvp(f, params, hparams, batch, v, mode=mode) for v in vs])
    batched = hg.hvp_batched(f, params, hparams, batch, tree_stack(vs), mode=mode)
    # vmap vs a loop: the same sums in batched kernels; entries ≲ 1, so rounding of ~20 × 63
    # terms is ≲ 1e-13 even at the worst case (observed ≤ 4.4e-16)
    for k in params:
        assert (batched[k] - looped[k]).abs().max() < 1e-12
    lin = hg.Linearization(f, params, hparams, batch, mode=mode)
    again = lin.matvec(tree_stack(vs), batched=True)
    chunked = lin.matvec(tree_stack(vs), batched=True, chunk_size=4)
    for k in params:
        assert (again[k] - looped[k]).abs().max() < 1e-12
        assert (chunked[k] - looped[k]).abs().max() < 1e-12
    assert lin.products == 2


def test_mixed_product_matches_finite_differences():
    """∇²_λw f · v = ∂_λ ⟨∇_w f, v⟩."""
    f, params, hparams, batch = _mlp_problem()
    v = _random_like(params, 2)
    out = hg.mixed_vjp(f, params, hparams, batch, v)["log_wd"]

    def inner_product(lam):  # ⟨∇_w f(w, λ), v⟩
        return float(tree_ravel(grad(f)(params, {"log_wd": lam}, batch)) @ tree_ravel(v))

    fd = central_differences(inner_product, hparams["log_wd"], list(torch.eye(3, dtype=DT)),
                             1e-6)
    check = fd_check(out, fd)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-6, check.verdict  # observed 3e-9


class _Cube(torch.autograd.Function):
    """x ↦ x³ with a correct forward-mode rule but a backward that is not differentiable:
    double backward through it silently returns zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x ** 2

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * t


def test_auto_detects_a_wrong_double_backward_and_uses_forward_mode():
    f = lambda p, h, b: _Cube.apply(p["x"]).sum() + 0.5 * (h["s"] * p["x"] ** 2).sum()  # noqa: E731
    params, hparams = {"x": torch.tensor([1.0, 2.0], dtype=DT)}, {"s": torch.ones(2, dtype=DT)}
    v = {"x": torch.ones(2, dtype=DT)}
    assert torch.allclose(hg.hvp(f, params, hparams, None, v, mode="jvp")["x"],
                          torch.tensor([7.0, 13.0], dtype=DT))
    with pytest.warns(RuntimeWarning, match="disagree"):
        lin = hg.Linearization(f, params, hparams, None, mode="auto")
    assert lin.mode == "jvp"
    assert torch.allclose(lin.matvec(v)["x"], torch.tensor([7.0, 13.0], dtype=DT))
    mixed = hg.mixed_vjp(f, params, hparams, None, v, mode="jvp")["s"]
    assert torch.allclose(mixed, params["x"])


def test_auto_keeps_a_form_that_agrees():
    f, params, hparams, batch = _mlp_problem()
    lin = hg.Linearization(f, params, hparams, batch, mode="auto")
    assert lin.mode in ("linearized", "jvp")
    v = _random_like(params, 4)
    exact = tree_ravel(hg.hvp(f, params, hparams, batch, v, mode="reverse"))
    # two autodiff paths of one product: ≤ rounding(20 · 63, 1.3) ≈ 7e-13 (observed 2e-16)
    assert (tree_ravel(lin.matvec(v)) - exact).norm() / exact.norm() < 1e-12


def test_unknown_mode_is_rejected():
    f, params, hparams, batch = _mlp_problem()
    with pytest.raises(ValueError, match="hvp mode"):
        hg.hvp(f, params, hparams, batch, params, mode="double")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["jvp", "reverse", "linearized"])
def test_hvp_on_cuda_matches_cpu(mode):
    f, params, hparams, batch = _mlp_problem()
    v = _random_like(params, 3)
    cpu = tree_ravel(hg.hvp(f, params, hparams, batch, v, mode=mode))
    to = lambda t: tree_map(lambda a: a.cuda(), t)  # noqa: E731
    gpu = tree_ravel(hg.hvp(f, to(params), to(hparams), to(batch), to(v), mode=mode))
    assert gpu.is_cuda and (gpu.cpu() - cpu).norm() / cpu.norm() < 1e-10


def _count_probes(monkeypatch, module=H, answer=None):
    """Wrap ``module.choose_between`` to count its calls (and force ``answer``, if given,
    after running the real probe)."""
    calls = []
    real = module.choose_between

    def counted(*args, **kwargs):
        calls.append(1)
        chosen = real(*args, **kwargs)
        return chosen if answer is None else answer

    monkeypatch.setattr(module, "choose_between", counted)
    return calls


@pytest.mark.parametrize("forced", [None, "linearized", "jvp"])
def test_auto_probes_once_per_problem_and_serves_the_remembered_form(monkeypatch, forced):
    calls = _count_probes(monkeypatch, answer=forced)
    f, params, hparams, batch = _mlp_problem()
    chosen = hg.Linearization(f, params, hparams, batch, mode="auto").mode
    assert calls == [1] and chosen == (forced or chosen)
    v = _random_like(params, 5)
    again = hg.hvp(f, params, hparams, batch, v, mode="auto")
    lin = hg.Linearization(f, params, hparams, batch, mode="auto")
    assert calls == [1] and lin.mode == chosen
    assert (lin._pullback is None) == (chosen != "linearized")  # no probe graph is kept
    # the remembered form is the fixed form, bit for bit (the same operations)
    fixed = hg.hvp(f, params, hparams, batch, v, mode=chosen)
    for k in params:
        assert torch.equal(again[k], fixed[k])
    # the same objective and layout at other values: still remembered
    _, params2, hparams2, batch2 = _mlp_problem(seed=1)
    assert hg.Linearization(f, params2, hparams2, batch2, mode="auto").mode == chosen
    assert calls == [1]
    hg.hvp.clear_mode_cache()  # the documented way (hypergrad.hvp is the function)
    hg.Linearization(f, params, hparams, batch, mode="auto")
    assert calls == [1, 1]


def test_another_objective_or_layout_gets_its_own_choice(monkeypatch):
    calls = _count_probes(monkeypatch)
    f, params, hparams, batch = _mlp_problem()
    hg.Linearization(f, params, hparams, batch, mode="auto")
    assert len(calls) == 1
    g = lambda p, h, b: f(p, h, b) + (p["b1"] ** 4).sum()  # noqa: E731 - other code
    hg.Linearization(g, params, hparams, batch, mode="auto")
    assert len(calls) == 2
    X, y = batch
    hg.Linearization(f, params, hparams, (X[:10], y[:10]), mode="auto")  # batch shape
    assert len(calls) == 3
    wide = {**params, "b1": torch.zeros(7, 1, dtype=DT)}
    hg.Linearization(lambda p, h, b: f({**p, "b1": p["b1"][:, 0]}, h, b), wide, hparams,
                     batch, mode="auto")
    assert len(calls) == 4
    single = tree_map(lambda a: a.float(), (params, hparams, batch[0]))
    hg.Linearization(f, single[0], single[1], (single[2], y), mode="auto")  # dtype
    assert len(calls) == 5
    scale = torch.tensor(2.0, dtype=DT)  # one code over other objects: other objectives
    defaulted = [lambda p, h, b, s=s: s * f(p, h, b) for s in (scale, scale.clone())]
    for c in defaulted + defaulted:
        hg.Linearization(c, params, hparams, batch, mode="auto")
    assert len(calls) == 7
    def scaled(s):
        return lambda p, h, b: s * f(p, h, b)

    made = [scaled(s) for s in (scale, scale.clone())]
    for c in made + made:
        hg.Linearization(c, params, hparams, batch, mode="auto")
    assert len(calls) == 9


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(H, "CACHE_SIZE", 2)
    calls = _count_probes(monkeypatch)
    f, params, hparams, (X, y) = _mlp_problem()
    for n in (4, 5, 6, 6, 5, 4):  # the fourth problem pushes out the first
        hg.Linearization(f, params, hparams, (X[:n], y[:n]), mode="auto")
    assert len(calls) == 4 and len(H._CACHE) == 2


def test_a_remembered_disagreement_keeps_forward_mode(monkeypatch):
    calls = _count_probes(monkeypatch)
    f = lambda p, h, b: _Cube.apply(p["x"]).sum() + 0.5 * (h["s"] * p["x"] ** 2).sum()  # noqa: E731
    params, hparams = {"x": torch.tensor([1.0, 2.0], dtype=DT)}, {"s": torch.ones(2, dtype=DT)}
    v = {"x": torch.ones(2, dtype=DT)}
    with pytest.warns(RuntimeWarning, match="disagree"):
        first = hg.hvp(f, params, hparams, None, v, mode="auto")
    again = hg.hvp(f, params, hparams, None, v, mode="auto")
    assert len(calls) == 1
    for out in (first, again):  # 3x² + s: exact in float64
        assert torch.equal(out["x"], torch.tensor([7.0, 13.0], dtype=DT))


def test_the_probe_forms_forward_products_before_the_linearization():
    """Peak memory: the forward-mode products are formed while no linearization exists."""
    events = []

    def linearize():
        events.append("linearize")
        return lambda v: events.append("pull") or v

    def forward(v):
        events.append("jvp")
        return v

    assert H.choose_between(linearize, forward, torch.ones(3, dtype=DT)) in ("linearized",
                                                                              "jvp")
    assert events[:3] == ["jvp", "jvp", "linearize"] and events.count("linearize") == 1


def test_root_linearize_auto_remembers_its_choice(monkeypatch):
    calls = _count_probes(monkeypatch, module=ID)
    f, params, hparams, batch = _mlp_problem()
    T = ID.Stationarity(f, batch)
    v = _random_like(params, 6)
    first = ID.linearize(T, params, hparams, mode="auto")
    again = ID.linearize(T, params, hparams, mode="auto")
    assert calls == [1] and again.mode == first.mode
    fixed = ID.linearize(T, params, hparams, mode=first.mode)
    for lin in (first, again):
        out, ref = lin.transposed(v, False), fixed.transposed(v, False)
        mixed, ref_mixed = lin.args_vjp(v, False), fixed.args_vjp(v, False)
        for k in params:
            assert torch.equal(out[k], ref[k])
        assert torch.equal(mixed["log_wd"], ref_mixed["log_wd"])


@pytest.mark.parametrize("way", ["vmap", "chunk", "loop"])
def test_batched_auto_equals_the_loop_whatever_it_picks(monkeypatch, way):
    real, timed = H._fastest_batching, []

    def forced(pull, v, k):
        timed.append(k)
        return way, real(pull, v, k)[1]

    monkeypatch.setattr(H, "_fastest_batching", forced)
    f, params, hparams, batch = _mlp_problem()
    lin = hg.Linearization(f, params, hparams, batch, mode="linearized")
    for k in (12, 9, 16, 3):  # 9..16 share a choice, 3 gets its own
        vs = tree_stack([_random_like(params, 10 + s) for s in range(k)])
        looped = tree_stack([lin.matvec(tree_map(lambda a: a[i], vs)) for i in range(k)])  # noqa: B023
        for out in (lin.matvec(vs, batched=True), hg.hvp_batched(f, params, hparams, batch, vs,
                                                                  mode="linearized")):
            # vmap vs a loop: as in test_batched_equals_looped (bound 1e-13, observed 4e-16)
            for n in params:
                assert (out[n] - looped[n]).abs().max() < 1e-12
        assert lin.batching(k) == way
    assert timed == [12, 3]
    for batching in ("vmap", "loop"):
        out = lin.matvec(vs, batched=True, batching=batching)
        for n in params:
            assert (out[n] - looped[n]).abs().max() < 1e-12


def test_batched_auto_chooses_by_itself():
    f, params, hparams, batch = _mlp_problem()
    lin = hg.Linearization(f, params, hparams, batch, mode="linearized")
    assert lin.batching(12) is None
    lin.matvec(tree_stack([_random_like(params, s) for s in range(12)]), batched=True)
    assert lin.batching(12) in ("vmap", "chunk", "loop") and lin.batching(16) == \
        lin.batching(12) and lin.batching(4) is None


def test_bad_batching_is_rejected():
    f, params, hparams, batch = _mlp_problem()
    vs = tree_stack([params, params])
    with pytest.raises(ValueError, match="batching"):
        hg.hvp_batched(f, params, hparams, batch, vs, mode="linearized", batching="threads")
    with pytest.raises(ValueError, match="chunk_size"):
        hg.hvp_batched(f, params, hparams, batch, vs, mode="jvp", batching="loop",
                       chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        hg.Linearization(f, params, hparams, batch, "linearized").matvec(vs, True, 0)


def test_implicit_without_state_probes_once(monkeypatch):
    from problems import Ridge

    calls = _count_probes(monkeypatch, module=ID)
    r = Ridge.make()
    est = hg.Implicit(solver=hg.ConjugateGradient(tol=1e-14, maxiter=50), hvp="auto",
                      inner_steps=0)
    outs = [est(r.problem(), r.hparams(), {"w": r.w_star()}) for _ in range(3)]  # no state
    assert calls == [1]
    assert {o.state["hvp_mode"] for o in outs} == {outs[0].state["hvp_mode"]}
    for o in outs[1:]:  # the same form on the same inputs: the same numbers
        assert torch.equal(o.grad["lam"], outs[0].grad["lam"])


def _cube(x):
    return x ** 3


def _custom_cube(x):  # the same function, but double backward through it is zero
    return _Cube.apply(x)


def _op_objective(p, h, op):
    """Σ op(x) + ½ Σ s x²: the batch is the operator."""
    return op(p["x"]).sum() + 0.5 * (h["s"] * p["x"] ** 2).sum()


def test_a_batch_of_other_callables_gets_its_own_choice(monkeypatch):
    """The remembered form of one operator in the batch is not reused for another."""
    calls = _count_probes(monkeypatch)
    params, hparams = {"x": torch.tensor([1.0, 2.0], dtype=DT)}, {"s": torch.ones(2, dtype=DT)}
    v = {"x": torch.ones(2, dtype=DT)}
    exact = torch.tensor([7.0, 13.0], dtype=DT)  # (6x + s) v: exact in float64
    assert torch.equal(hg.hvp(_op_objective, params, hparams, _cube, v, mode="auto")["x"],
                       exact)
    with pytest.warns(RuntimeWarning, match="disagree"):
        lin = hg.Linearization(_op_objective, params, hparams, _custom_cube, mode="auto")
    assert len(calls) == 2 and lin.mode == "jvp" and torch.equal(lin.matvec(v)["x"], exact)
    # functions in the batch are keyed as the objective: one code, one problem
    for _ in range(2):
        hg.Linearization(_op_objective, params, hparams, lambda x: x ** 3, mode="auto")
    assert len(calls) == 3


def test_implicit_auto_is_right_after_another_batch_operator():
    """End to end: ``hvp="auto"`` after a problem that differs only in the batch's operator
    gives the closed form, as ``hvp="jvp"`` does."""
    second_order = importlib.import_module("hypergrad.second_order")
    second_order.clear_cache()  # the self-check's reports are kept per objective
    w, hp = {"x": torch.tensor([1.0, 2.0], dtype=DT)}, {"s": torch.ones(2, dtype=DT)}

    def hypergrad(hvp, op):
        est = hg.Implicit(hvp=hvp, inner_steps=0, inner_tol=None)
        problem = hg.Problem(_op_objective, lambda p, h, b: (p["x"] ** 2).sum(),
                             inner_batch=op, steps=0)
        return est(problem, hp, w).grad["s"]

    x = w["x"]
    exact = -2 * x ** 2 / (6 * x + 1)  # -∂²_sw f H⁻¹ ∇_w g = -x · 2x / (6x + s)
    hypergrad("auto", _cube)
    # warned by the probe of the HVP forms, or by a self-check that sees the new operator
    with pytest.warns(RuntimeWarning, match="Hessian-vector products by double backward"):
        auto = hypergrad("auto", _custom_cube)
    # a 2×2 diagonal solve, a few flops per entry: rounding ~1e-16 (observed 0); the
    # reused double backward gives -2x² (off by 1.7)
    assert (auto - exact).abs().max() < 1e-14
    assert (hypergrad("jvp", _custom_cube) - exact).abs().max() < 1e-14
    second_order.clear_cache()


@dataclasses.dataclass(frozen=True, eq=False)
class _Box:
    data: torch.Tensor
    ways: int


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        return True  # were it compared by value, every instance would match


def test_non_tensor_batch_leaves_key_the_choice(monkeypatch):
    import gc
    import weakref

    calls = _count_probes(monkeypatch)
    f, params, hparams, (X, y) = _mlp_problem()
    g = lambda p, h, b: f(p, h, b[:2])  # noqa: E731 - ignores the extra leaf

    def probes(extra):
        hg.Linearization(g, params, hparams, (X, y, extra), mode="auto")
        return len(calls)

    # by type and value: 1, 1.0 and True are three problems, a second 1 is the first
    assert [probes(e) for e in (1, 1.0, True, 1, "a", "b", "a")] == [1, 2, 3, 3, 4, 5, 5]
    module, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)  # by identity
    assert [probes(e) for e in (module, other, module)] == [6, 7, 7]
    # unhashable: by identity, held alive while remembered (so its id stays unique)
    kept = _Unhashable()
    assert [probes(e) for e in (kept, _Unhashable(), kept)] == [8, 9, 9]
    # NumPy arrays are data, as tensors: by shape and dtype
    arrays = (np.zeros(3), np.ones(3), np.zeros(4), np.zeros(3, dtype=np.float32))
    assert [probes(e) for e in arrays] == [10, 10, 11, 12]
    # a dataclass (hashable by identity) by its fields: tensors by layout, the rest by value
    boxes = (_Box(torch.zeros(2), 1), _Box(torch.ones(2), 1), _Box(torch.zeros(3), 1),
             _Box(torch.zeros(2), 2))
    assert [probes(e) for e in boxes] == [13, 13, 14, 15]
    ref = weakref.ref(kept)
    del kept
    gc.collect()
    assert ref() is not None
    H.clear_mode_cache()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("mode", ["jvp", "reverse", "linearized", "auto"])
@pytest.mark.parametrize("batching", ["auto", "vmap", "loop"])
def test_mismatched_leading_sizes_are_refused(mode, batching):
    f, params, hparams, batch = _mlp_problem()
    vs = tree_stack([_random_like(params, s) for s in range(3)])
    short = {**vs, "b1": vs["b1"][:2]}  # the loop read k from the first leaf only
    with pytest.raises(ValueError, match=r"leading sizes \['w1'\]: 3, \['b1'\]: 2"):
        hg.hvp_batched(f, params, hparams, batch, short, mode=mode, batching=batching)
    lin = hg.Linearization(f, params, hparams, batch, mode=mode)
    with pytest.raises(ValueError, match=r"leading sizes .*\['b1'\]: 2, \['w2'\]: 3"):
        lin.matvec(short, batched=True, batching=batching)
    with pytest.raises(ValueError, match=r"\['b1'\]: 0-d"):
        lin.matvec({**vs, "b1": torch.tensor(1.0, dtype=DT)}, batched=True)


@pytest.mark.parametrize("mode", ["jvp", "reverse", "linearized", "auto"])
@pytest.mark.parametrize("batching", ["auto", "vmap", "loop"])
def test_no_vectors_give_empty_products_without_evaluating(mode, batching):
    f, params, hparams, batch = _mlp_problem()
    evaluations = []

    def counted(p, h, b):
        evaluations.append(1)
        return f(p, h, b)

    empty = tree_map(lambda a: torch.zeros((0, *a.shape), dtype=a.dtype), params)
    lin = hg.Linearization(counted, params, hparams, batch, mode=mode)
    evaluations.clear()
    for out in (hg.hvp_batched(counted, params, hparams, batch, empty, mode=mode,
                               batching=batching),
                lin.matvec(empty, batched=True, batching=batching)):
        for k in params:
            assert out[k].shape == (0, *params[k].shape) and out[k].dtype == DT
    assert evaluations == []
