"""The factored MAML inner loop (bilevel.meta.factored) against the dense per-task reference.

Everything runs in float64. The factored path computes the same quantities as the reference
in a different order (shared GEMMs, Gram matrices, sums over steps), so the two agree up to
float64 rounding: for these sizes (a few steps, at most ~100 terms per dot product) the
differences are of order 1e-15 relative (1.2e-14 at most over the suite); RTOL = 1e-10
(about 5e5 units of rounding, 2.2e-16 each) bounds them with a wide margin and still fails on
any real error (those are of order 1e-3 or more: first- and second-order meta-gradients
differ by more than that here).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.meta.factored import (
    factored_adapt,
    factored_adapted,
    factored_layers,
    factored_predict,
    factored_query_losses,
    per_task_cross_entropy,
    per_task_mse,
    supports_factored,
)
from hypergrad.errors import BilevelInputError

RTOL = 1e-10
DT = torch.float64


def close(a: Tensor, b: Tensor, rtol: float = RTOL) -> None:
    """``|a - b| <= rtol * max|b|`` elementwise (relative to the tensor's scale)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().clamp(min=1e-300)
    err = ((a - b).abs().max() / scale).item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def reference(model: nn.Module, params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor,
              qy: Tensor, lr: float | Tensor, steps: int, loss=F.cross_entropy,
              first_order: bool = False, window: int | None = None,
              ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """The dense per-task computation: query losses (B,), the support losses of the last
    step (B,) and the adapted parameters of each task. The gradients of the first
    ``steps - window`` steps (all, for first_order) are detached."""
    detach_below = steps if first_order else 0 if window is None else max(steps - window, 0)
    out, sup, adapted = [], [], []
    for b in range(sx.shape[0]):
        p = dict(params)
        last = None
        for t in range(steps):
            live = t >= detach_below
            l = loss(torch.func.functional_call(model, p, (sx[b],)), sy[b])
            g = torch.autograd.grad(l, list(p.values()), create_graph=live)
            if not live:
                g = [gi.detach() for gi in g]
            p = {k: v - lr * gi for (k, v), gi in zip(p.items(), g, strict=True)}
            last = l.detach()
        if last is None:
            last = loss(torch.func.functional_call(model, p, (sx[b],)), sy[b]).detach()
        out.append(loss(torch.func.functional_call(model, p, (qx[b],)), qy[b]))
        sup.append(last)
        adapted.append(p)
    return torch.stack(out), torch.stack(sup), adapted


def meta_grads(losses: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True))


def classifier(act: type[nn.Module] = nn.ReLU, act2: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 16), act2(),
                         nn.Linear(16, 3)).to(DT)


def class_tasks(num: int = 4, shots: int = 6, queries: int = 5, features: tuple = (8,),
                classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sx = torch.randn(num, shots, *features, generator=gen, dtype=DT)
    qx = torch.randn(num, queries, *features, generator=gen, dtype=DT)
    sy = torch.randint(0, classes, (num, shots), generator=gen)
    qy = torch.randint(0, classes, (num, queries), generator=gen)
    return sx, sy, qx, qy


def check(model: nn.Module, tasks: tuple, lr: float | Tensor, steps: int, loss_fn=None,
          ref_loss=F.cross_entropy, first_order: bool = False, window: int | None = None,
          strategy: str = "auto") -> None:
    """Query losses, support losses, meta-gradients (and the gradient to a tensor ``lr``)
    agree with the reference."""
    loss_fn = loss_fn or per_task_cross_entropy
    params = dict(model.named_parameters())
    sx, sy, qx, qy = tasks
    q_ref, s_ref, _ = reference(model, params, sx, sy, qx, qy, lr, steps, ref_loss,
                                first_order, window)
    q, s = factored_query_losses(model, params, sx, sy, qx, qy, loss_fn, lr, steps,
                                 first_order, window, strategy=strategy)
    close(q, q_ref)
    close(s, s_ref)
    assert not s.requires_grad
    targets = dict(params)
    if isinstance(lr, Tensor) and lr.requires_grad:
        targets["lr"] = lr
    for g, g_ref in zip(meta_grads(q, targets), meta_grads(q_ref, targets), strict=True):
        close(g, g_ref)


# --------------------------------------------------------------------------------------------
# (a) classification, (b) regression: second order, every strategy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["auto", "factored", "dense"])
@pytest.mark.parametrize("steps", [1, 3])
def test_classification_second_order(strategy: str, steps: int) -> None:
    check(classifier(), class_tasks(), 0.4, steps, strategy=strategy)


def test_classification_other_activations() -> None:
    check(classifier(nn.GELU, nn.Softplus), class_tasks(), 0.3, 2)
    check(classifier(nn.SiLU, nn.ELU), class_tasks(), 0.3, 2, strategy="dense")


@pytest.mark.parametrize("strategy", ["auto", "factored", "dense"])
def test_regression_mse(strategy: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1)).to(DT)
    gen = torch.Generator().manual_seed(3)
    sx = torch.rand(5, 10, 1, generator=gen, dtype=DT) * 10 - 5
    qx = torch.rand(5, 7, 1, generator=gen, dtype=DT) * 10 - 5
    amp = torch.rand(5, 1, 1, generator=gen, dtype=DT) * 4 + 1
    sy, qy = amp * torch.sin(sx), amp * torch.sin(qx)  # (B, n, 1) float targets
    check(model, (sx, sy, qx, qy), 0.01, 3, per_task_mse, F.mse_loss, strategy=strategy)


def test_learned_lr_tensor() -> None:
    """A tensor step size that requires grad: its meta-gradient agrees too."""
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    check(classifier(), class_tasks(), lr, 3)
    check(classifier(), class_tasks(), lr, 3, first_order=True)
    check(classifier(), class_tasks(), lr, 3, window=1, strategy="dense")


def test_gradient_to_the_inputs() -> None:
    """Support and query inputs that require grad (e.g. dataset distillation) get the
    reference's gradient, through the Gram matrices too."""
    model = classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, qy = class_tasks()
    for strategy in ("factored", "dense"):
        for first_order, window in ((False, None), (True, None), (False, 1)):
            xs = [sx.clone().requires_grad_(), qx.clone().requires_grad_()]
            q, _ = factored_query_losses(model, params, xs[0], sy, xs[1], qy,
                                         per_task_cross_entropy, 0.4, 3, first_order, window,
                                         strategy=strategy)
            q_ref, _, _ = reference(model, params, xs[0], sy, xs[1], qy, 0.4, 3,
                                    first_order=first_order, window=window)
            grads = [torch.autograd.grad(v.mean(), xs, allow_unused=True) for v in (q, q_ref)]
            for g, g_ref in zip(*grads, strict=True):
                if g_ref is None:  # first order: the support set acts through g.detach()
                    assert g is None or not g.any()
                else:
                    close(g, g_ref)
    # the dense adapted parameters pair the detached steps' factors with detached inputs
    xs = sx.clone().requires_grad_()
    dense = factored_adapted(model, params, xs, sy, per_task_cross_entropy, 0.4, 3, window=1)
    _, _, adapted = reference(model, params, xs, sy, qx, qy, 0.4, 3, window=1)
    ref = sum(sum(p[n].square().sum() for n in p) for p in adapted)
    ours = sum(v.square().sum() for v in dense.values())
    close(ours, ref)
    close(torch.autograd.grad(ours, xs)[0], torch.autograd.grad(ref, xs)[0])


def test_no_bias_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 3, bias=False)).to(DT)
    for strategy in ("factored", "dense"):
        check(model, class_tasks(), 0.4, 3, strategy=strategy)


# --------------------------------------------------------------------------------------------
# (c) first order, (d) windows, (e) no step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["factored", "dense"])
def test_first_order(strategy: str) -> None:
    check(classifier(), class_tasks(), 0.4, 3, first_order=True, strategy=strategy)


@pytest.mark.parametrize("window", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("strategy", ["factored", "dense"])
def test_window(window: int, strategy: str) -> None:
    check(classifier(), class_tasks(), 0.4, 3, window=window, strategy=strategy)


def test_first_order_differs_from_second_order() -> None:
    """The checks above are not vacuous: first and second order differ clearly here."""
    model, tasks = classifier(), class_tasks()
    params = dict(model.named_parameters())
    a, _ = factored_query_losses(model, params, *tasks, per_task_cross_entropy, 0.4, 3)
    b, _ = factored_query_losses(model, params, *tasks, per_task_cross_entropy, 0.4, 3,
                                 first_order=True)
    close(a, b)  # same values ...
    diff = [((ga - gb).abs().max() / gb.abs().max()).item()
            for ga, gb in zip(meta_grads(a, params), meta_grads(b, params), strict=True)]
    assert max(diff) > 1e-3  # ... different gradients


def test_window_zero_is_first_order() -> None:
    model, tasks = classifier(), class_tasks()
    params = dict(model.named_parameters())
    a, _ = factored_query_losses(model, params, *tasks, per_task_cross_entropy, 0.4, 3,
                                 window=0)
    b, _ = factored_query_losses(model, params, *tasks, per_task_cross_entropy, 0.4, 3,
                                 first_order=True)
    close(a, b, 0.0)
    for ga, gb in zip(meta_grads(a, params), meta_grads(b, params), strict=True):
        close(ga, gb, 0.0)


def test_zero_steps_is_unadapted() -> None:
    model, (sx, sy, qx, qy) = classifier(), class_tasks()
    params = dict(model.named_parameters())
    q, s = factored_query_losses(model, params, sx, sy, qx, qy, per_task_cross_entropy,
                                 0.4, 0)
    close(q, torch.stack([F.cross_entropy(model(qx[b]), qy[b]) for b in range(len(qx))]))
    close(s, torch.stack([F.cross_entropy(model(sx[b]), sy[b]) for b in range(len(sx))]))
    check(model, (sx, sy, qx, qy), 0.4, 0)


# --------------------------------------------------------------------------------------------
# (f) which models qualify, (g) nested Sequential with Flatten
# --------------------------------------------------------------------------------------------


def test_supports_factored_refuses_with_reason() -> None:
    assert supports_factored(classifier()) is None
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    assert supports_factored(bn) == "BatchNorm1d at 1 is not elementwise"
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    assert supports_factored(conv) == "Conv2d at 0 is not elementwise"
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Dropout()), nn.Linear(8, 3))
    assert supports_factored(nested) == "Dropout at 0.1 is not elementwise"
    assert "not an nn.Sequential" in supports_factored(nn.Linear(8, 3))
    assert supports_factored(nn.Sequential(nn.ReLU())) == "the model has no nn.Linear layer"
    assert "start_dim" in supports_factored(nn.Sequential(nn.Flatten(0), nn.Linear(8, 3)))

    class MyReLU(nn.ReLU):
        pass

    shared = nn.Linear(8, 8)
    assert supports_factored(nn.Sequential(shared, nn.ReLU(), shared)) == (
        "Linear at 2 is the Linear at 0 again (shared weights)")
    hooked = classifier()
    hooked[1].register_forward_hook(lambda *a: None)
    assert supports_factored(hooked) == "ReLU at 1 has forward hooks"

    assert supports_factored(nn.Sequential(nn.Linear(8, 3), MyReLU())) is not None
    with pytest.raises(BilevelInputError, match="BatchNorm1d at 1 is not elementwise"):
        factored_layers(bn)
    sx, sy, qx, qy = class_tasks()
    with pytest.raises(BilevelInputError, match="not elementwise"):
        factored_query_losses(bn, dict(bn.named_parameters()), sx, sy, qx, qy,
                              per_task_cross_entropy, 0.1, 1)


def test_inplace_activations() -> None:
    """In-place activations are run out of place (the pre-activations must stay intact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16),
                          nn.ELU(inplace=True), nn.Linear(16, 3)).to(DT)
    check(model, class_tasks(), 0.4, 3)
    assert model[1].inplace  # the model itself is unchanged


def test_single_layer_and_leading_activation() -> None:
    torch.manual_seed(0)
    check(nn.Sequential(nn.Linear(8, 3)).to(DT), class_tasks(), 0.5, 3)
    model = nn.Sequential(nn.Sigmoid(), nn.Linear(8, 6), nn.Hardtanh(), nn.Linear(6, 3),
                          nn.Identity()).to(DT)
    check(model, class_tasks(), 0.5, 3)


def test_nested_sequential_with_flatten() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 12), nn.ReLU()),
                          nn.Sequential(nn.Sequential(nn.Linear(12, 12), nn.Identity()),
                                        nn.LeakyReLU(0.1)),
                          nn.Linear(12, 4)).to(DT)
    spec = factored_layers(model)
    assert spec.flatten
    assert [lin.weight for lin in spec.linears] == ["1.0.weight", "2.0.0.weight", "3.weight"]
    tasks = class_tasks(3, 5, 4, (1, 8, 8), classes=4)
    check(model, tasks, 0.3, 3)
    check(model, tasks, 0.3, 2, strategy="dense", window=1)


# --------------------------------------------------------------------------------------------
# dense adapted parameters and predictions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["factored", "dense"])
def test_adapted_params_and_predictions(strategy: str) -> None:
    model, (sx, sy, qx, qy) = classifier(), class_tasks()
    params = dict(model.named_parameters())
    _, _, adapted = reference(model, params, sx, sy, qx, qy, 0.4, 3)
    net = factored_adapt(model, params, sx, sy, per_task_cross_entropy, 0.4, 3,
                         strategy=strategy)
    dense = net.dense_params()
    assert list(dense) == list(params)
    for name in params:
        close(dense[name], torch.stack([p[name] for p in adapted]))
    pred = net.predict(qx)
    for b in range(len(qx)):
        close(pred[b], torch.func.functional_call(model, adapted[b], (qx[b],)))
    close(factored_predict(model, params, sx, sy, qx, per_task_cross_entropy, 0.4, 3), pred)
    for name, value in factored_adapted(model, params, sx, sy, per_task_cross_entropy,
                                        0.4, 3).items():
        close(value, dense[name])
    # differentiable: a loss of the dense parameters has the reference's meta-gradient
    ref = torch.stack([sum(p[n].square().sum() for n in p) for p in adapted])
    ours = sum(v.flatten(1).square().sum(1) for v in dense.values())
    for g, g_ref in zip(meta_grads(ours, params), meta_grads(ref, params), strict=True):
        close(g, g_ref)


def test_float32_agrees_loosely() -> None:
    """float32 runs (the fast path's usual dtype) agree to float32 rounding."""
    model, tasks = classifier(), class_tasks()
    params = {k: v.detach().float().requires_grad_() for k, v in model.named_parameters()}
    model32 = classifier().float()
    sx, sy, qx, qy = tasks
    q, _ = factored_query_losses(model32, params, sx.float(), sy, qx.float(), qy,
                                 per_task_cross_entropy, 0.4, 3)
    q_ref, _, _ = reference(model, dict(model.named_parameters()), sx, sy, qx, qy, 0.4, 3)
    close(q.double(), q_ref.detach(), 1e-5)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_errors() -> None:
    model, (sx, sy, qx, qy) = classifier(), class_tasks()
    params = dict(model.named_parameters())

    def run(**kw):
        args = dict(layers=model, params=params, support_x=sx, support_y=sy, query_x=qx,
                    query_y=qy, loss_fn=per_task_cross_entropy, lr=0.1, steps=1)
        args.update(kw)
        return factored_query_losses(**args)

    with pytest.raises(BilevelInputError, match="steps"):
        run(steps=-1)
    with pytest.raises(BilevelInputError, match="window"):
        run(window=-1)
    with pytest.raises(BilevelInputError, match="lr"):
        run(lr=torch.ones(2))
    with pytest.raises(BilevelInputError, match="params has no '0.bias'"):
        run(params={k: v for k, v in params.items() if k != "0.bias"})
    with pytest.raises(BilevelInputError, match=r"params\['2.weight'\] has shape"):
        run(params={**params, "2.weight": torch.zeros(3, 3, dtype=DT)})
    with pytest.raises(BilevelInputError, match="takes 8 features"):
        run(support_x=sx[..., :5])
    with pytest.raises(BilevelInputError, match="support_y must lead"):
        run(support_y=sy[:, :2])
    with pytest.raises(BilevelInputError, match="query_y must lead"):
        run(query_y=qy[:, :2])
    with pytest.raises(BilevelInputError, match="tasks"):
        run(query_x=qx[:2])
    with pytest.raises(BilevelInputError, match=r"shape \(4,\)"):
        run(loss_fn=lambda p, y: per_task_cross_entropy(p, y).sum())
    with pytest.raises(BilevelInputError, match="strategy"):
        run(strategy="sparse")
    with pytest.raises(BilevelInputError, match="layers must be"):
        run(layers="mlp")
