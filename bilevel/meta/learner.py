"""Meta-learning algorithms behind one interface: MAML, first-order MAML, ANIL, Meta-SGD,
iMAML and Reptile, with the tasks of a meta-batch batched by ``vmap``.

A meta-learner learns the initialisation θ of a model (and, for Meta-SGD, per-parameter inner
learning rates) so that a few inner steps on a task's support set give a low loss on its
query set. In bilevel terms, θ is the outer variable and each task's adapted parameters
φ_i = θ + δ_i are the inner variables::

    min_θ  (1/B) Σ_i L_i^query(θ + δ_i(θ))   with   δ_i(θ) = T inner steps on L_i^support

* ``"maml"`` (Finn et al., ICML 2017): back-propagation through the T inner SGD steps
  (second order). ``estimator="truncated"`` differentiates only the last ``window`` steps
  (with ``window=0`` it is first-order MAML); ``"recompute"`` (or any core
  :class:`hypergrad.Estimator` object) runs the same problem through the core's estimators.
* ``"fomaml"``: first-order MAML, the inner gradients taken as constants: the meta-gradient
  is the query gradient at the adapted parameters, ∇L_i^query(φ_i).
* ``"anil"`` (Raghu et al., ICLR 2020): only the ``head`` is adapted; the body is
  meta-learned through the query loss (its features are computed once per task).
* ``"metasgd"`` (Li et al., 2017): MAML with a learned step size per parameter element,
  α = exp(log α) (positive by construction), meta-learned with θ.
* ``"imaml"`` (Rajeswaran et al., NeurIPS 2019): the proximal inner problem
  φ_i = argmin_φ L_i^support(φ) + λ/2 ‖φ − θ‖², solved without a graph, and the
  meta-gradient g_i = (I + H_i/λ)⁻¹ ∇L_i^query(φ_i) by a few conjugate-gradient steps,
  the systems of all tasks solved together (one batched Hessian-vector product per
  iteration). Memory does not grow with the number of inner steps.
* ``"reptile"`` (Nichol et al., 2018): T plain SGD steps per task and the meta-gradient
  θ − mean_i φ_i (no second derivatives, no query set needed; its query loss is reported).

**Batching.** Every task runs the same computation, so a meta-batch of ``B`` tasks runs as
one ``torch.func.vmap`` over the leading task axis of a :class:`~bilevel.meta.TaskBatch`
(``batching="vmap"``). ``task_chunk=k`` processes ``k`` tasks at a time (the meta-gradient
of each chunk is accumulated before the next starts: memory ∝ ``k``). ``batching="loop"``
runs one task after another with the same numbers; ``"auto"`` (default) tries ``vmap`` on
the first meta-batch and falls back to the loop, with a warning saying why, for models that
``vmap`` cannot run (data-dependent control flow, ``.item()``, in-place updates of
captured tensors, ...).

**BatchNorm** follows the usual meta-learning convention (MAML's code, learn2learn,
torchmeta): every forward pass normalises with the statistics of the batch it sees, that
is of each task's own support or query set, per task (under ``vmap`` the statistics are
per task, never across tasks). Running statistics are neither used nor updated: the model
is evaluated on a private copy whose normalisation layers do not track them, so the user's
module and its buffers are never written. Other buffers are read as they are.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import hypergrad as hg
from hypergrad.errors import BilevelInputError, DivergenceError
from hypergrad.estimators.base import Diagnostics, EstimatorState, Hypergradient

from ..private_copy import deepcopy_module, plain_weight_norms, structural_copy
from .baselines import nearest_centroid
from .factored import (
    FactoredLayers,
    factored_layers,
    factored_query_losses,
    per_task_cross_entropy,
    per_task_mse,
    supports_factored,
)
from .tasks import TaskBatch

__all__ = ["ALGORITHMS", "BATCHING", "MetaEvaluation", "MetaGradient", "MetaLearner",
           "MetaProblem"]

#: the algorithms :class:`MetaLearner` implements, by name
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "imaml", "reptile")
#: how the tasks of a meta-batch are run
BATCHING = ("auto", "vmap", "loop")
#: the inner-loop estimators of the fast path (others go through the core)
_FAST = ("unrolled", "truncated")
#: tasks per draw of :meth:`MetaLearner.evaluate` (the test set does not depend on ``batch``)
EVAL_BLOCK = 100
#: prefix of Meta-SGD's per-parameter log step sizes among the meta-parameters
LOG_LR = "log_lr."

Loss = Callable[[Tensor, Tensor], Tensor]


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BilevelInputError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise BilevelInputError(f"{name} must be a finite number {'>=' if allow_zero else '>'} "
                                f"0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The model, seen functionally per task
# --------------------------------------------------------------------------------------------


def _no_running_stats(model: nn.Module) -> list[str]:
    """Make every normalisation layer of ``model`` (a private copy) use the statistics of
    the batch it sees, in training and evaluation alike; returns their names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.track_running_stats = False
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                if key in m._buffers:
                    m._buffers[key] = None
            names.append(name or "<root>")
    return names


class TaskModel:
    """A user's ``nn.Module`` evaluated functionally, per task, on a private copy.

    ``head`` names the adapted parameters; when the module is an ``nn.Sequential`` whose
    adapted parameters all lie in a suffix of its children, the prefix is the *body*: its
    features are computed once per task and only the head is re-run in the inner steps.
    """

    def __init__(self, module: nn.Module, adapted: Sequence[str]) -> None:
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.names = names
        self.adapted = [n for n in names if n in set(adapted)]
        copy_ = structural_copy(module)
        plain_weight_norms(copy_)
        _no_running_stats(copy_)
        copy_.train()
        self.module = copy_
        # private copies: a forward that writes a buffer (a counter, spectral norm's u) must
        # not reach the user's module
        self.buffers = {k: v.detach().clone() for k, v in copy_.named_buffers()}
        self.body, self.head, self.body_names = None, copy_, []
        if isinstance(copy_, nn.Sequential) and len(self.adapted) < len(names):
            children = list(copy_._modules.items())
            owner = {f"{key}.{n}": i for i, (key, m) in enumerate(children)
                     for n, _ in m.named_parameters()}
            split = min(owner[n] for n in self.adapted)
            if split > 0:
                self.body = nn.Sequential(OrderedDict(children[:split]))
                self.head = nn.Sequential(OrderedDict(children[split:]))
                body_keys = {key for key, _ in children[:split]}
                self.body_names = [n for n in names if n.split(".", 1)[0] in body_keys]

    def train(self, mode: bool) -> None:
        """Set the private copy's training mode (Dropout on or off)."""
        self.module.train(mode)

    @staticmethod
    def _call(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
              x: Tensor) -> Tensor:
        return functional_call(module, (dict(params), dict(buffers)), (x,), strict=False)

    def _sub(self, which: str, tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The entries of ``tree`` of the body or head, renamed for that submodule."""
        if self.body is None:
            return dict(tree)
        keys = set(self.body._modules) if which == "body" else set(self.head._modules)
        return {k: v for k, v in tree.items() if k.split(".", 1)[0] in keys}

    def features(self, params: Mapping[str, Tensor], x: Tensor, vmapped: bool) -> Tensor:
        """``(B, n, ...)`` body features of every task (the inputs when there is no body)."""
        if self.body is None:
            return x
        p, b = self._sub("body", params), self._sub("body", self.buffers)

        def one(xi: Tensor) -> Tensor:
            return self._call(self.body, p, b, xi)

        if vmapped:
            return vmap(one, randomness="different")(x)
        return torch.stack([one(xi) for xi in x.unbind(0)])

    def outputs(self, params: Mapping[str, Tensor], batched: set[str], feats: Tensor,
                vmapped: bool) -> Tensor:
        """``(B, n, ...)`` head outputs; ``params[k]`` has a task axis iff ``k in batched``."""
        p, b = self._sub("head", params), self._sub("head", self.buffers)
        if vmapped:
            dims = {k: 0 if k in batched else None for k in p}

            def one(pi: dict[str, Tensor], xi: Tensor) -> Tensor:
                return self._call(self.head, pi, b, xi)

            return vmap(one, in_dims=(dims, 0), randomness="different")(p, feats)
        # unbind, not v[i]: its backward stacks the B gradients once, where indexing would
        # scatter each task's gradient into a zero tensor of all B tasks (B² work)
        parts = {k: v.unbind(0) for k, v in p.items() if k in batched}
        outs = []
        for i, xi in enumerate(feats.unbind(0)):
            pi = {k: parts[k][i] if k in batched else v for k, v in p.items()}
            outs.append(self._call(self.head, pi, b, xi))
        return torch.stack(outs)


def default_loss(classification: bool) -> Loss:
    """Cross-entropy for class labels, mean squared error for regression targets."""
    return F.cross_entropy if classification else F.mse_loss


# --------------------------------------------------------------------------------------------
# One meta-batch as a problem, and the estimator of its meta-gradient
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetaProblem:
    """One meta-batch: the tasks and the learner that adapts to them (what the outer loop's
    problem factory builds at every outer step).

    Attributes:
        learner: the :class:`MetaLearner`.
        tasks: the meta-batch, a :class:`~bilevel.meta.TaskBatch` of B tasks.
    """

    learner: MetaLearner
    tasks: TaskBatch


@dataclass(frozen=True)
class MetaGradient(hg.Estimator):
    """The meta-gradient of a :class:`MetaProblem` by the learner's algorithm (see the
    module docstring); used by :class:`MetaLearner` and the outer loop. ``result.grad`` has
    the keys of the meta-parameters; ``diagnostics.outer_loss`` is the mean query loss after
    adaptation and ``inner_grad_norm`` the norm of the last inner step's gradient (averaged
    over tasks; NaN on the factored path, which never forms weight gradients).

    Raises:
        BilevelInputError: ``problem`` is not a :class:`MetaProblem`, or its tasks are bad.
        DivergenceError, NonFiniteError: NaN or inf in the meta-gradient.
    """

    name: ClassVar[str] = "meta"
    warn_zero: ClassVar[bool] = True

    def compute(self, problem: Any, hparams: Any, params: Any,
                state: EstimatorState) -> Hypergradient:
        """The meta-gradient of ``problem`` (a :class:`MetaProblem`) at ``hparams``."""
        if not isinstance(problem, MetaProblem):
            raise BilevelInputError(f"MetaGradient needs a MetaProblem (a learner and a "
                                    f"TaskBatch), got {type(problem).__name__}")
        return problem.learner._meta_gradient(problem.tasks, hparams)

    def zero_message(self, problem: Any, hparams: Any, params: Any) -> str:
        """The warning for an exactly zero meta-gradient."""
        return ("the meta-gradient is exactly zero: the query loss does not depend on the "
                "meta-parameters (an inner learning rate of 0, or a loss that ignores the "
                "model's output?)")


# --------------------------------------------------------------------------------------------
# Evaluation result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaEvaluation:
    """Query metric after adaptation over ``num_tasks`` test tasks.

    Attributes:
        metric: ``"accuracy"`` (fraction in [0, 1]) or ``"mse"``.
        num_tasks: tasks evaluated.
        after: inner steps -> (mean, half-width of the 95% confidence interval,
            1.96 · std / √n); 0 steps is the unadapted model.
        nearest_centroid: (mean, 95% half-width) of the raw-input nearest-centroid
            baseline on the same tasks (classification only).
        diverged: inner steps -> the number of tasks whose adapted model gave a non-finite
            metric there (the inner steps blew up); ``after`` then averages over the others,
            :meth:`table` marks the row, and :meth:`~MetaLearner.evaluate` warns.
        per_task: inner steps -> the metric of every task ``(num_tasks,)``, in test-set order.
    """

    metric: str
    num_tasks: int
    after: dict[int, tuple[float, float]]
    nearest_centroid: tuple[float, float] | None = None
    diverged: dict[int, int] = field(default_factory=dict)
    per_task: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        """A plain-text table, one row per number of inner steps (and the baseline)."""
        scale, unit = (100.0, " %") if self.metric == "accuracy" else (1.0, "")
        rows = [f"{'inner steps':>14} | {self.metric} (mean ± 95% CI, {self.num_tasks} tasks)"]
        for steps, (mean, ci) in sorted(self.after.items()):
            label = f"{steps} (unadapted)" if steps == 0 else str(steps)
            bad = self.diverged.get(steps, 0)
            note = f"  ({bad} diverged tasks left out)" if bad else ""
            rows.append(f"{label:>14} | {mean * scale:.2f} ± {ci * scale:.2f}{unit}{note}")
        if self.nearest_centroid is not None:
            mean, ci = self.nearest_centroid
            rows.append(f"{'centroid':>14} | {mean * scale:.2f} ± {ci * scale:.2f}{unit} "
                        f"(nearest centroid on raw inputs)")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``metric``, ``num_tasks``, ``after`` and ``diverged`` keyed by
        the step count as a string, ``nearest_centroid`` (``per_task`` left out)."""
        return {"metric": self.metric, "num_tasks": self.num_tasks,
                "after": {str(k): list(v) for k, v in self.after.items()},
                "diverged": {str(k): v for k, v in self.diverged.items()},
                "nearest_centroid": None if self.nearest_centroid is None
                else list(self.nearest_centroid)}


def _mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and 95% half-width (1.96 · sample std / √n) of the finite values."""
    v = values.double()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        return math.nan, math.nan
    std = float(v.std()) if n > 1 else 0.0
    return float(v.mean()), 1.96 * std / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# The meta-learner
# --------------------------------------------------------------------------------------------


class MetaLearner:
    """Meta-learn the initialisation of ``model`` with one of :data:`ALGORITHMS`.

    Args:
        model: any ``nn.Module`` mapping a task's inputs ``(n, *features)`` to outputs
            ``(n, *out)``; it is never written (its parameters are the starting θ).
        algorithm: ``"maml"``, ``"fomaml"``, ``"anil"``, ``"metasgd"``, ``"imaml"`` or
            ``"reptile"``.
        inner_lr: the inner SGD step size α (Meta-SGD: the initial per-element step size).
        inner_steps: T, the inner steps in meta-training (evaluation may use others).
        loss: ``loss(pred (n, *out), target (n, ...)) -> scalar``, a task's mean loss;
            default cross-entropy for integer labels, mean squared error otherwise.
        estimator: MAML, ANIL and Meta-SGD: ``"unrolled"`` (default: back-propagation
            through all steps), ``"truncated"`` (only the last ``window`` steps),
            ``"recompute"`` (the core's :class:`hypergrad.Unrolled` with recomputation:
            memory O(√T), same numbers), or any :class:`hypergrad.Estimator` object, which
            then gets the meta-batch as a core :class:`hypergrad.Problem` (inner variable the
            per-task offsets δ with a task axis, outer variable θ).
        window: ``estimator="truncated"``: the inner steps differentiated through.
        head: ANIL: the adapted parameters, as a parameter-name prefix (``"fc"``,
            ``"4"``) or a list of names; default the parameters of the last module that
            holds parameters of its own (the last ``nn.Linear`` of an MLP).
        lam: iMAML's proximal strength λ (inner problem L + λ/2‖φ − θ‖²).
        cg_steps / cg_damping: iMAML's conjugate-gradient iterations and damping d: the
            system solved is ((1 + d/λ) I + H/λ) g = ∇L^query (the official recipe: 5
            steps, d = 1).
        batching / task_chunk: see the module docstring.
        factored: MAML and first-order MAML on an MLP (an ``nn.Sequential`` of ``nn.Linear``
            and elementwise activations, see :mod:`bilevel.meta.factored`): adapt without
            per-task weight copies, exactly (``None``, the default: whenever the model and
            settings allow; ``True``: require it, raising why not; ``False``: never).

    Raises:
        BilevelInputError: for every bad argument, naming it, before any work.

    References:
        MAML and first-order MAML: Finn, Abbeel, Levine, "Model-agnostic meta-learning for
        fast adaptation of deep networks", ICML 2017. ANIL: Raghu, Raghu, Bengio, Vinyals,
        "Rapid learning or feature reuse? Towards understanding the effectiveness of
        MAML", ICLR 2020. Meta-SGD: Li, Zhou, Chen, Li, "Meta-SGD: learning to learn
        quickly for few-shot learning", arXiv 2017. iMAML: Rajeswaran, Finn, Kakade,
        Levine, "Meta-learning with implicit gradients", NeurIPS 2019. Reptile: Nichol,
        Achiam, Schulman, "On first-order meta-learning algorithms", arXiv 2018.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bilevel.meta import MetaLearner, SinusoidTasks
        >>> net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> learner = MetaLearner(net, "maml", inner_lr=0.01, inner_steps=1)
        >>> tasks = SinusoidTasks(shots=10, seed=0).sample(4, 0)
        >>> learner.meta_gradient(tasks).grad["0.weight"].shape
        torch.Size([40, 1])
    """

    def __init__(self, model: nn.Module, algorithm: str = "maml", *, inner_lr: float = 0.01,
                 inner_steps: int = 1, loss: Loss | None = None,
                 estimator: str | hg.Estimator = "unrolled", window: int | None = None,
                 head: str | Sequence[str] | None = None, lam: float = 2.0,
                 cg_steps: int = 5, cg_damping: float = 1.0, batching: str = "auto",
                 task_chunk: int | None = None, factored: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise BilevelInputError(f"model must be an nn.Module, got {type(model).__name__}")
        if algorithm not in ALGORITHMS:
            raise BilevelInputError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.inner_lr = _positive_float("inner_lr", inner_lr)
        self.inner_steps = _positive_int("inner_steps", inner_steps, 0 if algorithm in
                                         ("maml", "fomaml", "anil", "metasgd") else 1)
        if loss is not None and not callable(loss):
            raise BilevelInputError(f"loss must be callable loss(pred, target) -> scalar, got "
                                    f"{type(loss).__name__}")
        self.loss = loss
        if isinstance(estimator, str):
            if estimator not in (*_FAST, "recompute"):
                raise BilevelInputError(f"estimator must be 'unrolled', 'truncated', "
                                        f"'recompute' or a hypergrad.Estimator object, got "
                                        f"{estimator!r}")
        elif not isinstance(estimator, hg.Estimator):
            raise BilevelInputError(f"estimator must be a name or a hypergrad.Estimator, got "
                                    f"{type(estimator).__name__}")
        if estimator != "unrolled" and algorithm not in ("maml", "anil", "metasgd"):
            raise BilevelInputError(f"estimator={estimator!r} applies to maml, anil and "
                                    f"metasgd; {algorithm} has its own meta-gradient")
        self.estimator = estimator
        if estimator == "truncated":
            if window is None:
                raise BilevelInputError("estimator='truncated' needs window=K, the inner "
                                        "steps to differentiate through")
            self.window: int | None = _positive_int("window", window, 0)
            if self.window > self.inner_steps:
                raise BilevelInputError(f"window={window} exceeds inner_steps="
                                        f"{self.inner_steps}: at most every inner step can "
                                        f"be differentiated through")
        elif window is not None:
            raise BilevelInputError(f"window applies to estimator='truncated' only (estimator "
                                    f"is {estimator!r})")
        else:
            self.window = None
        self.lam = _positive_float("lam", lam)
        self.cg_steps = _positive_int("cg_steps", cg_steps)
        self.cg_damping = _positive_float("cg_damping", cg_damping, allow_zero=True)
        if batching not in BATCHING:
            raise BilevelInputError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.batching = batching
        self.task_chunk = None if task_chunk is None else _positive_int("task_chunk",
                                                                        task_chunk)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise BilevelInputError("model has no trainable parameters to meta-learn (all have "
                                    "requires_grad=False)")
        floating = {p.dtype for p in params.values()}
        if len(floating) != 1 or not next(iter(floating)).is_floating_point:
            raise BilevelInputError(f"model parameters must share one floating dtype, got "
                                    f"{sorted(map(str, floating))}")
        self.dtype = next(iter(floating))
        self.device = next(iter(params.values())).device
        adapted = self._adapted_names(model, head)
        self._model = model
        self.net = TaskModel(model, adapted)
        init = {k: v.detach().clone() for k, v in params.items()}
        if algorithm == "metasgd":
            init.update({LOG_LR + k: torch.full_like(params[k], math.log(self.inner_lr))
                         for k in self.net.adapted})
        self._hparams = {k: v.requires_grad_() for k, v in init.items()}
        self._factored, self.factored_reason = self._factored_layers(model, factored)
        self._checked_kinds: set[tuple] = set()
        self.loop: Any = None
        #: how the tasks ran in the last call (``"vmap"`` or ``"loop"``) and why
        self.batching_used: str | None = None if batching == "auto" else batching
        self.batching_reason = "" if batching == "auto" else f"batching={batching!r}"

    def _factored_layers(self, model: nn.Module, wanted: bool | None,
                         ) -> tuple[FactoredLayers | None, str]:
        """The factored description of ``model`` when the fast path applies, and why (not)."""
        if wanted is not None and not isinstance(wanted, bool):
            raise BilevelInputError(f"factored must be True, False or None, got {wanted!r}")
        if wanted is False:
            return None, "factored=False"
        why = None
        if self.algorithm not in ("maml", "fomaml"):
            why = f"the factored inner loop covers maml and fomaml, not {self.algorithm}"
        elif self.estimator not in _FAST:
            why = f"estimator={self.estimator!r} runs through the core"
        elif self.batching == "loop":
            why = "batching='loop'"
        else:
            why = supports_factored(model)
        if why is None:
            every = list(model.named_parameters(remove_duplicate=False))
            if any(not p.requires_grad for _, p in every):
                why = "the model has frozen parameters"
            elif len({id(p) for _, p in every}) != len(every):
                why = "the model shares parameters between layers"
        if why is not None:
            if wanted:
                raise BilevelInputError(f"factored=True but {why}")
            return None, why
        return factored_layers(model), "an MLP adapted by SGD: factored inner loop"

    def _adapted_names(self, model: nn.Module, head: str | Sequence[str] | None) -> list[str]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.algorithm != "anil":
            if head is not None:
                raise BilevelInputError(f"head applies to algorithm='anil' only, not "
                                        f"{self.algorithm!r}")
            return names
        if head is None:  # the last module holding parameters of its own
            owners = [k for k, m in model.named_modules()
                      if any(p.requires_grad for p in m.parameters(recurse=False))]
            key = owners[-1] if owners else ""
            chosen = [n for n in names if key and n.startswith(key + ".")]
        elif isinstance(head, str):
            chosen = [n for n in names if n == head or n.startswith(head + ".")]
        else:
            chosen = list(head)
            unknown = [n for n in chosen if n not in names]
            if unknown:
                raise BilevelInputError(f"head names {unknown} are not parameters of the "
                                        f"model (it has {names})")
        if not chosen:
            raise BilevelInputError(f"head={head!r} matches no parameter of the model "
                                    f"({names})")
        if len(chosen) == len(names):
            raise BilevelInputError("head covers every parameter: that is MAML, use "
                                    "algorithm='maml'")
        return chosen

    # ------------------------------------------------------------------ meta-parameters
    @property
    def hparams(self) -> dict[str, Tensor]:
        """The meta-parameters: θ by parameter name, and for Meta-SGD the log step sizes
        (``"log_lr.<name>"``); the outer loop's tensors once :meth:`outer_loop` made one."""
        return self.loop.hparams if self.loop is not None else self._hparams

    def _theta(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: hparams[k] for k in self.net.names}

    def _lrs(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        if self.algorithm == "metasgd":
            return {k: hparams[LOG_LR + k].exp() for k in self.net.adapted}
        return dict.fromkeys(self.net.adapted, self.inner_lr)

    def inner_lrs(self, hparams: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Meta-SGD's learned step sizes by parameter name (the fixed α otherwise), as
        detached tensors (shaped like each parameter for Meta-SGD, 0-d otherwise)."""
        h = self.hparams if hparams is None else hparams
        return {k: torch.as_tensor(v, dtype=self.dtype).detach()
                for k, v in self._lrs(h).items()}

    def model(self, hparams: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A deep copy of the user's model holding the meta-learned initialisation. Its
        normalisation layers use the statistics of the batch they see, in eval mode too,
        as in meta-training (no running statistics were learned).

        Raises:
            BilevelInputError: ``hparams`` without the keys and shapes of :attr:`hparams`.
        """
        h = self._check_hparams(self.hparams if hparams is None else hparams)
        out = deepcopy_module(self._model)
        with torch.no_grad():
            for name, p in out.named_parameters():
                if name in h:
                    p.copy_(h[name])
        _no_running_stats(out)
        return out

    def _check_hparams(self, hparams: Any) -> Mapping[str, Tensor]:
        """Meta-parameters given by hand must have the keys and shapes of :attr:`hparams`."""
        own = self.hparams if self.loop is not None else self._hparams
        if hparams is own:
            return hparams
        if not isinstance(hparams, Mapping):
            raise BilevelInputError(f"hparams must be a dict name -> tensor like "
                                    f"learner.hparams, got {type(hparams).__name__}")
        missing = [k for k in own if k not in hparams]
        extra = [k for k in hparams if k not in own]
        if missing or extra:
            raise BilevelInputError(f"hparams must have the keys of learner.hparams: missing "
                                    f"{missing}, unknown {extra}")
        for k, v in hparams.items():
            if not isinstance(v, Tensor) or v.shape != own[k].shape:
                raise BilevelInputError(f"hparams[{k!r}] must be a tensor of shape "
                                        f"{tuple(own[k].shape)}, got "
                                        f"{getattr(v, 'shape', type(v).__name__)}")
        return hparams

    # ------------------------------------------------------------------ tasks
    def _check_tasks(self, tasks: Any) -> TaskBatch:
        """Tasks on the model's device and dtype (integer inputs are cast to it), finite,
        and -- once per kind of task -- checked against one forward pass of the model."""
        if not isinstance(tasks, TaskBatch):
            raise BilevelInputError(f"tasks must be a bilevel.meta.TaskBatch, got "
                                    f"{type(tasks).__name__}")
        if tasks.support_x.device != self.device:
            raise BilevelInputError(f"tasks are on {tasks.support_x.device} but the model is "
                                    f"on {self.device}: use tasks.to({str(self.device)!r})")
        if tasks.support_x.dtype != self.dtype or tasks.query_x.dtype != self.dtype:
            tasks = TaskBatch(tasks.support_x.to(self.dtype),
                              tasks.support_y.to(self.dtype) if
                              tasks.support_y.is_floating_point() else tasks.support_y,
                              tasks.query_x.to(self.dtype),
                              tasks.query_y.to(self.dtype) if
                              tasks.query_y.is_floating_point() else tasks.query_y,
                              info=tasks.info)
        named = [("support_x", tasks.support_x), ("query_x", tasks.query_x)]
        named += [(n, t) for n, t in (("support_y", tasks.support_y),
                                      ("query_y", tasks.query_y)) if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        for (name, _), ok in zip(named, finite, strict=True):
            if not ok:
                raise BilevelInputError(f"tasks.{name} holds NaN or infinite values")
        key = (tuple(tasks.support_x.shape[2:]), tasks.is_classification,
               tuple(tasks.support_y.shape[2:]))
        if key not in self._checked_kinds:
            self._check_compatible(tasks)
            self._checked_kinds.add(key)
        return tasks

    def _check_compatible(self, tasks: TaskBatch) -> None:
        """One task through the model (no vmap, no graph, random state untouched): the
        model must accept the inputs, give one output row per example fit for the labels
        or targets, and the loss must be a scalar."""
        one = tasks.select(0)
        x, y = one.support_x[0], one.support_y[0]
        what = (f"a task's support_x of shape {tuple(x.shape)} ({x.dtype}) with "
                f"{'labels' if tasks.is_classification else 'targets'} of shape "
                f"{tuple(y.shape)}")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            try:
                theta = {k: v.detach() for k, v in self._theta(self._hparams).items()}
                feats = self.net.features(theta, x.unsqueeze(0), False)
                out = self.net.outputs(theta, set(), feats, False)[0]
            except Exception as exc:
                raise BilevelInputError(f"the model cannot run on {what}: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}"
                                        ) from exc
            if out.dim() < 1 or out.shape[0] != x.shape[0]:
                raise BilevelInputError(f"the model maps {what} to outputs of shape "
                                        f"{tuple(out.shape)}: expected one row per example")
            if tasks.is_classification:
                labels = torch.cat([tasks.support_y.flatten(), tasks.query_y.flatten()])
                low, high = int(labels.min()), int(labels.max())
                if low < 0:
                    raise BilevelInputError(f"class labels must be >= 0, got {low}")
                if self.loss is None and (out.dim() != 2 or out.shape[1] <= high):
                    raise BilevelInputError(
                        f"the model gives outputs of shape {tuple(out.shape)} for {what}, "
                        f"but the tasks have {high + 1} classes: expected (n, >= {high + 1}) "
                        f"logits")
            elif self.loss is None and out.shape != y.shape:
                raise BilevelInputError(f"the model gives outputs of shape {tuple(out.shape)} "
                                        f"for {what}: expected the targets' shape (a mean "
                                        f"squared error would broadcast)")
            try:
                value = self._task_loss(tasks.is_classification)(out, y)
            except Exception as exc:
                raise BilevelInputError(f"the loss fails on the model's outputs "
                                        f"{tuple(out.shape)} and {what}: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}"
                                        ) from exc
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise BilevelInputError(f"loss(pred, target) must return a task's mean loss "
                                        f"(a scalar), got "
                                        f"{getattr(value, 'shape', type(value).__name__)}")

    def _task_loss(self, classification: bool) -> Loss:
        return self.loss if self.loss is not None else default_loss(classification)

    def _losses(self, outs: Tensor, y: Tensor, vmapped: bool, classification: bool) -> Tensor:
        """``(B,)`` per-task mean losses of ``outs`` ``(B, n, ...)`` against ``y``."""
        loss = self._task_loss(classification)
        if vmapped:
            return vmap(loss)(outs, y)
        return torch.stack([loss(o, t) for o, t in zip(outs.unbind(0), y.unbind(0),
                                                      strict=True)])

    def _batched_loss(self, classification: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """``(B, n, ...)`` predictions and targets -> ``(B,)`` per-task mean losses."""
        if self.loss is not None:
            return vmap(self.loss)
        return per_task_cross_entropy if classification else per_task_mse

    def _choose_batching(self, tasks: TaskBatch | Tensor) -> bool:
        """Whether to vmap; with ``batching="auto"`` a forward pass of (at most) two tasks
        under vmap decides once, and a failure is explained in a warning. ``tasks`` may be
        a batch or inputs ``(B, n, ...)``."""
        if self.batching_used is not None:
            return self.batching_used == "vmap"
        x = tasks.support_x if isinstance(tasks, TaskBatch) else tasks
        probe = x[:2]
        # a forward and backward pass as the inner steps make them, with the random state
        # put back afterwards (a resumed run must draw what a straight one draws)
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                theta = {k: v.detach().requires_grad_() for k, v in
                         self._theta(self._hparams).items()}
                adapted = set(self.net.adapted)
                phi = {k: v.expand(probe.shape[0], *v.shape) if k in adapted else v
                       for k, v in theta.items()}
                feats = self.net.features(phi, probe, True)
                out = self.net.outputs(phi, adapted, feats, True)
                torch.autograd.grad(out.sum(), list(theta.values()), allow_unused=True)
        except Exception as exc:  # noqa: BLE001 -- a failure of vmap alone means: loop instead
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            try:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    theta = {k: v.detach() for k, v in self._theta(self._hparams).items()}
                    feats = self.net.features(theta, probe[:1], False)
                    self.net.outputs(theta, set(), feats, False)
            except Exception as plain:
                raise BilevelInputError(
                    f"the model cannot run on inputs of shape {tuple(probe.shape[1:])} "
                    f"({probe.dtype}) per task, with or without vmap: "
                    f"{type(plain).__name__}: {str(plain).splitlines()[0] if str(plain) else ''}"
                ) from plain
            self.batching_used, self.batching_reason = "loop", (
                f"torch.func.vmap cannot run this model ({reason})")
            warnings.warn(f"MetaLearner(batching='auto'): {self.batching_reason}; the tasks "
                          f"run one after another with the same results (set batching='loop' "
                          f"to silence this)", RuntimeWarning, stacklevel=3)
            return False
        self.batching_used, self.batching_reason = "vmap", "vmap runs this model"
        return True

    def _chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return [tasks] if self.task_chunk is None else tasks.chunks(self.task_chunk)

    # ------------------------------------------------------------------ inner loop
    def _inner(self, hparams: Mapping[str, Tensor], tasks: TaskBatch, steps: int,
               vmapped: bool, graph: bool, record: Callable[[int, dict], None] | None = None,
               ) -> tuple[dict[str, Tensor], Tensor | None, float]:
        """Adapt to every task: ``steps`` inner steps from θ. With ``graph`` the result is
        differentiable in the meta-parameters (second order through the steps the
        algorithm differentiates, first order through the others). Returns the parameters
        (adapted ones with a task axis), the body features of the query set (or ``None``
        without a body) and the sum over tasks of each task's last inner-gradient norm."""
        net, cls = self.net, tasks.is_classification
        theta = self._theta(hparams)
        if not graph:
            theta = {k: v.detach() for k, v in theta.items()}
        lrs = self._lrs(hparams)
        if not graph:
            lrs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in lrs.items()}
        num = tasks.num_tasks
        with torch.set_grad_enabled(graph):
            feats_s = net.features(theta, tasks.support_x, vmapped)
            feats_q = net.features(theta, tasks.query_x, vmapped) if net.body is not None \
                else None
        adapted = set(net.adapted)
        phi = {k: v.expand(num, *v.shape) if k in adapted else v for k, v in theta.items()}
        second = self.algorithm in ("maml", "anil", "metasgd")
        first_graph = steps - (self.window if self.window is not None else steps)
        prox = self.algorithm == "imaml"
        gnorm = math.nan
        if record is not None:
            record(0, phi)
        for t in range(steps):
            differentiate = graph and second and t >= first_graph
            inputs = [phi[k] if phi[k].requires_grad else phi[k].detach().requires_grad_()
                      for k in net.adapted]
            cur = dict(phi)
            cur.update(zip(net.adapted, inputs, strict=True))
            with torch.enable_grad():
                outs = net.outputs(cur, adapted, feats_s, vmapped)
                total = self._losses(outs, tasks.support_y, vmapped, cls).sum()
                if prox:
                    total = total + 0.5 * self.lam * sum(
                        ((cur[k] - theta[k].detach()) ** 2).sum() for k in net.adapted)
                grads = torch.autograd.grad(total, inputs, create_graph=differentiate,
                                            retain_graph=differentiate or net.body is not None)
            if t == steps - 1:  # summed over tasks of each task's gradient norm
                sq = sum((g.detach() ** 2).reshape(num, -1).sum(1) for g in grads)
                gnorm = float(sq.sqrt().sum())
            for k, g in zip(net.adapted, grads, strict=True):
                base = phi[k] if graph else phi[k].detach()
                phi[k] = base - lrs[k] * g
            if record is not None:
                record(t + 1, phi)
        return phi, feats_q, gnorm

    def _meta_gradient(self, tasks: TaskBatch, hparams: Mapping[str, Tensor]) -> Hypergradient:
        tasks = self._check_tasks(tasks)
        if self.estimator not in _FAST:
            return self._core_meta_gradient(tasks, hparams)
        vmapped = self._choose_batching(tasks)
        h = {k: v.detach().requires_grad_() for k, v in hparams.items()}
        keys = list(h)
        total = [torch.zeros_like(v) for v in h.values()]
        loss_sum, norms, residual = 0.0, [], None
        num = tasks.num_tasks
        for chunk in self._chunks(tasks):
            if self.algorithm == "imaml":
                grads, loss, norm, res = self._imaml_chunk(h, chunk, vmapped, num)
                residual = res if residual is None else max(residual, res)
            elif self.algorithm == "reptile":
                grads, loss, norm = self._reptile_chunk(h, chunk, vmapped, num)
            elif self._factored is not None:
                q, _ = factored_query_losses(
                    self._factored, self._theta(h), chunk.support_x, chunk.support_y,
                    chunk.query_x, chunk.query_y, self._batched_loss(chunk.is_classification),
                    self.inner_lr, self.inner_steps, first_order=self.algorithm == "fomaml",
                    window=self.window)
                grads = torch.autograd.grad(q.sum() / num, [h[k] for k in keys],
                                            allow_unused=True)
                loss, norm = float(q.detach().sum()), math.nan
            else:
                phi, feats_q, norm = self._inner(h, chunk, self.inner_steps, vmapped, True)
                feats = chunk.query_x if feats_q is None else feats_q
                with torch.enable_grad():
                    outs = self.net.outputs(phi, set(self.net.adapted), feats, vmapped)
                    q = self._losses(outs, chunk.query_y, vmapped, chunk.is_classification)
                    grads = torch.autograd.grad(q.sum() / num, [h[k] for k in keys],
                                                allow_unused=True)
                loss = float(q.detach().sum())
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g)
            loss_sum += loss
            norms.append(norm)
        useless = residual is not None and not residual < 1.0
        diag = Diagnostics(self.algorithm, loss_sum / num, sum(norms) / num, self.inner_steps,
                           solve_iterations=self.cg_steps if residual is not None else None,
                           solve_residual=residual, solve_converged=False if useless else None,
                           solve_note=(f"a relative residual >= 1 is no better than no solve: "
                                       f"(I + H/lam) is far from positive definite on some "
                                       f"task; raise lam={self.lam} or cg_damping="
                                       f"{self.cg_damping}") if useless else None)
        return Hypergradient(dict(zip(keys, total, strict=True)), None, {}, diag)

    def _query_losses(self, phi: Mapping[str, Tensor], feats_q: Tensor | None,
                      tasks: TaskBatch, vmapped: bool) -> Tensor:
        feats = tasks.query_x if feats_q is None else feats_q
        outs = self.net.outputs(phi, set(self.net.adapted), feats, vmapped)
        return self._losses(outs, tasks.query_y, vmapped, tasks.is_classification)

    def _reptile_chunk(self, h: dict[str, Tensor], tasks: TaskBatch, vmapped: bool,
                       num: int) -> tuple[list[Tensor | None], float, float]:
        phi, feats_q, norm = self._inner(h, tasks, self.inner_steps, vmapped, False)
        with torch.no_grad():
            loss = float(self._query_losses(phi, feats_q, tasks, vmapped).sum())
        # the gradient of (1/B) Σ_i ½‖θ − φ_i‖² with φ_i held fixed: θ − mean φ_i
        grads = [((h[k].detach() - phi[k]).sum(0) / num) if k in phi else None
                 for k in h]
        return grads, loss, norm

    def _imaml_chunk(self, h: dict[str, Tensor], tasks: TaskBatch, vmapped: bool,
                     num: int) -> tuple[list[Tensor | None], float, float, float]:
        net = self.net
        phi, feats_q, norm = self._inner(h, tasks, self.inner_steps, vmapped, False)
        blown = sum((~torch.isfinite(phi[k])).reshape(tasks.num_tasks, -1).any(1).long()
                    for k in net.adapted)
        if bool(blown.any()):
            raise DivergenceError(f"imaml: the inner steps diverged on {int(blown.gt(0).sum())} "
                                  f"of {tasks.num_tasks} tasks (NaN or inf in the adapted "
                                  f"parameters): lower inner_lr={self.inner_lr} (with "
                                  f"lam={self.lam}, a step must stay below 2 / (L + lam) "
                                  f"for the largest curvature L of a task's loss)")
        leaves = {k: phi[k].detach().requires_grad_() for k in net.adapted}
        cur = dict(phi)
        cur.update(leaves)
        adapted = set(net.adapted)
        with torch.enable_grad():
            q = self._query_losses(cur, feats_q, tasks, vmapped)
            rhs = dict(zip(net.adapted, torch.autograd.grad(q.sum(), list(leaves.values())),
                           strict=True))
            outs = net.outputs(cur, adapted, tasks.support_x, vmapped)
            support = self._losses(outs, tasks.support_y, vmapped, tasks.is_classification)
            gs = torch.autograd.grad(support.sum(), list(leaves.values()), create_graph=True)
        lam = self.lam

        def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
            hv = torch.autograd.grad(gs, list(leaves.values()), [v[k] for k in net.adapted],
                                     retain_graph=True)
            return {k: v[k] + hvk / lam for k, hvk in zip(net.adapted, hv, strict=True)}

        solver = hg.ConjugateGradient(tol=0.0, maxiter=self.cg_steps,
                                      damping=self.cg_damping / lam)
        result = solver(matvec, rhs, batched=True)
        grads = [result.x[k].detach().sum(0) / num if k in result.x else None for k in h]
        return grads, float(q.detach().sum()), norm, float(result.residual)

    # ------------------------------------------------------------------ the core route
    def core_problem(self, tasks: TaskBatch, vmapped: bool = True,
                     ) -> tuple[hg.Problem, dict[str, Tensor]]:
        """The meta-batch as a core :class:`hypergrad.Problem` and its inner start: inner
        variable the offsets δ of the adapted parameters, one per task (``(B, *shape)``,
        zero at the start), outer variable the meta-parameters; the inner loss is the sum
        over tasks of each task's support loss at θ + δ_i (so that SGD on it steps every
        task by its own gradient), the outer loss the mean query loss.

        Returns:
            ``(problem, delta)``: the :class:`hypergrad.Problem` and the zero offsets,
            a dict ``name -> (B, *shape)`` for the adapted parameters.

        Raises:
            BilevelInputError: bad ``tasks`` (not a TaskBatch, another device, non-finite).
        """
        tasks = self._check_tasks(tasks)
        net, num, cls = self.net, tasks.num_tasks, tasks.is_classification
        adapted = set(net.adapted)

        def at(delta: Mapping[str, Tensor], h: Mapping[str, Tensor]) -> dict[str, Tensor]:
            theta = self._theta(h)
            return {k: theta[k] + delta[k] if k in adapted else theta[k] for k in theta}

        def inner_loss(delta: dict, h: dict, batch: TaskBatch) -> Tensor:
            feats = net.features(self._theta(h), batch.support_x, vmapped)
            outs = net.outputs(at(delta, h), adapted, feats, vmapped)
            return self._losses(outs, batch.support_y, vmapped, cls).sum()

        def outer_loss(delta: dict, h: dict, batch: TaskBatch) -> Tensor:
            feats = net.features(self._theta(h), batch.query_x, vmapped)
            outs = net.outputs(at(delta, h), adapted, feats, vmapped)
            return self._losses(outs, batch.query_y, vmapped, cls).mean()

        if self.algorithm == "metasgd":
            opt = hg.SGD(lr=lambda h: {k: h[LOG_LR + k].exp() for k in net.adapted})
        else:
            opt = hg.SGD(lr=self.inner_lr)
        problem = hg.Problem(inner_loss, outer_loss, tasks, tasks, opt, self.inner_steps)
        delta = {k: torch.zeros(num, *self.hparams[k].shape, dtype=self.dtype,
                                device=self.device) for k in net.adapted}
        return problem, delta

    def _core_estimator(self) -> hg.Estimator:
        if isinstance(self.estimator, hg.Estimator):
            return self.estimator
        return hg.Unrolled(recompute=True)

    def _core_meta_gradient(self, tasks: TaskBatch, hparams: Mapping[str, Tensor],
                            ) -> Hypergradient:
        vmapped = self._choose_batching(tasks)
        problem, delta = self.core_problem(tasks, vmapped)
        h = {k: v.detach() for k, v in hparams.items()}
        result = self._core_estimator()(problem, h, delta)
        d = result.diagnostics
        return Hypergradient(result.grad, None, {}, Diagnostics(
            self.algorithm, d.outer_loss, d.inner_grad_norm, d.inner_steps,
            solve_iterations=d.solve_iterations, solve_residual=d.solve_residual))

    # ------------------------------------------------------------------ public calls
    def meta_gradient(self, tasks: TaskBatch,
                      hparams: Mapping[str, Tensor] | None = None) -> Hypergradient:
        """The meta-gradient on one meta-batch: ``result.grad`` (dict like
        :attr:`hparams`), ``result.diagnostics.outer_loss`` (mean query loss after
        adaptation).

        Args:
            tasks: a :class:`~bilevel.meta.TaskBatch` of B tasks.
            hparams: the meta-parameters (default :attr:`hparams`).

        Returns:
            :class:`hypergrad.Hypergradient` (``params`` is ``None``).

        Raises:
            BilevelInputError: ``tasks`` not a :class:`TaskBatch`, or on another device.
            DivergenceError, NonFiniteError: NaN or inf in the meta-gradient (lower
                ``inner_lr``).
        """
        h = self.hparams if hparams is None else hparams
        return self.estimator_object()(MetaProblem(self, tasks), h, None)

    def estimator_object(self) -> MetaGradient:
        """The :class:`hypergrad.Estimator` an outer loop calls with a :class:`MetaProblem`."""
        return MetaGradient()

    def adapt(self, tasks: TaskBatch, steps: int | None = None,
              hparams: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The adapted parameters of every task (no graph): name -> ``(B, *shape)`` for
        adapted parameters, the shared tensor for the others. Runs the model in eval mode
        (dropout off), as :meth:`evaluate` and :meth:`predict` do.

        Raises:
            BilevelInputError: bad ``tasks``, or ``steps`` not an int ≥ 0.
        """
        tasks = self._check_tasks(tasks)
        steps = self.inner_steps if steps is None else _positive_int("steps", steps, 0)
        vmapped = self._choose_batching(tasks)
        h = self.hparams if hparams is None else hparams
        self.net.train(False)
        try:
            phi, _, _ = self._inner(h, tasks, steps, vmapped, False)
        finally:
            self.net.train(True)
        return {k: v.detach() for k, v in phi.items()}

    def predict(self, x: Tensor, adapted: Mapping[str, Tensor]) -> Tensor:
        """Outputs ``(B, n, *out)`` of the adapted models (:meth:`adapt`) on inputs ``x``
        ``(B, n, ...)``, in eval mode (dropout off).

        Raises:
            BilevelInputError: ``x`` not a tensor ``(B, n, ...)`` on the model's device,
                ``adapted`` missing parameters or without a task axis of B, or a model
                that cannot run on such inputs.
        """
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise BilevelInputError(f"x must be a tensor (B, n, *features), got "
                                    f"{getattr(x, 'shape', type(x).__name__)}")
        if x.device != self.device:
            raise BilevelInputError(f"x is on {x.device} but the model is on {self.device}")
        x = x.to(self.dtype)
        if not isinstance(adapted, Mapping):
            raise BilevelInputError(f"adapted must be the dict learner.adapt(tasks) returns, got "
                                    f"{type(adapted).__name__}")
        missing = [k for k in self.net.names if k not in adapted]
        if missing:
            raise BilevelInputError(f"adapted lacks parameters {missing}: give the whole dict "
                                    f"learner.adapt(tasks) returns")
        for k in self.net.adapted:
            v = adapted[k]
            if v.dim() != self._hparams[k].dim() + 1 or v.shape[0] != x.shape[0]:
                raise BilevelInputError(f"adapted[{k!r}] has shape {tuple(v.shape)}: expected "
                                        f"a task axis of {x.shape[0]} (x has shape "
                                        f"{tuple(x.shape)}) before {tuple(self._hparams[k].shape)}")
        if tuple(x.shape[2:]) not in {k[0] for k in self._checked_kinds}:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                try:
                    theta = {k: v.detach() for k, v in self._theta(self._hparams).items()}
                    self.net.outputs(theta, set(), self.net.features(theta, x[:1], False),
                                     False)
                except Exception as exc:
                    raise BilevelInputError(
                        f"the model cannot run on inputs of shape {tuple(x.shape[1:])} per "
                        f"task, with or without vmap: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        vmapped = self._choose_batching(x)
        self.net.train(False)
        try:
            with torch.no_grad():
                feats = self.net.features(adapted, x, vmapped)
                return self.net.outputs(adapted, set(self.net.adapted), feats, vmapped)
        finally:
            self.net.train(True)

    def evaluate(self, sampler: Any, num_tasks: int = 600, steps: Iterable[int] | None = None,
                 batch: int = 100, first_step: int = 0,
                 hparams: Mapping[str, Tensor] | None = None,
                 progress: bool | None = None) -> MetaEvaluation:
        """Mean query accuracy (classification) or MSE (regression) after adaptation, with
        95% confidence intervals, over ``num_tasks`` tasks of ``sampler``.

        The test tasks are ``sampler.sample(100, first_step + i)`` for ``i = 0, 1, ...`` (the
        last block cut to ``num_tasks``), so a test set is fixed by the sampler's seed and
        ``first_step`` whatever ``batch`` is; ``batch`` only sets how many tasks are adapted
        at once (memory). ``steps``: the numbers of inner steps to report (default
        ``(0, inner_steps)``; 0 is the unadapted model). Classification adds the
        nearest-centroid baseline. The model runs in eval mode (dropout off; normalisation
        still uses each task's batch).

        Raises:
            BilevelInputError: a sampler without ``sample(num_tasks, step)``, ``num_tasks`` or
                ``batch`` below 1, ``steps`` not a collection of ints >= 0, a negative
                ``first_step``, or ``hparams`` unlike :attr:`hparams`.
        """
        if not callable(getattr(sampler, "sample", None)):
            raise BilevelInputError(f"sampler must have sample(num_tasks, step) (an "
                                    f"EpisodeSampler, SinusoidTasks, ...), got "
                                    f"{type(sampler).__name__}")
        _positive_int("num_tasks", num_tasks)
        _positive_int("batch", batch)
        _positive_int("first_step", first_step, 0)
        if steps is not None and (isinstance(steps, (int, str)) or
                                  not isinstance(steps, Iterable)):
            raise BilevelInputError(f"steps must be a collection of inner step counts such as "
                                    f"(0, 1, 10), got {steps!r}")
        wanted = sorted({0, self.inner_steps} if steps is None else
                        {_positive_int("steps", s, 0) for s in steps})
        if not wanted:
            raise BilevelInputError("steps is empty: give the inner step counts to report")
        h = {k: v.detach() for k, v in
             self._check_hparams(self.hparams if hparams is None else hparams).items()}
        per: dict[int, list[Tensor]] = {s: [] for s in wanted}
        centroid: list[Tensor] = []
        metric = None
        done, block = 0, 0
        bar = _progress(num_tasks, progress)
        self.net.train(False)
        try:
            while done < num_tasks:
                drawn = self._check_tasks(sampler.sample(min(EVAL_BLOCK, num_tasks - done),
                                                         first_step + block))
                block += 1
                for tasks in drawn.chunks(batch):
                    vmapped = self._choose_batching(tasks)
                    cls = tasks.is_classification
                    metric = "accuracy" if cls else "mse"

                    def record(t: int, phi: dict, tasks: TaskBatch = tasks, cls: bool = cls,
                               vmapped: bool = vmapped) -> None:
                        if t not in per:
                            return
                        with torch.no_grad():
                            feats = self.net.features(phi, tasks.query_x, vmapped)
                            outs = self.net.outputs(phi, set(self.net.adapted), feats, vmapped)
                            if cls:
                                value = (outs.argmax(-1) == tasks.query_y).double().mean(1)
                                blown = ~torch.isfinite(outs.flatten(1)).all(1)
                                value = value.masked_fill(blown, math.nan)
                            else:
                                err = outs - tasks.query_y
                                value = (err ** 2).flatten(1).double().mean(1)
                        per[t].append(value.cpu())

                    self._inner(h, tasks, max(wanted), vmapped, False, record)
                    if cls:
                        centroid.append(nearest_centroid(tasks).double().cpu())
                    done += tasks.num_tasks
                    if bar is not None:
                        bar.update(tasks.num_tasks)
        finally:
            self.net.train(True)
            if bar is not None:
                bar.close()
        values = {s: torch.cat(v) for s, v in per.items()}
        diverged = {s: int((~torch.isfinite(v)).sum()) for s, v in values.items()}
        diverged = {s: n for s, n in diverged.items() if n}
        if diverged:
            worst = max(diverged, key=lambda s: diverged[s])
            warnings.warn(f"evaluate: the inner steps diverged on {diverged[worst]} of {done} "
                          f"tasks after {worst} steps (non-finite {metric}); the means leave "
                          f"them out (MetaEvaluation.diverged); lower inner_lr or the steps",
                          RuntimeWarning, stacklevel=2)
        return MetaEvaluation(metric or "accuracy", done,
                              {s: _mean_ci(v) for s, v in values.items()},
                              _mean_ci(torch.cat(centroid)) if centroid else None,
                              diverged, values)

    # ------------------------------------------------------------------ training
    def identity(self) -> dict[str, Any]:
        """The settings that identify a meta-learning run (for its run folder)."""
        est = self.estimator if isinstance(self.estimator, str) else repr(self.estimator)
        return {"algorithm": self.algorithm, "inner_lr": self.inner_lr,
                "inner_steps": self.inner_steps, "estimator": est, "window": self.window,
                "adapted": self.net.adapted, "lam": self.lam, "cg_steps": self.cg_steps,
                "cg_damping": self.cg_damping, "model": repr(self._model),
                "loss": getattr(self.loss, "__name__", repr(self.loss))}

    def outer_loop(self, sampler: Any, meta_batch: int = 32,
                   optimizer: Any = None, *, validation: Any = None, val_tasks: int = 100,
                   eval_every: int = 0, run_dir: Any = None, run_mode: str = "auto",
                   checkpoint_every: int = 0, progress: bool | None = None,
                   **kwargs: Any) -> Any:
        """An :class:`~bilevel.OuterLoop` that meta-trains this learner: outer step ``s``
        draws ``sampler.sample(meta_batch, s)`` (so a resumed run sees the same tasks) and
        steps the meta-parameters with ``optimizer`` (a ``torch.optim`` factory; default
        Adam at 1e-3). With ``validation`` (a sampler) every ``eval_every`` steps records
        ``eval_<metric>`` after ``inner_steps`` on ``val_tasks`` tasks. Other keyword
        arguments go to ``OuterLoop`` (``scheduler``, ``clip_norm``, ``callbacks``, ...).
        :attr:`hparams` are the loop's from then on.

        Args:
            sampler: training tasks, an object with ``sample(num_tasks, step)`` returning a
                :class:`~bilevel.meta.TaskBatch`.
            meta_batch: tasks per outer step.
            optimizer: ``params -> torch.optim.Optimizer`` (default Adam, lr 1e-3).
            validation: a sampler of validation tasks, or ``None``.
            val_tasks: validation tasks per evaluation.
            eval_every: outer steps between evaluations (0: never).
            run_dir, run_mode, checkpoint_every, progress: as :class:`~bilevel.OuterLoop`.

        Returns:
            The :class:`~bilevel.OuterLoop` (call ``.run(steps)``).

        Raises:
            BilevelInputError: a sampler without ``sample``, ``meta_batch`` or
                ``val_tasks`` below 1, ``eval_every`` without ``validation``, or validation
                tasks of another kind (classification vs regression).
        """
        from ..outer import OuterLoop

        _positive_int("meta_batch", meta_batch)
        if not callable(getattr(sampler, "sample", None)):
            raise BilevelInputError(f"sampler must have sample(num_tasks, step) (an "
                                    f"EpisodeSampler, SinusoidTasks, ...), got "
                                    f"{type(sampler).__name__}")
        if eval_every and validation is None:
            raise BilevelInputError("eval_every > 0 needs validation=<a task sampler>")
        probe = self._check_tasks(sampler.sample(1, 0))  # a sampler that cannot serve fails here
        metric = "accuracy" if probe.is_classification else "mse"
        if validation is not None:
            if not callable(getattr(validation, "sample", None)):
                raise BilevelInputError(f"validation must be a task sampler with "
                                        f"sample(num_tasks, step), got "
                                        f"{type(validation).__name__}")
            if validation is sampler:
                warnings.warn("outer_loop: validation is the training sampler, so validation "
                              "runs on training tasks; give a sampler of the validation "
                              "classes or another seed", RuntimeWarning, stacklevel=2)
            checked = validation.sample(1, 0)
            if not isinstance(checked, TaskBatch) or \
                    checked.is_classification != probe.is_classification:
                raise BilevelInputError("validation tasks must be of the training tasks' kind "
                                        "(classification or regression)")
            self._check_tasks(checked)
            _positive_int("val_tasks", val_tasks)
        evaluate = None
        if validation is not None:
            def evaluate(hparams: dict[str, Tensor], params: Any) -> dict[str, float]:
                ev = self.evaluate(validation, val_tasks, (self.inner_steps,), hparams=hparams,
                                   progress=False)
                mean, ci = ev.after[self.inner_steps]
                return {ev.metric: mean, f"{ev.metric}_ci95": ci}

        def factory(step: int) -> tuple[MetaProblem, None]:
            return MetaProblem(self, sampler.sample(meta_batch, step)), None

        config = {"meta": self.identity(), "sampler": repr(sampler), "meta_batch": meta_batch}
        if optimizer is None:
            def optimizer(p: list[Tensor]) -> torch.optim.Optimizer:
                return torch.optim.Adam(p, lr=1e-3)
        loop = OuterLoop(factory, dict(self._hparams if self.loop is None else
                                       self.loop.current_hparams()),
                         estimator=self.estimator_object(), optimizer=optimizer,
                         evaluate=evaluate, eval_every=eval_every, run_dir=run_dir,
                         run_mode=run_mode, kind="meta", config=config,
                         checkpoint_every=checkpoint_every, progress=progress,
                         progress_fields={"loss": "outer_loss", "val": f"eval_{metric}"},
                         device=self.device, dtype=self.dtype, **kwargs)
        self.loop = loop
        return loop

    def __repr__(self) -> str:
        return (f"MetaLearner({self.algorithm}, inner_lr={self.inner_lr}, "
                f"inner_steps={self.inner_steps}, adapted={len(self.net.adapted)} of "
                f"{len(self.net.names)} tensors, batching={self.batching})")


def _progress(total: int, show: bool | None) -> Any:
    import sys

    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="task", leave=False)

