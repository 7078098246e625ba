"""Data hyper-cleaning: one weight per training example, tuned by hypergradients.

The bilevel problem of Franceschi et al. (2017), "Forward and reverse gradient-based
hyperparameter optimization", §5.1 (truncated variants: Shaban et al., 2019, "Truncated
back-propagation for bilevel optimization")::

    min_h  L_val(w*(h))                                  (cross-entropy on a clean set)
    s.t.   w*(h) ∈ argmin_w  Σ_i σ(h_i) ℓ(w; x_i, ỹ_i) / n  +  ½ λ Σ_layers ‖W‖²

where ``ỹ`` are training labels of which a fraction was flipped, ``σ(h_i)`` the weight of
example ``i`` and ``λ`` a small fixed weight decay on the weight matrices. An example is
flagged as noisy when its learned weight ``σ(h_i) < 0.5`` (``h_i < 0``): the threshold is
fixed beforehand at the midpoint of the weights' range and the start ``h = 0`` sits on it,
so an example is flagged only when the hypergradient pushed it down; it is never chosen on
the flip labels or the test set. (With the detector start of h, ``h_init="detector"``, the
start flags exactly the training examples whose label a classifier fitted on the run's
validation split disagrees with, and the hypergradients move h from there.)

Pieces, from data to the Optuna study:

- :func:`load_cleaning_data` / :func:`make_cleaning_data`: stratified seeded splits
  (:func:`stratified_split`), features standardised on the training split, an exact
  fraction of training labels flipped (:func:`flip_labels`);
- :func:`make_model`, :func:`fit_classifier`, :func:`accuracy`, :func:`flag_scores`;
- :func:`cleaning_problem` (``bilevel.wrap`` with batches ``(x, y, index)``) and
  :func:`run_cleaning` (``bilevel.OuterLoop``);
- the methods compared by ``benchmarks/hyper_cleaning.py``: :func:`no_cleaning`,
  :func:`validation_only`, :func:`oracle`, :func:`disagreement` (a classifier fitted on the
  validation split alone drops the training examples whose label it disagrees with; a
  detector baseline with no hypergradient), :func:`hyper_cleaning` (one fixed
  configuration), :func:`optuna_alone` (Optuna over the weight decay and learning rate of
  the plain fit) and :func:`hybrid` (Optuna over estimator, T, outer and inner learning
  rates, the inner weight decay and the start of h, zero or :func:`detector_logits`;
  hypergradients inside each trial on half the validation split, trials scored on the
  other half and pruned by :class:`bilevel.tune.OptunaPruning`).

Evaluation rule, the same for every method: a method yields example weights ``ω`` on the
training split (1 for no cleaning, 0 for the validation set alone, the clean indicator for
the oracle, the agreement indicator for the disagreement detector, ``σ(h)`` for
hyper-cleaning). Its final model is a fresh network (the same
initialisation for every method) fitted by :data:`DEFAULT_RECIPE` on the training split
weighted by ``ω`` together with the whole validation split at weight 1 (``test_acc``;
``test_acc_train_only`` is the same fit without the validation split). The fit's weight
decay is chosen among :data:`FINAL_WEIGHT_DECAYS` by 2-fold cross-validation on the
validation split (:func:`select_recipe`), except for Optuna alone, whose search chose its
learning rate and weight decay. Searches and selections read the validation split only;
the test split is read once per method, by the final model.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from hypergrad import Implicit, Momentum, Truncated, Unrolled
from hypergrad.errors import BilevelInputError, ConvergenceWarning

from .module import ModuleProblem, wrap
from .outer import OuterLoop
from .tune.pruning import OptunaPruning, run_trial

#: the datasets :func:`load_cleaning_data` knows
DATASETS = ("digits", "fashion_mnist")
#: the inner models of :func:`make_model`
MODELS = ("linear", "mlp")
#: the estimators a hyper-cleaning run (and the hybrid search) may use
CLEANING_ESTIMATORS = ("unrolled", "truncated", "implicit")
#: the flag threshold on σ(h_i): below it an example is flagged as noisy
THRESHOLD = 0.5
#: the starts of h a hyper-cleaning run (and the hybrid search) may use: every ``h_i`` at
#: ``init_logit`` (``"constant"``), or ``±detector_scale`` by the agreement of a classifier
#: fitted on the run's validation split with the training label (``"detector"``)
H_INITS = ("constant", "detector")


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise BilevelInputError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise BilevelInputError(f"{name} must be a finite number {'>=' if allow_zero else '>'} "
                                f"0, got {value!r}")
    return float(value)


def _labels(name: str, y: Any, num_classes: int | None = None) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
        raise BilevelInputError(f"{name} must be a 1-D int64 tensor of class labels, got "
                                f"{type(y).__name__}"
                                + (f" {y.dtype} of shape {tuple(y.shape)}"
                                   if isinstance(y, torch.Tensor) else ""))
    if y.numel() and (int(y.min()) < 0 or (num_classes is not None
                                           and int(y.max()) >= num_classes)):
        raise BilevelInputError(f"{name} must hold labels in [0, {num_classes}), got values in "
                                f"[{int(y.min())}, {int(y.max())}]")
    return y


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def stratified_split(labels: torch.Tensor, sizes: Sequence[int],
                     generator: torch.Generator) -> list[torch.Tensor]:
    """Disjoint random index sets of the given sizes, each stratified by class.

    Splits are drawn one after the other from what the earlier ones left; split ``k``
    takes from class ``c`` its proportional share ``sizes[k] · R_c / R`` of the ``R``
    remaining examples (``R_c`` of class ``c``), rounded down, and the leftover places go
    to the largest remainders (ties to the lower class), so the sizes are exact and every
    class is within one example of its share.

    Args:
        labels: ``(N,)`` int64 class labels.
        sizes: the sizes of the splits; their sum must not exceed ``N`` (the examples
            left over belong to no split).
        generator: the random source (seed it for a reproducible split).

    Returns:
        One ``(sizes[k],)`` int64 index tensor per split, in random order.

    Raises:
        BilevelInputError: labels that are not 1-D int64, a negative size, or sizes
            summing to more than ``N``.
    """
    labels = _labels("labels", labels)
    sizes = [_int(f"sizes[{k}]", s, 0) for k, s in enumerate(sizes)]
    if sum(sizes) > labels.numel():
        raise BilevelInputError(f"sizes {sizes} sum to {sum(sizes)}, more than the "
                                f"{labels.numel()} examples")
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    pools = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    pools = [p[torch.randperm(p.numel(), generator=generator)] for p in pools]
    out = []
    for size in sizes:
        left = torch.tensor([p.numel() for p in pools], dtype=torch.float64)
        share = size * left / left.sum().clamp_min(1)
        take = share.floor().long()
        rest = size - int(take.sum())
        if rest:
            order = torch.argsort(-(share - take), stable=True)
            take[order[:rest]] += 1
        parts = [p[:int(k)] for p, k in zip(pools, take, strict=True)]
        pools = [p[int(k):] for p, k in zip(pools, take, strict=True)]
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        out.append(idx[torch.randperm(idx.numel(), generator=generator)])
    return out


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction · N)`` labels, each to a uniformly random *other* class.

    The flipped examples are a uniformly random subset; a flipped label is
    ``(y + k) mod C`` with ``k`` uniform in ``{1, …, C − 1}``, i.e. uniform over the
    ``C − 1`` classes different from the true one (never the true class).

    Args:
        labels: ``(N,)`` int64 true labels in ``[0, num_classes)``.
        fraction: the fraction flipped, in ``[0, 1]``.
        num_classes: ``C >= 2``.
        generator: the random source.

    Returns:
        ``(noisy, flipped)``: ``(N,)`` int64 labels and the ``(N,)`` bool mask of the flipped
        examples (``noisy != labels`` exactly where ``flipped``).

    Raises:
        BilevelInputError: a fraction outside ``[0, 1]``, fewer than two classes, or labels
            that are not 1-D int64 in range.
    """
    num_classes = _int("num_classes", num_classes, 2)
    labels = _labels("labels", labels, num_classes)
    if not (isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
            and 0.0 <= fraction <= 1.0):
        raise BilevelInputError(f"fraction must be a number in [0, 1], got {fraction!r}")
    n = labels.numel()
    n_flip = int(round(fraction * n))
    chosen = torch.randperm(n, generator=generator)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


@dataclass(frozen=True, eq=False)
class CleaningData:
    """A hyper-cleaning task: a noisy training split, a clean validation and test split.

    Attributes:
        x_train, x_val, x_test: ``(n, d)`` float features, standardised with the training
            split's mean and standard deviation.
        y_train: ``(n_train,)`` int64 training labels, a fraction of them flipped.
        y_true: ``(n_train,)`` the training labels before flipping (for the oracle and the
            flag scores only).
        flipped: ``(n_train,)`` bool, where ``y_train != y_true``.
        y_val, y_test: clean int64 labels.
        num_classes: the number of classes.
        name: a description (dataset, sizes, noise, seed).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_true: torch.Tensor
    flipped: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    @property
    def n_train(self) -> int:
        """The number of training examples (the length of h)."""
        return int(self.y_train.numel())

    @property
    def num_features(self) -> int:
        """d, the number of (flattened) features."""
        return int(self.x_train.shape[1])

    def to(self, dtype: torch.dtype) -> CleaningData:
        """A copy with the features cast to ``dtype`` (labels unchanged)."""
        return replace(self, x_train=self.x_train.to(dtype), x_val=self.x_val.to(dtype),
                       x_test=self.x_test.to(dtype))


def make_cleaning_data(x: torch.Tensor, y: torch.Tensor, n_train: int, n_val: int,
                       noise: float = 0.5, seed: int = 0, n_test: int | None = None, *,
                       x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
                       num_classes: int | None = None, name: str = "data") -> CleaningData:
    """Split a labelled pool into noisy train / clean validation / clean test splits.

    The training and validation splits (and the test split, unless ``x_test`` is given)
    are drawn from the pool by :func:`stratified_split`; ``round(noise · n_train)`` training
    labels are flipped by :func:`flip_labels`; features are flattened and standardised
    with the training split's statistics (a constant feature is only centred). Everything
    depends on ``seed`` alone.

    Args:
        x: ``(N, ...)`` features of the pool (flattened to ``(N, d)``).
        y: ``(N,)`` int64 labels.
        n_train, n_val: split sizes (``n_train >= 1``, ``n_val >= 1``).
        noise: the fraction of training labels flipped, in ``[0, 1]``.
        seed: seed of the splits and the flips.
        n_test: test size drawn from the pool (default: every remaining example), or the
            size of a stratified subset of ``x_test`` when that is given.
        x_test, y_test: a separate test set (e.g. an official test split).
        num_classes: default ``max(y) + 1``.
        name: the task's name prefix.

    Raises:
        BilevelInputError: mismatched shapes, bad sizes (more than the pool holds), a bad
            noise fraction or labels out of range.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise BilevelInputError("x must be a floating tensor of shape (N, ...) with N "
                                f"examples, got {type(x).__name__}"
                                + (f" of shape {tuple(x.shape)}"
                                   if isinstance(x, torch.Tensor) else ""))
    num_classes = int(y.max()) + 1 if num_classes is None and isinstance(y, torch.Tensor) \
        and y.numel() else num_classes
    y = _labels("y", y, num_classes)
    if y.numel() != x.shape[0]:
        raise BilevelInputError(f"x has {x.shape[0]} examples but y has {y.numel()} labels")
    n_train, n_val = _int("n_train", n_train, 1), _int("n_val", n_val, 1)
    if (x_test is None) != (y_test is None):
        raise BilevelInputError("give both x_test and y_test, or neither")
    gen = torch.Generator().manual_seed(_int("seed", seed, 0))
    x = x.reshape(x.shape[0], -1)
    if n_train + n_val >= x.shape[0] + (x_test is not None):
        raise BilevelInputError(f"n_train + n_val = {n_train + n_val} leaves no example of the "
                                f"{x.shape[0]} in the pool for "
                                f"{'a test split' if x_test is None else 'anything else'}"
                                if n_train + n_val <= x.shape[0] else
                                f"n_train + n_val = {n_train + n_val} exceeds the "
                                f"{x.shape[0]} examples of the pool")
    if x_test is None:
        rest = x.shape[0] - n_train - n_val
        if n_test is None:
            n_test = rest
        n_test = _int("n_test", n_test, 1)
        if n_train + n_val + n_test > x.shape[0]:
            raise BilevelInputError(f"n_train + n_val + n_test = {n_train + n_val + n_test} "
                                    f"exceeds the {x.shape[0]} examples of the pool")
        tr, va, te = stratified_split(y, [n_train, n_val, n_test], gen)
        xt, yt = x[te], y[te]
    else:
        if n_train + n_val > x.shape[0]:
            raise BilevelInputError(f"n_train + n_val = {n_train + n_val} exceeds the "
                                    f"{x.shape[0]} examples of the pool")
        tr, va = stratified_split(y, [n_train, n_val], gen)
        y_test = _labels("y_test", y_test, num_classes)
        xt = x_test.reshape(x_test.shape[0], -1)
        if xt.shape[1] != x.shape[1] or y_test.numel() != xt.shape[0]:
            raise BilevelInputError(f"x_test {tuple(x_test.shape)} / y_test "
                                    f"{tuple(y_test.shape)} do not match the pool's features")
        if n_test is not None:
            (te,) = stratified_split(y_test, [_int("n_test", n_test, 1)], gen)
            xt, y_test = xt[te], y_test[te]
        yt = y_test
    noisy, flipped = flip_labels(y[tr], noise, num_classes, gen)
    mean, std = x[tr].mean(0), x[tr].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))

    def standard(a: torch.Tensor) -> torch.Tensor:
        return ((a - mean) / std).contiguous()

    return CleaningData(standard(x[tr]), noisy, y[tr].clone(), flipped, standard(x[va]),
                        y[va].clone(), standard(xt), yt.clone(), num_classes,
                        f"{name}[train={n_train},val={n_val},test={yt.numel()},"
                        f"noise={noise:g},seed={seed}]")


def load_cleaning_data(dataset: str = "digits", n_train: int = 800, n_val: int = 200,
                       noise: float = 0.5, seed: int = 0, n_test: int | None = None,
                       root: str | None = None) -> CleaningData:
    """A hyper-cleaning task on scikit-learn's digits or Fashion-MNIST.

    ``"digits"``: the 1797 8×8 images of ``sklearn.datasets.load_digits`` (through
    :func:`bilevel.data.load_digits`, both its splits pooled), split into ``n_train`` /
    ``n_val`` / ``n_test`` (default: the rest, 797 at the default sizes).
    ``"fashion_mnist"``: train and validation drawn from the official 60000 training
    images, the test set a stratified subset of ``n_test`` (default all 10000) of the
    official test images (:func:`bilevel.data.load_fashion_mnist`, ``root`` its folder).
    Images become ``d = H·W`` standardised features. See :func:`make_cleaning_data`.

    Raises:
        BilevelInputError: an unknown dataset or bad sizes.
        bilevel.data.DataError: Fashion-MNIST files missing.
    """
    from . import data as _data

    if dataset not in DATASETS:
        raise BilevelInputError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "digits":
        ds = _data.load_digits()
        x = torch.cat([ds.train_x, ds.test_x]).flatten(1)
        y = torch.cat([ds.train_y, ds.test_y])
        return make_cleaning_data(x, y, n_train, n_val, noise, seed, n_test,
                                  num_classes=10, name="digits")
    ds = _data.load_fashion_mnist() if root is None else _data.load_fashion_mnist(root)
    return make_cleaning_data(ds.train_x.flatten(1), ds.train_y, n_train, n_val, noise, seed,
                              n_test, x_test=ds.test_x.flatten(1), y_test=ds.test_y,
                              num_classes=10, name="fashion_mnist")


# --------------------------------------------------------------------------------------
# Models, fits and metrics
# --------------------------------------------------------------------------------------


def make_model(kind: str, num_features: int, num_classes: int, hidden: int = 64,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Softmax regression (``"linear"``) or a one-hidden-layer ReLU MLP (``"mlp"``).

    The initialisation depends on ``seed`` only (the global RNG is left as it was).

    Raises:
        BilevelInputError: an unknown kind or non-positive sizes.
    """
    if kind not in MODELS:
        raise BilevelInputError(f"model must be one of {MODELS}, got {kind!r}")
    num_features, num_classes = _int("num_features", num_features, 1), \
        _int("num_classes", num_classes, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_int("seed", seed, 0))
        if kind == "linear":
            model = nn.Linear(num_features, num_classes)
        else:
            model = nn.Sequential(nn.Linear(num_features, _int("hidden", hidden, 1)), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))
    return model.to(dtype)


def l2_penalty(params: dict[str, torch.Tensor], weight_decay: float) -> torch.Tensor:
    """``½ · weight_decay · Σ ‖W‖²`` over the parameters named ``*weight`` (not biases)."""
    return 0.5 * weight_decay * sum((p ** 2).sum() for k, p in params.items()
                                    if k.endswith("weight"))


@dataclass(frozen=True)
class FitRecipe:
    """Full-batch heavy-ball SGD (``torch.optim.SGD``) on the weighted cross-entropy plus
    :func:`l2_penalty`: ``steps`` steps, learning rate ``lr``, momentum, weight decay."""

    steps: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3


#: the final fit's recipe (its weight decay is then chosen by :func:`select_recipe`)
DEFAULT_RECIPE = FitRecipe()
#: the weight decays :func:`select_recipe` chooses among
FINAL_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   weights: torch.Tensor | None, recipe: FitRecipe = DEFAULT_RECIPE
                   ) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` by ``recipe``: loss
    ``Σ_i weights_i · CE_i / n + ½ λ Σ ‖W‖²`` (``weights=None``: all ones); returns it.

    Args:
        model: the network (trained in place).
        x: ``(n, d)`` features.
        y: ``(n,)`` int64 labels.
        weights: ``(n,)`` per-example weights, or ``None``.
        recipe: the :class:`FitRecipe` (steps, learning rate, momentum, weight decay).

    Returns:
        ``model`` itself, trained.

    Raises:
        BilevelInputError: mismatched shapes or a bad recipe.
    """
    _int("recipe.steps", recipe.steps, 0)
    _positive("recipe.lr", recipe.lr)
    _positive("recipe.weight_decay", recipe.weight_decay, allow_zero=True)
    if y.shape != (x.shape[0],) or (weights is not None and weights.shape != y.shape):
        raise BilevelInputError(f"x {tuple(x.shape)}, y {tuple(y.shape)} and weights "
                                f"{None if weights is None else tuple(weights.shape)} must "
                                "hold one row / label / weight per example")
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    n = max(x.shape[0], 1)
    for _ in range(recipe.steps):
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = (losses if weights is None else weights * losses).sum() / n
        loss = loss + l2_penalty(dict(model.named_parameters()), recipe.weight_decay)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction (in [0, 1]) of ``(n, d)`` inputs ``x`` whose arg-max class is ``y``
    (``(n,)`` int64)."""
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean cross-entropy (nats) of ``model`` on ``(x, y)``, ``(n, d)`` and ``(n,)``."""
    return float(F.cross_entropy(model(x), y))


def flag_scores(flags: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``flags`` (predicted noisy) against ``flipped`` (the
    positive class: flipped labels), with 0 for an empty denominator (as scikit-learn's
    ``zero_division=0``).

    Args:
        flags, flipped: ``(n,)`` bool tensors.

    Raises:
        BilevelInputError: not bool tensors of one shape.
    """
    for name, t in (("flags", flags), ("flipped", flipped)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != 1:
            raise BilevelInputError(f"{name} must be a 1-D bool tensor")
    if flags.shape != flipped.shape:
        raise BilevelInputError(f"flags {tuple(flags.shape)} and flipped "
                                f"{tuple(flipped.shape)} differ in shape")
    tp = int((flags & flipped).sum())
    n_flag, n_pos = int(flags.sum()), int(flipped.sum())
    precision = tp / n_flag if n_flag else 0.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * tp / (n_flag + n_pos) if n_flag + n_pos else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------------------
# The bilevel problem and the outer loop
# --------------------------------------------------------------------------------------


def cleaning_problem(data: CleaningData, model: nn.Module, steps: int, inner_lr: float,
                     weight_decay: float = 1e-3, momentum: float = 0.9,
                     init_logit: float | torch.Tensor = 0.0) -> ModuleProblem:
    """The hyper-cleaning bilevel problem over ``model`` (see the module docstring).

    Hyperparameters ``{"h": (n_train,)}`` (``σ(h_i)`` weighs example ``i``), starting at
    ``init_logit`` (a number for every ``h_i``, or an ``(n_train,)`` tensor of finite
    starts, e.g. :func:`detector_logits`); the inner batch is
    ``(x_train, y_train, arange(n_train))`` so the inner loss picks each example's weight
    by its index; ``steps`` (T) full-batch heavy-ball steps (:class:`hypergrad.Momentum`)
    of rate ``inner_lr``; the outer loss is the validation cross-entropy.

    Returns:
        The :class:`~bilevel.ModuleProblem`; its ``hparams`` are ``{"h": (n_train,)}``.

    Raises:
        BilevelInputError: bad sizes or rates, a momentum outside [0, 1), or an
            ``init_logit`` tensor that is not finite and of shape ``(n_train,)``.

    References:
        Franceschi, Donini, Frasconi, Pontil, "Forward and reverse gradient-based
        hyperparameter optimization", ICML 2017, §5.1.
    """
    _int("steps", steps, 1)
    _positive("inner_lr", inner_lr)
    weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
    if not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
        raise BilevelInputError(f"momentum must be in [0, 1), got {momentum!r}")
    n = data.n_train
    dtype = data.x_train.dtype
    if isinstance(init_logit, torch.Tensor):
        if init_logit.shape != (n,) or not torch.isfinite(init_logit).all():
            raise BilevelInputError(f"init_logit must be a finite ({n},) tensor, got shape "
                                    f"{tuple(init_logit.shape)}")
        hparams = {"h": init_logit.detach().to(dtype).clone()}
    elif isinstance(init_logit, numbers.Real) and math.isfinite(init_logit):
        hparams = {"h": torch.full((n,), float(init_logit), dtype=dtype)}
    else:
        raise BilevelInputError(f"init_logit must be a finite number, got {init_logit!r}")

    def inner_loss(out: torch.Tensor, batch: tuple, h: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
        weights = torch.sigmoid(h["h"])[batch[2]]
        return (weights * F.cross_entropy(out, batch[1], reduction="none")).sum() / n

    def outer_loss(out: torch.Tensor, batch: tuple, h: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
        return F.cross_entropy(out, batch[1])

    def penalty(params: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
        return l2_penalty(params, weight_decay)

    train = (data.x_train, data.y_train, torch.arange(n))
    return wrap(model, inner_loss, outer_loss, hparams, train, (data.x_val, data.y_val),
                Momentum(lr=inner_lr, momentum=momentum), steps, penalty=penalty)


@dataclass(frozen=True)
class CleaningConfig:
    """One hyper-cleaning run.

    Attributes:
        estimator: one of :data:`CLEANING_ESTIMATORS` (``"truncated"`` differentiates the
            last ``max(1, T // 4)`` steps; ``"implicit"`` solves by CG at the warm-started
            inner iterate).
        steps: T, inner steps per outer step (warm-started from the previous solution).
        outer_steps: outer steps (hypergradient steps on h).
        outer_lr: per-example outer learning rate: the hyperparameters follow heavy-ball
            SGD (momentum 0.9) with rate ``outer_lr · n_train``, since the hypergradient of
            a loss averaged over n examples scales like 1/n.
        inner_lr: the inner heavy-ball rate (momentum 0.9).
        model: one of :data:`MODELS`.
        hidden: the MLP's width.
        weight_decay: the inner problem's fixed L2 on weight matrices.
        init_logit: the starting value of every ``h_i`` with ``h_init="constant"`` (0:
            weights 0.5, on the flag threshold).
        h_init: one of :data:`H_INITS`. ``"detector"`` starts ``h_i = +detector_scale``
            where a classifier fitted on the run's validation split alone predicts the
            training label ``ỹ_i`` and ``−detector_scale`` where it does not
            (:func:`detector_logits`; the hypergradients then refine from there).
        detector_scale: ``c > 0``, the magnitude of the detector start.
        warm_start: start each outer step's inner run from the previous one's solution
            (``False``: from the initialisation, every time).

    Raises:
        BilevelInputError: an unknown estimator, model or ``h_init``, a non-positive
            size or rate, or a non-finite ``init_logit``.
    """

    estimator: str = "unrolled"
    steps: int = 20
    outer_steps: int = 100
    outer_lr: float = 1.0
    inner_lr: float = 0.1
    model: str = "mlp"
    hidden: int = 64
    weight_decay: float = 1e-3
    init_logit: float = 0.0
    warm_start: bool = True
    h_init: str = "constant"
    detector_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.estimator not in CLEANING_ESTIMATORS:
            raise BilevelInputError(f"estimator must be one of {CLEANING_ESTIMATORS}, got "
                                    f"{self.estimator!r}")
        if self.model not in MODELS:
            raise BilevelInputError(f"model must be one of {MODELS}, got {self.model!r}")
        _int("steps", self.steps, 1)
        _int("outer_steps", self.outer_steps, 1)
        _int("hidden", self.hidden, 1)
        _positive("outer_lr", self.outer_lr)
        _positive("inner_lr", self.inner_lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if not (isinstance(self.init_logit, numbers.Real) and math.isfinite(self.init_logit)):
            raise BilevelInputError(f"init_logit must be a finite number, got "
                                    f"{self.init_logit!r}")
        if self.h_init not in H_INITS:
            raise BilevelInputError(f"h_init must be one of {H_INITS}, got {self.h_init!r}")
        _positive("detector_scale", self.detector_scale)


def make_cleaning_estimator(name: str, steps: int) -> Any:
    """The estimator object of a :class:`CleaningConfig` name at T = ``steps``:
    :class:`~hypergrad.Unrolled`, :class:`~hypergrad.Truncated` with window
    ``max(1, T // 4)``, or :class:`~hypergrad.Implicit` without an inner tolerance.

    Raises:
        BilevelInputError: a name outside :data:`CLEANING_ESTIMATORS`.
    """
    if name == "unrolled":
        return Unrolled()
    if name == "truncated":
        return Truncated(window=max(1, steps // 4))
    if name == "implicit":
        return Implicit(inner_tol=None)
    raise BilevelInputError(f"estimator must be one of {CLEANING_ESTIMATORS}, got {name!r}")


@dataclass
class CleaningRun:
    """What :func:`run_cleaning` returns.

    Attributes:
        weights: ``(n_train,)`` the learned example weights ``σ(h)`` (with a selection
            split: those of the outer step with the lowest selection loss).
        val_loss: the last outer loss (cross-entropy on the outer validation examples).
        select_loss: the lowest selection loss (``None`` without a selection split).
        best_step: the outer step whose weights were kept.
        history: the loop's records (one dict per outer step).
        seconds: wall-clock seconds of the run.
    """

    weights: torch.Tensor
    val_loss: float
    select_loss: float | None
    best_step: int
    history: list[dict[str, Any]]
    seconds: float


class _Deadline:
    """Outer-loop callback: stop the loop once ``time.perf_counter()`` passes ``at``."""

    def __init__(self, at: float) -> None:
        self.at = at

    def on_step(self, loop: OuterLoop, record: dict[str, Any]) -> None:
        if time.perf_counter() >= self.at:
            loop.stop()


def split_selection(data: CleaningData, fraction: float = 0.5, seed: int = 0
                    ) -> tuple[CleaningData, tuple[torch.Tensor, torch.Tensor]]:
    """Hold out a stratified ``fraction`` of the validation split for model selection.

    Returns ``(outer_data, (x_select, y_select))``: ``outer_data`` is ``data`` with only the
    remaining validation examples (those the hypergradients fit), the pair the held-out
    ones (which score trials and pick the outer step). Both parts stay clean validation
    data: the final fit of the evaluation rule uses the whole split.

    Raises:
        BilevelInputError: a fraction outside ``(0, 1)`` or a part left empty.
    """
    if not (isinstance(fraction, numbers.Real) and 0.0 < fraction < 1.0):
        raise BilevelInputError(f"fraction must be in (0, 1), got {fraction!r}")
    n_val = data.y_val.numel()
    n_sel = int(round(fraction * n_val))
    if not 0 < n_sel < n_val:
        raise BilevelInputError(f"fraction={fraction!r} of {n_val} validation examples leaves "
                                "one part empty")
    gen = torch.Generator().manual_seed(_int("seed", seed, 0) + 1)
    sel, rest = stratified_split(data.y_val, [n_sel, n_val - n_sel], gen)
    outer = replace(data, x_val=data.x_val[rest], y_val=data.y_val[rest])
    return outer, (data.x_val[sel], data.y_val[sel])


def run_cleaning(data: CleaningData, config: CleaningConfig = CleaningConfig(), seed: int = 0,
                 *, select: tuple[torch.Tensor, torch.Tensor] | None = None,
                 trial: Any = None, report_every: int = 10,
                 deadline: float | None = None,
                 agreement: torch.Tensor | None = None) -> CleaningRun:
    """Learn the example weights by ``config.outer_steps`` hypergradient steps.

    The loop is a :class:`bilevel.OuterLoop` on :func:`cleaning_problem` (outer loss on
    ``data``'s validation split), warm-starting the inner iterate (unless
    ``config.warm_start`` is False). With ``select = (x, y)``
    (see :func:`split_selection`) every outer step's inner solution is scored on those
    held-out examples (the loop's ``evaluate``, record key ``eval_select_loss``) and the
    weights of the step with the lowest score are kept (early stopping on held-out data).
    With an Optuna ``trial`` the monitored curve (``eval_select_loss``, else
    ``outer_loss``) is reported every ``report_every`` steps through
    :class:`bilevel.tune.OptunaPruning` and the run goes through
    :func:`bilevel.tune.run_trial`, so a pruned or blown-up run raises
    :class:`optuna.TrialPruned`. ``deadline`` (a ``time.perf_counter()`` value) stops the
    loop early, keeping what was learned. The CG convergence warnings of the implicit
    estimator are silenced (its solves are warm-started and capped).

    With ``config.h_init == "detector"`` h starts at :func:`detector_logits`: the
    ``agreement`` given (``(n_train,)`` in ``{0, 1}``, computed once by the caller), else
    that of :func:`disagreement_weights` on ``data`` (its validation split, i.e. only the
    examples the hypergradients fit, never ``select`` nor the test split).

    Raises:
        BilevelInputError: a bad config, data or selection split.
        optuna.TrialPruned: with a trial, when pruned.
    """
    if not isinstance(config, CleaningConfig):
        raise BilevelInputError(f"config must be a CleaningConfig, got {type(config).__name__}")
    if not isinstance(data, CleaningData):
        raise BilevelInputError(f"data must be a CleaningData, got {type(data).__name__}")
    if select is not None and not (
            isinstance(select, tuple) and len(select) == 2
            and all(isinstance(t, torch.Tensor) for t in select)
            and select[0].dim() == 2 and select[0].shape[1] == data.num_features
            and select[1].shape == (select[0].shape[0],)):
        raise BilevelInputError(f"select must be a pair (x (m, {data.num_features}), y (m,)) "
                                "of tensors")
    start = time.perf_counter()
    model = make_model(config.model, data.num_features, data.num_classes, config.hidden, seed,
                       data.x_train.dtype)
    init: float | torch.Tensor = config.init_logit
    if config.h_init == "detector":
        if agreement is None:
            agreement, _ = disagreement_weights(data, config.model, config.hidden, seed)
        init = detector_logits(agreement, config.detector_scale)
    mp = cleaning_problem(data, model, config.steps, config.inner_lr, config.weight_decay,
                          init_logit=init)
    best: dict[str, Any] = {"loss": math.inf, "h": mp.hparams["h"].detach().clone(),
                            "step": 0, "prev": mp.hparams["h"].detach().clone()}
    evaluate = None
    if select is not None:
        def evaluate(hparams: dict[str, torch.Tensor], params: Any) -> dict[str, float]:
            # params is the inner solution at the hyperparameters before this step
            with torch.no_grad():
                loss = float(F.cross_entropy(mp.forward(params, select[0], outer=True),
                                             select[1]))
            if loss < best["loss"]:
                best.update(loss=loss, h=best["prev"], step=len(loop.history))
            best["prev"] = hparams["h"].detach().clone()
            return {"select_loss": loss}

    callbacks: list[Any] = []
    pruning = None
    if trial is not None:
        monitor = "eval_select_loss" if select is not None else "outer_loss"
        pruning = OptunaPruning(trial, monitor=monitor, every=report_every)
        callbacks.append(pruning)
    if deadline is not None:
        callbacks.append(_Deadline(deadline))
    lr = config.outer_lr * data.n_train
    initial = dict(mp.params)
    loop = OuterLoop(mp.problem, mp.hparams, initial if config.warm_start else None,
                     make_cleaning_estimator(config.estimator, config.steps),
                     lambda hp: torch.optim.SGD(hp, lr=lr, momentum=0.9),
                     reinit=None if config.warm_start else (lambda step: dict(initial)),
                     evaluate=evaluate, eval_every=1 if select is not None else 0,
                     callbacks=callbacks, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        history = run_trial(loop, config.outer_steps, pruning) if pruning is not None \
            else loop.run(config.outer_steps)
    if select is not None:
        h, step, select_loss = best["h"], best["step"], best["loss"]
    else:
        h, step, select_loss = loop.hparams["h"].detach(), len(history), None
    return CleaningRun(torch.sigmoid(h), float(history[-1]["outer_loss"]), select_loss, step,
                       history, time.perf_counter() - start)


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method on one task.

    Attributes:
        method: its name.
        test_acc: test accuracy of the final model (train split weighted by ``weights`` plus
            the validation split; see the module docstring).
        test_acc_train_only: the same fit without the validation split (``None`` for the
            validation set alone).
        precision, recall, f1: of the noisy flags ``weights < 0.5`` (``None`` for methods
            that flag nothing by construction).
        seconds: wall-clock seconds of the method (search and final fits).
        val_loss: the validation loss the method's selection saw (``None`` if none).
        params: what the method chose (the best trial's values, ...).
        trials: ``{"complete": .., "pruned": .., "failed": ..}`` for searches.
        weights: ``(n_train,)`` example weights (not serialised by :meth:`summary`).
    """

    method: str
    test_acc: float
    test_acc_train_only: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    seconds: float
    val_loss: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    trials: dict[str, int] | None = None
    weights: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict of everything but the weights."""
        out = asdict(replace(self, weights=None))
        out.pop("weights")
        return out


def fit_weighted(data: CleaningData, weights: torch.Tensor | None, model: str = "mlp",
                 hidden: int = 64, recipe: FitRecipe = DEFAULT_RECIPE, seed: int = 0,
                 include_val: bool = True) -> nn.Module:
    """A fresh ``model`` (initialised by ``seed``) fitted by ``recipe`` on the training split
    weighted by ``weights`` (``(n_train,)``; ``None``: all ones) and, with ``include_val``,
    the validation split at weight 1 (the fit of :func:`final_accuracy`; it reads neither
    the test split nor the flip labels)."""
    n = data.n_train
    w = torch.ones(n, dtype=data.x_train.dtype) if weights is None else \
        weights.to(data.x_train.dtype)
    if include_val:
        x = torch.cat([data.x_train, data.x_val])
        y = torch.cat([data.y_train, data.y_val])
        w = torch.cat([w, torch.ones(data.y_val.numel(), dtype=w.dtype)])
    else:
        x, y = data.x_train, data.y_train
    net = make_model(model, data.num_features, data.num_classes, hidden, seed,
                     data.x_train.dtype)
    return fit_classifier(net, x, y, w, recipe)


def final_accuracy(data: CleaningData, weights: torch.Tensor | None, model: str = "mlp",
                   hidden: int = 64, recipe: FitRecipe = DEFAULT_RECIPE, seed: int = 0,
                   include_val: bool = True) -> float:
    """Test accuracy of a fresh ``model`` (initialised by ``seed``) fitted by ``recipe`` on
    the training split weighted by ``weights`` (``(n_train,)``; ``None``: all ones) and,
    with ``include_val``, the validation split at weight 1 (:func:`fit_weighted`)."""
    net = fit_weighted(data, weights, model, hidden, recipe, seed, include_val)
    return accuracy(net, data.x_test, data.y_test)


def select_recipe(data: CleaningData, weights: torch.Tensor | None, model: str = "mlp",
                  hidden: int = 64, seed: int = 0, base: FitRecipe = DEFAULT_RECIPE,
                  grid: Sequence[float] = FINAL_WEIGHT_DECAYS
                  ) -> tuple[FitRecipe, dict[float, float]]:
    """Choose the final fit's weight decay by 2-fold cross-validation on the validation split.

    The validation split is cut into two stratified halves (seeded by ``seed``); for each
    weight decay of ``grid`` a fresh network is fitted by ``base`` (with that weight decay)
    on the training split weighted by ``weights`` plus one half, and scored by its
    cross-entropy on the other half, both ways round. The lowest mean wins (ties: the
    first). Returns the chosen recipe and the mean score of each weight decay.

    Raises:
        BilevelInputError: an empty grid or a validation split of fewer than 2 examples.
    """
    if not grid:
        raise BilevelInputError("grid must hold at least one weight decay")
    n_val = data.y_val.numel()
    if n_val < 2:
        raise BilevelInputError(f"cross-validation needs >= 2 validation examples, got {n_val}")
    gen = torch.Generator().manual_seed(_int("seed", seed, 0) + 2)
    folds = stratified_split(data.y_val, [n_val // 2, n_val - n_val // 2], gen)
    w = torch.ones(data.n_train) if weights is None else weights
    scores: dict[float, float] = {}
    for wd in grid:
        recipe = replace(base, weight_decay=_positive("grid entry", wd, allow_zero=True))
        losses = []
        for k in range(2):
            fit_idx, score_idx = folds[1 - k], folds[k]
            x = torch.cat([data.x_train, data.x_val[fit_idx]])
            y = torch.cat([data.y_train, data.y_val[fit_idx]])
            ww = torch.cat([w.to(x.dtype), torch.ones(fit_idx.numel(), dtype=x.dtype)])
            net = make_model(model, data.num_features, data.num_classes, hidden, seed, x.dtype)
            fit_classifier(net, x, y, ww, recipe)
            losses.append(cross_entropy(net, data.x_val[score_idx], data.y_val[score_idx]))
        value = sum(losses) / 2
        scores[float(wd)] = value if math.isfinite(value) else math.inf
    best = min(scores, key=lambda k: scores[k])
    return replace(base, weight_decay=best), scores


def _result(method: str, data: CleaningData, weights: torch.Tensor | None, start: float,
            model: str, hidden: int, recipe: FitRecipe | None, seed: int, *, flags: bool,
            train_only: bool = True, params: dict[str, Any] | None = None,
            **extra: Any) -> MethodResult:
    params = dict(params or {})
    if recipe is None:
        recipe, _ = select_recipe(data, weights, model, hidden, seed)
    params["final_weight_decay"] = recipe.weight_decay
    acc = final_accuracy(data, weights, model, hidden, recipe, seed)
    acc_tr = final_accuracy(data, weights, model, hidden, recipe, seed, include_val=False) \
        if train_only else None
    scores = flag_scores(weights < THRESHOLD, data.flipped) if flags and weights is not None \
        else {"precision": None, "recall": None, "f1": None}
    return MethodResult(method, acc, acc_tr, scores["precision"], scores["recall"],
                        scores["f1"], time.perf_counter() - start, weights=weights,
                        params=params, **extra)


def no_cleaning(data: CleaningData, model: str = "mlp", hidden: int = 64, seed: int = 0,
                recipe: FitRecipe | None = None) -> MethodResult:
    """Every training example at weight 1 (the noisy labels as they are)."""
    start = time.perf_counter()
    return _result("no cleaning", data, torch.ones(data.n_train), start, model, hidden,
                   recipe, seed, flags=False)


def validation_only(data: CleaningData, model: str = "mlp", hidden: int = 64, seed: int = 0,
                    recipe: FitRecipe | None = None) -> MethodResult:
    """The clean validation split alone (every training example at weight 0)."""
    start = time.perf_counter()
    return _result("validation set alone", data, torch.zeros(data.n_train), start, model,
                   hidden, recipe, seed, flags=False, train_only=False)


def oracle(data: CleaningData, model: str = "mlp", hidden: int = 64, seed: int = 0,
           recipe: FitRecipe | None = None) -> MethodResult:
    """The clean training examples only (weights ``1 − flipped``: uses the flip labels)."""
    start = time.perf_counter()
    return _result("oracle (clean examples only)", data, (~data.flipped).float(), start, model,
                   hidden, recipe, seed, flags=True)


def disagreement_weights(data: CleaningData, model: str = "mlp", hidden: int = 64,
                         seed: int = 0) -> tuple[torch.Tensor, FitRecipe]:
    """The example weights of :func:`disagreement` and the detector's recipe.

    The detector is the final model of :func:`validation_only`: a fresh ``model``
    (initialised by ``seed``) fitted by :data:`DEFAULT_RECIPE` on the validation split
    (every training example at weight 0, so their labels do not enter the fit), its weight
    decay chosen by :func:`select_recipe`'s 2-fold cross-validation on the validation split.
    ``ω_i = 1`` where its arg-max prediction on ``x_i`` equals the training label ``ỹ_i``,
    else 0. Reads the training features and labels and the validation split only (never
    the test split, ``y_true`` or ``flipped``).

    Returns:
        ``(weights, recipe)``: ``(n_train,)`` float weights in ``{0, 1}`` (dtype of the
        features) and the detector's fit recipe.
    """
    zeros = torch.zeros(data.n_train, dtype=data.x_train.dtype)
    recipe, _ = select_recipe(data, zeros, model, hidden, seed)
    net = fit_weighted(data, zeros, model, hidden, recipe, seed)
    with torch.no_grad():
        agree = net(data.x_train).argmax(1) == data.y_train
    return agree.to(data.x_train.dtype), recipe


def detector_logits(agreement: torch.Tensor, scale: float) -> torch.Tensor:
    """The detector start of h: ``+scale`` where ``agreement`` (:func:`disagreement_weights`,
    ``(n,)`` in ``{0, 1}``) is 1, ``−scale`` where it is 0 (``σ(±scale)`` on either side of
    the flag threshold, so the start flags exactly the detector's disagreements).

    Raises:
        BilevelInputError: a non-positive scale or an agreement outside ``{0, 1}``.
    """
    scale = _positive("scale", scale)
    if not (isinstance(agreement, torch.Tensor) and agreement.dim() == 1
            and bool(((agreement == 0) | (agreement == 1)).all())):
        raise BilevelInputError("agreement must be a 1-d tensor of 0s and 1s")
    a = agreement if agreement.is_floating_point() else agreement.to(torch.get_default_dtype())
    return scale * (2.0 * a - 1.0)


def disagreement(data: CleaningData, model: str = "mlp", hidden: int = 64, seed: int = 0,
                 recipe: FitRecipe | None = None) -> MethodResult:
    """Validation-classifier disagreement: drop the training examples whose label a
    classifier fitted on the clean validation split alone disagrees with.

    The weights are those of :func:`disagreement_weights` (``ω_i = 1`` when the detector
    predicts the training label, else 0, so an example is flagged exactly when the two
    disagree); the final model, its weight decay and the metrics then follow the rule of
    every method (:func:`select_recipe`, :func:`final_accuracy`, :func:`flag_scores`).

    Why it is a baseline: it uses exactly the information hyper-cleaning uses (the noisy
    training split and the clean validation split), needs no hypergradient, no
    per-example hyperparameter and no search, and costs one cross-validated plain fit
    (that of the validation set alone). A flip to a uniformly random other class is rarely
    the class a reasonable classifier predicts, so with a validation split large enough for
    a decent classifier it is a strong noisy-label detector; hyper-cleaning's flags are
    worth their cost only where they beat it. ``params`` records the detector's weight
    decay and the number flagged.
    """
    start = time.perf_counter()
    weights, detector = disagreement_weights(data, model, hidden, seed)
    params = {"detector_weight_decay": detector.weight_decay,
              "flagged": int((weights < THRESHOLD).sum())}
    return _result("validation-classifier disagreement", data, weights, start, model, hidden,
                   recipe, seed, flags=True, params=params)


def hyper_cleaning(data: CleaningData, config: CleaningConfig = CleaningConfig(),
                   seed: int = 0, recipe: FitRecipe | None = None) -> MethodResult:
    """One hyper-cleaning run at a fixed ``config`` (no search), evaluated by the module's
    rule (final fit weight decay by :func:`select_recipe` unless ``recipe`` is given).

    Returns:
        A :class:`MethodResult` with the flag scores of ``σ(h) < 0.5``.

    Raises:
        BilevelInputError: a bad config or data.
    """
    start = time.perf_counter()
    run = run_cleaning(data, config, seed)
    return _result(f"hyper-cleaning ({config.estimator}, fixed)", data, run.weights, start,
                   config.model, config.hidden, recipe, seed, flags=True,
                   val_loss=run.val_loss, params=asdict(config))


def _trial_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.trials]
    ts = optuna.trial.TrialState
    return {"complete": states.count(ts.COMPLETE), "pruned": states.count(ts.PRUNED),
            "failed": states.count(ts.FAIL)}


def _check_budget(budget_seconds: float | None, n_trials: int | None) -> None:
    if budget_seconds is None and n_trials is None:
        raise BilevelInputError("give budget_seconds, n_trials or both (a search needs an end)")
    if budget_seconds is not None:
        _positive("budget_seconds", budget_seconds)
    if n_trials is not None:
        _int("n_trials", n_trials, 1)


def optuna_alone(data: CleaningData, budget_seconds: float | None = 60.0,
                 n_trials: int | None = None, model: str = "mlp", hidden: int = 64,
                 seed: int = 0, steps: int = DEFAULT_RECIPE.steps,
                 callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> MethodResult:
    """Optuna (TPE, seeded) over the plain fit's learning rate (``[1e-3, 1]``, log) and weight
    decay (``[1e-5, 1]``, log), every training example at weight 1.

    Each trial fits a fresh network on the noisy training split and is scored by its
    validation cross-entropy; the best pair is refitted by the evaluation rule. The search
    stops after ``budget_seconds`` of wall clock or ``n_trials`` trials.

    Raises:
        BilevelInputError: neither a budget nor a trial count, or bad values.
    """
    _check_budget(budget_seconds, n_trials)
    start = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        recipe = FitRecipe(steps, trial.suggest_float("lr", 1e-3, 1.0, log=True),
                           weight_decay=trial.suggest_float("weight_decay", 1e-5, 1.0, log=True))
        net = make_model(model, data.num_features, data.num_classes, hidden, seed,
                         data.x_train.dtype)
        fit_classifier(net, data.x_train, data.y_train, None, recipe)
        value = cross_entropy(net, data.x_val, data.y_val)
        return value if math.isfinite(value) else float("inf")

    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials, timeout=budget_seconds,
                   callbacks=[callback] if callback is not None else None)
    best = study.best_trial
    recipe = FitRecipe(steps, best.params["lr"], weight_decay=best.params["weight_decay"])
    return _result("Optuna alone (lr, weight decay)", data, torch.ones(data.n_train), start,
                   model, hidden, recipe, seed, flags=False, val_loss=best.value,
                   params=dict(best.params), trials=_trial_counts(study))


#: the hybrid's search space: estimator, T, outer and inner learning rates, the inner
#: problem's weight decay, the start of h (:data:`H_INITS`) and, for the detector start, its
#: scale c (log-uniform)
HYBRID_SPACE: dict[str, Any] = {
    "estimator": CLEANING_ESTIMATORS,
    "steps": (10, 20, 50),
    "outer_lr": (0.1, 10.0),
    "inner_lr": (0.02, 0.5),
    "weight_decay": (1e-4, 1e-1),
    "h_init": H_INITS,
    "detector_scale": (0.5, 4.0),
}


def hybrid(data: CleaningData, budget_seconds: float | None = 60.0,
           n_trials: int | None = None, base: CleaningConfig = CleaningConfig(),
           seed: int = 0, recipe: FitRecipe | None = None, select_fraction: float = 0.5,
           callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
           pruner: optuna.pruners.BasePruner | None = None) -> MethodResult:
    """Optuna chooses the estimator, T, the outer and inner learning rates, the inner
    weight decay and the start of h (:data:`HYBRID_SPACE`, TPE seeded by ``seed``);
    hypergradients learn the example weights inside each trial (:func:`run_cleaning` with
    the other settings of ``base``).

    The start ``h_init`` is ``"constant"`` (every ``h_i`` at ``base.init_logit``) or
    ``"detector"`` (``h_i = ±c``, ``c`` drawn from ``HYBRID_SPACE["detector_scale"]``, by
    the agreement of the validation-classifier detector of :func:`disagreement_weights`
    with the training label). The detector is fitted once per call, before the search and
    inside its budget, on the part of the validation split that drives the hypergradients
    only: the held-out part then stays unseen by everything a trial learns from, so the
    trial scores that choose between the starts remain honest held-out estimates.

    The validation split is cut in two by :func:`split_selection` (``select_fraction``
    held out): the hypergradients fit one part, the other scores the trials. A trial's
    value is its lowest held-out cross-entropy over the outer steps, whose weights it
    keeps (the in-sample outer loss would favour the runs that overfit the validation
    examples most). The held-out curve is reported every 10 outer steps and a median
    pruner (3 startup trials, 20 warm-up steps) stops hopeless trials. The wall-clock
    budget also bounds the trial running when it runs out (its loop stops and the trial
    completes with what it learned). The best trial's weights give the flags and the
    final model (fitted on the whole validation split, as for every method).

    Raises:
        BilevelInputError: neither a budget nor a trial count, bad values, or no trial
            completed.
    """
    _check_budget(budget_seconds, n_trials)
    start = time.perf_counter()
    deadline = None if budget_seconds is None else start + budget_seconds
    outer_data, select = split_selection(data, select_fraction, seed)
    weights: dict[int, torch.Tensor] = {}
    agreement = None
    if "detector" in HYBRID_SPACE["h_init"]:
        agreement, _ = disagreement_weights(outer_data, base.model, base.hidden, seed)

    def objective(trial: optuna.Trial) -> float:
        config = replace(
            base,
            estimator=trial.suggest_categorical("estimator", list(HYBRID_SPACE["estimator"])),
            steps=trial.suggest_categorical("steps", list(HYBRID_SPACE["steps"])),
            outer_lr=trial.suggest_float("outer_lr", *HYBRID_SPACE["outer_lr"], log=True),
            inner_lr=trial.suggest_float("inner_lr", *HYBRID_SPACE["inner_lr"], log=True),
            weight_decay=trial.suggest_float("weight_decay", *HYBRID_SPACE["weight_decay"],
                                             log=True),
            h_init=trial.suggest_categorical("h_init", list(HYBRID_SPACE["h_init"])))
        if config.h_init == "detector":
            config = replace(config, detector_scale=trial.suggest_float(
                "detector_scale", *HYBRID_SPACE["detector_scale"], log=True))
        run = run_cleaning(outer_data, config, seed, select=select, trial=trial,
                           deadline=deadline, agreement=agreement)
        weights[trial.number] = run.weights
        trial.set_user_attr("outer_steps_done", len(run.history))
        trial.set_user_attr("best_step", run.best_step)
        value = run.select_loss
        return value if value is not None and math.isfinite(value) else float("inf")

    pruner = pruner if pruner is not None else optuna.pruners.MedianPruner(
        n_startup_trials=3, n_warmup_steps=20)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    timeout = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
    study.optimize(objective, n_trials=n_trials, timeout=timeout,
                   callbacks=[callback] if callback is not None else None)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise BilevelInputError("no hybrid trial completed within the budget: raise "
                                "budget_seconds or n_trials")
    best = study.best_trial
    params = {**best.params, **{k: best.user_attrs.get(k) for k in ("outer_steps_done",
                                                                   "best_step")}}
    return _result("hybrid (Optuna + hypergradients)", data, weights[best.number], start,
                   base.model, base.hidden, recipe, seed, flags=True, val_loss=best.value,
                   params=params, trials=_trial_counts(study))


__all__ = ["CLEANING_ESTIMATORS", "DATASETS", "DEFAULT_RECIPE", "FINAL_WEIGHT_DECAYS",
           "HYBRID_SPACE", "H_INITS", "MODELS", "THRESHOLD", "CleaningConfig", "CleaningData",
           "CleaningRun", "FitRecipe", "MethodResult", "accuracy", "cleaning_problem",
           "cross_entropy", "detector_logits", "disagreement", "disagreement_weights",
           "final_accuracy",
           "fit_classifier", "fit_weighted", "flag_scores", "flip_labels",
           "hybrid", "hyper_cleaning", "l2_penalty", "load_cleaning_data", "make_cleaning_data",
           "make_cleaning_estimator", "make_model", "no_cleaning", "optuna_alone", "oracle",
           "run_cleaning", "select_recipe", "split_selection", "stratified_split",
           "validation_only"]
