"""Tune the inner learning rate and per-layer weight decay of an MLP on digits.

A 64-64-10 MLP is trained by full-batch SGD for a fixed number of steps from a fixed
initialisation; Adam on (log lr, log weight decay per layer) follows unrolled
hypergradients of the validation loss. Run:  python examples/tune_mlp_digits.py
[--outer-steps 25] [--inner-steps 60]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel.datasets import load_tabular

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--outer-steps", type=int, default=25)
parser.add_argument("--inner-steps", type=int, default=60)
parser.add_argument("--seed", type=int, default=0, help="of the split and the initialisation")
args = parser.parse_args()
start = time.perf_counter()

# Data: digits (1797 x 64), split 50/25/25 % stratified by class, standardised on train.
parts = load_tabular("digits", train=0.5, val=0.25, seed=args.seed)
mu, sd = parts["train"][0].mean(0), parts["train"][0].std(0)
sd = torch.where(sd > 0, sd, torch.ones_like(sd))
train, val, test = [(((x - mu) / sd).float(), y) for x, y in parts.values()]

torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
weights = ["0.weight", "2.weight"]
initial = {"log_lr": torch.tensor(0.05).log(), "log_wd": torch.full((2,), 1e-3).log()}


def loss(out, batch, h):  # cross-entropy on the batch's labels (inner and outer)
    return F.cross_entropy(out, batch[1])


def penalty(p, h):  # per-layer L2 weight decay on the weight matrices
    return 0.5 * sum(h["log_wd"][i].exp() * (p[w] ** 2).sum() for i, w in enumerate(weights))


mp = bilevel.wrap(model, loss, loss, initial, train, val,
                  bilevel.SGD(lr=lambda h: h["log_lr"].exp()), args.inner_steps, penalty=penalty)


def fit(h):  # train the fixed initial network at hyperparameters h
    return mp.export(mp.problem.solve_inner(dict(mp.params), h, args.inner_steps)[0])


def acc(net, batch):
    with torch.no_grad():
        return float((net(batch[0]).argmax(1) == batch[1]).float().mean())


loop = bilevel.OuterLoop(mp.problem, initial, None, bilevel.Unrolled(),
                         lambda hp: torch.optim.Adam(hp, lr=0.1), clip_norm=5.0,
                         reinit=lambda step: dict(mp.params), progress=False)
for r in loop.run(args.outer_steps):
    if r["step"] % 5 == 0 or r["step"] == args.outer_steps - 1:
        print(f"outer step {r['step']:3d}  val loss {r['outer_loss']:.4f}  "
              f"|hypergrad| {r['hypergrad_norm']:.3f}")
tuned = loop.current_hparams()
wd0, wd1 = ([f"{v:.2g}" for v in h["log_wd"].exp().tolist()] for h in (initial, tuned))
print(f"\ninner lr {initial['log_lr'].exp():.3g} -> {tuned['log_lr'].exp():.3g}; "
      f"weight decay per layer {wd0} -> {wd1}")
print(f"{'':<28} {'val acc':>8} {'test acc':>9}")
for name, h in [("untuned (initial values)", initial), ("tuned (hypergradients)", tuned)]:
    net = fit(h)
    print(f"{name:<28} {acc(net, val):8.3f} {acc(net, test):9.3f}")
print(f"total {time.perf_counter() - start:.1f} s")
