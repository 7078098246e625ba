"""Benchmark of data hyper-cleaning (:mod:`bilevel.cleaning`): the hybrid Optuna search.

Usage::

    python benchmarks/hyper_cleaning.py --dataset digits --seeds 0,1,2 --budget-seconds 90 \\
        --json benchmarks/results/hyper_cleaning_digits.json \\
        --plot docs/img/hyper_cleaning_weights.png
    python benchmarks/hyper_cleaning.py --dataset fashion_mnist --seeds 0,1,2 \\
        --budget-seconds 90 --json benchmarks/results/hyper_cleaning_fashion_mnist.json
    # add (or redo) some methods in an existing file, the other rows kept as they are:
    python benchmarks/hyper_cleaning.py --dataset digits --seeds 0,1,2,3,4 \\
        --only disagreement --merge --json benchmarks/results/hyper_cleaning_digits.json

Per seed (the seed draws the splits, the flips, the network initialisation and the
samplers), on a training split with 50 % of its labels flipped (each to a uniformly random
other class), a small clean validation split and a clean test split:

- no cleaning, the validation set alone, the oracle (clean training examples only);
- validation-classifier disagreement: the validation-set-alone classifier drops the
  training examples whose label it disagrees with (a detector with no hypergradient);
- hyper-cleaning at one fixed configuration (unrolled, no search);
- Optuna alone over the plain fit's learning rate and weight decay, ``--budget-seconds``
  of wall clock;
- the hybrid: Optuna over estimator, T, outer and inner learning rates, the inner weight
  decay and the start of h (all zero, or ±c by the agreement of a classifier fitted on the
  hypergradient half of the validation split with the training label, c drawn too),
  hypergradients learning one weight per training example inside each trial (half the
  validation split drives the hypergradients, the other half scores the trials), the same
  wall clock (the detector's fit included).

Every method's final model follows one rule (see :mod:`bilevel.cleaning`): a fresh MLP
fitted on the training split weighted by the method's example weights plus the validation
split (``test_acc``; ``test_acc_train_only`` without the validation split), its weight
decay chosen by 2-fold cross-validation on the validation split (Optuna alone: its own
learning rate and weight decay). Searches and selections see the validation split only.
Flags: ``σ(h_i) < 0.5``; F1 with the flipped examples as the positive class. Default
sizes: digits 800 train / 200 validation / 797 test (the rest); Fashion-MNIST 1000 train /
250 validation (drawn from the official training images) / 10000 test (the official test
images), the digits proportions on 784 features. Progress goes to stderr, a line per
trial.

``--only KEYS`` runs only some methods (keys: ``no_cleaning``, ``validation_only``,
``oracle``, ``disagreement``, ``hyper_cleaning``, ``optuna_alone``, ``hybrid``);
with ``--merge`` their rows replace the rows of the same methods in the existing ``--json``
file (``summary`` and ``per_seed``; the rest is kept) and ``meta.later_runs`` records which
methods were added later, with which command. A merge requires the file's dataset, seeds,
sizes and the settings the merged methods depend on. ``--plot`` needs ``hybrid`` among the
methods run (it draws the first seed's hybrid weights); with ``--merge`` its table shows
every row of the merged file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from bilevel import cleaning  # noqa: E402

SIZES = {"digits": (800, 200, None), "fashion_mnist": (1000, 250, 10000)}
#: method key (for --only) -> the method's name in the results, in table order
METHODS = {
    "no_cleaning": "no cleaning",
    "validation_only": "validation set alone",
    "oracle": "oracle (clean examples only)",
    "disagreement": "validation-classifier disagreement",
    "hyper_cleaning": "hyper-cleaning (unrolled, fixed)",
    "optuna_alone": "Optuna alone (lr, weight decay)",
    "hybrid": "hybrid (Optuna + hypergradients)",
}
#: the settings every method depends on, and those of some methods only (a merge checks them)
COMMON_SETTINGS = ("dataset", "noise", "model", "hidden")
METHOD_SETTINGS = {"hyper_cleaning": ("outer_steps",),
                   "optuna_alone": ("budget_seconds", "trials"),
                   "hybrid": ("budget_seconds", "trials", "outer_steps")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trial_logger(tag: str):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in trial.params.items())
        secs = trial.duration.total_seconds() if trial.duration else 0.0
        log(f"  [{tag}] trial {trial.number:3d} {trial.state.name:8s} value {value} "
            f"({params}) {secs:.1f}s")
    return callback


def run_seed(args: argparse.Namespace, seed: int, keys: list[str]
             ) -> tuple[list[cleaning.MethodResult], Any]:
    """The methods ``keys`` (in :data:`METHODS` order) on the task of ``seed``."""
    n_train, n_val, n_test = SIZES[args.dataset]
    data = cleaning.load_cleaning_data(args.dataset, n_train, n_val, args.noise, seed, n_test)
    log(f"seed {seed}: {data.name}")
    kw = dict(model=args.model, hidden=args.hidden, seed=seed)
    base = cleaning.CleaningConfig(model=args.model, hidden=args.hidden,
                                   outer_steps=args.outer_steps)
    trials = args.trials or None
    runs = {
        "no_cleaning": lambda: cleaning.no_cleaning(data, **kw),
        "validation_only": lambda: cleaning.validation_only(data, **kw),
        "oracle": lambda: cleaning.oracle(data, **kw),
        "disagreement": lambda: cleaning.disagreement(data, **kw),
        "hyper_cleaning": lambda: cleaning.hyper_cleaning(data, base, seed),
        "optuna_alone": lambda: cleaning.optuna_alone(
            data, args.budget_seconds, trials, **kw,
            callback=trial_logger("optuna") if args.verbose else None),
        "hybrid": lambda: cleaning.hybrid(data, args.budget_seconds, trials, base, seed,
                                          callback=trial_logger("hybrid")),
    }
    results = []
    for key in keys:
        r = runs[key]()
        assert r.method == METHODS[key], (r.method, METHODS[key])
        extra = "".join([f", F1 {r.f1:.3f}" if r.f1 is not None else "",
                         f", {r.trials}" if r.trials is not None else "",
                         f", {r.params}" if key == "hybrid" else ""])
        log(f"  {r.method}: test acc {r.test_acc:.4f}{extra} ({r.seconds:.1f}s)")
        results.append(r)
    return results, data


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(per_seed: list[list[cleaning.MethodResult]]) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(r.method for r in per_seed[0]):
        rs = [seed_results[i] for seed_results in per_seed]
        assert all(r.method == name for r in rs)
        row: dict[str, Any] = {"method": name}
        for key in ("test_acc", "test_acc_train_only", "precision", "recall", "f1", "seconds"):
            m, s = mean_std([getattr(r, key) for r in rs])
            row[key] = {"mean": m, "std": s}
        rows.append(row)
    return rows


def fmt(cell: dict[str, Any], pct: bool = True, digits: int = 1) -> str:
    if cell["mean"] is None:
        return "—"
    if pct:
        return f"{100 * cell['mean']:.{digits}f} ± {100 * cell['std']:.{digits}f}"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"| {'method':34s} | test acc % (train+val) | test acc % (train only) | "
            f"flag F1 | precision | recall | seconds |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r['method']:34s} | {fmt(r['test_acc']):22s} | "
                     f"{fmt(r['test_acc_train_only']):23s} | {fmt(r['f1'], False):7s} | "
                     f"{fmt(r['precision'], False):9s} | {fmt(r['recall'], False):6s} | "
                     f"{r['seconds']['mean']:7.1f} |")
    return "\n".join(lines)


def method_order(name: str) -> int:
    """A row's place in the table: :data:`METHODS` order, unknown names last."""
    names = list(METHODS.values())
    return names.index(name) if name in names else len(names)


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows with those of ``new``'s methods replaced (or added), in table order."""
    replaced = {r["method"] for r in new}
    rows = [r for r in old if r["method"] not in replaced] + list(new)
    return sorted(rows, key=lambda r: method_order(r["method"]))


def parse_only(text: str | None) -> list[str]:
    """The method keys of ``--only`` (all of them without it), in :data:`METHODS` order."""
    if text is None:
        return list(METHODS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise SystemExit(f"--only: unknown method key(s) {unknown or text!r}; choose from "
                         f"{', '.join(METHODS)}")
    return [k for k in METHODS if k in keys]


def check_mergeable(old: dict[str, Any], args: argparse.Namespace, keys: list[str],
                    seeds: list[int], sizes: dict[str, Any]) -> None:
    """Refuse a merge whose rows would not be comparable with the file's."""
    problems = []
    if sorted(int(s) for s in old.get("per_seed", {})) != sorted(seeds):
        problems.append(f"seeds {seeds} != the file's {sorted(map(int, old['per_seed']))}")
    if old.get("sizes") != sizes:
        problems.append(f"sizes {sizes} != the file's {old.get('sizes')}")
    settings = old.get("settings", {})
    needed = set(COMMON_SETTINGS).union(*(METHOD_SETTINGS.get(k, ()) for k in keys))
    for name in sorted(needed):
        if settings.get(name) != getattr(args, name):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)!r} != the "
                            f"file's {settings.get(name)!r}")
    if problems:
        raise SystemExit(f"--merge into {args.json}: " + "; ".join(problems))


def plot(path: Path, weights: torch.Tensor, flipped: torch.Tensor, title: str,
         rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axt) = plt.subplots(1, 2, figsize=(12, 4.2),
                                  gridspec_kw={"width_ratios": [1.25, 1]})
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[~flipped].tolist(), bins=bins, alpha=0.7, label="clean labels",
            color="tab:blue")
    ax.hist(weights[flipped].tolist(), bins=bins, alpha=0.7, label="flipped labels",
            color="tab:red")
    ax.axvline(cleaning.THRESHOLD, color="k", ls="--", lw=1, label="flag threshold 0.5")
    ax.set_yscale("log")
    ax.set_xlabel("learned example weight σ(h_i)")
    ax.set_ylabel("training examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    axt.axis("off")
    cells = [[r["method"], fmt(r["test_acc"]), fmt(r["f1"], False)] for r in rows]
    tab = axt.table(cellText=cells, colLabels=["method", "test acc %", "flag F1"],
                    loc="center", colWidths=[0.58, 0.24, 0.2], cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=cleaning.DATASETS, default="digits")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--budget-seconds", type=float, default=90.0,
                        help="wall clock of each search (Optuna alone, hybrid) per seed")
    parser.add_argument("--trials", type=int, default=0,
                        help="also stop each search after this many trials (0: budget only)")
    parser.add_argument("--outer-steps", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--model", choices=cleaning.MODELS, default="mlp")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--verbose", action="store_true", help="log Optuna-alone trials too")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated method keys to run (default: all): "
                             + ", ".join(METHODS))
    parser.add_argument("--merge", action="store_true",
                        help="merge the rows of the methods run into the existing --json file "
                             "(replacing those of the same methods, keeping the rest)")
    args = parser.parse_args(argv)
    keys = parse_only(args.only)
    old = None
    if args.merge:
        if args.json is None or not args.json.exists():
            raise SystemExit("--merge needs an existing --json file")
        old = json.loads(args.json.read_text())
    if args.plot and "hybrid" not in keys:
        raise SystemExit("--plot draws the hybrid's weights: include hybrid in --only")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    n_train, n_val, n_test = SIZES[args.dataset]
    if old is not None:
        # n_test None (digits: the rest of the pool) is resolved from the first seed's task
        n_used = n_test if n_test is not None else old.get("sizes", {}).get("test")
        check_mergeable(old, args, keys, seeds, {"train": n_train, "val": n_val,
                                                 "test": n_used})
    start = time.perf_counter()
    per_seed, first, n_test_used = [], None, None
    for seed in seeds:
        results, data = run_seed(args, seed, keys)
        n_test_used = int(data.y_test.numel())
        per_seed.append(results)
        if first is None and keys[-1] == "hybrid":
            first = (results[-1].weights, data.flipped, seed)
    rows = aggregate(per_seed)
    print(f"\n{args.dataset}: {n_train} train ({100 * args.noise:g}% flipped), {n_val} clean "
          f"validation, seeds {seeds}, {args.budget_seconds:g} s per search\n")
    print(table(rows))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    if old is not None:
        if old["sizes"]["test"] != n_test_used:
            raise SystemExit(f"test size {n_test_used} != the file's {old['sizes']['test']}")
        old["summary"] = merge_rows(old["summary"], rows)
        for s, rs in zip(seeds, per_seed, strict=True):
            old["per_seed"][str(s)] = merge_rows(old["per_seed"][str(s)],
                                                 [r.summary() for r in rs])
        if first is not None:
            old.update(weights_seed=first[2], weights=[round(float(w), 5) for w in first[0]],
                       flipped=[bool(f) for f in first[1]])
        later = old.setdefault("meta", {}).setdefault("later_runs", [])
        later.append({
            "methods": [METHODS[k] for k in keys], "keys": keys, "seeds": seeds,
            "command": shlex.join(["python", *sys.argv]) if argv is None
            else shlex.join(["python", "benchmarks/hyper_cleaning.py", *argv]),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "total_seconds": total})
        args.json.write_text(json.dumps(old, indent=1) + "\n")
        print(f"\nmerged into {args.json}:\n")
        print(table(old["summary"]))
    elif args.json:
        out = {
            "dataset": args.dataset,
            "sizes": {"train": n_train, "val": n_val, "test": n_test_used},
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
            "rule": "final model: fresh network, DEFAULT_RECIPE (Optuna alone: its lr and "
                    "weight decay), on train weighted by the method's weights plus the "
                    "validation split; flags sigma(h) < 0.5",
            "recipe": dataclasses.asdict(cleaning.DEFAULT_RECIPE),
            "summary": rows,
            "per_seed": {str(s): [r.summary() for r in rs]
                         for s, rs in zip(seeds, per_seed, strict=True)},
            "weights_seed": first[2] if first else None,
            "weights": [round(float(w), 5) for w in first[0]] if first else None,
            "flipped": [bool(f) for f in first[1]] if first else None,
            "meta": {"torch": torch.__version__, "optuna": optuna.__version__,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "processor": platform.processor(), "threads": torch.get_num_threads(),
                     "total_seconds": total},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot and first is not None:
        plot(args.plot, first[0], first[1],
             f"{args.dataset}, seed {first[2]}: hybrid's learned weights "
             f"({int(first[1].sum())} of {len(first[1])} labels flipped)",
             old["summary"] if old is not None else rows)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
