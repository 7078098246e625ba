"""``bilevel tune CONFIG --study NAME``: one Optuna worker over a config's ``[search]`` table.

Each trial draws the ``[search]`` values (:meth:`SearchSpace.suggest`), builds the trial's
config (:func:`build_config`) and runs it exactly as ``bilevel run`` does
(:func:`bilevel.cli.run_config`) in the run folder ``OUT/<study>/trial-<number>``, with an
:class:`OptunaPruning` callback on the monitored metric (``eval_val_loss`` by default).
The trial's value is the final monitored value; its user attributes hold the run folder
(``run_dir``), the drawn values (``values``) and the whole config (``config``). A draw that
makes an invalid config is a failed trial (``fail_reason``), a diverging run a pruned one;
the worker goes on.

``--storage`` shares the study between processes: an Optuna storage URL
(``sqlite:///tune.db``, ``postgresql://...``) or ``journal:PATH`` (a
:class:`optuna.storages.JournalStorage` on a file). Starting the same command N times
makes N workers on one study (``create_study(load_if_exists=True)``). Without it the study
lives in this process only. ``--best`` prints the best trial and writes
``OUT/<study>/best.toml`` (its config, runnable with ``bilevel run``) and
``OUT/<study>/best_hparams.pt`` (a copy of its tuned ``hparams.pt``).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..arguments import non_negative_int
from ..config import Config, ConfigError, parse_config, tomllib
from .pruning import DIRECTIONS, OptunaPruning, run_trial
from .search import SearchSpace, build_config, split_search, to_toml

DESCRIPTION = (
    "Run one Optuna worker on the study NAME: each trial draws the values of CONFIG's "
    "[search] table, runs the resulting config as `bilevel run` does into "
    "OUT/NAME/trial-<number> and scores it by the final monitored metric; bad trials are "
    "pruned. Start the same command several times with one --storage to share the study. "
    "--best writes OUT/NAME/best.toml and best_hparams.pt from the best trial.")

#: ``--pruner`` choices: name -> factory
PRUNERS: dict[str, Any] = {
    "median": lambda: optuna.pruners.MedianPruner(),
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(),
    "none": lambda: optuna.pruners.NopPruner(),
}
#: the evaluation metrics a `bilevel run` records (as ``eval_<name>``)
EVAL_METRICS = ("val_loss", "val_acc")
DEFAULT_OUT = "runs/tune"
JOURNAL = "journal:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``bilevel tune``."""
    p.add_argument("config", metavar="CONFIG", help="TOML config file with a [search] table")
    p.add_argument("--study", required=True, metavar="NAME", help="Optuna study name")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage shared by the workers: sqlite:///PATH.db (any "
                   "RDB URL) or journal:PATH (a journal file); default: in-memory (this "
                   "process only)")
    p.add_argument("--n-trials", type=non_negative_int, default=10, metavar="N",
                   help="trials this worker runs (default: 10)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"trials go into DIR/NAME/trial-<number> (default: {DEFAULT_OUT})")
    p.add_argument("--monitor", metavar="KEY",
                   help="record key reported to the pruner and scored: eval_val_loss "
                   "(default; outer_loss when outer.eval_every = 0), eval_val_acc, "
                   "outer_loss, ...")
    p.add_argument("--pruner", choices=tuple(PRUNERS), default="median",
                   help="Optuna pruner (default: median)")
    p.add_argument("--direction", choices=DIRECTIONS,
                   help="study direction (default: maximize for an accuracy monitor, "
                   "minimize otherwise)")
    p.add_argument("--best", action="store_true",
                   help="do not run: print the study's best trial and write "
                   "DIR/NAME/best.toml and best_hparams.pt")


# -- setup --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """A checked ``bilevel tune`` invocation: the base config, its space, the monitor."""

    config: dict[str, Any]
    base: Config
    space: SearchSpace
    monitor: str
    direction: str
    study_dir: Path


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


def _monitor(base: Config, monitor: str | None) -> str:
    if monitor is None:
        return "eval_val_loss" if base.outer.eval_every else "outer_loss"
    if monitor.startswith("eval_"):
        if not base.outer.eval_every:
            raise ConfigError(f"--monitor {monitor}: the config never evaluates "
                              "(outer.eval_every = 0); monitor outer_loss")
        if monitor[5:] not in EVAL_METRICS:
            raise ConfigError(f"--monitor {monitor}: a run evaluates "
                              f"{', '.join('eval_' + m for m in EVAL_METRICS)}")
    return monitor


def setup(args: argparse.Namespace) -> Setup:
    """Read and check CONFIG, its ``[search]`` table and the monitor (ConfigError naming
    the key), before any work."""
    config, table = split_search(_read(Path(args.config)))
    if not table:
        raise ConfigError(f"{args.config}: no [search] table: add one, e.g. "
                          '[search] "outer.lr" = { float = [1e-3, 1e-1], log = true }')
    base = parse_config(copy.deepcopy(config))
    space = SearchSpace.from_table(table, config)
    monitor = _monitor(base, args.monitor)
    direction = args.direction or ("maximize" if monitor.endswith("acc") else "minimize")
    if "/" in args.study or args.study in ("", ".", ".."):
        raise ConfigError(f"--study: {args.study!r} must be usable as a folder name")
    return Setup(config, base, space, monitor, direction, Path(args.out) / args.study)


#: SQLAlchemy errors of workers creating a new database's tables at the same time
_RACES = ("OperationalError", "IntegrityError")


def _rdb(url: str) -> Any:
    """An :class:`optuna.storages.RDBStorage`; workers starting together on a new SQLite
    file race to create its tables (``table ... already exists``, a ``UNIQUE`` constraint
    on ``alembic_version``), so that is retried, and
    SQLite waits up to a minute for a locked database."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:
            if type(exc).__name__ not in _RACES or attempt == 9:
                raise ConfigError(f"--storage {url}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0]}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def storage(url: str | None) -> Any:
    """``--storage``: ``None`` (in-memory), ``journal:PATH`` or an Optuna storage URL."""
    if url is None:
        return None
    if not url.startswith(JOURNAL):
        return _rdb(url)
    path = url[len(JOURNAL):]
    if not path:
        raise ConfigError("--storage: journal: needs a file, e.g. journal:tune.log")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(path))


def open_study(args: argparse.Namespace, direction: str | None = None,
               create: bool = True) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; a study of the other direction is
    refused."""
    where = storage(args.storage)
    try:
        if not create:
            return optuna.load_study(study_name=args.study, storage=where)
        study = optuna.create_study(study_name=args.study, storage=where, load_if_exists=True,
                                    direction=direction, pruner=PRUNERS[args.pruner]())
    except KeyError:
        raise ConfigError(f"--study: no study {args.study!r} in {args.storage}") from None
    except (ValueError, ImportError, OSError, RuntimeError) as exc:
        raise ConfigError(f"--storage {args.storage}: {type(exc).__name__}: {exc}") from None
    have = study.direction.name.lower()
    if direction is not None and have != direction:
        raise ConfigError(f"--direction {direction}: the study {args.study!r} in "
                          f"{args.storage} is to {have}")
    return study


# -- trials -------------------------------------------------------------------------------

def _final(history: list[dict[str, Any]], monitor: str) -> float:
    for record in reversed(history):
        if record.get(monitor) is not None:
            return float(record[monitor])
    raise ConfigError(f"--monitor {monitor}: not in the run's records")


def run_one(s: Setup, trial: optuna.Trial) -> float:
    """One trial: draw, build, run with pruning; returns the final monitored value.

    Raises :class:`ConfigError` (invalid draw) or :class:`optuna.TrialPruned`."""
    start = time.perf_counter()
    values = s.space.suggest(trial)
    trial.set_user_attr("values", values)
    out = s.study_dir / f"trial-{trial.number}"
    trial.set_user_attr("run_dir", str(out.resolve()))
    base = {**s.config, "output": {**s.config.get("output", {}), "dir": str(out)}}
    document, cfg = build_config(base, values)
    trial.set_user_attr("config", document)
    shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
    text = to_toml(document, header=f"trial {trial.number} of study {trial.study.study_name}: "
                                     f"{shown}")
    from ..cli import run_config  # bilevel.cli imports this module

    pruning = OptunaPruning(trial, s.monitor)
    history: list[dict[str, Any]] = []

    def runner(loop: Any, steps: int) -> list[dict[str, Any]]:
        history.extend(run_trial(loop, steps, pruning))
        return history

    run_config(cfg, text, document, out, "new", callbacks=(pruning,), runner=runner,
               start=start)
    return _final(history, s.monitor)


def _state(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return f"value {trial.value:.6g}"
    reason = trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason", "")
    return f"{trial.state.name.lower()}{': ' + reason if reason else ''}"


def work(s: Setup, study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Run ``n_trials`` trials of ``study`` (ask/tell); returns them. An invalid draw fails
    its trial (``fail_reason``), a pruned run prunes it; any other error fails the trial
    and propagates."""
    done = []
    for _ in range(n_trials):
        trial = study.ask()
        try:
            value = run_one(s, trial)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except ConfigError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except BaseException as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        else:
            frozen = study.tell(trial, value)
        print(f"trial {frozen.number}: {_state(frozen)}", file=sys.stderr)
        done.append(frozen)
    return done


# -- best ---------------------------------------------------------------------------------

def write_best(s: Setup, study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Print the best trial; write ``best.toml`` and ``best_hparams.pt`` beside the trials."""
    try:
        best = study.best_trial
    except ValueError:
        raise ConfigError(f"--best: the study {study.study_name!r} has no complete trial "
                          "yet") from None
    print(f"best trial {best.number}: {s.monitor} = {best.value:.6g}")
    for k, v in best.params.items():
        print(f"  {k} = {v!r}")
    s.study_dir.mkdir(parents=True, exist_ok=True)
    document = best.user_attrs.get("config")
    if not isinstance(document, Mapping):  # a trial from elsewhere: rebuild from CONFIG
        document = build_config(s.config, best.params)[0]
    document = copy.deepcopy(dict(document))
    document.setdefault("output", {})["dir"] = str(s.study_dir / "best")
    text = to_toml(document, header=f"best trial {best.number} of study {study.study_name} "
                                    f"({s.monitor} = {best.value:.6g}); run it with "
                                    "`bilevel run` (into output.dir)")
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


def cmd_tune(args: argparse.Namespace) -> int:
    """``bilevel tune CONFIG --study NAME``: run a worker, or ``--best``."""
    s = setup(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.best:
        if args.storage is None:
            raise ConfigError("--best needs the --storage the workers used (an in-memory "
                              "study ends with its worker)")
        write_best(s, open_study(args, create=False))
        return 0
    if args.storage is None:
        if s.study_dir.exists() and any(s.study_dir.iterdir()):
            raise ConfigError(f"--out: {s.study_dir} holds an earlier study's trials; an "
                              "in-memory study restarts at trial 0, so choose another "
                              "--study or --out (or --storage to continue that study)")
        print("bilevel: the study is in memory: only this process sees it (share it "
              "between workers with --storage sqlite:///tune.db or journal:tune.log)",
              file=sys.stderr)
    study = open_study(args, s.direction)
    work(s, study, args.n_trials)
    n = {st: 0 for st in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        n[t.state] += 1
    print(f"study {args.study}: {n[optuna.trial.TrialState.COMPLETE]} complete, "
          f"{n[optuna.trial.TrialState.PRUNED]} pruned, {n[optuna.trial.TrialState.FAIL]} "
          f"failed, {n[optuna.trial.TrialState.RUNNING]} running")
    if n[optuna.trial.TrialState.COMPLETE]:
        b = study.best_trial
        print(f"best so far: trial {b.number}, {s.monitor} = {b.value:.6g}, {b.params}")
    return 0


__all__ = ["DESCRIPTION", "PRUNERS", "Setup", "add_arguments", "cmd_tune", "open_study",
           "run_one", "setup", "storage", "work", "write_best"]
