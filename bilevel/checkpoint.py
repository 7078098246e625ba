"""Atomic file writes, and the random-number state a checkpoint carries.

Every result and checkpoint file is written to a temporary file in the same directory,
flushed and fsynced, then moved into place with :func:`os.replace`, so a crash mid-write
leaves the previous file untouched (at worst a stale ``.NAME.XXXXXXXX.tmp``, which
:func:`remove_stale_temps` clears for checkpoint files, whose names start with
``step-``). Files get the permissions of any new file,
``0o666 & ~umask``. Where checkpoints live and how they are named, loaded and pruned is
:mod:`bilevel.run_folder`'s business.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

#: the prefix of the temp files of interrupted checkpoint writes (``.step-….tmp``)
_TMP_PREFIX = ".step-"


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, and CUDA when initialised), ``random`` and numpy.

    Returns:
        A dict with keys ``"torch"`` (a uint8 tensor), ``"python"``, and where present
        ``"cuda"`` (a list, one state per device) and ``"numpy"``; picklable with
        ``torch.save``.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    else:
        state["numpy"] = np.random.get_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (missing entries are skipped; a
    CUDA state is skipped without CUDA).

    Raises:
        RuntimeError, TypeError, ValueError: an entry of the wrong form (from torch,
            ``random`` or numpy).
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        np.random.set_state(state["numpy"])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover - set and restored at once
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically: ``write(f)`` into a temp file ``.NAME.XXXXXXXX.tmp`` in the
    same directory, flush, fsync, ``os.replace`` onto ``path``, fsync the directory.

    The file gets ``0o666 & ~umask`` like any new file (``mkstemp`` alone would make it
    ``0o600``). If anything fails before the replace, the temp file is removed and the
    previous file at ``path`` (if any) is left as it was.

    Args:
        path: the file to write; its parent folders are created.
        write: called with the temp file opened in binary mode.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder or file cannot be written; anything ``write`` raises is
            re-raised after the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`); returns the
    path.

    Raises:
        OSError: ``path`` cannot be written; pickling errors of ``torch.save``.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files left in ``directory`` by interrupted checkpoint writes
    (``.step-….tmp``; temp files of other names are left); return what was removed
    (``[]`` when ``directory`` does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


__all__ = ["atomic_save", "atomic_write", "capture_rng_state", "current_umask",
           "remove_stale_temps", "restore_rng_state"]
