"""Euclidean projections onto simple convex sets, for constrained bilevel solvers.

A projection ``P`` onto a closed convex set S maps v to the point of S nearest to v,
P(v) = argmin_{u ∈ S} ‖u − v‖. Every set below is a frozen dataclass with

* ``P(v)``: the projection of a tensor of any shape, returned with v's shape, dtype and
  device. Sets that are not separable (halfspace, simplex, ball, product) treat v as the
  flat vector ``v.reshape(-1)``. The input is never modified in place; only
  :class:`Identity` (and possibly a :class:`Custom` function) returns v itself.
* ``P.contains(v, tol)``: membership up to a tolerance that is relative to the size of
  the set's data (see :class:`Projection`).

The projections build no graph of their own worth differentiating: callers apply them
under ``torch.no_grad()``. :func:`project_tree` applies a projection (or a dict of them)
to a pytree; :func:`checked` wraps a projection with a membership check of its output,
to catch wrong user-supplied projections; :func:`check_feasible` rejects infeasible
starting points.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import BilevelInputError
from .pytree import PyTree, tree_leaves, tree_map2, tree_ravel, tree_unravel

__all__ = [
    "Ball",
    "Box",
    "Checked",
    "Custom",
    "Halfspace",
    "Hyperplane",
    "Identity",
    "NonNegative",
    "Product",
    "Projection",
    "ProjectionSpec",
    "Simplex",
    "as_projection",
    "check_feasible",
    "checked",
    "contains_tree",
    "distance",
    "flat_projector",
    "project_tree",
]

# ``contains`` never asks for more accuracy than this many machine epsilons of v's dtype,
# so that the float32 (or half) output of a correct projection is accepted.
_EPS_FACTOR = 64.0


@runtime_checkable
class Projection(Protocol):
    """Euclidean projection onto a closed convex set S.

    ``contains(v, tol)`` accepts v when its violation of the constraints is at most
    ``tol · max(1, scale)``, where scale is the magnitude of the quantities compared
    (the bound, the radius, ‖v‖ ...); ``tol`` is raised to 64 machine epsilons of v's
    dtype so that rounding in low precision is not reported as infeasibility.

    The sets of this module raise :class:`~hypergrad.errors.BilevelInputError` when ``v``
    is not a floating-point tensor (or has the wrong number of elements for the set's
    data), and ``ValueError`` at construction for bad set data (NaN bounds, a radius ≤ 0,
    a zero normal, lower > upper, …).

    References:
        Euclidean projections onto simple sets: Parikh & Boyd, "Proximal algorithms",
        Found. Trends Optim. 1(3), 2014, §6.2.
    """

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of S to ``v``: same shape, dtype and device as ``v``."""
        ...

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether ``v`` lies in S up to ``tol`` (relative, as above)."""
        ...


ProjectionSpec = Projection | Mapping[Any, Projection] | None
"""What :func:`project_tree` accepts: one projection, a dict of them per leaf, or None."""


# ----------------------------------------------------------------------------- helpers


def _check_input(v: Any, who: str) -> None:
    if not isinstance(v, Tensor):
        raise BilevelInputError(f"{who}: expected a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise BilevelInputError(f"{who}: expected a floating-point tensor, got dtype {v.dtype}")


def _tol(tol: float, v: Tensor) -> float:
    eps = torch.finfo(v.dtype).eps if v.is_floating_point() else 0.0
    return max(float(tol), _EPS_FACTOR * eps)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _param(value: Any, name: str, optional: bool = False) -> float | Tensor | None:
    """A float, or a detached private copy of a tensor (lists and arrays become float64)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required, got None")
    if _is_number(value):
        return float(value)
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
        t = value.detach().clone()
        return t if t.is_floating_point() else t.to(torch.float64)
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}") from e


def _scalar(value: Any, name: str) -> float:
    """A finite Python float from a number or a one-element tensor."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_number(value):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _cpu(x: float | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


def _fit(t: float | Tensor, v: Tensor, name: str) -> float | Tensor:
    """``t`` in v's dtype and device, broadcastable to v (or reshaped to v's shape)."""
    if not isinstance(t, Tensor):
        return t
    t = t.to(dtype=v.dtype, device=v.device)
    try:
        if torch.broadcast_shapes(t.shape, v.shape) == v.shape:
            return t
    except RuntimeError:
        pass
    if t.numel() == v.numel():
        return t.reshape(v.shape)
    raise BilevelInputError(f"{name} has shape {tuple(t.shape)}, which neither broadcasts to "
                            f"nor has as many elements as the input of shape {tuple(v.shape)}")


def _flat_vector(a: Tensor, v: Tensor, name: str) -> Tensor:
    if a.numel() != v.numel():
        raise BilevelInputError(f"{name} has {a.numel()} elements but the input has "
                                f"{v.numel()} (shape {tuple(v.shape)})")
    return a.to(dtype=v.dtype, device=v.device).reshape(-1)


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v.reshape(-1))


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal entries, NaN matching NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _callable_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# -------------------------------------------------------------------------------- sets


@dataclass(frozen=True)
class Identity:
    """The whole space (no constraint): P(v) = v, returned as is."""

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        return v

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        return True


@dataclass(frozen=True, eq=False)
class Box:
    """The box {v : lower ≤ v ≤ upper} (elementwise): P(v) = min(max(v, lower), upper).

    ``lower`` and ``upper`` are floats or tensors broadcastable to v (or with v's number of
    elements, then reshaped to v's shape); None (or ∓inf) leaves that side unbounded.

    Raises:
        ValueError: NaN or a wrong-signed infinity in a bound, bounds that do not broadcast
            together, or lower > upper somewhere (at construction).
        BilevelInputError: ``v`` not a floating tensor, or a bound that does not fit it.
    """

    lower: float | Tensor | None = None
    upper: float | Tensor | None = None

    def __post_init__(self) -> None:
        lo = _param(self.lower, "Box.lower", optional=True)
        hi = _param(self.upper, "Box.upper", optional=True)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        if lo is not None:
            lo_c = _cpu(lo)
            if bool((lo_c.isnan() | (lo_c == math.inf)).any()):
                raise ValueError("Box.lower must not contain NaN or +inf")
        if hi is not None:
            hi_c = _cpu(hi)
            if bool((hi_c.isnan() | (hi_c == -math.inf)).any()):
                raise ValueError("Box.upper must not contain NaN or -inf")
        if lo is not None and hi is not None:
            try:
                bad = lo_c > hi_c
            except RuntimeError as e:
                raise ValueError(f"Box.lower (shape {tuple(lo_c.shape)}) and Box.upper (shape "
                                 f"{tuple(hi_c.shape)}) do not broadcast together") from e
            if bool(bad.any()):
                lo_b, hi_b = torch.broadcast_tensors(lo_c, hi_c)
                i = int(bad.reshape(-1).nonzero()[0])
                raise ValueError(
                    f"Box.lower must be <= Box.upper elementwise, got lower > upper at "
                    f"{int(bad.sum())} entries (e.g. lower={lo_b.reshape(-1)[i].item():g} > "
                    f"upper={hi_b.reshape(-1)[i].item():g})")

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        _check_input(v, "Box")
        out = v
        if self.lower is not None:
            lo = _fit(self.lower, v, "Box.lower")
            out = torch.maximum(out, lo) if isinstance(lo, Tensor) else out.clamp_min(lo)
        if self.upper is not None:
            hi = _fit(self.upper, v, "Box.upper")
            out = torch.minimum(out, hi) if isinstance(hi, Tensor) else out.clamp_max(hi)
        return out.clone() if out is v else out

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        _check_input(v, "Box.contains")
        t = _tol(tol, v)
        if self.lower is not None:
            lo = _fit(self.lower, v, "Box.lower")
            slack = (lo.abs().clamp_min(1) * t) if isinstance(lo, Tensor) else max(1, abs(lo)) * t
            if not bool((v >= lo - slack).all()):
                return False
        if self.upper is not None:
            hi = _fit(self.upper, v, "Box.upper")
            slack = (hi.abs().clamp_min(1) * t) if isinstance(hi, Tensor) else max(1, abs(hi)) * t
            if not bool((v <= hi + slack).all()):
                return False
        return True


@dataclass(frozen=True)
class NonNegative:
    """The nonnegative orthant {v : v ≥ 0}: P(v) = max(v, 0) elementwise."""

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        _check_input(v, "NonNegative")
        return v.clamp_min(0)

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        _check_input(v, "NonNegative.contains")
        return bool((v >= -_tol(tol, v)).all())


@dataclass(frozen=True, eq=False)
class _AffineSet:
    """{v : ⟨a, v⟩ ≤ b} (``two_sided=False``) or {v : ⟨a, v⟩ = b} (``two_sided=True``),
    with ``a`` a nonzero tensor of as many elements as v (both read flat)."""

    a: Tensor
    b: float
    two_sided: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _validate_normal(self, type(self).__name__)

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        name = type(self).__name__
        _check_input(v, name)
        a = _flat_vector(self.a, v, f"{name}.a")
        flat = v.reshape(-1)
        excess = torch.dot(a, flat) - self.b
        if not self.two_sided:
            excess = excess.clamp_min(0)
        return (flat - (excess / torch.dot(a, a)) * a).reshape(v.shape)

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        name = type(self).__name__
        _check_input(v, f"{name}.contains")
        return _normal_violation(self.a, self.b, v, tol, f"{name}.a",
                                 two_sided=self.two_sided)


@dataclass(frozen=True, eq=False)
class Halfspace(_AffineSet):
    """The halfspace {v : ⟨a, v⟩ ≤ b}: P(v) = v − max(0, ⟨a, v⟩ − b) / ‖a‖² · a.

    Args:
        a: the normal, a nonzero finite tensor with as many elements as v (read flat).
        b: the offset (a float).

    Raises:
        ValueError: ``a`` empty, not finite or zero, or ``b`` not a number.
        BilevelInputError: ``v`` not a floating tensor, or with a different size than ``a``.
    """


@dataclass(frozen=True, eq=False)
class Hyperplane(_AffineSet):
    """The hyperplane {v : ⟨a, v⟩ = b}: P(v) = v − (⟨a, v⟩ − b) / ‖a‖² · a.

    Args and errors as :class:`Halfspace`.
    """

    two_sided: ClassVar[bool] = True


def _validate_normal(obj: Halfspace | Hyperplane, cls: str) -> None:
    a = _param(obj.a, f"{cls}.a")
    if not isinstance(a, Tensor):
        a = torch.tensor([a], dtype=torch.float64)
    a_c = _cpu(a)
    if a_c.numel() == 0:
        raise ValueError(f"{cls}.a must have at least one element")
    if not bool(torch.isfinite(a_c).all()):
        raise ValueError(f"{cls}.a must be finite")
    if not bool((a_c != 0).any()):
        raise ValueError(f"{cls}.a must be nonzero (a = 0 gives the whole space or the "
                         f"empty set)")
    object.__setattr__(obj, "a", a)
    object.__setattr__(obj, "b", _scalar(obj.b, f"{cls}.b"))


def _normal_violation(a: Tensor, b: float, v: Tensor, tol: float, name: str,
                      two_sided: bool) -> bool:
    a = _flat_vector(a, v, name)
    a_norm = _norm(a)
    gap = (torch.dot(a, v.reshape(-1)) - b) / a_norm  # signed distance to the boundary
    if two_sided:
        gap = gap.abs()
    scale = torch.maximum(_norm(v), (abs(b) / a_norm)).clamp_min(1)
    return bool(gap <= _tol(tol, v) * scale)


@dataclass(frozen=True)
class Simplex:
    """The simplex {v : v ≥ 0, Σv = radius} (v read flat): P(v) = max(v − θ, 0).

    θ is found by the sort-based O(n log n) algorithm (Held et al. 1974; Duchi et al.
    2008): with u = v sorted decreasingly, ρ = max{j : u_j − (Σ_{i≤j} u_i − r)/j > 0}
    and θ = (Σ_{i≤ρ} u_i − r)/ρ; then one Newton step on Σ max(v − θ, 0) = r removes the
    rounding error of the cumulative sum. Lower precisions are computed in float64.

    Raises:
        ValueError: ``radius`` not a positive number (at construction).
        BilevelInputError: ``v`` not a floating tensor, or empty.

    References:
        Held, Wolfe, Crowder, "Validation of subgradient optimization", Math. Prog. 1974;
        Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient projections onto the ℓ1-ball
        for learning in high dimensions", ICML 2008.
    """

    radius: float = 1.0

    def __post_init__(self) -> None:
        r = _scalar(self.radius, "Simplex.radius")
        if r <= 0:
            raise ValueError(f"Simplex.radius must be positive, got {r}")
        object.__setattr__(self, "radius", r)

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        _check_input(v, "Simplex")
        if v.numel() == 0:
            raise BilevelInputError("Simplex: cannot project an empty tensor (the simplex of "
                                    "dimension 0 is empty)")
        r = self.radius
        # Work in float64 (float32 on MPS, which lacks it): θ is of the size of max|v| and
        # rounding it to v's dtype would shift every output entry by ulp(θ) ≫ eps·radius.
        work = torch.float32 if v.device.type == "mps" else torch.float64
        flat = v.reshape(-1).to(torch.promote_types(v.dtype, work))
        u = torch.sort(flat, descending=True).values
        css = torch.cumsum(u, 0) - r
        k = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=v.device)
        cond = u - css / k > 0
        rho = torch.where(cond, k, torch.zeros_like(k)).argmax()  # last index satisfying cond
        theta = css[rho] / k[rho]
        # Newton step on f(θ) = Σ max(v − θ, 0) − r: exact when the active set is right.
        active = (flat > theta).sum().clamp_min(1).to(flat.dtype)
        theta = theta + ((flat - theta).clamp_min(0).sum() - r) / active
        return (flat - theta).clamp_min(0).to(v.dtype).reshape(v.shape)

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        _check_input(v, "Simplex.contains")
        if v.numel() == 0:
            return False
        slack = _tol(tol, v) * max(1.0, self.radius)
        return bool((v >= -slack).all()) and bool((v.sum() - self.radius).abs() <= slack)


@dataclass(frozen=True, eq=False)
class Ball:
    """The Euclidean ball {v : ‖v − c‖ ≤ radius} (v read flat), c = ``center`` (default 0):

    P(v) = v if ‖v − c‖ ≤ radius, else c + radius · (v − c) / ‖v − c‖.

    ``center`` is a float or a tensor broadcastable to v (or with v's number of elements).

    Raises:
        ValueError: ``radius`` not positive, or a non-finite ``center`` (at construction).
        BilevelInputError: ``v`` not a floating tensor.
    """

    radius: float = 1.0
    center: float | Tensor | None = None

    def __post_init__(self) -> None:
        r = _scalar(self.radius, "Ball.radius")
        if r <= 0:
            raise ValueError(f"Ball.radius must be positive, got {r}")
        object.__setattr__(self, "radius", r)
        c = _param(self.center, "Ball.center", optional=True)
        if c is not None and not bool(torch.isfinite(_cpu(c)).all()):
            raise ValueError("Ball.center must be finite")
        object.__setattr__(self, "center", c)

    def _offset(self, v: Tensor) -> tuple[Tensor, float | Tensor]:
        c = 0.0 if self.center is None else _fit(self.center, v, "Ball.center")
        return v - c, c

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        _check_input(v, "Ball")
        d, c = self._offset(v)
        dist = _norm(d)
        # Branch-free (no host sync); the scaled branch is NaN only where it is not taken.
        return torch.where(dist <= self.radius, v, c + d * (self.radius / dist))

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        _check_input(v, "Ball.contains")
        d, _ = self._offset(v)
        return bool(_norm(d) <= self.radius + _tol(tol, v) * max(1.0, self.radius))


@dataclass(frozen=True, eq=False)
class Product:
    """The Cartesian product S_1 × … × S_m on a flat vector split into consecutive slices.

    ``parts`` is a sequence of (projection, size): v (read flat, Σ sizes elements) is split
    as (v_1, …, v_m) with v_i of ``size_i`` elements, and P(v) = (P_1(v_1), …, P_m(v_m)).
    Each part receives its slice as a 1-D tensor. Plain functions are wrapped in Custom.

    Raises:
        ValueError: ``parts`` empty or not (projection, positive int size) pairs (at
            construction).
        BilevelInputError: ``v`` not a floating tensor, or with other than Σ sizes
            elements.

    Example:
        >>> import torch
        >>> P = Product([(NonNegative(), 2), (Box(upper=1.0), 1)])
        >>> P(torch.tensor([-1.0, 2.0, 3.0]))
        tensor([0., 2., 1.])
    """

    parts: Sequence[tuple[Projection, int]]

    def __post_init__(self) -> None:
        if isinstance(self.parts, (str, bytes)) or not isinstance(self.parts, Sequence):
            raise ValueError(f"Product.parts must be a sequence of (projection, size) pairs, "
                             f"got {type(self.parts).__name__}")
        if len(self.parts) == 0:
            raise ValueError("Product.parts must not be empty")
        parts = []
        for i, part in enumerate(self.parts):
            if not (isinstance(part, Sequence) and len(part) == 2):
                raise ValueError(f"Product.parts[{i}] must be a (projection, size) pair, "
                                 f"got {part!r}")
            proj, size = part
            if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"Product.parts[{i}] size must be a positive int, got {size!r}")
            size = int(size)
            try:
                proj = as_projection(proj)
            except TypeError as e:
                raise ValueError(f"Product.parts[{i}] projection: {e}") from e
            parts.append((proj, size))
        object.__setattr__(self, "parts", tuple(parts))

    @property
    def size(self) -> int:
        """The total number of elements, Σ sizes."""
        return sum(size for _, size in self.parts)

    def _split(self, v: Tensor) -> tuple[Tensor, ...]:
        if v.numel() != self.size:
            raise BilevelInputError(f"Product: the input has {v.numel()} elements (shape "
                                    f"{tuple(v.shape)}) but the parts' sizes sum to {self.size}")
        return torch.split(v.reshape(-1), [size for _, size in self.parts])

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        _check_input(v, "Product")
        pieces = self._split(v)
        out = [proj(piece).reshape(-1) for (proj, _), piece in zip(self.parts, pieces,
                                                                     strict=True)]
        return torch.cat(out).reshape(v.shape)

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        _check_input(v, "Product.contains")
        return all(proj.contains(piece, tol)
                   for (proj, _), piece in zip(self.parts, self._split(v), strict=True))


@dataclass(frozen=True, eq=False, init=False)
class Custom:
    """A user-supplied projection P(v) = fn(v), with an optional membership test.

    ``fn`` must return a tensor of v's shape and must not modify v in place.
    ``contains`` is called as ``contains(v, tol)`` when it takes two arguments, else as
    ``contains(v)``; it returns a bool. Without it, membership is idempotence:
    v ∈ S iff ‖P(v) − v‖ ≤ tol · max(1, ‖v‖).

    Raises:
        ValueError: ``fn`` or ``contains`` not callable (at construction).
        BilevelInputError: ``fn`` returned a non-tensor or another shape.
    """

    fn: Callable[[Tensor], Tensor]
    membership: Callable[..., Any] | None

    def __init__(self, fn: Callable[[Tensor], Tensor],
                 contains: Callable[..., Any] | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"Custom.fn must be callable, got {type(fn).__name__}")
        if contains is not None and not callable(contains):
            raise ValueError(f"Custom.contains must be callable or None, got "
                             f"{type(contains).__name__}")
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "membership", contains)

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        out = self.fn(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = (f"shape {tuple(out.shape)}" if isinstance(out, Tensor)
                   else type(out).__name__)
            raise BilevelInputError(f"Custom projection {_callable_name(self.fn)} returned "
                                    f"{got} for an input of shape {tuple(v.shape)}")
        return out

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        if self.membership is None:
            return bool(_norm(self(v) - v) <= _tol(tol, v) * max(1.0, float(_norm(v))))
        if _takes_two_args(self.membership):
            return bool(self.membership(v, tol))
        return bool(self.membership(v))


def _takes_two_args(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(None, None)
    except TypeError:
        return False
    return True


def as_projection(obj: Any) -> Projection:
    """A Projection from a Projection (as is), None (Identity) or a function (Custom).

    Raises:
        TypeError: ``obj`` is none of these.
    """
    if obj is None:
        return Identity()
    if isinstance(obj, Projection):
        return obj
    if callable(obj):
        return Custom(obj)
    raise TypeError(f"expected a Projection, a function or None, got {type(obj).__name__}")


# ----------------------------------------------------------------------------- pytrees


def _check_spec_keys(spec: Mapping, tree: PyTree, who: str) -> None:
    if not isinstance(tree, Mapping):
        raise BilevelInputError(f"{who}: a dict of projections needs a dict tree, got "
                                f"{type(tree).__name__}")
    unknown = [k for k in spec if k not in tree]
    if unknown:
        raise BilevelInputError(f"{who}: projections given for {unknown!r}, which are not "
                                f"leaves of the tree (its keys are {list(tree)!r})")


def project_tree(projection: ProjectionSpec, tree: PyTree) -> PyTree:
    """Project a pytree of tensors.

    * a single projection is applied to the flat concatenation of all leaves
      (``tree_ravel``), so that non-separable sets couple the leaves; a tree with a single
      leaf is projected in that leaf's shape;
    * a dict maps the keys of a dict tree to projections, each applied to its own entry
      (keys without one are left as they are);
    * None leaves the tree as it is.

    Returns:
        A pytree with the structure, shapes and dtypes of ``tree``.

    Raises:
        BilevelInputError: a dict of projections for a non-dict tree or with keys the
            tree lacks, or a leaf the projection refuses.
    """
    if projection is None:
        return tree
    if isinstance(projection, Mapping):
        _check_spec_keys(projection, tree, "project_tree")
        return {k: project_tree(as_projection(projection[k]), leaf) if k in projection else leaf
                for k, leaf in tree.items()}
    projection = as_projection(projection)
    if isinstance(tree, Tensor):
        return projection(tree)
    leaves = tree_leaves(tree)
    if not leaves:
        return tree
    if len(leaves) == 1:
        out = projection(leaves[0])
        return tree_unravel(out.reshape(-1), tree)
    out = tree_unravel(projection(tree_ravel(tree)), tree)
    return _cast_like(out, tree)


def flat_projector(projection: ProjectionSpec, like: PyTree
                   ) -> Callable[[Tensor], Tensor] | None:
    """:func:`project_tree` for trees shaped like ``like``, as a map of their flat vectors.

    The returned function takes ``tree_ravel(tree)`` (shape ``(n,)``, n the number of
    elements of ``like``, whose leaves share one dtype) and returns
    ``tree_ravel(project_tree(projection, tree))``, with the same values. The leaf
    shapes and a dict's key ranges are resolved once, here, so that each call is the
    projection itself (a single leaf still sees its own shape; a dict of projections adds
    one split and one concatenation). For solvers that keep their iterate flat across
    many projections.

    Returns:
        The map ``(n,) → (n,)``, or ``None`` where every point is left as it is
        (``None``, :class:`Identity`, a dict of those, a tree without leaves).

    Raises:
        BilevelInputError: a dict of projections for a non-dict ``like`` or with keys it
            lacks.
        TypeError: a projection that is neither a Projection, a function nor None.
    """
    if projection is None:
        return None
    if isinstance(projection, Mapping):
        _check_spec_keys(projection, like, "flat_projector")
        sizes, parts = [], []
        for key, sub in like.items():
            sizes.append(sum(leaf.numel() for leaf in tree_leaves(sub)))
            parts.append(flat_projector(as_projection(projection[key]), sub)
                         if key in projection else None)
        if all(part is None for part in parts):
            return None

        def project_pieces(v: Tensor) -> Tensor:
            return torch.cat([piece if part is None else part(piece)
                              for part, piece in zip(parts, v.split(sizes), strict=True)])
        return project_pieces
    projection = as_projection(projection)
    leaves = tree_leaves(like)
    if isinstance(projection, Identity) or not leaves:
        return None
    if len(leaves) > 1:
        return projection
    shape = leaves[0].shape

    def project_leaf(v: Tensor) -> Tensor:
        return projection(v.reshape(shape)).reshape(-1)
    return project_leaf


def _cast_like(out: PyTree, like: PyTree) -> PyTree:
    return tree_map2(lambda a, b: a if a.dtype == b.dtype else a.to(b.dtype), out, like)


def contains_tree(projection: ProjectionSpec, tree: PyTree, tol: float = 1e-8) -> bool:
    """Whether a pytree lies in the set, read as in :func:`project_tree` (``tol`` relative,
    see :class:`Projection`).

    Raises:
        BilevelInputError: as :func:`project_tree`.
    """
    if projection is None:
        return True
    if isinstance(projection, Mapping):
        _check_spec_keys(projection, tree, "contains_tree")
        return all(contains_tree(as_projection(p), tree[k], tol) for k, p in projection.items())
    projection = as_projection(projection)
    flat = _flatten_for(tree)
    return True if flat is None else projection.contains(flat, tol)


def _flatten_for(tree: PyTree) -> Tensor | None:
    if isinstance(tree, Tensor):
        return tree
    leaves = tree_leaves(tree)
    if not leaves:
        return None
    return leaves[0] if len(leaves) == 1 else tree_ravel(tree)


def distance(projection: Projection, v: Tensor) -> float:
    """‖P(v) − v‖, the Euclidean distance from v to the set (for a correct projection), as
    a float in the units of v."""
    return float(_norm(projection(v) - v))


def check_feasible(projection: ProjectionSpec, v: PyTree, name: str,
                   tol: float = 1e-8) -> None:
    """Raise BilevelInputError naming ``name`` if v (a tensor or pytree) is not in the set.

    The set is read as in :func:`project_tree`; the message gives the distance to the set.

    Raises:
        BilevelInputError: ``v`` is outside the set (beyond ``tol``, relative), or a dict
            of projections does not match ``v``.
    """
    if projection is None:
        return
    if isinstance(projection, Mapping):
        _check_spec_keys(projection, v, "check_feasible")
        for k, p in projection.items():
            check_feasible(p, v[k], f"{name}[{k!r}]", tol)
        return
    projection = as_projection(projection)
    flat = _flatten_for(v)
    if flat is None or projection.contains(flat, tol):
        return
    raise BilevelInputError(
        f"{name} is outside its feasible set: distance {distance(projection, flat):.3g} to the "
        f"set (‖P({name}) − {name}‖, tolerance {tol:g}); start from a feasible point, for "
        f"example its projection")


@dataclass(frozen=True, eq=False)
class Checked:
    """A debug wrapper: projects with ``projection``, then verifies the result.

    Raises BilevelInputError naming ``name`` when the output has the wrong shape, is not
    finite for a finite input, is outside the set (``projection.contains`` at ``tol``), or
    when the projection modified its input in place. ``ValueError`` at construction for a
    non-projection, a non-str ``name`` or a negative ``tol``.
    """

    projection: Projection
    name: str
    tol: float = 1e-8

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "projection", as_projection(self.projection))
        except TypeError as e:
            raise ValueError(f"Checked.projection: {e}") from e
        if not isinstance(self.name, str):
            raise ValueError(f"Checked.name must be a str, got {type(self.name).__name__}")
        if not (_is_number(self.tol) and self.tol >= 0):
            raise ValueError(f"Checked.tol must be a nonnegative number, got {self.tol!r}")

    def __call__(self, v: Tensor) -> Tensor:
        """P(v), the nearest point of the set: same shape, dtype and device as ``v``."""
        if not isinstance(v, Tensor):
            raise BilevelInputError(f"{self.name}: expected a torch.Tensor, got "
                                    f"{type(v).__name__}")
        before = v.detach().clone()
        out = self.projection(v)
        name = self.name
        if not _same(v.detach(), before):
            raise BilevelInputError(f"{name}: the projection modified its input in place; it "
                                    f"must return a new tensor")
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise BilevelInputError(f"{name}: the projection returned {got} for an input of "
                                    f"shape {tuple(v.shape)}")
        if bool(torch.isfinite(v).all()) and not bool(torch.isfinite(out).all()):
            raise BilevelInputError(f"{name}: the projection returned NaN or inf for a finite "
                                    f"input")
        if not self.projection.contains(out, self.tol):
            d = distance(self.projection, out)
            hint = (" (projecting it again does not move it: the projection and its "
                    "membership test disagree)" if d == 0 else "")
            raise BilevelInputError(
                f"{name}: the projection returned a point outside its set (distance "
                f"‖P(P(v)) − P(v)‖ = {d:.3g}, tolerance {self.tol:g}){hint}")
        return out

    def contains(self, v: Tensor, tol: float = 1e-8) -> bool:
        """Whether v lies in the set up to ``tol`` (relative; see :class:`Projection`)."""
        return self.projection.contains(v, tol)


def checked(projection: ProjectionSpec, name: str, tol: float = 1e-8) -> Any:
    """Wrap ``projection`` in :class:`Checked` (a dict of them: each, named ``name[key]``).

    None stays None (nothing to check).
    """
    if projection is None:
        return None
    if isinstance(projection, Mapping):
        return {k: Checked(as_projection(p), f"{name}[{k!r}]", tol)
                for k, p in projection.items()}
    return Checked(as_projection(projection), name, tol)
