"""The ops' semantics, written plainly (per token ids, no plan) for testing in float64.

These are the specification every kernel and every torch path is checked against.
They take ``token_user`` (``[T]`` ids, ``-1`` = no adapter) instead of a plan, so they
also check the plan. Computation runs in ``compute_dtype`` (default float64).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["shrink_ref", "expand_ref", "lora_linear_ref", "lora_linear_grads_ref"]


def _users(token_user: torch.Tensor, slots: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, int]]:
    for u in torch.unique(token_user).tolist():
        if u < 0:
            continue
        off, rank = (int(v) for v in slots[u].tolist())
        if rank > 0:
            yield (token_user == u).nonzero().flatten(), off, rank


def shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor,
               token_user: torch.Tensor, max_rank: int, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``t [T, max_rank]``: ``t[i, :R_u] = s ⊙ x_i A_uᵀ``; zero elsewhere."""
    c = compute_dtype
    t = torch.zeros(x.shape[0], max_rank, dtype=c, device=x.device)
    for idx, off, r in _users(token_user, slots):
        t[idx, :r] = (x[idx].to(c) @ lora_a[off : off + r].to(c).t()) * scale[off : off + r].to(c)
    return t


def expand_ref(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, token_user: torch.Tensor,
               compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``y + t[:, :R_u] B_u`` per token (out of place, in ``compute_dtype``)."""
    c = compute_dtype
    out = y.to(c).clone()
    for idx, off, r in _users(token_user, slots):
        out[idx] += t[idx, :r].to(c) @ lora_b[off : off + r].to(c)
    return out


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor, token_user: torch.Tensor,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x Wᵀ + b + Σ s ⊙ (x A_uᵀ) B_u`` per token (in ``compute_dtype``)."""
    c = compute_dtype
    y = x.to(c) @ weight.to(c).t()
    if bias is not None:
        y = y + bias.to(c)
    max_rank = int(slots[:, 1].max()) if slots.numel() else 0
    t = shrink_ref(x, lora_a, scale, slots, token_user, max_rank, c)
    return expand_ref(y, t, lora_b, slots, token_user, c)


def lora_linear_grads_ref(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scale: torch.Tensor, slots: torch.Tensor, token_user: torch.Tensor, dy: torch.Tensor,
                          compute_dtype: torch.dtype = torch.float64,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)`` of ``<dy, lora_linear(x)>`` by the closed forms (in ``compute_dtype``)."""
    c = compute_dtype
    dx = dy.to(c) @ weight.to(c)
    da = torch.zeros(lora_a.shape, dtype=c, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=c, device=x.device)
    for idx, off, r in _users(token_user, slots):
        s = scale[off : off + r].to(c)
        a, b = lora_a[off : off + r].to(c), lora_b[off : off + r].to(c)
        xu, gu = x[idx].to(c), dy[idx].to(c)
        t_fwd = (xu @ a.t()) * s
        t_bwd = (gu @ b.t()) * s
        dx[idx] += t_bwd @ a
        da[off : off + r] = t_bwd.t() @ xu
        db[off : off + r] = t_fwd.t() @ gu
    return dx, da, db
