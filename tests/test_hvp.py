"""Hessian-vector products: every form against the others, finite differences, loops."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import hypergrad as hg
from hypergrad.finite_difference import central_differences
from hypergrad.pytree import tree_map, tree_ravel, tree_stack, tree_unravel

from problems import fd_check, fd_directional, normwise_resolution, rounding

DT = torch.float64


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
