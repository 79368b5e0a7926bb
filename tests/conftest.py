"""Test-wide setup: without a GPU, Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before triton decorates any kernel, so it is set here,
before the packages under test are imported. The interpreter's int32-overflow assertions
(debug-mode checks on a GPU) are switched off for speed, except in the test that turns
them back on (``tests/kernels/test_library.py``) or with ``MILP_SANITIZE_OVERFLOW=1``.
"""
import os
import random
import time

import pytest

# MKL's results depend on its operands' memory alignment on some CPUs (AVX-512: a user's adapter
# rows at another offset of a bank shared with other users gave other last bits than the same rows
# alone). The tests that claim bit-for-bit equality (a user trained beside others against alone)
# claim it for a BLAS whose results do not depend on where the data lies: MKL's strict conditional
# numerical reproducibility, set before torch loads MKL. (Users get those equalities to rounding.)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# pytest-xdist workers (the README's test command runs `-n auto`) share the cores: each gets its
# share for torch's intra-op threads. On 2 cores, two workers of two threads each ran the suite no
# faster than one process; of one thread each, 1.6-1.8x faster.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // _WORKERS))

# hypothesis: random draws on a developer's machine (each run explores new cases), the same
# draws in CI (CI=true), so a rare failing example shows up locally, never as a red CI that
# the next run turns green; `--hypothesis-seed` still picks draws by hand
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    _hypothesis_settings.load_profile("ci")

if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MILP_SANITIZE_OVERFLOW", "0") != "1":
    from kernels._backend import set_interpreter_overflow_checks

    set_interpreter_overflow_checks(False)


_RECORDER = None


def pytest_configure(config):
    """``MILP_RECORD_LAUNCHES=FILE``: write down every Triton kernel variant the session launches
    (``kernels.aot.LaunchRecorder``), so ``python -m kernels.aot --recorded FILE --arch 90``
    can compile each one for the GPU from a CPU machine."""
    global _RECORDER
    if os.environ.get("MILP_RECORD_LAUNCHES"):
        from kernels.aot import LaunchRecorder

        _RECORDER = LaunchRecorder().__enter__()


def pytest_unconfigure(config):
    global _RECORDER
    if _RECORDER is not None:
        _RECORDER.__exit__(None, None, None)
        _RECORDER.write(os.environ["MILP_RECORD_LAUNCHES"])
        _RECORDER = None


def pytest_runtest_setup(item):
    """``MILP_TEST_DEADLINE`` (seconds since the epoch, set by ``bench/gpu_run.sh`` under a time
    cap): tests that would start after it are skipped, so the session still ends normally and
    writes its report (a session killed by its cap, with pytest-xdist workers, writes none)."""
    deadline = os.environ.get("MILP_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("MILP_TEST_DEADLINE passed: the time cap of this run (bench/gpu_run.sh)")


@pytest.fixture(autouse=True)
def _same_global_random_state():
    """Every test starts from one global random state (torch's, ``random``'s, NumPy's), whatever
    ran before it in its process: pytest-xdist gives each worker another share of the tests, in
    an order that changes from run to run, and a test drawing from a global generator drew what
    the tests before it left (a float64 tolerance test failed so under ``-n auto``)."""
    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
