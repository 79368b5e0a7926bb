"""Fixtures of the search tests (helpers and tiny settings live in ``search_helpers.py``)."""
from __future__ import annotations

import pytest
from search_helpers import lora_objectives_for, lora_space_small


@pytest.fixture
def lora_space():
    return lora_space_small()


@pytest.fixture
def lora_objectives(lora_space):
    return lora_objectives_for(lora_space)
