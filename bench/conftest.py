"""Test-wide setup: without a GPU, Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before triton decorates any kernel, so it is set here,
before the packages under test are imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
