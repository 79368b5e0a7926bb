"""Fused multi-LoRA kernels for many users' adapters in one batch.

``y = x Wᵀ + b + Σ_j s_j (x A_jᵀ) B_jᵀ`` where every token carries its user's adapters
(ragged ranks, several modules per user, or none). Three pieces:

* :class:`AdapterBank` — one target linear's adapters of all users, packed ragged;
* :class:`BatchPlan` — a batch's token → user ids as sorted segments and tile schedules,
  built once per batch and shared by every layer;
* the ops — :func:`lora_linear` (autograd), :func:`lora_shrink`, :func:`lora_expand_`,
  registered as ``torch.ops.milp.*`` custom ops (Triton on CUDA, torch on CPU).

Example:
    >>> import torch, kernels
    >>> bank = kernels.AdapterBank(32, 48, max_users=3)
    >>> _ = bank.add(0, ranks=[8], init="random"); _ = bank.add(2, ranks=[4, 4], init="random")
    >>> plan = kernels.BatchPlan.build(torch.tensor([0, 2, -1, 2]), max_users=3)
    >>> x, w = torch.randn(4, 32), torch.randn(48, 32)
    >>> kernels.lora_linear(x, w, None, bank, plan).shape
    torch.Size([4, 48])
"""
from __future__ import annotations

import warnings

import torch

from . import _name_clash
from . import library as _library  # noqa: F401  (registers torch.ops.milp.*)
from ._backend import TRITON_MIN_CAPABILITY, backend_for, interpreting, nvtx_range, triton_supports, use_backend
from .bank import AdapterBank, AdapterSegment
from .plan import DEFAULT_BLOCK_MS, BatchPlan
from .tuning import (
    DECODE_MAX_TOKENS,
    FUSED_MAX_RANK,
    PATHS,
    SPLIT_TOKENS_PER_SEGMENT,
    LaunchConfig,
    choose_path,
    get_config,
    use_dispatch,
)

__version__ = "0.1.0"  # keep outside [0.18.2, 0.20): transformers probes a package named `kernels`

if (_hf_version := _name_clash.hf_kernels_version()) is not None:  # see kernels/_name_clash.py
    warnings.warn(_name_clash.clash_message(_hf_version, transformers_uses_it=False), RuntimeWarning, stacklevel=2)

__all__ = [
    "AdapterBank",
    "AdapterSegment",
    "BatchPlan",
    "DEFAULT_BLOCK_MS",
    "DECODE_MAX_TOKENS",
    "FUSED_MAX_RANK",
    "LaunchConfig",
    "PATHS",
    "SPLIT_TOKENS_PER_SEGMENT",
    "TRITON_MIN_CAPABILITY",
    "backend_for",
    "choose_path",
    "get_config",
    "interpreting",
    "lora_expand_",
    "lora_linear",
    "lora_shrink",
    "nvtx_range",
    "triton_supports",
    "use_backend",
    "use_dispatch",
]


def _check_bank_plan(bank: AdapterBank, plan: BatchPlan) -> None:
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"bank must be an AdapterBank, got {type(bank).__name__}")
    if not isinstance(plan, BatchPlan):
        raise TypeError(f"plan must be a BatchPlan, got {type(plan).__name__}")
    if plan.max_users > bank.max_users:
        raise ValueError(f"plan.max_users={plan.max_users} exceeds bank.max_users={bank.max_users}")


def _check_plan(x2: torch.Tensor, bank: AdapterBank, plan: BatchPlan) -> None:
    _check_bank_plan(bank, plan)
    # not while compiling: plan.num_tokens is a Python int, and comparing x's token count with it
    # would specialize a dynamic token count (the op's own checks still see a plan too small)
    if not torch.compiler.is_compiling() and x2.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x2.shape[0]} tokens but the plan was built for {plan.num_tokens}")
    if x2.shape[-1] != bank.in_features:
        raise ValueError(f"x must have {bank.in_features} features (bank.in_features), got {x2.shape[-1]}")


def _flat(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bank: AdapterBank,
    plan: BatchPlan,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """``x Wᵀ + b`` plus each token's user adapters from ``bank``; differentiable.

    ``x``: ``[..., in_features]``, tokens in the order ``plan`` was built with (leading
    dimensions flattened). ``weight``: ``[out_features, in_features]``, or ``None`` for the
    adapters' contribution alone, ``Σ s B A x`` (with ``bias=None``): add it to a base output
    computed elsewhere (a quantized or sharded linear, a serving stack's own GEMM); it runs the
    split path's shrink and expand and is differentiable the same way. ``path``:
    ``"auto"`` (by :func:`choose_path` from the token count, the bank's largest rank and
    the users present) or one of :data:`PATHS`.

    Example:
        >>> bank = AdapterBank(16, 16, max_users=1); _ = bank.add(0, 8, init="random")
        >>> plan = BatchPlan.build(torch.zeros(5, dtype=torch.long), max_users=1)
        >>> lora_linear(torch.randn(5, 16), torch.randn(16, 16), None, bank, plan).shape
        torch.Size([5, 16])
        >>> x = torch.randn(5, 16); base = torch.nn.Linear(16, 16)  # any module computing the base
        >>> y = base(x) + lora_linear(x, None, None, bank, plan)    # the adapters alone, added
    """
    x2 = _flat(x)
    _check_plan(x2, bank, plan)
    for name, t in (("weight", weight), ("bias", bias)):  # before .requires_grad is read below
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    # any differentiable input takes the autograd path: a weight or bias alone too
    save_t = torch.is_grad_enabled() and (
        x.requires_grad or bank.lora_a.requires_grad or bank.lora_b.requires_grad
        or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    )
    sorted_tokens, tiles, segments, block_ms = plan.as_args()
    if path == "auto" and weight is not None and x2.is_cuda and not torch.compiler.is_compiling():
        # eager only: under torch.compile the op decides at run time by token count, so the
        # graph does not depend on the batch's users (plan.num_segments) and needs no re-trace
        path = choose_path(x2.shape[0], bank.max_rank, num_segments=plan.num_segments, device=x2.device)
    args = (x2, weight, bias, bank.lora_a, bank.lora_b, bank.scale, bank.slots, sorted_tokens, tiles, segments,
            block_ms, bank.max_rank)
    if not _library.direct_call_ok(x2):  # compile, profiler, modes, torch.func: the op
        y, _ = torch.ops.milp.lora_linear(*args, save_t, path)
    elif save_t:  # eager training: the op's functions and autograd, without the dispatcher
        y = _library.EagerLoraLinear.apply(*args, path)
    else:
        y, _ = _library.lora_linear_forward(*args, False, path)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def lora_shrink(x: torch.Tensor, bank: AdapterBank, plan: BatchPlan) -> torch.Tensor:
    """``t [T, bank.max_rank]`` with ``t[i, :R_u] = s ⊙ x_i A_uᵀ`` (fp32; fp64 for fp64 ``x``).

    Example:
        >>> bank = AdapterBank(16, 16, max_users=1); _ = bank.add(0, 8, init="random")
        >>> plan = BatchPlan.build(torch.zeros(3, dtype=torch.long), max_users=1)
        >>> lora_shrink(torch.randn(3, 16), bank, plan).shape
        torch.Size([3, 8])
    """
    x2 = _flat(x)
    _check_plan(x2, bank, plan)
    sorted_tokens, tiles, segments, block_ms = plan.as_args()
    return torch.ops.milp.lora_shrink(
        x2, bank.lora_a, bank.scale, bank.slots, sorted_tokens, tiles, segments, block_ms, bank.max_rank
    )


def lora_expand_(y: torch.Tensor, t: torch.Tensor, bank: AdapterBank, plan: BatchPlan) -> torch.Tensor:
    """Add ``t[i, :R_u] B_u`` into ``y [T, out_features]`` in place; returns ``y``.

    Example:
        >>> bank = AdapterBank(16, 24, max_users=1); _ = bank.add(0, 8, init="random")
        >>> plan = BatchPlan.build(torch.zeros(3, dtype=torch.long), max_users=1)
        >>> y = torch.zeros(3, 24); _ = lora_expand_(y, torch.randn(3, 8), bank, plan)
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 2:
        raise ValueError("y must be a 2-D [tokens, out_features] tensor")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    _check_bank_plan(bank, plan)
    # not while compiling, as in _check_plan: comparing with plan.num_tokens (a Python int) would
    # specialize a dynamic token count (the op's own checks still refuse a plan too small)
    if not torch.compiler.is_compiling() and y.shape[0] != plan.num_tokens:
        raise ValueError(f"y has {y.shape[0]} tokens but the plan was built for {plan.num_tokens}")
    if y.shape[1] != bank.out_features:
        raise ValueError(f"y must have {bank.out_features} columns (bank.out_features), got {y.shape[1]}")
    sorted_tokens, tiles, segments, block_ms = plan.as_args()
    torch.ops.milp.lora_expand_(y, t, bank.lora_b, bank.slots, sorted_tokens, tiles, segments, block_ms)
    return y
