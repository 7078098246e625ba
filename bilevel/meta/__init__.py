"""Meta-learning: MAML, first-order MAML, ANIL, Meta-SGD, iMAML and Reptile on tasks batched by
vmap (:class:`MetaLearner`), tasks with a leading task axis, their samplers and datasets, and
baselines."""

from .baselines import nearest_centroid
from .datasets import D4_NAMES, OMNIGLOT_SETS, d4_transform, digits_d4, load_omniglot
from .learner import (
    ALGORITHMS,
    BATCHING,
    MetaEvaluation,
    MetaGradient,
    MetaLearner,
    MetaProblem,
)
from .tasks import EpisodeSampler, SinusoidTasks, TaskBatch, check_splits, class_splits

__all__ = [
    "ALGORITHMS", "BATCHING", "MetaEvaluation", "MetaGradient", "MetaLearner", "MetaProblem",
    "D4_NAMES", "EpisodeSampler", "OMNIGLOT_SETS", "SinusoidTasks", "TaskBatch", "check_splits",
    "class_splits", "d4_transform", "digits_d4", "load_omniglot", "nearest_centroid",
]
