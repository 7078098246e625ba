"""Pruning Optuna trials on the outer curve.

:class:`OptunaPruning` is an outer-loop callback: it reports one record key (``monitor``)
to the trial every ``every``-th time it appears, asks the study's pruner, and when told
to prune it saves a checkpoint and stops the loop after the current step, so the trial's
run folder keeps its checkpoint and logs and can be resumed. :func:`run_trial` runs the
loop and turns a pruned run, and a run whose hypergradient blew up (``NonFiniteError``,
``DivergenceError``), into :class:`optuna.TrialPruned`: the study goes on::

    def objective(trial):
        lr = trial.suggest_float("outer_lr", 1e-3, 1.0, log=True)
        pruning = OptunaPruning(trial, monitor="eval_loss", max_hypergrad_norm=1e3)
        loop = OuterLoop(problem, hparams, params,
                         optimizer=lambda hp: torch.optim.Adam(hp, lr=lr),
                         evaluate=evaluate, eval_every=5, callbacks=[pruning],
                         run_dir=f"runs/trial-{trial.number}")
        run_trial(loop, 200, pruning)   # raises optuna.TrialPruned when pruned
        return loop.history[-1]["eval_loss"]

Any Optuna pruner works (median, percentile, successive halving, Hyperband, threshold,
patient, Wilcoxon): the pruner decides, the callback only reports. ``Trial.report`` is
single-objective only, so in multi-objective studies the curve is kept as a user
attribute and the pruner is never asked.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from hypergrad.errors import BilevelInputError, NonFiniteError

from ..callbacks import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..outer import OuterLoop

#: the study directions a monitored metric may follow
DIRECTIONS = ("minimize", "maximize")
#: how records hold non-finite numbers (see :func:`bilevel.sinks.json_value`)
_NON_FINITE = ("nan", "inf", "-inf")


@dataclass(frozen=True)
class Pruned:
    """Where and why a trial was pruned: ``step`` is ``loop.global_step`` (outer steps
    taken) when it was decided; ``message`` is also the trial's ``prune_reason``."""

    step: int
    message: str


def _direction_name(direction: Any) -> str:
    return direction.name.lower() if isinstance(direction, optuna.study.StudyDirection) \
        else direction


class OptunaPruning(Callback):
    """Report the outer curve to an Optuna trial and stop the loop when it should be pruned.

    After every outer step (``on_step``, whose record also holds the step's evaluation
    metrics as ``eval_<name>``), a record holding ``monitor`` gives one value; every
    ``every``-th value is reported: ``trial.report(value, step=loop.global_step)`` (the
    outer steps taken so far), then ``trial.should_prune()``. Each reported value is also
    appended to the trial's user attribute ``curve_<monitor>`` as ``[step, value]``. Use
    one callback per trial.

    The run is pruned, whatever ``every`` is, when:

    - the pruner says so (single-objective studies only);
    - the monitored value is NaN or inf: it is *not* reported (pruners treat NaN
      differently, and Optuna would keep it as the trial's intermediate value); the
      trial keeps the value of its last report, as Optuna does for pruned trials;
    - the record's ``hypergrad_norm`` is NaN or inf, or exceeds ``max_hypergrad_norm``.

    Pruning sets the trial's user attributes ``prune_reason`` (a message giving the step
    and the value) and ``pruned_step``, saves a checkpoint when the loop has a run folder
    (its logs already hold the step), and calls ``loop.stop()``: ``loop.run`` returns
    after the current step, and :meth:`raise_if_pruned` (or :func:`run_trial`) raises
    :class:`optuna.TrialPruned`. Records after pruning are ignored.

    Multi-objective studies (``len(trial.study.directions) > 1``): ``Trial.report`` and
    ``Trial.should_prune`` are single-objective only, so the curve is only kept in the
    user attribute and the pruner never prunes; a non-finite value or hypergradient
    still prunes.

    Args:
        trial: an :class:`optuna.trial.Trial` (or any object with ``report``,
            ``should_prune`` and ``set_user_attr``, such as ``FixedTrial`` and
            ``FrozenTrial``, whose ``should_prune`` is always False).
        monitor: the record key reported: ``"eval_<name>"`` for an evaluation metric
            (the loop needs ``evaluate`` and ``eval_every > 0``), or any per-step key
            (``"outer_loss"``, ``"hypergrad_norm"``, a ``metrics`` key, ...). A key
            missing from the records is an error at the first step (or evaluation).
        every: report every ``every``-th value of ``monitor`` (counted over the loop's
            history, so a resumed loop keeps the cadence).
        direction: ``"minimize"`` or ``"maximize"``, the direction in which ``monitor``
            improves; ``None`` takes the study's. Pruners compare reported values in the
            study's direction, so a different one is refused: monitor a metric that
            follows the study's direction (a loss for a minimizing study).
        max_hypergrad_norm: prune when the step's hypergradient norm exceeds it.

    Raises:
        BilevelInputError: a bad argument, at construction; a ``monitor`` the loop never
            records, or whose value is not a number, at the step that shows it.
    """

    def __init__(self, trial: Any, monitor: str = "eval_loss", every: int = 1,
                 direction: str | None = None, *,
                 max_hypergrad_norm: float | None = None) -> None:
        missing = [m for m in ("report", "should_prune", "set_user_attr")
                   if not callable(getattr(trial, m, None))]
        if missing:
            raise BilevelInputError(
                f"trial must be an optuna Trial (with report, should_prune and "
                f"set_user_attr), got {type(trial).__name__} without {', '.join(missing)}")
        if not isinstance(monitor, str) or not monitor:
            raise BilevelInputError(f"monitor must be a record key (a non-empty str) such as "
                                    f"'eval_loss' or 'outer_loss', got {monitor!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise BilevelInputError(f"every must be an int >= 1, got {every!r}")
        if max_hypergrad_norm is not None and not (
                isinstance(max_hypergrad_norm, numbers.Real)
                and not isinstance(max_hypergrad_norm, bool)
                and math.isfinite(max_hypergrad_norm) and max_hypergrad_norm > 0):
            raise BilevelInputError(f"max_hypergrad_norm must be a positive number or None, "
                                    f"got {max_hypergrad_norm!r}")
        directions = getattr(getattr(trial, "study", None), "directions", None)
        self.multi_objective = directions is not None and len(directions) > 1
        if direction is not None:
            if _direction_name(direction) not in DIRECTIONS:
                raise BilevelInputError(f"direction must be one of {DIRECTIONS} or None, got "
                                        f"{direction!r}")
            if directions is not None and not self.multi_objective and \
                    _direction_name(direction) != _direction_name(directions[0]):
                raise BilevelInputError(
                    f"direction={_direction_name(direction)!r} but the study is to "
                    f"{_direction_name(directions[0])}: pruners compare the reported values "
                    f"in the study's direction, so monitor a metric that follows it (not "
                    f"{monitor!r})")
        self.trial = trial
        self.monitor = monitor
        self.every = int(every)
        self.max_hypergrad_norm = max_hypergrad_norm
        #: ``[step, value]`` of every report, as in the ``curve_<monitor>`` user attribute
        self.curve: list[list[float]] = []
        #: set when the run is pruned
        self.pruned: Pruned | None = None
        self._count: int | None = None

    @property
    def curve_key(self) -> str:
        """The user attribute holding the curve."""
        return f"curve_{self.monitor}"

    # ------------------------------------------------------------------ the hook
    def on_step(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        """Check the hypergradient, then count, report and ask the pruner."""
        if self.pruned is not None:
            return
        self._check_monitor(loop, record)
        step = loop.global_step
        norm = record.get("hypergrad_norm")
        if norm is not None and (not math.isfinite(norm) or (
                self.max_hypergrad_norm is not None and norm > self.max_hypergrad_norm)):
            limit = "" if not math.isfinite(norm) else \
                f" > max_hypergrad_norm={self.max_hypergrad_norm:g}"
            self.prune(loop, f"hypergrad_norm={norm:.6g}{limit}")
            return
        value = self._value(record.get(self.monitor))
        if value is None:
            return
        if not math.isfinite(value):
            self.prune(loop, f"{self.monitor}={value} (not reported)")
            return
        if self._count is None:
            self._replay(loop.history[:-1])
        self._count += 1
        if self._count % self.every:
            return
        self._report(step, value)
        if self.multi_objective:
            return
        if self.trial.should_prune():
            pruner = getattr(getattr(self.trial, "study", None), "pruner", None)
            by = f" ({type(pruner).__name__})" if pruner is not None else ""
            self.prune(loop, f"{self.monitor}={value:.6g}{by}")

    def _report(self, step: int, value: float) -> None:
        self.curve.append([step, value])
        self.trial.set_user_attr(self.curve_key, [list(p) for p in self.curve])
        if not self.multi_objective:
            self.trial.report(value, step=step)

    def _replay(self, earlier: list[dict[str, Any]]) -> None:
        """A resumed loop (e.g. the re-run of a trial whose worker died) keeps the cadence
        and reports the values its checkpoint already holds to this trial, so the pruner
        and the ``curve_<monitor>`` attribute see the whole curve."""
        self._count = 0
        for record in earlier:
            value = self._value(record.get(self.monitor))
            if value is None:
                continue
            self._count += 1
            if self._count % self.every == 0 and math.isfinite(value):
                self._report(int(record["step"]) + 1, value)

    def _value(self, value: Any) -> float | None:
        """The monitored value as a float (the records hold evaluation and ``metrics``
        values that are NaN or inf as the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        if value is None:
            return None
        if isinstance(value, str) and value in _NON_FINITE:
            return float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BilevelInputError(f"monitor={self.monitor!r} must be a number in the "
                                    f"records, got {type(value).__name__} {value!r}")
        return float(value)

    def _check_monitor(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        """A monitor the loop never records would silently disable pruning."""
        if self.monitor in record:
            return
        if self.monitor.startswith("eval_"):
            if loop.evaluate is None or not loop.eval_every:
                raise BilevelInputError(
                    f"monitor={self.monitor!r} is an evaluation metric but the loop never "
                    "evaluates: build it with evaluate=(hparams, params) -> dict and "
                    "eval_every > 0")
            evals = sorted(k for k in record if k.startswith("eval_"))
            if evals:
                raise BilevelInputError(f"monitor={self.monitor!r} is not among the loop's "
                                        f"evaluation metrics {evals}")
            return
        raise BilevelInputError(f"monitor={self.monitor!r} is not in the loop's records, "
                                f"which hold {sorted(record)}")

    # ------------------------------------------------------------------ pruning
    def prune(self, loop: OuterLoop, why: str) -> None:
        """Mark the run pruned at ``loop.global_step`` for reason ``why``: set the trial's
        ``prune_reason`` and ``pruned_step``, save a checkpoint if the loop has a run
        folder, and stop the loop after the current step."""
        step = loop.global_step
        self.pruned = Pruned(step, f"trial pruned at step {step}: {why}")
        self.trial.set_user_attr("prune_reason", self.pruned.message)
        self.trial.set_user_attr("pruned_step", step)
        if loop.folder is not None:
            loop.save_checkpoint()
        loop.stop()

    def raise_if_pruned(self) -> None:
        """Raise :class:`optuna.TrialPruned` (with the step and value) if the run was
        pruned; call it after ``loop.run`` returns."""
        if self.pruned is not None:
            raise optuna.TrialPruned(self.pruned.message)


def _find_pruning(loop: OuterLoop, pruning: OptunaPruning | None) -> OptunaPruning:
    if pruning is not None:
        if not isinstance(pruning, OptunaPruning):
            raise BilevelInputError(f"pruning must be an OptunaPruning, got "
                                    f"{type(pruning).__name__}")
        if not any(cb is pruning for cb in loop.callbacks):
            raise BilevelInputError("pruning is not among the loop's callbacks: build the "
                                    "loop with callbacks=[pruning]")
        return pruning
    found = [cb for cb in loop.callbacks if isinstance(cb, OptunaPruning)]
    if len(found) != 1:
        raise BilevelInputError(
            f"the loop has {len(found)} OptunaPruning callbacks: pass run_trial the one "
            "reporting to this trial" if found else
            "run_trial needs the loop built with callbacks=[OptunaPruning(trial, ...)]")
    return found[0]


def run_trial(loop: OuterLoop, num_steps: int,
              pruning: OptunaPruning | None = None) -> list[dict[str, Any]]:
    """Run ``loop`` to ``num_steps`` outer steps for an Optuna trial; returns its history.

    A run that ``pruning`` stopped, or that raised :class:`hypergrad.NonFiniteError`
    (NaN or inf in the hypergradient, including :class:`hypergrad.DivergenceError` and
    :class:`hypergrad.LinearSolveError`), ends in :class:`optuna.TrialPruned`, so the
    study goes on and records the trial as pruned. Before raising, the trial gets
    ``prune_reason`` (the error's type and message) and ``pruned_step``, a checkpoint of
    the last completed step is saved when the loop has a run folder, and the loop is
    closed (its folder released; ``loop.hparams`` and ``loop.history`` stay readable).
    Any other exception closes the loop and propagates (Optuna marks the trial failed).
    A run that completes leaves the loop open.

    Args:
        loop: an :class:`~bilevel.outer.OuterLoop` whose callbacks hold ``pruning``.
        num_steps: run until this many outer steps in total.
        pruning: its :class:`OptunaPruning` callback (``None``: the loop's only one).

    Raises:
        optuna.TrialPruned: the run was pruned or its hypergradient was not finite.
        BilevelInputError: the loop has no such callback (before any step).
    """
    pruning = _find_pruning(loop, pruning)
    try:
        history = loop.run(num_steps)
    except NonFiniteError as exc:
        try:
            pruning.prune(loop, f"{type(exc).__name__}: {exc}")
        finally:
            loop.close()
        raise optuna.TrialPruned(pruning.pruned.message) from exc
    except BaseException:
        loop.close()
        raise
    if pruning.pruned is not None:
        loop.close()
        pruning.raise_if_pruned()
    return history


__all__ = ["OptunaPruning", "Pruned", "run_trial"]
