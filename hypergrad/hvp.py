"""Hessian-vector products of an objective ``f(params, hparams, batch)`` in ``params``.

Three ways to form H v with H = ∇²_ww f:

- ``"jvp"``: forward-over-reverse, ``jvp(grad f, w; v)``. No stored graph.
- ``"reverse"``: reverse-over-reverse, recomputing ∇_w f for every product.
- ``"linearized"``: take the VJP of w ↦ ∇_w f once and reuse its pullback for every
  product (H is symmetric, so vᵀH = (Hv)ᵀ). Cheapest when many products are taken at
  the same point, as in every iteration of a linear solve.

``"auto"`` chooses per problem (:func:`choose_mode`): it forms one product on a random
probe both ways, keeps the faster of ``"linearized"`` and ``"jvp"`` when they agree, and
``"jvp"`` when they do not (an operator whose backward is not differentiable, e.g. a
``once_differentiable`` custom function, makes double backward silently wrong).
Batched products apply ``vmap`` over the leading dimension of the vectors: k products
in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.func import grad, jvp, vjp, vmap

from .errors import warn
from .pytree import PyTree, tree_leaves, tree_map, tree_norm, tree_sub, tree_vdot

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
    """One product ∇²_ww f(params, hparams, batch) · v.

    Args:
        f: the objective ``f(params, hparams, batch) -> 0-d tensor``.
        params: the point w, a pytree of floating tensors.
        hparams: λ, held fixed.
        batch: the data ``f`` sees.
        v: the vector, a pytree matching ``params``.
        mode: ``"reverse"`` (double backward), ``"jvp"`` (forward-over-reverse),
            ``"linearized"`` or ``"auto"`` (see the module docstring).

    Returns:
        H v, a pytree matching ``params``.

    Raises:
        ValueError: an unknown ``mode``.
        SecondOrderError: ``mode="jvp"`` and an operator of ``f`` has no forward-mode
            rule (the message names it).
        RuntimeError: neither double backward nor forward-over-reverse works
            (``"auto"``), or PyTorch's own error for ``"reverse"``.

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    return hvp_batched(f, params, hparams, batch, v, mode=mode, batched=False)


def hvp_batched(f: Objective, params: PyTree, hparams: PyTree, batch: Any, vs: PyTree,
                mode: HVPMode = "reverse", batched: bool = True,
                chunk_size: int | None = None) -> PyTree:
    """k products H · vs[i] at once; every leaf of ``vs`` has a leading dimension k.

    ``chunk_size`` vectorizes at most that many products at a time (less memory; on
    CPUs, chunks of about 8 are often faster per vector than one large batch).

    Args:
        f, params, hparams, batch, mode: as in :func:`hvp`.
        vs: k vectors, a pytree matching ``params`` with a leading dimension k on every
            leaf (``(k, *leaf.shape)``); a single vector when ``batched=False``.
        batched: whether ``vs`` carries the leading dimension.
        chunk_size: products per ``vmap`` chunk (``None``: all k at once).

    Returns:
        The products, shaped like ``vs``.

    Raises:
        ValueError, SecondOrderError, RuntimeError: as :func:`hvp`.
    """
    _check_mode(mode)
    if mode in ("auto", "linearized"):
        return Linearization(f, params, hparams, batch, mode=mode).matvec(
            vs, batched=batched, chunk_size=chunk_size)
    g = _grad_w(f, hparams, batch)
    if mode == "jvp":
        one = lambda v: jvp(g, (params,), (v,))[1]  # noqa: E731
    else:
        one = lambda v: vjp(g, params)[1](v)[0]  # noqa: E731
    try:
        return vmap(one, chunk_size=chunk_size)(vs) if batched else one(vs)
    except (RuntimeError, NotImplementedError) as exc:
        if mode != "jvp":
            raise
        raise _forward_error(f, hparams, params, batch, "hvp(mode='jvp')",
                             "mode='reverse' or 'linearized'", exc) from exc


def _forward_error(f: Objective, hparams: PyTree, params: PyTree, batch: Any, who: str,
                   instead: str, exc: BaseException) -> BaseException:
    from .second_order import forward_route_error  # imports Problem, which imports this

    return forward_route_error(f, hparams, params, batch, who, instead, exc)


class Linearization:
    """∇_w f linearized at one point, for repeated Hessian-vector products there.

    ``matvec(v)`` returns H v; with ``batched=True`` every leaf of ``v`` carries a
    leading dimension of k vectors and all k products are formed by one ``vmap``.
    With ``mode="auto"`` the form is chosen by :func:`choose_mode`; ``self.mode`` says
    which was taken (pass it back as ``mode`` to skip the choice next time).
    ``self.products`` counts the calls to :meth:`matvec`.

    Args:
        f: the objective ``f(params, hparams, batch) -> 0-d tensor``.
        params: the point w where H = ∇²_ww f is taken (pytree).
        hparams, batch: held fixed.
        mode: ``"auto"``, ``"linearized"``, ``"jvp"`` or ``"reverse"``.

    Raises:
        ValueError: an unknown ``mode``.
        RuntimeError: ``"auto"`` and no Hessian-vector product can be formed.

    Example:
        >>> import torch
        >>> f = lambda w, h, b: (h * w ** 2).sum()
        >>> lin = Linearization(f, torch.ones(2), torch.tensor([1.0, 3.0]), None,
        ...                     mode="linearized")
        >>> lin.matvec(torch.tensor([1.0, 1.0]))
        tensor([2., 6.])
    """

    def __init__(self, f: Objective, params: PyTree, hparams: PyTree, batch: Any,
                 mode: HVPMode = "auto"):
        _check_mode(mode)
        self.products = 0
        self._f, self._params, self._hparams, self._batch = f, params, hparams, batch
        self._grad = _grad_w(f, hparams, batch)
        self._pullback = None
        self.mode = choose_mode(self) if mode == "auto" else mode
        if self.mode == "linearized" and self._pullback is None:
            _, self._pullback = vjp(self._grad, params)

    def matvec(self, v: PyTree, batched: bool = False, chunk_size: int | None = None) -> PyTree:
        """H v, shaped like ``v`` (k products if ``batched``, ``chunk_size`` at a time)."""
        self.products += 1
        if self.mode == "linearized":
            pull = lambda u: self._pullback(u)[0]  # noqa: E731
            return vmap(pull, chunk_size=chunk_size)(v) if batched else pull(v)
        return hvp_batched(self._f, self._params, self._hparams, self._batch, v,
                           mode=self.mode, batched=batched, chunk_size=chunk_size)

    __call__ = matvec


def choose_mode(lin: Linearization) -> str:
    """Pick ``"linearized"`` or ``"jvp"`` for ``lin`` (see :func:`choose_between`).

    Raises:
        RuntimeError: neither form works.
    """
    def linearize() -> Callable[[PyTree], PyTree]:
        _, lin._pullback = vjp(lin._grad, lin._params)
        return lambda v: lin._pullback(v)[0]

    return choose_between(linearize, lambda v: jvp(lin._grad, (lin._params,), (v,))[1],
                          lin._params)


def choose_between(linearize: Callable[[], Callable[[PyTree], PyTree]],
                   forward: Callable[[PyTree], PyTree], like: PyTree) -> str:
    """Pick ``"linearized"`` or ``"jvp"`` from one probe product of each.

    ``linearize()`` builds the reusable product of the linearized form (its setup is not
    timed: a solve pays it once); ``forward(v)`` forms one product by forward-over-reverse.
    Both are timed on a seeded random vector shaped like ``like``; the faster is kept when
    they agree to 1e-4 relative. When they disagree, the double backward is wrong (a
    backward that is not differentiable): ``"jvp"`` is kept and a warning says so. A model
    without forward-mode rules keeps ``"linearized"``; one without double backward,
    ``"jvp"``.

    Returns:
        ``"linearized"`` or ``"jvp"``.

    Raises:
        RuntimeError: neither form works for this objective.

    Warns:
        RuntimeWarning: the two forms disagree (``"jvp"`` kept).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = tree_map(lambda a: torch.randn(a.shape, generator=gen, dtype=a.dtype)
                     .to(a.device), like)
    results = {}
    for mode in ("linearized", "jvp"):
        try:
            product = linearize() if mode == "linearized" else forward
            start = time.perf_counter()
            out = product(probe)
            _synchronize(out)
            results[mode] = (time.perf_counter() - start, out)
        except (RuntimeError, NotImplementedError):
            continue
    if not results:
        raise RuntimeError("neither double backward nor forward-over-reverse works for this "
                           "objective: no Hessian-vector product can be formed")
    if len(results) == 1:
        return next(iter(results))
    (t_lin, h_lin), (t_jvp, h_jvp) = results["linearized"], results["jvp"]
    scale = torch.maximum(tree_norm(h_lin), tree_norm(h_jvp)).clamp_min(1e-30)
    if float(tree_norm(tree_sub(h_lin, h_jvp)) / scale) > 1e-4:
        warn("Hessian-vector products by double backward and by forward-over-reverse "
             "disagree: an operator's backward is not differentiable "
             "(once_differentiable?); using forward-over-reverse ('jvp')", RuntimeWarning)
        return "jvp"
    return "linearized" if t_lin <= t_jvp else "jvp"


def _synchronize(tree: PyTree) -> None:
    leaves = tree_leaves(tree)
    if leaves and leaves[0].is_cuda:
        torch.cuda.synchronize(leaves[0].device)


def mixed_vjp(f: Objective, params: PyTree, hparams: PyTree, batch: Any, v: PyTree,
              mode: HVPMode = "reverse") -> PyTree:
    """The mixed product ∇²_λw f · v = ∂_λ ⟨∇_w f(params, λ, batch), v⟩ (same tree as λ).

    ``mode="jvp"`` forms ⟨∇_w f, v⟩ by forward mode and differentiates that in λ
    (reverse-over-forward), so no double backward is taken; otherwise
    reverse-over-reverse.

    Args:
        f, params, hparams, batch: as in :func:`hvp`.
        v: a pytree matching ``params``.
        mode: ``"jvp"``, or anything else for reverse-over-reverse.

    Returns:
        ∇²_λw f · v, a pytree matching ``hparams``.

    Raises:
        SecondOrderError: ``mode="jvp"`` and an operator has no forward-mode rule.
    """
    if mode == "jvp":
        def inner(lam: PyTree) -> torch.Tensor:
            return jvp(lambda w: f(w, lam, batch), (params,), (v,))[1]
    else:
        def inner(lam: PyTree) -> torch.Tensor:
            return tree_vdot(grad(f)(params, lam, batch), v)

    try:
        return grad(inner)(hparams)
    except (RuntimeError, NotImplementedError) as exc:
        if mode != "jvp":
            raise
        raise _forward_error(f, hparams, params, batch, "mixed_vjp(mode='jvp')",
                             "mode='reverse'", exc) from exc
