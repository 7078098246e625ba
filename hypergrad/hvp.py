"""Hessian-vector products of an objective ``f(params, hparams, batch)`` in ``params``.

Three ways to form H v with H = ∇²_ww f:

- ``"jvp"``: forward-over-reverse, ``jvp(grad f, w; v)``. No stored graph.
- ``"reverse"``: reverse-over-reverse, recomputing ∇_w f for every product.
- ``"linearized"``: take the VJP of w ↦ ∇_w f once and reuse its pullback for every
  product (H is symmetric, so vᵀH = (Hv)ᵀ). Cheapest when many products are taken at
  the same point, as in every iteration of a linear solve.

``"auto"`` picks ``"linearized"`` and falls back to ``"jvp"`` when the model has an
operator without a double backward. Batched products apply ``vmap`` over the
leading dimension of the vectors: k products in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.func import grad, jvp, vjp, vmap

from .pytree import PyTree, tree_vdot

HVPMode = Literal["auto", "jvp", "reverse", "linearized"]
HVP_MODES = ("auto", "jvp", "reverse", "linearized")
Objective = Callable[[PyTree, PyTree, Any], torch.Tensor]


def _check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ValueError(f"hvp mode must be one of {HVP_MODES}, got {mode!r}")


def _grad_w(f: Objective, hparams: PyTree, batch: Any) -> Callable[[PyTree], PyTree]:
    return lambda w: grad(f)(w, hparams, batch)


def hvp(f: Objective, params: PyTree, hparams: PyTree, batch: Any, v: PyTree,
        mode: HVPMode = "reverse") -> PyTree:
    """One product ∇²_ww f(params, hparams, batch) · v."""
    return hvp_batched(f, params, hparams, batch, v, mode=mode, batched=False)


def hvp_batched(f: Objective, params: PyTree, hparams: PyTree, batch: Any, vs: PyTree,
                mode: HVPMode = "reverse", batched: bool = True) -> PyTree:
    """k products H · vs[i] at once; every leaf of ``vs`` has a leading dimension k."""
    _check_mode(mode)
    if mode in ("auto", "linearized"):
        return Linearization(f, params, hparams, batch, mode=mode).matvec(vs, batched=batched)
    g = _grad_w(f, hparams, batch)
    if mode == "jvp":
        one = lambda v: jvp(g, (params,), (v,))[1]  # noqa: E731
    else:
        one = lambda v: vjp(g, params)[1](v)[0]  # noqa: E731
    return vmap(one)(vs) if batched else one(vs)


class Linearization:
    """∇_w f linearized at one point, for repeated Hessian-vector products there.

    ``matvec(v)`` returns H v; with ``batched=True`` every leaf of ``v`` carries a
    leading dimension of k vectors and all k products are formed by one ``vmap``.
    """

    def __init__(self, f: Objective, params: PyTree, hparams: PyTree, batch: Any,
                 mode: HVPMode = "auto"):
        _check_mode(mode)
        self.mode = "linearized" if mode == "auto" else mode
        self.products = 0
        self._f, self._params, self._hparams, self._batch = f, params, hparams, batch
        self._grad = _grad_w(f, hparams, batch)
        self._pullback = None
        if self.mode == "linearized":
            try:
                _, self._pullback = vjp(self._grad, params)
            except RuntimeError:
                if mode != "auto":
                    raise
                self.mode = "jvp"

    def matvec(self, v: PyTree, batched: bool = False) -> PyTree:
        self.products += 1
        if self.mode == "linearized":
            pull = lambda u: self._pullback(u)[0]  # noqa: E731
            return vmap(pull)(v) if batched else pull(v)
        return hvp_batched(self._f, self._params, self._hparams, self._batch, v,
                           mode=self.mode, batched=batched)

    __call__ = matvec


def mixed_vjp(f: Objective, params: PyTree, hparams: PyTree, batch: Any, v: PyTree) -> PyTree:
    """The mixed product ∇²_λw f · v = ∂_λ ⟨∇_w f(params, λ, batch), v⟩ (same tree as λ)."""
    def inner(lam: PyTree) -> torch.Tensor:
        return tree_vdot(grad(f)(params, lam, batch), v)

    return grad(inner)(hparams)
