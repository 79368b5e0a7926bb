import pytest
import torch

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Run a test on the Triton kernels (GPU, or the interpreter on CPU) and on the torch path."""
    with kernels.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE
