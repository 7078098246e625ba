"""Private copies of a user's module, for ``functional_call`` (used by :mod:`bilevel.module`).

A copy shares every tensor with the user's module but owns its containers, so modes,
patched methods and hooks set on it never reach the user's module; PyTorch's fused weight
norm is replaced in it by plain ops (its double backward is wrong). Also: a deep copy for
``export`` that tolerates non-leaf tensor attributes, and the name of the caller of a
running ``vmap`` for error messages.
"""

from __future__ import annotations

import copy
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from hypergrad.errors import BilevelInputError


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor and attribute value with
    ``module`` but owns its containers.

    Each submodule becomes a new object of the same class whose ``__dict__`` is a shallow
    copy of the original's, with its own copies of the top-level dicts, lists and sets in
    it (``_modules``, ``_parameters``, ``_buffers``, the hook dicts, RNN weight lists, ...).
    Nothing is deep-copied, so tensors that deepcopy refuses (legacy weight norm's computed
    weight) are fine, and setting modes, attributes, hooks or methods on the copy, or
    ``functional_call`` swapping its tensors, never touches ``module``. A submodule that
    appears twice is copied once (tied layers stay tied). References to modules of the tree
    held in attributes and in those containers (a hook or attribute that is a bound method
    of a submodule, a back-reference to a parent) are pointed at their copies, as
    ``copy.deepcopy`` would."""
    done: dict[int, nn.Module] = {}

    def one(name: str, m: nn.Module) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        try:
            new = type(m).__new__(type(m))
            new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                                 for k, v in vars(m).items()})
        except Exception as exc:
            raise BilevelInputError(
                f"cannot make a private copy of submodule {name or '<root>'} "
                f"({type(m).__name__}): {exc}. bilevel evaluates the model on shallow copies "
                "that share its tensors; use a plain nn.Module there") from exc
        done[id(m)] = new
        for k, sub in m._modules.items():
            new._modules[k] = None if sub is None else one(f"{name}{'.' if name else ''}{k}",
                                                            sub)
        return new

    def to_copy(v: Any) -> Any:
        if isinstance(v, nn.Module):
            return done.get(id(v), v)
        if isinstance(v, types.MethodType) and id(v.__self__) in done:
            return types.MethodType(v.__func__, done[id(v.__self__)])
        return v

    root = one("", module)
    for new in done.values():
        for k, v in vars(new).items():
            if isinstance(v, dict) and k != "_modules":
                v.update({key: to_copy(x) for key, x in v.items()})
            elif isinstance(v, list):
                v[:] = [to_copy(x) for x in v]
            elif not isinstance(v, set):
                new.__dict__[k] = to_copy(v)
    return root


def plain_weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)`` with plain differentiable ops: w = g · v / ‖v‖, the
    norm taken over every dimension but ``dim`` (over all of them for ``dim`` None or -1,
    as in PyTorch, where -1 does not mean the last dimension). The fused kernel behind
    ``torch._weight_norm`` has a wrong double backward and no forward-mode rule; this form
    has both right."""
    if dim is None or dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    if not -v.dim() <= dim < v.dim():
        raise IndexError(f"weight norm: dim {dim} is out of range for a weight of shape "
                         f"{tuple(v.shape)}")
    d = dim % v.dim()
    others = [i for i in range(v.dim()) if i != d]
    norm = torch.linalg.vector_norm(v, dim=others, keepdim=True) if others else v.abs()
    return v * (g / norm)


def _weight_norm_forward(self: nn.Module, weight_g: torch.Tensor,
                         weight_v: torch.Tensor) -> torch.Tensor:
    """``parametrizations.weight_norm``'s ``_WeightNorm.forward`` with plain ops."""
    return plain_weight_norm(weight_v, weight_g, self.dim)


def _legacy_weight_norm_hooks(name: str, dim: int, rest: torch.Tensor
                              ) -> tuple[Callable[..., None], Callable[..., None]]:
    """A forward pre-hook computing ``module.<name>`` from ``<name>_g`` and ``<name>_v`` with
    plain ops (legacy ``nn.utils.weight_norm``), and a forward hook putting ``rest`` (a
    detached tensor) back, so that no graph is kept between calls."""

    def compute(module: nn.Module, args: tuple) -> None:
        setattr(module, name, plain_weight_norm(getattr(module, name + "_v"),
                                           getattr(module, name + "_g"), dim))

    def release(module: nn.Module, args: tuple, output: Any) -> None:
        setattr(module, name, rest)

    return compute, release


_PARAMETRIZED_WEIGHT_NORM = getattr(parametrizations, "_WeightNorm", None)


def plain_weight_norms(model: nn.Module) -> None:
    """Replace PyTorch's fused weight norm by :func:`plain_weight_norm` in a private copy, for
    ``nn.utils.parametrizations.weight_norm`` (the ``_WeightNorm`` parametrization's
    forward) and the legacy ``nn.utils.weight_norm`` (its forward pre-hook). Parameter
    names do not change."""
    for m in model.modules():
        if _PARAMETRIZED_WEIGHT_NORM is not None and isinstance(m, _PARAMETRIZED_WEIGHT_NORM):
            m.forward = types.MethodType(_weight_norm_forward, m)
        for key, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, WeightNorm):
                current = getattr(m, hook.name, None)
                rest = current.detach() if isinstance(current, torch.Tensor) else current
                setattr(m, hook.name, rest)
                compute, release = _legacy_weight_norm_hooks(hook.name, hook.dim, rest)
                m._forward_pre_hooks[key] = compute
                m.register_forward_hook(release, always_call=True)


_FUSED_WEIGHT_NORM = tuple(f for f in (getattr(torch, "_weight_norm", None),
                                        getattr(torch, "_weight_norm_interface", None)) if f)


class FusedWeightNormCalls(TorchFunctionMode):
    """Inside ``with``: records the layers of ``model`` that call PyTorch's fused weight norm
    (its double backward is wrong) as ``self.layers``; layer names come from temporary hooks
    on ``model`` (a private copy), removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers, self._stack = model, [], []
        self._handles: list[Any] = []

    def __enter__(self) -> FusedWeightNormCalls:
        for name, m in self.model.named_modules():
            self._handles.append(m.register_forward_pre_hook(self._enter_layer(name),
                                                             prepend=True))
            self._handles.append(m.register_forward_hook(self._leave_layer, always_call=True))
        return super().__enter__()

    def _enter_layer(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._stack.append(name or "<root>")
        return hook

    def _leave_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._stack.pop()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, arg_types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in _FUSED_WEIGHT_NORM:
            layer = self._stack[-1] if self._stack else "<root>"
            if layer not in self.layers:
                self.layers.append(layer)
        return func(*args, **(kwargs or {}))


def deepcopy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``; tensors held as plain attributes that are not graph leaves
    (legacy weight norm's computed weight), which deepcopy refuses, are copied detached."""
    memo: dict[int, Any] = {id(v): v.detach().clone() for m in module.modules()
                            for v in vars(m).values()
                            if isinstance(v, torch.Tensor) and not v.is_leaf}
    try:
        return copy.deepcopy(module, memo)
    except Exception as exc:
        raise BilevelInputError(
            f"export deep-copies the module, and {type(module).__name__} cannot be "
            f"deep-copied ({exc}); evaluate trained parameters with mp.forward(params, x, "
            "outer=True) or load them into your own copy (load_state_dict)") from exc


_VMAP_FRAMES = ("vmap_impl", "_flat_vmap", "_chunked_vmap")


def vmap_caller() -> str:
    """The function that called the innermost running ``torch.func.vmap`` (the first frame
    outside torch above vmap's own), as ``module.function``."""
    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name in _VMAP_FRAMES and
                                     frame.f_code.co_filename.startswith(torch_dir)):
        frame = frame.f_back
    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
        frame = frame.f_back
    if frame is None:
        return "an unknown caller"
    code = frame.f_code
    return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"


__all__ = ["FusedWeightNormCalls", "deepcopy_module", "plain_weight_norm", "plain_weight_norms",
           "structural_copy", "vmap_caller"]
