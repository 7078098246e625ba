"""The ``Example:`` sections of the public docstrings run as written (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import bilevel
import hypergrad

MODULES = ["bilevel", "hypergrad", *sorted(
    info.name
    for package in (hypergrad, bilevel)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    if not info.name.endswith("__main__")
)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
