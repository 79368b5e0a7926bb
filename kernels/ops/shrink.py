"""Shrink: ``t[i, :R_u] = s_u ⊙ (x_i A_uᵀ)`` for every token ``i`` of user ``u``.

Grid: (tile, rank block, K split). A tile is ``≤ BLOCK_M`` sorted rows of one user, so
each program multiplies a ``[BLOCK_M, K]`` slice of ``x`` by ``BLOCK_R`` rows of that
user's ``A`` (segments with no adapter exit at once). For decode-shaped batches (a token
or two per user, ``K`` in the thousands) the work per tile is tiny and bandwidth-bound,
so ``K`` is split across ``SPLIT_K`` programs: enough programs stream the users' ``A``
rows to fill the memory system. They either accumulate with atomics into a zeroed fp32
``t`` (the op's contract), or — ``partials=True``, what the op's decode path uses — each
stores its partial sum in its own slice of ``t [SPLIT_K, T, R_T]`` and the expand kernel
adds the slices as it loads them: no zero-fill launch, no atomics (the sum's order is fixed,
so results are bitwise reproducible).

``t`` is ``[T, R_T]`` (``R_T`` = the bank's largest rank) in the accumulator dtype;
columns at or past a token's rank are zero. Without a K split the kernel writes every entry
itself (zeros for tokens without an adapter and past a token's rank), so ``t`` needs no
zero-fill launch; with atomics it is zeroed first. In ``partials`` form only the entries of
tokens with an adapter, below their rank, are written (the only ones the expand reads).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import nvtx_range
from .._launch import Launch
from ..plan import tile_span
from ..tuning import get_config, launch_plan
from ._common import acc_dtype, active_segments, cdiv, dot_flags, flags_key, load_tile_info, mma

__all__ = ["lora_shrink", "lora_shrink_torch"]


@triton.jit
def _shrink_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    x_ptr,        # [T, K]        input rows, token order
    a_ptr,        # [cap, K]      adapter rows
    scale_ptr,    # [cap] fp32    per-rank-row scale
    slots_ptr,    # [U, 2] int32  (row offset, rank); rank 0 = none
    sorted_ptr,   # [T_cap] int32 token indices grouped by user
    tiles_ptr,    # [n_tiles, 3]  (start, end, user)
    t_ptr,        # [T, R_T] acc  output (zeroed beforehand when SPLIT_K > 1 and not PARTIALS)
    K, R_T,       #               or [SPLIT_K, T, R_T] partial sums (PARTIALS)
    stride_xt, stride_xk, stride_a, stride_t, stride_ts,
    SPLIT_K: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    start, end, user, offset, rank = load_tile_info(tiles_ptr, slots_ptr, pid_m, R_T)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if pid_r * BLOCK_R >= rank:
        if SPLIT_K == 1 and not PARTIALS:  # t is written whole here (no zero-fill): zeros past the rank
            tok0 = tl.load(sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            tl.store(t_ptr + tok0[:, None] * stride_t + offs_r[None, :], tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC),
                     mask=row_mask[:, None] & (offs_r < R_T)[None, :])
        return
    tok = tl.load(sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    r_mask = offs_r < rank
    a_rows = a_ptr + (offset + offs_r).to(tl.int64) * stride_a
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :] * stride_xk,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_rows[None, :] + kk[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(xt, at, acc, UPCAST, IEEE)
    s = tl.load(scale_ptr + offset + offs_r, mask=r_mask, other=0.0)
    acc = acc * s[None, :].to(ACC)
    out = t_ptr + tok[:, None] * stride_t + offs_r[None, :]
    mask = row_mask[:, None] & r_mask[None, :]
    if PARTIALS:
        tl.store(out + pid_k * stride_ts, acc, mask=mask)
    elif SPLIT_K == 1:  # the block's columns past the rank are written too, as zeros: selected, for
        # acc holds x · 0 there (masked loads, scale 0), NaN where x has a NaN or inf
        tl.store(out, tl.where(r_mask[None, :], acc, 0.0), mask=row_mask[:, None] & (offs_r < R_T)[None, :])
    else:
        tl.atomic_add(out, acc, mask=mask)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    tiles: torch.Tensor,
    segments: torch.Tensor,
    block_ms: list[int],
    max_rank: int,
    *,
    partials: bool = False,
) -> torch.Tensor:
    """Launch the shrink kernel; returns ``t [T, max_rank]`` (accumulator dtype), or with
    ``partials=True`` the split-K partial sums ``[split_k, T, max_rank]`` for
    :func:`kernels.ops.expand.lora_expand_` (which adds them up; see the module docstring)."""
    T, K = x.shape
    acc = acc_dtype(x.dtype)
    if T == 0 or max_rank == 0:
        return torch.zeros((1, T, max_rank) if partials else (T, max_rank), dtype=acc, device=x.device)
    dev, partials = x.device, bool(partials)
    dims = (T, K, max_rank, tuple(block_ms), sorted_tokens.numel(), segments.shape[0], tiles.shape[0], partials)
    off, rows, split_k, launch = launch_plan(("shrink", dims, flags_key(x.dtype)), dev,
                                             lambda: _shrink_plan(*dims, x.dtype, dev))
    if partials or split_k == 1:  # the kernel writes all of t (split_k 1) or all that is read
        t = torch.empty((split_k, T, max_rank) if partials else (T, max_rank), dtype=acc, device=dev)
    else:  # zero: the atomics add into it
        t = torch.zeros(T, max_rank, dtype=acc, device=dev)
    with nvtx_range("milp.kernel.lora_shrink"):
        launch(
            _shrink_kernel, x, lora_a, scale, slots, sorted_tokens, tiles[off : off + rows], t, K, max_rank,
            x.stride(0), x.stride(1), lora_a.stride(0), t.stride(-2), t.stride(0) if partials else 0,
        )
    return t


def _shrink_plan(T: int, K: int, max_rank: int, block_ms: tuple[int, ...], max_tokens: int, max_segments: int,
                 tile_rows: int, partials: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple[int, int, int, Launch]:
    """The shrink's host decisions for one problem (memoised by :func:`kernels.tuning.launch_plan`):
    ``(first tile row, tiles, split_k, the grid with its constexprs and launch options)``."""
    cfg = get_config("shrink", num_tokens=T, n=max_rank, k=K, max_rank=max_rank, dtype=dtype, device=device,
                     block_ms=block_ms)
    off, rows = tile_span(max_tokens, max_segments, block_ms, cfg.block_m, tile_rows)
    split_k = max(1, min(cfg.split_k, cdiv(K, cfg.block_k)))
    grid = (rows, cdiv(max_rank, cfg.block_r), split_k)
    kw = dict(SPLIT_K=split_k, PARTIALS=partials, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
              **dot_flags(dtype), **cfg.kwargs())
    return off, rows, split_k, Launch(grid, kw)


def lora_shrink_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    segments: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """Torch implementation over the plan's segments (the CPU path); same contract."""
    acc = acc_dtype(x.dtype)
    t = torch.zeros(x.shape[0], max_rank, dtype=acc, device=x.device)
    for idx, off, rank in active_segments(slots, sorted_tokens, segments):
        t[idx, :rank] = (x.index_select(0, idx).to(acc) @ lora_a[off : off + rank].to(acc).t()) * scale[
            off : off + rank
        ].to(acc)
    return t
