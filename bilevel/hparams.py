"""Hyperparameters: one validator for every layer, one writer of ``.grad``.

Hyperparameters are a dict of floating-point tensors keyed by name, or an ``nn.Module``
whose parameters are the hyperparameters (e.g. distilled images and learnable labels).
Every layer that takes them (``wrap``, recorded loops, the outer loop) reads them
through :func:`validate_hparams`, and every hypergradient reaches ``.grad`` through
:func:`assign_grads`, so a ``torch.optim`` optimizer over the hyperparameters can take the
outer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hypergrad.errors import HyperparameterError


class HyperparameterTypeError(HyperparameterError, TypeError):
    """The hyperparameters are not a dict or an ``nn.Module``, or a key is not a string
    (both a :class:`~hypergrad.errors.HyperparameterError` and a ``TypeError``)."""


def validate_hparams(hparams: Any, *, name: str = "hparams") -> dict[str, torch.Tensor]:
    """The hyperparameter dict, checked: a non-empty dict of floating-point tensors with
    string keys (a new dict holding the same tensors), or an ``nn.Module``'s named
    parameters (the Parameter objects themselves, so updating them updates the module).

    Args:
        hparams: a mapping ``str -> floating tensor`` (any shapes) or an ``nn.Module``.
        name: how the hyperparameters are named in error messages.

    Returns:
        A new dict ``name -> tensor`` holding the same tensor objects.

    Raises:
        HyperparameterTypeError: ``hparams`` is neither a mapping nor a module, or a key
            is not a string.
        HyperparameterError: it is empty, or a value is not a floating-point tensor
            (naming ``name[key]`` and what it is).
    """
    if isinstance(hparams, nn.Module):
        out = dict(hparams.named_parameters())
        if not out:
            raise HyperparameterError(
                f"{name}: the hyperparameter module {type(hparams).__name__} has no "
                "parameters")
    elif isinstance(hparams, Mapping):
        out = dict(hparams)
        if not out:
            raise HyperparameterError(f"{name} is empty: give at least one floating-point "
                                      "tensor")
    else:
        raise HyperparameterTypeError(
            f"{name} must be a dict of floating-point tensors or an nn.Module of "
            f"hyperparameters, got {type(hparams).__name__}")
    for k, v in out.items():
        if not isinstance(k, str):
            raise HyperparameterTypeError(f"{name} keys must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise HyperparameterError(f"{name}[{k!r}] must be a floating-point tensor, got "
                                      f"{type(v).__name__}")
        if not v.is_floating_point():
            raise HyperparameterError(f"{name}[{k!r}] must be a floating-point tensor, got "
                                      f"dtype {v.dtype}")
    return out


def hparams_dict(hparams: Any) -> dict[str, torch.Tensor]:
    """:func:`validate_hparams` (the name kept for existing callers).

    Raises:
        HyperparameterError, HyperparameterTypeError: as :func:`validate_hparams`.
    """
    return validate_hparams(hparams)


def assign_grads(target: nn.Module | Mapping[str, torch.Tensor],
                 grads: Mapping[str, torch.Tensor], *, complete: bool = False) -> None:
    """Write a hypergradient into ``.grad`` of the hyperparameters ``target`` (an
    ``nn.Module`` of hyperparameters or a dict of leaf tensors), replacing any existing
    ``.grad`` with a detached copy in the hyperparameter's dtype and on its device.

    Everything is checked before anything is written: every key of ``grads`` must name a
    hyperparameter and match its shape, and with ``complete`` every hyperparameter must
    have a gradient.

    Args:
        target: the hyperparameters (as :func:`validate_hparams` accepts them).
        grads: ``name -> tensor`` with each hyperparameter's shape (e.g.
            ``Hypergradient.grad``); a subset of the names unless ``complete``.
        complete: require a gradient for every hyperparameter.

    Raises:
        HyperparameterError: an unknown key, a missing one (``complete``), a gradient that
            is not a tensor or has another shape, naming the key.
    """
    named = validate_hparams(target)
    unknown = [k for k in grads if k not in named]
    if unknown:
        raise HyperparameterError(f"no hyperparameter named {', '.join(map(repr, unknown))}; "
                                  f"have {list(named)}")
    if complete:
        missing = [k for k in named if k not in grads]
        if missing:
            raise HyperparameterError(
                f"no gradient for {', '.join(f'hparams[{k!r}]' for k in missing)}")
    for k, g in grads.items():
        if not isinstance(g, torch.Tensor):
            raise HyperparameterError(f"the gradient of hparams[{k!r}] must be a tensor, got "
                                      f"{type(g).__name__}")
        if g.shape != named[k].shape:
            raise HyperparameterError(
                f"the gradient of hparams[{k!r}] has shape {tuple(g.shape)}, expected "
                f"{tuple(named[k].shape)}")
    for k, g in grads.items():
        leaf = named[k]
        leaf.grad = g.detach().to(dtype=leaf.dtype, device=leaf.device).clone()


__all__ = ["HyperparameterError", "HyperparameterTypeError", "assign_grads", "hparams_dict",
           "validate_hparams"]
