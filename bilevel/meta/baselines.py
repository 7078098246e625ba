"""Baselines for few-shot classification, to report beside every meta-learner.

* :func:`nearest_centroid` -- classify each query example by the nearest support-class mean in
  raw input space. It needs no training, so a meta-learner that does not beat it has learned
  nothing the raw inputs did not already hold (on class splits of digits it beats MAML).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hypergrad.errors import BilevelInputError

from .tasks import TaskBatch

__all__ = ["nearest_centroid"]


def nearest_centroid(tasks: TaskBatch) -> Tensor:
    """Per-task query accuracy ``(B,)`` of the nearest-centroid classifier on raw inputs.

    For each task, every class's centroid is the mean of its (flattened) support inputs; each
    query is given the label of the centroid nearest in Euclidean distance (ties go to the
    lower label; a label with no support example is never predicted). Computed for all tasks
    at once, in the inputs' floating dtype (``float32`` for integer inputs).

    Raises:
        BilevelInputError: for a regression batch (floating targets).
    """
    if not isinstance(tasks, TaskBatch):
        raise BilevelInputError(f"nearest_centroid takes a TaskBatch, got {type(tasks).__name__}")
    if not tasks.is_classification:
        raise BilevelInputError(f"nearest_centroid needs integer class labels, got support_y of "
                                f"dtype {tasks.support_y.dtype} (a regression batch)")
    num = tasks.num_tasks
    dtype = tasks.support_x.dtype if tasks.support_x.is_floating_point() else torch.float32
    sx = tasks.support_x.reshape(num, tasks.support_x.shape[1], -1).to(dtype)
    qx = tasks.query_x.reshape(num, tasks.query_x.shape[1], -1).to(dtype)
    onehot = torch.nn.functional.one_hot(tasks.support_y.long(), int(tasks.ways)).to(dtype)
    counts = onehot.sum(dim=1)  # (B, N)
    centroids = onehot.transpose(1, 2) @ sx / counts.clamp(min=1).unsqueeze(-1)  # (B, N, D)
    dist = torch.cdist(qx, centroids)  # (B, Q, N)
    dist = dist.masked_fill((counts == 0).unsqueeze(1), float("inf"))
    return (dist.argmin(dim=-1) == tasks.query_y).to(dtype).mean(dim=1)
