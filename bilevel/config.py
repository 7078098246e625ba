"""A typed, strictly validated TOML schema for ``bilevel run``.

Every table is a dataclass; :func:`load_config` (or :func:`parse_config` on a dict) checks
the whole file before anything runs. An unknown key, a value of the wrong type or a
missing required field raises :class:`ConfigError` naming the key path (``outer.lr``) and
the expected type. ``[model]`` is one of two tables chosen by its ``kind``; keys of the
other kind are unknown keys. Example (``examples/configs/digits_mlp.toml``)::

    device = "cpu"
    dtype = "float32"
    seed = 0

    [model]
    kind = "mlp"
    sizes = [64]          # hidden-layer widths; input/output sizes come from the data

    [data]
    dataset = "digits"    # digits | breast_cancer | iris | wine (scikit-learn),
                          # fashion_mnist, or a path (see below)
    train = 0.5           # fractions; the test part is the rest
    val = 0.25
    seed = 0
    # limit = 500         # optional: at most this many training examples
    # root = "/data"      # optional: the folder of a named dataset's files (fashion_mnist)

    [hyperparameters]
    tune = ["log_lr", "log_wd"]   # inner log-learning-rate, per-layer log weight decay
    lr = 0.1                      # initial (or fixed) values
    weight_decay = 1e-3

    [inner]
    optimizer = "sgd"     # a name of hypergrad.OPTIMIZERS: sgd, momentum, adam, ...
    steps = 50
    reinit = true         # re-initialise the network (fixed seed) every outer step

    [estimator]
    name = "truncated"    # a key of hypergrad.ESTIMATORS
    settings = { window = 20 }
    # implicit / fixed_point: the linear solver by name or as a table of its settings,
    # settings = { solver = { name = "cg", maxiter = 20, damping = 1e-3 } }

    [outer]
    optimizer = "Adam"    # a torch.optim class
    lr = 0.05
    steps = 20
    clip_norm = 1.0
    checkpoint_every = 5
    eval_every = 1

    [output]
    dir = "runs/digits_mlp"

The ConvNet (:class:`bilevel.nets.ConvNet`, instance norm, no running statistics) instead
(``examples/configs/digits_convnet.toml``)::

    [model]
    kind = "convnet"
    width = 32            # channels of every conv block (default 32)
    depth = 2             # conv blocks, each halving the image size (default 3)
    norm = "instance"     # instance | none

It needs images: ``digits`` (viewed as 1x8x8 images), ``fashion_mnist`` or a path; the
tabular ``breast_cancer``, ``iris`` and ``wine`` are refused (``model.kind``). An MLP
takes image datasets too (flattened).

``[data] dataset`` is a name above or the path (relative to the working directory) of an
image dataset read by :func:`bilevel.datasets.load_dataset`: a folder of IDX files, an image
folder (``train/<class>/*.png`` and ``test/<class>/*.png``) or an ``.npz`` file. A name
wins over a folder of the same name (write ``./digits`` for the folder). ``fashion_mnist``
and paths have their own test split: the test set is that split, ``data.val`` (default 0.1)
is the stratified fraction of the training split held out for validation (by
``data.seed``), and ``data.train`` is refused. ``data.standardize`` standardises with
training statistics: each feature for the scikit-learn datasets (each pixel for
``digits``), each channel for the others.
``data.limit`` keeps a seeded random subset of at most that many training examples (the
inner problem is full-batch: keep it small for image datasets on a CPU). The scikit-learn
datasets are split by class (:func:`bilevel.datasets.load_tabular`): every class has its
share of each part, within one example. ``data.root`` (or ``bilevel run --data-root DIR``)
is the folder holding ``fashion_mnist``'s IDX files (or its ``fashion-mnist/`` sub-folder);
without it they are looked for under ``$BILEVEL_DATA`` and then where the Debian package
``dataset-fashion-mnist`` puts them.
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

from hypergrad import OPTIMIZERS, make_estimator

# scikit-learn datasets split by fractions; digits is also an image dataset (1x8x8)
from .datasets.named import dataset_key
from .datasets.tabular import TABULAR_DATASETS

#: Named datasets with their own train/test split (from :mod:`bilevel.datasets`).
SPLIT_DATASETS = ("fashion_mnist",)
DATASETS = TABULAR_DATASETS + SPLIT_DATASETS
#: Image shapes of the named image datasets (paths are checked once loaded).
IMAGE_SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
MODEL_KINDS = ("mlp", "convnet")
NORMS = ("instance", "none")
INNER_OPTIMIZERS = tuple(OPTIMIZERS)
#: the estimators `bilevel run` can drive (an unconstrained inner training run)
RUN_ESTIMATORS = ("unrolled", "recompute", "forward", "truncated", "random_window",
                  "implicit", "fixed_point")
HPARAMS = ("log_lr", "log_wd")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key path and the expected type."""


@dataclass
class ModelConfig:
    """``[model]`` with ``kind = "mlp"`` (the default): an MLP with ReLU activations."""

    sizes: list[int]
    kind: Literal["mlp"] = "mlp"


MLPModelConfig = ModelConfig


@dataclass
class ConvNetModelConfig:
    """``[model]`` with ``kind = "convnet"``: :class:`bilevel.nets.ConvNet` (image data)."""

    kind: Literal["convnet"]
    width: int = 32
    depth: int = 3
    norm: Literal["instance", "none"] = "instance"


@dataclass
class DataConfig:
    """``[data]``: a dataset, standardised, split train/val/test by ``seed``.

    ``train`` and ``val`` are filled in by :func:`parse_config` when omitted: 0.5 and 0.25
    of the whole for the scikit-learn datasets; for datasets with their own test split
    ``train`` stays ``None`` and ``val`` (default 0.1) is a fraction of the training split.
    ``root`` is the folder holding a named dataset's files (``fashion_mnist``; ``bilevel
    run --data-root`` overrides it).
    """

    dataset: str
    train: float | None = None
    val: float | None = None
    seed: int = 0
    standardize: bool = True
    limit: int | None = None
    root: str | None = None

    @property
    def own_split(self) -> bool:
        """Whether the dataset brings its own test split (``fashion_mnist`` or a path)."""
        return self.dataset not in TABULAR_DATASETS

    @property
    def images(self) -> bool:
        """Whether the dataset can be read as images (everything but breast_cancer/iris/wine)."""
        return self.dataset == "digits" or self.own_split


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
    optimizer: str = "sgd"
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

    model: ModelConfig | ConvNetModelConfig
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
        if all(dataclasses.is_dataclass(a) for a in args):
            return "table"
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
        if len(inner) > 1 and all(dataclasses.is_dataclass(a) for a in inner):
            return _convert_kind(value, inner, path)
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


def _kinds(cls: type) -> tuple[Any, ...]:
    """The values of the ``kind`` literal of a table dataclass."""
    return typing.get_args(typing.get_type_hints(cls)["kind"])


def _convert_kind(value: Any, options: list[type], path: str) -> Any:
    """A table that is one of several dataclasses, chosen by its ``kind`` (default: the first)."""
    if not isinstance(value, dict):
        raise _fail(path, options[0], value)
    kind = value.get("kind", _kinds(options[0])[0])
    for cls in options:
        if kind in _kinds(cls) and not isinstance(kind, bool):
            return _build(cls, value, path, f" for kind = {kind!r}")
    allowed = [k for cls in options for k in _kinds(cls)]
    raise ConfigError(f"{path}.kind: expected one of {', '.join(map(repr, allowed))}, got "
                      f"{type(kind).__name__} {kind!r}")


def _build(cls: type, table: dict[str, Any], prefix: str, context: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown key (allowed in "
                              f"{'[' + prefix + ']' if prefix else 'the top level'}{context}: "
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


def _check_data(d: DataConfig) -> None:
    """Check ``[data]`` and fill in the defaults of ``train`` and ``val``."""
    if dataset_key(d.dataset) in SPLIT_DATASETS:  # "fashion-mnist" -> "fashion_mnist"
        d.dataset = dataset_key(d.dataset)
    if d.own_split:
        if not Path(d.dataset).exists() and d.dataset not in SPLIT_DATASETS:
            names = ", ".join(repr(n) for n in DATASETS)
            raise ConfigError(f"data.dataset: expected one of {names} or the path of an image "
                              f"dataset (an IDX folder, an image folder with train/ and test/, "
                              f"or an .npz file), got {d.dataset!r} (no such file or folder)")
        if d.train is not None:
            raise ConfigError(f"data.train: not used with {d.dataset!r}, which has its own "
                              f"test split; data.val is the fraction of its training split "
                              f"held out for validation (data.limit caps the training set)")
        if d.val is None:
            d.val = 0.1
        if not 0 < d.val < 1:
            raise ConfigError(f"data.val: expected a fraction in (0, 1) of the training split, "
                              f"got {d.val!r}")
    else:
        d.train = 0.5 if d.train is None else d.train
        d.val = 0.25 if d.val is None else d.val
        if not (0 < d.train < 1 and 0 < d.val < 1 and d.train + d.val < 1):
            raise ConfigError(f"data.train, data.val: expected fractions in (0, 1) with "
                              f"train + val < 1 (test is the rest), got {d.train!r}, {d.val!r}")
    if d.limit is not None:
        _positive("data.limit", d.limit)
    if d.root is not None:
        check_data_root(d, d.root, "data.root")


def check_data_root(d: DataConfig, root: str, key: str = "data.root") -> None:
    """Check ``root`` as the data root of ``d`` and set it (:class:`ConfigError` naming
    ``key``, e.g. ``--data-root`` when it comes from the command line): it must be an
    existing folder and the dataset a named one that reads files (``fashion_mnist``)."""
    if d.dataset in TABULAR_DATASETS:
        raise ConfigError(f"{key}: not used with {d.dataset!r}, which comes with scikit-learn "
                          f"(a data root is for {', '.join(SPLIT_DATASETS)})")
    if d.dataset not in SPLIT_DATASETS:
        raise ConfigError(f"{key}: only used by the named datasets "
                          f"({', '.join(SPLIT_DATASETS)}); data.dataset = {d.dataset!r} is a "
                          f"path: give its full path instead")
    if not Path(root).is_dir():
        raise ConfigError(f"{key}: expected an existing folder holding the dataset's files, got "
                          f"{root!r} (no such folder)")
    d.root = root


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if isinstance(m, ModelConfig):
        if not m.sizes or any(s < 1 for s in m.sizes):
            raise ConfigError(f"model.sizes: expected a non-empty array of positive integers, "
                              f"got {m.sizes!r}")
        return
    if not cfg.data.images:
        raise ConfigError(f"model.kind: 'convnet' needs image data (digits, fashion_mnist or "
                          f"the path of an image dataset), but data.dataset = "
                          f"{cfg.data.dataset!r} is tabular; use kind = 'mlp'")
    _positive("model.width", m.width)
    _positive("model.depth", m.depth)
    shape = IMAGE_SHAPES.get(cfg.data.dataset)
    if shape is not None and min(shape[1:]) < 2 ** m.depth:
        raise ConfigError(f"model.depth: {cfg.data.dataset} images are {shape[1]}x{shape[2]}, "
                          f"too small for depth {m.depth} (each block halves the size; at most "
                          f"{min(shape[1:]).bit_length() - 1})")


def _check_values(cfg: Config) -> None:
    """Range and registry checks beyond the types."""
    _check_data(cfg.data)
    _check_model(cfg)
    h = cfg.hyperparameters
    if len(set(h.tune)) != len(h.tune) or not h.tune:
        raise ConfigError(f"hyperparameters.tune: expected a non-empty array of distinct "
                          f"names from {HPARAMS}, got {h.tune!r}")
    _positive("hyperparameters.lr", h.lr)
    _positive("hyperparameters.weight_decay", h.weight_decay)
    for key, seed in (("seed", cfg.seed), ("data.seed", cfg.data.seed)):
        if not 0 <= seed < 2 ** 63:
            raise ConfigError(f"{key}: expected an integer in [0, 2**63), got {seed}")
    _positive("inner.steps", cfg.inner.steps)
    if cfg.inner.optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"inner.optimizer: expected one of {list(INNER_OPTIMIZERS)}, got "
                          f"{cfg.inner.optimizer!r}")
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
    if opt in (torch.optim.LBFGS, torch.optim.SparseAdam):
        raise ConfigError(f"outer.optimizer: {cfg.outer.optimizer} cannot take outer steps "
                          "from hypergradients (it needs a loss closure or sparse gradients); "
                          "use Adam, SGD, AdamW, RMSprop, ...")
    if cfg.estimator.name not in RUN_ESTIMATORS:
        why = (" (it needs a constrained lower level, which `bilevel run` does not build)"
               if cfg.estimator.name in ("kkt", "lvhba") else
               " (a single-loop estimator takes its own inner steps and ignores [inner], "
               "whose learning rate this run tunes)" if cfg.estimator.name in ("soba", "saba")
               else "")
        raise ConfigError(f"estimator.name: expected one of {list(RUN_ESTIMATORS)}, got "
                          f"{cfg.estimator.name!r}{why}")
    try:
        make_estimator(cfg.estimator.name, **cfg.estimator.settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"estimator.settings: invalid for {cfg.estimator.name!r}: "
                          f"{exc}") from None
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"device: expected a torch device string, got {cfg.device!r} "
                          f"({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} but CUDA is not available here; use 'cpu'")


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document and return the typed :class:`Config`."""
    cfg = _build(Config, data, "")
    _check_values(cfg)
    return cfg


#: the TOML table of ``bilevel tune``'s search space, ignored by :func:`load_config`
SEARCH_TABLE = "search"


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file (:class:`ConfigError` on any problem). A
    top-level ``[search]`` table (the search space of ``bilevel tune``, checked there by
    :class:`bilevel.tune.SearchSpace`) is ignored."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    data.pop(SEARCH_TABLE, None)
    return parse_config(data)


__all__ = ["Config", "ConfigError", "ConvNetModelConfig", "DataConfig", "EstimatorConfig",
           "HyperparametersConfig", "InnerConfig", "MLPModelConfig", "ModelConfig",
           "OuterConfig", "OutputConfig", "check_data_root", "load_config", "parse_config"]
