"""Bilevel problems over an ordinary ``nn.Module``.

:class:`ModuleProblem` (or :func:`wrap`) turns a module, losses written against the
module's *outputs*, hyperparameters and data into a core :class:`hypergrad.Problem`
plus the initial parameters::

    mp = bilevel.wrap(model, inner_loss, outer_loss, hparams={"log_wd": ...},
                      inner_data=train_loader, outer_data=(x_val, y_val),
                      optimizer=bilevel.SGD(lr=0.1), steps=50,
                      penalty=lambda p, h: h["log_wd"].exp() * sum((w ** 2).sum() for w in
                                                                   p.values()))
    result = mp.hypergradient(bilevel.Implicit())   # result.grad["log_wd"]

Losses are ``loss(outputs, batch, hparams) -> scalar tensor`` where ``outputs`` is the
model applied to ``inputs(batch)``; ``inputs`` defaults to ``batch`` itself for a
tensor batch and ``batch[0]`` for a tuple/list batch such as ``(x, y)``; pass
``inputs=lambda batch: ...`` (or ``lambda batch, hparams: ...``, e.g. to feed distilled
images held in the hyperparameters); ``outer_inputs`` (same forms, default ``inputs``)
does the same for the outer loss; a returned tuple is passed as positional arguments.
``penalty(params, hparams)`` is added to the inner loss (weight decay and other terms
on the parameters, which are a dict keyed by ``model.named_parameters()`` names).

The model is evaluated with ``torch.func.functional_call`` on private shallow copies
of it that share its tensors; the user's module (parameters, buffers, training flag)
is never modified. Parameters with ``requires_grad=False`` and buffers are constants
(detached copies); a model that writes its own buffers in place inside ``forward`` is
not supported (under transforms it raises an error naming the modules with buffers).

Buffers (``buffers=``):

- ``"batch_stats"`` (default): normalisation layers (BatchNorm, InstanceNorm with running
  statistics) normalise with the current batch's statistics in every inner step and in
  the outer loss; running statistics are never read nor updated (safe under ``vmap``).
- ``"frozen"``: normalisation layers run in eval mode with the module's current running
  statistics, copied once as constants.
- ``"track"``: BatchNorm running statistics are carried functionally through the inner
  steps, as ``nn.BatchNorm`` in training mode would update them, and the outer loss (and
  :meth:`ModuleProblem.export`) uses them in eval mode. They live in the parameter pytree
  (``mp.params`` gains ``"<layer>.running_mean"``, ``".running_var"`` and
  ``".num_batches_tracked"``, the count as a float): the inner loss does not read them
  (its gradient there is zero and ``penalty`` does not see them), the optimizer's update
  of them is discarded, and each inner step (:class:`TrackingProblem`, ``mp.step``)
  replaces them by the update from that step's batch, differentiably, so hypergradients
  include the path through the statistics. Only estimators that run the inner steps
  (``Unrolled``, ``Truncated``, every mode) support it; others raise
  :class:`BufferPolicyError` from ``mp.hypergradient``, ``OuterLoop`` and recorded loops
  (calling ``hypergrad.hypergradient`` on ``mp.problem`` directly is not checked).
  Per-leaf optimizer settings must then include the statistics' keys. Other layers with
  running statistics (InstanceNorm) raise :class:`BufferPolicyError`. The user's module
  is never written.

Other layers run in training mode in the inner loss (``train=True``) and in eval mode in
the outer loss (``outer_train=False``). Random layers (Dropout) are reproducible: with
``seed`` set, every model call of inner step ``t`` runs under ``torch.manual_seed`` of a
number derived from ``(seed, t)`` (the global RNG is restored afterwards), so unrolled
recomputation replays identical masks and the inner loss is one deterministic function
per step (implicit estimators use ``t = -1`` for a single batch, the last step's batch and
mask for an iterable). Forward-mode unrolling vmaps its JVPs with ``randomness="same"``
(one function, many directions), so it replays the same masks as reverse mode. The
default Hessian-vector products linearise the model once outside ``vmap``, so Dropout
works with ``Implicit``; other code that calls the model inside a ``vmap`` that refuses
random ops gets an error naming the caller of that ``vmap`` and what works instead.

The private copies are structural: each submodule is a new object sharing the original's
tensors and attribute values but owning its containers (parameter, buffer, submodule and
hook dicts), so nothing is deep-copied (legacy ``nn.utils.weight_norm`` modules work)
and nothing set on a copy reaches the user's module. In them PyTorch's fused weight norm
(``torch._weight_norm``, behind ``nn.utils.weight_norm`` and
``nn.utils.parametrizations.weight_norm``), whose double backward is wrong and which has
no forward-mode rule, is computed with plain ops, so hypergradients through weight-normed
layers are exact; parameter names do not change. Other layers calling the fused op get a
``RuntimeWarning`` naming them. At construction the inner model runs once on the first
inner batch with the parameters substituted: a parameter that ``forward`` reads from
somewhere ``functional_call`` cannot substitute (a Python list, another attribute) would
train on the stale tensor, and raises :class:`~hypergrad.errors.BilevelInputError` naming
it.

User-written inner loops: :meth:`ModuleProblem.step` is one differentiable step
(reverse-mode unrolling through your own loop); :meth:`ModuleProblem.inner_loop` records
a loop you write (``loop.step(batch)``) and replays it with any estimator
(:class:`InnerLoop`).

Data (``inner_data`` / ``outer_data``): a tensor, tuple, list, dict or ``None`` is *one
batch*; any other iterable (a ``DataLoader``, a generator; pass ``iter(list_of_batches)``
for a list) is a sequence of batches. Inner
iterables are read once, up to ``steps`` batches, and kept in memory (so memory grows
with ``steps`` × batch size; a loader shorter than ``steps`` is cycled: step ``t`` uses
batch ``t mod n``). Reading happens under ``torch.manual_seed(seed)`` with the global RNG
restored, so a shuffled loader gives the same order on every run. An outer iterable is
read completely; the outer loss is then the mean of the per-batch outer losses.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_leaves

import hypergrad as hg
from hypergrad.errors import BilevelInputError, HyperparameterError, ObjectiveError
from hypergrad.optim import SGD, InnerOptimizer, State

from .private_copy import (
    FusedWeightNormCalls,
    deepcopy_module,
    plain_weight_norms,
    structural_copy,
    vmap_caller,
)

ModuleLoss = Callable[[Any, Any, dict[str, torch.Tensor]], torch.Tensor]
Params = dict[str, torch.Tensor]

BUFFER_POLICIES = ("batch_stats", "frozen", "track")
_NORM = nn.modules.batchnorm._NormBase
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_TRACKED = ("running_mean", "running_var", "num_batches_tracked")


class BufferPolicyError(BilevelInputError):
    """The buffer policy cannot work with this model or estimator (e.g. ``buffers="track"``
    with an implicit or single-loop estimator)."""


class InnerLoopError(BilevelInputError):
    """A recorded user-written inner loop (:meth:`ModuleProblem.inner_loop`) was misused."""


#: estimators that run the inner steps through ``Problem.step`` (all ``buffers=`` policies)
_STEPPING = (hg.Unrolled, hg.Truncated)


def check_estimator(problem: Any, estimator: str | hg.Estimator) -> hg.Estimator:
    """The estimator object; raises :class:`BufferPolicyError` when ``problem`` tracks
    running statistics (``buffers="track"``) and the estimator does not run its inner steps
    (only :class:`~hypergrad.Unrolled` and :class:`~hypergrad.Truncated`, every mode, do)."""
    est = hg.make_estimator(estimator)
    if isinstance(problem, TrackingProblem) and not isinstance(est, _STEPPING):
        raise BufferPolicyError(
            f"buffers='track' cannot be used with the {type(est).__name__} estimator: running "
            "statistics are carried through the inner steps, and only estimators that run "
            "those steps (Unrolled, Truncated, in any mode) differentiate them; "
            f"{type(est).__name__} would treat them as constants (implicit differentiation "
            "has no equation for them). Use Unrolled()/Truncated(), or buffers='frozen' / "
            "'batch_stats'")
    return est


@dataclass(frozen=True)
class TrackingProblem(hg.Problem):
    """A core problem whose inner step also updates BatchNorm running statistics.

    The statistics live in the parameter pytree (keys ``"<layer>.running_mean"``,
    ``"<layer>.running_var"``, ``"<layer>.num_batches_tracked"``, the count as a float);
    the inner loss does not read them (its gradient there is zero), the optimizer's
    update of them is discarded, and :meth:`step` replaces them by the BatchNorm update
    from the step's batch. The outer loss reads them (eval mode).
    """

    track_step: Callable[..., tuple[Params, State]] | None = field(
        default=None, repr=False, compare=False)

    def step(self, params: Params, state: State, hparams: Params,
             t: int) -> tuple[Params, State]:
        assert self.track_step is not None
        return self.track_step(params, state, hparams, self.batch_at(t))


class _At(NamedTuple):
    """A batch tagged with the inner step that uses it (``None``: not a step)."""

    batch: Any
    t: int | None


class _Many(NamedTuple):
    """Several outer batches; the outer loss averages over them."""

    batches: tuple


def _running_stat_layers(module: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, _NORM) and m.running_mean is not None]


def _n_positional(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ps = list(sig.parameters.values())
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in ps):
        return 2
    return sum(p.kind in kinds for p in ps)


def _default_inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise BilevelInputError(
        f"cannot take the model input from a batch of type {type(batch).__name__}; the "
        "default is the batch itself (tensor) or batch[0] (tuple/list); pass "
        "inputs=lambda batch: ...")


def is_single_batch(data: Any) -> bool:
    """A tensor, tuple, list, dict or None is one batch; any other iterable is many."""
    return data is None or isinstance(data, (torch.Tensor, tuple, list, Mapping))


def _read(data: Iterable, limit: int | None, seed: int, what: str) -> list[Any]:
    """Materialise up to ``limit`` batches under a fixed seed (global RNG restored)."""
    out: list[Any] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in data:
            if limit is not None and len(out) >= limit:
                break
            out.append(batch)
    if not out:
        raise BilevelInputError(f"{what} yielded no batches")
    return out


def hparams_dict(hparams: Any) -> Params:
    """The hyperparameter dict: a dict of tensors as is, or an ``nn.Module``'s named
    parameters (the Parameter objects themselves, so updating them updates the module)."""
    if isinstance(hparams, nn.Module):
        out = dict(hparams.named_parameters())
        if not out:
            raise HyperparameterError(
                f"the hyperparameter module {type(hparams).__name__} has no parameters")
        return out
    if not isinstance(hparams, Mapping):
        raise TypeError("hparams must be a dict of tensors or an nn.Module of "
                        f"hyperparameters, got {type(hparams).__name__}")
    for k, v in hparams.items():
        if not isinstance(k, str):
            raise TypeError(f"hparams keys must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise HyperparameterError(
                f"hparams[{k!r}] must be a floating-point tensor, got "
                f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
    return dict(hparams)


def assign_grads(target: nn.Module | Mapping[str, torch.Tensor], grads: Params) -> None:
    """Write a hypergradient into ``.grad`` of the hyperparameters (an ``nn.Module`` of
    hyperparameters or a dict of leaf tensors), replacing any existing ``.grad``, so a
    ``torch.optim`` optimizer over them can take the outer step."""
    named = hparams_dict(target)
    for k, g in grads.items():
        if k not in named:
            raise HyperparameterError(f"no hyperparameter named {k!r}; have {list(named)}")
        named[k].grad = g.detach().to(named[k].dtype).clone()


class ModuleProblem:
    """A bilevel problem over an ``nn.Module``; see the module docstring.

    Attributes:
        problem: the core :class:`hypergrad.Problem` (losses in ``f(params, hparams,
            batch)`` form on tagged batches).
        params: the initial parameters, detached copies of the model's trainable
            parameters keyed by name (with ``buffers="track"`` also the tracked running
            statistics, see the module docstring).
        hparams: the hyperparameter dict (for an ``nn.Module`` of hyperparameters, its
            Parameter objects themselves: read them back from that module).
    """

    def __init__(self, module: nn.Module, inner_loss: ModuleLoss, outer_loss: ModuleLoss,
                 hparams: Mapping[str, torch.Tensor] | nn.Module, inner_data: Any,
                 outer_data: Any, optimizer: InnerOptimizer | None = None, steps: int = 100,
                 *, inputs: Callable[..., Any] | None = None,
                 outer_inputs: Callable[..., Any] | None = None,
                 penalty: Callable[[Params, Params], torch.Tensor] | None = None,
                 buffers: str = "batch_stats", train: bool = True, outer_train: bool = False,
                 seed: int | None = 0) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss),
                         ("inputs", inputs), ("outer_inputs", outer_inputs),
                         ("penalty", penalty)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if buffers not in BUFFER_POLICIES:
            layers = _running_stat_layers(module)
            hint = (f" Layers with running statistics: {', '.join(layers)}."
                    if layers else "")
            raise BilevelInputError(
                f"buffers={buffers!r} is not supported; use one of {BUFFER_POLICIES}.{hint} "
                "Use buffers='batch_stats' (batch statistics, nothing updated), "
                "buffers='frozen' (eval-mode running statistics), buffers='track' (running "
                "statistics carried through the inner steps), or GroupNorm/LayerNorm.")
        if buffers == "track":
            other = [f"{n or '<root>'} ({type(m).__name__})" for n, m in module.named_modules()
                     if isinstance(m, _NORM) and not isinstance(m, _BATCHNORM)
                     and m.running_mean is not None]
            if other:
                raise BufferPolicyError(
                    f"buffers='track' updates BatchNorm running statistics only; "
                    f"{', '.join(other)} also keep running statistics. Use "
                    "buffers='frozen' or 'batch_stats', or track_running_stats=False there")
        if not isinstance(steps, int) or steps < 0:
            raise BilevelInputError(f"steps must be a non-negative int, got {steps!r}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.module = module
        self.buffers = buffers
        self.seed = seed
        self._inner_fn = inner_loss
        self._outer_fn = outer_loss
        self._penalty = penalty
        outer_inputs = outer_inputs or inputs
        self._inputs = {False: (inputs or _default_inputs,
                                inputs is not None and _n_positional(inputs) >= 2),
                        True: (outer_inputs or _default_inputs,
                               outer_inputs is not None and _n_positional(outer_inputs) >= 2)}
        self.hparams = hparams_dict(hparams)
        #: BatchNorm layers whose running statistics ``buffers="track"`` carries: (name,
        #: momentum)
        self._track_layers: list[tuple[str, float | None]] = [
            (n, m.momentum) for n, m in module.named_modules()
            if buffers == "track" and isinstance(m, _BATCHNORM) and m.running_mean is not None]
        self._tracked = tuple(f"{n}{'.' if n else ''}{b}" for n, _ in self._track_layers
                              for b in _TRACKED)
        self._seen: dict[str, list[torch.Tensor]] | None = None
        self._models = {True: self._private_copy(train, inner=True),
                        False: self._private_copy(outer_train, inner=False)}
        self._consts = self._constants()
        trainable = {n: p.detach().clone() for n, p in module.named_parameters()
                     if p.requires_grad}
        if not trainable:
            raise BilevelInputError(f"{type(module).__name__} has no trainable parameters")
        self._trainable = tuple(trainable)
        self.params: Params = {**trainable, **self._initial_stats()}
        devices = {t.device for t in self.params.values()}
        self._devices = [d.index or 0 for d in devices if d.type == "cuda"]
        optimizer = SGD() if optimizer is None else optimizer
        self.problem = self._build(inner_data, outer_data, optimizer, steps)
        self._probe()

    # --- model -----------------------------------------------------------------------

    def _private_copy(self, train: bool, inner: bool) -> nn.Module:
        """A copy sharing every tensor with the user's module, with its own modes, and
        PyTorch's fused weight norm replaced by plain ops (see :mod:`bilevel.private_copy`)."""
        model = structural_copy(self.module)
        plain_weight_norms(model)
        model.train(train)
        tracked = dict(self._track_layers)
        for name, m in model.named_modules():
            if not isinstance(m, _NORM):
                continue
            if self.buffers == "batch_stats" or (inner and self.buffers == "track"):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
                m.train(True)
                if name in tracked:  # the inner step reads the layer's input for its update
                    m.forward = types.MethodType(_batchnorm_train, m)
                    m.register_forward_pre_hook(self._capture_hook(name))
            else:
                m.train(False)
                if name in tracked:  # native eval batch_norm refuses differentiable stats
                    m.forward = types.MethodType(_batchnorm_eval, m)
        return model

    def _probe(self) -> None:
        """Run the inner model once on the first inner batch and check what ``functional_call``
        cannot see.

        The trainable parameters are substituted by copies, so the output must not depend
        on the module's own registered parameter tensors: a gradient reaching one of them
        (from the output dotted with a seeded random cotangent) means ``forward`` reads it
        from somewhere else (a Python list, another attribute) and would train on the stale
        tensor; that raises :class:`BilevelInputError`. Layers still calling PyTorch's fused
        weight norm (wrong double backward) get a ``RuntimeWarning``. One forward and one
        backward; the global RNG is left as it was. A forward that fails here is left to
        fail, with its own message, where the model is first used."""
        originals = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        sample = self.problem.step_batch(0)
        hparams = {k: v.detach() for k, v in self.hparams.items()}
        calls = FusedWeightNormCalls(self._models[True])
        with torch.random.fork_rng(devices=self._devices), torch.enable_grad():
            try:
                with calls:
                    out = self._outputs(self.params, hparams, sample.batch, False, sample.t)
            except Exception:  # noqa: BLE001 - raised again, explained, at first use
                return
            leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)
                      and (x.is_floating_point() or x.is_complex()) and x.requires_grad]
            gen = torch.Generator().manual_seed(0)
            cotangents = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                          for x in leaves]
            grads = (torch.autograd.grad(leaves, list(originals.values()), cotangents,
                                         allow_unused=True)
                     if leaves else [None] * len(originals))
        stale = [n for n, g in zip(originals, grads, strict=True) if g is not None]
        if stale:
            raise BilevelInputError(
                f"{type(self.module).__name__}.forward reads the parameter(s) {stale} from "
                "somewhere other than their registered slot (a Python list or another "
                "attribute holding the same tensor): functional_call substitutes registered "
                "parameters only, so the inner steps would train on the stale tensor and the "
                "hypergradient would be wrong. Read each through its module attribute "
                "(self.<name>) or register its container (nn.ParameterList/ParameterDict, "
                "nn.ModuleList)")
        if calls.layers:
            frame, level = sys._getframe(1), 2
            while frame is not None and frame.f_code.co_filename == __file__:
                frame, level = frame.f_back, level + 1
            warnings.warn(
                f"layer(s) {calls.layers} call PyTorch's fused weight norm (torch._weight_norm"
                "), whose double backward is wrong and which has no forward-mode rule: "
                "hypergradients through it are off. bilevel computes nn.utils.weight_norm and "
                "nn.utils.parametrizations.weight_norm with plain ops, but not this call; "
                "write it as g * v / v.norm(...) (or use those utilities)", RuntimeWarning,
                stacklevel=level)

    def _capture_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._seen is not None:
                self._seen.setdefault(name, []).append(args[0])
        return hook

    def _initial_stats(self) -> Params:
        """``buffers="track"``: the module's running statistics, as floating tensors."""
        named = dict(self.module.named_modules())
        out: Params = {}
        for name, _ in self._track_layers:
            m = named[name]
            rm = m.running_mean.detach().clone()
            for b in _TRACKED:
                v = getattr(m, b)
                key = f"{name}{'.' if name else ''}{b}"
                out[key] = rm.new_tensor(0.0) if v is None else v.detach().clone().to(rm.dtype)
        return out

    def _updated_stats(self, params: Params, seen: dict[str, list[torch.Tensor]]) -> Params:
        """The running statistics after the forward passes whose BatchNorm inputs are
        ``seen``, exactly as ``nn.BatchNorm`` updates them in training mode (differentiable)."""
        out: Params = {}
        for name, momentum in self._track_layers:
            pre = f"{name}{'.' if name else ''}"
            rm, rv = params[pre + "running_mean"], params[pre + "running_var"]
            count = params[pre + "num_batches_tracked"]
            for x in seen.get(name, []):
                dims = [0] + list(range(2, x.dim()))
                count = count + 1
                factor = 1.0 / count if momentum is None else momentum
                rm = (1 - factor) * rm + factor * x.mean(dims)
                rv = (1 - factor) * rv + factor * x.var(dims, correction=1)
            out.update({pre + "running_mean": rm, pre + "running_var": rv,
                        pre + "num_batches_tracked": count})
        return out

    def _without_stats(self, params: Params) -> Params:
        """``params`` less the tracked running statistics (``buffers="track"``)."""
        if not self._tracked:
            return params
        return {k: v for k, v in params.items() if k not in self._tracked}

    def _grad_and_stats(self, params: Params, hparams: Params, batch: Any,
                        t: int | None) -> tuple[Params, Params]:
        """∇_params of the inner loss and the updated running statistics."""
        stats = {k: params[k] for k in self._tracked}

        def loss_and_stats(w: Params) -> tuple[torch.Tensor, Params]:
            seen: dict[str, list[torch.Tensor]] = {}
            self._seen = seen
            try:
                loss = self.inner_loss(w, hparams, batch, t)
            finally:
                self._seen = None
            return loss, self._updated_stats(stats, seen)

        g, new = grad(loss_and_stats, has_aux=True)(self._without_stats(params))
        g = {k: g[k] if k in g else torch.zeros_like(v) for k, v in params.items()}
        return g, new

    def _constants(self) -> dict[str, torch.Tensor]:
        """Frozen parameters and remaining buffers, detached copies (never written)."""
        model = self._models[True]
        consts = {n: b.detach().clone() for n, b in model.named_buffers()}
        consts.update({n: p.detach().clone() for n, p in model.named_parameters()
                       if not p.requires_grad})
        return consts

    def _seed_for(self, t: int | None, outer: bool) -> int:
        assert self.seed is not None
        return (self.seed * 1_000_003 + (-1 if t is None else t) * 7_919 + int(outer) + 11) \
            % (2 ** 62)

    def forward(self, params: Params, inputs: Any, outer: bool = False,
                t: int | None = None) -> Any:
        """The model applied to ``inputs`` with ``params`` (inner or outer mode), random
        layers seeded by (seed, t)."""
        model = self._models[not outer]
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if not outer:  # the inner model normalises by batch statistics
            params = self._without_stats(params)
        tensors = {**self._consts, **params}
        try:
            if self.seed is None:
                return functional_call(model, tensors, args)
            with torch.random.fork_rng(devices=self._devices):
                torch.manual_seed(self._seed_for(t, outer))
                return functional_call(model, tensors, args)
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            layers = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                      if isinstance(m, _NORM)]
            raise BilevelInputError(
                f"normalisation layer(s) {', '.join(layers)} cannot use batch statistics of "
                f"a single sample ({exc}); use buffers='frozen', larger batches or "
                "GroupNorm/LayerNorm") from exc
        except RuntimeError as exc:
            msg = str(exc)
            if "randomness" in msg:
                raise BilevelInputError(
                    "the model calls a random op (e.g. Dropout) inside torch.func.vmap "
                    f"called from {vmap_caller()}, which refuses random ops (randomness="
                    "'error'). Random layers work with Unrolled and Truncated (reverse or "
                    "forward mode) and with Implicit's default Hessian-vector products "
                    "(hvp='auto'/'linearized' linearise the model outside vmap); "
                    "otherwise pass train=False (random layers off in the inner loss) or, for "
                    "a vmap over directions of one function, give it randomness='same' "
                    f"({msg.splitlines()[0]})") from exc
            if "in-place" not in msg and "inplace" not in msg:
                raise
            owners = sorted({n.rpartition(".")[0] or "<root>" for n in self._consts})
            raise BilevelInputError(
                f"the model writes a tensor in place ({msg.splitlines()[0]}); this cannot be "
                "differentiated/vmapped functionally. Modules holding buffers: "
                f"{', '.join(owners) or 'none'}. For BatchNorm use buffers='batch_stats' or "
                "'frozen', or GroupNorm/InstanceNorm without running statistics") from exc

    def _outputs(self, params: Params, hparams: Params, batch: Any, outer: bool,
                 t: int | None) -> Any:
        fn, with_hparams = self._inputs[outer]
        inputs = fn(batch, hparams) if with_hparams else fn(batch)
        return self.forward(params, inputs, outer=outer, t=t)

    # --- losses and steps (raw batches) -----------------------------------------------

    def inner_loss(self, params: Params, hparams: Params, batch: Any,
                   t: int | None = None) -> torch.Tensor:
        """The inner loss (plus ``penalty``) on a raw batch, as inner step ``t`` sees it."""
        out = self._outputs(params, hparams, batch, False, t)
        loss = _scalar("inner_loss", self._inner_fn(out, batch, hparams))
        if self._penalty is not None:
            loss = loss + _scalar("penalty", self._penalty(self._without_stats(params), hparams))
        return loss

    def outer_loss(self, params: Params, hparams: Params, batch: Any) -> torch.Tensor:
        """The outer loss on a raw batch."""
        out = self._outputs(params, hparams, batch, True, None)
        return _scalar("outer_loss", self._outer_fn(out, batch, hparams))

    def init(self, params: Params | None = None) -> tuple[Params, State]:
        """Fresh copies of the initial parameters (or ``params``) and optimizer state."""
        params = {k: v.detach().clone() for k, v in (params or self.params).items()}
        return params, self.problem.optimizer.init(params)

    def step(self, params: Params, state: State, hparams: Params, batch: Any,
             t: int | None = None) -> tuple[Params, State]:
        """One differentiable inner step on a raw batch (user-written loops).

        The result keeps the autograd graph to ``hparams`` (plain reverse-mode unrolling:
        memory grows with the number of steps, nothing else is kept). Pass the step
        index ``t`` to get the same random masks as the managed path.
        """
        return self._step(params, state, hparams, batch, t, self.problem.optimizer)

    def _step(self, params: Params, state: State, hparams: Params, batch: Any,
              t: int | None, optimizer: InnerOptimizer) -> tuple[Params, State]:
        if not self._tracked:
            g = grad(self.inner_loss)(params, hparams, batch, t)
            return optimizer.step(params, g, state, hparams)
        missing = [k for k in self._tracked if k not in params]
        if missing:
            raise BufferPolicyError(
                f"buffers='track': params lacks the running statistics {missing}; start from "
                "mp.params / mp.init() (they hold them)")
        g, stats = self._grad_and_stats(params, hparams, batch, t)
        new, state = optimizer.step(params, g, state, hparams)
        return {k: stats[k] if k in stats else new[k] for k in new}, state

    def export(self, params: Params) -> nn.Module:
        """A new copy of the user's module holding ``params`` (detached; with
        ``buffers="track"`` also the tracked running statistics); the user's module itself
        is left as it is."""
        model = deepcopy_module(self.module)
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with torch.no_grad():
            for k, v in params.items():
                if not named[k].is_floating_point():
                    v = v.round()
                named[k].copy_(v)
            for m in model.modules():  # legacy weight norm: the weight from the new g, v
                for hook in m._forward_pre_hooks.values():
                    if isinstance(hook, WeightNorm):
                        setattr(m, hook.name, hook.compute_weight(m))
        return model

    def hypergradient(self, estimator: str | hg.Estimator = "implicit",
                      hparams: Params | None = None, params: Params | None = None,
                      state: hg.EstimatorState | None = None,
                      check: bool = True) -> hg.Hypergradient:
        """``hypergrad.hypergradient`` on this problem, by default at ``self.hparams`` from
        ``self.params``."""
        estimator = check_estimator(self.problem, estimator)
        return hg.hypergradient(self.problem, self.hparams if hparams is None else hparams,
                                self.params if params is None else params, estimator,
                                state=state, check=check)

    def inner_loop(self, hparams: Mapping[str, torch.Tensor] | nn.Module | None = None,
                   params: Params | None = None) -> InnerLoop:
        """Record a user-written inner loop so that any estimator can differentiate it.

        ::

            with mp.inner_loop() as loop:
                for batch in loader:
                    params = loop.step(batch)      # one graph-free inner step
                    if stop_condition(params):     # log, evaluate, stop early, ...
                        break
            result = loop.hypergradient(bilevel.Truncated(window=10))

        The loop starts from ``params`` (default ``self.params``) with a fresh optimizer
        state, at ``hparams`` (default ``self.hparams``), which must not change while it
        runs. See :class:`InnerLoop`.
        """
        return InnerLoop(self, hparams, params)

    # --- data --------------------------------------------------------------------------

    def _build(self, inner_data: Any, outer_data: Any, optimizer: InnerOptimizer,
               steps: int) -> hg.Problem:
        seed = 0 if self.seed is None else self.seed
        for name, data in (("inner_data", inner_data), ("outer_data", outer_data)):
            if not is_single_batch(data) and not isinstance(data, Iterable):
                raise TypeError(f"{name} must be a batch (tensor, tuple, list, dict) or an "
                                f"iterable of batches, got {type(data).__name__}")
        if is_single_batch(inner_data):
            inner_batch: _At | None = _At(inner_data, None)

            def step_batch(t: int) -> _At:
                return _At(inner_data, t)
        else:
            batches = _read(inner_data, max(steps, 1), seed, "inner_data")
            inner_batch = None

            def step_batch(t: int) -> _At:
                return _At(batches[t % len(batches)], t)

        outer_batch, outer_step_batch = self._outer_source(outer_data)
        return self._make_problem(inner_batch, step_batch, outer_batch, outer_step_batch,
                                  optimizer, steps)

    def _outer_source(self, outer_data: Any) -> tuple[_At, Callable[[int], _At] | None]:
        """The tagged outer batch and, for an iterable, the outer batch of step t."""
        if is_single_batch(outer_data):
            return _At(outer_data, None), None
        obs = tuple(_read(outer_data, None, (0 if self.seed is None else self.seed) + 1,
                          "outer_data"))

        def outer_step_batch(t: int) -> _At:
            return _At(obs[t % len(obs)], None)

        return _At(_Many(obs), None), outer_step_batch

    def _make_problem(self, inner_batch: _At | None, step_batch: Callable[[int], _At],
                      outer_batch: _At, outer_step_batch: Callable[[int], _At] | None,
                      optimizer: InnerOptimizer, steps: int) -> hg.Problem:
        def f(params: Params, hparams: Params, tagged: _At) -> torch.Tensor:
            return self.inner_loss(params, hparams, tagged.batch, tagged.t)

        def F(params: Params, hparams: Params, tagged: _At) -> torch.Tensor:
            if isinstance(tagged.batch, _Many):
                losses = [self.outer_loss(params, hparams, b) for b in tagged.batch.batches]
                return torch.stack(losses).mean()
            return self.outer_loss(params, hparams, tagged.batch)

        kw = dict(optimizer=optimizer, steps=steps, step_batch=step_batch,
                  outer_step_batch=outer_step_batch)
        if not self._tracked:
            return hg.Problem(f, F, inner_batch, outer_batch, **kw)

        def track_step(params: Params, state: State, hparams: Params,
                       tagged: _At) -> tuple[Params, State]:
            return self._step(params, state, hparams, tagged.batch, tagged.t, optimizer)

        return TrackingProblem(f, F, inner_batch, outer_batch, **kw, track_step=track_step)


class InnerLoop:
    """A user-written inner loop, recorded so that any estimator can replay it.

    Made by :meth:`ModuleProblem.inner_loop`; use it as a context manager. Each
    :meth:`step` takes one graph-free inner step on the batch given (exactly the step the
    core :class:`hypergrad.Problem` of the replay takes, so the replay reaches the same
    parameters) and records the batch. :meth:`hypergradient` then builds a core problem
    whose step ``t`` uses recorded batch ``t`` and whose number of steps is the number of
    recorded steps, and runs any estimator on it from the recorded start (a fresh
    optimizer state). Implicit estimators take the last recorded batch as the batch of the
    optimality conditions. The batches are kept in memory (references, not copies: do
    not modify them in place).

    Attributes:
        params: the current parameters (read-only: do not modify them in place).
        state: the current inner optimizer state.
        start: the starting parameters.
        batches: the recorded batches.
        hparams: the hyperparameters the loop runs at.
    """

    def __init__(self, mp: ModuleProblem, hparams: Mapping[str, torch.Tensor] | nn.Module |
                 None, params: Params | None) -> None:
        self.mp = mp
        self.hparams = mp.hparams if hparams is None else hparams_dict(hparams)
        self._frozen = {k: v.detach().clone() for k, v in self.hparams.items()}
        self.start, self.state = mp.init(params)
        self.params = self.start
        self.start = {k: v.clone() for k, v in self.start.items()}
        self.batches: list[Any] = []
        self.closed = False
        self._versions = self._version_of(self.params)

        def step_batch(t: int) -> _At:
            return _At(self.batches[t], t)

        base = mp.problem
        self._problem = mp._make_problem(None, step_batch, base.outer_batch,
                                         base.outer_step_batch, base.optimizer, 0)

    @staticmethod
    def _version_of(params: Params) -> dict[str, int]:
        return {k: v._version for k, v in params.items()}

    def __enter__(self) -> InnerLoop:
        if self.closed:
            raise InnerLoopError("this inner loop has ended; start a new one with "
                                 "mp.inner_loop()")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.closed = True

    @property
    def steps(self) -> int:
        """The number of recorded steps."""
        return len(self.batches)

    def _check_unchanged(self) -> None:
        changed = [k for k, v in self.hparams.items()
                   if v.shape != self._frozen[k].shape or not torch.equal(v.detach(),
                                                                          self._frozen[k])]
        if changed:
            raise InnerLoopError(
                f"the hyperparameters {changed} changed while the inner loop ran; a recorded "
                "loop runs at fixed hyperparameters (take outer steps between loops)")
        if self._version_of(self.params) != self._versions:
            raise InnerLoopError(
                "the parameters returned by loop.step were modified in place; the recorded "
                "loop could not be replayed. Work on copies (params[k].clone())")

    def step(self, batch: Any) -> Params:
        """One inner step on ``batch`` (recorded); returns the new parameters."""
        if self.closed:
            raise InnerLoopError("loop.step called after the `with mp.inner_loop()` block "
                                 "ended; start a new loop with mp.inner_loop()")
        self._check_unchanged()
        self.batches.append(batch)
        t = len(self.batches) - 1
        try:
            params, state = self._problem.run(self.params, self.state, self._frozen, t, t + 1,
                                              graph=False)
        except BaseException:
            self.batches.pop()
            raise
        self.params, self.state = params, state
        self._versions = self._version_of(params)
        return params

    def problem(self) -> hg.Problem:
        """The core problem that replays the recorded steps (``steps`` = their number)."""
        if not self.batches:
            raise InnerLoopError("the inner loop has no recorded step: call loop.step(batch) "
                                 "at least once before asking for a hypergradient")
        return dataclasses.replace(self._problem, steps=len(self.batches))

    def hypergradient(self, estimator: str | hg.Estimator = "unrolled",
                      outer_data: Any = None, state: hg.EstimatorState | None = None,
                      check: bool = True) -> hg.Hypergradient:
        """Differentiate the recorded loop with any estimator, from the recorded start.

        ``outer_data`` (a batch or an iterable of batches, as in :func:`wrap`) replaces the
        problem's outer data. ``state`` is a previous result's state; its ``inner_state``
        (a warm-started inner optimizer) is dropped so that the replay starts as the loop
        did. ``result.params`` equals ``loop.params``.
        """
        problem = self.problem()
        self._check_unchanged()
        if outer_data is not None:
            if not is_single_batch(outer_data) and not isinstance(outer_data, Iterable):
                raise TypeError("outer_data must be a batch (tensor, tuple, list, dict) or an "
                                f"iterable of batches, got {type(outer_data).__name__}")
            ob, osb = self.mp._outer_source(outer_data)
            problem = dataclasses.replace(problem, outer_batch=ob, outer_step_batch=osb)
        estimator = check_estimator(problem, estimator)
        state = {k: v for k, v in (state or {}).items() if k != "inner_state"}
        return hg.hypergradient(problem, self.hparams, self.start, estimator, state=state,
                                check=check)


def _batchnorm_affine(self: nn.Module, y: torch.Tensor, shape: tuple) -> torch.Tensor:
    if self.weight is not None:
        y = y * self.weight.reshape(shape)
    if self.bias is not None:
        y = y + self.bias.reshape(shape)
    return y


def _batchnorm_train(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode (batch statistics) written with plain differentiable ops,
    so that forward-over-reverse (forward-mode unrolling) works (``buffers="track"``)."""
    self._check_input_dim(x)
    if x.numel() <= x.shape[1]:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return _batchnorm_affine(self, (x - mean) * torch.rsqrt(var + self.eps), shape)


def _batchnorm_eval(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode written with differentiable ops (``buffers="track"``: the
    running statistics carry a graph back to the hyperparameters)."""
    self._check_input_dim(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - self.running_mean.reshape(shape)) * torch.rsqrt(
        self.running_var.reshape(shape) + self.eps)
    return _batchnorm_affine(self, y, shape)


def _scalar(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ObjectiveError(f"{name} must return a scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ObjectiveError(f"{name} must return a scalar tensor (reduce with .mean() or "
                             f".sum()), got shape {tuple(value.shape)}")
    return value


def wrap(module: nn.Module, inner_loss: ModuleLoss, outer_loss: ModuleLoss,
         hparams: Mapping[str, torch.Tensor] | nn.Module, inner_data: Any, outer_data: Any,
         optimizer: InnerOptimizer | None = None, steps: int = 100,
         **options: Any) -> ModuleProblem:
    """Build a :class:`ModuleProblem` (same arguments); ``.problem``, ``.params`` and
    ``.hparams`` are what :func:`hypergrad.hypergradient` takes."""
    return ModuleProblem(module, inner_loss, outer_loss, hparams, inner_data, outer_data,
                         optimizer, steps, **options)


__all__ = ["BUFFER_POLICIES", "BufferPolicyError", "InnerLoop", "InnerLoopError",
           "ModuleProblem", "TrackingProblem", "assign_grads", "check_estimator", "hparams_dict",
           "is_single_batch", "wrap"]
