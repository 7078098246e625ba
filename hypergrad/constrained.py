"""Bilevel problems whose lower level has constraints coupling both levels.

    min_{x∈X, y∈Y} F(y, x)   s.t.   y ∈ argmin_{y∈Y} { f(y, x) : g(y, x) ≤ 0 }

with g(y, x) ∈ R^l. As everywhere in hypergrad, objectives take the inner variable
first: ``f(params, hparams, batch)`` with params = y and hparams = x, and so does
``g``. The sets X, Y and the joint set C (on the concatenation of x and y, whose
projection LV-HBA uses) are given by projections (:mod:`hypergrad.projections`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad

from .errors import BilevelInputError
from .hvp import Objective
from .projections import Projection, check_feasible, checked, flat_projector, project_tree
from .pytree import PyTree, tree_leaves, tree_ravel, tree_unravel

Constraint = Callable[[PyTree, PyTree, Any], torch.Tensor]
#: a map of flat vectors, shape (n,) -> (n,)
FlatMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ConstrainedProblem:
    """A bilevel problem with lower-level constraints g(y, x) ≤ 0.

    Args:
        inner_loss: f(y, x, batch), minimised over y.
        outer_loss: F(y, x, batch).
        constraints: g(y, x, batch) returning a 1-D tensor of ``num_constraints``
            values, feasible where all are ≤ 0; ``None`` for none.
        num_constraints: l, the length g must return.
        inner_set, outer_set: projections onto Y and X (a projection applied to the
            flattened variable, a dict of per-leaf projections, or ``None``: no set).
        joint_set: projection onto C ⊆ X × Y acting on the flat vector (x, y); LV-HBA
            projects its joint (x, y) step onto it, so it replaces ``outer_set`` and
            ``inner_set`` there and must enforce them itself (and should enforce
            g ≤ 0, as C = {(x, y) ∈ X × Y : g ≤ 0} in the method). Default: X × Y.
        inner_batch, outer_batch: the data f, g and F see.
        debug: verify that every projection returns a point inside its set.

    Raises:
        TypeError: ``inner_loss`` or ``outer_loss`` not callable.
        BilevelInputError: ``constraints`` given without ``num_constraints > 0`` or the
            reverse; later, ``g`` returning a shape other than ``(num_constraints,)``.

    Used by :class:`~hypergrad.LVHBA` and :class:`~hypergrad.KKTImplicit`.
    """

    inner_loss: Objective
    outer_loss: Objective
    constraints: Constraint | None = None
    num_constraints: int = 0
    inner_set: Projection | dict | None = None
    outer_set: Projection | dict | None = None
    joint_set: Projection | None = None
    inner_batch: Any = None
    outer_batch: Any = None
    debug: bool = False
    #: solvers' work prepared for this problem (LV-HBA's flat, possibly compiled iteration),
    #: kept here so that it goes when the problem goes
    _solver_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"ConstrainedProblem.{name} must be callable f(y, x, batch)")
        if (self.constraints is None) != (self.num_constraints == 0):
            raise BilevelInputError("ConstrainedProblem: give constraints g together with "
                                    "num_constraints = len(g(y, x)) > 0, or neither")

    def g(self, y: PyTree, x: PyTree) -> torch.Tensor:
        """The constraint values g(y, x) (shape ``(num_constraints,)``; shape ``(0,)``
        without constraints).

        Raises:
            BilevelInputError: ``constraints`` returned another shape or a non-tensor.
        """
        if self.constraints is None:
            leaf = tree_ravel(y)
            return leaf.new_zeros(0)
        out = self.constraints(y, x, self.inner_batch)
        if not isinstance(out, torch.Tensor) or out.shape != (self.num_constraints,):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BilevelInputError(f"constraints must return a tensor of shape "
                                    f"({self.num_constraints},), got {shape}")
        return out

    def lagrangian(self, multipliers: torch.Tensor) -> Objective:
        """L(y, x) = f(y, x) + μᵀ g(y, x) as an objective ``L(y, x, batch)``, for
        multipliers μ of shape ``(num_constraints,)``."""
        def L(y: PyTree, x: PyTree, batch: Any) -> torch.Tensor:
            value = self.inner_loss(y, x, batch)
            if self.num_constraints:
                value = value + multipliers @ self.g(y, x)
            return value
        return L

    def project_y(self, y: PyTree) -> PyTree:
        """Proj_Y(y) by ``inner_set`` (``y`` unchanged without one); same structure."""
        return self._project(self.inner_set, y, "inner_set")

    def project_x(self, x: PyTree) -> PyTree:
        """Proj_X(x) by ``outer_set`` (``x`` unchanged without one); same structure."""
        return self._project(self.outer_set, x, "outer_set")

    def project_xy(self, x: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
        """Proj_C(x, y): ``joint_set`` on the flat (x, y), or X × Y without one."""
        if self.joint_set is None:
            return self.project_x(x), self.project_y(y)
        proj = checked(self.joint_set, "joint_set") if self.debug else self.joint_set
        flat = proj(torch.cat([tree_ravel(x), tree_ravel(y)]))
        n = tree_ravel(x).numel()
        return tree_unravel(flat[:n], x), tree_unravel(flat[n:], y)

    def flat_projections(self, x: PyTree, y: PyTree
                         ) -> tuple[FlatMap | None, FlatMap | None]:
        """(Proj_Y, Proj_C) as maps of flat vectors, for variables shaped like ``x``, ``y``
        (leaves of one dtype): the first takes ``ravel(y)`` and returns the ravel of
        :meth:`project_y`, the second takes ``cat(ravel(x), ravel(y))`` and returns that of
        :meth:`project_xy`, with the same values. Shapes and key ranges are resolved once
        (see :func:`~hypergrad.projections.flat_projector`); ``None`` stands for a map
        that leaves every point as it is. With ``debug``, each checks its output.

        Raises:
            BilevelInputError: a dict of projections that does not match ``x`` or ``y``.
        """
        def spec(proj: Projection | dict | None, name: str) -> Any:
            return checked(proj, name) if self.debug else proj

        project_y = flat_projector(spec(self.inner_set, "inner_set"), y)
        if self.joint_set is not None:
            return project_y, spec(self.joint_set, "joint_set")
        project_x = flat_projector(spec(self.outer_set, "outer_set"), x)
        if project_x is None and project_y is None:
            return None, None
        n = sum(leaf.numel() for leaf in tree_leaves(x))

        def project_xy(v: torch.Tensor) -> torch.Tensor:
            vx, vy = v[:n], v[n:]
            return torch.cat([vx if project_x is None else project_x(vx),
                              vy if project_y is None else project_y(vy)])
        return project_y, project_xy

    def _project(self, proj: Projection | dict | None, tree: PyTree, name: str) -> PyTree:
        if proj is None:
            return tree
        if self.debug and not isinstance(proj, dict):
            proj = checked(proj, name)
        return project_tree(proj, tree)

    def check_start(self, y: PyTree, x: PyTree, tol: float = 1e-8) -> None:
        """Reject an infeasible starting point with the distance to the set at fault.

        Args:
            y: the inner variable (pytree); x: the outer variable (pytree).
            tol: allowed distance to each set (same units as the variables).

        Raises:
            BilevelInputError: ``y``, ``x`` or (x, y) outside its set (the distance is in
                the message), or ``g`` returning the wrong shape.
        """
        for proj, tree, name in ((self.inner_set, y, "params (y) in inner_set"),
                                 (self.outer_set, x, "hparams (x) in outer_set")):
            if isinstance(proj, dict):
                for key, p in proj.items():
                    check_feasible(p, tree[key], f"{name}[{key!r}]", tol)
            elif proj is not None:
                check_feasible(proj, tree_ravel(tree), name, tol)
        if self.joint_set is not None:
            check_feasible(self.joint_set, torch.cat([tree_ravel(x), tree_ravel(y)]),
                           "(hparams, params) in joint_set", tol)
        self.g(y, x)  # shape check

    def grads(self, fn: Objective, y: PyTree, x: PyTree, batch: Any) -> tuple[PyTree, PyTree]:
        """(∇_y fn, ∇_x fn) at (y, x): pytrees matching ``y`` and ``x``."""
        return grad(fn, argnums=(0, 1))(y, x, batch)
