"""Host time of one launcher call through Triton's path and through the direct path
(:mod:`kernels._launch`), per kernel: what ``MILP_TRITON_LAUNCH=direct`` saves per launch.

The problem is ``bench/test_host_overhead.py``'s (32 tokens, one per user, ranks 8/16,
256 → 256, bf16), small enough that the device never bounds the loop:

* with CUDA: real launches, issued back to back without synchronising (a synchronise after
  each round), in this process;
* without: a fresh process with ``TRITON_INTERPRET=0`` and Triton on the stand-in CUDA driver
  (``kernels._fake_cuda``: the kernels compiled for sm_90, launches that do nothing), so
  everything above the C launcher runs for real: ours, and Triton's binding, specialisation,
  cache lookup and hooks. Comparable between the two paths and across commits on one
  machine, not with a GPU host.

``python bench/launch_host.py [--calls N] [--json]`` prints the table (or JSON lines);
``pytest bench/test_host_overhead.py -k launch`` records the same figures as benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("jit", "direct")
KERNELS = ("shrink", "expand", "grad_weights", "fused")  # one launcher call each
OPS = ("lora_linear", "lora_linear-fwdbwd")  # kernels.lora_linear: decode forward, training step
BASES = ("F.linear", "F.linear-fwdbwd")  # the plain linear, for what the adapters add
USERS, K, N = 32, 256, 256


def measure(calls: int = 2000, rounds: int = 5) -> list[dict]:
    """``[{kernel, launch, host_us_per_call}]``: the best of ``rounds`` rounds of ``calls``
    calls, after a warm-up, for every launcher (:data:`KERNELS`) and op call (:data:`OPS`) by
    either launch path, and the plain linear's (:data:`BASES`, ``launch`` ``"-"``); run where
    CUDA exists, or under the stand-in driver (see the module docstring)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        from kernels import _fake_cuda

        _fake_cuda.install(arch=90)
        _fake_cuda.RECORD = False
    import kernels
    from kernels import AdapterBank, BatchPlan
    from kernels.ops.expand import lora_expand_
    from kernels.ops.fused_linear import fused_lora_linear
    from kernels.ops.grad_weights import lora_grad_weights
    from kernels.ops.shrink import lora_shrink

    dev, dt = torch.device("cuda" if cuda else "cpu"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(K, N, max_users=USERS, dtype=dt, device=dev)
    for u in range(USERS):
        bank.add(u, [(8, 16)[u % 2]], alpha=16.0, init="random", generator=g)
    plan = BatchPlan.build(torch.arange(USERS, device=dev), USERS)
    x = torch.randn(USERS, K, generator=g).to(dev, dt)
    w = torch.randn(N, K, generator=g).to(dev, dt)
    dy = torch.randn(USERS, N, generator=g).to(dev, dt)
    t = torch.randn(USERS, bank.max_rank, generator=g).to(dev)
    y = torch.zeros(USERS, N, device=dev, dtype=dt)
    p, bms = plan, list(plan.block_ms)
    launchers = {
        "shrink": lambda: lora_shrink(x, bank.lora_a, bank.scale, bank.slots, p.sorted_tokens, p.tiles, p.segments,
                                      bms, bank.max_rank),
        "expand": lambda: lora_expand_(y, t, bank.lora_b, bank.slots, p.sorted_tokens, p.tiles, p.segments, bms),
        "grad_weights": lambda: lora_grad_weights(x, dy, t, t, bank.slots, p.sorted_tokens, p.segments,
                                                  bank.capacity, bank.max_rank),
        "fused": lambda: fused_lora_linear(x, w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                                           p.sorted_tokens, p.tiles, p.segments, bms, bank.max_rank),
    }
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = []

    def timed(call, **what):
        for _ in range(50):  # compile, remember the kernel, warm caches
            call()
        sync()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            best = min(best, time.perf_counter() - t0)
            sync()
        out.append(dict(what, host_us_per_call=best / calls * 1e6, calls=calls,
                        launches="real" if cuda else "stand-in driver (host code only)",
                        device=torch.cuda.get_device_name() if cuda else "cpu"))

    with torch.no_grad():
        for kernel in KERNELS:
            for mode in MODES:
                os.environ["MILP_TRITON_LAUNCH"] = mode
                timed(launchers[kernel], kernel=kernel, launch=mode)
    # the whole op, as an eager layer calls it: a decode forward and a training step (W frozen,
    # the adapters trainable), against the plain linear's
    kernels.library._values_checked = lambda t: False  # value checks read device memory: GPUs skip them
    xg = x.clone().requires_grad_(True)
    params = (bank.lora_a, bank.lora_b)

    def step(linear):
        xg.grad = None
        for q in params:
            q.grad = None
        linear().backward(dy)

    with kernels.use_backend("triton"):
        for mode in MODES:
            os.environ["MILP_TRITON_LAUNCH"] = mode
            with torch.no_grad():
                timed(lambda: kernels.lora_linear(x, w, None, bank, plan), kernel="lora_linear", launch=mode)
            for q in params:
                q.requires_grad_(True)
            timed(lambda: step(lambda: kernels.lora_linear(xg, w, None, bank, plan)), kernel="lora_linear-fwdbwd",
                  launch=mode)
            for q in params:
                q.requires_grad_(False)
    with torch.no_grad():
        timed(lambda: torch.nn.functional.linear(x, w), kernel="F.linear", launch="-")
    timed(lambda: step(lambda: torch.nn.functional.linear(xg, w)), kernel="F.linear-fwdbwd", launch="-")
    os.environ.pop("MILP_TRITON_LAUNCH", None)
    return out


def measure_in_subprocess(calls: int = 2000, timeout: float = 600) -> list[dict]:
    """:func:`measure` in a fresh process with ``TRITON_INTERPRET=0`` (needed without CUDA: a
    process that imported the kernels under the interpreter cannot compile them)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("MILP_TRITON_LAUNCH", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", "--calls", str(calls)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"bench/launch_host.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="launcher calls per timed round (default 2000)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("run without TRITON_INTERPRET=1: the kernels are compiled (for the stand-in driver without CUDA)")
    rows = measure(args.calls)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    by = {(r["kernel"], r["launch"]): r["host_us_per_call"] for r in rows}
    print(f"host µs per call ({rows[0]['launches']}, {rows[0]['device']})")
    print("| call | Triton's path (jit) | direct | saved |")
    print("|---|---:|---:|---:|")
    for k in KERNELS + OPS:
        j, d = by[(k, "jit")], by[(k, "direct")]
        print(f"| {k} | {j:.2f} | {d:.2f} | {j - d:.2f} ({(j - d) / j:.0%}) |")
    for k in BASES:
        print(f"| {k} (no adapters) | {by[(k, '-')]:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
