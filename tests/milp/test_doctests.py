"""Every public example in ``milp/`` runs (one example per public function)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import milp

MODULES = ["milp"] + [f"milp.{m.name}" for m in pkgutil.iter_modules(milp.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0
