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
- ``"track"`` (running statistics updated through the inner steps) is not supported:
  an in-place running-stat update inside differentiated, vmapped inner steps cannot
  work; it raises an error naming the layers.

Other layers run in training mode in the inner loss (``train=True``) and in eval mode in
the outer loss (``outer_train=False``). Random layers (Dropout) are reproducible: with
``seed`` set, every model call of inner step ``t`` runs under ``torch.manual_seed`` of a
number derived from ``(seed, t)`` (the global RNG is restored afterwards), so unrolled
recomputation replays identical masks and the inner loss is one deterministic function
per step (implicit estimators use ``t = -1`` for a single batch, the last step's batch and
mask for an iterable). The default
Hessian-vector products linearise the model once outside ``vmap``, so Dropout works with
``Implicit``; code that calls the model inside ``vmap`` gets an error advising
``train=False`` (random layers off in the inner loss) or an unrolled estimator.

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

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad

import hypergrad as hg
from hypergrad.errors import BilevelInputError, HyperparameterError, ObjectiveError
from hypergrad.optim import SGD, InnerOptimizer, State

ModuleLoss = Callable[[Any, Any, dict[str, torch.Tensor]], torch.Tensor]
Params = dict[str, torch.Tensor]

BUFFER_POLICIES = ("batch_stats", "frozen")
_NORM = nn.modules.batchnorm._NormBase


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
            parameters keyed by name.
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
            hint = (f" Layers with running statistics: {', '.join(layers)}; updating them "
                    "in place inside differentiated (vmapped) inner steps cannot work."
                    if layers else "")
            raise BilevelInputError(
                f"buffers={buffers!r} is not supported; use one of {BUFFER_POLICIES}.{hint} "
                "Use buffers='batch_stats' (batch statistics, nothing updated), "
                "buffers='frozen' (eval-mode running statistics), or GroupNorm/LayerNorm.")
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
        self._models = {True: self._private_copy(train), False: self._private_copy(outer_train)}
        self._consts = self._constants()
        self.params: Params = {n: p.detach().clone() for n, p in module.named_parameters()
                               if p.requires_grad}
        if not self.params:
            raise BilevelInputError(f"{type(module).__name__} has no trainable parameters")
        devices = {t.device for t in self.params.values()}
        self._devices = [d.index or 0 for d in devices if d.type == "cuda"]
        optimizer = SGD() if optimizer is None else optimizer
        self.problem = self._build(inner_data, outer_data, optimizer, steps)

    # --- model -----------------------------------------------------------------------

    def _private_copy(self, train: bool) -> nn.Module:
        """A copy sharing every tensor with the user's module, with its own modes."""
        shared = {id(t): t for t in list(self.module.parameters()) + list(self.module.buffers())}
        model = copy.deepcopy(self.module, memo=shared)
        model.train(train)
        for m in model.modules():
            if not isinstance(m, _NORM):
                continue
            if self.buffers == "batch_stats":
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
                m.train(True)
            else:
                m.train(False)
        return model

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
                    "the model calls a random op (e.g. Dropout) inside vmap (randomness="
                    "'error'); pass "
                    "train=False (random layers off in the inner loss) or use an unrolled "
                    f"estimator ({msg.splitlines()[0]})") from exc
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
            loss = loss + _scalar("penalty", self._penalty(params, hparams))
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
        g = grad(self.inner_loss)(params, hparams, batch, t)
        return self.problem.optimizer.step(params, g, state, hparams)

    def export(self, params: Params) -> nn.Module:
        """A new copy of the user's module holding ``params`` (detached); the user's module
        itself is left as it is."""
        model = copy.deepcopy(self.module)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in params.items():
                named[k].copy_(v)
        return model

    def hypergradient(self, estimator: str | hg.Estimator = "implicit",
                      hparams: Params | None = None, params: Params | None = None,
                      state: hg.EstimatorState | None = None,
                      check: bool = True) -> hg.Hypergradient:
        """``hypergrad.hypergradient`` on this problem, by default at ``self.hparams`` from
        ``self.params``."""
        return hg.hypergradient(self.problem, self.hparams if hparams is None else hparams,
                                self.params if params is None else params, estimator,
                                state=state, check=check)

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

        if is_single_batch(outer_data):
            outer_batch = _At(outer_data, None)
            outer_step_batch = None
        else:
            obs = tuple(_read(outer_data, None, seed + 1, "outer_data"))
            outer_batch = _At(_Many(obs), None)

            def outer_step_batch(t: int) -> _At:
                return _At(obs[t % len(obs)], None)

        def f(params: Params, hparams: Params, tagged: _At) -> torch.Tensor:
            return self.inner_loss(params, hparams, tagged.batch, tagged.t)

        def F(params: Params, hparams: Params, tagged: _At) -> torch.Tensor:
            if isinstance(tagged.batch, _Many):
                losses = [self.outer_loss(params, hparams, b) for b in tagged.batch.batches]
                return torch.stack(losses).mean()
            return self.outer_loss(params, hparams, tagged.batch)

        return hg.Problem(f, F, inner_batch, outer_batch, optimizer=optimizer, steps=steps,
                          step_batch=step_batch, outer_step_batch=outer_step_batch)


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


__all__ = ["BUFFER_POLICIES", "ModuleProblem", "assign_grads", "hparams_dict",
           "is_single_batch", "wrap"]
