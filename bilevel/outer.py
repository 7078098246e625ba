"""The outer loop: step the hyperparameters with any ``torch.optim`` optimizer.

It is the one place that steps hyperparameters, clips, projects, evaluates, logs,
checkpoints and resumes; distillation (and every other application) is a problem
factory and an evaluation on top of it. Each outer step calls a hypergradient
estimator, writes ``result.grad`` into the ``.grad`` of the hyperparameter tensors,
optionally clips it, steps the optimizer (and scheduler), applies an optional constraint,
and carries the inner solution (warm start) and the estimator state to the next step::

    loop = OuterLoop(problem, {"lam": lam}, params,
                     optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
                     run_dir="runs/ridge", checkpoint_every=10)
    loop.resume()          # continue from the folder's newest checkpoint, if any
    loop.run(200)          # until 200 outer steps in total

``problem`` may also be a factory ``step -> (problem, params)`` giving a fresh problem and
inner start at every outer step (a new network each step, as in dataset distillation).
With ``run_dir`` the loop owns a :class:`~bilevel.run_folder.RunFolder`: an exclusive
lock, the run's identity, checkpoints, and ``metrics.jsonl``/``.csv`` written as it goes
and cut back to the checkpoint on resume, so every step appears once after any kill.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from hypergrad import (
    LVHBA,
    ConstrainedProblem,
    Estimator,
    EstimatorState,
    HyperparameterError,
    KKTImplicit,
    Problem,
    make_estimator,
)
from hypergrad.errors import (
    INNER_NOT_CONVERGED,
    LINEAR_SOLVE_NOT_CONVERGED,
    NOT_A_KKT_POINT,
    BilevelInputError,
    kind_of,
    route_warnings,
)
from hypergrad.pytree import PyTree, tree_detach
from hypergrad.validation import check_problem

from . import checkpoint as ckpt
from .callbacks import check_callback
from .hparams import assign_grads, validate_hparams
from .log import warning_mode
from .module import check_estimator
from .run_folder import RunFolder, RunFolderError
from .sinks import (
    BASE_COLUMNS,
    MetricsFiles,
    Progress,
    Sink,
    TensorBoard,
    json_value,
    summary_writer_class,
)

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
ProblemFactory = Callable[[int], tuple[Any, PyTree]]
Constraint = Callable[[dict[str, torch.Tensor]], Any] | Mapping[str, Callable[[torch.Tensor],
                                                                               torch.Tensor]]
#: how a loop opens its ``run_dir`` (the modes of :class:`~bilevel.run_folder.RunFolder`)
RUN_MODES = ("auto", "new", "resume", "overwrite")
#: optimizer settings that identify a run (others, e.g. ``foreach``, are implementation)
_OPTIMIZER_KEYS = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay",
                   "alpha", "amsgrad", "maximize")
#: the record key holding the numbers behind each kind of warning
_KIND_COLUMNS = {LINEAR_SOLVE_NOT_CONVERGED: "solve_residual",
                 INNER_NOT_CONVERGED: "inner_grad_norm", NOT_A_KKT_POINT: "inner_grad_norm"}

logger = logging.getLogger(__name__)


def peak_memory_mib(device: torch.device | None = None) -> float | None:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on CUDA, else the process's VmHWM."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0
    except (ImportError, OSError):  # pragma: no cover
        return None


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise BilevelInputError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able, process-independent description of a config object (dataclass fields
    recursively; callables by qualified name; anything else by type name)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (list, tuple)):
        return [describe(x, depth + 1) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth + 1) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type) and depth < 4:
        out = {"type": type(obj).__name__}
        out.update({f.name: describe(getattr(obj, f.name), depth + 1) for f in fields(obj)})
        return out
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype)}
    if callable(obj):
        return getattr(obj, "__qualname__", type(obj).__name__)
    return type(obj).__name__


class OuterLoop:
    """Drive the hyperparameters of a bilevel problem with a ``torch.optim`` optimizer.

    Args:
        problem: a :class:`hypergrad.Problem` (or any problem the estimator accepts), or a
            factory ``step -> (problem, params)`` building the problem and inner start of
            each outer step (then ``params`` and ``reinit`` are not given).
        hparams: dict name -> floating tensor. With an ``optimizer`` instance these must be
            the very tensors it was built on; with a factory (or ``None``) fresh leaf
            copies are made (read the current values from ``loop.hparams``).
        params: inner starting point (pytree); may be ``None`` when ``reinit`` is given.
        estimator: an estimator object or registry name (``"implicit"``, ...).
        optimizer: a ``torch.optim.Optimizer`` on the hparams tensors, or a factory
            ``list[Tensor] -> Optimizer``; default Adam(lr=1e-2). Optimizers that need a
            closure (LBFGS) or sparse gradients (SparseAdam) are refused.
        scheduler: an LR scheduler on that optimizer, or a factory ``Optimizer -> sched``;
            stepped after every outer step (``ReduceLROnPlateau`` gets ``scheduler_metric``).
        reinit: ``step -> params``: restart the inner problem from this point at every
            outer step; ``None`` warm-starts from the previous inner solution.
        clip_norm: clip the hypergradient to this total 2-norm before the step.
        constraint: applied under ``no_grad`` after each step: a callable on the dict
            (returning a dict of new values, or ``None`` after editing in place), or a
            dict name -> ``tensor -> tensor`` (e.g. ``{"lam": lambda t: t.clamp(-5, 5)}``).
        evaluate: ``(hparams, params) -> dict`` called every ``eval_every`` steps (and after
            the last step of :meth:`run`); its numbers go into the record as
            ``eval_<name>``.
        metrics: ``hparams -> dict`` of extra numbers recorded at every step (e.g. a
            learned inner learning rate), called with the hyperparameters the step started
            from: the ones its ``outer_loss`` (and evaluation) belong to.
        callbacks: objects with any of ``on_eval(loop, record)``, ``on_step(loop,
            record)``, ``on_checkpoint(loop, path)``, ``on_end(loop)`` (see
            :class:`bilevel.Callback`); call :meth:`stop` to end ``run``.
        sinks: more record sinks (``write(record)``, ``close()``; see :mod:`bilevel.sinks`).
        run_dir: the run's output folder (a path or an open
            :class:`~bilevel.run_folder.RunFolder`): locked for this loop's life, holding
            the run's identity, ``checkpoints/`` and ``metrics.jsonl``/``.csv``.
        run_mode: how ``run_dir`` is opened: ``"auto"`` (default: a new run, or this same
            run continued with :meth:`resume`; another run, or this run with a changed
            config, is refused), ``"new"`` (refuse a folder holding any run),
            ``"resume"`` (the folder must hold this run) or ``"overwrite"``.
        kind / config: the run's kind and a JSON-able config identifying it beyond the
            estimator, optimizer and hyperparameter shapes (a resume with another config
            is refused naming the keys, except those in ``growable``, which may grow).
            ``outputs``: names of result files the folder holds, refused in a new run
            unless overwriting.
        checkpoint_every / keep_checkpoints: a checkpoint after every k-th step (0: only at
            the end of :meth:`run`), keeping the newest few (``None``: all).
        tensorboard: a TensorBoard log directory (needs the ``tensorboard`` package: ``pip
            install bilevel[tensorboard]``; an ImportError says so at construction).
        progress: progress bar; ``None`` shows it only when stderr is a terminal.
            ``progress_fields`` (label -> record key) chooses what it shows.
        device / dtype: the one device and floating dtype of hparams and params; tensors
            are moved/cast to them (hparams only when a factory builds the optimizer),
            and any tensor still differing raises an error naming it.
        check: run :func:`hypergrad.check_problem` once before the first step.
        estimator_state: initial estimator state (default empty).
        warnings: ``"once"``: the library's warnings raised in a step (an unconverged
            inner run or linear solve, ...) are shown once per kind for this loop, at the
            caller's line; the repeats are only counted (:attr:`warning_counts`, each
            record's ``warnings``, and one summary line per kind logged by :meth:`run`;
            the numbers are in the record's diagnostics, e.g. ``solve_residual``).
            ``"all"``: every one is shown. ``None`` (default): ``$BILEVEL_WARNINGS`` or
            ``"once"`` (see :mod:`bilevel.log`).

    Raises:
        BilevelInputError: bad arguments (negative counts, an evaluation period without
            ``evaluate``, checkpoints without ``run_dir``, an estimator the problem cannot
            use, an unusable optimizer, ...), before any work.
        bilevel.run_folder.RunFolderError: an unusable ``run_dir`` (see
            :class:`~bilevel.run_folder.RunFolder`).
    """

    def __init__(self, problem: Any, hparams: dict[str, torch.Tensor], params: PyTree = None,
                 estimator: str | Estimator = "implicit",
                 optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
                 scheduler: Any = None, *, reinit: Callable[[int], PyTree] | None = None,
                 clip_norm: float | None = None, constraint: Constraint | None = None,
                 evaluate: Callable[[dict[str, torch.Tensor], PyTree], dict] | None = None,
                 eval_every: int = 0,
                 metrics: Callable[[dict[str, torch.Tensor]], dict] | None = None,
                 callbacks: Iterable[Any] = (), sinks: Iterable[Sink] = (),
                 run_dir: str | os.PathLike[str] | RunFolder | None = None,
                 run_mode: str = "auto", kind: str = "outer_loop",
                 config: Mapping[str, Any] | None = None, outputs: Sequence[str] = (),
                 growable: Sequence[str] = ("outer_steps",),
                 checkpoint_every: int = 0, keep_checkpoints: int | None = 3,
                 tensorboard: str | os.PathLike[str] | None = None,
                 progress: bool | None = None, progress_fields: Mapping[str, str] | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 check: bool = True, scheduler_metric: str = "outer_loss",
                 estimator_state: EstimatorState | None = None,
                 warnings: str | None = None) -> None:
        self.factory: ProblemFactory | None = None
        if callable(problem) and not isinstance(problem, (Problem, ConstrainedProblem)):
            if params is not None or reinit is not None:
                raise BilevelInputError("with a problem factory (step -> (problem, params)) "
                                        "give neither params nor reinit")
            self.factory, problem = problem, None
        self.problem = problem
        self.estimator = make_estimator(estimator)
        if problem is not None:
            self._check_estimator(problem)
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as exc:
            raise BilevelInputError(f"device must be a torch device such as 'cpu' or "
                                    f"'cuda:0', got {device!r}") from exc
        self.dtype = dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise BilevelInputError(f"dtype must be a floating torch.dtype, got {dtype}")
        if self.device is not None and self.device.type == "cuda" and \
                not torch.cuda.is_available():
            raise BilevelInputError(f"device is {device!r} but CUDA is not available here")
        self.hparams, self.optimizer = self._setup_hparams(hparams, optimizer)
        self.scheduler = self._setup_scheduler(scheduler)
        self.reinit = reinit
        if params is None and reinit is None and self.factory is None:
            raise BilevelInputError("params is None: give the inner starting point, reinit "
                                    "or a problem factory")
        self.params = self._to_setting(params) if params is not None else None
        if clip_norm is not None and not (isinstance(clip_norm, (int, float))
                                          and math.isfinite(clip_norm) and clip_norm > 0):
            raise BilevelInputError(f"clip_norm must be a positive number, got {clip_norm!r}")
        self.clip_norm = clip_norm
        if constraint is not None and not (callable(constraint) or isinstance(constraint,
                                                                               Mapping)):
            raise BilevelInputError("constraint must be a callable or a dict name -> callable")
        self.constraint = constraint
        self.eval_every = _count("eval_every", eval_every, 0)
        if evaluate is not None and not callable(evaluate):
            raise BilevelInputError(f"evaluate must be callable, got {type(evaluate).__name__}")
        if self.eval_every and evaluate is None:
            raise BilevelInputError("eval_every > 0 needs evaluate=(hparams, params) -> dict")
        self.evaluate = evaluate
        if metrics is not None and not callable(metrics):
            raise BilevelInputError(f"metrics must be callable, got {type(metrics).__name__}")
        self.metrics = metrics
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            check_callback(cb)
        self.checkpoint_every = _count("checkpoint_every", checkpoint_every, 0)
        if keep_checkpoints is not None:
            _count("keep_checkpoints", keep_checkpoints, 1)
        if run_mode not in RUN_MODES:
            raise BilevelInputError(f"run_mode must be one of {RUN_MODES}, got {run_mode!r}")
        if self.checkpoint_every and run_dir is None:
            raise BilevelInputError("checkpoint_every needs a run_dir to write checkpoints to")
        if scheduler_metric != "outer_loss" and not isinstance(scheduler_metric, str):
            raise BilevelInputError("scheduler_metric must be a record key (str)")
        self.scheduler_metric = scheduler_metric
        self.progress = progress
        self.progress_fields = progress_fields
        self.state: EstimatorState = dict(estimator_state or {})
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._resumed = False
        self._saved_step: int | None = None
        self._target: int | None = None
        self._stop = False
        self._checked = not check
        if warnings is not None:
            warning_mode(warnings)  # refused here, not at the first step
        self._warnings = warnings
        #: library warnings raised in this loop's steps, by kind (see ``warnings``)
        self.warning_counts: Counter[str] = Counter()
        self._warning_labels: dict[str, str] = {}
        self._unreported: Counter[str] = Counter()
        self._unreported_steps = 0
        self._step_warnings = 0
        self._check_setting()
        self.sinks: list[Any] = list(sinks)
        self.tensorboard = Path(tensorboard) if tensorboard is not None else None
        if tensorboard is not None:
            self.sinks.append(TensorBoard(tensorboard))
        self.kind = kind
        #: what identifies this run in a run folder (see ``config``)
        self.identity = self._identity(config)
        self.folder: RunFolder | None = None
        if isinstance(run_dir, RunFolder):
            self.folder = run_dir
        elif run_dir is not None:
            self.folder = RunFolder(run_dir, kind=kind, config=self.identity,
                                    mode=run_mode, outputs=outputs, growable=growable,
                                    metric_columns=BASE_COLUMNS,
                                    keep_checkpoints=keep_checkpoints)
        if self.folder is not None:
            self.sinks.insert(0, MetricsFiles(self.folder.metrics))

    # ------------------------------------------------------------------ setup
    def _check_estimator(self, problem: Any) -> None:
        if isinstance(self.estimator, (KKTImplicit, LVHBA)) and \
                not isinstance(problem, ConstrainedProblem):
            raise BilevelInputError(
                f"the {type(self.estimator).__name__} estimator needs a "
                "hypergrad.ConstrainedProblem (a lower level with constraints g <= 0); "
                f"got a {type(problem).__name__}: use an unrolled or implicit estimator")
        check_estimator(problem, self.estimator)

    def _identity(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """What identifies the run in its folder: estimator, optimizer and hyperparameter
        shapes, plus the caller's ``config``."""
        opt = self.optimizer
        groups = [{k: describe(g[k]) for k in _OPTIMIZER_KEYS if k in g}
                  for g in opt.param_groups]
        ident = {"estimator": describe(self.estimator),
                 "optimizer": {"type": type(opt).__name__, "groups": groups},
                 "hparams": {k: [list(v.shape), str(v.dtype)] for k, v in self.hparams.items()}}
        if config is not None:
            if not isinstance(config, Mapping):
                raise BilevelInputError(f"config must be a dict, got {type(config).__name__}")
            ident["config"] = describe(config)
        return ident

    def _setup_hparams(self, hparams: Any, optimizer: Any
                       ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        hparams = validate_hparams(hparams)
        if isinstance(optimizer, torch.optim.Optimizer):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for k, v in hparams.items():
                if id(v) not in held:
                    raise HyperparameterError(
                        f"hparams[{k!r}] is not a tensor held by the optimizer; build the "
                        "optimizer on the hparams tensors or pass a factory "
                        "lambda params: torch.optim.Adam(params, ...)")
            self._check_optimizer(optimizer)
            return dict(hparams), optimizer
        leaves = {k: self._cast(v).detach().clone().requires_grad_(True)
                  for k, v in hparams.items()}
        if optimizer is None:
            opt = torch.optim.Adam(list(leaves.values()), lr=1e-2)
        elif callable(optimizer):
            opt = optimizer(list(leaves.values()))
            if not isinstance(opt, torch.optim.Optimizer):
                raise BilevelInputError(f"the optimizer factory returned {type(opt).__name__}, "
                                        "not a torch.optim.Optimizer")
        else:
            raise BilevelInputError("optimizer must be a torch.optim.Optimizer or a factory "
                                    f"list[Tensor] -> Optimizer, got {type(optimizer).__name__}")
        self._check_optimizer(opt)
        return leaves, opt

    @staticmethod
    def _check_optimizer(opt: torch.optim.Optimizer) -> None:
        if isinstance(opt, torch.optim.LBFGS):
            raise BilevelInputError(
                "LBFGS needs a closure that re-evaluates the loss at trial points; an outer "
                "step has only the hypergradient at the current hyperparameters: use Adam, "
                "SGD or another first-order torch.optim optimizer")
        if isinstance(opt, torch.optim.SparseAdam):
            raise BilevelInputError("SparseAdam needs sparse gradients, and hypergradients are "
                                    "dense: use Adam")

    def _setup_scheduler(self, scheduler: Any) -> Any:
        if scheduler is None:
            return None
        if hasattr(scheduler, "step") and hasattr(scheduler, "state_dict"):
            if getattr(scheduler, "optimizer", self.optimizer) is not self.optimizer:
                raise BilevelInputError("the scheduler is attached to a different optimizer")
            return scheduler
        if callable(scheduler):
            return scheduler(self.optimizer)
        raise BilevelInputError(f"scheduler must be an LR scheduler or a factory, got "
                                f"{type(scheduler).__name__}")

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if self.device is None and self.dtype is None:
            return t
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else None
        return t.to(device=self.device, dtype=dtype)

    def _to_setting(self, tree: PyTree) -> PyTree:
        import torch.utils._pytree as pt

        return pt.tree_map(lambda x: self._cast(x) if isinstance(x, torch.Tensor) else x, tree)

    def _check_setting(self) -> None:
        """hparams and params share one device and dtype; errors name the tensor."""
        import torch.utils._pytree as pt

        named = [(f"hparams[{k!r}]", v) for k, v in self.hparams.items()]
        if self.params is not None:
            named += [("params" + pt.keystr(p), v)
                      for p, v in pt.tree_flatten_with_path(self.params)[0]]
        ref_name, ref = named[0]
        device = self.device if self.device is not None else ref.device
        dtype = self.dtype if self.dtype is not None else ref.dtype
        if self.device is None:
            ref_desc = f"{ref_name} is on {ref.device}"
        else:
            ref_desc = f"the loop's device is {device}"
        for name, v in named:
            if not isinstance(v, torch.Tensor):
                raise BilevelInputError(f"{name} must be a torch.Tensor, got "
                                        f"{type(v).__name__}")
            if v.device != device:
                raise BilevelInputError(f"{name} is on {v.device} but {ref_desc}: move all "
                                        "tensors to one device (or pass device=...)")
            if v.is_floating_point() and v.dtype != dtype:
                what = f"{ref_name} has {ref.dtype}" if self.dtype is None else \
                    f"the loop's dtype is {dtype}"
                raise BilevelInputError(f"{name} has dtype {v.dtype} but {what}: use one "
                                        "floating dtype (or pass dtype=...)")
        self.device, self.dtype = device, dtype

    # ------------------------------------------------------------------ stepping
    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step (for callbacks)."""
        self._stop = True

    def current_hparams(self) -> dict[str, torch.Tensor]:
        """Detached copies of the current hyperparameters."""
        return {k: v.detach().clone() for k, v in self.hparams.items()}

    def _problem_at(self, step: int) -> tuple[Any, PyTree]:
        if self.factory is not None:
            problem, params = self.factory(step)
            if step == self.global_step and not self._checked:
                self._check_estimator(problem)
            return problem, params
        if self.reinit is not None:
            return self.problem, self._to_setting(self.reinit(step))
        return self.problem, self.params

    def _continue_run(self) -> None:
        """A folder that already held this run (``run_mode="auto"``) continues it: the
        first step of a loop that was not resumed by hand resumes it, so that no step is
        logged twice and no later checkpoint is lost."""
        if self.folder is not None and self.folder.resumed and not self._resumed \
                and self.global_step == 0:
            step = self.resume()
            if step:
                logger.info("continuing the run in %s from outer step %d", self.folder.path,
                            step)

    def step(self) -> dict[str, Any]:
        """One outer step; returns (and records) its metrics. The library's warnings raised
        in it are counted by kind and, with ``warnings="once"``, shown only the first time
        (see the ``warnings`` argument)."""
        self._continue_run()
        self._step_warnings = 0
        with route_warnings(self._route_warning):
            record = self._step()
        self._unreported_steps += 1
        return record

    def _route_warning(self, warning: Warning) -> Warning | None:
        """Count a library warning by kind; the warning to show (the first of its kind,
        saying that repeats are counted; every one with ``warnings="all"``) or None."""
        kind = kind_of(warning)
        self.warning_counts[kind] += 1
        self._unreported[kind] += 1
        self._step_warnings += 1
        self._warning_labels.setdefault(kind, f"{type(warning).__name__} ({kind})")
        if warning_mode(self._warnings) == "all":
            return warning
        if self.warning_counts[kind] > 1:
            return None
        if warning.args and isinstance(warning.args[0], str):
            warning.args = (warning.args[0] + " [bilevel.OuterLoop shows this kind once; the "
                            "repeats are counted in loop.warning_counts and the metrics' "
                            "warnings column; OuterLoop(warnings='all') or the environment "
                            "variable BILEVEL_WARNINGS=all shows each]",)
        return warning

    def _log_warnings(self) -> None:
        """Log one line per kind of warning counted since the last summary."""
        counts, steps = self._unreported, self._unreported_steps
        self._unreported, self._unreported_steps = Counter(), 0
        where = "metrics.jsonl column" if self.folder is not None else "loop.history key"
        for kind, n in counts.items():
            column = _KIND_COLUMNS.get(kind, "warnings")
            logger.warning("%s x %d in %d outer step%s; see %s %s",
                           self._warning_labels[kind], n, steps, "" if steps == 1 else "s",
                           where, column)

    def _step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        step = self.global_step
        hp = self.current_hparams()
        problem, params = self._problem_at(step)
        if not self._checked:
            if isinstance(problem, Problem):
                check_problem(problem, hp, params)
            self._checked = True
        result = self.estimator(problem, hp, params, self.state)
        assign_grads(self.hparams, result.grad, complete=True)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.hparams.values()), self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.constraint is not None:
            self._apply_constraint()
        self.params = tree_detach(result.params)
        self.state = result.state
        d = result.diagnostics
        record: dict[str, Any] = {
            "step": step,
            "outer_loss": float(d.outer_loss),
            "hypergrad_norm": float(d.hypergrad_norm),
            # NaN: not measured (e.g. Unrolled(grad_norm=False)); a diverged run raises
            "inner_grad_norm": None if math.isnan(d.inner_grad_norm) else float(d.inner_grad_norm),
            "solve_residual": None if d.solve_residual is None else float(d.solve_residual),
            "solve_iterations": d.solve_iterations,
            "inner_steps": d.inner_steps,
            "seconds": float(d.seconds),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.metrics is not None:
            record.update({k: json_value(v) for k, v in
                           dict(self.metrics(hp)).items()})
        if self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record[self.scheduler_metric])
            else:
                self.scheduler.step()
        self.global_step = step + 1
        if self.evaluate is not None and self.eval_every > 0 and (
                self.global_step % self.eval_every == 0 or self.global_step == self._target):
            self._evaluate_into(record)
        record["warnings"] = self._step_warnings
        record["step_seconds"] = time.perf_counter() - t0
        record["peak_memory_mib"] = peak_memory_mib(self.device)
        self._record(record)
        if self.checkpoint_every > 0 and self.global_step % self.checkpoint_every == 0:
            self.save_checkpoint()
        return record

    def _evaluate_into(self, record: dict[str, Any]) -> None:
        metrics = dict(self.evaluate(self.current_hparams(), self.params))
        record.update({f"eval_{k}": json_value(v) for k, v in metrics.items()})
        self._emit("on_eval", record)

    def _record(self, record: dict[str, Any]) -> None:
        logger.debug("outer step %d: outer loss %.6g, hypergradient norm %.3g, %.3g s",
                     record["step"], record["outer_loss"], record["hypergrad_norm"],
                     record["step_seconds"])
        self.history.append(record)
        for sink in self.sinks:
            sink.write(record)
        self._emit("on_step", record)

    def _apply_constraint(self) -> None:
        with torch.no_grad():
            if isinstance(self.constraint, Mapping):
                new = {k: fn(self.hparams[k]) for k, fn in self.constraint.items()}
            else:
                new = self.constraint(self.hparams)
            for k, v in (new or {}).items():
                if k not in self.hparams:
                    raise HyperparameterError(f"the constraint returned unknown hparams[{k!r}]")
                if v is not self.hparams[k]:
                    self.hparams[k].copy_(v)

    def run(self, num_steps: int) -> list[dict[str, Any]]:
        """Step until ``num_steps`` outer steps in total have been taken (a resumed loop
        continues from its step counter); returns the metrics history. With a
        ``run_dir``, a checkpoint is written at the end. The warnings counted in these
        steps are summarized at the end, one line per kind, on the ``bilevel.outer`` logger
        (e.g. ``ConvergenceWarning (linear solve did not converge) x 43 in 30 outer steps;
        see metrics.jsonl column solve_residual``).

        Raises:
            BilevelInputError: ``num_steps`` is not an int >= 0.
        """
        num_steps = _count("num_steps", num_steps, 0)
        self._continue_run()
        if self.global_step >= num_steps:
            return self.history
        show = self.progress if self.progress is not None else \
            sys.stderr.isatty() and logging.getLogger("bilevel").level <= logging.INFO
        bar = Progress(num_steps, self.global_step, fields=self.progress_fields) if show \
            else None
        self._stop, self._target = False, num_steps
        try:
            while self.global_step < num_steps and not self._stop:
                record = self.step()
                if bar is not None:
                    bar.write(record)
        finally:
            self._target = None
            if bar is not None:
                bar.close()
            self._log_warnings()
            for sink in self.sinks:  # TensorBoard: one event file per run() (reopens)
                if isinstance(sink, TensorBoard):
                    sink.close()
        if self.folder is not None and self._saved_step != self.global_step:
            self.save_checkpoint()
        self._emit("on_end")
        return self.history

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close the sinks and release the run folder (its lock): the loop can still step,
        but writes nothing more into the folder. Warnings counted since the last summary
        of :meth:`run` are summarized in the log."""
        self._log_warnings()
        for sink in self.sinks:
            sink.close()
        self.sinks = [s for s in self.sinks if not isinstance(s, MetricsFiles)]
        if self.folder is not None:
            self.folder.close()
            self.folder = None

    def __enter__(self) -> OuterLoop:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: hparams, params, optimizer/scheduler/estimator
        state, RNG states, step counter and history."""
        return {
            "step": self.global_step,
            "hparams": self.current_hparams(),
            "params": self.params,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "estimator": getattr(self.estimator, "name", type(self.estimator).__name__),
            "estimator_state": self.state,
            "rng": ckpt.capture_rng_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (hparams are copied in place)."""
        missing = set(self.hparams) ^ set(payload["hparams"])
        if missing:
            raise HyperparameterError(f"checkpoint hparams {sorted(payload['hparams'])} do not "
                                      f"match the loop's {sorted(self.hparams)}")
        with torch.no_grad():
            for k, v in payload["hparams"].items():
                if v.shape != self.hparams[k].shape:
                    raise HyperparameterError(
                        f"checkpoint hparams[{k!r}] has shape {tuple(v.shape)}, the loop's "
                        f"has {tuple(self.hparams[k].shape)}")
                self.hparams[k].copy_(v)
        self.params = self._to_setting(payload["params"]) if payload["params"] is not None \
            else None
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.state = payload["estimator_state"]
        self.global_step = int(payload["step"])
        self.history = list(payload["history"])
        ckpt.restore_rng_state(payload["rng"])
        self._checked = True

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step into the run folder (atomically).

        Raises:
            BilevelInputError: the loop has no ``run_dir``.
        """
        if self.folder is None:
            raise BilevelInputError("this loop has no run_dir to write checkpoints to")
        path = self.folder.save_checkpoint(self.global_step, self.state_dict())
        logger.debug("checkpoint of outer step %d: %s", self.global_step, path)
        self.last_checkpoint, self._saved_step = path, self.global_step
        self._emit("on_checkpoint", path)
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> int:
        """Continue from the run folder's newest good checkpoint of this run, or from the
        checkpoint file ``path``; the metrics files are cut back to that step, so no step
        is logged twice. Returns the step reached (0, and the logs emptied, when the
        folder has no checkpoint yet).

        Raises:
            BilevelInputError: the loop has no ``run_dir``.
            bilevel.run_folder.RunFolderError: ``path`` does not exist or belongs to another
                run or format.
        """
        if self.folder is None:
            raise BilevelInputError("resume() needs the loop's run_dir (and a loop that is "
                                    "not closed)")
        self._resumed = True
        if path is not None:
            payload = self.folder.load_checkpoint(path, map_location=self.device)
            file: Path | None = Path(path)
        else:
            found = self.folder.load_latest(map_location=self.device)
            if found is None:
                own = self.folder.checkpoints()
                if own:  # every checkpoint of the run is unreadable: keep its logs
                    raise RunFolderError(
                        f"{self.folder.path}: none of this run's checkpoints can be read "
                        f"({', '.join(p.name for _, p in own)}); the metrics are kept. Move "
                        "the broken files away to restart from step 0, or restore them")
                self.folder.metrics.truncate(0)
                return 0
            _, payload = found
            file = None
        self.load_state_dict(payload)
        for step, later in self.folder.checkpoints():  # going back abandons what followed
            if step > self.global_step:
                later.unlink(missing_ok=True)
        self.folder.metrics.truncate(self.global_step)
        self.last_checkpoint, self._saved_step = file, self.global_step
        return self.global_step

    load = resume


BilevelTrainer = OuterLoop

__all__ = ["BASE_COLUMNS", "BilevelTrainer", "OuterLoop", "ProblemFactory", "RUN_MODES",
           "describe", "peak_memory_mib", "summary_writer_class"]
