"""Pytree arithmetic: properties over random shapes (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hypergrad.pytree import (
    tree_axpy,
    tree_norm,
    tree_paths,
    tree_ravel,
    tree_stack,
    tree_unravel,
    tree_vdot,
)

from problems import rounding

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


def _tree(shape_list, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    return {f"leaf{i}": torch.randn(tuple(batch) + tuple(s), generator=g, dtype=torch.float64)
            for i, s in enumerate(shape_list)}


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_ravel_unravel_round_trip(shape_list, seed):
    tree = _tree(shape_list, seed)
    back = tree_unravel(tree_ravel(tree), tree)
    assert all(torch.equal(back[k], tree[k]) for k in tree)
    assert tree_ravel(tree).numel() == sum(v.numel() for v in tree.values())


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16), st.integers(1, 4))
def test_batched_operations_equal_per_column(shape_list, seed, k):
    x, y = _tree(shape_list, seed, (k,)), _tree(shape_list, seed + 1, (k,))
    cols = lambda t, i: {n: v[i] for n, v in t.items()}  # noqa: E731
    dots = tree_vdot(x, y, batched=True)
    alpha = torch.arange(1.0, k + 1, dtype=torch.float64)
    axpy = tree_axpy(alpha, x, y, batched=True)
    for i in range(k):
        xi, yi = cols(x, i), cols(y, i)
        xf, yf = tree_ravel(xi), tree_ravel(yi)
        # two summation orders of n products differ by ≤ 2γ_n Σ|x_j y_j| (Higham §3.1),
        # which a cancelling dot product can make large relative to the dot itself;
        # a sum of squares does not cancel: γ_n relative
        bound = rounding(xf.numel())
        assert torch.allclose(dots[i], xf @ yf, rtol=0, atol=bound * float((xf * yf).abs().sum()))
        assert torch.allclose(tree_norm(x, batched=True)[i], xf.norm(), rtol=bound, atol=0)
        assert torch.allclose(tree_ravel(cols(axpy, i)), alpha[i] * tree_ravel(xi)
                              + tree_ravel(yi), rtol=1e-12, atol=1e-12)
    restacked = tree_stack([cols(x, i) for i in range(k)])
    assert all(torch.equal(restacked[n], x[n]) for n in x)


def test_paths_name_the_leaves():
    assert tree_paths({"a": torch.zeros(1), "b": [torch.zeros(1)]}) == ["['a']", "['b'][0]"]
