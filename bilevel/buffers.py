"""Buffer policies: what normalisation layers do with their running statistics.

``wrap(..., buffers=...)`` takes one of :data:`BUFFER_POLICIES`:

- ``"batch_stats"`` (default): normalisation layers (BatchNorm, InstanceNorm with running
  statistics) normalise with the current batch's statistics in every inner step and in
  the outer loss; running statistics are never read nor updated (safe under ``vmap``).
- ``"frozen"``: normalisation layers run in eval mode with the module's current running
  statistics, copied once as constants.
- ``"track"``: BatchNorm running statistics are carried functionally through the inner
  steps, as ``nn.BatchNorm`` in training mode would update them, and the outer loss (and
  ``ModuleProblem.export``) uses them in eval mode. They live in the parameter pytree
  (``mp.params`` gains ``"<layer>.running_mean"``, ``".running_var"`` and
  ``".num_batches_tracked"``, the count as a float): the inner loss does not read them
  (its gradient there is zero and ``penalty`` does not see them), the optimizer's update
  of them is discarded, and each inner step (:class:`TrackingProblem`, ``mp.step``)
  replaces them by the update from that step's batch, differentiably, so hypergradients
  include the path through the statistics. Only estimators that run the inner steps
  (``Unrolled``, ``Truncated``, every mode) support it; others raise
  :class:`BufferPolicyError` (:func:`check_estimator`). Per-leaf optimizer settings must
  then include the statistics' keys. Other layers with running statistics
  (InstanceNorm) raise :class:`BufferPolicyError`. The user's module is never written.

How ``"track"`` sees the batch statistics: in the inner model, each tracked BatchNorm
runs :func:`batchnorm_train`, which normalises by the batch statistics and, while a
:func:`recording_batch_stats` block is open in the current context, appends the batch
mean and unbiased variance to that block's :class:`BatchStats`. A step opens the block
for one loss evaluation inside ``torch.func.grad`` and returns the updated statistics
(:func:`update_running_stats`) as the auxiliary output. The open block is held in a
``contextvars.ContextVar``, never in an object: nested steps, threads and steps of
several problems do not see each other's records, and the step works under
``torch.func.vmap`` (many tasks at once).
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import hypergrad as hg
from hypergrad.errors import BilevelInputError
from hypergrad.optim import State

Params = dict[str, torch.Tensor]

BUFFER_POLICIES = ("batch_stats", "frozen", "track")
NORM_LAYER = nn.modules.batchnorm._NormBase
BATCHNORM = nn.modules.batchnorm._BatchNorm
#: the buffers of a BatchNorm layer that ``buffers="track"`` carries, in this order
TRACKED_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

#: estimators that run the inner steps through ``Problem.step`` (all ``buffers=`` policies)
_STEPPING = (hg.Unrolled, hg.Truncated)


class BufferPolicyError(BilevelInputError):
    """The buffer policy cannot work with this model or estimator (e.g. ``buffers="track"``
    with an implicit or single-loop estimator)."""


# --- choosing and checking a policy ----------------------------------------------------


def running_stat_layers(module: nn.Module) -> list[str]:
    """``"name (Type)"`` of the normalisation layers of ``module`` that keep running
    statistics (for messages)."""
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, NORM_LAYER) and m.running_mean is not None]


def check_policy(module: nn.Module, buffers: str) -> None:
    """Raise when ``buffers`` is not a policy, or is ``"track"`` for a model with running
    statistics that only BatchNorm's update rule would not cover (InstanceNorm)."""
    if buffers not in BUFFER_POLICIES:
        layers = running_stat_layers(module)
        hint = f" Layers with running statistics: {', '.join(layers)}." if layers else ""
        raise BilevelInputError(
            f"buffers={buffers!r} is not supported; use one of {BUFFER_POLICIES}.{hint} "
            "Use buffers='batch_stats' (batch statistics, nothing updated), "
            "buffers='frozen' (eval-mode running statistics), buffers='track' (running "
            "statistics carried through the inner steps), or GroupNorm/LayerNorm.")
    if buffers == "track":
        other = [f"{n or '<root>'} ({type(m).__name__})" for n, m in module.named_modules()
                 if isinstance(m, NORM_LAYER) and not isinstance(m, BATCHNORM)
                 and m.running_mean is not None]
        if other:
            raise BufferPolicyError(
                f"buffers='track' updates BatchNorm running statistics only; "
                f"{', '.join(other)} also keep running statistics. Use "
                "buffers='frozen' or 'batch_stats', or track_running_stats=False there")


def check_estimator(problem: Any, estimator: str | hg.Estimator) -> hg.Estimator:
    """The estimator object; raises :class:`BufferPolicyError` when ``problem`` tracks
    running statistics (``buffers="track"``) and the estimator does not run its inner steps
    (only :class:`~hypergrad.Unrolled` and :class:`~hypergrad.Truncated`, every mode, do)."""
    est = hg.make_estimator(estimator)
    if isinstance(problem, TrackingProblem) and not isinstance(est, _STEPPING):
        raise BufferPolicyError(
            f"buffers='track' cannot be used with the {type(est).__name__} estimator: running "
            "statistics are carried through the inner steps, and only estimators that run "
            "those steps (Unrolled, Truncated, in any mode) differentiate them; "
            f"{type(est).__name__} would treat them as constants (implicit differentiation "
            "has no equation for them). Use Unrolled()/Truncated(), or buffers='frozen' / "
            "'batch_stats'")
    return est


@dataclass(frozen=True)
class TrackingProblem(hg.Problem):
    """A core problem whose inner step also updates BatchNorm running statistics.

    The statistics live in the parameter pytree (keys ``"<layer>.running_mean"``,
    ``"<layer>.running_var"``, ``"<layer>.num_batches_tracked"``, the count as a float);
    the inner loss does not read them (its gradient there is zero), the optimizer's
    update of them is discarded, and :meth:`step` replaces them by the BatchNorm update
    from the step's batch. The outer loss reads them (eval mode).
    """

    track_step: Callable[..., tuple[Params, State]] | None = field(
        default=None, repr=False, compare=False)

    def step(self, params: Params, state: State, hparams: Params,
             t: int) -> tuple[Params, State]:
        assert self.track_step is not None
        return self.track_step(params, state, hparams, self.batch_at(t))


# --- the tracked statistics -------------------------------------------------------------


@dataclass(frozen=True)
class TrackedLayer:
    """A BatchNorm layer whose running statistics ``buffers="track"`` carries."""

    name: str
    momentum: float | None  # None: cumulative average

    def key(self, buffer: str) -> str:
        """The parameter-pytree key of one of its :data:`TRACKED_BUFFERS`."""
        return f"{self.name}{'.' if self.name else ''}{buffer}"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key(b) for b in TRACKED_BUFFERS)


def tracked_layers(module: nn.Module, buffers: str) -> list[TrackedLayer]:
    """The BatchNorm layers with running statistics, for ``buffers="track"`` (else none)."""
    if buffers != "track":
        return []
    return [TrackedLayer(n, m.momentum) for n, m in module.named_modules()
            if isinstance(m, BATCHNORM) and m.running_mean is not None]


def initial_stats(module: nn.Module, layers: list[TrackedLayer]) -> Params:
    """The module's running statistics of ``layers``, as detached floating tensors (the
    count in the running mean's dtype)."""
    named = dict(module.named_modules())
    out: Params = {}
    for layer in layers:
        m = named[layer.name]
        rm = m.running_mean.detach().clone()
        for b in TRACKED_BUFFERS:
            v = getattr(m, b)
            out[layer.key(b)] = rm.new_tensor(0.0) if v is None else \
                v.detach().clone().to(rm.dtype)
    return out


#: one forward pass's batch statistics of one layer: (mean, unbiased variance) per channel
Moments = tuple[torch.Tensor, torch.Tensor]


class BatchStats(dict[nn.Module, list[Moments]]):
    """What the tracked BatchNorm layers recorded during one loss evaluation: layer (the
    module object that ran) -> the batch moments of each of its forward passes, in order.
    Layers of other models that ran in the same block are recorded too; a reader looks up
    its own layers only."""


_RECORDING: contextvars.ContextVar[BatchStats | None] = contextvars.ContextVar(
    "bilevel_batch_stats", default=None)


@contextmanager
def recording_batch_stats() -> Iterator[BatchStats]:
    """Inside ``with``: tracked BatchNorm layers (:func:`batchnorm_train`) running in this
    context record their batch moments into the yielded :class:`BatchStats`. Blocks nest
    (an inner block hides the outer one until it closes) and are private to their thread
    or task."""
    stats = BatchStats()
    token = _RECORDING.set(stats)
    try:
        yield stats
    finally:
        _RECORDING.reset(token)


def update_running_stats(params: Params, layers: list[TrackedLayer],
                         recorded: dict[str, list[Moments]]) -> Params:
    """The running statistics of ``layers`` (read from ``params``) after forward passes with
    the ``recorded`` batch moments (layer name -> moments in order), exactly as
    ``nn.BatchNorm`` updates them in training mode, differentiably: per pass the count
    grows by one and, with ``factor`` the momentum (or ``1 / count`` for a cumulative
    average), ``running ← (1 − factor) · running + factor · batch`` for the mean and the
    unbiased variance."""
    out: Params = {}
    for layer in layers:
        rm, rv = params[layer.key("running_mean")], params[layer.key("running_var")]
        count = params[layer.key("num_batches_tracked")]
        for mean, var in recorded.get(layer.name, []):
            count = count + 1
            factor = 1.0 / count if layer.momentum is None else layer.momentum
            rm = (1 - factor) * rm + factor * mean
            rv = (1 - factor) * rv + factor * var
        out.update({layer.key("running_mean"): rm, layer.key("running_var"): rv,
                    layer.key("num_batches_tracked"): count})
    return out


# --- BatchNorm forwards in plain differentiable ops ---------------------------------------


def _affine(self: nn.Module, y: torch.Tensor, shape: tuple) -> torch.Tensor:
    if self.weight is not None:
        y = y * self.weight.reshape(shape)
    if self.bias is not None:
        y = y + self.bias.reshape(shape)
    return y


def batchnorm_train(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode (batch statistics) written with plain differentiable ops,
    so that forward-over-reverse (forward-mode unrolling) works; inside
    :func:`recording_batch_stats` it records the batch mean and unbiased variance
    (``buffers="track"``)."""
    self._check_input_dim(x)
    if x.numel() <= x.shape[1]:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = _affine(self, (x - mean) * torch.rsqrt(var + self.eps), shape)
    recording = _RECORDING.get()
    if recording is not None:  # after the output: the graph's order (and rounding) as before
        recording.setdefault(self, []).append((x.mean(dims), x.var(dims, correction=1)))
    return y


def batchnorm_eval(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode written with differentiable ops (``buffers="track"``: the
    running statistics carry a graph back to the hyperparameters)."""
    self._check_input_dim(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - self.running_mean.reshape(shape)) * torch.rsqrt(
        self.running_var.reshape(shape) + self.eps)
    return _affine(self, y, shape)


def set_norm_layers(model: nn.Module, buffers: str, inner: bool,
                    tracked: list[TrackedLayer]) -> dict[str, nn.Module]:
    """Put the normalisation layers of a private copy ``model`` in the policy's mode.

    ``batch_stats`` (and ``track`` in the inner model): batch statistics, the running
    buffers dropped from the copy; ``frozen`` (and ``track`` in the outer model): eval
    mode. Tracked layers get :func:`batchnorm_train` / :func:`batchnorm_eval`. Returns the
    tracked layers of ``model`` by name (the objects whose records a step reads)."""
    names = {layer.name for layer in tracked}
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not isinstance(m, NORM_LAYER):
            continue
        if buffers == "batch_stats" or (inner and buffers == "track"):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.train(True)
            if name in names:  # the step reads the layer's batch moments for its update
                m.forward = types.MethodType(batchnorm_train, m)
                out[name] = m
        else:
            m.train(False)
            if name in names:  # native eval batch_norm refuses differentiable statistics
                m.forward = types.MethodType(batchnorm_eval, m)
                out[name] = m
    return out


__all__ = ["BATCHNORM", "BUFFER_POLICIES", "NORM_LAYER", "TRACKED_BUFFERS", "BatchStats",
           "BufferPolicyError", "Moments", "TrackedLayer", "TrackingProblem",
           "batchnorm_eval", "batchnorm_train", "check_estimator", "check_policy",
           "initial_stats", "recording_batch_stats", "running_stat_layers",
           "set_norm_layers", "tracked_layers", "update_running_stats"]
