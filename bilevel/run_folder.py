"""One run folder: its lock, the run's identity, its checkpoints and its metrics.

Every entry point (the outer loop, distillation, the CLI) writes a run into a folder::

    DIR/.lock                        flock held while a process writes the folder
    DIR/run.json                     format, run id, kind, config, fingerprint, created, version
    DIR/checkpoints/step-XXXXXXXX-RRRRRRRR.pt    this run's checkpoints (R: the run id)
    DIR/metrics.jsonl, metrics.csv   one row per step, every step exactly once
    DIR/...                          the entry point's outputs (hparams.pt, summary.json, ...)

:class:`RunFolder` checks the path before any work, takes the lock, then decides from
``mode`` whether the run is new, resumed or replaces an old one, refusing, with the reason
and the way out, whatever would lose another run's work::

    with RunFolder("out", kind="outer", config=cfg, outputs=("hparams.pt",)) as run:
        found = run.load_latest()
        step = found[0] if found else 0
        run.metrics.truncate(step)           # rows of steps never checkpointed go
        ...
        run.metrics.append({"step": step, "loss": loss})
        run.save_checkpoint(step + 1, state)
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hypergrad.errors import BilevelInputError

from . import checkpoint as ckpt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: version of the checkpoint payload and run.json layout (format 1: bilevel 0.1.0, no run.json)
FORMAT = 2
MODES = ("auto", "new", "resume", "overwrite")
RUN_FILE, LOCK_FILE, CHECKPOINTS = "run.json", ".lock", "checkpoints"
METRICS_FILES = ("metrics.jsonl", "metrics.csv")
_CHECKPOINT = re.compile(r"^step-(\d{8,})-([0-9a-f]{8})\.pt$")
_LEGACY_CHECKPOINT = re.compile(r"^step-\d{8,}\.pt$")
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # left by an interrupted ckpt.atomic_write
_MISSING = object()
_log = logging.getLogger(__name__)
#: how to continue a run of each kind, for the refusal of a new run in its folder
RESUME_HINTS = {"run": "`bilevel resume DIR`", "distill": "`bilevel distill ... --resume`",
                "": "mode='resume', or loop.resume() after opening it with mode='auto'"}


class RunFolderError(BilevelInputError):
    """A run folder cannot be used as asked: a bad path, another run's files, or a
    checkpoint that is missing, unreadable, another run's or of another format."""


class RunLockedError(RunFolderError):
    """Another live process holds the folder (its lock names the process)."""


class ConfigMismatchError(RunFolderError):
    """Resuming with a config that differs from the run's; ``differences`` lists the keys."""

    def __init__(self, message: str, differences: Sequence[str]) -> None:
        super().__init__(message)
        self.differences = list(differences)


def _version() -> str:
    import bilevel

    return getattr(bilevel, "__version__", "unknown")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _json_text(obj: Any, **kwargs: Any) -> str:
    try:
        return json.dumps(obj, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BilevelInputError(f"not JSON-like (dicts with string keys, lists, strings, "
                                f"numbers, booleans, None): {exc}") from exc


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``config`` (sorted keys, no spaces).

    Returns:
        A 64-character lowercase hex string.

    Raises:
        BilevelInputError: ``config`` is not JSON-like.
    """
    text = _json_text(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a is not _MISSING and b is not _MISSING and a == b


def _differences(old: Mapping, new: Mapping, growable: Sequence[str],
                 prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in [*old, *(k for k in new if k not in old)]:
        path = f"{prefix}{key}"
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, growable, path + ".")
            continue
        grown = ((path in growable or str(key) in growable)
                 and all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b))
                 and b >= a)
        if not _same(a, b) and not grown:
            out.append((path, a, b))
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                growable: Sequence[str] = ("outer_steps",)) -> list[str]:
    """Dotted key paths that differ between two nested JSON-like dicts (added, removed or
    changed). A key whose dotted path or last component is in ``growable`` may increase
    (an int) without counting.

    Returns:
        The differing paths, e.g. ``["outer.lr", "seed"]`` (empty: the same config).
    """
    return [path for path, _, _ in _differences(old, new, growable)]


def _shown(v: Any) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v, default=repr)


#: folders held by RunFolder objects of this process (flock does not refuse the same
#: process twice on every platform, and the message should say who holds it)
_HELD: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class _FolderLock:
    """An exclusive, non-blocking ``flock`` on ``file``, held until :meth:`release` or
    garbage collection (the OS drops it when the process dies, SIGKILL included)."""

    def __init__(self, file: Path, folder: Path) -> None:
        self._release = None
        if str(folder) in _HELD:
            raise RunLockedError(
                f"{folder} is held by an earlier run folder of this same process (an "
                "OuterLoop or Distiller not yet closed, e.g. from an interrupted cell): "
                "call its close() (loop.close(), distiller.close()), or delete it")
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn(f"cannot lock {folder} on this platform (no fcntl): make sure no "
                          "other process writes it at the same time", RuntimeWarning,
                          stacklevel=3)
            return
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunFolderError(f"{folder}: cannot open its lock file {file}: "
                                 f"{exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{folder} is in use by another process ({holder}); wait for it to finish, "
                "or choose another folder") from None
        except OSError as exc:  # pragma: no cover - e.g. a file system without locks
            os.close(fd)
            warnings.warn(f"cannot lock {folder} ({exc.strerror}): make sure no other "
                          "process writes it at the same time", RuntimeWarning, stacklevel=3)
            return
        self._release = weakref.finalize(self, _unlock, fd, str(folder))
        _HELD[str(folder)] = self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "command": " ".join(sys.argv)}
        try:  # who holds it, for the message of a refused process
            previous = os.pread(fd, 4096, 0)
            if previous:
                _log.debug("took over %s from a process that has ended: %s", file, previous)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError:  # pragma: no cover - e.g. a full disk: the lock holds all the same
            pass

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            h = json.loads(os.pread(fd, 4096, 0).decode())
            return (f"pid {h['pid']} on {h['host']}, started {h['started']}, command "
                    f"{h['command']!r}")
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def release(self) -> None:
        if self._release is not None:
            self._release()


def _unlock(fd: int, folder: str = "") -> None:
    _HELD.pop(folder, None)
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> Path:
    return ckpt.atomic_write(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """The per-step records of a run: ``metrics.jsonl`` (the reference) and ``metrics.csv``
    (derived from it) in ``directory``.

    Each :meth:`append` writes one JSON line and one CSV row, flushed and fsynced. The CSV
    columns are ``first_columns`` then the other keys in order of first appearance; a
    record with a new key rewrites the CSV under the wider header. The first append of an
    object repairs what a kill may have left: a torn last JSON line is dropped and the CSV
    is rebuilt from the JSON lines. Records need an integer ``"step"``, which
    :meth:`truncate` keys on.
    """

    def __init__(self, directory: str | os.PathLike[str], first_columns: Sequence[str] = ()
                 ) -> None:
        self.directory = Path(directory)
        self.jsonl, self.csv = (self.directory / name for name in METRICS_FILES)
        self.first_columns = list(dict.fromkeys(_names(first_columns)))
        self._columns: list[str] | None = None  # the CSV header on disk, once known

    def read(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (a torn last line, from a kill, is dropped).

        Returns:
            One dict per line, in file order (``[]`` without a file).

        Raises:
            RunFolderError: a malformed line before the last.
        """
        try:
            lines = self.jsonl.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        while lines and not lines[-1].strip():
            lines.pop()
        rows = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if i == len(lines) - 1:
                    break
                raise RunFolderError(f"{self.jsonl}, line {i + 1}: {exc}") from exc
            rows.append(row)
        return rows

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (one-element tensors become numbers, inf/nan strings).

        Raises:
            BilevelInputError: ``record`` has no integer ``"step"`` or a value that is not
                JSON-like.
        """
        row = {str(k): _plain(v) for k, v in record.items()}
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise BilevelInputError(f"a metrics record needs an integer 'step', got {step!r}")
        line = _json_text(row, allow_nan=False) + "\n"
        if self._columns is None:
            self._repair()
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        assert self._columns is not None
        if any(k not in self._columns for k in row):
            self._write_csv(self.read())
            return
        out = io.StringIO()
        csv.DictWriter(out, self._columns).writerow(row)
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            f.write(out.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def truncate(self, step: int) -> list[dict[str, Any]]:
        """Keep exactly the rows with ``row["step"] < step`` (both files rewritten
        atomically) and return them. Call it with the step of the checkpoint a run resumes
        from (0 without one): every step then appears once, whatever was killed when."""
        rows = [r for r in self.read()
                if isinstance(r.get("step"), int) and r["step"] < int(step)]
        if not (self.jsonl.exists() or self.csv.exists()):
            return rows
        _write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        self._write_csv(rows)
        return rows

    def _repair(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = self.read()
        if self.jsonl.exists() and self.jsonl.stat().st_size:
            with open(self.jsonl, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                _write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        self._write_csv(rows)

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns = list(self.first_columns)
        for r in rows:
            columns += [k for k in r if k not in columns]
        out = io.StringIO()
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)
        _write_text_atomic(self.csv, out.getvalue())
        self._columns = columns


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _check_path(path: Path, mode: str) -> None:
    """Refuse, before any work, a path the run could not be written to."""
    if path == Path(path.anchor):
        raise RunFolderError(f"{path} is the root of the file system: give the run a "
                             "folder of its own")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a folder: choose a folder for the run")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"{path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{path} cannot be written: {existing} is not writable")
    if mode == "resume" and existing != path:
        raise RunFolderError(f"{path} does not exist: there is no run to resume")
    if (path / CHECKPOINTS).exists() and not (path / CHECKPOINTS).is_dir():
        raise RunFolderError(f"{path / CHECKPOINTS} is a file, and the checkpoints need a "
                             "folder there: move the file away or choose another folder")
    for name in (RUN_FILE, LOCK_FILE, *METRICS_FILES):
        if (path / name).is_dir():
            raise RunFolderError(f"{path / name} is a folder; the run writes a file there: "
                                 "move it away or choose another folder")


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    """A sequence of names (one string is one name, not its characters)."""
    return (names,) if isinstance(names, str) else tuple(names)


def _check_name(name: str | os.PathLike[str], what: str) -> Path:
    p = Path(name)
    if not p.parts or p.is_absolute() or ".." in p.parts:
        raise BilevelInputError(f"{what} must be a relative path inside the run folder, "
                                f"got {str(name)!r}")
    return p


class RunFolder:
    """The folder of one run, held for this object's life (see the module docstring).

    Args:
        path: the folder (created with its parents when missing).
        kind: what writes it (``"outer"``, ``"distill"``, ...); a resume must match it.
        config: the run's JSON-like config, stored in ``run.json``. On a resume it must
            equal the stored one, except for ``growable`` keys that grew; ``None`` there
            takes the stored config as it is.
        mode: ``"new"`` (the folder must hold no other run), ``"resume"`` (it must hold
            this kind of run, with this config), ``"auto"`` (resume when ``run.json`` is
            there, else new) or ``"overwrite"`` (delete ``run.json``, ``checkpoints/``,
            the metrics and ``outputs``, keep anything else, then new).
        growable: config keys (dotted paths or last components) allowed to increase.
        keep_checkpoints: how many of this run's checkpoints to keep (``None``: all).
        outputs: names of files the entry point writes in the folder (``hparams.pt``,
            ``summary.json``, ...): found there, they mark another run; overwritten, they go.
        metric_columns: the first CSV columns of :attr:`metrics`.

    Raises:
        RunFolderError: a path that is or lies below a file, is not writable, or holds a
            file where ``checkpoints/`` goes; another run's files in a new run's folder;
            nothing (or a folder of an older bilevel) to resume; another kind of run.
        RunLockedError: another live process holds the folder.
        ConfigMismatchError: a resume with a changed config (every key named, old → new).
        BilevelInputError: a bad ``mode``, ``kind``, ``keep_checkpoints`` or ``outputs``,
            or a config that is not JSON-like.
    """

    def __init__(self, path: str | os.PathLike[str], *, kind: str,
                 config: Mapping[str, Any] | None = None, mode: str = "auto",
                 growable: Sequence[str] = ("outer_steps",),
                 keep_checkpoints: int | None = 3, outputs: Sequence[str] = (),
                 metric_columns: Sequence[str] = ()) -> None:
        if mode not in MODES:
            raise BilevelInputError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(kind, str) or not kind:
            raise BilevelInputError(f"kind must be a non-empty string, got {kind!r}")
        if keep_checkpoints is not None and (isinstance(keep_checkpoints, bool) or not
                                             isinstance(keep_checkpoints, int) or
                                             keep_checkpoints < 1):
            raise BilevelInputError(f"keep_checkpoints must be an integer >= 1 or None (keep "
                                    f"all), got {keep_checkpoints!r}")
        if config is not None and not isinstance(config, Mapping):
            raise BilevelInputError(f"config must be a dict, got {type(config).__name__}")
        given = None if config is None else json.loads(_json_text(config))
        self.outputs = [str(_check_name(n, "each of outputs")) for n in _names(outputs)]
        self.kind, self.growable = kind, _names(growable)
        self.keep_checkpoints = keep_checkpoints
        if not str(path).strip():
            raise RunFolderError("the run folder path is empty: give a folder for the run")
        self.path = Path(os.path.abspath(path))
        self.checkpoint_dir = self.path / CHECKPOINTS
        _check_path(self.path, mode)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"{self.path} cannot be created: {exc.strerror}") from exc
        self._lock = _FolderLock(self.path / LOCK_FILE, self.path)
        self._closed = False
        try:
            self._remove_stale_temps()
            self.resumed = self._open(mode, given)
            self.checkpoint_dir.mkdir(exist_ok=True)
        except BaseException:
            self.close()
            raise
        self.metrics = MetricsLog(self.path, metric_columns)

    # ------------------------------------------------------------------ identity
    def _open(self, mode: str, given: dict | None) -> bool:
        """Resume or create the run as ``mode`` says; True when resumed."""
        has_run = (self.path / RUN_FILE).exists()
        if mode == "overwrite":
            self._clear()
        elif has_run and mode in ("auto", "resume"):
            self._resume(given)
            return True
        elif mode != "new" and self._legacy_checkpoints():
            raise RunFolderError(
                f"{self.path} was written by an older version of bilevel (checkpoints of "
                f"format 1 such as {self._legacy_checkpoints()[-1]}, no {RUN_FILE}): this "
                f"version ({_version()}) cannot resume it. Finish it with bilevel 0.1.x, or "
                "start afresh with mode='overwrite' (--overwrite) or in another folder")
        elif mode == "resume":
            raise RunFolderError(f"{self.path} holds no run to resume (no {RUN_FILE}); "
                                 "start one with mode='new'")
        else:
            found = self._previous_run()
            if found:
                previous = self._stored_kind()
                if has_run and previous not in (None, self.kind):
                    what = f"a {previous!r} run, not a {self.kind!r} one"
                    resume = ""
                else:
                    same = has_run and self._stored().get("fingerprint") == \
                        config_fingerprint(given or {})
                    what = "a run with these same settings" if same else "another run"
                    resume = f"resume it ({RESUME_HINTS.get(self.kind, RESUME_HINTS[''])}), " \
                        if has_run else ""
                raise RunFolderError(
                    f"{self.path} already holds {what} ({', '.join(found)}): {resume}"
                    "replace it (--overwrite on the command line, mode='overwrite' in "
                    "Python: deletes those files), or choose another folder")
        self.run_id = uuid.uuid4().hex
        self.config = given or {}
        self.fingerprint = config_fingerprint(self.config)
        self.write_json(RUN_FILE, {
            "format": FORMAT, "run_id": self.run_id, "kind": self.kind, "config": self.config,
            "fingerprint": self.fingerprint, "created": _now(), "bilevel": _version(),
            "outputs": self.outputs})
        return False

    def _stored(self) -> dict[str, Any]:
        """The folder's run.json as far as it can be read (empty when it cannot)."""
        try:
            stored = json.loads((self.path / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def _stored_kind(self) -> str | None:
        kind = self._stored().get("kind")
        return kind if isinstance(kind, str) else None

    def _resume(self, given: dict | None) -> None:
        file = self.path / RUN_FILE
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
            run_id, kind, old = stored["run_id"], stored["kind"], stored["config"]
            if not (isinstance(old, dict) and re.fullmatch("[0-9a-f]{32}", str(run_id))):
                raise ValueError("a malformed run_id or config")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunFolderError(f"{file} is unreadable or incomplete ({exc}); move it "
                                 "away, or start afresh with mode='overwrite'") from exc
        if stored.get("format") != FORMAT:
            raise RunFolderError(f"{file} is of format {stored.get('format')} (written by "
                                 f"bilevel {stored.get('bilevel', 'unknown')}); this version "
                                 f"({_version()}) reads format {FORMAT} only")
        if kind != self.kind:
            raise RunFolderError(f"{self.path} holds a {kind!r} run, not a {self.kind!r} "
                                 "one: choose another folder")
        self.run_id, self.config = run_id, old
        if given is not None:
            diffs = _differences(old, given, self.growable)
            if diffs:
                def grows(k: str) -> str:
                    last = k.rsplit(".", 1)[-1]
                    return " (may only grow)" if k in self.growable or \
                        last in self.growable else ""

                lines = "".join(f"\n  {k}: {_shown(a)} → {_shown(b)}{grows(k)}"
                                for k, a, b in diffs)
                raise ConfigMismatchError(
                    f"{self.path}: the settings differ from those this run was started "
                    f"with:{lines}\nput them back (for `bilevel resume`: in the folder's "
                    "config.toml) to continue it, or start a new run in another folder (or "
                    "replace this one: mode='overwrite', `--overwrite` of `bilevel run` / "
                    "`bilevel distill`)", [k for k, _, _ in diffs])
            if given != old:  # a growable key grew
                self.config = given
                stored.update(config=given, fingerprint=config_fingerprint(given))
                self.write_json(RUN_FILE, stored)
        self.fingerprint = config_fingerprint(self.config)

    def _legacy_checkpoints(self) -> list[str]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p.name for p in self.checkpoint_dir.iterdir()
                      if _LEGACY_CHECKPOINT.match(p.name))

    def _previous_run(self) -> list[str]:
        """What in the folder belongs to a run: run.json, checkpoints, metrics, outputs."""
        found = [RUN_FILE] if (self.path / RUN_FILE).exists() else []
        if self.checkpoint_dir.is_dir():
            n = sum(1 for _ in self.checkpoint_dir.iterdir())
            found += [f"{CHECKPOINTS}/ with {n} file{'s' * (n != 1)}"] if n else []
        return found + [n for n in (*METRICS_FILES, *self.outputs)
                        if os.path.lexists(self.path / n)]

    def _clear(self) -> None:
        previous = self._stored().get("outputs", [])
        names = [n for n in previous if isinstance(n, str)
                 and not Path(n).is_absolute() and ".." not in Path(n).parts]
        for name in dict.fromkeys((RUN_FILE, CHECKPOINTS, *METRICS_FILES, *self.outputs,
                                   *names)):
            p = self.path / name
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    p.unlink()
            except OSError as exc:
                raise RunFolderError(f"cannot delete {p} to overwrite the run: "
                                     f"{exc.strerror}") from exc

    def _remove_stale_temps(self) -> None:
        removed = ckpt.remove_stale_temps(self.checkpoint_dir)
        for p in self.path.iterdir():
            if _TEMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
        if removed:
            _log.debug("removed temp files of interrupted writes: %s", removed)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_name(self, step: int) -> str:
        """``step-XXXXXXXX-RRRRRRRR.pt``: the step, then the first 8 hex digits of the run id."""
        return f"step-{step:08d}-{self.run_id[:8]}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of this run's checkpoint files, oldest first (others ignored)."""
        if not self.checkpoint_dir.is_dir():
            return []
        own = ((_CHECKPOINT.match(p.name), p) for p in self.checkpoint_dir.iterdir())
        return sorted((int(m.group(1)), p) for m, p in own
                      if m and m.group(2) == self.run_id[:8] and p.is_file())

    def save_checkpoint(self, step: int, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` plus ``format``, ``run_id``, ``fingerprint``, ``step`` (and
        ``bilevel``, the version) atomically as this run's checkpoint of ``step``; returns
        its path. Then prune: this run's checkpoints of later steps go (a continuation the
        run went back from), and of the earlier ones the newest ``keep_checkpoints - 1``
        stay. Files of other runs or versions are never touched.

        Args:
            step: the outer step the checkpoint resumes from (int ≥ 0).
            payload: a dict of picklable objects (tensors, state dicts, numbers).

        Returns:
            The checkpoint's path.

        Raises:
            BilevelInputError: a negative or non-int step, or a payload whose ``step``
                differs.
            RunFolderError: the folder was closed.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise BilevelInputError(f"step must be an integer >= 0, got {step!r}")
        if "step" in payload and int(payload["step"]) != step:
            raise BilevelInputError(f"the payload says step {payload['step']}, not {step}")
        self._check_open()
        blob = {**payload, "format": FORMAT, "run_id": self.run_id,
                "fingerprint": self.fingerprint, "step": step, "bilevel": _version()}
        path = ckpt.atomic_save(blob, self.checkpoint_dir / self.checkpoint_name(step))
        older = []
        for s, p in self.checkpoints():
            if s > step:
                p.unlink(missing_ok=True)
            elif s < step:
                older.append(p)
        if self.keep_checkpoints is not None:
            for p in older[:max(0, len(older) - self.keep_checkpoints + 1)]:
                p.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: Any = None) -> tuple[int, dict[str, Any]] | None:
        """``(step, payload)`` of this run's newest readable checkpoint, or ``None``.

        An unreadable file (truncated, say) is skipped with a RuntimeWarning and the
        previous one tried.

        Raises:
            RunFolderError: a payload of another format or another run.
        """
        for step, file in reversed(self.checkpoints()):
            try:
                payload = torch.load(file, map_location=map_location, weights_only=False)
                if not isinstance(payload, dict):
                    raise ValueError(f"it holds a {type(payload).__name__}, not a dict")
            except Exception as exc:  # noqa: BLE001 - any unreadable file falls back
                warnings.warn(f"skipping unreadable checkpoint {file}: {exc}", RuntimeWarning,
                              stacklevel=2)
                continue
            self._check_payload(file, payload)
            return step, payload
        return None

    def load_checkpoint(self, file: str | os.PathLike[str],
                        map_location: Any = None) -> dict[str, Any]:
        """The payload of one checkpoint file of this run.

        Raises:
            RunFolderError: ``file`` does not exist (this run's checkpoints are listed),
                cannot be read, is another run's or of another format.
        """
        file = Path(file)
        if not file.is_file():
            own = ", ".join(p.name for _, p in self.checkpoints()) or "none yet"
            raise RunFolderError(f"no checkpoint file {file}; this run's checkpoints in "
                                 f"{self.checkpoint_dir}: {own}")
        try:
            payload = torch.load(file, map_location=map_location, weights_only=False)
        except Exception as exc:
            raise RunFolderError(f"cannot read checkpoint {file}: {exc}") from exc
        if not isinstance(payload, dict):
            raise RunFolderError(f"{file} is not a bilevel checkpoint")
        self._check_payload(file, payload)
        return payload

    def _check_payload(self, file: Path, payload: dict[str, Any]) -> None:
        fmt = payload.get("format")
        if fmt != FORMAT:
            reader = ("bilevel 0.1.x (before run folders) can read it" if fmt == 1 else
                      f"bilevel {payload.get('bilevel', 'of a newer version')} wrote it and "
                      "can read it" if isinstance(fmt, int) and fmt > FORMAT else
                      "it is not a bilevel checkpoint")
            raise RunFolderError(f"{file} is a checkpoint of format {fmt}; this version "
                                 f"({_version()}) reads format {FORMAT} only: {reader}")
        if payload.get("run_id") != self.run_id:
            raise RunFolderError(f"{file} belongs to run {payload.get('run_id')}, not to "
                                 f"this folder's run {self.run_id}")

    # ------------------------------------------------------------------ other files
    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``path / name`` atomically; returns the path.

        Raises:
            BilevelInputError: ``name`` not a relative path inside the folder, or ``obj``
                not JSON-like.
            RunFolderError: the folder was closed.
        """
        return self.write_text(name, _json_text(obj, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) to ``path / name`` atomically; returns the path.

        Raises:
            BilevelInputError: ``name`` not a relative path inside the folder.
            RunFolderError: the folder was closed.
        """
        self._check_open()
        return _write_text_atomic(self.path / _check_name(name, "name"), text)

    def save_torch(self, name: str, obj: Any) -> Path:
        """``torch.save(obj)`` to ``path / name`` atomically; returns the path.

        Raises:
            BilevelInputError: ``name`` not a relative path inside the folder.
            RunFolderError: the folder was closed.
        """
        self._check_open()
        return ckpt.atomic_save(obj, self.path / _check_name(name, "name"))

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise RunFolderError(f"{self.path}: this RunFolder is closed (its lock is "
                                 "released); open the folder again to write to it")

    def close(self) -> None:
        """Release the lock (also done on garbage collection); later writes raise."""
        self._closed = True
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RunFolder({str(self.path)!r}, kind={self.kind!r}, "
                f"run_id={getattr(self, 'run_id', '?')[:8]!r}, "
                f"resumed={getattr(self, 'resumed', False)})")


__all__ = ["FORMAT", "ConfigMismatchError", "MetricsLog", "RunFolder", "RunFolderError",
           "RunLockedError", "config_diff", "config_fingerprint"]
