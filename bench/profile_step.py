"""Where one forward + backward of ``lora_linear`` spends its time, by ``torch.profiler``.

    python bench/profile_step.py [--tokens 512] [--shape 7b-up] [--out DIR]

On the H200 (2026-11-28) forward + backward at 512 tokens took 1.92 ms against the base's
0.19 ms. The kernels timed alone add up to about 0.45 ms (bench/README.md, "Measured on an
H200"). This script profiles a few steps of the benchmark's own problem (``bench/_util.Problem``,
32 users, mixed ranks, bf16) and prints the ops and kernels by device time, and by host time
(host-side gaps show up there), then the kernels per CUDA stream and how long two streams ran
kernels at once (the split path's side stream, ``bench/streams.py``). Then, without the
profiler, whether the host or the device bounds the step: the host time to issue the steps
back to back against the device time of the same steps (CUDA events; when the two are close
the device waited for the host), and where the host time goes (``cProfile``, summed by
package: our ``kernels``, Triton's launcher, torch's Python and C++ calls). It writes
``profile_<workload>.txt`` and a Chrome trace
(``.json``) to ``--out``. The NVTX-style names of the op (``milp.*``) are recorded too
(``MILP_NVTX=1``). On CPU it profiles the torch reference path, which says nothing of the GPU.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the project, where it is not installed
os.environ.setdefault("MILP_BENCH_SIZE", "full")
os.environ.setdefault("MILP_NVTX", "1")

import _util as U  # noqa: E402
import torch  # noqa: E402
from streams import stream_summary  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import kernels  # noqa: E402

_PACKAGES = ("kernels", "milp", "triton", "torch")


def _package(filename: str) -> str:
    """The package a profiled function belongs to (``~`` = a C function: torch's bindings,
    the launcher, builtins). An installed file is named by its top folder under
    ``site-packages``: the folders above it say nothing (the device's Python is
    ``/opt/torch/.venv``, where every package's path holds ``/torch/``)."""
    f = filename.replace(os.sep, "/")
    if f == "~":
        return "C calls"
    _, installed, rest = f.rpartition("-packages/")  # site-packages/, dist-packages/
    if installed:
        top = rest.split("/", 1)[0]
        return top if top in _PACKAGES else "other"
    for name in _PACKAGES:  # a source tree (this project's, an editable install)
        if f"/{name}/" in f:
            return name
    return "other"


def host_profile(step, steps: int) -> str:
    """Host issue time against device time of ``steps`` back-to-back steps, then the host time
    by package and the top functions (``cProfile``; the timed steps run without it)."""
    U._sync()
    if U.CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    issue_us = (time.perf_counter() - t0) / steps * 1e6
    if U.CUDA:
        end.record()
    U._sync()
    wall_us = (time.perf_counter() - t0) / steps * 1e6
    lines = [f"host issue {issue_us:.1f} us/step, wall {wall_us:.1f} us/step (synchronised at the end)"]
    if U.CUDA:
        dev_us = start.elapsed_time(end) / steps * 1e3
        bound = "host-bound: the device waited for the host" if issue_us > 0.9 * dev_us else "device-bound"
        lines.append(f"device {dev_us:.1f} us/step between events -> {bound}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    U._sync()
    st = pstats.Stats(prof)
    by: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in st.stats.items():  # type: ignore[attr-defined]
        by[_package(filename)] = by.get(_package(filename), 0.0) + tottime
    total = sum(by.values()) or 1.0
    lines.append("host time by package (cProfile, self time; profiling inflates it): " + ", ".join(
        f"{k} {v / steps * 1e6:.0f} us ({100 * v / total:.0f}%)" for k, v in sorted(by.items(), key=lambda kv: -kv[1])))
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    lines.append(buf.getvalue().split("\n", 4)[-1] if buf.getvalue() else "")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens in the batch (default 512)")
    ap.add_argument("--users", type=int, default=32, help="adapter users in the batch (default 32)")
    ap.add_argument("--shape", default="7b-up", choices=sorted(U.SHAPES), help="FFN linear (default 7b-up)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    ap.add_argument("--out", default=".", help="directory for the table and the trace")
    args = ap.parse_args(argv)
    if args.tokens < args.users or args.users < 1 or args.steps < 1:
        ap.error("need --tokens >= --users >= 1 and --steps >= 1")
    wl = U._prefill("fwdbwd", args.shape, args.tokens, args.users)
    adapter_tokens = wl.tokens - wl.none_tokens  # as _util.Problem deals them
    if adapter_tokens < args.users:
        ap.error(f"--tokens {args.tokens} has {adapter_tokens} adapter tokens ({round(100 * wl.none_share)}% carry "
                 f"none), fewer than --users {args.users}: every user needs one")
    out = Path(args.out)
    try:  # before the work: an --out that cannot be written fails now, not after the profile
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {args.out}: not a directory that can be made ({exc})")
    p = U.problem(wl)
    bank, plan = p.bank, p.plan
    bank.lora_a.requires_grad_(True)
    bank.lora_b.requires_grad_(True)
    x = p.x.clone().requires_grad_(True)

    def step():
        x.grad = bank.lora_a.grad = bank.lora_b.grad = None
        kernels.lora_linear(x, p.w, None, bank, plan).backward(p.dy)

    for _ in range(3):  # compile and warm up outside the profile
        step()
    U._sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if U.CUDA else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        U._sync()
    sort = "self_cuda_time_total" if U.CUDA else "self_cpu_time_total"
    text = (f"{wl.id} on {torch.cuda.get_device_name(0) if U.CUDA else 'cpu'}, {args.steps} steps, "
            f"path {kernels.choose_path(wl.tokens, bank.max_rank, num_segments=plan.num_segments, device=p.x.device)}"
            f"\n\n-- by device time --\n{prof.key_averages().table(sort_by=sort, row_limit=30)}"
            f"\n\n-- by host time --\n{prof.key_averages().table(sort_by='cpu_time_total', row_limit=30)}"
            f"\n\n-- CUDA streams --\n{stream_summary(prof.events())}\n"
            f"\n-- host or device (no profiler) --\n{host_profile(step, max(args.steps, 20))}\n")
    (out / f"profile_{wl.id}.txt").write_text(text, encoding="utf-8")
    prof.export_chrome_trace(str(out / f"profile_{wl.id}.json"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
