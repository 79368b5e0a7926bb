"""Tune the launch configs on the GPU at hand and write them as data (``kernels/configs/<gpu>.json``).

For each op and shape bucket (LLaMA-7B/13B FFN shapes × token buckets × rank buckets) every
candidate config is first checked against the reference (a wrong fast config is never
kept), then timed (median of ``triton.testing.do_bench``); the fastest becomes the bucket's
entry. Decode-sized shrink buckets are timed with the expand that consumes their split-K
partial sums, as the op's decode path runs them; the expand is timed in place, in the mode the
split path runs it at that size (adding into ``y``, or writing it where
:func:`kernels.tuning.split_expand_first` holds). It also times the ``fused`` against the
``fused_t`` path at a small rank and writes the ``dispatch.fused_max_rank`` threshold
accordingly. Once the shrink and the expand are tuned (before the other buckets) it times,
with their tuned configs, the split path with its shrink beside the base GEMM on a side
stream against the two one after the other (``dispatch.split_overlap_min_tokens``,
:func:`tune_split_overlap`), and decode as two branches against the serial schedule from
CUDA-graph replays (``dispatch.split_parallel_max_tokens``, :func:`tune_split_parallel`). The file is written
atomically and merged with the one already there: a tuned bucket replaces its entry, the others stay.

Usage (on a GPU)::

    python -m kernels.autotune --dtype bf16            # full grid, writes kernels/configs/<gpu>.json
    python -m kernels.autotune --dtype bf16 --quick    # a few buckets and candidates (~minutes)
    python -m kernels.autotune --dtype bf16 --quick --jobs 16   # candidates compiled in parallel first

On CPU it runs under the Triton interpreter with ``--tiny --out FILE`` (plumbing only: the
times of the interpreter mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from ._backend import use_backend
from .bank import AdapterBank
from .ops._common import cdiv, next_pow2
from .plan import BatchPlan
from .reference import expand_ref, lora_linear_ref, shrink_ref
from .tuning import (
    _MATCH_KEYS,
    OPS,
    LaunchConfig,
    _device_table_paths,
    _dtype_name,
    _load_table,
    config_path_for,
    split_expand_first,
    use_config,
    use_dispatch,
)

__all__ = ["Problem", "tune", "candidates", "precompile", "tune_split_overlap", "tune_split_parallel", "write_table",
           "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One shape bucket: ``num_tokens`` tokens over ``users`` users, ``k → n``, adapters of ``max_rank``."""

    num_tokens: int
    k: int
    n: int
    max_rank: int
    users: int


def problems(tiny: bool = False, quick: bool = False) -> list[Problem]:
    """The shape buckets tuned: LLaMA-7B/13B FFN shapes, decode and prefill, three rank buckets."""
    if tiny:
        return [Problem(8, 48, 40, 16, 8), Problem(96, 48, 40, 16, 4)]
    shapes = [(4096, 11008), (11008, 4096)] if quick else [(4096, 11008), (11008, 4096), (5120, 13824),
                                                           (13824, 5120)]
    # the targets' sizes: decode at 32 and 256 users (a bucket covers every smaller token count,
    # so 256 users must not fall into a prefill bucket), prefill at 4096 and 16384 tokens
    tokens = [(32, 32), (256, 256), (4096, 32), (16384, 32)] if quick else [
        (16, 16), (64, 64), (256, 256), (512, 32), (2048, 32), (4096, 32), (16384, 64)]
    ranks = [96] if quick else [16, 96, 3072]
    return [Problem(t, k, n, r, u) for (k, n), (t, u), r in itertools.product(shapes, tokens, ranks)]


def decode_like(problem: Problem) -> bool:
    """A token or a few per user: tiles of one row or so, bandwidth-bound, split K."""
    return problem.num_tokens <= 4 * problem.users


def worth_tuning(op: str, problem: Problem, quick: bool = False) -> bool:
    """Whether ``--quick`` tunes ``op`` at ``problem``. It leaves out what the targets' paths do
    not run there: the fused kernel at decode and at 16384 tokens (the split path serves them),
    and the adapter gradients at decode."""
    if not quick:
        return True
    if op == "fused_linear":
        return not decode_like(problem) and problem.num_tokens <= 4096
    return not (op == "grad_weights" and decode_like(problem))


def candidates(op: str, problem: Problem, tiny: bool = False) -> list[LaunchConfig]:
    """Candidate configs of ``op`` for ``problem`` (each must still pass the correctness check)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if tiny:
        return [LaunchConfig(block_m=16, block_n=32, block_k=16, block_r=16, split_k=s) for s in (1, 2)]
    decode = decode_like(problem)
    grid: list[LaunchConfig] = []
    if op == "fused_linear":
        for bm, bn, bk, w, st in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4)):
            if bm * bn >= 128 * 256 and w == 4:
                continue
            grid.append(LaunchConfig(block_m=bm, block_n=bn, block_k=bk, block_r=32, num_warps=w, num_stages=st))
    elif op == "shrink":
        # prefill splits K too: with K = 11008 and few tiles the unsplit shrink is latency-bound
        # (H200, bench/probe_split.py: 0.15 ms at 4096 tokens where reading x takes 0.02 ms)
        # prefill also tries a rank block of 128 (one block for ranks up to 96–128): the
        # 32-row blocks of the heuristic make three programs read the same x tile at rank 96
        for bm, br, bk, sk in itertools.product((16, 32) if decode else (32, 64, 128),
                                               (16, 32, 64) if decode else (16, 32, 64, 128), (32, 64, 128),
                                               (1, 2, 4, 8, 16) if decode else (1, 2, 4)):
            grid.append(LaunchConfig(block_m=bm, block_r=br, block_k=bk, split_k=sk, num_warps=4, num_stages=3))
    elif op == "expand":
        # decode: wider column blocks, fewer programs each streaming more of B (the H200's decode
        # expand read B at 16-28% of the bandwidth with 128-wide blocks)
        for bm, bn, br, w in itertools.product((16,) if decode else (32, 64, 128),
                                               (64, 128, 256, 512) if decode else (64, 128, 256), (16, 32, 64),
                                               (4, 8)):
            grid.append(LaunchConfig(block_m=bm, block_n=bn, block_r=br, num_warps=w, num_stages=3))
        # the streaming form: programs of n_blocks column blocks, t loaded once (the one-block
        # programs moved y at 37-61% of the copy bandwidth on the H200, latency-bound)
        for bm, bn, nb, w in itertools.product((16,) if decode else (32, 64), (64, 128), (4, 8, 16), (4, 8)):
            grid.append(LaunchConfig(block_m=bm, block_n=bn, block_r=32, n_blocks=nb, num_warps=w, num_stages=3))
        if decode:  # and the decode (GEMV) form: CUDA-core dots, programs streaming 1/split_n of B
            # its launcher takes the whole rank in one block, caps a block at 8192 elements and
            # runs at most a program per column block (kernels/ops/expand.py, _expand_plan):
            # configs it launches alike at this bucket are timed once
            block_r, launches = next_pow2(problem.max_rank), set()
            for sn, bn, w in itertools.product((8, 16, 32, 64), (64, 256), (2, 4)):
                bn_run = max(16, min(bn, 8192 // block_r))
                chunk = cdiv(cdiv(problem.n, min(sn, cdiv(problem.n, bn_run))), bn_run) * bn_run
                if (bn_run, chunk, w) not in launches:
                    launches.add((bn_run, chunk, w))
                    grid.append(LaunchConfig(block_m=16, block_n=bn, split_n=sn, num_warps=w, num_stages=3))
    else:  # grad_weights; a 128-row rank block reads x and dy once per column block at rank 96
        for br, bc, bt, w in itertools.product((16, 32, 64, 128), (64, 128), (32, 64), (4, 8)):
            grid.append(LaunchConfig(block_r=br, block_n=bc, block_k=bt, num_warps=w, num_stages=3))
    return grid


def _build(problem: Problem, dtype: torch.dtype, device: torch.device,
           seed: int = 0) -> tuple[AdapterBank, BatchPlan, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank(problem.k, problem.n, max_users=problem.users, dtype=dtype, device=device)
    choices = [r for r in (8, 16, 32, 64, 96) if r <= problem.max_rank] or [problem.max_rank]
    for u in range(problem.users):
        if problem.max_rank > 96:
            ranks = [96] * (problem.max_rank // 96) if u == 0 else [choices[u % len(choices)]] * 32
        else:
            ranks = [problem.max_rank] if u == 0 else [choices[u % len(choices)]]
        bank.add(u, ranks, alpha=16.0, init="random", generator=g)
    ids = torch.arange(problem.num_tokens) % problem.users
    plan = BatchPlan.build(ids.to(device), problem.users)
    x = torch.randn(problem.num_tokens, problem.k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(problem.n, problem.k, generator=g) / problem.k**0.5).to(device=device, dtype=dtype)
    return bank, plan, ids.to(device), x, w


def _runner(op: str, problem: Problem, dtype: torch.dtype,
            device: torch.device) -> tuple[Callable[[], torch.Tensor], Callable[[], float]]:
    """``(run, check)``: a closure launching ``op`` once, and one returning its relative error.
    The reference is computed at the first check (:func:`precompile` only runs ``run``)."""
    from .ops.expand import lora_expand_
    from .ops.fused_linear import fused_lora_linear
    from .ops.grad_weights import lora_grad_weights
    from .ops.shrink import _shrink_plan, lora_shrink

    bank, plan, ids, x, w = _build(problem, dtype, device)
    st, tiles, segs, bms = plan.as_args()
    R = bank.max_rank
    a, b, s, slots = bank.lora_a.detach(), bank.lora_b.detach(), bank.scale, bank.slots
    c = torch.float32  # references in fp32 on the device: float64 GEMMs of LLaMA size are too slow

    def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))

    if op == "fused_linear":
        def run_fused() -> torch.Tensor:
            return fused_lora_linear(x, w, None, a, b, s, slots, st, tiles, segs, bms, R, precompute_t=True)[0]

        ref = functools.cache(lambda: lora_linear_ref(x, w, None, a, b, s, slots, ids, compute_dtype=c))
        return run_fused, lambda: rel(run_fused(), ref())
    t = shrink_ref(x, a, s, slots, ids, R, compute_dtype=c)
    if op == "expand" or (op == "shrink" and decode_like(problem)):
        # the expand in the mode the split path runs it at this size: adding into y (GEMM first)
        # or writing y (expand first, cuBLAS adding x Wᵀ after)
        accumulate = not split_expand_first(problem.num_tokens, device)
        y0 = torch.randn(problem.num_tokens, problem.n, device=device, dtype=dtype)
        y_run = y0.clone()  # timed runs work in place, as the op does: a copy per call would move y twice more
        ref_y = functools.cache(lambda: expand_ref(y0 if accumulate else torch.zeros_like(y0), t, b, slots, ids,
                                                   compute_dtype=c))
    if op == "shrink" and decode_like(problem):
        # decode: timed as the op's split path runs it, the split-K partial sums and the
        # expand that adds them (a larger split is cheaper for the shrink, dearer for the expand)
        def run_split(y: torch.Tensor = y_run) -> torch.Tensor:
            parts = lora_shrink(x, a, s, slots, st, tiles, segs, bms, R, partials=True)
            return lora_expand_(y, parts, b, slots, st, tiles, segs, bms, accumulate=accumulate)

        return run_split, lambda: rel(run_split(y0.clone()), ref_y())
    if op == "shrink":
        def run_shrink() -> torch.Tensor:
            return lora_shrink(x, a, s, slots, st, tiles, segs, bms, R)

        return run_shrink, lambda: rel(run_shrink(), t)
    if op == "expand":
        t_in = t
        if decode_like(problem):
            # the expand adds the shrink's split-K partial sums, as the op's split path hands them
            # over: as many slices as the shrink's present config makes (t in the first, zeros
            # after), so the timed expand reads what it reads there
            split = _shrink_plan(problem.num_tokens, problem.k, R, tuple(bms), st.numel(), segs.shape[0],
                                 tiles.shape[0], True, dtype, device)[2]
            t_in = torch.cat([t[None], t.new_zeros(split - 1, *t.shape)])

        def run_expand(y: torch.Tensor = y_run) -> torch.Tensor:
            return lora_expand_(y, t_in, b, slots, st, tiles, segs, bms, accumulate=accumulate)

        return run_expand, lambda: rel(run_expand(y0.clone()), ref_y())
    dy = torch.randn(problem.num_tokens, problem.n, device=device, dtype=dtype)
    t_b = shrink_ref(dy, b, s, slots, ids, R, compute_dtype=c)

    @functools.cache
    def da_ref() -> torch.Tensor:
        out = torch.zeros_like(a, dtype=c)
        for u in range(problem.users):
            off, r = slots[u].tolist()
            m = ids == u
            out[off : off + r] = t_b[m, :r].t() @ x[m].to(c)
        return out

    def run_grad() -> torch.Tensor:
        return lora_grad_weights(x, dy, t_b, t, slots, st, segs, a.shape[0], R)[0]

    return run_grad, lambda: rel(run_grad(), da_ref())


def _time(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    if device.type == "cuda":
        import triton.testing

        # milliseconds of warm-up and of repetitions; --quick: about 0.1 s a candidate
        warmup, rep = (10, 40) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


#: candidates whose failure is printed as it happens (all go into the table's ``_failed``)
_FAILURES_SHOWN = 5


class _DeviceLost(Exception):
    """A candidate's failure left the device unusable (a broken CUDA context)."""


def _device_alive(device: torch.device) -> bool:
    """Whether ``device`` still runs work after a candidate failed (always, off CUDA)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False
    return True


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_label(device: torch.device) -> str:
    """The table's ``"device"``; on a GPU, the name its config file is named after."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"


def _bucket_order(entry: dict) -> tuple:
    """Sort key of a table's entries: the first match wins, so smaller buckets come first, and an
    entry matching any ``n``, ``k``, token count, rank or dtype (``null`` or absent) after the others."""
    return tuple((entry.get(key) is None, entry.get(key) or 0) for key in ("n", "k", "max_tokens", "max_rank", "dtype"))


def _bucket(entry: dict) -> tuple:
    """What an entry matches on (:data:`kernels.tuning._MATCH_KEYS`): a tuned bucket replaces
    an entry of the same op with the same bucket."""
    return tuple(entry.get(key) for key in _MATCH_KEYS)


def _bucket_entry(op: str, problem: Problem, cfg: LaunchConfig, dtype: torch.dtype, ms: float) -> dict:
    """The table entry of a tuned bucket, keyed as the op's launcher looks its config up: the
    shrink (``k`` → rank) by the layer's ``k`` and the expand (rank → ``n``) by its ``n`` alone,
    their other side (``null``: any) being the bank's rank, which ``max_rank`` bounds."""
    n = None if op == "shrink" else problem.n
    k = None if op == "expand" else problem.k
    entry = {"max_tokens": problem.num_tokens, "n": n, "k": k, "max_rank": problem.max_rank,
             "dtype": _dtype_name(dtype), "median_ms": round(ms, 5)}
    entry.update(dataclasses.asdict(cfg))
    return entry


def tune(
    dtype: torch.dtype = torch.bfloat16,
    *,
    device: torch.device | None = None,
    ops: tuple[str, ...] = OPS,
    quick: bool = False,
    tiny: bool = False,
    tolerance: float = 3e-2,
    progress: bool = True,
    jobs: int = 1,
) -> dict:
    """Tune every op over :func:`problems`; returns the config file's content (not written).
    ``jobs > 1``: compile every candidate first, in that many processes (:func:`precompile`).

    Example:
        >>> table = tune(torch.bfloat16, quick=True)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"ops: unknown {bad}; choose from {OPS}")
    ops = tuple(dict.fromkeys(ops))  # an op named twice is tuned once
    device = device or _default_device()
    out: dict[str, list[dict]] = {op: [] for op in ops}
    # the split path's kernels first (every target runs them), the fused kernel last: a run cut
    # short (SIGINT, e.g. the device call's time limit) keeps the buckets it finished
    order = {"shrink": 0, "expand": 1, "grad_weights": 2, "fused_linear": 3}
    work = sorted(((op, p) for op in ops for p in problems(tiny, quick) if worth_tuning(op, p, quick)),
                  key=lambda w: order.get(w[0], len(order)))
    # the interpreter (CPU) compiles nothing: --jobs only matters on a GPU
    precompiled = (precompile(work, dtype, device, tiny=tiny, jobs=jobs, progress=progress)
                   if jobs > 1 and device.type == "cuda" else None)
    done = 0
    # the split path's schedules (forward only) are timed with the shrink's and the expand's
    # tuned configs, before the grouped dA/dB and the fused kernel's buckets: a run cut short
    # there still has them
    schedules: dict = {}
    dispatch: dict = {}
    want_schedules = {"shrink", "expand"} <= set(ops)
    interrupted = False
    failed: list[str] = []
    try:
        for op, problem in tqdm(work, desc="autotune", disable=not progress):
            if op not in ("shrink", "expand") and want_schedules:
                want_schedules = False
                _time_split_schedules(out, schedules, dtype, device, tiny)
            run, check = _runner(op, problem, dtype, device)  # inputs and reference built once per bucket
            best: tuple[float, LaunchConfig] | None = None
            for cfg in candidates(op, problem, tiny):
                try:
                    with use_config(op, cfg):
                        if not check() < tolerance:  # a wrong config is never kept (NaN fails too)
                            continue
                        ms = _time(run, device, quick)
                except OutOfResources:  # too much shared memory / too many registers on this GPU
                    continue
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or launch is skipped
                    failed.append(f"{op} {problem} {cfg}: {type(exc).__name__}: {str(exc).strip()[:300]}")
                    if len(failed) <= _FAILURES_SHOWN:
                        print(f"autotune: skipped {failed[-1]}", flush=True)
                    if not _device_alive(device):  # a launch that broke the CUDA context ends the run
                        raise _DeviceLost(failed[-1]) from exc
                    continue
                if not math.isfinite(ms):
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is not None:
                out[op].append(_bucket_entry(op, problem, best[1], dtype, best[0]))
            done += 1
        if want_schedules:
            _time_split_schedules(out, schedules, dtype, device, tiny)
        if "fused_linear" in ops:  # last: a run cut short in it still keeps every bucket
            dispatch = _tune_dispatch(dtype, device, tiny)
    except (KeyboardInterrupt, _DeviceLost) as exc:
        interrupted = True
        why = "the device failed" if isinstance(exc, _DeviceLost) else "interrupted"
        print(f"autotune: {why} after {done} of {len(work)} buckets; keeping those", flush=True)
    for entries in out.values():
        entries.sort(key=_bucket_order)
    dispatch.update(schedules)
    import triton

    return {
        "device": _device_label(device),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ops": out,
        "dispatch": dispatch,
        **({"_precompiled": precompiled} if precompiled else {}),
        **({"_interrupted": f"{done} of {len(work)} buckets tuned"} if interrupted else {}),
        **({"_failed": failed} if failed else {}),
    }


def precompile(work: list[tuple[str, Problem]], dtype: torch.dtype, device: torch.device, *, tiny: bool = False,
               jobs: int = 8, arch: int | None = None, progress: bool = True) -> dict:
    """Compile the kernel variants of every candidate of ``work`` into Triton's cache, in
    ``jobs`` processes, before any is timed.

    Timing one candidate takes a fraction of a second; compiling it, seconds, one after another
    in this process. So each candidate's launches are first recorded without running them
    (:class:`kernels.aot.LaunchRecorder` with ``launch=False``). The distinct variants are then
    compiled in parallel by :func:`kernels.aot.compile_recorded`, under the key the JIT computes,
    and the timing loop finds them compiled. Returns counts: variants, and how many failed to
    compile (for example too much shared memory). The timing loop skips those.
    """
    from tqdm.auto import tqdm

    from . import aot

    if arch is None:
        major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
        arch = major * 10 + minor
    records: dict[str, dict] = {}
    for op, problem in tqdm(work, desc="autotune: record variants", disable=not progress):
        run, _ = _runner(op, problem, dtype, device)
        for cfg in candidates(op, problem, tiny):
            with use_config(op, cfg), aot.LaunchRecorder(launch=False) as rec:
                run()
            records.update(rec.records)
        del run
    t0 = time.perf_counter()
    results = aot.compile_recorded(list(records.values()), arch, jobs)
    failed = sum(1 for _, _, err in results if err)
    summary = {"variants": len(records), "failed": failed, "arch": arch, "jobs": jobs,
               "seconds": round(time.perf_counter() - t0, 1)}
    if progress:
        print(f"autotune: {summary['variants']} variants compiled for sm_{arch} in {summary['seconds']} s "
              f"({failed} did not compile)", flush=True)
    return summary


def _tune_dispatch(dtype: torch.dtype, device: torch.device, tiny: bool) -> dict:
    """``fused_max_rank``: 16 if the one-launch fused path beats ``fused_t`` at rank 16, else 0."""
    from .ops.fused_linear import fused_lora_linear

    problem = Problem(96, 48, 40, 16, 4) if tiny else Problem(4096, 4096, 11008, 16, 32)
    bank, plan, _, x, w = _build(problem, dtype, device)
    st, tiles, segs, bms = plan.as_args()
    args = (x, w, None, bank.lora_a.detach(), bank.lora_b.detach(), bank.scale, bank.slots, st, tiles, segs, bms,
            bank.max_rank)
    fused = _time(lambda: fused_lora_linear(*args, precompute_t=False), device)
    fused_t = _time(lambda: fused_lora_linear(*args, precompute_t=True), device)
    measured = {"fused_ms": round(fused, 5), "fused_t_ms": round(fused_t, 5), "problem": dataclasses.asdict(problem)}
    return {"fused_max_rank": 16 if fused < fused_t else 0, "_measured": measured}


def _time_split_schedules(tuned: dict[str, list[dict]], into: dict, dtype: torch.dtype, device: torch.device,
                          tiny: bool) -> None:
    """Time the split path's schedules (:func:`tune_split_overlap`, :func:`tune_split_parallel`)
    with the launch configs tuned so far (``tuned``, read before the GPU's files through a
    temporary ``MILP_KERNEL_CONFIGS`` table); their knobs and evidence go ``into`` the dict as
    each is measured, so an interruption keeps what was."""
    fd, tmp = tempfile.mkstemp(prefix="milp_tuned_", suffix=".json")
    previous = os.environ.get("MILP_KERNEL_CONFIGS")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"ops": {op: sorted(entries, key=_bucket_order) for op, entries in tuned.items()}}, f)
        os.environ["MILP_KERNEL_CONFIGS"] = tmp
        into.update(tune_split_overlap(dtype, device, tiny))
        into.update(tune_split_parallel(dtype, device, tiny))
    finally:
        if previous is None:
            os.environ.pop("MILP_KERNEL_CONFIGS", None)
        else:
            os.environ["MILP_KERNEL_CONFIGS"] = previous
        os.unlink(tmp)
        _load_table.cache_clear()


def _schedule_rows(dtype: torch.dtype, device: torch.device, tiny: bool, sizes: list[tuple[int, int]],
                   schedules: dict[str, dict], timer: Callable) -> list[dict]:
    """Per ``(tokens, users)`` size, the split path's inference forward (the 7B up and down
    projections summed) timed by ``timer`` under each schedule (column name -> dispatch knobs)."""
    from .library import lora_linear_forward

    shapes = [(48, 40)] if tiny else [(4096, 11008), (11008, 4096)]
    rows = []
    with use_backend("triton"):  # a CPU (--tiny) runs the kernels in the interpreter
        for tokens, users in sizes:
            row = {"tokens": tokens, **dict.fromkeys(schedules, 0.0)}
            for k, n in shapes:
                bank, plan, _, x, w = _build(Problem(tokens, k, n, 16 if tiny else 96, users), dtype, device)
                st, tiles, segs, bms = plan.as_args()
                run = functools.partial(lora_linear_forward, x, w, None, bank.lora_a.detach(), bank.lora_b.detach(),
                                        bank.scale, bank.slots, st, tiles, segs, bms, bank.max_rank, False, "split")
                for name, knobs in schedules.items():
                    with use_dispatch(**knobs):
                        row[name] += timer(run, device)
                del bank, plan, x, w, run, st, tiles, segs, bms
            rows.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def tune_split_overlap(dtype: torch.dtype, device: torch.device, tiny: bool = False) -> dict:
    """``split_overlap_min_tokens`` (:func:`kernels.tuning.split_overlap`), measured: the split
    path's forward (GEMM first) with the shrink on a side stream beside the base GEMM against
    the two one after the other, at decode (32 users), 512, 4096 and 16384 tokens, the 7B up
    and down projections summed. The knob is the smallest of those token counts from which the
    overlap is at least 2% faster at every larger one; 0 (never) if it is not at the largest.
    Run with the launch configs in force (:func:`tune` runs it with the shrink's and expand's tuned ones).

    Example:
        >>> tune_split_overlap(torch.bfloat16, torch.device("cuda"))  # doctest: +SKIP
        {'split_overlap_min_tokens': 4096, '_measured_overlap': [...]}
    """
    sizes = [(8, 8), (96, 4)] if tiny else [(32, 32), (512, 32), (4096, 32), (16384, 32)]
    gemm_first = dict(split_expand_first_max_tokens=0, split_parallel_max_tokens=0)
    measured = _schedule_rows(dtype, device, tiny, sizes, {
        "serial_ms": dict(gemm_first, split_overlap_min_tokens=0),
        "overlap_ms": dict(gemm_first, split_overlap_min_tokens=1)}, _time)
    first = 0
    for row in reversed(measured):  # from the largest size down, while the overlap wins
        if not row["overlap_ms"] < 0.98 * row["serial_ms"]:
            break
        first = row["tokens"]
    return {"split_overlap_min_tokens": first, "_measured_overlap": measured}


def _graph_time(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of ``fn`` replayed from a CUDA graph (the interpreter's wall time on a CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return _time(fn, device)


def tune_split_parallel(dtype: torch.dtype, device: torch.device, tiny: bool = False) -> dict:
    """``split_parallel_max_tokens`` (:func:`kernels.tuning.split_parallel`), measured from
    CUDA-graph replays (the schedule applies only under capture): the inference forward at
    decode, 32 and 256 users with a token each, the 7B up and down projections summed, as two
    branches against the schedule the other knobs give. The knob is the largest of those sizes
    up to which the branches are at least 2% faster at every size; 0 (never) if they are not at
    the smallest. Run with the launch configs in force (:func:`tune` runs it with the tuned ones).

    Example:
        >>> tune_split_parallel(torch.bfloat16, torch.device("cuda"))  # doctest: +SKIP
        {'split_parallel_max_tokens': 256, '_measured_parallel': [...]}
    """
    sizes = [(8, 8), (16, 16)] if tiny else [(32, 32), (256, 256)]
    measured = _schedule_rows(dtype, device, tiny, sizes, {
        "serial_ms": dict(split_parallel_max_tokens=0),
        "parallel_ms": dict(split_parallel_max_tokens=1 << 30)}, _graph_time)
    last = 0
    for row in measured:  # from the smallest size up, while the branches win
        if not row["parallel_ms"] < 0.98 * row["serial_ms"]:
            break
        last = row["tokens"]
    return {"split_parallel_max_tokens": last, "_measured_parallel": measured}


#: notes of one tuning run, replaced by the next run's (absent when it has none)
_RUN_NOTES = ("_precompiled", "_interrupted", "_failed")


def _table_problem(path: Path) -> str | None:
    """Why the config table at ``path`` cannot take the tuned entries (it is a folder, or a
    table the strict reader of :mod:`kernels.tuning` refuses); ``None`` when it can."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a config table file"
    try:
        _load_table.__wrapped__(str(path))  # checked whole, as a launch would read it (not cached)
    except ValueError as exc:
        return str(exc)
    return None


def write_table(table: dict, path: Path) -> Path:
    """Merge ``table`` into the JSON at ``path``, atomically: a tuned bucket replaces the entry
    of the same op and bucket (``max_tokens``, ``n``, ``k``, ``max_rank``, ``dtype``), other
    entries (other ops, dtypes or sizes, those a run cut short did not reach) and dispatch knobs
    the table does not set are kept. A file :func:`_table_problem` refuses raises a ``ValueError``."""
    path = Path(path)
    merged = table
    if path.exists():
        problem = _table_problem(path)
        if problem:
            raise ValueError(f"write_table: cannot merge into {path}: {problem}")
        old = json.loads(path.read_text(encoding="utf-8"))
        old = {k: v for k, v in old.items() if k not in _RUN_NOTES}  # another run's
        old_ops = old.get("ops", {})
        ops = {}
        for op in [*old_ops, *(op for op in table["ops"] if op not in old_ops)]:  # the file's order, new ops after
            tuned = table["ops"].get(op, [])
            buckets = {_bucket(e) for e in tuned}
            ops[op] = sorted([e for e in old_ops.get(op, []) if _bucket(e) not in buckets] + tuned,
                             key=_bucket_order)
        # dispatch thresholds merge key by key: a tuning run writes fused_max_rank and the split
        # schedule's knobs only, and must keep what bench/dispatch.py measured (decode_max_tokens, ...)
        dispatch = {**old.get("dispatch", {}), **table.get("dispatch", {})}
        merged = dict(old, **{k: v for k, v in table.items() if k not in ("ops", "dispatch")}, ops=ops,
                      dispatch=dispatch)
    # the project's atomic writer (fsync, a new file 0o644 and a replaced one keeping its mode, no
    # temp file left on failure); imported here, so `import kernels` never imports `search`
    from search.trial_log import atomic_write_text

    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    _load_table.cache_clear()
    _device_table_paths.cache_clear()  # a GPU's own file may be new: it now comes before its architecture's
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="operand dtype to tune")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--quick", action="store_true", help="a few buckets (minutes instead of an hour)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: plumbing check on CPU (with --out)")
    parser.add_argument("--out", default=None, help="JSON to write (default: kernels/configs/<gpu>.json)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="on a GPU, compile every candidate first, in this many processes (e.g. the CPU count)")
    args = parser.parse_args(argv)
    ops = tuple(dict.fromkeys(o.strip() for o in args.ops.split(",") if o.strip()))  # named twice: once
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        parser.error(f"--ops must name some of {OPS}, got {args.ops!r}")
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("no CUDA device: tuning needs a GPU (use --tiny --out FILE for a CPU plumbing check)")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.tiny and not args.out:
        # its entries and dispatch knobs (measured at toy sizes) must not land in the GPU's table
        parser.error("--tiny needs --out: the default, kernels/configs/<gpu>.json, is the GPU's tuned table")
    # the file is checked before the tuning, not after minutes of it
    out = Path(args.out) if args.out else config_path_for(_device_label(_default_device()))
    problem = _table_problem(out)
    if problem:
        parser.error(f"--out: {problem}")
    table = tune(_DTYPES[args.dtype], ops=ops, quick=args.quick, tiny=args.tiny, jobs=args.jobs)
    knobs = {k: v for k, v in table["dispatch"].items() if not k.startswith("_")}
    print(f"dispatch: {knobs}")
    print(f"wrote {write_table(table, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
