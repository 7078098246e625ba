"""The ``[search]`` table: an Optuna search space over a config's own keys.

Optuna searches the discrete settings of a ``bilevel run`` config (the estimator and its
budget, the inner optimizer, the architecture, the outer learning rate, the initial values
of the hyperparameters); hypergradients tune the continuous hyperparameters inside each
trial. The space sits beside the config in the same TOML file::

    [search]
    "inner.steps" = { int = [10, 100], step = 10 }
    "outer.lr" = { float = [1e-3, 1e-1], log = true }
    "estimator.name" = { categorical = ["truncated", "implicit"] }
    "estimator.settings.window" = { int = [5, 40] }      # only when "truncated" is drawn
    "model.sizes[0]" = { int = [16, 128], log = true }   # an element of an array

A key is a dotted config key path, quoted (unquoted dotted keys, ``inner.steps = {...}``,
make nested TOML tables and mean the same). A spec has exactly one of ``int = [low,
high]``, ``float = [low, high]`` or ``categorical = [v, ...]``, and for ``int``/``float``
optionally ``log = true`` (low > 0) or ``step = s`` (> 0; high - low a multiple of it), not
both. The value is Optuna's ``trial.suggest_int/float/categorical`` under the key path as
parameter name. ``int`` needs an integer key, ``float`` a float key; ``categorical``
values must each make a valid config (as must ``low`` and ``high``: the ranges the config
allows, ``inner.steps`` positive and the like, are checked by the config's own validator,
which is also what names the problem).

``estimator.settings.NAME`` searches one keyword setting of the estimator; it must be
taken by the estimator (or, when ``estimator.name`` is searched, by at least one of its
choices) and is suggested only in trials whose estimator takes it. When a trial changes
``estimator.name``, settings of the base config the new estimator does not take are dropped.

The linear solver of the implicit estimators is a setting too: ``"estimator.settings.solver"
= { categorical = ["cg", "gmres"] }`` searches its kind (a
:data:`hypergrad.linear_solve.SOLVERS` name) and ``"estimator.settings.solver.maxiter" = {
int = [5, 50] }`` or ``"estimator.settings.solver.damping" = { float = [1e-4, 1e-1], log =
true }`` its budget and damping, on the solver the base config names (``solver = { name =
"cg", maxiter = 20 }`` in ``[estimator.settings]``) or the estimator's default (CG; GMRES for
``fixed_point``).

Not searchable (each refusal says why): ``[data]`` (the validation objective every trial
is scored on), ``[output]`` (each trial writes its own folder), ``device`` and ``dtype``
(the worker's setup, the same for every trial), every ``seed`` (a better seed is noise,
not a setting), ``hyperparameters.tune`` (the problem itself; search the initial values
``hyperparameters.lr``/``weight_decay`` instead), ``model.kind`` (the other ``[model]``
keys depend on it), ``outer.checkpoint_every``/``eval_every`` (bookkeeping),
``estimator.settings.self_check`` (a safety check) and settings TOML cannot express
(a solver's ``preconditioner``). Any error is a :class:`~bilevel.config.ConfigError`
naming the key as ``search."outer.lr"``; ``bilevel`` turns it into exit status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hypergrad import ESTIMATORS, make_estimator
from hypergrad.linear_solve import SOLVERS

from ..config import Config, ConfigError, parse_config

if TYPE_CHECKING:
    import optuna

#: the TOML table holding the search space
SEARCH_TABLE = "search"
KINDS = ("int", "float", "categorical")
#: the estimator setting holding a linear solver: a SOLVERS name or a table of its settings
SOLVER = "solver"
_SOLVER_PATH = f"estimator.settings.{SOLVER}"
SPEC_FIELDS = (*KINDS, "log", "step")

_SEEDS = "a seed is not a setting: searching it fits the noise of one draw"
#: key paths (and everything below them) that cannot be searched, with the reason
UNSEARCHABLE: dict[str, str] = {
    "data": "[data] defines the validation objective every trial is scored on",
    "output": "each trial writes its own run folder",
    "device": "the worker's machine setting, the same for every trial",
    "dtype": "the worker's numerical setup, the same for every trial",
    "seed": _SEEDS,
    "estimator.settings.seed": _SEEDS,
    "hyperparameters.tune": "which hyperparameters hypergradients tune is the problem itself; "
                            "search their initial values (hyperparameters.lr, "
                            "hyperparameters.weight_decay) instead",
    "model.kind": "the other [model] keys depend on it; search the keys of one kind",
    "outer.checkpoint_every": "bookkeeping, not a setting",
    "outer.eval_every": "bookkeeping, not a setting",
    "estimator.settings.self_check": "a safety check, not a setting",
}

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\[(\d+)\])?$")
_SCALARS = (bool, int, float, str)


def _key(path: str) -> str:
    return f'{SEARCH_TABLE}."{path}"'


def _error(path: str, message: str) -> ConfigError:
    return ConfigError(f"{_key(path)}: {message}")


def split_search(document: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a TOML document into ``(config, search table)`` (``{}`` when there is none).

    Args:
        document: the parsed TOML file (``tomllib.load``), a dict.

    Returns:
        ``(config, table)``: new dicts, the config without ``[search]`` and that table.

    Raises:
        ConfigError: ``search`` is not a table.
    """
    config = {k: v for k, v in document.items() if k != SEARCH_TABLE}
    table = document.get(SEARCH_TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{SEARCH_TABLE}: expected a table of key paths to specs, got "
                          f"{type(table).__name__} {table!r}")
    return config, table


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, spec)`` pairs; nested tables (unquoted dotted keys) are walked."""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) & set(SPEC_FIELDS) \
                and all(isinstance(v, dict) for v in value.values()):
            yield from _flatten(value, f"{path}.")
        else:
            yield path, value


# -- key paths and their schema types -----------------------------------------------------

def _optional(tp: Any) -> Any:
    """``X`` for ``X | None``; ``tp`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _takes(estimator: str, setting: str) -> bool:
    cls = ESTIMATORS[estimator][0]
    return any(f.name == setting and f.init for f in dataclasses.fields(cls))


def _setting_type(path: str, setting: str, candidates: tuple[str, ...]) -> tuple[Any, tuple]:
    """The annotation of an estimator setting and the candidate estimators taking it."""
    takers = tuple(e for e in candidates if e in ESTIMATORS and _takes(e, setting))
    if not takers:
        raise _error(path, f"unknown key: no estimator of {list(candidates)} takes a setting "
                           f"{setting!r}")
    return typing.get_type_hints(ESTIMATORS[takers[0]][0])[setting], takers


def default_solver(estimator: str) -> str | None:
    """The :data:`hypergrad.linear_solve.SOLVERS` name of ``estimator``'s default linear
    solver (``"cg"``; ``"gmres"`` for ``fixed_point``), None if it takes no solver."""
    if estimator not in ESTIMATORS or not _takes(estimator, SOLVER):
        return None
    solver = getattr(make_estimator(estimator), "linear_solver", None)
    return next((n for n, c in SOLVERS.items() if type(solver) is c), None)


def _solver_name(settings: Any, estimator: str) -> str | None:
    solver = settings.get(SOLVER) if isinstance(settings, dict) else None
    if isinstance(solver, str):
        return solver
    if isinstance(solver, dict) and isinstance(solver.get("name"), str):
        return solver["name"]
    return default_solver(estimator)


def _solver_field(path: str, field: str, base: Mapping[str, Any],
                  estimators: tuple[str, ...], solvers: tuple[str, ...] = ()
                  ) -> tuple[Any, tuple]:
    """``estimator.settings.solver.FIELD``: the field's annotation in the linear solver the
    base config (or the estimator's default) uses, or in every one of ``solvers`` (the
    choices when the solver is searched too), and the estimators taking a solver."""
    takers = _setting_type(path, SOLVER, estimators)[1]
    est = base.get("estimator", {}) if isinstance(base.get("estimator"), dict) else {}
    names = set(solvers) or {_solver_name(est.get("settings"), e) for e in takers} - {None}
    if field == "name":
        raise _error(path, f"search the solver as \"estimator.settings.{SOLVER}\" = "
                           f"{{ categorical = {sorted(SOLVERS)} }}")
    for name in sorted(names):
        cls = SOLVERS.get(name)
        if cls is None:
            raise _error(path, f"unknown solver {name!r} in estimator.settings.solver "
                               f"(choose from {sorted(SOLVERS)})")
        if not any(f.name == field and f.init for f in dataclasses.fields(cls)):
            raise _error(path, f"unknown key: the {name!r} solver takes "
                               f"{', '.join(f.name for f in dataclasses.fields(cls) if f.init)}")
    return typing.get_type_hints(SOLVERS[sorted(names)[0]])[field], takers


def _resolve(path: str, base: Mapping[str, Any], estimators: tuple[str, ...],
             solvers: tuple[str, ...] = ()) -> tuple[Any, tuple]:
    """The schema annotation of ``path`` (an element's for ``key[i]``), and for an estimator
    setting the estimators taking it (``()`` otherwise). Refuses unknown and unsearchable
    keys, tables and whole arrays."""
    if not _PATH.match(path):
        raise _error(path, "expected a dotted config key path such as \"outer.lr\" or "
                           "\"model.sizes[0]\"")
    name, _, index = path.partition("[")
    for refused, why in UNSEARCHABLE.items():
        if name == refused or name.startswith(refused + "."):
            raise _error(path, f"cannot be searched ({why})")
    if name.rsplit(".", 1)[-1] == "seed":
        raise _error(path, f"cannot be searched ({_SEEDS})")
    parts = name.split(".")
    cls: Any = Config
    table: Any = base
    takers: tuple = ()
    for i, part in enumerate(parts):
        if cls is dict:  # estimator.settings.NAME
            if part == SOLVER and i == len(parts) - 2:  # estimator.settings.solver.FIELD
                tp, takers = _solver_field(path, parts[-1], base, estimators, solvers)
                break
            if i != len(parts) - 1:
                raise _error(path, "unknown key (estimator settings are not tables, except "
                                   "solver: e.g. \"estimator.settings.solver.maxiter\")")
            tp, takers = _setting_type(path, part, estimators)
            if part == SOLVER:  # a SOLVERS name
                tp = str
            break
        hints = typing.get_type_hints(cls)
        if cls is not Config and "kind" in hints:  # [model]: the base config's kind
            hints.pop("kind")
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            if cls is not Config and "kind" in typing.get_type_hints(cls):
                where += f" (kind = {typing.get_args(typing.get_type_hints(cls)['kind'])[0]!r})"
            raise _error(path, f"unknown key (not in the config schema; {where} has: "
                               f"{', '.join(hints)})")
        tp = hints[part]
        table = table.get(part, {}) if isinstance(table, dict) else {}
        options = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if options:  # a table chosen by its kind
            kind = table.get("kind", typing.get_args(typing.get_type_hints(options[0])["kind"])[0])
            tp = next(o for o in options if kind in typing.get_args(
                typing.get_type_hints(o)["kind"]))
        if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
            cls = tp if dataclasses.is_dataclass(tp) else dict
            if i == len(parts) - 1:
                example = "NAME" if cls is dict else dataclasses.fields(cls)[0].name
                raise _error(path, f"a table: search its keys one by one, e.g. "
                                   f"\"{name}.{example}\"")
            continue
        if i != len(parts) - 1:
            raise _error(path, f"unknown key ({'.'.join(parts[:i + 1])} is not a table)")
    tp = _optional(tp)
    if typing.get_origin(tp) is list:
        if not index:
            raise _error(path, f"an array: search its elements, e.g. \"{name}[0]\"")
        length = len(table) if isinstance(table, list) else 0
        if int(index[:-1]) >= length:
            raise _error(path, f"{name} has {length} element(s) in the config; index "
                               f"{index[:-1]} is out of range")
        return _optional(typing.get_args(tp)[0]), takers
    if index:
        raise _error(path, f"{name} is not an array")
    if tp not in _SCALARS and typing.get_origin(tp) is not Literal:
        raise _error(path, "cannot be searched (its value cannot be written in TOML)")
    return tp, takers


# -- specs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One searched key: ``kind`` is ``"int"``, ``"float"`` or ``"categorical"``.

    ``estimators`` is, for an estimator setting, the estimators that take it (the value is
    suggested only when the trial's estimator is one of them); ``None`` otherwise.

    Attributes:
        path: the dotted config key path (the Optuna parameter name), e.g.
            ``"outer.lr"`` or ``"model.sizes[0]"``.
        kind: ``"int"``, ``"float"`` or ``"categorical"``.
        low, high: the bounds (inclusive) of ``int``/``float``, in the key's own units
            (e.g. a learning rate).
        step: the grid spacing (``None``: continuous, or every int).
        log: sample uniformly in log space (``low > 0``).
        choices: the values of ``categorical``.
        estimators: see above.
    """

    path: str
    kind: Literal["int", "float", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    estimators: tuple[str, ...] | None = None

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of this key."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        """Ask ``trial`` for this key's value (the key path is the parameter name)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> tuple[Any, ...]:
        """The values that bound the range: ``low`` and ``high``, or every choice."""
        return self.choices if self.kind == "categorical" else (self.low, self.high)


def _number(path: str, value: Any, integer: bool, what: str) -> int | float:
    ok = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok):
        raise _error(path, f"{what}: expected {'an integer' if integer else 'a number'}, got "
                           f"{type(value).__name__} {value!r}")
    if not integer and not math.isfinite(value):
        raise _error(path, f"{what}: expected a finite number, got {value!r}")
    return value if integer else float(value)


def _parse_spec(path: str, spec: Any, tp: Any, takers: tuple) -> Spec:
    if not isinstance(spec, dict):
        raise _error(path, f"expected a spec table such as {{ float = [1e-3, 1e-1], log = "
                           f"true }}, got {type(spec).__name__} {spec!r}")
    unknown = [k for k in spec if k not in SPEC_FIELDS]
    if unknown:
        raise _error(path, f"unknown spec field(s) {', '.join(map(repr, unknown))} (allowed: "
                           f"{', '.join(SPEC_FIELDS)})")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise _error(path, f"expected exactly one of int, float, categorical, got "
                           f"{', '.join(kinds) if kinds else 'none'}")
    (kind,) = kinds
    estimators = takers or None
    if kind == "categorical":
        if "log" in spec or "step" in spec:
            raise _error(path, "log and step apply to int and float, not categorical")
        choices = spec[kind]
        if not isinstance(choices, list) or not choices:
            raise _error(path, f"categorical: expected a non-empty array of values, got "
                               f"{choices!r}")
        seen = set()
        for c in choices:
            if not isinstance(c, _SCALARS):
                raise _error(path, f"categorical: choices must be strings, numbers or "
                                   f"booleans, got {type(c).__name__} {c!r}")
            if (type(c), c) in seen:
                raise _error(path, f"categorical: {c!r} is given twice")
            seen.add((type(c), c))
        return Spec(path, "categorical", choices=tuple(choices), estimators=estimators)
    integer = kind == "int"
    want = int if integer else float
    if tp is not want:
        hint = "use categorical" if tp in (bool, str) or typing.get_origin(tp) is Literal \
            else f"use {'float' if integer else 'int'}"
        raise _error(path, f"{kind} needs a{'n integer' if integer else ' float'} key, but "
                           f"{path} is {getattr(tp, '__name__', tp)} ({hint})")
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise _error(path, f"{kind}: expected [low, high], got {bounds!r}")
    low = _number(path, bounds[0], integer, "low")
    high = _number(path, bounds[1], integer, "high")
    if low > high:
        raise _error(path, f"low > high ({low!r} > {high!r})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _error(path, f"log: expected a boolean, got {type(log).__name__} {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(path, step, integer, "step")
        if step <= 0:
            raise _error(path, f"step: expected a positive number, got {step!r}")
        if log:
            raise _error(path, "step and log = true cannot be combined (Optuna samples a log "
                               "scale continuously)")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise _error(path, f"high - low = {high - low!r} is not a multiple of step = "
                               f"{step!r}")
    if log and low <= 0:
        raise _error(path, f"log = true needs low > 0, got low = {low!r}")
    return Spec(path, kind, low, high, step, log, estimators=estimators)


# -- the space ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpace:
    """A validated ``[search]`` table: build with :meth:`from_table`."""

    specs: tuple[Spec, ...]

    @classmethod
    def from_table(cls, table: Mapping[str, Any], config: Mapping[str, Any]) -> SearchSpace:
        """Parse and check ``table`` (the ``[search]`` table) against ``config`` (the raw
        config dict, without ``[search]``; it must itself be valid). Every bound and choice
        is applied to ``config`` and checked by :func:`~bilevel.config.parse_config`.

        Raises:
            ConfigError: naming the key as ``search."outer.lr"``: an unknown or
                unsearchable key, a malformed spec, or a bound or choice that makes an
                invalid config.
        """
        base = parse_config(copy.deepcopy(dict(config)))
        pairs = list(_flatten(table))
        seen = set()
        for path, _ in pairs:
            if path in seen:
                raise _error(path, "given twice (quoted and as nested tables)")
            seen.add(path)
        names = next((s for p, s in pairs if p == "estimator.name"), None)
        candidates = (base.estimator.name,)
        if isinstance(names, dict) and isinstance(names.get("categorical"), list):
            candidates = tuple(c for c in names["categorical"] if isinstance(c, str))
        drawn = next((s for p, s in pairs if p == _SOLVER_PATH), None)
        solvers: tuple[str, ...] = ()
        if isinstance(drawn, dict) and isinstance(drawn.get("categorical"), list):
            solvers = tuple(c for c in drawn["categorical"] if isinstance(c, str))
        specs = []
        for path, raw in pairs:
            tp, takers = _resolve(path, config, candidates, solvers)
            specs.append(_parse_spec(path, raw, tp, takers))
        # plain keys first, so that estimator.name is drawn before the settings it gates
        space = cls(tuple(sorted(specs, key=lambda s: s.estimators is not None)))
        space._check_values(config)
        return space

    def _check_values(self, config: Mapping[str, Any]) -> None:
        for spec in self.specs:
            for value in spec.values():
                for est in spec.estimators or (None,):
                    values = {spec.path: value}
                    if est is not None:
                        values = {"estimator.name": est, **values}
                    try:
                        parse_config(apply(config, values))
                    except ConfigError as exc:
                        what = "choice" if spec.kind == "categorical" else \
                            "low" if value == spec.low else "high"
                        with_est = f" with estimator.name = {est!r}" if est else ""
                        raise _error(spec.path, f"{what} = {value!r}{with_est} is not a valid "
                                                f"config value: {exc}") from None

    def __iter__(self) -> Iterator[Spec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def paths(self) -> tuple[str, ...]:
        """The searched key paths (the Optuna parameter names)."""
        return tuple(s.path for s in self.specs)

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Draw the trial's values: ``{key path: value}`` (settings the trial's estimator
        does not take are left out)."""
        values: dict[str, Any] = {}
        for spec in self.specs:
            if spec.estimators is not None:
                name = values.get("estimator.name", spec.estimators[0])
                if name not in spec.estimators:
                    continue
            values[spec.path] = spec.suggest(trial)
        return values

    def to_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """``{key path: Optuna distribution}``, e.g. for ``optuna.trial.create_trial``."""
        return {s.path: s.distribution() for s in self.specs}


# -- applying values ----------------------------------------------------------------------

def apply(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A new raw config dict with ``values`` (``{key path: value}``) set; ``config`` is left
    untouched. Missing tables are created. When ``estimator.name`` changes, base settings
    the new estimator does not take are dropped."""
    out = copy.deepcopy(dict(config))
    name = values.get("estimator.name")
    if name is not None and name in ESTIMATORS and isinstance(out.get("estimator"), dict):
        est = out["estimator"]
        if name != est.get("name") and isinstance(est.get("settings"), dict):
            est["settings"] = {k: v for k, v in est["settings"].items() if _takes(name, k)}
    for path, value in values.items():
        name_part, _, index = path.partition("[")
        *tables, leaf = name_part.split(".")
        if tables[:3] == ["estimator", "settings", SOLVER] or name_part == _SOLVER_PATH:
            _apply_solver(out, leaf if len(tables) == 3 else None, value,
                          name if name is not None else out.get("estimator", {}).get("name"))
            continue
        node = out
        for t in tables:
            node = node.setdefault(t, {})
        if index:
            node[leaf][int(index[:-1])] = value
        else:
            node[leaf] = value
    return out


def _apply_solver(out: dict[str, Any], field: str | None, value: Any,
                  estimator: Any) -> None:
    """Set the solver's name (``field`` None) or one of its settings, turning a solver
    given by name (or the estimator's default) into a table ``{name = ..., FIELD = ...}``."""
    settings = out.setdefault("estimator", {}).setdefault("settings", {})
    solver = settings.get(SOLVER)
    if field is None:
        if isinstance(solver, dict):
            solver["name"] = value
        else:
            settings[SOLVER] = value
        return
    if not isinstance(solver, dict):
        solver = {"name": solver if isinstance(solver, str) else
                  default_solver(estimator) if isinstance(estimator, str) else None}
        settings[SOLVER] = solver
    solver[field] = value


def build_config(config: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[dict, Config]:
    """:func:`apply` then validate: ``(raw dict, Config)``.

    Raises:
        ConfigError: naming the trial's values when their combination is not a valid
            config.
    """
    document = apply(config, values)
    try:
        return document, parse_config(copy.deepcopy(document))
    except ConfigError as exc:
        shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
        raise ConfigError(f"{SEARCH_TABLE}: the trial's values ({shown}) make an invalid "
                          f"config: {exc}") from None


# -- writing TOML -------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else \
            {"inf": "inf", "-inf": "-inf"}.get(repr(value), "nan")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {_toml_value(v, f'{path}.{k}')}" for k, v in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ValueError(f"{path}: {type(value).__name__} {value!r} cannot be written as TOML")


def to_toml(document: Mapping[str, Any], header: str = "") -> str:
    """``document`` as TOML text (``tomllib.loads`` gives it back): top-level tables as
    ``[name]`` sections, deeper tables inline. Values: tables, strings, integers, floats,
    booleans and arrays of those. ``header`` is written first as ``#`` comment lines.

    Raises:
        ValueError: a value TOML cannot express (``None``, an object), naming its key.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    scalars = {k: v for k, v in document.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    lines += [f"{_toml_key(k)} = {_toml_value(v, k)}" for k, v in scalars.items()]
    for name, table in tables.items():
        lines += ["", f"[{_toml_key(name)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v, f'{name}.{k}')}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


__all__ = ["SEARCH_TABLE", "UNSEARCHABLE", "SearchSpace", "Spec", "apply", "build_config",
           "default_solver",
           "split_search", "to_toml"]
