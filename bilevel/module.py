"""Bilevel problems over an ordinary ``nn.Module``: the wrapper.

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
Hyperparameters are a dict of floating tensors or an ``nn.Module`` of them
(:mod:`bilevel.hparams`).

The parts live apart: :mod:`bilevel.buffers` (the ``buffers=`` policies: ``"batch_stats"``,
``"frozen"``, ``"track"``, and the functional BatchNorm statistics), :mod:`bilevel.batches`
(what is one batch, how loaders are read and cycled), :mod:`bilevel.hparams` (validation,
``.grad``), :mod:`bilevel.inner_loop` (recorded user-written loops) and
:mod:`bilevel.private_copy` (the copies of the module that ``functional_call`` runs).

The model is evaluated with ``torch.func.functional_call`` on private shallow copies
of it that share its tensors; the user's module (parameters, buffers, training flag)
is never modified. Parameters with ``requires_grad=False`` and buffers are constants
(detached copies); a model that writes its own buffers in place inside ``forward`` is
not supported (under transforms it raises an error naming the modules with buffers).

Other layers run in training mode in the inner loss (``train=True``) and in eval mode in
the outer loss (``outer_train=False``). Random layers (Dropout) are reproducible: with
``seed`` set, every model call of inner step ``t`` runs under ``torch.manual_seed`` of
``hypergrad.seeding.mix_seed(seed, t, outer)`` (``t = -1`` outside the inner steps; the
global RNG is restored afterwards), so unrolled recomputation replays identical masks
and the inner loss is one deterministic function per step (implicit estimators use
``t = -1`` for a single batch, the last step's batch and mask for an iterable).
Forward-mode unrolling vmaps its JVPs with ``randomness="same"`` (one function, many
directions), so it replays the same masks as reverse mode. The default Hessian-vector
products linearise the model once outside ``vmap``, so Dropout works with ``Implicit``;
other code that calls the model inside a ``vmap`` that refuses random ops gets an error
naming the caller of that ``vmap`` and what works instead.

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
(reverse-mode unrolling through your own loop, or many tasks at once under
``torch.func.vmap``); :meth:`ModuleProblem.inner_loop` records a loop you write
(``loop.step(batch)``) and replays it with any estimator (:class:`InnerLoop`).
"""

from __future__ import annotations

import operator
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_leaves

import hypergrad as hg
from hypergrad.errors import BilevelInputError, ObjectiveError
from hypergrad.optim import SGD, InnerOptimizer, State
from hypergrad.seeding import mix_seed

from .batches import (
    At,
    Many,
    check_data,
    inner_source,
    input_reader,
    is_single_batch,
    outer_source,
)
from .buffers import (
    BUFFER_POLICIES,
    NORM_LAYER,
    BatchStats,
    BufferPolicyError,
    TrackingProblem,
    check_estimator,
    check_policy,
    initial_stats,
    recording_batch_stats,
    set_norm_layers,
    tracked_layers,
    update_running_stats,
)
from .hparams import assign_grads, hparams_dict, validate_hparams
from .inner_loop import InnerLoop, InnerLoopError
from .private_copy import (
    FusedWeightNormCalls,
    deepcopy_module,
    plain_weight_norms,
    structural_copy,
    vmap_caller,
)

ModuleLoss = Callable[[Any, Any, dict[str, torch.Tensor]], torch.Tensor]
Params = dict[str, torch.Tensor]


class ModuleProblem:
    """A bilevel problem over an ``nn.Module``; see the module docstring.

    Args:
        module: the model; never modified (it is run through private copies).
        inner_loss: ``loss(outputs, batch, hparams) -> 0-d tensor``, minimised over the
            model's trainable parameters.
        outer_loss: ``loss(outputs, batch, hparams) -> 0-d tensor``, whose hypergradient
            is sought (the model runs in eval mode unless ``outer_train``).
        hparams: a dict ``name -> floating tensor`` (any shape), or an ``nn.Module``
            whose parameters are the hyperparameters.
        inner_data: one batch (a tensor, tuple/list such as ``(x, y)`` with tensors
            ``(N, ...)`` and ``(N,)``, or dict), or an iterable of batches (a
            ``DataLoader``), read one batch per inner step and cycled.
        outer_data: the same for the outer loss (one batch per outer step for an
            iterable).
        optimizer: differentiable inner optimizer (default ``SGD(lr=0.1)``).
        steps: number T of inner steps (int ≥ 0).
        inputs: ``batch -> model input`` or ``(batch, hparams) -> model input``
            (default: the batch, or its first element); a returned tuple is unpacked.
        outer_inputs: the same for the outer loss (default ``inputs``).
        penalty: ``(params, hparams) -> 0-d tensor`` added to the inner loss, with
            ``params`` a dict keyed by ``model.named_parameters()`` names.
        buffers: ``"batch_stats"``, ``"frozen"`` or ``"track"`` (running statistics,
            :mod:`bilevel.buffers`).
        train: training mode (Dropout on, batch statistics) in the inner loss.
        outer_train: training mode in the outer loss.
        seed: seed of random layers, mixed with the step index (``None``: unseeded).

    Raises:
        TypeError: ``module`` not an ``nn.Module``, a loss/``inputs``/``penalty`` not
            callable, ``seed`` not an int or ``None``, or data that is neither a batch
            nor an iterable of batches.
        BilevelInputError: ``steps`` not a non-negative int, an unknown ``buffers``
            policy, a model without trainable parameters, empty data, or a parameter
            that ``forward`` reads from where ``functional_call`` cannot substitute it.
        HyperparameterError: ``hparams`` empty or not floating tensors
            (:class:`~bilevel.hparams.HyperparameterTypeError` for a wrong container).
        ObjectiveError: a loss or ``penalty`` that does not return a scalar tensor.

    Attributes:
        problem: the core :class:`hypergrad.Problem` (losses in ``f(params, hparams,
            batch)`` form on tagged batches).
        params: the initial parameters, detached copies of the model's trainable
            parameters keyed by name (with ``buffers="track"`` also the tracked running
            statistics, see :mod:`bilevel.buffers`).
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
        check_policy(module, buffers)
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
        #: (batch, hparams) -> model input, for the inner (False) and outer (True) model
        self._inputs = {False: input_reader(inputs), True: input_reader(outer_inputs or inputs)}
        self.hparams = validate_hparams(hparams)
        #: the BatchNorm layers whose running statistics ``buffers="track"`` carries
        self._track_layers = tracked_layers(module, buffers)
        self._tracked = tuple(k for layer in self._track_layers for k in layer.keys)
        inner_model, self._recorders = self._private_copy(train, inner=True)
        self._models = {True: inner_model, False: self._private_copy(outer_train,
                                                                     inner=False)[0]}
        self._consts = self._constants()
        trainable = {n: p.detach().clone() for n, p in module.named_parameters()
                     if p.requires_grad}
        if not trainable:
            raise BilevelInputError(f"{type(module).__name__} has no trainable parameters")
        self._trainable = tuple(trainable)
        self.params: Params = {**trainable, **initial_stats(module, self._track_layers)}
        devices = {t.device for t in self.params.values()}
        self._devices = [d.index or 0 for d in devices if d.type == "cuda"]
        optimizer = SGD() if optimizer is None else optimizer
        self.problem = self._build(inner_data, outer_data, optimizer, steps)
        self._probe()

    # --- model -----------------------------------------------------------------------

    def _private_copy(self, train: bool, inner: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
        """A copy sharing every tensor with the user's module, with its own modes, and
        PyTorch's fused weight norm replaced by plain ops (see :mod:`bilevel.private_copy`),
        and its tracked BatchNorm layers by name (see :mod:`bilevel.buffers`)."""
        model = structural_copy(self.module)
        plain_weight_norms(model)
        model.train(train)
        return model, set_norm_layers(model, self.buffers, inner, self._track_layers)

    def _probe(self) -> None:
        """Run the inner model once on the first inner batch and check what ``functional_call``
        cannot see.

        The trainable parameters are substituted by copies, so the output must not depend
        on the module's own registered parameter tensors: a gradient reaching one of them
        (from the output dotted with a seeded random cotangent) means ``forward`` reads the
        parameter elsewhere (a Python list, another attribute) and would train on the stale
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

    def _constants(self) -> dict[str, torch.Tensor]:
        """Frozen parameters and remaining buffers, detached copies (never written)."""
        model = self._models[True]
        consts = {n: b.detach().clone() for n, b in model.named_buffers()}
        consts.update({n: p.detach().clone() for n, p in model.named_parameters()
                       if not p.requires_grad})
        return consts

    def _seed_for(self, t: int | None, outer: bool) -> int:
        """The seed of the model calls of inner step ``t`` (``None``: outside the steps)."""
        assert self.seed is not None
        try:
            step = -1 if t is None else operator.index(t)
        except TypeError:
            raise TypeError(f"the step index t must be an int or None, got {t!r}") from None
        return mix_seed(self.seed, step, int(outer))

    def forward(self, params: Params, inputs: Any, outer: bool = False,
                t: int | None = None) -> Any:
        """The model applied to ``inputs`` with ``params`` (inner or outer mode), random
        layers seeded by (seed, t).

        Args:
            params: a dict ``name -> tensor`` like :attr:`params`.
            inputs: the model input (a tuple is passed as positional arguments).
            outer: use the outer (eval-mode by default) copy of the model.
            t: the inner step index (``None``: outside the inner steps).

        Returns:
            Whatever the module returns (e.g. logits ``(N, classes)``).

        Raises:
            BilevelInputError: a normalisation layer given a single sample, a random op
                inside a ``vmap`` that refuses it, or a model writing a tensor in place.
        """
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
                      if isinstance(m, NORM_LAYER)]
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
        return self.forward(params, self._inputs[outer](batch, hparams), outer=outer, t=t)

    # --- losses and steps (raw batches) -----------------------------------------------

    def inner_loss(self, params: Params, hparams: Params, batch: Any,
                   t: int | None = None) -> torch.Tensor:
        """The inner loss (plus ``penalty``) on a raw batch, as inner step ``t`` sees it:
        a 0-d tensor.

        Raises:
            ObjectiveError: the loss or ``penalty`` did not return a scalar tensor.
        """
        out = self._outputs(params, hparams, batch, False, t)
        loss = _scalar("inner_loss", self._inner_fn(out, batch, hparams))
        if self._penalty is not None:
            loss = loss + _scalar("penalty", self._penalty(self._without_stats(params), hparams))
        return loss

    def outer_loss(self, params: Params, hparams: Params, batch: Any) -> torch.Tensor:
        """The outer loss on a raw batch: a 0-d tensor.

        Raises:
            ObjectiveError: the loss did not return a scalar tensor.
        """
        out = self._outputs(params, hparams, batch, True, None)
        return _scalar("outer_loss", self._outer_fn(out, batch, hparams))

    def init(self, params: Params | None = None) -> tuple[Params, State]:
        """Fresh copies of the initial parameters (or ``params``) and optimizer state:
        ``(params, state)``, a dict keyed by parameter name and the optimizer's state."""
        params = {k: v.detach().clone() for k, v in (params or self.params).items()}
        return params, self.problem.optimizer.init(params)

    def step(self, params: Params, state: State, hparams: Params, batch: Any,
             t: int | None = None) -> tuple[Params, State]:
        """One differentiable inner step on a raw batch (user-written loops).

        The result keeps the autograd graph to ``hparams`` (plain reverse-mode unrolling:
        memory grows with the number of steps, nothing else is kept). Pass the step
        index ``t`` to get the same random masks as the managed path. The step is a pure
        function of its arguments (``buffers="track"`` returns the updated running
        statistics in the new parameters), so ``torch.func.vmap`` runs it over a leading
        task axis of ``params``, ``state`` and ``batch``, and a step taken inside another
        (a nested call) keeps its statistics apart. Threads: build one problem per
        thread (model calls swap tensors into the problem's private copy of the module,
        and seeded calls reseed the global RNG for their duration).

        Returns:
            ``(params, state)`` after the step (same structures as the inputs).

        Raises:
            BufferPolicyError: ``buffers="track"`` and ``params`` lacks the running
                statistics.
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

    def _grad_and_stats(self, params: Params, hparams: Params, batch: Any,
                        t: int | None) -> tuple[Params, Params]:
        """∇_params of the inner loss (zero at the running statistics) and the running
        statistics updated by the batch moments its tracked BatchNorm layers recorded,
        returned as the auxiliary output of ``grad`` (nothing is stored on ``self``)."""
        stats = {k: params[k] for k in self._tracked}

        def loss_and_stats(w: Params) -> tuple[torch.Tensor, Params]:
            with recording_batch_stats() as seen:
                loss = self.inner_loss(w, hparams, batch, t)
            return loss, self._updated_stats(stats, seen)

        g, new = grad(loss_and_stats, has_aux=True)(self._without_stats(params))
        g = {k: g[k] if k in g else torch.zeros_like(v) for k, v in params.items()}
        return g, new

    def _updated_stats(self, stats: Params, seen: BatchStats) -> Params:
        """The running statistics ``stats`` after the forward passes of this problem's
        tracked layers recorded in ``seen`` (:func:`bilevel.buffers.update_running_stats`)."""
        recorded = {name: seen.get(layer, []) for name, layer in self._recorders.items()}
        return update_running_stats(stats, self._track_layers, recorded)

    def _without_stats(self, params: Params) -> Params:
        """``params`` less the tracked running statistics (``buffers="track"``)."""
        if not self._tracked:
            return params
        return {k: v for k, v in params.items() if k not in self._tracked}

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
        ``self.params``.

        Returns:
            :class:`hypergrad.Hypergradient`; ``grad`` is a dict matching ``hparams``.

        Raises:
            BufferPolicyError: ``buffers="track"`` with an estimator that does not run the
                inner steps (only Unrolled and Truncated do).
            BilevelInputError: bad inputs, as :func:`hypergrad.hypergradient`.
            DivergenceError, NonFiniteError, LinearSolveError, SecondOrderError: raised by
                the estimator, as :func:`hypergrad.hypergradient`.
        """
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

    # --- data (see bilevel.batches) ----------------------------------------------------

    @property
    def _read_seed(self) -> int:
        """The seed under which data iterables are read."""
        return 0 if self.seed is None else self.seed

    def _build(self, inner_data: Any, outer_data: Any, optimizer: InnerOptimizer,
               steps: int) -> hg.Problem:
        check_data(inner_data, "inner_data")
        check_data(outer_data, "outer_data")
        inner_batch, step_batch = inner_source(inner_data, steps, self._read_seed)
        outer_batch, outer_step_batch = self._outer_source(outer_data)
        return self._make_problem(inner_batch, step_batch, outer_batch, outer_step_batch,
                                  optimizer, steps)

    def _outer_source(self, outer_data: Any) -> tuple[At, Callable[[int], At] | None]:
        """The tagged outer batch and, for an iterable, the outer batch of step t."""
        return outer_source(outer_data, self._read_seed)

    def _make_problem(self, inner_batch: At | None, step_batch: Callable[[int], At],
                      outer_batch: At, outer_step_batch: Callable[[int], At] | None,
                      optimizer: InnerOptimizer, steps: int) -> hg.Problem:
        """The core problem on tagged batches (a :class:`TrackingProblem` for
        ``buffers="track"``)."""
        def f(params: Params, hparams: Params, tagged: At) -> torch.Tensor:
            return self.inner_loss(params, hparams, tagged.batch, tagged.t)

        def F(params: Params, hparams: Params, tagged: At) -> torch.Tensor:
            if isinstance(tagged.batch, Many):
                losses = [self.outer_loss(params, hparams, b) for b in tagged.batch.batches]
                return torch.stack(losses).mean()
            return self.outer_loss(params, hparams, tagged.batch)

        kw = dict(optimizer=optimizer, steps=steps, step_batch=step_batch,
                  outer_step_batch=outer_step_batch)
        if not self._tracked:
            return hg.Problem(f, F, inner_batch, outer_batch, **kw)

        def track_step(params: Params, state: State, hparams: Params,
                       tagged: At) -> tuple[Params, State]:
            return self._step(params, state, hparams, tagged.batch, tagged.t, optimizer)

        return TrackingProblem(f, F, inner_batch, outer_batch, **kw, track_step=track_step)


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
    ``.hparams`` are what :func:`hypergrad.hypergradient` takes.

    Args:
        module, inner_loss, outer_loss, hparams, inner_data, outer_data, optimizer, steps:
            as :class:`ModuleProblem`.
        **options: the keyword-only options of :class:`ModuleProblem` (``inputs``,
            ``outer_inputs``, ``penalty``, ``buffers``, ``train``, ``outer_train``,
            ``seed``).

    Returns:
        The :class:`ModuleProblem`.

    Raises:
        TypeError, BilevelInputError, HyperparameterError, ObjectiveError: as
            :class:`ModuleProblem`.

    Example:
        >>> import torch, bilevel
        >>> from torch import nn
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> ce = lambda out, batch, h: nn.functional.cross_entropy(out, batch[1])
        >>> mp = bilevel.wrap(nn.Linear(4, 3), ce, ce, {"log_wd": torch.tensor(-3.0)},
        ...                   (x, y), (x, y), steps=20,
        ...                   penalty=lambda p, h: h["log_wd"].exp() * (p["weight"] ** 2).sum())
        >>> mp.hypergradient("unrolled").grad["log_wd"].shape
        torch.Size([])
    """
    return ModuleProblem(module, inner_loss, outer_loss, hparams, inner_data, outer_data,
                         optimizer, steps, **options)


__all__ = ["BUFFER_POLICIES", "BufferPolicyError", "InnerLoop", "InnerLoopError",
           "ModuleProblem", "TrackingProblem", "assign_grads", "check_estimator", "hparams_dict",
           "is_single_batch", "validate_hparams", "wrap"]
