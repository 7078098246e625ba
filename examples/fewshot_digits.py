"""Few-shot classification on digits under the 8 symmetries of the square (a mechanics test).

`digits_d4()` turns scikit-learn's 8x8 digits into 80 classes (each digit under each of the
8 rotations and mirror images); `class_splits` divides them into disjoint meta-train (48),
validation (16) and test (16) classes, so every test task is made of classes never seen in
training. For 5-way 1-shot and 5-shot tasks (15 queries per class) the script meta-trains
MAML (optionally first-order MAML and ANIL) on an MLP 64-128-128-5 (or a small ConvNet),
then reports the test accuracy over 600 tasks (mean ± 95% CI) before adaptation, after the
trained number of inner steps and after 5, beside the nearest-centroid classifier on raw
pixels, which needs no training at all.

    python examples/fewshot_digits.py                            # MAML, 1- and 5-shot
    python examples/fewshot_digits.py --algorithms maml,fomaml,anil --net convnet
    python examples/fewshot_digits.py --run-dir runs/fewshot     # checkpoints; rerun resumes
    python examples/fewshot_digits.py --quick                    # smoke run, seconds

What to expect: digits have too few underlying shapes (10 digits, 8 symmetries) for
meta-learning to learn a representation that transfers better than raw pixels, and the
nearest-centroid baseline beats MAML here. This is a test that the machinery works on
classes it never saw, not a benchmark; meta-learning needs many classes (Omniglot: 1623
characters, see `bilevel.meta.load_omniglot`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from bilevel.meta import EpisodeSampler, MetaLearner, class_splits, digits_d4
from bilevel.nets import ConvNet

ALGORITHMS = ("maml", "fomaml", "anil")


def make_model(net: str, ways: int) -> nn.Module:
    if net == "convnet":  # 2 x [conv 3x3 32 channels, instance norm, ReLU, avg-pool], linear
        return ConvNet((1, 8, 8), ways, width=32, depth=2)
    # a plain Sequential: ANIL adapts its last Linear and computes the rest once per task
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128),
                         nn.ReLU(), nn.Linear(128, ways))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="maml",
                        help=f"comma-separated, of {', '.join(ALGORITHMS)} (default maml)")
    parser.add_argument("--shots", default="1,5", help="K values to run (default 1,5)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--net", choices=("mlp", "convnet"), default="mlp")
    parser.add_argument("--steps", type=int, default=2000, help="outer steps")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-lr", type=float, default=0.4,
                        help="inner SGD step (0.4, as MAML on Omniglot)")
    parser.add_argument("--inner-steps", type=int, default=1, help="inner steps in training")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0,
                        help="class split, training tasks and network; validation tasks "
                             "use seed + 1, test tasks seed + 2")
    parser.add_argument("--run-dir", help="run folders (one per algorithm and K) with "
                                          "checkpoints; running again resumes")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 outer steps, 100 test tasks")
    args = parser.parse_args(argv)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or any(a not in ALGORITHMS for a in algorithms):
        parser.error(f"--algorithms: choose from {', '.join(ALGORITHMS)}")
    shots_list = [int(k) for k in args.shots.split(",")]
    if args.quick:
        args.steps, args.test_tasks = 30, 100
    torch.set_num_threads(args.threads)

    x, y = digits_d4()                                   # (14376, 1, 8, 8), 80 classes
    train_cls, val_cls, test_cls = class_splits(80, seed=args.seed)  # 48 / 16 / 16
    print(f"digits_d4: {len(y)} images, 80 classes; meta-train {len(train_cls)}, validation "
          f"{len(val_cls)}, test {len(test_cls)} classes (disjoint)")
    eval_steps = sorted({0, args.inner_steps, 5})
    summary = {"ways": args.ways, "net": args.net, "outer_steps": args.steps,
               "meta_batch": args.meta_batch, "inner_lr": args.inner_lr,
               "inner_steps": args.inner_steps, "test_tasks": args.test_tasks,
               "seed": args.seed, "results": {}}
    rows = []
    for shots in shots_list:
        def sampler(classes: list[int], seed: int, k: int = shots) -> EpisodeSampler:
            return EpisodeSampler(x, y, args.ways, k, queries=15, classes=classes, seed=seed)

        train, val = sampler(train_cls, args.seed), sampler(val_cls, args.seed + 1)
        test = sampler(test_cls, args.seed + 2)
        for algorithm in algorithms:
            torch.manual_seed(args.seed)
            learner = MetaLearner(make_model(args.net, args.ways), algorithm,
                                  inner_lr=args.inner_lr, inner_steps=args.inner_steps)
            run_dir = None if args.run_dir is None else \
                Path(args.run_dir) / f"{algorithm}_{args.net}_{shots}shot"
            loop = learner.outer_loop(
                train, args.meta_batch, lambda p: torch.optim.Adam(p, lr=args.lr),
                validation=val, val_tasks=100, eval_every=max(1, args.steps // 4),
                run_dir=run_dir, checkpoint_every=args.checkpoint_every if run_dir else 0,
                progress=False if args.no_progress else None)
            start = loop.resume() if run_dir is not None else 0
            if start:
                print(f"{algorithm} {shots}-shot: resumed at outer step {start}")
            wall = time.perf_counter()
            history = loop.run(args.steps)
            wall = time.perf_counter() - wall
            loop.close()
            val_acc = [r["eval_accuracy"] for r in history if "eval_accuracy" in r]
            losses = [r["outer_loss"] for r in history[-100:]]
            print(f"{algorithm} {shots}-shot: {max(0, args.steps - start)} outer steps in "
                  f"{wall:.0f} s; meta-train query loss (last 100 steps) "
                  f"{sum(losses) / max(1, len(losses)):.3f}; validation accuracy "
                  + " -> ".join(f"{100 * a:.1f}" for a in val_acc) + " %", flush=True)
            ev = learner.evaluate(test, args.test_tasks, steps=eval_steps, progress=False)
            rows.append((shots, algorithm, ev))
            summary["results"][f"{algorithm}_{shots}shot"] = {
                **ev.to_dict(), "wall_seconds": round(wall, 1),
                "train_query_loss": sum(losses) / max(1, len(losses)),
                "validation_accuracy": val_acc[-1] if val_acc else None}

    print(f"\n{args.ways}-way test accuracy (%) over {args.test_tasks} tasks of unseen classes, "
          f"mean ± 95% CI ({args.net}, {args.steps} outer steps, trained with "
          f"{args.inner_steps} inner step(s) at {args.inner_lr})")
    head = " ".join(f"{f'{s} steps' if s != 1 else '1 step':>13}" for s in eval_steps)
    print(f"{'K':>2} {'method':<9} {head}")
    for shots in shots_list:
        done = [r for r in rows if r[0] == shots]
        for _, algorithm, ev in done:
            cells = " ".join(f"{100 * ev.after[s][0]:6.1f} ± {100 * ev.after[s][1]:4.1f}"
                             for s in eval_steps)
            print(f"{shots:>2} {algorithm:<9} {cells}")
        mean, ci = done[0][2].nearest_centroid
        print(f"{shots:>2} {'centroid':<9} {100 * mean:6.1f} ± {100 * ci:4.1f}  (nearest class "
              f"mean on raw pixels, no training)")
    best = {s: max(100 * max(ev.after[t][0] for t in eval_steps) for k, _, ev in rows if k == s)
            for s in shots_list}
    base = {s: 100 * next(ev for k, _, ev in rows if k == s).nearest_centroid[0]
            for s in shots_list}
    behind = [s for s in shots_list if best[s] < base[s]]
    print()
    if args.quick:
        print("(--quick: a smoke run; these numbers mean nothing)")
    elif behind:
        adapted = "; ".join(f"K = {s}: {best[s]:.1f} vs {base[s]:.1f}" for s in behind)
        print(f"What this shows: the meta-learned networks adapt to classes they never saw "
              f"(chance is {100 / args.ways:.0f}%), so the machinery works (class splits, "
              f"episodes, adaptation, evaluation); but the nearest-centroid classifier on raw "
              f"pixels, with no training at all, is ahead ({adapted}). Digits offer 10 shapes "
              f"under 8 symmetries: {len(train_cls)} meta-training classes are too few and "
              f"too alike for a meta-learned initialisation to beat raw pixels. This is "
              f"a mechanics test, not evidence for or against meta-learning, "
              f"which needs many classes (Omniglot's 1623 characters).")
    else:
        print("The meta-learned networks match or beat the nearest-centroid baseline here.")
    print("Reference (TARGETS.md): MAML by hand 56.6 / 61.4 at 1 / 5 shots, nearest centroid "
          "80.7 / 93.1.")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
