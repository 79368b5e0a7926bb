"""Shared machinery of ``pytest bench``: workloads, problems, timing, peaks, derived figures.

Every benchmark file (``bench/test_<op>.py``) does the same four things, with the helpers here:

1. build the workload's inputs once (:func:`problem`, cached for the impls of one workload);
2. check the implementation's result against the float64 reference (:func:`check`, per-dtype
   tolerance :data:`TOL`);
3. time it (:func:`run`): on CUDA a median of CUDA-event timings with the L2 cache flushed
   before every repetition (and, for decode and forward + backward, of CUDA-graph replays),
   plus pytest-benchmark's own host-clock rounds with the device synchronised before and after
   each round (:data:`PYTESTMARK` installs a synchronising timer); on CPU the pytest-benchmark minimum
   (shared cores: the least-disturbed round);
4. report derived figures in ``benchmark.extra_info`` (tokens/s, TFLOP/s, GB/s, % of the peaks
   measured in the same run, the roofline bound); ratios to the other implementations of the
   same workload are filled in by ``bench/conftest.py`` once every benchmark has run.

Another benchmark (a whole decoder layer, the runtime) plugs in by calling :func:`run` with
its own ``workload``/``impl`` names, FLOP and byte counts: the summary table, the JSON ratios
and ``bench/report.py`` then treat it like the op benchmarks (see ``bench/README.md``).

Environment knobs: ``MILP_BENCH_SIZE`` (``small`` | ``full``; default ``full`` with CUDA,
``small`` without), ``MILP_BENCH_DTYPE`` (default bfloat16 on CUDA, float32 on CPU),
``MILP_BENCH_REP_MS`` (event-timing budget per implementation, default 100),
``MILP_BENCH_GRAPHS`` (``0`` turns CUDA-graph timing off), ``MILP_BENCH_PATHS`` (``1``: on
CUDA the forward also times our op with each path forced), ``MILP_GIT_COMMIT`` (the commit
to print where the tree has no ``.git``, as on the device machine).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

import kernels
from kernels import AdapterBank, BatchPlan
from kernels import reference as ref

__all__ = [
    "CUDA",
    "DEVICE",
    "DTYPE",
    "SIZE",
    "TOL",
    "RANKS",
    "SHAPES",
    "IMPLS",
    "PYTESTMARK",
    "Workload",
    "Problem",
    "Peaks",
    "workloads",
    "cases",
    "problem",
    "check",
    "rel_err",
    "run",
    "fill_ratios",
    "machine_info",
    "git_commit",
    "counts",
    "describe",
]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZE = os.environ.get("MILP_BENCH_SIZE", "full" if CUDA else "small").strip().lower()
if SIZE not in ("small", "full"):
    raise ValueError(f"MILP_BENCH_SIZE must be 'small' or 'full', got {SIZE!r}")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_dtype = os.environ.get("MILP_BENCH_DTYPE", "bfloat16" if CUDA else "float32").strip().lower()
if _dtype not in _DTYPES:
    raise ValueError(f"MILP_BENCH_DTYPE must be one of {sorted(_DTYPES)}, got {_dtype!r}")
DTYPE = _DTYPES[_dtype]
try:
    REP_MS = float(os.environ.get("MILP_BENCH_REP_MS", "100"))
except ValueError:
    raise ValueError(f"MILP_BENCH_REP_MS must be a number of milliseconds, got "
                     f"{os.environ['MILP_BENCH_REP_MS']!r}") from None
GRAPHS = CUDA and os.environ.get("MILP_BENCH_GRAPHS", "1") != "0"

#: relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference (as in tests/kernels)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: ranks of the paper's search space (Table 6)
RANKS = (8, 16, 32, 64, 96)

#: FFN linears (in_features k, out_features n): LLaMA-7B 4096↔11008, LLaMA-13B 5120↔13824
SHAPES = {
    "7b-up": (4096, 11008),
    "7b-down": (11008, 4096),
    "13b-up": (5120, 13824),
    "13b-down": (13824, 5120),
    # TinyLlama-1.1B (bench/test_runtime.py's model): its kernel variants, bench/variants.py
    "1b-up": (2048, 5632),
    "1b-down": (5632, 2048),
    # CPU subset: the 7B shapes divided by 16
    "7b-up-small": (256, 688),
    "7b-down-small": (688, 256),
}

#: implementations benchmarked per op; "milp" is ours, the rest are the baselines
#: with MILP_BENCH_PATHS=1 on CUDA the forward also times our op with each path forced
#: (``milp-split``, ``milp-fused``, ``milp-fused_t``): data for the dispatch thresholds
FORCED_PATHS = kernels.PATHS if CUDA and os.environ.get("MILP_BENCH_PATHS", "0") == "1" else ()
IMPLS = {
    "fwd": ("milp", "base", "loop", "padded", "peft") + tuple(f"milp-{p}" for p in FORCED_PATHS),
    "fwdbwd": ("milp", "base", "loop", "padded", "peft"),
    "shrink": ("milp", "base", "loop", "padded"),
    "expand": ("milp", "base", "loop", "padded"),
}


# ----------------------------------------------------------------------------- timing
def _sync_timer() -> float:
    """pytest-benchmark timer: synchronise the device, then read the host clock."""
    torch.cuda.synchronize()
    return time.perf_counter()


#: module-level ``pytestmark`` of every benchmark file: on CUDA each timed round is bracketed
#: by device synchronisations (the timer is read before and after a round)
PYTESTMARK = pytest.mark.benchmark(timer=_sync_timer if CUDA else time.perf_counter)

_flush_buf: torch.Tensor | None = None


def _flush() -> None:
    """Evict the L2 cache (50–60 MB on H100/H200) by writing a 256 MB buffer."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    _flush_buf.zero_()


def cuda_median_ms(
    fn: Callable[[], object],
    *,
    rep_ms: float = REP_MS,
    flush: bool = True,
    min_reps: int = 10,
    max_reps: int = 500,
) -> tuple[float, int]:
    """Median time of ``fn`` in ms from CUDA events, each repetition after an L2 flush."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    # whole-model workloads take seconds a call (sequential training of 16 users: 3.4 s on an
    # H200): at least 3 repetitions, but no more than ~2 s of minimum repetitions
    floor = max(3, min(min_reps, int(2000.0 / est)))
    n = int(min(max_reps, max(floor, rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if flush:
            _flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=False)), n


def cuda_graph_median_ms(fn: Callable[[], object], *, rep_ms: float = REP_MS) -> float:
    """Median time of one CUDA-graph replay of ``fn`` (launch gaps removed), L2 flushed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms, _ = cuda_median_ms(graph.replay, rep_ms=rep_ms)
    del graph
    return ms


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- peaks
@dataclasses.dataclass
class Peaks:
    """Ceilings measured in this run: a large matmul (compute) and a large copy (bandwidth).

    CUDA: an 8192³ matmul in the benchmark dtype (bf16: tensor cores) and a 1 GiB
    device-to-device copy (bytes read + written). CPU: a 1024³ float32 matmul and a 256 MiB
    copy, the CPU's equivalents, fastest of 7 runs (shared cores: noisy).
    """

    device: str
    dtype: str
    tflops: float
    gbs: float
    matmul: str
    copy: str

    @classmethod
    def measure(cls, dtype: torch.dtype = DTYPE) -> Peaks:
        g = torch.Generator(device=DEVICE).manual_seed(1234)
        if CUDA:
            m = 8192
            a = torch.randn(m, m, device=DEVICE, generator=g).to(dtype)
            b = torch.randn(m, m, device=DEVICE, generator=g).to(dtype)
            mm_ms, _ = cuda_median_ms(lambda: torch.mm(a, b), rep_ms=300, flush=False, min_reps=10)
            del a, b
            nbytes = 1 << 30
            src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(generator=g)
            dst = torch.empty_like(src)
            cp_ms, _ = cuda_median_ms(lambda: dst.copy_(src), rep_ms=200, flush=False)
            del src, dst
            torch.cuda.empty_cache()
            name = torch.cuda.get_device_name()
        else:
            m = 1024
            dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            a = torch.randn(m, m, generator=g).to(dtype)
            b = torch.randn(m, m, generator=g).to(dtype)
            mm_ms = _cpu_best_ms(lambda: torch.mm(a, b), reps=7)
            nbytes = 256 << 20
            src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=g)
            dst = torch.empty_like(src)
            cp_ms = _cpu_best_ms(lambda: dst.copy_(src), reps=7)
            name = "cpu"
        return cls(
            device=name,
            dtype=str(dtype).replace("torch.", ""),
            tflops=2 * m**3 / (mm_ms * 1e-3) / 1e12,
            gbs=2 * nbytes / (cp_ms * 1e-3) / 1e9,
            matmul=f"{m}x{m}x{m} {str(dtype).replace('torch.', '')} mm: {mm_ms:.3f} ms",
            copy=f"{nbytes >> 20} MiB copy (read+write): {cp_ms:.3f} ms",
        )


def _cpu_best_ms(fn: Callable[[], object], reps: int) -> float:
    """Fastest of ``reps`` runs: on shared cores the ceiling is the least-disturbed run."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts)


#: the peaks of this session (set by the ``peaks`` fixture; read by the JSON hook)
PEAKS: Peaks | None = None


# ----------------------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark problem. ``ranks``: ``r16`` (one rank-16 module per user), ``mix`` (one
    module, ranks cycling 96, 8, 16, 32, 64 over users), ``32x8`` (32 rank-8 modules: total
    rank 256), ``32xmix`` (32 modules of the user's cycled rank: total 256…3072)."""

    op: str  # fwd | fwdbwd | shrink | expand
    shape: str  # key of SHAPES
    phase: str  # decode (1 token per adapter user) | prefill
    tokens: int  # T, tokens in the batch (with and without adapters)
    users: int  # users with an adapter in the batch (the bank holds exactly these)
    ranks: str = "mix"
    none_share: float = 0.0  # share of the T tokens that carry no adapter (-1)
    seed: int = 0

    @property
    def k(self) -> int:
        return SHAPES[self.shape][0]

    @property
    def n(self) -> int:
        return SHAPES[self.shape][1]

    @property
    def modules(self) -> int:
        return 32 if self.ranks.startswith("32x") else 1

    @property
    def none_tokens(self) -> int:
        """How many of the T tokens carry no adapter (the rest are dealt to the users)."""
        return int(math.floor(self.none_share * self.tokens + 1e-9))

    @property
    def id(self) -> str:
        s = f"{self.shape}-{self.phase}-T{self.tokens}-U{self.users}-{self.ranks}"
        return s + (f"-none{round(self.none_share * 100)}" if self.none_share else "")

    @property
    def group(self) -> str:
        return f"{self.op}:{self.id}"

    def user_ranks(self) -> list[list[int]]:
        """Module ranks of each user ``0 .. users-1``."""
        cyc = [RANKS[(i + 4) % len(RANKS)] for i in range(self.users)]  # 96, 8, 16, 32, 64, 96, ...
        if self.ranks == "r16":
            return [[16] for _ in cyc]
        if self.ranks == "mix":
            return [[r] for r in cyc]
        if self.ranks == "32x8":
            return [[8] * 32 for _ in cyc]
        if self.ranks == "32xmix":
            return [[r] * 32 for r in cyc]
        raise ValueError(f"unknown rank spec {self.ranks!r}")


def _decode(op, shape, users, ranks="mix", none_share=0.0):
    tokens = round(users / (1 - none_share))
    return Workload(op, shape, "decode", tokens, users, ranks, none_share)


def _prefill(op, shape, tokens, users, ranks="mix", none_share=0.1):
    return Workload(op, shape, "prefill", tokens, users, ranks, none_share)


def _dedup(ws: list[Workload]) -> list[Workload]:
    return list(dict.fromkeys(ws))


@functools.cache
def workloads(op: str, size: str = SIZE) -> tuple[Workload, ...]:
    """The workload grid of ``op`` for ``size`` (``small``: the CPU subset; ``full``: CUDA)."""
    ws: list[Workload] = []
    if size == "small":
        up, down = "7b-up-small", "7b-down-small"
        if op == "fwd":
            ws += [_decode(op, up, u) for u in (1, 8, 32)]
            ws += [_decode(op, down, 8, "r16"), _decode(op, up, 8, "mix", 0.5)]
            ws += [_prefill(op, up, t, 8) for t in (256, 1024)]
            ws += [_prefill(op, up, 256, u) for u in (1, 4)]
            ws += [_prefill(op, down, 512, 8, "r16"), _prefill(op, up, 256, 4, "32x8")]
        elif op == "fwdbwd":
            ws += [_prefill(op, up, t, 8) for t in (256, 1024)]
            ws += [_prefill(op, down, 256, 4, "32x8")]
        elif op in ("shrink", "expand"):
            ws += [_decode(op, up, u) for u in (1, 32)]
            ws += [_prefill(op, up, 512, 8), _prefill(op, down, 256, 4, "32x8")]
        return tuple(_dedup(ws))
    if size != "full":
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if op == "fwd":
        for shape in ("7b-up", "7b-down", "13b-up", "13b-down"):
            for ranks in ("r16", "mix"):
                ws += [_decode(op, shape, u, ranks) for u in (1, 8, 32, 64, 128, 256)]
        ws += [_decode(op, "7b-up", 32, "mix", 0.5)]
        for shape in ("7b-up", "7b-down"):
            ws += [_decode(op, shape, u, "32x8") for u in (32, 256)]
            ws += [_decode(op, shape, 32, "32xmix")]
        for shape in ("7b-up", "7b-down"):
            for ranks in ("r16", "mix"):
                ws += [_prefill(op, shape, t, 32, ranks) for t in (512, 1024, 2048, 4096, 8192, 16384)]
            ws += [_prefill(op, shape, 4096, u) for u in (1, 8, 64)]
            ws += [_prefill(op, shape, 4096, 32, r) for r in ("32x8", "32xmix")]
            ws += [_prefill(op, shape, 4096, 32, "mix", 0.5)]
        for shape in ("13b-up", "13b-down"):
            ws += [_prefill(op, shape, t, 32) for t in (4096, 16384)]
    elif op == "fwdbwd":
        for shape in ("7b-up", "7b-down"):
            ws += [_prefill(op, shape, t, 32) for t in (512, 4096, 16384)]
            ws += [_prefill(op, shape, 4096, u) for u in (1, 64)]
            ws += [_prefill(op, shape, 4096, 32, r) for r in ("r16", "32x8")]
        ws += [_prefill(op, s, 4096, 32) for s in ("13b-up", "13b-down")]
    elif op in ("shrink", "expand"):
        for shape in ("7b-up", "7b-down"):
            ws += [_decode(op, shape, u) for u in (1, 32, 256)]
            ws += [_decode(op, shape, 32, "32x8")]
            ws += [_prefill(op, shape, t, 32) for t in (4096, 16384)]
            ws += [_prefill(op, shape, 4096, 32, "32x8")]
    else:
        raise ValueError(f"unknown op {op!r}")
    return tuple(_dedup(ws))


def cases(op: str) -> tuple[list[tuple[Workload, str]], list[str]]:
    """``(params, ids)`` for ``pytest.mark.parametrize("wl,impl", ...)``: impls innermost so
    the implementations of one workload run back to back on the cached inputs."""
    params = [(wl, impl) for wl in workloads(op) for impl in IMPLS[op]]
    return params, [f"{wl.id}-{impl}" for wl, impl in params]


# ----------------------------------------------------------------------------- problem
class Problem:
    """Inputs of one workload on :data:`DEVICE` in :data:`DTYPE`, built once for all impls.

    ``x [T, k]``, ``w [n, k]`` (``/√k``), ``dy [T, n]``; a bank holding exactly the batch's
    adapter users with ``alpha_j = 2 r_j`` (scale 2, PEFT's common ``lora_alpha = 2r``),
    ``A ~ U(±1/√k)``, ``B ~ U(±1/√R_u)``; token ids with ``none_share`` of ``-1`` and the
    adapter tokens dealt evenly to the users, in a random order; the plan built from them.
    """

    def __init__(self, wl: Workload, *, device: torch.device = DEVICE, dtype: torch.dtype = DTYPE) -> None:
        self.wl, self.device, self.dtype = wl, device, dtype
        T, k, n, U = wl.tokens, wl.k, wl.n, wl.users
        n_none = wl.none_tokens
        if T - n_none < U:
            raise ValueError(f"{wl.id}: {T - n_none} adapter tokens cannot cover {U} users")
        cpu_gen = torch.Generator().manual_seed(wl.seed)
        gen = torch.Generator(device=device).manual_seed(wl.seed + 1)
        self.user_ranks = wl.user_ranks()
        totals = [sum(r) for r in self.user_ranks]
        bank = AdapterBank(k, n, max_users=U, capacity=sum(totals), dtype=dtype, device=device)
        for u, rs in enumerate(self.user_ranks):
            bank.add(u, rs, alpha=[2.0 * r for r in rs], init="zeros")
        with torch.no_grad():
            bank.lora_a.uniform_(-(k**-0.5), k**-0.5, generator=gen)
            bank.lora_b.uniform_(-1.0, 1.0, generator=gen)
            row_scale = torch.zeros(bank.capacity, dtype=torch.float32)
            for u, total in enumerate(totals):
                off = bank.segment(u).offset
                row_scale[off : off + total] = total**-0.5
            bank.lora_b.mul_(row_scale.to(device=device, dtype=dtype)[:, None])
        self.bank = bank
        # token -> user: users get T' // U tokens (+1 for the first T' % U), -1 for the rest
        per = [(T - n_none) // U + (1 if u < (T - n_none) % U else 0) for u in range(U)]
        ids = torch.cat(
            [torch.full((c,), u, dtype=torch.int64) for u, c in enumerate(per)]
            + [torch.full((n_none,), -1, dtype=torch.int64)]
        )
        ids = ids[torch.randperm(T, generator=cpu_gen)]
        self.ids_cpu = ids
        self.ids = ids.to(device)
        self.plan = BatchPlan.build(self.ids, max_users=U)
        self.x = torch.randn(T, k, device=device, generator=gen).to(dtype)
        self.w = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
        self._dy: torch.Tensor | None = None
        # per-user groups: (token indices on device, row offset, total rank)
        self.groups = []
        for u in range(U):
            idx = (ids == u).nonzero().flatten()
            seg = bank.segment(u)
            self.groups.append((idx.to(device), seg.offset, seg.rank))
        self._ref: dict[str, object] = {}

    # counts ---------------------------------------------------------------
    @property
    def elem(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def adapter_tokens(self) -> int:
        """``T_a``: tokens whose user has an adapter."""
        return sum(int(idx.numel()) for idx, _, _ in self.groups)

    @property
    def rank_tokens(self) -> int:
        """``Σ_i R_i`` over the tokens (0 for a token without adapter)."""
        return sum(int(idx.numel()) * r for idx, _, r in self.groups)

    @property
    def rank_users(self) -> int:
        """``Σ_u R_u`` over the users present in the batch (rows of A and B to read)."""
        return sum(r for _, _, r in self.groups)

    @property
    def dy(self) -> torch.Tensor:
        if self._dy is None:
            gen = torch.Generator(device=self.device).manual_seed(self.wl.seed + 2)
            self._dy = torch.randn(self.wl.tokens, self.wl.n, device=self.device, generator=gen).to(
                self.dtype
            )
        return self._dy

    # references (float64, on the problem's device) ---------------------------
    def ref(self, what: str):
        if what not in self._ref:
            b = self.bank
            a, lb, s, slots = b.lora_a.detach(), b.lora_b.detach(), b.scale, b.slots
            if what == "fwd":
                self._ref[what] = ref.lora_linear_ref(self.x, self.w, None, a, lb, s, slots, self.ids)
            elif what == "base":
                self._ref[what] = self.x.double() @ self.w.double().t()
            elif what == "base_dx":
                self._ref[what] = self.dy.double() @ self.w.double()
            elif what == "grads":
                self._ref[what] = ref.lora_linear_grads_ref(
                    self.x, self.w, a, lb, s, slots, self.ids, self.dy
                )
            elif what == "shrink":
                self._ref[what] = ref.shrink_ref(self.x, a, s, slots, self.ids, b.max_rank)
            else:
                raise KeyError(what)
        return self._ref[what]


_cache: dict[Workload, Problem] = {}


def problem(wl: Workload) -> Problem:
    """The :class:`Problem` of ``wl``; only the latest workload's inputs are kept."""
    if wl not in _cache:
        _cache.clear()
        gc.collect()  # PEFT models and autograd graphs of the last workload hold device memory in cycles
        if CUDA:
            torch.cuda.empty_cache()
        _cache[wl] = Problem(wl)
    return _cache[wl]


def counts(op: str, p: Problem, impl: str = "milp") -> tuple[float, float]:
    """``(FLOPs, minimum bytes)`` of the problem an implementation solves (README formulas).

    Every implementation of a workload is credited with the same useful work (padding and
    re-reads are not counted), except ``base``, which solves the smaller base-only problem.
    ``T`` tokens, ``k`` in, ``n`` out, ``e`` bytes per element, ``T_a`` adapter tokens,
    ``ΣR_i`` rank summed over tokens, ``ΣR_u`` rank summed over the users present.
    """
    T, k, n, e = p.wl.tokens, p.wl.k, p.wl.n, p.elem
    sri, sru, ta = p.rank_tokens, p.rank_users, p.adapter_tokens
    acc = 8 if p.dtype == torch.float64 else 4
    if impl == "base":
        if op == "fwdbwd":  # y = x Wᵀ and dx = dy W (W frozen)
            return 4 * T * k * n, e * (2 * T * k + 2 * n * k + 2 * T * n)
        return 2 * T * k * n, e * (T * k + n * k + T * n)
    if op == "fwd":
        return 2 * T * k * n + 2 * sri * (k + n), e * (T * k + n * k + T * n + sru * (k + n))
    if op == "fwdbwd":
        return (
            4 * T * k * n + 6 * sri * (k + n),
            e * (3 * T * k + 2 * n * k + 2 * T * n + 3 * sru * (k + n)),
        )
    if op == "shrink":
        return 2 * sri * k, e * (ta * k + sru * k) + acc * T * p.bank.max_rank
    if op == "expand":
        return 2 * sri * n, acc * sri + e * sru * n + 2 * e * ta * n
    raise ValueError(f"unknown op {op!r}")


def describe(wl: Workload, p: Problem) -> dict:
    """The workload's fields for ``extra_info`` (the report's columns)."""
    return {
        "op": wl.op,
        "shape": wl.shape,
        "k": wl.k,
        "n": wl.n,
        "phase": wl.phase,
        "T": wl.tokens,
        "users": wl.users,
        "ranks": wl.ranks,
        "modules": wl.modules,
        "none_share": wl.none_share,
        "adapter_tokens": p.adapter_tokens,
        "sum_rank_users": p.rank_users,
        "max_rank": p.bank.max_rank,
    }


# ----------------------------------------------------------------------------- checks
def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (``inf`` for NaN/inf in ``out``)."""
    out = out.detach().double()
    expect = expect.detach().double().to(out.device)
    if out.shape != expect.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(expect.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    denom = float(expect.norm())
    return float((out - expect).norm()) / denom if denom else float(out.norm())


def check(what: str, out: torch.Tensor, expect: torch.Tensor, dtype: torch.dtype = DTYPE, *,
          tol: float | None = None) -> float:
    """Fail the benchmark when ``out`` is off the reference ``expect`` (float64 unless the caller
    says otherwise) by more than ``tol`` (default :data:`TOL` of ``dtype``)."""
    err = rel_err(out, expect)
    tol = TOL[dtype] if tol is None else tol
    if not err <= tol:
        pytest.fail(f"{what}: relative error {err:.3e} against the reference exceeds {tol:.1e} ({dtype})")
    return err


# ----------------------------------------------------------------------------- run + figures
def run_op(benchmark, peaks: Peaks, wl: Workload, p: Problem, impl: str, op: str, fn: Callable[[], object],
           errs: dict, *, graph: bool = False) -> dict:
    """:func:`run` for one case of an op benchmark (``bench/test_lora_*.py``): the workload's
    FLOPs/bytes for ``op`` (:func:`counts`), its description and the checked errors ``errs``."""
    flops, nbytes = counts(op, p, impl)
    return run(benchmark, workload=wl.group, impl=impl, fn=fn, flops=flops, nbytes=nbytes, tokens=wl.tokens,
               peaks=peaks, info={**describe(wl, p), **errs}, graph=graph)


def run(
    benchmark,
    *,
    workload: str,
    impl: str,
    fn: Callable[[], object],
    flops: float,
    nbytes: float,
    tokens: int,
    peaks: Peaks,
    info: dict | None = None,
    graph: bool = False,
    cpu_rounds: int = 5,
) -> dict:
    """Time ``fn`` and fill ``benchmark.extra_info`` with the derived figures.

    ``workload``: the key the ratios group by (the pytest-benchmark group too); ``impl``: this
    implementation's name (``milp`` = ours); ``flops``/``nbytes``: the problem's FLOPs and
    minimum bytes (README formulas); ``graph``: also time CUDA-graph replays (decode, forward +
    backward).
    """
    benchmark.group = workload
    extra = benchmark.extra_info
    extra.update(info or {})
    extra.update(
        workload=workload,
        impl=impl,
        tokens=tokens,
        flops=float(flops),
        bytes=float(nbytes),
        device=peaks.device,
        dtype=peaks.dtype,
    )
    if CUDA:
        dev_ms, reps = cuda_median_ms(fn)
        extra.update(time_ms=dev_ms, event_reps=reps, timing="cuda-events-median-l2-flushed")
        if graph and GRAPHS:
            try:
                extra["graph_ms"] = cuda_graph_median_ms(fn)
            except Exception as exc:  # capture refused (host work, syncs): report why
                torch.cuda.synchronize()
                extra["graph_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rounds = int(min(30, max(3, 0.1e3 / max(dev_ms, 1e-3))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
        if benchmark.stats is not None:
            extra["host_ms"] = benchmark.stats.stats.median * 1e3
    else:
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        rounds = int(min(cpu_rounds, max(2, 0.15 / max(est, 1e-6))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is not None:
            # CPU cores here are shared: the minimum is the least-disturbed round
            st = benchmark.stats.stats
            extra.update(time_ms=st.min * 1e3, host_ms=st.median * 1e3, timing="host-clock-min")
        else:  # --benchmark-disable: one plain run
            extra.update(time_ms=est * 1e3, timing="single-run")
    ms = extra["time_ms"]
    sec = ms * 1e-3
    extra["tokens_per_s"] = tokens / sec if sec > 0 else math.inf
    extra["tflops"] = flops / sec / 1e12 if sec > 0 else math.inf
    extra["gbs"] = nbytes / sec / 1e9 if sec > 0 else math.inf
    extra["pct_peak_tflops"] = 100 * extra["tflops"] / peaks.tflops
    extra["pct_peak_gbs"] = 100 * extra["gbs"] / peaks.gbs
    t_compute = flops / (peaks.tflops * 1e12) * 1e3
    t_memory = nbytes / (peaks.gbs * 1e9) * 1e3
    extra["roofline_ms"] = max(t_compute, t_memory)
    extra["bound"] = "compute" if t_compute >= t_memory else "memory"
    extra["pct_roofline"] = 100 * extra["roofline_ms"] / ms if ms > 0 else math.inf
    return extra


def fill_ratios(entries: Sequence[dict]) -> None:
    """For every pair of implementations of one workload: ``ratio_vs_<other>`` = this time /
    the other's (``< 1``: faster), and ``graph_ratio_vs_<other>`` from CUDA-graph times, where
    both times are measurements (:func:`_measured`). Entries without ``workload``/``impl``/``time_ms``
    (other benchmarks) are left alone."""
    by_wl: dict[str, dict[str, dict]] = {}
    for e in entries:
        if isinstance(e, dict) and {"workload", "impl", "time_ms"} <= e.keys():
            by_wl.setdefault(e["workload"], {})[e["impl"]] = e
    for impls in by_wl.values():
        for name, e in impls.items():
            for other, o in impls.items():
                if other == name:
                    continue
                if _measured(e.get("time_ms")) and _measured(o.get("time_ms")):
                    e[f"ratio_vs_{other}"] = e["time_ms"] / o["time_ms"]
                if _measured(e.get("graph_ms")) and _measured(o.get("graph_ms")):
                    e[f"graph_ratio_vs_{other}"] = e["graph_ms"] / o["graph_ms"]


def _measured(ms) -> bool:
    """A time that is a measurement: a finite number > 0 (not None, a bool, 0, NaN or inf;
    ``bench/dispatch.py`` keeps its own copy of this rule, to read results without torch)."""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0


# ----------------------------------------------------------------------------- provenance
def git_commit() -> str:
    env = os.environ.get("MILP_GIT_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine_info() -> dict:
    """What the report's header needs: device, versions, commit, peaks, sizes."""
    import triton

    try:  # the installed version, without paying for the import (transformers)
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:  # noqa: BLE001 - optional extra
        peft_version = "not installed"
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "cuda": torch.version.cuda if CUDA else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "peft": peft_version,
        "kernels": kernels.__version__,
        "backend": "triton" if CUDA else "torch (CPU path of the ops)",
        "git_commit": git_commit(),
        "bench_size": SIZE,
        "dtype": str(DTYPE).replace("torch.", ""),
        "cpu_threads": torch.get_num_threads(),
    }
    if PEAKS is not None:
        info["peaks"] = dataclasses.asdict(PEAKS)
    # what chose the kernels: the config files read (the GPU's own, its architecture's, an
    # override) and the dispatch knobs they give (path thresholds, the split path's schedules)
    from kernels import tuning

    device = torch.device("cuda" if CUDA else "cpu")
    files = [os.environ["MILP_KERNEL_CONFIGS"]] if os.environ.get("MILP_KERNEL_CONFIGS") else []
    if CUDA:
        files += [p.name for p in tuning.table_paths_for(torch.cuda.get_device_name(),
                                                         torch.cuda.get_device_capability())]
    info["config_files"] = files
    info["dispatch"] = dict(tuning._dispatch_knobs(device))
    return info
