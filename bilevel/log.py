"""Library messages and warnings: the ``bilevel``/``hypergrad`` loggers and their switch.

Library code logs through ``logging.getLogger(__name__)`` (loggers ``bilevel.*`` and
``hypergrad.*``); both roots hold a :class:`logging.NullHandler`, so nothing is written
unless the application configures logging, or calls :func:`set_verbosity` (as the
``bilevel`` command does: INFO by default, ``-q`` warnings and errors, ``-v`` debug)::

    import bilevel, logging
    bilevel.set_verbosity(logging.INFO)     # progress lines and warning summaries on stderr

Warnings: :class:`~bilevel.OuterLoop` shows each kind of library warning once per run and
counts the rest (see :data:`WARNING_MODES`); ``OuterLoop(..., warnings="all")``, the
environment variable ``BILEVEL_WARNINGS=all`` or :func:`every_warning` show every one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from hypergrad.errors import BilevelInputError, register_library_path

#: the library's root loggers (``set_verbosity`` sets both)
LIBRARY_LOGGERS = ("bilevel", "hypergrad")
#: ``"once"``: an outer loop shows the first warning of each kind and counts the repeats;
#: ``"all"``: it shows every warning (and still counts them)
WARNING_MODES = ("once", "all")
#: environment variable giving the default warning mode of outer loops
WARNINGS_ENV = "BILEVEL_WARNINGS"
_LEVEL_NAMES = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                "error": logging.ERROR, "critical": logging.CRITICAL}

logging.getLogger("bilevel").addHandler(logging.NullHandler())
register_library_path(Path(__file__).resolve().parent)  # warnings point past bilevel's frames

_MODE: ContextVar[str | None] = ContextVar("bilevel_warning_mode", default=None)


class _Stderr(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (replaced by test harnesses)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _Compact(logging.Formatter):
    """``bilevel: message`` at INFO; ``bilevel: warning: message`` above; the full logger
    name and level at DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO:
            return f"{record.name.split('.')[0]}: {text}"
        if record.levelno < logging.INFO:
            return f"{record.name}: {record.levelname.lower()}: {text}"
        return f"{record.name.split('.')[0]}: {record.levelname.lower()}: {text}"


def _level(level: int | str) -> int:
    if isinstance(level, str) and level.lower() in _LEVEL_NAMES:
        return _LEVEL_NAMES[level.lower()]
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    raise BilevelInputError(f"level must be a logging level (logging.INFO, ...) or one of "
                            f"{', '.join(_LEVEL_NAMES)}, got {level!r}")


def set_verbosity(level: int | str = logging.INFO) -> None:
    """Show the library's messages of ``level`` and above on stderr, compactly
    (``bilevel: outer step 10/30 ...``): one handler on the ``bilevel`` and ``hypergrad``
    loggers, replaced by a later call. Messages still propagate to the root logger (so
    an application's own logging configuration and pytest's ``caplog`` see them).

    Args:
        level: a :mod:`logging` level (``logging.DEBUG``, ``logging.INFO``, ...) or its name
            (``"debug"``, ``"info"``, ``"warning"``, ``"error"``).

    Raises:
        BilevelInputError: ``level`` is neither.
    """
    level = _level(level)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
            logger.removeHandler(handler)
        handler = _Stderr()
        handler.setFormatter(_Compact())
        handler.setLevel(level)
        logger.addHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def verbosity(level: int | str = logging.INFO) -> Iterator[None]:
    """:func:`set_verbosity` for the block only: the loggers' handlers and levels are
    restored after it (the ``bilevel`` command's :func:`~bilevel.cli.main` runs in one).

    Raises:
        BilevelInputError: ``level`` is not a logging level or its name.
    """
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger.level, list(logger.handlers)) for logger in loggers]
    set_verbosity(level)
    try:
        yield
    finally:
        for logger, (old_level, handlers) in zip(loggers, saved, strict=True):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(old_level)


def verbosity_level(verbose: int = 0, quiet: int = 0) -> int:
    """The logging level of the command line's ``-v``/``-q`` counts: INFO by default,
    WARNING with ``-q``, ERROR with ``-qq``, DEBUG with ``-v``."""
    steps = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]
    return steps[max(0, min(len(steps) - 1, 1 - verbose + quiet))]


def warning_mode(mode: str | None = None) -> str:
    """The warning mode an outer loop uses: ``mode`` if given, else that of an enclosing
    :func:`every_warning` block, else the environment variable ``BILEVEL_WARNINGS``, else
    ``"once"``.

    Raises:
        BilevelInputError: ``mode`` (or the environment variable) is not in
            :data:`WARNING_MODES`.
    """
    if mode is None:
        mode = _MODE.get()
    where = "warnings"
    if mode is None:
        mode, where = os.environ.get(WARNINGS_ENV) or "once", f"${WARNINGS_ENV}"
    if mode not in WARNING_MODES:
        raise BilevelInputError(f"{where} must be one of {', '.join(map(repr, WARNING_MODES))}, "
                                f"got {mode!r}")
    return mode


@contextlib.contextmanager
def every_warning() -> Iterator[None]:
    """Within the block, outer loops built without an explicit ``warnings=`` show every
    library warning instead of the first of each kind (e.g. for a caller that counts them
    itself, such as ``bilevel tune``)."""
    token = _MODE.set("all")
    try:
        yield
    finally:
        _MODE.reset(token)


__all__ = ["LIBRARY_LOGGERS", "WARNINGS_ENV", "WARNING_MODES", "every_warning",
           "set_verbosity", "verbosity", "verbosity_level", "warning_mode"]
