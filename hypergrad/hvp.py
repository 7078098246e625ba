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
The choice is remembered per problem (:func:`remembered_mode`): the objective (its code,
the objects its closure holds and the globals it reads, as
:func:`hypergrad.check_second_order` keys its reports) together with the tree structure,
shapes, dtypes and devices of params, hparams and the batch's tensors (and NumPy arrays),
and the batch's other leaves (functions as the objective, dataclass instances by their
fields, other hashable values by type and value, the rest by identity); the last
:data:`CACHE_SIZE` problems are kept, and :func:`clear_mode_cache` forgets them. So only
the first call on a problem pays the probe (about two products of each form).

Memory: each remembered problem keeps its objective alive, with everything the objective's
closure and default arguments hold (a model, a dataset, tensors), and the batch's leaves
other than tensors and arrays (an ``nn.Module`` in the batch, say), until
:data:`CACHE_SIZE` newer problems push it out or :func:`clear_mode_cache` is called. An
objective that closes over new data at every outer step is a new problem at every step: it
is probed every time (no hit) and the cache holds the last :data:`CACHE_SIZE` steps' data.
Pass such data through the ``batch`` argument instead: its tensors count by layout only, so
every step hits the cache and the old data is not held. Call :func:`clear_mode_cache` to
release what is held, e.g. after a run or when a model is dropped.

Batched products (k vectors stacked on a leading dimension) of a reused pullback are formed
by one ``vmap`` over all k, by ``vmap`` over chunks of :data:`CHUNK` vectors, or by a loop,
whichever was fastest when first timed for that problem and that range of k (k rounded up
to a power of two; remembered in the same cache). On one CPU thread the loop usually wins
(vmap's larger kernels gain nothing there); on a GPU, ``vmap``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.func import grad, jvp, vjp, vmap

from .errors import warn
from .pytree import PyTree, tree_flatten, tree_leaves, tree_map, tree_paths, tree_vdot

HVPMode = Literal["auto", "jvp", "reverse", "linearized"]
HVP_MODES = ("auto", "jvp", "reverse", "linearized")
Batching = Literal["auto", "vmap", "loop"]
BATCHINGS = ("auto", "vmap", "loop")
#: problems whose ``"auto"`` choices are remembered (least recently used dropped first);
#: each keeps its objective, and what that holds, alive (see the module docstring)
CACHE_SIZE = 16
#: vectors per ``vmap`` chunk tried by the automatic batching
CHUNK = 8
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
                chunk_size: int | None = None, batching: Batching = "auto") -> PyTree:
    """k products H · vs[i] at once; every leaf of ``vs`` has a leading dimension k.

    With ``mode="linearized"`` (or ``"auto"`` choosing it) the k products reuse one
    pullback, and ``batching="auto"`` forms them by one ``vmap``, by ``vmap`` over chunks
    of :data:`CHUNK`, or by a loop, whichever was fastest when first timed on this problem
    and this range of k (see the module docstring). ``"jvp"`` and ``"reverse"`` products are
    vmapped unless ``batching="loop"``. ``chunk_size`` vectorizes at most that many products
    at a time (less memory) and overrides the automatic choice.

    Args:
        f, params, hparams, batch, mode: as in :func:`hvp`.
        vs: k vectors, a pytree matching ``params`` with a leading dimension k on every
            leaf (``(k, *leaf.shape)``); a single vector when ``batched=False``.
        batched: whether ``vs`` carries the leading dimension.
        chunk_size: products per ``vmap`` chunk (``None``: as ``batching`` says).
        batching: ``"auto"``, ``"vmap"`` (all k at once, or ``chunk_size`` at a time) or
            ``"loop"`` (one product after another).

    Returns:
        The products, shaped like ``vs`` (k = 0: empty tensors like ``vs``, nothing is
        evaluated).

    Raises:
        ValueError: an unknown ``mode`` or ``batching``, a ``chunk_size`` below 1, a
            ``chunk_size`` with ``batching="loop"``, or (``batched``) leaves of ``vs`` whose
            leading sizes differ or a 0-d leaf.
        SecondOrderError, RuntimeError: as :func:`hvp`.
    """
    _check_mode(mode)
    _check_batching(batching, chunk_size)
    if batched and _batch_size(vs, "vs") == 0:  # no product to form
        return tree_map(torch.empty_like, vs)
    if mode in ("auto", "linearized"):
        return Linearization(f, params, hparams, batch, mode=mode).matvec(
            vs, batched=batched, chunk_size=chunk_size, batching=batching)
    g = _grad_w(f, hparams, batch)
    if mode == "jvp":
        one = lambda v: jvp(g, (params,), (v,))[1]  # noqa: E731
    else:
        one = lambda v: vjp(g, params)[1](v)[0]  # noqa: E731
    try:
        if not batched:
            return one(vs)
        return _loop(one, vs) if batching == "loop" else vmap(one, chunk_size=chunk_size)(vs)
    except (RuntimeError, NotImplementedError) as exc:
        if mode != "jvp":
            raise
        raise _forward_error(f, hparams, params, batch, "hvp(mode='jvp')",
                             "mode='reverse' or 'linearized'", exc) from exc


def _check_batching(batching: str, chunk_size: int | None) -> None:
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if chunk_size is not None and (chunk_size < 1 or batching == "loop"):
        raise ValueError(f"chunk_size={chunk_size} needs batching='auto' or 'vmap' and "
                         "chunk_size >= 1")


def _batch_size(vs: PyTree, name: str) -> int:
    """The common leading size k of the leaves of the batch ``vs`` (0 for no leaves).

    Raises:
        ValueError: a 0-d leaf, or leaves whose leading sizes differ (each named).
    """
    leaves = tree_leaves(vs)
    sizes = {a.shape[0] if a.dim() else None for a in leaves}
    if len(sizes) > 1 or None in sizes:
        found = ", ".join(f"{path}: {a.shape[0] if a.dim() else '0-d'}"
                          for path, a in zip(tree_paths(vs), leaves, strict=True))
        raise ValueError(f"{name}: every leaf of a batch of vectors needs the same leading "
                         f"size k, got leading sizes {found}")
    return sizes.pop() if sizes else 0


def _loop(one: Callable[[PyTree], PyTree], vs: PyTree) -> PyTree:
    """``one`` applied to each vector of the batch ``vs`` (k ≥ 1, checked) in turn, results
    stacked."""
    k = tree_leaves(vs)[0].shape[0]
    if k == 1:  # no copy into a stacked output
        return tree_map(lambda r: r.unsqueeze(0), one(tree_map(lambda a: a[0], vs)))
    out = None
    for i in range(k):
        res = one(tree_map(lambda a: a[i], vs))  # noqa: B023 - used at once
        if out is None:
            out = tree_map(lambda r: r.new_empty((k, *r.shape)), res)
        tree_map(lambda o, r: o[i].copy_(r), out, res)  # noqa: B023
    return out


def _forward_error(f: Objective, hparams: PyTree, params: PyTree, batch: Any, who: str,
                   instead: str, exc: BaseException) -> BaseException:
    from .second_order import forward_route_error  # imports Problem, which imports this

    return forward_route_error(f, hparams, params, batch, who, instead, exc)


class Linearization:
    """∇_w f linearized at one point, for repeated Hessian-vector products there.

    ``matvec(v)`` returns H v; with ``batched=True`` every leaf of ``v`` carries a
    leading dimension of k vectors (formed as :func:`hvp_batched` says).
    With ``mode="auto"`` the form is chosen by :func:`choose_mode`, or taken from the
    choice remembered for this problem (:func:`remembered_mode`); ``self.mode`` says
    which was taken. ``self.products`` counts the calls to :meth:`matvec`.

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
        self._key: tuple[tuple, tuple] | None = None  # (key, held)
        if mode == "auto":
            mode = remembered_mode(f, params, hparams, batch, lambda: choose_mode(self))
            if mode != "linearized":
                self._pullback = None  # the probe's graph is not kept
        self.mode = mode
        if self.mode == "linearized" and self._pullback is None:
            _, self._pullback = vjp(self._grad, params)

    def _pull(self, u: PyTree) -> PyTree:
        return self._pullback(u)[0]

    def matvec(self, v: PyTree, batched: bool = False, chunk_size: int | None = None,
               batching: Batching = "auto") -> PyTree:
        """H v, shaped like ``v`` (k products if ``batched``; ``chunk_size`` and
        ``batching`` as in :func:`hvp_batched`; k = 0 gives empty tensors like ``v``).

        Raises:
            ValueError: an unknown ``batching``, a ``chunk_size`` it cannot take, or
                (``batched``) leaves of ``v`` whose leading sizes differ or a 0-d leaf.
        """
        _check_batching(batching, chunk_size)
        self.products += 1
        k = _batch_size(v, "v") if batched else None
        if k == 0:  # no product to form
            return tree_map(torch.empty_like, v)
        if self.mode != "linearized":
            return hvp_batched(self._f, self._params, self._hparams, self._batch, v,
                               mode=self.mode, batched=batched, chunk_size=chunk_size,
                               batching=batching)
        if not batched:
            return self._pull(v)
        if chunk_size is not None or batching == "vmap":
            return vmap(self._pull, chunk_size=chunk_size)(v)
        if batching == "loop":
            return _loop(self._pull, v)
        if k == 1:  # one product: nothing to choose
            return _loop(self._pull, v)
        if self._key is None:
            self._key = _problem_key(self._f, self._params, self._hparams, self._batch, "hvp")
        chosen = _entry(*self._key).batching
        bucket = (k - 1).bit_length()  # k rounded up to a power of two
        if bucket not in chosen:
            chosen[bucket], out = _fastest_batching(self._pull, v, k)
            return out
        return _batched(chosen[bucket], self._pull, v)

    __call__ = matvec

    def batching(self, k: int) -> str | None:
        """How k batched products are formed here (``"vmap"``, ``"chunk"`` for ``vmap``
        over chunks of :data:`CHUNK`, or ``"loop"``), once chosen; ``None`` before the
        first batched product of about k vectors (and for modes other than
        ``"linearized"``, which ``vmap``)."""
        if self.mode != "linearized":
            return None
        key = self._key or _problem_key(self._f, self._params, self._hparams, self._batch,
                                        "hvp")
        entry = _CACHE.get(key[0])
        return None if entry is None else entry.batching.get(max(k - 1, 0).bit_length())


def _batched(way: str, pull: Callable[[PyTree], PyTree], v: PyTree) -> PyTree:
    if way == "loop":
        return _loop(pull, v)
    return vmap(pull, chunk_size=CHUNK if way == "chunk" else None)(v)


def _fastest_batching(pull: Callable[[PyTree], PyTree], v: PyTree,
                      k: int) -> tuple[str, PyTree]:
    """The fastest way to form k products of ``pull`` per vector, and the products.

    A loop is timed on (up to) two vectors and ``vmap`` on one chunk of :data:`CHUNK`
    (when k > CHUNK); one ``vmap`` over all k gives the products and its own time.
    """
    clock = _clock(v)
    per_vector = {}
    m = min(k, 2)
    _, seconds = _timed(lambda u: _loop(pull, u), tree_map(lambda a: a[:m], v), clock)
    per_vector["loop"] = seconds / m
    if k > CHUNK:
        _, seconds = _timed(vmap(pull), tree_map(lambda a: a[:CHUNK], v), clock)
        per_vector["chunk"] = seconds / CHUNK
    out, seconds = _timed(vmap(pull), v, clock)
    per_vector["vmap"] = seconds / k
    return min(per_vector, key=per_vector.get), out


def choose_mode(lin: Linearization) -> str:
    """Pick ``"linearized"`` or ``"jvp"`` for ``lin`` (see :func:`choose_between`); the
    linearization built for the probe is left in ``lin``.

    Raises:
        RuntimeError: neither form works.
    """
    def linearize() -> Callable[[PyTree], PyTree]:
        _, lin._pullback = vjp(lin._grad, lin._params)
        return lin._pull

    return choose_between(linearize, lambda v: jvp(lin._grad, (lin._params,), (v,))[1],
                          lin._params)


def choose_between(linearize: Callable[[], Callable[[PyTree], PyTree]],
                   forward: Callable[[PyTree], PyTree], like: PyTree) -> str:
    """Pick ``"linearized"`` or ``"jvp"`` from probe products of each.

    ``forward(v)`` forms one product by forward-over-reverse; ``linearize()`` builds the
    reusable product of the linearized form (its setup is not timed: a solve pays it
    once). Each is timed twice on a seeded random vector shaped like ``like`` (the
    faster time counts: the first call may be slowed by fresh memory). The forward
    products come first, before the linearization exists, and only one product of each
    form is kept until they are compared, so that the probe's peak memory stays below
    that of a solve with the linearization (which is left to the caller). The faster is
    kept when they agree to 1e-4 relative. When they disagree, the double backward is
    wrong (a backward that is not differentiable): ``"jvp"`` is kept and a warning says
    so. A model without forward-mode rules keeps ``"linearized"``; one without double
    backward, ``"jvp"``. Times are CPU seconds of this thread when PyTorch runs on one
    CPU thread, else wall seconds (CUDA synchronized).

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
    clock = _clock(like)
    try:
        h_jvp, t_jvp = _timed(forward, probe, clock)
        t_jvp = min(t_jvp, _timed(forward, probe, clock)[1])
    except (RuntimeError, NotImplementedError):
        h_jvp = None
    try:
        product = linearize()
        h_lin, t_lin = _timed(product, probe, clock)
    except (RuntimeError, NotImplementedError):
        product = None
    if product is None and h_jvp is None:
        raise RuntimeError("neither double backward nor forward-over-reverse works for this "
                           "objective: no Hessian-vector product can be formed")
    if product is None or h_jvp is None:
        return "jvp" if product is None else "linearized"
    gap = _relative_gap(h_lin, h_jvp)
    del h_lin, h_jvp
    if gap > 1e-4:
        warn("Hessian-vector products by double backward and by forward-over-reverse "
             "disagree: an operator's backward is not differentiable "
             "(once_differentiable?); using forward-over-reverse ('jvp')", RuntimeWarning)
        return "jvp"
    t_lin = min(t_lin, _timed(product, probe, clock)[1])
    return "linearized" if t_lin <= t_jvp else "jvp"


def _relative_gap(a: PyTree, b: PyTree) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖), forming the difference one leaf at a time."""
    pairs = list(zip(tree_leaves(a), tree_leaves(b), strict=True))
    diff = sum(float((x - y).square().sum()) for x, y in pairs)
    scale = max(sum(float(x.square().sum()) for x, _ in pairs),
                sum(float(y.square().sum()) for _, y in pairs))
    return (diff / max(scale, 1e-60)) ** 0.5


def _clock(like: PyTree) -> Callable[[], float]:
    """This thread's CPU time on one CPU thread (not slowed by other processes), else
    wall time."""
    leaves = tree_leaves(like)
    on_cpu = not leaves or leaves[0].device.type == "cpu"
    return time.thread_time if on_cpu and torch.get_num_threads() == 1 else time.perf_counter


def _timed(fn: Callable[[PyTree], PyTree], x: PyTree,
           clock: Callable[[], float]) -> tuple[PyTree, float]:
    _synchronize(x)
    start = clock()
    out = fn(x)
    _synchronize(out)
    return out, clock() - start


def _synchronize(tree: PyTree) -> None:
    leaves = tree_leaves(tree)
    if leaves and leaves[0].is_cuda:
        torch.cuda.synchronize(leaves[0].device)


@dataclass
class _Remembered:
    """What ``"auto"`` chose for one problem."""

    held: tuple  # the objective and the batch's leaves keyed by id, so the ids stay unique
    mode: str | None = None
    batching: dict[int, str] = field(default_factory=dict)  # ⌈log2 k⌉ -> way


_CACHE: OrderedDict[tuple, _Remembered] = OrderedDict()


def remembered_mode(f: Objective, params: PyTree, hparams: PyTree, batch: Any,
                    choose: Callable[[], str], kind: str = "hvp") -> str:
    """The form chosen before for this problem, else ``choose()`` (remembered).

    The problem is ``kind`` (a namespace: ``"hvp"`` for :class:`Linearization`,
    ``"root"`` for :func:`hypergrad.linearize`), the objective ``f`` (its code, closure
    objects and the globals it reads; a callable without code by identity) and the tree
    structure, shapes, dtypes and devices of ``params``, ``hparams`` and the tensors (and
    NumPy arrays) of ``batch``; default argument values of ``f`` count as closure objects.
    The batch's other leaves count too: functions as ``f`` does, dataclass instances by
    type and (recursively) their fields, other hashable leaves by type and value (``1``,
    ``1.0`` and ``True`` differ; an ``nn.Module`` or another object without ``__eq__`` by
    identity), unhashable ones by identity. The last :data:`CACHE_SIZE` problems are kept.
    A batch class of your own is best registered as a pytree node or made a dataclass: as
    an opaque object it is a new problem whenever a new instance is passed.

    Each kept problem holds ``f`` (with what its closure and defaults hold) and the
    batch's leaves other than tensors and arrays alive. An ``f`` that closes over new data
    at each call is a new problem each time: no hit, and the data of the last
    :data:`CACHE_SIZE` calls stays alive. Pass the data as ``batch`` instead (tensors count
    by layout only): every call hits and old data is released. :func:`clear_mode_cache`
    forgets all problems.

    Args:
        f: the objective ``f(params, hparams, batch)``.
        params, hparams, batch: where the products are taken (only their layout counts).
        choose: makes the choice (e.g. :func:`choose_between`); called on a miss only.
        kind: the namespace of the choice.

    Returns:
        The remembered or new choice (what ``choose`` returns).

    Raises:
        Exception: whatever ``choose`` raises (nothing is remembered then).
    """
    entry = _entry(*_problem_key(f, params, hparams, batch, kind))
    if entry.mode is None:
        entry.mode = choose()
    return entry.mode


def clear_mode_cache() -> None:
    """Forget every remembered ``"auto"`` choice (HVP form and batching): the next call
    on each problem probes again.

    Also releases what the cache holds alive: the objectives (with the models, data and
    tensors their closures and default arguments hold) and the batches' leaves other than
    tensors and arrays (see :func:`remembered_mode`). Call it when that memory matters,
    e.g. after a run, when a model or dataset an objective captured is dropped, or when
    objectives closing over fresh data each outer step have filled the cache (better: pass
    that data as the ``batch``).
    """
    _CACHE.clear()


# ``hypergrad.hvp`` is this module's :func:`hvp` once the package is imported: reachable
# from there too (as ``functools.lru_cache`` functions carry ``cache_clear``)
hvp.clear_mode_cache = clear_mode_cache  # type: ignore[attr-defined]


def _entry(key: tuple, held: tuple) -> _Remembered:
    entry = _CACHE.get(key)
    if entry is None:
        entry = _CACHE[key] = _Remembered(held)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return entry


def _problem_key(f: Callable, params: PyTree, hparams: PyTree, batch: Any,
                 kind: str) -> tuple[tuple, tuple]:
    """The cache key of a problem, and the objects to hold while it is cached (so that
    the ids in the key stay those of live objects)."""
    held: list[Any] = [f]
    key = (kind, _callable_key(f), _layout(params, held), _layout(hparams, held),
           _layout(batch, held))
    return key, tuple(held)


def _callable_key(f: Callable) -> tuple:
    """A function by its code, closure objects, read globals and default values (ids)."""
    from .second_order import _objective_key  # imports Problem, which imports this

    fn = getattr(f, "__func__", f)
    defaults = tuple(id(d) for d in getattr(fn, "__defaults__", None) or ()) + tuple(
        (n, id(d)) for n, d in (getattr(fn, "__kwdefaults__", None) or {}).items())
    return _objective_key(f), defaults


def _layout(tree: PyTree, held: list[Any]) -> tuple:
    """Tensors (and NumPy arrays) by shape, dtype and device; functions as the objective is
    keyed; dataclass instances by type and the layout of their fields; other hashable
    leaves by type and value (so 1, 1.0 and True differ); unhashable ones by identity.
    Leaves keyed by id are appended to ``held``."""
    leaves, spec = tree_flatten(tree)
    np = sys.modules.get("numpy")  # arrays exist only once NumPy is imported
    out: list[Any] = []
    for a in leaves:
        if isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.dtype, a.device))
        elif np is not None and isinstance(a, np.ndarray):
            out.append(("ndarray", a.shape, a.dtype))
        elif isinstance(a, (types.FunctionType, types.MethodType)):
            out.append(("function", _callable_key(a)))
            held.append(a)
        elif dataclasses.is_dataclass(a) and not isinstance(a, type):  # a data container
            fields = tuple(getattr(a, x.name) for x in dataclasses.fields(a))
            out.append(("dataclass", type(a), _layout(fields, held)))
        else:
            try:
                hash(a)
            except TypeError:
                out.append(("object", type(a), id(a)))
                held.append(a)
            else:  # the key holds the leaf itself
                out.append(("value", type(a), a))
    return spec, tuple(out)


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
