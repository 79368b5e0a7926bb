"""Where the split path's time goes on a GPU, and whether the expand-first order pays.

    python bench/probe_split.py --out probe_split.json [--rep-ms 30]     (CUDA only)

The first H200 run (bench/results/gpu, commit e79670f) put the split path first at every
measured shape, yet 1.15–1.3× the base GEMM at 4096–16384 prefill tokens and 2.5–8× at decode.
This script times, on the benchmark's own problems (``bench/_util.Problem``, bf16), each piece
of the split path alone: the base GEMM (``F.linear``), the same GEMM adding into ``y``
(``y.addmm_``, cuBLAS ``beta = 1``), the shrink, the expand adding into ``y``, the expand
overwriting ``y`` (``accumulate=False``). It also times the whole op in both orders
(expand-first off and on, whatever the GPU's config file says) and GEMM-first with the shrink
on a side stream beside the GEMM (``kernels.tuning.split_overlap``); for decode, over CUDA-graph
replays too, with the two-branch schedule of ``kernels.tuning.split_parallel`` (graphs only).
For training it times forward + backward through the op, serial and overlapped, with the
backward's grouped ``dA``/``dB`` kernel alone beside it. The orders are checked
against each other before they are timed.
Every figure is a CUDA-event median with the L2 flushed before each repetition.
Prediction (before the first run): expand-first saves one read and one write of ``y``
(0.17 ms at 16384 × 11008 bf16 on 4.2 TB/s) minus a ``beta = 1`` epilogue that a compute-bound
GEMM mostly hides. That would take the 16384-token 7B forward from 1.15× to about 1.09×.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the project, where it is not installed
os.environ.setdefault("MILP_BENCH_SIZE", "full")

import _util as U  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import tuning  # noqa: E402
from kernels.ops.expand import lora_expand_  # noqa: E402
from kernels.ops.grad_weights import lora_grad_weights  # noqa: E402
from kernels.ops.shrink import lora_shrink  # noqa: E402

FWD = [U._prefill("fwd", s, T, 32) for s in ("7b-up", "7b-down") for T in (512, 4096, 16384)]
DECODE = [U._decode("fwd", s, users) for s in ("7b-up", "7b-down") for users in (32, 256)]
FWDBWD = [U._prefill("fwdbwd", "7b-up", T, 32) for T in (512, 4096)]


def _time(fn, rep_ms: float) -> float:
    return round(U.cuda_median_ms(fn, rep_ms=rep_ms)[0], 5)


#: the split path's schedules: dispatch knobs forced by ``kernels.tuning.use_dispatch``
ORDERS = {
    "split_gemm_first": dict(split_expand_first_max_tokens=0, split_overlap_min_tokens=0),
    "split_expand_first": dict(split_expand_first_max_tokens=1 << 30, split_overlap_min_tokens=0),
    "split_overlap": dict(split_expand_first_max_tokens=0, split_overlap_min_tokens=1),
}


def _split(p: U.Problem):
    return lambda: kernels.lora_linear(p.x, p.w, None, p.bank, p.plan, path="split")


def probe_forward(wl: U.Workload, rep_ms: float, decode: bool) -> dict:
    p = U.problem(wl)
    b, plan = p.bank, p.plan
    args = (b.slots, plan.sorted_tokens, plan.tiles, plan.segments, list(plan.block_ms))
    y = torch.randn(wl.tokens, wl.n, device=p.x.device, dtype=p.x.dtype)
    t = lora_shrink(p.x, b.lora_a, b.scale, b.slots, plan.sorted_tokens, plan.tiles, plan.segments,
                    list(plan.block_ms), b.max_rank, partials=decode)
    outs = {}
    with torch.no_grad():
        for name, knobs in ORDERS.items():
            with tuning.use_dispatch(**knobs):
                outs[name] = _split(p)()
    err = max(U.rel_err(y_, outs["split_gemm_first"]) for y_ in outs.values())
    row = {"workload": wl.id, "T": wl.tokens, "k": wl.k, "n": wl.n, "orders_rel_err": err}
    if not err <= 1e-2:
        row["error"] = f"the split path's orders differ by {err:.2e}"
        return row
    pieces = {
        "base_linear": lambda: F.linear(p.x, p.w),
        "base_addmm_beta1": lambda: y.addmm_(p.x, p.w.t()),
        "shrink": lambda: lora_shrink(p.x, b.lora_a, b.scale, b.slots, plan.sorted_tokens, plan.tiles,
                                      plan.segments, list(plan.block_ms), b.max_rank, partials=decode),
        "expand_add": lambda: lora_expand_(y, t, b.lora_b, *args),
        "expand_write": lambda: lora_expand_(y, t, b.lora_b, *args, accumulate=False),
        **dict.fromkeys(ORDERS, _split(p)),
    }
    with torch.no_grad():
        for name, fn in pieces.items():
            with tuning.use_dispatch(**ORDERS.get(name, {})):
                row[name] = _time(fn, rep_ms)
                if decode and (name == "base_linear" or name in ORDERS):
                    row[name + "_graph"] = round(U.cuda_graph_median_ms(fn, rep_ms=rep_ms), 5)
        if decode:  # the two-branch schedule (kernels.tuning.split_parallel) exists under capture only
            with tuning.use_dispatch(split_parallel_max_tokens=1 << 30):
                row["split_parallel_graph"] = round(U.cuda_graph_median_ms(_split(p), rep_ms=rep_ms), 5)
    row["bytes_y_gb"] = wl.tokens * wl.n * p.elem / 1e9
    return row


def probe_fwdbwd(wl: U.Workload, rep_ms: float) -> dict:
    p = U.problem(wl)
    b, plan = p.bank, p.plan
    x = p.x.clone().requires_grad_(True)
    w = p.w.clone().requires_grad_(False)
    dy = p.dy

    def ours():
        x.grad = None
        kernels.lora_linear(x, w, None, b, plan).backward(dy)

    def base():
        x.grad = None
        F.linear(x, w).backward(dy)

    a_req, b_req = b.lora_a.requires_grad, b.lora_b.requires_grad
    b.lora_a.requires_grad_(True)
    b.lora_b.requires_grad_(True)
    try:
        t_fwd = lora_shrink(p.x, b.lora_a, b.scale, b.slots, plan.sorted_tokens, plan.tiles, plan.segments,
                            list(plan.block_ms), b.max_rank)
        t_bwd = lora_shrink(dy, b.lora_b, b.scale, b.slots, plan.sorted_tokens, plan.tiles, plan.segments,
                            list(plan.block_ms), b.max_rank)
        row = {"workload": "fwdbwd:" + wl.id, "T": wl.tokens, "path": tuning.choose_path(
            wl.tokens, b.max_rank, num_segments=plan.num_segments, device=p.x.device)}
        row["base_fwdbwd"] = _time(base, rep_ms)
        row["milp_fwdbwd"] = _time(ours, rep_ms)
        for name in ("split_gemm_first", "split_overlap"):
            with tuning.use_dispatch(**ORDERS[name]):
                row[f"milp_fwdbwd_{name}"] = _time(ours, rep_ms)
        with torch.no_grad():
            row["grad_weights"] = _time(lambda: lora_grad_weights(
                p.x, dy, t_bwd, t_fwd, b.slots, plan.sorted_tokens, plan.segments, b.capacity, b.max_rank), rep_ms)
            row["shrink_dy"] = _time(lambda: lora_shrink(
                dy, b.lora_b, b.scale, b.slots, plan.sorted_tokens, plan.tiles, plan.segments, list(plan.block_ms),
                b.max_rank), rep_ms)
    finally:
        b.lora_a.requires_grad_(a_req)
        b.lora_b.requires_grad_(b_req)
        b.lora_a.grad = b.lora_b.grad = None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--rep-ms", type=float, default=30.0, help="time budget of each median (ms)")
    args = ap.parse_args(argv)
    if not U.CUDA:
        print("probe_split.py needs CUDA", file=sys.stderr)
        return 2
    rows: list[dict] = []
    doc = {"machine": U.machine_info(), "commit": U.git_commit(), "rows": rows}
    for wl in FWD + DECODE + FWDBWD:
        if wl.op == "fwdbwd":
            rows.append(probe_fwdbwd(wl, args.rep_ms))
        else:
            rows.append(probe_forward(wl, args.rep_ms, decode=wl.phase == "decode"))
        print(json.dumps(rows[-1]), flush=True)
        tmp = args.out + ".tmp"  # rewritten after each row: a run cut short keeps what it measured
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.out)
    cols = ("base_linear", "base_addmm_beta1", "shrink", "expand_add", "expand_write", *ORDERS)
    print("workload".ljust(34) + "".join(c[:12].rjust(13) for c in cols))
    for r in rows:
        if "base_linear" in r:
            print(r["workload"].ljust(34) + "".join(f"{r[c]:13.4f}" for c in cols))
        else:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
