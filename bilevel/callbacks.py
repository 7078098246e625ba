"""The hooks of the outer loop.

A callback is any object with some of these methods; :class:`Callback` is a base class
with all of them doing nothing. Each receives the :class:`~bilevel.outer.OuterLoop`
(read ``loop.global_step``, ``loop.hparams``, ``loop.history``; call ``loop.stop()`` to
end :meth:`~bilevel.outer.OuterLoop.run` after the current step)::

    class StopWhenFlat(bilevel.Callback):
        def on_step(self, loop, record):
            if record["hypergrad_norm"] < 1e-6:
                loop.stop()
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .outer import OuterLoop

#: the hooks an outer loop calls, in the order they happen within a step
HOOKS = ("on_eval", "on_step", "on_checkpoint", "on_end")


class Callback:
    """Outer-loop hooks (override any):

    - ``on_eval(loop, record)``: after an evaluation; ``record`` holds the step's metrics
      with the evaluation's as ``eval_<name>``;
    - ``on_step(loop, record)``: after every outer step, once its record is logged;
    - ``on_checkpoint(loop, path)``: after a checkpoint file is written;
    - ``on_end(loop)``: when :meth:`~bilevel.outer.OuterLoop.run` returns (also after
      ``loop.stop()``), not when it raises.
    """

    def on_eval(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        """After an evaluation."""

    def on_step(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        """After every outer step."""

    def on_checkpoint(self, loop: OuterLoop, path: Path) -> None:
        """After a checkpoint is written."""

    def on_end(self, loop: OuterLoop) -> None:
        """When ``run`` returns."""


def check_callback(cb: Any) -> None:
    """A callback must have at least one hook, each callable.

    Raises:
        TypeError: an object without hooks, or a hook that is not callable.
    """
    hooks = [h for h in HOOKS if hasattr(cb, h)]
    if not hooks:
        raise TypeError(f"callbacks: {type(cb).__name__} has none of the hooks {HOOKS} "
                        "(see bilevel.Callback)")
    for h in hooks:
        if not callable(getattr(cb, h)):
            raise TypeError(f"callbacks: {type(cb).__name__}.{h} is not callable")


__all__ = ["HOOKS", "Callback", "check_callback"]
