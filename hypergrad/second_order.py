"""A self-check of the second derivatives an estimator takes, once per inner objective.

Unrolled reverse mode, implicit solves and SOBA differentiate the inner gradient
G(w, λ) = ∇_w f(w, λ) a second time. Some operators break that *without an error*:
``torch.func`` treats the second derivative of a custom ``autograd.Function`` whose
backward is not differentiable (``@once_differentiable``) as zero, and PyTorch's fused
weight norm (``torch._weight_norm``) has a wrong double backward. Other operators have
no forward-mode rule and fail with an unrelated message ("ZeroTensors are immutable").

:func:`check_second_order` takes one product uᵀ J v of the Jacobian J = ∂G/∂(w, λ) on
seeded random probes u (like w) and v = (v_w, v_λ) along each route by which an
estimator may form it,

- ``"reverse"``: double backward, the VJP of G (unrolled reverse mode, ``hvp="reverse"``
  and ``"linearized"``, fixed-point implicit, SOBA ``hvp="reverse"``);
- ``"forward"``: forward-over-reverse, the JVP of G (forward-mode unrolling,
  ``hvp="jvp"``);
- ``"reverse_forward"``: reverse-over-forward, the gradient of the JVP of f (the mixed
  product of ``hvp="jvp"``, SOBA ``hvp="jvp"``),

and compares them. When they agree to rounding, all are right. When they disagree, or
only one route works, the arbiter is a central difference of the *first* derivative,
uᵀ(G(x + s v) − G(x − s v)) / 2s, which no second-derivative bug can touch, with its
error bar (:mod:`hypergrad.finite_difference`). A route outside that error bar is
``"wrong"``; one that raises is ``"unsupported"``. Kinks (ReLU) can fool a difference
that straddles them, so a route is only called wrong when it disagrees at three steps
s, s/10 and s/100.

Estimators run the check on their first call for an inner objective (the result is
cached per objective: its code and the objects its closure holds) and raise
:class:`~hypergrad.errors.SecondOrderError` when a route they use is wrong or
unsupported, naming the likely operator and a route that agrees; ``self_check="warn"``
warns instead, ``self_check="off"`` skips the check.
"""

from __future__ import annotations

import math
import re
import time
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
#: relative agreement expected between two correct AD routes, per dtype (rounding of
#: a bilinear form of ~n terms is ~√n ε; these leave a wide margin and still catch a
#: second derivative that is wrong by 1e-6 (float64) or 1e-2 (float32) of the scale)
#: (half precision is not judged: its routes are "unverified")
AD_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
#: a single route counts as verified when the differences resolve this fraction of the scale
RESOLVED = 1e-2
CACHE_SIZE = 64
_SEED = 20_240_611


@dataclass(frozen=True)
class RouteResult:
    """One route's uᵀ J v (``None`` when the route raised) and its verdict.

    ``status`` is ``"ok"`` (agrees with the other routes or with the differences),
    ``"wrong"`` (outside the differences' error bar), ``"unsupported"`` (raised; the
    message is in ``error``), ``"unverified"`` (the only route, and the differences too
    coarse to judge it) or ``"disputed"`` (disagrees with another route and the
    differences cannot tell which is right).
    """

    route: str
    value: float | None
    status: str
    error: str | None = None


@dataclass(frozen=True)
class SecondOrderReport:
    """What :func:`check_second_order` found about the second derivatives of f.

    Attributes:
        routes: ``route -> RouteResult`` for ``"reverse"``, ``"forward"``,
            ``"reverse_forward"``.
        scale: max(‖Jᵀu‖, ‖Jv‖) with ‖u‖ = ‖v‖ = 1, the size agreement is measured against.
        finite_difference, fd_error: the arbiter uᵀ J v by central differences of the
            gradient and its error bar (``None`` when the routes agreed without it).
        suspects: operators of f that commonly break second derivatives (custom
            autograd Functions, fused kernels), found in its autograd graph.
        unsupported_operator: the operator without a forward-mode rule, when found.
        seconds: wall time of the check.
    """

    routes: dict[str, RouteResult]
    scale: float
    finite_difference: float | None = None
    fd_error: float | None = None
    suspects: list[str] = field(default_factory=list)
    unsupported_operator: str | None = None
    seconds: float = 0.0

    def status(self, route: str) -> str:
        return self.routes[route].status

    def usable(self, routes: Iterable[str]) -> bool:
        """Every route in ``routes`` is ``"ok"`` or ``"unverified"``."""
        return all(self.status(r) in ("ok", "unverified") for r in routes)

    def summary(self) -> str:
        """One line per route: its value and verdict, then the differences."""
        lines = []
        for r in ROUTES:
            res = self.routes[r]
            value = "raised" if res.value is None else f"{res.value:.9e}"
            lines.append(f"  {ROUTE_NAMES[r]}: {value} ({res.status})")
        if self.finite_difference is not None:
            lines.append(f"  central differences of the gradient: {self.finite_difference:.9e}"
                         f" ± {self.fd_error:.1e}")
        return "\n".join(lines)


# --- the probes ---------------------------------------------------------------------


def _floating(tree: PyTree) -> bool:
    return all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in tree_leaves(tree))


def _unit_probe(tree: PyTree, gen: torch.Generator) -> PyTree:
    """A seeded random direction like ``tree`` with unit norm (zeros for an empty tree)."""
    out = tree_map(lambda a: torch.randn(a.shape, generator=gen, dtype=torch.float64)
                   .to(device=a.device, dtype=a.dtype), tree)
    norm = float(tree_norm(out)) if tree_leaves(out) else 0.0
    return tree_map(lambda a: a / norm, out) if norm > 0 else out


def _dot(x: PyTree, y: PyTree) -> float:
    with torch.no_grad():
        return float(sum((a.double() * b.double()).sum() for a, b in
                         zip(tree_leaves(x), tree_leaves(y), strict=True)))


def _norm(*trees: PyTree) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float(tree_norm(t)) ** 2 for t in trees if tree_leaves(t)))


class _Seeded:
    """Every evaluation under one fixed RNG seed (global RNG restored): a random layer
    draws the same mask along every route and at every point of the differences."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(_SEED)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


def _route_value(route: str, f: Callable, w: PyTree, lam: PyTree, batch: Any, u: PyTree,
                 vw: PyTree, vl: PyTree) -> tuple[float, float]:
    """uᵀ J v along ``route`` and the norm of the vector it formed (Jᵀu or Jv)."""
    def G(w_: PyTree, lam_: PyTree) -> PyTree:
        return grad(f)(w_, lam_, batch)

    if route == "reverse":
        _, pullback = vjp(G, w, lam)
        gw, gl = pullback(u)
        return _dot(gw, vw) + _dot(gl, vl), _norm(gw, gl)
    if route == "forward":
        _, jv = jvp(G, (w, lam), (vw, vl))
        return _dot(u, jv), _norm(jv)

    def psi(w_: PyTree, lam_: PyTree) -> torch.Tensor:
        return jvp(lambda x: f(x, lam_, batch), (w_,), (u,))[1]

    gw, gl = grad(psi, argnums=(0, 1))(w, lam)
    return _dot(gw, vw) + _dot(gl, vl), _norm(gw, gl)


# --- the check ------------------------------------------------------------------------


def check_second_order(problem: Problem | Callable[[PyTree, PyTree, Any], torch.Tensor],
                       hparams: PyTree, params: PyTree, batch: Any = None, *,
                       cache: bool = True) -> SecondOrderReport:
    """Check the second derivatives of the inner objective f along every route.

    ``problem`` is a :class:`~hypergrad.Problem` (its ``inner_loss`` on its
    ``full_batch()``, unless ``batch`` is given) or an objective ``f(params, hparams,
    batch)``. Forms uᵀ (∂∇_w f / ∂(w, λ)) v at (``params``, ``hparams``) by double
    backward, forward-over-reverse and reverse-over-forward on seeded unit probes, and
    arbitrates disagreements (or a lone route) by central differences of the gradient
    with an error bar; see the module docstring. Costs about ten gradient evaluations
    when the routes agree, up to ~60 more when the differences must decide (13 gradients
    per step, at up to three steps). With ``cache`` the
    report is kept per objective (its code and the objects its closure holds; the last
    64) and returned again on the next call.

    Raises:
        BilevelInputError: ``params`` or ``hparams`` are not pytrees of floating tensors,
            or ``problem`` is neither a Problem nor callable.
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
    key = _objective_key(f) if cache else None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]
    report = _run_check(f, params, hparams, batch)
    if key is not None:
        _CACHE[key] = (f, report)  # f is held so that the ids in the key stay unique
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return report


def clear_cache() -> None:
    """Forget every cached report (the next estimator call checks again)."""
    _CACHE.clear()


_CACHE: OrderedDict[tuple, tuple[Callable, SecondOrderReport]] = OrderedDict()


def _objective_key(f: Callable) -> tuple | None:
    """Objectives with the same code and the same closure objects share a report."""
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
    return ("function", code, id(owner), tuple(cells))


def _run_check(f: Callable, params: PyTree, hparams: PyTree, batch: Any) -> SecondOrderReport:
    start = time.perf_counter()
    w = tree_map(lambda a: a.detach(), params)
    lam = tree_map(lambda a: a.detach(), hparams)
    leaves = tree_leaves(w) + tree_leaves(lam)
    dtype = tree_leaves(w)[0].dtype
    tol = AD_TOLERANCE.get(dtype, math.inf)
    gen = torch.Generator().manual_seed(_SEED)
    u, vw, vl = _unit_probe(w, gen), _unit_probe(w, gen), _unit_probe(lam, gen)
    if tree_leaves(lam):
        vw, vl = tree_map(lambda a: a / math.sqrt(2), vw), tree_map(lambda a: a / math.sqrt(2), vl)
    seeded = _Seeded(leaves)
    with seeded:  # an objective whose gradient fails fails as it would in the estimator
        grad(f)(w, lam, batch)
    values: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    scale = 0.0
    for route in ROUTES:
        try:
            with seeded:
                values[route], norm = _route_value(route, f, w, lam, batch, u, vw, vl)
            scale = max(scale, norm)
        except (RuntimeError, NotImplementedError) as exc:
            values[route], errors[route] = None, f"{type(exc).__name__}: {exc}"
    done = {r: v for r, v in values.items() if v is not None and math.isfinite(v)}
    for r, v in values.items():
        if v is not None and not math.isfinite(v):
            values[r], errors[r] = None, "the product is NaN or inf"
    status = {r: "unsupported" for r in ROUTES if r not in done}
    slack = tol * scale
    fd_value = fd_error = None
    agree = len(done) >= 2 and max(done.values()) - min(done.values()) <= slack
    if dtype not in AD_TOLERANCE:  # half precision: rounding swamps what could be judged
        status.update({r: "unverified" for r in done})
    elif agree:
        status.update({r: "ok" for r in done})
    elif done:
        fd_value, fd_error, gaps = _arbitrate(f, w, lam, batch, u, vw, vl, done, slack, seeded)
        for r in done:
            if gaps[r] > 0:
                status[r] = "wrong"
            elif len(done) == 1:
                status[r] = "ok" if fd_error <= RESOLVED * scale else "unverified"
            else:
                status[r] = "ok"
        disagreeing = [r for r in done if status[r] == "ok"]
        if len(disagreeing) >= 2 and max(done[r] for r in disagreeing) - \
                min(done[r] for r in disagreeing) > slack:
            status.update({r: "disputed" for r in disagreeing})
    suspects = _suspects(f, w, lam, batch, seeded) if len(done) < len(ROUTES) or \
        any(s != "ok" for s in status.values()) else []
    unsupported_op = None
    if any(status.get(r) == "unsupported" for r in ("forward", "reverse_forward")):
        unsupported_op = _forward_culprit(f, w, lam, batch, seeded,
                                          errors.get("forward", "") + errors.get(
                                              "reverse_forward", ""))
    routes = {r: RouteResult(r, values[r], status[r], errors.get(r)) for r in ROUTES}
    return SecondOrderReport(routes, scale, fd_value, fd_error, suspects, unsupported_op,
                             time.perf_counter() - start)


def _arbitrate(f: Callable, w: PyTree, lam: PyTree, batch: Any, u: PyTree, vw: PyTree,
               vl: PyTree, done: dict[str, float], slack: float,
               seeded: _Seeded) -> tuple[float, float, dict[str, float]]:
    """Central differences of uᵀG along v at steps s, s/10, s/100 (stopping once every
    route agrees with one of them; a step whose differences are not in their s² regime
    counts for nothing). Returns the last usable (value, error bar), (nan, inf) if no
    step was usable, and, per route, its smallest excess over the error bar (0 where it
    agreed at some step)."""
    ref = tree_leaves(w)[0]
    x0 = torch.zeros(1, dtype=ref.dtype)
    size = max(1.0, _norm(w, lam))
    step = torch.finfo(ref.dtype).eps ** (1 / 3) * size
    w_leaves, w_spec = tree_flatten(w)
    l_leaves, l_spec = tree_flatten(lam)
    vw_leaves, vl_leaves = tree_leaves(vw), tree_leaves(vl)

    def phi(x: torch.Tensor) -> float:
        s = float(x[0])
        wp = tree_unflatten([a + s * d for a, d in zip(w_leaves, vw_leaves, strict=True)], w_spec)
        lp = tree_unflatten([a + s * d for a, d in zip(l_leaves, vl_leaves, strict=True)], l_spec)
        with seeded, torch.no_grad():
            return _dot(u, grad(f)(wp, lp, batch))

    excess = {r: math.inf for r in done}
    value = error = math.inf
    for k in range(3):
        fd = central_differences(phi, x0, [torch.ones(1, dtype=ref.dtype)], step / 10 ** k)
        if not bool(fd.asymptotic[0]):  # a kink within the step: no evidence either way
            continue
        value, error = float(fd.value[0]), float(fd.error[0])
        for r, v in done.items():
            excess[r] = min(excess[r], max(0.0, abs(v - value) - error - slack))
        if all(e == 0 for e in excess.values()):
            break
    if math.isinf(error):  # no step was usable: nothing is called wrong, nothing verified
        return math.nan, math.inf, dict.fromkeys(done, 0.0)
    return value, error, excess


# --- naming the operator ---------------------------------------------------------------

#: autograd nodes of fused kernels whose double backward is wrong or missing
_FUSED = {
    "WeightNormInterfaceBackward": (
        "the fused weight norm torch._weight_norm (torch.nn.utils.parametrizations."
        "weight_norm or torch.nn.utils.weight_norm): PyTorch's double backward of it is "
        "wrong; compute g * v / v.norm() with basic ops (bilevel.wrap does this for "
        "wrapped modules)"),
    "ScaledDotProductFlashAttentionBackward": (
        "flash attention (scaled_dot_product_attention): use the math kernel, "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"),
    "ScaledDotProductEfficientAttentionBackward": (
        "memory-efficient attention (scaled_dot_product_attention): use the math kernel, "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"),
    "ScaledDotProductCudnnAttentionBackward": (
        "cuDNN attention (scaled_dot_product_attention): use the math kernel, "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"),
}


def _graph_nodes(f: Callable, w: PyTree, lam: PyTree, batch: Any,
                 seeded: _Seeded) -> list[Any]:
    """The autograd nodes of one eager evaluation of f (empty if that fails)."""
    w_ = tree_map(lambda a: a.detach().requires_grad_(), w)
    l_ = tree_map(lambda a: a.detach().requires_grad_(), lam)
    try:
        with seeded, torch.enable_grad():
            out = f(w_, l_, batch)
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


def _suspects(f: Callable, w: PyTree, lam: PyTree, batch: Any, seeded: _Seeded) -> list[str]:
    """Operators in f's graph that commonly break second derivatives, described."""
    found: dict[str, str] = {}
    for node in _graph_nodes(f, w, lam, batch, seeded):
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
                notes.append("its backward must itself be differentiable for second "
                             "derivatives")
            found[name] = f"the custom autograd.Function {name} ({'; '.join(notes)})"
            continue
        kind = type(node).__name__
        for prefix, text in _FUSED.items():
            if kind.lstrip("_").startswith(prefix):
                found[prefix] = text
    return list(found.values())


_FORWAD_AD_MESSAGE = re.compile(r"forward AD with (\S+) that does not support it")


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


def _forward_culprit(f: Callable, w: PyTree, lam: PyTree, batch: Any, seeded: _Seeded,
                     message: str) -> str | None:
    """The operator of f without forward-over-reverse support: from PyTorch's message
    when it names one, else by trying each torch call of f on its own."""
    match = _FORWAD_AD_MESSAGE.search(message)
    if match:
        return match.group(1)
    for node in _graph_nodes(f, w, lam, batch, seeded):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls, "jvp", None) is torch.autograd.Function.jvp:
            return f"the custom autograd.Function {cls.__qualname__} (it defines no jvp)"
    w_ = tree_map(lambda a: a.detach().requires_grad_(), w)
    l_ = tree_map(lambda a: a.detach().requires_grad_(), lam)
    recorder = _Recorder()
    try:
        with seeded, torch.enable_grad(), recorder:
            f(w_, l_, batch)
    except Exception:  # noqa: BLE001 - diagnosis only
        return None
    tried: set[str] = set()
    for func, args, kwargs in recorder.calls:
        name = _func_name(func)
        if name in tried or len(tried) > 200:
            continue
        tried.add(name)
        if not _forward_over_reverse_fails(func, args, kwargs):
            continue
        return name
    return None


def _forward_over_reverse_fails(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether forward-over-reverse through this one call raises."""
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
    primals = tuple(leaves[i].detach() for i in slots)
    cot = torch.ones_like(out)

    def call(*xs: torch.Tensor) -> torch.Tensor:
        new = list(leaves)
        for i, x in zip(slots, xs, strict=True):
            new[i] = x
        a, k = tree_unflatten(new, spec)
        return func(*a, **k)

    def pulled(*xs: torch.Tensor) -> tuple:
        return vjp(call, *xs)[1](cot)

    try:
        jvp(pulled, primals, tuple(torch.ones_like(p) for p in primals))
    except (RuntimeError, NotImplementedError):
        return True
    except Exception:  # noqa: BLE001 - anything else is not a missing forward rule
        return False
    return False


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


__all__ = ["ROUTES", "ROUTE_NAMES", "RouteResult", "SecondOrderReport", "check_second_order",
           "clear_cache"]
