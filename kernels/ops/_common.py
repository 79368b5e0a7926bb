"""Pieces shared by the Triton kernels and their launchers."""
from __future__ import annotations

import types
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .._backend import interpreting

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / intermediate dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_flags(dtype: torch.dtype) -> types.MappingProxyType:
    """Constexpr flags of :func:`mma` for operands of ``dtype``.

    ``UPCAST``: the Triton interpreter multiplies bf16 operands as their raw uint16 bits
    (triton 3.9 ``create_dot``), so under ``TRITON_INTERPRET=1`` bf16 tiles are widened to
    fp32 first (exact: a bf16×bf16 product fits fp32, and the accumulator is fp32 anyway).
    ``IEEE``: full-precision fp32/fp64 products unless torch allows TF32 for matmuls.
    """
    key = flags_key(dtype)
    flags = _DOT_FLAGS.get(key)
    if flags is None:  # memoised: every launch asks, and a decode step launches hundreds
        ieee = dtype == torch.float64 or (dtype == torch.float32 and not key[1])
        flags = _DOT_FLAGS[key] = types.MappingProxyType({
            "UPCAST": bool(dtype == torch.bfloat16 and key[2]),
            "IEEE": bool(ieee),
            "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        })
    return flags


_DOT_FLAGS: dict[tuple, types.MappingProxyType] = {}


def flags_key(dtype: torch.dtype) -> tuple:
    """What :func:`dot_flags` of ``dtype`` depends on (part of every launcher's memo key)."""
    return (dtype, _allow_tf32(), interpreting())


# torch.backends.cuda.matmul.allow_tf32 goes through a module __getattr__ to this getter (0.7 µs
# against 0.05 on a CPU host); the property where a torch lacks it
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (lambda: torch.backends.cuda.matmul.allow_tf32)


@triton.jit
def mma(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``acc + a @ b`` (see :func:`dot_flags`). ``out_dtype`` is the accumulator's: triton
    3.6 defaults it to fp32 and rejects an fp64 accumulator otherwise (3.7+ infers it)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def load_tile_info(  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
    tiles_ptr, slots_ptr, pid, max_rank,
):
    """``(start, end, user, row_offset, rank)`` of tile ``pid``; rank 0 when the tile's user
    has no adapter (user -1, or rank 0 at this layer).

    The rank is clamped to ``max_rank``, the width of the launch's ``t`` rows: every ``t``
    access and every rank-block loop is bounded by it, so a slot whose rank exceeds the
    caller's ``max_rank`` (a contract violation the op layer refuses on CPU and under
    ``MILP_DEBUG=1``, but cannot see on a GPU without reading device memory) only loses its
    rank rows past ``max_rank`` instead of writing past ``t`` into other tokens' rows or out
    of the allocation."""
    start = tl.load(tiles_ptr + pid * 3)
    end = tl.load(tiles_ptr + pid * 3 + 1)
    user = tl.load(tiles_ptr + pid * 3 + 2)
    safe = tl.maximum(user, 0)
    offset = tl.load(slots_ptr + safe * 2)
    rank = tl.load(slots_ptr + safe * 2 + 1)
    rank = tl.where(user >= 0, tl.minimum(rank, max_rank), 0)
    return start, end, user, offset, rank


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(1, int(n)) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launch grids (plain ints: ``triton.cdiv`` costs microseconds
    per call on the host, and a decode step launches hundreds of kernels)."""
    return -(-a // b)


def token_adapters(slots: torch.Tensor, sorted_tokens: torch.Tensor, segments: torch.Tensor,
                   num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(row offset, rank)`` (``[T]`` int64 each; rank 0 = no adapter) from the plan,
    with tensor ops only (no loop over segments): the torch path's gather form.

    No op reads device data on the host (no ``repeat_interleave`` without a size, no
    ``nonzero``): on a GPU it enqueues work without waiting for the device, and it can be
    captured in a CUDA graph. The plan's segments, in row order, are laid end to end over the
    positions of ``sorted_tokens``; each position finds its segment by a search in their
    cumulative lengths, and positions past the last segment change nothing.

    Example:
        >>> import torch
        >>> slots = torch.tensor([[0, 2], [2, 3]], dtype=torch.int32)
        >>> segs = torch.tensor([[0, 2, 1], [2, 3, -1], [3, 4, 0], [0, 0, -1]], dtype=torch.int32)
        >>> off, rank = token_adapters(slots, torch.tensor([1, 3, 0, 2], dtype=torch.int32), segs, 4)
        >>> off.tolist(), rank.tolist()
        ([0, 2, 0, 2], [0, 3, 2, 3])
    """
    dev = segments.device
    start, end, user = segments.long().unbind(-1)
    length = (end - start).clamp(min=0)
    safe = user.clamp(min=0)
    seg_off = slots[safe, 0].long()
    seg_rank = torch.where(user >= 0, slots[safe, 1].long(), 0)
    cum = torch.cumsum(length, 0)  # [S]: where each segment ends, laid end to end
    p = torch.arange(sorted_tokens.shape[0], device=dev)
    seg = torch.searchsorted(cum, p, right=True).clamp_(max=segments.shape[0] - 1)  # [P]: its segment
    live = p < cum[-1] if segments.shape[0] else torch.zeros_like(p, dtype=torch.bool)
    pos = (start[seg] + p - (cum[seg] - length[seg])).clamp_(0, max(sorted_tokens.shape[0] - 1, 0))
    tok = torch.where(live, sorted_tokens.long()[pos], num_tokens)  # a position past the segments: row T, dropped
    off = torch.zeros(num_tokens + 1, dtype=torch.long, device=dev)
    rank = torch.zeros(num_tokens + 1, dtype=torch.long, device=dev)
    off[tok], rank[tok] = seg_off[seg], seg_rank[seg]
    return off[:num_tokens], rank[:num_tokens]


def active_segments(slots: torch.Tensor, sorted_tokens: torch.Tensor,
                    segments: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Yield ``(token indices, row offset, rank)`` of each segment whose user has an adapter.

    Host loop over the plan (the torch path); reads the tables to the host once: of the slot
    table only the rows of the plan's users (not all ``max_users``: one read per layer and call).
    """
    segs = [(start, end, user) for start, end, user in segments.tolist() if user >= 0 and end > start]
    if not segs:
        return
    users = [user for _, _, user in segs]
    slot_rows = dict(zip(users, slots[torch.tensor(users, device=slots.device)].tolist()))
    for start, end, user in segs:
        off, rank = slot_rows[user]
        if rank <= 0:
            continue
        yield sorted_tokens[start:end].long(), off, rank
