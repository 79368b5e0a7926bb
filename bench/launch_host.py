"""Host time of each launcher call through Triton's path and through the direct path
(:mod:`kernels._launch`): what ``MILP_TRITON_LAUNCH=direct`` saves per launch, per eager op
call (a decode forward, a training step) and per eager decode-shaped forward of a whole
22-layer model serving 32 users, against the same calls without adapters.

The op problem (:func:`problem`, also ``bench/test_host_overhead.py``'s: 32 tokens, one per
user, ranks 8/16, 256 → 256, bf16 here) is small enough that the device never bounds the loop:

* with CUDA: real launches, issued back to back without synchronising (a synchronise after
  each round), in this process;
* without: a fresh process with ``TRITON_INTERPRET=0`` and Triton on the stand-in CUDA driver
  (``kernels._fake_cuda``: the kernels compiled for sm_90, launches that do nothing), so
  everything above the C launcher runs for real: ours, and Triton's binding, specialisation,
  cache lookup and hooks (the plain ``F.linear`` and the model's other ops compute on the CPU).
  Comparable between the two paths and across commits on one machine, not with a GPU host.

``python bench/launch_host.py [--calls N] [--model-calls N] [--json] [--out FILE]`` prints the
table (or JSON lines; ``--out``: also a JSON file with the machine, versions and commit);
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
MODELS = ("runtime-decode",)  # a 22-layer model's eager decode-shaped forward, 32 users (_model_decode)
BASES = ("F.linear", "F.linear-fwdbwd", "model-decode")  # without adapters, for what they add
USERS, K, N = 32, 256, 256


def problem(device, dtype):
    """``(bank, plan, ids, x, w)``: 32 users with one rank-8 or rank-16 module each on a
    256 → 256 linear, one token per user (this script's and ``bench/test_host_overhead.py``'s)."""
    import torch

    from kernels import AdapterBank, BatchPlan

    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(K, N, max_users=USERS, dtype=dtype, device=device)
    for u in range(USERS):
        bank.add(u, [(8, 16)[u % 2]], alpha=16.0, init="random", generator=g)
    ids = torch.arange(USERS, device=device)
    plan = BatchPlan.build(ids, USERS)
    x = torch.randn(USERS, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    return bank, plan, ids, x, w


def measure(calls: int = 2000, rounds: int = 5, model_calls: int = 100) -> list[dict]:
    """``[{kernel, launch, host_us_per_call}]``: the best of ``rounds`` rounds of ``calls``
    calls, after a warm-up, for every launcher (:data:`KERNELS`) and op call (:data:`OPS`) by
    either launch path, and the plain linear's (:data:`BASES`, ``launch`` ``"-"``); then
    ``model_calls`` eager decode-shaped forwards of a whole model (:func:`_model_decode`;
    0: none); run where CUDA exists, or under the stand-in driver (see the module docstring).
    ``MILP_TRITON_LAUNCH`` and the value checks are as they were afterwards (a GPU session
    that exported ``MILP_TRITON_LAUNCH=jit`` keeps it for the benchmarks after this one)."""
    import kernels.library

    before, checked = os.environ.get("MILP_TRITON_LAUNCH"), kernels.library._values_checked
    try:
        return _measure(calls, rounds, model_calls)
    finally:
        kernels.library._values_checked = checked
        if before is None:
            os.environ.pop("MILP_TRITON_LAUNCH", None)
        else:
            os.environ["MILP_TRITON_LAUNCH"] = before


def _measure(calls: int, rounds: int, model_calls: int) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        from kernels import _fake_cuda

        _fake_cuda.install(arch=90)
        _fake_cuda.RECORD = False
    import kernels
    from kernels.ops.expand import lora_expand_
    from kernels.ops.fused_linear import fused_lora_linear
    from kernels.ops.grad_weights import lora_grad_weights
    from kernels.ops.shrink import lora_shrink

    dev, dt = torch.device("cuda" if cuda else "cpu"), torch.bfloat16
    bank, plan, _, x, w = problem(dev, dt)
    g = torch.Generator().manual_seed(1)
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

    def timed(call, calls=calls, **what):
        for _ in range(min(50, 5 * calls)):  # compile, remember the kernel, warm caches
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
    if model_calls:
        _model_decode(timed, model_calls, dev)
    return out


def _model_decode(timed, calls: int, dev) -> None:
    """An eager decode-shaped forward (one new token for each of 32 users, no KV cache) of a
    LLaMA with 22 narrow layers (hidden 64, FFN 176: the host's work is that of any width),
    each user with the size of configuration the search picked on MedDia (2 rank-8 modules on
    60% of the layers, a different set per user; ``bench/test_runtime.py``'s decode users): the
    plain model, and through the runtime by either launch path."""
    import torch
    import transformers as tf

    import kernels
    from milp import MemoryConfig, MilpRuntime

    layers = 22
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).to(dev).eval()
    ids = torch.randint(3, 250, (USERS, 1), device=dev)
    with torch.no_grad():
        timed(lambda: model(input_ids=ids, use_cache=False), kernel="model-decode", launch="-", calls=calls)
        rt = MilpRuntime(model, max_users=USERS)
        for i in range(USERS):
            mask = tuple((3 * (li + i)) % 5 < 3 for li in range(layers))
            rt.add_user(i, MemoryConfig(mask, tuple(2 * m for m in mask), (8,) * layers, lora_alpha=16.0),
                        init="random", seed=i)
        users = list(range(USERS))
        with kernels.use_backend("triton"):
            for mode in MODES:
                os.environ["MILP_TRITON_LAUNCH"] = mode
                timed(lambda: rt.forward(ids, users, use_cache=False), kernel="runtime-decode", launch=mode,
                      calls=calls)


def measure_in_subprocess(calls: int = 2000, model_calls: int = 100, timeout: float = 900) -> list[dict]:
    """:func:`measure` in a fresh process with ``TRITON_INTERPRET=0`` (needed without CUDA: a
    process that imported the kernels under the interpreter cannot compile them)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("MILP_TRITON_LAUNCH", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", "--calls", str(calls),
                          "--model-calls", str(model_calls)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"bench/launch_host.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _write(path: str, rows: list[dict]) -> None:
    """``{"machine": device, versions, commit, date; "rows": rows}`` to ``path``, atomically."""
    import datetime
    import platform

    import torch
    import triton
    from _util import git_commit

    from milp.config import atomic_write_text

    machine = {
        "device": rows[0]["device"], "launches": rows[0]["launches"], "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(path, json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="launcher calls per timed round (default 2000)")
    ap.add_argument("--model-calls", type=int, default=100,
                    help="whole-model decode forwards per timed round (default 100; 0: none)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    ap.add_argument("--out", metavar="PATH", help="also write the rows with the machine, versions and commit as JSON")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    if args.model_calls < 0:
        ap.error(f"--model-calls must be >= 0, got {args.model_calls}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("run without TRITON_INTERPRET=1: the kernels are compiled (for the stand-in driver without CUDA)")
    rows = measure(args.calls, model_calls=args.model_calls)
    if args.out:
        _write(args.out, rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    by = {(r["kernel"], r["launch"]): r["host_us_per_call"] for r in rows}
    print(f"host µs per call ({rows[0]['launches']}, {rows[0]['device']})")
    print("| call | Triton's path (jit) | direct | saved |")
    print("|---|---:|---:|---:|")
    for k in KERNELS + OPS + (MODELS if args.model_calls else ()):
        j, d = by[(k, "jit")], by[(k, "direct")]
        print(f"| {k} | {j:.2f} | {d:.2f} | {j - d:.2f} ({(j - d) / j:.0%}) |")
    for k in BASES:
        if (k, "-") in by:
            print(f"| {k} (no adapters) | {by[(k, '-')]:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
