"""A self-check of the second derivatives an estimator takes, once per inner objective.

Unrolled reverse mode, implicit solves and SOBA differentiate the inner gradient
G(w, λ) = ∇_w f(w, λ) a second time. PyTorch gets some of those derivatives wrong
*without an error*: ``torch.func`` treats the second derivative of a custom
``autograd.Function`` whose backward is not differentiable (``@once_differentiable``) as
zero, the fused weight norm (``torch._weight_norm``) has a wrong double backward, and
reverse-over-forward through ``layer_norm`` / ``batch_norm`` is wrong (torch 2.13).
Other operators have no rule for a route and fail with an unrelated message
("ZeroTensors are immutable").

:func:`check_second_order` forms two numbers on seeded random unit probes u (like w),
v_w (like w) and v_λ (like λ): the Hessian block uᵀ (∂²f/∂w²) v_w and the mixed block
uᵀ (∂²f/∂λ∂w) v_λ, along each route by which an estimator may form them,

- ``"reverse"``: double backward, the VJP of G (unrolled reverse mode, ``hvp="reverse"``
  and ``"linearized"``, fixed-point implicit, SOBA ``hvp="reverse"``);
- ``"forward"``: forward-over-reverse, the JVP of G (forward-mode unrolling, the
  products of ``hvp="jvp"``);
- ``"reverse_forward"``: reverse-over-forward, the gradient of a JVP of f (the mixed
  term of ``hvp="jvp"``, SOBA ``hvp="jvp"``),

and judges each (route, block) against central differences of the *first* derivative,
uᵀ(G(x + s v) − G(x − s v)) / 2s, which no second-derivative bug can touch, with its
error bar (:mod:`hypergrad.finite_difference`). A route outside the bar at each of the
steps s, s/10, s/100 whose differences are in their s² regime is ``"wrong"`` (a kink
inside one step cannot fool it); where the differences cannot judge (float32 noise,
kinks at every step), two routes that agree outvote a third. A route that raises is
``"unsupported"``. The check runs at the given point moved by 1 % of each tensor's
scale, so that a point where a second derivative happens to vanish (an all-zero start)
does not hide a wrong one.

Estimators run the check on their first call for an inner objective (the result is
cached per objective and batch: the objective's code, the objects its closure holds and
the globals it reads, with the layout of params, hparams and the batch's tensors and the
batch's other values)
and raise :class:`~hypergrad.errors.SecondOrderError` when a (route, block) they use is
wrong or unsupported, naming the likely operator and a setting that works;
``self_check="warn"`` warns instead, ``self_check="off"`` skips the check.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, jvp, vjp
from torch.overrides import TorchFunctionMode

from .errors import BilevelInputError, SecondOrderError
from .finite_difference import central_differences
from .problem import Problem
from .pytree import PyTree, tree_flatten, tree_leaves, tree_map, tree_norm, tree_unflatten

ROUTES = ("reverse", "forward", "reverse_forward")
ROUTE_NAMES = {
    "reverse": "double backward (reverse-over-reverse)",
    "forward": "forward-over-reverse (JVP of the gradient)",
    "reverse_forward": "reverse-over-forward (gradient of a JVP)",
}
BLOCKS = ("hessian", "mixed")
BLOCK_NAMES = {"hessian": "∂²f/∂w²", "mixed": "∂²f/∂λ∂w"}
#: a (route, block) pair: how an estimator forms one block of the second derivatives
Use = tuple[str, str]
#: statuses from best to worst
STATUSES = ("ok", "unverified", "disputed", "unsupported", "wrong")
#: relative agreement expected between two correct AD routes, per dtype (rounding of a
#: bilinear form of ~n terms is ~√n ε; these leave a wide margin and still catch a
#: second derivative that is wrong by 1e-6 (float64) or 1e-2 (float32) of its block's
#: scale). Half precision is not judged: its routes are "unverified".
AD_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
#: the differences verify a lone route when their error bar is below this fraction of
#: the block's scale
RESOLVED = 1e-2
#: the check's point: each tensor moved by this fraction of its RMS (absolute for zeros)
JITTER = 1e-2
CACHE_SIZE = 64
_SEED = 20_240_611


def uses(route: str, blocks: Iterable[str] = BLOCKS) -> frozenset[Use]:
    """The (route, block) pairs of one route for the given blocks (default: both).

    Example:
        >>> sorted(uses("reverse"))
        [('reverse', 'hessian'), ('reverse', 'mixed')]
    """
    return frozenset((route, b) for b in blocks)


@dataclass(frozen=True)
class RouteResult:
    """One route's values uᵀ(∂²f)v per block (``None`` where the route raised) and its
    verdict per block.

    ``status[block]`` is ``"ok"`` (agrees with the central differences, or with the
    other routes where the differences cannot judge), ``"wrong"`` (outside the
    differences' error bar, or outvoted by two agreeing routes), ``"unsupported"``
    (raised; the message is in ``error``), ``"unverified"`` (the only route, and the
    differences cannot judge) or ``"disputed"`` (disagrees with another route and nothing
    can tell which is right).
    """

    route: str
    value: dict[str, float | None]
    status: dict[str, str]
    error: str | None = None

    @property
    def worst(self) -> str:
        """The worst status over the blocks."""
        return max(self.status.values(), key=STATUSES.index)


@dataclass(frozen=True)
class SecondOrderReport:
    """What :func:`check_second_order` found about the second derivatives of f.

    Attributes:
        routes: ``route -> RouteResult`` for ``"reverse"``, ``"forward"``,
            ``"reverse_forward"``.
        scale: per block, max over routes of ‖Jᵀu‖ or ‖Jv‖ (unit probes): the size that
            agreement is measured against.
        finite_difference, fd_error: per block, the central differences of the gradient
            (the last usable step) and their error bar (``None`` where no step was usable).
        suspects: operators of f that commonly break second derivatives, found in its
            autograd graph, and operators found to break a failing route.
        unsupported_operator: the operator that stopped a forward-mode route, when found.
        seconds: wall time of the check.
    """

    routes: dict[str, RouteResult]
    scale: dict[str, float]
    finite_difference: dict[str, float | None] = field(default_factory=dict)
    fd_error: dict[str, float | None] = field(default_factory=dict)
    suspects: list[str] = field(default_factory=list)
    unsupported_operator: str | None = None
    seconds: float = 0.0

    def status(self, route: str, block: str | None = None) -> str:
        """The status of ``route`` in ``block`` (default: its worst over both blocks).

        Raises:
            ValueError: an unknown route or block.
        """
        if route not in self.routes:
            raise ValueError(f"unknown route {route!r}; the routes are {ROUTES}")
        if block is None:
            return self.routes[route].worst
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; the blocks are {BLOCKS}")
        return self.routes[route].status[block]

    def usable(self, pairs: Iterable[Use]) -> bool:
        """Every (route, block) in ``pairs`` is ``"ok"`` or ``"unverified"``."""
        return all(self.status(r, b) in ("ok", "unverified") for r, b in pairs)

    def summary(self) -> str:
        """One line per route and block: its value and verdict, then the differences."""
        lines = []
        for b in BLOCKS:
            lines.append(f"  block {BLOCK_NAMES[b]}:")
            for r in ROUTES:
                res = self.routes[r]
                value = "raised" if res.value[b] is None else f"{res.value[b]:.9e}"
                lines.append(f"    {ROUTE_NAMES[r]}: {value} ({res.status[b]})")
            fd, err = self.finite_difference.get(b), self.fd_error.get(b)
            if fd is not None and err is not None:
                lines.append(f"    central differences of the gradient: {fd:.9e} ± {err:.1e}")
        return "\n".join(lines)


# --- the probes ---------------------------------------------------------------------


def _floating(tree: PyTree) -> bool:
    return all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in tree_leaves(tree))


def _normal_like(tree: PyTree, gen: torch.Generator) -> PyTree:
    return tree_map(lambda a: torch.randn(a.shape, generator=gen, dtype=torch.float64)
                    .to(device=a.device, dtype=a.dtype), tree)


def _unit(tree: PyTree) -> PyTree:
    norm = _norm(tree)
    return tree_map(lambda a: a / norm, tree) if norm > 0 else tree


def _jittered(tree: PyTree, gen: torch.Generator) -> PyTree:
    """Each tensor moved by JITTER × its RMS (JITTER where it is all zeros)."""
    def move(a: torch.Tensor) -> torch.Tensor:
        rms = float(a.detach().double().pow(2).mean().sqrt()) if a.numel() else 0.0
        noise = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        return a + (JITTER * (rms if rms > 0 else 1.0) * noise).to(a.device, a.dtype)
    return tree_map(move, tree)


def _dot(x: PyTree, y: PyTree) -> float:
    with torch.no_grad():
        return float(sum((a.double() * b.double()).sum() for a, b in
                         zip(tree_leaves(x), tree_leaves(y), strict=True)))


def _norm(*trees: PyTree) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float(tree_norm(t)) ** 2 for t in trees if tree_leaves(t)))


class _Seeded:
    """Every evaluation under one fixed RNG seed (global RNG restored): a random layer
    draws the same mask along every route and at every point of the differences. Also
    silences torch's internal deprecation warning of its first forward-mode call."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*",
                                category=DeprecationWarning)
        torch.manual_seed(_SEED)

    def __exit__(self, *exc: Any) -> None:
        self._quiet.__exit__(*exc)
        self._fork.__exit__(*exc)


@dataclass
class _Probe:
    """The point and probe directions of one check, and the objective's gradient map."""

    f: Callable
    w: PyTree
    lam: PyTree
    batch: Any
    u: PyTree
    vw: PyTree
    vl: PyTree
    seeded: _Seeded

    def G(self, w: PyTree, lam: PyTree) -> PyTree:
        return grad(self.f)(w, lam, self.batch)

    def route(self, route: str) -> tuple[dict[str, float], dict[str, float]]:
        """uᵀ(∂²f)v per block along ``route``, and the norm of the vector each formed."""
        if route == "forward":  # two JVPs, each under the same seed as every evaluation
            zeros_w = tree_map(torch.zeros_like, self.w)
            zeros_l = tree_map(torch.zeros_like, self.lam)
            with self.seeded:
                hv = jvp(self.G, (self.w, self.lam), (self.vw, zeros_l))[1]
            with self.seeded:
                jv = jvp(self.G, (self.w, self.lam), (zeros_w, self.vl))[1]
            return ({"hessian": _dot(self.u, hv), "mixed": _dot(self.u, jv)},
                    {"hessian": _norm(hv), "mixed": _norm(jv)})
        with self.seeded:
            if route == "reverse":
                _, pullback = vjp(self.G, self.w, self.lam)
                hu, ju = pullback(self.u)
            else:
                def psi(w_: PyTree, lam_: PyTree) -> torch.Tensor:
                    return jvp(lambda x: self.f(x, lam_, self.batch), (w_,), (self.u,))[1]
                hu, ju = grad(psi, argnums=(0, 1))(self.w, self.lam)
        return ({"hessian": _dot(hu, self.vw), "mixed": _dot(ju, self.vl)},
                {"hessian": _norm(hu), "mixed": _norm(ju)})


# --- the check ------------------------------------------------------------------------


def check_second_order(problem: Problem | Callable[[PyTree, PyTree, Any], torch.Tensor],
                       hparams: PyTree, params: PyTree, batch: Any = None, *,
                       cache: bool = True) -> SecondOrderReport:
    """Check the second derivatives of the inner objective f along every route.

    ``problem`` is a :class:`~hypergrad.Problem` (its ``inner_loss`` on its
    ``full_batch()``, unless ``batch`` is given) or an objective ``f(params, hparams,
    batch)``. Forms the Hessian and mixed blocks uᵀ(∂²f)v near (``params``, ``hparams``)
    by double backward, forward-over-reverse and reverse-over-forward on seeded unit
    probes, and judges them by central differences of the gradient with an error bar;
    see the module docstring. Costs about 60 gradient evaluations once (up to ~100 when
    a route disagrees with the differences). With ``cache`` the report is kept per
    objective (its code, the objects its closure holds and the globals it reads) and
    batch (the layout of params, hparams and the batch's tensors, and the batch's other
    values: an operator passed in the batch is part of the key), the last 64, and
    returned again on the next call.

    Args:
        problem: a :class:`~hypergrad.Problem`, or an objective ``f(params, hparams,
            batch) -> 0-d tensor``.
        hparams: λ, a pytree of floating tensors.
        params: w, a non-empty pytree of floating tensors.
        batch: the data f sees (default: ``problem.full_batch()``).
        cache: reuse (and store) the report for this objective.

    Returns:
        :class:`SecondOrderReport`; ``report.usable(pairs)`` says whether the
        (route, block) pairs an estimator needs can be trusted, ``report.summary()``
        shows the values. ``seconds`` is the wall time in seconds.

    Raises:
        BilevelInputError: ``params`` or ``hparams`` are not pytrees of floating tensors,
            or ``problem`` is neither a Problem nor callable.
        Exception: whatever f or its gradient raises at the point (as the estimator
            would).
    """
    if isinstance(problem, Problem):
        f = problem.inner_loss
        batch = problem.full_batch() if batch is None else batch
    elif callable(problem):
        f = problem
    else:
        raise BilevelInputError("problem must be a hypergrad.Problem or an objective "
                                f"f(params, hparams, batch), got {type(problem).__name__}")
    if not tree_leaves(params) or not _floating(params) or not _floating(hparams):
        raise BilevelInputError("check_second_order needs params and hparams as pytrees of "
                                "floating-point tensors")
    key, held = None, ()
    if cache:
        from .hvp import _problem_key  # (hvp imports this module)

        key, held = _problem_key(f, params, hparams, batch, "check")
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]
    report = _run_check(f, params, hparams, batch)
    if key is not None:
        _CACHE[key] = (held, report)  # held so that the ids in the key stay unique
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return report


def clear_cache() -> None:
    """Forget every cached report (the next estimator call checks again)."""
    _CACHE.clear()


_CACHE: OrderedDict[tuple, tuple[tuple, SecondOrderReport]] = OrderedDict()


def _objective_key(f: Callable) -> tuple:
    """Objectives with the same code, closure objects and read globals share a report."""
    fn, owner = getattr(f, "__func__", f), getattr(f, "__self__", None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("object", id(f))
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(id(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append(None)
    scope = getattr(fn, "__globals__", {})
    read = tuple((n, id(scope[n])) for n in code.co_names if n in scope)
    return ("function", code, id(owner), tuple(cells), read)


def _run_check(f: Callable, params: PyTree, hparams: PyTree, batch: Any) -> SecondOrderReport:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(_SEED)
    w0 = tree_map(lambda a: a.detach(), params)
    lam0 = tree_map(lambda a: a.detach(), hparams)
    seeded = _Seeded(tree_leaves(w0) + tree_leaves(lam0))
    with seeded:  # an objective whose gradient fails fails as it would in the estimator
        grad(f)(w0, lam0, batch)
    w, lam = _jittered(w0, gen), _jittered(lam0, gen)
    if not _finite_gradient(f, w, lam, batch, seeded):  # the move left f's domain
        w, lam = w0, lam0
    probe = _Probe(f, w, lam, batch, _unit(_normal_like(w, gen)), _unit(_normal_like(w, gen)),
                   _unit(_normal_like(lam, gen)), seeded)
    values: dict[str, dict[str, float] | None] = {}
    errors: dict[str, str] = {}
    scale = dict.fromkeys(BLOCKS, 0.0)
    for route in ROUTES:
        try:
            values[route], norms = probe.route(route)
        except (RuntimeError, NotImplementedError) as exc:
            values[route], errors[route] = None, f"{type(exc).__name__}: {exc}"
            continue
        if not all(math.isfinite(v) for v in values[route].values()):
            values[route], errors[route] = None, "the product is NaN or inf"
            continue
        scale = {b: max(scale[b], norms[b]) for b in BLOCKS}
    done = {r: v for r, v in values.items() if v is not None}
    dtype = tree_leaves(w)[0].dtype
    status: dict[str, dict[str, str]] = {r: dict.fromkeys(BLOCKS, "unsupported") for r in ROUTES}
    fd_value: dict[str, float | None] = dict.fromkeys(BLOCKS)
    fd_error: dict[str, float | None] = dict.fromkeys(BLOCKS)
    if done and dtype not in AD_TOLERANCE:
        for r in done:
            status[r] = dict.fromkeys(BLOCKS, "unverified")
    elif done:
        slack = {b: AD_TOLERANCE[dtype] * scale[b] for b in BLOCKS}
        steps = _differences(probe, done, slack)
        for b in BLOCKS:
            if steps[b]:
                fd_value[b], fd_error[b] = steps[b][-1]
            judged = {r: done[r][b] for r in done}
            verdict = _judge(judged, steps[b], slack[b], RESOLVED * scale[b],
                             precise=_Precise(dtype, probe))
            for r, s in verdict.items():
                status[r][b] = s
    suspects = []
    if any(s != "ok" for st in status.values() for s in st.values()):
        suspects = _suspects(probe)
        for r in ROUTES:
            if any(status[r][b] == "wrong" for b in BLOCKS):
                op = _culprit(probe, r, "wrong")
                if op is not None:
                    suspects.append(f"{op}, whose {ROUTE_NAMES[r]} is wrong in PyTorch")
    unsupported_op = None
    forward_errors = errors.get("forward", "") + errors.get("reverse_forward", "")
    if forward_errors:
        unsupported_op = _forward_culprit(probe, forward_errors)
    routes = {r: RouteResult(r, dict(values[r]) if values[r] else dict.fromkeys(BLOCKS),
                             status[r], errors.get(r)) for r in ROUTES}
    return SecondOrderReport(routes, scale, fd_value, fd_error, list(dict.fromkeys(suspects)),
                             unsupported_op, time.perf_counter() - start)


class _Precise:
    """Truthy for float64 objectives whose graph holds a custom autograd.Function (agreeing
    routes of built-in operators are trusted; a custom Function's backward and jvp may be
    wrong together). The graph is walked only when the answer is needed."""

    def __init__(self, dtype: torch.dtype, probe: _Probe) -> None:
        self.dtype, self.probe, self.value = dtype, probe, None

    def __bool__(self) -> bool:
        if self.value is None:
            self.value = self.dtype == torch.float64 and any(
                getattr(n, "_forward_cls", None) is not None for n in _graph_nodes(self.probe))
        return self.value


def _finite_gradient(f: Callable, w: PyTree, lam: PyTree, batch: Any, seeded: _Seeded) -> bool:
    try:
        with seeded, torch.no_grad():
            g = grad(f)(w, lam, batch)
    except Exception:  # noqa: BLE001 - any failure at the moved point: use the given one
        return False
    return all(bool(torch.isfinite(a).all()) for a in tree_leaves(g))


def _judge(values: dict[str, float], steps: list[tuple[float, float]], slack: float,
           resolved: float, precise: Any) -> dict[str, str]:
    """The status of each route in one block.

    ``steps`` holds the (value, error bar) of the differences at each usable step. A
    route is wrong when two steps agree with each other (a kink makes them disagree) and
    the route with neither. Routes that agree with another route (independent derivative
    formulas giving one number) are overruled only by ``precise`` differences (float64,
    and a custom autograd.Function in the graph, whose backward and jvp may be wrong
    together) that agree at all three steps: with many kinks (a ReLU network) the
    differences settle on a smoothed derivative that includes the kinks, which AD rightly
    leaves out. A route is right when it agrees with a step whose
    bar is below ``resolved``. The rest are judged by agreement within ``slack``: with a
    route already found right, else by majority (two agreeing routes outvote a third; a
    lone route is unverified; a tie is disputed)."""
    def agrees(x: float, step: tuple[float, float]) -> bool:
        return abs(x - step[0]) <= step[1] + slack

    pairs = [(a, b) for i, a in enumerate(steps) for b in steps[i + 1:]
             if abs(a[0] - b[0]) <= a[1] + b[1]]
    settled = len(steps) == 3 and len(pairs) == 3 and bool(precise)
    backed = {r for r, x in values.items()
              if any(abs(values[k] - x) <= slack for k in values if k != r)}
    out = {r: "wrong" for r, x in values.items()
           if (settled or r not in backed)
           and any(not agrees(x, a) and not agrees(x, b) for a, b in pairs)}
    out.update({r: "ok" for r, x in values.items() if r not in out and
                any(agrees(x, st) and st[1] <= resolved for st in steps)})
    right = [r for r, s in out.items() if s == "ok"]
    rest = {r: v for r, v in values.items() if r not in out}
    for r, v in list(rest.items()):
        if any(abs(values[k] - v) <= slack for k in right):
            out[r] = "ok"
            del rest[r]
    if right:  # the differences vouch for other routes: disagreeing ones are wrong
        out.update(dict.fromkeys(rest, "wrong"))
        return out
    groups: list[list[str]] = []
    for r, v in rest.items():
        for g in groups:
            if abs(rest[g[0]] - v) <= slack:
                g.append(r)
                break
        else:
            groups.append([r])
    groups.sort(key=len, reverse=True)
    if len(groups) == 1:
        out.update(dict.fromkeys(groups[0], "ok" if len(groups[0]) > 1 else "unverified"))
    elif groups and len(groups[0]) > len(groups[1]):
        out.update(dict.fromkeys(groups[0], "ok"))
        out.update({r: "wrong" for g in groups[1:] for r in g})
    else:
        out.update({r: "disputed" for g in groups for r in g})
    return out


def _differences(probe: _Probe, done: dict[str, dict[str, float]], slack: dict[str, float]
                 ) -> dict[str, list[tuple[float, float]]]:
    """Central differences of uᵀG along (v_w, 0) and (0, v_λ) at steps s, s/10, s/100,
    stopping once every route agrees with one of them. Returns per block the (value,
    error bar) of each usable step (one whose differences are in their s² regime)."""
    ref = tree_leaves(probe.w)[0]
    step = torch.finfo(ref.dtype).eps ** (1 / 3) * max(1.0, _norm(probe.w), _norm(probe.lam))
    w_leaves, w_spec = tree_flatten(probe.w)
    l_leaves, l_spec = tree_flatten(probe.lam)
    vw_leaves, vl_leaves = tree_leaves(probe.vw), tree_leaves(probe.vl)

    def phi(x: torch.Tensor) -> float:
        sw, sl = float(x[0]), float(x[1])
        wp = tree_unflatten([a + sw * d for a, d in zip(w_leaves, vw_leaves, strict=True)],
                            w_spec)
        lp = tree_unflatten([a + sl * d for a, d in zip(l_leaves, vl_leaves, strict=True)],
                            l_spec)
        with probe.seeded, torch.no_grad():
            return _dot(probe.u, probe.G(wp, lp))

    x0 = torch.zeros(2, dtype=ref.dtype)
    directions = list(torch.eye(2, dtype=ref.dtype))
    steps: dict[str, list[tuple[float, float]]] = {b: [] for b in BLOCKS}
    for k in range(3):
        fd = central_differences(phi, x0, directions, step / 10 ** k)
        for i, b in enumerate(BLOCKS):
            if bool(fd.asymptotic[i]):  # else a kink within the step: no evidence
                steps[b].append((float(fd.value[i]), float(fd.error[i])))
        if all(any(abs(v[b] - x) <= e + slack[b] for x, e in steps[b][-1:])
               for b in BLOCKS for v in done.values()):
            break
    return steps


# --- naming the operator ---------------------------------------------------------------

#: autograd nodes of fused kernels whose second derivatives are wrong or missing
_FUSED = {
    "WeightNormInterfaceBackward": (
        "the fused weight norm torch._weight_norm (torch.nn.utils.parametrizations."
        "weight_norm or torch.nn.utils.weight_norm): PyTorch's double backward of it is "
        "wrong; compute g * v / v.norm() with basic ops (bilevel.wrap does this for "
        "wrapped modules)"),
    "ScaledDotProduct": (
        "a fused attention kernel of scaled_dot_product_attention (flash, memory-efficient "
        "or cuDNN), which has no double backward: use the math kernel, "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"),
}


def _graph_nodes(probe: _Probe) -> list[Any]:
    """The autograd nodes of one eager evaluation of f (empty if that fails)."""
    w_ = tree_map(lambda a: a.detach().requires_grad_(), probe.w)
    l_ = tree_map(lambda a: a.detach().requires_grad_(), probe.lam)
    try:
        with probe.seeded, torch.enable_grad():
            out = probe.f(w_, l_, probe.batch)
    except Exception:  # noqa: BLE001 - diagnosis only: a failure here names nothing
        return []
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return []
    seen, stack, nodes = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


def _is_once_differentiable(fn: Callable) -> bool:
    wrapped = getattr(fn, "__wrapped__", None)
    code = getattr(fn, "__code__", None)
    return wrapped is not None and code is not None and \
        code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py")


def _suspects(probe: _Probe) -> list[str]:
    """Operators in f's graph that commonly break second derivatives, described."""
    found: dict[str, str] = {}
    for node in _graph_nodes(probe):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            name = getattr(cls, "__qualname__", cls.__name__)
            notes = []
            if _is_once_differentiable(cls.backward):
                notes.append("its backward is @once_differentiable, so torch.func treats "
                             "its second derivative as zero")
            if getattr(cls, "jvp", None) is torch.autograd.Function.jvp:
                notes.append("it defines no jvp, so it has no forward mode")
            if not notes:
                notes.append("its backward and jvp must themselves be differentiable, and "
                             "right, for second derivatives")
            found[name] = f"the custom autograd.Function {name} ({'; '.join(notes)})"
            continue
        kind = type(node).__name__.lstrip("_")
        for prefix, text in _FUSED.items():
            if kind.startswith(prefix):
                found[prefix] = text
    return list(found.values())


_FORWARD_AD_MESSAGE = re.compile(r"forward AD with (\S+) that does not support it")


class _Recorder(TorchFunctionMode):
    """Records the top-level torch calls of one eager evaluation (with their arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _func_name(func: Callable) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if module.startswith("torch._C") or not module:
        module = "torch"
    name = name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "")
    return f"{module}.{name}" if not name.startswith("Tensor.") else name


def _recorded_calls(probe: _Probe) -> list[tuple[str, Callable, tuple, dict]]:
    """(name, func, args, kwargs) of the first call of each distinct torch function in one
    eager evaluation of f (at most 200)."""
    w_ = tree_map(lambda a: a.detach().requires_grad_(), probe.w)
    l_ = tree_map(lambda a: a.detach().requires_grad_(), probe.lam)
    recorder = _Recorder()
    try:
        with probe.seeded, torch.enable_grad(), recorder:
            probe.f(w_, l_, probe.batch)
    except Exception:  # noqa: BLE001 - diagnosis only
        return []
    out: dict[str, tuple[str, Callable, tuple, dict]] = {}
    for func, args, kwargs in recorder.calls:
        name = _func_name(func)
        if name not in out and len(out) < 200:
            out[name] = (name, func, args, kwargs)
    return list(out.values())


def _forward_culprit(probe: _Probe, message: str) -> str | None:
    """The operator of f without a forward-mode rule: from PyTorch's message when it
    names one, else a custom Function without jvp, else by trying each call of f."""
    match = _FORWARD_AD_MESSAGE.search(message)
    if match:
        return match.group(1)
    for node in _graph_nodes(probe):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls, "jvp", None) is torch.autograd.Function.jvp:
            return f"the custom autograd.Function {cls.__qualname__} (it defines no jvp)"
    return _culprit(probe, "forward", "unsupported")


def _culprit(probe: _Probe, route: str, kind: str) -> str | None:
    """The first torch call of f whose second derivatives, taken on its own, are
    ``kind`` (``"unsupported"``: the route raises; ``"wrong"``: the route disagrees with
    central differences of the call's gradient) along ``route``."""
    for name, func, args, kwargs in _recorded_calls(probe):
        if _op_fails(func, args, kwargs, route, kind):
            return name
    return None


def _op_fails(func: Callable, args: tuple, kwargs: dict, route: str, kind: str) -> bool:
    """Whether ``route`` raises (``kind="unsupported"``) or is wrong (``"wrong"``) for the
    scalar ⟨c, func(args)⟩ in its floating inputs, on seeded probes."""
    leaves, spec = tree_flatten((args, kwargs))
    slots = [i for i, x in enumerate(leaves)
             if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad]
    if not slots:
        return False
    try:
        with torch.no_grad():
            out = func(*args, **kwargs)
    except Exception:  # noqa: BLE001
        return False
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return False
    gen = torch.Generator().manual_seed(_SEED)
    c = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    xs = tuple(leaves[i].detach() for i in slots)
    a = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
              for x in xs)
    b = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
              for x in xs)

    def scalar(*ys: torch.Tensor) -> torch.Tensor:
        new = list(leaves)
        for i, y in zip(slots, ys, strict=True):
            new[i] = y
        p, k = tree_unflatten(new, spec)
        return (func(*p, **k) * c).sum()

    gradient = grad(scalar, argnums=tuple(range(len(xs))))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            if route == "reverse":
                value = _dot(vjp(gradient, *xs)[1](a), b)
            elif route == "forward":
                value = _dot(a, jvp(gradient, xs, b)[1])
            else:
                psi = lambda *ys: jvp(scalar, ys, a)[1]  # noqa: E731
                value = _dot(grad(psi, argnums=tuple(range(len(xs))))(*xs), b)
    except (RuntimeError, NotImplementedError):
        return kind == "unsupported"
    except Exception:  # noqa: BLE001 - anything else says nothing about the route
        return False
    if kind == "unsupported" or not math.isfinite(value):
        return False
    x0 = torch.zeros(1, dtype=xs[0].dtype)

    def h(t: torch.Tensor) -> float:
        s = float(t[0])
        with torch.no_grad():
            return _dot(a, gradient(*(x + s * d for x, d in zip(xs, b, strict=True))))

    try:
        fd = central_differences(h, x0, [torch.ones(1, dtype=x0.dtype)],
                                 torch.finfo(x0.dtype).eps ** (1 / 3) * max(1.0, _norm(xs)))
    except (ValueError, RuntimeError):
        return False
    return bool(fd.asymptotic[0]) and abs(value - float(fd.value[0])) > 2 * float(fd.error[0]) \
        + AD_TOLERANCE.get(x0.dtype, 1.0) * abs(float(fd.value[0]))


def forward_route_error(f: Callable, hparams: PyTree, params: PyTree, batch: Any, who: str,
                        instead: str, exc: BaseException) -> BaseException:
    """The error to raise when forward-mode differentiation of f's gradient failed with
    ``exc``: a :class:`SecondOrderError` naming the operator without a forward-mode rule
    and advising ``instead`` when the self-check confirms that this is what failed, else
    ``exc`` itself (an unrelated failure is not reworded)."""
    try:
        report = check_second_order(f, hparams, params, batch)
    except Exception:  # noqa: BLE001 - the diagnosis must not hide the original error
        return exc
    if "unsupported" not in (report.status("forward"), report.status("reverse_forward")):
        return exc
    op = report.unsupported_operator or "an operator of the objective"
    return SecondOrderError(
        f"{who}: forward-mode differentiation of the gradient is not supported by {op} "
        f"(PyTorch said: {str(exc).splitlines()[0][:200]}). Use {instead}, or write that "
        "operator with basic differentiable torch ops")


__all__ = ["BLOCKS", "ROUTES", "ROUTE_NAMES", "RouteResult", "SecondOrderReport", "Use",
           "check_second_order", "clear_cache", "uses"]
