"""Expand-and-add: ``y[i] += t[i, :R_u] B_u`` for every token ``i`` of user ``u`` (in place).

Grid: (tile, column block). Each program loads its tile's ``y`` once, adds the user's
low-rank product accumulated over rank blocks in fp32, and writes ``y`` once; segments
with no adapter exit at once and leave ``y`` untouched. ``t`` is the (already scaled)
output of :mod:`kernels.ops.shrink`; it is cast to ``B``'s dtype for the tensor cores.
``t`` may also be the shrink's split-K partial sums ``[S, T, R_T]``: the kernel adds the
``S`` slices as it loads each ``t`` tile (fixed order), so the decode path needs neither a
zero-filled ``t`` nor atomics.

With ``accumulate=False`` the kernel writes ``y[i] = t[i, :R_u] B_u`` instead, and zeros for
tokens without an adapter: every row of ``y`` is written once and none is read (the split
path's expand-first order, where cuBLAS then adds ``x Wᵀ`` in its epilogue).

A launch config with ``n_blocks > 1`` makes each program stream ``n_blocks`` column blocks
(grid (tile, column chunk)). Where the bank's rank fits one block of at most
:data:`EXPAND_HOIST_MAX_R`, ``t`` is loaded once and the loop over column blocks is a
pipelined stream of ``B`` (and ``y``) loads, one MMA and one store each: the one-block
programs wait on their tile lookup, ``t`` and ``B`` before their only store, and on an H200
the expand moved ``y`` at 37–61% of the copy bandwidth that way. The autotuner tries both.

A launch config with ``split_n > 0`` runs the decode form instead (``_expand_gemv_kernel``,
Punica's BGMV shape): grid (tile, ``split_n``), one row at a time, each program streaming
``1/split_n`` of the user's ``B`` columns and taking one dot per column on the CUDA cores. A
decode tile holds one token, so the tensor-core kernel spends 15 of its 16 rows on padding and
each of its programs reads a single ``[BLOCK_R, BLOCK_N]`` block of ``B`` after a chain of
dependent loads (on an H200 that kernel read ``B`` at 16-28% of the bandwidth). The autotuner
tries both forms for decode buckets; the heuristic keeps the tensor-core kernel until a GPU run
has measured them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import nvtx_range
from .._launch import Launch
from ..plan import tile_span
from ..tuning import get_config, launch_plan
from ._common import acc_dtype, active_segments, cdiv, dot_flags, flags_key, load_tile_info, mma, next_pow2

__all__ = ["lora_expand_", "lora_expand_torch_", "EXPAND_HOIST_MAX_R"]

#: the largest rank block the streaming form (``LaunchConfig.n_blocks > 1``) keeps ``t`` in
#: registers for, loaded once; above it each column block walks the rank in ``block_r`` steps
EXPAND_HOIST_MAX_R = 128


@triton.jit
def _load_t(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    t_ptr, tok, row_mask, rr, rank, stride_t, stride_ts, SPLIT: tl.constexpr,
):
    """The ``[rows, rank block]`` tile of ``t``, its ``SPLIT`` partial-sum slices added in order."""
    t_tile = t_ptr + tok[:, None] * stride_t + rr[None, :]
    t_mask = row_mask[:, None] & (rr < rank)[None, :]
    tt = tl.load(t_tile, mask=t_mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        tt += tl.load(t_tile + s * stride_ts, mask=t_mask, other=0.0)
    return tt


@triton.jit
def _store_y(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    y_ptr, tok, row_mask, offs_n, n_mask, acc, stride_yt, ACCUMULATE: tl.constexpr, ACC: tl.constexpr,
):
    """Write a block of ``y`` once: ``acc`` (+ the old ``y`` when ``ACCUMULATE``)."""
    out = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(ACC)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_cols(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    t_ptr, b_ptr, y_ptr, tok, row_mask, offset, rank, offs_n, N,
    stride_t, stride_b, stride_yt, stride_ts,
    SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` block of ``y``: the rank in ``BLOCK_R`` steps, then ``y`` once."""
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        tt = _load_t(t_ptr, tok, row_mask, rr, rank, stride_t, stride_ts, SPLIT)
        bt = tl.load(b_ptr + (offset + rr)[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                     mask=(rr < rank)[:, None] & n_mask[None, :], other=0.0)
        acc = mma(tt.to(bt.dtype), bt, acc, UPCAST, IEEE)
    _store_y(y_ptr, tok, row_mask, offs_n, n_mask, acc, stride_yt, ACCUMULATE, ACC)


@triton.jit
def _expand_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    t_ptr,        # [T, R_T] acc   scaled low-rank activations, or [SPLIT, T, R_T] partial sums
    b_ptr,        # [cap, N]       adapter rows
    slots_ptr,    # [U, 2] int32   (row offset, rank); rank 0 = none
    sorted_ptr,   # [T_cap] int32  token indices grouped by user
    tiles_ptr,    # [n_tiles, 3]   (start, end, user)
    y_ptr,        # [T, N]         updated in place
    N, R_T,       #                columns; t's row width (the launch's max_rank)
    stride_t, stride_b, stride_yt, stride_ts,
    SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    N_BLOCKS: tl.constexpr, HOIST_T: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start, end, user, offset, rank = load_tile_info(tiles_ptr, slots_ptr, pid_m, R_T)
    if start >= end:
        return
    if ACCUMULATE and rank == 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tok = tl.load(sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    n_first = pid_n * (BLOCK_N * N_BLOCKS)
    if HOIST_T:
        # the whole rank in one block (BLOCK_R >= the bank's rank): t is loaded once, and the
        # program streams its N_BLOCKS column blocks of B (and y), a pipelined loop of loads,
        # one MMA and a store each, instead of a program per block that waits on its own
        # tile lookup and t before its only store
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        tt = _load_t(t_ptr, tok, row_mask, offs_r, rank, stride_t, stride_ts, SPLIT).to(b_ptr.dtype.element_ty)
        b_rows = b_ptr + (offset + offs_r).to(tl.int64)[:, None] * stride_b
        for j in range(N_BLOCKS):
            offs_n = n_first + j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            bt = tl.load(b_rows + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(tt, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), UPCAST, IEEE)
            _store_y(y_ptr, tok, row_mask, offs_n, n_mask, acc, stride_yt, ACCUMULATE, ACC)
    else:  # a rank loop per column block (N_BLOCKS = 1: one block per program)
        for j in range(N_BLOCKS):
            _expand_cols(t_ptr, b_ptr, y_ptr, tok, row_mask, offset, rank,
                         n_first + j * BLOCK_N + tl.arange(0, BLOCK_N), N, stride_t, stride_b, stride_yt, stride_ts,
                         SPLIT, ACCUMULATE, BLOCK_M, BLOCK_N, BLOCK_R, UPCAST, IEEE, ACC)


@triton.jit
def _expand_gemv_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    t_ptr,        # [T, R_T] acc   scaled low-rank activations, or [SPLIT, T, R_T] partial sums
    b_ptr,        # [cap, N]       adapter rows
    slots_ptr,    # [U, 2] int32   (row offset, rank); rank 0 = none
    sorted_ptr,   # [T_cap] int32  token indices grouped by user
    tiles_ptr,    # [n_tiles, 3]   (start, end, user)
    y_ptr,        # [T, N]         updated in place
    N, N_CHUNK,   # columns; columns per program (a multiple of BLOCK_N)
    R_T,          #                t's row width (the launch's max_rank)
    stride_t, stride_b, stride_yt, stride_ts,
    SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """The decode form (``LaunchConfig.split_n > 0``): program ``(tile, s)`` takes the tile's
    rows one at a time and streams columns ``[s·N_CHUNK, (s+1)·N_CHUNK)`` of the user's ``B``
    in ``[BLOCK_R ≥ rank, BLOCK_N]`` blocks, multiplying on the CUDA cores (a dot per column,
    reduced over the rank): no 16-row tensor-core tile for one token, ``t``'s row loaded once
    per row, and a long run of ``B`` per program instead of one block (Punica's BGMV shape)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    start, end, user, offset, rank = load_tile_info(tiles_ptr, slots_ptr, pid_m, R_T)
    if start >= end:
        return
    if ACCUMULATE and rank == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_rows = b_ptr + (offset + offs_r).to(tl.int64) * stride_b
    n_lo = pid_s * N_CHUNK
    n_hi = tl.minimum(n_lo + N_CHUNK, N)
    for row in range(start, end):
        tok = tl.load(sorted_ptr + row).to(tl.int64)
        t_row = t_ptr + tok * stride_t + offs_r
        tt = tl.load(t_row, mask=r_mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            tt += tl.load(t_row + s * stride_ts, mask=r_mask, other=0.0)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            bt = tl.load(b_rows[:, None] + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.sum(tt[:, None] * bt.to(ACC), axis=0)
            out = y_ptr + tok * stride_yt + offs_n
            if ACCUMULATE:
                acc += tl.load(out, mask=n_mask, other=0.0).to(ACC)
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def lora_expand_(
    y: torch.Tensor,
    t: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    tiles: torch.Tensor,
    segments: torch.Tensor,
    block_ms: list[int],
    *,
    accumulate: bool = True,
) -> torch.Tensor:
    """Launch the expand kernel, adding into ``y`` (returned). ``t``: ``[T, R]``, or the
    shrink's partial sums ``[S, T, R]`` (``lora_shrink(..., partials=True)``).
    ``accumulate=False``: overwrite ``y`` (zeros where a token has no adapter)."""
    T, N = y.shape
    max_rank = t.shape[-1]
    if T == 0:
        return y
    if max_rank == 0:
        return y if accumulate else y.zero_()
    dev = y.device
    split = t.shape[0] if t.dim() == 3 else 1
    dims = (T, N, max_rank, tuple(block_ms), sorted_tokens.numel(), segments.shape[0], tiles.shape[0], split,
            bool(accumulate))
    off, rows, chunk, launch = launch_plan(("expand", dims, flags_key(y.dtype)), dev,
                                           lambda: _expand_plan(*dims, y.dtype, dev))
    strides = (t.stride(-2), lora_b.stride(0), y.stride(0), t.stride(0) if t.dim() == 3 else 0)
    with nvtx_range("milp.kernel.lora_expand"):
        if chunk:  # the decode (GEMV) form
            launch(_expand_gemv_kernel, t, lora_b, slots, sorted_tokens, tiles[off : off + rows], y, N, chunk,
                   max_rank, *strides)
        else:
            launch(_expand_kernel, t, lora_b, slots, sorted_tokens, tiles[off : off + rows], y, N, max_rank,
                   *strides)
    return y


def _expand_plan(T: int, N: int, max_rank: int, block_ms: tuple[int, ...], max_tokens: int, max_segments: int,
                 tile_rows: int, split: int, accumulate: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple[int, int, int, Launch]:
    """The expand's host decisions for one problem (memoised by :func:`kernels.tuning.launch_plan`):
    ``(first tile row, tiles, columns per program of the GEMV form or 0, the grid with its
    constexprs and launch options)``."""
    cfg = get_config("expand", num_tokens=T, n=N, k=max_rank, max_rank=max_rank, dtype=dtype, device=device,
                     block_ms=block_ms)
    off, rows = tile_span(max_tokens, max_segments, block_ms, cfg.block_m, tile_rows)
    if cfg.split_n > 0:
        # the whole rank in one block; columns per block so that a block stays <= 8192 elements
        block_r = next_pow2(max_rank)
        block_n = max(16, min(cfg.block_n, 8192 // block_r))
        chunk = cdiv(cdiv(N, min(cfg.split_n, cdiv(N, block_n))), block_n) * block_n
        kw = dict(SPLIT=split, ACCUMULATE=accumulate, BLOCK_N=block_n, BLOCK_R=block_r, ACC=dot_flags(dtype)["ACC"],
                  **cfg.kwargs())
        return off, rows, chunk, Launch((rows, cdiv(N, chunk)), kw)
    # n_blocks > 1: a program streams that many column blocks, with t loaded once where the
    # bank's rank fits one block of at most EXPAND_HOIST_MAX_R
    n_blocks = max(1, min(cfg.n_blocks, cdiv(N, cfg.block_n)))
    block_r, hoist = cfg.block_r, False
    if n_blocks > 1 and max(16, next_pow2(max_rank)) <= EXPAND_HOIST_MAX_R:
        block_r, hoist = max(16, next_pow2(max_rank)), True
    grid = (rows, cdiv(N, cfg.block_n * n_blocks))
    kw = dict(SPLIT=split, ACCUMULATE=accumulate, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
              N_BLOCKS=n_blocks, HOIST_T=hoist, **dot_flags(dtype), **cfg.kwargs())
    return off, rows, 0, Launch(grid, kw)


def lora_expand_torch_(
    y: torch.Tensor,
    t: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    segments: torch.Tensor,
    *,
    accumulate: bool = True,
) -> torch.Tensor:
    """Torch implementation over the plan's segments (the CPU path); same contract."""
    if not accumulate:
        y.zero_()
    acc = acc_dtype(y.dtype)
    for idx, off, rank in active_segments(slots, sorted_tokens, segments):
        delta = t.index_select(0, idx)[:, :rank].to(acc) @ lora_b[off : off + rank].to(acc)
        y[idx] = (y.index_select(0, idx).to(acc) + delta).to(y.dtype)
    return y
