"""Batches: what is one batch, how iterables are read, and how a model input is taken.

Data (``inner_data`` / ``outer_data`` of ``wrap``): a tensor, tuple, list, dict or
``None`` is *one batch* (:func:`is_single_batch`); any other iterable (a ``DataLoader``, a
generator; pass ``iter(list_of_batches)`` for a list) is a sequence of batches. Inner
iterables are read once, up to ``steps`` batches, and kept in memory (so memory grows
with ``steps`` × batch size; a loader shorter than ``steps`` is cycled: step ``t`` uses
batch ``t mod n``). Reading happens under ``torch.manual_seed(seed)`` (``seed + 1`` for
the outer data) with the global RNG restored, so a shuffled loader gives the same order
on every run. An outer iterable is read completely; the outer loss is then the mean of
the per-batch outer losses.

The core problem sees batches tagged with the inner step that uses them (:class:`At`),
so that random layers can be seeded per step, and several outer batches as one
:class:`Many`. The model input is ``inputs(batch)`` (or ``inputs(batch, hparams)``), by
default the batch itself for a tensor and ``batch[0]`` for a tuple or list
(:func:`default_inputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from hypergrad.errors import BilevelInputError


class At(NamedTuple):
    """A batch tagged with the inner step that uses it (``None``: not a step)."""

    batch: Any
    t: int | None


class Many(NamedTuple):
    """Several outer batches; the outer loss averages over them."""

    batches: tuple


def is_single_batch(data: Any) -> bool:
    """A tensor, tuple, list, dict or None is one batch; any other iterable is many."""
    return data is None or isinstance(data, (torch.Tensor, tuple, list, Mapping))


def check_data(data: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``data`` is one batch or an iterable of batches."""
    if not is_single_batch(data) and not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a batch (tensor, tuple, list, dict) or an "
                        f"iterable of batches, got {type(data).__name__}")


def read_batches(data: Iterable, limit: int | None, seed: int, what: str) -> list[Any]:
    """Materialise up to ``limit`` batches (all for ``None``) under ``torch.manual_seed(
    seed)``, the global RNG restored afterwards."""
    out: list[Any] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in data:
            if limit is not None and len(out) >= limit:
                break
            out.append(batch)
    if not out:
        raise BilevelInputError(f"{what} yielded no batches")
    return out


def inner_source(data: Any, steps: int, seed: int
                 ) -> tuple[At | None, Callable[[int], At]]:
    """The tagged full inner batch (``None`` for an iterable, whose last step's batch then
    serves) and the tagged batch of inner step ``t``."""
    if is_single_batch(data):
        def single(t: int) -> At:
            return At(data, t)

        return At(data, None), single
    batches = read_batches(data, max(steps, 1), seed, "inner_data")

    def cycled(t: int) -> At:
        return At(batches[t % len(batches)], t)

    return None, cycled


def outer_source(data: Any, seed: int) -> tuple[At, Callable[[int], At] | None]:
    """The tagged outer batch and, for an iterable (read under ``seed + 1``), the outer
    batch of outer step ``t``."""
    if is_single_batch(data):
        return At(data, None), None
    batches = tuple(read_batches(data, None, seed + 1, "outer_data"))

    def outer_step_batch(t: int) -> At:
        return At(batches[t % len(batches)], None)

    return At(Many(batches), None), outer_step_batch


# --- model inputs ------------------------------------------------------------------------


def default_inputs(batch: Any) -> Any:
    """The batch itself for a tensor, ``batch[0]`` for a non-empty tuple or list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise BilevelInputError(
        f"cannot take the model input from a batch of type {type(batch).__name__}; the "
        "default is the batch itself (tensor) or batch[0] (tuple/list); pass "
        "inputs=lambda batch: ...")


def _n_positional(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ps = list(sig.parameters.values())
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in ps):
        return 2
    return sum(p.kind in kinds for p in ps)


def input_reader(inputs: Callable[..., Any] | None
                 ) -> Callable[[Any, dict[str, torch.Tensor]], Any]:
    """``(batch, hparams) -> model input`` from ``inputs`` (``None``: :func:`default_inputs`;
    a function of the batch, or of the batch and the hyperparameters when it takes two
    positional arguments)."""
    if inputs is None:
        return lambda batch, hparams: default_inputs(batch)
    if _n_positional(inputs) >= 2:
        return inputs
    return lambda batch, hparams: inputs(batch)


__all__ = ["At", "Many", "check_data", "default_inputs", "inner_source", "input_reader",
           "is_single_batch", "outer_source", "read_batches"]
