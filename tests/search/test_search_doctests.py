"""Every public example in ``search/`` runs (BoTorch-style docstring examples)."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "search",
    "search.space",
    "search.objectives",
    "search.pareto",
    "search.plots",
    "search.trial_log",
    "search.surrogate",
    "search.loop",
    "search.problems",
    "search.validate",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 0
