"""Dataset distillation: learn a few synthetic images per class by hypergradients.

    from bilevel.data import load_digits
    from bilevel.distill import DistillConfig, Distiller, protocol

    distiller = Distiller(load_digits(), DistillConfig(ipc=10))
    distiller.run()
    print(protocol(distiller).table(ipc=10))
"""

from .augment import Augment
from .cache import cache_dir
from .core import DISTILL_ESTIMATORS, DistillConfig, DistilledSet, Distiller, make_estimator
from .evaluate import EvalResult, Recipe, evaluate, random_subset, train_networks
from .report import (
    Report,
    load_distilled,
    lr_cap_note,
    plot_curves,
    protocol,
    save_grid,
    save_init_vs_distilled,
    summary,
    write_outputs,
)

__all__ = [
    "Augment", "DISTILL_ESTIMATORS", "DistillConfig", "DistilledSet", "Distiller", "EvalResult",
    "Recipe", "Report", "cache_dir", "evaluate", "load_distilled", "lr_cap_note",
    "make_estimator", "plot_curves", "protocol", "random_subset", "save_grid",
    "save_init_vs_distilled", "summary", "train_networks", "write_outputs",
]
