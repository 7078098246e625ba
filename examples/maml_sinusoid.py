"""MAML (and iMAML) on the sinusoid regression of Finn et al. (ICML 2017).

Each task is y = A sin(x - φ) with A ~ U[0.1, 5], φ ~ U[0, π] and x ~ U[-5, 5]; the
learner sees K points of it (the support set) and must predict the curve. An MLP 1-40-40-1
(ReLU) is meta-trained on meta-batches of 25 tasks by Adam at 1e-3, with one inner SGD step
at α = 0.01 (the paper's setting), until a single step from the learned initialisation fits
a new sinusoid. Then, on 600 test tasks of a sampler with its own seed, the script prints
the query MSE (mean ± 95% CI) after 0, 1 and 10 inner steps for K = 5, 10 and 20 (the model
trained at --shots; other K just use samplers with other shots), and plots four test tasks.

    python examples/maml_sinusoid.py                          # MAML, K = 10, 70000 steps
    python examples/maml_sinusoid.py --algorithms maml,imaml  # iMAML beside it
    python examples/maml_sinusoid.py --run-dir runs/sinusoid  # checkpoints; rerun resumes
    python examples/maml_sinusoid.py --quick                  # smoke run, a few seconds

iMAML (Rajeswaran et al., 2019) solves the proximal inner problem
argmin_φ L_support(φ) + λ/2 ‖φ - θ‖² by gradient descent and needs it nearly solved. Its
classification recipe (λ = 2, a few steps) fails on this regression: at small λ the CG
system (I + H/λ) of the non-convex MSE is indefinite, and at larger λ the meta-learner
raises the curvature until the inner steps blow up (its meta-gradient does not see the
inner step size). The recipe here, chosen on the validation tasks:
λ = 5, 40 inner steps at α = 0.005, 5 CG steps (damping 1), Adam 1e-3 decayed by a cosine
to 5e-5 over 3000 outer steps (the decay stops the drift before it diverges).

Validation tasks (seed + 1) are the only ones used for choices; test tasks are seed + 2.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bilevel.meta import MetaLearner, SinusoidTasks

ALGORITHMS = ("maml", "fomaml", "metasgd", "imaml")
DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "maml_sinusoid.png"


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


def recipe(algorithm: str, args: argparse.Namespace) -> tuple[dict, int, object]:
    """MetaLearner settings, outer steps and scheduler factory of one algorithm."""
    if algorithm == "imaml":
        steps = args.imaml_steps
        learner = {"inner_lr": 0.005, "inner_steps": 40, "lam": 5.0, "cg_steps": 5,
                   "cg_damping": 1.0}

        def scheduler(opt: torch.optim.Optimizer) -> object:
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=5e-5)

        return learner, steps, scheduler
    return {"inner_lr": 0.01, "inner_steps": 1}, args.steps, None


def train(algorithm: str, args: argparse.Namespace, tasks: SinusoidTasks,
          validation: SinusoidTasks) -> tuple[MetaLearner, dict]:
    """Meta-train one algorithm (resuming from --run-dir when it holds the run)."""
    settings, steps, scheduler = recipe(algorithm, args)
    torch.manual_seed(args.seed)  # the same initial network for every algorithm
    learner = MetaLearner(make_model(), algorithm, **settings)
    run_dir = None if args.run_dir is None else Path(args.run_dir) / algorithm
    loop = learner.outer_loop(
        tasks, args.meta_batch, lambda p: torch.optim.Adam(p, lr=args.lr),
        validation=validation, val_tasks=100, eval_every=max(1, steps // 10),
        run_dir=run_dir, checkpoint_every=args.checkpoint_every if run_dir else 0,
        scheduler=scheduler, progress=False if args.no_progress else None)
    start = loop.resume() if run_dir is not None else 0
    if start:
        print(f"{algorithm}: resumed at outer step {start} from {run_dir}"
              + (f" (>= --steps {steps}: nothing to train)" if start >= steps
                 else ""))
    wall, cpu = time.perf_counter(), time.process_time()
    history = loop.run(steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    val = [r for r in history if "eval_mse" in r]
    info = {"settings": settings, "outer_steps": loop.global_step, "meta_batch": args.meta_batch,
            "outer_lr": args.lr, "cosine_decay": scheduler is not None,
            "steps_this_run": max(0, steps - start), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "validation_mse": None if not val else [val[-1]["eval_mse"],
                                                     val[-1]["eval_mse_ci95"]]}
    loop.close()
    print(f"{algorithm}: {max(0, steps - start)} outer steps in {wall:.0f} s ({cpu:.0f} s CPU); "
          f"validation MSE after {settings['inner_steps']} step(s): "
          + ("-" if not val else f"{val[-1]['eval_mse']:.3f} ± {val[-1]['eval_mse_ci95']:.3f}"
             f" (100 tasks)"), flush=True)
    return learner, info


def plot(path: Path, learners: dict[str, MetaLearner], shots: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = SinusoidTasks(shots, seed=seed).sample(4, 0)  # the first 4 test tasks
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1).expand(4, -1, -1)
    truth = SinusoidTasks.curve(tasks, grid)
    fig, axes = plt.subplots(len(learners), 4, figsize=(13, 3 * len(learners)),
                             squeeze=False, sharex=True)
    for row, (name, learner) in enumerate(learners.items()):
        steps = sorted({0, 1, 10, learner.inner_steps})
        preds = {s: learner.predict(grid, learner.adapt(tasks, steps=s)) for s in steps}
        for col, ax in enumerate(axes[row]):
            ax.plot(grid[col, :, 0], truth[col, :, 0], "k", lw=2, label="true curve")
            for s, style in zip(steps, (":", "--", "-", "-."), strict=False):
                label = "before adaptation" if s == 0 else f"after {s} step{'s' * (s > 1)}"
                ax.plot(grid[col, :, 0], preds[s][col, :, 0], style, label=label)
            ax.plot(tasks.support_x[col, :, 0], tasks.support_y[col, :, 0], "o", color="C3",
                    label=f"{shots} support points")
            if col == 0:
                ax.set_ylabel(name)
            if row == 0:
                amp, ph = tasks.info["amplitude"][col], tasks.info["phase"][col]
                ax.set_title(f"test task {col}: A = {amp:.2f}, φ = {ph:.2f}")
        axes[row][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="maml",
                        help=f"comma-separated, of {', '.join(ALGORITHMS)} (default maml)")
    parser.add_argument("--shots", type=int, default=10, help="K support points in training")
    parser.add_argument("--steps", type=int,
                        help="outer steps of maml / fomaml / metasgd (70000, as the paper)")
    parser.add_argument("--imaml-steps", type=int, help="outer steps of imaml (3000)")
    parser.add_argument("--meta-batch", type=int, default=25, help="tasks per outer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--test-tasks", type=int, help="test tasks per K (600)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training tasks and initial network; validation tasks use "
                             "seed + 1, test tasks seed + 2")
    parser.add_argument("--run-dir", help="run folders (one per algorithm) with checkpoints; "
                                          "running again resumes")
    parser.add_argument("--checkpoint-every", type=int, default=5000)
    parser.add_argument("--plot", type=Path, help="PNG of 4 test tasks (default "
                                                  "docs/img/maml_sinusoid.png; none with "
                                                  "--quick unless given)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small net: 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 (imaml 20) outer steps, 100 test tasks, no plot "
                             "(unless given)")
    args = parser.parse_args(argv)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        parser.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    defaults = (300, 20, 100) if args.quick else (70000, 3000, 600)
    for key, value in zip(("steps", "imaml_steps", "test_tasks"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None and not args.quick:
        args.plot = DEFAULT_PLOT
    torch.set_num_threads(args.threads)

    tasks = SinusoidTasks(args.shots, seed=args.seed)  # K support + 10 query points per task
    validation = SinusoidTasks(args.shots, queries=100, seed=args.seed + 1)
    learners, summary = {}, {"shots": args.shots, "test_tasks": args.test_tasks,
                             "seed": args.seed, "algorithms": {}}
    for algorithm in algorithms:
        learners[algorithm], summary["algorithms"][algorithm] = train(algorithm, args, tasks,
                                                                      validation)

    print(f"\ntest MSE over {args.test_tasks} tasks (100 query points each), mean ± 95% CI; "
          f"every model trained at K = {args.shots}")
    print(f"{'algorithm':<10} {'K':>3} {'0 steps':>15} {'1 step':>15} {'10 steps':>15}"
          f"  T steps (iMAML's inner solve)")
    notes: list[str] = []
    for name, learner in learners.items():
        steps = sorted({0, 1, 10, learner.inner_steps})
        results = summary["algorithms"][name]["test"] = {}
        for k in (5, 10, 20):
            test = SinusoidTasks(k, queries=100, seed=args.seed + 2)
            with warnings.catch_warnings():  # diverged tasks are reported below
                warnings.simplefilter("ignore", RuntimeWarning)
                ev = learner.evaluate(test, args.test_tasks, steps=steps, progress=False)
            results[str(k)] = {str(s): [round(m, 4), round(c, 4)] for s, (m, c)
                               in ev.after.items()}
            cells = [f"{ev.after[s][0]:.3f} ± {ev.after[s][1]:.3f}" for s in steps]
            for s, bad in ev.diverged.items():  # the inner steps blew up on some tasks
                mean, ci = ev.after[s]
                notes.append(f"{name}, K = {k}, {s} steps: the inner loop diverged on "
                             f"{bad} of {args.test_tasks} tasks (MSE -> inf); the "
                             f"others: {mean:.3f} ± {ci:.3f}")
                cells[steps.index(s)] = f"div. on {bad}*"
                results[str(k)][f"{s}_diverged_tasks"] = bad
            extra = f" {cells[steps.index(learner.inner_steps)]} (T = {learner.inner_steps})" \
                if learner.inner_steps not in (0, 1, 10) else ""
            print(f"{name:<10} {k:>3} " + " ".join(f"{cells[steps.index(s)]:>15}"
                                                  for s in (0, 1, 10)) + extra)
    for note in notes:
        print(f"* {note}")
    if args.quick:
        print("\n(--quick: a smoke run; these numbers mean nothing)")
    elif "maml" in learners:
        mean, ci = summary["algorithms"]["maml"]["test"][str(args.shots)]["1"]
        verdict = "met" if mean <= 0.35 else "NOT met"
        print("\nTARGETS.md: MAML at K = 10 after one step, test MSE <= 0.35 "
              "(hand-written MAML 0.43, published 0.4-0.8, unadapted ~3): "
              + (f"{mean:.3f} ± {ci:.3f} -> {verdict}" if args.shots == 10 else
                 f"not measured (trained at K = {args.shots})"))
    if args.plot is not None:
        plot(args.plot, learners, args.shots, args.seed + 2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
