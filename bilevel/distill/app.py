"""``bilevel distill``: distil a dataset from the command line and write the output folder."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import hypergrad as hg

from ..arguments import non_negative_int, positive_float, positive_int, seed
from ..data import DataError, load_dataset
from ..datasets import dataset_key
from .augment import Augment
from .core import DISTILL_ESTIMATORS, DistillConfig, Distiller
from .report import _stderr_is_tty, log, lr_cap_note, protocol, write_outputs

#: per-dataset defaults (command-line options override them)
PRESETS: dict[str, dict] = {
    "digits": {"net": "mlp"},
    # ConvNet-3 at the protocol's width; momentum SGD trains it far better than plain SGD
    # in 20 steps (IPC 1 at width 32 on CPU: 73.9 % vs 49.9 %, docs/distillation.md)
    "fashion_mnist": {"net": "convnet", "width": 128, "inner_optimizer": "momentum",
                      "inner_lr": 0.01, "inner_steps": 20},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bilevel distill`` (and of ``examples/distill.py``)."""
    d = DistillConfig()
    a = p.add_argument
    a("--dataset", default="digits", help="digits | fashion_mnist | a folder of IDX files, an "
      "image folder (train/, test/) or an .npz file (default: digits)")
    a("--data-root", metavar="DIR", help="folder holding a named dataset's files, e.g. "
      "fashion_mnist's IDX files (default: $BILEVEL_DATA, then the Debian package's folder)")
    a("--ipc", type=positive_int, default=d.ipc,
      help="synthetic images per class (default: %(default)s)")
    a("--net", choices=["mlp", "convnet"], help="network (default: mlp on digits, convnet "
      "otherwise)")
    a("--width", type=positive_int, help="ConvNet channels (default 128)")
    a("--depth", type=positive_int, help="ConvNet blocks (default: 3, or 2 for 8x8 images)")
    a("--hidden", type=positive_int, nargs="+", help="MLP hidden widths (default: 128)")
    a("--estimator", choices=DISTILL_ESTIMATORS, default=d.estimator,
      help="hypergradient estimator (default: %(default)s)")
    a("--window", type=positive_int, help="window of truncated / random_window (default: 1/2 "
      "and 3/4 "
      "of the inner steps)")
    a("--inner-steps", type=positive_int, help=f"default: {d.inner_steps} (20 on fashion_mnist)")
    a("--inner-lr", type=positive_float,
      help=f"initial inner learning rate (default {d.inner_lr}; 0.01 on fashion_mnist)")
    a("--inner-optimizer", choices=sorted(hg.OPTIMIZERS),
      help=f"default: {d.inner_optimizer} (momentum on fashion_mnist)")
    a("--fixed-lr", action="store_true", help="do not learn the inner learning rate")
    a("--max-lr", type=positive_float, default=d.max_lr,
      help="cap of the learned inner learning rate (default: %(default)s)")
    a("--hard-labels", action="store_true", help="do not learn soft labels")
    a("--init", choices=["real", "noise"], default=d.init,
      help="initial synthetic images (default: %(default)s)")
    a("--shift", type=non_negative_int, default=0,
      help="augmentation: random shifts of up to N pixels")
    a("--flip", action="store_true", help="augmentation: random horizontal flips")
    a("--outer-steps", type=non_negative_int, default=d.outer_steps, help="default: %(default)s")
    a("--outer-batch", type=positive_int,
      help=f"real images per outer loss (default {d.outer_batch})")
    a("--image-lr", type=positive_float, default=d.image_lr,
      help="Adam lr of the images (default: %(default)s)")
    a("--eval-every", type=non_negative_int, default=0,
      help="evaluate every N outer steps (0: at the end)")
    a("--eval-nets", type=positive_int, default=5, help="fresh networks per evaluation (default 5)")
    a("--seed", type=seed, default=0, help="seed of the run (default: %(default)s)")
    a("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    a("--threads", type=positive_int, help="torch CPU threads")
    a("--out", default="runs/distill", help="output folder (default: %(default)s)")
    a("--checkpoint-every", type=non_negative_int, default=50,
      help="checkpoint into OUT/checkpoints every N outer steps (0: only at the end; "
      "default %(default)s)")
    a("--resume", action="store_true", help="continue the run in OUT from its newest "
      "checkpoint (same settings; --outer-steps may grow)")
    a("--overwrite", action="store_true", help="replace a run already in OUT (without it, "
      "a folder holding another run is refused)")
    a("--no-progress", action="store_true", help="hide the progress bars and lines")
    a("--no-reference", action="store_true", help="skip the full-data reference network "
      "of the evaluation (the slowest part on large datasets)")
    a("--no-cache", action="store_true", help="recompute the full-data reference instead of "
      "reading it from the cache ($BILEVEL_CACHE, else ~/.cache/bilevel), and do not store it")


def config_from_args(args: argparse.Namespace, dataset: str) -> DistillConfig:
    """A :class:`DistillConfig` from parsed options on top of the dataset's preset."""
    key = dataset_key(dataset) or dataset  # fashion-mnist, fashionmnist -> fashion_mnist
    kw: dict = dict(PRESETS.get(key, {"net": "convnet"}))
    for name in ("net", "width", "depth", "inner_lr", "outer_batch", "inner_steps",
                 "inner_optimizer"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.hidden:
        kw["hidden"] = tuple(args.hidden)
    settings = {"window": args.window} if args.window is not None else {}
    return DistillConfig(
        **kw, ipc=args.ipc, estimator=args.estimator, estimator_settings=settings,
        learn_lr=False if args.fixed_lr else None, learn_labels=not args.hard_labels,
        init=args.init,
        augment=Augment(shift=args.shift, flip=args.flip), outer_steps=args.outer_steps,
        image_lr=args.image_lr, eval_every=args.eval_every, eval_nets=args.eval_nets,
        seed=args.seed, device=args.device, max_lr=args.max_lr)


def run(args: argparse.Namespace) -> int:
    """Distil, evaluate by the protocol, write the output folder, print the table.

    The output folder is a :class:`~bilevel.run_folder.RunFolder`, opened (checked and
    locked) before any work: a folder holding another run is refused unless ``--resume``
    (the same run) or ``--overwrite``; a second process on it is refused."""
    if args.resume and args.overwrite:
        print("bilevel distill: error: --resume and --overwrite exclude each other",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if _quiet():  # `bilevel -q distill`: warnings and errors only, so no progress either
        args.no_progress = True
    try:
        data = load_dataset(args.dataset, root=args.data_root)
        cfg = config_from_args(args, str(args.dataset))
        distiller = Distiller(data, cfg)
        mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
        distiller.attach(args.out, mode, args.checkpoint_every,
                         progress=False if args.no_progress else None)
    except (DataError, ValueError, TypeError) as exc:  # BilevelInputError is a ValueError
        print(f"bilevel distill: error: {exc}", file=sys.stderr)
        return 2
    with distiller:
        print(f"distilling {data.name} ({len(data.train_y)} training images, "
              f"{data.num_classes} classes) into {cfg.ipc} per class: {cfg.net}, "
              f"{cfg.estimator}, {cfg.inner_steps} inner x {cfg.outer_steps} outer steps",
              flush=True)
        if args.resume:
            step = distiller.resume(args.out)
            print(f"resumed at outer step {step}" if step else
                  f"no checkpoint in {args.out} yet; starting afresh", flush=True)
        show = False if args.no_progress else None
        with progress_lines(not args.no_progress):
            distiller.run(callback=None if args.no_progress or _stderr_is_tty()
                          else step_lines(distiller.step_count, cfg.outer_steps))
            distilled_at = time.perf_counter()
            report = protocol(distiller, n_nets=args.eval_nets, seed=args.seed,
                              full=not args.no_reference, cache=not args.no_cache,
                              progress=show)
        evaluated_at = time.perf_counter()
        paths = write_outputs(args.out, distiller, report)
    print()
    print(report.table(cfg.ipc))
    print(f"\nfull-data reference: {report.full_note}")
    print(f"distillation {distiller.seconds:.0f} s, "
          f"evaluation {evaluated_at - distilled_at:.0f} s (distilled "
          f"{report.seconds['distilled']:.0f} s, random subset {report.seconds['random']:.0f} "
          f"s, full-data reference {report.seconds['full']:.0f} s); learned inner lr "
          f"{distiller.distilled.lr:.3g}")
    note = lr_cap_note(distiller)
    if note:
        print(note)
    print(f"images: {paths['images']}\nstart vs distilled: {paths['init_vs_distilled']}"
          f"\ncurves: {paths['curves']}\nsummary: {paths['summary']}"
          f"\ntensors: {paths['distilled']}  (bilevel.distill.load_distilled)")
    return 0


def step_lines(done: int, total: int, lines: int = 10) -> Callable[[dict[str, Any]], None]:
    """A ``Distiller.run`` callback logging about ``lines`` INFO lines over outer steps
    ``done`` to ``total`` (the distillation's progress where no bar is shown)."""
    every = max(1, (total - done) // lines)

    def report(record: dict[str, Any]) -> None:
        step = record["step"] + 1
        if (step - done) % every == 0 or step == total:
            lr = record.get("inner_lr")
            log.info("outer step %d/%d: outer loss %.4g%s", step, total, record["outer_loss"],
                     "" if lr is None else f", inner lr {lr:.3g}")
    return report


@contextmanager
def progress_lines(show: bool) -> Iterator[None]:
    """While the command runs, write the ``bilevel.distill`` INFO lines (progress without
    a terminal, cache notes) to stderr, unless ``show`` is false or logging already shows
    them (a handler configured by the application, e.g. ``bilevel.set_verbosity``)."""
    logger = logging.getLogger("bilevel.distill")
    if not show or _logged(logger):
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _quiet() -> bool:
    """Whether the library's messages were switched to warnings and above (``bilevel -q``,
    ``bilevel.set_verbosity("warning")``); a level left unset is not quiet."""
    level = logging.getLogger("bilevel").level
    return level != logging.NOTSET and level > logging.INFO


def _logged(logger: logging.Logger) -> bool:
    """Whether INFO records of ``logger`` reach a real handler (not a NullHandler)."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    node: logging.Logger | None = logger
    while node is not None:
        if any(not isinstance(h, logging.NullHandler) and h.level <= logging.INFO
               for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bilevel distill", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
