"""Fused base + multi-LoRA linear: ``y = x Wᵀ + b + Σ_u (s_u ⊙ (x_u A_uᵀ)) B_u`` in one launch.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` for ``BLOCK_M`` tokens of one
segment (one user; the plan never lets a tile cross users). In its K loop each ``x`` tile
is loaded once and multiplied by both the ``W`` tile and the user's ``A`` rows, so the
low-rank product ``t = s ⊙ x Aᵀ`` lands in registers beside the base accumulator and is
expanded by ``B`` before ``y`` is written: one read of ``x``, one write of ``y``.

Every column block recomputes ``x Aᵀ`` (``BLOCK_R/BLOCK_N`` extra tensor-core work), so
this pays only for small ranks; otherwise ``t`` is computed once by
:mod:`kernels.ops.shrink` and the kernel loads it in its epilogue instead (``LOAD_T``,
path ``"fused_t"``). :func:`kernels.tuning.choose_path` decides.

The same kernel computes the input gradient of the backward pass with the roles swapped:
``dx = dy W + (s ⊙ dy Bᵀ) A`` is ``fused_linear(dy, Wᵀ, P=B, Q=A)`` (``weight_layout="kn"``),
and its ``t`` output is what the grouped ``dA`` reduction needs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import nvtx_range
from .._launch import Launch
from ..plan import tile_span
from ..tuning import FUSED_MAX_BLOCK_R, get_config, launch_plan
from ._common import (
    acc_dtype,
    active_segments,
    cdiv,
    dot_flags,
    flags_key,
    load_tile_info,
    mma,
    next_pow2,
    token_adapters,
)
from .shrink import lora_shrink

__all__ = ["fused_lora_linear", "fused_lora_linear_torch", "GATHER_MAX_ELEMENTS"]

#: The torch path gathers per-token adapter rows (``T · R_max · (k + d)`` elements) up to
#: this size, and loops over the plan's segments above it.
GATHER_MAX_ELEMENTS = 1 << 22


@triton.jit
def _k_loop(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    x_ptrs, w_ptrs, a_ptrs, K, step_x, step_w, acc, acc_t, WITH_A: tl.constexpr, load_a,
    EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``acc += x Wᵀ`` (and ``acc_t += x Aᵀ`` when WITH_A) over K; each x tile is loaded once.

    ``load_a`` (``[1, BLOCK_R]``) masks the A columns: masked columns read as zeros.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = mma(xt, wt, acc, UPCAST, IEEE)
        if WITH_A:
            if EVEN_K:
                at = tl.load(a_ptrs, mask=load_a, other=0.0)
            else:
                at = tl.load(a_ptrs, mask=k_ok[:, None] & load_a, other=0.0)
            acc_t = mma(xt, at, acc_t, UPCAST, IEEE)
            a_ptrs += BLOCK_K
        x_ptrs += step_x
        w_ptrs += step_w
    return acc, acc_t


@triton.jit
def _fused_lora_linear_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    x_ptr,        # [T, K]          input rows, token order
    w_ptr,        # [N, K] | [K, N] base weight, element (n, k) at n*stride_wn + k*stride_wk
    bias_ptr,     # [N]             (unused unless HAS_BIAS)
    a_ptr,        # [cap, K]        shrink-side adapter rows (A forward, B backward), unit column stride
    b_ptr,        # [cap, N]        expand-side adapter rows (B forward, A backward), unit column stride
    scale_ptr,    # [cap]  fp32     per-rank-row scale s_j = alpha_j / r_j
    slots_ptr,    # [U, 2] int32    (row offset, rank) per user; rank 0 = no adapter
    sorted_ptr,   # [T_cap] int32   token indices grouped by user
    tiles_ptr,    # [n_tiles, 3]    (start, end, user) per tile of <= BLOCK_M sorted rows
    t_ptr,        # [T, R_T] acc    t = s * (x A^T): written if STORE_T, read if LOAD_T
    y_ptr,        # [T, N]          output
    n_tiles, K, N, R_T,                 # R_T: t's row width, the launch's max_rank
    stride_xt, stride_xk, stride_wn, stride_wk, stride_a, stride_b, stride_t, stride_yt,
    HAS_BIAS: tl.constexpr,
    LOAD_T: tl.constexpr,
    STORE_T: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
):
    # grouped ordering: GROUP_M consecutive row tiles share a column block (W tile reuse in L2)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    start, end, user, offset, rank = load_tile_info(tiles_ptr, slots_ptr, pid_m, R_T)
    if start >= end:
        return
    # Loads stay in bounds without masks: rows past the tile's end re-read its last token,
    # columns past N wrap around, rank rows past the user's rank wrap inside the user's own
    # rows (their products are zeroed by the scale, loaded masked). Only stores are masked.
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tok = tl.load(sorted_ptr + tl.minimum(rows, end - 1)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_nl = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk            # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_nl[None, :] * stride_wn        # [BLOCK_K, BLOCK_N]
    step_x = BLOCK_K * stride_xk
    step_w = BLOCK_K * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    if LOAD_T:
        acc, _ = _k_loop(x_ptrs, w_ptrs, x_ptrs, K, step_x, step_w, acc, acc, False, None, EVEN_K, BLOCK_K,
                         UPCAST, IEEE)
        if rank > 0:
            for r0 in range(0, rank, BLOCK_R):
                rr = r0 + offs_r
                r_mask = rr < rank
                tt = tl.load(t_ptr + tok[:, None] * stride_t + rr[None, :], mask=r_mask[None, :], other=0.0)
                b_rows = (offset + tl.minimum(rr, rank - 1)).to(tl.int64)
                bt = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_nl[None, :])
                acc = mma(tt.to(bt.dtype), bt, acc, UPCAST, IEEE)
    else:
        # One K loop for every tile (two pipelined loops in one kernel would each claim their
        # own shared-memory stages): tiles without an adapter skip the A loads (masked off)
        # and multiply zeros, a BLOCK_R/BLOCK_N share of extra tensor-core work on those tiles.
        r_mask = offs_r < rank                                                          # all false: no adapter
        ar = (offset + offs_r % tl.maximum(rank, 1)).to(tl.int64)                      # wraps inside the user
        a_ptrs = a_ptr + ar[None, :] * stride_a + offs_k[:, None]                       # [BLOCK_K, BLOCK_R]
        acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        acc, acc_t = _k_loop(x_ptrs, w_ptrs, a_ptrs, K, step_x, step_w, acc, acc_t, True, r_mask[None, :], EVEN_K,
                             BLOCK_K, UPCAST, IEEE)
        if rank > 0:
            s = tl.load(scale_ptr + offset + offs_r, mask=r_mask, other=0.0)
            acc_t = acc_t * s[None, :].to(ACC)
            if STORE_T:
                if pid_n == 0:
                    tl.store(t_ptr + tok[:, None] * stride_t + offs_r[None, :], acc_t,
                             mask=row_mask[:, None] & r_mask[None, :])
            bt = tl.load(b_ptr + ar[:, None] * stride_b + offs_nl[None, :])
            acc = mma(acc_t.to(bt.dtype), bt, acc, UPCAST, IEEE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_nl)
        acc = acc + bias[None, :].to(ACC)
    tl.store(y_ptr + tok[:, None] * stride_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    tiles: torch.Tensor,
    segments: torch.Tensor,
    block_ms: list[int],
    max_rank: int,
    *,
    weight_layout: str = "nk",
    store_t: bool = False,
    precompute_t: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; returns ``(y [T, N], t [T, max_rank] or [0])``.

    ``weight`` is ``[N, K]`` (``"nk"``, a ``nn.Linear`` weight) or ``[K, N]`` (``"kn"``).
    ``precompute_t``: run the shrink first and expand the stored ``t`` in the epilogue
    (path ``"fused_t"``); otherwise ``t`` is computed inside the K loop (path ``"fused"``),
    which needs ``max_rank`` small (see :func:`kernels.tuning.choose_path`; above
    :data:`kernels.tuning.FUSED_MAX_BLOCK_R` it runs as ``fused_t``).
    Inputs are assumed validated by the op layer (:mod:`kernels.library`).
    """
    T, K = x.shape
    N = weight.shape[0] if weight_layout == "nk" else weight.shape[1]
    if weight_layout == "nk":
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    else:
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    acc = acc_dtype(x.dtype)
    empty = torch.empty(0, dtype=acc, device=x.device)
    if T == 0:
        return y, (torch.zeros(0, max_rank, dtype=acc, device=x.device) if store_t else empty)

    dims = (T, N, K, max_rank, tuple(block_ms), sorted_tokens.numel(), segments.shape[0], tiles.shape[0],
            bias is not None, bool(store_t), bool(precompute_t))
    off, rows, load_t, launch = launch_plan(("fused_linear", dims, flags_key(x.dtype)), x.device,
                                            lambda: _fused_plan(*dims, x.dtype, x.device))
    t = empty
    if load_t:
        t = lora_shrink(x, lora_a, scale, slots, sorted_tokens, tiles, segments, block_ms, max_rank)
    elif store_t:
        t = torch.zeros(T, max_rank, dtype=acc, device=x.device)
    with nvtx_range("milp.kernel.fused_lora_linear"):
        launch(
            _fused_lora_linear_kernel, x, weight, bias if bias is not None else y, lora_a, lora_b, scale, slots,
            sorted_tokens, tiles[off : off + rows], t if t.numel() else y, y,
            rows, K, N, max_rank,
            x.stride(0), x.stride(1), stride_wn, stride_wk, lora_a.stride(0), lora_b.stride(0),
            t.stride(0) if t.dim() == 2 else 0, y.stride(0),
        )
    return y, (t if store_t else empty)


def _fused_plan(T: int, N: int, K: int, max_rank: int, block_ms: tuple[int, ...], max_tokens: int, max_segments: int,
                tile_rows: int, has_bias: bool, store_t: bool, precompute_t: bool, dtype: torch.dtype,
                device: torch.device) -> tuple[int, int, bool, Launch]:
    """The fused launch's host decisions for one problem (memoised by
    :func:`kernels.tuning.launch_plan`): ``(first tile row, tiles, load_t, the grid with its
    constexprs and launch options)``."""
    # a rank too large for registers runs as fused_t whatever the caller asked (FUSED_MAX_BLOCK_R)
    load_t = (precompute_t or next_pow2(max_rank) > FUSED_MAX_BLOCK_R) and max_rank > 0
    cfg = get_config("fused_linear", num_tokens=T, n=N, k=K, max_rank=max_rank, dtype=dtype, device=device,
                     block_ms=block_ms)
    bm = cfg.block_m
    off, rows = tile_span(max_tokens, max_segments, block_ms, bm, tile_rows)
    block_r = cfg.block_r if load_t else next_pow2(max_rank)
    grid = (rows * cdiv(N, cfg.block_n),)
    kw = dict(HAS_BIAS=has_bias, LOAD_T=load_t, STORE_T=store_t and not load_t, EVEN_K=K % cfg.block_k == 0,
              BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=8,
              **dot_flags(dtype), **cfg.kwargs())
    return off, rows, load_t, Launch(grid, kw)


def _gather_width(x: torch.Tensor, rank: torch.Tensor, max_rank: int) -> int:
    """How many rank columns the gather form computes: on CPU the batch's own largest rank (a
    cheap read that saves work), on a device the launch's ``max_rank``, so that nothing waits
    for the device and a CUDA graph can capture the call (the extra columns are masked to 0:
    the same values, to rounding)."""
    if x.device.type != "cpu":
        return max_rank
    return int(rank.max()) if rank.numel() else 0


def fused_lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    segments: torch.Tensor,
    max_rank: int,
    *,
    weight_layout: str = "nk",
    store_t: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation over the plan's segments (the CPU path); same contract.

    Two forms, same result: when the per-token copies of the adapter rows are small
    (``T · R_max · (k + d) <= GATHER_MAX_ELEMENTS``: decode, short batches) or a CUDA graph
    is being captured, every token's rows are gathered and applied by two batched matmuls — a
    fixed handful of ops whatever the number of users, none reading device data on the host;
    otherwise a loop over the plan's segments (two matmuls per user; it reads the plan).
    """
    acc = acc_dtype(x.dtype)
    if weight is None:  # the adapters' contribution alone
        y = x.new_zeros(x.shape[0], lora_b.shape[1])
    else:
        y = torch.nn.functional.linear(x, weight if weight_layout == "nk" else weight.t(), bias)
    t = torch.zeros(x.shape[0], max_rank, dtype=acc, device=x.device) if store_t else x.new_empty(0, dtype=acc)
    T = x.shape[0]
    # the gather form also under CUDA-graph capture, whatever its size: the loop over
    # segments reads the plan on the host, which a capture cannot
    if T * max_rank * (lora_a.shape[1] + lora_b.shape[1]) <= GATHER_MAX_ELEMENTS or (
            x.is_cuda and torch.cuda.is_current_stream_capturing()):
        off, rank = token_adapters(slots, sorted_tokens, segments, T)
        r_max = _gather_width(x, rank, max_rank)
        if r_max == 0 or T == 0:
            return y, t
        j = torch.arange(r_max, device=x.device)
        mask = j < rank[:, None]  # [T, R]
        rows = torch.where(mask, off[:, None] + j, 0)
        tu = torch.bmm(lora_a[rows].to(acc), x.to(acc)[:, :, None])[..., 0]  # [T, R]
        tu = torch.where(mask, tu * scale[rows].to(acc), 0)
        if store_t:
            t[:, :r_max] = tu
        # the masked columns' rows (row 0: another user's, or a freed one) are zeroed, not
        # multiplied by a zero t: a NaN or inf there would make 0 * NaN = NaN in this token's row
        b_rows = torch.where(mask[:, :, None], lora_b[rows].to(acc), 0)
        delta = torch.bmm(tu[:, None, :], b_rows)[:, 0]  # [T, d]
        live = rank > 0  # tokens without an adapter keep y exactly
        y = torch.where(live[:, None], (y.to(acc) + delta).to(y.dtype), y)
        return y, t
    for idx, off, rank in active_segments(slots, sorted_tokens, segments):  # type: ignore[assignment]  # ints here
        tu = (x.index_select(0, idx).to(acc) @ lora_a[off : off + rank].to(acc).t()) * scale[off : off + rank].to(acc)
        if store_t:
            t[idx, :rank] = tu
        delta = tu @ lora_b[off : off + rank].to(acc)
        y[idx] = (y.index_select(0, idx).to(acc) + delta).to(y.dtype)
    return y, t
