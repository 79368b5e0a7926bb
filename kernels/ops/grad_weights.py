"""Grouped adapter gradients, every segment and both matrices in one launch.

For user ``u`` with tokens ``S_u`` (a segment of the plan), rows ``off_u .. off_u+R_u``::

    dA[off_u + r, :] = Σ_{i ∈ S_u} t_bwd[i, r] · x[i, :]      (t_bwd = s ⊙ dy Bᵀ)
    dB[off_u + r, :] = Σ_{i ∈ S_u} t_fwd[i, r] · dy[i, :]     (t_fwd = s ⊙ x Aᵀ)

Grid: (segment, rank block, column block over ``K`` then ``N``). Each program reduces
over its segment's tokens in chunks of ``BLOCK_T`` rows (gathered through the sorted
order) and writes its ``[BLOCK_R, BLOCK_C]`` block once: no atomics, deterministic.
Rows of users absent from the batch are zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import nvtx_range
from .._launch import Launch
from ..tuning import get_config, launch_plan
from ._common import acc_dtype, active_segments, cdiv, dot_flags, flags_key, load_tile_info, mma

__all__ = ["lora_grad_weights", "lora_grad_weights_torch"]


@triton.jit
def _reduce_block(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    v_ptr, t_ptr, out_ptr, sorted_ptr, start, end, offset, offs_r, r_mask, C, pid_c,
    stride_v, stride_t, stride_o,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for i0 in range(start, end, BLOCK_T):
        rows = i0 + tl.arange(0, BLOCK_T)
        row_mask = rows < end
        tok = tl.load(sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        v = tl.load(v_ptr + tok[:, None] * stride_v + offs_c[None, :], mask=row_mask[:, None] & c_mask[None, :],
                    other=0.0)                                                   # [BLOCK_T, BLOCK_C]
        tt = tl.load(t_ptr + tok[None, :] * stride_t + offs_r[:, None], mask=r_mask[:, None] & row_mask[None, :],
                     other=0.0)                                                  # [BLOCK_R, BLOCK_T]
        acc = mma(tt.to(v.dtype), v, acc, UPCAST, IEEE)
    tl.store(out_ptr + (offset + offs_r)[:, None].to(tl.int64) * stride_o + offs_c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])


@triton.jit
def _grad_weights_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    x_ptr,        # [T, K]         layer input
    dy_ptr,       # [T, N]         gradient of the layer output
    t_bwd_ptr,    # [T, R_T] acc   s * (dy B^T)
    t_fwd_ptr,    # [T, R_T] acc   s * (x A^T)
    slots_ptr,    # [U, 2] int32   (row offset, rank)
    sorted_ptr,   # [T_cap] int32  token indices grouped by user
    seg_ptr,      # [S, 3] int32   (start, end, user) per segment
    da_ptr,       # [cap, K]       output, rows of present users
    db_ptr,       # [cap, N]       output, rows of present users
    K, N, R_T,    #                R_T: t's row width, the launch's max_rank
    stride_x, stride_dy, stride_tb, stride_tf, stride_da, stride_db,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    start, end, user, offset, rank = load_tile_info(seg_ptr, slots_ptr, pid_s, R_T)
    if start >= end or pid_r * BLOCK_R >= rank:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    n_kb = tl.cdiv(K, BLOCK_C)
    if pid_c < n_kb:
        _reduce_block(x_ptr, t_bwd_ptr, da_ptr, sorted_ptr, start, end, offset, offs_r, r_mask, K, pid_c,
                      stride_x, stride_tb, stride_da, BLOCK_R, BLOCK_C, BLOCK_T, UPCAST, IEEE, ACC)
    else:
        _reduce_block(dy_ptr, t_fwd_ptr, db_ptr, sorted_ptr, start, end, offset, offs_r, r_mask, N, pid_c - n_kb,
                      stride_dy, stride_tf, stride_db, BLOCK_R, BLOCK_C, BLOCK_T, UPCAST, IEEE, ACC)


def lora_grad_weights(
    x: torch.Tensor,
    dy: torch.Tensor,
    t_bwd: torch.Tensor,
    t_fwd: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    segments: torch.Tensor,
    capacity: int,
    max_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the grouped kernel; returns ``(dA [capacity, K], dB [capacity, N])`` in ``x``'s dtype."""
    T, K = x.shape
    N = dy.shape[1]
    da = torch.zeros(capacity, K, dtype=x.dtype, device=x.device)
    db = torch.zeros(capacity, N, dtype=x.dtype, device=x.device)
    if T == 0 or max_rank == 0 or capacity == 0:
        return da, db
    dims = (T, N, K, max_rank, segments.shape[0])
    launch = launch_plan(("grad_weights", dims, flags_key(x.dtype)), x.device,
                         lambda: _grad_weights_plan(*dims, x.dtype, x.device))
    with nvtx_range("milp.kernel.lora_grad_weights"):
        launch(
            _grad_weights_kernel, x, dy, t_bwd, t_fwd, slots, sorted_tokens, segments, da, db, K, N, max_rank,
            x.stride(0), dy.stride(0), t_bwd.stride(0), t_fwd.stride(0), da.stride(0), db.stride(0),
        )
    return da, db


def _grad_weights_plan(T: int, N: int, K: int, max_rank: int, max_segments: int, dtype: torch.dtype,
                       device: torch.device) -> Launch:
    """The grid with its constexprs and launch options of one problem (memoised by
    :func:`kernels.tuning.launch_plan`)."""
    cfg = get_config("grad_weights", num_tokens=T, n=N, k=K, max_rank=max_rank, dtype=dtype, device=device)
    bc = cfg.block_n
    grid = (max_segments, cdiv(max_rank, cfg.block_r), cdiv(K, bc) + cdiv(N, bc))
    return Launch(grid, dict(BLOCK_R=cfg.block_r, BLOCK_C=bc, BLOCK_T=cfg.block_k, **dot_flags(dtype),
                             **cfg.kwargs()))


def lora_grad_weights_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    t_bwd: torch.Tensor,
    t_fwd: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    segments: torch.Tensor,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation over the plan's segments (the CPU path); same contract."""
    acc = acc_dtype(x.dtype)
    da = torch.zeros(capacity, x.shape[1], dtype=x.dtype, device=x.device)
    db = torch.zeros(capacity, dy.shape[1], dtype=x.dtype, device=x.device)
    for idx, off, rank in active_segments(slots, sorted_tokens, segments):
        da[off : off + rank] = (t_bwd.index_select(0, idx)[:, :rank].t() @ x.index_select(0, idx).to(acc)).to(x.dtype)
        db[off : off + rank] = (t_fwd.index_select(0, idx)[:, :rank].t() @ dy.index_select(0, idx).to(acc)).to(x.dtype)
    return da, db
