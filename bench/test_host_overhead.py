"""Host time of one eager ``lora_linear`` call: what bounds eager decode on a GPU.

In eager ``generate`` a GPU finishes a decode-sized linear long before the host has issued
the next one, so the step time is the host's: Python, the dispatcher, the launches. This
measures it per call on a problem too small for the device to matter (32 tokens, one per
user, 256 → 256 features), against ``F.linear`` alone.

* CUDA: the real thing. Calls are issued back to back without synchronising (the device keeps
  up), and the host clock over many calls gives microseconds per call, Triton launches
  included.
* CPU: the same Python path with the Triton backend (interpreter mode) and every kernel launch
  replaced by a no-op, so only our host code is timed: checks, plan slicing, config lookup,
  grids. The result is comparable across commits on one machine, not with a GPU host.

The result is checked first (CUDA: against float64; CPU: the stubbed path cannot compute,
so the unstubbed torch path is checked instead).
"""
from __future__ import annotations

import contextlib
import time

import _util as U
import launch_host
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import aot
from kernels.reference import lora_linear_ref

pytestmark = U.PYTESTMARK
USERS, K, N = launch_host.USERS, launch_host.K, launch_host.N
CALLS = 200  # calls per timed round
_US: dict[str, float] = {}  # impl -> host µs per call


@pytest.fixture(scope="module")
def problem():
    return launch_host.problem(U.DEVICE, U.DTYPE)


@pytest.fixture
def stubbed_launches(monkeypatch):
    """CPU: the Triton path with every launch a no-op (host code only)."""
    if U.CUDA:
        yield
        return
    if not kernels.interpreting():
        pytest.skip("the CPU measurement needs TRITON_INTERPRET=1 (bench/conftest.py sets it without CUDA)")
    # value checks read tensors on CPU (free there, skipped on GPUs): time what a GPU host runs
    monkeypatch.setattr(kernels._library, "_values_checked", lambda t: False)
    with kernels.use_backend("triton"), aot.LaunchRecorder(launch=False, record=False):
        yield


def _host_us(benchmark, call, *, impl: str, phase: str, err: float, no_grad: bool) -> float:
    """Host µs per ``call`` (the best of 5 rounds of :data:`CALLS` calls, after a warm-up),
    recorded with its derived figures; ``phase`` names the workload (``""`` or ``"fwdbwd"``)."""
    grad_mode = torch.no_grad if no_grad else contextlib.nullcontext

    def rounds():
        with grad_mode():
            for _ in range(CALLS):
                call()

    with grad_mode():
        for _ in range(20):  # warm-up: compiled kernels, caches
            call()
    U._sync()
    t0 = time.perf_counter()
    rounds()
    host_s = time.perf_counter() - t0
    U._sync()
    benchmark.group = "host-overhead"
    benchmark.pedantic(rounds, rounds=5, warmup_rounds=1, iterations=1)
    U._sync()
    best = benchmark.stats.stats.min if benchmark.stats is not None else host_s
    us = best / CALLS * 1e6
    suffix = f"-{phase}" if phase else ""
    benchmark.extra_info.update(
        workload=f"host-overhead{suffix}-T{USERS}-U{USERS}-{K}x{N}", impl=impl, op="host", time_ms=us / 1e3,
        host_us_per_call=us, calls_per_round=CALLS, rel_err=err, device=str(U.DEVICE),
        launches="real" if U.CUDA else "stubbed (host code only)", tokens=USERS,
        tokens_per_s=USERS / (us * 1e-6),
    )
    _US[impl + suffix] = us
    if impl == "milp" and "base" + suffix in _US:  # what the adapters add to each eager linear
        benchmark.extra_info["host_us_over_base"] = us - _US["base" + suffix]
    return us


@pytest.mark.parametrize("impl", ["base", "milp"])
def test_host_us_per_call(benchmark, problem, stubbed_launches, impl):
    bank, plan, ids, x, w = problem
    if impl == "milp":
        with torch.no_grad(), kernels.use_backend("torch" if not U.CUDA else "auto"):
            out = kernels.lora_linear(x, w, None, bank, plan)  # checked for real (unstubbed on CPU)
        ref = lora_linear_ref(x, w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, ids)
    else:
        out, ref = F.linear(x, w), F.linear(x.double(), w.double())
    err = U.check(f"{impl} forward", out, ref)

    if impl == "milp":
        def call():
            return kernels.lora_linear(x, w, None, bank, plan)
    else:
        def call():
            return F.linear(x, w)

    _host_us(benchmark, call, impl=impl, phase="", err=err, no_grad=True)


@pytest.mark.parametrize("impl", ["base", "milp"])
def test_host_us_per_training_step(benchmark, problem, stubbed_launches, impl):
    """The same for one training step of the linear (forward + backward, ``W`` frozen, the
    adapters trainable): the backward adds the ``dx`` path, the shrink of ``dy`` and the grouped
    ``dA``/``dB`` launch. On the first H200 run, forward + backward at 512 tokens took 1.4 ms more
    than its kernels timed alone; host work and launches are the suspects."""
    bank, plan, ids, x0, w = problem
    dy = torch.randn(x0.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1)).to(x0.device, x0.dtype)
    x = x0.clone().requires_grad_(True)
    params = (bank.lora_a, bank.lora_b)
    for p in params:
        p.requires_grad_(impl == "milp")
    try:
        # checked first: dx against float64 (the torch path on CPU, where the launches are stubbed)
        with kernels.use_backend("torch" if not U.CUDA else "auto"):
            if impl == "milp":
                kernels.lora_linear(x, w, None, bank, plan).backward(dy)
            else:
                F.linear(x, w).backward(dy)
        xd = x0.double().requires_grad_(True)
        if impl == "milp":
            lora_linear_ref(xd, w.double(), None, bank.lora_a.detach().double(), bank.lora_b.detach().double(),
                            bank.scale, bank.slots, ids).backward(dy.double())
        else:
            F.linear(xd, w.double()).backward(dy.double())
        err = U.check(f"{impl} dx", x.grad, xd.grad)

        if impl == "milp":
            def step():
                x.grad = bank.lora_a.grad = bank.lora_b.grad = None
                kernels.lora_linear(x, w, None, bank, plan).backward(dy)
        else:
            def step():
                x.grad = None
                F.linear(x, w).backward(dy)

        _host_us(benchmark, step, impl=impl, phase="fwdbwd", err=err, no_grad=False)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


@pytest.fixture(scope="module")
def launch_host_us():
    """``bench/launch_host.py``'s figures: in this process with CUDA, else in a fresh process
    on the stand-in driver (this one imported the kernels under the interpreter), with a
    quarter of the script's calls per round (500 launcher and op calls, 20 model forwards): the
    figures move by about as much as between two full runs, and ``pytest bench`` saves half a
    minute of its 5-minute budget on a CPU. ``python bench/launch_host.py --out`` records the
    full counts."""
    rows = launch_host.measure() if U.CUDA else launch_host.measure_in_subprocess(calls=500, model_calls=20)
    return {(r["kernel"], r["launch"]): r for r in rows}


_LAUNCH_ROWS = [(k, m) for k in launch_host.KERNELS + launch_host.OPS + launch_host.MODELS
                for m in launch_host.MODES] + [(k, "-") for k in launch_host.BASES]


@pytest.mark.parametrize("kernel,launch", _LAUNCH_ROWS, ids=[f"{k}-{m}".replace("--", "") for k, m in _LAUNCH_ROWS])
def test_launch_host_us(benchmark, launch_host_us, kernel, launch):
    """Host µs of one launcher call (:data:`launch_host.KERNELS`), one eager op call, decode
    forward and training step (:data:`launch_host.OPS`), or one eager decode-shaped forward of
    a 22-layer model serving 32 users (:data:`launch_host.MODELS`), through Triton's
    ``JITFunction.run`` (``jit``) and through the direct path (``direct``, the default:
    ``kernels._launch``), and of the same calls without adapters. On CPU the launches are the
    stand-in driver's (everything above Triton's C launcher runs; ``tests/kernels/test_launch.py``
    checks that both paths pass the launcher the same kernel, grid, stream and arguments); on
    CUDA, real."""
    r = launch_host_us[(kernel, launch)]
    us = r["host_us_per_call"]
    benchmark.group = "launch-host"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timed in launch_host.measure
    # the plain linear (model) is the "base" impl of its op's (runtime's) workload: ratios within one
    name = dict(zip(launch_host.BASES, launch_host.OPS + launch_host.MODELS)).get(kernel, kernel)
    shape = "L22-64x176" if name in launch_host.MODELS else f"{K}x{N}"  # the model's layers and widths
    benchmark.extra_info.update(
        workload=f"launch-host-{name}-T{USERS}-U{USERS}-{shape}", impl="base" if launch == "-" else f"launch-{launch}",
        op="host", time_ms=us / 1e3, host_us_per_call=us, calls_per_round=r["calls"], launches=r["launches"],
        device=r["device"], timing="host-clock-min (bench/launch_host.py)",
    )
    if launch == "direct":
        jit = launch_host_us[(kernel, "jit")]["host_us_per_call"]
        benchmark.extra_info.update(host_us_saved=jit - us, host_saved_share=(jit - us) / jit)
