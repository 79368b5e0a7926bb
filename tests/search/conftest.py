"""Fixtures of the search tests (helpers and tiny settings live in ``search_helpers.py``)."""
from __future__ import annotations

import pytest
import torch
from search_helpers import lora_objectives_for, lora_space_small


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The surrogates here are tiny: one thread is faster, and far faster on a shared box
    (two OpenMP threads on two busy cores spin against each other, 5x slower seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def lora_space():
    return lora_space_small()


@pytest.fixture
def lora_objectives(lora_space):
    return lora_objectives_for(lora_space)
