"""Data hyper-cleaning on digits: Optuna picks the recipe, hypergradients learn 800 weights.

Half of the 800 training labels are flipped (each to a random other class); 200 clean
validation examples are all we trust. Each training example i gets a weight σ(h_i) in the
inner loss, and the validation loss is minimised over h by hypergradients (Franceschi et
al., 2017). Optuna chooses the estimator, T, the learning rates, the inner weight decay and
the start of h (all zero, or ±c from a classifier fitted on the validation examples the
hypergradients use) around it, and its trials are pruned on their validation curve. An
example is flagged as noisy when σ(h_i) < 0.5. Compared with no cleaning, the validation
set alone, the oracle (clean examples only) and Optuna alone over the plain fit's learning
rate and weight decay with the same wall clock.
Run:  python examples/hyper_cleaning.py [--budget-seconds 30]
"""

import argparse
import time

import optuna
import torch

from bilevel import cleaning

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--budget-seconds", type=float, default=30.0,
                    help="wall clock of each search (Optuna alone, hybrid)")
parser.add_argument("--seed", type=int, default=0, help="splits, flips and initialisation")
args = parser.parse_args()
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
start = time.perf_counter()

# 800 noisy training / 200 clean validation / 797 clean test examples, standardised.
data = cleaning.load_cleaning_data("digits", n_train=800, n_val=200, noise=0.5, seed=args.seed)
print(f"{data.name}: {int(data.flipped.sum())} training labels flipped")


def show(study, trial):  # one line per hybrid trial
    value = "pruned" if trial.value is None else f"held-out loss {trial.value:.3f}"
    print(f"  trial {trial.number:2d} {trial.params['estimator']:9s} T={trial.params['steps']:<3d}"
          f" h0={trial.params['h_init']:8s} {trial.state.name.lower():8s} {value}")


results = [
    cleaning.no_cleaning(data, seed=args.seed),
    cleaning.validation_only(data, seed=args.seed),
    cleaning.oracle(data, seed=args.seed),
    cleaning.optuna_alone(data, args.budget_seconds, seed=args.seed),
    cleaning.hybrid(data, args.budget_seconds, seed=args.seed, callback=show),
]
print(f"\n{'method':34s} {'test acc':>8s} {'flag F1':>8s} {'seconds':>8s}")
for r in results:
    f1 = "-" if r.f1 is None else f"{r.f1:.3f}"
    print(f"{r.method:34s} {100 * r.test_acc:7.1f}% {f1:>8s} {r.seconds:8.1f}")
best = results[-1]
chosen = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in best.params.items()}
print(f"\nhybrid's choice: {chosen}")
weights = best.weights
print(f"mean weight of clean examples {weights[~data.flipped].mean():.2f}, "
      f"of flipped ones {weights[data.flipped].mean():.2f}")
print(f"total {time.perf_counter() - start:.0f} s")
