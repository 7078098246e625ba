"""The evaluation protocol of a distilled set, and the output folder of a run.

:func:`protocol` trains fresh networks on the distilled set, on a random real subset of
the same size (same networks, same seeds) and on the full training set, and returns the
three test accuracies (the full-data reference is cached between runs, see
:mod:`bilevel.distill.cache`); :func:`write_outputs` saves the pictures
(:mod:`bilevel.distill.figures`), tensors and a JSON summary.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..run_folder import RunFolder
from ..sinks import BASE_COLUMNS
from .cache import ResultCache, tensor_fingerprint, valid_accuracy
from .core import DistilledSet, Distiller
from .evaluate import EvalResult, Recipe, StepHook, evaluate, random_subset
from .figures import plot_curves, save_grid, save_init_vs_distilled

#: a standard recipe for real images: Adam, lr 1e-3 (full batch on small sets)
STANDARD = Recipe(steps=300, lr=1e-3, optimizer="adam")

#: progress lines and cache notes of the protocol (INFO); shown by ``bilevel distill``
log = logging.getLogger("bilevel.distill")


@dataclass(frozen=True)
class Report:
    """Test accuracies: distilled set, random real subset (same size), full data.

    ``full`` is ``None`` when the full-data reference was not computed
    (``protocol(full=False)``); ``full_note`` says where it came from (``"cached (...)"``,
    ``"computed in 97 s"``, ``"not computed"``); ``seconds`` holds the wall time of each
    phase (``distilled``, ``random``, ``full``; ``full`` is 0 for a cached reference).
    """

    distilled: EvalResult
    random: EvalResult
    full: float | None
    random_recipe: str
    extra: dict[str, Any] = field(default_factory=dict)
    full_note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self, ipc: int) -> str:
        """A plain-text table of the three results."""
        full = "not computed" if self.full is None else f"{100 * self.full:.2f} %"
        rows = [("distilled", str(self.distilled)),
                (f"random real subset ({self.random_recipe})", str(self.random)),
                ("full training set (1 network)", full)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'training set, ' + str(ipc) + ' per class':<{width}}   test accuracy",
                 "-" * (width + 28)]
        lines += [f"{name:<{width}}   {value}" for name, value in rows]
        return "\n".join(lines)


class _Progress:
    """Progress of the protocol's phases: a tqdm bar per phase (networks k/n and steps) on
    stderr, or, without bars, one INFO line on :data:`log` when a phase starts and one when
    it ends (the caller decides whether INFO lines are shown)."""

    def __init__(self, progress: bool | None) -> None:
        self.enabled = progress is not False
        self.bars = progress is True or (progress is None and _stderr_is_tty())

    def note(self, message: str) -> None:
        """A one-line message beside the bars (or an INFO line)."""
        if self.bars:
            from tqdm.auto import tqdm
            tqdm.write(message, file=sys.stderr)
        elif self.enabled:
            log.info("%s", message)

    @contextmanager
    def phase(self, name: str, n_nets: int, steps: int,
              short: str | None = None) -> Iterator[StepHook | None]:
        """Show the training of ``n_nets`` networks for ``steps`` steps each (the bar is
        labelled ``short``, default ``name``); yields the ``on_step`` hook for
        :func:`~bilevel.distill.evaluate.evaluate`."""
        if not self.enabled:
            yield None
            return
        t0 = time.perf_counter()
        done = {"nets": 0, "group_steps": 0}
        bar = None
        if self.bars:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_nets * steps, desc=short or name, unit="step", file=sys.stderr,
                       dynamic_ncols=True, leave=True)
            bar.set_postfix_str(f"network 0/{n_nets}")
        else:
            log.info("%s: training %d network%s x %d steps ...", name, n_nets,
                     "s" * (n_nets != 1), steps)

        def on_step(group: int) -> None:
            done["group_steps"] += 1
            if done["group_steps"] == steps:  # a network (or a batch of them) is trained
                done["nets"] += group
                done["group_steps"] = 0
            if bar is not None:
                testing = ", testing" if done["nets"] >= n_nets else ""
                bar.update(group)
                bar.set_postfix_str(f"network {done['nets']}/{n_nets}{testing}",
                                    refresh=bool(testing))

        try:
            yield on_step
        finally:
            if bar is not None:
                bar.close()
            else:
                log.info("%s: done in %.1f s", name, time.perf_counter() - t0)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def reference_key(distiller: Distiller, recipe: Recipe, seed: int) -> dict[str, Any]:
    """Everything the full-data reference depends on, as a JSON-able dict (the cache key):
    the dataset (name and a fingerprint of its four tensors), the network, the training
    ``recipe``, the network ``seed``, dtype, device and torch version."""
    data, cfg = distiller.data, distiller.config
    return {
        "what": "bilevel.distill full-data reference",
        "dataset": {"name": data.name, "fingerprint": tensor_fingerprint(
            data.train_x, data.train_y, data.test_x, data.test_y)},
        "net": {"kind": cfg.net, **cfg.net_settings(data.image_shape),
                "image_shape": list(data.image_shape), "num_classes": distiller.num_classes},
        "recipe": {"steps": recipe.steps, "lr": recipe.lr, "optimizer": recipe.optimizer,
                   "momentum": recipe.momentum, "batch_size": recipe.batch_size,
                   "augment": {"shift": recipe.augment.shift, "flip": recipe.augment.flip}},
        "seed": seed, "dtype": cfg.dtype, "device": str(distiller.device),
        "torch": torch.__version__}


def protocol(distiller: Distiller, distilled: DistilledSet | None = None, n_nets: int = 5,
             seed: int = 0, full_steps: int = 500, baseline: Recipe = STANDARD, *,
             full: bool = True, cache: bool | str | Path = True,
             progress: bool | None = None) -> Report:
    """Evaluate ``distilled`` (default: the distiller's current set) by the protocol.

    * distilled: ``n_nets`` fresh networks trained by the distillation's inner recipe at
      the (learned) learning rate;
    * random subset: IPC random real images per class, the same ``n_nets`` seeds, trained
      by the same inner recipe *and* by ``baseline``; the better of the two is reported
      (the baseline gets its best shot);
    * full data (``full=True``): one network trained by ``baseline`` for ``full_steps``
      minibatch steps. It does not depend on the distilled set, so it is cached
      (``cache=True``: in :func:`~bilevel.distill.cache.cache_dir`; a folder: there;
      ``False``: neither read nor written) keyed by :func:`reference_key`; a second
      identical run reads it back (``Report.full_note`` says ``"cached (...)"``). A
      corrupt cache entry is ignored with a warning and recomputed. ``full=False`` skips
      it (``Report.full`` is ``None``).

    ``progress``: a tqdm bar per phase on stderr (``None``: when stderr is a terminal;
    ``True``: always; ``False``: nothing). Without bars, each phase logs a line when it
    starts and ends on the ``bilevel.distill`` logger (INFO), as does the cache.
    """
    d = distiller.distilled if distilled is None else distilled
    cfg = distiller.config
    make = distiller.make_net
    tx, ty, vx, vy = distiller.train_x, distiller.train_y, distiller.test_x, distiller.test_y
    eval_seed = 10_000 + seed
    show = _Progress(progress)
    phases = 4 if full else 3
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with show.phase(f"[1/{phases}] distilled set", n_nets, cfg.inner_steps) as hook:
        dist = evaluate(make, d.images.to(tx), d.labels.to(tx), vx, vy, cfg.eval_recipe(d.lr),
                        n_nets, seed=eval_seed, on_step=hook)
    seconds["distilled"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rx, ry = random_subset(tx, ty, d.ipc, d.num_classes, seed=seed + 1)
    base = replace(baseline, augment=cfg.augment)
    inner = cfg.eval_recipe(cfg.inner_lr)
    candidates = {}
    for i, (name, recipe, short) in enumerate(
            [(f"inner recipe, lr {cfg.inner_lr:g}", inner, "inner recipe"),
             (f"{base.optimizer} {base.steps} steps, lr {base.lr:g}", base, base.optimizer)]):
        with show.phase(f"[{2 + i}/{phases}] random subset, {name}", n_nets, recipe.steps,
                        f"[{2 + i}/{phases}] random subset ({short})") as hook:
            candidates[name] = evaluate(make, rx, ry, vx, vy, recipe, n_nets, seed=eval_seed,
                                        on_step=hook)
    name, rand = max(candidates.items(), key=lambda kv: kv[1].mean)
    seconds["random"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    full_acc, note = None, "not computed"
    if full:
        full_recipe = replace(base, steps=full_steps, batch_size=256)
        full_acc, note = _full_reference(distiller, full_recipe, eval_seed, cache, show,
                                         f"[4/{phases}] full-data reference")
    seconds["full"] = time.perf_counter() - t0
    return Report(dist, rand, full_acc, name,
                  {"random_candidates": {k: [v.mean, v.std] for k, v in candidates.items()}},
                  full_note=note, seconds=seconds)


def _full_reference(distiller: Distiller, recipe: Recipe, seed: int,
                    cache: bool | str | Path, show: _Progress,
                    title: str) -> tuple[float, str]:
    """The full-data accuracy and a note on where it came from (cache or computed)."""
    store = None
    if cache is not False:
        store = ResultCache("distill-reference", None if cache is True else cache)
        key = reference_key(distiller, recipe, seed)
        hit = store.get(key)
        if hit is not None and valid_accuracy(hit.get("accuracy")):
            note = (f"cached ({100 * hit['accuracy']:.2f} %, computed "
                    f"{hit.get('created', '?')} in {hit.get('seconds', float('nan')):.3g} s; "
                    f"{store.path(key)})")
            show.note(f"full-data reference: {note}")
            return float(hit["accuracy"]), note
        if hit is not None:
            warnings.warn(f"ignoring the cache entry {store.path(key)}: its accuracy "
                          f"{hit.get('accuracy')!r} is not a number in [0, 1]; recomputing",
                          UserWarning, stacklevel=3)
    t0 = time.perf_counter()
    with show.phase(title, 1, recipe.steps) as hook:
        acc = evaluate(distiller.make_net, distiller.train_x, distiller.train_y,
                       distiller.test_x, distiller.test_y, recipe, 1, seed=seed,
                       on_step=hook).mean
    took = time.perf_counter() - t0
    note = f"computed in {took:.3g} s"
    if store is not None:
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        path = store.put(key, {"accuracy": acc, "seconds": took, "created": created})
        note += f", cached in {path}" if path is not None else ", not cached"
    else:
        note += " (cache off)"
    show.note(f"full-data reference: {note}")
    return acc, note


def lr_cap_note(distiller: Distiller) -> str | None:
    """A one-line note when the learned inner learning rate ended at its cap
    (:attr:`Distiller.lr_at_cap`), naming the command-line options to change; else
    ``None``."""
    if not distiller.lr_at_cap:
        return None
    cap = distiller.config.max_lr
    return (f"note: the learned inner learning rate {distiller.distilled.lr:.3g} is at its cap "
            f"(--max-lr {cap:g}): the outer loop wanted it larger. Try a larger --max-lr "
            f"(e.g. {2 * cap:g}; watch the outer loss for late jumps) or more --inner-steps; "
            "--fixed-lr keeps --inner-lr instead")


def summary(distiller: Distiller, report: Report) -> dict[str, Any]:
    """The JSON summary of a run (``full_acc`` is ``None`` when the full-data reference
    was not computed)."""
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
        "inner_lr": distiller.distilled.lr, "max_lr": cfg.max_lr,
        "lr_at_cap": distiller.lr_at_cap, "full_reference": report.full_note,
        "eval_seconds": report.seconds, "class_names": list(distiller.distilled.class_names),
        "device": str(distiller.device), "config": cfg.to_dict(), **report.extra,
    }


def write_outputs(out: str | Path, distiller: Distiller, report: Report) -> dict[str, Path]:
    """Write ``distilled.pt``, ``images.png``, ``init_vs_distilled.png``, ``curves.png``
    and ``summary.json`` into the run folder ``out`` (each atomically); return their paths
    with ``metrics.jsonl``'s.

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
    cfg = distiller.config
    paths = {"distilled": folder.save_torch("distilled.pt", d.blob()),
             "images": save_grid(d, out / "images.png"),
             "init_vs_distilled": save_init_vs_distilled(d, out / "init_vs_distilled.png"),
             "curves": plot_curves(distiller.history, out / "curves.png", report,
                                   cfg.max_lr if cfg.learn_lr else None),
             "metrics": out / "metrics.jsonl",
             "summary": folder.write_json("summary.json", summary(distiller, report))}
    return paths


def load_distilled(path: str | Path, device: str | torch.device = "cpu") -> DistilledSet:
    """Load ``distilled.pt`` (or a run folder holding it)."""
    path = Path(path)
    return DistilledSet.load(path / "distilled.pt" if path.is_dir() else path, device)
