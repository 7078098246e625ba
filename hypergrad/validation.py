"""Input checks run once before any estimator does work.

Each check raises an error that names the argument (and the leaf) at fault and what
was expected, so that nothing runs silently wrong.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
import torch.utils._pytree as _pt

from .errors import BilevelInputError, HyperparameterError, NonFiniteError, ObjectiveError
from .hvp import _layout  # the layout the remembered HVP choices are keyed by
from .optim import check_settings
from .problem import Problem
from .pytree import PyTree, tree_leaves, tree_requires_grad


def _named_leaves(name: str, tree: Any) -> list[tuple[str, Any]]:
    return [(name + _pt.keystr(path), leaf) for path, leaf in _pt.tree_flatten_with_path(tree)[0]]


def check_tree(name: str, tree: PyTree, error: type[Exception] = BilevelInputError) -> None:
    """``tree`` must be a non-empty pytree whose leaves are floating-point tensors."""
    leaves = _named_leaves(name, tree)
    if not leaves:
        raise error(f"{name} must be a non-empty dict (pytree) of floating-point tensors, "
                    f"got {tree!r}")
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise error(f"{path} must be a floating-point torch.Tensor, got "
                        f"{type(leaf).__name__} (wrap numbers with torch.tensor(..., dtype=...))")
        if not leaf.is_floating_point():
            raise error(f"{path} must be a floating-point tensor, got dtype {leaf.dtype}")


def check_finite(name: str, tree: PyTree) -> None:
    """Raise :class:`NonFiniteError` naming the first leaf of ``tree`` with NaN or inf."""
    for path, leaf in _named_leaves(name, tree):
        if not bool(torch.isfinite(leaf).all()):
            raise NonFiniteError(f"{path} contains NaN or inf")


def check_consistent(params: PyTree, hparams: PyTree, problem: Problem) -> None:
    """All tensors share one device; floating ones share the dtype of ``params``."""
    ref_name, ref = _named_leaves("params", params)[0]
    named = _named_leaves("params", params) + _named_leaves("hparams", hparams)
    named += _named_leaves("inner_batch", problem.inner_batch)
    named += _named_leaves("outer_batch", problem.outer_batch)
    if problem.step_batch is not None:
        named += _named_leaves("step_batch(0)", problem.step_batch(0))
    for path, leaf in named:
        if not isinstance(leaf, torch.Tensor):
            continue
        if leaf.device != ref.device:
            raise BilevelInputError(f"{path} is on {leaf.device} but {ref_name} is on "
                                    f"{ref.device}: move all tensors to one device")
        if leaf.is_floating_point() and leaf.dtype != ref.dtype:
            raise BilevelInputError(f"{path} has dtype {leaf.dtype} but {ref_name} has "
                                    f"{ref.dtype}: use one floating dtype throughout")


def evaluate(name: str, fn: Any, params: PyTree, hparams: PyTree, batch: Any) -> torch.Tensor:
    """Call an objective, turning any failure or non-scalar output into a clear error."""
    try:
        out = fn(params, hparams, batch)
    except (KeyError, IndexError, AttributeError) as exc:
        keys = list(hparams) if isinstance(hparams, dict) else type(hparams).__name__
        raise HyperparameterError(
            f"{name} failed with {type(exc).__name__}: {exc}. Check that params and hparams "
            f"have the structure {name} reads (hparams keys: {keys})") from exc
    except RuntimeError as exc:
        raise ObjectiveError(f"{name}(params, hparams, batch) failed: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise ObjectiveError(f"{name} must return a scalar tensor, got {type(out).__name__}")
    if out.dim() != 0:
        raise ObjectiveError(f"{name} must return a scalar tensor (a mean or sum), got shape "
                             f"{tuple(out.shape)}")
    if not bool(torch.isfinite(out)):
        raise NonFiniteError(f"{name} is {out.item()} at the given params and hparams")
    return out


def _setting_terms(problem: Problem, hparams: PyTree) -> list[torch.Tensor]:
    """One scalar per tensor an optimizer setting computes from ``hparams`` (settings
    such as Adam's ``betas`` may hold callables in a tuple)."""
    terms = []
    if dataclasses.is_dataclass(problem.optimizer):
        for f in dataclasses.fields(problem.optimizer):
            value = getattr(problem.optimizer, f.name)
            for setting in value if isinstance(value, (tuple, list)) else [value]:
                if callable(setting):
                    terms += [leaf.sum() for leaf in tree_leaves(setting(hparams))
                              if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    return terms


def _reads(terms: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[bool]:
    """Whether each of ``leaves`` is read by the sum of ``terms``."""
    live = [t for t in terms if t.requires_grad]
    if not live:
        return [False] * len(leaves)
    grads = torch.autograd.grad(sum(live), leaves, allow_unused=True)
    return [g is not None for g in grads]


def read_only_by_settings(problem: Problem, hparams: PyTree, params: PyTree) -> bool:
    """True when neither objective reads any hyperparameter and the optimizer settings
    read them all (a learned learning rate): then none of them moves the fixed point w*."""
    lam = tree_requires_grad(hparams)
    leaves = tree_leaves(lam)
    with torch.enable_grad():
        losses = [problem.inner_loss(params, lam, problem.full_batch()),
                  problem.outer_loss(params, lam, problem.outer_batch)]
        settings = _setting_terms(problem, lam)
        return not any(_reads(losses, leaves)) and all(_reads(settings, leaves))


def check_problem(problem: Problem, hparams: PyTree, params: PyTree) -> None:
    """Validate everything an estimator relies on before it does any work.

    Hyperparameters and parameters must be pytrees of finite floating-point tensors on
    one device with one dtype (shared with the data); both objectives must return
    finite scalars; every hyperparameter must be read by the inner loss, the outer
    loss or an optimizer setting (otherwise its hypergradient is identically zero);
    the optimizer settings at these hyperparameters must be in range (a step size > 0, a
    momentum in [0, 1), ...). Evaluates each objective once.

    Args:
        problem: the :class:`~hypergrad.Problem`.
        hparams: λ, a non-empty pytree of floating tensors.
        params: w, a non-empty pytree of floating tensors.

    Raises:
        TypeError: ``problem`` is not a :class:`~hypergrad.Problem`.
        HyperparameterError: ``hparams`` malformed, a leaf the objectives look up but
            do not find, or a hyperparameter read by nothing.
        BilevelInputError: ``params`` malformed, or tensors on different devices or of
            different floating dtypes.
        ObjectiveError: an objective failed or did not return a scalar tensor.
        NonFiniteError: NaN or inf in ``params``, ``hparams`` or an objective's value.
        OptimizerSettingError: an optimizer setting out of range at ``hparams``.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a hypergrad.Problem, got {type(problem).__name__}")
    check_tree("hparams", hparams, HyperparameterError)
    check_tree("params", params)
    check_consistent(params, hparams, problem)
    check_finite("hparams", hparams)
    check_finite("params", params)
    lam = tree_requires_grad(hparams)
    with torch.enable_grad():
        terms = [evaluate("inner_loss", problem.inner_loss, params, lam, problem.full_batch()),
                 evaluate("outer_loss", problem.outer_loss, params, lam, problem.outer_batch)]
        terms += _setting_terms(problem, lam)
        used = _reads(terms, tree_leaves(lam))
    for (path, _), read in zip(_named_leaves("hparams", hparams), used, strict=True):
        if not read:
            raise HyperparameterError(
                f"{path} is not read by inner_loss, outer_loss or the optimizer settings, so "
                "its hypergradient is identically zero; remove it or use it")
    check_settings(problem.optimizer, hparams)


#: problems already validated by check_problem_once: id -> (weak reference, layout, the
#: objects the layout keys by identity)
_VALIDATED: dict[int, tuple[weakref.ref, tuple, list]] = {}


def check_problem_once(problem: Problem, hparams: PyTree, params: PyTree) -> None:
    """:func:`check_problem` on the first call for this problem object and again only when
    the layout (structure, shapes, dtypes, devices) of ``hparams`` or ``params`` changes:
    validation once per problem, not per call. Values are not re-checked on later calls;
    the estimators check what they compute (NaN or inf in a hypergradient, a diverged
    inner run, optimizer settings out of range).

    Raises:
        BilevelInputError: on a call that validates, what :func:`check_problem` raises
            (this or its subclasses HyperparameterError, ObjectiveError,
            OptimizerSettingError; NonFiniteError and TypeError as it says).
    """
    held: list[Any] = []
    key, layout = id(problem), (_layout(hparams, held), _layout(params, held))
    entry = _VALIDATED.get(key)
    if entry is not None and entry[0]() is problem and entry[1] == layout:
        return
    check_problem(problem, hparams, params)
    try:
        ref = weakref.ref(problem, lambda _, k=key: _VALIDATED.pop(k, None))
    except TypeError:  # a problem without weak references is checked every time
        return
    _VALIDATED[key] = (ref, layout, held)

