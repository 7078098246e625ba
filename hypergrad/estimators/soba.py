"""Single-loop stochastic bilevel estimators: SOBA and its variance-reduced form SABA.

Dagréou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that enables
stochastic and global variance reduction algorithms", NeurIPS 2022. With inner variable
z (``params``), outer variable x (``hparams``), inner loss g (``problem.inner_loss``) and
outer loss f (``problem.outer_loss``), the hypergradient is ∇h(x) = ∇_x f + ∇²_xz g v*
with v* = −[∇²_zz g]⁻¹ ∇_z f at z = z*(x). Instead of solving for z* and v* at every
outer step, both are carried across outer steps and moved by one step each, along

    D_z = ∇_z g_i(z, x)
    D_v = ∇²_zz g_i(z, x) v + ∇_z f_j(z, x)
    D_x = ∇²_xz g_i(z, x) v + ∇_x f_j(z, x)

all evaluated at the current (z, v, x) on an inner minibatch i and an outer minibatch j:

    z ← z − ρ_t D_z,   v ← v − ρ_t D_v,   and the caller takes  x ← x − γ_t D_x.

Each call returns ``grad = D_x``, ``params`` = the new z and ``state = {"v", "t", …}``.
``v`` carries the *negative* of the implicit estimator's solution (v ≈ −H⁻¹∇_z f).
There is no inner loop: ``problem.steps`` and ``problem.optimizer`` are not used.
H v and ∇²_xz g v come from one reverse pass over ⟨∇_z g(z, x), v⟩ in (z, x), whose
auxiliary output is D_z itself (``hvp="reverse"``); ``hvp="jvp"`` forms ⟨∇_z g, v⟩ by
forward mode instead (no double backward) at the cost of a separate ∇_z g.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.func import grad, jvp

from ..problem import Problem
from ..pytree import (
    PyTree,
    tree_add,
    tree_axpy,
    tree_detach,
    tree_leaves,
    tree_map,
    tree_map2,
    tree_norm,
    tree_stack,
    tree_vdot,
    tree_zeros_like,
)
from ..second_order import Use, uses
from ..seeding import mix_seed
from ..validation import read_only_by_settings
from .base import (
    Diagnostics,
    Estimator,
    EstimatorState,
    Hypergradient,
    SelfCheck,
    check_self_check,
)

SobaHVP = Literal["reverse", "jvp"]


def soba_step_size(gamma: float, t: int) -> float:
    """γ_t = γ / √(t + 1), the decreasing step of SOBA's outer update at outer step t.

    With a torch optimizer on the hyperparameters, the same schedule is
    ``torch.optim.lr_scheduler.LambdaLR(opt, lambda t: soba_step_size(1.0, t))``.

    Args:
        gamma: the base outer step γ (a learning rate, > 0).
        t: the outer step index, 0 first.

    Returns:
        γ_t as a float.

    Source: Dagréou et al., NeurIPS 2022 (steps ∝ 1/√t).
    """
    return gamma / math.sqrt(t + 1)


def inner_directions(f: Callable, z: PyTree, x: PyTree, batch: Any, v: PyTree,
                     mode: SobaHVP = "reverse") -> tuple[PyTree, PyTree, PyTree]:
    """(∇_z g, ∇²_zz g · v, ∇²_xz g · v) of g = ``f(·, ·, batch)`` at (z, x).

    Both second-order products are the gradient in (z, x) of φ = ⟨∇_z g(z, x), v⟩.
    ``v`` is a pytree matching ``z``; the results match ``z``, ``z`` and ``x``.
    ``mode`` is ``"reverse"`` (double backward) or ``"jvp"`` (forward-over-reverse).
    """
    if mode == "reverse":
        def phi(z_: PyTree, x_: PyTree) -> tuple[torch.Tensor, PyTree]:
            gz = grad(f)(z_, x_, batch)
            return tree_vdot(gz, v), gz

        (hv, jv), gz = grad(phi, argnums=(0, 1), has_aux=True)(z, x)
        return gz, hv, jv

    def phi_fwd(z_: PyTree, x_: PyTree) -> torch.Tensor:
        return jvp(lambda w: f(w, x_, batch), (z_,), (v,))[1]

    hv, jv = grad(phi_fwd, argnums=(0, 1))(z, x)
    return grad(f)(z, x, batch), hv, jv


def outer_directions(f: Callable, z: PyTree, x: PyTree, batch: Any,
                     ) -> tuple[torch.Tensor, PyTree, PyTree]:
    """(f, ∇_z f, ∇_x f) of ``f(·, ·, batch)`` at (z, x): a detached 0-d loss and pytrees
    matching ``z`` and ``x``."""
    def f_aux(z_: PyTree, x_: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
        out = f(z_, x_, batch)
        return out, out.detach()

    (fz, fx), loss = grad(f_aux, argnums=(0, 1), has_aux=True)(z, x)
    return loss, fz, fx


def _positive(owner: str, field: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{owner}.{field} must be a positive {'int' if integer else 'number'}"
                         f", got {value!r}")


def _check_hvp(owner: str, mode: str) -> None:
    if mode not in ("reverse", "jvp"):
        raise ValueError(f"{owner}.hvp must be 'reverse' or 'jvp', got {mode!r}")


class _SingleLoopRoutes:
    """The second-order routes of SOBA and SABA: ⟨∇_z g, v⟩ differentiated in (z, x) by
    double backward (``hvp="reverse"``) or reverse-over-forward (``hvp="jvp"``), checked
    on the first inner sample."""

    hvp: SobaHVP

    def second_order_routes(self, state: EstimatorState) -> frozenset[Use]:
        return uses("reverse" if self.hvp == "reverse" else "reverse_forward")

    def route_options(self) -> list[tuple[frozenset[Use], str]]:
        owner = type(self).__name__
        return [(uses("reverse"), f"{owner}(hvp='reverse')"),
                (uses("reverse_forward"), f"{owner}(hvp='jvp')")]

    def second_order_batch(self, problem: Problem) -> Any:
        return problem.batch_at(0)

    def zero_message(self, problem: Problem, hparams: PyTree, params: PyTree) -> str:
        """Zero because only ``problem.optimizer``'s settings read the hyperparameters."""
        if not read_only_by_settings(problem, hparams, params):
            return Estimator.zero_message(self, problem, hparams, params)
        return (f"{self.name}: the hypergradient is exactly zero because the hyperparameters "
                "are read only by problem.optimizer's settings (learning rate, momentum, "
                f"...), which {type(self).__name__} does not use: it takes its own steps of "
                "size rho. Use an unrolled estimator (Unrolled or Truncated) to tune "
                "optimizer settings")


def _diagnostics(name: str, loss: torch.Tensor, d_z: PyTree, d_v: PyTree,
                 f_z: PyTree) -> Diagnostics:
    """``solve_residual`` = ‖D_v‖ / ‖∇_z f‖: the relative residual of H v = −∇_z f."""
    res, scale = float(tree_norm(d_v)), float(tree_norm(f_z))
    return Diagnostics(name, float(loss), float(tree_norm(d_z)), 1,
                       solve_iterations=1, solve_residual=res / scale if scale > 0 else res)


@dataclass(frozen=True)
class SOBA(_SingleLoopRoutes, Estimator):
    """Stochastic single-loop bilevel estimator (one inner step, one v step per call).

    At outer step ``t = state["t"]`` (0 first) the inner minibatch is
    ``problem.batch_at(t)`` (``step_batch(t)``) and the outer one
    ``problem.outer_batch_at(t)`` (``outer_step_batch(t)``); without them the full
    batches are used, which gives deterministic single-loop bilevel descent.

    Args:
        rho: step ρ of the z and v updates.
        decay: use ρ_t = ρ / √(t + 1) (default); ``False`` keeps ρ constant. Apply
            :func:`soba_step_size` to the outer step likewise.
        hvp: ``"reverse"`` (one pass, double backward) or ``"jvp"`` (forward mode).
        self_check: ``"error"`` (default), ``"warn"`` or ``"off"``: the second-order
            self-check on the first call for an inner loss (:mod:`hypergrad.second_order`).

    State: ``"v"`` (default zeros like ``params``) and ``"t"`` (default 0).
    ``grad`` is D_x (pytree matching ``hparams``); ``params`` the new z.
    ``Diagnostics.solve_residual`` is ‖D_v‖ / ‖∇_z f‖ and ``inner_grad_norm`` ‖D_z‖.

    Raises:
        ValueError: ``rho`` not a positive number, ``hvp`` not ``"reverse"``/``"jvp"``,
            or ``decay`` not a bool (at construction).
        BilevelInputError: a bad ``self_check``.
        DivergenceError, NonFiniteError, SecondOrderError: see :meth:`Estimator.__call__`.

    References:
        Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables
        stochastic and global variance reduction algorithms", NeurIPS 2022.
    """

    name: ClassVar[str] = "soba"
    rho: float = 0.1
    decay: bool = True
    hvp: SobaHVP = "reverse"
    self_check: SelfCheck = field(default="error", kw_only=True)

    def __post_init__(self) -> None:
        check_self_check("SOBA", self.self_check)
        _positive("SOBA", "rho", self.rho)
        _check_hvp("SOBA", self.hvp)
        if not isinstance(self.decay, bool):
            raise ValueError(f"SOBA.decay must be a bool, got {self.decay!r}")

    def step_size(self, t: int) -> float:
        """ρ_t at outer step ``t``: ρ / √(t + 1) with ``decay``, else ρ."""
        return self.rho / math.sqrt(t + 1) if self.decay else self.rho

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        t = int(state.get("t", 0))
        z, x = tree_detach(params), tree_detach(hparams)
        v = tree_detach(state["v"]) if "v" in state else tree_zeros_like(z)
        d_z, hv, jv = inner_directions(problem.inner_loss, z, x, problem.batch_at(t), v,
                                       self.hvp)
        loss, f_z, f_x = outer_directions(problem.outer_loss, z, x, problem.outer_batch_at(t))
        d_v, d_x = tree_add(hv, f_z), tree_add(jv, f_x)
        rho = self.step_size(t)
        new_state = {**state, "v": tree_axpy(-rho, d_v, v), "t": t + 1}
        return Hypergradient(d_x, tree_axpy(-rho, d_z, z), new_state,
                             _diagnostics(self.name, loss, d_z, d_v, f_z))


@dataclass(frozen=True)
class SABA(_SingleLoopRoutes, Estimator):
    """SOBA with SAGA variance reduction over finite sums, at constant step sizes.

    The inner loss is g = (1/n) Σ_i g_i over ``n_inner`` samples and the outer loss
    f = (1/m) Σ_j f_j over ``n_outer`` samples; sample i is ``problem.step_batch(i)``
    and sample j ``problem.outer_step_batch(j)`` (a Python int in
    ``range(n)``; the loss on it must be g_i, resp. f_j). With ``n_outer = 1`` and no
    ``outer_step_batch`` the full ``outer_batch`` is the only sample (likewise inner).

    A memory table holds, per inner sample, the last (∇_z g_i, ∇²_zz g_i v, ∇²_xz g_i v)
    and, per outer sample, the last (∇_z f_j, ∇_x f_j), each computed at the iterate
    where the sample was last drawn, with their means. Each call draws index sets I, J
    and uses, for every quantity q,

        q̂ = (1/|I|) Σ_{i∈I} (q_i(z, v, x) − memory_q[i]) + mean(memory_q),

    in D_z, D_v, D_x as in :class:`SOBA`, then stores the fresh q_i in the memory.

    Args:
        n_inner, n_outer: number of inner and outer samples.
        rho: constant step ρ of the z and v updates (use a constant outer step too).
        batch_size, outer_batch_size: samples drawn per call without replacement
            (outer default: ``batch_size``, capped at ``n_outer``).
        seed: draws at step t come from ``torch.Generator().manual_seed(mix_seed(seed, t))``.
        inner_index, outer_index: optional ``t -> indices`` replacing the random draws
            (e.g. epoch shuffles); indices must be distinct and in range.
        full_init: on the first call fill the memory by one pass over all samples (the
            first step is then a full-batch step); ``False`` starts from zeros.
        inplace: update the memory tables in place (O(|I|·d) per call instead of copying
            O(n·d)); the ``state`` passed in is then consumed and must not be reused.
        hvp: ``"reverse"`` or ``"jvp"``, as in :class:`SOBA`.
        self_check: the second-order self-check, as in :class:`SOBA`.

    State: ``"v"``, ``"t"``, ``"memory"`` and ``"mean"`` (each ``{"inner": (…),
    "outer": (…)}``, tables stacked along a leading sample dimension: shape
    ``(n_inner, *leaf.shape)`` or ``(n_outer, *leaf.shape)``). Memory is O(n·(dim z +
    dim x)).

    Raises:
        ValueError: at construction: ``n_inner``, ``n_outer``, ``batch_size`` or
            ``outer_batch_size`` not positive ints or larger than their ``n``, ``rho`` not
            positive, a bad ``hvp``, a non-int ``seed``; at call: ``n > 1`` samples
            without ``problem.step_batch`` / ``outer_step_batch``, or an
            ``inner_index``/``outer_index`` giving repeated or out-of-range indices.
        BilevelInputError: a bad ``self_check``.
        DivergenceError, NonFiniteError, SecondOrderError: see :meth:`Estimator.__call__`.

    References:
        Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022 (SABA); SAGA: Defazio, Bach,
        Lacoste-Julien, NeurIPS 2014.
    """

    name: ClassVar[str] = "saba"
    n_inner: int = 1
    n_outer: int = 1
    rho: float = 0.1
    batch_size: int = 1
    outer_batch_size: int | None = None
    seed: int = 0
    inner_index: Callable[[int], Sequence[int]] | None = None
    outer_index: Callable[[int], Sequence[int]] | None = None
    full_init: bool = True
    inplace: bool = False
    hvp: SobaHVP = "reverse"
    self_check: SelfCheck = field(default="error", kw_only=True)

    def __post_init__(self) -> None:
        check_self_check("SABA", self.self_check)
        for name in ("n_inner", "n_outer", "batch_size"):
            _positive("SABA", name, getattr(self, name), integer=True)
        if self.outer_batch_size is not None:
            _positive("SABA", "outer_batch_size", self.outer_batch_size, integer=True)
            if self.outer_batch_size > self.n_outer:
                raise ValueError(f"SABA.outer_batch_size must be <= n_outer = {self.n_outer}, "
                                 f"got {self.outer_batch_size}")
        if self.batch_size > self.n_inner:
            raise ValueError(f"SABA.batch_size must be <= n_inner = {self.n_inner}, "
                             f"got {self.batch_size}")
        _positive("SABA", "rho", self.rho)
        _check_hvp("SABA", self.hvp)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SABA.seed must be an int, got {self.seed!r}")

    def draw(self, t: int) -> tuple[list[int], list[int]]:
        """The inner and outer sample indices of step t (two lists of distinct ints).

        Raises:
            ValueError: ``inner_index``/``outer_index`` gave empty, repeated or
                out-of-range indices.
        """
        gen = torch.Generator().manual_seed(mix_seed(self.seed, t))
        b_out = self.outer_batch_size or min(self.batch_size, self.n_outer)
        out = []
        for kind, n, b, fn in (("inner", self.n_inner, self.batch_size, self.inner_index),
                               ("outer", self.n_outer, b_out, self.outer_index)):
            idx = [int(i) for i in fn(t)] if fn is not None else \
                torch.randperm(n, generator=gen)[:b].tolist()
            if not idx or len(set(idx)) != len(idx) or not all(0 <= i < n for i in idx):
                raise ValueError(f"SABA.{kind}_index({t}) must give distinct indices in "
                                 f"range({n}), got {idx}")
            out.append(idx)
        return out[0], out[1]

    def compute(self, problem: Problem, hparams: PyTree, params: PyTree,
                state: EstimatorState) -> Hypergradient:
        """One estimate; call the estimator instead (``__call__`` adds the checks)."""
        for n, acc, fld in ((self.n_inner, problem.step_batch, "step_batch"),
                            (self.n_outer, problem.outer_step_batch, "outer_step_batch")):
            if n > 1 and acc is None:
                raise ValueError(f"SABA needs Problem.{fld}(i) returning sample i "
                                 f"(n = {n} samples)")
        t = int(state.get("t", 0))
        z, x = tree_detach(params), tree_detach(hparams)
        v = tree_detach(state["v"]) if "v" in state else tree_zeros_like(z)

        def inner(ids: Sequence[int]) -> tuple:
            return _stack([inner_directions(problem.inner_loss, z, x, problem.batch_at(i), v,
                                            self.hvp) for i in ids])

        def outer(ids: Sequence[int]) -> tuple[tuple, torch.Tensor]:
            rows = [outer_directions(problem.outer_loss, z, x, problem.outer_batch_at(i))
                    for i in ids]
            return _stack([r[1:] for r in rows]), torch.stack([r[0] for r in rows]).mean()

        memory, mean = state.get("memory"), state.get("mean")
        if memory is None:
            if self.full_init:
                memory = {"inner": inner(range(self.n_inner)),
                          "outer": outer(range(self.n_outer))[0]}
            else:
                one = {"inner": inner([0]), "outer": outer([0])[0]}
                sizes = {"inner": self.n_inner, "outer": self.n_outer}
                memory = {k: tree_map(lambda a, n=sizes[k]: a.new_zeros((n, *a.shape[1:])), o)
                          for k, o in one.items()}
            mean = tree_map(lambda m: m.mean(0), memory)
        elif not self.inplace:
            memory = dict(memory)
        i_idx, j_idx = self.draw(t)
        (fresh_outer, loss), new_mean, est = outer(j_idx), {}, {}
        for key, ids, fresh, n in (("inner", i_idx, inner(i_idx), self.n_inner),
                                   ("outer", j_idx, fresh_outer, self.n_outer)):
            index = torch.tensor(ids, device=_device(fresh))
            delta = tree_map2(lambda f, m, ix=index: f - m.index_select(0, ix), fresh,
                              memory[key])
            est[key] = tree_map2(lambda d, a: d.mean(0) + a, delta, mean[key])
            new_mean[key] = tree_map2(lambda a, d, n=n: a + d.sum(0) / n, mean[key], delta)
            copy = (lambda m, f, ix=index: m.index_copy_(0, ix, f)) if self.inplace else \
                (lambda m, f, ix=index: m.index_copy(0, ix, f))
            memory[key] = tree_map2(copy, memory[key], fresh)
            if (t + 1) % n == 0:  # refresh the running means against round-off drift
                new_mean[key] = tree_map(lambda m: m.mean(0), memory[key])
        (d_z, hv, jv), (f_z, f_x) = est["inner"], est["outer"]
        d_v, d_x = tree_add(hv, f_z), tree_add(jv, f_x)
        new_state = {**state, "v": tree_axpy(-self.rho, d_v, v), "t": t + 1,
                     "memory": memory, "mean": new_mean}
        return Hypergradient(d_x, tree_axpy(-self.rho, d_z, z), new_state,
                             _diagnostics(self.name, loss, d_z, d_v, f_z))


def _stack(rows: list[tuple]) -> tuple:
    """Stack a list of tuples of trees into a tuple of trees with a leading dimension."""
    return tuple(tree_stack([r[k] for r in rows]) for k in range(len(rows[0])))


def _device(tree: PyTree) -> torch.device:
    return tree_leaves(tree)[0].device


__all__ = ["SABA", "SOBA", "inner_directions", "outer_directions", "soba_step_size"]
