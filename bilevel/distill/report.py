"""The evaluation protocol of a distilled set, and the output folder of a run.

:func:`protocol` trains fresh networks on the distilled set, on a random real subset of
the same size (same networks, same seeds) and on the full training set, and returns the
three test accuracies; :func:`write_outputs` saves images, curves, tensors and a JSON
summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..run_folder import RunFolder
from ..sinks import BASE_COLUMNS
from .core import DistilledSet, Distiller
from .evaluate import EvalResult, Recipe, evaluate, random_subset

#: a standard recipe for real images: Adam, lr 1e-3 (full batch on small sets)
STANDARD = Recipe(steps=300, lr=1e-3, optimizer="adam")


@dataclass(frozen=True)
class Report:
    """Test accuracies: distilled set, random real subset (same size), full data."""

    distilled: EvalResult
    random: EvalResult
    full: float
    random_recipe: str
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self, ipc: int) -> str:
        """A plain-text table of the three results."""
        rows = [("distilled", str(self.distilled)),
                (f"random real subset ({self.random_recipe})", str(self.random)),
                ("full training set (1 network)", f"{100 * self.full:.2f} %")]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'training set, ' + str(ipc) + ' per class':<{width}}   test accuracy",
                 "-" * (width + 28)]
        lines += [f"{name:<{width}}   {value}" for name, value in rows]
        return "\n".join(lines)


def protocol(distiller: Distiller, distilled: DistilledSet | None = None, n_nets: int = 5,
             seed: int = 0, full_steps: int = 500, baseline: Recipe = STANDARD) -> Report:
    """Evaluate ``distilled`` (default: the distiller's current set) by the protocol.

    * distilled: ``n_nets`` fresh networks trained by the distillation's inner recipe at
      the (learned) learning rate;
    * random subset: IPC random real images per class, the same ``n_nets`` seeds, trained
      by the same inner recipe *and* by ``baseline``; the better of the two is reported
      (the baseline gets its best shot);
    * full data: one network trained by ``baseline`` for ``full_steps`` minibatch steps.
    """
    d = distiller.distilled if distilled is None else distilled
    cfg = distiller.config
    make = distiller.make_net
    tx, ty, vx, vy = distiller.train_x, distiller.train_y, distiller.test_x, distiller.test_y
    eval_seed = 10_000 + seed
    dist = evaluate(make, d.images.to(tx), d.labels.to(tx), vx, vy, cfg.eval_recipe(d.lr),
                    n_nets, seed=eval_seed)
    rx, ry = random_subset(tx, ty, d.ipc, d.num_classes, seed=seed + 1)
    base = replace(baseline, augment=cfg.augment)
    candidates = {
        f"inner recipe, lr {cfg.inner_lr:g}": evaluate(make, rx, ry, vx, vy,
                                                       cfg.eval_recipe(cfg.inner_lr), n_nets,
                                                       seed=eval_seed),
        f"{base.optimizer} {base.steps} steps, lr {base.lr:g}": evaluate(
            make, rx, ry, vx, vy, base, n_nets, seed=eval_seed)}
    name, rand = max(candidates.items(), key=lambda kv: kv[1].mean)
    full_recipe = replace(base, steps=full_steps, batch_size=256)
    full = evaluate(make, tx, ty, vx, vy, full_recipe, 1, seed=eval_seed).mean
    return Report(dist, rand, full, name,
                  {"random_candidates": {k: [v.mean, v.std] for k, v in candidates.items()}})


def save_grid(distilled: DistilledSet, path: str | Path,
              class_names: list[str] | None = None) -> Path:
    """The distilled images as a PNG grid, one row per class (soft-label argmax order)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    px = distilled.pixels().detach().cpu().float().numpy()
    k, ipc = distilled.num_classes, distilled.ipc
    fig, axes = plt.subplots(k, ipc, figsize=(max(1.0 * ipc, 2.0), 1.0 * k), squeeze=False)
    for c in range(k):
        for j in range(ipc):
            ax = axes[c][j]
            img = px[c * ipc + j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(class_names[c] if class_names else str(c), rotation=0,
                              labelpad=12, va="center")
    fig.suptitle(f"distilled: {ipc} image(s) per class")
    return _save(fig, path)


def plot_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Outer loss and (when measured) evaluation accuracy against the outer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] + 1 for r in history]  # record k: after k + 1 outer steps
    ax[0].plot(steps, [r["outer_loss"] for r in history], lw=1)
    ax[0].set(xlabel="outer step", ylabel="outer loss (real batch)", yscale="log")
    ev = [(r["step"] + 1, r["eval_acc_mean"], r["eval_acc_std"]) for r in history
          if "eval_acc_mean" in r]
    if ev:
        s, m, sd = (list(t) for t in zip(*ev, strict=True))
        ax[1].errorbar(s, [100 * v for v in m], yerr=[100 * v for v in sd], marker="o",
                       capsize=3)
    ax[1].set(xlabel="outer step", ylabel="test accuracy of fresh nets (%)")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG atomically (the previous file stays until the new one is
    complete)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return ckpt.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def summary(distiller: Distiller, report: Report) -> dict[str, Any]:
    """The JSON summary of a run."""
    cfg = distiller.config
    return {
        "dataset": distiller.data.name, "ipc": cfg.ipc, "estimator": cfg.estimator,
        "distilled_acc_mean": report.distilled.mean, "distilled_acc_std": report.distilled.std,
        "random_acc_mean": report.random.mean, "random_acc_std": report.random.std,
        "full_acc": report.full, "seconds": distiller.seconds,
        "outer_steps": distiller.step_count,
        "net": cfg.net, "eval_nets": len(report.distilled.accuracies),
        "distilled_accs": list(report.distilled.accuracies),
        "random_accs": list(report.random.accuracies), "random_recipe": report.random_recipe,
        "inner_lr": distiller.distilled.lr, "device": str(distiller.device),
        "config": cfg.to_dict(), **report.extra,
    }


def write_outputs(out: str | Path, distiller: Distiller, report: Report) -> dict[str, Path]:
    """Write ``distilled.pt``, ``images.png``, ``curves.png`` and ``summary.json`` into the
    run folder ``out`` (each atomically); return their paths with ``metrics.jsonl``'s.

    When ``out`` is the folder the distiller runs in (``run(run_dir=out)``), its metrics are
    already there, written as the run went. Otherwise ``out`` is opened as that run's folder
    (:class:`~bilevel.run_folder.RunFolder`, mode ``"auto"``) for the writing: a folder in
    use by another process, or holding another run, is refused; a new one gets the
    metrics from the history.

    Raises:
        bilevel.run_folder.RunFolderError: ``out`` is unusable, locked, or another run's.
    """
    out = Path(out)
    folder = distiller.folder
    if folder is not None and Path(folder.path).resolve() == out.resolve():
        return _write(folder, distiller, report)
    with RunFolder(out, kind="distill", config=distiller.loop.identity, mode="auto",
                   outputs=distiller.OUTPUTS, metric_columns=BASE_COLUMNS) as opened:
        if not opened.resumed:
            for record in distiller.history:
                opened.metrics.append(record)
        return _write(opened, distiller, report)


def _write(folder: RunFolder, distiller: Distiller, report: Report) -> dict[str, Path]:
    out = folder.path
    d = distiller.distilled
    paths = {"distilled": folder.save_torch("distilled.pt", d.blob()),
             "images": save_grid(d, out / "images.png"),
             "curves": plot_curves(distiller.history, out / "curves.png"),
             "metrics": out / "metrics.jsonl",
             "summary": folder.write_json("summary.json", summary(distiller, report))}
    return paths


def load_distilled(path: str | Path, device: str | torch.device = "cpu") -> DistilledSet:
    """Load ``distilled.pt`` (or a run folder holding it)."""
    path = Path(path)
    return DistilledSet.load(path / "distilled.pt" if path.is_dir() else path, device)
