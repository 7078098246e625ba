"""One dataset-distillation outer step: the library against a hand-written autograd BPTT.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/distill_step.py --json FILE [--rounds 40]
        [--ipc 10] [--inner-steps 30] [--dtype float32]
        [--dataset digits|fashion_mnist] [--net mlp|convnet] [--width 128] [--device cpu|cuda]

The case is the default :class:`bilevel.distill.DistillConfig` on sklearn digits (MLP 64-128-10,
IPC 10, soft labels and the log inner learning rate learned, 30 SGD inner steps, unrolled
reverse-mode estimator, outer batch 256). ``library_step`` is :meth:`Distiller.step`;
``hand_step`` does the same outer step written directly on tensors: the same outer batch and
network initialisation, 30 steps ``w ← w − η ∇_w f`` with
``torch.autograd.grad(..., create_graph=True)``, the outer cross-entropy, one
``torch.autograd.grad`` to (images, label logits, log η), the same Adam step and the same
projection of log η. Both run interleaved in one process on one thread; each round times one
step of each with ``time.process_time``; the ratio is of the medians.

``agreement`` is the largest relative difference (2-norm of the difference over the 2-norm,
per hyperparameter) between the two hypergradients at outer step 0 in float64, and
``trajectory_agreement`` the same between the two sets of hyperparameters after all timed
rounds (both sides take the same steps).

``--net convnet`` (the ConvNet of :mod:`bilevel.nets`, e.g. ConvNet-3 at ``--width 128`` on
``--dataset fashion_mnist``) has only the generic hand-written side, which calls the
network through ``torch.func.functional_call``; ``--device cuda`` times by wall clock with
the device synchronised (CPU time means nothing there). Fashion-MNIST is read as
``bilevel distill`` reads it (``$BILEVEL_DATA`` or Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # bench_util
from bench_util import hardware, positive_int  # noqa: E402

import hypergrad as hg  # noqa: E402
from bilevel.data import load_digits  # noqa: E402
from bilevel.datasets import load_dataset  # noqa: E402
from bilevel.distill import DistillConfig, Distiller  # noqa: E402


@dataclass
class Case:
    """A library distiller and the hand-written side's own copy of the same state."""

    distiller: Distiller
    hparams: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: int = 0
    layers: list[str] = field(default_factory=list)
    explicit: bool = True


def build_case(ipc: int = 10, inner_steps: int = 30, dtype: str = "float32",
               seed: int = 0, data: Any = None, explicit: bool = True, net: str = "mlp",
               width: int = 128, device: str = "cpu") -> Case:
    """The default digits distillation (MLP, ``ipc`` images per class, ``inner_steps`` SGD
    steps, unrolled estimator) as a :class:`Distiller` plus the hand-written side's
    hyperparameters (equal copies) and Adam optimizer (the same groups and rates).

    ``data`` defaults to :func:`bilevel.data.load_digits`. ``explicit``: the hand-written
    side writes the MLP out with ``F.linear`` (else it calls ``torch.func.functional_call``
    on the network, as a hand-written BPTT for any network would).
    """
    cfg = DistillConfig(ipc=ipc, inner_steps=inner_steps, dtype=dtype, seed=seed, net=net,
                        width=width, device=device)
    if cfg.augment.active or cfg.inner_optimizer != "sgd":
        raise ValueError("the hand-written side covers SGD without augmentation only")
    if net != "mlp" and explicit:
        raise ValueError("the F.linear hand-written side covers the MLP only: explicit=False")
    d = Distiller(load_digits() if data is None else data, cfg)
    return hand_side(d, explicit)


def hand_side(d: Distiller, explicit: bool = True) -> Case:
    """A :class:`Case` on distiller ``d`` whose hand-written side starts from ``d``'s current
    hyperparameters (copies) with a fresh Adam optimizer of the same groups and rates."""
    cfg = d.config
    hparams = {k: v.detach().clone().requires_grad_() for k, v in d.hparams.items()}
    rates = {"images": cfg.image_lr, "labels": cfg.label_lr, "log_lr": cfg.lr_lr}
    optimizer = torch.optim.Adam([{"params": [v], "lr": rates[k]} for k, v in hparams.items()])
    layers = [type(m).__name__ for m in d.net.net] if hasattr(d.net, "net") else []
    return Case(d, hparams, optimizer, step=d.step_count, layers=layers, explicit=explicit)


def _mlp(layers: list[str], params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP of ``bilevel.nets`` written out: flatten, (linear, relu)*, linear."""
    it = iter(params)
    for name in layers:
        if name == "Flatten":
            x = x.flatten(1)
        elif name == "Linear":
            x = F.linear(x, next(it), next(it))
        elif name == "ReLU":
            x = F.relu(x)
        else:
            raise ValueError(f"hand-written MLP: unexpected layer {name}")
    return x


def hand_hypergrad(case: Case, hparams: dict[str, torch.Tensor], step: int,
                   explicit: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """∇_λ of the outer loss after ``config.inner_steps`` SGD steps, by plain BPTT, at outer
    step ``step`` (its outer batch and network initialisation); returns (grads, loss)."""
    d = case.distiller
    cfg = d.config
    seed = hg.mix_seed(cfg.seed, step)
    gen = torch.Generator().manual_seed(seed)
    n = d.train_x.shape[0]
    idx = torch.randperm(n, generator=gen)[:min(cfg.outer_batch, n)].to(d.train_x.device)
    xo, yo = d.train_x[idx], d.train_y[idx]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU alone, as the library
        net: nn.Module = d.make_net().to(device=cfg.device, dtype=cfg.torch_dtype)
    names = [k for k, _ in net.named_parameters()]
    params = [p.detach().requires_grad_() for p in net.parameters()]

    def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if explicit:
            return _mlp(case.layers, params, x)
        return functional_call(net, dict(zip(names, params, strict=True)), (x,))

    images = hparams["images"]
    targets = F.softmax(hparams["labels"], dim=-1)
    lr = hparams["log_lr"].exp()
    for _ in range(cfg.inner_steps):
        logits = forward(params, images)
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - lr * g for p, g in zip(params, grads, strict=True)]
    outer = F.cross_entropy(forward(params, xo), yo)
    keys = list(hparams)
    g = torch.autograd.grad(outer, [hparams[k] for k in keys])
    return dict(zip(keys, g, strict=True)), outer.detach()


def hand_step(case: Case) -> float:
    """One hand-written outer step (hypergradient, Adam, projection of log η); returns the
    outer loss."""
    cfg = case.distiller.config
    grads, loss = hand_hypergrad(case, case.hparams, case.step, case.explicit)
    for k, v in case.hparams.items():
        v.grad = grads[k]
    case.optimizer.step()
    case.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        case.hparams["log_lr"].clamp_(max=math.log(cfg.max_lr))
    case.step += 1
    return float(loss)


def library_step(case: Case) -> float:
    """One :meth:`Distiller.step`; returns the outer loss."""
    return float(case.distiller.step()["outer_loss"])


def library_hypergrad(case: Case, step: int) -> dict[str, torch.Tensor]:
    """The library's hypergradient at the distiller's current hyperparameters and outer
    step ``step`` (the estimator called as the outer loop calls it)."""
    d = case.distiller
    problem, w0 = d.problem(step)
    hp = {k: v.detach().clone() for k, v in d.hparams.items()}
    return d.estimator(problem, hp, w0).grad


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over keys of ‖a_k − b_k‖ / ‖b_k‖."""
    return max(float((a[k].detach() - b[k].detach()).norm() / b[k].detach().norm()) for k in b)


def agreement(seed: int = 0, data: Any = None, net: str = "mlp", width: int = 128,
              device: str = "cpu", ipc: int = 10, inner_steps: int = 30) -> float:
    """Relative difference of the two hypergradients at outer step 0 in float64."""
    case = build_case(ipc, inner_steps, dtype="float64", seed=seed, data=data,
                      explicit=net == "mlp", net=net, width=width, device=device)
    hand, _ = hand_hypergrad(case, case.hparams, 0, case.explicit)
    return relative_difference(library_hypergrad(case, 0), hand)


def measure(rounds: int, ipc: int, inner_steps: int, dtype: str, warmup: int = 3,
            dataset: str = "digits", net: str = "mlp", width: int = 128,
            device: str = "cpu") -> dict:
    data = load_digits() if dataset == "digits" else load_dataset(dataset)
    explicit = net == "mlp"
    case = build_case(ipc, inner_steps, dtype, data=data, explicit=explicit, net=net,
                      width=width, device=device)
    case_fc = hand_side(case.distiller, explicit=False)
    sides = {"library": (library_step, case)}
    if explicit:
        sides["hand"] = (hand_step, case)
    sides["hand_functional_call"] = (hand_step, case_fc)
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(warmup):
        for fn, c in sides.values():
            fn(c)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, (fn, c) in sides.items():
            if cuda:
                torch.cuda.synchronize()
            t = clock()
            fn(c)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(clock() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "case": {"dataset": dataset, "net": net, "width": width if net != "mlp" else None,
                 "ipc": ipc, "inner_steps": inner_steps, "estimator": "unrolled",
                 "dtype": dtype, "outer_batch": 256, "device": device},
        "clock": "wall, synchronised" if cuda else "process CPU time",
        "library_median_s": med["library"], "library_seconds": times["library"],
        "ratio_functional_call": med["library"] / med["hand_functional_call"],
        "hand_functional_call_median_s": med["hand_functional_call"],
        "hand_functional_call_seconds": times["hand_functional_call"],
        "rounds": rounds, "warmup": warmup,
        "trajectory_agreement": max(relative_difference(case.distiller.hparams, c.hparams)
                                    for _, c in sides.values() if c is not case or explicit),
        "torch": torch.__version__, "cpu": hardware(), "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if explicit:
        out.update(ratio=med["library"] / med["hand"], hand_median_s=med["hand"],
                   hand_seconds=times["hand"])
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    # float64 agreement on the same kind of case (a smaller one for the ConvNet on a GPU)
    out["agreement_float64"] = agreement(data=data, net=net, width=width if explicit else 16,
                                         device=device, ipc=ipc if explicit else 2,
                                         inner_steps=inner_steps if explicit else 5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rounds", type=positive_int, default=40)
    ap.add_argument("--ipc", type=positive_int, default=10)
    ap.add_argument("--inner-steps", type=positive_int, default=30)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    ap.add_argument("--net", default="mlp", choices=("mlp", "convnet"))
    ap.add_argument("--width", type=positive_int, default=128, help="ConvNet channels")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    out = measure(args.rounds, args.ipc, args.inner_steps, args.dtype, dataset=args.dataset,
                  net=args.net, width=args.width, device=args.device)
    hand = (f"hand {1e3 * out['hand_median_s']:.2f} ms (F.linear), ratio {out['ratio']:.3f}; "
            if "ratio" in out else "")
    print(f"library {1e3 * out['library_median_s']:.2f} ms; {hand}hand "
          f"{1e3 * out['hand_functional_call_median_s']:.2f} ms (functional_call), ratio "
          f"{out['ratio_functional_call']:.3f} ({out['rounds']} rounds); float64 agreement "
          f"{out['agreement_float64']:.2e}, trajectory {out['trajectory_agreement']:.2e}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
