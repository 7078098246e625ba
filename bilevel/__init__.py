"""bilevel: the user-facing layer over :mod:`hypergrad` (modules, outer loop, CLI).

The layer is being built; for now it re-exports the core so that ``import bilevel``
gives the same estimators and problem description.
"""

from hypergrad import *  # noqa: F401,F403
from hypergrad import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)
