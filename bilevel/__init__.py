"""bilevel: the user-facing layer over :mod:`hypergrad`.

It re-exports the core, and adds :func:`wrap` / :class:`ModuleProblem` (an ordinary
``nn.Module`` and losses on its outputs turned into a core problem through
``torch.func.functional_call``, with a buffer/BatchNorm policy and a user-written-loop
path) and the outer loop (:class:`OuterLoop`: any ``torch.optim`` optimizer on the
hyperparameters, metrics, logs, callbacks, and a locked :class:`RunFolder` with atomic
checkpoints and resume). Applications (``bilevel.distill``, ``bilevel.meta``,
``bilevel.cleaning``), the Optuna integration (``bilevel.tune``) and the CLI sit on top.
"""

from hypergrad import *  # noqa: F401,F403
from hypergrad import __all__ as _core_all

from . import checkpoint
from .callbacks import Callback
from .hparams import validate_hparams
from .log import every_warning, set_verbosity
from .module import (
    BufferPolicyError,
    InnerLoop,
    InnerLoopError,
    ModuleProblem,
    assign_grads,
    wrap,
)
from .outer import BilevelTrainer, OuterLoop, peak_memory_mib
from .run_folder import ConfigMismatchError, RunFolder, RunFolderError, RunLockedError

__version__ = "0.1.0"
__all__ = list(_core_all) + ["BilevelTrainer", "BufferPolicyError", "Callback",
                             "ConfigMismatchError", "InnerLoop", "InnerLoopError",
                             "ModuleProblem", "OuterLoop", "RunFolder", "RunFolderError",
                             "RunLockedError", "assign_grads", "checkpoint", "every_warning",
                             "peak_memory_mib", "set_verbosity", "validate_hparams", "wrap"]
