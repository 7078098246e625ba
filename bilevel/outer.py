"""The outer loop: step the hyperparameters with any ``torch.optim`` optimizer.

Each outer step calls a hypergradient estimator, writes ``result.grad`` into the
``.grad`` of the hyperparameter tensors, optionally clips it, steps the optimizer (and
scheduler), applies an optional constraint, and carries the inner solution (warm start)
and the estimator state to the next step::

    loop = OuterLoop(problem, {"lam": lam}, params,
                     optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
                     checkpoint_dir="ckpt", checkpoint_every=10, log_dir="logs")
    loop.resume()          # continue from the newest checkpoint, if any
    loop.run(200)          # until 200 outer steps in total
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hypergrad import Estimator, EstimatorState, HyperparameterError, Problem, make_estimator
from hypergrad.errors import BilevelInputError
from hypergrad.pytree import PyTree, tree_detach
from hypergrad.validation import check_problem

from . import checkpoint as ckpt
from .module import check_estimator

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Constraint = Callable[[dict[str, torch.Tensor]], Any] | Mapping[str, Callable[[torch.Tensor],
                                                                               torch.Tensor]]

#: columns every record has (evaluation metrics follow as ``eval_<name>``)
BASE_COLUMNS = ("step", "outer_loss", "hypergrad_norm", "inner_grad_norm", "solve_residual",
                "solve_iterations", "inner_steps", "seconds", "step_seconds", "lr",
                "peak_memory_mib")


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


TENSORBOARD_HINT = "pip install bilevel[tensorboard]"


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a clear ImportError naming the extra when
    the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "OuterLoop(tensorboard=...) needs the tensorboard package, which is not "
            f"installed: {TENSORBOARD_HINT} (or pip install tensorboard)") from exc
    return SummaryWriter


def _scalar_value(v: Any) -> float | None:
    """A record value as a number for TensorBoard (``None`` for non-numbers)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class _Progress:
    """tqdm if importable, else a line every ``every`` steps on stderr."""

    def __init__(self, total: int, initial: int, every: int = 10) -> None:
        self.every, self.total = every, total
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=initial, desc="outer", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['outer_loss']:.4g}",
                                 hg=f"{record['hypergrad_norm']:.3g}")
        elif (record["step"] + 1) % self.every == 0 or record["step"] + 1 == self.total:
            print(f"outer step {record['step'] + 1}/{self.total}  "
                  f"loss {record['outer_loss']:.6g}  |hg| {record['hypergrad_norm']:.3g}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _json_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class OuterLoop:
    """Drive the hyperparameters of a bilevel problem with a ``torch.optim`` optimizer.

    Args:
        problem: a :class:`hypergrad.Problem` (or any problem the estimator accepts).
        hparams: dict name -> floating tensor. With an ``optimizer`` instance these must be
            the very tensors it was built on; with a factory (or ``None``) fresh leaf
            copies are made (read the current values from ``loop.hparams``).
        params: inner starting point (pytree); may be ``None`` when ``reinit`` is given.
        estimator: an estimator object or registry name (``"implicit"``, ...).
        optimizer: a ``torch.optim.Optimizer`` on the hparams tensors, or a factory
            ``list[Tensor] -> Optimizer``; default Adam(lr=1e-2).
        scheduler: an LR scheduler on that optimizer, or a factory ``Optimizer -> sched``;
            stepped after every outer step (``ReduceLROnPlateau`` gets ``scheduler_metric``).
        reinit: ``step -> params``: restart the inner problem from this point at every
            outer step; ``None`` warm-starts from the previous inner solution.
        clip_norm: clip the hypergradient to this total 2-norm before the step.
        constraint: applied under ``no_grad`` after each step: a callable on the dict
            (returning a dict of new values, or ``None`` after editing in place), or a
            dict name -> ``tensor -> tensor`` (e.g. ``{"lam": lambda t: t.clamp(-5, 5)}``).
        evaluate: ``(hparams, params) -> dict`` called every ``eval_every`` steps; its
            numbers go into the record as ``eval_<name>``.
        callbacks: objects with any of ``on_step(step, record)``, ``on_eval(step,
            metrics)``, ``on_checkpoint(step, path)``; call :meth:`stop` to end ``run``.
        checkpoint_dir / checkpoint_every / keep_checkpoints: atomic checkpoints after
            every k-th step (and at the end of ``run``), keeping the newest few.
        log_dir: write ``metrics.jsonl`` and ``metrics.csv`` there.
        tensorboard: a TensorBoard log directory: every numeric metric of each record
            (the history) is written there as a scalar at its outer step, with
            ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
            ``pip install bilevel[tensorboard]``; an ImportError says so at construction).
            The writer opens at the first step and is closed when :meth:`run` returns or
            raises (and by :meth:`close`); a later step opens a new event file there.
        progress: progress bar; ``None`` shows it only when stderr is a terminal.
        device / dtype: the one device and floating dtype of hparams and params; tensors
            are moved/cast to them (hparams only when a factory builds the optimizer),
            and any tensor still differing raises an error naming it.
        check: run :func:`hypergrad.check_problem` once before the first step.
        estimator_state: initial estimator state (default empty).
    """

    def __init__(self, problem: Any, hparams: dict[str, torch.Tensor], params: PyTree = None,
                 estimator: str | Estimator = "implicit",
                 optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
                 scheduler: Any = None, *, reinit: Callable[[int], PyTree] | None = None,
                 clip_norm: float | None = None, constraint: Constraint | None = None,
                 evaluate: Callable[[dict[str, torch.Tensor], PyTree], dict] | None = None,
                 eval_every: int = 0, callbacks: Iterable[Any] = (),
                 checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int | None = 3,
                 log_dir: str | os.PathLike[str] | None = None,
                 tensorboard: str | os.PathLike[str] | None = None,
                 progress: bool | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 check: bool = True, scheduler_metric: str = "outer_loss",
                 estimator_state: EstimatorState | None = None) -> None:
        self.problem = problem
        self.estimator = check_estimator(problem, make_estimator(estimator))
        self.tensorboard = Path(tensorboard) if tensorboard is not None else None
        self._writer_cls = summary_writer_class() if tensorboard is not None else None
        self._writer: Any = None
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        if dtype is not None and not dtype.is_floating_point:
            raise BilevelInputError(f"dtype must be a floating dtype, got {dtype}")
        self.hparams, self.optimizer = self._setup_hparams(hparams, optimizer)
        self.scheduler = self._setup_scheduler(scheduler)
        self.reinit = reinit
        if params is None and reinit is None:
            raise BilevelInputError("params is None: give the inner starting point or reinit")
        self.params = self._to_setting(params) if params is not None else None
        self.clip_norm = clip_norm
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
        self.constraint = constraint
        self.evaluate = evaluate
        self.eval_every = int(eval_every)
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        self.keep_checkpoints = keep_checkpoints
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.progress = progress
        self.scheduler_metric = scheduler_metric
        self.state: EstimatorState = dict(estimator_state or {})
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._csv_columns: list[str] | None = None
        self._stop = False
        self._checked = not check
        self._check_setting()

    # ------------------------------------------------------------------ setup
    def _setup_hparams(self, hparams: Any, optimizer: Any
                       ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        if not isinstance(hparams, Mapping):
            raise HyperparameterError(
                f"hparams must be a dict name -> floating-point tensor, got "
                f"{type(hparams).__name__}")
        if not hparams:
            raise HyperparameterError("hparams is empty: give at least one tensor")
        for k, v in hparams.items():
            if not isinstance(k, str):
                raise HyperparameterError(f"hparams keys must be strings, got {k!r}")
            if not isinstance(v, torch.Tensor):
                raise HyperparameterError(f"hparams[{k!r}] must be a floating-point "
                                          f"torch.Tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise HyperparameterError(f"hparams[{k!r}] must be a floating-point tensor, "
                                          f"got dtype {v.dtype}")
        if isinstance(optimizer, torch.optim.Optimizer):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for k, v in hparams.items():
                if id(v) not in held:
                    raise HyperparameterError(
                        f"hparams[{k!r}] is not a tensor held by the optimizer; build the "
                        "optimizer on the hparams tensors or pass a factory "
                        "lambda params: torch.optim.Adam(params, ...)")
            return dict(hparams), optimizer
        leaves = {k: self._cast(v).detach().clone().requires_grad_(True)
                  for k, v in hparams.items()}
        if optimizer is None:
            opt = torch.optim.Adam(list(leaves.values()), lr=1e-2)
        elif callable(optimizer):
            opt = optimizer(list(leaves.values()))
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a "
                                "torch.optim.Optimizer")
        else:
            raise TypeError("optimizer must be a torch.optim.Optimizer or a factory "
                            f"list[Tensor] -> Optimizer, got {type(optimizer).__name__}")
        return leaves, opt

    def _setup_scheduler(self, scheduler: Any) -> Any:
        if scheduler is None:
            return None
        if hasattr(scheduler, "step") and hasattr(scheduler, "state_dict"):
            if getattr(scheduler, "optimizer", self.optimizer) is not self.optimizer:
                raise ValueError("the scheduler is attached to a different optimizer")
            return scheduler
        if callable(scheduler):
            return scheduler(self.optimizer)
        raise TypeError(f"scheduler must be an LR scheduler or a factory, got "
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

    def _start_params(self, step: int) -> PyTree:
        if self.reinit is not None:
            return self._to_setting(self.reinit(step))
        return self.params

    def step(self) -> dict[str, Any]:
        """One outer step; returns (and records) its metrics."""
        t0 = time.perf_counter()
        step = self.global_step
        hp = self.current_hparams()
        params = self._start_params(step)
        if not self._checked:
            if isinstance(self.problem, Problem):
                check_problem(self.problem, hp, params)
            self._checked = True
        result = self.estimator(self.problem, hp, params, self.state)
        for k, leaf in self.hparams.items():
            if k not in result.grad:
                raise HyperparameterError(f"the estimator returned no gradient for "
                                          f"hparams[{k!r}]")
            g = result.grad[k]
            if g.shape != leaf.shape:
                raise HyperparameterError(f"the hypergradient of hparams[{k!r}] has shape "
                                          f"{tuple(g.shape)}, expected {tuple(leaf.shape)}")
            leaf.grad = g.detach().to(dtype=leaf.dtype, device=leaf.device).clone()
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
            "inner_grad_norm": float(d.inner_grad_norm),
            "solve_residual": None if d.solve_residual is None else float(d.solve_residual),
            "solve_iterations": d.solve_iterations,
            "inner_steps": d.inner_steps,
            "seconds": float(d.seconds),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record[self.scheduler_metric])
            else:
                self.scheduler.step()
        self.global_step = step + 1
        if self.evaluate is not None and self.eval_every > 0 and \
                self.global_step % self.eval_every == 0:
            metrics = dict(self.evaluate(self.current_hparams(), self.params))
            record.update({f"eval_{k}": _json_value(v) for k, v in metrics.items()})
            self._emit("on_eval", step, metrics)
        record["step_seconds"] = time.perf_counter() - t0
        record["peak_memory_mib"] = peak_memory_mib(self.device)
        self.history.append(record)
        self._log(record)
        self._emit("on_step", step, record)
        if self.checkpoint_every > 0 and self.global_step % self.checkpoint_every == 0:
            self.save_checkpoint()
        return record

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
        continues from its step counter); returns the metrics history."""
        if self.global_step >= num_steps:
            return self.history
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        bar = _Progress(num_steps, self.global_step) if show else None
        self._stop = False
        try:
            while self.global_step < num_steps and not self._stop:
                record = self.step()
                if bar is not None:
                    bar.update(record)
        finally:
            if bar is not None:
                bar.close()
            self.close()
        if self.checkpoint_dir is not None and (
                self.last_checkpoint is None or
                self.last_checkpoint.name != ckpt.checkpoint_name(self.global_step)):
            self.save_checkpoint()
        return self.history

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    # ------------------------------------------------------------------ logging
    def close(self) -> None:
        """Flush and close the TensorBoard writer, if one is open."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def _log_tensorboard(self, record: dict[str, Any]) -> None:
        if self.tensorboard is None:
            return
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.tensorboard))
        for k, v in record.items():
            value = _scalar_value(v)
            if k != "step" and value is not None:
                self._writer.add_scalar(k, value, global_step=record["step"])
        self._writer.flush()

    def _log(self, record: dict[str, Any]) -> None:
        self._log_tensorboard(record)
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        columns = self._columns([record]) if self._csv_columns is None else self._csv_columns
        if self._csv_columns is None or any(k not in columns for k in record):
            self._rewrite_csv()
        else:
            with open(self.log_dir / "metrics.csv", "a", newline="") as f:
                csv.DictWriter(f, columns).writerow(record)

    def _columns(self, records: list[dict[str, Any]]) -> list[str]:
        cols = list(BASE_COLUMNS)
        for r in records:
            cols += [k for k in r if k not in cols]
        return cols

    def _rewrite_csv(self) -> None:
        assert self.log_dir is not None
        self._csv_columns = self._columns(self.history)
        with open(self.log_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, self._csv_columns)
            w.writeheader()
            w.writerows(self.history)

    def _rewrite_logs(self) -> None:
        """Make the log files match the (restored) history exactly."""
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "metrics.jsonl", "w") as f:
            for r in self.history:
                f.write(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n")
        self._rewrite_csv()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: hparams, params, optimizer/scheduler/estimator
        state, RNG states, step counter and history."""
        return {
            "format": ckpt.FORMAT,
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

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write a checkpoint atomically (default: ``checkpoint_dir/step-XXXXXXXX.pt``)."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("no checkpoint_dir set and no path given")
            path = self.checkpoint_dir / ckpt.checkpoint_name(self.global_step)
        path = ckpt.atomic_save(self.state_dict(), path)
        self.last_checkpoint = path
        if self.checkpoint_dir is not None and path.parent == self.checkpoint_dir:
            ckpt.prune(self.checkpoint_dir, self.keep_checkpoints)
        self._emit("on_checkpoint", self.global_step, path)
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> int:
        """Continue from a checkpoint file, or from the newest good one in
        ``checkpoint_dir`` (stale temp files are removed); returns the step reached
        (0 and nothing changed when there is no checkpoint)."""
        if path is not None and Path(path).is_file():
            file, payload = Path(path), ckpt.load(path, map_location=self.device)
        else:
            directory = Path(path) if path is not None else self.checkpoint_dir
            if directory is None:
                raise ValueError("no checkpoint_dir set and no path given")
            ckpt.remove_stale_temps(directory)
            found = ckpt.latest_checkpoint(directory, map_location=self.device)
            if found is None:
                return 0
            file, payload = found
        self.load_state_dict(payload)
        self.last_checkpoint = file
        self._rewrite_logs()
        return self.global_step

    load = resume


BilevelTrainer = OuterLoop

__all__ = ["BASE_COLUMNS", "BilevelTrainer", "OuterLoop", "peak_memory_mib",
           "summary_writer_class"]
