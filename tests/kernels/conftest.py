import pytest
import torch

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "torch", "torch-loop"])
def backend(request, monkeypatch):
    """Run a test on the Triton kernels (GPU, or the interpreter on CPU) and on the torch path,
    in both of its forms (per-token gather; ``torch-loop``: the loop over segments)."""
    if request.param == "torch-loop":
        from kernels.ops import fused_linear

        monkeypatch.setattr(fused_linear, "GATHER_MAX_ELEMENTS", -1)
    with kernels.use_backend(request.param.split("-")[0]):
        yield request.param


@pytest.fixture
def device():
    return DEVICE
