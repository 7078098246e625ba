"""Dataset distillation: learn a few synthetic images per class by hypergradients.

    from bilevel.data import load_digits
    from bilevel.distill import DistillConfig, Distiller, protocol

    distiller = Distiller(load_digits(), DistillConfig(ipc=10))
    distiller.run()
    print(protocol(distiller).table(ipc=10))
"""

from .augment import Augment
from .core import DISTILL_ESTIMATORS, DistillConfig, DistilledSet, Distiller, make_estimator
from .evaluate import EvalResult, Recipe, evaluate, random_subset, train_networks
from .report import Report, load_distilled, plot_curves, protocol, save_grid, summary, write_outputs

__all__ = [
    "Augment", "DISTILL_ESTIMATORS", "DistillConfig", "DistilledSet", "Distiller", "EvalResult",
    "Recipe", "Report", "evaluate", "load_distilled", "make_estimator", "plot_curves",
    "protocol", "random_subset", "save_grid", "summary", "train_networks", "write_outputs",
]
