"""Where the outer loop's per-step records go: metrics files, TensorBoard, a progress bar.

A sink has ``write(record)`` (one dict per outer step: numbers, ``None``, strings) and
``close()``. :class:`~bilevel.outer.OuterLoop` builds the sinks its options ask for
(``run_dir`` → :class:`MetricsFiles`, ``tensorboard=`` → :class:`TensorBoard`,
``progress=`` → :class:`Progress`) and accepts more through ``sinks=``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

#: columns every outer-loop record has, in this order (evaluation metrics follow)
BASE_COLUMNS = ("step", "outer_loss", "hypergrad_norm", "inner_grad_norm", "solve_residual",
                "solve_iterations", "inner_steps", "seconds", "step_seconds", "lr",
                "peak_memory_mib")

TENSORBOARD_HINT = "pip install bilevel[tensorboard]"

logger = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """Receives one record per outer step."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def json_value(v: Any) -> Any:
    """A record value as JSON can hold it: one-element tensors as numbers, non-finite
    floats as strings (``"nan"``, ``"inf"``)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def scalar_value(v: Any) -> float | None:
    """A record value as a number for plotting (``None`` for non-numbers)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class MetricsFiles:
    """``metrics.jsonl`` and ``metrics.csv`` of a run folder, written as the run goes (see
    :class:`bilevel.run_folder.MetricsLog`)."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def write(self, record: Mapping[str, Any]) -> None:
        self.log.append({k: json_value(v) for k, v in record.items()})

    def close(self) -> None:
        pass


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; an ImportError naming the extra when the
    ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "tensorboard=... needs the tensorboard package, which is not installed: "
            f"{TENSORBOARD_HINT} (or pip install tensorboard)") from exc
    return SummaryWriter


class TensorBoard:
    """Every numeric value of each record as a scalar at its outer step. The event file is
    opened at the first record and closed by :meth:`close` (a later record opens a new
    one in the same directory)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._cls = summary_writer_class()  # fail at construction, not at step 1
        self._writer: Any = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._cls(log_dir=str(self.log_dir))
        for k, v in record.items():
            value = scalar_value(v)
            if k != "step" and value is not None:
                self._writer.add_scalar(k, value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


class Progress:
    """A tqdm bar (without tqdm, a line every ``every`` steps: an INFO message of the
    ``bilevel.sinks`` logger where logging shows those, as after
    :func:`bilevel.set_verbosity`, else written to stderr as the bar would be) showing the
    record values named in ``fields`` (label -> record key; the last value seen is kept
    for keys that only some records have, such as evaluations). ``bilevel -q`` (a library
    log level above INFO) hides the bar that :class:`~bilevel.OuterLoop` shows by default
    on a terminal."""

    def __init__(self, total: int, initial: int = 0, desc: str = "outer",
                 fields: Mapping[str, str] | None = None, every: int = 10) -> None:
        self.total, self.every, self.done = total, every, initial
        self.fields = dict(fields or {"loss": "outer_loss", "hg": "hypergrad_norm"})
        self._last: dict[str, str] = {}
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def write(self, record: Mapping[str, Any]) -> None:
        self.done += 1
        for label, key in self.fields.items():
            value = scalar_value(record.get(key))
            if value is not None:
                self._last[label] = f"{value:.4g}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self._last)
        elif self.done % self.every == 0 or self.done == self.total:
            shown = "  ".join(f"{k} {v}" for k, v in self._last.items())
            if _logged(logger, logging.INFO):
                logger.info("outer step %d/%d  %s", self.done, self.total, shown)
            else:  # asked for progress, logging not configured: as the bar, on stderr
                print(f"outer step {self.done}/{self.total}  {shown}", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _logged(logger: logging.Logger, level: int) -> bool:
    """Whether a message of ``level`` reaches a handler that writes it somewhere (not only
    the library's ``NullHandler``)."""
    if not logger.isEnabledFor(level):
        return False
    node: logging.Logger | None = logger
    while node is not None:
        if any(h.level <= level and not isinstance(h, logging.NullHandler)
               for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def csv_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """:data:`BASE_COLUMNS`, then the other keys in order of first appearance."""
    cols = list(BASE_COLUMNS)
    for r in records:
        cols += [k for k in r if k not in cols]
    return cols


__all__ = ["BASE_COLUMNS", "MetricsFiles", "Progress", "Sink", "TensorBoard", "csv_columns",
           "json_value", "scalar_value", "summary_writer_class"]
