"""A typed, strictly validated TOML schema for ``bilevel run``.

Every table is a dataclass; :func:`load_config` (or :func:`parse_config` on a dict) checks
the whole file before anything runs. An unknown key, a value of the wrong type or a
missing required field raises :class:`ConfigError` naming the key path (``outer.lr``) and
the expected type. Example (``examples/configs/digits_mlp.toml``)::

    device = "cpu"
    dtype = "float32"
    seed = 0

    [model]
    kind = "mlp"
    sizes = [64]          # hidden-layer widths; input/output sizes come from the data

    [data]
    dataset = "digits"    # digits | breast_cancer | iris | wine (scikit-learn)
    train = 0.5           # fractions; the test part is the rest
    val = 0.25
    seed = 0

    [hyperparameters]
    tune = ["log_lr", "log_wd"]   # inner log-learning-rate, per-layer log weight decay
    lr = 0.1                      # initial (or fixed) values
    weight_decay = 1e-3

    [inner]
    optimizer = "sgd"     # sgd | momentum | adam
    steps = 50
    reinit = true         # re-initialise the network (fixed seed) every outer step

    [estimator]
    name = "truncated"    # a key of hypergrad.ESTIMATORS
    settings = { window = 20 }

    [outer]
    optimizer = "Adam"    # a torch.optim class
    lr = 0.05
    steps = 20
    clip_norm = 1.0
    checkpoint_every = 5
    eval_every = 1

    [output]
    dir = "runs/digits_mlp"
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hypergrad import ESTIMATORS, make_estimator

DATASETS = ("digits", "breast_cancer", "iris", "wine")
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
HPARAMS = ("log_lr", "log_wd")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key path and the expected type."""


@dataclass
class ModelConfig:
    """``[model]``: a multilayer perceptron with ReLU activations."""

    sizes: list[int]
    kind: Literal["mlp"] = "mlp"


@dataclass
class DataConfig:
    """``[data]``: a scikit-learn dataset, standardised, split train/val/test by ``seed``."""

    dataset: Literal["digits", "breast_cancer", "iris", "wine"]
    train: float = 0.5
    val: float = 0.25
    seed: int = 0
    standardize: bool = True


@dataclass
class HyperparametersConfig:
    """``[hyperparameters]``: which to tune and their initial (or fixed) values."""

    tune: list[Literal["log_lr", "log_wd"]]
    lr: float = 0.1
    weight_decay: float = 1e-3


@dataclass
class InnerConfig:
    """``[inner]``: the full-batch inner training run."""

    steps: int
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    momentum: float = 0.9
    reinit: bool = True


@dataclass
class EstimatorConfig:
    """``[estimator]``: a ``hypergrad.ESTIMATORS`` name and its keyword settings."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class OuterConfig:
    """``[outer]``: a ``torch.optim`` optimizer on the hyperparameters."""

    lr: float
    steps: int
    optimizer: str = "Adam"
    clip_norm: float | None = None
    checkpoint_every: int = 1
    eval_every: int = 1


@dataclass
class OutputConfig:
    """``[output]``: the run folder (relative paths are relative to the working directory)."""

    dir: str


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig
    data: DataConfig
    hyperparameters: HyperparametersConfig
    inner: InnerConfig
    estimator: EstimatorConfig
    outer: OuterConfig
    output: OutputConfig
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by ``dtype``."""
        return getattr(torch, self.dtype)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or omitted)"
    if origin is list:
        return f"array of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "float", str: "string", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _fail(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} "
                       f"{value!r}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursively); return the typed value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, tp, value)
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0], path)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise _fail(path, tp, value)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(path, tp, value)
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, tp, value)
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, tp, value)
        return float(value)
    if tp is int or tp is bool or tp is str:
        if type(value) is not tp:
            raise _fail(path, tp, value)
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown key (allowed in "
                              f"{'[' + prefix + ']' if prefix else 'the top level'}: "
                              f"{', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}{name}"
        if name not in table:
            required = (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING)
            if required:
                raise ConfigError(f"{path}: missing required field (expected "
                                  f"{_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(table[name], hints[name], path)
    return cls(**kwargs)


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{path}: expected a {kind} number, got {value!r}")


def _check_values(cfg: Config) -> None:
    """Range and registry checks beyond the types."""
    if not cfg.model.sizes or any(s < 1 for s in cfg.model.sizes):
        raise ConfigError(f"model.sizes: expected a non-empty array of positive integers, got "
                          f"{cfg.model.sizes!r}")
    d = cfg.data
    if not (0 < d.train < 1 and 0 < d.val < 1 and d.train + d.val < 1):
        raise ConfigError(f"data.train, data.val: expected fractions in (0, 1) with "
                          f"train + val < 1 (test is the rest), got {d.train!r}, {d.val!r}")
    h = cfg.hyperparameters
    if len(set(h.tune)) != len(h.tune) or not h.tune:
        raise ConfigError(f"hyperparameters.tune: expected a non-empty array of distinct "
                          f"names from {HPARAMS}, got {h.tune!r}")
    _positive("hyperparameters.lr", h.lr)
    _positive("hyperparameters.weight_decay", h.weight_decay)
    _positive("inner.steps", cfg.inner.steps)
    _positive("outer.lr", cfg.outer.lr)
    _positive("outer.steps", cfg.outer.steps)
    _positive("outer.checkpoint_every", cfg.outer.checkpoint_every, allow_zero=True)
    _positive("outer.eval_every", cfg.outer.eval_every, allow_zero=True)
    if cfg.outer.clip_norm is not None:
        _positive("outer.clip_norm", cfg.outer.clip_norm)
    opt = getattr(torch.optim, cfg.outer.optimizer, None)
    if not (isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer)):
        raise ConfigError(f"outer.optimizer: expected the name of a torch.optim optimizer "
                          f"(e.g. 'Adam', 'SGD'), got {cfg.outer.optimizer!r}")
    if cfg.estimator.name not in ESTIMATORS:
        raise ConfigError(f"estimator.name: expected one of {sorted(ESTIMATORS)}, got "
                          f"{cfg.estimator.name!r}")
    try:
        make_estimator(cfg.estimator.name, **cfg.estimator.settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"estimator.settings: invalid for {cfg.estimator.name!r}: "
                          f"{exc}") from None
    try:
        torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"device: expected a torch device string, got {cfg.device!r} "
                          f"({exc})") from None


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document and return the typed :class:`Config`."""
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file (:class:`ConfigError` on any problem)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(data)


__all__ = ["Config", "ConfigError", "DataConfig", "EstimatorConfig", "HyperparametersConfig",
           "InnerConfig", "ModelConfig", "OuterConfig", "OutputConfig", "load_config",
           "parse_config"]
