"""Arithmetic on pytrees of tensors (nested dicts, lists and tuples).

Every function works leaf by leaf. Functions with a ``batched`` flag treat the
leading dimension of each leaf as a batch of k independent vectors and return
one value per vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _pt

PyTree = Any

tree_map = _pt.tree_map
tree_leaves = _pt.tree_leaves
tree_flatten = _pt.tree_flatten
tree_unflatten = _pt.tree_unflatten
tree_structure = _pt.tree_structure


def tree_map2(fn: Callable, x: PyTree, *others: PyTree) -> PyTree:
    """Apply ``fn`` to matching leaves of trees of the same structure.

    Raises:
        ValueError: the trees have different numbers of leaves (``zip(strict=True)``).
    """
    leaves_x, spec = tree_flatten(x)
    rest = [tree_leaves(o) for o in others]
    return tree_unflatten([fn(*leaves) for leaves in zip(leaves_x, *rest, strict=True)], spec)


def tree_paths(tree: PyTree) -> list[str]:
    """Readable names of the leaves, e.g. ``['l2']`` or ``['net']['w']``."""
    return [_pt.keystr(path) for path, _ in _pt.tree_flatten_with_path(tree)[0]]


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    """``x + y`` leaf by leaf (trees of the same structure)."""
    return tree_map2(torch.add, x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """``x − y`` leaf by leaf (trees of the same structure)."""
    return tree_map2(torch.sub, x, y)


def tree_scale(alpha: float | torch.Tensor, x: PyTree) -> PyTree:
    """``alpha * x`` leaf by leaf."""
    return tree_map(lambda a: alpha * a, x)


def tree_axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree, batched: bool = False) -> PyTree:
    """``alpha * x + y``; with ``batched``, ``alpha`` may have shape ``(k,)``, one entry
    per vector along the leading dimension of every leaf."""
    return tree_map2(lambda a, b: b + _per_vector(alpha, a, batched) * a, x, y)


def tree_zeros_like(x: PyTree) -> PyTree:
    """Zeros with the structure, shapes, dtypes and devices of ``x``."""
    return tree_map(torch.zeros_like, x)


def tree_detach(x: PyTree) -> PyTree:
    """``x`` with every tensor leaf detached (no copy; other leaves as they are)."""
    return tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, x)


def tree_clone(x: PyTree) -> PyTree:
    """Detached copies of the tensor leaves of ``x`` (other leaves as they are)."""
    return tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, x)


def tree_requires_grad(x: PyTree) -> PyTree:
    """Detached copies of the floating leaves that require grad."""
    return tree_map(
        lambda a: a.detach().requires_grad_(True)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a,
        x,
    )


def tree_vdot(x: PyTree, y: PyTree, batched: bool = False) -> torch.Tensor:
    """Euclidean inner product ⟨x, y⟩ summed over all leaves: a 0-d tensor, or shape
    ``(k,)`` (one per vector) if ``batched``."""
    dims = (lambda a: tuple(range(1, a.dim()))) if batched else (lambda a: tuple(range(a.dim())))
    terms = [(a * b).sum(dim=dims(a)) if a.dim() > int(batched) else a * b
             for a, b in zip(tree_leaves(x), tree_leaves(y), strict=True)]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)


def tree_norm(x: PyTree, batched: bool = False) -> torch.Tensor:
    """Euclidean norm over all leaves: a 0-d tensor, or shape ``(k,)`` if ``batched``."""
    return tree_vdot(x, x, batched).clamp_min(0).sqrt()


def tree_numel(x: PyTree) -> int:
    """The number of scalars in all leaves."""
    return sum(a.numel() for a in tree_leaves(x))


def tree_ravel(x: PyTree) -> torch.Tensor:
    """Concatenate all leaves into one flat vector of shape ``(tree_numel(x),)``
    (leaves must share dtype and device)."""
    return torch.cat([a.reshape(-1) for a in tree_leaves(x)])


def tree_unravel(flat: torch.Tensor, like: PyTree) -> PyTree:
    """Inverse of :func:`tree_ravel`: split ``flat`` back into the shapes of ``like``.

    A leading batch dimension on ``flat`` (shape ``(k, n)``) is kept on every leaf.
    """
    leaves, spec = tree_flatten(like)
    out, start = [], 0
    batch = flat.shape[:-1]
    for leaf in leaves:
        n = leaf.numel()
        out.append(flat[..., start:start + n].reshape(tuple(batch) + tuple(leaf.shape)))
        start += n
    return tree_unflatten(out, spec)


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack a list of k trees of the same structure along a new leading dimension
    (every leaf gets shape ``(k, *leaf.shape)``)."""
    leaves = [tree_leaves(t) for t in trees]
    spec = tree_structure(trees[0])
    return tree_unflatten([torch.stack(group) for group in zip(*leaves, strict=True)], spec)


def tree_all_finite(x: PyTree) -> bool:
    """Whether every tensor leaf is free of NaN and inf (one host sync per leaf)."""
    return all(bool(torch.isfinite(a).all()) for a in tree_leaves(x) if isinstance(a, torch.Tensor))


def _per_vector(alpha: Any, leaf: torch.Tensor, batched: bool) -> Any:
    if batched and isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        return alpha.reshape(-1, *([1] * (leaf.dim() - 1)))
    return alpha
