"""Train many freshly initialised networks (at once by ``torch.func.vmap`` on CUDA) and test them.

This is the evaluation protocol of dataset distillation: N networks, each with a seed of
its own, are trained on a (small) training set only and tested on real test data;
accuracy is reported as mean ± std over the N networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import hypergrad as hg

from .augment import Augment

NetFactory = Callable[[], nn.Module]
#: ``on_step(n)``: called after each training step with the number of networks it moved
StepHook = Callable[[int], None]


@dataclass(frozen=True)
class Recipe:
    """How networks are trained: ``steps`` steps of ``optimizer`` (a name of
    ``hypergrad.OPTIMIZERS``: ``"sgd"``, ``"momentum"``, ``"adam"``, ...) at learning rate
    ``lr`` (and ``momentum`` where the optimizer has one), on minibatches of
    ``batch_size`` (``None``: full batch), with augmentation ``augment``."""

    steps: int = 300
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    batch_size: int | None = None
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if self.optimizer not in hg.OPTIMIZERS:
            raise ValueError(f"Recipe.optimizer must be one of {sorted(hg.OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.steps < 0 or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"Recipe needs steps >= 0 and a positive finite lr, got "
                             f"steps={self.steps}, lr={self.lr}")

    def inner_optimizer(self, lr: float | Callable | None = None) -> hg.optim.InnerOptimizer:
        """The differentiable optimizer of this recipe (``lr`` overrides the rate)."""
        lr = self.lr if lr is None else lr
        return hg.make_optimizer(self.optimizer, lr=lr, momentum=self.momentum)


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies of N independently initialised networks."""

    accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        if len(self.accuracies) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / (len(self.accuracies) - 1))

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % (n={len(self.accuracies)})"


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of −Σ_k target_k log softmax(logits)_k; ``target`` holds class indices
    (hard labels) or rows of probabilities (soft labels)."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def init_networks(make_net: NetFactory, seeds: list[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One network per seed (``torch.manual_seed(seed)`` before building it), returned as a
    template module and the parameters stacked along a leading axis of size ``len(seeds)``."""
    nets = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            nets.append(make_net().to(device=device, dtype=dtype))
    params, buffers = stack_module_state(nets)
    if buffers:
        raise ValueError(f"networks with buffers ({sorted(buffers)}) are not supported here: "
                         "use instance or group normalisation (no running statistics)")
    return nets[0], {k: v.detach() for k, v in params.items()}


def train_networks(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, recipe: Recipe, seed: int = 0,
                   lr: torch.Tensor | float | None = None,
                   batched: bool | None = None,
                   on_step: StepHook | None = None) -> dict[str, torch.Tensor]:
    """Train the stacked networks ``params`` (leading axis N) on ``(x, y)`` by ``recipe``.

    All networks see the same batches and augmentations; they differ by initialisation.
    ``y`` holds class indices or soft-label probability rows. ``lr`` overrides the
    recipe's learning rate (e.g. a learned one). ``batched`` trains the N networks at once
    with ``vmap`` (default: on CUDA; on CPU one network after another is faster, since
    vmap turns convolutions into grouped ones); both give the same numbers.
    ``on_step(n)`` is called after every optimizer step with the number of networks that
    step moved (1 when they train one after another, N when batched), for progress
    display. Returns the trained stacked parameters.
    """
    if batched is None:
        batched = x.device.type == "cuda"
    if not batched:
        n_nets = next(iter(params.values())).shape[0]
        alone = [train_networks(net, {k: v[i:i + 1] for k, v in params.items()}, x, y,
                                recipe, seed, lr, batched=True, on_step=on_step)
                 for i in range(n_nets)]
        return {k: torch.cat([a[k] for a in alone]) for k in params}
    opt = recipe.inner_optimizer(float(lr) if lr is not None else None)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(functional_call(net, p, (xb,)), yb)

    group = next(iter(params.values())).shape[0]
    one = group == 1
    grad_fn = grad(loss)
    batched_grad = vmap(grad_fn, in_dims=(0, None, None))
    state = opt.init(params)
    with torch.no_grad():
        for _ in range(recipe.steps):
            if recipe.batch_size is None or recipe.batch_size >= n:
                xb, yb = x, y
            else:
                idx = torch.randint(0, n, (recipe.batch_size,), generator=gen).to(x.device)
                xb, yb = x[idx], y[idx]
            if recipe.augment.active:
                xb = recipe.augment(xb, recipe.augment.draw(xb.shape[0], gen))
            if one:  # a single network: a plain gradient, no vmap
                g = grad_fn({k: v[0] for k, v in params.items()}, xb, yb)
                g = {k: v.unsqueeze(0) for k, v in g.items()}
            else:
                g = batched_grad(params, xb, yb)
            params, state = opt.step(params, g, state, {})
            if on_step is not None:
                on_step(group)
    return params


def accuracies(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, chunk: int = 2048) -> list[float]:
    """Test accuracy of each of the stacked networks on ``(x, y)``.

    One network at a time: on large test sets a plain forward pass is faster than
    ``vmap`` over the weights (which turns convolutions into grouped ones)."""
    n = next(iter(params.values())).shape[0]
    out = []
    with torch.no_grad():
        for k in range(n):
            p = {name: v[k] for name, v in params.items()}
            correct = sum(int((functional_call(net, p, (x[i:i + chunk],)).argmax(-1)
                               == y[i:i + chunk]).sum()) for i in range(0, x.shape[0], chunk))
            out.append(correct / x.shape[0])
    return out


def evaluate(make_net: NetFactory, train_x: torch.Tensor, train_y: torch.Tensor,
             test_x: torch.Tensor, test_y: torch.Tensor, recipe: Recipe, n_nets: int = 5,
             seed: int = 0, lr: torch.Tensor | float | None = None,
             on_step: StepHook | None = None) -> EvalResult:
    """Train ``n_nets`` fresh networks (seeds ``seed*1000 + i``) on ``(train_x, train_y)``
    only and return their test accuracies. Deterministic for a given seed. ``on_step`` as
    in :func:`train_networks` (progress display).

    Raises:
        ValueError: ``n_nets < 1``, or ``train_x`` and ``train_y`` differ in length.
    """
    if n_nets < 1:
        raise ValueError(f"n_nets must be >= 1, got {n_nets}")
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} images but train_y "
                         f"{train_y.shape[0]} labels")
    net, params = init_networks(make_net, [seed * 1000 + i for i in range(n_nets)],
                                train_x.device, train_x.dtype)
    params = train_networks(net, params, train_x, train_y, recipe, seed=seed, lr=lr,
                            on_step=on_step)
    return EvalResult(tuple(accuracies(net, params, test_x, test_y)))


def random_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, num_classes: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random real examples of every class (seeded), ordered by class."""
    gen = torch.Generator().manual_seed(int(seed))
    idx = []
    for k in range(num_classes):
        pool = torch.nonzero(y.cpu() == k).flatten()
        if pool.numel() < per_class:
            raise ValueError(f"class {k} has {pool.numel()} training examples, "
                             f"fewer than {per_class} per class")
        idx.append(pool[torch.randperm(pool.numel(), generator=gen)[:per_class]])
    sel = torch.cat(idx).to(x.device)
    return x[sel], y[sel]
