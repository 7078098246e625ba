"""``bilevel tune CONFIG --study NAME``: one Optuna worker over a config's ``[search]`` table.

Each trial draws the ``[search]`` values (:meth:`SearchSpace.suggest`), builds the trial's
config (:func:`build_config`) and runs it exactly as ``bilevel run`` does
(:func:`bilevel.cli.run_config`) in the run folder ``OUT/<study>/trial-<number>``, with an
:class:`OptunaPruning` callback on the monitored metric (``eval_val_loss`` by default).
The trial's value is the final monitored value, or the values of the ``--objective`` keys
(a multi-objective study, e.g. validation loss against ``train_seconds``); ``--constraint``
budgets become :meth:`optuna.trial.Trial.set_constraint`. Its user attributes hold the run
folder (``run_dir``), the drawn values (``values``) and the whole config (``config``). A
draw that makes an invalid config is a failed trial (``fail_reason``), a diverging run a
pruned one; the worker goes on.

``--storage`` shares the study between processes: an Optuna storage URL
(``sqlite:///tune.db``, ``postgresql://user@host/db``) or ``journal:PATH`` (a
:class:`optuna.storages.JournalStorage` on a file). Starting the same command N times
makes N workers on one study (``create_study(load_if_exists=True)``). Without it the study
lives in this process only. On an RDB storage each running trial records a heartbeat
(``--heartbeat``); a trial whose worker died (killed, machine lost) is failed by the next
worker that starts a trial, and re-run (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`,
``--max-retry``) with the same values **in the dead trial's folder, resuming from its last
checkpoint**. Re-runs do not count towards a worker's ``--n-trials``; a worker finishes the
re-runs it finds waiting before it exits. ``--best`` prints the best trial (the Pareto
front of a multi-objective study) and writes ``OUT/<study>/best.toml`` (its config,
runnable with ``bilevel run``) and ``OUT/<study>/best_hparams.pt`` (a copy of its tuned
``hparams.pt``, loadable with ``torch.load``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hypergrad.errors import ConvergenceWarning

from ..arguments import non_negative_int
from ..config import Config, ConfigError, parse_config, tomllib
from ..log import every_warning
from ..sinks import BASE_COLUMNS
from .pruning import DIRECTIONS, OptunaPruning, run_trial
from .search import SearchSpace, build_config, split_search, to_toml

DESCRIPTION = (
    "Run one Optuna worker on the study NAME: each trial draws the values of CONFIG's "
    "[search] table, runs the resulting config as `bilevel run` does into "
    "OUT/NAME/trial-<number> and scores it by the final monitored metric (or the "
    "--objective keys); bad trials are pruned. Start the same command several times with "
    "one --storage to share the study; on sqlite:// or postgresql:// storages a trial whose "
    "worker died is re-run from its last checkpoint. --best writes OUT/NAME/best.toml and "
    "best_hparams.pt from the best trial.")

#: ``--pruner`` choices: name -> factory
PRUNERS: dict[str, Any] = {
    "median": lambda: optuna.pruners.MedianPruner(),
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(),
    "patient": lambda: optuna.pruners.PatientPruner(optuna.pruners.MedianPruner(), patience=2),
    "none": lambda: optuna.pruners.NopPruner(),
}
#: ``--sampler`` choices: name -> (factory, the module it needs beyond optuna)
SAMPLERS: dict[str, tuple[Any, str | None]] = {
    "tpe": (lambda: optuna.samplers.TPESampler(), None),
    "random": (lambda: optuna.samplers.RandomSampler(), None),
    "qmc": (lambda: optuna.samplers.QMCSampler(), "scipy"),
    "gp": (lambda: optuna.samplers.GPSampler(), "scipy"),
    "cmaes": (lambda: optuna.samplers.CmaEsSampler(), "cmaes"),
    "nsga2": (lambda: optuna.samplers.NSGAIISampler(), None),
    "nsga3": (lambda: optuna.samplers.NSGAIIISampler(), None),
}
#: the evaluation metrics a `bilevel run` records (as ``eval_<name>``)
EVAL_METRICS = ("val_loss", "val_acc")
#: objectives summarising a whole run rather than read from its last record
RUN_TOTALS = {
    "train_seconds": "seconds spent in the outer loop (sum of step_seconds, resumes included)",
    "peak_memory_mib": "peak memory of the run in MiB (CUDA allocator, or the process's RSS)",
}
DEFAULT_OUT = "runs/tune"
JOURNAL = "journal:"
#: heartbeat interval (s) on RDB storages when ``--heartbeat`` is not given
DEFAULT_HEARTBEAT = 60
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*(\S+)\s*$")
_FOLDER = "trial_folder"  # user attribute: the trial number naming the run folder


@dataclass(frozen=True)
class Constraint:
    """A budget ``key <= limit`` or ``key >= limit`` on a run's final value of ``key``;
    the trial's constraint value (feasible when ≤ 0) is ``value - limit`` (``<=``) or
    ``limit - value`` (``>=``)."""

    key: str
    op: str
    limit: float

    @property
    def name(self) -> str:
        """The constraint as written, e.g. ``"train_seconds<=60"``."""
        return f"{self.key}{self.op}{self.limit:g}"

    def violation(self, value: float) -> float:
        """Optuna's constraint value for a final ``value`` of ``key``: ≤ 0 when feasible,
        in the units of ``key`` (seconds, MiB, …)."""
        return value - self.limit if self.op == "<=" else self.limit - value


def constraint(text: str) -> Constraint:
    """``--constraint``: ``KEY<=LIMIT`` or ``KEY>=LIMIT`` with a finite LIMIT.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not of that form.
    """
    m = _CONSTRAINT.match(text)
    limit = None
    if m:
        try:
            limit = float(m.group(3))
        except ValueError:
            limit = None
    if m is None or limit is None or not math.isfinite(limit):
        raise argparse.ArgumentTypeError(
            f"expected KEY<=LIMIT or KEY>=LIMIT with a finite number, e.g. "
            f"'train_seconds<=60', got {text!r}")
    return Constraint(m.group(1), m.group(2), limit)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``bilevel tune``."""
    p.add_argument("config", metavar="CONFIG", help="TOML config file with a [search] table")
    p.add_argument("--study", required=True, metavar="NAME", help="Optuna study name")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage shared by the workers: sqlite:///PATH.db, "
                   "postgresql://USER@HOST/DB (any RDB URL) or journal:PATH (a journal "
                   "file); default: in-memory (this process only)")
    p.add_argument("--n-trials", type=non_negative_int, default=10, metavar="N",
                   help="new trials this worker runs (default: 10); re-runs of trials "
                   "whose worker died come on top")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"trials go into DIR/NAME/trial-<number> (default: {DEFAULT_OUT})")
    p.add_argument("--monitor", metavar="KEY",
                   help="record key reported to the pruner: eval_val_loss (default; "
                   "outer_loss when outer.eval_every = 0), eval_val_acc, outer_loss, ...")
    p.add_argument("--objective", action="append", metavar="KEY",
                   help="the trial's value: the run's final KEY (default: the monitor); "
                   "repeat for a multi-objective study. Besides record keys: "
                   + ", ".join(f"{k} ({v})" for k, v in RUN_TOTALS.items()))
    p.add_argument("--direction", action="append", choices=DIRECTIONS,
                   help="one per objective (default: maximize for an accuracy, minimize "
                   "otherwise)")
    p.add_argument("--constraint", action="append", type=constraint, default=[],
                   metavar="KEY<=LIMIT",
                   help="a budget on the run's final KEY (any objective key), e.g. "
                   "train_seconds<=60 or eval_val_acc>=0.9; repeatable; trials over it are "
                   "kept but marked infeasible")
    p.add_argument("--pruner", choices=tuple(PRUNERS), default="median",
                   help="Optuna pruner (default: median; single-objective studies only)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="tpe",
                   help="Optuna sampler (default: tpe, which handles several objectives "
                   "and constraints)")
    p.add_argument("--heartbeat", type=non_negative_int, metavar="SECONDS",
                   help="on sqlite:// and postgresql:// storages, each running trial "
                   f"records a heartbeat every SECONDS (default: {DEFAULT_HEARTBEAT}; 0: "
                   "off); a trial silent for twice that is failed and re-run")
    p.add_argument("--max-retry", type=non_negative_int, default=3, metavar="N",
                   help="re-run a trial whose worker died at most N times (default: 3)")
    p.add_argument("--best", action="store_true",
                   help="do not run: print the study's best trial (the Pareto front of a "
                   "multi-objective study) and write DIR/NAME/best.toml and best_hparams.pt")
    p.add_argument("--trial", type=non_negative_int, metavar="NUMBER",
                   help="with --best: write this trial's settings instead (e.g. one of the "
                   "Pareto front)")


# -- setup --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """A checked ``bilevel tune`` invocation: the base config, its space, the monitored
    key, the objectives with their directions, the constraints."""

    config: dict[str, Any]
    base: Config
    space: SearchSpace
    monitor: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    constraints: tuple[Constraint, ...]
    study_dir: Path

    @property
    def direction(self) -> str:
        """The direction of the first objective."""
        return self.directions[0]


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a TOML config file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _check_key(base: Config, key: str, option: str, totals: bool) -> str:
    """A key the run's records (or, when ``totals``, its run totals) hold."""
    if key.startswith("eval_"):
        if not base.outer.eval_every:
            raise ConfigError(f"{option} {key}: the config never evaluates "
                              "(outer.eval_every = 0); use outer_loss")
        if key[5:] not in EVAL_METRICS:
            raise ConfigError(f"{option} {key}: a run evaluates "
                              f"{', '.join('eval_' + m for m in EVAL_METRICS)}")
        return key
    allowed = [k for k in BASE_COLUMNS if k != "step" and k not in RUN_TOTALS] + \
        [k for k in RUN_TOTALS if totals or k in BASE_COLUMNS]
    if key not in allowed:
        raise ConfigError(f"{option} {key}: not a key of the run's records; choose "
                          f"eval_val_loss, eval_val_acc or one of {', '.join(allowed)}")
    return key


def _default_direction(key: str) -> str:
    return "maximize" if key.endswith("acc") else "minimize"


def setup(args: argparse.Namespace) -> Setup:
    """Read and check CONFIG, its ``[search]`` table, the monitor, objectives, directions
    and constraints, before any work.

    Raises:
        ConfigError: naming the key or option at fault (no ``[search]`` table, an invalid
            config or space, an unknown key, a direction count or ``--study`` name that
            does not fit, a study folder that cannot be made).
    """
    config, table = split_search(_read(Path(args.config)))
    if not table:
        raise ConfigError(f"{args.config}: no [search] table: add one, e.g. "
                          '[search] "outer.lr" = { float = [1e-3, 1e-1], log = true }')
    base = parse_config(copy.deepcopy(config))
    space = SearchSpace.from_table(table, config)
    default = "eval_val_loss" if base.outer.eval_every else "outer_loss"
    given = [_check_key(base, k, "--objective", totals=True)
             for k in getattr(args, "objective", None) or ()]
    monitor = args.monitor
    if monitor is None:
        monitor = given[0] if given and given[0] not in RUN_TOTALS else default
    monitor = _check_key(base, monitor, "--monitor", totals=False)
    objectives = tuple(given or [monitor])
    if len(set(objectives)) < len(objectives):
        raise ConfigError(f"--objective: {', '.join(objectives)} repeats a key")
    directions = tuple(getattr(args, "direction", None) or
                       [_default_direction(k) for k in objectives])
    if len(directions) != len(objectives):
        raise ConfigError(f"--direction: {len(directions)} given for {len(objectives)} "
                          f"objective(s) ({', '.join(objectives)}): give one per objective")
    if len(objectives) == 1 and monitor != objectives[0] and \
            _default_direction(monitor) != directions[0]:
        raise ConfigError(f"--monitor {monitor} improves in the other direction than the "
                          f"objective ({directions[0]} {objectives[0]}): pruners compare "
                          "the reported values in the study's direction")
    constraints = tuple(getattr(args, "constraint", None) or ())
    for c in constraints:
        _check_key(base, c.key, "--constraint", totals=True)
    if "/" in args.study or args.study in ("", ".", "..") or \
            not args.study.isprintable():
        raise ConfigError(f"--study: {args.study!r} must be usable as a folder name")
    study_dir = Path(args.out) / args.study
    _check_creatable(study_dir)
    return Setup(config, base, space, monitor, objectives, directions, constraints,
                 study_dir)


def _check_creatable(folder: Path) -> None:
    """The trials' folder can be made (checked before the study is touched, made by the
    first trial): no file in the way, names the file system takes, a writable parent."""
    too_long = [p for p in folder.parts if len(os.fsencode(p)) > 255]
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = (f"the name {too_long[0][:40]!r}... is longer than 255 bytes" if too_long else
           f"{existing} is a file" if not existing.is_dir() else
           f"{existing} is not writable" if not os.access(existing, os.W_OK | os.X_OK)
           else None)
    if why:
        raise ConfigError(f"--out/--study: cannot create {folder}: {why}")


# -- storage and study --------------------------------------------------------------------

#: what SQLAlchemy says when workers create a new database's tables at the same time
_RACES = ("already exists", "unique constraint", "duplicate key", "database is locked")


def _driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; the ``postgres`` extra installs
    psycopg2, so a plain PostgreSQL URL is given the driver that is installed."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and \
            importlib.util.find_spec("psycopg") is None and \
            importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def _rdb(url: str, heartbeat: int | None, max_retry: int) -> Any:
    """An :class:`optuna.storages.RDBStorage` with a heartbeat (when ``heartbeat``) whose
    stale trials are re-run. Workers starting together on a new database race to create
    its tables (``table ... already exists``, a ``UNIQUE`` constraint on
    ``alembic_version``), so that is retried, and SQLite waits up to a minute for a
    locked database."""
    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}}} \
        if url.startswith("sqlite") else {}
    given, url = url, _driver(url)
    for attempt in range(10):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat:
                    kwargs.update(heartbeat_interval=heartbeat, heartbeat_stale_trial_callback=(
                        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)
                        if max_retry else None))
                return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as exc:
            hint = " (pip install bilevel[postgres])" if url.startswith("postgres") else ""
            raise ConfigError(f"--storage {given}: {exc}{hint}") from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not any(r in first.lower() for r in _RACES) or attempt == 9:
                raise ConfigError(f"--storage {given}: {type(exc).__name__}: {first}"
                                  ) from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def storage(url: str | None, heartbeat: int | None = None, max_retry: int = 3) -> Any:
    """``--storage``: ``None`` (in-memory), ``journal:PATH`` or an Optuna RDB URL.

    ``heartbeat`` (seconds; ``None``: 60 on RDB storages, 0: off) is only available on RDB
    storages: Optuna's journal storage has none (ConfigError when asked for one).

    Returns:
        ``None``, an :class:`optuna.storages.RDBStorage` or a
        :class:`optuna.storages.JournalStorage`.

    Raises:
        ConfigError: a journal path without a file or in a missing folder, a heartbeat on
            a journal storage, or an RDB URL Optuna cannot open.
    """
    if url is None:
        return None
    if not url.startswith(JOURNAL):
        return _rdb(url, DEFAULT_HEARTBEAT if heartbeat is None else heartbeat, max_retry)
    path = url[len(JOURNAL):]
    if not path:
        raise ConfigError("--storage: journal: needs a file, e.g. journal:tune.log")
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"--storage {url}: the folder of {path} does not exist")
    if heartbeat:
        raise ConfigError(f"--heartbeat {heartbeat}: Optuna's journal storage records no "
                          "heartbeats, so trials of dead workers cannot be re-run there; "
                          "use sqlite:///PATH.db or postgresql://... for that")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(path))


def _sampler(name: str) -> Any:
    factory, needs = SAMPLERS[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"--sampler {name} needs the {needs} package: pip install {needs}")
    return factory()


def open_study(args: argparse.Namespace, directions: Sequence[str] | str | None = None,
               create: bool = True) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; a study of other directions is
    refused.

    Raises:
        ConfigError: no such study (``create=False``), a storage Optuna cannot open, a
            sampler whose package is missing, or a study of other directions.
    """
    if isinstance(directions, str):
        directions = [directions]
    where = storage(args.storage, getattr(args, "heartbeat", None),
                    getattr(args, "max_retry", 3))
    try:
        if not create:
            return optuna.load_study(study_name=args.study, storage=where)
        study = optuna.create_study(
            study_name=args.study, storage=where, load_if_exists=True,
            directions=list(directions) if directions else None,
            pruner=PRUNERS[getattr(args, "pruner", "median")](),
            sampler=_sampler(getattr(args, "sampler", "tpe")))
    except KeyError:
        raise ConfigError(f"--study: no study {args.study!r} in {args.storage}") from None
    except ConfigError:
        raise
    except (ValueError, ImportError, OSError, RuntimeError) as exc:
        raise ConfigError(f"--storage {args.storage}: {type(exc).__name__}: {exc}") from None
    have = [d.name.lower() for d in study.directions]
    if directions and have != list(directions):
        names = study.metric_names or [""] * len(have)
        shown = ", ".join(f"{d} {n}".strip() for d, n in zip(have, names, strict=True))
        raise ConfigError(f"--objective/--direction {' '.join(directions)}: the study "
                          f"{args.study!r} in {args.storage} is to {shown}")
    return study


def check_objectives(study: optuna.Study, s: Setup, given: bool) -> Setup:
    """The study records its objectives' keys (Optuna's metric names): a worker scoring
    other keys is refused, and one that named none (``--best``) takes the study's."""
    names = study.metric_names
    if names is None:
        if study.get_trials(deepcopy=False) and len(study.directions) != len(s.objectives):
            raise ConfigError(f"--objective: the study {study.study_name!r} has "
                              f"{len(study.directions)} objective(s), not "
                              f"{len(s.objectives)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(s.objectives))
        return s
    if tuple(names) == s.objectives:
        return s
    if not given:
        return dataclasses.replace(s, objectives=tuple(names), directions=tuple(
            d.name.lower() for d in study.directions))
    raise ConfigError(f"--objective {' '.join(s.objectives)}: the study "
                      f"{study.study_name!r} scores {', '.join(names)}; give the same "
                      "--objective keys (or another --study)")


# -- trials -------------------------------------------------------------------------------

def final_value(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """The run's final ``key``: the last record holding it, or a run total
    (:data:`RUN_TOTALS`): ``train_seconds`` (seconds, the sum of ``step_seconds``),
    ``peak_memory_mib`` (MiB, the maximum over records), else the last value.

    Raises:
        ConfigError: no record holds ``key``.
    """
    if key == "train_seconds":
        return float(sum(r.get("step_seconds") or 0.0 for r in history))
    values = [r[key] for r in history if r.get(key) is not None]
    if not values:
        raise ConfigError(f"{key}: not in the run's records")
    if key == "peak_memory_mib":
        return float(max(values))
    return float(values[-1])


def _reset_peak_memory() -> None:
    """Peak memory per trial: reset the process's RSS high-water mark (Linux) and the CUDA
    allocator's peak before a trial; elsewhere the peak covers the worker's earlier trials
    too."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_one(s: Setup, trial: optuna.Trial) -> float | list[float]:
    """One trial: draw, build, run with pruning; returns the final objective value(s).

    A re-run of a trial whose worker died (it inherits the ``trial_folder`` user
    attribute) resumes in that trial's folder from its last checkpoint.

    Args:
        s: the checked invocation (:func:`setup`).
        trial: the Optuna trial to run.

    Returns:
        The final value of the objective, or a list of them (multi-objective).

    Raises:
        ConfigError: the drawn values make an invalid config.
        optuna.TrialPruned: the pruner stopped the run (or its hypergradient blew up).
    """
    start = time.perf_counter()
    inherited = trial.user_attrs.get(_FOLDER)
    values = s.space.suggest(trial)
    number = trial.number if inherited is None else int(inherited)
    trial.set_user_attr(_FOLDER, number)
    trial.set_user_attr("values", values)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    out = s.study_dir / f"trial-{number}"
    trial.set_user_attr("run_dir", str(out.resolve()))
    base = {**s.config, "output": {**s.config.get("output", {}), "dir": str(out)}}
    document, cfg = build_config(base, values)
    trial.set_user_attr("config", document)
    shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
    text = to_toml(document, header=f"trial {number} of study {trial.study.study_name}: "
                                     f"{shown}")
    from ..cli import run_config  # bilevel.cli imports this module

    pruning = OptunaPruning(trial, s.monitor)
    history: list[dict[str, Any]] = []

    def runner(loop: Any, steps: int) -> list[dict[str, Any]]:
        if loop.folder.resumed:
            step = loop.resume()
            trial.set_user_attr("resumed_step", step)
            print(f"trial {trial.number}: re-run of trial {number}, resumed in {out} at "
                  f"outer step {step}", file=sys.stderr)
        try:
            history.extend(run_trial(loop, steps, pruning))
        except optuna.TrialPruned:
            _set_constraints(s, trial, loop.history)
            raise
        return history

    _reset_peak_memory()
    with _convergence_warnings(trial):
        run_config(cfg, text, document, out, "new" if inherited is None else "auto",
                   callbacks=(pruning,), runner=runner, start=start, progress=False)
    _set_constraints(s, trial, history)
    result = [final_value(history, k) for k in s.objectives]
    return result[0] if len(result) == 1 else result


@contextlib.contextmanager
def _convergence_warnings(trial: optuna.Trial) -> Iterator[None]:
    """Count the trial's :class:`hypergrad.ConvergenceWarning` s (an inner run or linear
    solve stopping short, often every outer step of a trial with a small budget) into the
    user attributes ``convergence_warnings`` and ``convergence_warning`` (the last
    message) instead of printing each; other warnings are shown as usual. The trial's
    outer loop passes every warning through (:func:`bilevel.log.every_warning`), so that
    all are counted here, not only the first of each kind."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught, every_warning():
            warnings.simplefilter("always", ConvergenceWarning)
            yield
    finally:  # outside the recording: a warning shown inside it would be recorded again
        ours = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if ours:
            trial.set_user_attr("convergence_warnings", len(ours))
            trial.set_user_attr("convergence_warning", str(ours[-1].message))


def _set_constraints(s: Setup, trial: optuna.Trial, history: Sequence[Mapping]) -> None:
    for c in s.constraints:
        try:
            trial.set_constraint(c.name, c.violation(final_value(history, c.key)))
        except ConfigError:  # a run pruned before its first evaluation
            continue


def _state(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == optuna.trial.TrialState.COMPLETE:
        shown = ", ".join(f"{v:.6g}" for v in trial.values)
        bad = [k for k, v in trial.constraints.items() if v > 0]
        return f"value {shown}" + (f" (over budget: {', '.join(bad)})" if bad else "")
    reason = trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason", "")
    return f"{trial.state.name.lower()}{': ' + reason if reason else ''}"


def _warned(trial: optuna.trial.FrozenTrial) -> str:
    n = trial.user_attrs.get("convergence_warnings")
    return f"\n  {n} ConvergenceWarning(s), the last: {trial.user_attrs['convergence_warning']}" \
        if n else ""


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the dead trial that ``trial`` re-runs (the system attribute set by
    :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`), or None."""
    return trial.system_attrs.get("failed_trial")


def _retries_waiting(study: optuna.Study) -> bool:
    """Fail the trials whose heartbeat stopped (queuing their re-runs), then tell whether
    re-runs are waiting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return any(retry_of(t) is not None for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def work(s: Setup, study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Run ``n_trials`` new trials of ``study``, plus the re-runs of dead workers' trials
    it finds (before its own, and waiting when it is done); returns them in order.

    Each trial runs through :meth:`optuna.Study.optimize`, which keeps its heartbeat and
    fails stale trials first. An invalid draw fails its trial (``fail_reason``), a pruned
    run prunes it; any other error fails the trial and propagates.

    Args:
        s: the checked invocation (:func:`setup`).
        study: the study (in memory or shared through a storage).
        n_trials: the number of new trials this worker runs (re-runs come on top).

    Returns:
        The :class:`optuna.trial.FrozenTrial` s this worker ran, in order.
    """
    done: list[optuna.trial.FrozenTrial] = []
    new = 0

    def objective(trial: optuna.Trial) -> float | list[float]:
        try:
            return run_one(s, trial)
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, ConfigError) else \
                f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            raise

    def record(_: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        done.append(frozen)
        again = retry_of(frozen)
        label = f"trial {frozen.number}" + ("" if again is None else
                                           f" (re-run of trial {again})")
        print(f"{label}: {_state(frozen)}{_warned(frozen)}", file=sys.stderr)

    while new < n_trials or _retries_waiting(study):
        before = len(done)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(ConfigError,), callbacks=[record])
        if len(done) > before and retry_of(done[-1]) is None:
            new += 1
    return done


# -- best ---------------------------------------------------------------------------------

def _show(trial: optuna.trial.FrozenTrial, s: Setup) -> str:
    return ", ".join(f"{k} = {v:.6g}" for k, v in zip(s.objectives, trial.values,
                                                      strict=True))


def _pick(s: Setup, study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial | None:
    """The trial ``--best`` writes: ``--trial NUMBER``, the best of a single-objective
    study, or None (the Pareto front printed, ``pareto.json`` written) for several."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"--best: the study {study.study_name!r} has no complete trial "
                          "yet")
    if number is not None:
        found = [t for t in complete if t.number == number]
        if not found:
            raise ConfigError(f"--trial {number}: not a complete trial of the study "
                              f"{study.study_name!r} (complete: "
                              f"{', '.join(str(t.number) for t in complete)})")
        return found[0]
    if len(study.directions) == 1:
        try:
            return study.best_trial
        except ValueError as exc:  # no feasible trial
            raise ConfigError(f"--best: {exc} (relax --constraint, or pick one with "
                              "--trial NUMBER)") from None
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        raise ConfigError(f"--best: no complete trial of the study {study.study_name!r} is "
                          "within its --constraint budgets (pick one with --trial NUMBER)")
    print(f"Pareto front of study {study.study_name} ({len(front)} trials; "
          f"{', '.join(f'{d} {k}' for k, d in zip(s.objectives, s.directions, strict=True))})")
    for t in front:
        print(f"  trial {t.number}: {_show(t, s)}; {t.params}")
    s.study_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"number": t.number, "values": dict(zip(s.objectives, t.values, strict=True)),
             "params": t.params, "run_dir": t.user_attrs.get("run_dir")} for t in front]
    (s.study_dir / "pareto.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {s.study_dir / 'pareto.json'}; write one trial's config with "
          "--best --trial NUMBER")
    return None


def write_best(s: Setup, study: optuna.Study,
               number: int | None = None) -> optuna.trial.FrozenTrial | None:
    """Print the best trial (or the Pareto front); write ``best.toml`` and
    ``best_hparams.pt`` beside the trials for the best trial or trial ``number``.

    Returns:
        The trial written, or ``None`` for a multi-objective study (the Pareto front is
        printed and ``pareto.json`` written instead).

    Raises:
        ConfigError: no complete trial, no complete trial ``number``, or no feasible
            one under the constraints.
    """
    best = _pick(s, study, number)
    if best is None:
        return None
    print(f"{'trial' if number is not None else 'best trial'} {best.number}: {_show(best, s)}")
    for k, v in best.params.items():
        print(f"  {k} = {v!r}")
    s.study_dir.mkdir(parents=True, exist_ok=True)
    document = best.user_attrs.get("config")
    if not isinstance(document, Mapping):  # a trial from elsewhere: rebuild from CONFIG
        document = build_config(s.config, best.params)[0]
    document = copy.deepcopy(dict(document))
    document.setdefault("output", {})["dir"] = str(s.study_dir / "best")
    text = to_toml(document, header=f"trial {best.number} of study {study.study_name} "
                                    f"({_show(best, s)}); run it with `bilevel run` (into "
                                    "output.dir)")
    (s.study_dir / "best.toml").write_text(text)
    print(f"wrote {s.study_dir / 'best.toml'}")
    hparams = Path(best.user_attrs.get("run_dir", "")) / "hparams.pt"
    if best.user_attrs.get("run_dir") and hparams.is_file():
        shutil.copyfile(hparams, s.study_dir / "best_hparams.pt")
        print(f"wrote {s.study_dir / 'best_hparams.pt'} (from {hparams})")
    else:
        print(f"bilevel: warning: the best trial's {hparams} is not on this machine; "
              "best_hparams.pt not written", file=sys.stderr)
    return best


def _summary(study: optuna.Study, s: Setup) -> None:
    n = {st: 0 for st in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        n[t.state] += 1
    TS = optuna.trial.TrialState
    print(f"study {study.study_name}: {n[TS.COMPLETE]} complete, {n[TS.PRUNED]} pruned, "
          f"{n[TS.FAIL]} failed, {n[TS.RUNNING]} running, {n[TS.WAITING]} waiting")
    if not n[TS.COMPLETE]:
        return
    if len(s.objectives) > 1:
        front = ", ".join(str(t.number) for t in study.best_trials)
        print(f"Pareto front so far: trials {front}" if front else
              "no trial within the --constraint budgets yet")
        return
    try:
        b = study.best_trial
    except ValueError:
        print("no trial within the --constraint budgets yet")
        return
    print(f"best so far: trial {b.number}, {s.objectives[0]} = {b.value:.6g}, {b.params}")


def cmd_tune(args: argparse.Namespace) -> int:
    """``bilevel tune CONFIG --study NAME``: run a worker, or ``--best``.

    Returns:
        The exit status: 0, or 130 when interrupted (Ctrl-C).

    Raises:
        ConfigError: a bad config, space or option (``bilevel`` turns it into exit
            status 2).
    """
    s = setup(args)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line below
    if getattr(args, "trial", None) is not None and not args.best:
        raise ConfigError("--trial NUMBER goes with --best")
    given = bool(getattr(args, "objective", None))
    if args.best:
        if args.storage is None:
            raise ConfigError("--best needs the --storage the workers used (an in-memory "
                              "study ends with its worker)")
        study = open_study(args, create=False)
        write_best(check_objectives(study, s, given), study, args.trial)
        return 0
    if args.storage is None and getattr(args, "heartbeat", None):
        raise ConfigError("--heartbeat: an in-memory study has no other workers to re-run "
                          "its trials; give --storage sqlite:///tune.db or postgresql://...")
    if args.storage is None:
        if s.study_dir.exists() and any(s.study_dir.iterdir()):
            raise ConfigError(f"--out: {s.study_dir} holds an earlier study's trials; an "
                              "in-memory study restarts at trial 0, so choose another "
                              "--study or --out (or --storage to continue that study)")
        print("bilevel: the study is in memory: only this process sees it (share it "
              "between workers with --storage sqlite:///tune.db or journal:tune.log)",
              file=sys.stderr)
    study = open_study(args, s.directions)
    s = check_objectives(study, s, given)
    try:
        work(s, study, args.n_trials)
    except KeyboardInterrupt:
        me = f"{socket.gethostname()}:{os.getpid()}"
        mine = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("worker") == me and t.state == optuna.trial.TrialState.FAIL
                and "KeyboardInterrupt" in str(t.user_attrs.get("fail_reason"))]
        what = "" if not mine else (
            f": trial {mine[-1].number} is marked failed; continue its folder with "
            f"`bilevel resume {mine[-1].user_attrs['run_dir']}`")
        print(f"bilevel: interrupted{what}", file=sys.stderr)
        return 130
    _summary(study, s)
    return 0


__all__ = ["DESCRIPTION", "PRUNERS", "RUN_TOTALS", "SAMPLERS", "Constraint", "Setup",
           "add_arguments", "cmd_tune", "constraint", "final_value", "open_study",
           "retry_of", "run_one", "setup", "storage", "work", "write_best"]
