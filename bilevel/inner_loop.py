"""A user-written inner loop, recorded so that any estimator can replay it.

::

    with mp.inner_loop() as loop:
        for batch in loader:
            params = loop.step(batch)      # one graph-free inner step
            if stop_condition(params):     # log, evaluate, stop early, ...
                break
    result = loop.hypergradient(bilevel.Truncated(window=10))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import hypergrad as hg
from hypergrad.errors import BilevelInputError

from .batches import At, check_data
from .buffers import check_estimator
from .hparams import validate_hparams

if TYPE_CHECKING:
    from .module import ModuleProblem

Params = dict[str, torch.Tensor]


class InnerLoopError(BilevelInputError):
    """A recorded user-written inner loop (:meth:`ModuleProblem.inner_loop`) was misused."""


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
        self.hparams = mp.hparams if hparams is None else validate_hparams(hparams)
        self._frozen = {k: v.detach().clone() for k, v in self.hparams.items()}
        self.start, self.state = mp.init(params)
        self.params = self.start
        self.start = {k: v.clone() for k, v in self.start.items()}
        self.batches: list[Any] = []
        self.closed = False
        self._versions = self._version_of(self.params)

        def step_batch(t: int) -> At:
            return At(self.batches[t], t)

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
        """One inner step on ``batch`` (recorded); returns the new parameters (a dict
        keyed by parameter name, detached).

        Raises:
            InnerLoopError: the loop has ended, the hyperparameters changed since it
                started, or the parameters it returned were modified in place.
        """
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
        """The core problem that replays the recorded steps (``steps`` = their number).

        Raises:
            InnerLoopError: no step was recorded.
        """
        if not self.batches:
            raise InnerLoopError("the inner loop has no recorded step: call loop.step(batch) "
                                 "at least once before asking for a hypergradient")
        return dataclasses.replace(self._problem, steps=len(self.batches))

    def hypergradient(self, estimator: str | hg.Estimator = "unrolled",
                      outer_data: Any = None, state: hg.EstimatorState | None = None,
                      check: bool = True) -> hg.Hypergradient:
        """Differentiate the recorded loop with any estimator, from the recorded start.

        ``outer_data`` (a batch or an iterable of batches, as in :func:`bilevel.wrap`)
        replaces the problem's outer data. ``state`` is a previous result's state; its
        ``inner_state`` (a warm-started inner optimizer) is dropped so that the replay
        starts as the loop did. ``result.params`` equals ``loop.params``.

        Returns:
            :class:`hypergrad.Hypergradient` (``grad`` a dict matching ``hparams``).

        Raises:
            InnerLoopError: no recorded step, or hyperparameters/parameters changed.
            BufferPolicyError: ``buffers="track"`` with an estimator other than
                Unrolled/Truncated.
            BilevelInputError: bad inputs, as :func:`hypergrad.hypergradient`.
            DivergenceError, NonFiniteError, LinearSolveError, SecondOrderError: raised by
                the estimator, as :func:`hypergrad.hypergradient`.
        """
        problem = self.problem()
        self._check_unchanged()
        if outer_data is not None:
            check_data(outer_data, "outer_data")
            ob, osb = self.mp._outer_source(outer_data)
            problem = dataclasses.replace(problem, outer_batch=ob, outer_step_batch=osb)
        estimator = check_estimator(problem, estimator)
        state = {k: v for k, v in (state or {}).items() if k != "inner_state"}
        return hg.hypergradient(problem, self.hparams, self.start, estimator, state=state,
                                check=check)


__all__ = ["InnerLoop", "InnerLoopError"]
