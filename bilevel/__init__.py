"""bilevel: the user-facing layer over :mod:`hypergrad`.

It re-exports the core, and adds the outer loop (:class:`OuterLoop`: any
``torch.optim`` optimizer on the hyperparameters, metrics, logs, callbacks, atomic
checkpoints and resume). Wrapping ``nn.Module`` training loops and the CLI follow.
"""

from hypergrad import *  # noqa: F401,F403
from hypergrad import __all__ as _core_all

from . import checkpoint
from .outer import BilevelTrainer, OuterLoop, peak_memory_mib

__version__ = "0.1.0"
__all__ = list(_core_all) + ["BilevelTrainer", "OuterLoop", "checkpoint", "peak_memory_mib"]
