"""The Triton kernel variants the GPU benchmark grid will launch, enumerated on a CPU machine.

    python bench/variants.py --out launches.jsonl [--ops fwd,fwdbwd,shrink,expand]
    TRITON_INTERPRET=0 python -m kernels.aot --recorded launches.jsonl --arch 90

Every workload of ``pytest bench``'s full (GPU) grid is built on the CPU in bfloat16 and our
ops run through the Triton launchers with each launch recorded and skipped
(:class:`kernels.aot.LaunchRecorder` with ``launch=False``): the configs, tiles and constexprs
are those a GPU run picks (the path chosen as on a GPU, with the plan's user count; the forced
paths of ``MILP_BENCH_PATHS=1`` too), the outputs are never computed. ``kernels.aot
--recorded`` then compiles each distinct variant for the GPU and reports errors, shared memory
past the chip's, registers and spills, so a device session does not spend its minutes on a
variant that cannot run. The decoder-layer and runtime benchmarks run whole models (too slow on
a CPU): their FFN linears are added as op workloads instead (:func:`model_workloads`; the
layer's are the grid's 7B shapes).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MILP_BENCH_SIZE", "full")
os.environ.setdefault("MILP_BENCH_DTYPE", "bfloat16")
os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors (nothing is interpreted: launches are skipped)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kernels  # noqa: E402
from kernels import aot  # noqa: E402
from kernels.tuning import DECODE_MAX_TOKENS, PATHS, choose_path  # noqa: E402

OPS = ("fwd", "fwdbwd", "shrink", "expand")


def model_workloads(op: str) -> tuple[U.Workload, ...]:
    """The FFN linears of ``bench/test_runtime.py``'s TinyLlama-shaped model (2048↔5632), as op
    workloads: decode (32 users, one token each), the prompts' prefill (32 × 64 tokens) and
    joint training (16 users × 4 rows × 256 tokens). ``test_decoder_layer.py`` runs the 7B
    shapes of the grid."""
    if op not in ("fwd", "fwdbwd"):
        return ()
    ws = []
    for shape in ("1b-up", "1b-down"):
        if op == "fwd":
            ws += [U._decode(op, shape, 32, ranks) for ranks in ("r16", "mix")]
            ws.append(U._prefill(op, shape, 2048, 32, "r16", 0.0))
        else:
            ws.append(U._prefill(op, shape, 16384, 16, "mix", 0.0))
    return tuple(ws)


def _launch_all(op: str, p: U.Problem) -> None:
    """Our op on ``p`` as the benchmark calls it on a GPU: auto path and, for the forward, each
    forced path (split only where the batch is decode-sized: here it would run the base GEMM
    on the CPU for real)."""
    T = p.wl.tokens
    auto = choose_path(T, p.bank.max_rank, num_segments=p.plan.num_segments)
    if op == "fwd":
        paths = [auto] + [q for q in PATHS if q != auto and (q != "split" or T <= 4 * DECODE_MAX_TOKENS)]
        with torch.no_grad():
            for path in paths:
                kernels.lora_linear(p.x, p.w, None, p.bank, p.plan, path=path)
    elif op == "fwdbwd":
        x = p.x.detach().requires_grad_()
        p.bank.lora_a.requires_grad_(True)
        p.bank.lora_b.requires_grad_(True)
        y = kernels.lora_linear(x, p.w, None, p.bank, p.plan, path=auto)
        torch.autograd.grad(y, [x, p.bank.lora_a, p.bank.lora_b], p.dy)
    elif op == "shrink":
        with torch.no_grad():
            kernels.lora_shrink(p.x, p.bank, p.plan)
    else:
        t = torch.zeros(T, p.bank.max_rank)
        y = torch.empty(T, p.wl.n, dtype=p.dtype)
        with torch.no_grad():
            kernels.lora_expand_(y, t, p.bank, p.plan)


def record(ops=OPS, progress: bool = True) -> aot.LaunchRecorder:
    """Record (without launching) every variant the full benchmark grid of ``ops`` launches."""
    rec = aot.LaunchRecorder(launch=False)
    with rec, kernels.use_backend("triton"):
        for op in ops:
            wls = U.workloads(op, "full") + model_workloads(op)
            bar = tqdm(wls, desc=f"{op} workloads", unit="wl", disable=not progress)
            for wl in bar:
                _launch_all(op, U.Problem(wl, device=torch.device("cpu"), dtype=torch.bfloat16))
                bar.set_postfix(variants=len(rec.records))
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON-lines file for kernels.aot --recorded")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        ap.error(f"--ops must name some of {OPS}, got {args.ops!r}")
    if args.out.exists():
        args.out.unlink()  # write() appends
    n = record(ops).write(str(args.out))
    print(f"{n} distinct variants -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
