"""``bilevel distill``: distil a dataset from the command line and write the output folder."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import hypergrad as hg

from ..arguments import non_negative_int, positive_float, positive_int, seed
from ..data import DataError, load_dataset
from .augment import Augment
from .core import DISTILL_ESTIMATORS, DistillConfig, Distiller
from .report import protocol, write_outputs

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
    a("--inner-lr", type=positive_float, help=f"initial inner learning rate (default {d.inner_lr})")
    a("--inner-optimizer", choices=sorted(hg.OPTIMIZERS),
      help=f"default: {d.inner_optimizer} (momentum on fashion_mnist)")
    a("--fixed-lr", action="store_true", help="do not learn the inner learning rate")
    a("--hard-labels", action="store_true", help="do not learn soft labels")
    a("--init", choices=["real", "noise"], default=d.init, help="initial synthetic images")
    a("--shift", type=non_negative_int, default=0,
      help="augmentation: random shifts of up to N pixels")
    a("--flip", action="store_true", help="augmentation: random horizontal flips")
    a("--outer-steps", type=non_negative_int, default=d.outer_steps, help="default: %(default)s")
    a("--outer-batch", type=positive_int,
      help=f"real images per outer loss (default {d.outer_batch})")
    a("--image-lr", type=positive_float, default=d.image_lr, help="Adam lr of the images")
    a("--eval-every", type=non_negative_int, default=0,
      help="evaluate every N outer steps (0: at the end)")
    a("--eval-nets", type=positive_int, default=5, help="fresh networks per evaluation (default 5)")
    a("--seed", type=seed, default=0)
    a("--device", default="cpu", help="cpu | cuda | cuda:N")
    a("--threads", type=positive_int, help="torch CPU threads")
    a("--out", default="runs/distill", help="output folder (default: %(default)s)")
    a("--checkpoint-every", type=non_negative_int, default=50,
      help="checkpoint into OUT/checkpoints every N outer steps (0: only at the end; "
      "default %(default)s)")
    a("--resume", action="store_true", help="continue the run in OUT from its newest "
      "checkpoint (same settings; --outer-steps may grow)")
    a("--overwrite", action="store_true", help="replace a run already in OUT (without it, "
      "a folder holding another run is refused)")
    a("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace, dataset: str) -> DistillConfig:
    """A :class:`DistillConfig` from parsed options on top of the dataset's preset."""
    key = dataset.replace("-", "_")
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
        seed=args.seed, device=args.device)


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
    try:
        data = load_dataset(args.dataset)
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
        start = time.perf_counter()
        if args.resume:
            step = distiller.resume(args.out)
            print(f"resumed at outer step {step}" if step else
                  f"no checkpoint in {args.out} yet; starting afresh", flush=True)
        distiller.run()
        report = protocol(distiller, n_nets=args.eval_nets, seed=args.seed)
        paths = write_outputs(args.out, distiller, report)
    total = time.perf_counter() - start
    print()
    print(report.table(cfg.ipc))
    print(f"\ndistillation {distiller.seconds:.0f} s, with evaluation {total:.0f} s; learned "
          f"inner lr {distiller.distilled.lr:.3g}")
    print(f"images: {paths['images']}\ncurves: {paths['curves']}\nsummary: {paths['summary']}"
          f"\ntensors: {paths['distilled']}  (bilevel.distill.load_distilled)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bilevel distill", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
