"""bilevel.module: models that used to crash `wrap` or give silently wrong hypergradients.

Weight-normed layers (legacy hook and parametrization), parameters read from outside
their registered slot, and forward-mode unrolling with Dropout. Every hypergradient is
judged in float64 against finite differences with their error bars."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel.module as module_py
import hypergrad as hg
from bilevel.module import wrap
from bilevel.private_copy import plain_weight_norm
from hypergrad.errors import BilevelInputError
from hypergrad.pytree import tree_norm

DT = torch.float64
STEPS = 5


def data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    return x, torch.sin(x.sum(1, keepdim=True))


def sq(out, batch, h):
    return ((out - batch[1]) ** 2).mean()


def decay(p, h):
    return h["wd"].exp() * sum((w ** 2).sum() for w in p.values())


def hparams() -> dict:
    return {"wd": torch.tensor(-1.0, dtype=DT)}


def weight_normed(form: str, dim: int | None = 0) -> nn.Module:
    """An MLP whose first layer is weight-normed (``form``: "legacy" hook or "param")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    if form == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in use
            model[0] = nn.utils.weight_norm(model[0], dim=dim)
    else:
        model[0] = nn.utils.parametrizations.weight_norm(model[0], dim=dim)
    return model


def problem_of(model: nn.Module, steps: int = STEPS, lr: float = 0.3, **kw):
    return wrap(model, sq, sq, hparams(), data(), data(10, seed=1), hg.SGD(lr=lr), steps,
                penalty=decay, **kw)


def agree(mp, estimator, eps: float = 1e-5) -> None:
    check = hg.check_hypergradient(mp.problem, mp.hparams, mp.params, estimator, coords=[0],
                                   eps=eps)
    assert check.agrees, check.verdict
    assert check.resolution < 1e-3, check.verdict


def state_of(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(type(m).__name__, m.training, dict(m._forward_pre_hooks),
              dict(m._forward_hooks), dict(vars(m))) for m in model.modules()])


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    tensors, mods = state_of(model)
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)
    for (name, training, pre, post, attrs), (name0, training0, pre0, post0, attrs0) in zip(
            mods, before[1], strict=True):
        assert (name, training, pre, post) == (name0, training0, pre0, post0)
        assert attrs.keys() == attrs0.keys()
        assert all(attrs[k] is attrs0[k] for k in attrs), name  # not even re-assigned
    assert all(p.grad is None for p in model.parameters())


# --- 1, 2: weight norm ----------------------------------------------------------------------


FORMS = ["legacy", "param"]
NAMES = {"legacy": ["0.weight_g", "0.weight_v"],
         "param": ["0.parametrizations.weight.original0",
                   "0.parametrizations.weight.original1"]}


@pytest.mark.parametrize("form", FORMS)
def test_weight_norm_wraps_and_exports_without_touching_the_model(form):
    model = weight_normed(form)
    before = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # handled: no fused-op warning
        mp = problem_of(model)
    assert set(NAMES[form]) <= set(mp.params)
    assert list(mp.params) == [n for n, _ in model.named_parameters()]
    result = mp.hypergradient(hg.Unrolled())
    assert_unchanged(model, before)
    trained = mp.export(result.params)
    copy.deepcopy(trained)  # fresh from export, even a legacy one can be deep-copied
    x = data(7, seed=2)[0]
    assert torch.allclose(trained(x), mp.forward(result.params, x, outer=True), rtol=0,
                          atol=1e-13)
    assert set(dict(trained.named_parameters())) == set(dict(model.named_parameters()))
    assert_unchanged(model, before)


@pytest.mark.parametrize("dim", [0, 1, None], ids=["dim0", "dim1", "whole"])
@pytest.mark.parametrize("form", FORMS)
def test_weight_norm_hypergradient_agrees_with_finite_differences(form, dim):
    agree(problem_of(weight_normed(form, dim)), hg.Unrolled())


def grad_w(mp, w):
    return torch.func.grad(mp.problem.inner_loss)(w, mp.hparams, mp.problem.inner_batch)


@pytest.mark.parametrize("form", FORMS)
def test_weight_norm_forward_mode_and_implicit(form):
    mp = problem_of(weight_normed(form))
    agree(mp, hg.Unrolled(mode="forward"))  # the fused op has no forward-mode rule at all
    forward = mp.hypergradient(hg.Unrolled(mode="forward")).grad["wd"]
    assert torch.allclose(forward, mp.hypergradient(hg.Unrolled()).grad["wd"], rtol=1e-10,
                          atol=0)
    # Implicit differentiation applies at a converged inner solve (strong decay, many steps)
    converged = problem_of(weight_normed(form), steps=400, lr=0.5)
    w = converged.problem.solve_inner(converged.params, converged.hparams)[0]
    assert tree_norm(grad_w(converged, w)) < 1e-12
    agree(converged, hg.Implicit(solver=hg.Direct(), inner_tol=None))


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, None, -2])
def test_plain_weight_norm_matches_torch(dim):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 2, 5, generator=g, dtype=DT)
    for shape in [(4, 3, 2, 5), (4, 3), (6,)]:
        vv = v.flatten()[:torch.Size(shape).numel()].reshape(shape)
        if dim is not None and not -vv.dim() <= dim < vv.dim():
            continue
        d = -1 if dim is None else dim
        gg = torch.norm_except_dim(vv, 2, d) * 1.7
        assert torch.allclose(plain_weight_norm(vv, gg, dim), torch._weight_norm(vv, gg, d),
                              rtol=1e-14, atol=0), (shape, dim)


def test_pytorch_fused_weight_norm_double_backward_is_off():
    """Documents the PyTorch bug the replacement works around: the Hessian-vector product of
    a loss through ``torch._weight_norm`` (double backward) against central differences of
    its (correct) gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    v = torch.randn(4, 3, generator=g, dtype=DT)
    gain = torch.randn(4, 1, generator=g, dtype=DT)
    u = torch.randn(4, 3, generator=g, dtype=DT)

    def hvp_error(norm) -> float:
        def grad_v(v):
            v = v if v.requires_grad else v.requires_grad_()
            loss = (torch.tanh(x @ norm(v, gain, 0).T) ** 2).sum()
            return torch.autograd.grad(loss, v, create_graph=True)[0]

        vv = v.clone().requires_grad_()
        hv = torch.autograd.grad((grad_v(vv) * u).sum(), vv)[0]
        eps = 1e-5
        fd = (grad_v(v + eps * u) - grad_v(v - eps * u)).detach() / (2 * eps)
        return float((hv - fd).norm() / fd.norm())

    assert hvp_error(plain_weight_norm) < 1e-8
    fused = hvp_error(torch._weight_norm)
    if fused < 1e-8:
        pytest.skip("PyTorch fixed torch._weight_norm's double backward; the plain-op "
                    "replacement in bilevel.private_copy is no longer needed")
    assert fused > 1e-2, fused


@pytest.mark.parametrize("form", FORMS)
def test_without_the_replacement_the_hypergradient_is_off_and_a_warning_names_it(
        form, monkeypatch):
    monkeypatch.setattr(module_py, "plain_weight_norms", lambda model: None)
    with pytest.warns(RuntimeWarning, match=r"\['0\.parametrizations\.weight\.0'\]"
                      if form == "param" else r"\['0'\].*fused weight norm"):
        mp = problem_of(weight_normed(form))
    fields = {f.name for f in dataclasses.fields(hg.Unrolled)}
    est = hg.Unrolled(**({"self_check": "off"} if "self_check" in fields else {}))
    check = hg.check_hypergradient(mp.problem, mp.hparams, mp.params, est, coords=[0])
    if check.agrees:
        pytest.skip("PyTorch fixed torch._weight_norm's double backward")
    assert check.rel_error > 1e-2, check.verdict


class OwnWeightNorm(nn.Module):
    """A layer calling the fused op itself: bilevel cannot rewrite it, so it warns."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(5, 3, dtype=DT))
        self.g = nn.Parameter(torch.ones(5, 1, dtype=DT))

    def forward(self, x):
        return x @ torch._weight_norm(self.v, self.g, 0).T


def test_unhandled_fused_weight_norm_warns_naming_the_layer():
    model = nn.Sequential(OwnWeightNorm(), nn.Tanh(), nn.Linear(5, 1).to(DT))
    with pytest.warns(RuntimeWarning, match=r"\['0'\] call PyTorch's fused weight norm"):
        problem_of(model)


# --- 3: parameters read outside their registered slot ---------------------------------------


class ListHolder(nn.Module):
    """Holds its weight in a plain list too, and reads it from there (stale under
    functional_call)."""

    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3, 4).to(DT)
        self.head = nn.Linear(4, 3).to(DT)
        self.weights = [self.hidden.weight]
        self.out = out

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.weights[0], self.hidden.bias))
        p = torch.softmax(self.head(h), dim=-1)  # p.sum() is identically 1
        if self.out == "tuple":
            return p, (h,)
        if self.out == "dict":
            return {"probs": p, "hidden": h}
        return p


def first(out, batch, h):
    out = out[0] if isinstance(out, tuple) else out["probs"] if isinstance(out, dict) else out
    return ((out[:, :1] - batch[1]) ** 2).mean()


@pytest.mark.parametrize("out", ["tensor", "tuple", "dict"])
def test_parameter_in_a_list_is_refused_by_name(out):
    model = ListHolder(out)
    with pytest.raises(BilevelInputError, match=r"\['hidden\.weight'\].*registered slot"):
        wrap(model, first, first, hparams(), data(), data(10, seed=1), steps=2, penalty=decay)


def test_parameter_in_a_list_is_refused_with_tracked_statistics():
    model = nn.Sequential(ListHolder(), nn.BatchNorm1d(3).to(DT))
    with pytest.raises(BilevelInputError, match=r"\['0\.hidden\.weight'\]"):
        wrap(model, first, first, hparams(), data(), data(10, seed=1), steps=2,
             penalty=decay, buffers="track")


class Tied(nn.Module):
    """Shared layers and tied weights: registered twice, read through attributes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 4)
        self.dec = nn.Linear(4, 3)
        self.dec.weight = nn.Parameter(self.enc.weight.T.detach().clone())
        self.mix = nn.Linear(4, 4)
        self.block = nn.Sequential(self.mix, nn.Tanh(), self.mix)  # the same layer twice
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.mix.weight  # tied parameter
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.block(torch.tanh(self.enc(x))) + self.tied(torch.ones_like(x[:, :1]).expand(
            -1, 4))
        seq, (hn, _) = self.rnn(x.unsqueeze(1))
        return {"y": self.drop(self.dec(h + hn[0])).sum(1, keepdim=True), "aux": (seq,)}


def test_ordinary_models_pass_the_check_with_one_forward_and_the_rng_untouched():
    calls = itertools.count()

    def count(module, args):  # copied into the private copies
        next(calls)

    model = Tied().to(DT)
    model.register_forward_pre_hook(count)
    loss = lambda out, b, h: ((out["y"] - b[1]) ** 2).mean()  # noqa: E731
    rng = torch.random.get_rng_state()
    mp = wrap(model, loss, loss, hparams(), data(), data(10, seed=1), steps=3,
              penalty=decay, seed=None)  # unseeded Dropout would draw from the global RNG
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert next(calls) == 1  # the check is one forward (and one backward)
    assert "tied.weight" not in mp.params and "block.0.weight" not in mp.params
    with torch.random.fork_rng():
        mp.hypergradient(hg.Unrolled())
    for form in FORMS:
        problem_of(weight_normed(form))  # the stale legacy `weight` attribute is not read
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    problem_of(bn, buffers="track")


class SelfReferencing(nn.Module):
    """A bound method of itself as an attribute and as a hook that writes an attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1).to(DT)
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=DT))
        self.act = self.scaled_tanh
        self.register_forward_hook(self.remember)

    def scaled_tanh(self, x):
        return torch.tanh(self.scale * x)

    def remember(self, module, args, out):
        self.last = out

    def forward(self, x):
        return self.act(self.lin(x))


def test_bound_methods_and_hooks_act_on_the_private_copy():
    model = SelfReferencing()
    before = state_of(model)
    mp = problem_of(model)  # self.act reads the substituted `scale`: the check passes
    agree(mp, hg.Unrolled())
    assert_unchanged(model, before)  # the hook wrote `last` on a private copy
    assert not hasattr(model, "last")


def test_a_forward_that_fails_is_reported_where_the_model_is_used():
    mp = wrap(ListHolder(), first, first, hparams(), {"x": data()[0]}, data(), steps=2,
              penalty=decay)  # no default input for a dict batch: not checked at wrap
    with pytest.raises(BilevelInputError, match="inputs=lambda"):
        mp.hypergradient("unrolled")


# --- 4: forward-mode unrolling with Dropout ---------------------------------------------------


def dropout_problem(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1)).to(DT)
    h = {"wd": torch.tensor(-1.0, dtype=DT), "scale": torch.tensor([1.2, 0.8], dtype=DT)}

    def inner(out, batch, h):
        return ((out * h["scale"][0] - batch[1]) ** 2).mean() + 0.1 * h["scale"][1] ** 2 * (
            out ** 2).mean()

    return wrap(model, inner, sq, h, data(), data(10, seed=1), hg.SGD(lr=0.3), STEPS,
                penalty=decay, **kw)


def test_forward_mode_unrolling_with_dropout_equals_reverse_mode():
    mp = dropout_problem()
    reverse = mp.hypergradient(hg.Unrolled()).grad
    for est in (hg.Unrolled(mode="forward"), hg.Unrolled(mode="forward", chunk_size=1),
                hg.Truncated(window=STEPS, mode="forward")):
        forward = mp.hypergradient(est).grad
        for k in reverse:
            assert torch.allclose(forward[k], reverse[k], rtol=1e-10, atol=0), (est, k)
    agree(mp, hg.Unrolled(mode="forward"))  # the masks are the seeded ones FD replays
    off = dropout_problem(seed=1).hypergradient(hg.Unrolled(mode="forward")).grad
    assert not torch.allclose(off["wd"], reverse["wd"], rtol=1e-3)  # the masks matter


def test_random_layer_inside_another_vmap_names_the_caller_and_what_works():
    mp = dropout_problem()
    xs = data(24)[0].reshape(4, 6, 3)
    with pytest.raises(BilevelInputError) as info:
        torch.func.vmap(lambda x: mp.forward(mp.params, x))(xs)
    msg = str(info.value)
    assert "called from test_module_safety.test_random_layer_inside_another_vmap" in msg
    assert "Unrolled and Truncated (reverse or forward mode)" in msg and "train=False" in msg
    assert "use an unrolled estimator" not in msg
    with pytest.raises(BilevelInputError, match=r"called from hypergrad\.hvp\.hvp_batched"):
        hg.hvp_batched(mp.problem.inner_loss, mp.params, mp.hparams, mp.problem.inner_batch,
                       {k: torch.stack([v, v]) for k, v in mp.params.items()}, mode="jvp")
