"""A small on-disk cache of results that are expensive and identical between runs.

The protocol's full-data reference (one network trained on the whole training set) costs
about 100 s on Fashion-MNIST with one CPU thread and does not depend on the distilled set:
:func:`~bilevel.distill.protocol` stores it here, keyed by everything it depends on (the
data's content, the network, the recipe, the seed, dtype and device, the torch version).

Location: ``$BILEVEL_CACHE`` if set, else ``$XDG_CACHE_HOME/bilevel``, else
``~/.cache/bilevel``. Entries are small JSON files written atomically; one that cannot be
read or does not match its key is ignored with a warning (and replaced by the caller).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt

#: layout of an entry; a change makes older entries misses
FORMAT = 1


def cache_dir() -> Path:
    """The cache folder: ``$BILEVEL_CACHE``, else ``$XDG_CACHE_HOME/bilevel``, else
    ``~/.cache/bilevel`` (not created here)."""
    own = os.environ.get("BILEVEL_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bilevel"


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A hex digest of the shapes, dtypes and bytes of ``tensors`` (BLAKE2b; about 0.2 s
    for Fashion-MNIST's 60 000 training images)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ResultCache:
    """JSON results in ``folder/<section>/<digest>.json``, one file per key.

    ``key`` is a JSON-able dict naming everything the result depends on; it is stored
    beside the value and compared on reading, so a hash collision or an entry written by
    another version is a miss rather than a wrong answer.
    """

    def __init__(self, section: str, folder: str | Path | None = None) -> None:
        self.folder = (Path(folder) if folder is not None else cache_dir()) / section

    def path(self, key: dict[str, Any]) -> Path:
        """The file that holds (or would hold) the entry of ``key``."""
        return self.folder / f"{_digest(key)}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored value of ``key``, or ``None`` when absent. An unreadable, corrupt or
        mismatched entry is reported by a ``UserWarning`` and treated as absent."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            ok = (isinstance(entry, dict) and entry.get("format") == FORMAT
                  and entry.get("key") == json.loads(json.dumps(key, default=str))
                  and isinstance(entry.get("value"), dict))
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring the unreadable cache entry {path} ({exc}); it will be "
                          "recomputed", UserWarning, stacklevel=2)
            return None
        if not ok:
            warnings.warn(f"ignoring the cache entry {path}: it does not hold this key's "
                          "result (corrupt or from another version); it will be recomputed",
                          UserWarning, stacklevel=2)
            return None
        return entry["value"]

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> Path | None:
        """Store ``value`` (a JSON-able dict) under ``key`` atomically; returns the file, or
        ``None`` (with a warning) when the cache folder cannot be written."""
        text = json.dumps({"format": FORMAT, "key": key, "value": value}, indent=1,
                          default=str)
        try:
            return ckpt.atomic_write(self.path(key), lambda f: f.write(text.encode()))
        except OSError as exc:
            warnings.warn(f"could not write the cache entry {self.path(key)} ({exc}); "
                          "the result is not cached", UserWarning, stacklevel=2)
            return None


def valid_accuracy(value: Any) -> bool:
    """Whether ``value`` is a finite number in ``[0, 1]`` (a cached accuracy)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and 0.0 <= value <= 1.0


__all__ = ["FORMAT", "ResultCache", "cache_dir", "tensor_fingerprint", "valid_accuracy"]
