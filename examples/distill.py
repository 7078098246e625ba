"""Dataset distillation on scikit-learn's digits (the `make demo` job).

Learns IPC synthetic 8x8 images per class (with soft labels and the inner learning rate)
such that a freshly initialised network trained on them alone does well on the real
test set; then trains 5 fresh networks on the distilled set, on a random real subset of
the same size and on all the training data, and prints the three test accuracies.

    python examples/distill.py                     # IPC 10, unrolled, ~30-60 s on CPU
    python examples/distill.py --ipc 1 --estimator random_window --out runs/ipc1

Every option of `bilevel distill --help` works here too (other datasets, ConvNet,
augmentation, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

import bilevel
from bilevel.data import load_dataset
from bilevel.distill import Distiller, lr_cap_note, protocol, write_outputs
from bilevel.distill.app import add_arguments, config_from_args, step_lines


def previous_kind(out: Path) -> str | None:
    """The kind of run the folder ``out`` holds (``"distill"``, ``"run"``), if any."""
    try:
        return json.loads((out / "run.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(out="runs/distill_digits", threads=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # small networks: one thread is the fastest

    data = load_dataset(args.dataset, root=args.data_root)  # digits: 1437 train / 360 test
    config = config_from_args(args, args.dataset)         # a DistillConfig
    distiller = Distiller(data, config)
    print(f"distilling {data.name} into {config.ipc} images per class "
          f"({config.net}, {config.estimator} hypergradients, {config.outer_steps} outer "
          f"steps of {config.inner_steps} inner steps)", flush=True)
    # the run lives in args.out (locked while it runs); a killed run continues with
    # --resume, and running the demo again replaces its previous distillation run (any
    # other content of the folder is refused unless --overwrite)
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    replacing = mode == "new" and previous_kind(Path(args.out)) == "distill"
    try:
        distiller.attach(args.out, "overwrite" if replacing else mode, args.checkpoint_every,
                         progress=not args.no_progress and sys.stderr.isatty())
        if replacing:
            print(f"replaced the previous distillation run in {args.out}")
        if args.resume:
            print(f"resumed at outer step {distiller.resume(args.out)}")
    except bilevel.BilevelInputError as exc:  # a folder in use, another run, other settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    terminal = sys.stderr.isatty()
    if not args.no_progress and not terminal:  # no bars: progress lines on stderr instead
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    lines = not args.no_progress and not terminal
    distiller.run(callback=step_lines(distiller.step_count, config.outer_steps) if lines
                  else None)

    # distilled set vs random real subset vs full data; the full-data network is cached
    # (~/.cache/bilevel) and skipped by --no-reference; a bar per phase on a terminal
    report = protocol(distiller, n_nets=args.eval_nets, seed=args.seed,
                      full=not args.no_reference, cache=not args.no_cache,
                      progress=False if args.no_progress else None)
    paths = write_outputs(args.out, distiller, report)
    distiller.close()
    print()
    print(report.table(config.ipc))
    print(f"\n{distiller.seconds:.0f} s of distillation; learned inner learning rate "
          f"{distiller.distilled.lr:.3g}; full-data reference: {report.full_note}")
    note = lr_cap_note(distiller)  # the learned rate stopped at --max-lr?
    if note:
        print(note)
    print(f"distilled images: {paths['images']}   start vs distilled: "
          f"{paths['init_vs_distilled']}")
    print(f"curves: {paths['curves']}   summary: {paths['summary']}   tensors: "
          f"{paths['distilled']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
