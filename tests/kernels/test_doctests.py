"""Every public example in ``kernels/`` runs (``Example:`` blocks of the docstrings), as in
``milp/`` and ``search/``."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kernels
import kernels.ops

MODULES = (["kernels"] + [f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)]
           + [f"kernels.ops.{m.name}" for m in pkgutil.iter_modules(kernels.ops.__path__)])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0
